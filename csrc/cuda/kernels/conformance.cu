// The conformance kernel (see conformance.h): one warp, one instruction, every lane's result.
#include <cstring>

#include "../arch/arch.h"
#include "conformance.h"

namespace resnet_fused::cuda {
namespace {

RF_KERNEL void conformance_kernel(ConformanceParams p) {
  const int l = int(threadIdx.x);
  char* smem = rf::arch::dynamic_smem();
  const uint32_t* in = p.in + l * kConformanceInWords;
  uint32_t out[kConformanceOutWords] = {0, 0, 0, 0};
  const auto op = ConformanceOp(p.op);
  if (op <= ConformanceOp::kLdmatrixX4Trans) {
    for (int j = 0; j < 4; ++j) {
      rf::arch::sts(reinterpret_cast<uint32_t*>(smem + l * 16) + j, rf::arch::ldg(p.tile + l * 4 + j));
    }
    rf::arch::syncthreads();
    const char* row = smem + (rf::arch::ldg(in) % 32) * 16;
    switch (op) {
      case ConformanceOp::kLdmatrixX1: {
        uint32_t r[1];
        rf::arch::ldmatrix_x1(r, row);
        out[0] = r[0];
        break;
      }
      case ConformanceOp::kLdmatrixX2: {
        uint32_t r[2];
        rf::arch::ldmatrix_x2(r, row);
        out[0] = r[0];
        out[1] = r[1];
        break;
      }
      case ConformanceOp::kLdmatrixX4: {
        uint32_t r[4];
        rf::arch::ldmatrix_x4(r, row);
        for (int j = 0; j < 4; ++j) out[j] = r[j];
        break;
      }
      case ConformanceOp::kLdmatrixX1Trans: {
        uint32_t r[1];
        rf::arch::ldmatrix_x1_trans(r, row);
        out[0] = r[0];
        break;
      }
      case ConformanceOp::kLdmatrixX2Trans: {
        uint32_t r[2];
        rf::arch::ldmatrix_x2_trans(r, row);
        out[0] = r[0];
        out[1] = r[1];
        break;
      }
      default: {
        uint32_t r[4];
        rf::arch::ldmatrix_x4_trans(r, row);
        for (int j = 0; j < 4; ++j) out[j] = r[j];
        break;
      }
    }
  } else if (op == ConformanceOp::kCvtTf32) {
    for (int j = 0; j < 4; ++j) out[j] = rf::arch::cvt_tf32(rf::arch::ldg(in + j));
  } else if (op == ConformanceOp::kMmaF16 || op == ConformanceOp::kMmaBF16 || op == ConformanceOp::kMmaTf32) {
    uint32_t a[4], b[2];
    float c[4], d[4];
    for (int j = 0; j < 4; ++j) a[j] = rf::arch::ldg(in + j);
    for (int j = 0; j < 2; ++j) b[j] = rf::arch::ldg(in + 4 + j);
    for (int j = 0; j < 4; ++j) {
      const uint32_t bits = rf::arch::ldg(in + 6 + j);
      std::memcpy(&c[j], &bits, 4);
    }
    if (op == ConformanceOp::kMmaF16) {
      rf::arch::mma_f16(d, a, b, c);
    } else if (op == ConformanceOp::kMmaTf32) {
      rf::arch::mma_tf32(d, a, b, c);
    } else {
      rf::arch::mma_bf16(d, a, b, c);
    }
    std::memcpy(out, d, sizeof(d));
  } else if (op == ConformanceOp::kShflXor) {
    out[0] = rf::arch::shfl_xor(rf::arch::ldg(in), int(rf::arch::ldg(in + 1)));
  } else if (op == ConformanceOp::kShflIdx) {
    out[0] = rf::arch::shfl_idx(rf::arch::ldg(in), int(rf::arch::ldg(in + 1)));
  } else {
    const bool wide = op == ConformanceOp::kCpAsync16;
    const int bytes = wide ? 16 : 8;
    char* dst = smem + l * bytes;
    const char* src = reinterpret_cast<const char*>(p.tile) + l * bytes;
    const int src_size = int(rf::arch::ldg(in)) % (bytes + 1);
    if (wide) {
      rf::arch::cp_async_16(dst, src, src_size);
    } else {
      rf::arch::cp_async_8(dst, src, src_size);
    }
    rf::arch::cp_async_commit();
    rf::arch::cp_async_wait<0>();
    const auto* got = reinterpret_cast<const uint32_t*>(dst);
    out[0] = rf::arch::lds(got);
    out[1] = rf::arch::lds(got + 1);
    if (wide) {
      out[2] = rf::arch::lds(got + 2);
      out[3] = rf::arch::lds(got + 3);
    }
  }
  for (int j = 0; j < kConformanceOutWords; ++j) rf::arch::stg(p.out + l * kConformanceOutWords + j, out[j]);
}

}  // namespace

cudaError_t launch_conformance(const ConformanceParams& p, cudaStream_t stream) {
  return rf::arch::launch("conformance_kernel", &conformance_kernel, dim3(1), dim3(32), 512, stream, p);
}

}  // namespace resnet_fused::cuda
