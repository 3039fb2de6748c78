// Winograd F(2x2, 3x3) convolution on CPU, float32, channels-last, with the whole epilogue
// (bias, residual add, ReLU) in its output transform.
//
// A 3x3 stride-1 convolution computes each 2x2 output tile from a 4x4 input patch with 16
// multiplies per (input, output) channel pair instead of 36 (Lavin & Gray, "Fast Algorithms for
// Convolutional Neural Networks", 2015): V = B^T d B per input tile, U = G g G^T per filter
// (once, at prepack), M[xi] = V[xi] U[xi] for the 16 positions xi (16 matrix products, where
// the time goes), and the output tile A^T M A. F(2x2, 3x3) is the variant whose transforms
// are exact in binary (0, +-1, +-1/2): its error against float64 stays within float32 direct
// convolution's (measured per ResNet-50 layer in tests/test_winograd.py); the larger tiles,
// F(4x4, 3x3), lose about a decimal digit and are not used.
//
// Blocking: the tiles are cut into chunks small enough that a chunk's transformed input and
// its 16 products stay in the core's L2 cache; each thread takes whole chunks (input
// transform, products, output transform), so nothing but the input, the transformed weight
// and the output travels through memory. The products run on our register-tile kernels
// (gemm_kernels.h) reading the transformed weight in place; the transforms are plain loops over
// channels (contiguous in channels-last) that the compiler vectorises, built per ISA with GCC's
// target_clones (clones.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../checks.h"
#include "clones.h"
#include "gemm_kernels.h"

namespace resnet_fused::cpu {
namespace {

using at::Tensor;

// d: the 16 input rows (4x4 patch, row-major; each a pointer to C channels, zeros outside the
// image). Writes V[xi] = (B^T d B)[xi] at v + xi * xi_stride.
RF_CLONES void input_transform(const float* const* d, float* __restrict v, int64_t xi_stride, int64_t C) {
  const float* __restrict d0 = d[0];
  const float* __restrict d1 = d[1];
  const float* __restrict d2 = d[2];
  const float* __restrict d3 = d[3];
  const float* __restrict d4 = d[4];
  const float* __restrict d5 = d[5];
  const float* __restrict d6 = d[6];
  const float* __restrict d7 = d[7];
  const float* __restrict d8 = d[8];
  const float* __restrict d9 = d[9];
  const float* __restrict d10 = d[10];
  const float* __restrict d11 = d[11];
  const float* __restrict d12 = d[12];
  const float* __restrict d13 = d[13];
  const float* __restrict d14 = d[14];
  const float* __restrict d15 = d[15];
  // (no iteration touches another's channel: the 16 output rows are disjoint, which the
  // compiler cannot prove from a runtime stride)
#pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    // rows of B^T d: r0 = d_row0 - d_row2, r1 = d_row1 + d_row2, r2 = d_row2 - d_row1, r3 = d_row1 - d_row3
    const float r00 = d0[c] - d8[c], r01 = d1[c] - d9[c], r02 = d2[c] - d10[c], r03 = d3[c] - d11[c];
    const float r10 = d4[c] + d8[c], r11 = d5[c] + d9[c], r12 = d6[c] + d10[c], r13 = d7[c] + d11[c];
    const float r20 = d8[c] - d4[c], r21 = d9[c] - d5[c], r22 = d10[c] - d6[c], r23 = d11[c] - d7[c];
    const float r30 = d4[c] - d12[c], r31 = d5[c] - d13[c], r32 = d6[c] - d14[c], r33 = d7[c] - d15[c];
    // then each row times B: (a0 - a2, a1 + a2, a2 - a1, a1 - a3)
    v[0 * xi_stride + c] = r00 - r02;
    v[1 * xi_stride + c] = r01 + r02;
    v[2 * xi_stride + c] = r02 - r01;
    v[3 * xi_stride + c] = r01 - r03;
    v[4 * xi_stride + c] = r10 - r12;
    v[5 * xi_stride + c] = r11 + r12;
    v[6 * xi_stride + c] = r12 - r11;
    v[7 * xi_stride + c] = r11 - r13;
    v[8 * xi_stride + c] = r20 - r22;
    v[9 * xi_stride + c] = r21 + r22;
    v[10 * xi_stride + c] = r22 - r21;
    v[11 * xi_stride + c] = r21 - r23;
    v[12 * xi_stride + c] = r30 - r32;
    v[13 * xi_stride + c] = r31 + r32;
    v[14 * xi_stride + c] = r32 - r31;
    v[15 * xi_stride + c] = r31 - r33;
  }
}

// m: M[xi] at m + xi * xi_stride (K channels each). y = A^T m A + bias (+ residual), ReLU'd
// as torch.relu does (NaN stays NaN). r[i] / y[i]: the 2x2 tile's residual and output rows
// (row-major); outside the image they point at scratch (r: zeros). r[i] may equal y[i].
template <bool kRelu>
RF_CLONES void output_transform(const float* __restrict m, int64_t xi_stride, const float* __restrict bias,
                                const float* const* r, float* const* y, int64_t K) {
  const float* r0 = r[0];
  const float* r1 = r[1];
  const float* r2 = r[2];
  const float* r3 = r[3];
  float* y0 = y[0];
  float* y1 = y[1];
  float* y2 = y[2];
  float* y3 = y[3];
  // (each output channel reads its own residual and writes its own output: no dependence
  // between iterations, even where r[i] == y[i])
#pragma GCC ivdep
  for (int64_t k = 0; k < K; ++k) {
    float a[16];
    for (int i = 0; i < 16; ++i) a[i] = m[i * xi_stride + k];
    // A^T m: t0 = m_row0 + m_row1 + m_row2, t1 = m_row1 - m_row2 - m_row3
    const float t00 = a[0] + a[4] + a[8], t01 = a[1] + a[5] + a[9];
    const float t02 = a[2] + a[6] + a[10], t03 = a[3] + a[7] + a[11];
    const float t10 = a[4] - a[8] - a[12], t11 = a[5] - a[9] - a[13];
    const float t12 = a[6] - a[10] - a[14], t13 = a[7] - a[11] - a[15];
    const float b = bias ? bias[k] : 0.f;
    float o0 = t00 + t01 + t02 + b + r0[k];
    float o1 = t01 - t02 - t03 + b + r1[k];
    float o2 = t10 + t11 + t12 + b + r2[k];
    float o3 = t11 - t12 - t13 + b + r3[k];
    if (kRelu) {
      o0 = o0 < 0.f ? 0.f : o0;
      o1 = o1 < 0.f ? 0.f : o1;
      o2 = o2 < 0.f ? 0.f : o2;
      o3 = o3 < 0.f ? 0.f : o3;
    }
    y0[k] = o0;
    y1[k] = o1;
    y2[k] = o2;
    y3[k] = o3;
  }
}

// Tiles per chunk: the chunk's transformed input and products (16 * T * (C + K) floats) in
// about 1 MiB, half a core's L2 here (on ResNet-50's shapes 32-64 tiles for 128-256 channels beat
// smaller and larger chunks; measured before the -fopenmp build, with the kernel on one core,
// and not tuned again since); at least 16 rows per product, at most 256, and no more than it
// takes to give every thread a chunk.
int64_t chunk_tiles(int64_t C, int64_t K, int64_t tiles) {
  const int64_t t = (int64_t(1) << 20) / (16 * (C + K) * int64_t(sizeof(float)));
  const int64_t per_thread = (tiles + at::get_num_threads() - 1) / at::get_num_threads();
  return std::clamp<int64_t>(std::min(t, per_thread), 16, 256);
}

void check_winograd_weight(const Tensor& w) {
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == 16,
                    "resnet_fused: a Winograd weight has shape [16, C, K] (from winograd_prepack), got ",
                    w.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, "resnet_fused: the Winograd path is float32 only, got a ",
                   w.scalar_type(), " weight");
}

// weight [K, C, 3, 3] -> U [16, C, K] = G g G^T per (k, c), computed in float64 and rounded once.
Tensor winograd_prepack(const Tensor& weight) {
  RF_CHECK_DIM(weight, 4, "weight");
  TORCH_CHECK_VALUE(weight.size(2) == 3 && weight.size(3) == 3,
                    "resnet_fused: winograd_prepack takes a 3x3 weight, got shape ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
                   "resnet_fused: winograd_prepack takes a float32 (or float64) weight, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "resnet_fused: winograd_prepack is CPU only, got ", weight.device());
  const Tensor w = (weight.is_mkldnn() ? weight.to_dense() : weight).to(at::kDouble).contiguous();
  const int64_t K = w.size(0), C = w.size(1);
  Tensor U = at::empty({16, C, K}, weight.options().dtype(at::kFloat).layout(at::kStrided));
  const double* wp = w.data_ptr<double>();
  float* up = U.data_ptr<float>();
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        const double* g = wp + (k * C + c) * 9;
        double gg[4][3];  // G g, G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]]
        for (int j = 0; j < 3; ++j) {
          gg[0][j] = g[j];
          gg[1][j] = 0.5 * (g[j] + g[3 + j] + g[6 + j]);
          gg[2][j] = 0.5 * (g[j] - g[3 + j] + g[6 + j]);
          gg[3][j] = g[6 + j];
        }
        for (int i = 0; i < 4; ++i) {  // (G g) G^T
          const double u[4] = {gg[i][0], 0.5 * (gg[i][0] + gg[i][1] + gg[i][2]),
                               0.5 * (gg[i][0] - gg[i][1] + gg[i][2]), gg[i][2]};
          for (int j = 0; j < 4; ++j) up[((i * 4 + j) * C + c) * K + k] = static_cast<float>(u[j]);
        }
      }
    }
  });
  return U;
}

// The tiling of one convolution: 2x2 output tiles over N images of H x W, C -> K channels.
struct Tiling {
  int64_t N, C, H, W, K, th, tw, tiles;
  Tiling(const Tensor& x, const Tensor& U)
      : N(x.size(0)), C(x.size(1)), H(x.size(2)), W(x.size(3)), K(U.size(2)), th((H + 1) / 2),
        tw((W + 1) / 2), tiles(N * th * tw) {}
};

// Input transform of tiles [t0, t0 + nt): tile t's V[xi] at v + xi * stride + (t - t0) * C.
void tiles_in(const Tiling& g, const float* xp, const float* zeros, int64_t t0, int64_t nt, float* v,
              int64_t stride) {
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t id = t0 + t, n = id / (g.th * g.tw), i = (id / g.tw) % g.th, j = id % g.tw;
    const float* d[16];
    for (int a = 0; a < 4; ++a) {
      const int64_t h = 2 * i - 1 + a;
      for (int b = 0; b < 4; ++b) {
        const int64_t w = 2 * j - 1 + b;
        d[a * 4 + b] = (h >= 0 && h < g.H && w >= 0 && w < g.W) ? xp + ((n * g.H + h) * g.W + w) * g.C : zeros;
      }
    }
    input_transform(d, v + t * g.C, stride, g.C);
  }
}

// Output transform and epilogue of tiles [t0, t0 + nt) from M (tile t's M[xi] at
// m + xi * stride + (t - t0) * K) into out (NHWC; may be the residual itself).
void tiles_out(const Tiling& g, const float* m, int64_t stride, int64_t t0, int64_t nt, const float* bias,
               const float* residual, float* out, const float* zeros, float* scratch, bool relu) {
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t id = t0 + t, n = id / (g.th * g.tw), i = (id / g.tw) % g.th, j = id % g.tw;
    const float* r[4];
    float* y[4];
    for (int a = 0; a < 2; ++a) {
      for (int b = 0; b < 2; ++b) {
        const int64_t h = 2 * i + a, w = 2 * j + b;
        const bool in = h < g.H && w < g.W;
        const int64_t off = ((n * g.H + h) * g.W + w) * g.K;
        r[a * 2 + b] = (residual && in) ? residual + off : zeros;
        y[a * 2 + b] = in ? out + off : scratch;  // (half tiles past the edge: computed, dropped)
      }
    }
    if (relu) {
      output_transform<true>(m + t * g.K, stride, bias, r, y, g.K);
    } else {
      output_transform<false>(m + t * g.K, stride, bias, r, y, g.K);
    }
  }
}

// The 16 matrix products M[xi] = V[xi] U[xi] on the register-tile kernel (gemm_kernels.h),
// reading U [16, C, K] in place as panels of 32 columns (row stride K); a last panel narrower
// than 32 is read from a zero-padded copy (the kernel loads whole panel rows).
struct Products {
  const float* U;
  int64_t C, K, panels;
  std::vector<float> tail;  // [16, C, kPanel]: U's last, partial panel, zero-padded (if any)

  Products(const float* u, int64_t c, int64_t k) : U(u), C(c), K(k), panels((k + kPanel - 1) / kPanel) {
    const int64_t n0 = (panels - 1) * kPanel, cols = K - n0;
    if (cols == kPanel) return;
    tail.assign(16 * C * kPanel, 0.f);
    for (int64_t xi = 0; xi < 16; ++xi) {
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
      const bool full = t.cols == kPanel;
      t.b = full ? U + xi * C * K + n0 : tail.data() + xi * C * kPanel;
      t.ldb = full ? K : kPanel;
      t.c = m + n0;
      run_panel(t, rows);
    }
  }
};

// out (NHWC, may be the residual itself) = act(conv3x3_s1_p1(x) + bias [+ residual]).
//
// Two schedules. Chunked: each thread takes chunks of tiles and runs all three steps on them
// (transformed input and products stay in its L2), reading all of U once per chunk. Three
// passes: every input transform, then the products split over (position, panel group) items,
// then every output transform (V and M go through memory once each, U is read once). Three
// passes where U is past L2 and either there are at most two chunks a thread (batch 1 from
// layer2 on in ResNet-50: the threads' few chunks would each stream all of U for little work)
// or re-reading U per chunk would move more than 8x the bytes of V and M (a 512-channel layer
// on a 7x7 map at batch 8); chunked otherwise (measured on ResNet-50's shapes on a Zen 4).
void winograd_run(const Tensor& x, const Tensor& U, const float* bias, const float* residual, float* out,
                  bool relu) {
  const Tiling g(x, U);
  const int64_t C = g.C, K = g.K, tiles = g.tiles;
  const float* xp = x.data_ptr<float>();
  const std::vector<float> zeros(std::max(C, K), 0.f);
  const Products products(U.data_ptr<float>(), C, K);
  const int64_t T = chunk_tiles(C, K, tiles);
  const int64_t chunks = (tiles + T - 1) / T;
  const int64_t u_bytes = 16 * C * K * int64_t(sizeof(float));
  const int64_t threads = at::get_num_threads();
  const int64_t vm_bytes = 16 * tiles * (C + K) * int64_t(sizeof(float));
  if (u_bytes > (int64_t(512) << 10) && (chunks <= 2 * threads || chunks * u_bytes > 8 * vm_bytes)) {
    // V and M in this thread's scratch, shared with the workers for the call (past 8 MiB a
    // tensor of the call's own: the scratch is kept between calls)
    const int64_t vm_floats = 16 * tiles * (C + K);
    Tensor vm;
    float* vp;
    if (vm_floats * int64_t(sizeof(float)) <= (int64_t(8) << 20)) {
      vp = scratch_floats(vm_floats);
    } else {
      vm = at::empty({vm_floats}, x.options());
      vp = vm.data_ptr<float>();
    }
    float* mp = vp + 16 * tiles * C;
    at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
      tiles_in(g, xp, zeros.data(), t0, t1 - t0, vp + t0 * C, tiles * C);
    });
    // (position, panel group) items: the groups as small as keeps every thread busy
    const int64_t groups = std::min(products.panels, std::max<int64_t>(1, (4 * threads + 15) / 16));
    const int64_t per_group = (products.panels + groups - 1) / groups;
    const int64_t items = 16 * ((products.panels + per_group - 1) / per_group);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, items), 1, [&](int64_t, int64_t) {
      for (int64_t item = next++; item < items; item = next++) {
        const int64_t xi = item % 16, p0 = (item / 16) * per_group;
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
    float* V = scratch_floats(16 * T * (C + K) + K);
    float* M = V + 16 * T * C;
    float* scratch = M + 16 * T * K;
    for (int64_t chunk = next++; chunk < chunks; chunk = next++) {
      const int64_t t0 = chunk * T, nt = std::min(T, tiles - t0);
      tiles_in(g, xp, zeros.data(), t0, nt, V, T * C);
      // the 16 products of this chunk, on this thread: M[xi] = V[xi] U[xi]
      for (int64_t xi = 0; xi < 16; ++xi) {
        products.run(xi, V + xi * T * C, nt, M + xi * T * K, 0, products.panels);
      }
      tiles_out(g, M, T * K, t0, nt, bias, residual, out, zeros.data(), scratch, relu);
    }
  });
}

void check_winograd_args(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                         const std::optional<Tensor>& residual) {
  RF_CHECK_DIM(input, 4, "input");
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, "resnet_fused: the Winograd path is float32 only, got a ",
                   input.scalar_type(), " input");
  TORCH_CHECK_VALUE(input.device().is_cpu(), "resnet_fused: winograd_conv2d_bias_act is CPU only, got ",
                    input.device());
  check_winograd_weight(weight);
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "resnet_fused: the Winograd weight must be on the CPU, got ",
                    weight.device());
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1), "resnet_fused: input has ", input.size(1),
                    " channels but the Winograd weight was made for ", weight.size(1));
  const int64_t K = weight.size(2);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == K, "resnet_fused: bias must have shape [", K,
                      "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, "resnet_fused: bias must be float32, got ",
                     bias->scalar_type());
    RF_CHECK_SAME_DEVICE(*bias, input, "bias");
  }
  if (residual.has_value()) {
    const std::vector<int64_t> want{input.size(0), K, input.size(2), input.size(3)};
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(want), "resnet_fused: residual must have the output's shape ",
                      want, ", got ", residual->sizes());
    RF_CHECK_SAME_DTYPE(*residual, input, "residual");
    RF_CHECK_SAME_DEVICE(*residual, input, "residual");
  }
}

// 3x3, stride 1, padding 1, dilation 1, groups 1: act(conv2d(input, W) + bias [+ residual]),
// W given as its Winograd transform (winograd_prepack). Output channels-last.
Tensor winograd_conv2d_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                const std::optional<Tensor>& residual, bool relu) {
  check_winograd_args(input, weight, bias, residual);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  const Tensor U = weight.contiguous();
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  const Tensor r = residual.has_value() ? residual->contiguous(cl) : Tensor();
  Tensor out = at::empty({x.size(0), U.size(2), x.size(2), x.size(3)}, x.options().memory_format(cl));
  if (out.numel() == 0) return out;
  winograd_run(x, U, b.defined() ? b.data_ptr<float>() : nullptr, r.defined() ? r.data_ptr<float>() : nullptr,
               out.data_ptr<float>(), relu);
  return out;
}

void winograd_conv2d_bias_act_(Tensor& residual, const Tensor& input, const Tensor& weight,
                               const std::optional<Tensor>& bias, bool relu) {
  check_winograd_args(input, weight, bias, residual);
  if (residual.numel() == 0) return;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  const Tensor U = weight.contiguous();
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  if (residual.is_contiguous(cl) && !(x.data_ptr() == residual.data_ptr())) {
    winograd_run(x, U, b.defined() ? b.data_ptr<float>() : nullptr, residual.data_ptr<float>(),
                 residual.data_ptr<float>(), relu);
    return;
  }
  residual.copy_(winograd_conv2d_bias_act(input, weight, bias, residual, relu));
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("winograd_prepack", &winograd_prepack);
  m.impl("winograd_conv2d_bias_act", &winograd_conv2d_bias_act);
  m.impl("winograd_conv2d_bias_act_", &winograd_conv2d_bias_act_);
}

}  // namespace resnet_fused::cpu
