// The register-tile kernels of gemm_kernels.h, one per ISA, and the choice between them.
//
// Each kernel keeps rows x (its panel width) accumulators in vector registers for the whole
// reduction: one panel row loaded per step, one broadcast per A row, one FMA per accumulator;
// nothing is written until the epilogue. Row counts below the full tile are separate template
// instances (the accumulators must be named at compile time to stay in registers).
#include "gemm_kernels.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RF_X86 1
#else
#define RF_X86 0
#endif

namespace resnet_fused::cpu {

void pack_panels(const float* w, int64_t n, int64_t kd, float* packed) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = packed + p * kd * kPanel;
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t col = p * kPanel + j;
      if (col < n) {
        const float* src = w + col * kd;
        for (int64_t k = 0; k < kd; ++k) dst[k * kPanel + j] = src[k];
      } else {
        for (int64_t k = 0; k < kd; ++k) dst[k * kPanel + j] = 0.f;
      }
    }
  }
}

void unpack_panels(const float* packed, int64_t n, int64_t kd, float* w) {
  for (int64_t col = 0; col < n; ++col) {
    const float* src = packed + (col / kPanel) * kd * kPanel + col % kPanel;
    for (int64_t k = 0; k < kd; ++k) w[col * kd + k] = src[k * kPanel];
  }
}

namespace {

// Any CPU: plain loops the compiler vectorises for the baseline ISA.
template <int MR>
void tile_generic(const Tile& t) {
  float acc[MR][kPanel] = {};
  for (int64_t k = 0; k < t.kd; ++k) {
    const float* b = t.b + k * t.ldb;
    for (int i = 0; i < MR; ++i) {
      const float a = t.a[i * t.lda + k];
      for (int j = 0; j < kPanel; ++j) acc[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* c = t.c + i * t.ldc;
    for (int64_t j = 0; j < t.cols; ++j) {
      float v = acc[i][j];
      if (t.bias) v += t.bias[j];
      if (t.accumulate) v += c[j];
      if (t.residual) v += t.residual[i * t.ldr + j];
      c[j] = (t.relu && v < 0.f) ? 0.f : v;
    }
  }
}

constexpr int kGenericRows = 4;

void run_generic(const Tile& t) {
  switch (t.rows) {
    case 1: return tile_generic<1>(t);
    case 2: return tile_generic<2>(t);
    case 3: return tile_generic<3>(t);
    default: return tile_generic<4>(t);
  }
}

#if RF_X86
// AVX-512: 12 rows x 32 columns (two zmm per row): 24 accumulators, 2 panel loads and 12
// broadcasts per step. _mm512_max_ps(0, v) returns v when v is NaN (the second operand).
// One step of the reduction: c += a[:, k] (x) the panel row b (32 columns).
template <int MR>
__attribute__((target("avx512f"), always_inline)) inline void step_avx512(__m512 (&c0)[MR], __m512 (&c1)[MR],
                                                                          const float* a, int64_t lda, const float* b) {
  const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    const __m512 av = _mm512_set1_ps(a[i * lda]);
    c0[i] = _mm512_fmadd_ps(av, b0, c0[i]);
    c1[i] = _mm512_fmadd_ps(av, b1, c1[i]);
  }
}

template <int MR>
__attribute__((target("avx512f"))) void tile_avx512(const Tile& t) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  const float* a = t.a;
  const int64_t lda = t.lda;
  const float* b = t.b;
  const float* pf = t.prefetch;
  if (pf && t.kd % 16 == 0) {
    // 16 steps at a time, each first asking for one line of each of the next tile's rows (read
    // in place, rows of A are as many streams from memory as the tile has rows).
    for (int64_t k0 = 0; k0 < t.kd; k0 += 16) {
#pragma GCC unroll 12
      for (int i = 0; i < MR; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * lda + k0), _MM_HINT_T0);
#pragma GCC unroll 16
      for (int64_t k = 0; k < 16; ++k, b += t.ldb, ++a) step_avx512<MR>(c0, c1, a, lda, b);
    }
  } else {
    for (int64_t k = 0; k < t.kd; ++k, b += t.ldb, ++a) step_avx512<MR>(c0, c1, a, lda, b);
  }
  const int64_t cols = t.cols;
  const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? __mmask16(0xFFFF) : cols > 16 ? __mmask16((1u << (cols - 16)) - 1) : __mmask16(0);
  const __m512 zero = _mm512_setzero_ps();
  const __m512 bias0 = t.bias ? _mm512_maskz_loadu_ps(m0, t.bias) : zero;
  const __m512 bias1 = t.bias ? _mm512_maskz_loadu_ps(m1, t.bias + 16) : zero;
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    float* c = t.c + i * t.ldc;
    __m512 v0 = _mm512_add_ps(c0[i], bias0), v1 = _mm512_add_ps(c1[i], bias1);
    if (t.accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, c));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, c + 16));
    }
    if (t.residual) {
      const float* r = t.residual + i * t.ldr;
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, r));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, r + 16));
    }
    if (t.relu) {
      v0 = _mm512_max_ps(zero, v0);
      v1 = _mm512_max_ps(zero, v1);
    }
    _mm512_mask_storeu_ps(c, m0, v0);
    _mm512_mask_storeu_ps(c + 16, m1, v1);
  }
}

constexpr int kAvx512Rows = 12;

__attribute__((target("avx512f"))) void run_avx512(const Tile& t) {
  switch (t.rows) {
    case 1: return tile_avx512<1>(t);
    case 2: return tile_avx512<2>(t);
    case 3: return tile_avx512<3>(t);
    case 4: return tile_avx512<4>(t);
    case 5: return tile_avx512<5>(t);
    case 6: return tile_avx512<6>(t);
    case 7: return tile_avx512<7>(t);
    case 8: return tile_avx512<8>(t);
    case 9: return tile_avx512<9>(t);
    case 10: return tile_avx512<10>(t);
    case 11: return tile_avx512<11>(t);
    default: return tile_avx512<12>(t);
  }
}

// AVX2 + FMA: 6 rows x 16 columns (two ymm per row): 12 accumulators of the 16 registers. A
// 32-column panel read in place (Winograd's U) is two calls, one per half; packed panels run on
// full_avx2 below. _mm256_max_ps(0, v) keeps NaN as above.
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p, __m256i mask, bool full) {
  return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask);
}

template <int MR>
__attribute__((target("avx2,fma"))) void half_avx2(const Tile& t, int64_t j0) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  const float* a = t.a;
  const int64_t lda = t.lda;
  const float* b = t.b + j0;
  for (int64_t k = 0; k < t.kd; ++k, b += t.ldb, ++a) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda);
      c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
    }
  }
  const int64_t cols = t.cols - j0;  // valid columns of this half, >= 1 (the panel row stride stays ldb)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(cols)), lane);
  const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(cols - 8)), lane);
  // Masked moves only for a partial half: AMD's Zen cores run a masked store (vmaskmovps) as
  // microcode, tens of cycles each, which made the epilogue cost more than a short reduction.
  const bool full = cols >= 16;
  const auto load = [full](const float* p, __m256i m) { return load8(p, m, full); };
  const __m256 zero = _mm256_setzero_ps();
  const __m256 bias0 = t.bias ? load(t.bias + j0, m0) : zero;
  const __m256 bias1 = t.bias ? load(t.bias + j0 + 8, m1) : zero;
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    float* c = t.c + i * t.ldc + j0;
    __m256 v0 = _mm256_add_ps(c0[i], bias0), v1 = _mm256_add_ps(c1[i], bias1);
    if (t.accumulate) {
      v0 = _mm256_add_ps(v0, load(c, m0));
      v1 = _mm256_add_ps(v1, load(c + 8, m1));
    }
    if (t.residual) {
      const float* r = t.residual + i * t.ldr + j0;
      v0 = _mm256_add_ps(v0, load(r, m0));
      v1 = _mm256_add_ps(v1, load(r + 8, m1));
    }
    if (t.relu) {
      v0 = _mm256_max_ps(zero, v0);
      v1 = _mm256_max_ps(zero, v1);
    }
    if (full) {
      _mm256_storeu_ps(c, v0);
      _mm256_storeu_ps(c + 8, v1);
    } else {
      _mm256_maskstore_ps(c, m0, v0);
      _mm256_maskstore_ps(c + 8, m1, v1);
    }
  }
}

// One step: row r's value k broadcast into ymm12+r, the panel row's four vectors in turn into ymm15,
// acc[r][j] = ymm(4r + j) += ymm12+r * ymm15. a: byte offset of k in the rows; b0-b3: of the vectors.
#define RF_FMA3(j)                                                                                \
  "vfmadd231ps %%ymm15, %%ymm12, %%ymm" #j "\n"                                                   \
  "vfmadd231ps %%ymm15, %%ymm13, %%ymm" RF_PLUS4(j) "\n"                                          \
  "vfmadd231ps %%ymm15, %%ymm14, %%ymm" RF_PLUS8(j) "\n"
#define RF_STEP3(a, b0, b1, b2, b3)                                                               \
  "vbroadcastss " #a "(%[a0]), %%ymm12\n"                                                         \
  "vbroadcastss " #a "(%[a1]), %%ymm13\n"                                                         \
  "vbroadcastss " #a "(%[a2]), %%ymm14\n"                                                         \
  "vmovups " #b0 "(%[b]), %%ymm15\n" RF_FMA3(0) "vmovups " #b1 "(%[b]), %%ymm15\n" RF_FMA3(1)     \
  "vmovups " #b2 "(%[b]), %%ymm15\n" RF_FMA3(2) "vmovups " #b3 "(%[b]), %%ymm15\n" RF_FMA3(3)
#define RF_PLUS4(j) RF_PLUS4_##j
#define RF_PLUS4_0 "4"
#define RF_PLUS4_1 "5"
#define RF_PLUS4_2 "6"
#define RF_PLUS4_3 "7"
#define RF_PLUS8(j) RF_PLUS8_##j
#define RF_PLUS8_0 "8"
#define RF_PLUS8_1 "9"
#define RF_PLUS8_2 "10"
#define RF_PLUS8_3 "11"

// The epilogue main3_avx2 applies itself where the tile is a whole panel (32 columns): the same
// steps in the same order as full_avx2's (so the same bits), on the accumulators still in
// registers. Offsets fixed: the assembly reads the fields by them.
struct Epilogue3 {
  float* c;             // row 0 of the output; rows ldc_bytes apart
  int64_t ldc_bytes;
  const float* r;       // row 0 of the residual, or null; rows ldr_bytes apart
  int64_t ldr_bytes;
  const float* bias;    // 32 values (zeros where the tile has none)
  bool accumulate;      // add what c holds
  bool relu;
};
static_assert(offsetof(Epilogue3, ldc_bytes) == 8 && offsetof(Epilogue3, r) == 16 &&
                  offsetof(Epilogue3, ldr_bytes) == 24 && offsetof(Epilogue3, bias) == 32 &&
                  offsetof(Epilogue3, accumulate) == 40 && offsetof(Epilogue3, relu) == 41,
              "main3_avx2 reads Epilogue3 at these offsets");
alignas(32) constexpr float kZeros32[32] = {};

// acc rows (ymm 4r..4r+3) += the 32 floats at reg (a base register of the asm)
#define RF_ADD_ROW(reg, r0, r1, r2, r3)                                                        \
  "vaddps (%[" reg "]), %%ymm" r0 ", %%ymm" r0 "\n vaddps 32(%[" reg "]), %%ymm" r1 ", %%ymm" r1 "\n" \
  "vaddps 64(%[" reg "]), %%ymm" r2 ", %%ymm" r2 "\n vaddps 96(%[" reg "]), %%ymm" r3 ", %%ymm" r3 "\n"
#define RF_STORE_ROW(reg, r0, r1, r2, r3)                                                      \
  "vmovups %%ymm" r0 ", (%[" reg "])\n vmovups %%ymm" r1 ", 32(%[" reg "])\n"                       \
  "vmovups %%ymm" r2 ", 64(%[" reg "])\n vmovups %%ymm" r3 ", 96(%[" reg "])\n"

// The 3-row main loop of full_avx2 on a packed panel (row stride kPanel), in assembly as MLAS writes
// its kernels: the accumulators fixed in ymm0-11, three broadcasts and four panel loads a step, each
// panel vector used by three FMAs. (GCC 12 kept one accumulator on the stack and copied others
// between registers in the intrinsic loop.) With ep, applies its epilogue and stores the three rows
// (a whole panel); without, writes the 3 x 32 sums to out for full_avx2's masked epilogue. Prefetches
// the next tile's rows (pf, row stride lda) a line per row every 16 steps, and 4 lines of weight from
// pfb into L2.
__attribute__((target("avx2,fma"))) void main3_avx2(const float* a0, int64_t lda, const float* b, int64_t kd,
                                                  const float* pf, const float* pfb, float* out,
                                                  const Epilogue3* ep) {
  const float* a1 = a0 + lda;
  const float* a2 = a1 + lda;
  if (!pf) pf = a0;  // (a harmless address: lines already in cache)
  const int64_t pfb_step = pfb ? 256 : 0;  // bytes; without pfb the same lines of a0 again
  if (!pfb) pfb = a0;
  const float* pf1 = pf + lda;
  const float* pf2 = pf1 + lda;
  asm volatile(
      "vxorps %%ymm0, %%ymm0, %%ymm0\n vxorps %%ymm1, %%ymm1, %%ymm1\n vxorps %%ymm2, %%ymm2, %%ymm2\n"
      "vxorps %%ymm3, %%ymm3, %%ymm3\n vxorps %%ymm4, %%ymm4, %%ymm4\n vxorps %%ymm5, %%ymm5, %%ymm5\n"
      "vxorps %%ymm6, %%ymm6, %%ymm6\n vxorps %%ymm7, %%ymm7, %%ymm7\n vxorps %%ymm8, %%ymm8, %%ymm8\n"
      "vxorps %%ymm9, %%ymm9, %%ymm9\n vxorps %%ymm10, %%ymm10, %%ymm10\n vxorps %%ymm11, %%ymm11, %%ymm11\n"
      "cmp $16, %[kd]\n"
      "jl 2f\n"
      "1:\n"  // 16 steps: a cache line of each row
      "prefetcht0 (%[pf0])\n prefetcht0 (%[pf1])\n prefetcht0 (%[pf2])\n"
      "prefetcht1 (%[pfb])\n prefetcht1 64(%[pfb])\n prefetcht1 128(%[pfb])\n prefetcht1 192(%[pfb])\n"
      "add %[pfb_step], %[pfb]\n"
      RF_STEP3(0, 0, 32, 64, 96)
      RF_STEP3(4, 128, 160, 192, 224)
      RF_STEP3(8, 256, 288, 320, 352)
      RF_STEP3(12, 384, 416, 448, 480)
      RF_STEP3(16, 512, 544, 576, 608)
      RF_STEP3(20, 640, 672, 704, 736)
      RF_STEP3(24, 768, 800, 832, 864)
      RF_STEP3(28, 896, 928, 960, 992)
      RF_STEP3(32, 1024, 1056, 1088, 1120)
      RF_STEP3(36, 1152, 1184, 1216, 1248)
      RF_STEP3(40, 1280, 1312, 1344, 1376)
      RF_STEP3(44, 1408, 1440, 1472, 1504)
      RF_STEP3(48, 1536, 1568, 1600, 1632)
      RF_STEP3(52, 1664, 1696, 1728, 1760)
      RF_STEP3(56, 1792, 1824, 1856, 1888)
      RF_STEP3(60, 1920, 1952, 1984, 2016)
      "add $64, %[a0]\n add $64, %[a1]\n add $64, %[a2]\n"
      "add $64, %[pf0]\n add $64, %[pf1]\n add $64, %[pf2]\n"
      "add $2048, %[b]\n"
      "sub $16, %[kd]\n"
      "cmp $16, %[kd]\n"
      "jge 1b\n"
      "2:\n"
      "test %[kd], %[kd]\n"
      "jz 4f\n"
      "3:\n"  // the steps left, one at a time
      RF_STEP3(0, 0, 32, 64, 96)
      "add $4, %[a0]\n add $4, %[a1]\n add $4, %[a2]\n"
      "add $128, %[b]\n"
      "dec %[kd]\n"
      "jnz 3b\n"
      "4:\n"
      "test %[ep], %[ep]\n"
      "jz 9f\n"
      // The epilogue, into the registers the loop is done with: a0-a2 the output rows, b the bias,
      // pf0-pf2 the residual rows, kd the row strides.
      "mov (%[ep]), %[a0]\n mov 8(%[ep]), %[kd]\n lea (%[a0], %[kd]), %[a1]\n lea (%[a1], %[kd]), %[a2]\n"
      "mov 32(%[ep]), %[b]\n"
      RF_ADD_ROW("b", "0", "1", "2", "3") RF_ADD_ROW("b", "4", "5", "6", "7") RF_ADD_ROW("b", "8", "9", "10", "11")
      "cmpb $0, 40(%[ep])\n"
      "jz 5f\n"
      RF_ADD_ROW("a0", "0", "1", "2", "3") RF_ADD_ROW("a1", "4", "5", "6", "7") RF_ADD_ROW("a2", "8", "9", "10", "11")
      "5:\n"
      "mov 16(%[ep]), %[pf0]\n"
      "test %[pf0], %[pf0]\n"
      "jz 6f\n"
      "mov 24(%[ep]), %[kd]\n lea (%[pf0], %[kd]), %[pf1]\n lea (%[pf1], %[kd]), %[pf2]\n"
      RF_ADD_ROW("pf0", "0", "1", "2", "3") RF_ADD_ROW("pf1", "4", "5", "6", "7") RF_ADD_ROW("pf2", "8", "9", "10", "11")
      "6:\n"
      "cmpb $0, 41(%[ep])\n"
      "jz 7f\n"
      // max(0, v): v where v is NaN (the second source), as torch.relu
      "vxorps %%ymm15, %%ymm15, %%ymm15\n"
      "vmaxps %%ymm0, %%ymm15, %%ymm0\n vmaxps %%ymm1, %%ymm15, %%ymm1\n vmaxps %%ymm2, %%ymm15, %%ymm2\n"
      "vmaxps %%ymm3, %%ymm15, %%ymm3\n vmaxps %%ymm4, %%ymm15, %%ymm4\n vmaxps %%ymm5, %%ymm15, %%ymm5\n"
      "vmaxps %%ymm6, %%ymm15, %%ymm6\n vmaxps %%ymm7, %%ymm15, %%ymm7\n vmaxps %%ymm8, %%ymm15, %%ymm8\n"
      "vmaxps %%ymm9, %%ymm15, %%ymm9\n vmaxps %%ymm10, %%ymm15, %%ymm10\n vmaxps %%ymm11, %%ymm15, %%ymm11\n"
      "7:\n"
      RF_STORE_ROW("a0", "0", "1", "2", "3") RF_STORE_ROW("a1", "4", "5", "6", "7") RF_STORE_ROW("a2", "8", "9", "10", "11")
      "jmp 10f\n"
      "9:\n"  // no epilogue: the sums to out
      "vmovups %%ymm0, (%[out])\n vmovups %%ymm1, 32(%[out])\n vmovups %%ymm2, 64(%[out])\n"
      "vmovups %%ymm3, 96(%[out])\n vmovups %%ymm4, 128(%[out])\n vmovups %%ymm5, 160(%[out])\n"
      "vmovups %%ymm6, 192(%[out])\n vmovups %%ymm7, 224(%[out])\n vmovups %%ymm8, 256(%[out])\n"
      "vmovups %%ymm9, 288(%[out])\n vmovups %%ymm10, 320(%[out])\n vmovups %%ymm11, 352(%[out])\n"
      "10:\n"
      : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [b] "+r"(b), [kd] "+r"(kd), [pf0] "+r"(pf), [pf1] "+r"(pf1),
        [pf2] "+r"(pf2), [pfb] "+r"(pfb)
      : [out] "r"(out), [pfb_step] "r"(pfb_step), [ep] "r"(ep)
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "memory", "cc");
}
#undef RF_STEP3
#undef RF_ADD_ROW
#undef RF_STORE_ROW
#undef RF_FMA3
#undef RF_PLUS4
#undef RF_PLUS4_0
#undef RF_PLUS4_1
#undef RF_PLUS4_2
#undef RF_PLUS4_3
#undef RF_PLUS8
#undef RF_PLUS8_0
#undef RF_PLUS8_1
#undef RF_PLUS8_2
#undef RF_PLUS8_3

// AVX2 + FMA, 3 rows x the whole 32-column panel (four ymm per row): 12 accumulators. Three rows run
// main3_avx2; the one or two rows left at the end of a block run the loop below, the panel row's
// vectors read with the FMAs. (The step is written out in both loops: put in an inline helper as
// tile_avx512's is, GCC 12 compiled this kernel into slower code.)
template <int MR>
__attribute__((target("avx2,fma"))) void full_avx2(const Tile& t) {
  __m256 c[MR][4];
  if constexpr (MR == 3) {
    TORCH_INTERNAL_ASSERT_DEBUG_ONLY(t.ldb == kPanel, "the 3-row AVX2 loop takes packed panels (run_avx2's packed branch)");
    if (t.cols == kPanel) {  // a whole panel: the epilogue in the same assembly
      const Epilogue3 e{t.c, t.ldc * 4, t.residual, t.ldr * 4, t.bias ? t.bias : kZeros32, t.accumulate, t.relu};
      main3_avx2(t.a, t.lda, t.b, t.kd, t.prefetch, t.prefetch_b, nullptr, &e);
      return;
    }
    alignas(32) float sums[3 * 4 * 8];
    main3_avx2(t.a, t.lda, t.b, t.kd, t.prefetch, t.prefetch_b, sums, nullptr);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) c[i][j] = _mm256_load_ps(sums + (i * 4 + j) * 8);
  } else {
#pragma GCC unroll 3
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) c[i][j] = _mm256_setzero_ps();
    const float* a = t.a;
    const int64_t lda = t.lda;
    const float* b = t.b;
    const float* pf = t.prefetch;
    const int64_t kd = t.kd;
    int64_t k = 0;
    if (pf && kd % 16 == 0) {
      for (int64_t k0 = 0; k0 < kd; k0 += 16) {
#pragma GCC unroll 3
        for (int i = 0; i < MR; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * lda + k0), _MM_HINT_T0);
#pragma GCC unroll 16
        for (int64_t kk = 0; kk < 16; ++kk, b += t.ldb, ++a) {
#pragma GCC unroll 3
          for (int i = 0; i < MR; ++i) {
            const __m256 av = _mm256_broadcast_ss(a + i * lda);
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) c[i][j] = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + 8 * j), c[i][j]);
          }
        }
      }
      k = kd;
    }
    for (; k < kd; ++k, b += t.ldb, ++a) {
#pragma GCC unroll 3
      for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(a + i * lda);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) c[i][j] = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + 8 * j), c[i][j]);
      }
    }
  }
  const int64_t cols = t.cols;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i m[4];
  bool full[4];
  for (int j = 0; j < 4; ++j) {
    m[j] = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(cols - 8 * j)), lane);
    full[j] = cols >= 8 * (j + 1);
  }
  const __m256 zero = _mm256_setzero_ps();
  __m256 bias[4];
  for (int j = 0; j < 4; ++j) bias[j] = t.bias && cols > 8 * j ? load8(t.bias + 8 * j, m[j], full[j]) : zero;
#pragma GCC unroll 3
  for (int i = 0; i < MR; ++i) {
    float* cp = t.c + i * t.ldc;
    const float* r = t.residual ? t.residual + i * t.ldr : nullptr;
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if (cols <= 8 * j) break;
      __m256 v = _mm256_add_ps(c[i][j], bias[j]);
      if (t.accumulate) v = _mm256_add_ps(v, load8(cp + 8 * j, m[j], full[j]));
      if (r) v = _mm256_add_ps(v, load8(r + 8 * j, m[j], full[j]));
      if (t.relu) v = _mm256_max_ps(zero, v);
      if (full[j]) {
        _mm256_storeu_ps(cp + 8 * j, v);
      } else {
        _mm256_maskstore_ps(cp + 8 * j, m[j], v);
      }
    }
  }
}

__attribute__((target("avx2,fma"))) void run_avx2_full(const Tile& t) {
  switch (t.rows) {
    case 1: return full_avx2<1>(t);
    case 2: return full_avx2<2>(t);
    default: return full_avx2<3>(t);
  }
}

constexpr int kAvx2Rows = 6;

template <int MR>
__attribute__((target("avx2,fma"))) void tile_avx2(const Tile& t) {
  half_avx2<MR>(t, 0);
  if (t.cols > 16) half_avx2<MR>(t, 16);
}

__attribute__((target("avx2,fma"))) void run_avx2(const Tile& t) {
  if (t.ldb == kPanel) {
    // A packed panel: the whole panel per call, three rows at a time (each row of A read once,
    // the epilogue on whole cache lines). Panels read in place (Winograd's U, row stride K) keep
    // the two 6x16 halves: there three rows a call read the strided panel twice as often.
    Tile u = t;
    for (int64_t i = 0; i < t.rows; i += 3) {
      u.rows = std::min<int64_t>(3, t.rows - i);
      u.a = t.a + i * t.lda;
      u.c = t.c + i * t.ldc;
      u.residual = t.residual ? t.residual + i * t.ldr : nullptr;
      u.prefetch = t.prefetch ? t.prefetch + i * t.lda : nullptr;
      // each 3-row call its own 4 * kd floats of the weight to prefetch
      const int64_t skip = i / 3 * 4 * t.kd;
      u.prefetch_b = t.prefetch_b && skip < t.prefetch_b_floats ? t.prefetch_b + skip : nullptr;
      run_avx2_full(u);
    }
    return;
  }
  switch (t.rows) {
    case 1: return tile_avx2<1>(t);
    case 2: return tile_avx2<2>(t);
    case 3: return tile_avx2<3>(t);
    case 4: return tile_avx2<4>(t);
    case 5: return tile_avx2<5>(t);
    default: return tile_avx2<6>(t);
  }
}

#endif

struct Kernel {
  void (*run)(const Tile&);
  int64_t rows;
  const char* isa;
};

// The widest kernel this CPU runs; RESNET_FUSED_CPU_ISA=avx2|generic asks for a narrower one
// (tests run every kernel the machine can).
Kernel pick() {
  const char* env = std::getenv("RESNET_FUSED_CPU_ISA");
  const std::string want = env ? env : "";
  TORCH_CHECK_VALUE(want.empty() || want == "avx512" || want == "avx2" || want == "generic",
                    "resnet_fused: RESNET_FUSED_CPU_ISA must be avx512, avx2 or generic, got '", want, "'");
#if RF_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  TORCH_CHECK_VALUE(!(want == "avx512" && !avx512) && !(want == "avx2" && !avx2),
                    "resnet_fused: RESNET_FUSED_CPU_ISA=", want, " but this CPU does not have it");
  if (avx512 && (want.empty() || want == "avx512")) return {run_avx512, kAvx512Rows, "avx512"};
  if (avx2 && want != "generic") return {run_avx2, kAvx2Rows, "avx2"};
#else
  TORCH_CHECK_VALUE(want.empty() || want == "generic", "resnet_fused: RESNET_FUSED_CPU_ISA=", want,
                    " but this CPU is not x86-64");
#endif
  return {run_generic, kGenericRows, "generic"};
}

const Kernel& kernel() {
  static const Kernel k = pick();
  return k;
}

}  // namespace

int64_t tile_rows() { return kernel().rows; }

float* scratch_floats(int64_t n) {
  struct Buffer {
    float* data = nullptr;
    int64_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buf;
  if (n > buf.size) {
    std::free(buf.data);
    const int64_t bytes = (n * int64_t(sizeof(float)) + 63) / 64 * 64;
    buf.data = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(buf.data != nullptr, "resnet_fused: out of memory for ", bytes, " bytes of scratch");
    buf.size = n;
  }
  return buf.data;
}

void run_tile(const Tile& t) { kernel().run(t); }

namespace {
// Asks for the lines of `rows` rows of `cols` floats at row stride ld (a tile's output or residual).
void prefetch_rows(const float* p, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    __builtin_prefetch(p + r * ld);
    __builtin_prefetch(p + r * ld + cols - 1);
  }
}
}  // namespace

void run_panel(Tile t, int64_t rows, int64_t max_rows, const float* next_panel) {
  const bool prefetch = t.prefetch != nullptr;
  const Kernel& k = kernel();
  const int64_t mr = max_rows > 0 ? std::min(max_rows, k.rows) : k.rows;
  const int64_t kd = t.kd, chunks = (kd + 255) / 256, chunk = (kd + chunks - 1) / chunks;
  const float *a = t.a, *b = t.b, *bias = t.bias, *residual = t.residual;
  float* c = t.c;
  const bool accumulate = t.accumulate, relu = t.relu;
  for (int64_t k0 = 0; k0 < kd; k0 += chunk) {
    const bool first = k0 == 0, last = k0 + chunk >= kd;
    t.kd = std::min(chunk, kd - k0);
    t.b = b + k0 * t.ldb;
    t.bias = first ? bias : nullptr;
    t.accumulate = accumulate || !first;
    t.relu = relu && last;
    // The weight the tiles of this chunk prefetch: the next chunk, in 3-row calls' shares of
    // 4 * t.kd floats (tile i's calls start at share i * ceil(mr / 3)).
    const float* next_b = t.ldb != kPanel ? nullptr : last ? next_panel : b + (k0 + chunk) * kPanel;
    const int64_t next_floats = (last ? std::min(chunk, kd) : std::min(chunk, kd - k0 - chunk)) * kPanel;
    const int64_t share = 4 * t.kd * ((mr + 2) / 3);
    for (int64_t i = 0; i < rows; i += mr) {
      t.rows = std::min(mr, rows - i);
      t.a = a + i * t.lda + k0;
      t.prefetch = prefetch && i + mr < rows ? t.a + mr * t.lda : nullptr;
      t.c = c + i * t.ldc;
      t.residual = first && residual ? residual + i * t.ldr : nullptr;
      const int64_t skip = i / mr * share;
      t.prefetch_b = next_b && skip < next_floats ? next_b + skip : nullptr;
      t.prefetch_b_floats = next_floats - skip;
      // Where the epilogue reads memory (a residual, or the output it accumulates into: the
      // convolutions' in-place residual), the next tile's rows of it are asked for while this
      // tile runs, rather than waited for in its epilogue. (Elsewhere the output is written only,
      // or already in cache (Winograd's products): there the prefetches measured no gain.)
      if (first && i + mr < rows && (residual || accumulate)) {
        const int64_t next = std::min(mr, rows - i - mr);
        prefetch_rows(c + (i + mr) * t.ldc, t.ldc, next, t.cols);
        if (residual) prefetch_rows(residual + (i + mr) * t.ldr, t.ldr, next, t.cols);
      }
      k.run(t);
    }
  }
}

const char* tile_isa() { return kernel().isa; }

}  // namespace resnet_fused::cpu
