// The arch layer for the host compiler: each function emulates the PTX instruction of the same
// name in ptx.h, on csrc/emu's runtime, with its checks. The fragment layouts follow the PTX ISA
// ("Matrix Fragments for mma.m16n8k16", "ldmatrix"); tests/test_emu_conformance.py checks them
// against a table written separately from the same text, and against dumps taken on a GPU.
// Every function takes the kernel's call site as a defaulted last argument, for the messages.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>

#include "../../emu/runtime.h"

#define RF_DEVICE inline
#define RF_KERNEL
#define RF_EMU_HERE ::rf::emu::Loc::current()

// CUDA's built-in variables, per emulated thread.
#define threadIdx (::rf::emu::thread_idx())
#define blockIdx (::rf::emu::block_idx())
#define blockDim (::rf::emu::block_dim())
#define gridDim (::rf::emu::grid_dim())
#define __syncthreads() ::rf::arch::syncthreads()
#define __syncwarp(...) ::rf::arch::syncwarp()
#undef __launch_bounds__
#define __launch_bounds__(...)
// Static shared arrays would be one array for every block and worker: not emulated.
#undef __shared__
#define __shared__ static_shared_arrays_are_not_emulated_use_rf_arch_dynamic_smem

namespace rf::arch {

using ::rf::emu::Loc;

namespace detail {
template <class... Params>
struct Call {
  void (*kernel)(Params...);
  std::tuple<std::decay_t<Params>...> args;
  static void run(const void* self) {
    const auto* c = static_cast<const Call*>(self);
    std::apply(c->kernel, c->args);
  }
};
}  // namespace detail

// Runs the kernel on the emulator. An emulator failure returns cudaErrorLaunchFailure; its
// message is error_string()'s.
template <class... Params, class... Args>
inline cudaError_t launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t /*stream*/, Args&&... args) {
  detail::Call<Params...> call{kernel, {std::forward<Args>(args)...}};
  const auto st = ::rf::emu::launch(name, {grid.x, grid.y, grid.z}, {block.x, block.y, block.z}, smem,
                                    &detail::Call<Params...>::run, &call);
  return st.ok ? cudaSuccess : cudaErrorLaunchFailure;
}

inline const char* error_string(cudaError_t e) {
  return e == cudaErrorLaunchFailure ? ::rf::emu::last_error().c_str() : "CUDA error (emulator)";
}

inline void syncthreads(Loc loc = RF_EMU_HERE) { ::rf::emu::syncthreads(loc); }
inline void syncwarp(Loc loc = RF_EMU_HERE) { ::rf::emu::syncwarp(0xFFFFFFFFu, loc); }
inline unsigned lane_id() { return unsigned(::rf::emu::lane_id()); }
inline char* dynamic_smem() { return ::rf::emu::dynamic_smem(); }

template <class T>
inline T ldg(const T* p, Loc loc = RF_EMU_HERE) {
  ::rf::emu::global_access(p, sizeof(T), false, "global load", loc);
  T v;
  std::memcpy(static_cast<void*>(&v), p, sizeof(T));
  return v;
}
template <class T>
inline void stg(T* p, const T& v, Loc loc = RF_EMU_HERE) {
  if (::rf::emu::drop_global_store()) return;
  ::rf::emu::global_access(p, sizeof(T), true, "global store", loc);
  std::memcpy(static_cast<void*>(p), &v, sizeof(T));
}
template <class T>
inline T lds(const T* p, Loc loc = RF_EMU_HERE) {
  ::rf::emu::shared_read(p, sizeof(T), "shared load", loc);
  T v;
  std::memcpy(static_cast<void*>(&v), p, sizeof(T));
  return v;
}
template <class T>
inline void sts(T* p, const T& v, Loc loc = RF_EMU_HERE) {
  ::rf::emu::shared_write(p, sizeof(T), "shared store", loc);
  std::memcpy(static_cast<void*>(p), &v, sizeof(T));
}

inline void cp_async_16(void* dst, const void* src, int src_bytes, Loc loc = RF_EMU_HERE) {
  ::rf::emu::cp_async(dst, src, 16, src_bytes, "cp.async.cg (16 bytes)", loc);
}
inline void cp_async_8(void* dst, const void* src, int src_bytes, Loc loc = RF_EMU_HERE) {
  ::rf::emu::cp_async(dst, src, 8, src_bytes, "cp.async.ca (8 bytes)", loc);
}
inline void cp_async_commit(Loc loc = RF_EMU_HERE) { ::rf::emu::cp_async_commit(loc); }
template <int N>
inline void cp_async_wait(Loc loc = RF_EMU_HERE) {
  ::rf::emu::cp_async_wait(N, loc);
}

// ---- ldmatrix -------------------------------------------------------------------------------
// Lanes 8m..8m+7 give the row addresses of matrix m (16 bytes each, 16-byte aligned); register
// m of lane l gets, without .trans, row l/4 columns 2(l%4) and 2(l%4)+1 (the lower column in
// the low half); with .trans, column l/4 of rows 2(l%4) and 2(l%4)+1.
namespace detail {
template <int X, bool Trans>
void ldmatrix_compute(::rf::emu::LaneSlot* lanes, int first_tid, Loc loc) {
  static const char* op = Trans ? "ldmatrix.trans" : "ldmatrix";
  uint16_t m[X][8][8];
  for (int mat = 0; mat < X; ++mat) {
    for (int row = 0; row < 8; ++row) {
      const int lane = mat * 8 + row;
      const void* p;
      std::memcpy(&p, lanes[lane].in, sizeof(p));
      if (reinterpret_cast<uintptr_t>(p) % 16) {
        ::rf::emu::fail(std::string(op) + ": row address of lane " + std::to_string(lane) + " is not 16-byte aligned",
                        loc);
      }
      if (!::rf::emu::is_shared(p)) {
        ::rf::emu::fail(std::string(op) + ": row address of lane " + std::to_string(lane) + " is not in shared memory",
                        loc);
      }
      ::rf::emu::shared_read_as(first_tid + lane, p, 16, op, loc);
      std::memcpy(m[mat][row], p, 16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    uint32_t r[X];
    for (int mat = 0; mat < X; ++mat) {
      uint16_t lo, hi;
      if (Trans) {
        lo = m[mat][2 * (l % 4)][l / 4];
        hi = m[mat][2 * (l % 4) + 1][l / 4];
      } else {
        lo = m[mat][l / 4][2 * (l % 4)];
        hi = m[mat][l / 4][2 * (l % 4) + 1];
      }
      r[mat] = uint32_t(lo) | uint32_t(hi) << 16;
    }
    std::memcpy(lanes[l].out, r, sizeof(r));
  }
}

template <int X, bool Trans>
inline void ldmatrix(uint32_t (&r)[X], const void* row, Loc loc) {
  static const char* op = X == 1   ? (Trans ? "ldmatrix.x1.trans" : "ldmatrix.x1")
                          : X == 2 ? (Trans ? "ldmatrix.x2.trans" : "ldmatrix.x2")
                                   : (Trans ? "ldmatrix.x4.trans" : "ldmatrix.x4");
  ::rf::emu::warp_collective(op, &row, sizeof(row), r, sizeof(r), &ldmatrix_compute<X, Trans>, loc);
}
}  // namespace detail

inline void ldmatrix_x1(uint32_t (&r)[1], const void* row, Loc loc = RF_EMU_HERE) { detail::ldmatrix<1, false>(r, row, loc); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row, Loc loc = RF_EMU_HERE) { detail::ldmatrix<2, false>(r, row, loc); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, Loc loc = RF_EMU_HERE) { detail::ldmatrix<4, false>(r, row, loc); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row, Loc loc = RF_EMU_HERE) { detail::ldmatrix<1, true>(r, row, loc); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row, Loc loc = RF_EMU_HERE) { detail::ldmatrix<2, true>(r, row, loc); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row, Loc loc = RF_EMU_HERE) { detail::ldmatrix<4, true>(r, row, loc); }

// ---- mma.sync m16n8k16, f32 accumulation ----------------------------------------------------
// Lane l, g = l / 4, t = l % 4. A (16x16, registers a0..a3 = elements e0..e7, e(2r) in the low
// half of a_r): row g for e in {0,1,4,5}, else g + 8; column 2t + (e & 1), + 8 for e >= 4.
// B (16x8, b0..b1 = e0..e3): row 2t + (e & 1), + 8 for e >= 2; column g. C and D (16x8, four
// floats): row g, + 8 for i >= 2; column 2t + (i & 1). The products are exact in float; the
// emulator sums them in double and rounds once (the tensor cores' rounding differs slightly:
// compare with a tolerance, never bit for bit).
namespace detail {
struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

inline float half_bits_to_float(uint16_t h) {
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
}
inline float bf16_bits_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// D = A B + C for the 16 x 8 tile, each lane's four D elements: products exact, summed in double,
// rounded once. KD: the reduction (16, or 8 for TF32).
template <int KD>
void mma_store_d(::rf::emu::LaneSlot* lanes, const double (&A)[16][KD], const double (&B)[KD][8],
                 const double (&C)[16][8]) {
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    float d[4];
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      double s = C[row][col];
      for (int k = 0; k < KD; ++k) s += A[row][k] * B[k][col];
      d[i] = float(s);
    }
    std::memcpy(lanes[l].out, d, sizeof(d));
  }
}

template <bool BF16>
void mma_compute(::rf::emu::LaneSlot* lanes, int, Loc) {
  double A[16][16], B[16][8], C[16][8];
  auto elem = [](uint32_t reg, int half) -> double {
    const uint16_t bits = uint16_t(half ? reg >> 16 : reg & 0xFFFF);
    return BF16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
  };
  for (int l = 0; l < 32; ++l) {
    MmaIn in;
    std::memcpy(&in, lanes[l].in, sizeof(in));
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 8; ++e) {
      const int row = g + ((e >> 1) & 1) * 8;
      const int col = 2 * t + (e & 1) + (e >= 4 ? 8 : 0);
      A[row][col] = elem(in.a[e / 2], e & 1);
    }
    for (int e = 0; e < 4; ++e) {
      const int row = 2 * t + (e & 1) + (e >= 2 ? 8 : 0);
      B[row][g] = elem(in.b[e / 2], e & 1);
    }
    for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = in.c[i];
  }
  mma_store_d<16>(lanes, A, B, C);
}
}  // namespace detail

namespace detail {
// One lane's part of an mma.sync: its fragments go to the warp's collective step, which runs `fn`
// (the fault injection's planted swap of a1 / a2 applied first).
template <typename Fn>
inline void mma_collective(const char* name, Fn fn, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                           const float (&c)[4], Loc loc) {
  MmaIn in{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  if (::rf::emu::launch_options().inject.swap_mma_a) std::swap(in.a[1], in.a[2]);
  ::rf::emu::warp_collective(name, &in, sizeof(in), d, sizeof(d), fn, loc);
}
}  // namespace detail

inline void mma_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                    Loc loc = RF_EMU_HERE) {
  detail::mma_collective("mma.m16n8k16.f16", &detail::mma_compute<false>, d, a, b, c, loc);
}
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                     Loc loc = RF_EMU_HERE) {
  detail::mma_collective("mma.m16n8k16.bf16", &detail::mma_compute<true>, d, a, b, c, loc);
}

// ---- TF32: cvt.rna.tf32.f32 and mma.sync m16n8k8 -----------------------------------------------
// cvt: round to nearest, ties away from zero, to 10 mantissa bits (the low 13 bits zero); NaN
// stays NaN, Inf stays Inf. mma: lane l, g = l / 4, t = l % 4: A (16x8) a0..a3 at (g, t),
// (g + 8, t), (g, t + 4), (g + 8, t + 4); B (8x8) b0, b1 at (t, g), (t + 4, g); C and D as for
// m16n8k16. The operands' low 13 bits are dropped (our kernels round them with cvt_tf32 first,
// so what the hardware does with them is never asked); products exact, summed in double.
inline uint32_t cvt_tf32(uint32_t bits, Loc = RF_EMU_HERE) {
  if ((bits & 0x7F800000u) == 0x7F800000u) return (bits & 0x007FFFFFu) ? 0x7FFFFFFFu : bits;  // NaN, Inf
  return (bits + 0x1000u) & 0xFFFFE000u;  // half of the dropped part added to the magnitude: ties away
}
namespace detail {
inline double tf32_value(uint32_t bits) {
  bits &= 0xFFFFE000u;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void mma_tf32_compute(::rf::emu::LaneSlot* lanes, int, Loc) {
  double A[16][8], B[8][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    MmaIn in;
    std::memcpy(&in, lanes[l].in, sizeof(in));
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) A[g + (e & 1) * 8][t + (e >> 1) * 4] = tf32_value(in.a[e]);
    for (int e = 0; e < 2; ++e) B[t + e * 4][g] = tf32_value(in.b[e]);
    for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = in.c[i];
  }
  mma_store_d<8>(lanes, A, B, C);
}
}  // namespace detail

inline void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                     Loc loc = RF_EMU_HERE) {
  detail::mma_collective("mma.m16n8k8.tf32", &detail::mma_tf32_compute, d, a, b, c, loc);
}

// ---- shuffles -------------------------------------------------------------------------------
namespace detail {
template <int Kind>  // 0: xor, 1: idx
void shfl_compute(::rf::emu::LaneSlot* lanes, int, Loc) {
  uint32_t v[32];
  int arg[32];
  for (int l = 0; l < 32; ++l) {
    std::memcpy(&v[l], lanes[l].in, 4);
    std::memcpy(&arg[l], lanes[l].in + 4, 4);
  }
  for (int l = 0; l < 32; ++l) {
    const int src = (Kind == 0 ? (l ^ arg[l]) : arg[l]) & 31;
    std::memcpy(lanes[l].out, &v[src], 4);
  }
}
}  // namespace detail

inline uint32_t shfl_xor(uint32_t v, int lane_mask, Loc loc = RF_EMU_HERE) {
  const uint32_t in[2] = {v, uint32_t(lane_mask)};
  uint32_t out;
  ::rf::emu::warp_collective("shfl.sync.bfly", in, sizeof(in), &out, 4, &detail::shfl_compute<0>, loc);
  return out;
}
inline uint32_t shfl_idx(uint32_t v, int src_lane, Loc loc = RF_EMU_HERE) {
  const uint32_t in[2] = {v, uint32_t(src_lane)};
  uint32_t out;
  ::rf::emu::warp_collective("shfl.sync.idx", in, sizeof(in), &out, 4, &detail::shfl_compute<1>, loc);
  return out;
}

}  // namespace rf::arch
