// Register-blocked matrix-product kernels for the CPU convolutions, float32, with the epilogue
// (bias, residual, accumulate, ReLU keeping NaN) applied in registers before the one store.
//
// B (the weight) is packed once into panels of kPanel output channels: panel p holds, for each
// reduction index k, the kPanel weights of channels [p*kPanel, p*kPanel + kPanel) contiguous
// (zeros past the last channel), so each step of the inner loop loads one panel row and
// broadcasts one value of each A row (the activations, read in place: channels-last rows). This
// is how oneDNN's brgemm and MLAS's SGEMM kernels run a 1x1 convolution; the kernel is built per
// ISA (AVX-512: 12 rows x 32 columns in 24 accumulators; AVX2: 3 x 32 in 12 on packed panels,
// 6 x 16 on panels read in place; other CPUs: plain C++) and the CPU picks one at first use.
#pragma once

#include <cstdint>

namespace resnet_fused::cpu {

constexpr int64_t kPanel = 32;

// w: [n, kd] row-major (a channels-last conv weight [K, kh, kw, C]) -> packed
// [ceil(n / kPanel), kd, kPanel].
void pack_panels(const float* w, int64_t n, int64_t kd, float* packed);
// The inverse: packed -> w [n, kd].
void unpack_panels(const float* packed, int64_t n, int64_t kd, float* w);

// Rows a kernel call computes at most (the ISA's register tile).
int64_t tile_rows();

// The arguments of one register tile: rows x cols of C (rows <= tile_rows(), cols <= kPanel).
struct Tile {
  int64_t rows, cols, kd;
  const float* a;  // rows x kd, row stride lda
  int64_t lda;
  const float* b;  // one panel: kd rows of kPanel weights, row stride ldb (kPanel when packed)
  int64_t ldb;
  float* c;        // rows x cols, row stride ldc
  int64_t ldc;
  const float* bias;      // cols values, or null
  const float* residual;  // rows x cols, row stride ldr, or null
  int64_t ldr;
  bool accumulate;  // add what c holds
  bool relu;        // x < 0 ? 0 : x (NaN stays NaN, as torch.relu)
  // rows x kd at row stride lda to bring into L1 while this tile runs (the next tile's rows of A,
  // read in place from memory), or null. The AVX-512 and AVX2 kernels read it where kd is a multiple
  // of 16.
  const float* prefetch;
  // Weight to bring into L2 while this tile runs, or null: prefetch_b_floats floats from
  // prefetch_b, a packed panel's next chunk (the AVX2 3-row kernel asks for 4 lines every 16 steps,
  // 4 * kd floats a call, where kd is a multiple of 16). Where few rows share a chunk (batch 1's
  // late layers: 49 rows) its first tile otherwise waits on memory for the whole chunk.
  const float* prefetch_b = nullptr;
  int64_t prefetch_b_floats = 0;
};

// c = act(a @ panel + bias + residual [+ c]).
void run_tile(const Tile& t);

// The same for `rows` rows (any number: tiles of tile_rows() rows, or max_rows when smaller and
// positive) and the whole reduction t.kd, in chunks of at most 256 (a panel chunk of 32 KiB
// stays in L1 while the tiles pass); partial sums wait in c between chunks, the bias and
// residual come with the first, the ReLU with the last.
// t.rows and t.kd as given are ignored / read as the total; t.a, t.c, t.residual point at row 0;
// t.prefetch non-null: each tile prefetches the next tile's rows of A. A packed panel's tiles
// (t.ldb == kPanel) also share out the next chunk of the weight to prefetch: the panel's own, or
// after its last chunk the first of next_panel (the packed panel this thread runs next, or null).
void run_panel(Tile t, int64_t rows, int64_t max_rows = 0, const float* next_panel = nullptr);

// Which kernel run_tile uses: "avx512", "avx2" or "generic".
const char* tile_isa();

// This thread's scratch space for at least n floats (uninitialised, 64-byte aligned), kept
// between calls and grown when asked for more: the kernels' per-call buffers (im2col rows,
// Winograd chunks) cost no allocation, zeroing or page faults per call. Valid until this
// thread's next call.
float* scratch_floats(int64_t n);

}  // namespace resnet_fused::cpu
