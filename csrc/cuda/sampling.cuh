// CUDA kernels of the sampling / filter family: `sample` (inverse-CDF with temperature, top-k,
// top-p, min-p; sequential or joint order), `gumbel_sample` (Gumbel-max) and `filter` (mask
// logits / renorm probs / softmax). Torch-free: compiles with plain nvcc (see .ci/cuda_compile.sh);
// csrc/cuda/sampling.cu is the thin torch launcher.
//
// Contract: a GPU run gives the SAME tokens as the CPU engine (csrc/cpu/row_engine.h and
// csrc/cpu/isa/sampling.cpp) for the same inputs and seed. The CPU defines the canonical result;
// these kernels compute the same quantities in the same floating-point order wherever the
// result depends on it:
//   * every per-element value comes from the shared DK_HOST_DEVICE code (dk_exp, dk_log,
//     gumbel_from_uniform in fmath.h, float_key / to_float in common.h, Philox in philox.h,
//     row_uniform in rng.h); float operations are the explicitly rounded intrinsics (fmath.h's
//     v_* on the device), so no a*b+c is fused behind our back whatever -fmad says; the FMAs are
//     the explicit __fmaf_rn of v_fma.
//   * row masses follow the canonical reduction order of decodekit/contract.h (per 4096-element
//     chunk 16 lanes summed in index order and reduced j = 0..15, chunk masses in chunk order),
//     exactly as row_engine.h's row_mass / draw(); every (chunk, lane) sum is its own thread.
//   * the list draw and the walk inside the chosen chunk follow the contract's 16-ary walk
//     (decodekit/contract.h walk16_*): the group and block sums run on one thread each, thread 0
//     walks at most 3 x 16 steps. Top-p's Z over the top-k survivors is a sequential sum in index
//     order (the CPU's resolve()) on one thread (adding +0.0 for skipped elements is a no-op, so
//     those are skipped).
//   * top-k: the k-th largest value (radix select over float_key: exact); top-p: a mass-weighted
//     radix select over float_key (4 passes of 8 bits, deterministic bin sums).
//   * the method choice (list walk when |S| <= 2048 and S lies in the CPU's candidate list,
//     else the chunked draw) and the fallbacks of the chunked draw follow draw() in row_engine.h.
//
// Where CUDA can differ from the CPU (documented, rare):
//   * top-p cut: both pick the smallest value v with mass(> v) < p*Z. Z is bit-identical, but
//     mass(> v) is summed in a different order (CPU: quickselect partition order; here: the
//     fixed-order bins of a mass-weighted radix select), so when mass(> v) lies within a few
//     double ulps of p*Z the two may put the cut on neighbouring values. Deterministic on each
//     device.
//   * logprobs: log(double) of CUDA's libdevice vs glibc may differ by one double ulp before the
//     float rounding; the float log-probability can then differ in its last bit.
//   * min-p alone uses the CPU's candidate window test -logf(min_p) + 0.25f <= min(80, ...); with
//     glibc logf that is exactly min_p >= kMinPWindowMin (0x05f66f6f, ~2.3e-35), hard-coded here
//     (the list-vs-chunk method choice for min_p below ~2.3e-35 would otherwise depend on logf).
#pragma once
#if !defined(DK_CUDA_EMULATE)  // tests/cuda_emu runs these kernels on CPU threads
#include <cuda_runtime.h>
#endif
#include <cfloat>
#include <cstdint>
#include <cstring>
#include "decodekit/common.h"
#include "decodekit/contract.h"
#include "decodekit/fmath.h"
#include "decodekit/philox.h"
#include "decodekit/rng.h"
#include "radix_digit.h"

// Device functions of this file (common.h's DK_DEVICE is `static inline` on the host, which the
// CPU-thread emulator of tests/cuda_emu cannot use for member functions).
#if defined(__CUDACC__)
#define DK_CUDA_FN __device__ __forceinline__
#else
#define DK_CUDA_FN inline
#endif

namespace dk::cuda {

// ---- torch-free argument structs (filled by csrc/cuda/sampling.cu) ------------------------
using dk::DType;  // the argument enums are the CPU/CUDA contract (decodekit/contract.h)
using dk::FilterOut;

// The argument structs are the CPU/CUDA contract (decodekit/contract.h): the bindings fill the same
// SampleArgs / FilterArgs for both; here their pointers are device pointers.
using dk::FilterArgs;
using dk::Matrix;
using dk::RowFilter;
using dk::SampleArgs;

// ---- constants shared with the CPU engine -------------------------------------------------
#ifndef DK_CUDA_THREADS
#define DK_CUDA_THREADS 512
#endif
constexpr int kThreads = DK_CUDA_THREADS;  // one block per row
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size");
constexpr int kWarps = kThreads / 32;
using contract::kChunk;  // the CPU/CUDA contract (decodekit/contract.h)
using contract::kLanes;
using contract::kListMax;
using contract::kMinPWindowMinBits;
using contract::num_chunks;
constexpr int kTile = 4096;  // shared-memory tile (= one chunk)
static_assert(kChunk == kTile, "the lane pass handles one chunk per tile");
static_assert(kTile % kThreads == 0 && kTile % 16 == 0, "tile shape");

// top_p_threshold's mass histograms: kHistCopies copies of 256 double bins (16 KiB, the size of
// the list buffers they share memory with); each thread bins one 16-byte group per turn.
constexpr int kHistCopies = kWarps < 8 ? kWarps : 8;
static_assert(kWarps % kHistCopies == 0, "warps take turns on the histogram copies");

namespace detail {

DK_CUDA_FN float key_to_float(uint32_t k) { return bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

DK_CUDA_FN float neg_inf_of(const float*) { return kNegInf; }
DK_CUDA_FN bf16_t neg_inf_of(const bf16_t*) { return bf16_t{0xFF80}; }
DK_CUDA_FN f16_t neg_inf_of(const f16_t*) { return f16_t{0xFC00}; }

template <class T>
DK_CUDA_FN float ld(const T* x, int64_t i) {
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
DK_CUDA_FN bool aligned16(const T* x) {
  return (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
}
// out[u] = element q * kVec + u (u < kVec); elements at or past V are NaN (callers test i < V).
template <class T>
DK_CUDA_FN void load_group(const T* x, int64_t V, int64_t q, bool aligned, float* out) {
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
DK_CUDA_FN void load_group_raw(const T* x, int64_t V, int64_t q, bool aligned, Vec16<T>& p) {
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
DK_CUDA_FN void store_run(O* out, int64_t V, int64_t i0, bool aligned, const O* v) {
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
DK_CUDA_FN int64_t num_groups(int64_t V) {
  return (V + kVec<T> - 1) / kVec<T>;
}

// The weight of a value: exp((x - m) * invT) for logits, x itself for probabilities
// (row_engine.h Weight, scalar overload).
struct Weight {
  bool probs;
  float m, invT;
  DK_CUDA_FN float operator()(float x) const { return probs ? x : dk_exp<float>(v_mul(v_sub(x, m), invT)); }
};

// The weight function of a row whose max is m (T: the row's temperature; unused for probabilities).
DK_CUDA_FN Weight row_weight(bool probs, float m, float T) { return Weight{probs, m, probs ? 1.f : __fdiv_rn(1.f, T)}; }

struct RowParams {
  float T = 1.f;
  int64_t k = 0;
  float p = 1.f;
  float minp = 0.f;
  int order = 0;
};

DK_CUDA_FN RowParams row_params(const RowFilter& f, int64_t r) {
  RowParams rp;
  rp.T = f.is_probs ? 1.f : f.temperature.at(r);
  rp.k = f.top_k.at(r);
  rp.p = f.top_p.at(r);
  rp.minp = f.min_p.at(r);
  rp.order = int(f.order);
  return rp;
}

struct Smem {
  union {
    struct {
      int32_t idx[kListMax];
      float w[kListMax];
    } list;
    float tile[kTile];
    uint32_t hist[256];
    double mh[kHistCopies * 256];  // top_p_threshold: the warps' histogram copies
  } u;
  double dred[kWarps];
  float fred[kWarps];
  int64_t ired[kWarps];
  int32_t wcount[kWarps];
  double dlane[kThreads];                 // lane16_mass: one (chunk, lane) sum per thread; warp_hist_add: stage
  double dchunk[kThreads / kLanes];       // lane16_mass: the chunk masses of one round
  double g16[contract::kWalkMax / 16];    // walk16_sums: the group sums
  double g256[contract::kWalkMax / 256];  // walk16_sums: the 256-block sums
  double dbc;
  float fbc;
  int64_t ibc;
  uint32_t ubc;
};

// ---- block primitives (deterministic: fixed shapes, results broadcast from thread 0) ------
DK_CUDA_FN double block_sum(double v, Smem& s) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) s.dred[wid] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kWarps; ++w) t += s.dred[w];
    s.dbc = t;
  }
  __syncthreads();
  double r = s.dbc;
  __syncthreads();
  return r;
}

DK_CUDA_FN int64_t block_count(int64_t v, Smem& s) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) s.ired[wid] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t t = 0;
    for (int w = 0; w < kWarps; ++w) t += s.ired[w];
    s.ibc = t;
  }
  __syncthreads();
  int64_t r = s.ibc;
  __syncthreads();
  return r;
}

DK_CUDA_FN bool block_any(bool b, Smem& s) { return block_count(b ? 1 : 0, s) != 0; }

// (max value, lowest index attaining it); NaN values are ignored (such rows are bad anyway).
DK_CUDA_FN void block_argmax(float& v, int64_t& idx, Smem& s) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_down_sync(0xffffffffu, v, o);
    int64_t oi = __shfl_down_sync(0xffffffffu, idx, o);
    if (ov > v || (ov == v && oi < idx)) {
      v = ov;
      idx = oi;
    }
  }
  if (lane == 0) {
    s.fred[wid] = v;
    s.ired[wid] = idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float bv = s.fred[0];
    int64_t bi = s.ired[0];
    for (int w = 1; w < kWarps; ++w)
      if (s.fred[w] > bv || (s.fred[w] == bv && s.ired[w] < bi)) {
        bv = s.fred[w];
        bi = s.ired[w];
      }
    s.fbc = bv;
    s.ibc = bi;
  }
  __syncthreads();
  v = s.fbc;
  idx = s.ibc;
  __syncthreads();
}

// Rank of this thread among the flagged threads of the block (thread order); total flagged. S: any
// shared struct with int32_t wcount[kWarps] (Smem here, the speculative kernels' Shared).
template <class S>
DK_CUDA_FN int block_rank(bool flag, S& s, int& total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const unsigned b = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) s.wcount[wid] = __popc(b);
  __syncthreads();
  int before = 0, tot = 0;
  for (int w = 0; w < kWarps; ++w) {
    int c = s.wcount[w];
    before += w < wid ? c : 0;
    tot += c;
  }
  __syncthreads();
  total = tot;
  return before + __popc(b & ((1u << lane) - 1u));
}

// ---- row passes -----------------------------------------------------------------------------
// Pass A (row_engine.h scan_row): the max, the lowest index of the max, and the bad-row flag
// (NaN or +inf anywhere; probs: a negative value; nothing with positive possible weight).
struct Scan {
  float m;
  int64_t argmax;
  bool bad;
};

// scan_raw: the same over x[0..V) without the final "nothing with positive weight" test (a slice
// of a split row; the row's verdict comes from all its slices, split_verdict).
template <class T>
DK_CUDA_FN Scan scan_raw(const T* x, int64_t V, bool probs, Smem& s) {
  float m = kNegInf;
  int64_t am = INT64_MAX;
  bool bad = false;
  const bool al = aligned16(x);
  const int64_t nq = num_groups<T>(V);
  for (int64_t q = threadIdx.x; q < nq; q += kThreads) {
    float g[kVec<T>];
    load_group(x, V, q, al, g);
#pragma unroll
    for (int u = 0; u < kVec<T>; ++u) {
      const int64_t i = q * kVec<T> + u;
      const float v = g[u];
      if (i >= V) break;
      bad |= (v != v) || (v == kPosInf) || (probs && v < 0.f);
      if (v > m || (v == m && i < am)) {
        m = v;
        am = i;
      }
    }
  }
  bad = block_any(bad, s);
  block_argmax(m, am, s);
  Scan r;
  r.m = m;
  r.argmax = am;
  r.bad = bad;
  return r;
}

// A row whose max m leaves nothing with positive possible weight (all -inf logits, all-zero probs).
DK_CUDA_FN bool no_weight(float m, bool probs) { return !(m > (probs ? 0.f : kNegInf)); }

template <class T>
DK_CUDA_FN Scan scan_row(const T* x, int64_t V, bool probs, Smem& s) {
  Scan r = scan_raw(x, V, probs, s);
  r.bad = r.bad || no_weight(r.m, probs);
  return r;
}

// The k-th largest value of the row (ties counted), by a 4 x 8-bit radix select over float_key.
// Requires 1 <= k <= V.
template <class T>
DK_CUDA_FN float kth_largest(const T* x, int64_t V, int64_t k, Smem& s) {
  const bool al = aligned16(x);
  const int64_t nq = num_groups<T>(V);
  uint32_t prefix = 0, mask = 0;
  int64_t kk = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) s.u.hist[i] = 0u;
    __syncthreads();
    // warp-aggregated: lanes holding the same digit add once (logits share their top bits, so
    // plain per-element atomics would serialise on one bin)
    for (int64_t q0 = 0; q0 < nq; q0 += kThreads) {  // (a warp-uniform trip count: warp ops inside)
      const int64_t q = q0 + threadIdx.x;
      float g[kVec<T>];
      if (q < nq) load_group(x, V, q, al, g);
#pragma unroll
      for (int u = 0; u < kVec<T>; ++u) {
        unsigned digit = 256u;  // 256: not counted
        if (q < nq && q * kVec<T> + u < V) {
          const uint32_t key = float_key(g[u]);
          if ((key & mask) == prefix) digit = (key >> shift) & 255u;
        }
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        if (digit < 256u && (threadIdx.x & 31) == __ffs(peers) - 1)
          atomicAdd(&s.u.hist[digit], unsigned(__popc(peers)));
      }
    }
    __syncthreads();
    if (threadIdx.x < 32) pick_count_digit(s.u.hist, kk, &s.ubc, &s.ibc);
    __syncthreads();
    prefix |= s.ubc << shift;
    kk -= s.ibc;
    mask |= 255u << shift;
    __syncthreads();
  }
  return key_to_float(prefix);
}

// The canonical row mass (decodekit/contract.h) of the masked weights keep ? w(x) : 0, keep =
// x >= t && w(x) >= minw (row_engine.h row_mass and the chunk masses of draw()): lane j of chunk c
// adds the elements c * kChunk + j (mod 16) in index order, the lanes of a chunk are added j =
// 0..15, the chunk masses in chunk order. All (chunk, lane) sums run at once, kGroup chunks per
// round (one thread each); thread 0 folds the chunk masses. chunk_out != nullptr: chunk c's mass
// is also written to chunk_out[c]. Returns the total to every thread.
// lane16_mass_range: the same over the chunks [cb, ce) only (a slice of a split row; chunk_out is
// indexed by the absolute chunk), returning their masses added in chunk order.
template <class T>
DK_CUDA_FN double lane16_mass_range(const T* x, int64_t V, const Weight& w, float t, float minw, double* chunk_out,
                                    int64_t cb, int64_t ce, Smem& s) {
  constexpr int kGroup = kThreads / kLanes;
  const int j = threadIdx.x % kLanes, g = threadIdx.x / kLanes;
  const auto kept = [&](int64_t i) {  // adding +0.0 to a lane sum (>= +0) changes nothing
    const float v = ld(x, i);
    if (!(v >= t)) return 0.f;
    const float e = w(v);
    return e >= minw ? e : 0.f;
  };
  double z = 0.0;  // thread 0
  for (int64_t c0 = cb; c0 < ce; c0 += kGroup) {
    const int64_t c = c0 + g;
    s.dlane[threadIdx.x] = c < ce ? contract::chunk_lane_sum(V, c, j, kept) : 0.0;
    __syncthreads();
    if (threadIdx.x < kGroup && c0 + threadIdx.x < ce) {
      double m = 0.0;
      for (int q = 0; q < kLanes; ++q) m = __dadd_rn(m, s.dlane[threadIdx.x * kLanes + q]);
      s.dchunk[threadIdx.x] = m;
      if (chunk_out) chunk_out[c0 + threadIdx.x] = m;
    }
    __syncthreads();
    if (threadIdx.x == 0)
      for (int q = 0; q < kGroup && c0 + q < ce; ++q) z = __dadd_rn(z, s.dchunk[q]);
    // (the next round's writes of dchunk follow its first barrier, which thread 0 reaches after this fold)
  }
  if (threadIdx.x == 0) s.dbc = z;
  __syncthreads();
  const double r = s.dbc;
  __syncthreads();
  return r;
}

template <class T>
DK_CUDA_FN double lane16_mass(const T* x, int64_t V, const Weight& w, float t, float minw, double* chunk_out, Smem& s) {
  return lane16_mass_range(x, V, w, t, minw, chunk_out, 0, num_chunks(V), s);
}

// The sums of the contract's 16-ary walk over e[0..n) (n <= kWalkMax; decodekit/contract.h
// walk16_sums): the 16-element group sums on one thread each, the 256-blocks on one thread each,
// the total folded by thread 0. Leaves g16 / g256 in s; returns the total to every thread.
DK_CUDA_FN double walk16_sums(const float* e, int64_t n, Smem& s) {
  const int64_t ng = contract::walk16_groups(n), nb = (ng + 15) / 16;
  for (int64_t j = threadIdx.x; j < ng; j += kThreads) s.g16[j] = contract::walk16_group(e, n, j);
  __syncthreads();
  for (int64_t b = threadIdx.x; b < nb; b += kThreads)
    s.g256[b] = contract::add_in_order(s.g16 + 16 * b, (16 * b + 16 < ng ? 16 * b + 16 : ng) - 16 * b);
  __syncthreads();
  if (threadIdx.x == 0) s.dbc = contract::add_in_order(s.g256, nb);
  __syncthreads();
  const double z = s.dbc;
  __syncthreads();
  return z;
}

// Top-p threshold: the smallest value v of the considered elements (all, or x >= tk when
// within_k) such that the mass of the considered elements strictly greater than v is < P.
// Mass-weighted radix select over float_key, 4 passes of 8 bits from the top: pass q builds the
// 256-bin histogram of the masses of the considered elements whose key matches the digits chosen
// so far, and picks the digit d where the mass from the top crosses P (mass above d < P <= mass
// above d + mass of d). After 4 passes the prefix is the key K* of the answer: M(K*) < P <=
// M(K* - 1) with M(K) = mass of the keys > K, i.e. the smallest K with M(K) < P (the element
// values' order is the keys' order). If rounding leaves the total of a pass just under P, the
// lowest digit with mass is taken (as the CPU's binned cut does).
// Determinism: the bins are double sums in a fixed order. Within a warp the lanes holding the same
// digit are grouped (__match_any_sync) and the group's lowest lane adds their weights in lane
// order into the warp's histogram copy; warps w and w + kHistCopies, ... share copy w % kHistCopies
// and take turns (a barrier between turns), so each copy's bin is a sequential sum in a fixed
// order; the copies are added in copy order.
// CPU/GPU note: the CPU sums the same masses in quickselect order; only a mass within double
// rounding of P can put the cut on a different value.
DK_CUDA_FN void warp_hist_add(unsigned digit, float e, double* h, double* stage) {
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

template <class T>
DK_CUDA_FN float top_p_threshold(const T* x, int64_t V, const Weight& w, bool within_k, float tk, double P, Smem& s) {
  constexpr int kPhases = kWarps / kHistCopies;
  const bool al = aligned16(x);
  const int64_t nq = num_groups<T>(V);
  const int wid = threadIdx.x >> 5;
  double* const hist = s.u.mh + (wid % kHistCopies) * 256;
  double* const stage = s.dlane + (threadIdx.x & ~31);
  uint32_t prefix = 0, mask = 0;
  double above = 0.0;  // mass of the keys above the current prefix
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kHistCopies * 256; i += kThreads) s.u.mh[i] = 0.0;
    __syncthreads();
    for (int64_t q0 = 0; q0 < nq; q0 += kThreads) {  // (a uniform trip count: barriers inside)
      const int64_t q = q0 + threadIdx.x;
      unsigned digit[kVec<T>];
      float e[kVec<T>], g[kVec<T>];
      if (q < nq) load_group(x, V, q, al, g);
#pragma unroll
      for (int u = 0; u < kVec<T>; ++u) {
        digit[u] = 256u;  // 256: not counted
        e[u] = 0.f;
        if (q < nq && q * kVec<T> + u < V) {
          const float v = g[u];
          const uint32_t key = float_key(v);
          if ((!within_k || v >= tk) && (key & mask) == prefix) {
            digit[u] = (key >> shift) & 255u;
            e[u] = w(v);
          }
        }
      }
#pragma unroll
      for (int ph = 0; ph < kPhases; ++ph) {
        if (wid / kHistCopies == ph)
          for (int u = 0; u < kVec<T>; ++u) warp_hist_add(digit[u], e[u], hist, stage);
        if (kPhases > 1) __syncthreads();
      }
    }
    __syncthreads();
    for (int d = threadIdx.x; d < 256; d += kThreads) {  // the copies in copy order (bin d: one thread)
      double m = s.u.mh[d];
      for (int c = 1; c < kHistCopies; ++c) m = __dadd_rn(m, s.u.mh[c * 256 + d]);
      s.u.mh[d] = m;
    }
    __syncthreads();
    if (threadIdx.x < 32) pick_mass_digit(s.u.mh, above, P, &s.ubc, &s.dbc);  // where the mass from the top crosses P
    __syncthreads();
    prefix |= s.ubc << shift;
    above = s.dbc;
    mask |= 255u << shift;
    __syncthreads();
  }
  return key_to_float(prefix);
}

// Resolved filters of one row: survivors S = { x >= t and w(x) >= minw } (row_engine.h Resolved).
struct Selection {
  bool valid = false;
  Weight w{false, 0.f, 1.f};
  float t = kNegInf;
  float minw = 0.f;
  bool in_c = false;    // the CPU would walk S as a list (when |S| <= kListMax)
  float lo = -FLT_MAX;  // the CPU's candidate lists hold only x >= lo
};

template <class T>
DK_CUDA_FN Selection select_row(const T* x, int64_t V, bool probs, const RowParams& rp, Smem& s) {
  Selection sel;
  const bool k_on = rp.k >= 1 && rp.k < V;
  const bool p_on = rp.p < 1.f;
  const bool mp_on = rp.minp > 0.f;
  Scan sc = scan_row(x, V, probs, s);
  if (sc.bad) return sel;
  sel.valid = true;
  sel.w = row_weight(probs, sc.m, rp.T);
  sel.lo = probs ? FLT_TRUE_MIN : -FLT_MAX;
  // top-k: the k-th largest value; fewer than k elements >= lo: no cut (the CPU's tk = -inf)
  float tk = kNegInf;
  if (k_on) {
    tk = kth_largest(x, V, rp.k, s);
    if (!(tk >= sel.lo)) tk = kNegInf;
  }
  float t = tk;
  if (p_on) {
    const bool within_k = rp.order == 0 && k_on;
    // Z: the canonical mass of the top-k survivors or of the whole row (all (chunk, lane) sums at once)
    const double Z = lane16_mass(x, V, sel.w, within_k ? tk : kNegInf, 0.f, nullptr, s);
    const double P = double(rp.p) * Z;
    const float tp = top_p_threshold(x, V, sel.w, within_k, tk, P, s);
    t = (t < tp) ? tp : t;  // std::max(t, tp)
  }
  sel.t = t;
  sel.minw = mp_on ? (probs ? min_p_threshold(rp.minp, sc.m) : rp.minp) : 0.f;
  sel.in_c = k_on || p_on || (mp_on && float_to_bits(rp.minp) >= kMinPWindowMinBits);
  return sel;
}

// The chunked draw's second half (row_engine.h draw(), chunked branch), given the canonical chunk
// masses chunks[0..nch) of the kept weights and their total Z (in chunk order): the chunk where the
// running mass crosses u * Z, then the 16-ary walk over that chunk's kept weights. Thread 0 gets
// the token and its log-probability. Used by sample_kernel and by the split-row draw.
template <class T>
DK_CUDA_FN void chunk_draw(const T* x, int64_t V, const Weight& w, float t, float minw, const double* chunks, double Z,
                           const RngKey& key, Smem& s, int64_t& tok, float& logprob) {
  const int64_t nch = num_chunks(V);
  if (threadIdx.x == 0) {
    const double u = row_uniform(key, 0u);
    const double target = u * Z;
    double cum = 0.0;
    int64_t c = 0;
    for (; c < nch - 1; ++c) {
      if (cum + chunks[c] > target) break;
      cum += chunks[c];
    }
    while (c > 0 && chunks[c] <= 0.0) --c;
    s.ibc = c;
    s.dbc = target - cum;
  }
  __syncthreads();
  const int64_t c = s.ibc;
  const double local = s.dbc;
  __syncthreads();
  // weights of the chosen chunk's survivors with positive weight, 0 elsewhere
  const int64_t cbeg = c * kChunk, cend = (c + 1) * kChunk < V ? (c + 1) * kChunk : V;
  for (int j = threadIdx.x; j < kTile; j += kThreads) {
    const int64_t i = cbeg + j;
    float e = 0.f;
    if (i < cend) {
      float v = ld(x, i);
      if (v >= t) {
        float ew = w(v);
        if (ew >= minw && ew > 0.f) e = ew;
      }
    }
    s.u.tile[j] = e;
  }
  __syncthreads();
  const int64_t n = cend - cbeg;
  walk16_sums(s.u.tile, n, s);  // the 16-ary walk over the chunk's kept weights
  if (threadIdx.x == 0) {
    const int64_t pick = contract::walk16_pick(s.u.tile, n, s.g16, s.g256, local);
    tok = pick >= 0 ? cbeg + pick : 0;  // (-1 is unreachable: the chosen chunk has mass)
    logprob = float(log(double(pick >= 0 ? s.u.tile[pick] : 0.f)) - log(Z));
  }
}

// ---- kernels ----------------------------------------------------------------------------------
DK_CUDA_FN RngKey row_key(const SampleArgs& a, int64_t o) { return row_rng_key(a, o); }

// The input row of output row o (indices[o], else o).
template <class T>
DK_CUDA_FN const T* row_in(const SampleArgs& a, int64_t o) {
  const int64_t src = a.indices ? a.indices[o] : o;
  return static_cast<const T*>(a.in.data) + src * a.in.row_stride;
}

template <class T>
__global__ void __launch_bounds__(kThreads) sample_kernel(SampleArgs a) {
  __shared__ Smem s;
  const int64_t o = blockIdx.x;
  const T* x = row_in<T>(a, o);
  const int64_t V = a.in.V;
  const RowParams rp = row_params(a.filter, o);
  const bool probs = a.filter.is_probs;
  int64_t tok = 0;
  bool valid = false;
  float logprob = 0.f;
  if (!probs && rp.T == 0.f) {  // greedy: lowest index of the max
    Scan sc = scan_row(x, V, false, s);
    if (!sc.bad) {
      valid = true;
      tok = sc.argmax;
    }
  } else {
    const Selection sel = select_row(x, V, probs, rp, s);
    if (sel.valid) {
      valid = true;
      const Weight& w = sel.w;
      bool done = false;
      if (sel.in_c) {
        // S in index order (the first kListMax of them kept), |S| counted exactly
        int64_t n = 0;
        for (int64_t base = 0; base < V; base += kThreads) {
          const int64_t i = base + threadIdx.x;
          float e = 0.f;
          bool flag = false;
          if (i < V) {
            float v = ld(x, i);
            if (v >= sel.lo && v >= sel.t) {
              e = w(v);
              flag = e >= sel.minw;
            }
          }
          int total;
          const int pos = block_rank(flag, s, total);
          if (flag && n + pos < kListMax) {
            s.u.list.idx[n + pos] = int32_t(i);
            s.u.list.w[n + pos] = e;
          }
          n += total;
        }
        __syncthreads();
        if (n <= kListMax) {  // row_engine.h draw(), list branch: the 16-ary walk over S
          done = true;
          const float* e = s.u.list.w;
          const double Z = walk16_sums(e, n, s);
          if (threadIdx.x == 0) {
            const double u = row_uniform(row_key(a, o), 0u);
            const int64_t pick = contract::walk16_pick(e, n, s.g16, s.g256, u * Z);
            float wt = 1.f;
            if (pick >= 0) {
              tok = s.u.list.idx[pick];
              wt = e[pick];
            }
            logprob = float(log(double(wt)) - log(Z));
          }
        }
        __syncthreads();
      }
      if (!done) {  // row_engine.h draw(), chunked branch
        double* chunks = a.workspace + o * num_chunks(V);
        const double Z = lane16_mass(x, V, w, sel.t, sel.minw, chunks, s);  // ends with __syncthreads
        chunk_draw(x, V, w, sel.t, sel.minw, chunks, Z, row_key(a, o), s, tok, logprob);
      }
    }
  }
  if (threadIdx.x == 0) {
    a.out_tokens[o] = tok;
    if (a.out_valid) a.out_valid[o] = valid;
    if (a.out_logprob) a.out_logprob[o] = valid ? logprob : 0.f;
  }
}

// Gumbel-max over the elements [beg, end) of a row (beg a multiple of 32): the best score x_i + g_i,
// its lowest index and the NaN / +inf flag, block-reduced (all threads). Element i uses Philox
// block 16*(i/32) + (i%16), words (0,1) if (i/16) is even else (2,3) (as gumbel_rows_t on the CPU).
template <class T>
DK_CUDA_FN Scan gumbel_scan(const T* x, int64_t beg, int64_t end, const RngKey& key, Smem& s) {
  const float s32 = 2.3283064365386963e-10f, s64 = 5.421010862427522e-20f, half64 = 2.710505431213761e-20f,
              umax = 0.99999994f;
  float best = kNegInf;
  int64_t bidx = INT64_MAX;
  bool bad = false;
  const int64_t q_end = ((end + 31) / 32) * 16;
  for (int64_t q = (beg / 32) * 16 + threadIdx.x; q < q_end; q += kThreads) {
    const int64_t g = q >> 4;
    const int j = int(q & 15);
    const Philox4 r = philox_draw(key, 0u, uint32_t(16 * g) + uint32_t(j));
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t i = 32 * g + 16 * half + j;
      if (i >= end) break;
      const float v = ld(x, i);
      bad |= (v != v) || (v == kPosInf);
      const uint32_t wa = half ? r.v[2] : r.v[0], wb = half ? r.v[3] : r.v[1];
      float u = __fadd_rn(__fadd_rn(__fmul_rn(__uint2float_rn(wa), s32), __fmul_rn(__uint2float_rn(wb), s64)), half64);
      u = v_min(u, umax);
      const float score = __fadd_rn(v, gumbel_from_uniform<float>(u));
      if (score > best || (score == best && i < bidx)) {
        best = score;
        bidx = i;
      }
    }
  }
  Scan out;
  out.bad = block_any(bad, s);
  block_argmax(best, bidx, s);
  out.m = best;
  out.argmax = bidx;
  return out;
}

// Gumbel-max: token = argmax_i (x_i + g_i), lowest index on ties.
template <class T>
__global__ void __launch_bounds__(kThreads) gumbel_kernel(SampleArgs a) {
  __shared__ Smem s;
  const int64_t o = blockIdx.x;
  const Scan r = gumbel_scan(row_in<T>(a, o), 0, a.in.V, row_key(a, o), s);
  if (threadIdx.x == 0) {
    const bool valid = !r.bad && r.m > kNegInf;
    a.out_tokens[o] = valid ? r.argmax : 0;
    if (a.out_valid) a.out_valid[o] = valid;
    if (a.out_logprob) a.out_logprob[o] = 0.f;
  }
}

// ---- split rows: several CTAs per row when the batch is small -------------------------------------
// For a launch whose rows have no top-k / top-p / min-p (known on the host from the scalar
// arguments: greedy, temperature-only and unfiltered probability sampling, Gumbel-max), each row
// is cut into `splits` slices of `per` whole chunks, one CTA each, in two or three launches:
//   split_scan_kernel   (rows x splits CTAs): each slice's max, lowest argmax and bad flag (for
//                       Gumbel-max: the slice's best score and its lowest index) -> parts;
//   split_mass_kernel   (rows x splits CTAs, sampling only): the row's max from all its parts, then
//                       the canonical masses of the slice's chunks -> workspace;
//   split_draw_kernel   (rows CTAs): the row's verdict from its parts; greedy: the argmax; else the
//                       chunk masses added in chunk order (Z) and chunk_draw (the same code as
//                       sample_kernel), or for Gumbel-max the best part.
// The tokens, valid flags and log-probabilities are those of the one-CTA kernels by construction:
// a max, and the lowest index attaining it, do not depend on how the row is cut; each chunk mass is
// computed from its own chunk only (the canonical order of decodekit/contract.h); and the fold of
// the chunk masses and the draw run in one CTA in the same order as before.
struct SplitPart {
  float m;         // max (sampling) or best score (Gumbel-max) of the slice
  int32_t bad;     // NaN / +inf (probabilities: a negative value) in the slice
  int64_t argmax;  // lowest index attaining m (absolute)
};

struct SplitArgs {
  SampleArgs a;
  int splits = 1;              // CTAs per row
  int64_t per = 0;             // chunks per slice (the last slice may hold fewer)
  SplitPart* parts = nullptr;  // [n_out * splits]
  bool gumbel = false;
};

// The row's scan from its parts (every thread reads all of them; order-free).
DK_CUDA_FN Scan split_verdict(const SplitArgs& sa, int64_t o, bool probs) {
  Scan r{kNegInf, INT64_MAX, false};
  for (int q = 0; q < sa.splits; ++q) {
    const SplitPart p = sa.parts[o * sa.splits + q];
    r.bad = r.bad || p.bad != 0;
    if (p.m > r.m || (p.m == r.m && p.argmax < r.argmax)) {
      r.m = p.m;
      r.argmax = p.argmax;
    }
  }
  if (!sa.gumbel) r.bad = r.bad || no_weight(r.m, probs);
  return r;
}

template <class T>
__global__ void __launch_bounds__(kThreads) split_scan_kernel(SplitArgs sa) {
  __shared__ Smem s;
  const SampleArgs& a = sa.a;
  const int64_t o = blockIdx.x / sa.splits, sp = blockIdx.x % sa.splits;
  const T* x = row_in<T>(a, o);
  const int64_t beg = sp * sa.per * kChunk, end = beg + sa.per * kChunk < a.in.V ? beg + sa.per * kChunk : a.in.V;
  Scan r;
  if (sa.gumbel) {
    r = gumbel_scan(x, beg, end, row_key(a, o), s);
  } else {
    r = scan_raw(x + beg, end - beg, a.filter.is_probs, s);
    if (r.argmax != INT64_MAX) r.argmax += beg;
  }
  if (threadIdx.x == 0) sa.parts[blockIdx.x] = SplitPart{r.m, r.bad ? 1 : 0, r.argmax};
}

template <class T>
__global__ void __launch_bounds__(kThreads) split_mass_kernel(SplitArgs sa) {
  __shared__ Smem s;
  const SampleArgs& a = sa.a;
  const int64_t o = blockIdx.x / sa.splits, sp = blockIdx.x % sa.splits;
  const bool probs = a.filter.is_probs;
  const RowParams rp = row_params(a.filter, o);
  const Scan sc = split_verdict(sa, o, probs);
  if (sc.bad || (!probs && rp.T == 0.f)) return;  // (uniform over the block) bad or greedy: no masses
  const T* x = row_in<T>(a, o);
  const Weight w = row_weight(probs, sc.m, rp.T);
  const int64_t nch = num_chunks(a.in.V), cb = sp * sa.per, ce = cb + sa.per < nch ? cb + sa.per : nch;
  lane16_mass_range(x, a.in.V, w, kNegInf, 0.f, a.workspace + o * nch, cb, ce, s);
}

template <class T>
__global__ void __launch_bounds__(kThreads) split_draw_kernel(SplitArgs sa) {
  __shared__ Smem s;
  const SampleArgs& a = sa.a;
  const int64_t o = blockIdx.x;
  const bool probs = a.filter.is_probs;
  const RowParams rp = row_params(a.filter, o);
  const Scan sc = split_verdict(sa, o, probs);
  int64_t tok = 0;
  bool valid = false;
  float logprob = 0.f;
  if (sa.gumbel) {
    valid = !sc.bad && sc.m > kNegInf;
    tok = valid ? sc.argmax : 0;
  } else if (!sc.bad) {
    valid = true;
    if (!probs && rp.T == 0.f) {
      tok = sc.argmax;
    } else {
      const T* x = row_in<T>(a, o);
      const Weight w = row_weight(probs, sc.m, rp.T);
      const int64_t nch = num_chunks(a.in.V);
      const double* chunks = a.workspace + o * nch;
      const double Z = contract::add_in_order(chunks, nch);  // (lane16_mass's fold, the same adds)
      chunk_draw(x, a.in.V, w, kNegInf, 0.f, chunks, Z, row_key(a, o), s, tok, logprob);
    }
  }
  if (threadIdx.x == 0) {
    a.out_tokens[o] = tok;
    if (a.out_valid) a.out_valid[o] = valid;
    if (a.out_logprob) a.out_logprob[o] = valid ? logprob : 0.f;
  }
}

// The split plan of a sample / Gumbel-max launch (host, torch-free): n_sms = the device's SM count
// (0: never split). Rows are split only when every row is unfiltered (top-k off or >= V, top-p 1,
// min-p 0 as scalars: per-row tensors keep one CTA per row, since their values stay on the device),
// there are fewer rows than SMs, and a row has at least two chunks. Rule: aim at about n_sms CTAs in
// all, splits = ceil(nch / per) with per = ceil(nch / min(nch, ceil(n_sms / n_out))) chunks per slice.
inline SplitArgs split_plan(const SampleArgs& a, int n_sms, bool gumbel) {
  SplitArgs sa;
  sa.a = a;
  sa.gumbel = gumbel;
  const int64_t nch = num_chunks(a.in.V);
  const RowFilter& f = a.filter;
  const bool unfiltered =
      gumbel || (!f.top_k.ptr && !f.top_p.ptr && !f.min_p.ptr && (f.top_k.scalar < 1 || f.top_k.scalar >= a.in.V) &&
                 f.top_p.scalar >= 1.f && f.min_p.scalar <= 0.f);
  if (!unfiltered || n_sms <= 0 || a.n_out <= 0 || a.n_out >= n_sms || nch < 2) return sa;
  const int64_t want = (n_sms + a.n_out - 1) / a.n_out;
  const int64_t per = (nch + (want < nch ? want : nch) - 1) / (want < nch ? want : nch);
  sa.per = per;
  sa.splits = int((nch + per - 1) / per);
  return sa;
}

// Workspace of a sample / Gumbel-max launch, in doubles: the chunk masses [n_out, nch], then the
// split parts [n_out, <= nch].
inline int64_t sample_workspace_elems(int64_t n_out, int64_t V) {
  static_assert(sizeof(SplitPart) == 2 * sizeof(double), "a part is two doubles of workspace");
  return n_out * num_chunks(V) * 3;
}
inline SplitPart* split_parts(double* workspace, int64_t n_out, int64_t V) {
  return reinterpret_cast<SplitPart*>(workspace + n_out * num_chunks(V));
}

// Filters writing a [rows, V] output (filter_rows_t on the CPU).
template <class T>
__global__ void __launch_bounds__(kThreads) filter_kernel(FilterArgs a) {
  __shared__ Smem s;
  const int64_t r = blockIdx.x;
  const T* x = static_cast<const T*>(a.in.data) + r * a.in.row_stride;
  const int64_t V = a.in.V;
  const RowParams rp = row_params(a.filter, r);
  if (a.kind == FilterOut::Softmax) {
    float* out = static_cast<float*>(a.out) + r * a.out_stride;
    Scan sc = scan_row(x, V, false, s);
    if (sc.bad) {
      for (int64_t i = threadIdx.x; i < V; i += kThreads) out[i] = __int_as_float(0x7fc00000);
      return;
    }
    const Weight w = row_weight(false, sc.m, rp.T);
    const double Z = lane16_mass(x, V, w, kNegInf, 0.f, nullptr, s);
    const float inv = float(1.0 / Z);
    const bool al = aligned16(x) && aligned16(out);
    for (int64_t q = threadIdx.x; q < num_groups<T>(V); q += kThreads) {  // 16-byte loads and stores
      float g[kVec<T>];
      load_group(x, V, q, al, g);
#pragma unroll
      for (int u = 0; u < kVec<T>; ++u) g[u] = w(g[u]) * inv;
      store_run<float, kVec<T>>(out, V, q * kVec<T>, al, g);
    }
    return;
  }
  const bool probs = a.filter.is_probs;
  const Selection sel = select_row(x, V, probs, rp, s);
  if (a.kind == FilterOut::MaskLogits) {
    T* out = static_cast<T*>(a.out) + r * a.out_stride;
    const bool al = aligned16(x) && aligned16(out);
    for (int64_t q = threadIdx.x; q < num_groups<T>(V); q += kThreads) {  // 16-byte loads and stores
      Vec16<T> p;
      load_group_raw(x, V, q, al, p);
      if (sel.valid) {
#pragma unroll
        for (int u = 0; u < kVec<T>; ++u) {
          const float v = to_float(p.v[u]);
          const bool keep = v >= sel.t && sel.w(v) >= sel.minw;
          if (!keep) p.v[u] = neg_inf_of(x);
        }
      }
      store_run<T, kVec<T>>(out, V, q * kVec<T>, al, p.v);
    }
    return;
  }
  float* out = static_cast<float*>(a.out) + r * a.out_stride;  // RenormProbs
  if (!sel.valid) {
    for (int64_t i = threadIdx.x; i < V; i += kThreads) out[i] = 0.f;
    return;
  }
  const double Z = lane16_mass(x, V, sel.w, sel.t, sel.minw, nullptr, s);
  const RenormScale sc = renorm_scale(Z);  // tiny total mass: exact 2^64 pre-scaling (common.h)
  const bool al = aligned16(x) && aligned16(out);
  for (int64_t q = threadIdx.x; q < num_groups<T>(V); q += kThreads) {  // 16-byte loads and stores
    float g[kVec<T>];
    load_group(x, V, q, al, g);
#pragma unroll
    for (int u = 0; u < kVec<T>; ++u) {
      const float v = g[u];
      const float e = sel.w(v);
      g[u] = (v >= sel.t && e >= sel.minw) ? __fmul_rn(__fmul_rn(e, sc.pre), sc.inv) : 0.f;
    }
    store_run<float, kVec<T>>(out, V, q * kVec<T>, al, g);
  }
}

}  // namespace detail

using detail::sample_workspace_elems;
using detail::split_parts;
using detail::split_plan;
using detail::SplitArgs;
using detail::SplitPart;

// ---- host launchers (no torch) ------------------------------------------------------------------
#if !defined(DK_CUDA_EMULATE)
template <class T>
inline void launch_split(const SplitArgs& sa, cudaStream_t stream) {
  const dim3 parts(unsigned(sa.a.n_out * sa.splits)), rows(unsigned(sa.a.n_out)), block(kThreads);
  detail::split_scan_kernel<T><<<parts, block, 0, stream>>>(sa);
  if (!sa.gumbel) detail::split_mass_kernel<T><<<parts, block, 0, stream>>>(sa);
  detail::split_draw_kernel<T><<<rows, block, 0, stream>>>(sa);
}

// n_sms: the device's SM count, for the split-row plan (0: one CTA per row). a.workspace must hold
// sample_workspace_elems(n_out, V) doubles (also for Gumbel-max when it may split).
inline cudaError_t launch_split_or(const SampleArgs& a, int n_sms, bool gumbel, cudaStream_t stream, bool& split) {
  SplitArgs sa = split_plan(a, n_sms, gumbel);
  split = sa.splits > 1;
  if (!split) return cudaSuccess;
  sa.parts = split_parts(a.workspace, a.n_out, a.in.V);
  switch (a.in.dtype) {
    case DType::F32: launch_split<float>(sa, stream); break;
    case DType::BF16: launch_split<bf16_t>(sa, stream); break;
    case DType::F16: launch_split<f16_t>(sa, stream); break;
  }
  return cudaGetLastError();
}

inline cudaError_t launch_sample(const SampleArgs& a, cudaStream_t stream, int n_sms = 0) {
  if (a.n_out == 0) return cudaSuccess;
  bool split = false;
  const cudaError_t e = launch_split_or(a, n_sms, false, stream, split);
  if (split) return e;
  const dim3 grid(unsigned(a.n_out)), block(kThreads);
  switch (a.in.dtype) {
    case DType::F32: detail::sample_kernel<float><<<grid, block, 0, stream>>>(a); break;
    case DType::BF16: detail::sample_kernel<bf16_t><<<grid, block, 0, stream>>>(a); break;
    case DType::F16: detail::sample_kernel<f16_t><<<grid, block, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

inline cudaError_t launch_gumbel(const SampleArgs& a, cudaStream_t stream, int n_sms = 0) {
  if (a.n_out == 0) return cudaSuccess;
  bool split = false;
  const cudaError_t e = launch_split_or(a, n_sms, true, stream, split);
  if (split) return e;
  const dim3 grid(unsigned(a.n_out)), block(kThreads);
  switch (a.in.dtype) {
    case DType::F32: detail::gumbel_kernel<float><<<grid, block, 0, stream>>>(a); break;
    case DType::BF16: detail::gumbel_kernel<bf16_t><<<grid, block, 0, stream>>>(a); break;
    case DType::F16: detail::gumbel_kernel<f16_t><<<grid, block, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

inline cudaError_t launch_filter(const FilterArgs& a, cudaStream_t stream) {
  if (a.in.rows == 0) return cudaSuccess;
  const dim3 grid(unsigned(a.in.rows)), block(kThreads);
  switch (a.in.dtype) {
    case DType::F32: detail::filter_kernel<float><<<grid, block, 0, stream>>>(a); break;
    case DType::BF16: detail::filter_kernel<bf16_t><<<grid, block, 0, stream>>>(a); break;
    case DType::F16: detail::filter_kernel<f16_t><<<grid, block, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

// Odr-uses every launcher (hence every kernel instantiation) of this header; .ci/cuda_compile.sh
// references it to compile all of them with plain nvcc.
inline void instantiate_sampling() {
  SampleArgs s;
  FilterArgs f;
  (void)launch_sample(s, nullptr, 1);
  (void)launch_gumbel(s, nullptr, 1);
  (void)launch_filter(f, nullptr);
}
#endif  // !DK_CUDA_EMULATE

}  // namespace dk::cuda
