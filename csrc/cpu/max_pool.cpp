// Max pooling on CPU, float32, channels-last, without the indices.
//
// PyTorch's CPU max_pool2d runs max_pool2d_with_indices and drops the indices: for ResNet's pool
// after the stem it writes an int64 index per output value beside the float (three times the
// output's bytes) and reads its input once more than it needs to. Here each output row reads
// its window rows in place (channels contiguous), takes the max 16 channels at a time, and
// writes only the values. NaN propagates as in PyTorch (a NaN anywhere in the window gives NaN);
// padding is never a candidate (as -inf). Parallel over output rows; vectorised over channels
// for the ISA the matrix-product kernels run (AVX-512, AVX2, else SSE).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

// One output pixel over C channels: the max over n window pixels (each a pointer to C
// channels), NaN in any giving NaN (m holds NaN once it took one), L channels at a time in
// GCC's vector extension, then one at a time. Written once as a macro and expanded in one
// function per ISA (target attributes, chosen at run time): GCC 12 lowers a select between two
// vectors to scalar code under target_clones and in helpers inlined into a target function.
#define RF_PIXEL_MAX_BODY(V, L)                                  \
  int64_t c = 0;                                                 \
  for (; c + (L) <= C; c += (L)) {                               \
    V m;                                                         \
    __builtin_memcpy(&m, px[0] + c, sizeof(m));                  \
    for (int i = 1; i < n; ++i) {                                \
      V v;                                                       \
      __builtin_memcpy(&v, px[i] + c, sizeof(v));                \
      m = v > m ? v : m;                                         \
      m = v != v ? v : m;                                        \
    }                                                            \
    __builtin_memcpy(y + c, &m, sizeof(m));                      \
  }                                                              \
  for (; c < C; ++c) {                                           \
    float m = px[0][c];                                          \
    for (int i = 1; i < n; ++i) {                                \
      const float v = px[i][c];                                  \
      m = (v > m || v != v) ? v : m;                             \
    }                                                            \
    y[c] = m;                                                    \
  }

typedef float Vec4 __attribute__((vector_size(16), aligned(4)));
void pixel_max_generic(const float* const* px, int n, float* y, int64_t C) { RF_PIXEL_MAX_BODY(Vec4, 4) }

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // (the wide vectors never cross a call)
typedef float Vec16 __attribute__((vector_size(64), aligned(4)));
// AVX2 in intrinsics: GCC's generic tuning splits an unaligned 32-byte load in two, and the macro's
// memcpy into a vector then went through the stack (two 16-byte stores read back as one 32-byte
// load, which store forwarding cannot serve), many times slower than the AVX-512 instance.
// _mm256_max_ps(v, m) gives m where either is NaN; the blend then takes v where v is NaN.
__attribute__((target("avx2"))) void pixel_max_avx2(const float* const* px, int n, float* y, int64_t C) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    __m256 m = _mm256_loadu_ps(px[0] + c);
    for (int i = 1; i < n; ++i) {
      const __m256 v = _mm256_loadu_ps(px[i] + c);
      m = _mm256_blendv_ps(_mm256_max_ps(v, m), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    _mm256_storeu_ps(y + c, m);
  }
  for (; c < C; ++c) {
    float m = px[0][c];
    for (int i = 1; i < n; ++i) {
      const float v = px[i][c];
      m = (v > m || v != v) ? v : m;
    }
    y[c] = m;
  }
}
__attribute__((target("avx512f"))) void pixel_max_avx512(const float* const* px, int n, float* y, int64_t C) {
  RF_PIXEL_MAX_BODY(Vec16, 16)
}
#pragma GCC diagnostic pop
#endif
#undef RF_PIXEL_MAX_BODY

using PixelMax = void (*)(const float* const*, int, float*, int64_t);

// The matrix-product kernels' choice of ISA (gemm_kernels.h: the CPU's, narrowed by
// RESNET_FUSED_CPU_ISA).
PixelMax pixel_max_for_this_cpu() {
#if defined(__x86_64__) && defined(__GNUC__)
  const std::string isa = tile_isa();
  if (isa == "avx512") return pixel_max_avx512;
  if (isa == "avx2") return pixel_max_avx2;
#endif
  return pixel_max_generic;
}

// PyTorch's pooling output size (aten/src/ATen/native/Pool.h): with ceil_mode the last window
// may hang over the edge, but must start inside the image or its left padding.
int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, bool ceil_mode) {
  const int64_t num = in + 2 * p - (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;  // (rounded down, as div_rtn)
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

Tensor max_pool2d_nhwc(const Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, bool ceil_mode) {
  RF_CHECK_DIM(input, 4, "input");
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, "resnet_fused: max_pool2d_nhwc is float32 only, got a ",
                   input.scalar_type(), " input");
  TORCH_CHECK_VALUE(input.device().is_cpu(), "resnet_fused: max_pool2d_nhwc is CPU only, got ", input.device());
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
                    "resnet_fused: max_pool2d_nhwc takes two values each for kernel_size, stride and padding");
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1], ph = padding[0],
                pw = padding[1];
  TORCH_CHECK_VALUE(kh > 0 && kw > 0 && sh > 0 && sw > 0, "resnet_fused: max_pool2d_nhwc: kernel_size and stride must be positive, got ",
                    kernel_size, " and ", stride);
  TORCH_CHECK_VALUE(ph >= 0 && pw >= 0 && ph <= kh / 2 && pw <= kw / 2,
                    "resnet_fused: max_pool2d_nhwc: padding must be at least 0 and at most half the kernel size, got ",
                    padding, " for kernel ", kernel_size);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t OH = pooled_size(H, kh, sh, ph, ceil_mode), OW = pooled_size(W, kw, sw, pw, ceil_mode);
  TORCH_CHECK_VALUE(OH > 0 && OW > 0, "resnet_fused: max_pool2d_nhwc: input of ", H, "x", W,
                    " is too small for kernel ", kernel_size, " (output ", OH, "x", OW, ")");
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  Tensor out = at::empty({N, C, OH, OW}, x.options().memory_format(cl));
  if (out.numel() == 0) return out;
  const float* xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  static const PixelMax pixel_max = pixel_max_for_this_cpu();
  at::parallel_for(0, N * OH, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, OW * C)), [&](int64_t r0, int64_t r1) {
    std::vector<const float*> px(kh * kw);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      const int64_t h0 = std::max<int64_t>(0, oh * sh - ph), h1 = std::min(H, oh * sh - ph + kh);
      for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t w0 = std::max<int64_t>(0, ow * sw - pw), w1 = std::min(W, ow * sw - pw + kw);
        int cnt = 0;
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) px[cnt++] = xp + ((n * H + h) * W + w) * C;
        }
        pixel_max(px.data(), cnt, yp + ((n * OH + oh) * OW + ow) * C, C);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("max_pool2d_nhwc", &max_pool2d_nhwc); }

}  // namespace resnet_fused::cpu
