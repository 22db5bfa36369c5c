// Row input / output helpers shared by the sampling kernels (sampling.cuh) and the whole-step
// kernel (pipeline.cuh): 16-byte groups of a row, the float of an order key, a block-wide
// exclusive scan of per-thread counts. Torch-free; the CPU-thread emulator of tests/cuda_emu
// compiles it as plain C++.
#pragma once
#include <cstdint>
#include <cstring>
#include "decodekit/common.h"

#if defined(__CUDACC__)
#define DK_IO_FN __device__ __forceinline__
#else
#define DK_IO_FN inline
#endif

namespace dk::cuda {

// The float of an order key (inverse of float_key).
DK_IO_FN float key_to_float(uint32_t k) { return bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

template <class T>
DK_IO_FN float ld(const T* x, int64_t i) {
  return to_float(x[i]);
}

// 16-byte groups of a row: group q = elements q * kVec<T> .. + kVec<T> - 1, read with one 16-byte
// load when the row start is 16-byte aligned and the group lies inside the row, element by element
// otherwise (the same element-to-thread mapping either way, so results never depend on alignment).
template <class T>
constexpr int kVec = 16 / int(sizeof(T));
template <class T>
struct alignas(16) Vec16 {
  T v[kVec<T>];
};
template <class T>
DK_IO_FN bool aligned16(const T* x) {
  return (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
}
// out[u] = element q * kVec + u (u < kVec); elements at or past V are NaN (callers test i < V).
template <class T>
DK_IO_FN void load_group(const T* x, int64_t V, int64_t q, bool aligned, float* out) {
  const int64_t i0 = q * kVec<T>;
  if (aligned && i0 + kVec<T> <= V) {
#if defined(__CUDA_ARCH__)
    const Vec16<T> p = reinterpret_cast<const Vec16<T>*>(x)[q];
#else
    Vec16<T> p;
    memcpy(&p, x + i0, 16);
#endif
#pragma unroll
    for (int u = 0; u < kVec<T>; ++u) out[u] = to_float(p.v[u]);
  } else {
#pragma unroll
    for (int u = 0; u < kVec<T>; ++u) out[u] = i0 + u < V ? ld(x, i0 + u) : __int_as_float(0x7fc00000);
  }
}
// The raw elements of group q (the filter outputs copy kept elements bit for bit); past V: zero.
template <class T>
DK_IO_FN void load_group_raw(const T* x, int64_t V, int64_t q, bool aligned, Vec16<T>& p) {
  const int64_t i0 = q * kVec<T>;
  if (aligned && i0 + kVec<T> <= V) {
#if defined(__CUDA_ARCH__)
    p = reinterpret_cast<const Vec16<T>*>(x)[q];
#else
    memcpy(&p, x + i0, 16);
#endif
  } else {
#pragma unroll
    for (int u = 0; u < kVec<T>; ++u) p.v[u] = i0 + u < V ? x[i0 + u] : T{};
  }
}
// Stores n consecutive elements v[0..n) at out + i0 (n a multiple of 16 bytes' worth of O): 16-byte
// stores when `aligned` (out 16-byte aligned, i0 a multiple of the group) and the run lies inside
// the row, element by element otherwise.
template <class O, int n>
DK_IO_FN void store_run(O* out, int64_t V, int64_t i0, bool aligned, const O* v) {
  constexpr int per = 16 / int(sizeof(O));
  static_assert(n % per == 0, "whole 16-byte stores");
  if (aligned && i0 + n <= V) {
#pragma unroll
    for (int h = 0; h < n; h += per) {
      Vec16<O> w;
#pragma unroll
      for (int u = 0; u < per; ++u) w.v[u] = v[h + u];
#if defined(__CUDA_ARCH__)
      reinterpret_cast<Vec16<O>*>(out + i0 + h)[0] = w;
#else
      memcpy(out + i0 + h, &w, 16);
#endif
    }
  } else {
#pragma unroll
    for (int u = 0; u < n; ++u)
      if (i0 + u < V) out[i0 + u] = v[u];
  }
}
template <class T>
DK_IO_FN int64_t num_groups(int64_t V) {
  return (V + kVec<T> - 1) / kVec<T>;
}

// Exclusive prefix sum of c over a block of Threads threads in thread order, and the block total
// (all threads): the positions of each thread's items when the threads' items are laid out in
// order. wcount: Threads / 32 ints of shared memory. Barriers.
template <unsigned Threads>
DK_IO_FN int block_exclusive_scan(int c, int32_t* wcount, int& total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  int incl = c;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) wcount[wid] = incl;
  __syncthreads();
  int before = 0, tot = 0;
  for (int w = 0; w < int(Threads / 32); ++w) {
    const int v = wcount[w];
    before += w < wid ? v : 0;
    tot += v;
  }
  __syncthreads();
  total = tot;
  return before + incl - c;
}

}  // namespace dk::cuda
