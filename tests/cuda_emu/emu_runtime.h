// A tiny CUDA-execution emulator for testing torch-free decodekit kernels on a machine without a
// GPU: each thread of a block is a std::thread, __syncthreads is a std::barrier over the block,
// warp shuffles / ballots exchange through a per-warp buffer with a 32-thread barrier, __shared__
// variables are function-local statics (blocks run one after another). Only what
// csrc/cuda/sampling.cuh uses is provided. Float intrinsics map to the IEEE host operations; the
// host build must use -ffp-contract=off so nothing is fused (as -fmad=false on the device).
#pragma once
#define DK_CUDA_EMULATE 1

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __launch_bounds__(n)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace dkemu {
struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<uint64_t> xbuf;
};
inline thread_local Block* tls_blk = nullptr;
inline thread_local dim3 tls_tid, tls_bid;

// Runs kernel(args) on `grid` blocks of `threads` threads, one block at a time.
template <class K, class A>
void launch(unsigned grid, unsigned threads, K kernel, const A& args) {
  for (unsigned b = 0; b < grid; ++b) {
    Block blk;
    blk.bar = std::make_unique<std::barrier<>>(threads);
    for (unsigned w = 0; w < threads / 32; ++w) blk.warp.push_back(std::make_unique<std::barrier<>>(32));
    blk.xbuf.assign(threads, 0);
    std::vector<std::thread> ts;
    ts.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      ts.emplace_back([&, t] {
        tls_blk = &blk;
        tls_tid = dim3(t);
        tls_bid = dim3(b);
        kernel(args);
      });
    for (auto& th : ts) th.join();
  }
}
}  // namespace dkemu

#define threadIdx (dkemu::tls_tid)
#define blockIdx (dkemu::tls_bid)

inline void __syncthreads() { dkemu::tls_blk->bar->arrive_and_wait(); }

template <class T>
inline T __shfl_down_sync(unsigned, T v, int o) {
  static_assert(sizeof(T) <= 8, "shuffle of <= 8 bytes");
  auto& B = *dkemu::tls_blk;
  const unsigned t = threadIdx.x, lane = t & 31u, w = t >> 5;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  B.xbuf[t] = bits;
  B.warp[w]->arrive_and_wait();
  T r = v;
  if (lane + unsigned(o) < 32u) std::memcpy(&r, &B.xbuf[t + o], sizeof(T));
  B.warp[w]->arrive_and_wait();
  return r;
}

inline unsigned __ballot_sync(unsigned, int pred) {
  auto& B = *dkemu::tls_blk;
  const unsigned t = threadIdx.x, w = t >> 5;
  B.xbuf[t] = pred ? 1u : 0u;
  B.warp[w]->arrive_and_wait();
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m |= unsigned(B.xbuf[w * 32 + l] != 0) << l;
  B.warp[w]->arrive_and_wait();
  return m;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __uint2float_rn(unsigned u) { return float(u); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
using std::log;
