// The per-row selection engine: one read of the row finds the max and a small candidate set,
// the filters (top-k, top-p, min-p, in sequential or joint order) are resolved on the
// candidates, and the token is drawn exactly from the renormalised survivors. No sort of the
// vocabulary and no materialised probability row. Written once against the 16-lane block
// abstraction of simd.h; included by csrc/cpu/isa/*.cpp (compiled once per ISA).
//
// Determinism: blocks are always 16 wide, candidate buffers are filled and compacted at the
// same block boundaries on every ISA, and every floating-point sum runs in a fixed order
// (16 double lanes reduced sequentially, or sequential index order), so the chosen token is the
// same on the scalar, AVX2 and AVX-512 paths.
#pragma once
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>
#include "cpu/kernels.h"
#include "cpu/simd.h"
#include "decodekit/rng.h"

namespace dk::cpu::DK_ISA_NAME {
using namespace dk::simd;

constexpr int64_t kListMax = 2048;   // survivors sampled by walking a list when |S| <= this
constexpr int64_t kChunk = 4096;     // otherwise: chunked inverse-CDF pass over the row
constexpr float kWindowNats = 12.0f; // candidate window below the running max (nats)
constexpr int64_t kMinCap = 4096;    // candidate buffer size (grows with top_k)

struct Scratch {
  std::vector<float> val, tmp;
  std::vector<int32_t> idx;
  std::vector<double> chunks;
};
inline Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// The weight of a value: exp((x - m) * invT) for logits, x itself for probabilities.
struct Weight {
  bool probs;
  float m, invT;
  float operator()(float x) const { return probs ? x : dk_exp((x - m) * invT); }
  VF operator()(VF x) const { return probs ? x : dk_exp(vmul(vsub(x, vset(m)), vset(invT))); }
};

// What pass A found about a row.
struct RowScan {
  float m = kNegInf;   // max value
  bool bad = false;    // NaN / +inf / (probs: negative) / nothing with positive weight
  bool overflow = false;
  float thr = 0.f;     // C = { i : x_i >= thr } (exactly, when !overflow)
  int64_t n = 0;       // |C|
};

struct Window {
  bool probs;
  float span;  // logits: D*T (x >= m - span); probs: ratio exp(-D) (x >= m * span)
  float of(float m) const {
    return probs ? std::max(m * span, FLT_TRUE_MIN) : std::max(m - span, -FLT_MAX);
  }
};

template <class T>
inline VF load_block(const T* x, int64_t i, int64_t V, float fill) {
  return (i + 16 <= V) ? vload(x + i) : vload_partial(x + i, int(V - i), fill);
}

// Pass A: max, bad-row flags and the candidate set C = {x >= window.of(max)} (index order).
template <class T>
inline RowScan scan_row(const T* x, int64_t V, const Window& win, int64_t cap, Scratch& s) {
  RowScan r;
  if (int64_t(s.val.size()) < cap + 16) { s.val.resize(cap + 16); s.idx.resize(cap + 16); }
  float runmax = kNegInf;
  float thr = win.of(kNegInf);
  VF vthr = vset(thr);
  const float fill = win.probs ? 0.f : kNegInf;
  const VF pinf = vset(kPosInf), zero = vset(0.f);
  M16 badm = 0;
  int64_t n = 0;
  alignas(64) float lane[16];
  for (int64_t i = 0; i < V; i += 16) {
    VF v = load_block(x, i, V, fill);
    badm |= vnan(v) | veq(v, pinf);
    if (win.probs) badm |= vlt(v, zero);
    M16 msk = vge(v, vthr);
    if (!msk) continue;
    float bm = vhmax(v);
    if (bm > runmax) {
      runmax = bm;
      thr = win.of(runmax);
      vthr = vset(thr);
      msk = vge(v, vthr);
    }
    if (r.overflow) continue;
    if (n + 16 > cap) {  // compact with the current threshold
      int64_t w = 0;
      for (int64_t k = 0; k < n; ++k)
        if (s.val[k] >= thr) { s.val[w] = s.val[k]; s.idx[w] = s.idx[k]; ++w; }
      n = w;
      if (n + 16 > cap) { r.overflow = true; continue; }
    }
    vstore(lane, v);
    for (M16 b = msk; b; b &= b - 1) {
      int j = __builtin_ctz(b);
      s.val[n] = lane[j];
      s.idx[n] = int32_t(i + j);
      ++n;
    }
  }
  r.m = runmax;
  r.thr = win.of(runmax);
  if (!r.overflow) {
    int64_t w = 0;
    for (int64_t k = 0; k < n; ++k)
      if (s.val[k] >= r.thr) { s.val[w] = s.val[k]; s.idx[w] = s.idx[k]; ++w; }
    n = w;
  }
  r.n = n;
  r.bad = badm != 0 || !(runmax > (win.probs ? 0.f : kNegInf));
  return r;
}

// Every element with positive possible weight, in index order (the exact fallback).
template <class T>
inline int64_t collect_all(const T* x, int64_t V, bool probs, Scratch& s) {
  if (int64_t(s.val.size()) < V + 16) { s.val.resize(V + 16); s.idx.resize(V + 16); }
  int64_t n = 0;
  const float lo = probs ? FLT_TRUE_MIN : -FLT_MAX;
  for (int64_t i = 0; i < V; ++i) {
    float v = to_float(x[i]);
    if (v >= lo) { s.val[n] = v; s.idx[n] = int32_t(i); ++n; }
  }
  return n;
}

// Sum of weights over the whole row, 16 double lanes, fixed order.
template <class T>
inline double row_mass(const T* x, int64_t V, const Weight& w, float t, float minw) {
  VD acc = vd_zero();
  const float fill = w.probs ? 0.f : kNegInf;
  const VF vt = vset(t), vmw = vset(minw), zero = vset(0.f);
  for (int64_t i = 0; i < V; i += 16) {
    VF v = load_block(x, i, V, fill);
    VF e = w(v);
    M16 keep = vge(v, vt) & vge(e, vmw);
    vd_add(acc, vblend(keep, zero, e));
  }
  return vd_reduce(acc);
}

// Top-p threshold by mass quickselect over vals[0..n): the smallest value v such that the mass
// of the values strictly greater than v is < P. Linear expected time; vals is permuted.
inline float top_p_threshold(float* vals, int64_t n, double P, const Weight& w) {
  double base = 0.0;
  int64_t lo = 0, hi = n;
  float best = kPosInf;
  while (hi > lo) {
    if (hi - lo <= 24) {
      std::sort(vals + lo, vals + hi, std::greater<float>());
      int64_t i = lo;
      while (i < hi && base < P) {
        float v = vals[i];
        best = v;
        double g = 0.0;
        while (i < hi && vals[i] == v) { g += double(w(v)); ++i; }
        base += g;
      }
      return best;
    }
    // median of three as pivot
    float a = vals[lo], b = vals[lo + (hi - lo) / 2], c = vals[hi - 1];
    float piv = std::max(std::min(a, b), std::min(std::max(a, b), c));
    // 3-way partition: [lo, gt) > piv, [gt, lt) == piv, [lt, hi) < piv
    int64_t gt = lo, i = lo, lt = hi;
    while (i < lt) {
      float v = vals[i];
      if (v > piv) { std::swap(vals[gt], vals[i]); ++gt; ++i; }
      else if (v < piv) { --lt; std::swap(vals[i], vals[lt]); }
      else ++i;
    }
    double mgt = 0.0;
    for (int64_t k = lo; k < gt; ++k) mgt += double(w(vals[k]));
    if (base + mgt >= P) { hi = gt; continue; }
    best = piv;
    base += mgt + double(lt - gt) * double(w(piv));
    if (base >= P || lt == hi) return best;
    lo = lt;
  }
  return best;
}

// Resolved filters of one row: survivors S = { x >= t and weight >= minw }.
struct Resolved {
  float t = kNegInf;
  float minw = 0.f;
  bool in_c = false;    // S is a subset of the candidate list (whose contents are exact)
  bool need_full = false;
};

struct RowParamsF {
  float T = 1.f;
  int64_t k = 0;
  float p = 1.f;
  float minp = 0.f;
  FilterOrder order = FilterOrder::Sequential;
};

// Resolve top-k / top-p / min-p on the candidate list (vals[0..n), index order).
template <class T>
inline Resolved resolve(const T* x, int64_t V, const float* vals, int64_t n, bool complete,
                        float thrC, bool minp_window_ok, const RowParamsF& rp, const Weight& w,
                        Scratch& s) {
  Resolved r;
  const bool k_on = rp.k >= 1 && rp.k < V;
  const bool p_on = rp.p < 1.f;
  const bool mp_on = rp.minp > 0.f;
  float tk = kNegInf;
  if (k_on) {
    if (n >= rp.k) {
      s.tmp.assign(vals, vals + n);
      std::nth_element(s.tmp.begin(), s.tmp.begin() + (rp.k - 1), s.tmp.end(), std::greater<float>());
      tk = s.tmp[rp.k - 1];
    } else if (!complete) {
      r.need_full = true;
      return r;
    }
  }
  float t = tk;
  if (p_on) {
    const bool within_k = rp.order == FilterOrder::Sequential && k_on;
    s.tmp.clear();
    for (int64_t i = 0; i < n; ++i)
      if (!within_k || vals[i] >= tk) s.tmp.push_back(vals[i]);
    double Z;
    if (within_k) {
      Z = 0.0;
      for (int64_t i = 0; i < n; ++i)
        if (vals[i] >= tk) Z += double(w(vals[i]));
    } else {
      Z = row_mass(x, V, w, kNegInf, 0.f);
      if (!complete) {
        double mc = 0.0;
        for (float v : s.tmp) mc += double(w(v));
        if (mc < double(rp.p) * Z) { r.need_full = true; return r; }
      }
    }
    float tp = top_p_threshold(s.tmp.data(), int64_t(s.tmp.size()), double(rp.p) * Z, w);
    t = std::max(t, tp);
  }
  r.t = t;
  r.minw = mp_on ? (w.probs ? rp.minp * w.m : rp.minp) : 0.f;
  // S is inside the candidate list whenever top-k or top-p is active (their thresholds are
  // values of C, an upper set) or min-p alone is active with a wide enough window. The method
  // choice below depends on nothing else (not on whether C overflowed), so it is canonical.
  (void)thrC;
  r.in_c = k_on || p_on || (mp_on && minp_window_ok);
  return r;
}

// Full selection for one row: returns false for a bad row. Leaves S (index order) in
// s.val/s.idx[0..nS) when res.in_c.
struct Selection {
  bool valid = false;
  Weight w{false, 0.f, 1.f};
  Resolved res;
  int64_t nS = 0;      // |S| when res.in_c
  int64_t argmax = 0;  // lowest index of the max (logits)
};

template <class T>
inline Selection select_row(const T* x, int64_t V, bool probs, const RowParamsF& rp, Scratch& s,
                            bool need_argmax) {
  Selection sel;
  const bool k_on = rp.k >= 1 && rp.k < V;
  const bool p_on = rp.p < 1.f;
  const bool mp_on = rp.minp > 0.f;
  float D = kWindowNats;
  if (mp_on && !k_on && !p_on) D = -std::log(rp.minp) + 0.5f;
  D = std::min(D, 80.f);
  const bool minp_window_ok = mp_on && (-std::log(rp.minp) + 0.25f <= D);
  const float temp = probs ? 1.f : rp.T;
  Window win{probs, probs ? std::exp(-D) : D * temp};
  int64_t cap = std::max<int64_t>(kMinCap, k_on ? 2 * rp.k + 16 : 0);
  cap = std::min<int64_t>(cap, V + 16);
  RowScan sc = scan_row(x, V, win, cap, s);
  if (sc.bad) return sel;
  sel.valid = true;
  sel.w = Weight{probs, sc.m, probs ? 1.f : 1.f / temp};
  bool complete = false;
  int64_t n = sc.n;
  if (sc.overflow) { n = collect_all(x, V, probs, s); complete = true; }
  if (need_argmax) {
    sel.argmax = -1;
    for (int64_t i = 0; i < n; ++i) if (s.val[i] == sc.m) { sel.argmax = s.idx[i]; break; }
  }
  sel.res = resolve(x, V, s.val.data(), n, complete, sc.thr, minp_window_ok, rp, sel.w, s);
  if (sel.res.need_full) {
    n = collect_all(x, V, probs, s);
    complete = true;
    sel.res = resolve(x, V, s.val.data(), n, complete, sc.thr, minp_window_ok, rp, sel.w, s);
  }
  if (sel.res.in_c) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      float v = s.val[i];
      if (v >= sel.res.t && sel.w(v) >= sel.res.minw) { s.val[m] = v; s.idx[m] = s.idx[i]; ++m; }
    }
    sel.nS = m;
  }
  return sel;
}

// Exact inverse-CDF draw from S with uniform u in (0,1). Returns the token and its weight and
// the total mass Z_S.
template <class T>
inline int64_t draw(const T* x, int64_t V, const Selection& sel, double u, Scratch& s,
                    double* Zout, float* wout) {
  const Weight& w = sel.w;
  if (sel.res.in_c && sel.nS <= kListMax) {
    double Z = 0.0;
    for (int64_t i = 0; i < sel.nS; ++i) Z += double(w(s.val[i]));
    double target = u * Z, cum = 0.0;
    int64_t last = -1;
    for (int64_t i = 0; i < sel.nS; ++i) {
      float e = w(s.val[i]);
      if (e > 0.f) last = i;
      cum += double(e);
      if (cum > target) { *Zout = Z; *wout = e; return s.idx[i]; }
    }
    *Zout = Z; *wout = w(s.val[last]);
    return s.idx[last];
  }
  // chunked: per-chunk masses (16 double lanes), then a sequential scan of one chunk
  const int64_t nch = (V + kChunk - 1) / kChunk;
  s.chunks.resize(nch);
  const float fill = w.probs ? 0.f : kNegInf;
  const VF vt = vset(sel.res.t), vmw = vset(sel.res.minw), zero = vset(0.f);
  double Z = 0.0;
  for (int64_t c = 0; c < nch; ++c) {
    VD acc = vd_zero();
    const int64_t end = std::min(V, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; i += 16) {
      VF v = load_block(x, i, V, fill);
      VF e = w(v);
      M16 keep = vge(v, vt) & vge(e, vmw);
      vd_add(acc, vblend(keep, zero, e));
    }
    s.chunks[c] = vd_reduce(acc);
    Z += s.chunks[c];
  }
  *Zout = Z;
  double target = u * Z, cum = 0.0;
  int64_t c = 0;
  for (; c < nch - 1; ++c) {
    if (cum + s.chunks[c] > target) break;
    cum += s.chunks[c];
  }
  // the chosen chunk must have mass; step back/forward to one that does
  while (c > 0 && s.chunks[c] <= 0.0) --c;
  double local = target - cum;
  const int64_t end = std::min(V, (c + 1) * kChunk);
  double acc = 0.0;
  int64_t last = -1;
  float lastw = 0.f;
  for (int64_t i = c * kChunk; i < end; ++i) {
    float v = to_float(x[i]);
    if (!(v >= sel.res.t)) continue;
    float e = w(v);
    if (!(e >= sel.res.minw) || e <= 0.f) continue;
    last = i; lastw = e;
    acc += double(e);
    if (acc > local) { *wout = e; return i; }
  }
  *wout = lastw;
  return last >= 0 ? last : sel.argmax;
}

inline RowParamsF row_params(const RowFilter& f, int64_t out_row) {
  RowParamsF rp;
  rp.T = f.is_probs ? 1.f : f.temperature.at(out_row);
  rp.k = f.top_k.at(out_row);
  rp.p = f.top_p.at(out_row);
  rp.minp = f.min_p.at(out_row);
  rp.order = f.order;
  return rp;
}

inline RngKey row_key(const SampleArgs& a, int64_t out_row) {
  if (a.seeds) return make_rng_key(uint64_t(a.seeds[out_row]), a.offset, 0u);
  return make_rng_key(a.seed, a.offset, uint32_t(out_row));
}

}  // namespace dk::cpu::DK_ISA_NAME
