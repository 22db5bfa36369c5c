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
#include <type_traits>
#include <vector>
#include "cpu/kernels.h"
#include "cpu/simd.h"
#include "decodekit/rng.h"

namespace dk::cpu::DK_ISA_NAME {
using namespace dk::simd;

using dk::contract::kChunk;           // the list / chunked draw sizes are part of the CPU/CUDA contract
using dk::contract::kListMax;         // (decodekit/contract.h)
constexpr float kWindowNats = 12.0f;  // candidate window below the running max (nats)
constexpr int64_t kMinCap = 4096;     // initial candidate buffer size (grows as needed)

struct VW {
  float v, w;
};  // a candidate's value and weight

// Next-row prefetch: the passes after pass A run on the cache-hot row and leave the memory
// system idle, so they pull the next row of this thread's range towards L2, one 64-byte line per
// 16-value block they process (pass A of the next row then streams from cache instead of DRAM).
// Loops copy it to a local and store it back, so it lives in registers.
struct Prefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  void step() {
    if (p < end) {
      __builtin_prefetch(p, 0, 2);
      p += 64;
    }
  }
  void step4() {  // four blocks' worth (may touch up to 3 lines past the end: harmless)
    if (p < end) {
      __builtin_prefetch(p, 0, 2);
      __builtin_prefetch(p + 64, 0, 2);
      __builtin_prefetch(p + 128, 0, 2);
      __builtin_prefetch(p + 192, 0, 2);
      p += 256;
    }
  }
};

struct Scratch {
  Prefetch pf;                 // the next row (empty when there is none)
  std::vector<float> val, wt;  // candidates: value, weight (index order)
  std::vector<int32_t> idx;
  std::vector<float> tmp;
  std::vector<VW> pairs, pairs2;
  std::vector<float> gv, gw;  // the crossing bin of the binned top-p cut (values, weights)
  std::vector<double> hist;   // its per-lane histograms
  std::vector<double> chunks;
  std::vector<float> walk;  // the chosen chunk's kept weights (chunked draw)
};
// A kernel's range starts with no next-row prefetch; row loops that want one set it per row
// (prefetch_next), so a cursor left by another op never points into a freed buffer.
inline Scratch& scratch() {
  thread_local Scratch s;
  if (s.val.size() < size_t(kMinCap + 16)) {
    s.val.resize(kMinCap + 16);
    s.idx.resize(kMinCap + 16);
  }
  s.pf = Prefetch{};
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
  float m = kNegInf;  // max value
  bool bad = false;   // NaN / +inf / (probs: negative) / nothing with positive weight
  float thr = 0.f;    // C = { i : x_i >= thr }
  int64_t n = 0;      // |C|
};

struct Window {
  bool probs;
  float span;  // logits: D*T (x >= m - span); probs: ratio exp(-D) (x >= m * span)
  float of(float m) const { return probs ? std::max(m * span, FLT_TRUE_MIN) : std::max(m - span, -FLT_MAX); }
};

template <class T>
inline VF load_block(const T* x, int64_t i, int64_t V, float fill) {
  return (i + 16 <= V) ? vload(x + i) : vload_partial(x + i, int(V - i), fill);
}

// Collects C = {x >= thr} (index order) into s.val / s.idx; returns |C|. The buffers grow
// between runs of blocks that cannot overflow them (each block adds at most 16), so the inner
// loop makes no calls and tests one OR of four block masks per 64 values.
template <class T>
inline int64_t collect_geq(const T* x, int64_t V, float thr, Scratch& s) {
  const VF vthr = vset(thr);
  int64_t n = 0, i = 0;
  Prefetch pf = s.pf;
  auto room = [&]() {  // blocks that fit; grows the buffers when fewer than 4 do
    int64_t cap = int64_t(s.val.size()) - 16;
    if ((cap - n) / 16 < 4 && cap < V) {
      cap = std::min<int64_t>(V, std::max<int64_t>(2 * cap, kMinCap));
      s.val.resize(cap + 16);
      s.idx.resize(cap + 16);
    }
    return (cap - n) / 16;  // >= 1 while a full block is left, as n <= i
  };
  const int64_t Vfull = V & ~int64_t(15);
  while (i < Vfull) {
    const int64_t end = std::min(Vfull, i + 16 * room());
    float* val = s.val.data();
    int32_t* idx = s.idx.data();
    for (; i + 64 <= end; i += 64) {
      pf.step4();
      const VF a = vload(x + i), b = vload(x + i + 16), c = vload(x + i + 32), d = vload(x + i + 48);
      const M16 ma = vge(a, vthr), mb = vge(b, vthr), mc = vge(c, vthr), md = vge(d, vthr);
      if (!(ma | mb | mc | md)) continue;
      if (ma) n += vcompress(val + n, idx + n, ma, a, int32_t(i));
      if (mb) n += vcompress(val + n, idx + n, mb, b, int32_t(i + 16));
      if (mc) n += vcompress(val + n, idx + n, mc, c, int32_t(i + 32));
      if (md) n += vcompress(val + n, idx + n, md, d, int32_t(i + 48));
    }
    for (; i < end; i += 16) {
      pf.step();
      const VF v = vload(x + i);
      const M16 m = vge(v, vthr);
      if (m) n += vcompress(val + n, idx + n, m, v, int32_t(i));
    }
  }
  if (i < V) {  // the partial last block
    room();
    const VF v = vload_partial(x + i, int(V - i), kNegInf);
    const M16 m = vge(v, vthr);
    if (m) n += vcompress(s.val.data() + n, s.idx.data() + n, m, v, int32_t(i));
  }
  s.pf = pf;
  return n;
}

// Pass A: the max and the bad-row flags (one streaming read); with `collect`, pass B then
// gathers the candidate set C = {x >= window.of(max)} in index order from the cache-hot row.
template <class T>
inline RowScan scan_row(const T* x, int64_t V, const Window& win, bool collect, Scratch& s) {
  RowScan r;
  const float fill = win.probs ? 0.f : kNegInf;
  // One NaN compare per pair of blocks; +inf shows as a max of +inf, a negative probability as a
  // min below 0 (-0 passes), so no per-block compare is needed for either.
  VF mx0 = vset(kNegInf), mx1 = mx0, mn = vset(0.f);
  M16 badm = 0;
  int64_t i = 0;
  if (win.probs) {
    for (; i + 32 <= V; i += 32) {  // two independent max chains
      VF a = vload(x + i), b = vload(x + i + 16);
      badm |= vnan2(a, b);
      mx0 = vmax(mx0, a);
      mx1 = vmax(mx1, b);
      mn = vmin(mn, vmin(a, b));
    }
  } else {
    for (; i + 32 <= V; i += 32) {
      VF a = vload(x + i), b = vload(x + i + 16);
      badm |= vnan2(a, b);
      mx0 = vmax(mx0, a);
      mx1 = vmax(mx1, b);
    }
  }
  for (; i < V; i += 16) {
    VF v = load_block(x, i, V, fill);
    badm |= vnan(v);
    mx0 = vmax(mx0, v);
    mn = vmin(mn, v);
  }
  r.m = vhmax(vmax(mx0, mx1));
  r.thr = win.of(r.m);
  const bool neg = win.probs && vlt(mn, vset(0.f)) != 0;
  r.bad = badm != 0 || neg || r.m == kPosInf || !(r.m > (win.probs ? 0.f : kNegInf));
  if (collect && !r.bad) r.n = collect_geq(x, V, r.thr, s);
  return r;
}

// Window profile: for 8 windows d_j (nats below the max) the count of values inside each and
// their weight, in one pass over the cache-hot row. Used only to choose how far to widen the
// candidate window (never for a filter decision), so it may be approximate; it is computed in
// the same fixed order on every ISA all the same.
constexpr int kProfiles = 10;
constexpr float kProfileNats[kProfiles] = {0.5f, 1.f, 2.f, 3.f, 4.5f, 7.f, 11.f, 16.f, 32.f, 70.f};
template <class T>
inline void window_profile(const T* x, int64_t V, const Window& unit, float m, const Weight& w, bool need_mass,
                           double* cnt, double* mass, Prefetch& pfr, int64_t stride = 1) {
  // unit: the window for 1 nat (logits: span T; probs: ratio e^-1)
  VF thr[kProfiles], accc[kProfiles], accm[kProfiles];
  for (int j = 0; j < kProfiles; ++j) {
    float t = unit.probs ? std::max(m * std::exp(-kProfileNats[j]), FLT_TRUE_MIN)
                         : std::max(m - kProfileNats[j] * unit.span, -FLT_MAX);
    thr[j] = vset(t);
    accc[j] = accm[j] = vset(0.f);
  }
  const float fill = unit.probs ? 0.f : kNegInf;
  const VF one = vset(1.f);
  // Thresholds fall as j grows. A block with no value inside window j adds exactly 0 to the
  // narrower windows, so only the wider ones are updated for it (most of an LLM row's blocks lie
  // far below the max); skipping additions of 0 leaves every sum bit-identical. The first updated
  // window is a compile-time constant (0, 5 or 8), so the accumulators stay in registers.
  auto update = [&](VF v, auto J0) {
#pragma GCC unroll 10
    for (int j = decltype(J0)::value; j < kProfiles; ++j) accc[j] = vadd_mask(accc[j], vge(v, thr[j]), one);
    if (need_mass) {
      const VF e = w(v);
#pragma GCC unroll 10
      for (int j = decltype(J0)::value; j < kProfiles; ++j) accm[j] = vadd_mask(accm[j], vge(v, thr[j]), e);
    }
  };
  Prefetch pf = pfr;
  for (int64_t i = 0; i < V; i += 16 * stride) {
    pf.step();
    VF v = load_block(x, i, V, fill);
    if (!vge(v, thr[kProfiles - 1])) continue;
    if (vge(v, thr[4]))
      update(v, std::integral_constant<int, 0>{});
    else if (vge(v, thr[7]))
      update(v, std::integral_constant<int, 5>{});
    else
      update(v, std::integral_constant<int, 8>{});
  }
  pfr = pf;
  alignas(64) float lc[16], lm[16];
  for (int j = 0; j < kProfiles; ++j) {
    vstore(lc, accc[j]);
    vstore(lm, accm[j]);
    double c = 0.0, t = 0.0;
    for (int l = 0; l < 16; ++l) {
      c += double(lc[l]);
      t += double(lm[l]);
    }
    cnt[j] = c;
    mass[j] = t;
  }
}

// Greedy rule shared by every op: the lowest index of the max of a logits row; false on a bad row.
template <class T>
inline bool row_argmax(const T* x, int64_t V, Scratch& s, int64_t* out) {
  RowScan sc = scan_row(x, V, Window{false, 0.f}, true, s);
  *out = 0;
  if (sc.bad) return false;
  for (int64_t i = 0; i < sc.n; ++i)
    if (s.val[i] == sc.m) {
      *out = s.idx[i];
      break;
    }
  return true;
}

// Every element with positive possible weight, in index order (the exact fallback).
template <class T>
inline int64_t collect_all(const T* x, int64_t V, bool probs, Scratch& s) {
  if (int64_t(s.val.size()) < V + 16) {
    s.val.resize(V + 16);
    s.idx.resize(V + 16);
  }
  int64_t n = 0;
  const float lo = probs ? FLT_TRUE_MIN : -FLT_MAX;
  for (int64_t i = 0; i < V; ++i) {
    float v = to_float(x[i]);
    if (v >= lo) {
      s.val[n] = v;
      s.idx[n] = int32_t(i);
      ++n;
    }
  }
  return n;
}

// s.wt[0..n) = weights of the candidates s.val[0..n) (vector exp, bit-identical to the scalar one).
inline void candidate_weights(const Weight& w, int64_t n, Scratch& s) {
  if (int64_t(s.wt.size()) < n + 16) s.wt.resize(n + 16);
  for (int64_t i = 0; i < n; i += 16) {
    VF v = (i + 16 <= n) ? vload(s.val.data() + i) : vload_partial(s.val.data() + i, int(n - i), 0.f);
    vstore(s.wt.data() + i, w(v));  // buffers have 16 spare slots
  }
}

// Sum of the kept weights over the whole row in the canonical order (decodekit/contract.h): per
// kChunk-element chunk 16 double lanes reduced lane by lane, the chunk masses added in chunk order
// (the chunked draw's Z; a GPU computes every chunk at once).
template <class T>
inline double row_mass(const T* x, int64_t V, const Weight& w, float t, float minw, Prefetch& pfr) {
  static_assert(kChunk % 16 == 0, "chunks are whole blocks");
  const float fill = w.probs ? 0.f : kNegInf;
  const VF vt = vset(t), vmw = vset(minw), zero = vset(0.f);
  Prefetch pf = pfr;
  double z = 0.0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    VD acc = vd_zero();
    const int64_t end = std::min(V, c0 + kChunk);
    for (int64_t i = c0; i < end; i += 16) {
      pf.step();
      VF v = load_block(x, i, V, fill);
      VF e = w(v);
      M16 keep = vge(v, vt) & vge(e, vmw);
      vd_add(acc, vblend(keep, zero, e));
    }
    z += vd_reduce(acc);
  }
  pfr = pf;
  return z;
}

// Top-p threshold by mass quickselect over a[0..n) (value, weight pairs): the smallest value v
// such that the mass of the values strictly greater than v is < P (decodekit/pipeline.h's
// top_p_quickselect, shared with the pipeline's list steps on CPU and CUDA); a is permuted.
inline float top_p_threshold(VW* a, int64_t n, double P, double base = 0.0) { return top_p_quickselect(a, n, P, base); }

// The bin of h[0..nb) (masses, from the top) where base + the cumulative mass first reaches P;
// base becomes the mass above it. If rounding leaves the total just under P, the last non-empty bin.
inline int crossing_bin(const double* h, int nb, double P, double& base) {
  const double base0 = base;
  int last = 0;
  for (int b = 0; b < nb; ++b) {
    if (h[b] > 0.0) last = b;
    if (base + h[b] >= P) return b;
    base += h[b];
  }
  base = base0;
  for (int b = 0; b < last; ++b) base += h[b];
  return last;
}

// h16[bin * 16 + lane] += weight for the candidates vals/wts[0..n) (lane = index mod 16),
// every cell a sequential sum in index order on every ISA.
template <class Bins>
inline void hist_update(double* h16, const float* vals, const float* wts, int64_t n, const Bins& bins) {
  int64_t i = 0;
#if defined(DK_ISA_AVX512)
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= n; i += 16) {
    const __m512i ix = _mm512_add_epi32(_mm512_slli_epi32(_mm512_cvttps_epi32(bins(vload(vals + i)).v), 4), lane);
    const __m512 e = _mm512_loadu_ps(wts + i);
    const __m256i ilo = _mm512_castsi512_si256(ix), ihi = _mm512_extracti64x4_epi64(ix, 1);
    __m512d a = _mm512_i32gather_pd(ilo, h16, 8);
    a = _mm512_add_pd(a, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    _mm512_i32scatter_pd(h16, ilo, a, 8);
    __m512d b = _mm512_i32gather_pd(ihi, h16, 8);
    b = _mm512_add_pd(b, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    _mm512_i32scatter_pd(h16, ihi, b, 8);
  }
#endif
  alignas(64) float bf[16];
  for (; i < n; i += 16) {
    vstore(bf, bins(vload(vals + i)));  // the buffers have 16 spare slots
    const int lanes = int(std::min<int64_t>(16, n - i));
    for (int j = 0; j < lanes; ++j) h16[size_t(bf[j]) * 16 + size_t(j)] += double(wts[i + j]);
  }
}

// The same threshold for a large candidate list: one pass bins the candidates by value (1/8-nat
// bins below the max for logits, 1/8-octave bins of the probability for probs; bin numbers are
// computed 16 at a time), the bin where the cumulative mass from the top reaches P is found, and
// that bin's candidates are gathered branch-free (compress stores, index order). A large crossing
// bin is split again into 32 sub-bins the same way, and only the crossing sub-bin goes through the
// quickselect, starting from the exact mass above it. (Per-candidate branches cost more than the
// arithmetic here: a branchy gather or quickselect over thousands of values is mispredict-bound.)
// Uses s.hist, s.gv, s.gw and s.pairs2 as buffers.
inline float top_p_threshold_binned(const float* vals, const float* wts, int64_t n, double P, const Weight& w,
                                    Scratch& s) {
  std::vector<float>& gv = s.gv;
  std::vector<float>& gw = s.gw;
  constexpr int NB = 256, kSub = 32;
  double bm[NB];
  const uint32_t mbits = float_to_bits(w.m);
  const VF vlast = vset(float(NB - 1)), vm = vset(w.m), vscale = vset(w.invT), v8 = vset(8.f);
  auto dist8 = [&](VF v) { return vmul(vmul(vsub(vm, v), vscale), v8); };  // logits: 8 * nats below the max
  auto bins = [&](VF v) -> VF {                               // the bin of each lane, as a float in [0, NB-1]
    if (w.probs) return vmin(vbitdist<20>(v, mbits), vlast);  // v <= m, both positive
    VF d = dist8(v);
    return vblend(vlt(d, vlast), vlast, vfloor(d));
  };
  alignas(64) float bf[16];
  // One histogram per lane (h16[bin][lane], lane = index mod 16, each a sequential sum in index
  // order), so the AVX-512 path can update 8 lanes with one gather/add/scatter (no two lanes of a
  // block share a cell); the bin masses are the lane sums in lane order.
  s.hist.assign(size_t(NB) * 16, 0.0);
  hist_update(s.hist.data(), vals, wts, n, bins);
  for (int b = 0; b < NB; ++b) {
    double t = 0.0;
    for (int l = 0; l < 16; ++l) t += s.hist[size_t(b) * 16 + l];
    bm[b] = t;
  }
  double base = 0.0;
  const int bstar = crossing_bin(bm, NB, P, base);
  if (int64_t(gv.size()) < n + 16) {
    gv.resize(n + 16);
    gw.resize(n + 16);
  }
  int64_t cnt = 0;
  const VF vstar = vset(float(bstar));
  for (int64_t i = 0; i < n; i += 16) {  // the crossing bin, in index order
    const VF v = vload(vals + i);
    M16 hit = veq(bins(v), vstar);
    if (n - i < 16) hit &= (M16(1) << (n - i)) - 1;
    if (hit) cnt += vcompress2(gv.data() + cnt, gw.data() + cnt, hit, v, vload(wts + i));
  }
  if (cnt > 512) {  // 32 sub-bins of the crossing bin (monotone in the value; clamped at both ends)
    const VF vsub0 = vset(float(bstar * kSub)), vhi = vset(float(kSub - 1)), zero = vset(0.f), vk = vset(float(kSub));
    auto subbin = [&](VF v) {
      VF f = w.probs ? vsub(vbitdist<15>(v, mbits), vsub0) : vfloor(vmul(vsub(dist8(v), vstar), vk));
      return vmin(vmax(f, zero), vhi);
    };
    double hs[kSub] = {};
    for (int64_t i = 0; i < cnt; i += 16) {
      vstore(bf, subbin(vload(gv.data() + i)));
      const int lanes = int(std::min<int64_t>(16, cnt - i));
      for (int j = 0; j < lanes; ++j) hs[int(bf[j])] += double(gw[i + j]);
    }
    const int sstar = crossing_bin(hs, kSub, P, base);
    const VF vs = vset(float(sstar));
    int64_t m = 0;
    for (int64_t i = 0; i < cnt; i += 16) {  // compact the crossing sub-bin in place (order kept)
      const VF v = vload(gv.data() + i);
      M16 hit = veq(subbin(v), vs);
      if (cnt - i < 16) hit &= (M16(1) << (cnt - i)) - 1;
      if (hit) m += vcompress2(gv.data() + m, gw.data() + m, hit, v, vload(gw.data() + i));
    }
    cnt = m;
  }
  std::vector<VW>& pairs = s.pairs2;
  pairs.resize(size_t(cnt));
  for (int64_t i = 0; i < cnt; ++i) pairs[size_t(i)] = VW{gv[size_t(i)], gw[size_t(i)]};
  return top_p_threshold(pairs.data(), cnt, P, base);
}

// Resolved filters of one row: survivors S = { x >= t and weight >= minw }.
struct Resolved {
  float t = kNegInf;
  float minw = 0.f;
  bool in_c = false;  // S is a subset of the candidate list (whose contents are exact)
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
inline Resolved resolve(const T* x, int64_t V, const float* vals, const float* wts, int64_t n, bool complete,
                        bool minp_window_ok, const RowParamsF& rp, const Weight& w, Scratch& s, double& zfull) {
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
    double mc = 0.0;  // mass of the top-p candidates
    s.pairs.clear();
    if (within_k) {  // Z over the top-k survivors: the canonical mass (decodekit/contract.h)
      for (int64_t i = 0; i < n; ++i)
        if (vals[i] >= tk) s.pairs.push_back({vals[i], wts[i]});
      mc = contract::sparse_mass(s.idx.data(), wts, n, [&](int64_t i) { return vals[i] >= tk; });
    } else {  // 16 double lanes, fixed order (a sequential double sum is latency-bound)
      VD acc = vd_zero();
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) vd_add(acc, vload(wts + i));
      if (i < n) vd_add(acc, vload_partial(wts + i, int(n - i), 0.f));
      mc = vd_reduce(acc);
    }
    double Z;
    if (within_k) {
      Z = mc;
    } else {
      if (zfull < 0.0) zfull = row_mass(x, V, w, kNegInf, 0.f, s.pf);  // once per row
      Z = zfull;
      if (!complete && mc < double(rp.p) * Z) {
        r.need_full = true;
        return r;
      }
    }
    const double P = double(rp.p) * Z;
    float tp;
    if (within_k) {
      tp = top_p_threshold(s.pairs.data(), int64_t(s.pairs.size()), P);
    } else if (n > 2048) {
      tp = top_p_threshold_binned(vals, wts, n, P, w, s);
    } else {
      for (int64_t i = 0; i < n; ++i) s.pairs.push_back({vals[i], wts[i]});
      tp = top_p_threshold(s.pairs.data(), n, P);
    }
    t = std::max(t, tp);
  }
  r.t = t;
  r.minw = mp_on ? (w.probs ? min_p_threshold(rp.minp, w.m) : rp.minp) : 0.f;
  // S is inside the candidate list whenever top-k or top-p is active (their thresholds are
  // values of C, an upper set) or min-p alone is active with a wide enough window. The method
  // choice below depends on nothing else (not on whether C overflowed), so it is canonical.
  r.in_c = k_on || p_on || (mp_on && minp_window_ok);
  return r;
}

// Full selection for one row: returns false for a bad row. Leaves S (index order) in
// s.val/s.idx[0..nS) when res.in_c.
struct Selection {
  bool valid = false;
  Weight w{false, 0.f, 1.f};
  Resolved res;
  int64_t nS = 0;  // |S| when res.in_c and |S| <= kListMax (then S is listed); kListMax+1 otherwise
};

template <class T>
inline Selection select_row(const T* x, int64_t V, bool probs, const RowParamsF& rp, Scratch& s) {
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
  const bool any_filter = k_on || p_on || mp_on;
  // With top-k the window is chosen by count (profile pass) before collecting; otherwise the
  // default window is collected right away.
  RowScan sc = scan_row(x, V, win, !k_on && any_filter, s);
  if (sc.bad) return sel;
  sel.valid = true;
  sel.w = Weight{probs, sc.m, probs ? 1.f : 1.f / temp};
  if (!any_filter) return sel;  // plain sampling: the chunked draw over the row
  bool complete = false;
  bool profiled = false;
  double zfull = -1.0;
  int64_t n = sc.n;
  const bool within_k = rp.order == FilterOrder::Sequential && k_on;  // top-p inside the top k
  const Window unit{probs, probs ? std::exp(-1.f) : temp};            // the window of 1 nat
  // Top-k by count alone (no mass needed): first try a window chosen from a profile of every 8th
  // block (an eighth of the work) with a 4x (else 2x, 1x) margin on k, if its estimated size is modest;
  // if that window holds fewer than k values resolve() asks for more and the exact profile decides.
  // Either way the window contains every survivor, so the choice changes the cost, never the result.
  bool estimated = !(k_on && (!p_on || within_k) && V >= 16 * 1024);
  auto widen = [&]() {  // estimate or profile once each, then collect the narrowest sufficient window
    int pick = kProfiles;
    double cnt[kProfiles], mass[kProfiles];
    if (!estimated) {
      estimated = true;
      constexpr int64_t kStride = 8;
      window_profile(x, V, unit, sc.m, sel.w, false, cnt, mass, s.pf, kStride);
      // the narrowest window estimated to hold 4k values, unless it is estimated to hold far more
      // (the next window down jumps past the bulk's edge: the selection would then run over
      // thousands of candidates); else the narrowest estimated to hold 2k, then k, unless that
      // is too wide too (a sparse head above the bulk). A window that turns out to hold fewer
      // than k values costs one extra collect before the exact profile.
      const double k = double(rp.k);
      const double margin[3] = {4.0, 2.0, 1.0};
      const double limit[3] = {16.0 * k + 256.0, 32.0 * k + 2048.0, 32.0 * k + 2048.0};
      for (int t = 0; t < 3 && pick == kProfiles; ++t) {
        int j = 0;
        while (j < kProfiles && cnt[j] * double(kStride) < margin[t] * k) ++j;
        if (j < kProfiles && cnt[j] * double(kStride) <= limit[t]) pick = j;
      }
    }
    if (pick == kProfiles && !profiled) {
      profiled = true;
      window_profile(x, V, unit, sc.m, sel.w, p_on && !within_k, cnt, mass, s.pf);
      if (p_on && !within_k && zfull < 0.0) zfull = row_mass(x, V, sel.w, kNegInf, 0.f, s.pf);
      for (int j = 0; j < kProfiles && pick == kProfiles; ++j) {
        if (kProfileNats[j] < D && !k_on) continue;  // only wider than what failed
        bool ok = !(k_on && cnt[j] < double(rp.k));
        // top-p over the whole row needs p of Z inside (margin: profile sums are approximate;
        // resolve() re-checks exactly)
        if (ok && p_on && !within_k && mass[j] < double(rp.p) * zfull * (1.0 + 1e-6)) ok = false;
        if (ok && mp_on && !k_on && !p_on && -std::log(rp.minp) + 0.25f > kProfileNats[j]) ok = false;
        if (ok) pick = j;
      }
    }
    if (pick < kProfiles) {
      Window wider{probs, probs ? std::exp(-kProfileNats[pick]) : kProfileNats[pick] * temp};
      n = collect_geq(x, V, wider.of(sc.m), s);
    } else {
      n = collect_all(x, V, probs, s);
      complete = true;
    }
  };
  if (k_on) widen();
  // Resolve on C; if C is too small (fewer than k values, or less than p of the mass), widen.
  // Probabilities are their own weights: the candidates' values serve as their weights until S is
  // listed (no copy of a list that can hold the whole row).
  for (;;) {
    if (!probs) candidate_weights(sel.w, n, s);
    sel.res = resolve(x, V, s.val.data(), probs ? s.val.data() : s.wt.data(), n, complete, minp_window_ok, rp, sel.w, s,
                      zfull);
    if (!sel.res.need_full || complete) break;
    widen();
  }
  if (sel.res.in_c) {
    // |S| decides the draw method; S is only listed when the list method will use it.
    const float* wts = probs ? s.val.data() : s.wt.data();
    int64_t cnt = 0;
    for (int64_t i = 0; i < n && cnt <= kListMax; ++i) cnt += (s.val[i] >= sel.res.t) & (wts[i] >= sel.res.minw);
    if (cnt > kListMax) {
      sel.nS = kListMax + 1;  // "large": the chunked draw over the row
    } else {
      if (int64_t(s.wt.size()) < cnt + 16) s.wt.resize(cnt + 16);
      int64_t m = 0;
      for (int64_t i = 0; i < n; ++i) {
        float v = s.val[i], e = wts[i];  // (m <= i: in-place compaction reads before it writes)
        if (v >= sel.res.t && e >= sel.res.minw) {
          s.val[m] = v;
          s.wt[m] = e;
          s.idx[m] = s.idx[i];
          ++m;
        }
      }
      sel.nS = m;
    }
  }
  return sel;
}

// Exact inverse-CDF draw from S with uniform u in (0,1). Returns the token and its weight and
// the total mass Z_S. A listed S (|S| <= kListMax) is drawn by the contract's 16-ary walk over the
// list (its total is Z_S); a large S by the chunked draw: chunk masses in the canonical order
// (Z_S = their sum in chunk order), the chunk where the running mass crosses u * Z_S, then the
// 16-ary walk over that chunk's kept weights (decodekit/contract.h, the same code as the GPU's).
template <class T>
inline int64_t draw(const T* x, int64_t V, const Selection& sel, double u, Scratch& s, double* Zout, float* wout) {
  const Weight& w = sel.w;
  double g16[contract::kWalkMax / 16], g256[contract::kWalkMax / 256];
  if (sel.res.in_c && sel.nS <= kListMax) {
    double Z;
    int64_t i = contract::walk16_draw(s.wt.data(), sel.nS, u, g16, g256, &Z);
    if (i < 0) i = 0;  // unreachable: S holds the max, of positive weight
    *Zout = Z;
    *wout = s.wt[i];
    return s.idx[i];
  }
  // chunked: per-chunk masses (16 double lanes), then the walk over one chunk
  const int64_t nch = (V + kChunk - 1) / kChunk;
  s.chunks.resize(nch);
  const float fill = w.probs ? 0.f : kNegInf;
  const VF vt = vset(sel.res.t), vmw = vset(sel.res.minw), zero = vset(0.f);
  double Z = 0.0;
  Prefetch pf = s.pf;
  for (int64_t c = 0; c < nch; ++c) {
    VD acc = vd_zero();
    const int64_t end = std::min(V, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; i += 16) {
      pf.step();
      VF v = load_block(x, i, V, fill);
      VF e = w(v);
      M16 keep = vge(v, vt) & vge(e, vmw);
      vd_add(acc, vblend(keep, zero, e));
    }
    s.chunks[c] = vd_reduce(acc);
    Z += s.chunks[c];
  }
  s.pf = pf;
  *Zout = Z;
  double target = u * Z, cum = 0.0;
  int64_t c = 0;
  for (; c < nch - 1; ++c) {
    if (cum + s.chunks[c] > target) break;
    cum += s.chunks[c];
  }
  // the chosen chunk must have mass; step back/forward to one that does
  while (c > 0 && s.chunks[c] <= 0.0) --c;
  const double local = target - cum;
  const int64_t c0 = c * kChunk, n = std::min(V, c0 + kChunk) - c0;
  if (int64_t(s.walk.size()) < kChunk + 16) s.walk.resize(kChunk + 16);
  float* ew = s.walk.data();
  for (int64_t i = 0; i < n; i += 16) {  // the chunk's kept weights (0 where not kept)
    VF v = load_block(x, c0 + i, V, fill);
    VF e = w(v);
    M16 keep = vge(v, vt) & vge(e, vmw) & vgt(e, zero);
    vstore(ew + i, vblend(keep, zero, e));  // 16 spare slots
  }
  contract::walk16_sums(ew, n, g16, g256);
  const int64_t i = contract::walk16_pick(ew, n, g16, g256, local);
  *wout = i >= 0 ? ew[i] : 0.f;
  return i >= 0 ? c0 + i : 0;  // (-1 is unreachable: the chosen chunk has mass)
}

// Points s.pf at the row this thread handles after `o` (none after the last one).
template <class T>
inline void prefetch_next(Scratch& s, const T* base, int64_t row_stride, int64_t V, const int64_t* indices, int64_t o,
                          int64_t end) {
  if (o + 1 >= end) {
    s.pf = Prefetch{};
    return;
  }
  const int64_t src = indices ? indices[o + 1] : o + 1;
  const char* p = reinterpret_cast<const char*>(base + src * row_stride);
  s.pf = Prefetch{p, p + V * int64_t(sizeof(T))};
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

template <class Args>  // SampleArgs, PipelineArgs
inline RngKey row_key(const Args& a, int64_t out_row) {
  return row_rng_key(a, out_row);
}

}  // namespace dk::cpu::DK_ISA_NAME
