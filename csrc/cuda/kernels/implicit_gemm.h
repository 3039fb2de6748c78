// Our fused convolution on tensor cores: act(conv2d(x, w) + bias [+ residual]) in one kernel,
// NHWC activations, fp16 or bf16 in and out, fp32 accumulation (implicit GEMM: M = N*P*Q output
// pixels, N = K output channels, reduction over R*S*C); float32 in and out on TF32 tensor cores
// (operands rounded to TF32, as cuDNN does where torch.backends.cudnn.allow_tf32 lets it; the
// launch layer asks that flag). Plain parameter struct and launcher:
// no torch here (the launch layer, csrc/cuda/launch.cpp, fills it from tensors).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "epilogue.h"  // DType

namespace resnet_fused::cuda {

struct ConvParams {
  const void* input = nullptr;     // [N, H, W, C], dense
  const void* weight = nullptr;    // [K, R, S, C / groups], dense (a channels-last [K, C / groups, R, S] weight)
  const float* bias = nullptr;     // [K] or null
  const void* residual = nullptr;  // [N, P, Q, K] or null; may be `output` itself (in place)
  void* output = nullptr;          // [N, P, Q, K]
  float* workspace = nullptr;      // [splits, N*P*Q, K] float32 partial sums when splits > 1
  int N = 0, H = 0, W = 0, C = 0, K = 0, R = 1, S = 1, P = 0, Q = 0;
  int stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  int groups = 1;  // output channel k sees input channels [g C/groups, (g + 1) C/groups), g = k / (K/groups)
  bool relu = false;
  DType dtype = DType::kHalf;
  // Dual (a bottleneck's last 1x1 and its downsample 1x1 in one product): a second input
  // [N, H2, W2, C2] read by a 1x1 convolution of stride `stride2`, no padding, and the weight
  // [K, C + C2], the two layers' weights side by side; the first input is then the 1x1 stride-1
  // convolution's (H = P, W = Q). out = act(input . w[:, :C] + input2[::s, ::s] . w[:, C:] + bias).
  const void* input2 = nullptr;
  int C2 = 0, H2 = 0, W2 = 0, stride2 = 1;
};

// The block tiles (output pixels x output channels), each one kernel instantiation per dtype in
// its own .cu. 4 warps (2 x 2); 32-deep reduction steps in a 4-stage cp.async pipeline, or for
// k128x128k64 64-deep steps in 3 stages (half the barriers per multiply; 96 KiB of shared memory).
// k256x128: 8 warps (4 x 2) of 64 x 64, a quarter less L2 traffic per multiply than 128x128,
// one block per SM (96 KiB).
enum class Tile : int { k128x128 = 0, k128x64 = 1, k64x64 = 2, k128x128k64 = 3, k256x128 = 4 };
constexpr int kNumTiles = 5;
// Each tile's rows (output pixels), columns (output channels) and reduction step, for planning
// on the host (the kernel's Shape is held to them).
constexpr int kTileBM[kNumTiles] = {128, 128, 64, 128, 256};
constexpr int kTileBN[kNumTiles] = {128, 64, 64, 128, 128};
constexpr int kTileBK[kNumTiles] = {32, 32, 32, 64, 32};
// float32 (TF32) runs one tile: 128x64, 16 float32 elements (64 bytes) per reduction step.
constexpr Tile kTf32Tile = Tile::k128x64;

struct ConvPlan {
  Tile tile = Tile::k128x64;
  int splits = 1;            // split-K: partial sums in the workspace, then a reduction kernel
  bool narrow_loads = false; // 8-byte loads (channels per group % 8 != 0: the padded 3-channel stem, ResNeXt's 4-wide groups)
  size_t workspace_bytes = 0;
};

// Why our kernel cannot run p, or nullptr when it can. Dual (p.input2): float16/bfloat16, groups
// 1, a 1x1 stride-1 unpadded first convolution, C and C2 multiples of 8, P = (H2 - 1) / stride2 + 1
// (likewise Q). Needs groups 1 in float32, input channels per group
// a multiple of 4 (the launch layer pads a 3-channel input to 4), K % 8 == 0, filters up to
// 16 x 16, inputs and weights of under 2^31 elements (32-bit element offsets).
const char* conv_unsupported(const ConvParams& p);

// The tile and split-K for p on a GPU with `num_sms` multiprocessors. `tile` / `splits` >= 0
// force them (tests run every configuration this way).
ConvPlan plan_conv(const ConvParams& p, int num_sms, int tile = -1, int splits = -1);

// Runs the plan on `stream` (p.workspace must hold plan.workspace_bytes).
cudaError_t launch_conv(const ConvParams& p, const ConvPlan& plan, cudaStream_t stream);

// One instantiation per tile, dtype and load width (implicit_gemm_*.cu). kGrouped: it takes
// p.groups > 1 (the 8-byte-load kernel, whose register count it leaves at the same occupancy, and
// a 64x64 one, implicit_gemm_64x64g_*.cu); the others are compiled for groups 1 (the grouped
// loader's state costs the large tiles 5-20 registers, the small ones a block per SM).
// kDual: the instantiations that take input2 (128x128 and 128x64, float16 and bfloat16).
template <Tile kTile, DType kDType, bool kNarrow, bool kGrouped = kNarrow, bool kDual = false>
cudaError_t launch_conv_instance(const ConvParams& p, int splits, cudaStream_t stream);

}  // namespace resnet_fused::cuda
