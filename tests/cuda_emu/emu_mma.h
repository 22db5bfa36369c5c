// Lane-by-lane CPU versions of the warp-level PTX operations of csrc/cuda/attention_mma.cuh, for the
// fiber emulator of emu_runtime.h (include that first):
// - ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16: lanes 8j .. 8j + 7 give the row
//   addresses of 8x8 matrix j (16 bytes a row); register j of lane l holds, without .trans, row l / 4,
//   columns 2 (l % 4) and 2 (l % 4) + 1 of matrix j (low half first); with .trans, rows 2 (l % 4) and
//   2 (l % 4) + 1 of column l / 4.
// - mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, with g = l / 4, i = l % 4:
//   A (16x16): a0 = A[g][2i, 2i+1], a1 = A[g+8][2i, 2i+1], a2 = A[g][2i+8, 2i+9], a3 = A[g+8][2i+8, 2i+9];
//   B (16x8):  b0 = B[2i, 2i+1][g], b1 = B[2i+8, 2i+9][g];
//   C / D (16x8 fp32): c0, c1 = C[g][2i, 2i+1], c2, c3 = C[g+8][2i, 2i+1].
//   Each output is c + sum_k a_k b_k with the 16 exact products summed in double, rounded to fp32
//   once (the hardware's internal order is unspecified; fp32 accumulation either way). The lane
//   that completes the warp's meeting computes all 32 lanes' D from the 32 published fragments
//   (each 16-bit value converted once); every lane then reads its own four outputs.
// - cp.async 16 bytes with commit_group / wait_group as a DEFERRED copy: the destination is poisoned
//   (0xff bytes: NaN in bf16 and fp16) when the copy is issued, and the data lands only when this
//   thread executes a wait_group that covers the copy's group; a kernel that reads a buffer
//   without the wait (or without the __syncthreads after it) reads NaN or stale data.
// The warp operations meet through dkemu::warp_sync (emu_runtime.h) with a double-buffered per-lane
// staging area: a lane publishes its operands in buffer (op count & 1), the warp meets once, every
// lane reads what it needs; the next operation writes the other buffer, which every lane finished
// reading before it arrived at this operation's meeting.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <type_traits>
#include <vector>
#include "decodekit/common.h"

namespace dkemu::mma {

constexpr unsigned kMaxThreads = 1024;
constexpr int kSlots = 12;  // 32-bit words a lane publishes at most
inline uint32_t g_stage[2][kMaxThreads][kSlots];
inline unsigned g_ops[kMaxThreads];  // warp operations this thread has executed

[[noreturn]] inline void fail(const char* what) {
  char msg[200];
  std::snprintf(msg, sizeof msg, "mma: %s (thread %u of block %u)", what, threadIdx.x, blockIdx.x);
  dkemu::fail(msg);
}

using Row = uint32_t[kSlots];
// Publishes n words of this lane, meets the warp (the completing lane runs last(rows) first);
// returns the warp's 32 staging rows (row = lane).
template <class F>
inline const Row* exchange(const uint32_t* words, int n, F&& last) {
  const unsigned t = threadIdx.x;
  if (t >= kMaxThreads) fail("thread index beyond the staging area");
  unsigned buf;
  {
    const tsan::Quiet q;  // the staging area is the runtime's (reused by thread index across blocks)
    buf = g_ops[t]++ & 1u;
    std::memcpy(g_stage[buf][t], words, sizeof(uint32_t) * unsigned(n));
  }
  const Row* rows = &g_stage[buf][t & ~31u];
  dkemu::warp_sync_last(dkemu::warp_lanes(dkemu::g_blk->n, t >> 5), [&] { last(rows); });
  return rows;
}
inline const Row* exchange(const uint32_t* words, int n) {
  return exchange(words, n, [](const Row*) {});
}

inline void ldmatrix(uint32_t* r, const void* addr, int nmat, bool trans) {
  uint32_t w[2];
  const uint64_t a = reinterpret_cast<uintptr_t>(addr);
  w[0] = uint32_t(a);
  w[1] = uint32_t(a >> 32);
  const auto* st = exchange(w, 2);
  const unsigned lane = threadIdx.x & 31u;
  auto row_ptr = [&](unsigned src) {
    const uint64_t p = uint64_t(st[src][0]) | uint64_t(st[src][1]) << 32;
    if (p % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
    return reinterpret_cast<const uint16_t*>(uintptr_t(p));
  };
  for (int j = 0; j < nmat; ++j) {
    uint16_t h[2];
    for (unsigned e = 0; e < 2; ++e) {
      if (!trans) {
        h[e] = row_ptr(8 * j + lane / 4)[2 * (lane % 4) + e];
      } else {
        h[e] = row_ptr(8 * j + 2 * (lane % 4) + e)[lane / 4];
      }
    }
    r[j] = uint32_t(h[0]) | uint32_t(h[1]) << 16;
  }
}

inline double half_value(uint32_t word, unsigned hi, bool f16) {
  const uint16_t x = uint16_t(hi ? word >> 16 : word);
  if (f16) return double(dk::to_float(dk::f16_t{x}));
  return double(dk::to_float(dk::bf16_t{x}));
}

// Per warp: the D fragments of the last mma, written by the completing lane, read by each lane
// after the release and before it arrives at its next warp operation (so one buffer suffices).
inline float g_mma_d[kMaxThreads / 32][32][4];

inline void mma_m16n8k16(bool f16, float d[4], const uint32_t a[4], const uint32_t b[2]) {
  uint32_t w[10] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  std::memcpy(w + 6, d, 4 * sizeof(float));
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x & 31u;
  exchange(w, 10, [&](const Row* st) {
    double A[16][16], B[16][8];
    for (unsigned row = 0; row < 16; ++row)
      for (unsigned k = 0; k < 16; ++k)  // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register
        A[row][k] =                      // (row >= 8) + 2 (k >= 8), half k % 2
            half_value(st[(row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2, f16);
    for (unsigned k = 0; k < 16; ++k)
      for (unsigned col = 0; col < 8; ++col)  // B[k][col]: lane col * 4 + (k % 8) / 2, register 4 + (k >= 8)
        B[k][col] = half_value(st[col * 4 + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)], k % 2, f16);
    double acc[16][8];  // C[row][col]: lane (row % 8) * 4 + col / 2, register 2 (row >= 8) + col % 2
    for (unsigned row = 0; row < 16; ++row)
      for (unsigned col = 0; col < 8; ++col) {
        float c;
        std::memcpy(&c, &st[(row % 8) * 4 + col / 2][6 + 2 * (row >= 8 ? 1 : 0) + col % 2], sizeof(float));
        acc[row][col] = c;
      }
    for (unsigned k = 0; k < 16; ++k)  // every output sums its products in the order k = 0 .. 15
      for (unsigned row = 0; row < 16; ++row)
        for (unsigned col = 0; col < 8; ++col) acc[row][col] += A[row][k] * B[k][col];
    for (unsigned l = 0; l < 32; ++l)
      for (unsigned i = 0; i < 4; ++i) g_mma_d[warp][l][i] = float(acc[l / 4 + 8 * (i / 2)][2 * (l % 4) + i % 2]);
  });
  for (unsigned i = 0; i < 4; ++i) d[i] = g_mma_d[warp][lane][i];
}

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};
// The per-thread queues are the runtime's bookkeeping, hidden from ThreadSanitizer (tsan::Quiet):
// the blocks of a launch reuse them by thread index, unordered (emu_runtime.h). The copies
// themselves (the memset / memcpy into shared memory) are checked, as the issuing thread's writes.
inline std::vector<Copy> g_open[kMaxThreads];                // issued, not yet committed
inline std::deque<std::vector<Copy>> g_groups[kMaxThreads];  // committed, oldest first

inline void cp_async_16(void* dst, const void* src, bool valid) {
  const unsigned t = threadIdx.x;
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) fail("cp.async shared address not 16-byte aligned");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async global address not 16-byte aligned");
  std::memset(dst, 0xff, 16);
  const tsan::Quiet q;
  g_open[t].push_back({dst, src, valid});
}
inline void cp_async_commit() {
  const unsigned t = threadIdx.x;
  const tsan::Quiet q;
  g_groups[t].push_back(std::move(g_open[t]));
  g_open[t].clear();
}
// wait_group n: every group but the newest n is complete (its copies land now).
inline void cp_async_wait(int n) {
  const unsigned t = threadIdx.x;
  for (;;) {
    std::vector<Copy> group;
    {
      const tsan::Quiet q;
      if (g_groups[t].size() <= size_t(n)) return;
      group = std::move(g_groups[t].front());
      g_groups[t].pop_front();
    }
    for (const Copy& c : group) {
      if (c.valid) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    }
    const tsan::Quiet q;
    std::vector<Copy>().swap(group);  // (freed here, hidden too)
  }
}
// Copies issued but never waited for (checked after a launch; a kernel must not exit with any).
inline size_t cp_async_pending() {
  size_t n = 0;
  for (unsigned t = 0; t < kMaxThreads; ++t) {
    n += g_open[t].size();
    for (const auto& g : g_groups[t]) n += g.size();
  }
  return n;
}
inline void cp_async_reset() {
  for (unsigned t = 0; t < kMaxThreads; ++t) {
    g_open[t].clear();
    g_groups[t].clear();
  }
}

}  // namespace dkemu::mma
