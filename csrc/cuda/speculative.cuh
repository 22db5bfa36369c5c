// Speculative verification on CUDA (chain, tree, build_tree). Torch-free: compiles with plain
// `nvcc -std=c++20 -arch=sm_80` / `-arch=sm_90`; csrc/cuda/speculative.cu is the thin launcher.
//
// One thread block per batch row. Every thread of the block runs the same walk (the accept tests
// read single elements and Philox counters, so all threads reach the same decisions without
// communication); the wide steps (row max / argmax, normaliser, residual materialisation, residual
// draw) are block-wide. To give the CPU's tokens for the same seed, every floating-point sum runs in
// the CPU's order (csrc/cpu/isa/speculative.cpp), the canonical order of decodekit/contract.h: a
// row mass is, per 4096-element chunk, 16 lane sums (lane j = elements j, j+16, ... in order, in
// double) added lane by lane, the chunk masses added in chunk order; a residual draw takes the same
// chunk masses, picks the chunk sequentially and scans it sequentially (one thread, from shared
// memory). Element values use explicitly rounded intrinsics (no contraction), dk_exp from fmath.h.
//
// Supported here: probability targets (chain and tree, with or without draft probs), greedy
// verification (logits with temperature 0, or predicted ids), and logits with temperature only.
// Logits with top-k / top-p / min-p need the filter engine, which is CPU-only so far (the launcher
// rejects them with a clear error).
#pragma once
#if !defined(DK_CUDA_EMULATE)  // tests/cuda_emu runs these kernels on CPU threads
#include <cuda_runtime.h>
#endif
#include <cstdint>
#include "decodekit/common.h"
#include "decodekit/contract.h"
#include "decodekit/fmath.h"
#include "decodekit/speculative.h"

namespace dk::cuda::spec {

#ifdef DK_SPEC_THREADS
constexpr int kThreads = DK_SPEC_THREADS;  // the emulator tests use small blocks
#else
constexpr int kThreads = 256;
#endif
static_assert(kThreads >= 16 && (kThreads & (kThreads - 1)) == 0, "block size: a power of two >= 16");
using contract::kChunk;  // the CPU/CUDA contract (decodekit/contract.h)
using Kind = dk::SpecTargetKind;
using dk::DType;

struct Target {
  Kind kind = Kind::Probs;
  const void* data = nullptr;  // probs float / logits dtype [B, R, V]; ids int64 [B, R]
  DType dtype = DType::F32;
  int64_t V = 0, stride_b = 0, stride_r = 0;
  const float* temperature = nullptr;  // logits: per batch row (device) or null
  float temperature_val = 1.f;
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
// Per-row global scratch (the launcher allocates B rows of each).
struct Workspace {
  double* lanes = nullptr;     // lanes_per_row doubles: chunk lane sums, then chunk masses
  float* resid = nullptr;      // resid_per_row floats: a materialised residual row (tree + draft probs)
  int64_t* removed = nullptr;  // removed_per_row: rejected children, sorted
  uint8_t* seen = nullptr;     // T bytes (tree check)
  int64_t* stack = nullptr;    // T (tree check)
  int64_t lanes_per_row = 0, resid_per_row = 0, removed_per_row = 0, tree_per_row = 0;
};

inline int64_t lanes_per_row(int64_t V) { return ((V + kChunk - 1) / kChunk) * 16 + ((V + kChunk - 1) / kChunk); }

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
  double dred[kThreads];
  float fred[kThreads];
  int64_t ired[kThreads];
  double bd;
  int64_t bi;
  int flag;
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

// The CPU's draw_blocks: exact inverse-CDF draw over w(0..V); -1 without positive mass.
template <class W>
DK_DEVICE int64_t block_draw(int64_t V, const W& w, double u, RowWs& ws, Shared& sh) {
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
template <class T>
struct Node {
  bool valid = false, greedy = false, probs = false;
  const T* x = nullptr;
  int64_t V = 0;
  float m = 0.f, invT = 1.f;
  double Z = 1.0;
  float invZf = 1.f;
  int64_t argmax = 0;
  DK_DEVICE float e(int64_t i) const {  // logits weight, as the CPU's Weight
    return dk_exp(fmul(fsub(to_float(x[i]), m), invT));
  }
  DK_DEVICE float w(int64_t i) const {  // unnormalised target weight (CPU wblock)
    if (probs) return relu_x86(to_float(x[i]));
    return e(i);
  }
  DK_DEVICE float p(int64_t i) const {  // normalised target as float (CPU pblock)
    return probs ? w(i) : fmul(e(i), invZf);
  }
  DK_DEVICE double pd(int64_t tok) const {  // p(tok) in double (CPU target_p)
    const float v = to_float(x[tok]);
    if (probs) return double(v);
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

template <class T>
DK_DEVICE Node<T> prepare_node(const Target& tg, const T* x, float temperature, Shared& sh) {
  Node<T> n;
  n.x = x;
  n.V = tg.V;
  if (tg.kind == Kind::Probs) {
    n.valid = n.probs = true;
    return n;
  }
  float m;
  int64_t am;
  bool bad;
  block_argmax(x, tg.V, sh, &m, &am, &bad);
  if (temperature == 0.f) {
    n.greedy = true;
    n.valid = !bad;
    n.argmax = bad ? 0 : (am < tg.V ? am : 0);
    return n;
  }
  if (bad) return n;
  n.m = m;
  n.invT = v_div(1.f, temperature);  // IEEE division whatever -prec-div says
  const Node<T>& cn = n;
  n.Z = block_row_mass(tg.V, [&](int64_t i) { return cn.e(i); }, sh);
  n.valid = n.Z > 0.0;
  n.invZf = float(1.0 / n.Z);
  return n;
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
// child materialised only when another child is tested, caller coins). Returns the accepted child
// handle or -1 (*emit set).
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
        const int64_t Vp = (V + 15) / 16 * 16;
        const int64_t nr = ws.nremoved;
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
        mat = true;
        pending = false;
        if (!(Zr > 0.0)) {
          broke = true;
          break;
        }
      }
      const double u = spec_accept_uniform(key, depth, i);
      const double qi = double(q[x]) / (1.0 - Mq);
      const double rx = mat ? double(ws.resid[x]) / Zr : tn.pd(x);
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
  *emit = tok < 0 ? 0 : tok;
  return -1;
}

DK_DEVICE RngKey row_key(const Rng& r, int64_t b) { return row_rng_key(r, b); }

DK_DEVICE float row_temperature(const Target& t, int64_t b) {
  return t.temperature ? t.temperature[b] : t.temperature_val;
}

DK_DEVICE RowWs row_ws(const Workspace& w, int64_t b) {
  RowWs r;
  r.lanes = w.lanes + b * w.lanes_per_row;
  r.resid = w.resid ? w.resid + b * w.resid_per_row : nullptr;
  r.removed = w.removed + b * w.removed_per_row;
  r.nremoved = 0;
  return r;
}

// ---- kernels ---------------------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kThreads) chain_kernel(ChainArgs a) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const T* base = static_cast<const T*>(a.target.data);
  const int64_t N = a.N;
  const int64_t n = a.num_draft ? a.num_draft[b] : N;
  const RngKey key = row_key(a.rng, b);
  const float temp = a.target.kind == Kind::Logits ? row_temperature(a.target, b) : 1.f;
  RowWs ws = row_ws(a.ws, b);
  int64_t* out = a.out_ids + b * (N + 1);
  int64_t stop = -1, emit = 0;
  int32_t acc = 0;
  for (int64_t j = 0; j < n; ++j) {
    const Node<T> tn = prepare_node(a.target, base + b * a.target.stride_b + j * a.target.stride_r, temp, sh);
    const float* q = a.draft.data ? a.draft.data + b * a.draft.stride_b + j * a.draft.stride_r : nullptr;
    const int64_t x = a.draft_ids[b * N + j];
    if (stop >= 0) {
      bool ok = false;
      if (tn.valid)
        ok = tn.greedy ? x == tn.argmax : spec_accept(spec_accept_uniform(key, j, 0), tn.pd(x), q ? double(q[x]) : 1.0);
      acc += ok ? 1 : 0;
      continue;
    }
    if (verify_node(tn, q, ChainKids{x}, key, j, &emit, ws, sh) == 0) {
      if (tid == 0) out[j] = x;
      ++acc;
    } else {
      stop = j;
    }
  }
  if (stop < 0) {
    stop = n;
    const Node<T> tn = prepare_node(a.target, base + b * a.target.stride_b + n * a.target.stride_r, temp, sh);
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
  __shared__ Shared sh;
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
  const T* base = ids_target ? nullptr : static_cast<const T*>(a.target.data);
  const int64_t* tids = ids_target ? static_cast<const int64_t*>(a.target.data) : nullptr;
  const RngKey key = row_key(a.rng, b);
  const float temp = a.target.kind == Kind::Logits ? row_temperature(a.target, b) : 1.f;
  RowWs ws = row_ws(a.ws, b);
  int32_t* ai = a.accept_index + b * a.W;
  if (tid == 0) ai[0] = int32_t(ri[0]);
  int64_t acc = 0, cur = 0;
  while (true) {
    Node<T> tn;
    if (ids_target) {
      tn.valid = tn.greedy = true;
      tn.argmax = tids[b * a.target.stride_b + cur * a.target.stride_r];
    } else {
      tn = prepare_node(a.target, base + b * a.target.stride_b + cur * a.target.stride_r, temp, sh);
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
template <class T>
struct ChainLaunch {
  static void launch(const ChainArgs& a, dim3 g, dim3 b, cudaStream_t s) { chain_kernel<T><<<g, b, 0, s>>>(a); }
};
template <class T>
struct TreeLaunch {
  static void launch(const TreeArgs& a, dim3 g, dim3 b, cudaStream_t s) { tree_kernel<T><<<g, b, 0, s>>>(a); }
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
