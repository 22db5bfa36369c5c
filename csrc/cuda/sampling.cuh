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
//     walks at most 3 x 16 steps. Top-p's Z over the top-k survivors is the canonical mass of the
//     weights of x >= t_k (lane16_mass; the CPU's contract::sparse_mass gives the same value).
//   * top-k: the k-th largest value (radix select over float_key: exact); top-p: a mass-weighted
//     radix select over float_key (4 passes of 8 bits; the bins are chunk histograms added in
//     chunk order, so they do not depend on how many CTAs share the row).
//   * split rows: with fewer rows than SMs, every kernel's row passes run over several CTAs per
//     row (split_plan / filter_plan below) with the same results by construction.
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
#include "block_walk.h"
#include "mass_hist.h"
#include "radix_digit.h"
#include "row_io.h"

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

// The emulator's count of split-phase blocks that resolve their row (tests/cuda_emu defines
// DK_SPLIT_COUNT_WORK; nothing in a real build; a relaxed atomic add: every block adds to it).
#if defined(DK_SPLIT_COUNT_WORK) && defined(DK_CUDA_EMULATE)
inline int64_t g_split_blocks = 0;
#define DK_SPLIT_COUNT() (threadIdx.x == 0 ? void(__atomic_fetch_add(&g_split_blocks, 1, __ATOMIC_RELAXED)) : void())
#else
#define DK_SPLIT_COUNT() ((void)0)
#endif

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

DK_CUDA_FN float neg_inf_of(const float*) { return kNegInf; }
DK_CUDA_FN bf16_t neg_inf_of(const bf16_t*) { return bf16_t{0xFF80}; }
DK_CUDA_FN f16_t neg_inf_of(const f16_t*) { return f16_t{0xFC00}; }

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
  double prow[256];                       // top_p_threshold: the row histogram (chunk hists added in chunk order)
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

// Exclusive prefix sum of c over the block's threads in thread order, and the block total (all
// threads): the positions of each thread's items when the threads' items are laid out in order.
// S: any shared struct with int32_t wcount[kWarps] (Smem here, the speculative kernels' Shared).
template <class S>
DK_CUDA_FN int block_offset(int c, S& s, int& total) {
  return block_exclusive_scan<kThreads>(c, s.wcount, total);
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

// One pass of the top-k radix select: the 256-bin histogram (s.u.hist) of the digit at `shift` of
// the keys of x[0..V) that match `prefix` under `mask`. Warp-aggregated: lanes holding the same
// digit add once (logits share their top bits, so plain per-element atomics would serialise on
// one bin). Integer counts: the result does not depend on the order of the adds. Ends with a barrier.
template <class T>
DK_CUDA_FN void count_hist(const T* x, int64_t V, uint32_t prefix, uint32_t mask, int shift, Smem& s) {
  const bool al = aligned16(x);
  const int64_t nq = num_groups<T>(V);
  for (int i = threadIdx.x; i < 256; i += kThreads) s.u.hist[i] = 0u;
  __syncthreads();
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
      if (digit < 256u && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&s.u.hist[digit], unsigned(__popc(peers)));
    }
  }
  __syncthreads();
}

// The digit of pass q from s.u.hist (warp 0), applied to (prefix, kk). All threads; barriers.
DK_CUDA_FN void count_pick(int q, uint32_t& prefix, int64_t& kk, Smem& s) {
  if (threadIdx.x < 32) pick_count_digit(s.u.hist, kk, &s.ubc, &s.ibc);
  __syncthreads();
  prefix |= s.ubc << radix_shift(q);
  kk -= s.ibc;
  __syncthreads();
}

// The k-th largest value of the row (ties counted), by a 4 x 8-bit radix select over float_key.
// Requires 1 <= k <= V.
template <class T>
DK_CUDA_FN float kth_largest(const T* x, int64_t V, int64_t k, Smem& s) {
  uint32_t prefix = 0;
  int64_t kk = k;
  for (int q = 0; q < 4; ++q) {
    count_hist(x, V, prefix, radix_mask(q), radix_shift(q), s);
    count_pick(q, prefix, kk, s);
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

// The sums of the contract's 16-ary walk over e[0..n) (n <= kWalkMax; block_walk.h): leaves g16 /
// g256 in s; returns the total to every thread. S: any shared struct with g16[kWalkMax / 16],
// g256[kWalkMax / 256] and dbc (Smem here, the speculative kernels' Shared).
template <class S>
DK_CUDA_FN double walk16_sums(const float* e, int64_t n, S& s) {
  return block_walk16_sums<kThreads>(e, n, s.g16, s.g256, &s.dbc);
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
// Determinism and the canonical order: a bin's mass is the canonical order of decodekit/contract.h
// applied to the histogram: per 4096-element chunk a chunk histogram (chunk_mass_hist, a fixed
// order inside the chunk), the chunk histograms added in chunk order starting from +0.0. So the
// bins, hence the cut, do not depend on how many CTAs share the row (the split rows below compute
// the chunk histograms on many CTAs and add them in the same order).
// Inside a chunk: mass_hist.h's block_mass_hist (the chunk's 16-byte groups, round by round;
// within a warp the lanes holding the same digit add in lane order into the warp's histogram
// copy; warps sharing a copy take turns; the copies added in copy order).
// CPU/GPU note: the CPU sums the same masses in quickselect order; only a mass within double
// rounding of P can put the cut on a different value.

// The mass histogram of chunk c for pass q of the top-p select (see above): left in s.u.mh[0..256).
// All threads; ends with a barrier (callers read s.u.mh, then barrier before the next call).
template <class T>
DK_CUDA_FN void chunk_mass_hist(const T* x, int64_t V, int64_t c, const Weight& w, bool within_k, float tk,
                                uint32_t prefix, int q, Smem& s) {
  constexpr int64_t kGroups = kChunk / kVec<T>;  // 16-byte groups per chunk
  const bool al = aligned16(x);
  const int64_t q_end = (c + 1) * kGroups < num_groups<T>(V) ? (c + 1) * kGroups : num_groups<T>(V);
  const uint32_t mask = radix_mask(q);
  const int shift = radix_shift(q);
  const auto group = [&](int64_t g, bool in, unsigned* digit, float* e) {
    float v[kVec<T>];
    if (in) load_group(x, V, g, al, v);
#pragma unroll
    for (int u = 0; u < kVec<T>; ++u) {
      digit[u] = 256u;  // 256: not counted
      e[u] = 0.f;
      if (in && g * kVec<T> + u < V) {
        const uint32_t key = float_key(v[u]);
        if ((!within_k || v[u] >= tk) && (key & mask) == prefix) {
          digit[u] = (key >> shift) & 255u;
          e[u] = w(v[u]);
        }
      }
    }
  };
  block_mass_hist<kThreads, kHistCopies, kVec<T>>(c * kGroups, q_end, group, s.u.mh, s.dlane);
}

// The digit of pass q from the row histogram s.prow (warp 0), applied to (prefix, above). All
// threads; barriers.
DK_CUDA_FN void mass_pick(int q, double P, uint32_t& prefix, double& above, Smem& s) {
  if (threadIdx.x < 32) pick_mass_digit(s.prow, above, P, &s.ubc, &s.dbc);  // where the mass from the top crosses P
  __syncthreads();
  prefix |= s.ubc << radix_shift(q);
  above = s.dbc;
  __syncthreads();
}

template <class T>
DK_CUDA_FN float top_p_threshold(const T* x, int64_t V, const Weight& w, bool within_k, float tk, double P, Smem& s) {
  uint32_t prefix = 0;
  double above = 0.0;  // mass of the keys above the current prefix
  for (int q = 0; q < 4; ++q) {
    for (int d = threadIdx.x; d < 256; d += kThreads) s.prow[d] = 0.0;
    for (int64_t c = 0; c < num_chunks(V); ++c) {
      chunk_mass_hist(x, V, c, w, within_k, tk, prefix, q, s);
      for (int d = threadIdx.x; d < 256; d += kThreads) s.prow[d] = __dadd_rn(s.prow[d], s.u.mh[d]);
      __syncthreads();
    }
    mass_pick(q, P, prefix, above, s);
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

// The CPU's candidate lists hold only x >= candidate_lo (probabilities: positive ones).
DK_CUDA_FN float candidate_lo(bool probs) { return probs ? FLT_TRUE_MIN : -FLT_MAX; }

// A valid row's selection from its max m and its threshold t (k_on / p_on: top-k / top-p are on):
// the weights, the candidate bound, min-p's weight floor and the CPU's list-or-chunk choice. The
// fields select_row derives besides t, shared with the split rows (which merge m and t from parts).
DK_CUDA_FN Selection resolved_selection(bool probs, const RowParams& rp, bool k_on, bool p_on, float m, float t) {
  Selection sel;
  const bool mp_on = rp.minp > 0.f;
  sel.valid = true;
  sel.w = row_weight(probs, m, rp.T);
  sel.lo = candidate_lo(probs);
  sel.t = t;
  sel.minw = mp_on ? (probs ? min_p_threshold(rp.minp, m) : rp.minp) : 0.f;
  sel.in_c = k_on || p_on || (mp_on && float_to_bits(rp.minp) >= kMinPWindowMinBits);
  return sel;
}

template <class T>
DK_CUDA_FN Selection select_row(const T* x, int64_t V, bool probs, const RowParams& rp, Smem& s) {
  const bool k_on = rp.k >= 1 && rp.k < V;
  const bool p_on = rp.p < 1.f;
  Scan sc = scan_row(x, V, probs, s);
  if (sc.bad) return Selection{};
  Selection sel = resolved_selection(probs, rp, k_on, p_on, sc.m, kNegInf);
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
  const T* xc = x + cbeg;  // (cbeg: a multiple of kChunk, so the alignment is the row's)
  const int64_t n = cend - cbeg;
  const bool al = aligned16(xc);
  for (int q = threadIdx.x; q < kTile / kVec<T>; q += kThreads) {  // 16-byte groups
    float g[kVec<T>];
    if (q * kVec<T> < n) load_group(xc, n, q, al, g);
#pragma unroll
    for (int u = 0; u < kVec<T>; ++u) {
      const int j = q * kVec<T> + u;
      float e = 0.f;
      if (j < n && g[u] >= t) {
        const float ew = w(g[u]);
        if (ew >= minw && ew > 0.f) e = ew;
      }
      s.u.tile[j] = e;
    }
  }
  __syncthreads();
  walk16_sums(s.u.tile, n, s);  // the 16-ary walk over the chunk's kept weights
  if (threadIdx.x == 0) {
    const int64_t pick = contract::walk16_pick(s.u.tile, n, s.g16, s.g256, local);
    tok = pick >= 0 ? cbeg + pick : 0;  // (-1 is unreachable: the chosen chunk has mass)
    logprob = float(log(double(pick >= 0 ? s.u.tile[pick] : 0.f)) - log(Z));
  }
}

// The survivors of x[beg, end) as the CPU lists them (row_engine.h's candidate list: x >= lo,
// x >= t, w(x) >= minw), in index order: the first kListMax go to idx / wt (absolute indices; shared
// or global memory), the count is exact (stop_over: the pass may stop once the count passes
// kListMax, returning a count > kListMax). All threads; returns the count to every thread. S: a
// shared struct for block_offset (Smem, or the speculative kernels' Shared).
template <class T, class S>
DK_CUDA_FN int64_t list_pass(const T* x, int64_t beg, int64_t end, const Selection& sel, int32_t* idx, float* wt, S& s,
                             bool stop_over = false) {
  // 16-byte groups of x[beg, end) (beg: a multiple of kChunk, so the alignment is the row's), one
  // per thread per round; threads take consecutive groups, so thread order is index order
  const T* xs = x + beg;
  const int64_t n = end - beg, nq = num_groups<T>(n);
  const bool al = aligned16(xs);
  int64_t cnt = 0;
  for (int64_t q0 = 0; q0 < nq && !(stop_over && cnt > kListMax); q0 += kThreads) {  // (uniform: barriers inside)
    const int64_t q = q0 + threadIdx.x;
    float g[kVec<T>], e[kVec<T>];
    unsigned flags = 0;
    int c = 0;
    if (q < nq) load_group(xs, n, q, al, g);
#pragma unroll
    for (int u = 0; u < kVec<T>; ++u) {
      e[u] = 0.f;
      if (q < nq && q * kVec<T> + u < n && g[u] >= sel.lo && g[u] >= sel.t) {
        e[u] = sel.w(g[u]);
        if (e[u] >= sel.minw) {
          flags |= 1u << u;
          ++c;
        }
      }
    }
    int total;
    int64_t pos = cnt + block_offset(c, s, total);
#pragma unroll
    for (int u = 0; u < kVec<T>; ++u)
      if ((flags >> u) & 1u) {
        if (pos < kListMax) {
          idx[pos] = int32_t(beg + q * kVec<T> + u);
          wt[pos] = e[u];
        }
        ++pos;
      }
    cnt += total;
  }
  return cnt;
}

// row_engine.h draw(), list branch: the 16-ary walk over the n <= kListMax listed survivors in
// s.u.list. Thread 0 gets the token and its log-probability; ends with a barrier.
DK_CUDA_FN void list_draw(int64_t n, const RngKey& key, Smem& s, int64_t& tok, float& logprob) {
  const float* e = s.u.list.w;
  const double Z = walk16_sums(e, n, s);
  if (threadIdx.x == 0) {
    const double u = row_uniform(key, 0u);
    const int64_t pick = contract::walk16_pick(e, n, s.g16, s.g256, u * Z);
    float wt = 1.f;
    if (pick >= 0) {
      tok = s.u.list.idx[pick];
      wt = e[pick];
    }
    logprob = float(log(double(wt)) - log(Z));
  }
  __syncthreads();
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
      if (sel.in_c) {  // S in index order (the first kListMax of them kept), |S| counted exactly
        const int64_t n = list_pass(x, 0, V, sel, s.u.list.idx, s.u.list.w, s);
        __syncthreads();
        if (n <= kListMax) {
          done = true;
          list_draw(n, row_key(a, o), s, tok, logprob);
        }
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
// When a launch has fewer rows than the device has SMs, each row is cut into `splits` slices of
// `per` whole chunks, one CTA each, and the one-CTA kernel's row passes run as a sequence of
// launches (a launch boundary orders the writes of one phase before the reads of the next):
//   split_scan_kernel   [rows x splits]: each slice's max, lowest argmax and bad flag (Gumbel-max:
//                       the slice's best score and its lowest index) -> parts; with top-k, the
//                       slice's count histogram of radix pass 0 -> khist.
//   split_topk_kernel   [rows x splits] x 3 (pass q = 1..3; only when top-k may be on): the digit
//                       of pass q-1 from the slices' count histograms (integer sums: order-free),
//                       then the slice's histogram of pass q.
//   split_topp_kernel   [rows x splits] x 4 (pass q = 0..3; only when top-p may be on): pass 0
//                       finishes top-k (t_k) and computes the slice's chunk masses of top-p's Z; pass
//                       q picks the digit of pass q-1 from the CHUNK histograms added in chunk order
//                       (the canonical order: the same bins as the one-CTA select), then the slice's
//                       chunk histograms of pass q -> phist.
//   split_final_kernel  [rows x splits] (not for Gumbel-max): the row's threshold t (top-k, top-p's
//                       last digit, min-p), the canonical chunk masses of the kept weights ->
//                       kmass, and the slice's survivor list (the CPU's candidate list) -> lists.
//   split_draw_kernel   [rows]: the verdict; greedy: the argmax; when the CPU would walk a list and
//                       the slices' survivors number <= kListMax, their lists concatenated in slice
//                       order and the list draw; else the chunk masses added in chunk order (Z) and
//                       chunk_draw -- the code sample_kernel runs. Gumbel-max: the best part.
//   split_write_kernel  [rows x splits] (the filter op, instead of the draw): the slice's part of the
//                       output (masked logits, renormalised probabilities, softmax), with filter_kernel's
//                       write functions; the final phase's masses give Z (not for masked logits).
// Every CTA of a phase recomputes the row's radix state from the previous phase's histograms (the
// same result on each: same data, same code); slice 0 also stores it for the later phases.
// The tokens, valid flags and log-probabilities are those of the one-CTA kernel by construction: a
// max and the lowest index attaining it, a count histogram and a survivor count do not depend on
// how the row is cut; every mass (Z, the chunk masses, top-p's bins) is made of per-chunk sums
// added in chunk order, which each CTA computes for its own chunks with the one-CTA code; the
// list is the index-ordered survivor list; the draw runs in one CTA in the same order as before.
struct SplitPart {
  float m;         // max (sampling) or best score (Gumbel-max) of the slice
  int32_t bad;     // NaN / +inf (probabilities: a negative value) in the slice
  int64_t argmax;  // lowest index attaining m (absolute)
};

// The radix states of a split row (workspace): entry q is the state before pass q (q = 1..3),
// written by slice 0 of the launch that picks the digit of pass q-1.
struct SplitRow {
  uint32_t kprefix[4];
  int64_t kk[4];
  uint32_t pprefix[4];
  double pabove[4];
  float tk;  // top-k's threshold (split_topp_kernel pass 0)
  float t;   // the row's final threshold (split_final_kernel)
};

// Workspace regions of a launch (sample_layout).
struct SplitWs {
  double* kmass = nullptr;     // [n_out, nch] chunk masses of the kept weights (also the one-CTA kernel's)
  SplitPart* parts = nullptr;  // [n_out, splits]
  double* zmass = nullptr;     // [n_out, nch] chunk masses of top-p's Z
  uint32_t* khist = nullptr;   // [2][n_out, splits, 256] top-k count histograms (pass parity)
  double* phist = nullptr;     // [2][n_out, nch, 256] top-p chunk histograms (pass parity)
  SplitRow* rows = nullptr;    // [n_out]
  int64_t* lcount = nullptr;   // [n_out, splits] survivors per slice
  int32_t* lidx = nullptr;     // [n_out, splits, kListMax] their indices (the first kListMax)
  float* lw = nullptr;         // [n_out, splits, kListMax] and weights
};

struct SplitArgs {
  SampleArgs a;
  int splits = 1;          // CTAs per row (1: the one-CTA kernels)
  int64_t per = 0;         // chunks per slice (the last slice may hold fewer)
  bool gumbel = false;     // Gumbel-max (scan + draw only)
  bool k_phases = false;   // some row may have top-k on: the count passes run
  bool p_phases = false;   // some row may have top-p on: the mass passes run
  bool lists = false;      // some row may walk a list (any filter on)
  bool filter_op = false;  // a filter launch: no greedy rows (T = 0 goes through the filters as on one CTA)
  bool masses = true;      // the final phase computes the kept chunk masses (not for masked logits)
  int pass = 0;            // the radix pass of a split_topk / split_topp launch
  // Rows in groups (the speculative kernels' prepared nodes, speculative.cuh node_plan): group > 1
  // reads row o at (o / group) * group_stride + (o % group) * in.row_stride elements with the
  // parameters of row o / group (no indices); group = 1: row_in and row o's parameters. With
  // group_live (the chain's num_draft), row o is resolved only when its position o % group <=
  // group_live[o / group]: the other rows' blocks return at once in every phase.
  int64_t group = 1, group_stride = 0;
  const int64_t* group_live = nullptr;
  SplitWs ws;
};

// The row's scan from its parts (every thread reads all of them; order-free).
DK_CUDA_FN Scan split_verdict(const SplitArgs& sa, int64_t o, bool probs) {
  Scan r{kNegInf, INT64_MAX, false};
  for (int q = 0; q < sa.splits; ++q) {
    const SplitPart p = sa.ws.parts[o * sa.splits + q];
    r.bad = r.bad || p.bad != 0;
    if (p.m > r.m || (p.m == r.m && p.argmax < r.argmax)) {
      r.m = p.m;
      r.argmax = p.argmax;
    }
  }
  if (!sa.gumbel) r.bad = r.bad || no_weight(r.m, probs);
  return r;
}

// What every phase knows of output row o: the slice of this CTA, the verdict, the parameters.
struct SplitRowView {
  int64_t o, sp, beg, end, cb, ce;  // row, slice, its elements [beg, end) and chunks [cb, ce)
  const void* x;
  RowParams rp;
  bool probs, k_on, p_on, within_k;
};

template <class T>
DK_CUDA_FN SplitRowView split_view(const SplitArgs& sa, int64_t o, int64_t sp) {
  SplitRowView v;
  v.x = sa.group > 1 ? static_cast<const T*>(sa.a.in.data) + (o / sa.group) * sa.group_stride +
                           (o % sa.group) * sa.a.in.row_stride
                     : row_in<T>(sa.a, o);
  const int64_t V = sa.a.in.V, nch = num_chunks(V);
  v.o = o;
  v.sp = sp;
  v.cb = sp * sa.per;
  v.ce = v.cb + sa.per < nch ? v.cb + sa.per : nch;
  v.beg = v.cb * kChunk;
  v.end = v.ce * kChunk < V ? v.ce * kChunk : V;
  v.probs = sa.a.filter.is_probs;
  v.rp = row_params(sa.a.filter, o / sa.group);
  v.k_on = v.rp.k >= 1 && v.rp.k < V;
  v.p_on = v.rp.p < 1.f;
  v.within_k = v.rp.order == 0 && v.k_on;
  return v;
}

// The view of this CTA's slice (the blocks of a phase launch: [rows, splits], row-major).
template <class T>
DK_CUDA_FN SplitRowView split_cta(const SplitArgs& sa) {
  return split_view<T>(sa, blockIdx.x / sa.splits, blockIdx.x % sa.splits);
}

// Is row o resolved (SplitArgs::group_live)? Every phase's blocks of a row that is not return at once.
DK_CUDA_FN bool split_live(const SplitArgs& sa, int64_t o) {
  return sa.group_live == nullptr || o % sa.group <= sa.group_live[o / sa.group];
}
DK_CUDA_FN bool split_enter(const SplitArgs& sa, const SplitRowView& v) {
  if (!split_live(sa, v.o)) return false;
  DK_SPLIT_COUNT();
  return true;
}

// A greedy sampling row (temperature 0 on logits): the argmax, no filters.
DK_CUDA_FN bool split_greedy(const SplitArgs& sa, const SplitRowView& v) {
  return !sa.filter_op && !v.probs && v.rp.T == 0.f;
}

// A row that needs the filters (and a draw): not bad, not greedy (the same on every CTA of the row).
DK_CUDA_FN bool split_work(const SplitArgs& sa, const SplitRowView& v, Scan& sc) {
  sc = split_verdict(sa, v.o, v.probs);
  return !sc.bad && !split_greedy(sa, v);
}

// Top-k's radix state before pass q (1..4) of row o: the state before pass q-1 (stored, or the
// start), then the digit of pass q-1 from the slices' count histograms (summed in s.u.hist).
DK_CUDA_FN void split_k_state(const SplitArgs& sa, const SplitRowView& v, int q, Smem& s, uint32_t& prefix,
                              int64_t& kk) {
  const SplitRow& r = sa.ws.rows[v.o];
  prefix = q - 1 == 0 ? 0u : r.kprefix[q - 1];
  kk = q - 1 == 0 ? v.rp.k : r.kk[q - 1];
  const uint32_t* h = sa.ws.khist + ((q - 1) & 1) * sa.a.n_out * sa.splits * 256 + v.o * sa.splits * 256;
  for (int d = threadIdx.x; d < 256; d += kThreads) {
    uint32_t c = 0;
    for (int p = 0; p < sa.splits; ++p) c += h[p * 256 + d];
    s.u.hist[d] = c;
  }
  __syncthreads();
  count_pick(q - 1, prefix, kk, s);
}

// This CTA's count histogram of pass q of its slice -> khist (parity q & 1).
template <class T>
DK_CUDA_FN void split_k_hist(const SplitArgs& sa, const SplitRowView& v, int q, uint32_t prefix, Smem& s) {
  count_hist(static_cast<const T*>(v.x) + v.beg, v.end - v.beg, prefix, radix_mask(q), radix_shift(q), s);
  uint32_t* h = sa.ws.khist + (q & 1) * sa.a.n_out * sa.splits * 256 + (v.o * sa.splits + v.sp) * 256;
  for (int d = threadIdx.x; d < 256; d += kThreads) h[d] = s.u.hist[d];
}

// Top-k's threshold from the last histogram (-inf: top-k off, or fewer than k elements >= lo).
DK_CUDA_FN float split_tk(const SplitArgs& sa, const SplitRowView& v, Smem& s) {
  if (!sa.k_phases || !v.k_on) return kNegInf;
  uint32_t prefix;
  int64_t kk;
  split_k_state(sa, v, 4, s, prefix, kk);
  const float tk = key_to_float(prefix);
  return tk >= candidate_lo(v.probs) ? tk : kNegInf;  // (select_row's lo test)
}

// Top-p's radix state before pass q (1..4): the stored state before pass q-1, then the digit of
// pass q-1 from the chunk histograms added in chunk order (s.prow).
DK_CUDA_FN void split_p_state(const SplitArgs& sa, const SplitRowView& v, int q, double P, Smem& s, uint32_t& prefix,
                              double& above) {
  const SplitRow& r = sa.ws.rows[v.o];
  const int64_t nch = num_chunks(sa.a.in.V);
  prefix = q - 1 == 0 ? 0u : r.pprefix[q - 1];
  above = q - 1 == 0 ? 0.0 : r.pabove[q - 1];
  const double* h = sa.ws.phist + ((q - 1) & 1) * sa.a.n_out * nch * 256 + v.o * nch * 256;
  fold_chunk_hists<kThreads>(h, nch, s.prow);
  __syncthreads();
  mass_pick(q - 1, P, prefix, above, s);
}

DK_CUDA_FN double split_topp_P(const SplitArgs& sa, const SplitRowView& v) {
  const int64_t nch = num_chunks(sa.a.in.V);
  return double(v.rp.p) * contract::add_in_order(sa.ws.zmass + v.o * nch, nch);  // (lane16_mass's Z)
}

template <class T>
__global__ void __launch_bounds__(kThreads) split_scan_kernel(SplitArgs sa) {
  __shared__ Smem s;
  const SampleArgs& a = sa.a;
  const SplitRowView v = split_cta<T>(sa);
  if (!split_enter(sa, v)) return;
  const T* x = static_cast<const T*>(v.x);
  Scan r;
  if (sa.gumbel) {
    r = gumbel_scan(x, v.beg, v.end, row_key(a, v.o), s);
  } else {
    r = scan_raw(x + v.beg, v.end - v.beg, v.probs, s);
    if (r.argmax != INT64_MAX) r.argmax += v.beg;
    if (sa.k_phases && v.k_on && !split_greedy(sa, v)) split_k_hist<T>(sa, v, 0, 0u, s);
  }
  if (threadIdx.x == 0) sa.ws.parts[blockIdx.x] = SplitPart{r.m, r.bad ? 1 : 0, r.argmax};
}

template <class T>
__global__ void __launch_bounds__(kThreads) split_topk_kernel(SplitArgs sa) {
  __shared__ Smem s;
  const SplitRowView v = split_cta<T>(sa);
  Scan sc;
  if (!split_enter(sa, v) || !split_work(sa, v, sc) || !v.k_on) return;  // (uniform over the block)
  uint32_t prefix;
  int64_t kk;
  split_k_state(sa, v, sa.pass, s, prefix, kk);
  if (v.sp == 0 && threadIdx.x == 0) {
    sa.ws.rows[v.o].kprefix[sa.pass] = prefix;
    sa.ws.rows[v.o].kk[sa.pass] = kk;
  }
  split_k_hist<T>(sa, v, sa.pass, prefix, s);
}

template <class T>
__global__ void __launch_bounds__(kThreads) split_topp_kernel(SplitArgs sa) {
  __shared__ Smem s;
  const SplitRowView v = split_cta<T>(sa);
  const T* x = static_cast<const T*>(v.x);
  Scan sc;
  if (!split_enter(sa, v) || !split_work(sa, v, sc)) return;  // (uniform over the block)
  const int q = sa.pass;
  const int64_t V = sa.a.in.V, nch = num_chunks(V);
  float tk;
  if (q == 0) {
    tk = split_tk(sa, v, s);
    if (v.sp == 0 && threadIdx.x == 0) sa.ws.rows[v.o].tk = tk;
  } else {
    tk = sa.ws.rows[v.o].tk;
  }
  if (!v.p_on) return;
  const Weight w = row_weight(v.probs, sc.m, v.rp.T);
  uint32_t prefix = 0;
  if (q == 0) {  // Z: the canonical mass of the top-k survivors or of the whole row
    lane16_mass_range(x, V, w, v.within_k ? tk : kNegInf, 0.f, sa.ws.zmass + v.o * nch, v.cb, v.ce, s);
  } else {
    double above;
    split_p_state(sa, v, q, split_topp_P(sa, v), s, prefix, above);
    if (v.sp == 0 && threadIdx.x == 0) {
      sa.ws.rows[v.o].pprefix[q] = prefix;
      sa.ws.rows[v.o].pabove[q] = above;
    }
  }
  double* h = sa.ws.phist + (q & 1) * sa.a.n_out * nch * 256 + v.o * nch * 256;
  for (int64_t c = v.cb; c < v.ce; ++c) {
    chunk_mass_hist(x, V, c, w, v.within_k, tk, prefix, q, s);
    for (int d = threadIdx.x; d < 256; d += kThreads) h[c * 256 + d] = s.u.mh[d];
    __syncthreads();
  }
}

// The row's selection from its split state (select_row's fields; t from the final phase or given).
DK_CUDA_FN Selection split_selection(const SplitRowView& v, const Scan& sc, float t) {
  return resolved_selection(v.probs, v.rp, v.k_on, v.p_on, sc.m, t);
}

template <class T>
__global__ void __launch_bounds__(kThreads) split_final_kernel(SplitArgs sa) {
  __shared__ Smem s;
  const SplitRowView v = split_cta<T>(sa);
  const T* x = static_cast<const T*>(v.x);
  Scan sc;
  if (!split_enter(sa, v) || !split_work(sa, v, sc)) return;  // (uniform) dead, bad or greedy: nothing to do
  const int64_t V = sa.a.in.V, nch = num_chunks(V);
  float t = sa.p_phases ? sa.ws.rows[v.o].tk : split_tk(sa, v, s);
  if (sa.p_phases && v.p_on) {  // top-p's last digit
    uint32_t prefix;
    double above;
    split_p_state(sa, v, 4, split_topp_P(sa, v), s, prefix, above);
    const float tp = key_to_float(prefix);
    t = (t < tp) ? tp : t;  // std::max(t, tp)
  }
  const Selection sel = split_selection(v, sc, t);
  if (v.sp == 0 && threadIdx.x == 0) sa.ws.rows[v.o].t = t;
  if (sa.masses) lane16_mass_range(x, V, sel.w, sel.t, sel.minw, sa.ws.kmass + v.o * nch, v.cb, v.ce, s);
  if (sa.lists && sel.in_c) {
    const int64_t slot = v.o * sa.splits + v.sp;
    const int64_t n = list_pass(x, v.beg, v.end, sel, sa.ws.lidx + slot * kListMax, sa.ws.lw + slot * kListMax, s);
    if (threadIdx.x == 0) sa.ws.lcount[slot] = n;
  }
}

// The survivors S of split row o from its slices' lists (the final phase's): their number, and
// (when <= kListMax) the lists copied in slice order, which is S in index order, to idx / w (every
// thread its share: a barrier must follow before they are read).
DK_CUDA_FN int64_t split_list_size(const SplitArgs& sa, int64_t o) {
  int64_t n = 0;
  for (int p = 0; p < sa.splits; ++p) n += sa.ws.lcount[o * sa.splits + p];
  return n;
}
DK_CUDA_FN void split_list_gather(const SplitArgs& sa, int64_t o, int32_t* idx, float* w) {
  int64_t off = 0;
  for (int p = 0; p < sa.splits; ++p) {
    const int64_t slot = o * sa.splits + p, c = sa.ws.lcount[slot];
    for (int64_t j = threadIdx.x; j < c; j += kThreads) {
      idx[off + j] = sa.ws.lidx[slot * kListMax + j];
      w[off + j] = sa.ws.lw[slot * kListMax + j];
    }
    off += c;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) split_draw_kernel(SplitArgs sa) {
  __shared__ Smem s;
  const SampleArgs& a = sa.a;
  const SplitRowView v = split_view<T>(sa, blockIdx.x, 0);
  Scan sc;
  const bool work = split_work(sa, v, sc);
  int64_t tok = 0;
  bool valid = false;
  float logprob = 0.f;
  if (sa.gumbel) {
    valid = !sc.bad && sc.m > kNegInf;
    tok = valid ? sc.argmax : 0;
  } else if (!sc.bad) {
    valid = true;
    if (!work) tok = sc.argmax;  // greedy
  }
  if (!sa.gumbel && work) {
    const int64_t o = v.o;
    const T* x = static_cast<const T*>(v.x);
    const Selection sel = split_selection(v, sc, sa.ws.rows[o].t);
    bool done = false;
    if (sa.lists && sel.in_c) {
      const int64_t n = split_list_size(sa, o);
      if (n <= kListMax) {
        split_list_gather(sa, o, s.u.list.idx, s.u.list.w);
        __syncthreads();
        done = true;
        list_draw(n, row_key(a, o), s, tok, logprob);
      }
    }
    if (!done) {
      const int64_t nch = num_chunks(a.in.V);
      const double* chunks = sa.ws.kmass + o * nch;
      const double Z = contract::add_in_order(chunks, nch);  // (lane16_mass's fold, the same adds)
      chunk_draw(x, a.in.V, sel.w, sel.t, sel.minw, chunks, Z, row_key(a, o), s, tok, logprob);
    }
  }
  if (threadIdx.x == 0) {
    a.out_tokens[v.o] = tok;
    if (a.out_valid) a.out_valid[v.o] = valid;
    if (a.out_logprob) a.out_logprob[v.o] = valid ? logprob : 0.f;
  }
}

// The launch plan of a sample / Gumbel-max call (host, torch-free): n_sms = the device's SM count
// (0: never split). Rows are split when there are fewer rows than SMs and a row has at least two
// chunks (and, with top-p, the chunk histograms fit in kMaxHistBytes). Rule: aim at about n_sms
// CTAs in all, splits = ceil(nch / per) with per = ceil(nch / min(nch, ceil(n_sms / n_out))) chunks
// per slice. Which phases run follows from the scalar
// arguments (a per-row tensor may turn its filter on in any row: its phases run, and rows without
// it return at once).
constexpr int64_t kMaxHistBytes = int64_t(32) << 20;  // 32 MiB: 8192 (row, chunk) pairs, ~130 rows of V = 256000
inline SplitArgs split_plan(const SampleArgs& a, int n_sms, bool gumbel) {
  SplitArgs sa;
  sa.a = a;
  sa.gumbel = gumbel;
  const RowFilter& f = a.filter;
  const int64_t nch = num_chunks(a.in.V);
  if (!gumbel) {
    sa.k_phases = f.top_k.ptr || (f.top_k.scalar >= 1 && f.top_k.scalar < a.in.V);
    sa.p_phases = f.top_p.ptr || f.top_p.scalar < 1.f;
    sa.lists = sa.k_phases || sa.p_phases || f.min_p.ptr || f.min_p.scalar > 0.f;
  }
  if (n_sms <= 0 || a.n_out <= 0 || a.n_out >= n_sms || nch < 2) return sa;
  // top-p's chunk histograms take 2 x 256 doubles per chunk and row: no split past kMaxHistBytes
  if (sa.p_phases && 2 * a.n_out * nch * 256 * int64_t(sizeof(double)) > kMaxHistBytes) return sa;
  const int64_t want = (n_sms + a.n_out - 1) / a.n_out;
  const int64_t per = (nch + (want < nch ? want : nch) - 1) / (want < nch ? want : nch);
  sa.per = per;
  sa.splits = int((nch + per - 1) / per);
  return sa;
}

// The workspace of a plan, in doubles, and its regions (base != nullptr: sa.ws points into it).
// The one-CTA sample kernel uses kmass only; Gumbel-max and filters without a split, nothing.
inline int64_t sample_layout(SplitArgs& sa, double* base) {
  const int64_t n = sa.a.n_out, nch = num_chunks(sa.a.in.V), sp = sa.splits;
  int64_t off = 0;
  const auto take = [&](int64_t doubles) {  // then DK_WS_REDZONE bytes that nothing uses (0 on a GPU)
    double* p = base ? base + off : nullptr;
    off += doubles + DK_WS_REDZONE / int64_t(sizeof(double));
    return p;
  };
  if (sp <= 1) {  // one CTA per row: only the sample kernel's chunk masses
    if (!sa.gumbel && !sa.filter_op) sa.ws.kmass = take(n * nch);
    return off;
  }
  if (!sa.gumbel && sa.masses) sa.ws.kmass = take(n * nch);
  static_assert(sizeof(SplitPart) == 2 * sizeof(double) && sizeof(SplitRow) % sizeof(double) == 0, "whole doubles");
  sa.ws.parts = reinterpret_cast<SplitPart*>(take(n * sp * 2));
  sa.ws.rows = reinterpret_cast<SplitRow*>(take(n * int64_t(sizeof(SplitRow) / sizeof(double))));
  if (sa.k_phases) sa.ws.khist = reinterpret_cast<uint32_t*>(take(2 * n * sp * 128));
  if (sa.p_phases) {
    sa.ws.zmass = take(n * nch);
    sa.ws.phist = take(2 * n * nch * 256);
  }
  if (sa.lists) {
    sa.ws.lcount = reinterpret_cast<int64_t*>(take(n * sp));
    sa.ws.lidx = reinterpret_cast<int32_t*>(take(n * sp * kListMax / 2));
    sa.ws.lw = reinterpret_cast<float*>(take(n * sp * kListMax / 2));
  }
  return off;
}

// The filter outputs of elements [0, V) of a row (or of a split row's slice: x and out advanced to
// the slice start, a multiple of kChunk, so the 16-byte alignment is the row's), 16-byte loads and
// stores. Softmax: w(x) / Z; masked logits: the kept elements copied bit for bit, -inf elsewhere
// (sel.valid false: the row passes through); renormalised: kept weights x (1 / Z) with
// renorm_scale's exact pre-scaling, 0 elsewhere.
template <class T>
DK_CUDA_FN void write_softmax(const T* x, int64_t V, const Weight& w, double Z, float* out) {
  const float inv = float(1.0 / Z);
  const bool al = aligned16(x) && aligned16(out);
  for (int64_t q = threadIdx.x; q < num_groups<T>(V); q += kThreads) {
    float g[kVec<T>];
    load_group(x, V, q, al, g);
#pragma unroll
    for (int u = 0; u < kVec<T>; ++u) g[u] = w(g[u]) * inv;
    store_run<float, kVec<T>>(out, V, q * kVec<T>, al, g);
  }
}

template <class T>
DK_CUDA_FN void write_mask(const T* x, int64_t V, const Selection& sel, T* out) {
  const bool al = aligned16(x) && aligned16(out);
  for (int64_t q = threadIdx.x; q < num_groups<T>(V); q += kThreads) {
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
}

template <class T>
DK_CUDA_FN void write_renorm(const T* x, int64_t V, const Selection& sel, double Z, float* out) {
  const RenormScale sc = renorm_scale(Z);  // tiny total mass: exact 2^64 pre-scaling (common.h)
  const bool al = aligned16(x) && aligned16(out);
  for (int64_t q = threadIdx.x; q < num_groups<T>(V); q += kThreads) {
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

DK_CUDA_FN void fill_row(float* out, int64_t V, float v) {
  for (int64_t i = threadIdx.x; i < V; i += kThreads) out[i] = v;
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
    if (sc.bad) return fill_row(out, V, __int_as_float(0x7fc00000));
    const Weight w = row_weight(false, sc.m, rp.T);
    write_softmax(x, V, w, lane16_mass(x, V, w, kNegInf, 0.f, nullptr, s), out);
    return;
  }
  const Selection sel = select_row(x, V, a.filter.is_probs, rp, s);
  if (a.kind == FilterOut::MaskLogits) return write_mask(x, V, sel, static_cast<T*>(a.out) + r * a.out_stride);
  float* out = static_cast<float*>(a.out) + r * a.out_stride;  // RenormProbs
  if (!sel.valid) return fill_row(out, V, 0.f);
  write_renorm(x, V, sel, lane16_mass(x, V, sel.w, sel.t, sel.minw, nullptr, s), out);
}

// A split filter launch: the split phases of a sample launch (scan, the radix passes, the final
// phase's threshold and kept chunk masses), then every slice writes its part of the output.
struct SplitFilterArgs {
  SplitArgs sa;
  FilterArgs fa;
};

template <class T>
__global__ void __launch_bounds__(kThreads) split_write_kernel(SplitFilterArgs args) {
  const SplitArgs& sa = args.sa;
  const FilterArgs& fa = args.fa;
  const SplitRowView v = split_cta<T>(sa);
  const int64_t o = v.o, V = fa.in.V, nch = num_chunks(V), n = v.end - v.beg;
  const T* x = static_cast<const T*>(v.x) + v.beg;
  Scan sc;
  const bool ok = split_work(sa, v, sc);
  const double Z = ok && sa.masses ? contract::add_in_order(sa.ws.kmass + o * nch, nch) : 0.0;  // (lane16_mass's fold)
  if (fa.kind == FilterOut::MaskLogits) {
    Selection sel;  // (valid = false: the row passes through)
    if (ok) sel = split_selection(v, sc, sa.ws.rows[o].t);
    return write_mask(x, n, sel, static_cast<T*>(fa.out) + o * fa.out_stride + v.beg);
  }
  float* out = static_cast<float*>(fa.out) + o * fa.out_stride + v.beg;
  if (fa.kind == FilterOut::Softmax) {
    if (!ok) return fill_row(out, n, __int_as_float(0x7fc00000));
    return write_softmax(x, n, row_weight(false, sc.m, v.rp.T), Z, out);
  }
  if (!ok) return fill_row(out, n, 0.f);
  write_renorm(x, n, split_selection(v, sc, sa.ws.rows[o].t), Z, out);
}

// The launch plan of a filter call: the sample plan of its rows (no indices, no lists; softmax
// ignores the filters), with the same split rule.
inline SplitFilterArgs filter_plan(const FilterArgs& fa, int n_sms) {
  SampleArgs a;
  a.in = fa.in;
  a.filter = fa.filter;
  a.n_out = fa.in.rows;
  if (fa.kind == FilterOut::Softmax) {  // (filter_kernel's softmax: logits, T = 1 when is_probs)
    if (a.filter.is_probs) a.filter.temperature = Param<float>{nullptr, 1.f};
    a.filter.is_probs = false;
    a.filter.top_k = Param<int64_t>{};
    a.filter.top_p = Param<float>{nullptr, 1.f};
    a.filter.min_p = Param<float>{};
  }
  SplitFilterArgs f;
  f.sa = split_plan(a, n_sms, false);
  f.sa.filter_op = true;
  f.sa.lists = false;
  f.sa.masses = fa.kind != FilterOut::MaskLogits;
  f.fa = fa;
  return f;
}

// The launches of a plan, through `launch(kernel, grid, args)` (a CUDA stream launch, or the
// emulator's): one CTA per row, or the split phases above. Shared by the CUDA launchers and the
// emulator (tests/cuda_emu), so both run the same sequence.
template <class T, class L>
inline void run_split_phases(const SplitArgs& sa, L& launch) {
  const unsigned parts = unsigned(sa.a.n_out * sa.splits);
  launch(split_scan_kernel<T>, parts, sa);
  SplitArgs ph = sa;
  if (sa.k_phases)
    for (ph.pass = 1; ph.pass < 4; ++ph.pass) launch(split_topk_kernel<T>, parts, ph);
  if (sa.p_phases)
    for (ph.pass = 0; ph.pass < 4; ++ph.pass) launch(split_topp_kernel<T>, parts, ph);
  if (!sa.gumbel) launch(split_final_kernel<T>, parts, sa);
}

template <class T, class L>
inline void run_sample_plan(const SplitArgs& sa, L& launch) {
  const unsigned rows = unsigned(sa.a.n_out);
  if (sa.splits > 1) {
    run_split_phases<T>(sa, launch);
    launch(split_draw_kernel<T>, rows, sa);
  } else if (sa.gumbel) {
    launch(gumbel_kernel<T>, rows, sa.a);
  } else {
    launch(sample_kernel<T>, rows, sa.a);
  }
}

template <class T, class L>
inline void run_filter_plan(const SplitFilterArgs& f, L& launch) {
  if (f.sa.splits > 1) {
    run_split_phases<T>(f.sa, launch);
    launch(split_write_kernel<T>, unsigned(f.sa.a.n_out * f.sa.splits), f);
  } else {
    launch(filter_kernel<T>, unsigned(f.fa.in.rows), f.fa);
  }
}

// dtype dispatch: run(plan, launch) with the element type of the plan's input, after laying out
// the plan's workspace regions in sa.a.workspace (sample_workspace_elems(sa) doubles).
template <class L>
inline void run_sample_plan(SplitArgs sa, L&& launch) {
  sample_layout(sa, sa.a.workspace);
  switch (sa.a.in.dtype) {
    case DType::F32: run_sample_plan<float>(sa, launch); break;
    case DType::BF16: run_sample_plan<bf16_t>(sa, launch); break;
    case DType::F16: run_sample_plan<f16_t>(sa, launch); break;
  }
}

template <class L>
inline void run_filter_plan(SplitFilterArgs f, L&& launch) {
  sample_layout(f.sa, f.sa.a.workspace);
  switch (f.fa.in.dtype) {
    case DType::F32: run_filter_plan<float>(f, launch); break;
    case DType::BF16: run_filter_plan<bf16_t>(f, launch); break;
    case DType::F16: run_filter_plan<f16_t>(f, launch); break;
  }
}

}  // namespace detail

using detail::filter_plan;
using detail::sample_layout;
using detail::split_plan;
using detail::SplitArgs;
using detail::SplitFilterArgs;

// The workspace a plan needs, in doubles (the binding allocates it; 0: none).
inline int64_t sample_workspace_elems(SplitArgs sa) { return detail::sample_layout(sa, nullptr); }

// ---- host launchers (no torch) ------------------------------------------------------------------
#if !defined(DK_CUDA_EMULATE)
// Launches on `stream` (a generic lambda: kernel is a __global__ function's address).
struct StreamLaunch {
  cudaStream_t stream;
  template <class K, class A>
  void operator()(K kernel, unsigned grid, const A& args) const {
    kernel<<<dim3(grid), dim3(kThreads), 0, stream>>>(args);
  }
};

// A sample / Gumbel-max plan (split_plan) on `stream`; sa.a.workspace holds
// sample_workspace_elems(sa) doubles.
inline cudaError_t launch_sample(const SplitArgs& sa, cudaStream_t stream) {
  if (sa.a.n_out == 0) return cudaSuccess;
  detail::run_sample_plan(sa, StreamLaunch{stream});
  return cudaGetLastError();
}

// A filter plan (filter_plan) on `stream`; f.sa.a.workspace holds sample_workspace_elems(f.sa) doubles.
inline cudaError_t launch_filter(const SplitFilterArgs& f, cudaStream_t stream) {
  if (f.fa.in.rows == 0) return cudaSuccess;
  detail::run_filter_plan(f, StreamLaunch{stream});
  return cudaGetLastError();
}

// Odr-uses every launcher (hence every kernel instantiation) of this header; .ci/cuda_compile.sh
// references it to compile all of them with plain nvcc.
inline void instantiate_sampling() {
  SampleArgs s;
  FilterArgs f;
  (void)launch_sample(split_plan(s, 1, false), nullptr);
  (void)launch_filter(filter_plan(f, 1), nullptr);
}
#endif  // !DK_CUDA_EMULATE

}  // namespace dk::cuda
