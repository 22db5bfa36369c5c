// The sums of the contract's 16-ary walk (decodekit/contract.h walk16_*) computed by one block,
// shared by the sampling / speculative kernels (sampling.cuh walk16_sums) and the whole-step
// kernel (pipeline.cuh). Torch-free; the CPU-thread emulator of tests/cuda_emu compiles it as
// plain C++.
#pragma once
#include <cstdint>
#include "decodekit/contract.h"

#if defined(__CUDACC__)
#define DK_WALK_FN __device__ __forceinline__
#else
#define DK_WALK_FN inline
#endif

namespace dk::cuda {

// Every thread of a block of Threads threads calls it: the sums of the walk's 256-element blocks
// [b0, b1) over the elements e(i), i < n (an accessor, contract::walk16_group_at): their 16-element
// group sums on one thread each (g16), then their block sums on one thread each (g256). Ends with
// a barrier. Any block range gives the same sums as the whole walk's (the whole-step kernel's
// slices each compute a share of them).
template <unsigned Threads, class EF>
DK_WALK_FN void block_walk16_blocks(const EF& e, int64_t n, int64_t b0, int64_t b1, double* g16, double* g256) {
  const int64_t ng = contract::walk16_groups(n), j1 = 16 * b1 < ng ? 16 * b1 : ng;
  for (int64_t j = 16 * b0 + threadIdx.x; j < j1; j += Threads) g16[j] = contract::walk16_group_at(e, n, j);
  __syncthreads();
  for (int64_t b = b0 + threadIdx.x; b < b1; b += Threads)
    g256[b] = contract::add_in_order(g16 + 16 * b, (16 * b + 16 < ng ? 16 * b + 16 : ng) - 16 * b);
  __syncthreads();
}

// All of them for e[0..n) (g16[0..ceil(n/16)), g256), the total folded by thread 0 and broadcast
// through *bc (shared memory). Returns the total to every thread; the sums are
// contract::walk16_sums' bit for bit (E: float weights or double terms).
template <unsigned Threads, class E>
DK_WALK_FN double block_walk16_sums(const E* e, int64_t n, double* g16, double* g256, double* bc) {
  const int64_t nb = (contract::walk16_groups(n) + 15) / 16;
  block_walk16_blocks<Threads>(contract::Walk16Array<E>{e}, n, 0, nb, g16, g256);
  if (threadIdx.x == 0) *bc = contract::add_in_order(g256, nb);
  __syncthreads();
  const double z = *bc;
  __syncthreads();
  return z;
}

}  // namespace dk::cuda
