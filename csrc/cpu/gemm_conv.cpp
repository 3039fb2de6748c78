// Convolution as matrix products on CPU, float32, channels-last, with the whole epilogue (bias,
// residual add, ReLU) applied in registers before each block of the output is stored.
//
// In channels-last a convolution is a matrix product: each output pixel's row of K channels is
// its receptive field (kh x kw x C values, the "im2col" row) times the weight seen as a
// [K, kh*kw*C] matrix, which is exactly the channels-last weight's memory. For a 1x1 stride-1
// convolution the im2col rows *are* the input's rows, so the input is read in place; strided 1x1s
// gather their rows, larger kernels build them (ResNet's 7x7 stem: 147 values, 7 runs of 21).
//
// The weight is packed once (gemm_prepack) into panels of 32 output channels (gemm_kernels.h);
// a plain weight passed instead is packed on each call. Blocking: the output pixels are cut into
// blocks whose rows stay in L2 while every panel passes over them; where there are too few
// blocks for the threads (batch 1, late layers), the panels are split into groups too. Each
// thread takes whole (block, group) items, first from its own contiguous run of them, then from
// the back of another's (Runs: the same rows on the same core layer after layer, and a slowed
// core takes fewer), and runs the register-tile kernel over them; in place (residual == output) the tiles accumulate
// into the residual. So the input, the weight and the output (and the residual) each pass
// through memory once, and nothing but the kernel's own registers holds partial sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#if defined(__linux__)
#include <unistd.h>
#endif

#include "../checks.h"
#include "gemm_kernels.h"

namespace resnet_fused::cpu {
namespace {

using at::Tensor;

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

// n floats from src to dst: a loop the compiler vectorises, inlined (the runs are short: the 7x7
// stem's are 21 floats, where a memcpy call cost more than its copy).
inline void copy_floats(float* __restrict dst, const float* __restrict src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = src[k];
}

inline void zero_floats(float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = 0.0f;
}

// The im2col rows of output pixels [r0, r0 + rows) into a (row stride lda); zeros outside the image.
// The pixel's (n, oh, ow) advance with the row (no divisions per row).
void im2col_rows(const Geometry& g, const float* x, int64_t r0, int64_t rows, float* a, int64_t lda) {
  int64_t n = r0 / (g.OH * g.OW), oh = (r0 / g.OW) % g.OH, ow = r0 % g.OW;
  const int64_t run = g.kw * g.C;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = a + r * lda;
    const int64_t w0 = ow * g.sw - g.pw;
    // the kernel's columns that fall inside the image: [j0, j1)
    const int64_t j0 = std::max<int64_t>(0, -w0), j1 = std::min<int64_t>(g.kw, g.W - w0);
    const float* image = x + n * g.H * g.W * g.C;
    for (int64_t i = 0; i < g.kh; ++i) {
      float* dst = row + i * run;
      const int64_t h = oh * g.sh - g.ph + i;
      if (h < 0 || h >= g.H || j1 <= j0) {
        zero_floats(dst, run);
        continue;
      }
      if (j0 > 0) zero_floats(dst, j0 * g.C);
      copy_floats(dst + j0 * g.C, image + (h * g.W + w0 + j0) * g.C, (j1 - j0) * g.C);
      if (j1 < g.kw) zero_floats(dst + j1 * g.C, (g.kw - j1) * g.C);
    }
    if (++ow == g.OW) {
      ow = 0;
      if (++oh == g.OH) {
        oh = 0;
        ++n;
      }
    }
  }
}

// Rows per register tile. On a CPU with a 32 KiB L1 (AMD Zen) a panel's 256-step chunk (32 KiB)
// already fills it, and the rows of A a tile streams beside it evict panel rows: 8-row tiles ran
// faster than 12 there on every ResNet-50 shape, read in place or built. Larger L1s (48 KiB on
// recent Intel cores, where 12 rows were chosen) keep the kernel's full tile.
int64_t conv_tile_rows() {
  static const int64_t rows = [] {
    long l1 = -1;
#if defined(__linux__) && defined(_SC_LEVEL1_DCACHE_SIZE)
    l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
#endif
    return l1 > 0 && l1 < (48 << 10) ? std::min<int64_t>(8, tile_rows()) : tile_rows();
  }();
  return rows;
}

// How the work is cut: row blocks of `tiles` register tiles, panel groups of `panels` panels.
struct Split {
  int64_t tiles, panels;
};

// A register tile of n < mr rows costs about (n + 1) / (mr + 1) of a full one (its panel loads).
double rows_cost(int64_t n, int64_t mr) {
  return double(n / mr) + (n % mr ? double(n % mr + 1) / double(mr + 1) : 0.0);
}

// When the last thread is done, in full tile-panels, if the threads take the items (row block
// major, as gemm_conv_run numbers them) from a counter, each the next as it finishes one (Runs
// deals them in runs and balances them by stealing: about the same finish).
double makespan(int64_t M, int64_t mr, int64_t panels, Split s, int64_t threads) {
  std::vector<double> busy(static_cast<size_t>(threads), 0.0);  // a min-heap of finishing times
  const auto later = std::greater<double>();
  const int64_t rows = s.tiles * mr;
  for (int64_t r0 = 0; r0 < M; r0 += rows) {
    const double row_cost = rows_cost(std::min(rows, M - r0), mr);
    for (int64_t p0 = 0; p0 < panels; p0 += s.panels) {
      std::pop_heap(busy.begin(), busy.end(), later);
      busy.back() += row_cost * double(std::min(s.panels, panels - p0));
      std::push_heap(busy.begin(), busy.end(), later);
    }
  }
  return *std::max_element(busy.begin(), busy.end());
}

// The cut given (blocks of tiles_per_block tiles from the L2 budget, groups of panels_per_group
// panels from the thread count), or one with smaller blocks or groups where that ends at least 3%
// sooner: items that do not divide among the threads (49 rows in blocks of 36 and 13 on 2 threads
// left one core idle most of the time). Smaller cuts read the weight or the input once more per
// extra item, so they are taken only where they clearly pay.
Split search_balance(int64_t M, int64_t mr, int64_t panels, int64_t tiles_per_block, int64_t panels_per_group,
                     int64_t threads) {
  Split best{tiles_per_block, panels_per_group};
  if (threads <= 1) return best;
  double best_time = makespan(M, mr, panels, best, threads);
  const int64_t tiles = (M + mr - 1) / mr;
  const double ideal = rows_cost(M, mr) * double(panels) / double(threads);
  if (best_time <= 1.03 * ideal) return best;
  // Fewer items first: a cut replaces the best only when it ends 3% sooner.
  std::vector<std::pair<int64_t, Split>> cuts;  // (items, cut)
  const int64_t blocks0 = (tiles + tiles_per_block - 1) / tiles_per_block;
  for (int64_t groups = (panels + panels_per_group - 1) / panels_per_group; groups <= std::min<int64_t>(panels, 8);
       ++groups) {
    const int64_t per = (panels + groups - 1) / groups;
    for (int64_t blocks = blocks0; blocks <= std::min<int64_t>(tiles, 2 * blocks0 + threads); ++blocks) {
      const Split s{(tiles + blocks - 1) / blocks, per};
      cuts.push_back({((tiles + s.tiles - 1) / s.tiles) * ((panels + per - 1) / per), s});
    }
  }
  std::stable_sort(cuts.begin(), cuts.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& cut : cuts) {
    const double t = makespan(M, mr, panels, cut.second, threads);
    if (t < 0.97 * best_time) {
      best = cut.second;
      best_time = t;
    }
  }
  return best;
}

// search_balance, remembered per thread for the last 32 geometries (a model calls the same few
// layers over and over; the search costs a few microseconds, a small layer's call a few hundred).
Split balance(int64_t M, int64_t mr, int64_t panels, int64_t tiles_per_block, int64_t panels_per_group,
              int64_t threads) {
  struct Entry {
    int64_t key[6];
    Split split;
  };
  thread_local Entry memo[32];
  thread_local int next_slot = 0;
  const int64_t key[6] = {M, mr, panels, tiles_per_block, panels_per_group, threads};
  for (const Entry& e : memo) {
    if (std::equal(key, key + 6, e.key)) return e.split;
  }
  const Split split = search_balance(M, mr, panels, tiles_per_block, panels_per_group, threads);
  Entry& e = memo[next_slot];
  next_slot = (next_slot + 1) % 32;
  std::copy(key, key + 6, e.key);
  e.split = split;
  return split;
}

// Items 0..n-1 dealt to `workers` workers in contiguous runs, in order (worker w: the w-th run),
// each run taken from its front by its owner and from its back by a worker whose own run is done.
// So in a model called again and again each core computes the same rows (or panels) of every
// layer, whose inputs the layer before mostly left in that core's caches; and a slowed core's
// items still go to the others.
class Runs {
 public:
  Runs(int64_t n, int64_t workers) : spans_(new Span[size_t(workers)]), workers_(workers) {
    TORCH_CHECK(n < (int64_t(1) << 31), "resnet_fused: too many work items");
    const int64_t per = (n + workers - 1) / workers;
    for (int64_t w = 0; w < workers; ++w) {
      spans_[w].v.store(pack(std::min(n, w * per), std::min(n, (w + 1) * per)), std::memory_order_relaxed);
    }
  }
  // Worker w's next item: the front of its own run, else the back of another's; -1 when all are done.
  int64_t next(int64_t w) {
    int64_t item = take(w, true);
    for (int64_t k = 1; item < 0 && k < workers_; ++k) item = take((w + k) % workers_, false);
    return item;
  }

 private:
  struct alignas(64) Span {
    std::atomic<uint64_t> v{0};  // (front << 32) | back
  };
  static uint64_t pack(int64_t front, int64_t back) { return (uint64_t(front) << 32) | uint64_t(back); }
  int64_t take(int64_t w, bool front) {
    uint64_t s = spans_[w].v.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t f = int64_t(s >> 32), b = int64_t(s & 0xffffffffu);
      if (f >= b) return -1;
      if (spans_[w].v.compare_exchange_weak(s, front ? pack(f + 1, b) : pack(f, b - 1), std::memory_order_relaxed)) {
        return front ? f : b - 1;
      }
    }
  }
  std::unique_ptr<Span[]> spans_;
  int64_t workers_;
};

// out (NHWC; may be the residual itself, then `residual` is null and `accumulate` true)
//   = act(conv(x, w) + bias [+ residual] [+ out]).
// packed: the weight in panels (pack_panels of the channels-last [K, kh, kw, C] weight).
void gemm_conv_run(const Geometry& g, const float* x, const float* packed, const float* bias, const float* residual,
                   float* out, bool accumulate, bool relu) {
  const int64_t threads = at::get_num_threads();
  // Rows read in place are a multiple of 4 KiB apart where Kd is a multiple of 1024: they all
  // fall in one L1 set (8 ways). Tiles of at most 8 rows then, so that a tile's rows never evict
  // each other (measured faster than 12-row tiles and than copying the rows to a padded stride).
  const int64_t mr = g.direct && g.Kd % 1024 == 0 ? std::min<int64_t>(8, tile_rows()) : conv_tile_rows();
  const int64_t panels = (g.K + kPanel - 1) / kPanel;
  const int64_t tiles = (g.M + mr - 1) / mr;
  // Every item reads its rows' A block once (kept in L2 while its panels pass over it) and its
  // panels once (each kept in L1/L2 while the block's tiles pass under it): the weight is read
  // once per row block, the input once per panel group. Blocks: A rows in about 512 KiB of L2.
  const int64_t budget = int64_t(512) << 10;
  const int64_t fit = std::min(tiles, std::max<int64_t>(1, (g.M * g.Kd * 4 + budget - 1) / budget));
  // Items in a multiple of the threads where the blocks allow (equal items on a 2-core machine:
  // 7 items would leave one core idle an eighth of the time).
  int64_t row_blocks, groups = 1;
  if (fit >= threads) {
    row_blocks = std::min(tiles, (fit + threads - 1) / threads * threads);
  } else if (panels * kPanel > g.M) {
    // Too few blocks for the threads, and the weight outweighs the rows (late layers, batch
    // 1): split the panels, each group reading its share of the weight once.
    row_blocks = fit;
    groups = std::min(panels, (threads + fit - 1) / fit);
  } else {
    row_blocks = std::min(tiles, threads);
    groups = std::min(panels, (threads + row_blocks - 1) / row_blocks);
  }
  // Equal blocks of whole tiles.
  const Split split = balance(g.M, mr, panels, (tiles + row_blocks - 1) / row_blocks, (panels + groups - 1) / groups,
                              threads);
  const int64_t rows = split.tiles * mr, per_group = split.panels;
  row_blocks = (g.M + rows - 1) / rows;
  groups = (panels + per_group - 1) / per_group;
  const int64_t items = row_blocks * groups;
  const int64_t workers = std::min<int64_t>(threads, items);
  Runs deal(items, workers);
  // A 1x1 stride-1 convolution reads its rows in place; the rows built for other shapes go to a
  // buffer whose row stride is 64 bytes longer than Kd (no L1 set conflicts between them).
  const bool in_place = g.direct;
  const int64_t lda = in_place ? g.Kd : g.Kd + 16;
  at::parallel_for(0, workers, 1, [&](int64_t w, int64_t) {
    float* buffer = in_place ? nullptr : scratch_floats(rows * lda);
    int64_t built = -1;  // the row block whose rows the buffer holds
    for (int64_t item = deal.next(w); item >= 0; item = deal.next(w)) {
      const int64_t rb = item / groups, p0 = (item % groups) * per_group;
      const int64_t p1 = std::min(panels, p0 + per_group);
      const int64_t r0 = rb * rows, nr = std::min(rows, g.M - r0);
      const float* a;
      if (in_place) {
        a = x + r0 * g.C;
      } else {
        if (built != rb) im2col_rows(g, x, r0, nr, buffer, lda);
        built = rb;
        a = buffer;
      }
      Tile t{};
      t.lda = lda;
      t.ldb = kPanel;
      t.ldc = g.K;
      t.ldr = g.K;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel;
        t.cols = std::min(kPanel, g.K - n0);
        t.kd = g.Kd;
        t.a = a;
        t.b = packed + p * g.Kd * kPanel;
        t.c = out + r0 * g.K + n0;
        t.bias = bias ? bias + n0 : nullptr;
        t.residual = residual ? residual + r0 * g.K + n0 : nullptr;
        t.accumulate = accumulate;
        t.relu = relu;
        // The first panel reads the block's rows from memory: each tile prefetches the next's.
        t.prefetch = p == p0 && in_place ? a : nullptr;
        run_panel(t, nr, mr, p + 1 < p1 ? packed + (p + 1) * g.Kd * kPanel : nullptr);
      }
    }
  });
}

// A packed weight: [ceil(K / 32), kh, kw, C, 32] float32, dense (gemm_prepack's output).
bool is_packed(const Tensor& weight) { return weight.dim() == 5; }

// The weight's [K, C, kh, kw] shape as a tensor for the shared checks: the plain weight itself, or
// for a packed one a view of that shape with zero strides (nothing allocated).
Tensor logical_weight(const Tensor& weight, int64_t out_channels) {
  if (!is_packed(weight)) {
    TORCH_CHECK_VALUE(out_channels < 0 || weight.dim() != 4 || out_channels == weight.size(0),
                      "resnet_fused: out_channels=", out_channels, " but the weight has ", weight.size(0));
    return weight;
  }
  TORCH_CHECK_VALUE(out_channels > 0, "resnet_fused: a packed weight (from gemm_prepack) needs out_channels, got ",
                    out_channels);
  TORCH_CHECK_VALUE(weight.size(4) == kPanel && weight.size(0) == (out_channels + kPanel - 1) / kPanel &&
                        weight.is_contiguous(),
                    "resnet_fused: a packed weight for ", out_channels, " output channels must be a contiguous [",
                    (out_channels + kPanel - 1) / kPanel, ", kh, kw, C, ", kPanel, "] tensor from gemm_prepack, got ",
                    shape_str(weight.sizes()));
  return weight.as_strided({out_channels, weight.size(3), weight.size(1), weight.size(2)}, {0, 0, 0, 0});
}

std::vector<int64_t> check_gemm_conv_args(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                          const std::optional<Tensor>& residual, at::IntArrayRef stride,
                                          at::IntArrayRef padding) {
  const std::vector<int64_t> dilation{1, 1};
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2,
                    "resnet_fused: stride and padding must have 2 values each, got ", stride.size(), " and ",
                    padding.size());
  TORCH_CHECK_VALUE(!input.is_mkldnn() && !weight.is_mkldnn(),
                    "resnet_fused: gemm_conv2d_bias_act takes dense CPU tensors, got an mkldnn-layout ",
                    input.is_mkldnn() ? "input" : "weight");
  const auto out_shape = check_conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, 1);
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, "resnet_fused: gemm_conv2d_bias_act is float32 only, got a ",
                   input.scalar_type(), " input");
  TORCH_CHECK_VALUE(input.device().is_cpu(), "resnet_fused: gemm_conv2d_bias_act takes CPU tensors, got input on ",
                    input.device());
  return out_shape;
}

// The weight in panels: packed as it is, or a plain one packed now.
Tensor panels_of(const Tensor& weight, const Tensor& logical) {
  if (is_packed(weight)) return weight;
  const Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t K = w.size(0), kd = w.numel() / std::max<int64_t>(K, 1);
  Tensor packed = at::empty({(K + kPanel - 1) / kPanel, w.size(2), w.size(3), w.size(1), kPanel}, w.options());
  if (packed.numel() > 0) pack_panels(w.data_ptr<float>(), K, kd, packed.data_ptr<float>());
  return packed;
}

// act(conv2d(input, weight, stride, padding) + bias [+ residual]), dilation 1, groups 1.
// Output channels-last.
Tensor gemm_conv2d_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                            const std::optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                            bool relu, int64_t out_channels) {
  const Tensor logical = logical_weight(weight, out_channels);
  const auto out_shape = check_gemm_conv_args(input, logical, bias, residual, stride, padding);
  const auto cl = at::MemoryFormat::ChannelsLast;
  Tensor out = at::empty(out_shape, input.options().memory_format(cl));
  if (out.numel() == 0) return out;
  const Tensor x = input.contiguous(cl);
  const Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
  const Tensor r = residual.has_value() ? residual->contiguous(cl) : Tensor();
  if (x.numel() == 0) {  // (an empty image with padding, or no input channels: the products are zero)
    out.zero_();
    if (b.defined()) out.add_(b.view({1, -1, 1, 1}));
    if (r.defined()) out.add_(r);
    if (relu) out.relu_();
    return out;
  }
  const Tensor w = panels_of(weight, logical);
  gemm_conv_run(Geometry(x, logical, stride, padding), x.data_ptr<float>(), w.data_ptr<float>(),
                b.defined() ? b.data_ptr<float>() : nullptr, r.defined() ? r.data_ptr<float>() : nullptr,
                out.data_ptr<float>(), false, relu);
  return out;
}

// The same into the residual: residual = act(conv2d(...) + bias + residual).
void gemm_conv2d_bias_act_(Tensor& residual, const Tensor& input, const Tensor& weight,
                           const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                           bool relu, int64_t out_channels) {
  const Tensor logical = logical_weight(weight, out_channels);
  check_gemm_conv_args(input, logical, bias, residual, stride, padding);
  if (residual.numel() == 0) return;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  if (!residual.is_contiguous(cl) || x.numel() == 0 || x.data_ptr() == residual.data_ptr()) {
    residual.copy_(gemm_conv2d_bias_act(input, weight, bias, residual, stride, padding, relu, out_channels));
    return;
  }
  const Tensor w = panels_of(weight, logical);
  const Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
  gemm_conv_run(Geometry(x, logical, stride, padding), x.data_ptr<float>(), w.data_ptr<float>(),
                b.defined() ? b.data_ptr<float>() : nullptr, nullptr, residual.data_ptr<float>(), true, relu);
}

// The weight [K, C, kh, kw] (float32, any layout) in panels: [ceil(K / 32), kh, kw, C, 32].
Tensor gemm_prepack(const Tensor& weight) {
  RF_CHECK_DIM(weight, 4, "weight");
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, "resnet_fused: gemm_prepack is float32 only, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device().is_cpu() && !weight.is_mkldnn(),
                    "resnet_fused: gemm_prepack takes a dense CPU weight");
  return panels_of(weight, weight);
}

// gemm_prepack's inverse: the channels-last [K, C, kh, kw] weight.
Tensor gemm_unpack(const Tensor& packed, int64_t out_channels) {
  const Tensor logical = logical_weight(packed, out_channels);
  TORCH_CHECK_VALUE(is_packed(packed) && packed.scalar_type() == at::kFloat && packed.device().is_cpu(),
                    "resnet_fused: gemm_unpack takes a float32 CPU weight from gemm_prepack");
  Tensor w = at::empty(logical.sizes(), packed.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (w.numel() > 0) {
    unpack_panels(packed.data_ptr<float>(), out_channels, w.numel() / out_channels, w.data_ptr<float>());
  }
  return w;
}

}  // namespace

// (no tensor arguments: a CompositeExplicitAutograd kernel, callable with no dispatch key)
TORCH_LIBRARY_IMPL(resnet_fused, CompositeExplicitAutograd, m) {
  m.impl("gemm_isa", [] { return std::string(tile_isa()); });
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("gemm_conv2d_bias_act", &gemm_conv2d_bias_act);
  m.impl("gemm_conv2d_bias_act_", &gemm_conv2d_bias_act_);
  m.impl("gemm_prepack", &gemm_prepack);
  m.impl("gemm_unpack", &gemm_unpack);
}

// (an opaque oneDNN weight reaches the checks above, for a clear error rather than the
// dispatcher's "no kernel for MkldnnCPU")
TORCH_LIBRARY_IMPL(resnet_fused, MkldnnCPU, m) {
  m.impl("gemm_conv2d_bias_act", &gemm_conv2d_bias_act);
  m.impl("gemm_conv2d_bias_act_", &gemm_conv2d_bias_act_);
  m.impl("gemm_prepack", &gemm_prepack);
}

}  // namespace resnet_fused::cpu
