// The mass histograms of the mass-weighted radix selects (top-p's cut): per 256-bin digit the sum
// of the weights of the elements holding it, in a fixed order, on one block. Shared by the
// sampling kernels (sampling.cuh chunk_mass_hist: the raw row) and the whole-step kernel
// (pipeline.cuh: the processed row). Torch-free; the CPU-thread emulator of tests/cuda_emu
// compiles it as plain C++.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DK_HIST_FN __device__ __forceinline__
#else
#define DK_HIST_FN inline
#endif

namespace dk::cuda {

// One warp adds one weight per lane to its histogram copy h (digit 256: nothing to add): the lanes
// holding the same digit are grouped (__match_any_sync) and the group's lowest lane adds their
// weights in lane order, so each bin is a sequential sum in a fixed order. stage: the warp's 32
// doubles of shared memory. All 32 lanes call it.
DK_HIST_FN void warp_hist_add(unsigned digit, float e, double* h, double* stage) {
  if (__ballot_sync(0xffffffffu, digit < 256u) == 0u) return;  // (warp-uniform)
  const int lane = threadIdx.x & 31;
  stage[lane] = double(e);
  const unsigned peers = __match_any_sync(0xffffffffu, digit);
  __syncwarp();
  if (digit < 256u && lane == __ffs(peers) - 1) {
    double g = h[digit];
    for (unsigned b = peers; b; b &= b - 1u) g = __dadd_rn(g, stage[__ffs(b) - 1]);
    h[digit] = g;
  }
  __syncwarp();  // stage is rewritten by the next call
}

// The mass histogram of the 16-byte groups [g0, g1) of a row on a block of Threads threads, left in
// mh[0..256) (mh: Copies * 256 doubles of shared memory; stage: Threads doubles). group(g, in,
// digit, e) sets the digits (256: not counted) and weights of the KV elements of group g, or of
// none when !in (g past the range: digits 256, nothing loaded). Round
// by round (Threads groups each, thread t the group g0 + round * Threads + t), each warp adds its
// lanes' elements (element u of every lane, then u + 1, ...) into copy warp % Copies; warps w,
// w + Copies, ... share a copy and take turns (a barrier between turns); the copies are added in
// copy order. A fixed order for a given (g0, g1), whatever block runs it. All threads; ends with a
// barrier (callers read mh, then barrier before the next call).
template <int Threads, int Copies, int KV, class Group>
DK_HIST_FN void block_mass_hist(int64_t g0, int64_t g1, const Group& group, double* mh, double* stage) {
  constexpr int kPhases = Threads / 32 / Copies;
  static_assert(Threads % (32 * Copies) == 0, "warps take turns on the histogram copies");
  const int wid = int(threadIdx.x >> 5);
  double* const hist = mh + (wid % Copies) * 256;
  double* const st = stage + (threadIdx.x & ~31u);
  for (int i = int(threadIdx.x); i < Copies * 256; i += Threads) mh[i] = 0.0;
  __syncthreads();
  for (int64_t q0 = g0; q0 < g1; q0 += Threads) {  // (a uniform trip count: barriers inside)
    const int64_t g = q0 + int64_t(threadIdx.x);
    unsigned digit[KV];
    float e[KV];
    group(g, g < g1, digit, e);
#pragma unroll
    for (int ph = 0; ph < kPhases; ++ph) {
      if (wid / Copies == ph)
        for (int u = 0; u < KV; ++u) warp_hist_add(digit[u], e[u], hist, st);
      if (kPhases > 1) __syncthreads();
    }
  }
  __syncthreads();
  for (int d = int(threadIdx.x); d < 256; d += Threads) {  // the copies in copy order (bin d: one thread)
    double m = mh[d];
    for (int k = 1; k < Copies; ++k) m = __dadd_rn(m, mh[k * 256 + d]);
    mh[d] = m;
  }
  __syncthreads();
}

// The row histogram of per-chunk histograms h[c * 256 + d] (c < nch): each bin's chunk values
// added in chunk order from +0.0, one thread a bin (Threads threads), into out[0..256). No barrier:
// callers sync before reading out. (The sampling kernels' split top-p and the whole-step kernel's
// early top-p: the chunk order makes the bins independent of how many CTAs made them.)
template <int Threads>
DK_HIST_FN void fold_chunk_hists(const double* h, int64_t nch, double* out) {
  for (int d = int(threadIdx.x); d < 256; d += Threads) {
    double m = 0.0;
    for (int64_t c = 0; c < nch; ++c) m = __dadd_rn(m, h[c * 256 + d]);
    out[d] = m;
  }
}

}  // namespace dk::cuda
