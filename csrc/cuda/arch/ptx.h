// The arch layer for nvcc: each function is the PTX instruction it names (PTX ISA 8.x;
// sm_80 and later). See arch.h for the API and emu.h for its emulation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

#define RF_DEVICE __device__ __forceinline__
#define RF_KERNEL __global__

namespace rf::arch {

// Over 48 KiB of dynamic shared memory needs the kernel's limit raised first: once per kernel and
// device (not on every launch, nor inside a CUDA graph capture after the first call).
inline cudaError_t raise_smem_limit(const void* kernel, size_t smem) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> raised;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mu);
  if (raised.count({kernel, device})) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e == cudaSuccess) raised.insert({kernel, device});
  return e;
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) and returns the launch's error.
template <class... Params, class... Args>
inline cudaError_t launch(const char* /*name*/, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
  if (smem > 48 * 1024) {
    // (each of our kernels asks for the same amount on every launch)
    const cudaError_t e = raise_smem_limit(reinterpret_cast<const void*>(kernel), smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

inline const char* error_string(cudaError_t e) { return cudaGetErrorString(e); }

RF_DEVICE void syncthreads() { __syncthreads(); }
RF_DEVICE void syncwarp() { __syncwarp(); }

RF_DEVICE unsigned lane_id() {
  unsigned l;
  asm("mov.u32 %0, %%laneid;" : "=r"(l));
  return l;
}

RF_DEVICE char* dynamic_smem() {
  extern __shared__ __align__(128) char rf_dynamic_smem[];
  return rf_dynamic_smem;
}

template <class T>
RF_DEVICE T ldg(const T* p) {
  return *p;
}
template <class T>
RF_DEVICE void stg(T* p, const T& v) {
  *p = v;
}
template <class T>
RF_DEVICE T lds(const T* p) {
  return *p;
}
template <class T>
RF_DEVICE void sts(T* p, const T& v) {
  *p = v;
}

RF_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

RF_DEVICE void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
RF_DEVICE void cp_async_8(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
RF_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
RF_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

RF_DEVICE void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
}
RF_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
}
RF_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}
RF_DEVICE void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
}
RF_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
}
RF_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

RF_DEVICE void mma_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
RF_DEVICE void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// TF32: fp32 registers on the tensor cores' 10-bit mantissa. cvt_tf32 rounds to nearest, ties
// away from zero (cvt.rna.tf32.f32: the low 13 bits come out zero); m16n8k8 fragments: A a0..a3 =
// (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4); B b0, b1 = (t, g), (t + 4, g); C and D as m16n8k16.
RF_DEVICE uint32_t cvt_tf32(uint32_t bits) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(__uint_as_float(bits)));
  return r;
}
RF_DEVICE void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

RF_DEVICE uint32_t shfl_xor(uint32_t v, int lane_mask) { return __shfl_xor_sync(0xFFFFFFFFu, v, lane_mask); }
RF_DEVICE uint32_t shfl_idx(uint32_t v, int src_lane) { return __shfl_sync(0xFFFFFFFFu, v, src_lane); }

}  // namespace rf::arch
