// CUDA kernel of the whole sampling step (issue 11): the op `pipeline` (decodekit.sample with the
// issue-11 keywords, the *_mask_logits ops and apply_penalties), plus xgrammar's
// apply_token_bitmask_inplace. Torch-free: compiles with plain nvcc (.ci/cuda_compile.sh);
// tests/cuda_emu runs it on CPU threads; csrc/cuda/pipeline.cu is the torch launcher.
//
// Design: one block per output row, no [B, V] intermediate. The processed value of token i (bitmask,
// bans, logit bias, penalties) is recomputed on the fly in every pass over the row: the base value
// (-inf where the bitmask forbids i, else the logit) unless i is one of the few tokens the sparse
// steps touched, whose final values sit in a per-row list sorted by token id (each thread walks it
// with a cursor as its strided loop advances). Per row, in order:
//   S  the touched list: one thread per distinct token runs the CPU's per-token sequence (ban ->
//      its bias entries in list order -> repetition once -> count penalties: the shared
//      DK_HOST_DEVICE code of decodekit/pipeline.h), then the list is sorted by rank counting
//      (O(N^2 / threads) for N list entries);
//   A  one pass: raw max, processed max m, NaN / +inf check;
//   σ  top-n-sigma only: mean and standard deviation of the finite values, 2 passes summed in the
//      contract's canonical row order (per 4096-element chunk 16 lanes, chunk sums in chunk order;
//      decodekit/contract.h), as the CPU's finite_stats: one thread per (chunk, lane) (row_sum);
//   K  top-k only (not joint): the k-th largest processed value by a 4-pass radix select (8 bits
//      per pass over the order-preserving float key; exact);
//   C  one pass collects the start list L = {y >= max(lo, k-th largest)} in index order (ballot
//      compaction), weights exp((y - m) / T) in parallel;
//   then the list steps (top-k, top-p, min-p, typical, epsilon, eta, top-h in the chosen order,
//   each on the renormalised survivors) and the inverse-CDF draw: the SAME step code as the CPU
//   (run_truncations / step_keep in decodekit/pipeline.h), run by every thread of the block through
//   BlockListOps: m-th largest by radix select over the list, masses and draws by the contract's
//   16-ary walk (group and block sums one thread each), sorts (typical's scores, top-h's
//   candidates, top-p's values) by a block-wide bitonic sort, keep flags and compactions on all
//   threads; only top-h's cut over its <= ~100 sorted candidates walks on one thread;
//   logprobs: processed mode from L (rank and the top-n sort on the block); raw / greedy mode:
//   one more canonical mass pass (row_sum), a count pass and, for top_logprobs n, a radix select
//   of the n-th largest, one collect and a block sort of the n.
// Passes over the row: 1 (A) + 1 (C) with no top-k / top-n-sigma; + 4 (K) with top-k; + 2 (σ);
// + 2..7 for raw / greedy logprobs. The list L and its scratch live in a workspace of
// pipe_workspace_bytes(...) (about 38 bytes per token per row plus 16 bytes per history entry).
// Block size 512 (__launch_bounds__(512, 1): at most 128 registers; row_sum and collect are real
// calls on the device, which keeps the kernel free of spills).
//
// Contract: the same tokens, valid flags, logprobs, ranks and top-n lists as the CPU kernel
// (csrc/cpu/pipeline.h) for the same inputs and seed; verified bit for bit in the emulator
// (tests/test_ops_pipeline.py). Where a GPU can differ (as for sampling.cuh): double log / exp
// (entropy of typical / eta / top-h, logprobs) come from libdevice instead of glibc and may differ
// by one double ulp; a float logprob can then differ in its last bit and a typical / eta / top-h cut
// that lies within that ulp can move by one tie group. Top-p's cut on the list: the CPU sums the
// mass above a candidate in quickselect partition order, the block in the walk's order over the
// sorted list, so a cut whose mass above lies within a few double ulps of p * Z can move to a
// neighbouring value. Everything else (float exp dk_exp, sums, selections) is the same arithmetic
// in the same order; compile with -fmad=false.
//
// Values the torch launcher does not read (it checks metadata only, no device sync): a token id
// < -1 or >= V in a list, a non-finite logit-bias value or a parameter out of its range make that
// row invalid here (sample: token 0, valid=False; mask mode: the raw row passes through) and set
// error_bit in *error_flag (read by decodekit.check_errors), where the CPU binding raises a
// ValueError (the CPU kernel does the same as this one when the deferred checks are forced).
#pragma once
#if !defined(DK_CUDA_EMULATE)
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include <cstdint>
#include "decodekit/common.h"
#include "decodekit/contract.h"
#include "decodekit/fmath.h"
#include "decodekit/philox.h"
#include "decodekit/pipeline.h"
#include "decodekit/rng.h"
#include "block_walk.h"
#include "radix_digit.h"

#if defined(__CUDACC__)
#define DK_PIPE_FN __device__ __forceinline__
#else
#define DK_PIPE_FN inline
#endif

namespace dk::cuda {

#ifndef DK_PIPE_THREADS
#define DK_PIPE_THREADS 512
#endif
constexpr unsigned kPipeThreads = DK_PIPE_THREADS;  // a power of two, >= 32
constexpr unsigned kPipeWarps = kPipeThreads / 32;

enum class PipeDType : int { F32 = 0, BF16 = 1, F16 = 2 };  // = dk::cpu::DType

// The pipeline op (see csrc/torch/pipeline_cpu.cpp for the schema). Every pointer is device memory.
struct PipeArgs {
  const void* x = nullptr;
  PipeDType dtype = PipeDType::F32;
  int64_t V = 0, row_stride = 0;
  const int64_t* indices = nullptr;  // output row o reads x[indices[o]]
  int64_t n_out = 0;
  const double* params = nullptr;    // [n_out, kPipeParams]
  int order = 0;                     // dk::PipeOrder
  const int32_t* bitmask = nullptr;  // [n_out, words]
  int64_t bitmask_words = 0;
  const int64_t* banned = nullptr;  // [n_out, n_banned], -1 padded (as every id table)
  int64_t n_banned = 0;
  const int64_t* bias_ids = nullptr;
  const float* bias_vals = nullptr;
  int64_t n_bias = 0;
  const int64_t* prompt = nullptr;
  int64_t n_prompt = 0;
  const int64_t* output = nullptr;
  int64_t n_output = 0;
  // randomness: the six fields of decodekit/rng.h row_rng_key (seeds, seed_ptr, offsets in device memory)
  const int64_t* seeds = nullptr;
  uint64_t seed = 0, offset = 0;
  const int64_t *seed_ptr = nullptr, *offsets = nullptr;
  int64_t offset_stride = 0;
  // deferred checks: a row whose values are out of range ORs error_bit into *error_flag (or nullptr)
  int32_t* error_flag = nullptr;
  int32_t error_bit = 0;
  int mode = 0;  // 0: sample; 1: write the processed, truncated logits
  int64_t top_n = 0;
  bool raw_logprobs = false, want_logprob = false;
  int64_t* out_tokens = nullptr;
  bool* out_valid = nullptr;
  float* out_logprob = nullptr;
  int64_t* out_rank = nullptr;
  int64_t* out_top_ids = nullptr;  // [n_out, top_n]
  float* out_top_lp = nullptr;
  void* out_logits = nullptr;  // mode 1: [n_out, V], dtype of x
  void* workspace = nullptr;   // pipe_workspace_bytes(n_out, V, history entries)
};

struct BitmaskInplaceArgs {
  void* x = nullptr;
  PipeDType dtype = PipeDType::F32;
  int64_t row_stride = 0;
  const int32_t* words = nullptr;
  int64_t word_stride = 0;
  int64_t tokens = 0;
  const int64_t* indices = nullptr;
  int64_t rows = 0;
};

// Entries of the concatenated id lists [banned | bias ids | prompt | output] of a row.
DK_HOST_DEVICE int64_t pipe_list_entries(const PipeArgs& a) { return a.n_banned + a.n_bias + a.n_prompt + a.n_output; }

// Per-row workspace layout (byte offsets; every region 8-byte aligned).
struct PipeWs {
  int64_t ld, v, w, i, tv, ord, keep, acc, sid, sval, fid, fval, lanes, g16, g256, row;
};
// The smallest power of two >= n (the bitonic sort's padded length).
DK_HOST_DEVICE int64_t pow2_ceil(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}
DK_HOST_DEVICE PipeWs pipe_ws_layout(int64_t V, int64_t N) {
  auto r8 = [](int64_t b) { return (b + 7) & ~int64_t(7); };
  PipeWs L;
  int64_t o = 0;
  L.ld = o, o += 8 * V;  // doubles
  L.v = o, o += r8(4 * V);
  L.w = o, o += r8(4 * V);
  L.i = o, o += r8(4 * V);
  L.tv = o, o += r8(4 * V);
  L.ord = o, o += r8(4 * pow2_ceil(V));  // the sort pads it to a power of two
  L.keep = o, o += r8(V);
  L.acc = o, o += r8(V);
  L.sid = o, o += r8(4 * N);
  L.sval = o, o += r8(4 * N);
  L.fid = o, o += r8(4 * N);
  L.fval = o, o += r8(4 * N);
  L.lanes = o, o += 8 * contract::kLanes * contract::num_chunks(V);  // row_sum's (chunk, lane) sums
  const int64_t ng = contract::walk16_groups(V);
  L.g16 = o, o += 8 * ng;  // the walk's group and block sums over a list
  L.g256 = o, o += 8 * ((ng + 15) / 16);
  L.row = o;
  return L;
}
DK_HOST_DEVICE int64_t pipe_workspace_bytes(int64_t n_out, int64_t V, int64_t N) {
  return n_out * pipe_ws_layout(V, N).row;
}

namespace pdetail {

template <class T>
DK_PIPE_FN void store(T* p, float v);
template <>
DK_PIPE_FN void store<float>(float* p, float v) {
  *p = v;
}
template <>
DK_PIPE_FN void store<bf16_t>(bf16_t* p, float v) {
  p->x = dk::bf16_bits(v);
}
template <>
DK_PIPE_FN void store<f16_t>(f16_t* p, float v) {  // round to nearest even, as the CPU
#if defined(__CUDACC__)
  p->x = __half_as_ushort(__float2half_rn(v));
#else
  const _Float16 h = static_cast<_Float16>(v);
  __builtin_memcpy(&p->x, &h, 2);
#endif
}

DK_PIPE_FN int64_t list_id(const PipeArgs& a, int64_t o, int64_t p) {
  if (p < a.n_banned) return a.banned[o * a.n_banned + p];
  p -= a.n_banned;
  if (p < a.n_bias) return a.bias_ids[o * a.n_bias + p];
  p -= a.n_bias;
  if (p < a.n_prompt) return a.prompt[o * a.n_prompt + p];
  p -= a.n_prompt;
  return a.output[o * a.n_output + p];
}

// One row's input as the passes see it: processed value = touched value (sid / sval sorted by id)
// or the base value (bitmask, then the logit).
template <class T>
struct RowIn {
  const T* x;
  const int32_t* bm;
  int64_t bm_tokens;
  const int32_t* sid;
  const float* sval;
  int64_t nt;
  DK_PIPE_FN float raw(int64_t i) const { return to_float(x[i]); }
  DK_PIPE_FN float base(int64_t i) const {
    return (bm && i < bm_tokens && !bitmask_allows(bm, i)) ? kNegInf : to_float(x[i]);
  }
  DK_PIPE_FN int64_t lower(int64_t i) const {  // first c with sid[c] >= i
    int64_t lo = 0, hi = nt;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (sid[mid] < i)
        lo = mid + 1;
      else
        hi = mid;
    }
    return lo;
  }
  // Processed value of i; c: a cursor that only moves forward (i must not decrease between calls).
  DK_PIPE_FN float at(int64_t i, int64_t& c) const {
    while (c < nt && sid[c] < i) ++c;
    return (c < nt && sid[c] == i) ? sval[c] : base(i);
  }
  DK_PIPE_FN float at(int64_t i) const {
    int64_t c = lower(i);
    return at(i, c);
  }
  // raw (processed = false) or processed value with a cursor
  DK_PIPE_FN float get(bool processed, int64_t i, int64_t& c) const { return processed ? at(i, c) : raw(i); }
};

// Block-wide reductions through shared memory (exact operations only: max, min, integer sums).
template <class T, class Op>
DK_PIPE_FN T block_reduce(T v, Op op, T* buf) {
  const unsigned tid = threadIdx.x;
  buf[tid] = v;
  __syncthreads();
  for (unsigned s = kPipeThreads / 2; s > 0; s >>= 1) {
    if (tid < s) buf[tid] = op(buf[tid], buf[tid + s]);
    __syncthreads();
  }
  const T r = buf[0];
  __syncthreads();
  return r;
}

struct MaxF {
  DK_PIPE_FN float operator()(float a, float b) const { return a > b ? a : b; }
};
struct MinI {
  DK_PIPE_FN int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};
struct SumI {
  DK_PIPE_FN int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};

// Shared memory of one row's block.
struct PipeShared {
  float f[kPipeThreads];
  int64_t i[kPipeThreads];
  unsigned hist[256];
  unsigned warp_cnt[kPipeWarps];
  int64_t tok, sel_rank, sel_above;
  uint32_t sel_prefix, sel_digit;
  int inval, bad, fail;
  float tw, tv;
  double Z;
  double bc;    // BlockListOps' broadcast of a mass
  int64_t ibc;  // and of an index
};

// Order key of a value with -0 == +0 (float compares treat them as equal).
DK_PIPE_FN uint32_t sel_key(float v) { return float_key(v == 0.f ? 0.f : v); }

// radix_digit.h's count scan as a real call on the device: the whole-step kernel is at its
// register cap, and inlined the scan added 16 B of spill stores there.
DK_DEVICE_NOINLINE void pipe_count_digit(const unsigned* h, int64_t kk, uint32_t* d_out, int64_t* above_out) {
  pick_count_digit(h, kk, d_out, above_out);
}

// The m-th largest (1 <= m <= n) of the values get(i), i in [0, n), by radix select (4 passes of 8
// bits over the order key; exact); all threads return it. mk() makes a thread's accessor for one
// strided pass (i = tid, tid + threads, ...; the row's accessor carries a cursor).
template <class Mk>
DK_PIPE_FN float select_mth(int64_t n, int64_t m, const Mk& mk, PipeShared& sh) {
  const unsigned tid = threadIdx.x;
  if (tid == 0) {
    sh.sel_prefix = 0;
    sh.sel_rank = m;  // rank wanted among the values matching the prefix
  }
  __syncthreads();
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (unsigned b = tid; b < 256; b += kPipeThreads) sh.hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = sh.sel_prefix;
    const uint32_t hmask = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
    auto get = mk();
    for (int64_t i = tid; i < n; i += kPipeThreads) {
      const uint32_t k = sel_key(get(i));
      if ((k & hmask) == (prefix & hmask)) atomicAdd(&sh.hist[(k >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid < 32) pipe_count_digit(sh.hist, sh.sel_rank, &sh.sel_digit, &sh.sel_above);
    __syncthreads();
    if (tid == 0) {
      sh.sel_prefix = prefix | (sh.sel_digit << shift);
      sh.sel_rank -= sh.sel_above;
    }
    __syncthreads();
  }
  const uint32_t k = sh.sel_prefix;
  __syncthreads();
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;  // inverse of float_key
  return bits_to_float(u);
}

// The m-th largest (1 <= m <= V) of the row's raw / processed values.
template <class T>
DK_PIPE_FN float select_mth_largest(const RowIn<T>& r, bool processed, int64_t V, int64_t m, PipeShared& sh) {
  const int64_t c0 = processed ? r.lower(threadIdx.x) : 0;
  return select_mth(
      V, m, [&]() { return [&r, processed, c = c0](int64_t i) mutable { return r.get(processed, i, c); }; }, sh);
}

// Ordered compaction: every i in [0, V) with pred(i) (index order) is passed to emit(position, i);
// returns the count (all threads). pred(i, c) gets the thread's cursor.
template <class Pred, class Emit>
DK_DEVICE_NOINLINE int64_t collect(int64_t V, int64_t c0, Pred pred, Emit emit, PipeShared& sh) {
  const unsigned tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
  int64_t count = 0, c = c0;
  for (int64_t base = 0; base < V; base += kPipeThreads) {
    const int64_t i = base + tid;
    const bool f = i < V && pred(i, c);
    const unsigned bal = __ballot_sync(0xFFFFFFFFu, f);
    if (lane == 0) sh.warp_cnt[warp] = unsigned(__popc(bal));
    __syncthreads();
    int64_t before = 0, total = 0;
    for (unsigned w = 0; w < kPipeWarps; ++w) {
      before += w < warp ? sh.warp_cnt[w] : 0u;
      total += sh.warp_cnt[w];
    }
    if (f) emit(count + before + __popc(bal & ((1u << lane) - 1u)), i);
    count += total;
    __syncthreads();
  }
  return count;
}

// Bitonic sort of ord[0..n) by the strict total order less, in place, by the whole block: ord is
// padded with -1 (sorted last) up to a power of two (its capacity); log2(N) (log2(N) + 1) / 2
// compare-exchange rounds of N / 2 pairs each, a barrier after each. The result is the unique
// sorted order, as the CPU's std::sort.
template <class Less>
DK_PIPE_FN void block_sort(int32_t* ord, int64_t n, const Less& less) {
  const unsigned tid = threadIdx.x;
  const int64_t N = pow2_ceil(n);
  for (int64_t j = n + tid; j < N; j += kPipeThreads) ord[j] = -1;
  __syncthreads();
  const auto before = [&](int32_t a, int32_t b) { return a >= 0 && (b < 0 || less(a, b)); };
  for (int64_t k = 2; k <= N; k <<= 1)
    for (int64_t h = k >> 1; h > 0; h >>= 1) {
      for (int64_t q = tid; q < N / 2; q += kPipeThreads) {
        const int64_t i = 2 * h * (q / h) + q % h, l = i + h;  // the q-th pair (i, i ^ h), i < l
        const int32_t a = ord[i], b = ord[l];
        if ((i & k) == 0 ? before(b, a) : before(a, b)) {
          ord[i] = b;
          ord[l] = a;
        }
      }
      __syncthreads();
    }
}

// The list steps' primitives on the block (decodekit/pipeline.h lists them): every thread of the
// row's block calls the steps with the same arguments, each primitive returns the same value to
// all of them. g16 / g256: the workspace's walk sums (room for a whole row's list).
struct BlockListOps {
  PipeShared& sh;
  double *g16, *g256;
  template <class F>
  DK_PIPE_FN void each(int64_t n, const F& f) const {
    for (int64_t j = threadIdx.x; j < n; j += kPipeThreads) f(j);
    __syncthreads();
  }
  template <class F>
  DK_PIPE_FN void serial(const F& f) const {
    if (threadIdx.x == 0) f();
    __syncthreads();
  }
  DK_PIPE_FN float mth_largest(const float* v, int64_t n, int64_t m) const {
    return select_mth(n, m, [v]() { return [v](int64_t i) { return v[i]; }; }, sh);
  }
  DK_PIPE_FN float max(const float* w, int64_t n) const {
    float x = kNegInf;
    for (int64_t j = threadIdx.x; j < n; j += kPipeThreads) x = w[j] > x ? w[j] : x;
    return block_reduce(x, MaxF{}, sh.f);
  }
  template <class E>
  DK_PIPE_FN double mass(const E* e, int64_t n) const {
    return block_walk16_sums<kPipeThreads>(e, n, g16, g256, &sh.bc);
  }
  DK_PIPE_FN int64_t reach(const float* e, int64_t n, double P) const {
    block_walk16_sums<kPipeThreads>(e, n, g16, g256, &sh.bc);
    if (threadIdx.x == 0) sh.ibc = contract::walk16_reach(e, n, g16, g256, P);
    __syncthreads();
    const int64_t at = sh.ibc;
    __syncthreads();
    return at;
  }
  template <class Key>
  DK_PIPE_FN void sort(int32_t* ord, int64_t n, const Key& key, bool descending) const {
    block_sort(ord, n, [&](int32_t a, int32_t b) {
      const auto ka = key(a), kb = key(b);
      return (descending ? ka > kb : ka < kb) || (ka == kb && a < b);
    });
  }
  template <class Pred>
  DK_PIPE_FN int64_t select(int64_t n, const Pred& pred, int32_t* out) const {
    return collect(
        n, 0, [&](int64_t j, int64_t&) { return pred(j); }, [out](int64_t pos, int64_t j) { out[pos] = int32_t(j); },
        sh);
  }
  // In place: a thread reads its entry before the round's barrier and writes after it, to a
  // position below the round's first index or inside the round (read already).
  DK_PIPE_FN void filter(PipeList& L, const uint8_t* keep) const {
    float v = 0.f, w = 0.f;
    int32_t i = 0;
    L.n = collect(
        L.n, 0,
        [&](int64_t j, int64_t&) {
          v = L.v[j], w = L.w[j], i = L.i[j];
          return keep[j] != 0;
        },
        [&](int64_t pos, int64_t) {
          L.v[pos] = v;
          L.w[pos] = w;
          L.i[pos] = i;
        },
        sh);
  }
  // The list sorted by value (descending, ties by position); the cut at the value where the walk's
  // running mass of the sorted weights reaches P (all of L if it never does).
  DK_PIPE_FN float top_p(const PipeList& L, double P, const ListScratch& s) const {
    const int64_t n = L.n;
    const float *v = L.v, *w = L.w;
    int32_t* ord = s.ord;
    float* e = s.tv;
    each(n, [=](int64_t j) { ord[j] = int32_t(j); });
    sort(ord, n, [v](int32_t j) { return v[j]; }, true);
    each(n, [=](int64_t q) { e[q] = w[ord[q]]; });
    const int64_t at = reach(e, n, P);
    return v[ord[at < n ? at : n - 1]];
  }
};

// Sum over the row of g(value) in double in the canonical row order of decodekit/contract.h (per
// kChunk-element chunk 16 lanes in index order, folded lane 0..15, chunk sums in chunk order), as
// the CPU's row_mass / finite_stats: every (chunk, lane) sum is its own thread's loop (lanes: the
// workspace's nch * 16 doubles), nch threads fold the chunks, thread 0 adds the nch chunk sums.
template <class T, class G>
DK_DEVICE_NOINLINE double row_sum(const RowIn<T>& r, bool processed, int64_t V, G g, double* lanes, PipeShared& sh) {
  const unsigned tid = threadIdx.x;
  const int64_t nch = contract::num_chunks(V);
  for (int64_t q = tid; q < nch * contract::kLanes; q += kPipeThreads) {
    const int64_t c = q / contract::kLanes;
    const int j = int(q % contract::kLanes);
    int64_t cur = processed ? r.lower(c * contract::kChunk + j) : 0;
    lanes[q] = contract::chunk_lane_sum(V, c, j, [&](int64_t i) { return g(r.get(processed, i, cur)); });
  }
  __syncthreads();
  for (int64_t c = tid; c < nch; c += kPipeThreads)
    lanes[c * contract::kLanes] = contract::add_in_order(lanes + c * contract::kLanes, contract::kLanes);
  __syncthreads();
  if (tid == 0) {
    double z = 0.0;
    for (int64_t c = 0; c < nch; ++c) z = contract::dadd_rn(z, lanes[c * contract::kLanes]);
    sh.Z = z;
  }
  __syncthreads();
  const double z = sh.Z;
  __syncthreads();
  return z;
}

// The touched list of row o: fid / fval [N] (the first entry naming a token holds its final value,
// others -1), then sid / sval sorted by id; returns the count (all threads). Sets sh.bad when a
// final value is NaN / +inf.
template <class T>
DK_PIPE_FN int64_t touched_list(const PipeArgs& a, int64_t o, const RowIn<T>& r, int32_t* fid, float* fval,
                                int32_t* sid, float* sval, PipeShared& sh) {
  const unsigned tid = threadIdx.x;
  const int64_t N = pipe_list_entries(a);
  const PipeRow pr = pipe_row(a.params + o * kPipeParams);
  const bool rep_on = pr.rep != 1.f, cnt_on = pr.freq != 0.f || pr.pres != 0.f;
  for (int64_t p = tid; p < N; p += kPipeThreads) {
    const int64_t t = list_id(a, o, p);
    fid[p] = -1;
    if (t < 0) continue;
    bool first = true;  // the thread of the first entry naming t owns t
    for (int64_t q = 0; q < p && first; ++q) first = list_id(a, o, q) != t;
    if (!first) continue;
    float v = r.base(t);
    for (int64_t j = 0; j < a.n_banned; ++j)
      if (a.banned[o * a.n_banned + j] == t) v = kNegInf;
    for (int64_t j = 0; j < a.n_bias; ++j)
      if (a.bias_ids[o * a.n_bias + j] == t) v = v + a.bias_vals[o * a.n_bias + j];
    bool seen = false;
    uint32_t cnt = 0;
    for (int64_t j = 0; j < a.n_prompt; ++j) seen |= a.prompt[o * a.n_prompt + j] == t;
    for (int64_t j = 0; j < a.n_output; ++j) cnt += a.output[o * a.n_output + j] == t;
    if (rep_on && (seen || cnt > 0)) v = repetition_apply(v, pr.rep);
    if (cnt_on && cnt > 0) v = count_penalty_apply(v, pr.freq, pr.pres, cnt);
    if (v != v || v == kPosInf) sh.bad = 1;
    fid[p] = int32_t(t);
    fval[p] = v;
  }
  __syncthreads();
  int64_t mine = 0;
  for (int64_t p = tid; p < N; p += kPipeThreads) {
    const int32_t t = fid[p];
    if (t < 0) continue;
    ++mine;
    int64_t rank = 0;
    for (int64_t q = 0; q < N; ++q) rank += fid[q] >= 0 && fid[q] < t;
    sid[rank] = t;
    sval[rank] = fval[p];
  }
  return block_reduce<int64_t>(mine, SumI{}, sh.i);
}

template <class T>
DK_PIPE_FN void pipeline_row(const PipeArgs& a, int64_t o) {
  __shared__ PipeShared sh;
  const unsigned tid = threadIdx.x;
  const int64_t V = a.V, N = pipe_list_entries(a);
  const int64_t src = a.indices ? a.indices[o] : o;
  const T* x = static_cast<const T*>(a.x) + src * a.row_stride;
  const PipeWs lay = pipe_ws_layout(V, N);
  char* ws = static_cast<char*>(a.workspace) + o * lay.row;
  int32_t* sid = reinterpret_cast<int32_t*>(ws + lay.sid);
  float* sval = reinterpret_cast<float*>(ws + lay.sval);
  double* lanes = reinterpret_cast<double*>(ws + lay.lanes);
  const int32_t* bm = a.bitmask ? a.bitmask + o * a.bitmask_words : nullptr;
  RowIn<T> r{x, bm, bm ? (V < 32 * a.bitmask_words ? V : 32 * a.bitmask_words) : 0, sid, sval, 0};
  const double* q = a.params + o * kPipeParams;
  T* out = a.mode == 1 ? static_cast<T*>(a.out_logits) + o * V : nullptr;
  if (tid == 0) {
    sh.inval = !pipe_params_ok(q);
    sh.bad = 0;
    sh.fail = 0;
  }
  __syncthreads();
  // ---- values the launcher did not check -----------------------------------------------------
  int inval = 0;
  for (int64_t p = tid; p < N; p += kPipeThreads) {
    const int64_t t = list_id(a, o, p);
    inval |= !pipe_id_ok(t, V);
    if (p >= a.n_banned && p < a.n_banned + a.n_bias)
      inval |= !pipe_bias_ok(a.bias_vals[o * a.n_bias + (p - a.n_banned)]);
  }
  if (inval) sh.inval = 1;
  __syncthreads();
  const bool invalid_values = sh.inval != 0;
  __syncthreads();
  auto fail_row = [&](bool raw_through) {  // every thread calls it
    if (out) {
      int64_t c = r.lower(tid);
      for (int64_t i = tid; i < V; i += kPipeThreads) store(out + i, raw_through ? r.raw(i) : r.at(i, c));
      return;
    }
    if (tid == 0) {
      a.out_tokens[o] = 0;
      a.out_valid[o] = false;
      if (a.out_logprob) a.out_logprob[o] = 0.f;
      if (a.out_rank) a.out_rank[o] = 0;
    }
    for (int64_t j = tid; j < a.top_n; j += kPipeThreads) {
      a.out_top_ids[o * a.top_n + j] = 0;
      a.out_top_lp[o * a.top_n + j] = kNegInf;
    }
  };
  if (invalid_values) {
    if (tid == 0 && a.error_flag) atomicOr(a.error_flag, a.error_bit);
    fail_row(true);
    return;
  }
  const PipeRow pr = pipe_row(q);
  const PipeOrder order = PipeOrder(a.order);
  // ---- S: the touched list -------------------------------------------------------------------
  r.nt = touched_list(a, o, r, reinterpret_cast<int32_t*>(ws + lay.fid), reinterpret_cast<float*>(ws + lay.fval), sid,
                      sval, sh);
  __syncthreads();
  // ---- A: maxima and the bad-row check --------------------------------------------------------
  float mr = kNegInf, mx = kNegInf;
  int bad = 0;
  {
    int64_t c = r.lower(tid);
    for (int64_t i = tid; i < V; i += kPipeThreads) {
      const float v = r.raw(i);
      bad |= v != v || v == kPosInf;
      mr = v > mr ? v : mr;
      const float y = r.at(i, c);
      mx = y > mx ? y : mx;
    }
  }
  if (bad) sh.bad = 1;
  const float mraw = block_reduce(mr, MaxF{}, sh.f);
  const float m = block_reduce(mx, MaxF{}, sh.f);
  const bool ok = sh.bad == 0;
  __syncthreads();
  if (!ok || !(m > kNegInf)) {
    fail_row(!ok);
    return;
  }
  const bool greedy = a.mode == 0 && pr.T == 0.f;
  const float temp = (greedy || pr.T == 0.f) ? 1.f : pr.T;
  const float invT = 1.f / temp;
  const bool any = any_truncation(pr, V);
  if (out && !any) {  // mask mode, nothing to truncate: the processed row
    int64_t c = r.lower(tid);
    for (int64_t i = tid; i < V; i += kPipeThreads) store(out + i, r.at(i, c));
    return;
  }
  PipeList L{reinterpret_cast<float*>(ws + lay.v), reinterpret_cast<float*>(ws + lay.w),
             reinterpret_cast<int32_t*>(ws + lay.i), 0};
  const ListScratch ls{reinterpret_cast<float*>(ws + lay.tv),     reinterpret_cast<double*>(ws + lay.ld),
                       reinterpret_cast<int32_t*>(ws + lay.ord),  nullptr,
                       reinterpret_cast<uint8_t*>(ws + lay.keep), reinterpret_cast<uint8_t*>(ws + lay.acc)};
  const BlockListOps ops{sh, reinterpret_cast<double*>(ws + lay.g16), reinterpret_cast<double*>(ws + lay.g256)};
  int64_t tok = 0;
  if (greedy) {  // the first token holding the max
    int64_t first = V, c = r.lower(tid);
    for (int64_t i = tid; i < V; i += kPipeThreads)
      if (r.at(i, c) == m && i < first) first = i;
    tok = block_reduce<int64_t>(first, MinI{}, sh.i);
  } else {
    // ---- σ: top-n-sigma's threshold ---------------------------------------------------------
    float lo = -3.4028234663852886e38f;
    if (pr.nsig > 0.0) {
      const double n = row_sum(r, true, V, [](float v) { return v > kNegInf ? 1.0 : 0.0; }, lanes, sh);
      const double mu = row_sum(r, true, V, [](float v) { return double(v > kNegInf ? v : 0.f); }, lanes, sh) / n;
      const double ss = row_sum(
          r, true, V,
          [mu](float v) {
            const double d = double(v) - mu;
            return v > kNegInf ? d * d : 0.0;
          },
          lanes, sh);
      lo = float_at_least(double(m) - pr.nsig * ::sqrt(ss / n));
    }
    const bool joint = order == PipeOrder::Joint;
    float thr = joint ? -3.4028234663852886e38f : lo;
    // ---- K: top-k's k-th largest ------------------------------------------------------------
    if (!joint && step_on(Step::TopK, pr, V)) {
      const int64_t k = pr.k > pr.mtk ? pr.k : pr.mtk;
      const float kth = select_mth_largest(r, true, V, k < V ? k : V, sh);
      thr = kth > thr ? kth : thr;
    }
    // ---- C: the start list --------------------------------------------------------------------
    float cur = 0.f;  // the value pred just tested (emit follows it for the same i)
    const int64_t n0 = collect(
        V, r.lower(tid),
        [&](int64_t i, int64_t& c) {
          cur = r.at(i, c);
          return cur >= thr;
        },
        [&](int64_t pos, int64_t i) {
          L.v[pos] = cur;
          L.i[pos] = int32_t(i);
        },
        sh);
    __syncthreads();
    for (int64_t j = tid; j < n0; j += kPipeThreads) L.w[j] = pipe_weight(L.v[j], m, invT);
    __syncthreads();
    // ---- the list steps and the draw (the CPU's sequence, each step on the whole block) --------
    L.n = n0;
    run_truncations(L, pr, order, V, m, invT, lo, ls, ops);
    if (!out) {                             // the contract's walk: Z = its total, the pick at u * Z
      const double Z = ops.mass(L.w, L.n);  // leaves the walk's sums in ops.g16 / g256
      if (tid == 0) {
        const double u = row_uniform(row_rng_key(a, o), 0u);
        const int64_t last = contract::walk16_pick(L.w, L.n, ops.g16, ops.g256, u * Z);
        sh.fail = last < 0;
        sh.Z = Z;
        sh.tok = last < 0 ? 0 : L.i[last];
        sh.tw = last < 0 ? 1.f : L.w[last];
        sh.tv = last < 0 ? 0.f : L.v[last];
      }
    }
    __syncthreads();
    if (out) {  // mask mode: the survivors keep their processed logit, everything else -inf
      for (int64_t i = tid; i < V; i += kPipeThreads) store(out + i, kNegInf);
      __syncthreads();
      for (int64_t j = tid; j < L.n; j += kPipeThreads) store(out + L.i[j], L.v[j]);
      return;
    }
    if (sh.fail) {  // no positive weight (cannot happen: the max has weight 1)
      fail_row(false);
      return;
    }
    tok = sh.tok;
  }
  if (tid == 0) {
    a.out_tokens[o] = tok;
    a.out_valid[o] = true;
  }
  if (!a.want_logprob && a.top_n == 0) return;
  // ---- logprobs -------------------------------------------------------------------------------
  int64_t* tids = a.top_n ? a.out_top_ids + o * a.top_n : nullptr;
  float* tlp = a.top_n ? a.out_top_lp + o * a.top_n : nullptr;
  if (a.raw_logprobs || greedy) {
    // log_softmax of the raw row (raw) or of the processed row at temperature 1 (greedy, processed)
    const bool proc = !a.raw_logprobs;
    const float mm = proc ? m : mraw;
    const double lz = ::log(row_sum(r, proc, V, [mm](float v) { return double(pipe_weight(v, mm, 1.f)); }, lanes, sh));
    const float vt = proc ? r.at(tok) : r.raw(tok);
    int64_t cnt = 0;
    {
      int64_t c = r.lower(tid);
      for (int64_t i = tid; i < V; i += kPipeThreads) cnt += r.get(proc, i, c) >= vt;
    }
    cnt = block_reduce<int64_t>(cnt, SumI{}, sh.i);
    if (tid == 0) {
      if (a.out_logprob) a.out_logprob[o] = logprob_of_value(vt, mm, lz);
      if (a.out_rank) a.out_rank[o] = cnt;
    }
    if (tids) {
      // the n largest (value descending, index ascending): those above the n-th largest value
      // vn, then the lowest indices holding vn; sorted by the block (L's arrays are free now)
      const int64_t n = a.top_n;
      const float vn = select_mth_largest(r, proc, V, n, sh);
      float* tv = L.v;
      int32_t* ti = L.i;
      const int64_t above = collect(
          V, r.lower(tid), [&](int64_t i, int64_t& c) { return r.get(proc, i, c) > vn; },
          [&](int64_t pos, int64_t i) {
            tv[pos] = proc ? r.at(i) : r.raw(i);
            ti[pos] = int32_t(i);
          },
          sh);
      collect(
          V, r.lower(tid), [&](int64_t i, int64_t& c) { return r.get(proc, i, c) == vn; },
          [&](int64_t pos, int64_t i) {
            if (above + pos < n) {
              tv[above + pos] = proc ? r.at(i) : r.raw(i);
              ti[above + pos] = int32_t(i);
            }
          },
          sh);
      __syncthreads();
      int32_t* ord = ls.ord;
      ops.each(n, [=](int64_t j) { ord[j] = int32_t(j); });
      // ties by position: the collects left equal values in index order
      ops.sort(ord, n, [tv](int32_t p) { return tv[p]; }, true);
      ops.each(n, [=](int64_t j) {
        const float v = tv[ord[j]];
        tids[j] = ti[ord[j]];
        tlp[j] = v > kNegInf ? logprob_of_value(v, mm, lz) : kNegInf;
      });
    }
    return;
  }
  // processed: the renormalised survivors
  const double lz = ::log(sh.Z);
  const float tv = sh.tv;
  int64_t cnt = 0;
  for (int64_t j = tid; j < L.n; j += kPipeThreads) cnt += L.v[j] >= tv;
  cnt = block_reduce<int64_t>(cnt, SumI{}, sh.i);
  if (tid == 0) {
    if (a.out_logprob) a.out_logprob[o] = logprob_of_weight(sh.tw, lz);
    if (a.out_rank) a.out_rank[o] = cnt;
  }
  if (tids) {
    int32_t* ord = ls.ord;
    const float* lv = L.v;
    const int32_t* li = L.i;
    ops.each(L.n, [=](int64_t j) { ord[j] = int32_t(j); });
    ops.sort(ord, L.n, [lv](int32_t p) { return lv[p]; }, true);  // L is in index order: ties by token
    const int64_t h = a.top_n < L.n ? a.top_n : L.n;
    ops.each(h, [=](int64_t j) {
      tids[j] = li[ord[j]];
      tlp[j] = logprob_of_weight(pipe_weight(lv[ord[j]], m, invT), lz);
    });
    if (tid == 0) top_n_pad(li, L.n, h, a.top_n, tids, tlp);
  }
}

template <class T>
__global__ void __launch_bounds__(kPipeThreads, 1) pipeline_kernel(PipeArgs a) {
  pipeline_row<T>(a, int64_t(blockIdx.x));
}

template <class T>
__global__ void __launch_bounds__(kPipeThreads) bitmask_inplace_kernel(BitmaskInplaceArgs a) {
  const int64_t j = blockIdx.x;
  const int64_t r = a.indices ? a.indices[j] : j;
  if (r < 0) return;  // an index the deferred checks found bad (the launcher set it to -1)
  T* x = static_cast<T*>(a.x) + r * a.row_stride;
  const int32_t* w = a.words + r * a.word_stride;
  for (int64_t i = threadIdx.x; i < a.tokens; i += kPipeThreads)
    if (!bitmask_allows(w, i)) store(x + i, -__builtin_huge_valf());
}

}  // namespace pdetail

#if !defined(DK_CUDA_EMULATE)
inline cudaError_t launch_pipeline(const PipeArgs& a, cudaStream_t stream) {
  if (a.n_out == 0) return cudaSuccess;
  const dim3 grid(unsigned(a.n_out)), block(kPipeThreads);
  switch (a.dtype) {
    case PipeDType::F32: pdetail::pipeline_kernel<float><<<grid, block, 0, stream>>>(a); break;
    case PipeDType::BF16: pdetail::pipeline_kernel<bf16_t><<<grid, block, 0, stream>>>(a); break;
    case PipeDType::F16: pdetail::pipeline_kernel<f16_t><<<grid, block, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

inline cudaError_t launch_bitmask_inplace(const BitmaskInplaceArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const dim3 grid(unsigned(a.rows)), block(kPipeThreads);
  switch (a.dtype) {
    case PipeDType::F32: pdetail::bitmask_inplace_kernel<float><<<grid, block, 0, stream>>>(a); break;
    case PipeDType::BF16: pdetail::bitmask_inplace_kernel<bf16_t><<<grid, block, 0, stream>>>(a); break;
    case PipeDType::F16: pdetail::bitmask_inplace_kernel<f16_t><<<grid, block, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

// Odr-uses every launcher of this header (.ci/cuda_compile.sh compiles all instantiations).
inline void instantiate_pipeline() {
  PipeArgs p;
  BitmaskInplaceArgs b;
  (void)launch_pipeline(p, nullptr);
  (void)launch_bitmask_inplace(b, nullptr);
}
#endif

}  // namespace dk::cuda
