// Grouped convolutions on CPU (ResNeXt's 3x3s: 32 groups of 4, 8, 16 or 32 channels), float32,
// channels-last, with bias, residual and ReLU applied in registers before the one store. AVX-512,
// and AVX2 + FMA (each 16-channel block as two 256-bit halves, 4 pixels a tile).
//
// The weight is packed once (grouped_prepack) as [K/16, kh*kw, cin_g, 16]: for a block of 16
// output channels, a filter tap and an input channel j of their group, the 16 weights. Each
// 512-bit accumulator holds 16 output channels of one output pixel, a tile being up to kRows
// pixels of one output row:
// - groups of 16 channels or more: the block lies in one group, and each step broadcasts one of
//   that group's input channels per pixel against one weight vector (a direct convolution, as
//   oneDNN's and MLAS's are);
// - groups of 4 or 8 (as many input as output channels): the block's 16 output channels are 4
//   or 2 whole groups, whose input channels are the same 16 channels of the input pixel. One
//   16-channel load per pixel and tap, then per input channel j a shuffle that puts each group's
//   channel j in all of its lanes (4-channel groups are the 128-bit lanes: vpermilps; 8: vpermps),
//   against the j-th weight vector. No multiply is spent on another group's channels.
// Pixels whose tap falls outside the image read a row of zeros instead (no branch in the loops).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "../checks.h"

#if defined(__x86_64__) && defined(__GNUC__)
// (GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() as the unused source of their unmasked
// forms, which -Wmaybe-uninitialized reports at every call)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define RF_GROUPED_X86 1
#else
#define RF_GROUPED_X86 0
#endif

namespace resnet_fused::cpu {
namespace {

using at::Tensor;

constexpr int kRows = 8;  // output pixels per tile (accumulators), along the output row (AVX-512)
// AVX2: two 256-bit accumulators a pixel; 6 pixels (12 of the 16 registers) where a step needs two
// more for weights, 4 where groups of 4 keep four weight vectors.
constexpr int kRowsAvx2 = 6;
constexpr int rows_avx2(int mode) { return mode == 4 ? 4 : kRowsAvx2; }

struct Geometry {
  int64_t N, C, H, W, K, kh, kw, sh, sw, ph, pw, OH, OW, groups, cin_g, kout_g;
};

// Which inner loop a layer takes: 4 / 8 (shuffles; groups of 4 or 8 channels, as many in as out),
// 16 (broadcasts; output groups a multiple of 16 channels), 0 (none: not for this kernel).
int mode_of(int64_t cin_g, int64_t kout_g) {
  if (cin_g == kout_g && (cin_g == 4 || cin_g == 8)) return int(cin_g);
  if (kout_g % 16 == 0) return 16;
  return 0;
}

// The kernel this CPU runs: "avx512", "avx2" or "" (none). RESNET_FUSED_CPU_ISA=avx2|generic
// narrows it as it narrows the matrix-product kernels (gemm_kernels.cpp, which checks the value).
std::string grouped_isa() {
  static const std::string isa = []() -> std::string {
#if RF_GROUPED_X86
    const char* env = std::getenv("RESNET_FUSED_CPU_ISA");
    const std::string want = env ? env : "";
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") != 0;
    const bool avx2 = __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0;
    if (want == "generic") return "";
    if (avx512 && want != "avx2") return "avx512";
    if (avx2) return "avx2";
#endif
    return "";
  }();
  return isa;
}

#if RF_GROUPED_X86
// One tile: `rows` pixels of output row (n, oh) from column ow0, output channels [16 ob, 16 ob + 16).
// taps[t * kRows + p]: where pixel p's input pixel for tap t starts (channel 0), or the zero row.
template <int kMode>
__attribute__((target("avx512f"))) void tile(const Geometry& g, const float* const* taps, int64_t ntaps,
                                             const float* wp, const float* bias, const float* residual, float* out,
                                             int64_t ob, int rows, bool relu) {
  __m512 acc[kRows];
  const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * ob) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int p = 0; p < kRows; ++p) acc[p] = b;
  const int64_t J = g.cin_g;
  const float* w = wp + ob * ntaps * J * 16;
  if constexpr (kMode == 16) {
    const int64_t cb = (16 * ob / g.kout_g) * g.cin_g;  // the block's group's first input channel
    for (int64_t t = 0; t < ntaps; ++t) {
      const float* const* x = taps + t * kRows;
      const float* wt = w + t * J * 16;
      for (int64_t j = 0; j < J; ++j) {
        const __m512 wv = _mm512_loadu_ps(wt + 16 * j);
#pragma GCC unroll 8
        for (int p = 0; p < kRows; ++p) acc[p] = _mm512_fmadd_ps(_mm512_set1_ps(x[p][cb + j]), wv, acc[p]);
      }
    }
  } else {
    const int64_t cb = 16 * ob;  // (groups of 4 or 8: the block's input channels are its output channels)
    // 8-channel groups: lane l takes channel j of its group, (l & 8) + j
    __m512i idx[8];
    const __m512i half = _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(8));
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) idx[j] = _mm512_add_epi32(half, _mm512_set1_epi32(j));
    for (int64_t t = 0; t < ntaps; ++t) {
      const float* const* x = taps + t * kRows;
      const float* wt = w + t * kMode * 16;
      __m512 wv[kMode];
#pragma GCC unroll 8
      for (int j = 0; j < kMode; ++j) wv[j] = _mm512_loadu_ps(wt + 16 * j);
#pragma GCC unroll 8
      for (int p = 0; p < kRows; ++p) {
        const __m512 xv = _mm512_loadu_ps(x[p] + cb);
        if constexpr (kMode == 4) {
          acc[p] = _mm512_fmadd_ps(_mm512_permute_ps(xv, 0x00), wv[0], acc[p]);
          acc[p] = _mm512_fmadd_ps(_mm512_permute_ps(xv, 0x55), wv[1], acc[p]);
          acc[p] = _mm512_fmadd_ps(_mm512_permute_ps(xv, 0xAA), wv[2], acc[p]);
          acc[p] = _mm512_fmadd_ps(_mm512_permute_ps(xv, 0xFF), wv[kMode - 1], acc[p]);
        } else {
#pragma GCC unroll 8
          for (int j = 0; j < kMode; ++j) acc[p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx[j], xv), wv[j], acc[p]);
        }
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  // (unrolled over every accumulator, so that each stays a register in the loops above)
#pragma GCC unroll 8
  for (int p = 0; p < kRows; ++p) {
    if (p >= rows) break;
    float* o = out + p * g.K + 16 * ob;
    __m512 v = acc[p];
    if (residual) v = _mm512_add_ps(v, _mm512_loadu_ps(residual + p * g.K + 16 * ob));
    if (relu) v = _mm512_max_ps(zero, v);  // (NaN stays NaN: max returns its second operand)
    _mm512_storeu_ps(o, v);
  }
}

// Groups of 4 on AVX2: one 256-bit half (two groups) of a block, for a tap: acc[p] += the
// half's 8 input channels at x[p] + off, channel j of each group spread over its lanes, times wt's
// four weight vectors (16 floats apart).
template <int kPx>
__attribute__((target("avx2,fma"), always_inline)) inline void groups_of_4_avx2(__m256 (&acc)[kPx],
                                                                              const float* const* x, int64_t off,
                                                                              const float* wt) {
  __m256 wv[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) wv[j] = _mm256_loadu_ps(wt + 16 * j);
#pragma GCC unroll 6
  for (int p = 0; p < kPx; ++p) {
    const __m256 xv = _mm256_loadu_ps(x[p] + off);
    acc[p] = _mm256_fmadd_ps(_mm256_permute_ps(xv, 0x00), wv[0], acc[p]);
    acc[p] = _mm256_fmadd_ps(_mm256_permute_ps(xv, 0x55), wv[1], acc[p]);
    acc[p] = _mm256_fmadd_ps(_mm256_permute_ps(xv, 0xAA), wv[2], acc[p]);
    acc[p] = _mm256_fmadd_ps(_mm256_permute_ps(xv, 0xFF), wv[3], acc[p]);
  }
}

// The same on AVX2 + FMA: the block's 16 channels as two 256-bit halves (lo, hi), rows_avx2 pixels.
// Groups of 8 are the halves themselves (a broadcast per half); groups of 4 are their 128-bit lanes.
template <int kMode>
__attribute__((target("avx2,fma"))) void tile_avx2(const Geometry& g, const float* const* taps, int64_t ntaps,
                                                   const float* wp, const float* bias, const float* residual,
                                                   float* out, int64_t ob, int rows, bool relu) {
  constexpr int kPx = rows_avx2(kMode);
  __m256 lo[kPx], hi[kPx];
  const __m256 bl = bias ? _mm256_loadu_ps(bias + 16 * ob) : _mm256_setzero_ps();
  const __m256 bh = bias ? _mm256_loadu_ps(bias + 16 * ob + 8) : _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int p = 0; p < kPx; ++p) lo[p] = bl, hi[p] = bh;
  const int64_t J = g.cin_g;
  const float* w = wp + ob * ntaps * J * 16;
  if constexpr (kMode == 16) {
    const int64_t cb = (16 * ob / g.kout_g) * g.cin_g;
    for (int64_t t = 0; t < ntaps; ++t) {
      const float* const* x = taps + t * kRows;
      const float* wt = w + t * J * 16;
      for (int64_t j = 0; j < J; ++j) {
        const __m256 wl = _mm256_loadu_ps(wt + 16 * j), wh = _mm256_loadu_ps(wt + 16 * j + 8);
#pragma GCC unroll 6
        for (int p = 0; p < kPx; ++p) {
          const __m256 xb = _mm256_broadcast_ss(x[p] + cb + j);
          lo[p] = _mm256_fmadd_ps(xb, wl, lo[p]);
          hi[p] = _mm256_fmadd_ps(xb, wh, hi[p]);
        }
      }
    }
  } else if constexpr (kMode == 8) {
    const int64_t cb = 16 * ob;
    for (int64_t t = 0; t < ntaps; ++t) {
      const float* const* x = taps + t * kRows;
      const float* wt = w + t * 8 * 16;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m256 wl = _mm256_loadu_ps(wt + 16 * j), wh = _mm256_loadu_ps(wt + 16 * j + 8);
#pragma GCC unroll 6
        for (int p = 0; p < kPx; ++p) {
          lo[p] = _mm256_fmadd_ps(_mm256_broadcast_ss(x[p] + cb + j), wl, lo[p]);
          hi[p] = _mm256_fmadd_ps(_mm256_broadcast_ss(x[p] + cb + 8 + j), wh, hi[p]);
        }
      }
    }
  } else {
    const int64_t cb = 16 * ob;
    for (int64_t t = 0; t < ntaps; ++t) {
      const float* const* x = taps + t * kRows;
      const float* wt = w + t * 4 * 16;
      // (each half in turn, so that four weight vectors are live, not eight)
      groups_of_4_avx2<kPx>(lo, x, cb, wt);
      groups_of_4_avx2<kPx>(hi, x, cb + 8, wt + 8);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int p = 0; p < kPx; ++p) {
    if (p >= rows) break;
    float* o = out + p * g.K + 16 * ob;
    __m256 vl = lo[p], vh = hi[p];
    if (residual) {
      vl = _mm256_add_ps(vl, _mm256_loadu_ps(residual + p * g.K + 16 * ob));
      vh = _mm256_add_ps(vh, _mm256_loadu_ps(residual + p * g.K + 16 * ob + 8));
    }
    if (relu) vl = _mm256_max_ps(zero, vl), vh = _mm256_max_ps(zero, vh);  // (NaN kept)
    _mm256_storeu_ps(o, vl);
    _mm256_storeu_ps(o + 8, vh);
  }
}
#endif

void run(const Geometry& g, const float* x, const float* wp, const float* bias, const float* residual, float* out,
         bool relu) {
#if RF_GROUPED_X86
  const int mode = mode_of(g.cin_g, g.kout_g);
  const bool avx512 = grouped_isa() == "avx512";
  const int64_t tile_px = avx512 ? kRows : rows_avx2(mode);
  const int64_t ntaps = g.kh * g.kw;
  const int64_t col_tiles = (g.OW + tile_px - 1) / tile_px;
  const int64_t tiles = g.N * g.OH * col_tiles, blocks = g.K / 16;
  // Items: a tile and a run of output-channel blocks, at least 4 items a thread where the layer
  // allows (late layers at batch 1 have a few tiles and many blocks).
  const int64_t threads = at::get_num_threads();
  int64_t per_item = blocks;
  while (per_item > 1 && tiles * ((blocks + per_item - 1) / per_item) < 4 * threads) per_item = (per_item + 1) / 2;
  const int64_t runs = (blocks + per_item - 1) / per_item;
  const std::vector<float> zeros(size_t(g.C) + 16, 0.f);
  at::parallel_for(0, tiles * runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> taps(size_t(ntaps * kRows));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile_id = item / runs, run_id = item % runs;
      const int64_t ct = tile_id % col_tiles, oh = (tile_id / col_tiles) % g.OH, n = tile_id / (col_tiles * g.OH);
      const int64_t ow0 = ct * tile_px;
      const int rows = int(std::min<int64_t>(tile_px, g.OW - ow0));
      for (int64_t r = 0; r < g.kh; ++r) {
        const int64_t ih = oh * g.sh - g.ph + r;
        for (int64_t s = 0; s < g.kw; ++s) {
          for (int p = 0; p < kRows; ++p) {
            const int64_t iw = (ow0 + p) * g.sw - g.pw + s;
            const bool in = p < rows && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
            taps[size_t((r * g.kw + s) * kRows + p)] = in ? x + ((n * g.H + ih) * g.W + iw) * g.C : zeros.data();
          }
        }
      }
      const int64_t pix = (n * g.OH + oh) * g.OW + ow0;
      float* o = out + pix * g.K;
      const float* res = residual ? residual + pix * g.K : nullptr;
      const int64_t b1 = std::min(blocks, (run_id + 1) * per_item);
      for (int64_t ob = run_id * per_item; ob < b1; ++ob) {
        const float* const* tp = taps.data();
        if (avx512) {
          if (mode == 4) {
            tile<4>(g, tp, ntaps, wp, bias, res, o, ob, rows, relu);
          } else if (mode == 8) {
            tile<8>(g, tp, ntaps, wp, bias, res, o, ob, rows, relu);
          } else {
            tile<16>(g, tp, ntaps, wp, bias, res, o, ob, rows, relu);
          }
        } else if (mode == 4) {
          tile_avx2<4>(g, tp, ntaps, wp, bias, res, o, ob, rows, relu);
        } else if (mode == 8) {
          tile_avx2<8>(g, tp, ntaps, wp, bias, res, o, ob, rows, relu);
        } else {
          tile_avx2<16>(g, tp, ntaps, wp, bias, res, o, ob, rows, relu);
        }
      }
    }
  });
#else
  (void)g, (void)x, (void)wp, (void)bias, (void)residual, (void)out, (void)relu;
  TORCH_CHECK(false, "resnet_fused: grouped_conv2d_bias_act needs an x86-64 CPU with AVX2 or AVX-512");
#endif
}

// Why this kernel cannot run a grouped layer with these channel counts, or nullptr.
const char* unsupported(int64_t C, int64_t K, int64_t groups) {
  if (groups < 1 || C % groups != 0 || K % groups != 0) return "channels not divisible by the groups";
  if (K % 16 != 0) return "output channels a multiple of 16 only (blocks of 16)";
  if (mode_of(C / groups, K / groups) == 0)
    return "groups of 4 or 8 channels (as many in as out) or of a multiple of 16 output channels only";
  if (grouped_isa().empty()) return "a CPU with AVX2 and FMA, or AVX-512";
  return nullptr;
}

// [K, cin_g, kh, kw] (any layout) -> [K/16, kh*kw, cin_g, 16].
Tensor grouped_prepack(const Tensor& weight, int64_t groups) {
  RF_CHECK_DIM(weight, 4, "weight");
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, "resnet_fused: grouped_prepack is float32 only, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device().is_cpu() && !weight.is_mkldnn(),
                    "resnet_fused: grouped_prepack takes a dense CPU weight");
  const int64_t K = weight.size(0), cin_g = weight.size(1);
  const char* why = unsupported(cin_g * groups, K, groups);
  TORCH_CHECK_VALUE(why == nullptr, "resnet_fused: grouped_prepack cannot pack this weight (", K, " output channels, ",
                    cin_g, " input channels a group, ", groups, " groups): ", why);
  // [K, cin_g, kh, kw] -> [K/16, 16, cin_g, kh*kw] -> [K/16, kh*kw, cin_g, 16]
  return weight.contiguous()
      .view({K / 16, 16, cin_g, weight.size(2) * weight.size(3)})
      .permute({0, 3, 2, 1})
      .contiguous()
      .view({K / 16, weight.size(2), weight.size(3), cin_g, 16});
}

Tensor run_checked(const Tensor& input, const Tensor& packed, const std::optional<Tensor>& bias,
                   const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                   int64_t groups, bool relu, Tensor* into) {
  TORCH_CHECK_VALUE(packed.dim() == 5 && packed.size(4) == 16 && packed.scalar_type() == at::kFloat &&
                        packed.is_contiguous() && packed.device().is_cpu(),
                    "resnet_fused: grouped_conv2d_bias_act takes the weight from grouped_prepack "
                    "([K/16, kh, kw, C/groups, 16] float32), got ",
                    shape_str(packed.sizes()));
  TORCH_CHECK_VALUE(groups >= 1, "resnet_fused: groups must be positive, got ", groups);
  const int64_t K = packed.size(0) * 16, cin_g = packed.size(3);
  // The weight's [K, C/groups, kh, kw] shape for the shared checks, nothing allocated.
  const Tensor logical = packed.as_strided({K, cin_g, packed.size(1), packed.size(2)}, {0, 0, 0, 0});
  const std::vector<int64_t> dilation{1, 1};
  const auto out_shape = check_conv2d_bias_act(input, logical, bias, residual, stride, padding, dilation, groups);
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, "resnet_fused: grouped_conv2d_bias_act is float32 only, got a ",
                   input.scalar_type(), " input");
  TORCH_CHECK_VALUE(input.device().is_cpu(), "resnet_fused: grouped_conv2d_bias_act takes CPU tensors, got input on ",
                    input.device());
  const char* why = unsupported(input.size(1), K, groups);
  TORCH_CHECK_VALUE(why == nullptr, "resnet_fused: grouped_conv2d_bias_act cannot run this layer: ", why);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  const Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
  Tensor out;
  Tensor r;
  if (into != nullptr) {
    out = *into;  // in place: the residual is read and written tile by tile
  } else {
    out = at::empty(out_shape, input.options().memory_format(cl));
    if (residual.has_value()) r = residual->contiguous(cl);
  }
  if (out.numel() == 0) return out;
  Geometry g{x.size(0),     x.size(1),      x.size(2),  x.size(3),  K,  packed.size(1), packed.size(2), stride[0],
             stride[1],     padding[0],     padding[1], out.size(2), out.size(3), groups, cin_g, K / groups};
  run(g, x.data_ptr<float>(), packed.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
      into != nullptr ? out.data_ptr<float>() : (r.defined() ? r.data_ptr<float>() : nullptr), out.data_ptr<float>(),
      relu);
  return out;
}

// act(conv2d(input, weight, stride, padding, groups) + bias [+ residual]), channels-last out.
Tensor grouped_conv2d_bias_act(const Tensor& input, const Tensor& packed, const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                               int64_t groups, bool relu) {
  return run_checked(input, packed, bias, residual, stride, padding, groups, relu, nullptr);
}

// The same into the residual.
void grouped_conv2d_bias_act_(Tensor& residual, const Tensor& input, const Tensor& packed,
                              const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                              int64_t groups, bool relu) {
  if (!residual.is_contiguous(at::MemoryFormat::ChannelsLast) || residual.data_ptr() == input.data_ptr()) {
    residual.copy_(run_checked(input, packed, bias, residual, stride, padding, groups, relu, nullptr));
    return;
  }
  run_checked(input, packed, bias, residual, stride, padding, groups, relu, &residual);
}

// Why grouped_conv2d_bias_act cannot run a layer of these channels and groups here ("" if it can).
std::string grouped_conv_unsupported(int64_t in_channels, int64_t out_channels, int64_t groups) {
  const char* why = unsupported(in_channels, out_channels, groups);
  return why ? why : "";
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CompositeExplicitAutograd, m) {
  m.impl("grouped_conv_unsupported", &grouped_conv_unsupported);
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("grouped_conv2d_bias_act", &grouped_conv2d_bias_act);
  m.impl("grouped_conv2d_bias_act_", &grouped_conv2d_bias_act_);
  m.impl("grouped_prepack", &grouped_prepack);
}

}  // namespace resnet_fused::cpu
