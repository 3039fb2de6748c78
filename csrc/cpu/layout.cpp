// to_channels_last: the fused graph's one layout conversion, an NCHW float32 input with few
// channels (an image: ResNet's input) copied to channels-last.
//
// aten's copy to this permutation runs its generic strided loop, about four times a plain
// copy's time for a 3-channel image. Here each output row (one image row: W pixels of C values,
// contiguous) is written in order from the C input rows it interleaves, which are read in order:
// every byte passes once, in streams the prefetchers follow.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"

namespace resnet_fused::cpu {
namespace {

using at::Tensor;

constexpr int64_t kMaxChannels = 8;  // past this many input rows per output row, aten's loop

// One image row: dst[w * C + c] = src[c * plane + w], w < W.
template <int C>
void interleave_row(const float* src, int64_t plane, int64_t W, float* dst) {
  for (int64_t w = 0; w < W; ++w) {
    for (int c = 0; c < C; ++c) dst[w * C + c] = src[c * plane + w];
  }
}

void interleave_row(const float* src, int64_t plane, int64_t W, int64_t C, float* dst) {
  switch (C) {
    case 1: return interleave_row<1>(src, plane, W, dst);
    case 2: return interleave_row<2>(src, plane, W, dst);
    case 3: return interleave_row<3>(src, plane, W, dst);
    case 4: return interleave_row<4>(src, plane, W, dst);
    default:
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t c = 0; c < C; ++c) dst[w * C + c] = src[c * plane + w];
      }
  }
}

// input in channels-last, always a new tensor (the op returns no alias of its input).
Tensor to_channels_last(const Tensor& input) {
  RF_CHECK_DIM(input, 4, "input");
  TORCH_CHECK_VALUE(input.device().is_cpu() && input.layout() == at::kStrided,
                    "resnet_fused: to_channels_last takes a dense CPU tensor, got one on ", input.device(),
                    input.is_mkldnn() ? " (mkldnn layout)" : "");
  const auto cl = at::MemoryFormat::ChannelsLast;
  Tensor out = at::empty(input.sizes(), input.options().memory_format(cl));
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  if (input.scalar_type() != at::kFloat || !input.is_contiguous() || C > kMaxChannels || out.numel() == 0) {
    return out.copy_(input);
  }
  const float* x = input.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int64_t plane = H * W;
  at::parallel_for(0, N * H, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, W * C)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / H, h = r % H;
      interleave_row(x + n * C * plane + h * W, plane, W, C, y + (n * plane + h * W) * C);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("to_channels_last", &to_channels_last); }

// (an mkldnn-layout tensor reaches the check above, for a clear error rather than the
// dispatcher's "no kernel for MkldnnCPU")
TORCH_LIBRARY_IMPL(resnet_fused, MkldnnCPU, m) { m.impl("to_channels_last", &to_channels_last); }

}  // namespace resnet_fused::cpu
