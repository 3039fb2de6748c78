// The emulator's runtime: fibers, the block scheduler, barriers, warp collectives, the shared
// memory shadow, cp.async groups and the global buffer checks. See runtime.h for the model.
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

#if defined(__SANITIZE_ADDRESS__)
#define RF_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RF_EMU_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define RF_EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define RF_EMU_TSAN 1
#endif
#endif
#ifdef RF_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#ifdef RF_EMU_TSAN
#include <sanitizer/tsan_interface.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace rf::emu {
namespace {

// ---- context switching --------------------------------------------------------------------
// x86-64: a minimal switch (callee-saved registers, the SSE and x87 control words, the stack
// pointer). Elsewhere: ucontext (slower: a system call per switch).
#if defined(__x86_64__)
extern "C" void rf_emu_swap(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl rf_emu_swap
  .hidden rf_emu_swap
  .type rf_emu_swap, @function
rf_emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rf_emu_swap, .-rf_emu_swap
  .section .note.GNU-stack,"",@progbits
  .text
)");

struct Context {
  void* sp = nullptr;
};

void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* s = reinterpret_cast<uint64_t*>(top - 80);
  s[0] = 0x037F;                               // x87 control word
  s[1] = 0x1F80;                               // MXCSR
  for (int i = 2; i < 8; ++i) s[i] = 0;        // r15 r14 r13 r12 rbx rbp
  s[8] = reinterpret_cast<uint64_t>(entry);    // `ret` goes here
  s[9] = 0;                                    // entry's (never used) return address
  c.sp = s;
}

inline void context_swap(Context& from, Context& to) { rf_emu_swap(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

inline void context_swap(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- state ----------------------------------------------------------------------------------
constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kMaxSmem = 227 << 10;  // sm_90's per-block limit (sm_80: 163 KiB)
constexpr unsigned kMaxThreads = 1024;
constexpr uint16_t kMulti = 0xFFFF;

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int cp_size, src_size;
};

enum class St : uint8_t { kReady, kBarrier, kWarp, kDone };

struct Thread {
  Dim3 idx;
  int tid = 0, lane = 0, warp = 0;
  St st = St::kReady;
  Loc wait_loc;
  const char* wait_op = "";
  Context ctx;
  char* stack = nullptr;  // mmap'ed, lowest page a guard
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
  int barriers = 0, copies = 0, stores = 0;  // for Inject
#ifdef RF_EMU_TSAN
  void* tsan = nullptr;
#endif
};

struct Warp {
  int arrived = 0, done = 0;
  const char* op = nullptr;
  Loc loc;
  uint32_t syncs = 0;  // completed __syncwarp()s
  LaneSlot slots[32];
};

struct Launch {
  const char* kernel;
  Dim3 grid, block;
  size_t smem_bytes;
  Body body;
  const void* arg;
  Options opt;
  std::vector<Buffer> buffers;
  std::atomic<uint64_t> next_block{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error;
};

// Per shared-memory byte: who wrote it (tid + 1; 0 = never written) in which barrier interval
// (epoch) and after how many of its warp's __syncwarp()s; who read it in the current interval
// (tid + 1, or kMulti for several threads); whether a cp.async to it is still pending.
struct Shadow {
  std::vector<uint32_t> wepoch, repoch, wsync, rsync;
  std::vector<uint16_t> writer, reader;
  std::vector<uint16_t> pending;  // tid + 1 of the issuing thread, 0 when none
  void reset(size_t n) {
    if (writer.size() < n) {
      wepoch.resize(n);
      repoch.resize(n);
      wsync.resize(n);
      rsync.resize(n);
      writer.resize(n);
      reader.resize(n);
      pending.resize(n);
    }
    std::fill_n(writer.begin(), n, 0);
    std::fill_n(reader.begin(), n, 0);
    std::fill_n(pending.begin(), n, 0);
    std::fill_n(repoch.begin(), n, UINT32_MAX);
  }
};

struct Worker {
  Launch* launch = nullptr;
  std::vector<std::unique_ptr<Thread>> threads;
  std::vector<Warp> warps;
  Thread* current = nullptr;
  Context sched;
  Dim3 block_idx;
  unsigned nthreads = 0;
  uint32_t epoch = 0;
  unsigned at_barrier = 0, live = 0;
  bool aborted = false;
  unsigned char* smem = nullptr;
  Shadow shadow;
#ifdef RF_EMU_TSAN
  void* sched_tsan = nullptr;
#endif
#ifdef RF_EMU_ASAN
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif

  Worker() {
    smem = static_cast<unsigned char*>(std::aligned_alloc(128, kMaxSmem));
  }
  ~Worker() {
    for (auto& t : threads) {
      if (t->stack) munmap(t->stack, kStackBytes);
#ifdef RF_EMU_TSAN
      if (t->tsan) __tsan_destroy_fiber(t->tsan);
#endif
    }
    std::free(smem);
  }
};

thread_local Worker* tl_worker = nullptr;
thread_local std::vector<Buffer> tl_buffers;
thread_local std::string tl_last_error;

Options g_options;

Worker& W() { return *tl_worker; }
Thread& T() { return *W().current; }

std::string dim_str(const Dim3& d) {
  std::ostringstream o;
  o << "(" << d.x << "," << d.y << "," << d.z << ")";
  return o.str();
}

std::string loc_str(Loc loc) {
  if (!loc.line) return "";
  const char* f = loc.file;
  const char* c = std::strstr(f, "csrc/");
  std::ostringstream o;
  o << (c ? c : f) << ":" << loc.line << ": ";
  return o.str();
}

void record_error(Launch& L, const std::string& msg) {
  std::lock_guard<std::mutex> g(L.mu);
  if (L.error.empty()) L.error = msg;
  L.failed = true;
}

std::string where(const Thread& t) {
  Worker& w = W();
  std::ostringstream o;
  o << "kernel " << w.launch->kernel << ", block " << dim_str(w.block_idx) << ", thread " << dim_str(t.idx)
    << " (warp " << t.warp << ", lane " << t.lane << ")";
  return o.str();
}

// ---- switching between fibers and the scheduler -------------------------------------------
void switch_to_fiber(Worker& w, Thread& t) {
  w.current = &t;
#ifdef RF_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t.stack + sysconf(_SC_PAGESIZE), kStackBytes - sysconf(_SC_PAGESIZE));
#endif
#ifdef RF_EMU_TSAN
  __tsan_switch_to_fiber(t.tsan, 0);
#endif
  context_swap(w.sched, t.ctx);
#ifdef RF_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  w.current = nullptr;
}

// From a fiber back to the scheduler; returns when the scheduler resumes this fiber. `final`:
// the fiber never runs again (its stack is reused for the next block).
void switch_to_scheduler(bool final = false) {
  Worker& w = W();
  Thread& t = *w.current;
#ifdef RF_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(final ? nullptr : &fake, w.sched_bottom, w.sched_size);
#else
  (void)final;
#endif
#ifdef RF_EMU_TSAN
  __tsan_switch_to_fiber(w.sched_tsan, 0);
#endif
  context_swap(t.ctx, w.sched);
#ifdef RF_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

void on_exit(Thread& t);

// Thrown through the failing thread's own frames (kernel code, then the runtime's), so that
// what they hold is freed; the block's other fibers are blocked in the runtime, holding nothing.
struct FiberAbort {};

void fiber_entry() {
#ifdef RF_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &W().sched_bottom, &W().sched_size);
#endif
  try {
    Worker& w = W();
    w.launch->body(w.launch->arg);
    on_exit(*W().current);
  } catch (const FiberAbort&) {
  }
  switch_to_scheduler(/*final=*/true);
  __builtin_trap();  // never resumed
}

[[noreturn]] void abort_block(const std::string& msg) {
  Worker& w = W();
  record_error(*w.launch, msg);
  w.aborted = true;
  throw FiberAbort{};
}

// ---- barriers -------------------------------------------------------------------------------
void release_barrier(Worker& w) {
  for (unsigned i = 0; i < w.nthreads; ++i) {
    Thread& t = *w.threads[i];
    if (t.st == St::kBarrier) t.st = St::kReady;
  }
  w.at_barrier = 0;
  ++w.epoch;
}

void release_warp(Worker& w, int warp) {
  Warp& wp = w.warps[warp];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned tid = warp * 32 + l;
    if (tid < w.nthreads && w.threads[tid]->st == St::kWarp) w.threads[tid]->st = St::kReady;
  }
  wp.arrived = 0;
  wp.op = nullptr;
}

std::string lanes_at(Worker& w, int warp, St st) {
  std::ostringstream o;
  int first = -1, prev = -2;
  bool any = false;
  auto flush = [&]() {
    if (first < 0) return;
    o << (any ? "," : "") << first;
    if (prev != first) o << "-" << prev;
    any = true;
  };
  for (int l = 0; l < 32; ++l) {
    const unsigned tid = warp * 32 + l;
    const bool in = tid < w.nthreads && w.threads[tid]->st == st;
    if (in) {
      if (prev == l - 1 && first >= 0) {
        prev = l;
      } else {
        flush();
        first = prev = l;
      }
    }
  }
  flush();
  return o.str();
}

void on_exit(Thread& t) {
  Worker& w = W();
  size_t outstanding = t.open.size();
  for (auto& g : t.groups) outstanding += g.size();
  if (outstanding && w.launch->opt.check_async) {
    abort_block(where(t) + ": exits with " + std::to_string(outstanding) +
                " cp.async copies never waited for (cp.async.wait_group missing before the end)");
  }
  t.st = St::kDone;
  --w.live;
  Warp& wp = w.warps[t.warp];
  ++wp.done;
  if (wp.arrived > 0) {
    abort_block(where(t) + ": exits while lanes " + lanes_at(w, t.warp, St::kWarp) + " of its warp wait at " +
                loc_str(wp.loc) + wp.op + " (a .sync.aligned warp instruction needs all 32 lanes)");
  }
  // A thread that exits counts as arrived at the barriers the others wait at (as on sm_70+).
  if (w.at_barrier > 0 && w.at_barrier == w.live) release_barrier(w);
}

std::string deadlock_report(Worker& w) {
  std::ostringstream o;
  o << "kernel " << w.launch->kernel << ", block " << dim_str(w.block_idx)
    << ": deadlock, no thread can move on:";
  // Group consecutive threads that wait at the same place.
  unsigned i = 0;
  while (i < w.nthreads) {
    Thread& t = *w.threads[i];
    unsigned j = i + 1;
    while (j < w.nthreads && w.threads[j]->st == t.st && w.threads[j]->wait_loc.line == t.wait_loc.line &&
           w.threads[j]->wait_op == t.wait_op)
      ++j;
    o << " threads " << i;
    if (j - 1 != i) o << "-" << j - 1;
    switch (t.st) {
      case St::kDone:
        o << " have exited;";
        break;
      case St::kBarrier:
        o << " wait at " << loc_str(t.wait_loc) << "__syncthreads;";
        break;
      case St::kWarp:
        o << " wait at " << loc_str(t.wait_loc) << t.wait_op << " for the rest of their warp;";
        break;
      case St::kReady:
        o << " are ready;";
        break;
    }
    i = j;
  }
  return o.str();
}

// ---- running blocks -------------------------------------------------------------------------
void prepare_threads(Worker& w, unsigned n) {
  const long page = sysconf(_SC_PAGESIZE);
  while (w.threads.size() < n) {
    auto t = std::make_unique<Thread>();
    void* mem = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "resnet_fused emulator: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(mem, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    t->stack = static_cast<char*>(mem);
    w.threads.push_back(std::move(t));
  }
}

void run_block(Worker& w, uint64_t linear) {
  Launch& L = *w.launch;
  const Dim3 g = L.grid, b = L.block;
  w.block_idx = Dim3{unsigned(linear % g.x), unsigned(linear / g.x % g.y), unsigned(linear / g.x / g.y)};
  w.nthreads = b.x * b.y * b.z;
  const unsigned nwarps = (w.nthreads + 31) / 32;
  w.warps.assign(nwarps, Warp{});
  w.warps.back().done = int(nwarps * 32 - w.nthreads);  // a partial last warp's missing lanes
  w.epoch = 0;
  w.at_barrier = 0;
  w.live = w.nthreads;
  w.aborted = false;
  std::memset(w.smem, 0xFF, L.smem_bytes);
  w.shadow.reset(L.smem_bytes);
  const long page = sysconf(_SC_PAGESIZE);
  for (unsigned i = 0; i < w.nthreads; ++i) {
    Thread& t = *w.threads[i];
    t.tid = int(i);
    t.idx = Dim3{i % b.x, i / b.x % b.y, i / b.x / b.y};
    t.lane = int(i % 32);
    t.warp = int(i / 32);
    t.st = St::kReady;
    t.wait_op = "";
    t.wait_loc = Loc{};
    t.open.clear();
    t.groups.clear();
    t.barriers = t.copies = 0;
#ifdef RF_EMU_ASAN
    // An aborted block leaves its frames' redzones poisoned on these stacks.
    ASAN_UNPOISON_MEMORY_REGION(t.stack + page, kStackBytes - page);
#endif
#ifdef RF_EMU_TSAN
    if (t.tsan) __tsan_destroy_fiber(t.tsan);
    t.tsan = __tsan_create_fiber(0);
#endif
    context_init(t.ctx, t.stack + page, kStackBytes - page, &fiber_entry);
  }
  // Run every ready fiber until it blocks or exits, round after round.
  std::vector<unsigned> order(w.nthreads);
  uint64_t rng = 0x9E3779B97F4A7C15ull ^ linear;
  while (w.live > 0 && !w.aborted && !L.failed) {
    for (unsigned i = 0; i < w.nthreads; ++i) order[i] = L.opt.lane_order == 1 ? w.nthreads - 1 - i : i;
    if (L.opt.lane_order == 2) {
      for (unsigned i = w.nthreads; i > 1; --i) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        std::swap(order[i - 1], order[(rng >> 33) % i]);
      }
    }
    bool ran = false;
    for (unsigned i : order) {
      Thread& t = *w.threads[i];
      if (t.st != St::kReady) continue;
      ran = true;
      switch_to_fiber(w, t);
      if (w.aborted) break;
    }
    if (!ran && w.live > 0 && !w.aborted) {
      record_error(L, deadlock_report(w));
      w.aborted = true;
    }
  }
}

void worker_main(Launch* L) {
  Worker w;
  w.launch = L;
  tl_worker = &w;
#ifdef RF_EMU_TSAN
  w.sched_tsan = __tsan_get_current_fiber();
#endif
  prepare_threads(w, L->block.x * L->block.y * L->block.z);
  const uint64_t nblocks = uint64_t(L->grid.x) * L->grid.y * L->grid.z;
  while (!L->failed) {
    const uint64_t b = L->next_block.fetch_add(1);
    if (b >= nblocks) break;
    run_block(w, b);
  }
  tl_worker = nullptr;
}

// ---- the shadow -----------------------------------------------------------------------------
size_t smem_offset(const void* p, size_t n, const char* op, Loc loc) {
  Worker& w = W();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < w.smem || c + n > w.smem + w.launch->smem_bytes) {
    std::ostringstream o;
    o << loc_str(loc) << where(T()) << ": " << op << " accesses " << n << " bytes at shared offset "
      << (c - w.smem) << ", outside the " << w.launch->smem_bytes << " bytes of dynamic shared memory";
    abort_block(o.str());
  }
  return size_t(c - w.smem);
}

void read_bytes(int tid, size_t off, size_t n, const char* op, Loc loc) {
  Worker& w = W();
  const Options& opt = w.launch->opt;
  Shadow& s = w.shadow;
  const int warp = tid / 32;
  for (size_t i = off; i < off + n; ++i) {
    if (s.pending[i] && opt.check_async) {
      std::ostringstream o;
      o << loc_str(loc) << where(*w.threads[tid]) << ": " << op << " reads shared offset " << i
        << ", the destination of a cp.async by thread " << s.pending[i] - 1
        << " that has not completed (a missing or too-loose cp.async.wait_group)";
      abort_block(o.str());
    }
    if (s.writer[i] == 0) {
      if (opt.check_uninit) {
        std::ostringstream o;
        o << loc_str(loc) << where(*w.threads[tid]) << ": " << op << " reads shared offset " << i
          << ", which nothing has written in this block (uninitialised shared memory)";
        abort_block(o.str());
      }
    } else if (opt.check_races && s.writer[i] - 1 != tid && s.wepoch[i] == w.epoch) {
      const int wr = s.writer[i] - 1;
      if (!(wr / 32 == warp && w.warps[warp].syncs > s.wsync[i])) {
        std::ostringstream o;
        o << loc_str(loc) << where(*w.threads[tid]) << ": " << op << " reads shared offset " << i
          << ", written by thread " << wr << " since the last __syncthreads (a missing barrier: a race)";
        abort_block(o.str());
      }
    }
    if (s.repoch[i] != w.epoch) {
      s.repoch[i] = w.epoch;
      s.reader[i] = uint16_t(tid + 1);
      s.rsync[i] = w.warps[warp].syncs;
    } else if (s.reader[i] != tid + 1) {
      s.reader[i] = kMulti;
    }
  }
}

void write_bytes(int tid, size_t off, size_t n, const char* op, Loc loc) {
  Worker& w = W();
  Shadow& s = w.shadow;
  const int warp = tid / 32;
  for (size_t i = off; i < off + n; ++i) {
    if (w.launch->opt.check_races) {
      if (s.repoch[i] == w.epoch && s.reader[i] != 0 && s.reader[i] != tid + 1) {
        const bool synced_lane = s.reader[i] != kMulti && (s.reader[i] - 1) / 32 == warp &&
                                 w.warps[warp].syncs > s.rsync[i];
        if (!synced_lane) {
          std::ostringstream o;
          o << loc_str(loc) << where(*w.threads[tid]) << ": " << op << " writes shared offset " << i << ", read by "
            << (s.reader[i] == kMulti ? std::string("several threads") : "thread " + std::to_string(s.reader[i] - 1))
            << " since the last __syncthreads (a missing barrier before the overwrite: a race)";
          abort_block(o.str());
        }
      }
      if (s.writer[i] != 0 && s.writer[i] - 1 != tid && s.wepoch[i] == w.epoch &&
          !((s.writer[i] - 1) / 32 == warp && w.warps[warp].syncs > s.wsync[i])) {
        std::ostringstream o;
        o << loc_str(loc) << where(*w.threads[tid]) << ": " << op << " writes shared offset " << i
          << ", written by thread " << s.writer[i] - 1 << " since the last __syncthreads (a race)";
        abort_block(o.str());
      }
    }
    s.writer[i] = uint16_t(tid + 1);
    s.wepoch[i] = w.epoch;
    s.wsync[i] = w.warps[warp].syncs;
  }
}

void complete(Thread& t, const Copy& c) {
  Worker& w = W();
  if (c.src_size > 0) std::memcpy(c.dst, c.src, size_t(c.src_size));
  if (c.src_size < c.cp_size) std::memset(c.dst + c.src_size, 0, size_t(c.cp_size - c.src_size));
  const size_t off = size_t(c.dst - w.smem);
  std::fill_n(w.shadow.pending.begin() + off, c.cp_size, 0);
  write_bytes(t.tid, off, size_t(c.cp_size), "cp.async", Loc{});
}

}  // namespace

// ---- public ---------------------------------------------------------------------------------
Buffer Buffer::fresh(const void* data, size_t bytes, std::string name) {
  Buffer b{data, bytes, std::move(name), true};
  b.written.reset(new std::atomic<uint8_t>[bytes]());  // (value-initialised: all zero)
  return b;
}

Buffers::Buffers(std::vector<Buffer> buffers) : previous_size_(tl_buffers.size()) {
  for (auto& b : buffers) tl_buffers.push_back(std::move(b));
}
Buffers::~Buffers() { tl_buffers.resize(previous_size_); }
std::vector<Buffer> Buffers::current() { return tl_buffers; }

Options& options() { return g_options; }

Status launch(const char* kernel, Dim3 grid, Dim3 block, size_t smem_bytes, Body body, const void* arg) {
  Status st;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  std::ostringstream bad;
  if (threads == 0 || threads > kMaxThreads || block.z > 64)
    bad << "a block of " << dim_str(block) << " threads (1 to 1024, z at most 64)";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
           grid.x > 2147483647u)
    bad << "a grid of " << dim_str(grid) << " blocks (y and z at most 65535, none 0)";
  else if (smem_bytes > kMaxSmem)
    bad << smem_bytes << " bytes of dynamic shared memory (at most " << kMaxSmem << " per block on sm_90)";
  if (!bad.str().empty()) {
    st.ok = false;
    st.error = std::string("kernel ") + kernel + ": invalid launch configuration: " + bad.str();
    tl_last_error = st.error;
    return st;
  }
  Launch L;
  L.kernel = kernel;
  L.grid = grid;
  L.block = block;
  L.smem_bytes = smem_bytes;
  L.body = body;
  L.arg = arg;
  L.opt = g_options;
  L.buffers = tl_buffers;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  unsigned nworkers = L.opt.workers > 0 ? unsigned(L.opt.workers) : std::max(1u, std::thread::hardware_concurrency());
  nworkers = unsigned(std::min<uint64_t>(nworkers, nblocks));
  if (nworkers <= 1) {
    worker_main(&L);
  } else {
    std::vector<std::thread> pool;
    for (unsigned i = 0; i < nworkers; ++i) pool.emplace_back(worker_main, &L);
    for (auto& t : pool) t.join();
  }
  if (L.failed) {
    st.ok = false;
    st.error = L.error;
    tl_last_error = L.error;
  }
  return st;
}

const std::string& last_error() { return tl_last_error; }
const Options& launch_options() { return W().launch->opt; }

const Dim3& thread_idx() { return T().idx; }
const Dim3& block_idx() { return W().block_idx; }
const Dim3& block_dim() { return W().launch->block; }
const Dim3& grid_dim() { return W().launch->grid; }
int lane_id() { return T().lane; }
char* dynamic_smem() { return reinterpret_cast<char*>(W().smem); }
size_t dynamic_smem_bytes() { return W().launch->smem_bytes; }

void fail(const std::string& what, Loc loc) { abort_block(loc_str(loc) + where(T()) + ": " + what); }

void syncthreads(Loc loc) {
  Worker& w = W();
  Thread& t = T();
  if (t.barriers++ == w.launch->opt.inject.skip_barrier) return;
  t.st = St::kBarrier;
  t.wait_loc = loc;
  t.wait_op = "__syncthreads";
  if (++w.at_barrier == w.live) {
    release_barrier(w);
  } else {
    switch_to_scheduler();
  }
}

void syncwarp(uint32_t mask, Loc loc) {
  if (mask != 0xFFFFFFFFu) fail("__syncwarp with a partial mask is not emulated (use the full mask)", loc);
  warp_collective(
      "__syncwarp", nullptr, 0, nullptr, 0, [](LaneSlot*, int first_tid, Loc) { ++W().warps[first_tid / 32].syncs; },
      loc);
}

void global_access(const void* p, size_t n, bool write, const char* op, Loc loc) {
  Worker& w = W();
  if (!w.launch->opt.check_bounds) return;
  const auto a = reinterpret_cast<uintptr_t>(p);
  if ((n == 2 || n == 4 || n == 8 || n == 16) && a % n) {
    std::ostringstream o;
    o << op << " of " << n << " bytes at a misaligned global address (address % " << n << " = " << a % n << ")";
    fail(o.str(), loc);
  }
  if (is_shared(p)) fail(std::string(op) + " uses a shared-memory address as a global one", loc);
  const Buffer* nearest = nullptr;
  intptr_t nearest_gap = INTPTR_MAX;
  for (const Buffer& b : w.launch->buffers) {
    const auto lo = reinterpret_cast<uintptr_t>(b.data), hi = lo + b.bytes;
    if (a >= lo && a + n <= hi) {
      if (write && !b.writable) fail(std::string(op) + " writes into '" + b.name + "', a read-only input", loc);
      if (b.written && w.launch->opt.check_global_init) {
        const size_t off = a - lo;
        for (size_t i = 0; i < n; ++i) {
          if (write) {
            b.written[off + i].store(1, std::memory_order_relaxed);
          } else if (!b.written[off + i].load(std::memory_order_relaxed)) {
            std::ostringstream o;
            o << op << " of " << n << " bytes at byte " << off << " of '" << b.name << "', which no kernel has "
              << "written since it was allocated (uninitialised global memory: compute-sanitizer's initcheck)";
            fail(o.str(), loc);
          }
        }
      }
      return;
    }
    const intptr_t gap = a < lo ? intptr_t(lo - a) : intptr_t(a + n - hi);
    if (gap < nearest_gap) {
      nearest_gap = gap;
      nearest = &b;
    }
  }
  std::ostringstream o;
  o << "out-of-bounds global " << (write ? "write" : "read") << " (" << op << ", " << n << " bytes)";
  if (nearest) {
    const auto lo = reinterpret_cast<uintptr_t>(nearest->data);
    o << ": " << (a < lo ? std::to_string(lo - a) + " bytes before the start of '"
                         : std::to_string(a + n - lo - nearest->bytes) + " bytes past the end of '")
      << nearest->name << "' (" << nearest->bytes << " bytes)";
  } else {
    o << ": no buffer was given to this launch";
  }
  fail(o.str(), loc);
}

bool is_shared(const void* p) {
  Worker& w = W();
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= w.smem && c < w.smem + kMaxSmem;
}

void shared_read(const void* p, size_t n, const char* op, Loc loc) {
  read_bytes(T().tid, smem_offset(p, n, op, loc), n, op, loc);
}

void shared_read_as(int tid, const void* p, size_t n, const char* op, Loc loc) {
  read_bytes(tid, smem_offset(p, n, op, loc), n, op, loc);
}

void shared_write(const void* p, size_t n, const char* op, Loc loc) {
  write_bytes(T().tid, smem_offset(p, n, op, loc), n, op, loc);
}

void warp_collective(const char* op, const void* in, size_t in_bytes, void* out, size_t out_bytes, Compute compute,
                     Loc loc) {
  Worker& w = W();
  Thread& t = T();
  Warp& wp = w.warps[t.warp];
  if (wp.arrived == 0) {
    wp.op = op;
    wp.loc = loc;
  } else if (std::strcmp(wp.op, op) != 0 || wp.loc.line != loc.line || std::strcmp(wp.loc.file, loc.file) != 0) {
    std::ostringstream o;
    o << "divergent warp: this lane is at " << loc_str(loc) << op << " while lanes " << lanes_at(w, t.warp, St::kWarp)
      << " wait at " << loc_str(wp.loc) << wp.op;
    fail(o.str(), loc);
  }
  if (in_bytes) std::memcpy(wp.slots[t.lane].in, in, in_bytes);
  t.st = St::kWarp;
  t.wait_loc = loc;
  t.wait_op = op;
  if (++wp.arrived + wp.done == 32) {
    if (wp.done) {
      std::ostringstream o;
      o << op << " with lanes " << lanes_at(w, t.warp, St::kDone)
        << " exited (a .sync.aligned warp instruction needs all 32 lanes)";
      fail(o.str(), loc);
    }
    compute(wp.slots, t.warp * 32, loc);
    release_warp(w, t.warp);
  } else {
    switch_to_scheduler();
  }
  if (out_bytes) std::memcpy(out, wp.slots[t.lane].out, out_bytes);
}

int64_t first_unwritten(const Buffer& b) {
  if (!b.written || !g_options.check_global_init || !g_options.check_bounds) return -1;
  for (size_t i = 0; i < b.bytes; ++i)
    if (!b.written[i].load(std::memory_order_relaxed)) return int64_t(i);
  return -1;
}

bool drop_global_store() {
  Thread& t = T();
  return t.tid == 0 && t.stores++ == W().launch->opt.inject.drop_global_store;
}

void cp_async(void* dst, const void* src, int cp_size, int src_size, const char* op, Loc loc) {
  Worker& w = W();
  Thread& t = T();
  const Inject& inject = w.launch->opt.inject;
  if (t.tid == 0 && t.copies++ == inject.drop_cp_async) return;
  if (inject.ignore_zfill) src_size = cp_size;
  if (src_size < 0 || src_size > cp_size) fail(std::string(op) + ": src-size outside [0, cp-size]", loc);
  const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (d % cp_size || (src_size > 0 && s % cp_size)) {
    std::ostringstream o;
    o << op << ": misaligned " << cp_size << "-byte copy (shared offset " << (static_cast<unsigned char*>(dst) - w.smem)
      << ", global address % " << cp_size << " = " << s % cp_size << ")";
    fail(o.str(), loc);
  }
  const size_t off = smem_offset(dst, size_t(cp_size), op, loc);
  if (src_size > 0) global_access(src, size_t(src_size), false, op, loc);
  // The copy may land at any time from now on: a write, as far as other threads' reads go.
  write_bytes(t.tid, off, size_t(cp_size), op, loc);
  std::memset(static_cast<unsigned char*>(dst), 0xFF, size_t(cp_size));
  std::fill_n(w.shadow.pending.begin() + off, cp_size, uint16_t(t.tid + 1));
  t.open.push_back(Copy{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), cp_size, src_size});
}

void cp_async_commit(Loc) {
  Thread& t = T();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

void cp_async_wait(int pending, Loc) {
  Thread& t = T();
  pending += W().launch->opt.inject.loosen_wait;
  while (t.groups.size() > size_t(std::max(pending, 0))) {
    for (const Copy& c : t.groups.front()) complete(t, c);
    t.groups.pop_front();
  }
}

}  // namespace rf::emu
