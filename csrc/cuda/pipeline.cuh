// CUDA kernel of the whole sampling step (issue 11): the op `pipeline` (decodekit.sample with the
// issue-11 keywords, the *_mask_logits ops and apply_penalties), plus xgrammar's
// apply_token_bitmask_inplace. Torch-free: compiles with plain nvcc (.ci/cuda_compile.sh);
// tests/cuda_emu runs it on CPU threads; csrc/cuda/pipeline.cu is the torch launcher.
//
// Design: one block per output row (or, with fewer rows than SMs, several per row for the row
// passes: the split plan, see "the phases of a row" below), no [B, V] intermediate. The processed
// value of token i (bitmask, bans, logit bias, penalties) is recomputed on the fly in every pass
// over the row: the base value (-inf where the bitmask forbids i, else the logit) unless i is one
// of the few tokens the sparse steps touched, whose final values sit in a per-row list sorted by
// token id (each thread walks it with a cursor as its loop advances). The passes A, K and C read
// one 16-byte group per thread and turn (each_group; element loads where the row start is not
// 16-byte aligned); the lane sums and the raw / greedy logprob passes load elements. Per row:
//   S  the touched list: one thread per distinct token runs the CPU's per-token sequence (ban ->
//      its bias entries in list order -> repetition once -> count penalties: the shared
//      DK_HOST_DEVICE code of decodekit/pipeline.h), then the list is sorted by rank counting
//      (O(N^2 / threads) for N list entries);
//   A  one pass: raw max, processed max m and its first index, NaN / +inf check;
//   σ  top-n-sigma only: count, sum, then the sum of squares around the mean of the finite values,
//      3 passes summed in the contract's canonical row order (per 4096-element chunk 16 lanes,
//      chunk sums in chunk order; decodekit/contract.h), as the CPU's finite_stats: one thread per
//      (chunk, lane) (lane_sums, element loads in the lane order);
//   K  top-k only (not joint; or top-h first or after early top-p / min-p, k = 100: early_steps):
//      the k-th largest processed value by a 4-pass radix select (8 bits per pass over the
//      order-preserving float key; exact);
//   P  early top-p only (top-p at the head of the list steps, nothing before it: early_steps): Z
//      and top-p's cut by a 4-pass mass-weighted radix select (per-chunk mass histograms), so that
//      the start list is top-p's survivors (and min-p's, when it is early too: a test in pass C)
//      and the list steps run with both off;
//   C  one pass collects the start list L = {y >= max(lo, k-th largest)} in index order (each
//      thread flags its group's survivors, a block-wide exclusive scan places them), weights
//      exp((y - m) / T) in parallel;
//   E  early epsilon / eta only (split plan: the first list step after early min-p, or the first:
//      early_steps): L collected by the scan (or pass 1, after min-p), the walk sums of its weights
//      (Z) and of eta's entropy terms, then its cut on the slices, in the pass launches, so that
//      the final phase moves only the survivors;
//   then the list steps (top-k, top-p, min-p, typical, epsilon, eta, top-h in the chosen order,
//   each on the renormalised survivors) and the inverse-CDF draw: the SAME step code as the CPU
//   (run_truncations / step_keep in decodekit/pipeline.h), run by every thread of the block through
//   BlockListOps: m-th largest by radix select over the list (the largest by a max), masses and
//   draws by the contract's 16-ary walk (group and block sums one thread each), top-h's candidate
//   sort by a block-wide bitonic sort, top-p's and typical's cuts by a mass-weighted radix select
//   (block_mass_select: block_top_p, block_low_cut), keep flags and compactions on all threads;
//   only top-h's cut over its <= ~100 sorted candidates walks on one thread;
//   logprobs: processed mode from L (rank count; top-n by list_top on the block); raw / greedy mode:
//   one more canonical mass pass (lane sums in the collect phase) and, for top_logprobs n, a
//   radix select of the n-th largest raw / processed value (its 4 passes beside top-k's in the
//   scan and pass phases), then, after the draw, a rank pass (the count of values >= the token's)
//   and two collects of the top-n candidates (the rank phase), all over the slices of a split
//   row; the logprobs phase adds the counts and sorts the n candidates on one CTA per row. The
//   processed logprobs of a split row with nothing to truncate take that path too
//   (split_proc_logprobs: its survivors are every finite value), normalised by the walk total.
// Passes over the row: 1 (A) + 1 (C) with no top-k / top-n-sigma; + 4 (K) with top-k; + 3 (σ);
// + 5 (P: Z, 4 histograms) for early top-p; + 1 (collect) and 2..3 over L (E) for early epsilon /
// eta; + 2..8 for raw / greedy logprobs. The list L and its
// scratch live in a workspace of pipe_workspace_bytes(...) (about 38 bytes per token per row plus
// 16 bytes per history entry).
// Block size 512 (__launch_bounds__(512, 1): at most 128 registers; the digit scan, lane_sums,
// the compactions, every phase, the final phase's two halves and its list steps + draw
// (truncate_and_draw) are real calls on the device, which keeps every kernel and every real call
// free of spills; .ci/cuda_compile.sh checks it).
//
// Contract: the same tokens, valid flags, logprobs, ranks and top-n lists as the CPU kernel
// (csrc/cpu/pipeline.h) for the same inputs and seed; verified bit for bit in the emulator
// (tests/test_ops_pipeline.py). Where a GPU can differ (as for sampling.cuh): double log / exp
// (entropy of typical / eta / top-h, logprobs) come from libdevice instead of glibc and may differ
// by one double ulp; a float logprob can then differ in its last bit and a typical / eta / top-h cut
// that lies within that ulp can move by one tie group. Top-p's and typical's cuts on the list: the
// CPU sums the mass above a candidate per histogram bin, then in quickselect partition order
// (csrc/cpu/mass_select.h), the block per radix digit (block_mass_select), so a cut whose mass
// above lies within a few double ulps of p * Z (typical_p * Z) can move to a neighbouring value;
// early top-p (below) takes Z in the canonical row order instead of the list's walk order, the
// same class of difference. Everything else (float exp dk_exp, sums, selections) is the same
// arithmetic in the same order; compile with -fmad=false.
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
#include "mass_hist.h"
#include "radix_digit.h"
#include "row_io.h"

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
constexpr int kPipeCopies = kPipeWarps < 8 ? int(kPipeWarps) : 8;  // the mass histograms' copies

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
  void* workspace = nullptr;   // pipe_workspace_bytes(n_out, V, history entries, splits)
  // The launch plan (pipe_plan): the row passes of row o run on `splits` CTAs, slice s holding the
  // elements [s * per, min(V, (s + 1) * per)); splits == 1 (per = V): one CTA per row does it all.
  int splits = 1;
  int64_t per = 0;
  int pass = 0;  // the pass of a pipe_pass_kernel launch (1..4)
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

// What the phases of a row hand on through the workspace (split plan: across launches; one CTA:
// across barriers). hdr: the row's value checks and touched list (prep); part s: slice s's maxima,
// bad flag and first index of the processed max (scan); count s: its start-list length (collect;
// apart from the parts, which the collect launch's verdicts read meanwhile); kst[q]: the top-k
// radix select's state before pass q (q = 1..3).
struct PipeHdr {
  int32_t inval, bad;
  int64_t nt;
};
struct PipePart {
  float mr, mx;
  int64_t arg;
  int32_t bad, pad;
};
struct PipeKState {
  uint32_t prefix, pad;
  int64_t rank;
};
// The early top-p select's state before mass histogram h (h = 1..3; recorded by slice 0): the key
// prefix of the digits chosen so far and the mass above its range.
struct PipePState {
  uint32_t prefix, pad;
  double above;
};
// Mask mode: what the write phase puts in the output row (set by the final phase): the raw row
// (bad row, invalid values), the processed row (nothing to truncate, temperature 0, a row with
// nothing finite), or the processed values of the n survivors of L (in index order) and -inf.
enum PipeWriteKind : int32_t { kWriteRaw = 0, kWriteProcessed = 1, kWriteSurvivors = 2 };
struct PipeWrite {
  int32_t kind, pad;
  int64_t n;
};

// Per-row workspace layout (byte offsets; every region 8-byte aligned).
struct PipeWs {
  int64_t ld, v, w, i, tv, ord, keep, acc, sid, sval, fid, fval, lanes, lsum, lsq, lzl, lzp, g16, g256, hg16, hg256,
      hdr, parts, counts, kept, khist, kst, nhist, nst, phist, pst, wr, rk, row;
};
// The smallest power of two >= n (the bitonic sort's padded length).
DK_HOST_DEVICE int64_t pow2_ceil(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}
DK_HOST_DEVICE PipeWs pipe_ws_layout(int64_t V, int64_t N, int64_t splits) {
  // each region rounded up to 8 bytes, then DK_WS_REDZONE bytes that nothing uses (0 on a GPU)
  int64_t o = 0;
  const auto take = [&o](int64_t bytes) {
    const int64_t at = o;
    o += ((bytes + 7) & ~int64_t(7)) + DK_WS_REDZONE;
    return at;
  };
  PipeWs L;
  L.ld = take(8 * V);  // doubles
  L.v = take(4 * V);
  L.w = take(4 * V);
  L.i = take(4 * V);
  L.tv = take(4 * V);
  L.ord = take(4 * pow2_ceil(V));  // the sort pads it to a power of two
  L.keep = take(V);
  L.acc = take(V);
  L.sid = take(4 * N);
  L.sval = take(4 * N);
  L.fid = take(4 * N);
  L.fval = take(4 * N);
  const int64_t pairs = contract::kLanes * contract::num_chunks(V);
  L.lanes = take(8 * pairs);  // (chunk, lane) sums: top-n-sigma's count
  L.lsum = take(8 * pairs);   // top-n-sigma's sum and sum of squares
  L.lsq = take(8 * pairs);
  L.lzl = take(8 * pairs);  // raw / greedy logprobs' normaliser
  L.lzp = take(8 * pairs);  // early top-p's Z
  const int64_t ng = contract::walk16_groups(V);
  L.g16 = take(8 * ng);  // the walk's group and block sums over a list
  L.g256 = take(8 * ((ng + 15) / 16));
  const int64_t nh = splits > 1 ? ng : 0;  // early eta's entropy terms: the same sums (split plan)
  L.hg16 = take(8 * nh);
  L.hg256 = take(8 * ((nh + 15) / 16));
  L.hdr = take(int64_t(sizeof(PipeHdr)));
  L.parts = take(int64_t(sizeof(PipePart)) * splits);
  L.counts = take(8 * splits);
  L.kept = take(8 * splits);             // early epsilon / eta: slice s's survivors (phase_early_eps)
  L.khist = take(4 * 256 * 4 * splits);  // uint32 [4 passes][splits][256]
  L.kst = take(int64_t(sizeof(PipeKState)) * 4);
  L.nhist = take(4 * 256 * 4 * splits);  // the same for the raw / greedy logprobs' top-n select
  L.nst = take(int64_t(sizeof(PipeKState)) * 4);
  L.phist = take(8 * 2 * 256 * contract::num_chunks(V));  // double [2 parities][chunks][256]: early top-p
  L.pst = take(int64_t(sizeof(PipePState)) * 4);
  L.wr = take(int64_t(sizeof(PipeWrite)));
  L.rk = take(8 * 3 * splits);  // int64 [splits][3]: the rank phase's counts (rank, above, ties)
  L.row = o;
  return L;
}
DK_HOST_DEVICE int64_t pipe_workspace_bytes(int64_t n_out, int64_t V, int64_t N, int64_t splits) {
  return n_out * pipe_ws_layout(V, N, splits).row;
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

// The first position c in the ascending ids a[0..n) with a[c] >= x (n if none).
DK_PIPE_FN int64_t lower_bound_i32(const int32_t* a, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < x)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
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
  DK_PIPE_FN int64_t lower(int64_t i) const { return lower_bound_i32(sid, nt, i); }  // first c with sid[c] >= i
  // Processed value of i whose raw value is v; c: a cursor that only moves forward (i must not
  // decrease between calls).
  DK_PIPE_FN float proc(int64_t i, float v, int64_t& c) const {
    while (c < nt && sid[c] < i) ++c;
    if (c < nt && sid[c] == i) return sval[c];
    return (bm && i < bm_tokens && !bitmask_allows(bm, i)) ? kNegInf : v;
  }
  DK_PIPE_FN float at(int64_t i, int64_t& c) const { return proc(i, raw(i), c); }
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
  union {
    int64_t i[kPipeThreads];
    double d[kPipeThreads];  // fold_lanes' chunk sums
  };
  unsigned hist[256];
  unsigned warp_cnt[kPipeWarps];
  int32_t wcount[kPipeWarps];  // block_exclusive_scan's
  int64_t sel_above;
  uint32_t sel_digit;
  int inval, bad, fail;
  float tw, tv;
  double Z;
  double bc;                     // BlockListOps' broadcast of a mass
  uint64_t key;                  // block_mass_select's broadcast of a key
  int64_t ibc;                   // and of an index
  int64_t fin_n;                 // final_draw's survivors, for final_logprobs
  float fin_m;                   // and the row's max
  double mh[kPipeCopies * 256];  // early top-p's mass histogram copies (mass_hist.h)
};

// radix_digit.h's count scan as a real call on the device: the whole-step kernel is at its
// register cap, and inlined the scan added 16 B of spill stores there.
DK_DEVICE_NOINLINE void pipe_count_digit(const unsigned* h, int64_t kk, uint32_t* d_out, int64_t* above_out) {
  pick_count_digit(h, kk, d_out, above_out);
}

// The elements [i0, i1) of a row (i0 a multiple of kVec<T>: a slice start) by 16-byte group:
// thread t takes groups i0 / kVec + t, + threads, ... and calls f(i, raw, processed) for its
// group's elements in index order (processed: the touched value, -inf where the bitmask forbids i,
// else the raw value). One 16-byte load per group when the row start is 16-byte aligned and the
// group lies inside [i0, i1), element loads otherwise; the same order either way.
template <class T, class F>
DK_PIPE_FN void each_group(const RowIn<T>& r, int64_t i0, int64_t i1, F&& f) {
  constexpr int kv = kVec<T>;
  const bool al = aligned16(r.x);
  const int64_t g1 = (i1 + kv - 1) / kv;
  int64_t g = i0 / kv + threadIdx.x, c = r.lower(g * kv);
  for (; g < g1; g += kPipeThreads) {
    Vec16<T> p;
    load_group_raw(r.x, i1, g, al, p);
#pragma unroll
    for (int u = 0; u < kv; ++u) {
      const int64_t i = g * kv + u;
      if (i < i1) {
        const float v = to_float(p.v[u]);
        f(i, v, r.proc(i, v, c));
      }
    }
  }
}

// One pass of a radix select: sh.hist = the 256-bin histogram of the digit at `shift` of the order
// keys of the values that walk(add) passes to add (this thread's share of them) and that match
// `prefix` in the digits above `shift`. Integer counts: order-free. Ends with a barrier.
template <class Walk>
DK_PIPE_FN void hist_pass(const Walk& walk, uint32_t prefix, int shift, PipeShared& sh) {
  for (unsigned b = threadIdx.x; b < 256; b += kPipeThreads) sh.hist[b] = 0;
  __syncthreads();
  const uint32_t hmask = radix_high_mask(shift);
  walk([&](float v) {
    const uint32_t k = float_key_z(v);
    if ((k & hmask) == (prefix & hmask)) atomicAdd(&sh.hist[(k >> shift) & 255u], 1u);
  });
  __syncthreads();
}

// The digit of a pass (from sh.hist) applied to the select's state (key prefix, rank still wanted
// among the keys matching it); every thread gets the new state.
DK_PIPE_FN PipeKState apply_digit(PipeKState st, int shift, PipeShared& sh) {
  if (threadIdx.x < 32) pipe_count_digit(sh.hist, st.rank, &sh.sel_digit, &sh.sel_above);
  __syncthreads();
  st.prefix |= sh.sel_digit << shift;
  st.rank -= sh.sel_above;
  return st;
}

// The m-th largest (1 <= m <= the number of values) of the values walk(add) visits (every thread
// its share), by radix select (4 passes of 8 bits over the order key; exact); all threads return it.
template <class Walk>
DK_PIPE_FN float select_mth(int64_t m, const Walk& walk, PipeShared& sh) {
  PipeKState st{0u, 0u, m};
  for (int shift = 24; shift >= 0; shift -= 8) {
    hist_pass(walk, st.prefix, shift, sh);
    st = apply_digit(st, shift, sh);
  }
  return key_to_float(st.prefix);
}

// A walk over the row's raw or processed values [i0, i1) (for hist_pass / select_mth).
template <class T>
struct RowWalk {
  const RowIn<T>& r;
  int64_t i0, i1;
  bool processed;
  template <class Add>
  DK_PIPE_FN void operator()(Add&& add) const {
    each_group(r, i0, i1, [&](int64_t, float v, float y) { add(processed ? y : v); });
  }
};

// Ordered compaction of the row's elements [i0, i1) (i0 a multiple of kVec<T>) by 16-byte group
// (each_group's order): every i with pred(i, raw, processed) is passed to emit(position, i, raw,
// processed), positions in index order; returns the count (all threads). Each round, a thread
// flags the kept elements of its group and a block-wide exclusive scan of the counts places them.
template <class T, class Pred, class Emit>
DK_DEVICE_NOINLINE int64_t collect_row(const RowIn<T>& r, int64_t i0, int64_t i1, Pred pred, Emit emit,
                                       PipeShared& sh) {
  constexpr int kv = kVec<T>;
  const bool al = aligned16(r.x);
  const int64_t gb = i0 / kv, g1 = (i1 + kv - 1) / kv;
  int64_t count = 0, c = r.lower((gb + threadIdx.x) * kv);
  for (int64_t g0 = gb; g0 < g1; g0 += kPipeThreads) {
    const int64_t g = g0 + threadIdx.x;
    float v[kv], y[kv];
    unsigned keep = 0;
    if (g < g1) {
      Vec16<T> p;
      load_group_raw(r.x, i1, g, al, p);
#pragma unroll
      for (int u = 0; u < kv; ++u) {
        const int64_t i = g * kv + u;
        v[u] = to_float(p.v[u]);
        y[u] = i < i1 ? r.proc(i, v[u], c) : 0.f;
        if (i < i1 && pred(i, v[u], y[u])) keep |= 1u << u;
      }
    }
    int total = 0;
    const int before = block_exclusive_scan<kPipeThreads>(__popc(keep), sh.wcount, total);
    int k = 0;
#pragma unroll
    for (int u = 0; u < kv; ++u)
      if (keep >> u & 1u) emit(count + before + k++, g * kv + u, v[u], y[u]);
    count += total;
  }
  return count;
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

// The mass-weighted radix select of the list steps' cuts (top-p, typical) on the block: over the
// order keys key(j) of j in [0, n) (n >= 1; KeyT uint32_t or uint64_t) with weights wt(j)
// (double), the smallest key whose strictly greater keys weigh < P, or, when no prefix of tie
// groups reaches P, the smallest key held. 2 bits per pass from the top: a pass adds, per digit,
// the weights of the entries that match the digits chosen so far (each thread its index stride,
// each warp by a shuffle tree into lane 0, the warps in warp order: a fixed order), then takes the
// highest digit whose mass, added to the mass above it, reaches P, or, when none does, the lowest
// digit some entry holds. A pass also notes the digits held by exactly one entry: when the chosen
// digit is one, every later pass could only take that entry's digits, so its key is the answer
// (read in one more pass). Distinct keys end after about log4(n) passes plus the ones their
// common high bits take, instead of all 16 (float) / 32 (double); tie groups run them all.
template <class KeyT, class KeyF, class WF>
DK_PIPE_FN KeyT block_mass_select(int64_t n, const KeyF& key, const WF& wt, double P, PipeShared& sh) {
  constexpr int kBits = int(8 * sizeof(KeyT));
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  KeyT prefix = 0;
  double above = 0.0;  // the mass of the keys above the chosen digits' range
  for (int shift = kBits - 2; shift >= 0; shift -= 2) {
    const KeyT high = shift == kBits - 2 ? KeyT(0) : ~KeyT(0) << (shift + 2);
    double m[4] = {0.0, 0.0, 0.0, 0.0};
    unsigned held = 0u, multi = 0u;  // the digits with >= 1 / >= 2 matching entries
    for (int64_t j = threadIdx.x; j < n; j += kPipeThreads) {
      const KeyT k = key(j);
      if ((k & high) != prefix) continue;
      const unsigned d = unsigned(k >> shift) & 3u;
      multi |= held & (1u << d);
      held |= 1u << d;
      const double x = wt(j);
#pragma unroll
      for (unsigned b = 0; b < 4; ++b)
        if (d == b) m[b] = contract::dadd_rn(m[b], x);
    }
#pragma unroll
    for (int b = 0; b < 4; ++b)
      for (int o = 16; o > 0; o >>= 1) m[b] = contract::dadd_rn(m[b], __shfl_down_sync(0xFFFFFFFFu, m[b], o));
    for (int o = 16; o > 0; o >>= 1) {  // lanes l and l ^ o hold disjoint sets of lanes
      const unsigned h = __shfl_xor_sync(0xFFFFFFFFu, held, o), mu = __shfl_xor_sync(0xFFFFFFFFu, multi, o);
      multi |= mu | (held & h);
      held |= h;
    }
    if (lane == 0) {
#pragma unroll
      for (int b = 0; b < 4; ++b) sh.d[warp * 4 + b] = m[b];
      sh.hist[warp] = held | multi << 4;
    }
    __syncthreads();
    double M[4] = {0.0, 0.0, 0.0, 0.0};
    unsigned H = 0u, Mu = 0u;
    for (unsigned q = 0; q < kPipeWarps; ++q) {
#pragma unroll
      for (int b = 0; b < 4; ++b) M[b] = contract::dadd_rn(M[b], sh.d[q * 4 + b]);
      const unsigned h = sh.hist[q] & 15u;
      Mu |= (sh.hist[q] >> 4) | (H & h);
      H |= h;
    }
    __syncthreads();
    unsigned dig = 0u;
    bool found = false;
    double acc = above, low_above = above;  // low_above: the mass above the lowest held digit so far
    for (int b = 3; b >= 0; --b) {
      if (!(H >> b & 1u)) continue;
      if (contract::dadd_rn(acc, M[b]) >= P) {
        dig = unsigned(b);
        found = true;
        break;
      }
      low_above = acc;
      dig = unsigned(b);
      acc = contract::dadd_rn(acc, M[b]);
    }
    above = found ? acc : low_above;
    prefix |= KeyT(dig) << shift;
    if (shift > 0 && (H >> dig & 1u) && !(Mu >> dig & 1u)) {  // one entry left: its key
      const KeyT top = ~KeyT(0) << shift;
      for (int64_t j = threadIdx.x; j < n; j += kPipeThreads) {
        const KeyT k = key(j);
        if ((k & top) == prefix) sh.key = uint64_t(k);
      }
      __syncthreads();
      prefix = KeyT(sh.key);
      __syncthreads();
      break;
    }
  }
  return prefix;
}

// Top-p's cut on the block (BlockListOps::top_p): the smallest value t of v[0..n) (n >= 1) whose
// strictly greater values weigh < P, by the mass select over the values' order keys. It replaced
// a bitonic sort of the list (log2(N) (log2(N) + 1) / 2 rounds over it, 153 at N = 2^17) and the
// walk's reach over the sorted weights. The masses are added in another order than the CPU's
// quickselect (as the walk's were): a cut whose mass above lies within a few double ulps of P can
// differ. A real call: the final phase is at its register cap.
DK_DEVICE_NOINLINE float block_top_p(const float* v, const float* w, int64_t n, double P, PipeShared& sh) {
  return key_to_float(block_mass_select<uint32_t>(
      n, [v](int64_t j) { return float_key_z(v[j]); }, [w](int64_t j) { return double(w[j]); }, P, sh));
}

// Typical's cut on the block (BlockListOps::low_cut): the largest score of sc[0..n) (n >= 1)
// whose strictly smaller scores weigh < P (weights w, or 1 each when w is null), by the mass
// select over the complemented order keys (the smallest score has the largest key). It replaced a
// bitonic sort of the scores and the walk's reach; as for top-p, the masses are added in another
// order than the CPU's quickselect. A real call, as block_top_p.
DK_DEVICE_NOINLINE double block_low_cut(const double* sc, const float* w, int64_t n, double P, PipeShared& sh) {
  const uint64_t k = block_mass_select<uint64_t>(
      n, [sc](int64_t j) { return ~double_key_z(sc[j]); }, [w](int64_t j) { return w ? double(w[j]) : 1.0; }, P, sh);
  return key_to_double(~k);
}

// The list steps' primitives on the block (decodekit/pipeline.h lists them): every thread of the
// row's block calls the steps with the same arguments, each primitive returns the same value to
// all of them. g16 / g256: the workspace's walk sums (room for a whole row's list).
// BlockListOps::candidates: two ordered compactions with the sort (value descending, position
// ascending, as BlockListOps::sort) between them: block_sort pads ord past its n with -1, over where
// the ones at c go. A real call: inlined into the list steps, the final phase spilled.
DK_DEVICE_NOINLINE int64_t block_candidates(const float* v, int64_t n, float c, int32_t* ord, int64_t* na,
                                            PipeShared& sh) {
  const auto emit_at = [](int32_t* out) { return [out](int64_t pos, int64_t j) { out[pos] = int32_t(j); }; };
  const int64_t a = collect(n, 0, [v, c](int64_t j, int64_t&) { return v[j] > c; }, emit_at(ord), sh);
  block_sort(ord, a, [v](int32_t x, int32_t y) { return v[x] > v[y] || (v[x] == v[y] && x < y); });
  *na = a;
  return a + collect(n, 0, [v, c](int64_t j, int64_t&) { return v[j] == c; }, emit_at(ord + a), sh);
}

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
    return select_mth(
        m,
        [v, n](auto&& add) {
          for (int64_t i = threadIdx.x; i < n; i += kPipeThreads) add(v[i]);
        },
        sh);
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
  template <class Key>
  DK_PIPE_FN void sort(int32_t* ord, int64_t n, const Key& key, bool descending) const {
    block_sort(ord, n, [&](int32_t a, int32_t b) {
      const auto ka = key(a), kb = key(b);
      return (descending ? ka > kb : ka < kb) || (ka == kb && a < b);
    });
  }
  DK_PIPE_FN int64_t candidates(const float* v, int64_t n, float c, int32_t* ord, int64_t* na) const {
    return block_candidates(v, n, c, ord, na, sh);
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
  // The mass-weighted radix select of block_top_p (no sort of the list).
  DK_PIPE_FN float top_p(const PipeList& L, double P, const ListScratch&) const {
    return block_top_p(L.v, L.w, L.n, P, sh);
  }
  // Typical's cut by the mass select of block_low_cut (no sort of the scores).
  DK_PIPE_FN double low_cut(const double* sc, const float* w, int64_t n, double P, const ListScratch&) const {
    return block_low_cut(sc, w, n, P, sh);
  }
};

// The (chunk, lane) sums of the contract's canonical row order (decodekit/contract.h: lane j of
// chunk c adds g(value) of the elements c * kChunk + j (mod 16) of its chunk, in index order) for
// the pairs q = c * 16 + j in [q0, q1), one thread each, into lanes[q]. Ends with a barrier. A real
// call on the device (inlined into the whole-step kernel it spilled).
template <class T, class G>
DK_DEVICE_NOINLINE void lane_sums(const RowIn<T>& r, bool processed, int64_t V, int64_t q0, int64_t q1, G g,
                                  double* lanes) {
  for (int64_t q = q0 + threadIdx.x; q < q1; q += kPipeThreads) {
    const int64_t c = q / contract::kLanes;
    const int j = int(q % contract::kLanes);
    int64_t cur = processed ? r.lower(c * contract::kChunk + j) : 0;
    lanes[q] = contract::chunk_lane_sum(V, c, j, [&](int64_t i) { return g(r.get(processed, i, cur)); });
  }
  __syncthreads();
}

// The row total of the (chunk, lane) sums lanes[0 .. 16 nch) in the canonical order: each chunk's
// lanes folded j = 0..15 (one thread per chunk), the chunk sums added in chunk order by thread 0.
// Returns it to every thread.
DK_PIPE_FN double fold_lanes(const double* lanes, int64_t nch, PipeShared& sh) {
  double z = 0.0;  // thread 0's
  for (int64_t c0 = 0; c0 < nch; c0 += kPipeThreads) {
    const int64_t c = c0 + threadIdx.x, n = nch - c0 < kPipeThreads ? nch - c0 : kPipeThreads;
    if (c < nch) sh.d[threadIdx.x] = contract::add_in_order(lanes + c * contract::kLanes, contract::kLanes);
    __syncthreads();
    if (threadIdx.x == 0)
      for (int64_t k = 0; k < n; ++k) z = contract::dadd_rn(z, sh.d[k]);
    __syncthreads();
  }
  if (threadIdx.x == 0) sh.Z = z;
  __syncthreads();
  z = sh.Z;
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

// ---- the phases of a row --------------------------------------------------------------------
// One CTA per row (pipeline_kernel) runs them in turn with a barrier between; the split plan
// (pipe_plan, rows < SMs) runs each as its own launch over the row's slices, so a batch of 1 reads
// its row on many SMs. Same code, same workspace hand-over, same results by construction:
//   prep     (rows with id lists; one CTA per row) the values the launcher did not check, the
//            touched list S;
//   scan     (per slice) raw max, processed max and its first index, NaN / +inf check (pass A);
//            top-n-sigma's count and sum (lane sums of its (chunk, lane) pairs); radix pass 0 of
//            top-k's select and of the raw / greedy logprobs' top-n select; early epsilon / eta
//            (without min-p): the slice's start list (phase_early_eps, as every phase of it below);
//   pass q   (q = 1..4, per slice) top-n-sigma's sum of squares (q = 1); radix pass q of both
//            selects (q <= 3); early top-p's Z lane sums and mass histogram 0 (q = 1), the digit of
//            histogram q - 2 and histogram q - 1 (q >= 2); early epsilon / eta: after min-p the
//            start list (q = 1), the walk sums of its weights, eta's terms' sums, the cut;
//   collect  (per slice) the start list of the slice's elements (pass C; early top-p: above the
//            cut from its last digit; early min-p: its test), at the slice's first position of L;
//            the raw / greedy logprobs' normaliser lane sums of its (chunk, lane) pairs;
//   sums     (split plan, sample mode, per slice; rows with nothing to truncate) the walk's sums
//            of the start list where the slices left it (phase_sums);
//   final    (one CTA per row) the verdict, the start list moved together, the list steps, the
//            draw and processed logprobs (a row with nothing to truncate on the split plan: the
//            walk over the sums phase's sums, split_draw); in mask mode what the output row gets
//            (PipeWrite);
//   write    (mask mode, per slice) the slice of the output row;
//   rank     (sample mode with logprobs, per slice; row_logprobs rows only) the slice's count
//            of values >= the drawn token's, its top-n candidates;
//   logprobs (one CTA per row; the same rows) the token's logprob and rank, the top-n list.
// Whether a row needs the top-n-sigma / top-k passes follows from its parameters (read on the
// device); rows that do not return at once.

// What every phase of row o knows: its input, parameters and workspace regions.
template <class T>
struct PipeRowCtx {
  int64_t V, N, nch;
  char* ws;
  PipeWs lay;
  RowIn<T> r;  // r.nt: 0 until row_hdr reads the prep's count
  const double* q;
  PipeRow pr;
  T* out;  // mode 1: the output row
  PipeHdr* hdr;
  PipePart* parts;
  int64_t *counts, *kept;
  uint32_t *khist, *nhist;
  PipeKState *kst, *nst;
  PipeWrite* wr;
  double *lanes, *lsum, *lsq, *lzl, *lzp;
  int64_t* rk;
  double* phist;
  PipePState* pst;
};

template <class T>
DK_PIPE_FN PipeRowCtx<T> row_ctx(const PipeArgs& a, int64_t o) {
  PipeRowCtx<T> c;
  c.V = a.V;
  c.N = pipe_list_entries(a);
  c.nch = contract::num_chunks(a.V);
  c.lay = pipe_ws_layout(a.V, c.N, a.splits);
  c.ws = static_cast<char*>(a.workspace) + o * c.lay.row;
  const int64_t src = a.indices ? a.indices[o] : o;
  const int32_t* bm = a.bitmask ? a.bitmask + o * a.bitmask_words : nullptr;
  c.r = RowIn<T>{static_cast<const T*>(a.x) + src * a.row_stride,
                 bm,
                 bm ? (a.V < 32 * a.bitmask_words ? a.V : 32 * a.bitmask_words) : 0,
                 reinterpret_cast<int32_t*>(c.ws + c.lay.sid),
                 reinterpret_cast<float*>(c.ws + c.lay.sval),
                 0};
  c.q = a.params + o * kPipeParams;
  c.pr = pipe_row(c.q);
  c.out = a.mode == 1 ? static_cast<T*>(a.out_logits) + o * a.V : nullptr;
  c.hdr = reinterpret_cast<PipeHdr*>(c.ws + c.lay.hdr);
  c.parts = reinterpret_cast<PipePart*>(c.ws + c.lay.parts);
  c.counts = reinterpret_cast<int64_t*>(c.ws + c.lay.counts);
  c.kept = reinterpret_cast<int64_t*>(c.ws + c.lay.kept);
  c.khist = reinterpret_cast<uint32_t*>(c.ws + c.lay.khist);
  c.kst = reinterpret_cast<PipeKState*>(c.ws + c.lay.kst);
  c.nhist = reinterpret_cast<uint32_t*>(c.ws + c.lay.nhist);
  c.nst = reinterpret_cast<PipeKState*>(c.ws + c.lay.nst);
  c.wr = reinterpret_cast<PipeWrite*>(c.ws + c.lay.wr);
  c.lanes = reinterpret_cast<double*>(c.ws + c.lay.lanes);
  c.lsum = reinterpret_cast<double*>(c.ws + c.lay.lsum);
  c.lsq = reinterpret_cast<double*>(c.ws + c.lay.lsq);
  c.lzl = reinterpret_cast<double*>(c.ws + c.lay.lzl);
  c.lzp = reinterpret_cast<double*>(c.ws + c.lay.lzp);
  c.phist = reinterpret_cast<double*>(c.ws + c.lay.phist);
  c.pst = reinterpret_cast<PipePState*>(c.ws + c.lay.pst);
  c.rk = reinterpret_cast<int64_t*>(c.ws + c.lay.rk);
  return c;
}

// What the prep found (a row without id lists has no prep: only its parameters to check); sets the
// touched list's length in c.r.
template <class T>
DK_PIPE_FN PipeHdr row_hdr(PipeRowCtx<T>& c) {
  if (c.N == 0) return PipeHdr{pipe_params_ok(c.q) ? 0 : 1, 0, 0};
  const PipeHdr h = *c.hdr;
  c.r.nt = h.inval ? 0 : h.nt;
  return h;
}

// From the row's parameters alone: does it build a start list (temperature > 0; mask mode with
// something to truncate), need top-n-sigma's statistics, top-k's k-th largest?
DK_PIPE_FN bool wants_list(const PipeArgs& a, const PipeRow& pr, int64_t V) {
  return pr.T != 0.f && (a.mode != 1 || any_truncation(pr, V));
}
DK_PIPE_FN bool wants_sigma(const PipeArgs& a, const PipeRow& pr, int64_t V) {
  return pr.nsig > 0.0 && wants_list(a, pr, V);
}
// Does a sampled row report raw logprobs (log_softmax of the logits as given) or greedy ones
// (temperature 0: log_softmax of the processed row)? Their normaliser is a row mass of its own.
DK_PIPE_FN bool wants_raw_mass(const PipeArgs& a, const PipeRow& pr) {
  return a.mode != 1 && (a.want_logprob || a.top_n > 0) && (a.raw_logprobs || pr.T == 0.f);
}
// Processed logprobs of a row with nothing to truncate on the split plan: the survivors are every
// finite value, so its rank and top-n list are the row's (the rank and logprobs phases, as for raw
// / greedy rows) and its normaliser the walk total of the split draw's sums (see split_draw_only).
DK_PIPE_FN bool split_proc_logprobs(const PipeArgs& a, const PipeRow& pr, int64_t V) {
  return a.splits > 1 && a.mode != 1 && (a.want_logprob || a.top_n > 0) && !a.raw_logprobs && pr.T != 0.f &&
         !any_truncation(pr, V);
}
// Do the rank and logprobs phases write the row's logprobs (raw / greedy, or split processed)?
DK_PIPE_FN bool row_logprobs(const PipeArgs& a, const PipeRow& pr, int64_t V) {
  return wants_raw_mass(a, pr) || split_proc_logprobs(a, pr, V);
}
// And their top-n list (the n-th largest value by a radix select in the row passes)?
DK_PIPE_FN bool wants_topn(const PipeArgs& a, const PipeRow& pr, int64_t V) {
  return a.top_n > 0 && row_logprobs(a, pr, V);
}
// Early steps: top-p and min-p at the head of a row's list steps, applied by the row passes and
// the collect instead of on the list (see "early steps" below). They are the enabled steps among
// {top-p, min-p} before the first other enabled step, when nothing the start list depends on comes
// before or beside them: no top-k, top-n-sigma or min_tokens_to_keep > 1, not joint. min_p_first:
// min-p comes before top-p (the vllm order), so top-p's masses are over min-p's survivors.
// top_h: top-h is the first list step, or the first after early top-p / min-p: its survivors lie
// among its candidates (the values >= the 100th largest of the list, which are those of the row
// too that are in the list: the early steps keep the values above a threshold), so the start list
// is cut there as well (the top-k select's passes with k = 100) and the step runs on that short
// list with the same result.
// eps: on the split plan, epsilon or eta (eta: which) is the first list step after early min-p
// (or the first of all; not after early top-p, whose cut takes the pass launches): the slices
// collect the start list and cut it by the step's test in the scan and pass launches, before the
// final phase moves it onto one CTA (phase_early_eps), with the list's Z (and eta's entropy) as
// the CPU's step sums them, the walk over the start list in list order.
struct PipeEarly {
  bool top_p, min_p, min_p_first, top_h, eps, eta;
};
DK_PIPE_FN PipeEarly early_steps(const PipeArgs& a, const PipeRow& pr, int64_t V) {
  PipeEarly e{false, false, false, false, false, false};
  const PipeOrder order = PipeOrder(a.order);
  if (!wants_list(a, pr, V) || order == PipeOrder::Joint || step_on(Step::TopK, pr, V) || pr.nsig > 0.0 || pr.mtk > 1)
    return e;
  for (int j = 0; j < 7; ++j) {
    const Step st = pipe_step(order, j);
    if (!step_on(st, pr, V)) continue;
    if (st == Step::TopP) {
      e.top_p = true;
    } else if (st == Step::MinP) {
      e.min_p = true;
      e.min_p_first = !e.top_p;
    } else {
      e.top_h = st == Step::TopH;
      const bool eta = st == Step::Eta;
      e.eps = a.splits > 1 && !e.top_p && (eta || st == Step::Epsilon);
      e.eta = e.eps && eta;
      break;
    }
  }
  return e;
}
// Does the row need the k-th largest value from the row passes: top-k's (not joint), or early
// top-h's 100th largest (kth_rank)?
DK_PIPE_FN bool wants_kth(const PipeArgs& a, const PipeRow& pr, int64_t V) {
  return PipeOrder(a.order) != PipeOrder::Joint && wants_list(a, pr, V) &&
         (step_on(Step::TopK, pr, V) || early_steps(a, pr, V).top_h);
}
DK_PIPE_FN int64_t kth_rank(const PipeRow& pr, int64_t V) {
  const int64_t k = step_on(Step::TopK, pr, V) ? (pr.k > pr.mtk ? pr.k : pr.mtk) : kTopHCandidates;
  return k < V ? k : V;
}
// The parameters the list steps run with: the early steps off.
DK_PIPE_FN PipeRow list_row(const PipeArgs& a, const PipeRow& pr, int64_t V) {
  const PipeEarly e = early_steps(a, pr, V);
  PipeRow r = pr;
  if (e.top_p) r.p = 1.f;
  if (e.min_p) r.minp = 0.f;
  if (e.eps) (e.eta ? r.eta : r.eps) = 0.0;
  return r;
}
// Min-p's keep test on the start list (the step's on a list that holds the max m, whose weight
// dk_exp(0) = 1 is the largest: dk_exp(x) <= 1 for x <= 0): weight >= min_p, or the max.
DK_PIPE_FN bool min_p_keeps(float y, float m, float invT, float minp) {
  return double(pipe_weight(y, m, invT)) >= double(minp) || y >= m;
}

// Slice sp of a row: its elements [beg, end) and its (chunk, lane) pairs [q0, q1) of the lane sums.
struct PipeSlice {
  int64_t beg, end, q0, q1;
};
DK_PIPE_FN PipeSlice pipe_slice(const PipeArgs& a, int64_t nch, int sp) {
  const int64_t per = a.splits > 1 ? a.per : a.V, pairs = nch * contract::kLanes;
  const int64_t pp = (pairs + a.splits - 1) / a.splits;
  PipeSlice s;
  s.beg = sp * per;
  s.end = s.beg + per < a.V ? s.beg + per : a.V;
  s.q0 = sp * pp < pairs ? sp * pp : pairs;
  s.q1 = s.q0 + pp < pairs ? s.q0 + pp : pairs;
  return s;
}

// The row's verdict from the prep and all slices' scans (every thread reads them; order-free):
// invalid values, bad row (NaN / +inf), raw and processed maxima, first index of the processed max.
struct PipeVerdict {
  bool inval, ok;
  float mraw, m;
  int64_t arg;
};
template <class T>
DK_PIPE_FN PipeVerdict verdict(const PipeArgs& a, PipeRowCtx<T>& c) {
  const PipeHdr h = row_hdr(c);
  PipeVerdict v{h.inval != 0, h.bad == 0, kNegInf, kNegInf, INT64_MAX};
  if (v.inval) return v;
  for (int s = 0; s < a.splits; ++s) {
    const PipePart p = c.parts[s];
    v.ok = v.ok && p.bad == 0;
    v.mraw = p.mr > v.mraw ? p.mr : v.mraw;
    if (p.mx > v.m || (p.mx == v.m && p.arg < v.arg)) {
      v.m = p.mx;
      v.arg = p.arg;
    }
  }
  return v;
}

// A radix select run by the row passes (4 passes of 8 bits over the order key, each slice
// histogramming its elements): top-k's k-th largest processed value, or the raw / greedy
// logprobs' n-th largest (raw or processed) value for their top-n list.
struct PipeSel {
  uint32_t* hist;  // [4 passes][splits][256] the slices' count histograms
  PipeKState* st;  // the state before pass q (q = 1..3), recorded by slice 0
  int64_t m;       // the rank wanted (1-based)
  bool processed;  // over the processed values (else the raw ones)
};
template <class T>
DK_PIPE_FN PipeSel kth_sel(const PipeRowCtx<T>& c) {
  return PipeSel{c.khist, c.kst, kth_rank(c.pr, c.V), true};
}
template <class T>
DK_PIPE_FN PipeSel topn_sel(const PipeArgs& a, const PipeRowCtx<T>& c) {
  return PipeSel{c.nhist, c.nst, a.top_n, !a.raw_logprobs};  // (1 <= top_n <= V: the binding checks)
}

// A select's state before pass q (0..4): nothing chosen and rank m for q = 0; else the state
// before pass q - 1 (recorded by slice 0) with the digit of pass q - 1's histogram (the slices'
// histograms added: integer counts, order-free); q = 4: the key of the m-th largest. Barriers.
DK_PIPE_FN PipeKState sel_state(const PipeArgs& a, const PipeSel& sel, int q, PipeShared& sh) {
  PipeKState st{0u, 0u, sel.m};
  if (q == 0) return st;
  if (q > 1) st = sel.st[q - 1];
  const uint32_t* h = sel.hist + int64_t(q - 1) * a.splits * 256;
  for (unsigned b = threadIdx.x; b < 256; b += kPipeThreads) {
    unsigned n = 0;
    for (int p = 0; p < a.splits; ++p) n += h[p * 256 + b];
    sh.hist[b] = n;
  }
  __syncthreads();
  return apply_digit(st, radix_shift(q - 1), sh);
}

// Radix pass q (0..3) of a select over slice sp: its histogram into hist[q][sp] (slice 0 records
// the state before pass q for the next passes). Ends with a barrier.
template <class T>
DK_PIPE_FN void sel_pass(const PipeArgs& a, const PipeRowCtx<T>& c, const PipeSel& sel, const PipeSlice& s, int sp,
                         int q, PipeShared& sh) {
  const PipeKState st = sel_state(a, sel, q, sh);
  if (q > 0 && sp == 0 && threadIdx.x == 0) sel.st[q] = st;
  hist_pass(RowWalk<T>{c.r, s.beg, s.end, sel.processed}, st.prefix, radix_shift(q), sh);
  uint32_t* h = sel.hist + (int64_t(q) * a.splits + sp) * 256;
  for (unsigned b = threadIdx.x; b < 256; b += kPipeThreads) h[b] = sh.hist[b];
  __syncthreads();
}

// The row's radix passes q (0..3) over slice sp: top-k's and the top-n list's selects.
template <class T>
DK_PIPE_FN void select_passes(const PipeArgs& a, const PipeRowCtx<T>& c, const PipeSlice& s, int sp, int q,
                              PipeShared& sh) {
  if (wants_kth(a, c.pr, c.V)) sel_pass(a, c, kth_sel(c), s, sp, q, sh);
  if (wants_topn(a, c.pr, c.V)) sel_pass(a, c, topn_sel(a, c), s, sp, q, sh);
}

// Top-n-sigma's bound lo = m - nsig * sigma over the finite processed values (the lowest float when
// off), from the three lane sums (count, sum, sum of squares).
template <class T>
DK_PIPE_FN float sigma_lo(const PipeRowCtx<T>& c, float m, PipeShared& sh) {
  if (!(c.pr.nsig > 0.0)) return kLowestFloat;
  const double n = fold_lanes(c.lanes, c.nch, sh), ss = fold_lanes(c.lsq, c.nch, sh);
  return float_at_least(double(m) - c.pr.nsig * ::sqrt(ss / n));
}

// ---- early steps: top-p's cut by the row passes, min-p's test in the collect -------------------
// For a row with early top-p, top-p's cut t (the smallest value whose strictly greater values weigh
// < P = p Z over the start list {y > -inf}, or over min-p's survivors in it when min-p comes first)
// comes from a mass-weighted radix select over the processed row (4 passes of 8 bits over
// float_key_z) in the pass launches 1..4, on all of the row's slices, instead of from the list
// steps' select over a whole-vocabulary list on one CTA:
//   Z       the canonical row mass (decodekit/contract.h) of the weights exp((y - m) / T): lane
//           sums of the slices' (chunk, lane) pairs in pass 1, folded where P is needed;
//   hist h  (h = 0..3, in pass h + 1) the 256-bin mass histogram of digit 3 - h of the keys that
//           match the digits chosen so far: per 4096-element chunk (mass_hist.h's fixed order),
//           slice sp taking the chunks [nch sp / splits, nch (sp + 1) / splits), the chunk
//           histograms added in chunk order (so the bins, hence the cut, do not depend on the plan);
//   digit   (in the next pass; in the collect phase for h = 3) where above + the mass from the top
//           crosses P (radix_digit.h pick_mass_digit, as sampling.cuh's top-p).
// The collect phase then keeps y >= min(t, m) (the step keeps v >= t or v >= the max) and, with
// early min-p, the y that min_p_keeps (min-p's test needs no pass of its own: the list's largest
// weight is the max's, 1); the list steps run with both off (list_row). Z and the bins add the
// weights the CPU adds (its list mass, its quickselect's masses) in another order: as for the list
// steps' select, a cut whose mass above lies within a few double ulps of p Z can differ.
// (pick_mass_digit's fallback, the lowest digit with mass when the digits' total stays under P,
// needs an error of over 2^-24 Z: not for a float p < 1 and fewer than 2^29 values.)
template <class T>
DK_PIPE_FN double early_P(const PipeRowCtx<T>& c, PipeShared& sh) {
  return double(c.pr.p) * fold_lanes(c.lzp, c.nch, sh);
}
// The minimum weight of top-p's masses: min_p when min-p comes first (its survivors), else 0.
DK_PIPE_FN float early_min_w(const PipeEarly& e, const PipeRow& pr) { return e.min_p_first ? pr.minp : 0.f; }

// The select's state after the digit of mass histogram h (0..3): the state before it (pst[h];
// nothing chosen for h = 0) and the digit from the chunk histograms added in chunk order (one
// thread a bin), picked on warp 0. All threads; barriers.
template <class T>
DK_PIPE_FN PipePState early_digit(const PipeRowCtx<T>& c, int h, double P, PipeShared& sh) {
  PipePState st = h == 0 ? PipePState{0u, 0u, 0.0} : c.pst[h];
  const double* hh = c.phist + int64_t(h & 1) * c.nch * 256;
  fold_chunk_hists<int(kPipeThreads)>(hh, c.nch, sh.d);
  __syncthreads();
  if (threadIdx.x < 32) pick_mass_digit(sh.d, st.above, P, &sh.sel_digit, &sh.bc);
  __syncthreads();
  st.prefix |= sh.sel_digit << radix_shift(h);
  st.above = sh.bc;
  __syncthreads();
  return st;
}

// Mass histogram h of slice sp's chunks (keys matching `prefix` in the digits above 3 - h; the row
// max m and 1 / temperature invT give the weights; values min_p_keeps refuses with min_w > 0 left
// out) into phist[h & 1]. All threads; barriers.
template <class T>
DK_PIPE_FN void early_hist(const PipeArgs& a, const PipeRowCtx<T>& c, int sp, int h, uint32_t prefix, float m,
                           float invT, float min_w, PipeShared& sh) {
  constexpr int kv = kVec<T>;
  constexpr int64_t kGroups = contract::kChunk / kv;
  const RowIn<T>& r = c.r;
  const bool al = aligned16(r.x);
  const int64_t ng = (c.V + kv - 1) / kv;
  const int shift = radix_shift(h);
  const uint32_t hmask = radix_mask(h);
  double* out = c.phist + int64_t(h & 1) * c.nch * 256;
  for (int64_t ch = c.nch * sp / a.splits; ch < c.nch * (sp + 1) / a.splits; ++ch) {
    const int64_t g0 = ch * kGroups, g1 = g0 + kGroups < ng ? g0 + kGroups : ng;
    int64_t cur = r.lower((g0 + threadIdx.x) * kv);
    const auto group = [&](int64_t g, bool in, unsigned* digit, float* e) {
      Vec16<T> p;
      if (in) load_group_raw(r.x, c.V, g, al, p);
#pragma unroll
      for (int u = 0; u < kv; ++u) {
        const int64_t i = g * kv + u;
        digit[u] = 256u;
        e[u] = 0.f;
        if (in && i < c.V) {
          const float y = r.proc(i, to_float(p.v[u]), cur);
          const uint32_t k = float_key_z(y);
          if (y > kNegInf && (k & hmask) == prefix && (min_w == 0.f || min_p_keeps(y, m, invT, min_w))) {
            digit[u] = (k >> shift) & 255u;
            e[u] = pipe_weight(y, m, invT);
          }
        }
      }
    };
    block_mass_hist<int(kPipeThreads), kPipeCopies, kv>(g0, g1, group, sh.mh, sh.d);
    for (unsigned d = threadIdx.x; d < 256; d += kPipeThreads) out[ch * 256 + d] = sh.mh[d];
    __syncthreads();
  }
}

// Pass q (1..4) of a row with early top-p over slice sp: Z's lane sums and histogram 0 (q = 1), else
// the digit of histogram q - 2 (slice 0 records the state) and histogram q - 1; min_w: early_min_w
// of the row's early steps (from the caller's early_steps). A real call (the pass phase's register
// cap).
template <class T>
DK_DEVICE_NOINLINE void early_pass(const PipeArgs& a, PipeRowCtx<T>& c, const PipeSlice& s, int sp, int q, float min_w,
                                   PipeShared& sh) {
  const PipeVerdict vd = verdict(a, c);
  if (!vd.ok || !(vd.m > kNegInf)) return;
  const float m = vd.m, invT = 1.f / c.pr.T;
  const int h = q - 1;
  PipePState st{0u, 0u, 0.0};
  if (h == 0) {
    lane_sums(
        c.r, true, c.V, s.q0, s.q1,
        [m, invT, min_w](float v) {
          const bool in = v > kNegInf && (min_w == 0.f || min_p_keeps(v, m, invT, min_w));
          return in ? double(pipe_weight(v, m, invT)) : 0.0;
        },
        c.lzp);
  } else {
    st = early_digit(c, h - 1, early_P(c, sh), sh);
    if (sp == 0 && threadIdx.x == 0) c.pst[h] = st;
  }
  early_hist(a, c, sp, h, st.prefix, m, invT, min_w, sh);
}

// The start list's regions of row o's workspace, the list steps' scratch, and their primitives on
// the block.
template <class T>
DK_PIPE_FN PipeList start_list(const PipeRowCtx<T>& c) {
  return PipeList{reinterpret_cast<float*>(c.ws + c.lay.v), reinterpret_cast<float*>(c.ws + c.lay.w),
                  reinterpret_cast<int32_t*>(c.ws + c.lay.i), 0};
}
template <class T>
DK_PIPE_FN ListScratch list_scratch(const PipeRowCtx<T>& c) {
  return ListScratch{reinterpret_cast<float*>(c.ws + c.lay.tv),
                     reinterpret_cast<double*>(c.ws + c.lay.ld),
                     reinterpret_cast<int32_t*>(c.ws + c.lay.ord),
                     nullptr,
                     nullptr,
                     reinterpret_cast<uint8_t*>(c.ws + c.lay.keep),
                     reinterpret_cast<uint8_t*>(c.ws + c.lay.acc)};
}
template <class T>
DK_PIPE_FN BlockListOps block_ops(const PipeRowCtx<T>& c, PipeShared& sh) {
  return BlockListOps{sh, reinterpret_cast<double*>(c.ws + c.lay.g16), reinterpret_cast<double*>(c.ws + c.lay.g256)};
}

// ---- prep: the values the launcher did not check, the touched list (rows with id lists) -----
template <class T>
DK_DEVICE_NOINLINE void phase_prep(const PipeArgs& a, int64_t o, PipeShared& sh) {
  PipeRowCtx<T> c = row_ctx<T>(a, o);
  const unsigned tid = threadIdx.x;
  if (tid == 0) {
    sh.inval = !pipe_params_ok(c.q);
    sh.bad = 0;
  }
  __syncthreads();
  int inval = 0;
  for (int64_t p = tid; p < c.N; p += kPipeThreads) {
    const int64_t t = list_id(a, o, p);
    inval |= !pipe_id_ok(t, c.V);
    if (p >= a.n_banned && p < a.n_banned + a.n_bias)
      inval |= !pipe_bias_ok(a.bias_vals[o * a.n_bias + (p - a.n_banned)]);
  }
  if (inval) sh.inval = 1;
  __syncthreads();
  const bool invalid = sh.inval != 0;
  const int64_t nt =
      invalid ? 0
              : touched_list(a, o, c.r, reinterpret_cast<int32_t*>(c.ws + c.lay.fid),
                             reinterpret_cast<float*>(c.ws + c.lay.fval), reinterpret_cast<int32_t*>(c.ws + c.lay.sid),
                             reinterpret_cast<float*>(c.ws + c.lay.sval), sh);
  if (tid == 0) *c.hdr = PipeHdr{invalid ? 1 : 0, sh.bad, nt};
  __syncthreads();
}

// ---- scan: pass A over slice sp, then top-n-sigma's first lane sums and the selects' pass 0 --------
template <class T>
DK_DEVICE_NOINLINE void phase_scan(const PipeArgs& a, int64_t o, int sp, PipeShared& sh) {
  PipeRowCtx<T> c = row_ctx<T>(a, o);
  if (row_hdr(c).inval) return;
  const PipeSlice s = pipe_slice(a, c.nch, sp);
  const unsigned tid = threadIdx.x;
  float mr = kNegInf, mx = kNegInf;
  int64_t arg = INT64_MAX, bad = 0;  // arg: the first index of the thread's processed max
  each_group(c.r, s.beg, s.end, [&](int64_t i, float v, float y) {
    bad |= v != v || v == kPosInf;
    mr = v > mr ? v : mr;
    if (y > mx) {
      mx = y;
      arg = i;
    }
  });
  mr = block_reduce(mr, MaxF{}, sh.f);
  const float m = block_reduce(mx, MaxF{}, sh.f);
  arg = block_reduce<int64_t>(mx == m ? arg : INT64_MAX, MinI{}, sh.i);
  bad = block_reduce<int64_t>(bad, SumI{}, sh.i);
  if (tid == 0) {
    c.parts[sp] = PipePart{mr, m, arg, bad != 0 ? 1 : 0, 0};
    c.counts[sp] = 0;
  }
  if (wants_sigma(a, c.pr, c.V)) {
    lane_sums(c.r, true, c.V, s.q0, s.q1, [](float v) { return v > kNegInf ? 1.0 : 0.0; }, c.lanes);
    lane_sums(c.r, true, c.V, s.q0, s.q1, [](float v) { return double(v > kNegInf ? v : 0.f); }, c.lsum);
  }
  select_passes(a, c, s, sp, 0, sh);
}

// ---- pass q (1..4): top-n-sigma's sum of squares (q = 1), the selects' radix pass q (q <= 3), early
// top-p's passes ---------------------------------------------------------------------------------
template <class T>
DK_DEVICE_NOINLINE void phase_pass(const PipeArgs& a, int64_t o, int sp, int q, PipeShared& sh) {
  PipeRowCtx<T> c = row_ctx<T>(a, o);
  if (row_hdr(c).inval) return;
  const PipeSlice s = pipe_slice(a, c.nch, sp);
  if (q == 1 && wants_sigma(a, c.pr, c.V)) {
    const double n = fold_lanes(c.lanes, c.nch, sh), mu = fold_lanes(c.lsum, c.nch, sh) / n;
    lane_sums(
        c.r, true, c.V, s.q0, s.q1,
        [mu](float v) {
          const double d = double(v) - mu;
          return v > kNegInf ? d * d : 0.0;
        },
        c.lsq);
  }
  if (q < 4) select_passes(a, c, s, sp, q, sh);
  const PipeEarly early = early_steps(a, c.pr, c.V);
  if (early.top_p) early_pass(a, c, s, sp, q, early_min_w(early, c.pr), sh);
}

// Slice sp's part of the start list: its y >= thr that pass min-p's test (minp > 0; m: the row's
// max) in index order at L's positions from the slice's first element on, the count in counts[sp].
template <class T>
DK_PIPE_FN void collect_slice(const PipeRowCtx<T>& c, const PipeSlice& s, int sp, float thr, float m, float minp,
                              PipeShared& sh) {
  const float invT = 1.f / c.pr.T;
  const PipeList L = start_list(c);
  const int64_t n = collect_row(
      c.r, s.beg, s.end,
      [thr, m, invT, minp](int64_t, float, float y) {
        return y >= thr && (minp == 0.f || min_p_keeps(y, m, invT, minp));
      },
      [&](int64_t pos, int64_t i, float, float y) {
        L.v[s.beg + pos] = y;
        L.i[s.beg + pos] = int32_t(i);
      },
      sh);
  if (threadIdx.x == 0) c.counts[sp] = n;
  __syncthreads();
}

// ---- collect: slice sp's part of the start list L = {y >= max(lo, k-th largest)} (pass C; early
// steps: also y >= min(top-p's cut, max) and min-p's test) --------------------------------------
// In index order at L's positions from the slice's first element on (the slice has room for all
// of its elements); its count in counts[sp].
template <class T>
DK_DEVICE_NOINLINE void phase_collect(const PipeArgs& a, int64_t o, int sp, PipeShared& sh) {
  PipeRowCtx<T> c = row_ctx<T>(a, o);
  const PipeVerdict vd = verdict(a, c);
  if (vd.inval || !vd.ok || !(vd.m > kNegInf)) return;
  const PipeSlice s = pipe_slice(a, c.nch, sp);
  if (wants_raw_mass(a, c.pr)) {  // the slice's (chunk, lane) sums of the raw / greedy normaliser
    const float mm = a.raw_logprobs ? vd.mraw : vd.m;
    lane_sums(c.r, !a.raw_logprobs, c.V, s.q0, s.q1, [mm](float v) { return double(pipe_weight(v, mm, 1.f)); }, c.lzl);
  }
  if (!wants_list(a, c.pr, c.V) || early_steps(a, c.pr, c.V).eps) return;  // (early epsilon / eta: collected)
  const float lo = sigma_lo(c, vd.m, sh);
  float thr = PipeOrder(a.order) == PipeOrder::Joint ? kLowestFloat : lo;
  if (wants_kth(a, c.pr, c.V)) {
    const float kth = key_to_float(sel_state(a, kth_sel(c), 4, sh).prefix);
    thr = kth > thr ? kth : thr;
  }
  const PipeEarly early = early_steps(a, c.pr, c.V);
  if (early.top_p) {  // top-p's survivors (its cut from the row passes)
    const float t = key_to_float(early_digit(c, 3, early_P(c, sh), sh).prefix);
    const float cut = t <= vd.m ? t : vd.m;  // (v >= t or v >= the max)
    thr = cut > thr ? cut : thr;
  }
  collect_slice(c, s, sp, thr, vd.m, early.min_p ? c.pr.minp : 0.f, sh);
}

// The walk total of the start list from the sums phase's block sums g256 (the list's length: the
// slices' counts added): the split draw's Z (split_draw), the split processed logprobs'
// normaliser (phase_logprobs) and early epsilon / eta's Z; with g256 = the entropy sums' hg256,
// early eta's -H (phase_early_eps). All threads; barriers.
template <class T>
DK_PIPE_FN double split_walk_total(const PipeArgs& a, const PipeRowCtx<T>& c, PipeShared& sh,
                                   const double* g256 = nullptr) {
  if (threadIdx.x == 0) {
    int64_t n = 0;
    for (int sp = 0; sp < a.splits; ++sp) n += c.counts[sp];
    sh.Z = contract::add_in_order(g256 ? g256 : block_ops(c, sh).g256, (contract::walk16_groups(n) + 15) / 16);
  }
  __syncthreads();
  const double z = sh.Z;
  __syncthreads();
  return z;
}

// ---- rank (sample mode, row_logprobs rows; per slice, after final): slice sp's share ----------
// Raw (log_softmax of the logits as given), greedy (temperature 0 without raw_logprobs:
// log_softmax of the processed row) and split processed (split_proc_logprobs) logprobs of the
// drawn token and the top-n list are row passes of their own: the count of values >= the token's
// (its rank), and, for top_logprobs n, the slice's values above the n-th largest value vn (the row
// passes' select) in index order, then its first n values equal to vn, at L's positions from the
// slice's first element on (L is free once the final phase has drawn); counts in rk[sp]. Rows the
// final phase made invalid return.
template <class T>
DK_DEVICE_NOINLINE void phase_rank(const PipeArgs& a, int64_t o, int sp, PipeShared& sh) {
  PipeRowCtx<T> c = row_ctx<T>(a, o);
  if (!row_logprobs(a, c.pr, c.V) || !a.out_valid[o]) return;
  row_hdr(c);
  const PipeSlice s = pipe_slice(a, c.nch, sp);
  const bool proc = !a.raw_logprobs;
  const int64_t tok = a.out_tokens[o];
  const float vt = proc ? c.r.at(tok) : c.r.raw(tok);
  int64_t cnt = 0;
  each_group(c.r, s.beg, s.end, [&](int64_t, float v, float y) { cnt += (proc ? y : v) >= vt; });
  cnt = block_reduce<int64_t>(cnt, SumI{}, sh.i);
  int64_t above = 0, ties = 0;
  if (a.top_n > 0) {
    const int64_t n = a.top_n;
    const float vn = key_to_float(sel_state(a, topn_sel(a, c), 4, sh).prefix);
    const PipeList L = start_list(c);
    above = collect_row(
        c.r, s.beg, s.end, [=](int64_t, float v, float y) { return (proc ? y : v) > vn; },
        [&](int64_t pos, int64_t i, float v, float y) {
          L.v[s.beg + pos] = proc ? y : v;
          L.i[s.beg + pos] = int32_t(i);
        },
        sh);
    ties = collect_row(
        c.r, s.beg, s.end, [=](int64_t, float v, float y) { return (proc ? y : v) == vn; },
        [&](int64_t pos, int64_t i, float v, float y) {
          if (pos < n) {
            L.v[s.beg + above + pos] = proc ? y : v;
            L.i[s.beg + above + pos] = int32_t(i);
          }
        },
        sh);
  }
  if (threadIdx.x == 0) {
    c.rk[3 * sp] = cnt;
    c.rk[3 * sp + 1] = above;
    c.rk[3 * sp + 2] = ties < a.top_n ? ties : a.top_n;
  }
  __syncthreads();
}

// ---- logprobs (sample mode, row_logprobs rows; one CTA per row, after rank) ----------------------
// The normaliser folds the collect phase's lane sums (split processed: the walk total, and a
// value's logprob is log(weight / it)); the rank is the slices' counts added; the
// top-n list: every slice's entries above vn in slice order (= index order), then the slices'
// entries equal to vn in slice order up to n, sorted by the block (value descending, position in L
// ascending, which is index ascending among equal values).
template <class T>
DK_DEVICE_NOINLINE void phase_logprobs(const PipeArgs& a, int64_t o, PipeShared& sh) {
  PipeRowCtx<T> c = row_ctx<T>(a, o);
  if (!row_logprobs(a, c.pr, c.V) || !a.out_valid[o]) return;
  const PipeVerdict vd = verdict(a, c);
  const bool proc = !a.raw_logprobs, walk = split_proc_logprobs(a, c.pr, c.V);
  const float mm = proc ? vd.m : vd.mraw, invT = walk ? 1.f / c.pr.T : 1.f;
  // the normaliser: the collect phase's lane sums, or (split processed) the split draw's walk total
  const double lz = ::log(walk ? split_walk_total(a, c, sh) : fold_lanes(c.lzl, c.nch, sh));
  // a value's logprob: log_softmax of the row, or (split processed) log(weight / walk total)
  const auto lp_of = [=](float v) {
    return walk ? logprob_of_weight(pipe_weight(v, mm, invT), lz) : logprob_of_value(v, mm, lz);
  };
  const unsigned tid = threadIdx.x;
  if (tid == 0) {
    const int64_t tok = a.out_tokens[o];
    int64_t cnt = 0;
    for (int sp = 0; sp < a.splits; ++sp) cnt += c.rk[3 * sp];
    if (a.out_logprob) a.out_logprob[o] = lp_of(proc ? c.r.at(tok) : c.r.raw(tok));
    if (a.out_rank) a.out_rank[o] = cnt;
  }
  if (a.top_n == 0) return;
  const int64_t n = a.top_n;
  const PipeList L = start_list(c);
  const ListScratch ls = list_scratch(c);
  const BlockListOps ops = block_ops(c, sh);
  int32_t* ord = ls.ord;
  int64_t off = 0;
  for (int sp = 0; sp < a.splits; ++sp) {  // the entries above vn (fewer than n in all)
    const int64_t beg = pipe_slice(a, c.nch, sp).beg, na = c.rk[3 * sp + 1];
    for (int64_t j = tid; j < na; j += kPipeThreads) ord[off + j] = int32_t(beg + j);
    off += na;
  }
  for (int sp = 0; sp < a.splits && off < n; ++sp) {  // then the ties, up to n
    const int64_t beg = pipe_slice(a, c.nch, sp).beg, na = c.rk[3 * sp + 1];
    const int64_t nt = c.rk[3 * sp + 2] < n - off ? c.rk[3 * sp + 2] : n - off;
    for (int64_t j = tid; j < nt; j += kPipeThreads) ord[off + j] = int32_t(beg + na + j);
    off += nt;
  }
  const float* tv = L.v;  // (block_sort's first barrier orders the writes of ord before its rounds)
  const int32_t* ti = L.i;
  ops.sort(ord, n, [tv](int32_t p) { return tv[p]; }, true);
  int64_t* tids = a.out_top_ids + o * n;
  float* tlp = a.out_top_lp + o * n;
  ops.each(n, [=](int64_t j) {
    const float v = tv[ord[j]];
    tids[j] = ti[ord[j]];
    tlp[j] = v > kNegInf ? lp_of(v) : kNegInf;
  });
}

// The h largest entries of L (1 <= h <= L.n; value descending, index ascending: L is in index
// order) as positions of L in ord[0..h): the first h of the candidates >= the h-th largest value
// (the entries above it sorted, then the ones holding it in L's order). The same h positions in
// the same order as a sort of the whole list, for a radix select (4 passes), 2 compactions and a
// sort of fewer than h entries instead of a sort of L (153 rounds for a whole-vocabulary list).
// ord has room for L.n entries. A real call (the final phase's register cap).
DK_DEVICE_NOINLINE void list_top(const PipeList& L, int64_t h, int32_t* ord, const BlockListOps& ops) {
  int64_t na = 0;
  ops.candidates(L.v, L.n, ops.mth_largest(L.v, L.n, h), ord, &na);
}

// ---- sums (the split plan, sample mode): the walk's sums of a list that needs no list step ------
// A row with nothing to truncate (temperature > 0, no truncation, no processed logprobs) draws from
// the whole start list, which over a whole vocabulary is the whole row: on one CTA the final phase
// would move it together, weigh it and sum it (about four passes over V entries on one SM at
// B = 1). Instead the slices compute the contract's walk sums in place: list position p lives in
// the slice s holding it (off[s] <= p < off[s + 1], off the slices' counts added in slice order),
// at L's position s * per + p - off[s] where collect wrote it, so g16[j] (positions 16j..16j+15)
// and g256[b] are the same sums in the same order as over the moved list, and CTA sp computes
// those of the 256-blocks [nb sp / splits, nb (sp + 1) / splits). The final phase then adds the
// g256 and walks (split_draw): the same token, bit for bit, as the one-CTA plan's walk.
template <class T>
DK_PIPE_FN bool split_draw_only(const PipeArgs& a, const PipeRowCtx<T>& c) {
  return a.splits > 1 && a.mode != 1 && c.pr.T != 0.f && !any_truncation(list_row(a, c.pr, c.V), c.V) &&
         !early_steps(a, c.pr, c.V).eps &&
         !((a.want_logprob || a.top_n > 0) && !a.raw_logprobs && !split_proc_logprobs(a, c.pr, c.V));
}

// The start list as the slices left it (off: sh.i[0..splits], off[splits] its length).
struct SliceList {
  const float* v;
  const int32_t* i;
  const int64_t* off;
  int splits;
  int64_t per;
  DK_PIPE_FN int64_t slot(int64_t p) const {  // the last slice s with off[s] <= p (holds p: p < off[splits])
    int lo = 0, hi = splits - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (off[mid] <= p)
        lo = mid;
      else
        hi = mid - 1;
    }
    return lo * per + (p - off[lo]);
  }
  // The walk's elements: the weights of the list's values (row max m, 1 / temperature invT).
  DK_PIPE_FN auto weights(float m, float invT) const {
    return [*this, m, invT](int64_t p) { return pipe_weight(v[slot(p)], m, invT); };
  }
};
// Fills sh.i[0..splits] with the slices' first list positions (ends with a barrier).
template <class T>
DK_PIPE_FN SliceList slice_list(const PipeArgs& a, const PipeRowCtx<T>& c, PipeShared& sh) {
  if (threadIdx.x == 0) {
    int64_t o = 0;
    for (int s = 0; s < a.splits; ++s) {
      sh.i[s] = o;
      o += c.counts[s];
    }
    sh.i[a.splits] = o;
  }
  __syncthreads();
  const PipeList L = start_list(c);
  return SliceList{L.v, L.i, sh.i, a.splits, a.per};
}

// CTA sp's share of the walk sums of the elements elem(p) over the list as the slices left it
// (sl; its length sl.off[splits]): the g16 / g256 of the 256-blocks [nb sp / splits,
// nb (sp + 1) / splits). Ends with a barrier.
template <class EF>
DK_PIPE_FN void slice_walk_share(const SliceList& sl, int sp, const EF& elem, double* g16, double* g256) {
  const int64_t n = sl.off[sl.splits], nb = (contract::walk16_groups(n) + 15) / 16;
  block_walk16_blocks<kPipeThreads>(elem, n, nb * sp / sl.splits, nb * (sp + 1) / sl.splits, g16, g256);
}

template <class T>
DK_DEVICE_NOINLINE void phase_sums(const PipeArgs& a, int64_t o, int sp, PipeShared& sh) {
  PipeRowCtx<T> c = row_ctx<T>(a, o);
  if (!split_draw_only(a, c)) return;
  const PipeVerdict vd = verdict(a, c);
  if (vd.inval || !vd.ok || !(vd.m > kNegInf)) return;
  const SliceList sl = slice_list(a, c, sh);
  const BlockListOps ops = block_ops(c, sh);
  slice_walk_share(sl, sp, sl.weights(vd.m, 1.f / c.pr.T), ops.g16, ops.g256);
}

// ---- early epsilon / eta (the split plan; per slice, in the scan and pass launches) ----------------
// Epsilon / eta as the first list step after early min-p, or the first of all (PipeEarly::eps),
// keeps the entries of L with w / Z >= cut or at the max (min_tokens_to_keep is 1), where Z is
// the walk total of L's weights in list order and eta's cut is min(eta, sqrt(eta) exp(-H)), H the
// walk total of the entropy terms (w / Z) logprob over L (decodekit/pipeline.h step_keep,
// list_entropy: the same terms, the same tree, so the same survivors as the CPU's step over the
// moved list). The row needs no threshold from the passes (no top-k, top-n-sigma or early top-p),
// so the launches that exist for those run its phases, q0 = 0 (the scan) or 1 (after early min-p,
// whose test needs the row's max): pass q0 collects the slice's part of L (as the collect phase
// would; that phase then skips the row), q0 + 1 makes the walk sums of L's weights where the
// slices left it (as phase_sums), q0 + 2 eta's terms' walk sums (hg16 / hg256) or epsilon's cut,
// q0 + 3 eta's cut. A cut compacts the slice's part of L in place (index order kept) and leaves
// its length in kept[sp] (counts keep the collect's lengths: the other CTAs of the launch read
// them for L's positions); the final phase moves the survivors together.
template <class T>
DK_DEVICE_NOINLINE void phase_early_eps(const PipeArgs& a, int64_t o, int sp, int q, PipeShared& sh) {
  PipeRowCtx<T> c = row_ctx<T>(a, o);
  const PipeEarly e = early_steps(a, c.pr, c.V);
  const int q0 = e.min_p ? 1 : 0;
  if (!e.eps || q < q0 || q > q0 + (e.eta ? 3 : 2) || row_hdr(c).inval) return;
  const PipeSlice s = pipe_slice(a, c.nch, sp);
  if (q == 0) {  // the start list {y > -inf} (the verdict comes later: the final phase decides)
    collect_slice(c, s, sp, kLowestFloat, 0.f, 0.f, sh);
    return;
  }
  const PipeVerdict vd = verdict(a, c);
  if (vd.inval || !vd.ok || !(vd.m > kNegInf)) return;
  const float m = vd.m, invT = 1.f / c.pr.T;
  if (q == q0) {  // after early min-p: its survivors
    collect_slice(c, s, sp, kLowestFloat, m, c.pr.minp, sh);
    return;
  }
  const BlockListOps ops = block_ops(c, sh);
  double* hg256 = reinterpret_cast<double*>(c.ws + c.lay.hg256);
  if (q == q0 + 1) {  // the walk sums of the weights (Z's)
    const SliceList sl = slice_list(a, c, sh);
    slice_walk_share(sl, sp, sl.weights(m, invT), ops.g16, ops.g256);
    return;
  }
  const double Z = split_walk_total(a, c, sh);
  if (e.eta && q == q0 + 2) {  // the entropy terms' walk sums
    const SliceList sl = slice_list(a, c, sh);
    const double lz = ::log(Z);
    const auto term = [sl, m, invT, Z, lz](int64_t p) {
      const float v = sl.v[sl.slot(p)], w = pipe_weight(v, m, invT);
      return w > 0.f ? (double(w) / Z) * list_logprob(v, m, invT, lz) : 0.0;
    };
    slice_walk_share(sl, sp, term, reinterpret_cast<double*>(c.ws + c.lay.hg16), hg256);
    return;
  }
  double cut = c.pr.eps;
  if (e.eta) {
    const double H = -split_walk_total(a, c, sh, hg256), c2 = ::sqrt(c.pr.eta) * ::exp(-H);
    cut = c.pr.eta < c2 ? c.pr.eta : c2;
  }
  // the cut: the slice's entries, a round of reads, then (after the scan's barriers) a round of
  // writes (each at or below its read, below the next round's reads)
  const PipeList L = start_list(c);
  const int64_t cnt = c.counts[sp], from = int64_t(sp) * a.per;
  int64_t kept = 0;
  for (int64_t b0 = 0; b0 < cnt; b0 += kPipeThreads) {
    const int64_t j = b0 + threadIdx.x;
    float v = 0.f;
    int32_t id = 0;
    bool keep = false;
    if (j < cnt) {
      v = L.v[from + j], id = L.i[from + j];
      keep = double(pipe_weight(v, m, invT)) / Z >= cut || v >= m;
    }
    int total = 0;
    const int before = block_exclusive_scan<kPipeThreads>(keep ? 1 : 0, sh.wcount, total);
    if (keep) L.v[from + kept + before] = v, L.i[from + kept + before] = id;
    kept += total;
  }
  if (threadIdx.x == 0) c.kept[sp] = kept;
  __syncthreads();
}

// The final phase's draw for such a row: Z = the g256 added in order, the walk at u * Z over the
// sums and the slices' entries (thread 0). Returns false when no weight is positive (cannot
// happen: the max has weight 1).
template <class T>
DK_DEVICE_NOINLINE bool split_draw(const PipeArgs& a, const PipeRowCtx<T>& c, float m, float invT, int64_t o,
                                   PipeShared& sh) {
  const double Z = split_walk_total(a, c, sh);
  const SliceList sl = slice_list(a, c, sh);
  if (threadIdx.x == 0) {
    const int64_t n = sh.i[a.splits];
    const BlockListOps ops = block_ops(c, sh);
    const double* g16 = ops.g16;
    const double u = row_uniform(row_rng_key(a, o), 0u);
    const int64_t last =
        contract::walk16_pick_at(sl.weights(m, invT), n, [g16](int64_t j) { return g16[j]; }, ops.g256, u * Z);
    sh.fail = last < 0;
    if (last >= 0) {
      a.out_tokens[o] = sl.i[sl.slot(last)];
      a.out_valid[o] = true;
    }
  }
  __syncthreads();
  return !sh.fail;
}

// ---- final: the verdict, the list steps, the draw, the outputs -----------------------------------
// The final phase's list steps and draw: the truncations on the block, then in mask mode (wr) the
// survivors' count to *wr for the write phase; in sample mode the contract's walk over the
// survivors (Z = its total, the pick at u * Z), the token and its valid flag to the outputs and Z,
// the token's weight and value and the survivors' count to sh (written before the closing
// barrier; final_logprobs reads them). Returns false when the walk found no positive weight
// (cannot happen: the max has weight 1). A real call that ends the final phase's work, so few
// values live across it: inlined, the final phase spilled.
DK_DEVICE_NOINLINE bool truncate_and_draw(PipeList& L, const PipeRow& pr, float m, float invT, float lo,
                                          const ListScratch& ls, const BlockListOps& ops, const PipeArgs& a, int64_t o,
                                          PipeWrite* wr, PipeShared& sh) {
  run_truncations(L, pr, PipeOrder(a.order), a.V, m, invT, lo, ls, ops);
  if (wr) {
    if (threadIdx.x == 0) *wr = PipeWrite{kWriteSurvivors, 0, L.n};
    return true;
  }
  const double Z = ops.mass(L.w, L.n);  // leaves the walk's sums in ops.g16 / g256
  if (threadIdx.x == 0) {
    const double u = row_uniform(row_rng_key(a, o), 0u);
    const int64_t last = contract::walk16_pick(L.w, L.n, ops.g16, ops.g256, u * Z);
    sh.fail = last < 0;
    if (last >= 0) {
      a.out_tokens[o] = L.i[last];
      a.out_valid[o] = true;
      sh.Z = Z;
      sh.tw = L.w[last];
      sh.tv = L.v[last];
      sh.fin_n = L.n;
    }
  }
  __syncthreads();
  return !sh.fail;
}

// The final phase is two real calls with nothing but (a, o, sh) live across them: final_draw (the
// verdict, the list steps, the draw; returns whether the processed logprobs are wanted, with the
// max and the survivors' count left in sh) and final_logprobs (those logprobs and the top-n list).
// As one function the values the logprobs need, live across the list steps' call, spilled.
template <class T>
DK_DEVICE_NOINLINE bool final_draw(const PipeArgs& a, int64_t o, PipeShared& sh) {
  PipeRowCtx<T> c = row_ctx<T>(a, o);
  const PipeVerdict vd = verdict(a, c);
  const int64_t V = a.V;
  T* out = c.out;
  const auto to_write = [&](PipeWriteKind kind, int64_t n) {  // mask mode: the write phase's job
    if (threadIdx.x == 0) *c.wr = PipeWrite{kind, 0, n};
  };
  auto fail_row = [&](bool raw_through) {  // every thread calls it
    if (out) {
      to_write(raw_through ? kWriteRaw : kWriteProcessed, 0);
      return;
    }
    if (threadIdx.x == 0) {
      a.out_tokens[o] = 0;
      a.out_valid[o] = false;
      if (a.out_logprob) a.out_logprob[o] = 0.f;
      if (a.out_rank) a.out_rank[o] = 0;
    }
    for (int64_t j = threadIdx.x; j < a.top_n; j += kPipeThreads) {
      a.out_top_ids[o * a.top_n + j] = 0;
      a.out_top_lp[o * a.top_n + j] = kNegInf;
    }
  };
  if (vd.inval) {
    if (threadIdx.x == 0 && a.error_flag) atomicOr(a.error_flag, a.error_bit);
    fail_row(true);
    return false;
  }
  if (!vd.ok || !(vd.m > kNegInf)) {
    fail_row(!vd.ok);
    return false;
  }
  const float m = vd.m;
  const PipeRow& pr = c.pr;
  const bool greedy = pr.T == 0.f;  // temperature 0: greedy, no truncation
  const float invT = 1.f / (greedy ? 1.f : pr.T);
  if (out && (greedy || !any_truncation(pr, V))) {  // mask mode, nothing to truncate: the processed row
    to_write(kWriteProcessed, 0);
    return false;
  }
  if (greedy) {  // the first token holding the max; the rank and logprobs phases write the logprobs
    if (threadIdx.x == 0) {
      a.out_tokens[o] = vd.arg;
      a.out_valid[o] = true;
    }
    return false;
  }
  if (split_draw_only(a, c)) {  // the split plan, nothing to truncate: the slices' walk sums (phase_sums)
    if (!split_draw(a, c, m, invT, o, sh)) fail_row(false);
    return false;
  }
  PipeList L = start_list(c);
  const float lo = sigma_lo(c, m, sh);
  // the start list: slice 0's entries are in place; each later slice's move down to follow them,
  // in slice order, a round of reads then (after a barrier) a round of writes at a time (a
  // round's writes lie below the next round's reads: the list is never longer than the slices)
  const int64_t* counts = early_steps(a, pr, V).eps ? c.kept : c.counts;  // (early epsilon / eta: cut)
  int64_t n0 = counts[0];
  for (int sp = 1; sp < a.splits; ++sp) {
    const int64_t cnt = counts[sp], from = sp * a.per;
    for (int64_t b0 = 0; b0 < cnt; b0 += kPipeThreads) {
      const int64_t j = b0 + threadIdx.x;
      float v = 0.f;
      int32_t id = 0;
      if (j < cnt) v = L.v[from + j], id = L.i[from + j];
      __syncthreads();
      if (j < cnt) L.v[n0 + j] = v, L.i[n0 + j] = id;
    }
    n0 += cnt;
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < n0; j += kPipeThreads) L.w[j] = pipe_weight(L.v[j], m, invT);
  __syncthreads();
  L.n = n0;
  if (threadIdx.x == 0) sh.fin_m = m;  // (read after truncate_and_draw's closing barrier)
  // ---- the list steps and the draw (the CPU's sequence, each step on the whole block) ----------
  if (!truncate_and_draw(L, list_row(a, pr, V), m, invT, lo, list_scratch(c), block_ops(c, sh), a, o,
                         out ? c.wr : nullptr, sh)) {
    fail_row(false);
    return false;
  }
  // sample mode: the processed logprobs (logprobs wanted, not raw: the rank and logprobs phases
  // write the raw ones)
  return !out && (a.want_logprob || a.top_n > 0) && !a.raw_logprobs;
}

// The processed logprobs: the renormalised survivors (Z, the token's weight and value, the max and
// the list's length: sh, written before truncate_and_draw's closing barrier).
template <class T>
DK_DEVICE_NOINLINE void final_logprobs(const PipeArgs& a, int64_t o, PipeShared& sh) {
  PipeRowCtx<T> c = row_ctx<T>(a, o);
  const unsigned tid = threadIdx.x;
  const float m = sh.fin_m, invT = 1.f / c.pr.T;
  PipeList L = start_list(c);
  L.n = sh.fin_n;
  const double lz = ::log(sh.Z);
  const float tv = sh.tv;
  int64_t cnt = 0;
  for (int64_t j = tid; j < L.n; j += kPipeThreads) cnt += L.v[j] >= tv;
  cnt = block_reduce<int64_t>(cnt, SumI{}, sh.i);
  if (tid == 0) {
    if (a.out_logprob) a.out_logprob[o] = logprob_of_weight(sh.tw, lz);
    if (a.out_rank) a.out_rank[o] = cnt;
  }
  if (a.top_n == 0) return;
  int64_t* tids = a.out_top_ids + o * a.top_n;
  float* tlp = a.out_top_lp + o * a.top_n;
  int32_t* ord = list_scratch(c).ord;
  const float* lv = L.v;
  const int32_t* li = L.i;
  const int64_t h = a.top_n < L.n ? a.top_n : L.n;
  const BlockListOps ops = block_ops(c, sh);
  list_top(L, h, ord, ops);
  ops.each(h, [=](int64_t j) {
    tids[j] = li[ord[j]];
    tlp[j] = logprob_of_weight(pipe_weight(lv[ord[j]], m, invT), lz);
  });
  if (tid == 0) top_n_pad(li, L.n, h, a.top_n, tids, tlp);
}

template <class T>
DK_PIPE_FN void phase_final(const PipeArgs& a, int64_t o, PipeShared& sh) {
  if (final_draw<T>(a, o, sh)) final_logprobs<T>(a, o, sh);
}

// ---- write (mask mode): slice sp of the output row, as the final phase decided --------------
// Survivors: each thread walks L's indices (in index order) with a cursor as its elements advance,
// so every element is written once: its processed value if it survived, else -inf.
template <class T>
DK_DEVICE_NOINLINE void phase_write(const PipeArgs& a, int64_t o, int sp) {
  PipeRowCtx<T> c = row_ctx<T>(a, o);
  row_hdr(c);  // the touched list's length (0 for invalid values: the raw row is written then)
  const PipeSlice s = pipe_slice(a, c.nch, sp);
  const PipeWrite w = *c.wr;
  const RowIn<T>& r = c.r;
  T* out = c.out;
  const int64_t first = s.beg + threadIdx.x;
  if (w.kind == kWriteSurvivors) {
    const PipeList L = start_list(c);
    for (int64_t i = first, j = lower_bound_i32(L.i, w.n, first); i < s.end; i += kPipeThreads) {
      while (j < w.n && L.i[j] < i) ++j;
      store(out + i, (j < w.n && L.i[j] == i) ? L.v[j] : kNegInf);
    }
    return;
  }
  int64_t cc = r.lower(first);
  for (int64_t i = first; i < s.end; i += kPipeThreads) store(out + i, w.kind == kWriteRaw ? r.raw(i) : r.at(i, cc));
}

// The whole step of row o on one CTA: the phases in turn (the split plan's launches, in one block).
template <class T>
DK_PIPE_FN void pipeline_row(const PipeArgs& a, int64_t o, PipeShared& sh) {
  if (pipe_list_entries(a) > 0) {
    phase_prep<T>(a, o, sh);
    __syncthreads();
  }
  phase_scan<T>(a, o, 0, sh);
  __syncthreads();
  for (int q = 1; q < 5; ++q) {
    phase_pass<T>(a, o, 0, q, sh);
    __syncthreads();
  }
  phase_collect<T>(a, o, 0, sh);
  __syncthreads();
  phase_final<T>(a, o, sh);
  if (a.mode == 1) {
    __syncthreads();
    phase_write<T>(a, o, 0);
  } else if (a.want_logprob || a.top_n > 0) {
    __syncthreads();
    phase_rank<T>(a, o, 0, sh);
    __syncthreads();
    phase_logprobs<T>(a, o, sh);
  }
}

template <class T>
__global__ void __launch_bounds__(kPipeThreads, 1) pipeline_kernel(PipeArgs a) {
  __shared__ PipeShared sh;
  pipeline_row<T>(a, int64_t(blockIdx.x), sh);
}

// The split plan's launches: prep and final one CTA per row, the others [rows, splits] CTAs
// (row-major): cta_row / cta_slice.
DK_PIPE_FN int64_t cta_row(const PipeArgs& a) { return int64_t(blockIdx.x / unsigned(a.splits)); }
DK_PIPE_FN int cta_slice(const PipeArgs& a) { return int(blockIdx.x % unsigned(a.splits)); }
template <class T>
__global__ void __launch_bounds__(kPipeThreads, 1) pipe_prep_kernel(PipeArgs a) {
  __shared__ PipeShared sh;
  phase_prep<T>(a, int64_t(blockIdx.x), sh);
}
template <class T>
__global__ void __launch_bounds__(kPipeThreads, 1) pipe_scan_kernel(PipeArgs a) {
  __shared__ PipeShared sh;
  phase_scan<T>(a, cta_row(a), cta_slice(a), sh);
  __syncthreads();
  phase_early_eps<T>(a, cta_row(a), cta_slice(a), 0, sh);
}
template <class T>
__global__ void __launch_bounds__(kPipeThreads, 1) pipe_pass_kernel(PipeArgs a) {
  __shared__ PipeShared sh;
  phase_pass<T>(a, cta_row(a), cta_slice(a), a.pass, sh);
  __syncthreads();
  phase_early_eps<T>(a, cta_row(a), cta_slice(a), a.pass, sh);
}
template <class T>
__global__ void __launch_bounds__(kPipeThreads, 1) pipe_collect_kernel(PipeArgs a) {
  __shared__ PipeShared sh;
  phase_collect<T>(a, cta_row(a), cta_slice(a), sh);
}
template <class T>
__global__ void __launch_bounds__(kPipeThreads, 1) pipe_sums_kernel(PipeArgs a) {
  __shared__ PipeShared sh;
  phase_sums<T>(a, cta_row(a), cta_slice(a), sh);
}
template <class T>
__global__ void __launch_bounds__(kPipeThreads, 1) pipe_final_kernel(PipeArgs a) {
  __shared__ PipeShared sh;
  phase_final<T>(a, int64_t(blockIdx.x), sh);
}
template <class T>
__global__ void __launch_bounds__(kPipeThreads, 1) pipe_write_kernel(PipeArgs a) {
  phase_write<T>(a, cta_row(a), cta_slice(a));
}
template <class T>
__global__ void __launch_bounds__(kPipeThreads, 1) pipe_rank_kernel(PipeArgs a) {
  __shared__ PipeShared sh;
  phase_rank<T>(a, cta_row(a), cta_slice(a), sh);
}
template <class T>
__global__ void __launch_bounds__(kPipeThreads, 1) pipe_logprobs_kernel(PipeArgs a) {
  __shared__ PipeShared sh;
  phase_logprobs<T>(a, int64_t(blockIdx.x), sh);
}

// The launches of a plan (the CUDA launcher's and the emulator's): launch(kernel, grid, args).
template <class T, class Launch>
inline void run_pipe_plan(PipeArgs a, const Launch& launch) {
  const unsigned rows = unsigned(a.n_out);
  if (a.splits <= 1) {
    launch(pipeline_kernel<T>, rows, a);
    return;
  }
  const unsigned parts = unsigned(a.n_out * a.splits);
  if (pipe_list_entries(a) > 0) launch(pipe_prep_kernel<T>, rows, a);
  launch(pipe_scan_kernel<T>, parts, a);
  for (a.pass = 1; a.pass < 5; ++a.pass) launch(pipe_pass_kernel<T>, parts, a);  // (4: early top-p only)
  launch(pipe_collect_kernel<T>, parts, a);
  if (a.mode != 1) launch(pipe_sums_kernel<T>, parts, a);  // (rows with list steps return at once)
  launch(pipe_final_kernel<T>, rows, a);
  if (a.mode == 1) {
    launch(pipe_write_kernel<T>, parts, a);
  } else if (a.want_logprob || a.top_n > 0) {  // (rows without raw / greedy logprobs return at once)
    launch(pipe_rank_kernel<T>, parts, a);
    launch(pipe_logprobs_kernel<T>, rows, a);
  }
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

// The launch plan (host arithmetic on sizes, no device read: fixed under graph capture): with
// fewer rows than SMs, each row's passes run on about n_sms / n_out CTAs, in slices of at least
// min_slice elements (kChunk on a GPU; the emulator's tests pass smaller ones to split small rows),
// per rounded up to a multiple of 16. n_sms <= 0: one CTA per row.
inline PipeArgs pipe_plan(PipeArgs a, int n_sms, int64_t min_slice = contract::kChunk) {
  a.splits = 1;
  a.per = 0;
  if (n_sms <= 0 || a.n_out <= 0 || a.n_out >= n_sms || min_slice < 1) return a;
  const int64_t most = a.V / min_slice, want = (n_sms + a.n_out - 1) / a.n_out;
  int64_t n = want < most ? want : most;
  if (n > int64_t(kPipeThreads) - 1) n = int64_t(kPipeThreads) - 1;  // (split_draw's offsets: sh.i)
  if (n < 2) return a;
  const int64_t per = ((a.V + n - 1) / n + 15) / 16 * 16;
  if ((a.V + per - 1) / per < 2) return a;
  a.per = per;
  a.splits = int((a.V + per - 1) / per);
  return a;
}

#if !defined(DK_CUDA_EMULATE)
// A plan's launches on `stream`; a.workspace holds pipe_workspace_bytes(n_out, V, entries, splits).
inline cudaError_t launch_pipeline(const PipeArgs& a, cudaStream_t stream) {
  if (a.n_out == 0) return cudaSuccess;
  const auto launch = [stream](auto kernel, unsigned grid, const PipeArgs& args) {
    kernel<<<dim3(grid), dim3(kPipeThreads), 0, stream>>>(args);
  };
  switch (a.dtype) {
    case PipeDType::F32: pdetail::run_pipe_plan<float>(a, launch); break;
    case PipeDType::BF16: pdetail::run_pipe_plan<bf16_t>(a, launch); break;
    case PipeDType::F16: pdetail::run_pipe_plan<f16_t>(a, launch); break;
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
  (void)launch_pipeline(pipe_plan(p, 1), nullptr);
  (void)launch_bitmask_inplace(b, nullptr);
}
#endif

}  // namespace dk::cuda
