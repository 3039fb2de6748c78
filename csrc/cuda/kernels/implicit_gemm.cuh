// Device code of the fused implicit-GEMM convolution (see implicit_gemm.h). Included by one
// small .cu per instantiation (implicit_gemm_<tile>_<dtype>.cu). Written on the arch layer, so
// the same source runs on a GPU and under the emulator.
//
// The GEMM view: A = the input seen as [M = N*P*Q, R*S*C] (rows gathered on the fly: an output
// pixel's receptive field, zero outside the image), B = the weight [K, R*S*C] (its rows are the
// GEMM's columns), D = the output [M, K], which is the NHWC output itself.
//
// Each block computes a BM x BN tile of D with 4 warps (2 x 2, each a (BM/2) x (BN/2) tile of
// m16n8k16 mma.sync), stepping through the reduction BK (32 or 64) at a time. A cp.async
// pipeline of `Stages` keeps Stages - 1 steps in flight: every thread copies whole 16-byte
// (8-element) chunks of A and B into shared memory, a chunk outside the image, the matrix or the
// reduction zero-filled (src-size 0). Shared tiles are rows of 2*BK bytes whose 16-byte units are
// XOR-swizzled by the row (see swizzle), so that the 8 rows an ldmatrix reads fall in different
// banks. The epilogue
// works on the accumulators in registers: + bias, + residual, ReLU (NaN kept), one store of
// two channels per thread per fragment row; with split-K it stores float32 partial sums instead
// and splitk_reduce_kernel (implicit_gemm.cu) finishes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../arch/arch.h"
#include "epilogue_math.cuh"
#include "implicit_gemm.h"

namespace resnet_fused::cuda {
namespace igemm {

constexpr int kThreads = 128;

// Block tile BM x BN, reduction step BK (elements; a shared row is 2*BK bytes), pipeline depth.
template <Tile kTile>
struct Shape;
template <>
struct Shape<Tile::k128x128> {
  static constexpr int BM = 128, BN = 128, BK = 32, Stages = 4;
};
template <>
struct Shape<Tile::k128x64> {
  static constexpr int BM = 128, BN = 64, BK = 32, Stages = 4;
};
template <>
struct Shape<Tile::k64x64> {
  static constexpr int BM = 64, BN = 64, BK = 32, Stages = 4;
};
template <>
struct Shape<Tile::k128x128k64> {
  static constexpr int BM = 128, BN = 128, BK = 64, Stages = 3;
};

template <Tile kTile>
constexpr size_t smem_bytes() {
  using S = Shape<kTile>;
  return size_t(S::Stages) * (S::BM + S::BN) * S::BK * 2;
}

// Byte offset of 16-byte unit `u` of row `row` in a swizzled tile of kRowBytes-byte rows. The 8
// rows an ldmatrix reads at one unit land in 8 different 16-byte bank groups: 64-byte rows (two
// to a 128-byte bank line) XOR the unit with (row >> 1) & 3, 128-byte rows with row & 7.
template <int kRowBytes>
RF_DEVICE int swizzle(int row, int u) {
  static_assert(kRowBytes == 64 || kRowBytes == 128, "rows of 32 or 64 half-precision elements");
  return row * kRowBytes + ((kRowBytes == 64 ? u ^ ((row >> 1) & 3) : u ^ (row & 7)) << 4);
}

template <Tile kTile, DType kDType, bool kNarrow>
RF_KERNEL void __launch_bounds__(kThreads) conv_kernel(ConvParams p, int splits) {
  using Tr = Traits<kDType>;
  using T = typename Tr::T;
  using T2 = typename Tr::T2;
  constexpr int BM = Shape<kTile>::BM, BN = Shape<kTile>::BN;
  constexpr int kBK = Shape<kTile>::BK, kStages = Shape<kTile>::Stages, kRowBytes = 2 * kBK;
  constexpr int WM = BM / 2, WN = BN / 2;  // warp tile
  constexpr int MT = WM / 16, NT = WN / 8;  // mma tiles per warp
  constexpr int kVec = kNarrow ? 4 : 8;     // elements per cp.async
  constexpr int kChunksPerRow = kBK / kVec;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  constexpr int kAIters = BM / kRowsPerPass, kBIters = BN / kRowsPerPass;
  constexpr int kStageBytes = (BM + BN) * kRowBytes;
  static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");

  char* smem = rf::arch::dynamic_smem();
  const int tid = int(threadIdx.x);
  const int M = p.N * p.P * p.Q;
  const int PQ = p.P * p.Q;
  const int RSC = p.R * p.S * p.C;
  const int bm = int(blockIdx.x) * BM, bn = int(blockIdx.y) * BN;
  const int ktiles = (RSC + kBK - 1) / kBK;
  const int kt_begin = int(int64_t(blockIdx.z) * ktiles / splits);
  const int nkt = int(int64_t(blockIdx.z + 1) * ktiles / splits) - kt_begin;

  const T* x = static_cast<const T*>(p.input);
  const T* w = static_cast<const T*>(p.weight);

  // This thread's chunks: column `cc` of rows r0, r0 + kRowsPerPass, ... of each tile. A row of A
  // is kept as its image's first pixel (n * H * W, under 2^31: conv_unsupported) and the
  // receptive field's corner; B's rows are r0's plus a fixed stride (no per-row registers).
  const int cc = tid % kChunksPerRow, r0 = tid / kChunksPerRow;
  int a_pix[kAIters], a_h[kAIters], a_w[kAIters];
  bool a_ok[kAIters];
#pragma unroll
  for (int i = 0; i < kAIters; ++i) {
    const int m = bm + r0 + i * kRowsPerPass;
    a_ok[i] = m < M;
    const int mm = a_ok[i] ? m : 0;
    const int n = mm / PQ, pq = mm - n * PQ;
    const int pp = pq / p.Q, qq = pq - pp * p.Q;
    a_pix[i] = n * p.H * p.W;
    a_h[i] = pp * p.stride_h - p.pad_h;
    a_w[i] = qq * p.stride_w - p.pad_w;
  }
  const int b_row0 = bn + r0;
  // Within a row, chunk cc sits in 16-byte unit cc (or cc / 2 for 8-byte chunks).
  const int unit = kNarrow ? cc >> 1 : cc, unit_byte = kNarrow ? (cc & 1) * 8 : 0;

  auto copy = [&](char* dst, const T* src, bool ok) {
    if (kNarrow) {
      rf::arch::cp_async_8(dst, src, ok ? 8 : 0);
    } else {
      rf::arch::cp_async_16(dst, src, ok ? 16 : 0);
    }
  };

  // This thread's position in the reduction, (r, s, c) of element kk: divided out once, then
  // stepped by kBK per tile (tiles are loaded in increasing order), no division in the loop.
  int kk = kt_begin * kBK + cc * kVec;
  int r, s, c;
  {
    const int rs = kk / p.C;
    c = kk - rs * p.C;
    r = rs / p.S;
    s = rs - r * p.S;
  }
  auto advance = [&]() {
    kk += kBK;
    c += kBK;
    while (c >= p.C) {  // once per step when C >= 32; several times for 4 or 8 channels
      c -= p.C;
      if (++s == p.S) {
        s = 0;
        ++r;
      }
    }
  };

  auto load_tile = [&](int stage) {
    const bool k_ok = kk < RSC;
    char* sa = smem + stage * kStageBytes;
    char* sb = sa + BM * kRowBytes;
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const int row = r0 + i * kRowsPerPass;
      const int h = a_h[i] + r * p.dil_h, ww = a_w[i] + s * p.dil_w;
      const bool ok = a_ok[i] && k_ok && unsigned(h) < unsigned(p.H) && unsigned(ww) < unsigned(p.W);
      copy(sa + swizzle<kRowBytes>(row, unit) + unit_byte, x + int64_t(a_pix[i] + h * p.W + ww) * p.C + c, ok);
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int row = r0 + i * kRowsPerPass;
      const bool ok = b_row0 + i * kRowsPerPass < p.K;
      copy(sb + swizzle<kRowBytes>(row, unit) + unit_byte, w + (ok ? int64_t(b_row0 + i * kRowsPerPass) * RSC : 0) + kk,
           ok && k_ok);
    }
    advance();
  };

  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp / 2, wn = warp % 2;
  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  auto compute_stage = [&](int stage) {
    const char* sa = smem + stage * kStageBytes;
    const char* sb = sa + BM * kRowBytes;
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // lanes 0-15: rows 0-15 at k 0-7 (a0, a1); lanes 16-31: the same rows at k 8-15 (a2, a3)
        const int row = wm * WM + mt * 16 + (lane % 16);
        rf::arch::ldmatrix_x4(af[mt], sa + swizzle<kRowBytes>(row, ks * 2 + lane / 16));
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        // matrices: (n tile 2np, k 0-7), (2np, k 8-15), (2np+1, k 0-7), (2np+1, k 8-15)
        const int row = wn * WN + np * 16 + (lane % 8) + (lane / 16) * 8;
        uint32_t r[4];
        rf::arch::ldmatrix_x4(r, sb + swizzle<kRowBytes>(row, ks * 2 + (lane / 8) % 2));
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if (kDType == DType::kHalf) {
            rf::arch::mma_f16(acc[mt][nt], af[mt], bf[nt], acc[mt][nt]);
          } else {
            rf::arch::mma_bf16(acc[mt][nt], af[mt], bf[nt], acc[mt][nt]);
          }
        }
    }
  };

  // Prologue: the first kStages - 1 steps in flight (one commit group each, empty past the end).
#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < nkt) load_tile(stage);
    rf::arch::cp_async_commit();
  }
  for (int it = 0; it < nkt; ++it) {
    // Step `it` has landed (at most kStages - 2 newer groups pending), and every warp is done
    // with the stage computed last iteration, which the copies issued next overwrite.
    rf::arch::cp_async_wait<kStages - 2>();
    rf::arch::syncthreads();
    const int next = it + kStages - 1;
    if (next < nkt) load_tile(next % kStages);
    rf::arch::cp_async_commit();
    compute_stage(it % kStages);
  }
  rf::arch::cp_async_wait<0>();

  // Epilogue, from the accumulators: lane (g, t4) holds rows g and g + 8, columns 2 t4, 2 t4 + 1
  // of each 16 x 8 fragment.
  const int g = lane / 4, t4 = lane % 4;
  const int row0 = bm + wm * WM + g, col0 = bn + wn * WN + 2 * t4;
  if (splits > 1) {
    float* ws = p.workspace + int64_t(blockIdx.z) * M * p.K;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int row = row0 + mt * 16 + half * 8, col = col0 + nt * 8;
          if (row < M && col < p.K)
            rf::arch::stg(reinterpret_cast<float2*>(ws + int64_t(row) * p.K + col),
                          float2{acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]});
        }
    return;
  }
  // The output may be the residual's own buffer (in place), so the compiler keeps every load
  // after each store written before it: loads and stores interleaved per fragment would each wait
  // a whole memory round trip. So the bias is loaded once, and each 16-row slice loads all its
  // residual values before it stores any (a thread reads only the elements it writes). Slices
  // of 16 rows keep the registers of the main loop's peak (more per batch raised 64x64's).
  float2 bias[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = col0 + nt * 8;
    bias[nt] = p.bias && col < p.K ? rf::arch::ldg(reinterpret_cast<const float2*>(p.bias + col)) : float2{0.f, 0.f};
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float2 res[2][NT];
    if (p.residual) {
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int row = row0 + mt * 16 + half * 8, col = col0 + nt * 8;
          res[half][nt] =
              row < M && col < p.K
                  ? Tr::unpack(rf::arch::ldg(reinterpret_cast<const T2*>(p.residual) + (int64_t(row) * p.K + col) / 2))
                  : float2{0.f, 0.f};
        }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int row = row0 + mt * 16 + half * 8, col = col0 + nt * 8;
        if (row >= M || col >= p.K) continue;
        float v0 = acc[mt][nt][2 * half], v1 = acc[mt][nt][2 * half + 1];
        if (p.bias) {
          v0 += bias[nt].x;
          v1 += bias[nt].y;
        }
        if (p.residual) {
          v0 += res[half][nt].x;
          v1 += res[half][nt].y;
        }
        if (p.relu) {
          v0 = relu_keep_nan(v0);
          v1 = relu_keep_nan(v1);
        }
        rf::arch::stg(reinterpret_cast<T2*>(p.output) + (int64_t(row) * p.K + col) / 2, Tr::pack(v0, v1));
      }
  }
}

template <Tile kTile, DType kDType, bool kNarrow>
cudaError_t launch(const ConvParams& p, int splits, cudaStream_t stream) {
  constexpr int BM = Shape<kTile>::BM, BN = Shape<kTile>::BN;
  static const char* const kName[kNumTiles][2][2] = {
      {{"conv_kernel<128x128,f16>", "conv_kernel<128x128,f16,narrow>"},
       {"conv_kernel<128x128,bf16>", "conv_kernel<128x128,bf16,narrow>"}},
      {{"conv_kernel<128x64,f16>", "conv_kernel<128x64,f16,narrow>"},
       {"conv_kernel<128x64,bf16>", "conv_kernel<128x64,bf16,narrow>"}},
      {{"conv_kernel<64x64,f16>", "conv_kernel<64x64,f16,narrow>"},
       {"conv_kernel<64x64,bf16>", "conv_kernel<64x64,bf16,narrow>"}},
      {{"conv_kernel<128x128k64,f16>", "conv_kernel<128x128k64,f16,narrow>"},
       {"conv_kernel<128x128k64,bf16>", "conv_kernel<128x128k64,bf16,narrow>"}}};
  const int M = p.N * p.P * p.Q;
  const dim3 grid(unsigned((M + BM - 1) / BM), unsigned((p.K + BN - 1) / BN), unsigned(splits));
  return rf::arch::launch(kName[int(kTile)][kDType == DType::kBFloat16][kNarrow], &conv_kernel<kTile, kDType, kNarrow>,
                          grid, dim3(kThreads), smem_bytes<kTile>(), stream, p, splits);
}

}  // namespace igemm

template <Tile kTile, DType kDType, bool kNarrow>
cudaError_t launch_conv_instance(const ConvParams& p, int splits, cudaStream_t stream) {
  return igemm::launch<kTile, kDType, kNarrow>(p, splits, stream);
}

}  // namespace resnet_fused::cuda
