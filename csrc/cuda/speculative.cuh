// Speculative verification on CUDA (chain, tree, build_tree). Torch-free: compiles with plain
// `nvcc -std=c++20 -arch=sm_80` / `-arch=sm_90`; csrc/cuda/speculative.cu is the thin launcher.
//
// One thread block per batch row. Every thread of the block runs the same walk (the accept tests
// read single elements and Philox counters, so all threads reach the same decisions without
// communication); the wide steps (row max / argmax, the filters, normaliser, residual
// materialisation, residual draw) are block-wide. To give the CPU's tokens for the same seed, every
// floating-point sum runs in the CPU's order (csrc/cpu/isa/speculative.cpp), the canonical order of
// decodekit/contract.h: a row mass is, per 4096-element chunk, 16 lane sums (lane j = elements j,
// j+16, ... in order, in double) added lane by lane, the chunk masses added in chunk order; sums
// and draws over a survivor LIST follow the contract's 16-ary walk (group and block sums on one
// thread each, contract::walk16_*). Element values use explicitly
// rounded intrinsics (no contraction), dk_exp from fmath.h.
//
// Targets: probabilities (chain and tree, with or without draft probs), greedy verification
// (logits with temperature 0, or predicted ids), and logits with temperature, top-k, top-p and
// min-p (sequential or joint order, per-row parameters). The filtered target at a node is the
// sampling kernels' select_row (csrc/cuda/sampling.cuh, the CUDA twin of the CPU row engine's
// select_row) followed by the CPU's method choice: the survivors S are LISTED (index order, at most
// kListMax) when the CPU lists them, and then every mass / draw at that node runs over the list
// (the 16-ary walk's sums) as on the CPU; otherwise over the whole row in the canonical chunk order.
//
// Early exit: the chain kernel verifies nothing after the first rejection; later positions only
// feed the accepted count (each draft considered on its own, FlashInfer's metric), which reads
// p(x) there: a probability target costs two element reads, a logits target resolves the filters
// and skips the normaliser whenever the test is decided without it (Z >= 1, see accept_alone). The
// tree kernel descends only into an accepted child and stops at the first node that accepts none.
#pragma once
#if !defined(DK_CUDA_EMULATE)  // tests/cuda_emu runs these kernels on CPU threads
#include <cuda_runtime.h>
#endif
#include <cstdint>
#include "decodekit/common.h"
#include "decodekit/contract.h"
#include "decodekit/fmath.h"
#include "decodekit/speculative.h"
#include "sampling.cuh"  // select_row: the sampling kernels' filters (top-k / top-p / min-p)

namespace dk::cuda::spec {

namespace sd = dk::cuda::detail;  // select_row, RowParams, Weight, Smem (sampling.cuh)

// Work counters for the emulator's early-exit test (tests/cuda_emu defines DK_SPEC_COUNT_WORK;
// nothing in a real build): target rows resolved, and normaliser passes (Z) made. Every block of a
// launch adds to them, so the adds are (host) relaxed atomics: the emulator's ThreadSanitizer build
// reports plain ones as races between blocks.
#if defined(DK_SPEC_COUNT_WORK) && defined(DK_CUDA_EMULATE)
inline int64_t g_rows_resolved = 0, g_z_passes = 0;
// The emulator's check of the prepared nodes (walk_node): when set, the walk also resolves each
// prepared node itself and counts the nodes whose summary or survivor list differs.
inline bool g_check_prepared = false;
inline int64_t g_prepared_mismatch = 0;
#define DK_SPEC_COUNT(c) (threadIdx.x == 0 ? void(__atomic_fetch_add(&(c), 1, __ATOMIC_RELAXED)) : void())
#else
#define DK_SPEC_COUNT(c) ((void)0)
#endif
// The block size is the sampling kernels' (select_row runs block-wide at that size); the emulator
// tests set it through DK_CUDA_THREADS.
constexpr int kThreads = dk::cuda::kThreads;
static_assert(kThreads >= 32 && (kThreads & (kThreads - 1)) == 0, "block size: a power of two >= 32");
constexpr int kWarps = kThreads / 32;
using contract::kChunk;  // the CPU/CUDA contract (decodekit/contract.h)
using contract::kListMax;
static_assert(kListMax <= kChunk, "a survivor list's draw weights fit in Shared::stage");
using Kind = dk::SpecTargetKind;
using dk::DType;

struct Target {
  Kind kind = Kind::Probs;
  const void* data = nullptr;  // probs float / logits dtype [B, R, V]; ids int64 [B, R]
  DType dtype = DType::F32;
  int64_t V = 0, stride_b = 0, stride_r = 0;
  dk::RowFilter filter;  // logits: temperature (0 = greedy), top-k, top-p, min-p, order per batch row
};
struct Draft {
  const float* data = nullptr;
  int64_t stride_b = 0, stride_r = 0;
};
struct Rng {
  const int64_t* seeds = nullptr;
  uint64_t seed = 0, offset = 0;
  const int64_t *seed_ptr = nullptr, *offsets = nullptr;  // device seed / offsets (decodekit/rng.h row_rng_key)
  int64_t offset_stride = 0;
};
// A node's filtered target (the state of Node<T> besides the row it reads): what prepare_kernel
// stores for the walk. Its survivor list, when listed, sits in RowWs::list_idx / list_w (prepared:
// Prepared::list_idx / list_w).
struct NodeSum {
  bool valid = false, greedy = false, probs = false, list = false;
  sd::Weight wt{false, 0.f, 1.f};
  float t = kNegInf, minw = 0.f;
  double Z = 1.0;
  float invZf = 1.f;
  int64_t argmax = 0;
  int64_t nS = 0;  // list: |S| (the tokens, ascending, and their weights)
};
// Field by field (the emulator's check of a prepared node against the walk's own).
DK_DEVICE bool same_node(const NodeSum& a, const NodeSum& b) {
  return a.valid == b.valid && a.greedy == b.greedy && a.probs == b.probs && a.list == b.list &&
         a.wt.probs == b.wt.probs && a.wt.m == b.wt.m && a.wt.invT == b.wt.invT && a.t == b.t && a.minw == b.minw &&
         a.Z == b.Z && a.invZf == b.invZf && a.argmax == b.argmax && a.nS == b.nS;
}
// The prepared nodes of a launch (sums == nullptr: none; the walk resolves its nodes itself):
// R nodes per batch row (chain: positions 0..N, tree: nodes 0..T-1), node (b, r) at b * R + r.
struct Prepared {
  NodeSum* sums = nullptr;
  int32_t* list_idx = nullptr;  // list_per_node entries per node
  float* list_w = nullptr;
  int64_t R = 0, list_per_node = 0;
  const int64_t* num_draft = nullptr;  // chain: [B] drafts per row (nodes past them are skipped), or null
  // split.splits > 1: the nodes are the rows of the sampling kernels' split plan (node_plan), each
  // resolved by several blocks; else one block per node (prepare_kernel).
  sd::SplitArgs split;
};

// Per-row global scratch (the launcher allocates B rows of each).
struct Workspace {
  double* lanes = nullptr;      // lanes_per_row doubles: chunk lane sums, then chunk masses
  float* resid = nullptr;       // resid_per_row floats: a materialised residual row (tree + draft probs)
  int64_t* removed = nullptr;   // removed_per_row: rejected children, sorted
  uint8_t* seen = nullptr;      // T bytes (tree check)
  int64_t* stack = nullptr;     // T (tree check)
  int32_t* list_idx = nullptr;  // list_per_row: a listed survivor set S (logits with filters), tokens
  float* list_w = nullptr;      // list_per_row: their weights
  int64_t lanes_per_row = 0, resid_per_row = 0, removed_per_row = 0, tree_per_row = 0, list_per_row = 0;
  Prepared pre;  // nodes resolved ahead (small batches; prepare_plan)
};

// The per-row scratch strides below end in DK_WS_REDZONE bytes that nothing uses (decodekit/
// common.h: 0 on a GPU; the emulator fences them, so a row running into the next fails a test).
template <class E>
constexpr int64_t row_gap() {
  return DK_WS_REDZONE / int64_t(sizeof(E));
}
inline int64_t lanes_per_row(int64_t V) {
  return ((V + kChunk - 1) / kChunk) * 16 + ((V + kChunk - 1) / kChunk) + row_gap<double>();
}
// Survivor-list entries per row (logits targets; S lies in [0, V), so never more than V): int32
// ids and float weights.
inline int64_t list_per_row(int64_t V) { return (V < kListMax ? (V > 0 ? V : 1) : kListMax) + row_gap<float>(); }
// A materialised residual row: V floats, padded to 16.
inline int64_t resid_per_row(int64_t V) { return (V + 15) / 16 * 16 + row_gap<float>(); }

struct ChainArgs {
  Target target;
  Draft draft;
  const int64_t* draft_ids = nullptr;  // [B, N]
  const int64_t* num_draft = nullptr;  // [B] or null
  int64_t B = 0, N = 0;
  Rng rng;
  int64_t* out_ids = nullptr;
  int32_t* out_accepted = nullptr;
  int32_t* out_emitted = nullptr;
  Workspace ws;
};

struct TreeArgs {
  Target target;
  Draft draft;
  const int64_t *cand = nullptr, *retrive_index = nullptr, *next_token = nullptr, *next_sibling = nullptr;
  int64_t B = 0, T = 0, W = 0;
  Rng rng;
  const double* coins = nullptr;        // [B, T] caller coins (SpecCoin) or null (Philox)
  const double* coins_final = nullptr;  // [B]
  double thr_single = 1.0, thr_acc = 1.0;
  int64_t* predicts = nullptr;
  int32_t* accept_index = nullptr;
  int32_t* accept_num = nullptr;
  int32_t* err = nullptr;
  int64_t* err_node = nullptr;
  Workspace ws;
  const bool* skip = nullptr;  // [B] rows to leave untouched (the bindings' deferred checks), or null
};

struct BuildArgs {
  const int64_t* parents = nullptr;
  const int64_t* prefix_lens = nullptr;
  int64_t B = 0, T = 0;
  uint8_t* mask = nullptr;
  int64_t *positions = nullptr, *retrive_index = nullptr, *next_token = nullptr, *next_sibling = nullptr;
  int32_t* err = nullptr;
  int64_t* err_node = nullptr;
};

// ---- block-level machinery -------------------------------------------------------------------
struct Shared {
  float stage[kChunk];
  double g16[contract::kWalkMax / 16];  // sd::walk16_sums (the list draws and list masses)
  double g256[contract::kWalkMax / 256];
  double dbc;
  double dred[kThreads];
  float fred[kThreads];
  int64_t ired[kThreads];
  int32_t wcount[kWarps];
  double bd;
  int64_t bi;
  int flag;
};
// The kernels' shared memory: select_row's (sampling.cuh) and this file's, used at different times
// (prepare_node puts a barrier on both sides of select_row), so they share the bytes.
union SharedAll {
  sd::Smem smem;
  Shared own;
};

// Explicitly rounded arithmetic (no contraction on the device; the emulator builds with
// -ffp-contract=off and uses the plain host operations).
#if defined(__CUDA_ARCH__)
DK_DEVICE double dadd(double a, double b) { return __dadd_rn(a, b); }
DK_DEVICE double dmul(double a, double b) { return __dmul_rn(a, b); }
DK_DEVICE double dsub(double a, double b) { return __dsub_rn(a, b); }
DK_DEVICE float fmul(float a, float b) { return __fmul_rn(a, b); }
DK_DEVICE float fsub(float a, float b) { return __fsub_rn(a, b); }
#else
DK_DEVICE double dadd(double a, double b) { return a + b; }
DK_DEVICE double dmul(double a, double b) { return a * b; }
DK_DEVICE double dsub(double a, double b) { return a - b; }
DK_DEVICE float fmul(float a, float b) { return a * b; }
DK_DEVICE float fsub(float a, float b) { return a - b; }
#endif

// Per-row view of the scratch.
struct RowWs {
  double* lanes;
  float* resid;
  int64_t* removed;
  int64_t nremoved;
  int32_t* list_idx;
  float* list_w;
};

DK_DEVICE float relu_x86(float v) { return v > 0.f ? v : 0.f; }  // CPU vmax(v, 0)

DK_DEVICE bool in_sorted(const int64_t* r, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (r[mid] < x)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < n && r[lo] == x;
}

// Position of token x in the index-ordered survivor list idx[0..n), or -1 (the CPU's list_pos).
DK_DEVICE int64_t list_pos(const int32_t* idx, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (int64_t(idx[mid]) < x)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < n && int64_t(idx[lo]) == x ? lo : -1;
}

// The walk's sums over a list e[0..n) (n <= kListMax; sd::walk16_sums: group and block sums on one
// thread each): leaves g16 / g256 in sh and returns the total, the contract's list mass
// (walk16_total), to every thread. A real call on the device: inlined into the tree kernel it passed
// the 128-register cap (a 16 B spill on sm_80).
DK_DEVICE_NOINLINE double list_walk_sums(const float* e, int64_t n, Shared& sh) { return sd::walk16_sums(e, n, sh); }

// The CPU's draw_list: an exact inverse-CDF draw over n <= kListMax listed weights wf(k) (tokens
// idx[k]) by the contract's 16-ary walk (decodekit/contract.h): the weights are computed block-wide
// into sh.stage, the group and block sums run on one thread each (sd::walk16_sums, the sampling
// list draw's), thread 0 walks. -1 without positive mass.
template <class WF>
DK_DEVICE int64_t list_draw(int64_t n, const int32_t* idx, const WF& wf, double u, Shared& sh) {
  const int tid = threadIdx.x;
  for (int64_t k = tid; k < n; k += kThreads) sh.stage[k] = wf(k);
  __syncthreads();
  const double Z = list_walk_sums(sh.stage, n, sh);
  if (tid == 0) {
    int64_t tok = -1;
    if (Z > 0.0) {
      const int64_t k = contract::walk16_pick(sh.stage, n, sh.g16, sh.g256, dmul(u, Z));
      tok = k >= 0 ? idx[k] : -1;
    }
    sh.bi = tok;
  }
  __syncthreads();
  const int64_t tok = sh.bi;
  __syncthreads();
  return tok;
}

// The canonical row mass (decodekit/contract.h; the CPU's row_mass / materialise order): per
// kChunk-element chunk 16 lane sums added lane by lane, the chunk masses added in chunk order. All
// (chunk, lane) sums of kThreads / 16 chunks run at once; thread 0 folds the chunk masses.
template <class W>
DK_DEVICE double block_row_mass(int64_t V, const W& w, Shared& sh) {
  constexpr int kLanes = contract::kLanes, kGroup = kThreads / kLanes;
  const int tid = threadIdx.x, j = tid % kLanes, g = tid / kLanes;
  const int64_t nch = contract::num_chunks(V);
  double z = 0.0;  // thread 0
  for (int64_t c0 = 0; c0 < nch; c0 += kGroup) {
    const int64_t c = c0 + g;
    sh.dred[tid] = c < nch ? contract::chunk_lane_sum(V, c, j, w) : 0.0;
    __syncthreads();
    if (tid == 0)
      for (int q = 0; q < kGroup && c0 + q < nch; ++q) {
        double m = 0.0;
        for (int l = 0; l < kLanes; ++l) m = dadd(m, sh.dred[q * kLanes + l]);
        z = dadd(z, m);
      }
    __syncthreads();
  }
  if (tid == 0) sh.bd = z;
  __syncthreads();
  const double r = sh.bd;
  __syncthreads();
  return r;
}

// The CPU's draw_blocks: exact inverse-CDF draw over w(0..V); -1 without positive mass. A real
// call on the device (DK_DEVICE_NOINLINE): inlined into the tree kernel (512 threads, so at most 128
// registers) with the filters' code, it made ptxas spill; as a call it costs a stack frame once
// per drawn row and nothing spills.
template <class W>
DK_DEVICE_NOINLINE int64_t block_draw(int64_t V, const W& w, double u, RowWs& ws, Shared& sh) {
  const int tid = threadIdx.x;
  const int64_t nch = (V + kChunk - 1) / kChunk;
  double* lanes = ws.lanes;              // [nch * 16]
  double* chunks = ws.lanes + nch * 16;  // [nch]
  for (int64_t pair = tid; pair < nch * 16; pair += kThreads) {
    const int64_t c = pair >> 4, j = pair & 15;
    const int64_t end = (c + 1) * kChunk < V ? (c + 1) * kChunk : V;
    double s = 0.0;
    for (int64_t i = c * kChunk + j; i < end; i += 16) s = dadd(s, double(w(i)));
    lanes[pair] = s;
  }
  __syncthreads();
  if (tid == 0) {
    double Z = 0.0;
    for (int64_t c = 0; c < nch; ++c) {
      double s = 0.0;
      for (int j = 0; j < 16; ++j) s = dadd(s, lanes[c * 16 + j]);
      chunks[c] = s;
      Z = dadd(Z, s);
    }
    int64_t c = -1;
    double local = 0.0;
    if (Z > 0.0) {
      const double target = dmul(u, Z);
      double cum = 0.0;
      c = 0;
      for (; c < nch - 1; ++c) {
        if (dadd(cum, chunks[c]) > target) break;
        cum = dadd(cum, chunks[c]);
      }
      local = dsub(target, cum);
      if (!(chunks[c] > 0.0)) {
        while (c > 0 && !(chunks[c] > 0.0)) --c;
        local = double(kPosInf);
      }
    }
    sh.bi = c;
    sh.bd = local;
  }
  __syncthreads();
  const int64_t c = sh.bi;
  const double local = sh.bd;
  __syncthreads();
  if (c < 0) return -1;
  const int64_t start = c * kChunk;
  const int64_t n = (start + kChunk < V ? kChunk : V - start);
  for (int64_t k = tid; k < n; k += kThreads) sh.stage[k] = w(start + k);
  __syncthreads();
  // the contract's 16-ary walk over the chunk (decodekit/contract.h; the CPU's draw_blocks):
  // the <= 16 block sums on one thread each, then thread 0 walks (group sums as it needs them)
  const int64_t nb = (contract::walk16_groups(n) + 15) / 16;
  if (tid < nb) sh.dred[tid] = contract::walk16_block(sh.stage, n, tid);
  __syncthreads();
  if (tid == 0) {
    const float* e = sh.stage;
    const int64_t k =
        contract::walk16_pick_by(e, n, [e, n](int64_t j) { return contract::walk16_group(e, n, j); }, sh.dred, local);
    sh.bi = k >= 0 ? start + k : -1;
  }
  __syncthreads();
  const int64_t tok = sh.bi;
  __syncthreads();
  return tok;
}

// ---- the target at one node ------------------------------------------------------------------
// The CPU's TNode: probabilities as given, greedy (argmax), or logits filtered by the row's
// parameters: survivors S = { x >= t and w(x) >= minw } with weights w(x) = exp((x - m) / T), the
// mass Z of S, and S listed (index order) when the CPU lists it.
template <class T>
struct Node : NodeSum {
  const T* x = nullptr;
  int64_t V = 0;
  DK_DEVICE float e(int64_t i) const {  // logits weight on S, 0 off S (the CPU's wblock)
    const float v = to_float(x[i]);
    if (!(v >= t)) return 0.f;
    const float w = wt(v);
    return w >= minw ? w : 0.f;
  }
  DK_DEVICE float w(int64_t i) const {  // unnormalised target weight (CPU wblock)
    if (probs) return relu_x86(to_float(x[i]));
    return e(i);
  }
  DK_DEVICE float p(int64_t i) const {  // normalised target as float (CPU pblock)
    return probs ? w(i) : fmul(e(i), invZf);
  }
  DK_DEVICE double pd(int64_t tok) const {  // p(tok) in double (CPU target_p)
    if (probs) return double(to_float(x[tok]));
    return double(e(tok)) / Z;
  }
};

// Max (lowest index among equals) and the bad-row flag of a logits row.
template <class T>
DK_DEVICE void block_argmax(const T* x, int64_t V, Shared& sh, float* m_out, int64_t* i_out, bool* bad_out) {
  const int tid = threadIdx.x;
  float m = kNegInf;
  int64_t idx = V;
  int bad = 0;
  for (int64_t i = tid; i < V; i += kThreads) {
    const float v = to_float(x[i]);
    if (v != v || v == kPosInf) bad = 1;
    if (v > m) {
      m = v;
      idx = i;
    } else if (v == m && i < idx)
      idx = i;
  }
  if (tid == 0) sh.flag = 0;
  __syncthreads();
  if (bad) sh.flag = 1;
  __syncthreads();
  bad = sh.flag;
  sh.fred[tid] = m;
  sh.ired[tid] = idx;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      const float om = sh.fred[tid + s];
      const int64_t oi = sh.ired[tid + s];
      if (om > sh.fred[tid] || (om == sh.fred[tid] && oi < sh.ired[tid])) {
        sh.fred[tid] = om;
        sh.ired[tid] = oi;
      }
    }
    __syncthreads();
  }
  *m_out = sh.fred[0];
  *i_out = sh.ired[0];
  *bad_out = bad || !(sh.fred[0] > kNegInf);
  __syncthreads();
}

// The row's filter parameters (logits targets; the CPU's spec_params).
DK_DEVICE sd::RowParams node_params(const Target& t, int64_t b) {
  if (t.kind != Kind::Logits) return sd::RowParams{};
  return sd::row_params(t.filter, b);
}

// Stage 1 of a node (the filtered node target, shared by chain and tree): probabilities as given;
// temperature 0: the argmax; otherwise select_row resolves temperature / top-k / top-p / min-p
// exactly as the sampling kernels do. The normaliser (stage 2, finish_node) is left out, so a
// caller that may not need it (accept_alone) can skip it. `lo`/`in_c`: select_row's candidate bound
// and whether the CPU could list S.
template <class T>
struct Resolved {
  Node<T> n;
  float lo = -FLT_MAX;
  bool in_c = false;
  bool finished = false;  // stage 2 done (finish_node, or a prepared node)
};

template <class T>
DK_DEVICE Resolved<T> resolve_node(const Target& tg, const T* x, const sd::RowParams& rp, SharedAll& sa) {
  Resolved<T> r;
  Node<T>& n = r.n;
  n.x = x;
  n.V = tg.V;
  DK_SPEC_COUNT(g_rows_resolved);
  if (tg.kind == Kind::Probs) {
    n.valid = n.probs = true;
    return r;
  }
  if (rp.T == 0.f) {
    float m;
    int64_t am;
    bool bad;
    block_argmax(x, tg.V, sa.own, &m, &am, &bad);
    n.greedy = true;
    n.valid = !bad;
    n.argmax = bad ? 0 : (am < tg.V ? am : 0);
    return r;
  }
  __syncthreads();  // every reader of sa.own is done before select_row writes the same bytes
  const sd::Selection sel = sd::select_row(x, tg.V, false, rp, sa.smem);
  __syncthreads();  // and select_row's last readers before sa.own is written again
  if (!sel.valid) return r;
  n.valid = true;  // so far: finish_node adds Z > 0
  n.wt = sel.w;
  n.t = sel.t;
  n.minw = sel.minw;
  r.lo = sel.lo;
  r.in_c = sel.in_c;
  return r;
}

// Stage 2: the mass Z of S. When the CPU lists S (select_row says S lies in the CPU's candidate list
// and |S| <= kListMax), S is compacted in index order into the row's list workspace and Z is the
// contract's list mass (walk16_total), as on the CPU; otherwise Z is the canonical chunk-order row mass. One pass
// over the row either way (the list pass stops as soon as |S| > kListMax is known).
template <class T>
DK_DEVICE void finish_node(Resolved<T>& r, RowWs& ws, Shared& sh) {
  Node<T>& n = r.n;
  if (r.finished) return;
  r.finished = true;
  if (!n.valid || n.probs || n.greedy) return;
  DK_SPEC_COUNT(g_z_passes);
  if (r.in_c) {  // S in index order (the sampling kernels' list pass; stops once |S| > kListMax)
    sd::Selection sel;
    sel.valid = true;
    sel.w = n.wt;
    sel.t = n.t;
    sel.minw = n.minw;
    sel.lo = r.lo;
    const int64_t cnt = sd::list_pass(n.x, 0, n.V, sel, ws.list_idx, ws.list_w, sh, true);
    if (cnt <= kListMax) {
      n.list = true;
      n.nS = cnt;
      __syncthreads();  // the list's writes before thread 0 sums it
      n.Z = list_walk_sums(ws.list_w, cnt, sh);
    }
  }
  if (!n.list) {
    const Node<T>& cn = n;
    n.Z = block_row_mass(n.V, [&](int64_t i) { return cn.e(i); }, sh);
  }
  n.valid = n.Z > 0.0;
  n.invZf = float(1.0 / n.Z);
}

template <class T>
DK_DEVICE Node<T> prepare_node(const Target& tg, const T* x, const sd::RowParams& rp, RowWs& ws, SharedAll& sa) {
  Resolved<T> r = resolve_node(tg, x, rp, sa);
  finish_node(r, ws, sa.own);
  return r.n;
}

// Node (b, r) of the walk: the prepared one when the launch prepared its nodes (ws then points at
// that node's survivor list), else resolved here (stage 1 only when lazy: the chain's
// accept_alone finishes it if it must).
template <class T>
DK_DEVICE Resolved<T> walk_node(const Target& tg, int64_t b, int64_t r, const sd::RowParams& rp, const Workspace& w,
                                RowWs& ws, SharedAll& sa, bool lazy) {
  const T* x = static_cast<const T*>(tg.data) + b * tg.stride_b + r * tg.stride_r;
  const Prepared& p = w.pre;
  if (!p.sums) {
    Resolved<T> out = resolve_node(tg, x, rp, sa);
    if (!lazy) finish_node(out, ws, sa.own);
    return out;
  }
  const int64_t k = b * p.R + r;
  const NodeSum& s = p.sums[k];
  Resolved<T> out;
  Node<T>& n = out.n;
  static_cast<NodeSum&>(n) = s;
  n.x = x;
  n.V = tg.V;
  out.finished = true;
  if (p.list_idx) {
    ws.list_idx = p.list_idx + k * p.list_per_node;
    ws.list_w = p.list_w + k * p.list_per_node;
  }
#if defined(DK_SPEC_COUNT_WORK) && defined(DK_CUDA_EMULATE)
  if (g_check_prepared) {  // the node the walk would have resolved, in the row's own list
    RowWs own = ws;
    own.list_idx = w.list_idx ? w.list_idx + b * w.list_per_row : nullptr;
    own.list_w = w.list_w ? w.list_w + b * w.list_per_row : nullptr;
    const Node<T> m = prepare_node(tg, x, rp, own, sa);
    bool same = same_node(m, n);
    for (int64_t j = 0; same && n.list && j < n.nS; ++j)
      same = own.list_idx[j] == ws.list_idx[j] && own.list_w[j] == ws.list_w[j];
    if (!same && threadIdx.x == 0) __atomic_fetch_add(&g_prepared_mismatch, 1, __ATOMIC_RELAXED);
    __syncthreads();
  }
#endif
  return out;
}

// Children of one node: a chain position (one child) or a tree node (a sibling list).
struct ChainKids {
  int64_t tok;
  DK_DEVICE int64_t first() const { return 0; }
  DK_DEVICE int64_t next(int64_t) const { return -1; }
  DK_DEVICE int64_t token(int64_t) const { return tok; }
};
struct NoKids {
  DK_DEVICE int64_t first() const { return -1; }
  DK_DEVICE int64_t next(int64_t) const { return -1; }
  DK_DEVICE int64_t token(int64_t) const { return 0; }
};
struct TreeKids {
  int64_t head;
  const int64_t* ns;
  const int64_t* cand;
  DK_DEVICE int64_t first() const { return head; }
  DK_DEVICE int64_t next(int64_t c) const { return ns[c]; }
  DK_DEVICE int64_t token(int64_t c) const { return cand[c]; }
};

// The CPU's verify_node, block-wide (repeated sibling tokens skipped, the residual of a rejected
// child materialised only when another child is tested, caller coins; a listed S keeps every step
// on the list, in list order). Returns the accepted child handle or -1 (*emit set).
template <class T, class K>
DK_DEVICE int64_t verify_node(const Node<T>& tn, const float* q, const K& kids, const RngKey& key, int64_t depth,
                              int64_t* emit, RowWs& ws, Shared& sh, const SpecCoin* coin = nullptr) {
  const int tid = threadIdx.x;
  if (!tn.valid) {
    *emit = 0;
    return -1;
  }
  if (tn.greedy) {
    for (int64_t c = kids.first(); c != -1; c = kids.next(c))
      if (kids.token(c) == tn.argmax) return c;
    *emit = tn.argmax;
    return -1;
  }
  const int64_t V = tn.V;
  ws.nremoved = 0;
  double Mr = 0.0, Mq = 0.0, Zr = 1.0;
  bool mat = false, pending = false;
  float scf = 1.f;
  int64_t rejected = 0;
  int64_t i = 0;
  bool broke = false;
  for (int64_t c = kids.first(); c != -1; c = kids.next(c), ++i) {
    const int64_t x = kids.token(c);
    if (rejected > 0 && in_sorted(ws.removed, ws.nremoved, x)) continue;  // repeated token
    if (!q) {
      const double px = tn.pd(x);
      const bool ok =
          coin ? spec_coin_accept(*coin, Mr, px) : spec_accept(spec_accept_uniform(key, depth, i), px, 1.0 - Mr);
      if (ok) return c;
      Mr += px;
    } else {
      if (pending) {
        // materialise r <- max(r - q_prev, 0) with the rejected tokens forced to 0
        const float vinv = float(1.0 / Zr);
        const int64_t nr = ws.nremoved;
        if (tn.list) {  // over the list (position k holds token list_idx[k]), its mass the contract's list mass
          for (int64_t k = tid; k < tn.nS; k += kThreads) {
            const int64_t tok = ws.list_idx[k];
            const float r = mat ? fmul(ws.resid[k], vinv) : fmul(ws.list_w[k], tn.invZf);
            float d = relu_x86(fsub(r, fmul(q[tok], scf)));
            if (in_sorted(ws.removed, nr, tok)) d = 0.f;
            ws.resid[k] = d;
          }
          __syncthreads();
          Zr = list_walk_sums(ws.resid, tn.nS, sh);
        } else {
          const int64_t Vp = (V + 15) / 16 * 16;
          for (int64_t e = tid; e < Vp; e += kThreads) {
            float d = 0.f;
            if (e < V) {
              const float r = mat ? fmul(ws.resid[e], vinv) : tn.p(e);
              d = relu_x86(fsub(r, fmul(q[e], scf)));
              if (in_sorted(ws.removed, nr, e)) d = 0.f;
            }
            ws.resid[e] = d;
          }
          __syncthreads();
          const float* rb = ws.resid;
          Zr = block_row_mass(V, [&](int64_t e) { return rb[e]; }, sh);
        }
        mat = true;
        pending = false;
        if (!(Zr > 0.0)) {
          broke = true;
          break;
        }
      }
      const double u = spec_accept_uniform(key, depth, i);
      const double qi = double(q[x]) / (1.0 - Mq);
      double rx;
      if (!mat)
        rx = tn.pd(x);
      else if (tn.list) {
        const int64_t pos = list_pos(ws.list_idx, tn.nS, x);
        rx = pos < 0 ? 0.0 : double(ws.resid[pos]) / Zr;
      } else
        rx = double(ws.resid[x]) / Zr;
      if (spec_accept(u, rx, qi)) return c;
      scf = float(1.0 / (1.0 - Mq));
      Mq += double(q[x]);
      pending = true;
    }
    // insert x into the sorted removed list (thread 0), then everyone sees it
    __syncthreads();
    if (tid == 0) {
      int64_t k = ws.nremoved;
      while (k > 0 && ws.removed[k - 1] > x) {
        ws.removed[k] = ws.removed[k - 1];
        --k;
      }
      ws.removed[k] = x;
    }
    ws.nremoved += 1;
    ++rejected;
    __syncthreads();
  }
  const double u = coin ? coin->final : spec_draw_uniform(key, depth);
  const int64_t nr = ws.nremoved;
  const int64_t* rm = ws.removed;
  const float* rb = ws.resid;
  int64_t tok;
  if (tn.list) {  // the CPU's draw_list over S
    const int32_t* li = ws.list_idx;
    const float* lw = ws.list_w;
    const int64_t n = tn.nS;
    auto bonus = [&](int64_t k) { return lw[k]; };
    if (rejected == 0 || broke) {
      tok = list_draw(n, li, bonus, u, sh);
    } else if (!q) {
      tok = list_draw(n, li, [&](int64_t k) { return in_sorted(rm, nr, li[k]) ? 0.f : lw[k]; }, u, sh);
    } else {
      const float finv = float(1.0 / Zr);
      tok = list_draw(
          n, li,
          [&](int64_t k) {
            const int64_t t = li[k];
            if (in_sorted(rm, nr, t)) return 0.f;
            const float r = mat ? fmul(rb[k], finv) : fmul(lw[k], tn.invZf);
            return relu_x86(fsub(r, fmul(q[t], scf)));
          },
          u, sh);
    }
    if (tok < 0) tok = list_draw(n, li, bonus, u, sh);
  } else {
    auto bonus = [&](int64_t e) { return tn.w(e); };
    if (rejected == 0 || broke) {
      tok = block_draw(V, bonus, u, ws, sh);
    } else if (!q) {
      tok = block_draw(V, [&](int64_t e) { return in_sorted(rm, nr, e) ? 0.f : tn.w(e); }, u, ws, sh);
    } else {
      const float finv = float(1.0 / Zr);
      tok = block_draw(
          V,
          [&](int64_t e) {
            if (in_sorted(rm, nr, e)) return 0.f;
            const float r = mat ? fmul(rb[e], finv) : tn.p(e);
            return relu_x86(fsub(r, fmul(q[e], scf)));
          },
          u, ws, sh);
    }
    if (tok < 0) tok = block_draw(V, bonus, u, ws, sh);
  }
  *emit = tok < 0 ? 0 : tok;
  return -1;
}

// The accept test alone (the accepted count after the first rejection: each draft on its own, as
// the CPU's accept_alone). A logits node arrives resolved but without its normaliser. Z >= 1 (S
// holds the row max, whose weight is dk_exp(0) = 1, and no weight is negative), and double(e) / Z
// does not grow with Z (IEEE division is monotone), so a test that fails with Z = 1 (e(x) = 0
// included) fails for the true Z: the pass for Z is made only when the test can still pass.
template <class T>
DK_DEVICE bool accept_alone(Resolved<T>& r, const float* q, int64_t x, const RngKey& key, int64_t depth, RowWs& ws,
                            Shared& sh) {
  Node<T>& n = r.n;
  if (!n.valid) return false;
  if (n.greedy) return x == n.argmax;
  const double u = spec_accept_uniform(key, depth, 0);
  const double qx = q ? double(q[x]) : 1.0;
  if (!n.probs) {
    if (!spec_accept(u, double(n.e(x)), qx)) return false;
    finish_node(r, ws, sh);
    if (!n.valid) return false;
  }
  return spec_accept(u, n.pd(x), qx);
}

DK_DEVICE RngKey row_key(const Rng& r, int64_t b) { return row_rng_key(r, b); }

DK_DEVICE RowWs row_ws(const Workspace& w, int64_t b) {
  RowWs r;
  r.lanes = w.lanes + b * w.lanes_per_row;
  r.resid = w.resid ? w.resid + b * w.resid_per_row : nullptr;
  r.removed = w.removed + b * w.removed_per_row;
  r.nremoved = 0;
  r.list_idx = w.list_idx ? w.list_idx + b * w.list_per_row : nullptr;
  r.list_w = w.list_w ? w.list_w + b * w.list_per_row : nullptr;
  return r;
}

// ---- kernels ---------------------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kThreads, 1) chain_kernel(ChainArgs a) {
  __shared__ SharedAll sa;
  Shared& sh = sa.own;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t N = a.N;
  const int64_t n = a.num_draft ? a.num_draft[b] : N;
  const RngKey key = row_key(a.rng, b);
  const sd::RowParams rp = node_params(a.target, b);
  RowWs ws = row_ws(a.ws, b);
  int64_t* out = a.out_ids + b * (N + 1);
  int64_t stop = -1, emit = 0;
  int32_t acc = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float* q = a.draft.data ? a.draft.data + b * a.draft.stride_b + j * a.draft.stride_r : nullptr;
    const int64_t x = a.draft_ids[b * N + j];
    Resolved<T> r = walk_node<T>(a.target, b, j, rp, a.ws, ws, sa, true);
    if (stop >= 0) {  // after the first rejection: only the accepted count (no draw, no residual)
      acc += accept_alone(r, q, x, key, j, ws, sh) ? 1 : 0;
      continue;
    }
    finish_node(r, ws, sh);
    if (verify_node(r.n, q, ChainKids{x}, key, j, &emit, ws, sh) == 0) {
      if (tid == 0) out[j] = x;
      ++acc;
    } else {
      stop = j;
    }
  }
  if (stop < 0) {
    stop = n;
    const Node<T> tn = walk_node<T>(a.target, b, n, rp, a.ws, ws, sa, false).n;
    verify_node(tn, nullptr, NoKids{}, key, n, &emit, ws, sh);
  }
  if (tid == 0) {
    out[stop] = emit;
    for (int64_t j = stop + 1; j <= N; ++j) out[j] = -1;
    a.out_accepted[b] = acc;
    a.out_emitted[b] = int32_t(stop);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) tree_kernel(TreeArgs a) {
  __shared__ SharedAll sa;
  Shared& sh = sa.own;
  const int64_t b = blockIdx.x;
  if (a.skip && a.skip[b]) return;  // a row the deferred checks found bad: outputs stay pre-filled
  const int tid = threadIdx.x;
  const int64_t T_ = a.T;
  const int64_t* cand = a.cand + b * T_;
  const int64_t* ri = a.retrive_index + b * T_;
  const int64_t* nt = a.next_token + b * T_;
  const int64_t* ns = a.next_sibling + b * T_;
  const bool ids_target = a.target.kind == Kind::Ids;
  if (tid == 0) {
    int64_t bad = -1;
    const int e = check_tree_row(cand, nt, ns, T_, ids_target ? INT64_MAX : a.target.V,
                                 a.ws.seen + b * a.ws.tree_per_row, a.ws.stack + b * a.ws.tree_per_row, &bad);
    a.err[b] = e;
    a.err_node[b] = bad;
    a.accept_num[b] = 0;
    sh.bi = e;
  }
  __syncthreads();
  const int64_t err = sh.bi;
  __syncthreads();
  if (err != kTreeOk) return;
  const int64_t* tids = ids_target ? static_cast<const int64_t*>(a.target.data) : nullptr;
  const RngKey key = row_key(a.rng, b);
  const sd::RowParams rp = node_params(a.target, b);
  RowWs ws = row_ws(a.ws, b);
  int32_t* ai = a.accept_index + b * a.W;
  if (tid == 0) ai[0] = int32_t(ri[0]);
  int64_t acc = 0, cur = 0;
  while (true) {  // descends only into an accepted child; the first node that accepts none ends the walk
    Node<T> tn;
    if (ids_target) {
      tn.valid = tn.greedy = true;
      tn.argmax = tids[b * a.target.stride_b + cur * a.target.stride_r];
    } else {
      tn = walk_node<T>(a.target, b, cur, rp, a.ws, ws, sa, false).n;
    }
    const float* q = a.draft.data ? a.draft.data + b * a.draft.stride_b + cur * a.draft.stride_r : nullptr;
    int64_t emit = 0;
    const TreeKids kids{acc < a.W - 1 ? nt[cur] : -1, ns, cand};
    SpecCoin coin;
    if (a.coins) coin = SpecCoin{a.coins[b * T_ + cur], a.coins_final[b], a.thr_single, a.thr_acc};
    const int64_t c = verify_node(tn, q, kids, key, acc, &emit, ws, sh, a.coins ? &coin : nullptr);
    if (c >= 0) {
      if (tid == 0) {
        a.predicts[ri[cur]] = cand[c];
        ai[acc + 1] = int32_t(ri[c]);
      }
      ++acc;
      cur = c;
      continue;
    }
    if (tid == 0) a.predicts[ri[cur]] = emit;
    break;
  }
  if (tid == 0) a.accept_num[b] = int32_t(acc);
}

// Resolves every node of the walk ahead of it, one block per node (node k = b * R + r: batch row b,
// chain position r <= num_draft[b] or tree node r), with prepare_node, the walk's own code: the
// chain and tree kernels then read the nodes (walk_node) instead of resolving them one after
// another on their row's single block. Launched when prepare_plan says so.
struct PrepareArgs {
  Target tg;
  Workspace w;
};
template <class T>
__global__ void __launch_bounds__(kThreads, 1) prepare_kernel(PrepareArgs a) {
  __shared__ SharedAll sa;
  const Target& tg = a.tg;
  const Workspace& w = a.w;
  const Prepared& p = w.pre;
  const int64_t k = blockIdx.x, b = k / p.R, r = k % p.R;
  if (p.num_draft && r > p.num_draft[b]) return;  // chain positions past the row's drafts
  RowWs ws{};
  if (p.list_idx) {
    ws.list_idx = p.list_idx + k * p.list_per_node;
    ws.list_w = p.list_w + k * p.list_per_node;
  }
  const T* x = static_cast<const T*>(tg.data) + b * tg.stride_b + r * tg.stride_r;
  const Node<T> n = prepare_node(tg, x, node_params(tg, b), ws, sa);
  if (threadIdx.x == 0) p.sums[k] = n;  // its NodeSum part
}

// The prepared nodes of a split plan (Prepared::split, node_plan): the sampling kernels' split
// phases (sampling.cuh: scan, top-k's and top-p's radix passes, the final phase's threshold, kept
// chunk masses and slice lists) have resolved the B * R node rows over several blocks each; one
// block per node then turns their state into the node's summary, as prepare_node would: greedy
// (temperature 0): the row's argmax; else select_row's selection from the merged max and threshold
// (split_selection), S listed when the CPU lists it (the slices' lists in slice order = S in index
// order, copied to the node's list; Z its walk16 mass) or Z the kept chunk masses added in chunk
// order (block_row_mass's sum: the same canonical order). Same summaries and lists as
// prepare_kernel by construction (the emulator's walk_node check compares them field by field).
template <class T>
__global__ void __launch_bounds__(kThreads, 1) split_node_kernel(Workspace w) {
  __shared__ SharedAll sh;
  const Prepared& p = w.pre;
  const sd::SplitArgs& sa = p.split;
  const int64_t k = blockIdx.x, V = sa.a.in.V;
  const sd::SplitRowView v = sd::split_view<T>(sa, k, 0);
  if (!sd::split_live(sa, v.o)) return;  // chain positions past the row's drafts (as every split phase)
  DK_SPEC_COUNT(g_rows_resolved);
  sd::Scan sc;
  const bool work = sd::split_work(sa, v, sc);
  NodeSum n;
  if (v.rp.T == 0.f) {  // resolve_node's greedy node
    n.greedy = true;
    n.valid = !sc.bad;
    n.argmax = sc.bad ? 0 : (sc.argmax < V ? sc.argmax : 0);
  } else if (work) {  // resolve_node + finish_node
    DK_SPEC_COUNT(g_z_passes);
    const sd::Selection sel = sd::split_selection(v, sc, sa.ws.rows[k].t);
    n.valid = true;
    n.wt = sel.w;
    n.t = sel.t;
    n.minw = sel.minw;
    if (sa.lists && sel.in_c) {
      const int64_t cnt = sd::split_list_size(sa, k);
      if (cnt <= kListMax) {
        float* lw = p.list_w + k * p.list_per_node;
        sd::split_list_gather(sa, k, p.list_idx + k * p.list_per_node, lw);
        __syncthreads();  // the list's writes before thread 0 sums it
        n.list = true;
        n.nS = cnt;
        n.Z = list_walk_sums(lw, cnt, sh.own);
      }
    }
    if (!n.list) n.Z = contract::add_in_order(sa.ws.kmass + k * contract::num_chunks(V), contract::num_chunks(V));
    n.valid = n.Z > 0.0;
    n.invZf = float(1.0 / n.Z);
  }
  if (threadIdx.x == 0) p.sums[k] = n;
}

// The split plan of a launch's B * R prepared nodes (host arithmetic on sizes, as prepare_plan): the
// sampling kernels' split_plan for B * R rows of the target (node (b, r) at b * stride_b +
// r * stride_r, the filter parameters of batch row b). splits == 1 (a node per SM or more, or a row
// of one chunk): one block per node, prepare_kernel. The caller sets split.a.workspace to
// sample_workspace_elems(split) doubles.
inline sd::SplitArgs node_plan(const Target& tg, int64_t B, int64_t R, int64_t n_sms) {
  SampleArgs a;
  a.in = Matrix{tg.data, tg.dtype, B * R, tg.V, tg.stride_r};
  a.filter = tg.filter;
  a.n_out = B * R;
  sd::SplitArgs sa = sd::split_plan(a, int(n_sms < INT32_MAX ? n_sms : INT32_MAX), false);
  sa.group = R;
  sa.group_stride = tg.stride_b;
  return sa;
}

// The prepare launches through `launch(kernel, grid, args)` (a stream launch or the emulator's):
// one block per node, or the split phases and split_node_kernel. Lays out the split plan's
// workspace regions first.
template <class T, class L>
inline void run_prepare(Target tg, const int64_t* num_draft, Workspace w, int64_t B, L& launch) {
  Prepared& p = w.pre;
  p.num_draft = num_draft;
  if (p.split.splits <= 1) return launch(prepare_kernel<T>, unsigned(B * p.R), PrepareArgs{tg, w});
  p.split.group_live = num_draft;  // (group = R: the chain positions past a row's drafts are skipped)
  sd::sample_layout(p.split, p.split.a.workspace);
  sd::run_split_phases<T>(p.split, launch);
  launch(split_node_kernel<T>, unsigned(B * p.R), w);
}

// Whether a chain / tree launch prepares its nodes (host arithmetic on sizes only: no device
// read, fixed under graph capture). Only logits targets have nodes worth resolving (a row pass or
// more each; probability nodes cost nothing, id targets have none). A block holds a whole SM
// (512 threads at up to 128 registers), so B * R prepared nodes take ceil(B * R / n_sms) waves,
// each about one node's time. Chain: prepared when that beats resolving the R = N + 1 positions
// one after another (waves < R). Tree: the walk visits only the accepted path (depth unknown,
// >= 1), so prepared only when all T nodes fit in 2 waves. n_sms = 0: never (DECODEKIT_SPLIT_ROWS=0).
inline bool prepare_plan(Kind kind, int64_t B, int64_t R, int64_t n_sms, bool chain) {
  if (kind != Kind::Logits || n_sms <= 0 || B <= 0 || R <= 1) return false;
  const int64_t waves = (B * R + n_sms - 1) / n_sms;
  return chain ? waves < R : waves <= 2;
}

__global__ void __launch_bounds__(kThreads, 1) build_tree_kernel(BuildArgs a) {  // one thread per row
  const int64_t b = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= a.B) return;
  const int64_t T = a.T, W = (T + 7) / 8;
  int64_t bad = -1;
  a.err[b] = build_tree_row(a.parents + b * T, T, a.prefix_lens[b], b * T, a.mask + b * T * W, a.positions + b * T,
                            a.retrive_index + b * T, a.next_token + b * T, a.next_sibling + b * T, &bad);
  a.err_node[b] = bad;
}

#if !defined(DK_CUDA_EMULATE)
// ---- launchers ---------------------------------------------------------------------------------
template <template <class> class K, class Args>
inline cudaError_t launch_typed(const Args& a, const Target& t, int64_t B, cudaStream_t s) {
  if (B == 0) return cudaSuccess;
  const dim3 grid{unsigned(B)}, block{unsigned(kThreads)};
  if (t.kind != Kind::Logits || t.dtype == DType::F32)
    K<float>::launch(a, grid, block, s);
  else if (t.dtype == DType::BF16)
    K<bf16_t>::launch(a, grid, block, s);
  else
    K<f16_t>::launch(a, grid, block, s);
  return cudaGetLastError();
}
// The prepare launches (when the workspace holds prepared nodes), then the walk.
template <class T, class Args>
inline void launch_prepare(const Args& a, const int64_t* num_draft, cudaStream_t s) {
  if (!a.ws.pre.sums) return;
  StreamLaunch launch{s};
  run_prepare<T>(a.target, num_draft, a.ws, a.B, launch);
}
template <class T>
struct ChainLaunch {
  static void launch(const ChainArgs& a, dim3 g, dim3 b, cudaStream_t s) {
    launch_prepare<T>(a, a.num_draft, s);
    chain_kernel<T><<<g, b, 0, s>>>(a);
  }
};
template <class T>
struct TreeLaunch {
  static void launch(const TreeArgs& a, dim3 g, dim3 b, cudaStream_t s) {
    launch_prepare<T>(a, nullptr, s);
    tree_kernel<T><<<g, b, 0, s>>>(a);
  }
};

inline cudaError_t launch_chain(const ChainArgs& a, cudaStream_t s) {
  return launch_typed<ChainLaunch>(a, a.target, a.B, s);
}
inline cudaError_t launch_tree(const TreeArgs& a, cudaStream_t s) {
  return launch_typed<TreeLaunch>(a, a.target, a.B, s);
}
inline cudaError_t launch_build_tree(const BuildArgs& a, cudaStream_t s) {
  if (a.B == 0) return cudaSuccess;
  build_tree_kernel<<<unsigned((a.B + kThreads - 1) / kThreads), kThreads, 0, s>>>(a);
  return cudaGetLastError();
}

#endif  // !DK_CUDA_EMULATE

}  // namespace dk::cuda::spec

#if !defined(DK_CUDA_EMULATE)
namespace dk::cuda {
// For .ci/cuda_compile.sh: odr-uses every kernel and launcher of this header.
inline void instantiate_speculative() {
  spec::ChainArgs c;
  spec::TreeArgs t;
  spec::BuildArgs b;
  (void)spec::launch_chain(c, nullptr);
  (void)spec::launch_tree(t, nullptr);
  (void)spec::launch_build_tree(b, nullptr);
}
}  // namespace dk::cuda
#endif  // !DK_CUDA_EMULATE
