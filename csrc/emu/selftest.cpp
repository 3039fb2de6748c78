// The emulator's self-tests (selftest.h): kernels written like ours, on the arch layer, each
// with one bug of the kinds a GPU runs silently, wrong, or never finishes.
#include "selftest.h"

#include <cstring>
#include <functional>
#include <map>

#include "../cuda/arch/arch.h"

namespace rf::emu {
namespace {

struct Args {
  float* out;          // 64 floats, writable
  const float* in;     // 64 floats, read-only
  const char* name;
};

using Kernel = void (*)(Args);

RF_KERNEL void divergent_shuffle(Args a) {
  uint32_t v = threadIdx.x;
  if (threadIdx.x % 32 < 16) {
    v = rf::arch::shfl_xor(v, 1);
  } else {
    v = rf::arch::shfl_xor(v, 2);
  }
  rf::arch::stg(a.out + threadIdx.x, float(v));
}

RF_KERNEL void deadlock(Args a) {
  uint32_t v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = rf::arch::shfl_xor(v, 1);  // half a warp at a collective ...
  rf::arch::syncthreads();                                   // ... the other half at a barrier
  rf::arch::stg(a.out + threadIdx.x, float(v));
}

RF_KERNEL void exited_lane(Args a) {
  if (threadIdx.x == 5) return;
  rf::arch::stg(a.out + threadIdx.x, float(rf::arch::shfl_idx(threadIdx.x, 0)));
}

RF_KERNEL void missing_barrier(Args a) {
  float* s = reinterpret_cast<float*>(rf::arch::dynamic_smem());
  if (threadIdx.x == 0) rf::arch::sts(s, 1.f);
  if (threadIdx.x == 1) rf::arch::stg(a.out, rf::arch::lds(s));
}

RF_KERNEL void ok_barrier(Args a) {
  float* s = reinterpret_cast<float*>(rf::arch::dynamic_smem());
  if (threadIdx.x == 0) rf::arch::sts(s, 1.f);
  rf::arch::syncthreads();
  if (threadIdx.x == 1) rf::arch::stg(a.out, rf::arch::lds(s));
}

RF_KERNEL void overwrite_race(Args a) {
  float* s = reinterpret_cast<float*>(rf::arch::dynamic_smem());
  if (threadIdx.x == 0) rf::arch::sts(s, 1.f);
  rf::arch::syncthreads();
  const float v = rf::arch::lds(s);
  if (threadIdx.x == 0) rf::arch::sts(s, 2.f);  // others may not have read it yet
  rf::arch::stg(a.out + threadIdx.x, v);
}

RF_KERNEL void ok_syncwarp(Args a) {
  float* s = reinterpret_cast<float*>(rf::arch::dynamic_smem());
  if (threadIdx.x == 0) rf::arch::sts(s, 1.f);
  rf::arch::syncwarp();
  if (threadIdx.x == 1) rf::arch::stg(a.out, rf::arch::lds(s));
}

RF_KERNEL void uninitialised(Args a) {
  const float* s = reinterpret_cast<const float*>(rf::arch::dynamic_smem());
  rf::arch::stg(a.out + threadIdx.x, rf::arch::lds(s + 8));
}

RF_KERNEL void out_of_bounds(Args a) { rf::arch::stg(a.out + threadIdx.x, rf::arch::ldg(a.in + threadIdx.x + 1)); }

RF_KERNEL void read_only_store(Args a) { rf::arch::stg(const_cast<float*>(a.in) + threadIdx.x, 1.f); }

RF_KERNEL void misaligned(Args a) {
  const float4 v = rf::arch::ldg(reinterpret_cast<const float4*>(a.in + 1));
  rf::arch::stg(a.out + threadIdx.x, v.x);
}

RF_KERNEL void smem_overflow(Args a) {
  float* s = reinterpret_cast<float*>(rf::arch::dynamic_smem());
  rf::arch::sts(s + 64 + threadIdx.x, 1.f);  // 256 bytes of dynamic shared memory
  rf::arch::stg(a.out + threadIdx.x, 0.f);
}

RF_KERNEL void cp_async_not_waited(Args a) {
  char* s = rf::arch::dynamic_smem();
  if (threadIdx.x < 16) rf::arch::cp_async_16(s + 16 * threadIdx.x, a.in + 4 * threadIdx.x, 16);
  rf::arch::cp_async_commit();
  rf::arch::stg(a.out + threadIdx.x, 0.f);
}

RF_KERNEL void cp_async_read_early(Args a) {
  char* s = rf::arch::dynamic_smem();
  if (threadIdx.x < 16) {
    rf::arch::cp_async_16(s + 16 * threadIdx.x, a.in + 4 * threadIdx.x, 16);
    rf::arch::cp_async_commit();
    rf::arch::stg(a.out + threadIdx.x, rf::arch::lds(reinterpret_cast<const float*>(s + 16 * threadIdx.x)));
    rf::arch::cp_async_wait<0>();
  }
}

RF_KERNEL void ok_exit_then_barrier(Args a) {
  if (threadIdx.x >= 32) return;  // exited threads count as arrived at later barriers
  rf::arch::syncthreads();
  rf::arch::syncthreads();
  rf::arch::stg(a.out + threadIdx.x, 1.f);
}

// Lane l copies 16 bytes with src-size l % 17: the rest of each 16 must read back as zeros.
RF_KERNEL void ok_cp_async_zfill(Args a) {
  char* s = rf::arch::dynamic_smem();
  if (threadIdx.x < 16) {
    rf::arch::cp_async_16(s + 16 * threadIdx.x, a.in + 4 * threadIdx.x, int(threadIdx.x % 17));
  }
  rf::arch::cp_async_commit();
  rf::arch::cp_async_wait<0>();
  rf::arch::syncthreads();
  if (threadIdx.x < 16) {
    float v[4];
    for (int j = 0; j < 4; ++j) v[j] = rf::arch::lds(reinterpret_cast<const float*>(s + 16 * threadIdx.x) + j);
    for (int j = 0; j < 4; ++j) rf::arch::stg(a.out + 4 * threadIdx.x + j, v[j]);
  }
}

struct Case {
  Kernel kernel;
  unsigned threads;
};

const std::map<std::string, Case>& cases() {
  static const std::map<std::string, Case> c = {
      {"divergent_shuffle", {&divergent_shuffle, 64}},
      {"deadlock", {&deadlock, 64}},
      {"exited_lane", {&exited_lane, 32}},
      {"missing_barrier", {&missing_barrier, 64}},
      {"ok_barrier", {&ok_barrier, 64}},
      {"overwrite_race", {&overwrite_race, 64}},
      {"ok_syncwarp", {&ok_syncwarp, 32}},
      {"uninitialised", {&uninitialised, 32}},
      {"out_of_bounds", {&out_of_bounds, 64}},
      {"read_only_store", {&read_only_store, 32}},
      {"misaligned", {&misaligned, 32}},
      {"smem_overflow", {&smem_overflow, 32}},
      {"bad_launch", {&ok_barrier, 2048}},
      {"cp_async_not_waited", {&cp_async_not_waited, 32}},
      {"cp_async_read_early", {&cp_async_read_early, 32}},
      {"ok_exit_then_barrier", {&ok_exit_then_barrier, 64}},
      {"ok_cp_async_zfill", {&ok_cp_async_zfill, 32}},
  };
  return c;
}

}  // namespace

std::vector<std::string> selftest_names() {
  std::vector<std::string> names;
  for (const auto& kv : cases()) names.push_back(kv.first);
  return names;
}

std::string run_selftest(const std::string& name) {
  const auto it = cases().find(name);
  if (it == cases().end()) return "no self-test named '" + name + "'";
  // Two buffers with a gap between them: a read just past one must not land in the other (the
  // bounds check knows the buffers a launch was given, not which one a pointer came from).
  std::vector<float> memory(256);
  float* in = memory.data();
  float* out = memory.data() + 128;
  for (int i = 0; i < 64; ++i) {
    in[i] = float(i + 1);
    out[i] = -1.f;
  }
  Buffers scope({Buffer{out, 64 * sizeof(float), "out", true}, Buffer{in, 64 * sizeof(float), "in", false}});
  const Args args{out, in, name.c_str()};
  const cudaError_t e =
      rf::arch::launch(name.c_str(), it->second.kernel, dim3(1), dim3(it->second.threads), 256, nullptr, args);
  if (e != cudaSuccess) return rf::arch::error_string(e);
  if (name == "ok_cp_async_zfill") {
    for (int l = 0; l < 16; ++l) {
      const int src_size = l % 17;
      unsigned char expect[16], got[16];
      std::memset(expect, 0, 16);
      std::memcpy(expect, reinterpret_cast<const unsigned char*>(in + 4 * l), size_t(src_size));
      std::memcpy(got, out + 4 * l, 16);
      if (std::memcmp(expect, got, 16) != 0) return "cp.async zero-fill: lane " + std::to_string(l) + " read back wrong";
    }
  }
  return "";
}

}  // namespace rf::emu
