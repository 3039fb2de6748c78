// The CPU epilogue: bias + residual + ReLU over a convolution's output in one pass, used
// where the oneDNN primitive cannot take the epilogue as post-ops (oneDNN disabled, grouped
// convs with a residual, an exact-NaN ReLU), and by add_relu.
//
// The inner loops are plain C++ that the compiler vectorises, built three times (AVX-512, AVX2,
// baseline x86-64) with GCC's target_clones and picked at load time by the CPU, so the wheel
// runs anywhere and uses the vector width the machine has. bfloat16 is converted with bit
// operations (round to nearest even, NaN kept), which vectorise too.
#include "epilogue.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "clones.h"

namespace resnet_fused::cpu {
namespace {

// Elements per parallel task: below this, threading costs more than it saves.
constexpr int64_t kGrain = 32768;

inline float bf16_to_float(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t(rounded);  // NaN stays NaN
}

// One contiguous run of n elements: dst = act(src + bias + res). Bias is one value per element
// (a channels-last row) or one value for the run (an NCHW plane), or none.
// `x < 0 ? 0 : x` keeps NaN as NaN, as torch.relu does.
RF_CLONES void run_f32(const float* src, float* dst, const float* res, const float* bias, float bias_scalar,
                       int64_t n, bool relu) {
  if (bias) {
    for (int64_t i = 0; i < n; ++i) {
      float v = src[i] + bias[i] + (res ? res[i] : 0.f);
      dst[i] = (relu && v < 0.f) ? 0.f : v;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      float v = src[i] + bias_scalar + (res ? res[i] : 0.f);
      dst[i] = (relu && v < 0.f) ? 0.f : v;
    }
  }
}

RF_CLONES void run_bf16(const uint16_t* src, uint16_t* dst, const uint16_t* res, const float* bias,
                        float bias_scalar, int64_t n, bool relu) {
  if (bias) {
    for (int64_t i = 0; i < n; ++i) {
      float v = bf16_to_float(src[i]) + bias[i] + (res ? bf16_to_float(res[i]) : 0.f);
      dst[i] = float_to_bf16((relu && v < 0.f) ? 0.f : v);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      float v = bf16_to_float(src[i]) + bias_scalar + (res ? bf16_to_float(res[i]) : 0.f);
      dst[i] = float_to_bf16((relu && v < 0.f) ? 0.f : v);
    }
  }
}

void run_f16(const at::Half* src, at::Half* dst, const at::Half* res, const float* bias, float bias_scalar, int64_t n,
             bool relu) {
  for (int64_t i = 0; i < n; ++i) {
    float v = float(src[i]) + (bias ? bias[i] : bias_scalar) + (res ? float(res[i]) : 0.f);
    dst[i] = at::Half((relu && v < 0.f) ? 0.f : v);
  }
}

inline void run(const float* s, float* d, const float* r, const float* b, float bs, int64_t n, bool relu) {
  run_f32(s, d, r, b, bs, n, relu);
}
inline void run(const at::BFloat16* s, at::BFloat16* d, const at::BFloat16* r, const float* b, float bs, int64_t n,
                bool relu) {
  run_bf16(reinterpret_cast<const uint16_t*>(s), reinterpret_cast<uint16_t*>(d),
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

void bias_act_row_f32(const float* src, float* dst, const float* res, const float* bias, int64_t n, bool relu) {
  run_f32(src, dst, res, bias, 0.f, n, relu);
}

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
