// Winograd F(2x2, 3x3) and F(4x4, 3x3) convolution on CPU, float32, channels-last, with the
// whole epilogue (bias, residual add, ReLU) in its output transform.
//
// A 3x3 stride-1 convolution computes each m x m output tile from an (m+2) x (m+2) input patch
// with (m+2)^2 multiplies per (input, output) channel pair instead of 9 m^2 (Lavin & Gray, "Fast
// Algorithms for Convolutional Neural Networks", 2015): V = B^T d B per input tile, U = G g G^T
// per filter (once, at prepack), M[xi] = V[xi] U[xi] for the (m+2)^2 positions xi (the matrix
// products, where the time goes), and the output tile A^T M A. F(2x2, 3x3) (16 positions, 2.25x
// fewer multiplies) has transforms exact in binary (0, +-1, +-1/2): its error against float64
// stays within float32 direct convolution's (tests/test_winograd.py). F(4x4, 3x3) (36 positions,
// 4x fewer) uses the points 0, +-1, +-2 and loses about half a decimal digit more: it runs only
// where tactics measured it within the accuracy rule on the layer's own weights and input.
// At stride 2 (ResNet's downsampling 3x3s), the polyphase form: a 2x2 output tile reads a 5x5
// patch; the even taps over the even inputs are F(2, 2) and the odd tap over the odd inputs is
// direct, 5 multiplies per row of 2 outputs instead of 6, so 25 positions instead of 36 (1.44x
// fewer), every transform coefficient +-1 (winograd_transforms.inc: Transform<2, 2>). The transformed
// weight's shape says which algorithm it is for, and its layout (winograd_weight).
//
// Blocking: the tiles are cut into chunks small enough that a chunk's transformed input and
// its products stay in the core's L2 cache; each thread takes whole chunks (input transform,
// products, output transform), so nothing but the input, the transformed weight and the output
// travels through memory. The products run on our register-tile kernels (gemm_kernels.h); the
// transformed weight packed in their panels (winograd_prepack(panels=True), what FusedConv2d
// runs) gives each product the packed-panel kernel (AVX2: 3 x 32 in assembly, its panel chunk
// contiguous in L1 instead of a row of 128 bytes every K floats). The transforms run over channels
// (contiguous in channels-last) a vector at a time, built per ISA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../checks.h"
#include "gemm_kernels.h"

namespace resnet_fused::cpu {
namespace {

using at::Tensor;

// The transforms run on the ISA's vector width of channels at a time in GCC's vector extension
// (GCC's own vectoriser gives up on F(4x4)'s 36-pointer loops), with the same code on single
// floats for the last channels: 16 (AVX-512), 8 (AVX2) or 4 (baseline SSE), one build of
// winograd_transforms.inc per ISA, chosen as the matrix-product kernels are (tile_isa,
// RESNET_FUSED_CPU_ISA). Each ISA gets its native width: built as target clones of one 16-wide
// source, the AVX2 clone split each 64-byte load in four through the stack and ran the ReLU one
// float at a time (GCC lowers a select on a vector wider than the target's to scalar code).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // (the vectors never cross a call: everything below is inlined)
// vload / vstore / vrelu on a Vec the target holds in one register: memcpy and ?: compile to its own
// loads, stores and compare-select there.
#define RF_NATIVE_VEC_OPS                                                                                   \
  __attribute__((always_inline)) inline Vec vload(const float* p) {                                       \
    Vec v;                                                                                                 \
    __builtin_memcpy(&v, p, sizeof(Vec));                                                                  \
    return v;                                                                                              \
  }                                                                                                        \
  __attribute__((always_inline)) inline void vstore(float* p, const Vec& v) {                              \
    __builtin_memcpy(p, &v, sizeof(Vec));                                                                  \
  }                                                                                                        \
  __attribute__((always_inline)) inline Vec vrelu(const Vec& v) { return v < 0.f ? Vec{} : v; }

namespace isa_generic {
typedef float Vec __attribute__((vector_size(16), aligned(4)));
RF_NATIVE_VEC_OPS
#include "winograd_transforms.inc"
}  // namespace isa_generic

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_avx2 {
// (intrinsics: GCC's generic tuning splits an unaligned 32-byte memcpy through the stack; max(0, x)
// returns x where x is NaN)
typedef float Vec __attribute__((vector_size(32), aligned(4)));
__attribute__((always_inline)) inline Vec vload(const float* p) { return Vec(_mm256_loadu_ps(p)); }
__attribute__((always_inline)) inline void vstore(float* p, const Vec& v) { _mm256_storeu_ps(p, __m256(v)); }
__attribute__((always_inline)) inline Vec vrelu(const Vec& v) {
  return Vec(_mm256_max_ps(_mm256_setzero_ps(), __m256(v)));
}
#include "winograd_transforms.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace isa_avx512 {
typedef float Vec __attribute__((vector_size(64), aligned(4)));
RF_NATIVE_VEC_OPS
#include "winograd_transforms.inc"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif
#undef RF_NATIVE_VEC_OPS
#pragma GCC diagnostic pop

// The transforms of F(M x M, 3x3) at stride S this CPU runs.
template <int M, int S>
struct Transforms {
  using In = void (*)(const float* const*, float*, int64_t, int64_t);
  using Out = void (*)(const float*, int64_t, const float*, const float* const*, float* const*, int64_t);
  In in;
  Out out, out_relu;
};

template <int M, int S>
const Transforms<M, S>& transforms() {
  static const Transforms<M, S> t = [] {
    const std::string isa = tile_isa();
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa == "avx512") {
      using namespace isa_avx512;
      return Transforms<M, S>{input_transform<M, S>, output_transform<M, S, false>, output_transform<M, S, true>};
    }
    if (isa == "avx2") {
      using namespace isa_avx2;
      return Transforms<M, S>{input_transform<M, S>, output_transform<M, S, false>, output_transform<M, S, true>};
    }
#endif
    using namespace isa_generic;
    return Transforms<M, S>{input_transform<M, S>, output_transform<M, S, false>, output_transform<M, S, true>};
  }();
  return t;
}

// Tiles per chunk: the chunk's transformed input and products (P * T * (C + K) floats, P the
// positions) in
// about 1 MiB, half a core's L2 here (on ResNet-50's shapes 32-64 tiles for 128-256 channels beat
// smaller and larger chunks; measured before the -fopenmp build, with the kernel on one core,
// and not tuned again since); at least 16 rows per product, at most 256, no more than it takes
// to give every thread a chunk, and then equal chunks, as many as a multiple of the threads.
int64_t chunk_tiles(int64_t P, int64_t C, int64_t K, int64_t tiles) {
  const int64_t t = (int64_t(1) << 20) / (P * (C + K) * int64_t(sizeof(float)));
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = (tiles + threads - 1) / threads;
  const int64_t most = std::clamp<int64_t>(std::min(t, per_thread), 16, 256);
  // (196 tiles in chunks of 56 ran two chunks on one thread and one and a half on the other)
  const int64_t chunks = ((tiles + most - 1) / most + threads - 1) / threads * threads;
  return std::max<int64_t>(16, (tiles + chunks - 1) / chunks);
}

// A transformed weight says which algorithm it is for and how it is laid out: [16, C, K]
// F(2x2, 3x3), [36, C, K] F(4x4, 3x3) (stride 1), [4, 4, C, K] the stride-2 one (its 4 x 4
// distinct positions of 5 x 5); or the same with K in panels of kPanel output channels
// ([16 | 36, ceil(K / 32), C, 32], [4, 4, ceil(K / 32), C, 32], zero-padded), which need
// out_channels = K as gemm_prepack's do.
struct WinogradWeight {
  int64_t tile, stride, slots, C, K;
  bool panels;
};

WinogradWeight winograd_weight(at::IntArrayRef w, int64_t out_channels) {
  const bool s1 = !w.empty() && (w[0] == 16 || w[0] == 36);
  const bool s2 = w.size() >= 2 && w[0] == 4 && w[1] == 4;
  const size_t lead = s1 ? 1 : 2;  // the positions' dimensions
  const bool plain = (s1 || s2) && w.size() == lead + 2;
  const bool panels = (s1 || s2) && w.size() == lead + 3 && w.back() == kPanel;
  TORCH_CHECK_VALUE(plain || panels,
                    "resnet_fused: a Winograd weight has shape [16, C, K], [36, C, K] or [4, 4, C, K] (from "
                    "winograd_prepack), or [16 | 36, ceil(K / 32), C, 32] or [4, 4, ceil(K / 32), C, 32] (from "
                    "winograd_prepack(panels=True)), got ",
                    w);
  WinogradWeight r{s1 && w[0] == 36 ? 4 : 2, s2 ? 2 : 1, s2 ? 16 : w[0], w[w.size() - 2], w.back(), panels};
  if (plain) {
    TORCH_CHECK_VALUE(out_channels < 0 || out_channels == r.K, "resnet_fused: out_channels=", out_channels,
                      " but the Winograd weight ", w, " has ", r.K);
  } else {
    const int64_t np = w[w.size() - 3];
    TORCH_CHECK_VALUE(out_channels > 0 && (out_channels + kPanel - 1) / kPanel == np,
                      "resnet_fused: a Winograd weight in panels ", w, " needs out_channels, from ", (np - 1) * kPanel + 1,
                      " to ", np * kPanel, ", got ", out_channels);
    r.K = out_channels;
  }
  return r;
}

WinogradWeight check_winograd_weight(const Tensor& w, int64_t out_channels) {
  const WinogradWeight r = winograd_weight(w.sizes(), out_channels);
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, "resnet_fused: the Winograd path is float32 only, got a ",
                   w.scalar_type(), " weight");
  return r;
}

// G of F(m x m, 3x3): (m + 2) x 3.
constexpr double kG2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
constexpr double kG4[6][3] = {{0.25, 0, 0},
                              {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                              {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                              {1.0 / 24, 1.0 / 12, 1.0 / 6},
                              {1.0 / 24, -1.0 / 12, 1.0 / 6},
                              {0, 0, 1}};
// (stride 2: the 4 distinct rows of its 5 x 3 G, whose last row repeats the one before)
constexpr double kG2s2[4][3] = {{1, 0, 0}, {1, 0, 1}, {0, 0, 1}, {0, 1, 0}};

// weight [K, C, 3, 3] -> U [A*A, C, K] = G g G^T per (k, c) (A = tile + 2; stride 2: [4, 4, C, K]),
// computed in float64 and rounded once; with panels, K in panels of kPanel (winograd_weight).
Tensor winograd_prepack(const Tensor& weight, int64_t tile, int64_t stride, bool panels) {
  RF_CHECK_DIM(weight, 4, "weight");
  TORCH_CHECK_VALUE(weight.size(2) == 3 && weight.size(3) == 3,
                    "resnet_fused: winograd_prepack takes a 3x3 weight, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(tile == 2 || tile == 4,
                    "resnet_fused: winograd_prepack's tile is 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), got ", tile);
  TORCH_CHECK_VALUE(stride == 1 || (stride == 2 && tile == 2),
                    "resnet_fused: winograd_prepack's stride is 1, or 2 with tile 2, got stride ", stride, " and tile ",
                    tile);
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
                   "resnet_fused: winograd_prepack takes a float32 (or float64) weight, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "resnet_fused: winograd_prepack is CPU only, got ", weight.device());
  const Tensor w = (weight.is_mkldnn() ? weight.to_dense() : weight).to(at::kDouble).contiguous();
  const int64_t K = w.size(0), C = w.size(1), A = stride == 2 ? 4 : tile + 2;
  const double* G = stride == 2 ? &kG2s2[0][0] : tile == 2 ? &kG2[0][0] : &kG4[0][0];
  const auto options = weight.options().dtype(at::kFloat).layout(at::kStrided);
  Tensor U = stride == 2 ? at::empty({A, A, C, K}, options) : at::empty({A * A, C, K}, options);
  const double* wp = w.data_ptr<double>();
  float* up = U.data_ptr<float>();
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        const double* g = wp + (k * C + c) * 9;
        double gg[6][3];  // G g
        for (int i = 0; i < A; ++i) {
          for (int j = 0; j < 3; ++j) gg[i][j] = G[i * 3] * g[j] + G[i * 3 + 1] * g[3 + j] + G[i * 3 + 2] * g[6 + j];
        }
        for (int i = 0; i < A; ++i) {  // (G g) G^T
          for (int j = 0; j < A; ++j) {
            const double u = gg[i][0] * G[j * 3] + gg[i][1] * G[j * 3 + 1] + gg[i][2] * G[j * 3 + 2];
            up[((i * A + j) * C + c) * K + k] = static_cast<float>(u);
          }
        }
      }
    }
  });
  if (!panels) return U;
  const int64_t np = (K + kPanel - 1) / kPanel;
  std::vector<int64_t> shape(U.sizes().begin(), U.sizes().end() - 2);
  shape.insert(shape.end(), {np, C, kPanel});
  Tensor packed = at::zeros(shape, options);
  float* pp = packed.data_ptr<float>();
  at::parallel_for(0, A * A * np, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // (position, panel)
      const int64_t xi = i / np, n0 = i % np * kPanel, cols = std::min(kPanel, K - n0);
      for (int64_t c = 0; c < C; ++c) {
        std::copy_n(up + (xi * C + c) * K + n0, cols, pp + (i * C + c) * kPanel);
      }
    }
  });
  return packed;
}

// Output size of a 3x3 convolution with padding 1 at stride S.
int64_t out_size(int64_t in, int64_t S) { return in == 0 ? 0 : (in - 1) / S + 1; }

// The tiling of one convolution: M x M output tiles over N images of H x W (Ho x Wo out), C -> K
// channels; a tile reads an A x A input patch (A = M + 2 at stride 1, 2 M + 1 at stride 2), with
// P = A^2 positions.
template <int M, int S>
struct Tiling {
  static constexpr int A = S == 1 ? M + 2 : 2 * M + 1, P = A * A;
  int64_t N, C, H, W, Ho, Wo, K, th, tw, tiles;
  Tiling(at::IntArrayRef x, int64_t k)
      : N(x[0]), C(x[1]), H(x[2]), W(x[3]), Ho(out_size(H, S)), Wo(out_size(W, S)), K(k), th((Ho + M - 1) / M),
        tw((Wo + M - 1) / M), tiles(N * th * tw) {}
};

// Input transform of tiles [t0, t0 + nt): tile t's V[xi] at v + xi * stride + (t - t0) * C.
template <int M, int S>
void tiles_in(const Tiling<M, S>& g, const float* xp, const float* zeros, int64_t t0, int64_t nt, float* v,
              int64_t stride) {
  constexpr int A = Tiling<M, S>::A;
  const auto in = transforms<M, S>().in;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t id = t0 + t, n = id / (g.th * g.tw), i = (id / g.tw) % g.th, j = id % g.tw;
    const float* d[A * A];
    for (int a = 0; a < A; ++a) {
      const int64_t h = M * S * i - 1 + a;
      for (int b = 0; b < A; ++b) {
        const int64_t w = M * S * j - 1 + b;
        d[a * A + b] = (h >= 0 && h < g.H && w >= 0 && w < g.W) ? xp + ((n * g.H + h) * g.W + w) * g.C : zeros;
      }
    }
    in(d, v + t * g.C, stride, g.C);
  }
}

// Output transform and epilogue of tiles [t0, t0 + nt) from M (tile t's M[xi] at
// m + xi * stride + (t - t0) * K) into out (NHWC; may be the residual itself).
template <int M, int S>
void tiles_out(const Tiling<M, S>& g, const float* m, int64_t stride, int64_t t0, int64_t nt, const float* bias,
               const float* residual, float* out, const float* zeros, float* scratch, bool relu) {
  const auto transform = relu ? transforms<M, S>().out_relu : transforms<M, S>().out;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t id = t0 + t, n = id / (g.th * g.tw), i = (id / g.tw) % g.th, j = id % g.tw;
    const float* r[M * M];
    float* y[M * M];
    for (int a = 0; a < M; ++a) {
      for (int b = 0; b < M; ++b) {
        const int64_t h = M * i + a, w = M * j + b;
        const bool in = h < g.Ho && w < g.Wo;
        const int64_t off = ((n * g.Ho + h) * g.Wo + w) * g.K;
        r[a * M + b] = (residual && in) ? residual + off : zeros;
        y[a * M + b] = in ? out + off : scratch;  // (parts of tiles past the edge: computed, dropped)
      }
    }
    transform(m + t * g.K, stride, bias, r, y, g.K);
  }
}

// The P matrix products M[xi] = V[xi] U[slot(xi)] on the register-tile kernel (gemm_kernels.h).
// U in panels: each (slot, panel) is a packed panel. U plain [slots, C, K]: read in place as
// panels of 32 columns (row stride K), a last panel narrower than 32 from a zero-padded copy (the
// kernel loads whole panel rows). Stride 2's 25 positions share 16 slots (positions 3 and 4 of a
// row or column hold the same weight).
struct Products {
  const float* U;
  int64_t P, C, K, panels;
  bool packed;
  std::vector<int64_t> slot;  // position -> U's slot
  std::vector<float> tail;    // [slots, C, kPanel]: plain U's last, partial panel, zero-padded (if any)

  Products(const float* u, int64_t p, const WinogradWeight& w)
      : U(u), P(p), C(w.C), K(w.K), panels((w.K + kPanel - 1) / kPanel), packed(w.panels), slot(p) {
    for (int64_t xi = 0; xi < P; ++xi) {
      slot[xi] = w.stride == 2 ? std::min<int64_t>(xi / 5, 3) * 4 + std::min<int64_t>(xi % 5, 3) : xi;
    }
    const int64_t n0 = (panels - 1) * kPanel, cols = K - n0;
    if (packed || cols == kPanel) return;
    tail.assign(w.slots * C * kPanel, 0.f);
    for (int64_t xi = 0; xi < w.slots; ++xi) {
      for (int64_t c = 0; c < C; ++c) {
        std::copy_n(U + (xi * C + c) * K + n0, cols, tail.data() + (xi * C + c) * kPanel);
      }
    }
  }

  // M[xi] rows [0, rows) (row stride K), panels [p0, p1), from V[xi] (row stride C): this thread.
  void run(int64_t xi, const float* v, int64_t rows, float* m, int64_t p0, int64_t p1) const {
    Tile t{};
    t.lda = C;
    t.ldc = K;
    t.kd = C;
    t.a = v;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel;
      t.cols = std::min(kPanel, K - n0);
      t.c = m + n0;
      if (packed) {
        t.b = U + (slot[xi] * panels + p) * C * kPanel;
        t.ldb = kPanel;
        run_panel(t, rows, 0, p + 1 < p1 ? t.b + C * kPanel : nullptr);
        continue;
      }
      const bool full = t.cols == kPanel;
      t.b = full ? U + slot[xi] * C * K + n0 : tail.data() + slot[xi] * C * kPanel;
      t.ldb = full ? K : kPanel;
      run_panel(t, rows);
    }
  }
};

// The two schedules of winograd_run (the op's `schedule` argument; 0 lets three_passes decide).
constexpr int64_t kScheduleRule = 0, kChunked = 1, kThreePasses = 2;

// The kernel's own choice of schedule (see winograd_run): three passes where U is past L2 and
// either there are at most two chunks a thread (batch 1 from layer2 on in ResNet-50: the threads'
// few chunks would each stream all of U for little work) or re-reading U per chunk would move
// more than 8x the bytes of V and M (a 512-channel layer on a 7x7 map at batch 8); chunked
// otherwise. Measured on ResNet-50's shapes on a Zen 4 (F(2x2)); where a machine disagrees
// (benchmarks/results), tuning measures both schedules.
bool three_passes(int64_t P, int64_t C, int64_t K, int64_t tiles, int64_t u_bytes) {
  const int64_t T = chunk_tiles(P, C, K, tiles);
  const int64_t chunks = (tiles + T - 1) / T;
  const int64_t threads = at::get_num_threads();
  const int64_t vm_bytes = P * tiles * (C + K) * int64_t(sizeof(float));
  return u_bytes > (int64_t(512) << 10) && (chunks <= 2 * threads || chunks * u_bytes > 8 * vm_bytes);
}

// out (NHWC, may be the residual itself) = act(conv3x3_p1(x, stride S) + bias [+ residual]), with
// F(M x M, 3x3).
//
// Two schedules. Chunked: each thread takes chunks of tiles and runs all three steps on them
// (transformed input and products stay in its L2), reading all of U once per chunk. Three
// passes: every input transform, then the products split over (position, panel group) items,
// then every output transform (V and M go through memory once each, U is read once).
template <int M, int S>
void winograd_run(const Tensor& x, const Tensor& U, const WinogradWeight& w, const float* bias, const float* residual,
                  float* out, bool relu, int64_t schedule) {
  const Tiling<M, S> g(x.sizes(), w.K);
  constexpr int64_t P = Tiling<M, S>::P;
  const int64_t C = g.C, K = g.K, tiles = g.tiles;
  const float* xp = x.data_ptr<float>();
  const std::vector<float> zeros(std::max(C, K), 0.f);
  const Products products(U.data_ptr<float>(), P, w);
  const int64_t T = chunk_tiles(P, C, K, tiles);
  const int64_t chunks = (tiles + T - 1) / T;
  const int64_t threads = at::get_num_threads();
  if (schedule == kScheduleRule) {
    schedule = three_passes(P, C, K, tiles, w.slots * C * K * int64_t(sizeof(float))) ? kThreePasses : kChunked;
  }
  if (schedule == kThreePasses) {
    // V and M in this thread's scratch, shared with the workers for the call (past 8 MiB a
    // tensor of the call's own: the scratch is kept between calls)
    const int64_t vm_floats = P * tiles * (C + K);
    Tensor vm;
    float* vp;
    if (vm_floats * int64_t(sizeof(float)) <= (int64_t(8) << 20)) {
      vp = scratch_floats(vm_floats);
    } else {
      vm = at::empty({vm_floats}, x.options());
      vp = vm.data_ptr<float>();
    }
    float* mp = vp + P * tiles * C;
    at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
      tiles_in(g, xp, zeros.data(), t0, t1 - t0, vp + t0 * C, tiles * C);
    });
    // (position, panel group) items: the groups as small as keeps every thread busy
    const int64_t groups = std::min(products.panels, std::max<int64_t>(1, (4 * threads + P - 1) / P));
    const int64_t per_group = (products.panels + groups - 1) / groups;
    const int64_t items = P * ((products.panels + per_group - 1) / per_group);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, items), 1, [&](int64_t, int64_t) {
      for (int64_t item = next++; item < items; item = next++) {
        const int64_t xi = item % P, p0 = (item / P) * per_group;
        products.run(xi, vp + xi * tiles * C, tiles, mp + xi * tiles * K, p0,
                     std::min(products.panels, p0 + per_group));
      }
    });
    at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
      std::vector<float> scratch(K);
      tiles_out(g, mp + t0 * K, tiles * K, t0, t1 - t0, bias, residual, out, zeros.data(), scratch.data(), relu);
    });
    return;
  }
  // Chunks are handed out one at a time (an atomic counter), not split in equal ranges up front:
  // on a shared machine one core is often slowed, and a static split makes the other wait.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(threads, chunks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    float* V = scratch_floats(P * T * (C + K) + K);
    float* Mp = V + P * T * C;
    float* scratch = Mp + P * T * K;
    for (int64_t chunk = next++; chunk < chunks; chunk = next++) {
      const int64_t t0 = chunk * T, nt = std::min(T, tiles - t0);
      tiles_in(g, xp, zeros.data(), t0, nt, V, T * C);
      // the P products of this chunk, on this thread: M[xi] = V[xi] U[xi]
      for (int64_t xi = 0; xi < P; ++xi) {
        products.run(xi, V + xi * T * C, nt, Mp + xi * T * K, 0, products.panels);
      }
      tiles_out(g, Mp, T * K, t0, nt, bias, residual, out, zeros.data(), scratch, relu);
    }
  });
}

void winograd_dispatch(const Tensor& x, const Tensor& U, const WinogradWeight& w, const float* bias,
                       const float* residual, float* out, bool relu, int64_t schedule) {
  if (w.stride == 2) {
    winograd_run<2, 2>(x, U, w, bias, residual, out, relu, schedule);
  } else if (w.tile == 2) {
    winograd_run<2, 1>(x, U, w, bias, residual, out, relu, schedule);
  } else {
    winograd_run<4, 1>(x, U, w, bias, residual, out, relu, schedule);
  }
}

template <int M, int S>
int64_t schedule_for(at::IntArrayRef x, int64_t slots, int64_t K) {
  const Tiling<M, S> g(x, K);
  return three_passes(Tiling<M, S>::P, g.C, K, g.tiles, slots * g.C * K * int64_t(sizeof(float))) ? kThreePasses
                                                                                                   : kChunked;
}

void check_schedule(int64_t schedule) {
  TORCH_CHECK_VALUE(schedule >= kScheduleRule && schedule <= kThreePasses,
                    "resnet_fused: a Winograd schedule is 0 (the kernel's choice), 1 (chunked) or 2 (three passes), got ",
                    schedule);
}

WinogradWeight check_winograd_args(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                   const std::optional<Tensor>& residual, int64_t out_channels) {
  RF_CHECK_DIM(input, 4, "input");
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, "resnet_fused: the Winograd path is float32 only, got a ",
                   input.scalar_type(), " input");
  TORCH_CHECK_VALUE(input.device().is_cpu(), "resnet_fused: winograd_conv2d_bias_act is CPU only, got ",
                    input.device());
  const WinogradWeight w = check_winograd_weight(weight, out_channels);
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "resnet_fused: the Winograd weight must be on the CPU, got ",
                    weight.device());
  TORCH_CHECK_VALUE(input.size(1) == w.C, "resnet_fused: input has ", input.size(1),
                    " channels but the Winograd weight was made for ", w.C);
  const int64_t K = w.K, S = w.stride;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == K, "resnet_fused: bias must have shape [", K,
                      "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, "resnet_fused: bias must be float32, got ",
                     bias->scalar_type());
    RF_CHECK_SAME_DEVICE(*bias, input, "bias");
  }
  if (residual.has_value()) {
    const std::vector<int64_t> want{input.size(0), K, out_size(input.size(2), S), out_size(input.size(3), S)};
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(want), "resnet_fused: residual must have the output's shape ",
                      at::IntArrayRef(want), ", got ", residual->sizes());
    RF_CHECK_SAME_DTYPE(*residual, input, "residual");
    RF_CHECK_SAME_DEVICE(*residual, input, "residual");
  }
  return w;
}

// 3x3, padding 1, dilation 1, groups 1, stride 1 or 2 (the weight says which):
// act(conv2d(input, W) + bias [+ residual]), W given as its Winograd transform
// (winograd_prepack; in panels, with out_channels). Output channels-last.
Tensor winograd_conv2d_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                const std::optional<Tensor>& residual, bool relu, int64_t schedule,
                                int64_t out_channels) {
  const WinogradWeight w = check_winograd_args(input, weight, bias, residual, out_channels);
  check_schedule(schedule);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  const Tensor U = weight.contiguous();
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  const Tensor r = residual.has_value() ? residual->contiguous(cl) : Tensor();
  Tensor out = at::empty({x.size(0), w.K, out_size(x.size(2), w.stride), out_size(x.size(3), w.stride)},
                         x.options().memory_format(cl));
  if (out.numel() == 0) return out;
  winograd_dispatch(x, U, w, b.defined() ? b.data_ptr<float>() : nullptr, r.defined() ? r.data_ptr<float>() : nullptr,
                    out.data_ptr<float>(), relu, schedule);
  return out;
}

void winograd_conv2d_bias_act_(Tensor& residual, const Tensor& input, const Tensor& weight,
                               const std::optional<Tensor>& bias, bool relu, int64_t schedule, int64_t out_channels) {
  const WinogradWeight w = check_winograd_args(input, weight, bias, residual, out_channels);
  check_schedule(schedule);
  if (residual.numel() == 0) return;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  const Tensor U = weight.contiguous();
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  if (residual.is_contiguous(cl) && !(x.data_ptr() == residual.data_ptr())) {
    winograd_dispatch(x, U, w, b.defined() ? b.data_ptr<float>() : nullptr, residual.data_ptr<float>(),
                      residual.data_ptr<float>(), relu, schedule);
    return;
  }
  residual.copy_(winograd_conv2d_bias_act(input, weight, bias, residual, relu, schedule, out_channels));
}

// The schedule (1 chunked, 2 three passes) the kernel's own rule picks for an input of this size
// and a Winograd weight of this shape (and out_channels, in panels) at the current thread count:
// what schedule 0 runs.
int64_t winograd_schedule(at::IntArrayRef input_size, at::IntArrayRef weight_size, int64_t out_channels) {
  TORCH_CHECK_VALUE(input_size.size() == 4, "resnet_fused: winograd_schedule takes a 4-D input size, got ", input_size);
  const WinogradWeight w = winograd_weight(weight_size, out_channels);
  TORCH_CHECK_VALUE(input_size[1] == w.C, "resnet_fused: input has ", input_size[1],
                    " channels but the Winograd weight was made for ", w.C);
  if (w.stride == 2) return schedule_for<2, 2>(input_size, w.slots, w.K);
  return w.tile == 2 ? schedule_for<2, 1>(input_size, w.slots, w.K) : schedule_for<4, 1>(input_size, w.slots, w.K);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("winograd_prepack", &winograd_prepack);
  m.impl("winograd_conv2d_bias_act", &winograd_conv2d_bias_act);
  m.impl("winograd_conv2d_bias_act_", &winograd_conv2d_bias_act_);
}

TORCH_LIBRARY_IMPL(resnet_fused, CompositeExplicitAutograd, m) {
  m.impl("winograd_schedule", &winograd_schedule);
}

}  // namespace resnet_fused::cpu
