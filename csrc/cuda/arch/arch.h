// Every GPU instruction our kernels use beyond plain arithmetic, behind one small API
// (namespace rf::arch), written twice: inline PTX for nvcc (ptx.h) and an emulation for the
// host compiler (emu.h, on csrc/emu's runtime). Kernel code calls only this: no raw `asm`,
// no static __shared__ arrays (dynamic shared memory only), global and shared accesses through
// ldg/stg/lds/sts, cp.async, ldmatrix; so the same source runs on a GPU and, checked, on the CPU.
//
// The API (both back ends):
//   RF_KERNEL, RF_DEVICE                     __global__ / __device__ __forceinline__
//   launch(name, kernel, grid, block, smem, stream, args...) -> cudaError_t
//   syncthreads(), syncwarp(), lane_id(), dynamic_smem()
//   ldg(p), stg(p, v), lds(p), sts(p, v)     T of 2, 4, 8 or 16 bytes, aligned to its size
//   cp_async_16(dst, src, src_bytes)         cp.async.cg 16 bytes; src_bytes < 16 zero-fills
//   cp_async_8(dst, src, src_bytes)          cp.async.ca 8 bytes
//   cp_async_commit(), cp_async_wait<N>()    commit_group / wait_group N
//   ldmatrix_x{1,2,4}[_trans](regs, row)     ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16
//   mma_f16(d, a, b, c), mma_bf16(...)       mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.*.f32
//   mma_tf32(d, a, b, c)                     mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
//   cvt_tf32(bits) -> bits                   cvt.rna.tf32.f32 (fp32 bits in, tf32 bits out)
//   shfl_xor(v, mask), shfl_idx(v, lane)     full-warp 32-bit shuffles
#pragma once

#if defined(__CUDACC__)
#include "ptx.h"
#else
#include "emu.h"
#endif
