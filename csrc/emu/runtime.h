// The host emulator of a CUDA thread block: runs our kernels' device code, unchanged, on the
// CPU, with the checks a GPU never makes. Used through csrc/cuda/arch/emu.h only; kernels never
// call it directly. No torch here.
//
// Model (see ../../shared/GPU_NOTES.md section 2 for why):
// - every CUDA thread is a fiber with its own stack; the fibers of a block run on one OS thread,
//   switching only where CUDA threads synchronise (barriers, warp collectives), so a block runs
//   deterministically; several OS threads run different blocks at once;
// - __syncthreads is a barrier over the block's live threads; a warp collective (mma, ldmatrix,
//   shuffles, __syncwarp) waits for all 32 lanes, checks that they all called the same
//   instruction at the same line, and is computed once, by the last lane to arrive;
// - dynamic shared memory comes from an arena poisoned (all bytes 0xFF: NaN in every float
//   type) before each block; every shared access goes through a shadow that knows who wrote
//   each byte, when, and who read it since the last barrier: a read of a byte nothing wrote, a
//   read of a byte another thread wrote since the last barrier (a missing __syncthreads), a
//   write over a byte another thread read since the last barrier, and a read of a cp.async
//   destination before the issuing thread's wait_group each fail the launch with a message;
// - cp.async poisons its destination at issue and copies at the issuing thread's wait_group;
// - every global access must fall inside a buffer the launch was given (Buffers), aligned to
//   its size, and a store inside a writable one;
// - a block where no thread can move on (a barrier some threads never reach, a collective some
//   lanes skip) fails with each thread's position.
// A failure stops the launch; launch() returns the first message.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace rf::emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// A call site in kernel code (arch functions take Loc::current() as a defaulted argument,
// which names the caller's line, as std::source_location does).
struct Loc {
  const char* file = "";
  int line = 0;
  static constexpr Loc current(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return Loc{file, line};
  }
};

// A span of global memory a launch may touch. A fresh buffer (allocated, never written: an output
// or a workspace) tracks which of its bytes kernels have stored to, and a read of one they have
// not is an error (compute-sanitizer's initcheck); the record lives as long as the Buffers scope,
// across the launches made in it.
struct Buffer {
  const void* data = nullptr;
  size_t bytes = 0;
  std::string name;
  bool writable = false;
  std::shared_ptr<std::atomic<uint8_t>[]> written;  // null unless fresh

  static Buffer fresh(const void* data, size_t bytes, std::string name);
};

// The global memory that kernels launched from this OS thread may touch while the object
// lives (nestable: an inner scope adds to the outer one's buffers).
class Buffers {
 public:
  explicit Buffers(std::vector<Buffer> buffers);
  ~Buffers();
  Buffers(const Buffers&) = delete;
  Buffers& operator=(const Buffers&) = delete;
  static std::vector<Buffer> current();

 private:
  size_t previous_size_;
};

// Planted defects, for the tests that show each check catches its kind of bug in our real
// kernels: each makes the emulator run the kernel as if its source had that bug.
struct Inject {
  int skip_barrier = -1;      // every thread skips its n-th __syncthreads (0-based): a missing barrier
  int loosen_wait = 0;        // cp.async.wait_group N waits as wait_group N + this: a too-loose wait
  int drop_cp_async = -1;     // thread 0 of each block skips its n-th cp.async: a tile never loaded
  bool ignore_zfill = false;  // cp.async reads cp-size bytes whatever src-size says: no border predicate
  bool swap_mma_a = false;    // mma.sync takes A registers a1 and a2 swapped: a wrong fragment order
  int drop_global_store = -1; // thread 0 of each block skips its n-th global store: an element never written
};

struct Options {
  bool check_races = true;   // shared memory: read-after-write and write-after-read between barriers
  bool check_uninit = true;  // shared memory: reads of bytes nothing wrote
  bool check_async = true;   // shared memory: reads of cp.async destinations before the wait
  bool check_bounds = true;  // global memory: inside the launch's buffers, aligned, stores writable
  bool check_global_init = true;  // global memory (with check_bounds): a fresh buffer's bytes read
                                  // before a store, or an output's left unwritten
  int lane_order = 0;        // order fibers run in each round: 0 ascending, 1 descending, 2 shuffled
  int workers = 0;           // OS threads running blocks; 0 = one per core
  Inject inject;
};
// Process-wide; read once at each launch.
Options& options();

struct Status {
  bool ok = true;
  std::string error;
};

using Body = void (*)(const void* arg);

// Runs body(arg) as every thread of every block of the grid.
Status launch(const char* kernel, Dim3 grid, Dim3 block, size_t smem_bytes, Body body, const void* arg);
// The message of the last failed launch on this OS thread.
const std::string& last_error();

// ---- for emulated device code (csrc/cuda/arch/emu.h) ----------------------------------------

// The options the running launch was started with.
const Options& launch_options();
const Dim3& thread_idx();
const Dim3& block_idx();
const Dim3& block_dim();
const Dim3& grid_dim();
int lane_id();
char* dynamic_smem();
size_t dynamic_smem_bytes();

// Stops the launch with `what`, naming the kernel, block, thread and call site.
[[noreturn]] void fail(const std::string& what, Loc loc);

void syncthreads(Loc loc);
void syncwarp(uint32_t mask, Loc loc);

// Checks a global access of n bytes at p (bounds, alignment to n, writability).
void global_access(const void* p, size_t n, bool write, const char* op, Loc loc);
// Whether this global store is the one Inject::drop_global_store skips (counts the thread's stores).
bool drop_global_store();
// The first byte of fresh buffer b that no kernel has stored to, or -1 when all were (or b is not
// fresh, or check_global_init or check_bounds is off).
int64_t first_unwritten(const Buffer& b);
// Checks (and records, for the race check) a shared access by this thread.
void shared_read(const void* p, size_t n, const char* op, Loc loc);
void shared_write(const void* p, size_t n, const char* op, Loc loc);
// The same on behalf of another thread of the block (a collective reads for its lanes).
void shared_read_as(int tid, const void* p, size_t n, const char* op, Loc loc);
bool is_shared(const void* p);

// A warp collective. Each lane passes its operands (in) and gets its results (out); `compute`
// runs once, when all 32 lanes have arrived at the same instruction, over every lane's slot.
struct LaneSlot {
  alignas(16) unsigned char in[64];
  alignas(16) unsigned char out[64];
};
using Compute = void (*)(LaneSlot* lanes, int first_tid, Loc loc);
void warp_collective(const char* op, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                     Compute compute, Loc loc);

// cp.async: copy cp_size bytes, src_size of them from src (the rest zero), into shared dst.
void cp_async(void* dst, const void* src, int cp_size, int src_size, const char* op, Loc loc);
void cp_async_commit(Loc loc);
void cp_async_wait(int pending, Loc loc);

}  // namespace rf::emu
