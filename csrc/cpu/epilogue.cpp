// The CPU epilogue: bias + residual + ReLU over a convolution's output in one pass, used
// where the oneDNN primitive cannot take the epilogue as post-ops (oneDNN disabled, grouped
// convs with a residual, an exact-NaN ReLU), and by add_relu.
//
// The inner loops are plain C++ that the compiler vectorises, built three times (AVX-512, AVX2,
// baseline x86-64), the one the matrix-product kernels use chosen at first use, so the wheel runs
// anywhere and uses the vector width the machine has. bfloat16 is converted with bit
// operations (round to nearest even, NaN kept), which vectorise too.
#include "epilogue.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "gemm_kernels.h"  // tile_isa

namespace resnet_fused::cpu {
namespace {

// Elements per parallel task: below this, threading costs more than it saves.
constexpr int64_t kGrain = 32768;

// The inner loops, one build per ISA (epilogue_rows.inc), chosen as the matrix-product kernels are
// (tile_isa, which RESNET_FUSED_CPU_ISA can hold to a narrower ISA), so that the tests can run the
// AVX2 and baseline builds on a wider CPU too.
namespace isa_generic {
#include "epilogue_rows.inc"
}  // namespace isa_generic
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_avx2 {
#include "epilogue_rows.inc"
}  // namespace isa_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace isa_avx512 {
#include "epilogue_rows.inc"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

struct Rows {
  void (*f32)(const float*, float*, const float*, const float*, float, int64_t, bool);
  void (*bf16)(const uint16_t*, uint16_t*, const uint16_t*, const float*, float, int64_t, bool);
};

const Rows& rows() {
  static const Rows r = [] {
    const std::string isa = tile_isa();
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa == "avx512") return Rows{isa_avx512::run_f32, isa_avx512::run_bf16};
    if (isa == "avx2") return Rows{isa_avx2::run_f32, isa_avx2::run_bf16};
#endif
    return Rows{isa_generic::run_f32, isa_generic::run_bf16};
  }();
  return r;
}

void run_f16(const at::Half* src, at::Half* dst, const at::Half* res, const float* bias, float bias_scalar, int64_t n,
             bool relu) {
  for (int64_t i = 0; i < n; ++i) {
    float v = float(src[i]) + (bias ? bias[i] : bias_scalar) + (res ? float(res[i]) : 0.f);
    dst[i] = at::Half((relu && v < 0.f) ? 0.f : v);
  }
}

inline void run(const float* s, float* d, const float* r, const float* b, float bs, int64_t n, bool relu) {
  rows().f32(s, d, r, b, bs, n, relu);
}
inline void run(const at::BFloat16* s, at::BFloat16* d, const at::BFloat16* r, const float* b, float bs, int64_t n,
                bool relu) {
  rows().bf16(reinterpret_cast<const uint16_t*>(s), reinterpret_cast<uint16_t*>(d),
           reinterpret_cast<const uint16_t*>(r), b, bs, n, relu);
}
inline void run(const at::Half* s, at::Half* d, const at::Half* r, const float* b, float bs, int64_t n, bool relu) {
  run_f16(s, d, r, b, bs, n, relu);
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
      run(s + b, d + b, r ? r + b : nullptr, nullptr, 0.f, e - b, relu);
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
        run(s + o, d + o, r ? r + o : nullptr, bp, 0.f, C, relu);
      }
    });
  } else {
    const int64_t planes = numel / std::max<int64_t>(HW, 1);
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(HW, 1));
    at::parallel_for(0, planes, grain, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t o = p * HW;
        run(s + o, d + o, r ? r + o : nullptr, nullptr, bp[p % C], HW, relu);
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
