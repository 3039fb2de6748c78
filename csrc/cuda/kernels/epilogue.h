// The CUDA epilogue's plain parameter struct and launcher: no torch here, so the .cu that
// implements it compiles in seconds. Filled once at the op boundary (conv_bias_act.cpp).
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace resnet_fused::cuda {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

struct EpilogueParams {
  const void* src = nullptr;       // [numel] in the layout below
  void* dst = nullptr;             // may alias src
  const void* residual = nullptr;  // same layout as src, or null
  const float* bias = nullptr;     // [C] float32, or null
  int64_t numel = 0;
  int64_t C = 1;                   // channels (dim 1 of the logical NCHW shape)
  int64_t HW = 1;                  // H * W
  bool channels_last = false;      // NHWC when true, NCHW otherwise
  bool relu = false;
  DType dtype = DType::kFloat;
};

// dst = act(src + bias[c] + residual) in one pass; 16-byte vector loads and stores where the
// pointers and the channel/plane lengths allow. Returns the launch's error code.
cudaError_t launch_bias_act_epilogue(const EpilogueParams& p, cudaStream_t stream);

}  // namespace resnet_fused::cuda
