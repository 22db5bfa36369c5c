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

// Every thread of a block of Threads threads calls it: the 16-element group sums of e[0..n) on one
// thread each (g16[0..ceil(n/16))), the 256-element block sums on one thread each (g256), the
// total folded by thread 0 and broadcast through *bc (shared memory). Returns the total to every
// thread; the sums are contract::walk16_sums' bit for bit (E: float weights or double terms).
template <unsigned Threads, class E>
DK_WALK_FN double block_walk16_sums(const E* e, int64_t n, double* g16, double* g256, double* bc) {
  const int64_t ng = contract::walk16_groups(n), nb = (ng + 15) / 16;
  for (int64_t j = threadIdx.x; j < ng; j += Threads) g16[j] = contract::walk16_group(e, n, j);
  __syncthreads();
  for (int64_t b = threadIdx.x; b < nb; b += Threads)
    g256[b] = contract::add_in_order(g16 + 16 * b, (16 * b + 16 < ng ? 16 * b + 16 : ng) - 16 * b);
  __syncthreads();
  if (threadIdx.x == 0) *bc = contract::add_in_order(g256, nb);
  __syncthreads();
  const double z = *bc;
  __syncthreads();
  return z;
}

}  // namespace dk::cuda
