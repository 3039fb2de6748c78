// Two whole-tensor passes of a fused ResNet's forward on CPU, each one read of its input:
//
// all_finite: whether no element is NaN or Inf (the fused graph's check of its input, see
// modules.inputs_finite). aten needs a sum, an isfinite of it and its truth value: three ops and
// a parallel reduction whose threads then wait, for a bool. Here each element's exponent bits
// are tested (all ones: NaN or Inf), so the answer is exact per element.
//
// global_avg_pool_nhwc: the mean over H and W of a float32 channels-last input, [N, C, 1, 1]
// out (a ResNet's pool before its classifier). Each channel is summed over the pixels in order,
// then divided by their count, as aten's channels-last kernel does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#include "../checks.h"

namespace resnet_fused::cpu {
namespace {

using at::Tensor;

// Whether any of n values of bits u (exponent mask m) is NaN or Inf. Written for GCC to vectorise
// (an OR reduction over integers: no float ordering to keep).
template <typename U>
bool any_non_finite(const U* u, int64_t n, U m) {
  U bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<U>((u[i] & m) == m);
  return bad != 0;
}

template <typename U>
bool all_finite_bits(const void* data, int64_t n, U mask) {
  const U* u = static_cast<const U*>(data);
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, int64_t(1) << 16, [&](int64_t i0, int64_t i1) {
    if (!bad.load(std::memory_order_relaxed) && any_non_finite(u + i0, i1 - i0, mask)) {
      bad.store(true, std::memory_order_relaxed);
    }
  });
  return !bad.load();
}

bool all_finite(const Tensor& input) {
  TORCH_CHECK_VALUE(input.device().is_cpu(), "resnet_fused: all_finite is CPU only, got ", input.device());
  // (non-overlapping and dense: its numel elements lie in one block from the data pointer, in
  // whatever order; anything else is copied so)
  const Tensor x = input.is_non_overlapping_and_dense() ? input : input.contiguous();
  const int64_t n = x.numel();
  if (n == 0) return true;
  const void* p = x.const_data_ptr();
  switch (x.scalar_type()) {
    case at::kFloat:
      return all_finite_bits<uint32_t>(p, n, 0x7f800000u);
    case at::kDouble:
      return all_finite_bits<uint64_t>(p, n, 0x7ff0000000000000ull);
    case at::kHalf:
      return all_finite_bits<uint16_t>(p, n, 0x7c00u);
    case at::kBFloat16:
      return all_finite_bits<uint16_t>(p, n, 0x7f80u);
    default:
      TORCH_CHECK_TYPE(false, "resnet_fused: all_finite takes a floating-point tensor (float32, float64, float16 or ",
                       "bfloat16), got ", x.scalar_type());
  }
  return false;
}

Tensor global_avg_pool_nhwc(const Tensor& input) {
  RF_CHECK_DIM(input, 4, "input");
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, "resnet_fused: global_avg_pool_nhwc is float32 only, got a ",
                   input.scalar_type(), " input");
  TORCH_CHECK_VALUE(input.device().is_cpu(), "resnet_fused: global_avg_pool_nhwc is CPU only, got ",
                    input.device());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  TORCH_CHECK_VALUE(H > 0 && W > 0, "resnet_fused: global_avg_pool_nhwc: the input has no pixels (", H, "x", W, ")");
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  Tensor out = at::empty({N, C, 1, 1}, x.options().memory_format(cl));
  if (out.numel() == 0) return out;
  const float* xp = x.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  const int64_t P = H * W;
  const float count = static_cast<float>(P);
  constexpr int64_t kBlock = 64;  // channels summed together, in registers
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, N * blocks, std::max<int64_t>(1, 32768 / (kBlock * P)), [&](int64_t b0, int64_t b1) {
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * kBlock, nc = std::min(kBlock, C - c0);
      const float* src = xp + n * P * C + c0;
      float acc[kBlock];
      std::memcpy(acc, src, sizeof(float) * size_t(nc));
      for (int64_t p = 1; p < P; ++p) {
        const float* row = src + p * C;
        for (int64_t c = 0; c < nc; ++c) acc[c] += row[c];
      }
      float* dst = yp + n * C + c0;
      for (int64_t c = 0; c < nc; ++c) dst[c] = acc[c] / count;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("all_finite", &all_finite);
  m.impl("global_avg_pool_nhwc", &global_avg_pool_nhwc);
}

}  // namespace resnet_fused::cpu
