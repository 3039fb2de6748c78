// Device code of the CUDA epilogue. Knows nothing of torch (see epilogue.h). Written on the
// arch layer, so it also runs under the emulator (csrc/emu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "../arch/arch.h"
#include "epilogue.h"

namespace resnet_fused::cuda {
namespace {

template <typename T>
RF_DEVICE float to_float(T v);
template <>
RF_DEVICE float to_float<float>(float v) { return v; }
template <>
RF_DEVICE float to_float<__half>(__half v) { return __half2float(v); }
template <>
RF_DEVICE float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
RF_DEVICE T from_float(float v);
template <>
RF_DEVICE float from_float<float>(float v) { return v; }
template <>
RF_DEVICE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
RF_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Each thread handles VEC consecutive elements per step of a grid-stride loop. With VEC > 1 the
// launcher guarantees that a pack never straddles a channel row (NHWC) or a plane (NCHW).
template <typename T, int VEC>
RF_KERNEL void bias_act_kernel(EpilogueParams p) {
  using P = Pack<T, VEC>;
  const P* src = reinterpret_cast<const P*>(p.src);
  const P* res = reinterpret_cast<const P*>(p.residual);
  P* dst = reinterpret_cast<P*>(p.dst);
  const int64_t npacks = p.numel / VEC;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < npacks; k += step) {
    const int64_t i = k * VEC;
    const P s = rf::arch::ldg(src + k);
    P r;
    if (res) r = rf::arch::ldg(res + k);
    const int64_t c0 = p.channels_last ? i % p.C : (i / p.HW) % p.C;
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float x = to_float(s.v[j]);
      if (p.bias) x += rf::arch::ldg(p.bias + (p.channels_last ? c0 + j : c0));
      if (res) x += to_float(r.v[j]);
      // `x < 0 ? 0 : x` keeps NaN as NaN, as torch.relu does (fmaxf would not).
      if (p.relu) x = x < 0.f ? 0.f : x;
      o.v[j] = from_float<T>(x);
    }
    rf::arch::stg(dst + k, o);
  }
}

template <typename T>
cudaError_t launch_typed(const EpilogueParams& p, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  auto aligned = [](const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const int64_t run = p.bias ? (p.channels_last ? p.C : p.HW) : p.numel;
  const bool vectorised = aligned(p.src) && aligned(p.dst) && aligned(p.residual) && p.numel % VEC == 0 &&
                          run % VEC == 0;
  constexpr int threads = 256;
  const int64_t work = vectorised ? p.numel / VEC : p.numel;
  // Enough blocks to fill any current GPU several times over; the loop strides the rest.
  const int64_t blocks = std::min<int64_t>((work + threads - 1) / threads, 65536);
  if (vectorised) {
    return rf::arch::launch("bias_act_kernel", &bias_act_kernel<T, VEC>, dim3(blocks), dim3(threads), 0, stream, p);
  }
  return rf::arch::launch("bias_act_kernel", &bias_act_kernel<T, 1>, dim3(blocks), dim3(threads), 0, stream, p);
}

}  // namespace

cudaError_t launch_bias_act_epilogue(const EpilogueParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat:
      return launch_typed<float>(p, stream);
    case DType::kHalf:
      return launch_typed<__half>(p, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace resnet_fused::cuda
