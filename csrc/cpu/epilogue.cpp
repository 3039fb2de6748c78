// The CPU epilogue: bias + residual + ReLU over a convolution's output in one pass, used
// where the oneDNN primitive cannot take the epilogue as post-ops (oneDNN disabled, or a
// dtype this CPU's oneDNN has no kernel for), and by add_relu.
#include "epilogue.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace resnet_fused::cpu {
namespace {

using at::vec::Vectorized;

// Elements per parallel task: below this, threading costs more than it saves.
constexpr int64_t kGrain = 32768;

// Loads n <= Vectorized<float>::size() elements of T as floats.
template <typename T>
inline Vectorized<float> load_f(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == Vectorized<float>::size() ? Vectorized<float>::loadu(p) : Vectorized<float>::loadu(p, n);
  } else {
    // A reduced-precision vector holds twice as many lanes; only the low half is used.
    auto v = Vectorized<T>::loadu(p, n);
    return std::get<0>(at::vec::convert_to_float<T>(v));
  }
}

template <typename T>
inline void store_f(T* p, Vectorized<float> v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  }
}

// One contiguous run of n elements. Bias is either one value per element (channels-last
// rows, PER_ELEM) or one value for the whole run (an NCHW plane).
template <typename T, bool PER_ELEM>
inline void run(const T* src, T* dst, const T* res, const float* bias, float bias_scalar, int64_t n, bool relu) {
  constexpr int64_t V = Vectorized<float>::size();
  const Vectorized<float> zero(0.f);
  const Vectorized<float> bs(bias_scalar);
  int64_t i = 0;
  for (; i < n; i += V) {
    const int64_t m = std::min<int64_t>(V, n - i);
    Vectorized<float> v = load_f(src + i, m);
    if (PER_ELEM) {
      v = v + (m == V ? Vectorized<float>::loadu(bias + i) : Vectorized<float>::loadu(bias + i, m));
    } else {
      v = v + bs;
    }
    if (res) v = v + load_f(res + i, m);
    if (relu) v = at::vec::clamp_min(v, zero);
    store_f(dst + i, v, m);
  }
}

template <typename T>
void epilogue_impl(const at::Tensor& src, const at::Tensor& dst, const at::Tensor* bias, const at::Tensor* residual,
                   bool relu, bool channels_last) {
  const T* s = src.const_data_ptr<T>();
  T* d = dst.data_ptr<T>();
  const T* r = residual ? residual->const_data_ptr<T>() : nullptr;
  const int64_t numel = src.numel();
  if (!bias) {
    at::parallel_for(0, numel, kGrain, [&](int64_t b, int64_t e) {
      run<T, false>(s + b, d + b, r ? r + b : nullptr, nullptr, 0.f, e - b, relu);
    });
    return;
  }
  const float* bp = bias->const_data_ptr<float>();
  const int64_t C = src.size(1);
  const int64_t HW = src.size(2) * src.size(3);
  if (channels_last) {
    const int64_t rows = numel / C;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1));
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t o = row * C;
        run<T, true>(s + o, d + o, r ? r + o : nullptr, bp, 0.f, C, relu);
      }
    });
  } else {
    const int64_t planes = numel / std::max<int64_t>(HW, 1);
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(HW, 1));
    at::parallel_for(0, planes, grain, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t o = p * HW;
        run<T, false>(s + o, d + o, r ? r + o : nullptr, nullptr, bp[p % C], HW, relu);
      }
    });
  }
}

}  // namespace

void bias_act_epilogue(const at::Tensor& src, const at::Tensor& dst, const at::Tensor* bias,
                       const at::Tensor* residual, bool relu, bool channels_last) {
  if (src.numel() == 0) return;
#define RF_EPILOGUE_CASE(T) \
  AT_DISPATCH_CASE(T, [&] { epilogue_impl<scalar_t>(src, dst, bias, residual, relu, channels_last); })
  // Only the dtypes the op accepts: no double instantiation to compile.
  AT_DISPATCH_SWITCH(src.scalar_type(), "resnet_fused_cpu_epilogue",
                     RF_EPILOGUE_CASE(at::kFloat) RF_EPILOGUE_CASE(at::kHalf) RF_EPILOGUE_CASE(at::kBFloat16));
#undef RF_EPILOGUE_CASE
}

}  // namespace resnet_fused::cpu
