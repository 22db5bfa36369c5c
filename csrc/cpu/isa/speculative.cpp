// Speculative verification kernels (chain and tree, stochastic and greedy); compiled once per ISA.
//
// Per node the kernel reads single elements p(x), q(x) of the drafts it tests and at most one
// residual row (p and q at the node where it stops), never the other rows. Wide loops (residual
// masses, residual draws, materialised residuals of multi-child nodes) are written against the
// 16-lane blocks of simd.h; the walks are plain C++. Sums run in a fixed order (16 virtual double
// lanes per 4096-element chunk, then the chunks in order; a survivor list by the contract's 16-ary
// walk sums, decodekit/contract.h), so every ISA path gives the same tokens, and CUDA too.
//
// The accept rules (docs/semantics.md, "Speculative verification"), at a node with target distribution p and children
// x_1..x_k tried in order:
//   with draft probs q  : x_i is accepted with probability min(1, r(x_i) / q_i(x_i)), where r is the
//                         residual (r = p before the first rejection) and q_i is q with the earlier
//                         siblings removed and renormalised (the distribution of the i-th of k
//                         distinct children drawn without replacement; q_1 = q). On rejection
//                         r <- normalize(max(r - q_i, 0)).
//   without (one-hot)   : x_i is accepted with probability r(x_i); on rejection x_i is removed from r
//                         and r renormalised.
//   greedy              : x_i is accepted iff x_i == argmax p (lowest index on ties).
// When no child is accepted the node emits one token drawn from r (greedy: the argmax); a node
// without children (a chain's position N, a tree leaf, the depth limit) emits a bonus token from p.
// Repeated sibling tokens: greedy takes the first matching child; otherwise a child whose token
// was rejected earlier at the same node is skipped (r(x) = 0 there, so it could never be
// accepted, and it changes neither r nor the draft's without-replacement residual). Caller-given
// coins (SpecCoin, one-hot drafts): speculative.h.
#include "cpu/row_engine.h"
#include "cpu/spec_kernels.h"
#include "decodekit/speculative.h"

namespace dk::cpu::DK_ISA_NAME {

struct SpecScratch {
  std::vector<float> rbuf;       // materialised residual (V + 16, or list length)
  std::vector<double> chunks;    // chunk masses of a draw
  std::vector<int64_t> removed;  // rejected children of the current node, sorted
  std::vector<int64_t> kids, kid_nodes;
  std::vector<uint8_t> seen;
  std::vector<int64_t> stack;
};
inline SpecScratch& spec_scratch() {
  thread_local SpecScratch s;
  return s;
}

// ---- the target at one node ----------------------------------------------------------------------
template <class T>
struct TNode {
  bool valid = false;
  bool greedy = false;
  bool probs = false;
  const T* x = nullptr;
  int64_t V = 0;
  Selection sel;      // logits: filters resolved by the row engine
  bool list = false;  // logits: survivors S listed in scratch().val/idx[0..sel.nS)
  double Z = 1.0;     // logits: mass of S
  float invZf = 1.f;
  int64_t argmax = 0;
};

template <class T>
inline void prepare_node(TNode<T>& tn, const T* x, int64_t V, SpecTargetKind kind, const RowParamsF& rp, Scratch& s) {
  tn.x = x;
  tn.V = V;
  if (kind == SpecTargetKind::Probs) {
    tn.valid = true;
    tn.probs = true;
    return;
  }
  if (rp.T == 0.f) {
    tn.greedy = true;
    tn.valid = row_argmax(x, V, s, &tn.argmax);
    return;
  }
  tn.sel = select_row(x, V, false, rp, s);
  tn.valid = tn.sel.valid;
  if (!tn.valid) return;
  tn.list = tn.sel.res.in_c && tn.sel.nS <= kListMax;  // S is listed only when small
  if (tn.list) {
    tn.Z = contract::walk16_total(s.wt.data(), tn.sel.nS);  // weights from the engine; the contract's list mass
  } else {
    tn.Z = row_mass(x, V, tn.sel.w, tn.sel.res.t, tn.sel.res.minw, s.pf);
  }
  if (!(tn.Z > 0.0)) {
    tn.valid = false;
    return;
  }
  tn.invZf = float(1.0 / tn.Z);
}

// p(x) of the (filtered, renormalised) target, in double.
template <class T>
inline double target_p(const TNode<T>& tn, int64_t tok) {
  const float v = to_float(tn.x[tok]);
  if (tn.probs) return double(v);
  if (!(v >= tn.sel.res.t)) return 0.0;
  const float e = tn.sel.w(v);
  if (!(e >= tn.sel.res.minw)) return 0.0;
  return double(e) / tn.Z;
}

// ---- blocks of the target ------------------------------------------------------------------------
// Unnormalised weights (probs: p clamped at 0 — NaN counts as 0; logits: exp weight on S, else 0).
template <class T>
inline VF wblock(const TNode<T>& tn, int64_t i) {
  const VF zero = vset(0.f);
  if (tn.probs) return vmax(load_block(tn.x, i, tn.V, 0.f), zero);
  VF v = load_block(tn.x, i, tn.V, kNegInf);
  VF e = tn.sel.w(v);
  M16 keep = vge(v, vset(tn.sel.res.t)) & vge(e, vset(tn.sel.res.minw));
  return vblend(keep, zero, e);
}
// Normalised target probabilities as floats.
template <class T>
inline VF pblock(const TNode<T>& tn, int64_t i) {
  VF w = wblock(tn, i);
  return tn.probs ? w : vmul(w, vset(tn.invZf));
}

// Lanes of the block at i0 that hold a token of the sorted set R.
struct Excl {
  const std::vector<int64_t>* R;
  mutable size_t cur = 0;
  mutable int64_t last = INT64_MIN;
  M16 mask(int64_t i0) const {
    const auto& r = *R;
    if (r.empty() || i0 + 16 <= r.front() || i0 > r.back()) return 0;
    if (i0 < last) cur = size_t(std::lower_bound(r.begin(), r.end(), i0) - r.begin());
    last = i0;
    while (cur < r.size() && r[cur] < i0) ++cur;
    M16 m = 0;
    for (size_t c = cur; c < r.size() && r[c] < i0 + 16; ++c) m |= M16(1) << (r[c] - i0);
    return m;
  }
};

// ---- exact inverse-CDF draws ---------------------------------------------------------------------
// Over V weights given 16 at a time by blk(i) (zero past V). Chunk masses in 16 double lanes,
// then the 16-ary walk over the chosen chunk (on the same block values). -1 if no positive mass.
template <class BF>
inline int64_t draw_blocks(int64_t V, const BF& blk, double u, std::vector<double>& chunks) {
  const int64_t nch = (V + kChunk - 1) / kChunk;
  chunks.resize(size_t(nch));
  double Z = 0.0;
  for (int64_t c = 0; c < nch; ++c) {
    VD acc = vd_zero();
    const int64_t end = std::min(V, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; i += 16) vd_add(acc, blk(i));
    chunks[size_t(c)] = vd_reduce(acc);
    Z += chunks[size_t(c)];
  }
  if (!(Z > 0.0)) return -1;
  const double target = u * Z;
  double cum = 0.0;
  int64_t c = 0;
  for (; c < nch - 1; ++c) {
    if (cum + chunks[size_t(c)] > target) break;
    cum += chunks[size_t(c)];
  }
  double local = target - cum;
  if (!(chunks[size_t(c)] > 0.0)) {  // rounding walked past the last chunk with mass
    while (c > 0 && !(chunks[size_t(c)] > 0.0)) --c;
    local = kPosInf;
  }
  // the chosen chunk by the contract's 16-ary walk (decodekit/contract.h; CUDA block_draw twin)
  alignas(64) float e[kChunk + 16];
  const int64_t c0 = c * kChunk, n = std::min(V, c0 + kChunk) - c0;
  for (int64_t i = 0; i < n; i += 16) vstore(e + i, blk(c0 + i));
  double g16[kChunk / 16], g256[kChunk / 256];
  contract::walk16_sums(e, n, g16, g256);
  const int64_t k = contract::walk16_pick(e, n, g16, g256, local);
  return k >= 0 ? c0 + k : -1;
}

// Over n <= kListMax listed weights wf(k) with tokens idx[k]: the contract's 16-ary walk with
// Z = its total (the sampling list draw's; CUDA list_draw). -1 if no positive mass.
template <class WF>
inline int64_t draw_list(int64_t n, const WF& wf, const int32_t* idx, double u) {
  static_assert(kListMax <= contract::kWalkMax, "a list is one walk");
  float e[kListMax];
  double g16[kListMax / 16], g256[kListMax / 256 + 1];
  for (int64_t k = 0; k < n; ++k) e[k] = wf(k);
  double Z;
  const int64_t k = contract::walk16_draw(e, n, u, g16, g256, &Z);  // -1: no positive weight (Z = 0)
  return k >= 0 ? idx[k] : -1;
}

// Position of token tok in the (index-ordered) survivor list, or -1.
inline int64_t list_pos(const Scratch& s, int64_t n, int64_t tok) {
  const int32_t* b = s.idx.data();
  const int32_t* e = b + n;
  const int32_t* it = std::lower_bound(b, e, int32_t(tok));
  return (it != e && *it == tok) ? int64_t(it - b) : -1;
}

inline void insert_sorted(std::vector<int64_t>& r, int64_t x) { r.insert(std::upper_bound(r.begin(), r.end(), x), x); }

// ---- one node --------------------------------------------------------------------------------
// Verify the children (tokens kids[0..k)) of one node. Returns the index of the accepted child,
// or -1 with *emit = the token the node emits. q: the node's draft row (nullptr = one-hot drafts).
template <class T>
int64_t verify_node(const TNode<T>& tn, const float* q, const int64_t* kids, int64_t k, const RngKey& key,
                    int64_t depth, int64_t* emit, Scratch& s, SpecScratch& ss, const SpecCoin* coin = nullptr) {
  if (!tn.valid) {
    *emit = 0;
    return -1;
  }
  if (tn.greedy) {
    for (int64_t i = 0; i < k; ++i)
      if (kids[i] == tn.argmax) return i;
    *emit = tn.argmax;
    return -1;
  }
  const int64_t V = tn.V;
  const VF zero = vset(0.f);
  ss.removed.clear();
  double Mr = 0.0;       // one-hot: target mass of the rejected children
  double Mq = 0.0;       // draft probs: draft mass of the rejected children
  bool mat = false;      // draft probs: residual materialised in ss.rbuf (scaled by 1/Zr)
  bool pending = false;  // draft probs: the last rejection's subtraction is not materialised yet
  bool broke = false;    // draft probs: the materialised residual has no mass (rounding)
  double Zr = 1.0;
  float scf = 1.f;  // scale of q in the pending subtraction (1 / (1 - Mq) at the last rejection)
  int64_t rejected = 0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t x = kids[i];
    if (rejected > 0 && std::binary_search(ss.removed.begin(), ss.removed.end(), x)) continue;  // repeated token
    if (!q) {
      const double px = target_p(tn, x);
      const bool ok =
          coin ? spec_coin_accept(*coin, Mr, px) : spec_accept(spec_accept_uniform(key, depth, i), px, 1.0 - Mr);
      if (ok) return i;
      Mr += px;
      insert_sorted(ss.removed, x);
      ++rejected;
      continue;
    }
    if (pending) {
      // materialise r <- max(r - q_prev, 0) (rejected tokens forced to 0), and its mass
      const VF vs = vset(scf), vinv = vset(float(1.0 / Zr));
      if (tn.list) {
        const int64_t n = tn.sel.nS;
        if (!mat) ss.rbuf.resize(size_t(n));
        for (int64_t kk = 0; kk < n; ++kk) {
          const int64_t tok = s.idx[kk];
          const float r = mat ? ss.rbuf[size_t(kk)] * float(1.0 / Zr) : s.wt[kk] * tn.invZf;
          float d = r - q[tok] * scf;
          d = d > 0.f ? d : 0.f;
          if (std::binary_search(ss.removed.begin(), ss.removed.end(), tok)) d = 0.f;
          ss.rbuf[size_t(kk)] = d;
        }
        Zr = contract::walk16_total(ss.rbuf.data(), n);  // the contract's list mass
      } else {
        if (ss.rbuf.size() < size_t(V + 16)) ss.rbuf.resize(size_t(V + 16));
        Excl ex{&ss.removed};
        VD acc = vd_zero();
        Zr = 0.0;  // the canonical order (decodekit/contract.h): chunk masses in chunk order
        for (int64_t b = 0; b < V; b += 16) {
          VF r = mat ? vmul(vload(ss.rbuf.data() + b), vinv) : pblock(tn, b);
          VF d = vmax(vsub(r, vmul(load_block(q, b, V, 0.f), vs)), zero);
          d = vblend(ex.mask(b), d, zero);
          if (b + 16 > V) d = vblend(M16(0xffffu << (V - b)) & 0xffffu, d, zero);
          vstore(ss.rbuf.data() + b, d);
          vd_add(acc, d);
          if ((b + 16) % kChunk == 0 || b + 16 >= V) {
            Zr += vd_reduce(acc);
            acc = vd_zero();
          }
        }
      }
      mat = true;
      pending = false;
      if (!(Zr > 0.0)) {
        broke = true;
        break;
      }  // no residual mass left (only through rounding): draw from p
    }
    const double u = spec_accept_uniform(key, depth, i);
    const double qi = double(q[x]) / (1.0 - Mq);
    double rx;
    if (!mat)
      rx = target_p(tn, x);
    else if (tn.list) {
      const int64_t pos = list_pos(s, tn.sel.nS, x);
      rx = pos < 0 ? 0.0 : double(ss.rbuf[size_t(pos)]) / Zr;
    } else
      rx = double(ss.rbuf[size_t(x)]) / Zr;
    if (spec_accept(u, rx, qi)) return i;
    scf = float(1.0 / (1.0 - Mq));
    Mq += double(q[x]);
    insert_sorted(ss.removed, x);
    ++rejected;
    pending = true;
  }
  const double u = coin ? coin->final : spec_draw_uniform(key, depth);
  int64_t tok = -1;
  Excl ex{&ss.removed};
  if (rejected == 0 || broke) {
    // bonus: the target itself
    if (tn.list)
      tok = draw_list(tn.sel.nS, [&](int64_t kk) { return s.wt[kk]; }, s.idx.data(), u);
    else
      tok = draw_blocks(V, [&](int64_t b) { return wblock(tn, b); }, u, ss.chunks);
  } else if (!q) {
    // p without the rejected children
    if (tn.list) {
      tok = draw_list(
          tn.sel.nS,
          [&](int64_t kk) {
            return std::binary_search(ss.removed.begin(), ss.removed.end(), int64_t(s.idx[kk])) ? 0.f : s.wt[kk];
          },
          s.idx.data(), u);
    } else {
      tok = draw_blocks(V, [&](int64_t b) { return vblend(ex.mask(b), wblock(tn, b), zero); }, u, ss.chunks);
    }
  } else {
    // max(r - q_k, 0) for the last rejected child, on the fly
    const VF vs = vset(scf), vinv = vset(float(1.0 / Zr));
    const float finv = float(1.0 / Zr);
    if (tn.list) {
      tok = draw_list(
          tn.sel.nS,
          [&](int64_t kk) {
            const int64_t t = s.idx[kk];
            if (std::binary_search(ss.removed.begin(), ss.removed.end(), t)) return 0.f;
            const float r = mat ? ss.rbuf[size_t(kk)] * finv : s.wt[kk] * tn.invZf;
            const float d = r - q[t] * scf;
            return d > 0.f ? d : 0.f;
          },
          s.idx.data(), u);
    } else {
      tok = draw_blocks(
          V,
          [&](int64_t b) {
            VF r = mat ? vmul(vload(ss.rbuf.data() + b), vinv) : pblock(tn, b);
            VF d = vmax(vsub(r, vmul(load_block(q, b, V, 0.f), vs)), zero);
            return vblend(ex.mask(b), d, zero);
          },
          u, ss.chunks);
    }
  }
  if (tok < 0) {  // the residual has no mass (rounding or invalid input): fall back to p itself
    if (tn.list)
      tok = draw_list(tn.sel.nS, [&](int64_t kk) { return s.wt[kk]; }, s.idx.data(), u);
    else
      tok = draw_blocks(V, [&](int64_t b) { return wblock(tn, b); }, u, ss.chunks);
  }
  *emit = tok < 0 ? 0 : tok;
  return -1;
}

// The accept test alone (FlashInfer's accepted count considers every draft on its own).
template <class T>
inline bool accept_alone(const TNode<T>& tn, const float* q, int64_t x, const RngKey& key, int64_t depth) {
  if (!tn.valid) return false;
  if (tn.greedy) return x == tn.argmax;
  return spec_accept(spec_accept_uniform(key, depth, 0), target_p(tn, x), q ? double(q[x]) : 1.0);
}

inline RngKey spec_key(const SpecRng& r, int64_t b) { return row_rng_key(r, b); }

inline RowParamsF spec_params(const SpecTarget& t, int64_t b) {
  if (t.kind != SpecTargetKind::Logits) return RowParamsF{};
  return row_params(t.filter, b);
}

// ---- chain -----------------------------------------------------------------------------------
template <class T>
static void chain_rows_t(const ChainArgs& a, int64_t begin, int64_t end) {
  Scratch& s = scratch();
  SpecScratch& ss = spec_scratch();
  const T* base = static_cast<const T*>(a.target.data);
  const int64_t N = a.N, V = a.target.V;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t n = a.num_draft ? a.num_draft[b] : N;
    const RngKey key = spec_key(a.rng, b);
    const RowParamsF rp = spec_params(a.target, b);
    const int64_t* ids = a.draft_ids + b * N;
    int64_t* out = a.out_ids + b * (N + 1);
    int64_t stop = -1, emit = 0;
    int32_t acc = 0;
    for (int64_t j = 0; j < n; ++j) {
      TNode<T> tn;
      prepare_node(tn, base + b * a.target.stride_b + j * a.target.stride_r, V, a.target.kind, rp, s);
      const float* q = a.draft.data ? a.draft.data + b * a.draft.stride_b + j * a.draft.stride_r : nullptr;
      const int64_t x = ids[j];
      if (stop >= 0) {
        acc += accept_alone(tn, q, x, key, j) ? 1 : 0;
        continue;
      }
      if (verify_node(tn, q, &x, 1, key, j, &emit, s, ss) == 0) {
        out[j] = x;
        ++acc;
      } else {
        stop = j;
      }
    }
    if (stop < 0) {  // every draft accepted: bonus token from p_{n+1}
      stop = n;
      TNode<T> tn;
      prepare_node(tn, base + b * a.target.stride_b + n * a.target.stride_r, V, a.target.kind, rp, s);
      verify_node(tn, nullptr, nullptr, 0, key, n, &emit, s, ss);
    }
    out[stop] = emit;
    for (int64_t j = stop + 1; j <= N; ++j) out[j] = -1;
    a.out_accepted[b] = acc;
    a.out_emitted[b] = int32_t(stop);
  }
}

// ---- tree ------------------------------------------------------------------------------------
template <class T>
static void tree_rows_t(const TreeArgs& a, int64_t begin, int64_t end) {
  Scratch& s = scratch();
  SpecScratch& ss = spec_scratch();
  const int64_t T_ = a.T, V = a.target.V;
  const bool ids_target = a.target.kind == SpecTargetKind::Ids;
  const T* base = ids_target ? nullptr : static_cast<const T*>(a.target.data);
  const int64_t* tids = ids_target ? static_cast<const int64_t*>(a.target.data) : nullptr;
  if (ss.seen.size() < size_t(T_)) {
    ss.seen.resize(size_t(T_));
    ss.stack.resize(size_t(T_));
  }
  for (int64_t b = begin; b < end; ++b) {
    if (a.skip && a.skip[b]) continue;  // a row the deferred checks found bad: outputs stay pre-filled
    const int64_t* cand = a.cand + b * T_;
    const int64_t* ri = a.retrive_index + b * T_;
    const int64_t* nt = a.next_token + b * T_;
    const int64_t* ns = a.next_sibling + b * T_;
    int64_t bad = -1;
    const int e = check_tree_row(cand, nt, ns, T_, ids_target ? INT64_MAX : V, ss.seen.data(), ss.stack.data(), &bad);
    a.err[b] = e;
    a.err_node[b] = bad;
    a.accept_num[b] = 0;
    if (e != kTreeOk) continue;
    const RngKey key = spec_key(a.rng, b);
    const RowParamsF rp = spec_params(a.target, b);
    int32_t* ai = a.accept_index + b * a.W;
    ai[0] = int32_t(ri[0]);
    int64_t acc = 0, cur = 0;
    while (true) {
      ss.kids.clear();
      ss.kid_nodes.clear();
      if (acc < a.W - 1)
        for (int64_t c = nt[cur]; c != -1; c = ns[c]) {
          ss.kid_nodes.push_back(c);
          ss.kids.push_back(cand[c]);
        }
      TNode<T> tn;
      if (ids_target) {
        tn.valid = true;
        tn.greedy = true;
        tn.argmax = tids[b * a.target.stride_b + cur * a.target.stride_r];
      } else {
        prepare_node(tn, base + b * a.target.stride_b + cur * a.target.stride_r, V, a.target.kind, rp, s);
      }
      const float* q = a.draft.data ? a.draft.data + b * a.draft.stride_b + cur * a.draft.stride_r : nullptr;
      int64_t emit = 0;
      SpecCoin coin;
      if (a.coins) coin = SpecCoin{a.coins[b * T_ + cur], a.coins_final[b], a.thr_single, a.thr_acc};
      const int64_t r = verify_node(tn, q, ss.kids.data(), int64_t(ss.kids.size()), key, acc, &emit, s, ss,
                                    a.coins ? &coin : nullptr);
      if (r >= 0) {
        const int64_t c = ss.kid_nodes[size_t(r)];
        a.predicts[ri[cur]] = ss.kids[size_t(r)];
        ++acc;
        ai[acc] = int32_t(ri[c]);
        cur = c;
        continue;
      }
      a.predicts[ri[cur]] = emit;
      break;
    }
    a.accept_num[b] = int32_t(acc);
  }
}

#define DK_SPEC_DISPATCH(t, fn, ...)                    \
  if ((t).kind != SpecTargetKind::Logits) {             \
    fn<float>(__VA_ARGS__);                             \
  } else                                                \
    switch ((t).dtype) {                                \
      case DType::F32: fn<float>(__VA_ARGS__); break;   \
      case DType::BF16: fn<bf16_t>(__VA_ARGS__); break; \
      case DType::F16: fn<f16_t>(__VA_ARGS__); break;   \
    }

static void chain_rows(const ChainArgs& a, int64_t b, int64_t e) { DK_SPEC_DISPATCH(a.target, chain_rows_t, a, b, e) }
static void tree_rows(const TreeArgs& a, int64_t b, int64_t e) { DK_SPEC_DISPATCH(a.target, tree_rows_t, a, b, e) }

}  // namespace dk::cpu::DK_ISA_NAME

#define DK_SPEC_STR2(x) #x
#define DK_SPEC_STR(x) DK_SPEC_STR2(x)
#define DK_SPEC_CAT2(a, b) a##b
#define DK_SPEC_CAT(a, b) DK_SPEC_CAT2(a, b)

namespace dk::cpu {
const SpecTable& DK_SPEC_CAT(spec_table_, DK_ISA_NAME)() {
  static const SpecTable t{DK_SPEC_STR(DK_ISA_NAME), &DK_ISA_NAME::chain_rows, &DK_ISA_NAME::tree_rows};
  return t;
}
}  // namespace dk::cpu
