// Internal header of csrc/cpu/isa/attention.cpp: the fp32 engine (kMode 0, every ISA). Register
// tiles S = Q K^T (s_tile_f32) and O = O*alpha + P V (pv_tile_f32), the online-softmax update of a
// row tile (softmax_rows; its bf16 output also feeds the vdpbf16ps engine), the row-count dispatch,
// the K block packer (keys transposed into lanes, bf16 / fp16 converted) and the dot product of
// the sparse tree part.
#pragma once
#include "cpu/isa/attention_common.h"

namespace dk::cpu::DK_ISA_NAME {
namespace {

// ---- fp32 micro kernels (every ISA) -----------------------------------------------------------
// S[r][n] = sum_d Q[r][d] * Kt[d][n] for R rows and all kN keys. Kt is [D][kN].
template <int R>
void s_tile_f32(const float* Q, int64_t D, const float* Kt, float* S) {
  constexpr int C = VT::kSC;
  for (int c0 = 0; c0 < kN; c0 += C * W) {
    V acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) acc[r][j] = VT::zero();
    const float* kp = Kt + c0;
    for (int64_t d = 0; d < D; ++d, kp += kN) {
      V kv[C];
      for (int j = 0; j < C; ++j) kv[j] = VT::load(kp + j * W);
      for (int r = 0; r < R; ++r) {
        V qb = VT::set1(Q[r * D + d]);
        for (int j = 0; j < C; ++j) acc[r][j] = VT::fma(qb, kv[j], acc[r][j]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) VT::store(S + r * kN + c0 + j * W, acc[r][j]);
  }
}

// O[r][d0 .. d0 + NV*W) = O * alpha[r] + sum_{n < nv} P[r][n] * Vb[n][d]. Vb rows are ldv apart.
template <int R, int NV>
void pv_chunk_f32(float* O, int64_t D, const float* alpha, const float* P, int nv, const float* Vb, int64_t ldv,
                  int64_t d0) {
  V acc[R][NV];
  for (int r = 0; r < R; ++r) {
    V a = VT::set1(alpha[r]);
    for (int j = 0; j < NV; ++j) acc[r][j] = VT::mul(VT::load(O + r * D + d0 + j * W), a);
  }
  const float* vp = Vb + d0;
  for (int n = 0; n < nv; ++n, vp += ldv) {
    V vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = VT::load(vp + j * W);
    for (int r = 0; r < R; ++r) {
      V pb = VT::set1(P[r * kN + n]);
      for (int j = 0; j < NV; ++j) acc[r][j] = VT::fma(pb, vv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) VT::store(O + r * D + d0 + j * W, acc[r][j]);
}

template <int R>
void pv_tile_f32(float* O, int64_t D, const float* alpha, const float* P, int nv, const float* Vb, int64_t ldv) {
  constexpr int NV = VT::kPV;
  const int64_t nvec = D / W;
  int64_t c = 0;
  for (; c + NV <= nvec; c += NV) pv_chunk_f32<R, NV>(O, D, alpha, P, nv, Vb, ldv, c * W);
  switch (nvec - c) {  // remainder (D = 80, 96 on AVX-512)
    case 0: break;
    case 1: pv_chunk_f32<R, 1>(O, D, alpha, P, nv, Vb, ldv, c * W); break;
    case 2: pv_chunk_f32<R, 2>(O, D, alpha, P, nv, Vb, ldv, c * W); break;
    default: pv_chunk_f32<R, 3>(O, D, alpha, P, nv, Vb, ldv, c * W); break;
  }
}

// Online-softmax update of R (<= 16) rows from their raw score tile S (kN wide, first nv valid):
// x = c * S (log2 domain), m_new = max(m, max x), alpha = 2^(m - m_new), P = 2^(x - m_new),
// L = L * alpha + P summed lane-wise. P is written as fp32 ([R][kN]) or, with kBf16Out, as bf16
// ([R][kN]). L holds W lanes per row (summed once, after the prefix): no horizontal sum per block.
// The running max only moves when some scaled score exceeds it; that is tested with one vector
// compare, so the horizontal max is taken only in the (rare, after the first blocks) moving case.
template <bool kBf16Out>
void softmax_rows(int R, float* S, int nv, float c, void* Pout, float* alpha, float* m, float* L) {
  // padded keys: a score whose scaled value is -inf, so its weight is 0 (at most 2^-126)
  if (nv < kN)
    for (int r = 0; r < R; ++r)
      for (int n = nv; n < kN; ++n) S[r * kN + n] = c > 0 ? kNegInf : -kNegInf;
  alignas(64) float mo[32], mn[32], al[32];
  const V cv = VT::set1(c);
  for (int r = 0; r < R; ++r) {
    const float* s = S + r * kN;
    V a = VT::load(s);
    if (c > 0) {
      for (int n = W; n < kN; n += W) a = VT::max(a, VT::load(s + n));
    } else {
      for (int n = W; n < kN; n += W) a = VT::min(a, VT::load(s + n));
    }
    const V x = VT::mul(a, cv);  // its largest lane is the block's largest scaled score
    mo[r] = m[r];
    mn[r] = VT::any_gt(x, m[r]) ? std::max(m[r], VT::hmax(x)) : m[r];
  }
  for (int r = R; r < (R + W - 1) / W * W; ++r) mo[r] = mn[r] = 0.f;
  for (int r = 0; r < R; r += W) VT::store(al + r, VT::exp2(VT::sub(VT::load(mo + r), VT::load(mn + r))));
  for (int r = 0; r < R; ++r) {
    const float* s = S + r * kN;
    const V mv = VT::set1(-mn[r]);
    V sum = VT::zero();
#if defined(DK_ISA_AVX512)
    if constexpr (kBf16Out) {
      for (int n = 0; n < kN; n += 32) {  // two vectors -> one 32-wide bf16 store
        V e0 = VT::template exp2<4>(VT::fma(VT::load(s + n), cv, mv));
        V e1 = VT::template exp2<4>(VT::fma(VT::load(s + n + 16), cv, mv));
        sum = VT::add(sum, VT::add(e0, e1));
        _mm512_storeu_si512(static_cast<uint16_t*>(Pout) + r * kN + n, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      }
    } else
#endif
    {
      for (int n = 0; n < kN; n += W) {
        V e = VT::template exp2<kBf16Out ? 4 : 7>(VT::fma(VT::load(s + n), cv, mv));
        sum = VT::add(sum, e);
        if constexpr (!kBf16Out) VT::store(static_cast<float*>(Pout) + r * kN + n, e);
      }
    }
    float* lr = L + r * W;
    VT::store(lr, al[r] == 1.f ? VT::add(VT::load(lr), sum) : VT::fma(VT::load(lr), VT::set1(al[r]), sum));
    m[r] = mn[r];
    alpha[r] = al[r];
  }
}

template <class F>
void dispatch_rows(int R, F&& f) {
  switch (R) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
#if defined(DK_ISA_AVX512) || defined(DK_ISA_AVX2)
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
#endif
    default: break;
  }
}

// Pack nv (<= kN) key rows into Kt[D][kN] fp32 (keys in lanes), zero padded.
#if defined(DK_ISA_AVX512)
inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16f(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16f(const bf16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
template <class T>
void pack_k_f32(const T* k, int64_t ks, int nv, int64_t D, float* Kt, float*) {
  for (int n0 = 0; n0 < kN; n0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = n0 + i < nv ? _mm512_castps_si512(load16f(k + (n0 + i) * ks + d0)) : _mm512_setzero_si512();
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(Kt + (d0 + i) * kN + n0, r[i]);
    }
}
#elif defined(DK_ISA_AVX2)
inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8f(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8f(const bf16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}
template <class T>
void pack_k_f32(const T* k, int64_t ks, int nv, int64_t D, float* Kt, float*) {
  for (int n0 = 0; n0 < kN; n0 += 8)
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = n0 + i < nv ? load8f(k + (n0 + i) * ks + d0) : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(Kt + (d0 + i) * kN + n0, r[i]);
    }
}
#else
template <class T>
void pack_k_f32(const T* k, int64_t ks, int nv, int64_t D, float* Kt, float* row) {
  if (nv < kN)
    for (int64_t d = 0; d < D; ++d) std::memset(Kt + d * kN + nv, 0, size_t(kN - nv) * 4);
  for (int n = 0; n < nv; ++n) {
    const float* src;
    if constexpr (std::is_same_v<T, float>)
      src = k + n * ks;
    else {
      cvt_row(k + n * ks, row, D);
      src = row;
    }
    for (int64_t d = 0; d < D; ++d) Kt[d * kN + n] = src[d];
  }
}
#endif

inline float dot_f32(const float* a, const float* b, int64_t D) {
  V acc = VT::zero();
  for (int64_t d = 0; d < D; d += W) acc = VT::fma(VT::load(a + d), VT::load(b + d), acc);
  return VT::hsum(acc);
}

}  // namespace
}  // namespace dk::cpu::DK_ISA_NAME
