// Sampling and filtering kernels; compiled once per ISA (see CMakeLists.txt).
#include "cpu/row_engine.h"
#include "cpu/pipeline.h"

namespace dk::cpu::DK_ISA_NAME {

template <class T>
static void sample_rows_t(const SampleArgs& a, int64_t begin, int64_t end) {
  Scratch& s = scratch();
  const T* base = static_cast<const T*>(a.in.data);
  const int64_t V = a.in.V;
  for (int64_t o = begin; o < end; ++o) {
    const int64_t src = a.indices ? a.indices[o] : o;
    const T* x = base + src * a.in.row_stride;
    prefetch_next(s, base, a.in.row_stride, V, a.indices, o, end);
    RowParamsF rp = row_params(a.filter, o);
    int64_t tok = 0;
    bool valid = false;
    float logprob = 0.f;
    if (!a.filter.is_probs && rp.T == 0.f) {  // greedy: lowest index of the max
      valid = row_argmax(x, V, s, &tok);
    } else {
      Selection sel = select_row(x, V, a.filter.is_probs, rp, s);
      if (sel.valid) {
        valid = true;
        double u = row_uniform(row_key(a, o), 0u);
        double Z = 1.0;
        float wt = 1.f;
        tok = draw(x, V, sel, u, s, &Z, &wt);
        logprob = float(std::log(double(wt)) - std::log(Z));
      }
    }
    a.out_tokens[o] = tok;
    if (a.out_valid) a.out_valid[o] = valid;
    if (a.out_logprob) a.out_logprob[o] = valid ? logprob : 0.f;
  }
}

// Gumbel-max: token = argmax_i (x_i + g_i), g_i from element i's Philox words.
// Element i of a row uses block 16*(i/32) + (i%16), words (0,1) if (i/16) is even else (2,3).
template <class T>
static void gumbel_rows_t(const SampleArgs& a, int64_t begin, int64_t end) {
  const T* base = static_cast<const T*>(a.in.data);
  const int64_t V = a.in.V;
  const VF pinf = vset(kPosInf);
  const VF s32 = vset(2.3283064365386963e-10f), s64 = vset(5.421010862427522e-20f),
           half64 = vset(2.710505431213761e-20f), vmaxu = vset(0.99999994f);
  alignas(64) float bv[16];
  int64_t bi[16];  // per lane: the index of its best score (int64: exact for any V)
  for (int64_t o = begin; o < end; ++o) {
    const int64_t src = a.indices ? a.indices[o] : o;
    const T* x = base + src * a.in.row_stride;
    RngKey key = row_key(a, o);
    const uint32_t c1 = 0u | (key.offset_hi16 << 16);
    VF best = vset(kNegInf);
    for (int j = 0; j < 16; ++j) bi[j] = 0;
    M16 badm = 0;
    for (int64_t g = 0; g * 32 < V; ++g) {
      VPhilox r = vphilox(iiota(uint32_t(16 * g)), c1, key.stream, key.offset_lo, key.k0, key.k1);
      for (int half = 0; half < 2; ++half) {
        const int64_t i = 32 * g + 16 * half;
        if (i >= V) break;
        VF v = load_block(x, i, V, kNegInf);
        badm |= vnan(v) | veq(v, pinf);
        VI wa = half ? r.w2 : r.w0, wb = half ? r.w3 : r.w1;
        VF u = vadd(vadd(vmul(u32_to_float(wa), s32), vmul(u32_to_float(wb), s64)), half64);
        u = vmin(u, vmaxu);
        VF score = vadd(v, gumbel_from_uniform(u));
        M16 better = vgt(score, best);
        best = vblend(better, best, score);
        for (M16 m = better; m; m &= m - 1) {  // rare after the first blocks: a lane's max moved
          const int j = __builtin_ctz(m);
          bi[j] = i + j;
        }
      }
    }
    vstore(bv, best);
    float bs = kNegInf;
    int64_t tok = 0;
    for (int j = 0; j < 16; ++j) {
      const int64_t id = bi[j];
      if (bv[j] > bs || (bv[j] == bs && bs > kNegInf && id < tok)) {
        bs = bv[j];
        tok = id;
      }
    }
    bool valid = badm == 0 && bs > kNegInf;
    a.out_tokens[o] = valid ? tok : 0;
    if (a.out_valid) a.out_valid[o] = valid;
    if (a.out_logprob) a.out_logprob[o] = 0.f;
  }
}

template <class T>
inline T neg_inf_value();
template <>
inline float neg_inf_value<float>() {
  return kNegInf;
}
template <>
inline bf16_t neg_inf_value<bf16_t>() {
  return bf16_t{0xFF80};
}
template <>
inline f16_t neg_inf_value<f16_t>() {
  return f16_t{0xFC00};
}

template <class T>
static void filter_rows_t(const FilterArgs& a, int64_t begin, int64_t end) {
  Scratch& s = scratch();
  const T* base = static_cast<const T*>(a.in.data);
  const int64_t V = a.in.V;
  const float fill = a.filter.is_probs ? 0.f : kNegInf;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = base + r * a.in.row_stride;
    prefetch_next(s, base, a.in.row_stride, V, nullptr, r, end);
    RowParamsF rp = row_params(a.filter, r);
    if (a.kind == FilterOut::Softmax) {
      float* out = static_cast<float*>(a.out) + r * a.out_stride;
      Window win{false, 0.f};
      RowScan sc = scan_row(x, V, win, false, s);
      if (sc.bad) {
        for (int64_t i = 0; i < V; ++i) out[i] = NAN;
        continue;
      }
      Weight w{false, sc.m, 1.f / rp.T};
      double Z = row_mass(x, V, w, kNegInf, 0.f, s.pf);
      VF inv = vset(float(1.0 / Z));
      for (int64_t i = 0; i < V; i += 16) {
        VF e = vmul(w(load_block(x, i, V, kNegInf)), inv);
        if (i + 16 <= V)
          vstore(out + i, e);
        else {
          alignas(64) float t[16];
          vstore(t, e);
          for (int64_t j = 0; j < V - i; ++j) out[i + j] = t[j];
        }
      }
      continue;
    }
    Selection sel = select_row(x, V, a.filter.is_probs, rp, s);
    if (a.kind == FilterOut::MaskLogits) {
      T* out = static_cast<T*>(a.out) + r * a.out_stride;
      if (!sel.valid) {
        for (int64_t i = 0; i < V; ++i) out[i] = x[i];
        continue;
      }
      const VF vt = vset(sel.res.t), vmw = vset(sel.res.minw);
      for (int64_t i = 0; i < V; i += 16) {
        VF v = load_block(x, i, V, fill);
        M16 keep = vge(v, vt) & vge(sel.w(v), vmw);
        const int64_t n = std::min<int64_t>(16, V - i);
        for (int64_t j = 0; j < n; ++j) out[i + j] = ((keep >> j) & 1) ? x[i + j] : neg_inf_value<T>();
      }
    } else {  // RenormProbs
      float* out = static_cast<float*>(a.out) + r * a.out_stride;
      if (!sel.valid) {
        for (int64_t i = 0; i < V; ++i) out[i] = 0.f;
        continue;
      }
      double Z = row_mass(x, V, sel.w, sel.res.t, sel.res.minw, s.pf);
      const VF vt = vset(sel.res.t), vmw = vset(sel.res.minw), zero = vset(0.f);
      // out = e / Z as e * float(1 / Z); a total mass below 2^-64 (1 / Z would overflow float32
      // under ~2.9e-39) first scales e and Z by 2^64, which is exact
      const RenormScale sc = renorm_scale(Z);
      const VF pre = vset(sc.pre), inv = vset(sc.inv);
      for (int64_t i = 0; i < V; i += 16) {
        VF v = load_block(x, i, V, fill);
        VF e = sel.w(v);
        M16 keep = vge(v, vt) & vge(e, vmw);
        VF o = vblend(keep, zero, vmul(vmul(e, pre), inv));
        if (i + 16 <= V)
          vstore(out + i, o);
        else {
          alignas(64) float t[16];
          vstore(t, o);
          for (int64_t j = 0; j < V - i; ++j) out[i + j] = t[j];
        }
      }
    }
  }
}

template <class T>
static void pipeline_rows_t(const PipelineArgs& a, int64_t begin, int64_t end) {
  Scratch& s = scratch();
  PipeScratch& ps = pipe_scratch();
  for (int64_t o = begin; o < end; ++o) pipeline_row<T>(a, o, s, ps);
}

template <class T>
static void bitmask_rows_t(const BitmaskArgs& a, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const int64_t r = a.indices ? a.indices[j] : j;
    if (r < 0) continue;  // an index the deferred checks found bad (the binding set it to -1)
    bitmask_apply_row(static_cast<T*>(a.data) + r * a.row_stride, a.tokens, a.words + r * a.word_stride,
                      neg_inf_value<T>());
  }
}

#define DK_DISPATCH_DTYPE(dt, fn, ...)                \
  switch (dt) {                                       \
    case DType::F32: fn<float>(__VA_ARGS__); break;   \
    case DType::BF16: fn<bf16_t>(__VA_ARGS__); break; \
    case DType::F16: fn<f16_t>(__VA_ARGS__); break;   \
  }

static void sample_rows(const SampleArgs& a, int64_t b, int64_t e) {
  DK_DISPATCH_DTYPE(a.in.dtype, sample_rows_t, a, b, e)
}
static void gumbel_rows(const SampleArgs& a, int64_t b, int64_t e) {
  DK_DISPATCH_DTYPE(a.in.dtype, gumbel_rows_t, a, b, e)
}
static void filter_rows(const FilterArgs& a, int64_t b, int64_t e) {
  DK_DISPATCH_DTYPE(a.in.dtype, filter_rows_t, a, b, e)
}
static void pipeline_rows(const PipelineArgs& a, int64_t b, int64_t e) {
  DK_DISPATCH_DTYPE(a.in.dtype, pipeline_rows_t, a, b, e)
}
static void bitmask_rows(const BitmaskArgs& a, int64_t b, int64_t e) {
  DK_DISPATCH_DTYPE(a.dtype, bitmask_rows_t, a, b, e)
}

}  // namespace dk::cpu::DK_ISA_NAME

#define DK_STR2(x) #x
#define DK_STR(x) DK_STR2(x)
#define DK_CAT2(a, b) a##b
#define DK_CAT(a, b) DK_CAT2(a, b)

namespace dk::cpu {
const KernelTable& DK_CAT(table_, DK_ISA_NAME)() {
  static const KernelTable t{DK_STR(DK_ISA_NAME),       &DK_ISA_NAME::sample_rows,   &DK_ISA_NAME::gumbel_rows,
                             &DK_ISA_NAME::filter_rows, &DK_ISA_NAME::pipeline_rows, &DK_ISA_NAME::bitmask_rows};
  return t;
}
}  // namespace dk::cpu
