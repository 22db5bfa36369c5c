// Internal header of csrc/cpu/isa/attention.cpp: the AVX-512 BF16 engine (kMode 1, vdpbf16ps),
// built into the avx512 object only. Score and P V micro tiles on bf16 pairs, and the packers that
// lay a K block out as pairs along d (keys in lanes) and a V block as pairs of keys.
#pragma once
#include "cpu/isa/attention_fp32.h"

#if defined(DK_ISA_AVX512)
namespace dk::cpu::DK_ISA_NAME {
namespace {

// ---- AVX-512 BF16 micro kernels (vdpbf16ps) ---------------------------------------------------
inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// S[r][n] = sum_p dot(Qw[r][p], Kp[p][n]) where Qw / Kp hold bf16 pairs (d = 2p, 2p+1) as 32-bit
// words. Kp is [D/2][kN] words.
template <int R>
void s_tile_bf16(const uint32_t* Qw, int64_t D2, const uint32_t* Kp, float* S) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const uint32_t* kp = Kp;
  for (int64_t p = 0; p < D2; ++p, kp += kN) {
    __m512i kv[4];
    for (int j = 0; j < 4; ++j) kv[j] = _mm512_loadu_si512(kp + 16 * j);
    for (int r = 0; r < R; ++r) {
      __m512i qb = _mm512_set1_epi32(int(Qw[r * D2 + p]));
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], as_bh(qb), as_bh(kv[j]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(S + r * kN + 16 * j, acc[r][j]);
}

// O[r][d0 .. d0 + 16*NV) = O * alpha[r] + sum over key pairs of Pw[r][np] . Vp[np][d]. Pw holds the
// bf16 probabilities of a row tile as pairs ([R][kN/2] words), Vp is [np][D] words (pairs of keys
// 2np, 2np+1 interleaved per d).
template <int R, int NV>
void pv_chunk_bf16(float* O, int64_t D, const float* alpha, const uint32_t* Pw, int npairs, const uint32_t* Vp,
                   int64_t d0) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    __m512 a = _mm512_set1_ps(alpha[r]);
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_mul_ps(_mm512_loadu_ps(O + r * D + d0 + 16 * j), a);
  }
  const uint32_t* vp = Vp + d0;
  for (int np = 0; np < npairs; ++np, vp += D) {
    __m512i vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = _mm512_loadu_si512(vp + 16 * j);
    for (int r = 0; r < R; ++r) {
      __m512i pb = _mm512_set1_epi32(int(Pw[r * (kN / 2) + np]));
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], as_bh(pb), as_bh(vv[j]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(O + r * D + d0 + 16 * j, acc[r][j]);
}

template <int R>
void pv_tile_bf16(float* O, int64_t D, const float* alpha, const uint32_t* Pw, int npairs, const uint32_t* Vp) {
  const int64_t nvec = D / 16;
  int64_t c = 0;
  for (; c + 4 <= nvec; c += 4) pv_chunk_bf16<R, 4>(O, D, alpha, Pw, npairs, Vp, c * 16);
  switch (nvec - c) {
    case 0: break;
    case 1: pv_chunk_bf16<R, 1>(O, D, alpha, Pw, npairs, Vp, c * 16); break;
    case 2: pv_chunk_bf16<R, 2>(O, D, alpha, Pw, npairs, Vp, c * 16); break;
    default: pv_chunk_bf16<R, 3>(O, D, alpha, Pw, npairs, Vp, c * 16); break;
  }
}

// Pack nv (<= kN) bf16 key rows into Kp[D/2][kN] words (keys in lanes), zero padded.
void pack_k_bf16(const bf16_t* k, int64_t ks, int nv, int64_t D, uint32_t* Kp) {
  const int64_t D2 = D / 2;
  for (int n0 = 0; n0 < kN; n0 += 16) {
    for (int64_t p0 = 0; p0 < D2; p0 += 16) {
      const int w = int(std::min<int64_t>(16, D2 - p0));
      const __mmask16 lm = __mmask16((1u << w) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = n0 + i < nv ? _mm512_maskz_loadu_epi32(lm, reinterpret_cast<const uint32_t*>(k + (n0 + i) * ks) + p0)
                           : _mm512_setzero_si512();
      transpose16(r);
      for (int i = 0; i < w; ++i) _mm512_storeu_si512(Kp + (p0 + i) * kN + n0, r[i]);
    }
  }
}

// Pack nv bf16 value rows into Vp[ceil(nv/2)][D] words: word (np, d) = (V[2np][d], V[2np+1][d]).
void pack_v_bf16(const bf16_t* v, int64_t vs, int nv, int64_t D, uint32_t* Vp) {
  const __m512i idx_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                          37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i idx_hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                                          22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int n = 0; n < nv; n += 2) {
    const bf16_t* a = v + n * vs;
    const bf16_t* b = v + (n + 1) * vs;
    const bool has_b = n + 1 < nv;
    uint32_t* dst = Vp + (n / 2) * D;
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
      __m512i A = _mm512_loadu_si512(a + d);
      __m512i Bv = has_b ? _mm512_loadu_si512(b + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d, _mm512_permutex2var_epi16(A, idx_lo, Bv));
      _mm512_storeu_si512(dst + d + 16, _mm512_permutex2var_epi16(A, idx_hi, Bv));
    }
    if (d < D) {  // 16 remaining
      __m512i A = _mm512_maskz_loadu_epi16(0xffffu, a + d);
      __m512i Bv = has_b ? _mm512_maskz_loadu_epi16(0xffffu, b + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d, _mm512_permutex2var_epi16(A, idx_lo, Bv));
    }
  }
}

}  // namespace
}  // namespace dk::cpu::DK_ISA_NAME
#endif
