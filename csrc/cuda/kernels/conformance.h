// A one-warp kernel that runs one arch-layer instruction on inputs the caller chooses and dumps
// what every lane holds afterwards. On a GPU the dump is the hardware's answer (recorded as a
// golden file under tests/golden/); under the emulator it is the emulator's. No torch here.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace resnet_fused::cuda {

enum class ConformanceOp : int {
  kLdmatrixX1 = 0,
  kLdmatrixX2 = 1,
  kLdmatrixX4 = 2,
  kLdmatrixX1Trans = 3,
  kLdmatrixX2Trans = 4,
  kLdmatrixX4Trans = 5,
  kMmaF16 = 6,
  kMmaBF16 = 7,
  kShflXor = 8,
  kShflIdx = 9,
  kCpAsync16 = 10,
  kCpAsync8 = 11,
  kMmaTf32 = 12,
  kCvtTf32 = 13,
};
constexpr int kNumConformanceOps = 14;
constexpr int kConformanceInWords = 16;   // per lane
constexpr int kConformanceOutWords = 4;   // per lane

struct ConformanceParams {
  int op = 0;
  // Per lane, kConformanceInWords words. ldmatrix: word 0 = the row (0..31) of the shared tile
  // this lane points at. mma: a0..a3, b0..b1, c0..c3 (float bits). Shuffles: value, lane mask or
  // source lane. cp.async: word 0 = src-size in bytes. cvt.tf32: words 0..3, each converted.
  const uint32_t* in = nullptr;
  // The shared tile: 32 rows of 16 bytes, copied to shared memory first (ldmatrix), and the
  // global source of the copies (cp.async: lane l copies bytes [16 l, 16 l + 16) or [8 l, 8 l + 8)).
  const uint32_t* tile = nullptr;  // 128 words
  uint32_t* out = nullptr;         // per lane, kConformanceOutWords words
};

cudaError_t launch_conformance(const ConformanceParams& p, cudaStream_t stream);

}  // namespace resnet_fused::cuda
