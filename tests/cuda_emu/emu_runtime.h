// A tiny CUDA-execution emulator for testing torch-free decodekit kernels on a machine without a
// GPU, built to find races rather than to hide them.
//
// The threads of a block are user-level fibers (ucontext) on the calling thread. A fiber runs
// until it reaches a barrier (__syncthreads, a warp op) or exits; then the scheduler picks the next
// one. The ORDER in which the runnable fibers are resumed is a random permutation per scheduling
// round (seeded), so code that reads shared memory written by another thread without a barrier
// in between sees the stale value under some seeds. Seed 0 gives the fixed order 0, 1, 2, ... .
// The seed comes from dk_emu_set_schedule_seed() when called (>= 0), else from the environment
// variable DK_EMU_SEED, else 1; it is mixed with blockIdx.x so every block has its own order.
//
// Warp ops (__shfl_*_sync, __ballot_sync, __match_any_sync, __syncwarp, warp_sync) wait until
// every lane NAMED IN THE MASK has arrived at the same op; the emulator aborts with a message when
// a named lane has exited or does not exist, when the lanes disagree on the mask, when the calling
// lane is not in its own mask, and when a shuffle reads a lane outside the mask (undefined on a
// GPU). A block that cannot progress (mismatched __syncthreads / warp ops) aborts too.
//
// __shared__ variables are function-local statics (blocks run one after another, so that is one
// copy per block). Float intrinsics map to the IEEE host operations; build with -ffp-contract=off
// so nothing is fused (the kernels use explicitly rounded intrinsics where it matters). Not
// thread-safe: one launch at a time.
#pragma once
#define DK_CUDA_EMULATE 1

#include <ucontext.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace dkemu {
enum Wait { kRun = 0, kBlockBar = 1, kWarpBar = 2 };
struct Fiber {
  ucontext_t ctx;
  Wait wait = kRun;
  bool done = false;
};
struct Block {
  unsigned n = 0, cur = 0;
  std::vector<Fiber> f;
  ucontext_t sched;
  unsigned bar_arrived = 0;
  std::vector<unsigned> warp_arrived;  // per warp: lanes that arrived at the pending warp op
  std::vector<unsigned> warp_mask;     // per warp: the mask that op names
  std::vector<uint64_t> xbuf;          // one exchange word per thread (warp ops)
  std::function<void()> body;
};
inline Block* g_blk = nullptr;
inline dim3 tls_tid, tls_bid;
constexpr size_t kStack = 256 * 1024;
inline int64_t g_seed_override = -1;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "dkemu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

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

inline void park(Wait w) {
  Fiber& me = g_blk->f[g_blk->cur];
  me.wait = w;
  swapcontext(&me.ctx, &g_blk->sched);
}

inline void fiber_main() {
  g_blk->body();
  g_blk->f[g_blk->cur].done = true;  // returns to uc_link (the scheduler)
}

// Releases the warp ops whose named lanes all arrived; aborts when a named lane exited.
inline bool release_warps(Block& blk, unsigned b) {
  bool released = false;
  for (unsigned w = 0; w < blk.warp_arrived.size(); ++w) {
    const unsigned arrived = blk.warp_arrived[w];
    if (!arrived) continue;
    const unsigned mask = blk.warp_mask[w];
    for (unsigned l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u) || (arrived >> l & 1u)) continue;
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
      released = true;
    }
  }
  return released;
}

// Runs kernel(args) on `grid` blocks of `threads` threads, one block at a time.
template <class K, class A>
void launch(unsigned grid, unsigned threads, K kernel, const A& args) {
  const uint64_t seed = schedule_seed();
  std::vector<std::unique_ptr<char[]>> stacks(threads);
  for (auto& s : stacks) s.reset(new char[kStack]);
  std::vector<unsigned> order;
  for (unsigned b = 0; b < grid; ++b) {
    Block blk;
    blk.n = threads;
    blk.f.resize(threads);
    blk.warp_arrived.assign((threads + 31) / 32, 0);
    blk.warp_mask.assign((threads + 31) / 32, 0);
    blk.xbuf.assign(threads, 0);
    blk.body = [&] { kernel(args); };
    g_blk = &blk;
    tls_bid = dim3(b);
    uint64_t rng = seed ^ (0xD1B54A32D192ED03ull * (uint64_t(b) + 1));
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& fb = blk.f[t];
      getcontext(&fb.ctx);
      fb.ctx.uc_stack.ss_sp = stacks[t].get();
      fb.ctx.uc_stack.ss_size = kStack;
      fb.ctx.uc_link = &blk.sched;
      makecontext(&fb.ctx, fiber_main, 0);
    }
    for (;;) {
      order.clear();
      for (unsigned t = 0; t < threads; ++t)
        if (!blk.f[t].done && blk.f[t].wait == kRun) order.push_back(t);
      if (seed != 0)  // Fisher-Yates
        for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[splitmix(rng) % i]);
      for (unsigned t : order) {
        blk.cur = t;
        tls_tid = dim3(t);
        swapcontext(&blk.sched, &blk.f[t].ctx);
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
    g_blk = nullptr;
  }
}

// The calling lane joins the warp op naming `mask` (default: every existing lane of its warp) and
// parks until every named lane has joined.
inline void warp_sync(unsigned mask) {
  Block& B = *g_blk;
  const unsigned t = tls_tid.x, w = t >> 5, bit = 1u << (t & 31u);
  if (!(mask & bit)) fail("a warp op's mask does not name the calling lane");
  if (B.warp_arrived[w] == 0)
    B.warp_mask[w] = mask;
  else if (B.warp_mask[w] != mask)
    fail("the lanes of a warp op disagree on its mask (divergent warp ops)");
  B.warp_arrived[w] |= bit;
  park(kWarpBar);
}
inline void warp_sync() { warp_sync(warp_lanes(g_blk->n, tls_tid.x >> 5)); }

// Shuffle core: publish v, wait for the named lanes, read lane `src` (which must be named).
template <class T>
inline T exchange(unsigned mask, T v, unsigned src, bool in_range) {
  static_assert(sizeof(T) <= 8, "shuffle of <= 8 bytes");
  auto& B = *g_blk;
  const unsigned t = tls_tid.x;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  B.xbuf[t] = bits;
  warp_sync(mask);
  T r = v;
  if (in_range) {
    if (!(mask >> src & 1u)) fail("a shuffle reads a lane outside its mask (undefined on a GPU)");
    std::memcpy(&r, &B.xbuf[(t & ~31u) + src], sizeof(T));
  }
  warp_sync(mask);
  return r;
}
}  // namespace dkemu

#define threadIdx (dkemu::tls_tid)
#define blockIdx (dkemu::tls_bid)

// Sets the schedule seed of later launches (>= 0); -1 goes back to $DK_EMU_SEED. Exported from
// every emulator library (weak: one definition per shared object).
extern "C" __attribute__((weak, visibility("default"))) void dk_emu_set_schedule_seed(int64_t seed) {
  dkemu::g_seed_override = seed;
}

inline void __syncthreads() {
  dkemu::g_blk->bar_arrived++;
  dkemu::park(dkemu::kBlockBar);
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
  auto& B = *dkemu::g_blk;
  const unsigned t = threadIdx.x, w = t >> 5;
  B.xbuf[t] = pred ? 1u : 0u;
  dkemu::warp_sync(mask);
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (mask >> l & 1u) m |= unsigned(B.xbuf[w * 32 + l] != 0) << l;
  dkemu::warp_sync(mask);
  return m;
}

inline unsigned __match_any_sync(unsigned mask, unsigned v) {
  auto& B = *dkemu::g_blk;
  const unsigned t = threadIdx.x, w = t >> 5;
  B.xbuf[t] = v;
  dkemu::warp_sync(mask);
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (mask >> l & 1u) m |= unsigned(B.xbuf[w * 32 + l] == v) << l;
  dkemu::warp_sync(mask);
  return m;
}

inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {  // fibers never interleave inside it
  unsigned old = *p;
  *p = old + v;
  return old;
}
inline int atomicOr(int* p, int v) {  // fibers never interleave inside it
  int old = *p;
  *p = old | v;
  return old;
}
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
