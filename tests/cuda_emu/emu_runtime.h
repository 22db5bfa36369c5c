// A tiny CUDA-execution emulator for testing torch-free decodekit kernels on a machine without a
// GPU. The threads of a block are user-level fibers (ucontext) run round-robin on the calling
// thread: __syncthreads parks a fiber until every live thread of the block has arrived, warp
// shuffles / ballots exchange through a per-warp buffer and park until the 32 lanes arrived,
// __shared__ variables are function-local statics (blocks run one after another, so that is one
// copy per block). Only what csrc/cuda/sampling.cuh uses is provided. Float intrinsics map to the
// IEEE host operations; build with -ffp-contract=off so nothing is fused (as -fmad=false on the
// device). Not thread-safe: one launch at a time.
#pragma once
#define DK_CUDA_EMULATE 1

#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __launch_bounds__(n)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace dkemu {
enum Wait { kRun = 0, kBlockBar = 1, kWarpBar = 2 };
struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  Wait wait = kRun;
  bool done = false;
};
struct Block {
  unsigned n = 0, cur = 0;
  std::vector<Fiber> f;
  ucontext_t sched;
  unsigned bar_arrived = 0;
  std::vector<unsigned> warp_arrived;
  std::vector<uint64_t> xbuf;
  std::function<void()> body;
};
inline Block* g_blk = nullptr;
inline dim3 tls_tid, tls_bid;
constexpr size_t kStack = 256 * 1024;

inline void park(Wait w) {
  Fiber& me = g_blk->f[g_blk->cur];
  me.wait = w;
  swapcontext(&me.ctx, &g_blk->sched);
}

inline void fiber_main() {
  g_blk->body();
  g_blk->f[g_blk->cur].done = true;  // returns to uc_link (the scheduler)
}

// Runs kernel(args) on `grid` blocks of `threads` threads, one block at a time.
template <class K, class A>
void launch(unsigned grid, unsigned threads, K kernel, const A& args) {
  for (unsigned b = 0; b < grid; ++b) {
    Block blk;
    blk.n = threads;
    blk.f.resize(threads);
    blk.warp_arrived.assign((threads + 31) / 32, 0);
    blk.xbuf.assign(threads, 0);
    blk.body = [&] { kernel(args); };
    g_blk = &blk;
    tls_bid = dim3(b);
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& fb = blk.f[t];
      fb.stack.reset(new char[kStack]);
      getcontext(&fb.ctx);
      fb.ctx.uc_stack.ss_sp = fb.stack.get();
      fb.ctx.uc_stack.ss_size = kStack;
      fb.ctx.uc_link = &blk.sched;
      makecontext(&fb.ctx, fiber_main, 0);
    }
    for (;;) {
      bool ran = false;
      for (unsigned t = 0; t < threads; ++t) {
        Fiber& fb = blk.f[t];
        if (fb.done || fb.wait != kRun) continue;
        blk.cur = t;
        tls_tid = dim3(t);
        swapcontext(&blk.sched, &fb.ctx);
        ran = true;
      }
      unsigned live = 0;
      for (auto& fb : blk.f) live += !fb.done;
      if (live == 0) break;
      bool released = false;
      if (blk.bar_arrived == live) {
        for (auto& fb : blk.f)
          if (!fb.done) fb.wait = kRun;
        blk.bar_arrived = 0;
        released = true;
      }
      for (unsigned w = 0; w < blk.warp_arrived.size(); ++w) {
        unsigned lw = 0;
        for (unsigned t = 32 * w; t < 32 * w + 32 && t < threads; ++t) lw += !blk.f[t].done;
        if (lw && blk.warp_arrived[w] == lw) {
          for (unsigned t = 32 * w; t < 32 * w + 32 && t < threads; ++t)
            if (blk.f[t].wait == kWarpBar) blk.f[t].wait = kRun;
          blk.warp_arrived[w] = 0;
          released = true;
        }
      }
      if (!ran && !released) {
        std::fprintf(stderr, "dkemu: deadlock in block %u (mismatched __syncthreads / warp ops)\n", b);
        std::abort();
      }
    }
    g_blk = nullptr;
  }
}

inline void warp_sync() {
  g_blk->warp_arrived[tls_tid.x >> 5]++;
  park(kWarpBar);
}
}  // namespace dkemu

#define threadIdx (dkemu::tls_tid)
#define blockIdx (dkemu::tls_bid)

inline void __syncthreads() {
  dkemu::g_blk->bar_arrived++;
  dkemu::park(dkemu::kBlockBar);
}

template <class T>
inline T __shfl_down_sync(unsigned, T v, int o) {
  static_assert(sizeof(T) <= 8, "shuffle of <= 8 bytes");
  auto& B = *dkemu::g_blk;
  const unsigned t = threadIdx.x, lane = t & 31u;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  B.xbuf[t] = bits;
  dkemu::warp_sync();
  T r = v;
  if (lane + unsigned(o) < 32u) std::memcpy(&r, &B.xbuf[t + o], sizeof(T));
  dkemu::warp_sync();
  return r;
}

inline unsigned __ballot_sync(unsigned, int pred) {
  auto& B = *dkemu::g_blk;
  const unsigned t = threadIdx.x, w = t >> 5;
  B.xbuf[t] = pred ? 1u : 0u;
  dkemu::warp_sync();
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m |= unsigned(B.xbuf[w * 32 + l] != 0) << l;
  dkemu::warp_sync();
  return m;
}

inline unsigned __match_any_sync(unsigned, unsigned v) {
  auto& B = *dkemu::g_blk;
  const unsigned t = threadIdx.x, w = t >> 5;
  B.xbuf[t] = v;
  dkemu::warp_sync();
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m |= unsigned(B.xbuf[w * 32 + l] == v) << l;
  dkemu::warp_sync();
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
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __uint2float_rn(unsigned u) { return float(u); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
using std::log;
