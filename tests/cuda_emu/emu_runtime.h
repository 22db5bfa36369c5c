// A tiny CUDA-execution emulator for testing torch-free decodekit kernels on a machine without a
// GPU, built to find races rather than to hide them.
//
// The threads of a block are user-level fibers on the calling thread. A fiber runs until it
// reaches a barrier (__syncthreads, a warp op) or exits; then the scheduler picks the next one. On
// x86-64 ELF a fiber switch is a few instructions (dkemu_switch_x64 below: callee-saved registers,
// MXCSR and the x87 control word, no signal mask); elsewhere, or with -DDK_EMU_UCONTEXT, it is
// ucontext's swapcontext, which makes a system call per switch. The ORDER in which the runnable
// fibers are resumed is a random permutation per scheduling round (seeded), so code that reads
// shared memory written by another thread without a barrier in between sees the stale value under
// some seeds. Seed 0 gives the fixed order 0, 1, 2, ... .
// The seed comes from dk_emu_set_schedule_seed() when called (>= 0), else from the environment
// variable DK_EMU_SEED, else 1; it is mixed with blockIdx.x so every block has its own order.
//
// Warp ops (__shfl_*_sync, __ballot_sync, __match_any_sync, __syncwarp, warp_sync) wait until
// every lane NAMED IN THE MASK has arrived at the same op; the emulator fails the launch with a
// message (see "Failures" below) when a named lane has exited or does not exist, when the lanes
// disagree on the mask, when the calling lane is not in its own mask, and when a shuffle reads a
// lane outside the mask (undefined on a GPU). A block that cannot progress (mismatched
// __syncthreads / warp ops) fails too, and so does a launch that runs past the watchdog's limit
// ($DK_EMU_LAUNCH_TIMEOUT, below): a thread looping without reaching a barrier would otherwise hang
// the caller.
//
// Global memory: every buffer a kernel reaches through a pointer (the drivers' workspaces, and the
// tensors emu.py copies into fenced memory) lies between two inaccessible pages (class Guarded), so
// a read or write past either end faults and fails the launch, naming the buffer and the byte. Each
// fiber's stack has an inaccessible page below it too (FiberStacks).
//
// Races that no thread order exposes (the emulator runs a thread until its next barrier, so a
// missing __syncwarp between lanes that meet at a shuffle anyway never changes a result): built
// with -DDK_EMU_TSAN=1 -fsanitize=thread (emu.py, DK_EMU_TSAN=1), every emulated thread is a
// ThreadSanitizer fiber and ThreadSanitizer checks every load and store of the kernels against
// the ordering a GPU guarantees (namespace dkemu::tsan below says which). Built with
// -DDK_EMU_ASAN=1 -fsanitize=address (DK_EMU_ASAN=1), the slack between a fenced buffer and its
// guard pages is poisoned, so a read there is reported even when its value never reaches a result.
//
// __shared__ variables are function-local statics (blocks run one after another, so that is one
// copy per block), filled with a poison pattern before each block (poison_shared). Float
// intrinsics map to the IEEE host operations; build with -ffp-contract=off so nothing is fused (the
// kernels use explicitly rounded intrinsics where it matters). Not thread-safe: one launch at a
// time.
#pragma once
#define DK_CUDA_EMULATE 1

#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <ucontext.h>
#include <unistd.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#define __global__
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

#if defined(__x86_64__) && defined(__ELF__) && !defined(DK_EMU_UCONTEXT)
#define DK_EMU_FAST_SWITCH 1
// dkemu_switch_x64(save, load): pushes rbp, rbx, r12-r15, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save, switches to the stack `load` (saved the same
// way, or prepared by dkemu::make_fiber) and pops the same from there. Weak + hidden: one copy per
// shared object, whatever the number of translation units including this header.
asm(R"(
  .text
  .p2align 4
  .weak dkemu_switch_x64
  .hidden dkemu_switch_x64
  .type dkemu_switch_x64, @function
dkemu_switch_x64:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dkemu_switch_x64, .-dkemu_switch_x64
)");
extern "C" void dkemu_switch_x64(void** save, void* load);
#endif

#if DK_EMU_TSAN && !DK_EMU_FAST_SWITCH
// (With ucontext's swapcontext the ThreadSanitizer build faults in the first launches.)
#error "DK_EMU_TSAN needs the x86-64 fiber switch (not DK_EMU_UCONTEXT)"
#endif
#if DK_EMU_TSAN
extern "C" {  // libtsan's fiber, synchronisation and ignore interfaces (sanitizer/tsan_interface.h)
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_java_alloc(unsigned long ptr, unsigned long size);  // (see dkemu::tsan::forget)
void __tsan_java_free(unsigned long ptr, unsigned long size);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#endif

// Race detection with ThreadSanitizer (DK_EMU_TSAN=1; a no-op otherwise). Each emulated thread of
// a launch is a ThreadSanitizer fiber, and the scheduler switches between fibers WITHOUT the
// happens-before edge a switch implies by default (flag no_sync), so two threads' accesses are
// ordered only by the edges below, the ones a GPU guarantees; any other pair of accesses to the
// same byte, one of them a write and not both atomic, is reported as a data race, whatever order
// the scheduler happened to run them in.
//   - __syncthreads(): every thread's accesses before it happen before every thread's after it.
//   - __syncwarp(mask) and the warp-wide matrix ops of emu_mma.h: the same among the lanes of the
//     warp (one edge per warp, whatever the mask: a sub-warp mask is over-approximated).
//   - Shuffles, __ballot_sync and __match_any_sync order nothing: on a GPU only __syncwarp and
//     __syncthreads order memory between threads, so lanes that exchange values by a shuffle and
//     data through shared memory need a __syncwarp too.
//   - atomicAdd / atomicOr are relaxed atomic read-modify-writes (__atomic builtins): they do not
//     race with each other and order nothing else.
//   - The host (the scheduler) happens before every thread of a block (the launch's arguments, the
//     block's shared-memory poison), and every thread of the launch before the host after the
//     launch (outputs). Nothing orders the blocks of a launch among themselves: the blocks take
//     turns among kSets sets of fibers (block i of the run order runs on set i % kSets, with its
//     own stacks and barrier edges), so two blocks on different sets are unordered and a race
//     between them (two blocks writing one word, one reading what another writes) is reported.
//     Blocks on the same set are ordered (the same fibers run them), so a launch's races between
//     blocks are seen for half of the block pairs; the randomised block order changes the pairs.
//     The emulated __shared__ variables are one copy for every block, so before each block the
//     host makes ThreadSanitizer forget their past accesses (forget): on a GPU each block has its
//     own.
// The runtime's own bookkeeping (arrival counts, the shuffles' exchange words, the scheduler's
// writes of threadIdx) is hidden from ThreadSanitizer (Quiet).
namespace dkemu::tsan {
#if DK_EMU_TSAN
constexpr unsigned kSets = 2;
inline void* create() { return __tsan_create_fiber(0); }
inline void destroy(void* f) { __tsan_destroy_fiber(f); }
inline void* current() { return __tsan_get_current_fiber(); }
inline void switch_to(void* f) {
  if (f) __tsan_switch_to_fiber(f, 1u /* __tsan_switch_to_fiber_no_sync */);
}
inline void release(char* edge) { __tsan_release(edge); }
inline void acquire(char* edge) { __tsan_acquire(edge); }
// ThreadSanitizer forgets the accesses to [p, p + n) so far (8-byte words; may take in the ends of
// neighbours): the Java heap's allocation hook resets the range's shadow, its free hook drops the
// block record the allocation left.
inline void forget(void* p, size_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(7),
                  e = (reinterpret_cast<uintptr_t>(p) + n + 7) & ~uintptr_t(7);
  if (e <= a) return;
  __tsan_java_alloc(a, e - a);
  __tsan_java_free(a, e - a);
}
struct Quiet {  // the calling fiber's reads and writes are not checked while one is alive
  Quiet() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Quiet() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
  Quiet(const Quiet&) = delete;
  Quiet& operator=(const Quiet&) = delete;
};
#else
constexpr unsigned kSets = 1;
inline void* create() { return nullptr; }
inline void destroy(void*) {}
inline void* current() { return nullptr; }
inline void switch_to(void*) {}
inline void release(char*) {}
inline void acquire(char*) {}
inline void forget(void*, size_t) {}
struct Quiet {
  Quiet() {}  // user-provided: `const Quiet q;` without an unused-variable warning
};
#endif
// The edges' sync addresses. A barrier's alternate between two by generation: a thread that left
// a barrier can run on to the next one and release there before a slower thread resumes from this
// one, and with one address the slow thread's acquire would take in the fast one's later accesses.
// One set of barrier edges per fiber set: a shared one would order the blocks.
inline char g_edge_start, g_edge_end, g_edge_bar[kSets][2], g_edge_warp[kSets][32][2];
// The fibers, per set one per thread index, kept for later launches (a fresh set per launch made a
// launch of 4 blocks x 512 threads take 0.25 s, against 25 ms kept). After a failed launch they
// are discarded: an abandoned thread may have stopped inside a Quiet.
inline std::vector<void*> g_fibers[kSets];
inline void reserve(unsigned n) {
  for (auto& set : g_fibers)
    while (set.size() < n) set.push_back(create());
}
inline void discard() {
  for (auto& set : g_fibers) {
    for (void* f : set) destroy(f);
    set.clear();
  }
}
}  // namespace dkemu::tsan

// Reads of a fenced buffer's slack with AddressSanitizer (DK_EMU_ASAN=1; a no-op otherwise): the
// slack around every Guarded payload is poisoned, so any load or store of a kernel there is
// reported at once, even one whose value never reaches a result (a 16-byte load of a row's last
// group that runs past the row's end into the under-16-byte slack before the guard page).
#if DK_EMU_ASAN
extern "C" void __asan_poison_memory_region(void const volatile* addr, size_t size);
extern "C" void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
#define DK_EMU_NO_ASAN __attribute__((no_sanitize("address")))
#else
#define DK_EMU_NO_ASAN
#endif
namespace dkemu::asan {
inline void forbid([[maybe_unused]] const void* p, [[maybe_unused]] size_t n) {
#if DK_EMU_ASAN
  if (n) __asan_poison_memory_region(p, n);
#endif
}
inline void allow([[maybe_unused]] const void* p, [[maybe_unused]] size_t n) {
#if DK_EMU_ASAN
  if (n) __asan_unpoison_memory_region(p, n);
#endif
}
}  // namespace dkemu::asan

namespace dkemu {
enum Wait { kRun = 0, kBlockBar = 1, kWarpBar = 2 };
struct Fiber {
#if DK_EMU_FAST_SWITCH
  void* sp = nullptr;  // saved stack pointer while switched out
#else
  ucontext_t ctx;
#endif
  Wait wait = kRun;
  bool done = false;
  void* tsan = nullptr;  // its ThreadSanitizer fiber (DK_EMU_TSAN)
};
struct Block {
  unsigned n = 0, cur = 0;
  std::vector<Fiber> f;
#if DK_EMU_FAST_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  unsigned bar_arrived = 0;
  unsigned bar_gen = 0;                // __syncthreads completed (dkemu::tsan's edges)
  std::vector<unsigned> warp_gen;      // per warp: warp ops completed
  std::vector<unsigned> warp_arrived;  // per warp: lanes that arrived at the pending warp op
  std::vector<unsigned> warp_mask;     // per warp: the mask that op names
  std::vector<uint64_t> xbuf;          // one exchange word per thread (warp ops)
  std::function<void()> body;
  void* tsan_host = nullptr;  // the scheduler's ThreadSanitizer fiber (DK_EMU_TSAN)
  unsigned set = 0;           // the fiber set running it (dkemu::tsan::kSets)
  bool failed = false;        // a thread of this block failed: the launch is abandoned
};
inline Block* g_blk = nullptr;
inline dim3 tls_tid, tls_bid;
constexpr size_t kStack = 256 * 1024;
inline int64_t g_seed_override = -1;

// Failures. The first failure of a library call is kept in g_error (and printed to stderr) until
// the caller takes it with dk_emu_take_error(); tests/cuda_emu/emu.py does after every call and
// raises EmulatorError with the message, so a kernel bug the emulator catches fails its test with
// the reason and the rest of the suite runs (an abort would end the whole pytest process, and
// pytest's output capture would swallow the message). fail() in an emulated thread ends that
// thread and the scheduler abandons the launch; in the scheduler it abandons the launch; every
// later launch of the call returns at once (the call's outputs are void anyway). record() only
// records (host code outside a launch: the drivers' guard checks).
inline char g_error[512] = "";
inline bool g_in_fiber = false;            // a fiber (an emulated thread) is running
inline volatile bool g_timed_out = false;  // the watchdog fired while the scheduler ran
struct Abandon {};                         // thrown in the scheduler's context, caught by launch()
inline void record(const char* what) {
  std::fprintf(stderr, "dkemu: %s\n", what);
  std::fflush(stderr);
  if (!g_error[0]) std::snprintf(g_error, sizeof g_error, "%s", what);
}
[[noreturn]] inline void fail(const char* what);  // below, after the fiber switch

// The schedule seed of the next launch: dk_emu_set_schedule_seed(), else $DK_EMU_SEED, else 1.
inline uint64_t schedule_seed() {
  if (g_seed_override >= 0) return uint64_t(g_seed_override);
  const char* e = std::getenv("DK_EMU_SEED");
  return e && *e ? std::strtoull(e, nullptr, 10) : 1u;
}

inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Lanes of warp w that exist in a block of n threads.
inline unsigned warp_lanes(unsigned n, unsigned w) {
  const unsigned k = n - 32 * w;
  return k >= 32 ? 0xffffffffu : ((1u << k) - 1u);
}

// Fiber -> scheduler.
// (Each reads what it needs before telling ThreadSanitizer about the switch: from then on, accesses
// count as the other side's. `edge`: a ThreadSanitizer release after those reads, the last thing
// the fiber does.)
inline void to_scheduler(Fiber& me, char* edge = nullptr) {
  Block& blk = *g_blk;
#if DK_EMU_FAST_SWITCH
  void* const host = blk.tsan_host;
  void* const to = blk.sched_sp;
  if (edge) tsan::release(edge);
  tsan::switch_to(host);
  dkemu_switch_x64(&me.sp, to);
#else  // (no ThreadSanitizer build)
  (void)edge;
  swapcontext(&me.ctx, &blk.sched);
#endif
}

// Scheduler -> fiber t.
inline void to_fiber(Block& blk, unsigned t) {
  Fiber& fb = blk.f[t];
#if DK_EMU_FAST_SWITCH
  void* const to = fb.sp;
  tsan::switch_to(fb.tsan);
  dkemu_switch_x64(&blk.sched_sp, to);
#else
  swapcontext(&blk.sched, &fb.ctx);
#endif
}

// Records `what`; in a fiber, ends it: the scheduler abandons the launch (from a signal handler too).
inline void end_fiber(const char* what) {
  record(what);
  if (g_blk && g_in_fiber) {
    g_blk->failed = true;
    to_scheduler(g_blk->f[g_blk->cur]);  // never resumed
  }
}

[[noreturn]] inline void fail(const char* what) {
  end_fiber(what);
  if (g_blk) throw Abandon{};
  std::abort();  // outside a launch callers use record()
}

inline void park(Wait w) {
  Fiber& me = g_blk->f[g_blk->cur];
  me.wait = w;
  to_scheduler(me);
}

inline void fiber_main() {
  tsan::acquire(&tsan::g_edge_start);
  g_blk->body();
  Fiber& me = g_blk->f[g_blk->cur];
  {
    const tsan::Quiet q;
    me.done = true;
  }
  // The thread's accesses happen before what the host does after the block (its last release).
#if DK_EMU_FAST_SWITCH
  to_scheduler(me, &tsan::g_edge_end);  // never resumed
  fail("an exited fiber was resumed");
#endif  // ucontext: returns to uc_link (the scheduler)
}

// Prepares fiber fb to start in fiber_main on the stack [stack, stack + size).
inline void make_fiber(Block& blk, Fiber& fb, char* stack, size_t size) {
#if DK_EMU_FAST_SWITCH
  // The frame dkemu_switch_x64 pops: MXCSR + x87 control word (8 bytes), r15 .. rbp (6 x 8), the
  // return address (fiber_main), then a null return address for fiber_main, which never returns.
  // fiber_main starts with rsp + 8 16-byte aligned, as the ABI wants at a function's entry.
  (void)blk;
  auto top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top - 72);
  asan::allow(sp, 72);  // (the redzones of the last fiber's frames that never returned: fiber_main's)
  uint32_t csr[2] = {0, 0};
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(*reinterpret_cast<uint16_t*>(&csr[1])));
  std::memcpy(sp, csr, 8);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[8] = 0;
  fb.sp = sp;
#else
  getcontext(&fb.ctx);
  fb.ctx.uc_stack.ss_sp = stack;
  fb.ctx.uc_stack.ss_size = size;
  fb.ctx.uc_link = &blk.sched;
  makecontext(&fb.ctx, fiber_main, 0);
#endif
}

// Releases the warp ops whose named lanes all arrived; fails when a named lane exited.
inline bool release_warps(Block& blk, unsigned b) {
  bool released = false;
  for (unsigned w = 0; w < blk.warp_arrived.size(); ++w) {
    const unsigned arrived = blk.warp_arrived[w];
    if (!arrived) continue;
    const unsigned mask = blk.warp_mask[w];
    for (unsigned missing = mask & ~arrived; missing; missing &= missing - 1) {
      const unsigned l = unsigned(__builtin_ctz(missing));
      const unsigned t = 32 * w + l;
      if (t >= blk.n || blk.f[t].done) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "block %u warp %u: warp op with mask 0x%08x names lane %u, which %s", b, w, mask,
                      l, t >= blk.n ? "does not exist" : "has exited");
        fail(msg);
      }
    }
    if (arrived == mask) {
      for (unsigned l = 0; l < 32; ++l)
        if (mask >> l & 1u) blk.f[32 * w + l].wait = kRun;
      blk.warp_arrived[w] = 0;
      blk.warp_gen[w]++;
      released = true;
    }
  }
  return released;
}

// Fenced buffers (class Guarded below) that are alive: the fault handler names the buffer whose
// guard page a stray read or write hit.
struct FenceInfo {
  uintptr_t front, rear;  // the inaccessible pages: [front, front + page) and [rear, rear + page)
  uintptr_t data;         // the payload's first byte
  size_t bytes;           // the payload's size
  char name[120];
};
inline std::vector<const FenceInfo*> g_fences;
inline size_t page_bytes() {
  static const size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

// The poison pattern of a fenced buffer's slack (Guarded): 0xFFF8A5A5 words, which read as NaN in
// fp32, fp64, bf16 and fp16 and as negative int32 / int64 values.
constexpr unsigned char kPoison[4] = {0xA5, 0xA5, 0xF8, 0xFF};
inline void poison(unsigned char* p, size_t n) {
  const auto byte = [](const unsigned char* q) { return kPoison[reinterpret_cast<uintptr_t>(q) & 3u]; };
  size_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(p + i) & 3u); ++i) p[i] = byte(p + i);
  uint32_t w;
  std::memcpy(&w, kPoison, 4);
  for (; i + 4 <= n; i += 4) std::memcpy(p + i, &w, 4);  // 4-byte aligned from here: the pattern's start
  for (; i < n; ++i) p[i] = byte(p + i);
}

// The emulated __shared__ variables (function-local statics, see the header) of this library,
// registered by dk_emu_set_shared (emu.py finds them in the symbol table). launch() fills them with
// the poison before each block: a GPU block starts with shared memory it has not written, so a read
// of a value the block never wrote gives NaN / a negative integer, not the zero of a fresh static
// or what the previous block left.
inline std::vector<std::pair<unsigned char*, size_t>> g_shared;
inline void poison_shared() {
  for (const auto& [p, n] : g_shared) poison(p, n);
}

// The fibers' stacks: one mapping, reused by later launches of up to as many threads, with an
// inaccessible page below each stack (stacks grow down), so an emulated thread that overflows its
// kStack bytes faults (and the launch fails naming it) instead of writing over its neighbour's
// stack or the heap. The fault handler runs on an alternate signal stack (Watchdog). One stack
// per thread index and fiber set (tsan::kSets).
struct FiberStacks {
  char* base = nullptr;
  size_t threads = 0, total = 0;
  size_t stride() const { return kStack + page_bytes(); }
  char* stack(unsigned t, unsigned set) const {
    return base + (size_t(t) * tsan::kSets + set) * stride() + page_bytes();
  }
  void reserve(unsigned n) {
    if (n <= threads) return;
    if (base) {
      asan::allow(base, total);  // (the frames' redzones)
      munmap(base, total);
    }
    total = size_t(n) * tsan::kSets * stride();
    void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::perror("dkemu: mmap (fiber stacks)");
      std::abort();
    }
    base = static_cast<char*>(m);
    for (size_t t = 0; t < size_t(n) * tsan::kSets; ++t) mprotect(base + t * stride(), page_bytes(), PROT_NONE);
    threads = n;
  }
  // The thread whose guard page holds addr, else -1.
  int64_t overflowed(uintptr_t addr) const {
    const auto b = reinterpret_cast<uintptr_t>(base);
    if (!base || addr < b || addr >= b + total) return -1;
    return (addr - b) % stride() < page_bytes() ? int64_t((addr - b) / stride() / tsan::kSets) : -1;
  }
};
inline FiberStacks g_stacks;

// The watchdog and the index traps, armed for the duration of each launch.
// A fiber that loops without reaching a barrier never hands control back to the scheduler (an
// out-of-bounds index that reads a NaN into a loop's exit test did that once), and the test would
// hang instead of failing. Every launch therefore arms a wall-clock timer (ITIMER_REAL): when a
// launch runs longer than $DK_EMU_LAUNCH_TIMEOUT seconds (default 120; 0: off), SIGALRM records
// which launch, block and thread were running and, when a fiber was, switches from the signal
// handler to the scheduler (SA_NODEFER: SIGALRM stays unblocked, the handler never returns), which
// abandons the launch. The emulator libraries are built with UBSan's bounds and object-size checks
// in trap mode (tests/cuda_emu/emu.py sanitize_flags): an index out of bounds executes ud2, and
// SIGILL ends the fiber the same way, naming the function. A read or write that hits a fenced
// buffer's guard page (class Guarded: the workspaces, and every tensor emu.py hands to a library)
// raises SIGSEGV, which ends the fiber the same way, naming the buffer and the byte. The previous
// handlers and timer are restored after the launch.
// SIGALRM is process-directed: a handler that runs on another thread (torch's workers) passes it
// on to the emulating thread (g_emu_thread) and returns.
inline char g_watch_msg[200];
inline volatile unsigned g_watch_block = 0;
inline pthread_t g_emu_thread;
inline void watchdog_fired(int) {
  if (!pthread_equal(pthread_self(), g_emu_thread)) {
    pthread_kill(g_emu_thread, SIGALRM);
    return;
  }
  char line[400];
  std::snprintf(line, sizeof line,
                "%s still running after the watchdog's limit (block %u, thread %u): an emulated thread loops "
                "without reaching a barrier, or the limit ($DK_EMU_LAUNCH_TIMEOUT s) is too low",
                g_watch_msg, unsigned(g_watch_block), unsigned(tls_tid.x));
  const bool fiber = g_blk && g_in_fiber;
  end_fiber(line);
  if (!fiber) g_timed_out = true;  // in the scheduler: it checks the flag
}
// "byte N of <name> (M bytes), a guard page" when addr lies in a live fenced buffer's guard page.
inline bool describe_fence_hit(uintptr_t addr, char* out, size_t n) {
  const size_t page = page_bytes();
  for (const FenceInfo* f : g_fences)
    if ((addr >= f->front && addr < f->front + page) || (addr >= f->rear && addr < f->rear + page)) {
      std::snprintf(out, n, "byte %lld of %s (%zu bytes: the guard page %s it)",
                    static_cast<long long>(int64_t(addr - f->data)), f->name, f->bytes,
                    addr < f->data ? "before" : "after");
      return true;
    }
  return false;
}
inline void trap_fired(int sig, siginfo_t* si, void* ctx) {
  const void* pc = si ? si->si_addr : nullptr;
#if defined(__x86_64__) && defined(REG_RIP)
  if (ctx) pc = reinterpret_cast<const void*>(static_cast<ucontext_t*>(ctx)->uc_mcontext.gregs[REG_RIP]);
#else
  (void)ctx;
#endif
  Dl_info info{};
  const char* fn = dladdr(pc, &info) && info.dli_sname ? info.dli_sname : "a function without a dynamic symbol";
  int st = -1;
  char* dem = abi::__cxa_demangle(fn, nullptr, nullptr, &st);
  char what[240];
  if (sig == SIGILL) {
    std::snprintf(what, sizeof what, "an index out of bounds (UBSan's bounds / object-size check trapped)");
  } else {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(si ? si->si_addr : nullptr);
    char hit[200];
    if (describe_fence_hit(addr, hit, sizeof hit))
      std::snprintf(what, sizeof what, "a read or write out of bounds: %s", hit);
    else if (const int64_t t = g_stacks.overflowed(addr); t >= 0)
      std::snprintf(what, sizeof what, "emulated thread %lld overflowed its %zu-byte stack", static_cast<long long>(t),
                    kStack);
    else
      std::snprintf(what, sizeof what, "a read or write of the unmapped address 0x%llx",
                    static_cast<unsigned long long>(addr));
  }
  char line[640];
  std::snprintf(line, sizeof line, "%s in %.300s (block %u, thread %u of %s)", what, st == 0 && dem ? dem : fn,
                unsigned(g_watch_block), unsigned(tls_tid.x), g_watch_msg);
  std::free(dem);
  if (!(g_blk && g_in_fiber) || !pthread_equal(pthread_self(), g_emu_thread)) {  // cannot go on past the trap
    record(line);
    std::abort();
  }
  end_fiber(line);
}
inline double watchdog_seconds() {
  const char* e = std::getenv("DK_EMU_LAUNCH_TIMEOUT");
  return e && *e ? std::strtod(e, nullptr) : 120.0;
}
struct Watchdog {
  bool armed = false;
  struct sigaction old_alrm{}, old_ill{}, old_segv{}, old_bus{};
  stack_t old_alt{};
  itimerval old_timer{};
  Watchdog(unsigned grid, unsigned threads) {
    static char alt[64 * 1024];  // the fault handler's stack: a fiber that overflowed has none left
    stack_t ss{};
    ss.ss_sp = alt;
    ss.ss_size = sizeof alt;
    sigaltstack(&ss, &old_alt);
    std::snprintf(g_watch_msg, sizeof g_watch_msg, "a launch of %u blocks x %u threads", grid, threads);
    g_timed_out = false;
    g_emu_thread = pthread_self();
    struct sigaction trap{};  // index traps, guard pages, stack overflows: trap_fired
    trap.sa_sigaction = trap_fired;
    trap.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&trap.sa_mask);
    sigaction(SIGILL, &trap, &old_ill);
    sigaction(SIGSEGV, &trap, &old_segv);
    sigaction(SIGBUS, &trap, &old_bus);
    const double s = watchdog_seconds();
    if (!(s > 0)) return;
    struct sigaction sa{};
    sa.sa_handler = watchdog_fired;
    sa.sa_flags = SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, &old_alrm);
    itimerval t{};
    t.it_value.tv_sec = time_t(s);
    t.it_value.tv_usec = suseconds_t((s - double(time_t(s))) * 1e6);
    if (t.it_value.tv_sec == 0 && t.it_value.tv_usec == 0) t.it_value.tv_usec = 1;
    setitimer(ITIMER_REAL, &t, &old_timer);
    armed = true;
  }
  ~Watchdog() {
    sigaltstack(&old_alt, nullptr);
    sigaction(SIGILL, &old_ill, nullptr);
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    if (!armed) return;
    itimerval off{};
    setitimer(ITIMER_REAL, &off, nullptr);
    sigaction(SIGALRM, &old_alrm, nullptr);
    if (old_timer.it_value.tv_sec || old_timer.it_value.tv_usec) setitimer(ITIMER_REAL, &old_timer, nullptr);
  }
};

// Runs kernel(args) on `grid` blocks of `threads` threads, one block at a time, the blocks in a random
// order per launch (seeded like the thread order; seed 0: 0, 1, 2, ...), under the watchdog.
template <class K, class A>
void launch(unsigned grid, unsigned threads, K kernel, const A& args) {
  if (g_error[0]) return;  // an earlier launch of this call failed
  const Watchdog watch(grid, threads);
  const uint64_t seed = schedule_seed();
  g_stacks.reserve(threads);
  tsan::reserve(threads);
  std::vector<unsigned> order, blocks(grid);
  for (unsigned b = 0; b < grid; ++b) blocks[b] = b;
  if (seed != 0) {  // the blocks of a launch run in a random order too (one CTA reading what another writes)
    uint64_t brng = seed ^ 0x9E3779B97F4A7C15ull;
    for (size_t i = blocks.size(); i > 1; --i) std::swap(blocks[i - 1], blocks[splitmix(brng) % i]);
  }
  try {
    for (unsigned i = 0; i < grid; ++i) {
      const unsigned b = blocks[i];
      // The host's work for the block is hidden from ThreadSanitizer: it is not ordered after the
      // earlier blocks of the launch (the threads' reads of the runtime's state are plain reads).
      const tsan::Quiet quiet;
      Block blk;
      blk.set = i % tsan::kSets;
      blk.n = threads;
      blk.f.resize(threads);
      blk.warp_arrived.assign((threads + 31) / 32, 0);
      blk.warp_mask.assign((threads + 31) / 32, 0);
      blk.warp_gen.assign((threads + 31) / 32, 0);
      blk.xbuf.assign(threads, 0);
      blk.body = [&] { kernel(args); };
      for (const auto& [p, n] : g_shared) tsan::forget(p, n);  // the earlier blocks' shared memory
      poison_shared();
      g_blk = &blk;
      tls_bid = dim3(b);
      g_watch_block = b;
      uint64_t rng = seed ^ (0xD1B54A32D192ED03ull * (uint64_t(b) + 1));
      for (unsigned t = 0; t < threads; ++t) {
        make_fiber(blk, blk.f[t], g_stacks.stack(t, blk.set), kStack);
        blk.f[t].tsan = tsan::g_fibers[blk.set][t];
      }
      blk.tsan_host = tsan::current();
      tsan::release(&tsan::g_edge_start);  // the host's writes before the launch happen before the block
      for (;;) {
        if (g_timed_out) throw Abandon{};
        order.clear();
        for (unsigned t = 0; t < threads; ++t)
          if (!blk.f[t].done && blk.f[t].wait == kRun) order.push_back(t);
        if (seed != 0)  // Fisher-Yates
          for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[splitmix(rng) % i]);
        for (unsigned t : order) {
          blk.cur = t;
          tls_tid = dim3(t);
          g_in_fiber = true;
          to_fiber(blk, t);
          g_in_fiber = false;
          if (blk.failed || g_timed_out) throw Abandon{};
        }
        const bool ran = !order.empty();
        unsigned live = 0;
        for (auto& fb : blk.f) live += !fb.done;
        if (live == 0) {
          for (unsigned w = 0; w < blk.warp_arrived.size(); ++w)
            if (blk.warp_arrived[w]) fail("a warp op is pending after every thread exited");
          break;
        }
        bool released = release_warps(blk, b);
        if (blk.bar_arrived == live) {
          for (auto& fb : blk.f)
            if (!fb.done) fb.wait = kRun;
          blk.bar_arrived = 0;
          blk.bar_gen++;
          released = true;
        }
        if (!ran && !released) {
          char msg[160];
          std::snprintf(msg, sizeof msg,
                        "deadlock in block %u: %u of %u live threads at __syncthreads, the rest at warp ops whose "
                        "named lanes never arrive (mismatched __syncthreads / warp ops)",
                        b, blk.bar_arrived, live);
          fail(msg);
        }
      }
    }
  } catch (const Abandon&) {  // a failure recorded in g_error: the launch ends here
    tsan::discard();
    asan::allow(g_stacks.base, g_stacks.total);  // the abandoned threads' frames
  }
  tsan::acquire(&tsan::g_edge_end);  // the launch's writes happen before what the host does next
  g_blk = nullptr;
  g_in_fiber = false;
}

// The calling lane joins the warp op naming `mask` (default: every existing lane of its warp) and
// parks until every named lane has joined. The lane that completes the meeting (the last named lane
// to arrive, in the randomised order) first runs last(), which may read what every named lane
// published before arriving and write what they read after the release (an op computed once per
// warp instead of once per lane); then it parks like the others.
// `orders` (DK_EMU_TSAN): the meeting orders the named lanes' memory accesses (__syncwarp, the
// matrix ops), or not (shuffles, ballots), see dkemu::tsan.
template <class F>
inline void warp_meet(unsigned mask, bool orders, F&& last) {
  const tsan::Quiet q;
  Block& B = *g_blk;
  const unsigned t = tls_tid.x, w = t >> 5, bit = 1u << (t & 31u);
  if (!(mask & bit)) fail("a warp op's mask does not name the calling lane");
  if (B.warp_arrived[w] == 0)
    B.warp_mask[w] = mask;
  else if (B.warp_mask[w] != mask)
    fail("the lanes of a warp op disagree on its mask (divergent warp ops)");
  B.warp_arrived[w] |= bit;
  char* edge = &tsan::g_edge_warp[B.set][w][B.warp_gen[w] & 1u];
  if (orders) tsan::release(edge);
  if (B.warp_arrived[w] == mask) {
    if (orders) tsan::acquire(edge);  // last() reads what the other lanes published
    last();
    if (orders) tsan::release(edge);  // and the lanes read what last() wrote
  }
  park(kWarpBar);
  if (orders) tsan::acquire(edge);
}
template <class F>
inline void warp_sync_last(unsigned mask, F&& last) {
  warp_meet(mask, true, last);
}
inline void warp_sync(unsigned mask) {
  warp_meet(mask, true, [] {});
}
// A meeting of the named lanes that orders no memory access: a shuffle's or a ballot's.
inline void warp_exchange_meet(unsigned mask) {
  warp_meet(mask, false, [] {});
}
inline void warp_sync() { warp_sync(warp_lanes(g_blk->n, tls_tid.x >> 5)); }

// Shuffle core: publish v, wait for the named lanes, read lane `src` (which must be named).
template <class T>
inline T exchange(unsigned mask, T v, unsigned src, bool in_range) {
  static_assert(sizeof(T) <= 8, "shuffle of <= 8 bytes");
  const tsan::Quiet q;
  auto& B = *g_blk;
  const unsigned t = tls_tid.x;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  B.xbuf[t] = bits;
  warp_exchange_meet(mask);
  T r = v;
  if (in_range) {
    if (!(mask >> src & 1u)) fail("a shuffle reads a lane outside its mask (undefined on a GPU)");
    std::memcpy(&r, &B.xbuf[(t & ~31u) + src], sizeof(T));
  }
  warp_exchange_meet(mask);
  return r;
}
// Vote core (__ballot_sync, __match_any_sync): publish `word`, wait for the named lanes; bit l of
// the result: lane l is named and hit(its word).
template <class F>
inline unsigned warp_vote(unsigned mask, uint64_t word, F&& hit) {
  const tsan::Quiet q;
  auto& B = *g_blk;
  const unsigned t = tls_tid.x, w = t >> 5;
  B.xbuf[t] = word;
  warp_exchange_meet(mask);
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (mask >> l & 1u) m |= unsigned(hit(B.xbuf[w * 32 + l])) << l;
  warp_exchange_meet(mask);
  return m;
}
// A device buffer in host memory between two inaccessible pages (mmap + mprotect PROT_NONE), the
// emulator's view of a GPU allocation: a launch plan's workspace or split partials, allocated
// exactly at the plan's size, and every tensor emu.py passes to a library (dk_emu_fence_alloc).
// A read or write that reaches a guard page faults at once, and the launch fails naming the buffer
// and the byte (trap_fired). The payload sits against the guard page AFTER it (at_end) or BEFORE it
// (!at_end), as close as its alignment allows (`align`: the start address is a multiple; the
// drivers' buffers are 16-byte aligned and alternate the side, next_side(); emu.py's Fence picks
// side and alignment per call in turns), so over a test run both ends of every buffer are fenced.
// The rest of the pages around the payload (the slack: under `align` bytes on the fenced side, the
// remainder of the page on the other) holds kPoison, which reads as NaN in fp32 / fp64 / bf16 /
// fp16 and as a negative int32 / int64, so a stray read there gives a poisoned value rather than a
// plausible one; check() records a failure when a launch wrote into the slack (a GPU reports
// neither: the access lands in the neighbouring allocation).
class Guarded {
 public:
  Guarded(const char* name, size_t bytes, const void* fill, size_t elem_size, size_t align, bool at_end) {
    const size_t page = page_bytes();
    align = std::max<size_t>(1, std::min<size_t>(align, page));
    region_ = std::max<size_t>(1, (bytes + page - 1) / page) * page;
    total_ = region_ + 2 * page;
    void* m = mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      std::perror("dkemu: mmap");
      std::abort();
    }
    base_ = static_cast<unsigned char*>(m);
    unsigned char* region = base_ + page;
    mprotect(base_, page, PROT_NONE);
    mprotect(region + region_, page, PROT_NONE);
    const uintptr_t lo = reinterpret_cast<uintptr_t>(region);
    const uintptr_t p = at_end ? (lo + region_ - bytes) / align * align : lo;
    p_ = reinterpret_cast<unsigned char*>(p);
    poison(region, region_);
    if (fill)
      for (size_t i = 0; i + elem_size <= bytes; i += elem_size) std::memcpy(p_ + i, fill, elem_size);
    asan::forbid(region, size_t(p_ - region));  // the slack
    asan::forbid(p_ + bytes, region_ - size_t(p_ - region) - bytes);
    info_.front = reinterpret_cast<uintptr_t>(base_);
    info_.rear = lo + region_;
    info_.data = p;
    info_.bytes = bytes;
    std::snprintf(info_.name, sizeof info_.name, "%s", name);
    g_fences.push_back(&info_);
  }
  Guarded(Guarded&& o) noexcept
      : base_(o.base_), p_(o.p_), region_(o.region_), total_(o.total_), info_(o.info_), inner_(std::move(o.inner_)) {
    std::replace(g_fences.begin(), g_fences.end(), static_cast<const FenceInfo*>(&o.info_),
                 static_cast<const FenceInfo*>(&info_));
    o.base_ = nullptr;
  }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  Guarded& operator=(Guarded&&) = delete;
  ~Guarded() {
    if (!base_) return;  // moved from
    g_fences.erase(std::remove(g_fences.begin(), g_fences.end(), &info_), g_fences.end());
    asan::allow(base_ + page_bytes(), region_);
    munmap(base_, total_);
  }
  // Where the drivers' buffers go: alternately against the guard page after and before the payload.
  static bool next_side() {
    static unsigned turn = 0;
    return (turn++ & 1u) == 0;
  }
  static Guarded bytes(const char* name, size_t n, unsigned char fill) {
    return Guarded(name, n, &fill, 1, 16, next_side());
  }
  template <class T>
  static Guarded of(const char* name, size_t count, T fill) {
    return Guarded(name, count * sizeof(T), &fill, sizeof(T), 16, next_side());
  }
  template <class T = void>
  T* data() const {
    return reinterpret_cast<T*>(p_);
  }
  // The first and last byte of the slack that a launch changed, relative to the payload's start
  // (negative: before it); first > last when none changed.
  std::pair<int64_t, int64_t> touched() const {
    const unsigned char* region = base_ + page_bytes();
    int64_t first = INT64_MAX, last = INT64_MIN;
    scan(region, 0, size_t(p_ - region), p_, first, last);
    scan(region, size_t(p_ - region) + info_.bytes, region_, p_, first, last);
    return {first, last};
  }
  // Bytes [from, to) of the region that differ from the poison pattern, relative to the payload
  // p, into [first, last]. (Reads the slack and red zones: not checked by AddressSanitizer;
  // also RowZones'.)
  DK_EMU_NO_ASAN static void scan(const unsigned char* region, size_t from, size_t to, const unsigned char* p,
                                  int64_t& first, int64_t& last) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(region);
    for (size_t i = from; i < to; ++i)
      if (region[i] != kPoison[(lo + i) & 3u]) {
        const int64_t at = int64_t(i) - int64_t(p - region);
        first = std::min(first, at), last = std::max(last, at);
      }
  }
  // A red zone inside the payload: bytes [off, off + n) (a workspace layout's gap between two
  // regions, DK_WS_REDZONE) get the slack's treatment: the poison pattern, AddressSanitizer
  // poisoning, and check() reports a write there.
  void fence_inside(size_t off, size_t n) {
    if (n == 0) return;
    if (off + n > info_.bytes) {
      record("dkemu::Guarded::fence_inside: a red zone past the buffer's end");
      return;
    }
    poison(p_ + off, n);
    asan::forbid(p_ + off, n);
    inner_.emplace_back(off, n);
  }
  void check() const {
    const auto [first, last] = touched();
    char msg[320];
    if (first <= last) {
      std::snprintf(msg, sizeof msg,
                    "%s: a launch wrote outside its %zu-byte buffer: bytes %lld .. %lld relative to its start "
                    "(the slack between the buffer and its guard pages)",
                    info_.name, info_.bytes, static_cast<long long>(first), static_cast<long long>(last));
      record(msg);
      return;
    }
    for (const auto& [off, n] : inner_) {
      int64_t lo = INT64_MAX, hi = INT64_MIN;
      scan(p_, off, off + n, p_, lo, hi);
      if (lo > hi) continue;
      std::snprintf(msg, sizeof msg,
                    "%s: a launch wrote into a red zone between two regions of its layout: bytes %lld .. %lld "
                    "(the zone: bytes %zu .. %zu)",
                    info_.name, static_cast<long long>(lo), static_cast<long long>(hi), off, off + n - 1);
      record(msg);
      return;
    }
  }
  // The red zones of a workspace layout that leaves `gap` unused bytes after every region
  // (DK_WS_REDZONE): the gap before each region start in `starts` (byte offsets into the payload)
  // but the lowest, and before `end` (the layout's end). No-op when gap is 0.
  void fence_gaps(std::vector<size_t> starts, size_t end, size_t gap) {
    if (gap == 0) return;
    starts.push_back(end);
    std::sort(starts.begin(), starts.end());
    starts.erase(std::unique(starts.begin(), starts.end()), starts.end());
    for (size_t i = 1; i < starts.size(); ++i) fence_inside(starts[i] - gap, gap);
  }

 private:
  unsigned char* base_ = nullptr;
  unsigned char* p_ = nullptr;
  size_t region_ = 0, total_ = 0;
  FenceInfo info_{};
  std::vector<std::pair<size_t, size_t>> inner_;  // red zones inside the payload (fence_inside)
};

// The red zones of a per-row scratch (rows of `stride` bytes, each ending in `gap` bytes that
// nothing uses: DK_WS_REDZONE, as in csrc/cuda/speculative.cuh lanes_per_row) at p, for this
// object's life: the poison pattern and AddressSanitizer poisoning; check() reports a write there.
// Nothing when p is null or gap is 0.
class RowZones {
 public:
  RowZones(const char* name, void* p, int64_t rows, size_t stride, size_t gap)
      : p_(static_cast<unsigned char*>(p)), rows_(p && gap ? rows : 0), stride_(stride), gap_(gap) {
    std::snprintf(name_, sizeof name_, "%s", name);
    for (int64_t r = 0; r < rows_; ++r) {
      poison(zone(r), gap_);
      asan::forbid(zone(r), gap_);
    }
  }
  RowZones(const RowZones&) = delete;
  RowZones& operator=(const RowZones&) = delete;
  ~RowZones() {
    for (int64_t r = 0; r < rows_; ++r) asan::allow(zone(r), gap_);
  }
  void check() const {
    for (int64_t r = 0; r < rows_; ++r) {
      int64_t first = INT64_MAX, last = INT64_MIN;
      Guarded::scan(zone(r), 0, gap_, zone(r), first, last);
      if (first > last) continue;
      char msg[320];
      std::snprintf(msg, sizeof msg,
                    "%s: a launch wrote into the red zone after row %lld (byte %zu of its %zu-byte row)", name_,
                    static_cast<long long>(r), stride_ - gap_ + size_t(first), stride_);
      record(msg);
      return;
    }
  }

 private:
  unsigned char* zone(int64_t r) const { return p_ + size_t(r) * stride_ + (stride_ - gap_); }
  unsigned char* p_;
  int64_t rows_;
  size_t stride_, gap_;
  char name_[120];
};
}  // namespace dkemu

#define threadIdx (dkemu::tls_tid)
#define blockIdx (dkemu::tls_bid)

// Sets the schedule seed of later launches (>= 0); -1 goes back to $DK_EMU_SEED. Exported from
// every emulator library (weak: one definition per shared object).
extern "C" __attribute__((weak, visibility("default"))) void dk_emu_set_schedule_seed(int64_t seed) {
  dkemu::g_seed_override = seed;
}

// Registers the library's emulated __shared__ variables: n (address, size) pairs (poison_shared).
// Exported like dk_emu_set_schedule_seed.
extern "C" __attribute__((weak, visibility("default"))) void dk_emu_set_shared(const uint64_t* pairs, int64_t n) {
  dkemu::g_shared.clear();
  for (int64_t i = 0; i < n; ++i)
    dkemu::g_shared.emplace_back(reinterpret_cast<unsigned char*>(pairs[2 * i]), size_t(pairs[2 * i + 1]));
}

// The failure recorded since the last call (nullptr: none), and clears it; the text stays valid
// until the next call. Exported like dk_emu_set_schedule_seed.
extern "C" __attribute__((weak, visibility("default"))) const char* dk_emu_take_error() {
  static char taken[sizeof dkemu::g_error];
  if (!dkemu::g_error[0]) return nullptr;
  std::memcpy(taken, dkemu::g_error, sizeof taken);
  dkemu::g_error[0] = '\0';
  return taken;
}

// Fenced memory for the tensors emu.py passes to a library (tests/cuda_emu/emu.py Fence): `bytes`
// in a Guarded buffer named `name`, its start a multiple of `align`, against the guard page after
// it (at_end != 0) or before it. Filled with the slack pattern; the caller copies the tensor in.
// dk_emu_fence_free checks the slack (a failure for dk_emu_take_error) and unmaps. Exported like
// dk_emu_set_schedule_seed.
namespace dkemu {
inline std::vector<Guarded*>& py_fences() {  // the buffers dk_emu_fence_alloc handed out
  static std::vector<Guarded*> v;
  return v;
}
}  // namespace dkemu
extern "C" __attribute__((weak, visibility("default"))) void* dk_emu_fence_alloc(size_t bytes, size_t align, int at_end,
                                                                                 const char* name) {
  auto* g = new dkemu::Guarded(name, bytes, nullptr, 1, align, at_end != 0);
  dkemu::py_fences().push_back(g);
  return g->data();
}
// The gaps between the rows of a strided tensor in a buffer dk_emu_fence_alloc handed out: rows of
// row_bytes every stride_bytes from its start; the gap after each row but the last becomes a red
// zone (Guarded::fence_inside: the poison pattern, AddressSanitizer poisoning, a write there fails
// at dk_emu_fence_free), so a kernel that strays from row r into row r + 1 reads poison.
extern "C" __attribute__((weak, visibility("default"))) void dk_emu_fence_row_gaps(void* data, int64_t rows,
                                                                                   size_t stride_bytes,
                                                                                   size_t row_bytes) {
  for (auto* g : dkemu::py_fences())
    if (g->data() == data) {
      for (int64_t r = 0; r + 1 < rows && stride_bytes > row_bytes; ++r)
        g->fence_inside(size_t(r) * stride_bytes + row_bytes, stride_bytes - row_bytes);
      return;
    }
  dkemu::record("dk_emu_fence_row_gaps: not a fenced buffer");
}
extern "C" __attribute__((weak, visibility("default"))) void dk_emu_fence_free(void* data) {
  auto& v = dkemu::py_fences();
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i]->data() == data) {
      v[i]->check();
      delete v[i];
      v.erase(v.begin() + std::ptrdiff_t(i));
      return;
    }
  dkemu::record("dk_emu_fence_free: not a fenced buffer");
}

inline void __syncthreads() {
  const dkemu::tsan::Quiet q;
  char* edge = &dkemu::tsan::g_edge_bar[dkemu::g_blk->set][dkemu::g_blk->bar_gen & 1u];
  dkemu::tsan::release(edge);
  dkemu::g_blk->bar_arrived++;
  dkemu::park(dkemu::kBlockBar);
  dkemu::tsan::acquire(edge);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) { dkemu::warp_sync(mask); }

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, int o) {
  const unsigned lane = threadIdx.x & 31u;
  return dkemu::exchange(mask, v, lane + unsigned(o), lane + unsigned(o) < 32u);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, int o) {
  const unsigned lane = threadIdx.x & 31u;
  return dkemu::exchange(mask, v, lane - unsigned(o), lane >= unsigned(o));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int o) {
  return dkemu::exchange(mask, v, (threadIdx.x & 31u) ^ unsigned(o), true);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src) {
  return dkemu::exchange(mask, v, unsigned(src) & 31u, true);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  return dkemu::warp_vote(mask, pred ? 1u : 0u, [](uint64_t x) { return x != 0; });
}

inline unsigned __match_any_sync(unsigned mask, unsigned v) {
  return dkemu::warp_vote(mask, v, [v](uint64_t x) { return x == v; });
}

inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// Relaxed, as on a GPU; atomic for ThreadSanitizer too (fibers never interleave inside them anyway).
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __uint2float_rn(unsigned u) { return float(u); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
using std::log;
