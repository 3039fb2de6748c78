// Device code of the fused implicit-GEMM convolution (see implicit_gemm.h). Included by one
// small .cu per instantiation (implicit_gemm_<tile>_<dtype>.cu). Written on the arch layer, so
// the same source runs on a GPU and under the emulator.
//
// The GEMM view: A = the input seen as [M = N*P*Q, R*S*C] (rows gathered on the fly: an output
// pixel's receptive field, zero outside the image), B = the weight [K, R*S*C] (its rows are the
// GEMM's columns), D = the output [M, K], which is the NHWC output itself. Grouped (kGrouped
// instantiations): a block's reduction runs over the input channels of the groups its output
// channels belong to, with B block-diagonal (zeros outside each channel's own group).
//
// Each block computes a BM x BN tile of D with 4 warps (2 x 2, each a (BM/2) x (BN/2) tile of
// m16n8k16 mma.sync) or, for 256x128, 8 warps (4 x 2, each 64 x 64), stepping through the
// reduction BK (32 or 64) at a time. A cp.async pipeline of `Stages` keeps Stages - 1 steps in
// flight: every thread copies whole 16-byte (8 half or 4 float32 elements) chunks of A and B into shared memory, a
// chunk outside the image, the matrix or the reduction zero-filled (src-size 0). Shared tiles are
// rows of 2*BK bytes whose 16-byte units are XOR-swizzled by the row (see swizzle), so that the 8
// rows an ldmatrix reads fall in different banks. The epilogue stages the float accumulators
// through that shared memory and applies + bias, + residual, ReLU (NaN kept) to rows of 8
// channels: one 16-byte residual load and one 16-byte output store each. With split-K it stores
// float32 partial sums instead and splitk_reduce_kernel (implicit_gemm.cu) finishes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../arch/arch.h"
#include "epilogue_math.cuh"
#include "implicit_gemm.h"

namespace resnet_fused::cuda {
namespace igemm {

// Block tile BM x BN, reduction step BK (elements; a shared row is 2*BK bytes), pipeline depth,
// warps along M (always 2 along N), and whether a step reads its first fragments before issuing
// its copies (the large tiles, 1-2 blocks per SM; it would cost the small ones ~25 registers,
// one block per SM of occupancy, where more warps hide the wait anyway).
template <int kBM, int kBN, int kBK, int kStages, int kWarpsM, bool kEarlyFragments>
struct TileShape {
  static constexpr int BM = kBM, BN = kBN, BK = kBK, Stages = kStages, WarpsM = kWarpsM;
  static constexpr bool EarlyFragments = kEarlyFragments;
};
template <Tile kTile>
struct Shape;
template <>
struct Shape<Tile::k128x128> : TileShape<128, 128, 32, 4, 2, true> {};
template <>
struct Shape<Tile::k128x64> : TileShape<128, 64, 32, 4, 2, false> {};
template <>
struct Shape<Tile::k64x64> : TileShape<64, 64, 32, 4, 2, false> {};
template <>
struct Shape<Tile::k128x128k64> : TileShape<128, 128, 64, 3, 2, true> {};
template <>
struct Shape<Tile::k256x128> : TileShape<256, 128, 32, 4, 4, true> {};

template <Tile kTile>
constexpr int kThreadsOf = 32 * Shape<kTile>::WarpsM * 2;
template <Tile kTile>
constexpr bool kShapePlanned = Shape<kTile>::BM == kTileBM[int(kTile)] && Shape<kTile>::BN == kTileBN[int(kTile)] &&
                               Shape<kTile>::BK == kTileBK[int(kTile)];

template <Tile kTile>
constexpr size_t smem_bytes() {
  using S = Shape<kTile>;
  return size_t(S::Stages) * (S::BM + S::BN) * S::BK * 2;
}

// The epilogue stages the accumulators through shared memory as float rows of BN + 8 (8 banks
// apart: the fragments' float2 writes are conflict-free), kStagedSlices 16-row slices of every
// warp row at a time: as many as the pipeline's shared memory holds.
template <Tile kTile>
constexpr int staged_slices() {
  using S = Shape<kTile>;
  constexpr int kMT = S::BM / S::WarpsM / 16;
  for (int d = kMT; d > 1; --d)
    if (kMT % d == 0 && size_t(S::WarpsM) * 16 * d * (S::BN + 8) * 4 <= smem_bytes<kTile>()) return d;
  return 1;
}
template <Tile kTile>
constexpr int kStagedSlices = staged_slices<kTile>();
template <Tile kTile>
constexpr size_t kSmemBytes = smem_bytes<kTile>();

// Byte offset of 16-byte unit `u` of row `row` in a swizzled tile of kRowBytes-byte rows. The 8
// rows an ldmatrix reads at one unit land in 8 different 16-byte bank groups: 64-byte rows (two
// to a 128-byte bank line) XOR the unit with (row >> 1) & 3, 128-byte rows with row & 7.
template <int kRowBytes>
RF_DEVICE int swizzle(int row, int u) {
  static_assert(kRowBytes == 64 || kRowBytes == 128, "rows of 32 or 64 half-precision elements");
  return row * kRowBytes + ((kRowBytes == 64 ? u ^ ((row >> 1) & 3) : u ^ (row & 7)) << 4);
}

template <Tile kTile, DType kDType, bool kNarrow, bool kGrouped, bool kDual>
RF_KERNEL void __launch_bounds__(kThreadsOf<kTile>) conv_kernel(ConvParams p, int splits) {
  using Tr = Traits<kDType>;
  using T = typename Tr::T;
  using T2 = typename Tr::T2;
  constexpr int BM = Shape<kTile>::BM, BN = Shape<kTile>::BN;
  // A reduction step is a shared row of 2 * Shape::BK bytes: BK half-precision elements, or BK / 2
  // float32 ones (TF32). Byte for byte the same tiles, swizzle and ldmatrix addresses: each 32-byte
  // slice of a row is one m16n8k16 (f16/bf16) or one m16n8k8 (TF32) along the reduction.
  constexpr int kElem = int(sizeof(T)), kRowBytes = 2 * Shape<kTile>::BK, kBK = kRowBytes / kElem;
  constexpr int kStages = Shape<kTile>::Stages;
  constexpr int kWarpsM = Shape<kTile>::WarpsM, kThreads = kThreadsOf<kTile>;
  constexpr int WM = BM / kWarpsM, WN = BN / 2;  // warp tile
  constexpr int MT = WM / 16, NT = WN / 8;  // mma tiles per warp
  constexpr int kVec = (kNarrow ? 8 : 16) / kElem;  // elements per cp.async
  constexpr int kChunksPerRow = kBK / kVec;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  constexpr int kAIters = BM / kRowsPerPass, kBIters = BN / kRowsPerPass;
  constexpr int kStageBytes = (BM + BN) * kRowBytes;
  static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");
  static_assert(kDType != DType::kFloat || (!kNarrow && !kGrouped), "TF32: 16-byte loads, groups 1");
  static_assert(!kDual || (!kNarrow && !kGrouped && kDType != DType::kFloat), "dual: 16-byte loads, groups 1, f16/bf16");

  char* smem = rf::arch::dynamic_smem();
  const int tid = int(threadIdx.x);
  const int M = p.N * p.P * p.Q;
  const int PQ = p.P * p.Q;
  const int bm = int(blockIdx.x) * BM, bn = int(blockIdx.y) * BN;
  // Grouped: the block's output channels [bn, bn + BN) belong to groups g_first..g_last, so its
  // reduction runs over those groups' input channels, [c_base, c_base + Cr), each output channel's
  // weight zero outside its own group (B's chunks of other groups are zero-filled, not read): a
  // block-diagonal product, as ResNeXt's 4-32 channel groups need. Ungrouped: c_base 0, Cr = C.
  // (kGrouped: the instantiations that take groups; the others run groups 1 only, as compiled.)
  // Dual: the reduction runs over input's C channels, then input2's C2 (R = S = 1, groups 1).
  const int groups = kGrouped ? p.groups : 1;
  const int cin_g = kDual ? p.C + p.C2 : p.C / groups, kout_g = p.K / groups;
  const int g_first = kGrouped ? bn / kout_g : 0;
  const int g_last = kGrouped ? ((bn + BN < p.K ? bn + BN : p.K) - 1) / kout_g : 0;
  const int c_base = g_first * cin_g, Cr = (g_last - g_first + 1) * cin_g;
  const int RSC = p.R * p.S * Cr;   // this block's reduction
  const int RSg = p.R * p.S * cin_g;  // a weight row
  const int ktiles = (RSC + kBK - 1) / kBK;
  const int kt_begin = int(int64_t(blockIdx.z) * ktiles / splits);
  const int nkt = int(int64_t(blockIdx.z + 1) * ktiles / splits) - kt_begin;

  const T* x = static_cast<const T*>(p.input);
  const T* x2 = static_cast<const T*>(p.input2);
  const T* w = static_cast<const T*>(p.weight);

  // This thread's chunks: column `cc` of rows r0, r0 + kRowsPerPass, ... of each tile. The
  // loader is strength-reduced, as CUTLASS's optimized iterators are: a row of A keeps the
  // element offset of its receptive field's corner (channel 0; negative or past the image where
  // padding is read, never dereferenced there) and a mask of the filter rows (bits 0-15) and
  // columns (bits 16-31) that fall inside the image; per step, one offset and one bit pair for
  // the filter position are shared by all rows. Element offsets fit 32 bits (conv_unsupported).
  const int cc = tid % kChunksPerRow, r0 = tid / kChunksPerRow;
  // Dual: a row's pixel in input2 (stride2, no padding) too.
  int a_base[kAIters], a_base2[kDual ? kAIters : 1];
  uint32_t a_mask[kAIters];
#pragma unroll
  for (int i = 0; i < kAIters; ++i) {
    const int m = bm + r0 + i * kRowsPerPass;
    a_base[i] = 0;
    a_mask[i] = 0;
    if constexpr (kDual) a_base2[i] = 0;
    if (m < M) {
      const int n = m / PQ, pq = m - n * PQ;
      const int pp = pq / p.Q, qq = pq - pp * p.Q;
      const int h0 = pp * p.stride_h - p.pad_h, w0 = qq * p.stride_w - p.pad_w;
      a_base[i] = ((n * p.H + h0) * p.W + w0) * p.C + c_base;
      if constexpr (kDual) a_base2[i] = ((n * p.H2 + pp * p.stride2) * p.W2 + qq * p.stride2) * p.C2;
      for (int r = 0; r < p.R; ++r)
        if (unsigned(h0 + r * p.dil_h) < unsigned(p.H)) a_mask[i] |= 1u << r;
      for (int s = 0; s < p.S; ++s)
        if (unsigned(w0 + s * p.dil_w) < unsigned(p.W)) a_mask[i] |= 1u << (16 + s);
    }
  }
  // B's rows: b_row0 + i * kRowsPerPass (output channels); bit i of b_rows_ok says row i is one
  // of the K (the ungrouped kernels' test; grouped ones test b_lo below).
  const int b_row0 = bn + r0;
  uint32_t b_rows_ok = 0;
#pragma unroll
  for (int i = 0; i < kBIters; ++i)
    if (b_row0 + i * kRowsPerPass < p.K) b_rows_ok |= 1u << i;
  const int b_base = (b_rows_ok & 1u) ? b_row0 * RSg : 0;
  // Within a row, chunk cc sits in 16-byte unit cc (or cc / 2 for 8-byte chunks); the swizzle
  // depends on the row only through row % 8, the same for all of a thread's rows.
  const int unit = kNarrow ? cc >> 1 : cc, unit_byte = kNarrow ? (cc & 1) * 8 : 0;
  static_assert(kRowsPerPass % 8 == 0, "a thread's rows share their swizzle");
  const int dst0 = swizzle<kRowBytes>(r0, unit) + unit_byte;

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
    const int rs = kk / Cr;
    c = kk - rs * Cr;
    r = rs / p.S;
    s = rs - r * p.S;
  }
  // The filter position's offset from a row's corner and its mask bits (r >= 16 only past the
  // reduction's end, where k_ok is false); the chunk's offset in a weight row (ungrouped: kk),
  // and, grouped, b_lo: thread row i reads a weight chunk iff i * kRowsPerPass - b_lo < K/groups,
  // i.e. its output channel is of the chunk's group (it reads zeros for the others').
  const bool grouped = kGrouped && groups > 1;
  int a_off, b_off, b_lo = 0;
  uint32_t rs_bits;
  auto position = [&]() {
    a_off = (r * p.dil_h * p.W + s * p.dil_w) * p.C + c;
    rs_bits = (1u << (r & 15)) | (1u << (16 + s));
    if (grouped) {
      const int c_group = c / cin_g;
      b_off = (r * p.S + s) * cin_g + c - c_group * cin_g;
      b_lo = (g_first + c_group) * kout_g - b_row0;
    } else {
      b_off = kk;
      b_lo = -b_row0;  // (the row is one of the K: the same test as b_rows_ok)
    }
  };
  position();
  auto advance = [&]() {
    kk += kBK;
    c += kBK;
    while (c >= Cr) {  // once per step when Cr >= 32; several times for 4 or 8 channels
      c -= Cr;
      if (++s == p.S) {
        s = 0;
        ++r;
      }
    }
    position();
  };

  auto load_tile = [&](int stage) {
    const bool k_ok = kk < RSC;
    char* sa = smem + stage * kStageBytes + dst0;
    char* sb = sa + BM * kRowBytes;
    // (dual: this thread's chunk is wholly in one input, as C % 8 == 0; c is its channel)
    const bool second = kDual && c >= p.C;
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const bool ok = k_ok && (a_mask[i] & rs_bits) == rs_bits;
      if constexpr (kDual) {
        copy(sa + i * kRowsPerPass * kRowBytes, second ? x2 + (a_base2[i] + (c - p.C)) : x + (a_base[i] + a_off), ok);
      } else {
        copy(sa + i * kRowsPerPass * kRowBytes, x + (a_base[i] + a_off), ok);
      }
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const bool row_ok = kGrouped ? unsigned(i * kRowsPerPass - b_lo) < unsigned(kout_g) : ((b_rows_ok >> i) & 1u);
      const bool ok = k_ok && row_ok;
      copy(sb + i * kRowsPerPass * kRowBytes, w + (ok ? b_base + i * kRowsPerPass * RSg + b_off : 0), ok);
    }
    advance();
  };

  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp / 2, wn = warp % 2;  // (kWarpsM x 2 warps)
  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // A warp's fragments of 32-byte slice ks of a stage (16 reduction elements, 8 in TF32: the same
  // ldmatrix gives lane (g, t) word t of row g, which is the m16n8k8 TF32 fragment), and the
  // multiplies that consume them.
  auto load_fragments = [&](const char* sa, const char* sb, int ks, uint32_t (&af)[MT][4], uint32_t (&bf)[NT][2]) {
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
  };
  auto multiply = [&](uint32_t (&af)[MT][4], uint32_t (&bf)[NT][2]) {
    if (kDType == DType::kFloat) {
      // fp32 in shared memory, rounded to TF32 here (as cuDNN and CUTLASS round, not truncated)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) af[mt][e] = rf::arch::cvt_tf32(af[mt][e]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) bf[nt][e] = rf::arch::cvt_tf32(bf[nt][e]);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (kDType == DType::kHalf) {
          rf::arch::mma_f16(acc[mt][nt], af[mt], bf[nt], acc[mt][nt]);
        } else if (kDType == DType::kFloat) {
          rf::arch::mma_tf32(acc[mt][nt], af[mt], bf[nt], acc[mt][nt]);
        } else {
          rf::arch::mma_bf16(acc[mt][nt], af[mt], bf[nt], acc[mt][nt]);
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
    const char* sa = smem + (it % kStages) * kStageBytes;
    const char* sb = sa + BM * kRowBytes;
    // With EarlyFragments the step's first fragments are read before its copies are issued:
    // shared-memory accesses keep their program order, so the multiplies need not wait behind them.
    constexpr bool kEarly = Shape<kTile>::EarlyFragments;
    uint32_t af[MT][4], bf[NT][2];
    if (kEarly) load_fragments(sa, sb, 0, af, bf);
    const int next = it + kStages - 1;
    if (next < nkt) load_tile(next % kStages);
    rf::arch::cp_async_commit();
#pragma unroll
    for (int ks = 0; ks < kRowBytes / 32; ++ks) {
      if (ks > 0 || !kEarly) load_fragments(sa, sb, ks, af, bf);
      multiply(af, bf);
    }
  }
  rf::arch::cp_async_wait<0>();

  // Epilogue, from the accumulators: lane (g, t4) holds rows g and g + 8, columns 2 t4, 2 t4 + 1
  // of each 16 x 8 fragment.
  const int g = lane / 4, t4 = lane % 4;
  // Every warp is done with the pipeline's shared memory (the last step's fragments): it now holds
  // the accumulators, a few 16-row slices at a time, so that each thread then takes whole rows of
  // 8 channels: one 16-byte load of the residual and one 16-byte store of the output per 8
  // channels (as CUTLASS's epilogue does), instead of 4-byte accesses per fragment. The output
  // may be the residual's own buffer (in place), so the compiler keeps every load after each store
  // written before it; a pass loads all its residual chunks before it stores any (a thread reads
  // only the elements it writes), so a thread waits for memory once per pass. With split-K the
  // rows go to the workspace as float32 partial sums instead (splitk_reduce_kernel finishes).
  constexpr int kSlices = kStagedSlices<kTile>, kPasses = MT / kSlices;
  constexpr int kRowFloats = BN + 8, kPassRows = kWarpsM * 16 * kSlices;
  constexpr int kChunks = BN / 8, kRowsPerStep = kThreads / kChunks, kSteps = kPassRows / kRowsPerStep;
  static_assert(kThreads % kChunks == 0 && kPassRows % kRowsPerStep == 0, "whole chunks per thread");
  static_assert(size_t(kPassRows) * kRowFloats * 4 <= kSmemBytes<kTile>, "a pass fits the pipeline's shared memory");
  float* staged = reinterpret_cast<float*>(smem);
  const int chunk = tid % kChunks, crow = tid / kChunks;
  const int col = bn + chunk * 8;
  const bool col_ok = col < p.K;  // (K % 8 == 0: a chunk is wholly in or out)
  float* ws = splits > 1 ? p.workspace + int64_t(blockIdx.z) * M * p.K : nullptr;
  float bias[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (p.bias && col_ok && !ws) {
    const float4 b0 = rf::arch::ldg(reinterpret_cast<const float4*>(p.bias + col));
    const float4 b1 = rf::arch::ldg(reinterpret_cast<const float4*>(p.bias + col + 4));
    bias[0] = b0.x, bias[1] = b0.y, bias[2] = b0.z, bias[3] = b0.w;
    bias[4] = b1.x, bias[5] = b1.y, bias[6] = b1.z, bias[7] = b1.w;
  }
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    // The previous pass's (or the main loop's) reads of this memory are done.
    rf::arch::syncthreads();
#pragma unroll
    for (int i = 0; i < kSlices; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int mt = pass * kSlices + i;
          const int srow = wm * 16 * kSlices + i * 16 + g + half * 8, scol = wn * WN + nt * 8 + 2 * t4;
          rf::arch::sts(reinterpret_cast<float2*>(staged + srow * kRowFloats + scol),
                        float2{acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]});
        }
    rf::arch::syncthreads();
    // Staged row sr is warp row sr / (16 kSlices)'s slice (pass kSlices + (sr % (16 kSlices)) / 16).
    constexpr int kWords = kElem / 2;  // 16-byte words per 8 channels: 1, or 2 in float32
    uint4 res[kSteps][kWords];
    int64_t off[kSteps];
    bool ok[kSteps];
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
      const int sr = crow + j * kRowsPerStep;
      const int row = bm + (sr / (16 * kSlices)) * WM + pass * kSlices * 16 + sr % (16 * kSlices);
      ok[j] = col_ok && row < M;
      off[j] = int64_t(row) * p.K + col;
#pragma unroll
      for (int u = 0; u < kWords; ++u) {
        res[j][u] = make_uint4(0u, 0u, 0u, 0u);
        if (p.residual && ok[j] && !ws)
          res[j][u] = rf::arch::ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.residual) + off[j]) + u);
      }
    }
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
      if (!ok[j]) continue;
      const int sr = crow + j * kRowsPerStep;
      const float4 a0 = rf::arch::lds(reinterpret_cast<const float4*>(staged + sr * kRowFloats + chunk * 8));
      const float4 a1 = rf::arch::lds(reinterpret_cast<const float4*>(staged + sr * kRowFloats + chunk * 8 + 4));
      if (ws) {
        rf::arch::stg(reinterpret_cast<float4*>(ws + off[j]), a0);
        rf::arch::stg(reinterpret_cast<float4*>(ws + off[j] + 4), a1);
        continue;
      }
      float v[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const T2* r2 = reinterpret_cast<const T2*>(&res[j][0]);
      uint4 out[kWords];
      T2* o2 = reinterpret_cast<T2*>(&out[0]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v0 = v[2 * e], v1 = v[2 * e + 1];
        if (p.bias) {
          v0 += bias[2 * e];
          v1 += bias[2 * e + 1];
        }
        if (p.residual) {
          const float2 rv = Tr::unpack(r2[e]);
          v0 += rv.x;
          v1 += rv.y;
        }
        if (p.relu) {
          v0 = relu_keep_nan(v0);
          v1 = relu_keep_nan(v1);
        }
        o2[e] = Tr::pack(v0, v1);
      }
#pragma unroll
      for (int u = 0; u < kWords; ++u) rf::arch::stg(reinterpret_cast<uint4*>(static_cast<T*>(p.output) + off[j]) + u, out[u]);
    }
  }
}

template <Tile kTile, DType kDType, bool kNarrow, bool kGrouped, bool kDual>
cudaError_t launch(const ConvParams& p, int splits, cudaStream_t stream) {
  static_assert(kShapePlanned<kTile>, "the kernel's tile is the one plan_conv plans with (kTileBM/BN/BK)");
  constexpr int BM = Shape<kTile>::BM, BN = Shape<kTile>::BN;
  static const char* const kName[kNumTiles][2][2] = {
      {{"conv_kernel<128x128,f16>", "conv_kernel<128x128,f16,narrow>"},
       {"conv_kernel<128x128,bf16>", "conv_kernel<128x128,bf16,narrow>"}},
      {{"conv_kernel<128x64,f16>", "conv_kernel<128x64,f16,narrow>"},
       {"conv_kernel<128x64,bf16>", "conv_kernel<128x64,bf16,narrow>"}},
      {{"conv_kernel<64x64,f16>", "conv_kernel<64x64,f16,narrow>"},
       {"conv_kernel<64x64,bf16>", "conv_kernel<64x64,bf16,narrow>"}},
      {{"conv_kernel<128x128k64,f16>", "conv_kernel<128x128k64,f16,narrow>"},
       {"conv_kernel<128x128k64,bf16>", "conv_kernel<128x128k64,bf16,narrow>"}},
      {{"conv_kernel<256x128,f16>", "conv_kernel<256x128,f16,narrow>"},
       {"conv_kernel<256x128,bf16>", "conv_kernel<256x128,bf16,narrow>"}}};
  static const char* const kGroupedName[2] = {"conv_kernel<64x64,f16,grouped>", "conv_kernel<64x64,bf16,grouped>"};
  static const char* const kTf32Name[kNumTiles] = {"conv_kernel<128x128,tf32>", "conv_kernel<128x64,tf32>",
                                                   "conv_kernel<64x64,tf32>", "conv_kernel<128x128k64,tf32>",
                                                   "conv_kernel<256x128,tf32>"};
  static const char* const kDualName[2][2] = {{"conv_kernel<128x128,f16,dual>", "conv_kernel<128x128,bf16,dual>"},
                                              {"conv_kernel<128x64,f16,dual>", "conv_kernel<128x64,bf16,dual>"}};
  static_assert(!kGrouped || kNarrow || kTile == Tile::k64x64, "named: the wide grouped kernel is 64x64");
  static_assert(!kDual || kTile == Tile::k128x128 || kTile == Tile::k128x64, "named: the dual kernels");
  const int M = p.N * p.P * p.Q;
  const dim3 grid(unsigned((M + BM - 1) / BM), unsigned((p.K + BN - 1) / BN), unsigned(splits));
  const char* name = kDType == DType::kFloat    ? kTf32Name[int(kTile)]
                     : kDual                ? kDualName[kTile != Tile::k128x128][kDType == DType::kBFloat16]
                     : kGrouped && !kNarrow ? kGroupedName[kDType == DType::kBFloat16]
                                            : kName[int(kTile)][kDType == DType::kBFloat16][kNarrow];
  return rf::arch::launch(name, &conv_kernel<kTile, kDType, kNarrow, kGrouped, kDual>,
                          grid, dim3(kThreadsOf<kTile>), smem_bytes<kTile>(), stream, p, splits);
}

}  // namespace igemm

template <Tile kTile, DType kDType, bool kNarrow, bool kGrouped, bool kDual>
cudaError_t launch_conv_instance(const ConvParams& p, int splits, cudaStream_t stream) {
  return igemm::launch<kTile, kDType, kNarrow, kGrouped, kDual>(p, splits, stream);
}

}  // namespace resnet_fused::cuda
