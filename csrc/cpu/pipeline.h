// The whole sampling step for one row (issue 11), written once against simd.h and compiled per
// ISA (included by csrc/cpu/isa/sampling.cpp after row_engine.h):
//   1. one streaming pass over the row writes the processed row y into a thread-local buffer
//      (the bitmask is applied on the way; the row's max is tracked), then the sparse steps run on
//      y: bans, logit bias, the repetition penalty once per distinct history token, frequency /
//      presence penalties (per-token flags and counts in a small per-thread hash table);
//   2. the truncations: top-n-sigma (mean and std of the finite logits, one pass over the
//      cache-hot y) and top-k are upper sets of values and commute with each other and with
//      min-p, so the starting list L is collected from y directly (a window profile chooses how
//      far below the max to collect, as in the sampler); the remaining truncations run on L in
//      the chosen order, each on the renormalised survivors of the ones before it;
//   3. the exact inverse-CDF draw from L and the logprobs (raw or processed, top n).
// Only y (one row, cache resident) is written; there is no [B, V] intermediate. The list steps
// are written once (run_truncations / step_keep in decodekit/pipeline.h) against primitives that
// this file runs on one thread (SerialListOps) and the CUDA kernel on a whole block; every mass
// and the draw follow the contract's 16-ary walk, so every ISA and CUDA give the same survivors
// and tokens.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>
#include "cpu/key_sort.h"
#include "cpu/mass_select.h"
#include "cpu/row_engine.h"
#include "decodekit/pipeline.h"

namespace dk::cpu::DK_ISA_NAME {

// The tokens the sparse steps touch in one row, in an open-addressing hash table of a few KB: per
// token its processed value (the fast top-k start), its output count and whether the repetition
// penalty was applied. (V-sized per-token arrays would miss the cache at almost every history
// token: the streaming pass over the rows evicts them.)
struct TouchTable {
  struct Entry {
    int32_t t;       // token (-1: empty slot)
    float v;         // processed value (when has)
    uint32_t count;  // output count (frequency / presence penalties; zero between steps)
    uint8_t rep, has;
  };
  std::vector<Entry> e;
  std::vector<uint32_t> used;  // occupied slots, in insertion order
  uint32_t mask = 0;
  int shift = 32;
  // Empties the table with room for n distinct tokens (load factor <= 1/2).
  void reset(int64_t n) {
    for (const uint32_t h : used) e[h].t = -1;
    used.clear();
    size_t cap = 64;
    while (cap < size_t(2 * n)) cap <<= 1;
    if (e.size() < cap) {
      e.assign(cap, Entry{-1, 0.f, 0u, 0, 0});
      mask = uint32_t(cap - 1);
      shift = 32 - __builtin_ctzll(cap);
    }
  }
  uint32_t home(int64_t t) const { return (uint32_t(t) * 0x9E3779B1u) >> shift; }
  __attribute__((always_inline)) Entry& get(int64_t t) {  // t's entry, inserted if absent
    for (uint32_t h = home(t);; h = (h + 1) & mask) {
      Entry& x = e[h];
      if (x.t == int32_t(t)) return x;
      if (x.t < 0) {
        x = Entry{int32_t(t), 0.f, 0u, 0, 0};
        used.push_back(h);
        return x;
      }
    }
  }
  __attribute__((always_inline)) const Entry& find(int64_t t) const {  // t's entry (t present)
    uint32_t h = home(t);
    while (e[h].t != int32_t(t)) h = (h + 1) & mask;
    return e[h];
  }
};

struct PipeScratch {
  std::vector<float> y;  // the processed row (V + 16)
  TouchTable tt;         // the tokens of the sparse steps
  // fast top-k start: bit t of tmark = token t has a value in tt; bit b of bmark = 16-token block b
  // holds one (cleared through tt.used before the next row)
  std::vector<uint64_t> tmark, bmark;
  std::vector<float> lv, lw;  // the list L: values, weights (index order)
  std::vector<int32_t> li;
  std::vector<double> ld;                          // per-list scratch (log-probabilities, scores)
  std::vector<int32_t> ord;                        // per-list order
  std::vector<float> tv;                           // float list scratch (weights in a sorted order)
  std::vector<PipeVW> sel;                         // mth_largest's (value, 1) pairs
  std::vector<int32_t> cand;                       // candidates' positions above the bound
  std::vector<double> g16;                         // the walk's group and block sums
  KeySort key_sort;                                // SerialListOps::sort's buffers
  std::vector<std::pair<float, int32_t>> top;      // top-n (value, index)
  std::vector<std::pair<int32_t, float>> touched;  // tokens changed by the sparse steps, first value
  std::vector<PipeVW> pairs;                       // top-p's (value, weight) pairs
  std::vector<PipeDW> dpairs;                      // typical's (-score, weight) pairs
  MassSelect mass_select;                          // top-p's / typical's cuts, the m-th largest
  std::vector<uint8_t> keep, acc;                  // per-list keep flags of a step / of all steps (joint)
  // The list steps' scratch (decodekit/pipeline.h) with room for n entries.
  ListScratch list_scratch(int64_t n) {
    if (int64_t(ld.size()) < n) {
      const size_t c = size_t(n);
      tv.resize(c);
      ld.resize(c);
      ord.resize(c);
      pairs.resize(c);
      dpairs.resize(c);
      keep.resize(c);
      acc.resize(c);
    }
    return ListScratch{tv.data(), ld.data(), ord.data(), pairs.data(), dpairs.data(), keep.data(), acc.data()};
  }
  // Room for the walk's sums over n entries: g16, then g256.
  double* walk(int64_t n) {
    const size_t need = size_t(contract::walk16_groups(n) + contract::walk16_groups(n) / 16 + 2);
    if (g16.size() < need) g16.resize(need);
    return g16.data();
  }
  void ensure(int64_t V) {
    if (int64_t(y.size()) < V + 16) y.resize(size_t(V + 16));
    if (int64_t(tmark.size()) < (V >> 6) + 1) {
      tmark.assign(size_t((V >> 6) + 1), 0u);
      bmark.assign(size_t((V >> 10) + 1), 0u);
    }
  }
  // A new row whose sparse steps touch at most n distinct tokens: clears the previous row's marks
  // and the table.
  void begin_row(int64_t n) {
    for (const uint32_t h : tt.used) {
      const int64_t t = tt.e[h].t;
      tmark[size_t(t >> 6)] = 0u;
      bmark[size_t(t >> 10)] = 0u;
    }
    tt.reset(n);
  }
};
// The list steps' primitives on the CPU (decodekit/pipeline.h lists them): one thread; the cuts
// and the m-th largest by the mass select (cpu/mass_select.h), sorts by key_sort, the contract's
// walk for every mass.
struct SerialListOps {
  PipeScratch& ps;
  template <class F>
  void each(int64_t n, const F& f) const {
    for (int64_t j = 0; j < n; ++j) f(j);
  }
  template <class F>
  void serial(const F& f) const {
    f();
  }
  float mth_largest(const float* v, int64_t n, int64_t m) const {
    // the smallest value whose strictly greater values number < m: the mass select with weight 1
    // each (exact counts); histograms instead of nth_element's branchy partitions
    ps.sel.resize(size_t(n));
    for (int64_t j = 0; j < n; ++j) ps.sel[size_t(j)] = PipeVW{v[j], 1.f};
    return ps.mass_select.run(ps.sel.data(), n, double(m));
  }
  // 8 independent running maxima, then their max (the list holds no NaN; which of -0 / +0 comes
  // back never matters to the compares that use it)
  float max(const float* w, int64_t n) const {
    float x[8] = {w[0], w[0], w[0], w[0], w[0], w[0], w[0], w[0]};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (int q = 0; q < 8; ++q) x[q] = w[j + q] > x[q] ? w[j + q] : x[q];
    for (; j < n; ++j) x[0] = w[j] > x[0] ? w[j] : x[0];
    for (int q = 1; q < 8; ++q) x[0] = x[q] > x[0] ? x[q] : x[0];
    return x[0];
  }
  template <class E>
  double mass(const E* e, int64_t n) const {
    return contract::walk16_total(e, n);
  }
  // (key, position) pairs in one contiguous array (an index sort whose comparator reads the keys
  // through the positions misses the cache on every compare); long lists by a radix sort
  // (cpu/key_sort.h). Float keys widen exactly.
  template <class Key>
  void sort(int32_t* ord, int64_t n, const Key& key, bool descending) const {
    auto& kp = ps.key_sort.kp;
    kp.resize(size_t(n));
    for (int64_t q = 0; q < n; ++q) kp[size_t(q)] = {double(key(ord[q])), ord[q]};
    ps.key_sort.run(descending);
    for (int64_t q = 0; q < n; ++q) ord[q] = kp[size_t(q)].second;
  }
  // One pass: the ones at c into ord from 0, the ones above c aside (ps.cand); then the ties move
  // up behind the sorted ones above.
  int64_t candidates(const float* v, int64_t n, float c, int32_t* ord, int64_t* na) const {
    auto& above = ps.cand;
    above.clear();
    int64_t nt = 0;
    for (int64_t j = 0; j < n; ++j)
      if (v[j] >= c) {
        if (v[j] > c)
          above.push_back(int32_t(j));
        else
          ord[nt++] = int32_t(j);
      }
    const int64_t a = int64_t(above.size());
    if (nt > 0 && a > 0) std::memmove(ord + a, ord, size_t(nt) * sizeof(int32_t));
    std::copy(above.begin(), above.end(), ord);
    sort(ord, a, [v](int32_t j) { return v[j]; }, true);
    *na = a;
    return a + nt;
  }
  void filter(PipeList& L, const uint8_t* keep) const {
    int64_t c = 0;
    for (int64_t j = 0; j < L.n; ++j)
      if (keep[j]) {
        L.v[c] = L.v[j];
        L.w[c] = L.w[j];
        L.i[c] = L.i[j];
        ++c;
      }
    L.n = c;
  }
  // Top-p's cut on the list: the smallest value whose strictly greater values weigh < P.
  float top_p(const PipeList& L, double P, const ListScratch& s) const {
    for (int64_t j = 0; j < L.n; ++j) s.pairs[j] = PipeVW{L.v[j], L.w[j]};
    return ps.mass_select.run(s.pairs, L.n, P);
  }
  // Typical's cut: the same select over negated scores (the smallest -score whose strictly greater
  // -scores weigh < P is the largest score whose strictly smaller scores do).
  double low_cut(const double* sc, const float* w, int64_t n, double P, const ListScratch& s) const {
    for (int64_t j = 0; j < n; ++j) s.dpairs[j] = PipeDW{-sc[j], w ? w[j] : 1.f};
    return -ps.mass_select.run(s.dpairs, n, P);
  }
};

inline PipeScratch& pipe_scratch() {
  thread_local PipeScratch p;
  return p;
}

// The sparse steps of reference.process_logits, in its order: bans (-inf), logit bias, the
// repetition penalty once per distinct token of prompt + output, frequency / presence penalties.
// at(t) returns a reference to token t's current processed value (and may record t). ps.begin_row
// must have run for this row (the per-token flags and counts live in ps.tt).
template <class At>
inline void sparse_steps(const PipelineArgs& a, int64_t o, const PipeRow& pr, PipeScratch& ps, At&& at) {
  if (a.banned) {
    const int64_t* ids = a.banned + o * a.n_banned;
    for (int64_t j = 0; j < a.n_banned; ++j)
      if (ids[j] >= 0) at(ids[j]) = kNegInf;
  }
  if (a.bias_ids) {
    const int64_t* ids = a.bias_ids + o * a.n_bias;
    const float* bv = a.bias_vals + o * a.n_bias;
    for (int64_t j = 0; j < a.n_bias; ++j)
      if (ids[j] >= 0) {
        float& v = at(ids[j]);
        v = v + bv[j];
      }
  }
  TouchTable& tt = ps.tt;
  if (pr.rep != 1.f && (a.prompt || a.output)) {
    auto pen = [&](const int64_t* ids, int64_t n) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t t = ids[j];
        if (t < 0) continue;
        auto& en = tt.get(t);
        if (en.rep) continue;
        en.rep = 1;
        float& v = at(t);
        v = repetition_apply(v, pr.rep);
      }
    };
    if (a.prompt) pen(a.prompt + o * a.n_prompt, a.n_prompt);
    if (a.output) pen(a.output + o * a.n_output, a.n_output);
  }
  if (a.output && (pr.freq != 0.f || pr.pres != 0.f)) {
    const int64_t* ids = a.output + o * a.n_output;
    for (int64_t j = 0; j < a.n_output; ++j)
      if (ids[j] >= 0) ++tt.get(ids[j]).count;
    for (int64_t j = 0; j < a.n_output; ++j) {
      const int64_t t = ids[j];
      if (t < 0) continue;
      auto& en = tt.get(t);
      if (en.count == 0) continue;
      const uint32_t c = en.count;
      en.count = 0;
      float& v = at(t);
      v = count_penalty_apply(v, pr.freq, pr.pres, c);
    }
  }
}

// The most distinct tokens the sparse steps of row o can touch.
inline int64_t sparse_tokens(const PipelineArgs& a) {
  return (a.banned ? a.n_banned : 0) + (a.bias_ids ? a.n_bias : 0) + (a.prompt ? a.n_prompt : 0) +
         (a.output ? a.n_output : 0);
}

// The 16 allowed-bits of the block at token i (all set past the mask / without one).
inline M16 allow16(const int32_t* bm, int64_t bm_tokens, int64_t i) {
  if (!bm || i >= bm_tokens) return 0xFFFFu;
  M16 allow = bitmask_block16(bm, i);
  if (bm_tokens - i < 16) allow |= ~((M16(1) << (bm_tokens - i)) - 1) & 0xFFFFu;
  return allow;
}

// Pass 1 + sparse steps: y = processed row; returns false when the raw row is bad (NaN / +inf).
// *m = max of y (-inf when nothing is finite), *mraw = max of the raw row.
template <class T>
inline bool build_processed(const T* x, int64_t V, const PipelineArgs& a, int64_t o, const PipeRow& pr, PipeScratch& ps,
                            float* m_out, float* mraw_out) {
  float* y = ps.y.data();
  const int32_t* bm = a.bitmask ? a.bitmask + o * a.bitmask_words : nullptr;
  const int64_t bm_tokens = bm ? std::min<int64_t>(V, 32 * a.bitmask_words) : 0;
  const VF ninf = vset(kNegInf), pinf = vset(kPosInf);
  VF mx = ninf, mr = ninf;
  M16 badm = 0;
  for (int64_t i = 0; i < V; i += 16) {
    VF v = load_block(x, i, V, kNegInf);
    badm |= vnan(v) | veq(v, pinf);
    mr = vmax(mr, v);
    if (bm) v = vblend(allow16(bm, bm_tokens, i), ninf, v);
    mx = vmax(mx, v);
    vstore(y + i, v);  // y has 16 spare slots
  }
  *mraw_out = vhmax(mr);
  if (badm) return false;
  float m = vhmax(mx);
  // The sparse steps; every changed token is listed with its value before the first change.
  // Afterwards the max is the larger of m and the changed tokens' final values, unless a token
  // that held the max went down (then y is scanned again).
  auto& touched = ps.touched;
  touched.clear();
  ps.begin_row(sparse_tokens(a));
  sparse_steps(a, o, pr, ps, [&](int64_t t) -> float& {
    touched.push_back({int32_t(t), y[t]});
    return y[t];
  });
  bool hit_max = false;
  float mfix = kNegInf;
  for (const auto& [t, before] : touched) {
    const float v = y[t];
    if (v != v || v == kPosInf) return false;
    if (before == m && v < m) hit_max = true;
    mfix = std::max(mfix, v);
  }
  if (hit_max) {
    VF mm = ninf;
    for (int64_t i = 0; i < V; i += 16) mm = vmax(mm, vload(y + i));  // y's tail slots hold -inf
    m = vhmax(mm);
  } else {
    m = std::max(m, mfix);
  }
  *m_out = m;
  return true;
}

// Mean and population standard deviation of the finite values of y. The three sums (count, sum,
// squared deviations) follow the canonical row order of decodekit/contract.h (per kChunk-element
// chunk 16 double lanes in index order, folded lane 0..15, chunk sums in chunk order), which the
// CUDA kernel computes with one thread per (chunk, lane). y's tail slots hold -inf.
inline void finite_stats(const float* y, int64_t V, double* mean, double* sd) {
  const VF ninf = vset(kNegInf), zero = vset(0.f), one = vset(1.f);
  double n = 0.0, sum = 0.0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    VD s = vd_zero(), c = vd_zero();
    for (int64_t i = c0; i < std::min(V, c0 + kChunk); i += 16) {
      const VF v = vload(y + i);
      const M16 f = vgt(v, ninf);
      vd_add(s, vblend(f, zero, v));
      vd_add(c, vblend(f, zero, one));
    }
    sum += vd_reduce(s);
    n += vd_reduce(c);
  }
  const double mu = sum / n;
  // second pass: squared deviations in double, one lane sum per (chunk, lane)
  alignas(64) float buf[16];
  double ss = 0.0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    double lanes[16] = {};
    for (int64_t i = c0; i < std::min(V, c0 + kChunk); i += 16) {
      vstore(buf, vload(y + i));
      for (int j = 0; j < 16; ++j)
        if (buf[j] > kNegInf) {
          const double d = double(buf[j]) - mu;
          lanes[j] += d * d;
        }
    }
    double cs = 0.0;
    for (int j = 0; j < 16; ++j) cs += lanes[j];
    ss += cs;
  }
  *mean = mu;
  *sd = std::sqrt(ss / n);
}

// ps.top = the n largest values of a row with their indices (value descending, index ascending), by one
// pass in which a block with no value above the current n-th best costs one compare.
template <class T>
inline void top_scan(const T* x, int64_t V, int64_t n, PipeScratch& ps) {
  auto& top = ps.top;
  top.clear();
  auto better = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  alignas(64) float buf[16];
  for (int64_t i = 0; i < V; i += 16) {
    const VF v = load_block(x, i, V, kNegInf);
    if (int64_t(top.size()) == n && !vgt(v, vset(top.back().first))) continue;
    vstore(buf, v);
    const int lanes = int(std::min<int64_t>(16, V - i));
    for (int j = 0; j < lanes; ++j) {
      std::pair<float, int32_t> e{buf[j], int32_t(i + j)};
      if (int64_t(top.size()) == n) {
        if (!better(e, top.back())) continue;
        top.pop_back();
      }
      top.insert(std::upper_bound(top.begin(), top.end(), e, better), e);
    }
  }
}

constexpr int64_t kTopScanMax = 512;  // top-k up to this k: streaming scan; above: windows + nth_element

// Collects the starting list: {y >= lo} restricted to the top k values when k is on (k >= 1).
// Returns n; the values / indices are left in s.val / s.idx (index order).
inline int64_t collect_start(const float* y, int64_t V, float m, float T, float lo, int64_t k, Scratch& s,
                             PipeScratch& ps) {
  if (k <= 0) return collect_geq(y, V, lo, s);
  if (k <= kTopScanMax) {  // the k-th largest value by a streaming scan, then one collect
    top_scan(y, V, k, ps);
    return collect_geq(y, V, std::max(lo, ps.top[size_t(k - 1)].first), s);
  }
  const Window unit{false, T};
  const Weight w{false, m, 1.f / T};
  double cnt[kProfiles], mass[kProfiles];
  int pick = kProfiles;
  {  // estimate from every 8th block (the sampler's rule, select_row): the narrowest window estimated
     // to hold 4k values unless that is far more (the bulk's edge), else 2k, else k
    constexpr int64_t kStride = 8;
    window_profile(y, V, unit, m, w, false, cnt, mass, s.pf, kStride);
    const double kd = double(k);
    const double margin[3] = {4.0, 2.0, 1.0};
    const double limit[3] = {16.0 * kd + 256.0, 32.0 * kd + 2048.0, 32.0 * kd + 2048.0};
    for (int t = 0; t < 3 && pick == kProfiles; ++t) {
      int j = 0;
      while (j < kProfiles && cnt[j] * double(kStride) < margin[t] * kd) ++j;
      if (j < kProfiles && cnt[j] * double(kStride) <= limit[t]) pick = j;
    }
  }
  int64_t n = 0;
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (pick < kProfiles) {
      const float t = std::max(m - kProfileNats[pick] * T, -FLT_MAX);
      if (t <= lo) return collect_geq(y, V, lo, s);
      n = collect_geq(y, V, t, s);
      if (n >= k) break;
    }
    if (attempt == 1) return collect_geq(y, V, lo, s);
    window_profile(y, V, unit, m, w, false, cnt, mass, s.pf);  // exact counts
    pick = kProfiles;
    for (int j = 0; j < kProfiles && pick == kProfiles; ++j)
      if (cnt[j] >= double(k)) pick = j;
    if (pick == kProfiles) return collect_geq(y, V, lo, s);
  }
  // keep values >= max(lo, k-th largest)
  if (n > k) {
    s.tmp.assign(s.val.data(), s.val.data() + n);
    std::nth_element(s.tmp.begin(), s.tmp.begin() + (k - 1), s.tmp.end(), std::greater<float>());
    lo = std::max(lo, s.tmp[size_t(k - 1)]);
  }
  int64_t c = 0;
  for (int64_t j = 0; j < n; ++j)
    if (s.val[j] >= lo) {
      s.val[c] = s.val[j];
      s.idx[c] = s.idx[j];
      ++c;
    }
  return c;
}

// Top n of `vals` restricted to `cand` (value descending, index ascending), padded by the lowest
// indices outside `cand` at -inf. Writes ids / values.
inline void top_n_list(const float* v, const int32_t* idx, int64_t nl, int64_t n, PipeScratch& ps, int64_t* ids,
                       float* vals_out) {
  ps.top.resize(size_t(nl));
  for (int64_t j = 0; j < nl; ++j) ps.top[size_t(j)] = {v[j], idx[j]};
  auto better = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  const int64_t h = std::min(n, nl);
  std::partial_sort(ps.top.begin(), ps.top.begin() + h, ps.top.end(), better);
  for (int64_t j = 0; j < h; ++j) {
    ids[j] = ps.top[size_t(j)].second;
    vals_out[j] = ps.top[size_t(j)].first;
  }
  top_n_pad(idx, nl, h, n, ids, vals_out);  // the lowest indices not in the list (idx ascending)
}

// Fast start for top-k (k <= kTopScanMax; no top-n-sigma; not joint; T > 0): the processed row is
// never written and x is read once. The sparse steps run first, on the tokens they touch only
// (their processed values live in ps.tt; the tokens and 16-token blocks holding one are marked in
// bitsets). One pass over x then applies the bitmask, patches the touched tokens into their blocks
// and appends every value above a running threshold to a candidate buffer (a block with nothing
// above it costs one compare; when the buffer fills, the threshold rises to the buffer's k-th
// largest value and the buffer is compacted), so L0 = {y >= k-th largest} (ties at the k-th value
// included) comes out in index order. The same pass prefetches this thread's next row.
// Returns 0 (L0 in s.val / s.idx, *n), 1 (bad row) or 2 (nothing finite).
template <class T>
inline int fast_topk_start(const T* x, int64_t V, const PipelineArgs& a, int64_t o, const PipeRow& pr, int64_t k,
                           PipeScratch& ps, Scratch& s, float* m_out, float* mraw_out, int64_t* n_out) {
  const int32_t* bm = a.bitmask ? a.bitmask + o * a.bitmask_words : nullptr;
  const int64_t bm_tokens = bm ? std::min<int64_t>(V, 32 * a.bitmask_words) : 0;
  uint64_t* tmark = ps.tmark.data();
  uint64_t* bmark = ps.bmark.data();
  TouchTable& tt = ps.tt;
  ps.begin_row(sparse_tokens(a));
  {  // the raw values and mask words the sparse steps will read: all misses in flight at once
    auto pre = [&](const int64_t* ids, int64_t n) {
      for (int64_t j = 0; ids && j < n; ++j)
        if (ids[j] >= 0) {
          __builtin_prefetch(x + ids[j], 0, 3);
          if (bm && ids[j] < bm_tokens) __builtin_prefetch(bm + (ids[j] >> 5), 0, 3);
        }
    };
    pre(a.banned ? a.banned + o * a.n_banned : nullptr, a.n_banned);
    pre(a.bias_ids ? a.bias_ids + o * a.n_bias : nullptr, a.n_bias);
    pre(a.prompt ? a.prompt + o * a.n_prompt : nullptr, a.n_prompt);
    pre(a.output ? a.output + o * a.n_output : nullptr, a.n_output);
  }
  sparse_steps(a, o, pr, ps, [&](int64_t t) -> float& {
    auto& en = tt.get(t);
    if (!en.has) {
      en.has = 1;
      en.v = (bm && t < bm_tokens && !bitmask_allows(bm, t)) ? kNegInf : to_float(x[t]);
      tmark[t >> 6] |= uint64_t(1) << (t & 63);
      bmark[t >> 10] |= uint64_t(1) << ((t >> 4) & 63);
    }
    return en.v;
  });
  bool bad_fix = false;
  for (const uint32_t h : tt.used) {
    const float v = tt.e[h].v;
    bad_fix |= tt.e[h].has && (v != v || v == kPosInf);
  }
  const VF ninf = vset(kNegInf), pinf = vset(kPosInf);
  alignas(64) float buf[16];
  // the marks of the 16-token blocks from i (a multiple of 16) on
  auto blocks_marked = [&](int64_t i) { return bmark[i >> 10] >> ((i >> 4) & 63); };
  auto patch = [&](VF v, int64_t i) __attribute__((noinline)) {  // the touched tokens' values
    vstore(buf, v);
    for (uint64_t bits = (tmark[i >> 6] >> (i & 63)) & 0xFFFFu; bits; bits &= bits - 1) {
      const int j = __builtin_ctzll(bits);
      buf[j] = tt.find(i + j).v;
    }
    return vload(buf);
  };
  auto processed = [&](VF v, int64_t i) __attribute__((always_inline)) {  // bitmask, then the patch
    if (bm) v = vblend(allow16(bm, bm_tokens, i), ninf, v);
    if (blocks_marked(i) & 1u) v = patch(v, i);
    return v;
  };
  // The candidates: every value > vthr, appended in index order to s.val / s.idx. vthr is -inf
  // until the buffer first fills (cap entries), then the float just below the k-th largest value
  // of the buffer (a lower bound of the row's k-th largest, as the buffer holds every value >= it),
  // and the buffer is compacted to the values >= that k-th largest (ties kept, order kept).
  VF vthr = ninf;
  int64_t n = 0, cap = std::max<int64_t>(4 * k, 256);
  auto below = [](float f) {  // the largest float < f (f > -inf)
    return bits_to_float(f > 0.f ? float_to_bits(f) - 1u : (f == 0.f ? 0x80000001u : float_to_bits(f) + 1u));
  };
  auto keep_top_k = [&]() {  // the buffer (n >= k) cut to its values >= its k-th largest, in order
    s.tmp.assign(s.val.data(), s.val.data() + n);
    std::nth_element(s.tmp.begin(), s.tmp.begin() + (k - 1), s.tmp.end(), std::greater<float>());
    const float t = s.tmp[size_t(k - 1)];
    int64_t c = 0;
    for (int64_t j = 0; j < n; ++j)
      if (s.val[j] >= t) {
        s.val[c] = s.val[j];
        s.idx[c] = s.idx[j];
        ++c;
      }
    n = c;
    return t;
  };
  auto compact = [&]() __attribute__((noinline)) {
    vthr = vset(below(keep_top_k()));
    if (n > cap / 2) cap = 2 * n;  // ties at the k-th value: room to make progress
  };
  if (int64_t(s.val.size()) < cap + 64) {
    s.val.resize(size_t(cap + 64));
    s.idx.resize(size_t(cap + 64));
  }
  auto insert = [&](VF v, int64_t i) __attribute__((always_inline)) {
    const M16 hit = vgt(v, vthr);
    if (!hit) return;
    n += vcompress(s.val.data() + n, s.idx.data() + n, hit, v, int32_t(i));
    if (n >= cap) {
      compact();
      if (int64_t(s.val.size()) < cap + 64) {
        s.val.resize(size_t(cap + 64));
        s.idx.resize(size_t(cap + 64));
      }
    }
  };
  // mu: max of the blocks left as they are (raw = processed); mr / mx: raw / processed max of the others
  VF mu = ninf, mr = ninf, mx = ninf;
  M16 badm = 0;
  const int64_t Vfull = V & ~int64_t(63);
  Prefetch pf = s.pf;
  int64_t i = 0;
  for (; i < Vfull; i += 64) {  // four blocks per step: one NaN compare per pair, one threshold test
    pf.step4();
    VF a = vload(x + i), b = vload(x + i + 16), c = vload(x + i + 32), d = vload(x + i + 48);
    badm |= vnan2(a, b) | vnan2(c, d);
    if (bm || (blocks_marked(i) & 0xFu)) {
      mr = vmax(mr, vmax(vmax(a, b), vmax(c, d)));  // +inf shows in the raw max
      a = processed(a, i);
      b = processed(b, i + 16);
      c = processed(c, i + 32);
      d = processed(d, i + 48);
      const VF m4 = vmax(vmax(a, b), vmax(c, d));
      mx = vmax(mx, m4);
      if (!vgt(m4, vthr)) continue;
    } else {
      const VF m4 = vmax(vmax(a, b), vmax(c, d));
      mu = vmax(mu, m4);
      if (!vgt(m4, vthr)) continue;
    }
    insert(a, i);
    insert(b, i + 16);
    insert(c, i + 32);
    insert(d, i + 48);
  }
  for (; i < V; i += 16) {
    pf.step();
    VF v = load_block(x, i, V, kNegInf);
    badm |= vnan(v);
    mr = vmax(mr, v);
    v = processed(v, i);
    mx = vmax(mx, v);
    insert(v, i);
  }
  while (pf.p < pf.end) pf.step4();  // the next row's lines not yet prefetched (the tail blocks)
  s.pf = pf;
  mr = vmax(mr, mu);
  mx = vmax(mx, mu);
  if (vhmax(mr) == kPosInf) badm = 1;
  *mraw_out = vhmax(mr);
  if (badm || bad_fix) return 1;
  const float m = vhmax(mx);
  if (!(m > kNegInf)) return 2;
  // L0 = {y >= the k-th largest} (every finite value when there are fewer than k), index order
  if (n > k) keep_top_k();
  *m_out = m;
  *n_out = n;
  return 0;
}

// Top n of a full row: ids and values.
template <class T>
inline void top_n_row(const T* x, int64_t V, int64_t n, PipeScratch& ps, int64_t* ids, float* vals_out) {
  top_scan(x, V, n, ps);
  for (int64_t j = 0; j < n; ++j) {
    ids[j] = ps.top[size_t(j)].second;
    vals_out[j] = ps.top[size_t(j)].first;
  }
}

// Number of values of a row >= t.
template <class T>
inline int64_t count_geq(const T* x, int64_t V, float t) {
  int64_t c = 0;
  const VF vt = vset(t);
  for (int64_t i = 0; i < V; i += 16) c += popcount16(vge(load_block(x, i, V, kNegInf), vt));
  return c;
}

template <class T>
inline void store_elem(T* p, float v);
template <>
inline void store_elem<float>(float* p, float v) {
  *p = v;
}
template <>
inline void store_elem<bf16_t>(bf16_t* p, float v) {
  p->x = dk::bf16_bits(v);
}
template <>
inline void store_elem<f16_t>(f16_t* p, float v) {
  p->x = f16_bits(v);
}

// xgrammar's in-place mask of one row: -inf where the bit of token i < n is 0.
template <class T>
inline void bitmask_apply_row(T* x, int64_t n, const int32_t* words, T ninf) {
  for (int64_t w = 0; w * 32 < n; ++w) {
    uint32_t bits = ~uint32_t(words[w]);
    if (n - w * 32 < 32) bits &= (uint32_t(1) << (n - w * 32)) - 1u;
    for (; bits; bits &= bits - 1) x[w * 32 + __builtin_ctz(bits)] = ninf;
  }
}

// The deferred checks of one row (decodekit/pipeline.h): its params, list ids and bias values.
inline bool pipe_row_values_ok(const PipelineArgs& a, int64_t o, int64_t V) {
  bool ok = pipe_params_ok(a.params + o * kPipeParams);
  auto ids = [&](const int64_t* t, int64_t m) {
    for (int64_t j = 0; t && j < m; ++j) ok = ok && pipe_id_ok(t[o * m + j], V);
  };
  ids(a.banned, a.n_banned);
  ids(a.bias_ids, a.n_bias);
  ids(a.prompt, a.n_prompt);
  ids(a.output, a.n_output);
  for (int64_t j = 0; a.bias_vals && j < a.n_bias; ++j) ok = ok && pipe_bias_ok(a.bias_vals[o * a.n_bias + j]);
  return ok;
}

template <class T>
inline void pipeline_row(const PipelineArgs& a, int64_t o, Scratch& s, PipeScratch& ps) {
  const int64_t V = a.in.V;
  const T* base = static_cast<const T*>(a.in.data);
  const int64_t src = a.indices ? a.indices[o] : o;
  const T* x = base + src * a.in.row_stride;
  prefetch_next(s, base, a.in.row_stride, V, a.indices, o, a.n_out);
  const PipeRow pr = pipe_row(a.params + o * kPipeParams);
  const PipeOrder order = PipeOrder(a.order);
  ps.ensure(V);
  float* y = ps.y.data();
  float m = kNegInf, mraw = kNegInf;
  const int64_t kk = step_on(Step::TopK, pr, V) ? std::max(pr.k, pr.mtk) : 0;
  const bool fast =
      a.mode == 0 && pr.T > 0.f && order != PipeOrder::Joint && pr.nsig <= 0.0 && kk >= 1 && kk <= kTopScanMax;
  int64_t n_fast = 0;
  bool ok = true, valid = true;
  if (a.error_flag && !pipe_row_values_ok(a, o, V)) {
    __atomic_fetch_or(a.error_flag, a.error_bit, __ATOMIC_RELAXED);
    ok = valid = false;
  } else if (fast) {
    const int r = fast_topk_start(x, V, a, o, pr, kk, ps, s, &m, &mraw, &n_fast);
    ok = r != 1;
    valid = r == 0;
  } else {
    ok = build_processed(x, V, a, o, pr, ps, &m, &mraw);
    valid = ok && m > kNegInf;
  }
  T* out = a.mode == 1 ? static_cast<T*>(a.out_logits) + o * V : nullptr;
  auto fail = [&]() {
    if (out) {
      if (!ok)
        for (int64_t i = 0; i < V; ++i) out[i] = x[i];  // a bad raw row passes through
      else
        for (int64_t i = 0; i < V; ++i) store_elem(out + i, y[i]);
      return;
    }
    a.out_tokens[o] = 0;
    a.out_valid[o] = false;
    if (a.out_logprob) a.out_logprob[o] = 0.f;
    if (a.out_rank) a.out_rank[o] = 0;
    for (int64_t j = 0; j < a.top_n; ++j) {
      a.out_top_ids[o * a.top_n + j] = 0;
      a.out_top_lp[o * a.top_n + j] = kNegInf;
    }
  };
  if (!valid) {
    fail();
    return;
  }
  // temperature 0: greedy, no truncation (in mask mode the processed row is the output)
  const bool greedy = pr.T == 0.f;
  const float temp = greedy ? 1.f : pr.T;
  const float invT = 1.f / temp;
  // ---- the truncations --------------------------------------------------------------------------
  const bool any = any_truncation(pr, V);
  if (greedy || !any) {
    if (out) {
      for (int64_t i = 0; i < V; ++i) store_elem(out + i, y[i]);
      return;
    }
  }
  PipeList L{nullptr, nullptr, nullptr, 0};
  const Weight wt{false, m, invT};
  if (!greedy) {
    float lo = -FLT_MAX;
    if (pr.nsig > 0.0) {
      double mu, sd;
      finite_stats(y, V, &mu, &sd);
      lo = float_at_least(double(m) - pr.nsig * sd);
    }
    const bool joint = order == PipeOrder::Joint;
    const int64_t k = (!joint && step_on(Step::TopK, pr, V)) ? std::max(pr.k, pr.mtk) : 0;
    // joint: every truncation sees the whole finite row; top-n-sigma is one more intersected filter
    const float lo0 = joint ? -FLT_MAX : lo;
    const int64_t n0 = fast ? n_fast : collect_start(y, V, m, temp, lo0, k, s, ps);
    if (int64_t(ps.lv.size()) < n0 + 16) {
      ps.lv.resize(size_t(n0 + 16));
      ps.lw.resize(size_t(n0 + 16));
      ps.li.resize(size_t(n0 + 16));
    }
    std::copy(s.val.data(), s.val.data() + n0, ps.lv.data());
    std::copy(s.idx.data(), s.idx.data() + n0, ps.li.data());
    L = PipeList{ps.lv.data(), ps.lw.data(), ps.li.data(), n0};
    for (int64_t j = 0; j < n0; j += 16) {  // weights, vector exp (bit-identical to the scalar one)
      const VF v = (j + 16 <= n0) ? vload(L.v + j) : vload_partial(L.v + j, int(n0 - j), 0.f);
      vstore(L.w + j, wt(v));
    }
    run_truncations(L, pr, order, V, m, invT, lo, ps.list_scratch(L.n), SerialListOps{ps});
  }
  if (out) {  // mode 1: the survivors keep their processed logit, everything else -inf
    for (int64_t i = 0; i < V; ++i) store_elem(out + i, kNegInf);
    for (int64_t j = 0; j < L.n; ++j) store_elem(out + L.i[j], y[L.i[j]]);
    return;
  }
  // ---- the draw -----------------------------------------------------------------------------------
  int64_t tok = 0;
  double Z = 1.0;
  float tw = 1.f, tv = 0.f;  // the token's weight and processed value
  if (greedy) {
    for (int64_t i = 0; i < V; ++i)
      if (y[i] == m) {
        tok = i;
        break;
      }
  } else {
    const double u = row_uniform(row_key(a, o), 0u);
    double* g16 = ps.walk(L.n);  // the contract's walk: Z = its total, the pick at u * Z
    const int64_t last = contract::walk16_draw(L.w, L.n, u, g16, g16 + contract::walk16_groups(L.n), &Z);
    if (last < 0) {
      fail();
      return;
    }  // no positive weight (cannot happen: the max has weight 1)
    tok = L.i[last];
    tw = L.w[last];
    tv = L.v[last];
  }
  a.out_tokens[o] = tok;
  a.out_valid[o] = true;
  if (!a.want_logprob && a.top_n == 0) return;
  // ---- logprobs -------------------------------------------------------------------------------
  int64_t* tids = a.top_n ? a.out_top_ids + o * a.top_n : nullptr;
  float* tlp = a.top_n ? a.out_top_lp + o * a.top_n : nullptr;
  if (a.raw_logprobs || greedy) {
    // log_softmax of the raw row (raw) or of the processed row at temperature 1 (greedy, processed)
    const bool raw = a.raw_logprobs;
    const float mm = raw ? mraw : m;
    const Weight w1{false, mm, 1.f};
    Prefetch none{};
    const double lz = std::log(raw ? row_mass(x, V, w1, kNegInf, 0.f, none) : row_mass(y, V, w1, kNegInf, 0.f, none));
    auto lp = [&](float v) { return logprob_of_value(v, mm, lz); };
    const float vt = raw ? to_float(x[tok]) : y[tok];
    if (a.out_logprob) a.out_logprob[o] = lp(vt);
    if (a.out_rank) a.out_rank[o] = raw ? count_geq(x, V, vt) : count_geq(y, V, vt);
    if (tids) {
      if (raw)
        top_n_row(x, V, a.top_n, ps, tids, tlp);
      else
        top_n_row(y, V, a.top_n, ps, tids, tlp);
      for (int64_t j = 0; j < a.top_n; ++j) tlp[j] = tlp[j] > kNegInf ? lp(tlp[j]) : kNegInf;
    }
    return;
  }
  const double lz = std::log(Z);
  auto lpw = [&](float w) { return logprob_of_weight(w, lz); };
  if (a.out_logprob) a.out_logprob[o] = lpw(tw);
  if (a.out_rank) {
    int64_t c = 0;
    for (int64_t j = 0; j < L.n; ++j) c += L.v[j] >= tv;
    a.out_rank[o] = c;
  }
  if (tids) {
    top_n_list(L.v, L.i, L.n, a.top_n, ps, tids, tlp);
    for (int64_t j = 0; j < a.top_n; ++j) tlp[j] = tlp[j] > kNegInf ? lpw(wt(tlp[j])) : kNegInf;
  }
}

}  // namespace dk::cpu::DK_ISA_NAME
