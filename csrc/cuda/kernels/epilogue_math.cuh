// The epilogue arithmetic that the fused conv kernel and its split-K reduction share: the
// element types of a dtype, packing two channels, and ReLU with torch.relu's NaN semantics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../arch/arch.h"
#include "epilogue.h"  // DType

namespace resnet_fused::cuda::igemm {

template <DType kDType>
struct Traits;
template <>
struct Traits<DType::kHalf> {
  using T = __half;
  using T2 = __half2;
  static RF_DEVICE T2 pack(float a, float b) { return __floats2half2_rn(a, b); }
  static RF_DEVICE float2 unpack(T2 v) { return __half22float2(v); }
};
template <>
struct Traits<DType::kBFloat16> {
  using T = __nv_bfloat16;
  using T2 = __nv_bfloat162;
  static RF_DEVICE T2 pack(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static RF_DEVICE float2 unpack(T2 v) { return __bfloat1622float2(v); }
};

template <>
struct Traits<DType::kFloat> {  // (TF32 multiplies, float32 in and out)
  using T = float;
  using T2 = float2;
  static RF_DEVICE T2 pack(float a, float b) { return float2{a, b}; }
  static RF_DEVICE float2 unpack(T2 v) { return v; }
};

// `x < 0 ? 0 : x` keeps NaN as NaN, as torch.relu does (fmaxf would not).
RF_DEVICE float relu_keep_nan(float x) { return x < 0.f ? 0.f : x; }

}  // namespace resnet_fused::cuda::igemm
