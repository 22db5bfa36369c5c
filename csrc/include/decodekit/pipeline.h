// The whole sampling step (bitmask, bans, logit bias, penalties, then the truncations): the
// per-element arithmetic and the list steps (the truncations on the candidate list, the draw, the
// logprob formulas) shared by the CPU kernels (csrc/cpu/pipeline.h) and CUDA
// (csrc/cuda/pipeline.cuh). Torch-free.
// Every step is float32, element by element, in the order reference.process_logits defines, so
// all paths produce the same processed logit bit for bit (-ffp-contract=off: nothing is fused).
#pragma once
#include <cstdint>
#include "decodekit/common.h"
#include "decodekit/contract.h"
#include "decodekit/fmath.h"

namespace dk {

// Columns of the per-row parameter matrix ([n_out, kPipeParams] float64) of the pipeline op.
enum PipeParam : int {
  kPT = 0,    // temperature (0 = greedy)
  kPTopK,     // <= 0 or >= V: off
  kPTopP,     // >= 1: off
  kPMinP,     // 0: off
  kPRep,      // repetition penalty r > 0 (1: off)
  kPFreq,     // frequency penalty (0: off)
  kPPres,     // presence penalty (0: off)
  kPNSigma,   // top-n-sigma n (<= 0: off)
  kPTypical,  // typical_p in (0, 1] (1: off)
  kPEps,      // epsilon cutoff in [0, 1) (0: off)
  kPEta,      // eta cutoff in [0, 1) (0: off)
  kPTopH,     // top-h in [0, 1] (0: off)
  kPMtk,      // min_tokens_to_keep >= 1
  kPipeParams
};

enum class PipeOrder : int { Sequential = 0, Joint = 1, Vllm = 2 };

// Candidates TopHLogitsWarper looks at (its top_n).
constexpr int64_t kTopHCandidates = 100;

// Whether value v is in the range of params column c (NaN never is); the CPU binding turns a
// false into a ValueError, the CUDA kernel into an invalid row (no host read of device values).
DK_HOST_DEVICE bool pipe_param_ok(int c, double v) {
  if (v != v) return false;
  const bool finite = v - v == 0.0;
  switch (c) {
    case kPT: return temperature_ok(v);
    case kPTopK: return !finite || v == ::floor(v);
    case kPTopP: return top_p_ok(v);
    case kPMinP: return min_p_ok(v);
    case kPRep: return v > 0.0 && finite;
    case kPFreq:
    case kPPres:
    case kPNSigma: return finite;
    case kPTypical: return v > 0.0 && v <= 1.0;
    case kPEps:
    case kPEta: return v >= 0.0 && v < 1.0;
    case kPTopH: return v >= 0.0 && v <= 1.0;
    case kPMtk: return v >= 1.0 && v < 9.2e18 && v == ::floor(v);
    default: return true;
  }
}

// Every column of one params row in range; a token id of a list in [-1, V) (-1: padding); a
// logit-bias value finite. The CPU binding checks these eagerly (ValueErrors); with the deferred
// checks (CUDA, or forced on the CPU) the kernels make a row that fails them invalid.
DK_HOST_DEVICE bool pipe_params_ok(const double* q) {
  bool ok = true;
  for (int c = 0; c < kPipeParams; ++c) ok = ok && pipe_param_ok(c, q[c]);
  return ok;
}
DK_HOST_DEVICE bool pipe_id_ok(int64_t t, int64_t V) { return t >= -1 && t < V; }
DK_HOST_DEVICE bool pipe_bias_ok(float b) { return b - b == 0.f; }

// Bit j of word w allows token 32*w + j (xgrammar's int32 layout).
DK_HOST_DEVICE bool bitmask_allows(const int32_t* words, int64_t i) {
  return ((uint32_t(words[i >> 5]) >> uint32_t(i & 31)) & 1u) != 0u;
}
// 16 bits of the mask for the 16-aligned block starting at token i.
DK_HOST_DEVICE uint32_t bitmask_block16(const int32_t* words, int64_t i) {
  return (uint32_t(words[i >> 5]) >> uint32_t(i & 16)) & 0xFFFFu;
}
// Repetition penalty (HF, vLLM, CTRL): divide a positive logit by r, multiply the others.
DK_HOST_DEVICE float repetition_apply(float y, float r) { return y > 0.f ? y / r : y * r; }
// Frequency and presence penalties (OpenAI, vLLM) of a token seen c > 0 times in the output.
DK_HOST_DEVICE float count_penalty_apply(float y, float f, float q, uint32_t c) {
  const float fc = f * float(c);
  const float t = y - fc;
  return t - q;
}

// ---- per-row parameters and the list steps (shared: csrc/cpu/pipeline.h runs them on one CPU
// thread, csrc/cuda/pipeline.cuh on the row's whole block, through the primitives below) ----

struct PipeRow {
  float T = 1.f;
  int64_t k = 0;
  float p = 1.f, minp = 0.f;
  float rep = 1.f, freq = 0.f, pres = 0.f;
  double nsig = 0.0, typ = 1.0, eps = 0.0, eta = 0.0, toph = 0.0;
  int64_t mtk = 1;
};

// Row o's parameters (top_k beyond +-4e18, +-inf included, keeps its off meaning in int64).
DK_HOST_DEVICE PipeRow pipe_row(const double* q) {
  PipeRow r;
  r.T = float(q[kPT]);
  const double k = q[kPTopK];
  r.k = int64_t(k < -4e18 ? -4e18 : (k > 4e18 ? 4e18 : k));
  r.p = float(q[kPTopP]);
  r.minp = float(q[kPMinP]);
  r.rep = float(q[kPRep]);
  r.freq = float(q[kPFreq]);
  r.pres = float(q[kPPres]);
  r.nsig = q[kPNSigma];
  r.typ = q[kPTypical];
  r.eps = q[kPEps];
  r.eta = q[kPEta];
  r.toph = q[kPTopH];
  const double mtk = q[kPMtk];
  r.mtk = mtk >= 1.0 ? (mtk < 9.2e18 ? int64_t(mtk) : int64_t(9.2e18)) : 1;
  return r;
}

// The smallest float f with double(f) >= t (so that x >= f <=> double(x) >= t for every float x).
DK_HOST_DEVICE float float_at_least(double t) {
  if (!(t > double(kLowestFloat))) return kLowestFloat;
  float f = float(t);
  if (double(f) < t) {  // the next float up (as std::nextafter(f, +inf))
    const uint32_t u = float_to_bits(f);
    f = f == 0.f ? bits_to_float(1u) : bits_to_float((u & 0x80000000u) ? u - 1u : u + 1u);
  }
  return f;
}

// One truncation step on the list L (the renormalised survivors of the steps before it).
enum class Step : int { TopK, TopP, MinP, Typical, Epsilon, Eta, TopH };

// Step j (0..6) of an order: sequential top-k, top-p, min-p, ...; vllm: min-p first.
DK_HOST_DEVICE Step pipe_step(PipeOrder order, int j) {
  if (order == PipeOrder::Vllm && j < 3) return j == 0 ? Step::MinP : (j == 1 ? Step::TopK : Step::TopP);
  return Step(j);
}

DK_HOST_DEVICE bool step_on(Step st, const PipeRow& r, int64_t V) {
  switch (st) {
    case Step::TopK: return r.k >= 1 && r.k < V;
    case Step::TopP: return r.p < 1.f;
    case Step::MinP: return r.minp > 0.f;
    case Step::Typical: return r.typ < 1.0;
    case Step::Epsilon: return r.eps > 0.0;
    case Step::Eta: return r.eta > 0.0;
    case Step::TopH: return r.toph > 0.0;
  }
  return false;
}

// The list L: (value, index) of the current survivors in index order, their weights.
struct PipeList {
  float* v;
  float* w;
  int32_t* i;
  int64_t n;
};

// A (value, weight) pair of top_p_quickselect; PipeDW: a double value (typical's cut, negated
// scores).
struct PipeVW {
  float v, w;
};
struct PipeDW {
  double v;
  float w;
};

// Per-list scratch of the steps, each with room for L.n entries.
struct ListScratch {
  float* tv;       // float scratch (the weights in a sorted order)
  double* ld;      // per-entry doubles (entropy terms, typical's scores)
  int32_t* ord;    // an order of the list (the GPU's sort pads it to a power of two)
  PipeVW* pairs;   // top-p's (value, weight) pairs (the CPU's quickselect; null on the GPU)
  PipeDW* dpairs;  // typical's (-score, weight) pairs (the CPU's quickselect; null on the GPU)
  uint8_t* keep;   // keep flags of one step
  uint8_t* acc;    // keep flags of all steps (joint)
};

// Top-p threshold by mass quickselect over a[0..n) (value, weight pairs with .v / .w; float or
// double values): the smallest value v such that the mass of the values strictly greater than v
// is < P (the smallest value when no prefix of tie groups reaches P). Linear expected time; a is
// permuted. Deterministic: the same pivots, partition and sums on every path (equal values carry
// equal weights, so the order inside a tie group never matters).
template <class VWT>
DK_HOST_DEVICE decltype(VWT::v) top_p_quickselect(VWT* a, int64_t n, double P, double base = 0.0) {
  using K = decltype(VWT::v);
  int64_t lo = 0, hi = n;
  K best = kPosInf;
  while (hi > lo) {
    if (hi - lo <= 24) {  // insertion sort, value descending
      for (int64_t i = lo + 1; i < hi; ++i) {
        const VWT t = a[i];
        int64_t j = i;
        for (; j > lo && a[j - 1].v < t.v; --j) a[j] = a[j - 1];
        a[j] = t;
      }
      int64_t i = lo;
      while (i < hi && base < P) {
        const K v = a[i].v;
        best = v;
        double g = 0.0;
        while (i < hi && a[i].v == v) {
          g += double(a[i].w);
          ++i;
        }
        base += g;
      }
      return best;
    }
    const K x = a[lo].v, y = a[lo + (hi - lo) / 2].v, z = a[hi - 1].v;
    // median of three, as std::max(std::min(x, y), std::min(std::max(x, y), z))
    const K mn = y < x ? y : x, mx = x < y ? y : x, mz = z < mx ? z : mx;
    const K piv = mn < mz ? mz : mn;
    // 3-way partition: [lo, gt) > piv, [gt, lt) == piv, [lt, hi) < piv
    int64_t gt = lo, i = lo, lt = hi;
    double mgt = 0.0, meq = 0.0;
    while (i < lt) {
      const K v = a[i].v;
      if (v > piv) {
        mgt += double(a[i].w);
        const VWT t = a[gt];
        a[gt] = a[i];
        a[i] = t;
        ++gt;
        ++i;
      } else if (v < piv) {
        --lt;
        const VWT t = a[i];
        a[i] = a[lt];
        a[lt] = t;
      } else {
        meq += double(a[i].w);
        ++i;
      }
    }
    if (base + mgt >= P) {
      hi = gt;
      continue;
    }
    best = piv;
    base += mgt + meq;
    if (base >= P || lt == hi) return best;
    lo = lt;
  }
  return best;
}

// The weight of a processed value: exp((v - m) / T) as (v - m) * invT.
DK_HOST_DEVICE float pipe_weight(float v, float m, float invT) { return dk_exp((v - m) * invT); }

// ---- the list steps, written once against a set of primitives (Ops) -------------------------
// The CPU runs them on one thread (csrc/cpu/pipeline.h SerialListOps), the CUDA kernel on every
// thread of the row's block (csrc/cuda/pipeline.cuh BlockListOps: every thread calls the step
// with the same arguments; each primitive returns the same value to all of them):
//   ops.each(n, f)            f(j) for every j in [0, n), in any order (the GPU: a barrier after)
//   ops.serial(f)             f() once (the GPU: thread 0, then a barrier)
//   ops.mth_largest(v, n, m)  the m-th largest of v[0..n) (1 <= m <= n; exact)
//   ops.max(w, n)             the largest of w[0..n) (n >= 1; exact)
//   ops.mass(e, n)            contract::walk16_total(e, n), float or double e (the list mass)
//   ops.sort(ord, n, key, d)  the positions ord[0..n) sorted by key(j), ascending (descending if
//                             d), ties by position j ascending (a total order: unique result)
//   ops.candidates(v, n, c, ord, &na)  the positions j in [0, n) with v[j] >= c in ord, value
//                             descending, position ascending; returns their count and sets na to
//                             the count with v[j] > c (they come first). Only those na are sorted
//                             (few when c is an m-th largest value); the ones at c follow in
//                             position order as they are found.
//   ops.filter(L, keep)       keeps the entries of L with keep[j] != 0 (order kept)
//   ops.top_p(L, P, s)        top-p's cut: the smallest value v of L whose strictly greater values
//                             weigh < P. The CPU: histograms of the order keys, then
//                             top_p_quickselect (csrc/cpu/mass_select.h); the GPU: a mass-weighted
//                             radix select over L (block_top_p: sums per digit in a fixed block
//                             order). The same value unless the mass above the cut lies within a
//                             few double ulps of P (documented, as for sample).
//   ops.low_cut(sc, w, n, P, s)  typical's cut, top-p's mirror on double scores: the largest score
//                             of sc[0..n) whose strictly smaller scores weigh < P (weights w[j],
//                             or 1 each when w is null: then, with P = m, the m-th smallest
//                             score); the largest score when no prefix of tie groups reaches P.
//                             The CPU: the same select as top-p's over (-score, weight) pairs; the
//                             GPU: the mass-weighted radix select over the scores' order keys
//                             (block_low_cut). No sort of the list on either.
// Every mass is the contract's 16-ary walk total (decodekit/contract.h), a fixed order that a GPU
// sums on all its threads, so the survivors and tokens are the same on CPU and GPU.

// Value of the m-th largest of L (m >= 1, clamped to n); the largest (every step's default
// min_tokens_to_keep = 1) by one max pass instead of a selection.
template <class Ops>
DK_HOST_DEVICE float list_mth_largest(const PipeList& L, int64_t m, const Ops& ops) {
  if (m <= 1) return ops.max(L.v, L.n);
  return ops.mth_largest(L.v, L.n, m < L.n ? m : L.n);
}

// The mass of L: the walk total of its weights in list order.
template <class Ops>
DK_HOST_DEVICE double list_mass(const PipeList& L, const Ops& ops) {
  return ops.mass(L.w, L.n);
}

// Log-probability of a list value with the row max m and the list's log-mass lz.
DK_HOST_DEVICE double list_logprob(float v, float m, float invT, double lz) { return double((v - m) * invT) - lz; }

// Entropy of the renormalised distribution of L: -(walk total of the terms p_j log p_j), the
// terms left in s.ld.
template <class Ops>
DK_HOST_DEVICE double list_entropy(const PipeList& L, float m, float invT, double Z, const ListScratch& s,
                                   const Ops& ops) {
  const double lz = ::log(Z);
  const float *v = L.v, *w = L.w;
  double* t = s.ld;
  ops.each(L.n, [=](int64_t j) { t[j] = w[j] > 0.f ? (double(w[j]) / Z) * list_logprob(v[j], m, invT, lz) : 0.0; });
  return -ops.mass(t, L.n);
}

// Keep flags (s.keep) of step `st` over L (n >= 1); min_tokens_to_keep: values >= the mtk-th
// largest stay.
template <class Ops>
DK_HOST_DEVICE void step_keep(Step st, const PipeList& L, const PipeRow& r, float m, float invT, const ListScratch& s,
                              const Ops& ops) {
  uint8_t* keep = s.keep;
  const int64_t n = L.n;
  const float *v = L.v, *w = L.w;
  const float vm = list_mth_largest(L, r.mtk, ops);
  switch (st) {
    case Step::TopK: {
      const int64_t k = r.k > r.mtk ? r.k : r.mtk;
      const float t = n > k ? list_mth_largest(L, k, ops) : kNegInf;
      ops.each(n, [=](int64_t j) { keep[j] = v[j] >= t; });
      return;
    }
    case Step::TopP: {
      const double Z = list_mass(L, ops);
      const float t = ops.top_p(L, double(r.p) * Z, s);
      ops.each(n, [=](int64_t j) { keep[j] = v[j] >= t || v[j] >= vm; });
      return;
    }
    case Step::MinP: {
      const double t = double(r.minp) * double(ops.max(w, n));
      ops.each(n, [=](int64_t j) { keep[j] = double(w[j]) >= t || v[j] >= vm; });
      return;
    }
    case Step::Epsilon:
    case Step::Eta: {
      const double Z = list_mass(L, ops);
      double cut = r.eps;
      if (st == Step::Eta) {
        const double H = list_entropy(L, m, invT, Z, s, ops);
        const double c2 = ::sqrt(r.eta) * ::exp(-H);
        cut = r.eta < c2 ? r.eta : c2;
      }
      ops.each(n, [=](int64_t j) { keep[j] = double(w[j]) / Z >= cut || v[j] >= vm; });
      return;
    }
    case Step::Typical: {
      // shifted scores |-log p - H|; a tie group of scores is kept while the mass of the strictly
      // smaller scores is < typical_p (low_cut: a mass select, no sort), and the mtk smallest
      // scores stay
      const double Z = list_mass(L, ops);
      const double H = list_entropy(L, m, invT, Z, s, ops);
      const double lz = ::log(Z);
      double* sc = s.ld;
      ops.each(n, [=](int64_t j) { sc[j] = ::fabs(-list_logprob(v[j], m, invT, lz) - H); });
      double cut = ops.low_cut(sc, w, n, r.typ * Z, s);
      if (r.mtk > 1) {  // the mtk-th smallest score (1 each: the count of strictly smaller < mtk)
        const double sm = ops.low_cut(sc, nullptr, n, double(r.mtk < n ? r.mtk : n), s);
        cut = sm > cut ? sm : cut;
      }
      ops.each(n, [=](int64_t j) { keep[j] = sc[j] <= cut; });
      return;
    }
    case Step::TopH: {
      // the candidates: values >= the 100th largest cv (ties kept), most probable first: the < 100
      // above cv sorted, then the ones at cv in position order (ties at cv can make them up to n)
      const float cv = list_mth_largest(L, kTopHCandidates, ops);
      int32_t* ord = s.ord;
      int64_t na = 0;
      const int64_t nc = ops.candidates(v, n, cv, ord, &na);
      float* e = s.tv;
      double* term = s.ld;
      ops.each(nc, [=](int64_t q) { e[q] = w[ord[q]]; });
      const double Zn = ops.mass(e, nc), lz = ::log(Zn);
      ops.each(nc, [=](int64_t q) {
        term[q] = e[q] > 0.f ? -(double(e[q]) / Zn) * list_logprob(v[ord[q]], m, invT, lz) : 0.0;
      });
      const double tau = r.toph * ops.mass(term, nc);
      ops.each(n, [=](int64_t j) { keep[j] = v[j] >= vm; });
      // the cut: a tie group of values stays while the entropy terms before it plus its first term
      // are <= tau (the first group always); a walk over the groups above cv (< 100 entries) on
      // one thread; the last group (the entries at cv) is decided there by its first entry, and
      // the rest of it follows on all threads
      ops.serial([=]() {
        double cum = 0.0;
        for (int64_t g = 0; g < nc;) {
          const float gv = v[ord[g]];
          const int64_t q_end = gv == cv ? g + 1 : nc;  // (the group at cv: its first entry)
          int64_t q = g;
          double gs = 0.0;
          do {  // at least the group's first entry: the walk advances whatever v holds
            gs = contract::dadd_rn(gs, term[q++]);
          } while (q < q_end && v[ord[q]] == gv);
          if (g == 0 || contract::dadd_rn(cum, term[g]) <= tau)
            for (int64_t t = g; t < q; ++t) keep[ord[t]] = 1;
          cum = contract::dadd_rn(cum, gs);
          g = gv == cv ? nc : q;
        }
      });
      if (nc > na + 1) {
        const int32_t* ties = ord + na;
        ops.each(nc - na - 1, [=](int64_t t) { keep[ties[t + 1]] = keep[ties[0]]; });
      }
      return;
    }
  }
}

// The truncations after the start list: every enabled step in the order's sequence, each on the
// survivors of the ones before it; joint: each on the whole start list, flags intersected with
// {v >= lo} (top-n-sigma). m = the row's max processed value.
template <class Ops>
DK_HOST_DEVICE void run_truncations(PipeList& L, const PipeRow& r, PipeOrder order, int64_t V, float m, float invT,
                                    float lo, const ListScratch& s, const Ops& ops) {
  const bool joint = order == PipeOrder::Joint;
  uint8_t *acc = s.acc, *keep = s.keep;
  const float* v = L.v;
  if (joint) ops.each(L.n, [=](int64_t t) { acc[t] = v[t] >= lo; });
  for (int j = 0; j < 7; ++j) {
    const Step st = pipe_step(order, j);
    if (!step_on(st, r, V) || L.n == 0) continue;
    step_keep(st, L, r, m, invT, s, ops);
    if (joint) {
      ops.each(L.n, [=](int64_t t) { acc[t] &= keep[t]; });
    } else {
      ops.filter(L, keep);
    }
  }
  if (joint) ops.filter(L, acc);
}

// Whether any truncation of the row is on.
DK_HOST_DEVICE bool any_truncation(const PipeRow& r, int64_t V) {
  bool any = r.nsig > 0.0;
  for (int j = 0; j < 7; ++j) any = any || step_on(Step(j), r, V);
  return any;
}

// Pads a top-n list holding h entries up to n with the lowest token ids not in idx[0..nl)
// (ascending), at -inf.
DK_HOST_DEVICE void top_n_pad(const int32_t* idx, int64_t nl, int64_t h, int64_t n, int64_t* ids, float* vals) {
  int64_t j = h, t = 0, c = 0;
  while (j < n) {
    if (c < nl && idx[c] == t) {
      ++c;
      ++t;
      continue;
    }
    ids[j] = t;
    vals[j] = kNegInf;
    ++j;
    ++t;
  }
}

// Logprobs: log_softmax of a value of a row with max mm and log-mass lz (raw / greedy modes), and
// the log-probability of a list weight w in a list of log-mass lz (processed mode).
DK_HOST_DEVICE float logprob_of_value(float v, float mm, double lz) { return float(double(v - mm) - lz); }
DK_HOST_DEVICE float logprob_of_weight(float w, double lz) { return w > 0.f ? float(::log(double(w)) - lz) : kNegInf; }

}  // namespace dk
