// Convolution as matrix products on CPU, float32, channels-last, with the whole epilogue (bias,
// residual add, ReLU) applied while each block of the output is still in cache.
//
// In channels-last a convolution is a matrix product: each output pixel's row of K channels is
// its receptive field (kh x kw x C values, the "im2col" row) times the weight seen as a
// [K, kh*kw*C] matrix, which is exactly the channels-last weight's memory. For a 1x1 stride-1
// convolution the im2col rows *are* the input's rows, so the input is read in place; strided 1x1s
// gather their rows, larger kernels build them (ResNet's 7x7 stem: 147 values, 7 runs of 21).
//
// Blocking: the output pixels are cut into blocks whose im2col rows and output rows fit in about
// half a core's L2 cache; where there are too few blocks for the threads (batch 1), the output
// channels are split too. Each thread takes whole blocks (an atomic counter: a slowed core takes
// fewer) and runs, on its own: build the rows (if needed), one sgemm (MKL's, through the BLAS
// torch links; ATen's mm where there is none), and the epilogue on the block it just wrote. In
// place (residual == output) the product accumulates into the residual (beta = 1). So the input,
// the weight and the output (and the residual) each pass through memory once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "epilogue.h"

namespace resnet_fused::cpu {
namespace {

using at::Tensor;

// Fortran BLAS sgemm with 32-bit integers, as torch's own CPU BLAS calls it (MKL or OpenBLAS,
// linked into libtorch_cpu). Looked up at run time: a torch built without a BLAS has none, and
// then ATen's mm does the products.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);

sgemm_fn find_sgemm() {
  static const sgemm_fn fn = [] {
    const char* off = std::getenv("RESNET_FUSED_NO_BLAS");  // tests: the ATen path
    if (off != nullptr && off[0] == '1') return sgemm_fn(nullptr);
    return reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "sgemm_"));
  }();
  return fn;
}

// c[m, n] (row-major, ldc) = a[m, kd] (lda) @ b[n, kd]^T (ldb) + beta * c, on this thread.
void gemm_nt(int64_t m, int64_t n, int64_t kd, const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
             float* c, int64_t ldc) {
  if (const sgemm_fn sgemm = find_sgemm()) {
    // Column-major view: c^T [n, m] = b [n, kd] (transposed) @ a^T [kd, m].
    const int M = int(n), N = int(m), K = int(kd), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
    const float one = 1.f;
    sgemm("T", "N", &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const Tensor at_ = at::from_blob(const_cast<float*>(a), {m, kd}, {lda, 1}, opts);
  const Tensor bt = at::from_blob(const_cast<float*>(b), {n, kd}, {ldb, 1}, opts);
  Tensor ct = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == 0.f) {
    at::mm_out(ct, at_, bt.t());
  } else {
    at::addmm_out(ct, ct, at_, bt.t(), beta, 1.f);
  }
}

// The geometry of one convolution, NHWC input [N, H, W, C] -> output [N, OH, OW, K].
struct Geometry {
  int64_t N, C, H, W, K, kh, kw, sh, sw, ph, pw, OH, OW, M, Kd;
  bool direct;  // 1x1, stride 1, no padding: the im2col rows are the input's rows
  Geometry(const Tensor& x, const Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding)
      : N(x.size(0)), C(x.size(1)), H(x.size(2)), W(x.size(3)), K(w.size(0)), kh(w.size(2)), kw(w.size(3)),
        sh(stride[0]), sw(stride[1]), ph(padding[0]), pw(padding[1]), OH((H + 2 * ph - kh) / sh + 1),
        OW((W + 2 * pw - kw) / sw + 1), M(N * OH * OW), Kd(kh * kw * C),
        direct(kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0) {}
};

// The im2col rows of output pixels [r0, r0 + rows) into a (row stride Kd); zeros outside the image.
void im2col_rows(const Geometry& g, const float* x, int64_t r0, int64_t rows, float* a) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = r0 + r, n = p / (g.OH * g.OW), oh = (p / g.OW) % g.OH, ow = p % g.OW;
    float* row = a + r * g.Kd;
    const int64_t w0 = ow * g.sw - g.pw;
    // the kernel's columns that fall inside the image: [j0, j1)
    const int64_t j0 = std::max<int64_t>(0, -w0), j1 = std::min<int64_t>(g.kw, g.W - w0);
    for (int64_t i = 0; i < g.kh; ++i) {
      float* dst = row + i * g.kw * g.C;
      const int64_t h = oh * g.sh - g.ph + i;
      if (h < 0 || h >= g.H || j1 <= j0) {
        std::memset(dst, 0, sizeof(float) * g.kw * g.C);
        continue;
      }
      if (j0 > 0) std::memset(dst, 0, sizeof(float) * j0 * g.C);
      std::memcpy(dst + j0 * g.C, x + ((n * g.H + h) * g.W + w0 + j0) * g.C, sizeof(float) * (j1 - j0) * g.C);
      if (j1 < g.kw) std::memset(dst + j1 * g.C, 0, sizeof(float) * (g.kw - j1) * g.C);
    }
  }
}

// out (NHWC; may be the residual itself, then `residual` is null and `accumulate` true)
//   = act(conv(x, w) + bias [+ residual] [+ out]).
// w: [K, kh, kw, C] contiguous (the channels-last weight).
void gemm_conv_run(const Geometry& g, const float* x, const float* w, const float* bias, const float* residual,
                   float* out, bool accumulate, bool relu) {
  // Output pixels per block: its im2col rows and output rows in about 1 MiB (half this machine's
  // L2), but at least 256: sgemm packs the weight on every call, and fewer rows do not pay for
  // that (measured on ResNet-50's 1x1s: 256-1024 rows alike, 64-128 up to 25% slower).
  const int64_t threads = at::get_num_threads();
  int64_t rows = std::clamp<int64_t>((int64_t(1) << 18) / (g.Kd + g.K), 256, 1024);
  // Output channels per block: all of them, unless the pixels alone give the threads too few
  // blocks (small batches, late layers): then split the channels, in multiples of 16.
  int64_t kc = g.K;
  const int64_t want = 2 * threads;
  if ((g.M + rows - 1) / rows < want) {
    rows = std::max<int64_t>(8, (g.M + want - 1) / want);
    const int64_t row_blocks = (g.M + rows - 1) / rows;
    if (row_blocks < want && g.K >= 32) {
      const int64_t splits = std::min<int64_t>((want + row_blocks - 1) / row_blocks, g.K / 16);
      kc = ((g.K + splits - 1) / splits + 15) / 16 * 16;
    }
  }
  const int64_t row_blocks = (g.M + rows - 1) / rows, k_blocks = (g.K + kc - 1) / kc;
  const int64_t blocks = row_blocks * k_blocks;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(threads, blocks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> buffer(g.direct ? 0 : rows * g.Kd);
    for (int64_t blk = next++; blk < blocks; blk = next++) {
      // (consecutive blocks share their pixels: the rows built for one serve the next)
      const int64_t rb = blk / k_blocks, k0 = (blk % k_blocks) * kc;
      const int64_t r0 = rb * rows, nr = std::min(rows, g.M - r0), nk = std::min(kc, g.K - k0);
      const float* a;
      if (g.direct) {
        a = x + r0 * g.C;
      } else {
        im2col_rows(g, x, r0, nr, buffer.data());
        a = buffer.data();
      }
      float* c = out + r0 * g.K + k0;
      gemm_nt(nr, nk, g.Kd, a, g.Kd, w + k0 * g.Kd, g.Kd, accumulate ? 1.f : 0.f, c, g.K);
      const float* b = bias ? bias + k0 : nullptr;
      if (b != nullptr || residual != nullptr || relu) {
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t o = r * g.K;
          bias_act_row_f32(c + o, c + o, residual ? residual + (r0 + r) * g.K + k0 : nullptr, b, nk, relu);
        }
      }
    }
  });
}

std::vector<int64_t> check_gemm_conv_args(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                          const std::optional<Tensor>& residual, at::IntArrayRef stride,
                                          at::IntArrayRef padding) {
  const std::vector<int64_t> dilation{1, 1};
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2,
                    "resnet_fused: stride and padding must have 2 values each, got ", stride.size(), " and ",
                    padding.size());
  const auto out_shape = check_conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, 1);
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, "resnet_fused: gemm_conv2d_bias_act is float32 only, got a ",
                   input.scalar_type(), " input");
  TORCH_CHECK_VALUE(input.device().is_cpu() && !input.is_mkldnn() && !weight.is_mkldnn(),
                    "resnet_fused: gemm_conv2d_bias_act takes dense CPU tensors, got input on ", input.device(),
                    input.is_mkldnn() || weight.is_mkldnn() ? " (mkldnn layout)" : "");
  return out_shape;
}

// act(conv2d(input, weight, stride, padding) + bias [+ residual]), dilation 1, groups 1.
// Output channels-last.
Tensor gemm_conv2d_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                            const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                            bool relu) {
  const auto out_shape = check_gemm_conv_args(input, weight, bias, residual, stride, padding);
  const auto cl = at::MemoryFormat::ChannelsLast;
  Tensor out = at::empty(out_shape, input.options().memory_format(cl));
  if (out.numel() == 0) return out;
  const Tensor x = input.contiguous(cl);
  const Tensor w = weight.contiguous(cl);
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  const Tensor r = residual.has_value() ? residual->contiguous(cl) : Tensor();
  if (x.numel() == 0) {  // (an empty image with padding, or no input channels: the products are zero)
    out.zero_();
    if (b.defined()) out.add_(b.view({1, -1, 1, 1}));
    if (r.defined()) out.add_(r);
    if (relu) out.relu_();
    return out;
  }
  gemm_conv_run(Geometry(x, w, stride, padding), x.data_ptr<float>(), w.data_ptr<float>(),
                b.defined() ? b.data_ptr<float>() : nullptr, r.defined() ? r.data_ptr<float>() : nullptr,
                out.data_ptr<float>(), false, relu);
  return out;
}

// The same into the residual: residual = act(conv2d(...) + bias + residual).
void gemm_conv2d_bias_act_(Tensor& residual, const Tensor& input, const Tensor& weight,
                           const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                           bool relu) {
  check_gemm_conv_args(input, weight, bias, residual, stride, padding);
  if (residual.numel() == 0) return;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  if (!residual.is_contiguous(cl) || x.numel() == 0 || x.data_ptr() == residual.data_ptr()) {
    residual.copy_(gemm_conv2d_bias_act(input, weight, bias, residual, stride, padding, relu));
    return;
  }
  const Tensor w = weight.contiguous(cl);
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  gemm_conv_run(Geometry(x, w, stride, padding), x.data_ptr<float>(), w.data_ptr<float>(),
                b.defined() ? b.data_ptr<float>() : nullptr, nullptr, residual.data_ptr<float>(), true, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("gemm_conv2d_bias_act", &gemm_conv2d_bias_act);
  m.impl("gemm_conv2d_bias_act_", &gemm_conv2d_bias_act_);
}

// (an opaque oneDNN weight reaches the checks above, for a clear error rather than the
// dispatcher's "no kernel for MkldnnCPU")
TORCH_LIBRARY_IMPL(resnet_fused, MkldnnCPU, m) {
  m.impl("gemm_conv2d_bias_act", &gemm_conv2d_bias_act);
  m.impl("gemm_conv2d_bias_act_", &gemm_conv2d_bias_act_);
}

}  // namespace resnet_fused::cpu
