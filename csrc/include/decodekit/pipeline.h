// The whole sampling step (bitmask, bans, logit bias, penalties, then the truncations): the
// per-element arithmetic and the list steps (the truncations on the candidate list, the draw, the
// logprob formulas) shared by the CPU kernels (csrc/cpu/pipeline.h) and CUDA
// (csrc/cuda/pipeline.cuh). Torch-free.
// Every step is float32, element by element, in the order reference.process_logits defines, so
// all paths produce the same processed logit bit for bit (-ffp-contract=off: nothing is fused).
#pragma once
#include <cstdint>
#include "decodekit/common.h"
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
// thread, csrc/cuda/pipeline.cuh on one thread of the row's block, so both give the same bits) ----

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
  if (!(t > -3.4028234663852886e38)) return -3.4028234663852886e38f;
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

// A (value, weight) pair of top_p_quickselect.
struct PipeVW {
  float v, w;
};

// Per-list scratch of the steps, each with room for L.n entries (pairs may alias ld).
struct ListScratch {
  float* tv;      // m-th largest scratch
  double* ld;     // log-probabilities / scores
  int32_t* ord;   // an order of the list
  PipeVW* pairs;  // top-p's (value, weight) pairs
  uint8_t* keep;  // keep flags of one step
  uint8_t* acc;   // keep flags of all steps (joint)
};

// Top-p threshold by mass quickselect over a[0..n) (value, weight pairs with .v / .w): the
// smallest value v such that the mass of the values strictly greater than v is < P. Linear
// expected time; a is permuted. Deterministic: the same pivots, partition and sums on every
// path (equal values carry equal weights, so the order inside a tie group never matters).
template <class VWT>
DK_HOST_DEVICE float top_p_quickselect(VWT* a, int64_t n, double P, double base = 0.0) {
  int64_t lo = 0, hi = n;
  float best = kPosInf;
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
        const float v = a[i].v;
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
    const float x = a[lo].v, y = a[lo + (hi - lo) / 2].v, z = a[hi - 1].v;
    // median of three, as std::max(std::min(x, y), std::min(std::max(x, y), z))
    const float mn = y < x ? y : x, mx = x < y ? y : x, mz = z < mx ? z : mx;
    const float piv = mn < mz ? mz : mn;
    // 3-way partition: [lo, gt) > piv, [gt, lt) == piv, [lt, hi) < piv
    int64_t gt = lo, i = lo, lt = hi;
    double mgt = 0.0, meq = 0.0;
    while (i < lt) {
      const float v = a[i].v;
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

// Heap sort of ord[0..n) by less(a, b) (a strict total order, so the result is unique).
template <class Less>
DK_HOST_DEVICE void heap_sort(int32_t* ord, int64_t n, const Less& less) {
  auto sift = [&](int64_t r, int64_t end) {
    for (;;) {
      int64_t c = 2 * r + 1;
      if (c >= end) return;
      if (c + 1 < end && less(ord[c], ord[c + 1])) ++c;
      if (!less(ord[r], ord[c])) return;
      const int32_t t = ord[r];
      ord[r] = ord[c];
      ord[c] = t;
      r = c;
    }
  };
  for (int64_t r = n / 2 - 1; r >= 0; --r) sift(r, n);
  for (int64_t e = n - 1; e > 0; --e) {
    const int32_t t = ord[0];
    ord[0] = ord[e];
    ord[e] = t;
    sift(0, e);
  }
}

// The m-th largest of t[0..n) (1 <= m <= n) by quickselect; t is permuted.
DK_HOST_DEVICE float nth_largest_select(float* t, int64_t n, int64_t m) {
  int64_t lo = 0, hi = n, want = m - 1;
  while (hi - lo > 1) {
    const float piv = t[lo + (hi - lo) / 2];
    int64_t gt = lo, i = lo, lt = hi;  // [lo, gt) > piv, [gt, lt) == piv, [lt, hi) < piv
    while (i < lt) {
      const float v = t[i];
      if (v > piv) {
        t[i] = t[gt];
        t[gt++] = v;
        ++i;
      } else if (v < piv) {
        t[i] = t[--lt];
        t[lt] = v;
      } else {
        ++i;
      }
    }
    if (want < gt)
      hi = gt;
    else if (want < lt)
      return piv;
    else
      lo = lt;
  }
  return t[lo];
}

// The primitives of the list steps with the device-friendly algorithms above (the CPU passes
// its own std:: versions: the results are values / total orders, the same whatever the method).
struct PortableListOps {
  DK_HOST_DEVICE_SPEC float nth_largest(float* t, int64_t n, int64_t m) const { return nth_largest_select(t, n, m); }
  template <class Less>
  DK_HOST_DEVICE_SPEC void sort(int32_t* ord, int64_t n, const Less& less) const {
    heap_sort(ord, n, less);
  }
};

// The weight of a processed value: exp((v - m) / T) as (v - m) * invT.
DK_HOST_DEVICE float pipe_weight(float v, float m, float invT) { return dk_exp((v - m) * invT); }

// Value of the m-th largest of L (m >= 1, clamped to n).
template <class Ops>
DK_HOST_DEVICE float list_mth_largest(const PipeList& L, int64_t m, const ListScratch& s, const Ops& ops) {
  m = m < L.n ? m : L.n;
  for (int64_t j = 0; j < L.n; ++j) s.tv[j] = L.v[j];
  return ops.nth_largest(s.tv, L.n, m);
}

// Sequential double sum of the weights of L in list order.
DK_HOST_DEVICE double list_mass(const PipeList& L) {
  double Z = 0.0;
  for (int64_t j = 0; j < L.n; ++j) Z += double(L.w[j]);
  return Z;
}

// Keeps the entries with keep[j] != 0 (order preserved).
DK_HOST_DEVICE void list_filter(PipeList& L, const uint8_t* keep) {
  int64_t n = 0;
  for (int64_t j = 0; j < L.n; ++j)
    if (keep[j]) {
      L.v[n] = L.v[j];
      L.w[n] = L.w[j];
      L.i[n] = L.i[j];
      ++n;
    }
  L.n = n;
}

// Entropy of the renormalised distribution of L; s.ld[j] = log p_j.
DK_HOST_DEVICE double list_entropy(const PipeList& L, float m, float invT, double Z, const ListScratch& s) {
  const double lz = ::log(Z);
  double H = 0.0;
  for (int64_t j = 0; j < L.n; ++j) {
    const double lp = double((L.v[j] - m) * invT) - lz;
    s.ld[j] = lp;
    if (L.w[j] > 0.f) H -= (double(L.w[j]) / Z) * lp;
  }
  return H;
}

// Keep flags (s.keep) of step `st` over L; min_tokens_to_keep: values >= the mtk-th largest stay.
template <class Ops>
DK_HOST_DEVICE void step_keep(Step st, const PipeList& L, const PipeRow& r, float m, float invT, const ListScratch& s,
                              const Ops& ops) {
  uint8_t* keep = s.keep;
  const int64_t n = L.n;
  for (int64_t j = 0; j < n; ++j) keep[j] = 0;
  if (n == 0) return;
  const float vm = list_mth_largest(L, r.mtk, s, ops);
  switch (st) {
    case Step::TopK: {
      const int64_t k = r.k > r.mtk ? r.k : r.mtk;
      const float t = n > k ? list_mth_largest(L, k, s, ops) : kNegInf;
      for (int64_t j = 0; j < n; ++j) keep[j] = L.v[j] >= t;
      return;
    }
    case Step::TopP: {
      const double Z = list_mass(L);
      for (int64_t j = 0; j < n; ++j) s.pairs[j] = PipeVW{L.v[j], L.w[j]};
      const float t = top_p_quickselect(s.pairs, n, double(r.p) * Z);
      for (int64_t j = 0; j < n; ++j) keep[j] = L.v[j] >= t || L.v[j] >= vm;
      return;
    }
    case Step::MinP: {
      float wmax = 0.f;
      for (int64_t j = 0; j < n; ++j) wmax = L.w[j] > wmax ? L.w[j] : wmax;
      const double t = double(r.minp) * double(wmax);
      for (int64_t j = 0; j < n; ++j) keep[j] = double(L.w[j]) >= t || L.v[j] >= vm;
      return;
    }
    case Step::Epsilon:
    case Step::Eta: {
      const double Z = list_mass(L);
      double cut = r.eps;
      if (st == Step::Eta) {
        const double H = list_entropy(L, m, invT, Z, s);
        const double c2 = ::sqrt(r.eta) * ::exp(-H);
        cut = r.eta < c2 ? r.eta : c2;
      }
      for (int64_t j = 0; j < n; ++j) keep[j] = double(L.w[j]) / Z >= cut || L.v[j] >= vm;
      return;
    }
    case Step::Typical: {
      const double Z = list_mass(L);
      const double H = list_entropy(L, m, invT, Z, s);
      double* sc = s.ld;
      for (int64_t j = 0; j < n; ++j) sc[j] = ::fabs(-sc[j] - H);  // shifted score
      int32_t* ord = s.ord;
      for (int64_t j = 0; j < n; ++j) ord[j] = int32_t(j);
      ops.sort(ord, n, [sc](int32_t a, int32_t b) { return sc[a] < sc[b] || (sc[a] == sc[b] && a < b); });
      // keep a tie group of scores while the mass of strictly smaller scores is < typical_p
      const double P = r.typ * Z;
      double below = 0.0;
      const double sm = sc[ord[(r.mtk < n ? r.mtk : n) - 1]];  // the mtk-th smallest score
      for (int64_t g = 0; g < n;) {
        const double sg = sc[ord[g]];
        int64_t e = g;
        double gm = 0.0;
        while (e < n && sc[ord[e]] == sg) {
          gm += double(L.w[ord[e]]);
          ++e;
        }
        const bool k = below < P || sg <= sm;
        for (int64_t t = g; t < e; ++t) keep[ord[t]] = k;
        below += gm;
        g = e;
      }
      return;
    }
    case Step::TopH: {
      // the candidates: values >= the 100th largest (ties kept), most probable first
      const float cv = list_mth_largest(L, kTopHCandidates, s, ops);
      int32_t* ord = s.ord;
      int64_t nc = 0;
      for (int64_t j = 0; j < n; ++j)
        if (L.v[j] >= cv) ord[nc++] = int32_t(j);
      const float* lv = L.v;
      ops.sort(ord, nc, [lv](int32_t a, int32_t b) { return lv[a] > lv[b] || (lv[a] == lv[b] && a < b); });
      double Zn = 0.0;
      for (int64_t t = 0; t < nc; ++t) Zn += double(L.w[ord[t]]);
      const double lz = ::log(Zn);
      double H = 0.0;
      for (int64_t t = 0; t < nc; ++t) {
        const int32_t j = ord[t];
        const double q = double(L.w[j]) / Zn;
        const double term = q > 0.0 ? -q * (double((L.v[j] - m) * invT) - lz) : 0.0;
        s.ld[t] = term;
        H += term;
      }
      const double tau = r.toph * H;
      double cum = 0.0;
      for (int64_t g = 0; g < nc;) {
        const float v = L.v[ord[g]];
        int64_t e = g;
        double gs = 0.0;
        while (e < nc && L.v[ord[e]] == v) {
          gs += s.ld[e];
          ++e;
        }
        const bool k = g == 0 || cum + s.ld[g] <= tau;
        for (int64_t t = g; t < e; ++t) keep[ord[t]] = k;
        cum += gs;
        g = e;
      }
      for (int64_t j = 0; j < n; ++j) keep[j] = keep[j] || L.v[j] >= vm;
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
  if (joint)
    for (int64_t t = 0; t < L.n; ++t) s.acc[t] = L.v[t] >= lo;
  for (int j = 0; j < 7; ++j) {
    const Step st = pipe_step(order, j);
    if (!step_on(st, r, V)) continue;
    step_keep(st, L, r, m, invT, s, ops);
    if (joint) {
      for (int64_t t = 0; t < L.n; ++t) s.acc[t] &= s.keep[t];
    } else {
      list_filter(L, s.keep);
    }
  }
  if (joint) list_filter(L, s.acc);
}

// Whether any truncation of the row is on.
DK_HOST_DEVICE bool any_truncation(const PipeRow& r, int64_t V) {
  bool any = r.nsig > 0.0;
  for (int j = 0; j < 7; ++j) any = any || step_on(Step(j), r, V);
  return any;
}

// The inverse-CDF draw from L: the first entry where the running mass (list order) exceeds target;
// the last entry of positive weight if rounding leaves the total at or below it; -1 if none.
DK_HOST_DEVICE int64_t list_draw(const PipeList& L, double target) {
  double cum = 0.0;
  int64_t last = -1;
  for (int64_t j = 0; j < L.n; ++j) {
    if (L.w[j] > 0.f) last = j;
    cum += double(L.w[j]);
    if (cum > target) return j;
  }
  return last;
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
