// The fused convolution's dispatch: what it supports, which tile and split-K a shape gets, and
// the split-K reduction kernel. The conv kernels themselves are instantiated one per .cu
// (implicit_gemm_<tile>_<dtype>.cu, device code in implicit_gemm.cuh).
#include <algorithm>
#include <cstdint>

#include "../arch/arch.h"
#include "epilogue_math.cuh"
#include "implicit_gemm.h"

namespace resnet_fused::cuda {
namespace {

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// out = act(sum over splits of the partials + bias [+ residual]), two channels per step.
template <DType kDType>
RF_KERNEL void splitk_reduce_kernel(ConvParams p, int splits) {
  using Tr = igemm::Traits<kDType>;
  using T2 = typename Tr::T2;
  const int64_t MK = int64_t(p.N) * p.P * p.Q * p.K;
  const int64_t pairs = MK / 2;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs; i += step) {
    const int64_t off = 2 * i;
    float v0 = 0.f, v1 = 0.f;
    for (int z = 0; z < splits; ++z) {
      const float2 s = rf::arch::ldg(reinterpret_cast<const float2*>(p.workspace + z * MK + off));
      v0 += s.x;
      v1 += s.y;
    }
    if (p.bias) {
      const float2 b = rf::arch::ldg(reinterpret_cast<const float2*>(p.bias + off % p.K));
      v0 += b.x;
      v1 += b.y;
    }
    if (p.residual) {
      const float2 r = Tr::unpack(rf::arch::ldg(reinterpret_cast<const T2*>(p.residual) + i));
      v0 += r.x;
      v1 += r.y;
    }
    if (p.relu) {
      v0 = igemm::relu_keep_nan(v0);
      v1 = igemm::relu_keep_nan(v1);
    }
    rf::arch::stg(reinterpret_cast<T2*>(p.output) + i, Tr::pack(v0, v1));
  }
}

template <DType kDType>
cudaError_t launch_reduce(const ConvParams& p, int splits, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t pairs = int64_t(p.N) * p.P * p.Q * p.K / 2;
  const int64_t blocks = std::min<int64_t>((pairs + threads - 1) / threads, 65536);
  return rf::arch::launch(kDType == DType::kHalf    ? "splitk_reduce_kernel<f16>"
                         : kDType == DType::kFloat ? "splitk_reduce_kernel<f32>"
                                                   : "splitk_reduce_kernel<bf16>",
                          &splitk_reduce_kernel<kDType>, dim3(unsigned(blocks)), dim3(threads), 0, stream, p, splits);
}

template <DType kDType>
cudaError_t launch_typed(const ConvParams& p, const ConvPlan& plan, cudaStream_t stream) {
  cudaError_t e;
  if (kDType == DType::kFloat) {
    e = launch_conv_instance<kTf32Tile, DType::kFloat, false>(p, plan.splits, stream);
  } else if (p.input2) {
    e = plan.tile == Tile::k128x128 ? launch_conv_instance<Tile::k128x128, kDType, false, false, true>(p, plan.splits, stream)
                                    : launch_conv_instance<Tile::k128x64, kDType, false, false, true>(p, plan.splits, stream);
  } else if (plan.narrow_loads) {
    e = launch_conv_instance<Tile::k128x64, kDType, true>(p, plan.splits, stream);
  } else if (p.groups > 1) {
    e = launch_conv_instance<Tile::k64x64, kDType, false, true>(p, plan.splits, stream);
  } else {
    switch (plan.tile) {
      case Tile::k128x128:
        e = launch_conv_instance<Tile::k128x128, kDType, false>(p, plan.splits, stream);
        break;
      case Tile::k128x64:
        e = launch_conv_instance<Tile::k128x64, kDType, false>(p, plan.splits, stream);
        break;
      case Tile::k128x128k64:
        e = launch_conv_instance<Tile::k128x128k64, kDType, false>(p, plan.splits, stream);
        break;
      case Tile::k256x128:
        e = launch_conv_instance<Tile::k256x128, kDType, false>(p, plan.splits, stream);
        break;
      default:
        e = launch_conv_instance<Tile::k64x64, kDType, false>(p, plan.splits, stream);
        break;
    }
  }
  if (e != cudaSuccess || plan.splits == 1) return e;
  return launch_reduce<kDType>(p, plan.splits, stream);
}

}  // namespace

const char* dual_unsupported(const ConvParams& p) {
  if (p.dtype == DType::kFloat) return "dual in float32 (float16 and bfloat16 only)";
  if (p.groups != 1) return "dual with groups";
  if (p.R != 1 || p.S != 1 || p.stride_h != 1 || p.stride_w != 1 || p.pad_h || p.pad_w || p.dil_h != 1 || p.dil_w != 1)
    return "dual: the first convolution must be 1x1, stride 1, unpadded";
  if (p.C % 8 || p.C2 % 8 || p.C2 <= 0) return "dual: input channels not multiples of 8";
  if (p.stride2 < 1 || p.H2 <= 0 || p.W2 <= 0 || p.P != (p.H2 - 1) / p.stride2 + 1 || p.Q != (p.W2 - 1) / p.stride2 + 1)
    return "dual: the second input's size does not give the first's (1x1, stride2, unpadded)";
  if (int64_t(p.N) * p.H2 * p.W2 * p.C2 >= (int64_t(1) << 31) || int64_t(p.K) * (p.C + p.C2) >= (int64_t(1) << 31))
    return "an input or weight of 2^31 elements or more";
  if (!aligned(p.input2, 16)) return "second input not aligned";
  return nullptr;
}

const char* conv_unsupported(const ConvParams& p) {
  if (p.input2) {
    if (const char* why = dual_unsupported(p)) return why;
  }
  if (p.dtype == DType::kFloat && p.groups > 1) return "grouped float32 (the TF32 kernel takes groups 1)";
  if (p.groups < 1 || p.C % p.groups != 0 || p.K % p.groups != 0) return "channels not divisible by the groups";
  if (p.C % 4 != 0) return "input channels not a multiple of 4";
  if ((p.C / p.groups) % 4 != 0) return "input channels per group not a multiple of 4";
  if (p.K % 8 != 0) return "output channels not a multiple of 8";
  if (p.N <= 0 || p.P <= 0 || p.Q <= 0 || p.K <= 0 || p.C <= 0) return "an empty problem";
  if (p.R > 16 || p.S > 16) return "a filter taller or wider than 16";
  // (the loader's element offsets are 32-bit)
  if (int64_t(p.N) * p.P * p.Q >= (int64_t(1) << 31) || int64_t(p.N) * p.H * p.W * p.C >= (int64_t(1) << 31) ||
      int64_t(p.K) * p.R * p.S * p.C >= (int64_t(1) << 31))
    return "an input or weight of 2^31 elements or more";
  const int load_bytes = p.dtype == DType::kFloat || (p.C / p.groups) % 8 == 0 ? 16 : 8;
  if (!aligned(p.input, load_bytes) || !aligned(p.weight, load_bytes)) return "input or weight not aligned";
  // (the epilogue reads and writes 8 channels at a time)
  if (!aligned(p.output, 16) || (p.residual && !aligned(p.residual, 16)) || (p.bias && !aligned(p.bias, 16)))
    return "output, residual or bias not 16-byte aligned";
  return nullptr;
}

// The longest reduction of a block of bn output channels (the kernel's g_first..g_last): R*S
// times the input channels of the groups its channels belong to (all of them when ungrouped).
int64_t block_reduction(const ConvParams& p, int bn) {
  if (p.input2) return int64_t(p.C) + p.C2;  // (dual: 1x1, groups 1)
  const int64_t cin_g = p.C / p.groups, kout_g = p.K / p.groups;
  int64_t most = 0;
  for (int64_t k0 = 0; k0 < p.K; k0 += bn) most = std::max(most, (std::min<int64_t>(k0 + bn, p.K) - 1) / kout_g - k0 / kout_g + 1);
  return int64_t(p.R) * p.S * cin_g * most;
}

ConvPlan plan_conv(const ConvParams& p, int num_sms, int tile, int splits) {
  ConvPlan plan;
  const int64_t M = int64_t(p.N) * p.P * p.Q;
  plan.narrow_loads = p.dtype != DType::kFloat && (p.C / p.groups) % 8 != 0;
  if (p.dtype == DType::kFloat) {
    plan.tile = kTf32Tile;  // the one TF32 instantiation
  } else if (plan.narrow_loads) {
    plan.tile = Tile::k128x64;  // the one instantiation with 8-byte loads
  } else if (p.groups > 1) {
    plan.tile = Tile::k64x64;  // the one with 16-byte loads that takes groups
  } else if (p.input2) {
    // the dual instantiations: 128x128 where its blocks fill the GPU (or asked for), else 128x64
    plan.tile = tile == int(Tile::k128x128) || (tile < 0 && ceil_div(M, 128) * ceil_div(p.K, 128) >= num_sms)
                    ? Tile::k128x128
                    : Tile::k128x64;
  } else if (tile >= 0 && tile < kNumTiles) {
    plan.tile = Tile(tile);
  } else if (p.K <= 64) {
    plan.tile = ceil_div(M, 128) >= num_sms ? Tile::k128x64 : Tile::k64x64;
  } else if (ceil_div(M, 128) * ceil_div(p.K, 128) >= num_sms) {
    plan.tile = Tile::k128x128;
  } else if (ceil_div(M, 128) * ceil_div(p.K, 64) >= num_sms) {
    plan.tile = Tile::k128x64;
  } else {
    plan.tile = Tile::k64x64;
  }
  const int bm = kTileBM[int(plan.tile)], bn = kTileBN[int(plan.tile)];
  const int64_t blocks = int64_t(ceil_div(M, bm)) * ceil_div(p.K, bn);
  const int64_t reduction = block_reduction(p, bn);
  const int ktiles = ceil_div(reduction, 32);  // steps of 32 reduction elements
  // (a step of the tile: kTileBK half-precision elements, half as many float32 ones)
  const int step = p.dtype == DType::kFloat ? kTileBK[int(plan.tile)] / 2 : kTileBK[int(plan.tile)];
  if (splits >= 1) {
    // (at most one split per reduction step of the tile)
    plan.splits = std::min(splits, ceil_div(reduction, step));
  } else if (blocks < num_sms / 2 && ktiles >= 16) {
    // Too few output tiles to fill the GPU (late layers at small batch): split the reduction,
    // keeping at least 8 steps of 32 per split.
    plan.splits = int(std::min<int64_t>({(num_sms + blocks - 1) / blocks, ktiles / 8, 16}));
  }
  plan.splits = std::max(plan.splits, 1);
  plan.workspace_bytes = plan.splits > 1 ? size_t(plan.splits) * size_t(M) * size_t(p.K) * sizeof(float) : 0;
  return plan;
}

cudaError_t launch_conv(const ConvParams& p, const ConvPlan& plan, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kHalf:
      return launch_typed<DType::kHalf>(p, plan, stream);
    case DType::kFloat:
      return launch_typed<DType::kFloat>(p, plan, stream);
    default:
      return launch_typed<DType::kBFloat16>(p, plan, stream);
  }
}

}  // namespace resnet_fused::cuda
