// Tree attention (the verification step of tree speculative decoding), compiled once per ISA.
//
// One work item = (batch b, kv head h). Its M = T * G query rows (G = Hq / Hkv, row m = t*G + g)
// are processed together:
//   1. prefix (dense): keys 0 .. P-1 are streamed in blocks of kN keys. Each block of K and V is
//      packed ONCE (K transposed so keys lie in vector lanes; in the AVX-512 bf16 path K and V are
//      packed into bf16 pairs for vdpbf16ps) and then used by every row of the group, in row tiles
//      of kR rows: S = Q K^T (kR x kN, registers), online-softmax update, O = O*alpha + P V.
//      Only a kR x kN score tile ever exists; the [T, S] score matrix is never formed.
//   2. tree (sparse): query t attends only the tree keys j with mask[t][j] set (typically its
//      ancestors and itself), gathered per query and shared by its G heads.
//   3. out = O / l, lse = ln(sum exp(scaled scores)).
// Scores are kept in the log2 domain (scaled by sm_scale * log2(e)) so the softmax uses exp2.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include "cpu/attention_kernels.h"
#if defined(DK_ISA_AVX512) || defined(DK_ISA_AVX2)
#include <immintrin.h>
#endif

namespace dk::cpu::DK_ISA_NAME {
namespace {

constexpr int kN = 64;  // keys per prefix block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

// 2^f on [-0.5, 0.5]: Taylor coefficients ln(2)^k / k! (degree 7, relative error < 1e-8 + rounding).
constexpr float kE0 = 1.0f, kE1 = 0.6931471805599453f, kE2 = 0.2402265069591007f, kE3 = 0.05550410866482158f,
                kE4 = 0.009618129107628477f, kE5 = 0.0013333558146428443f, kE6 = 0.00015403530393381608f,
                kE7 = 1.525273380405984e-05f;

// ---- fp32 vector traits ----------------------------------------------------------------------
#if defined(DK_ISA_AVX512)
struct VT {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int kR = 6;    // rows per micro tile
  static constexpr int kSC = 4;   // key vectors per S micro tile (64 keys)
  static constexpr int kPV = 4;   // d vectors per PV micro tile
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float c) { return _mm512_set1_ps(c); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static float hmax(V a) { return _mm512_reduce_max_ps(a); }
  static float hsum(V a) { return _mm512_reduce_add_ps(a); }
  static V exp2(V x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));  // -inf -> 2^-127 (~1e-38): negligible next to 1
    V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V f = _mm512_sub_ps(x, n);
    V p = _mm512_set1_ps(kE7);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE0));
    return _mm512_scalef_ps(p, n);
  }
  static void cvt_row(const bf16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; i += 16)
      _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))), 16)));
  }
  static void cvt_row(const f16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; i += 16)
      _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
  }
};
#elif defined(DK_ISA_AVX2)
struct VT {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int kR = 6;
  static constexpr int kSC = 2;
  static constexpr int kPV = 2;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float c) { return _mm256_set1_ps(c); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float hmax(V a) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
  }
  static float hsum(V a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
  }
  static V exp2(V x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));  // -inf -> 2^-126: negligible next to 1
    V n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V f = _mm256_sub_ps(x, n);
    V p = _mm256_set1_ps(kE7);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE5));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE0));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static void cvt_row(const bf16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; i += 8)
      _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))), 16)));
  }
  static void cvt_row(const f16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; i += 8)
      _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  }
};
#else
struct VT {
  using V = float;
  static constexpr int W = 1;
  static constexpr int kR = 4;
  static constexpr int kSC = 4;
  static constexpr int kPV = 4;
  static V zero() { return 0.f; }
  static V set1(float c) { return c; }
  static V load(const float* p) { return *p; }
  static void store(float* p, V a) { *p = a; }
  static V fma(V a, V b, V c) { return __builtin_fmaf(a, b, c); }
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static float hmax(V a) { return a; }
  static float hsum(V a) { return a; }
  static V exp2(V x) { return std::exp2(x); }
  static void cvt_row(const bf16_t* s, float* d, int64_t n) { for (int64_t i = 0; i < n; ++i) d[i] = to_float(s[i]); }
  static void cvt_row(const f16_t* s, float* d, int64_t n) { for (int64_t i = 0; i < n; ++i) d[i] = to_float(s[i]); }
};
#endif
using V = VT::V;
constexpr int W = VT::W;
constexpr int kR = VT::kR;
static_assert(kN % (W * VT::kSC) == 0, "key block must be a whole number of S micro tiles");

inline void cvt_row(const float* s, float* d, int64_t n) { std::memcpy(d, s, size_t(n) * sizeof(float)); }
inline void cvt_row(const bf16_t* s, float* d, int64_t n) { VT::cvt_row(s, d, n); }
inline void cvt_row(const f16_t* s, float* d, int64_t n) { VT::cvt_row(s, d, n); }

// float -> storage type, round to nearest even.
inline void store_val(float* p, float x) { *p = x; }
inline void store_val(bf16_t* p, float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) { p->x = uint16_t((u >> 16) | 0x40u); return; }  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  p->x = uint16_t(u >> 16);
}
inline void store_val(f16_t* p, float x) {
  _Float16 h = static_cast<_Float16>(x);
  std::memcpy(&p->x, &h, 2);
}

// ---- per-thread scratch ----------------------------------------------------------------------
struct Buf {
  void* p = nullptr;
  size_t cap = 0;
  template <class T> T* get(size_t n) {
    size_t bytes = n * sizeof(T) + 64;
    if (bytes > cap) {
      std::free(p);
      cap = (bytes + 4095) & ~size_t(4095);
      p = std::aligned_alloc(64, cap);
      if (!p) { cap = 0; throw std::bad_alloc(); }
    }
    return static_cast<T*>(p);
  }
  ~Buf() { std::free(p); }
};
struct Scratch {
  Buf q, o, ml, s, p, kt, vb, tk, tv, row, sc, keys;
};
Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

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

// Online-softmax update of R rows from their score tile S (kN wide, first nv valid).
// Writes P = exp2(c*S - m_new) into P (fp32), the rescale factor into alpha, updates m and l.
inline void softmax_rows(int R, float* S, int nv, float c, float* P, float* alpha, float* m, float* l) {
  const V cv = VT::set1(c);
  for (int r = 0; r < R; ++r) {
    float* s = S + r * kN;
    for (int n = 0; n < kN; n += W) VT::store(s + n, VT::mul(VT::load(s + n), cv));
    for (int n = nv; n < kN; ++n) s[n] = kNegInf;
    V mx = VT::load(s);
    for (int n = W; n < kN; n += W) mx = VT::max(mx, VT::load(s + n));
    const float m_old = m[r];
    const float m_new = std::max(m_old, VT::hmax(mx));
    const float a = std::exp2(m_old - m_new);  // m_old = -inf -> 0
    const V mv = VT::set1(m_new);
    V sum = VT::zero();
    float* p = P + r * kN;
    for (int n = 0; n < kN; n += W) {
      V e = VT::exp2(VT::sub(VT::load(s + n), mv));
      VT::store(p + n, e);
      sum = VT::add(sum, e);
    }
    // padded lanes hold at most 2^-126 each; drop them from the sum exactly
    float pad = 0.f;
    for (int n = nv; n < kN; ++n) pad += p[n], p[n] = 0.f;
    l[r] = l[r] * a + (VT::hsum(sum) - pad);
    m[r] = m_new;
    alpha[r] = a;
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

#if defined(DK_ISA_AVX512)
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
  if (nv < kN)
    for (int64_t p = 0; p < D2; ++p) std::memset(Kp + p * kN + nv, 0, size_t(kN - nv) * 4);
  for (int n = 0; n < nv; ++n) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(k + n * ks);
    for (int64_t p = 0; p < D2; ++p) Kp[p * kN + n] = row[p];
  }
}

// Pack nv bf16 value rows into Vp[ceil(nv/2)][D] words: word (np, d) = (V[2np][d], V[2np+1][d]).
void pack_v_bf16(const bf16_t* v, int64_t vs, int nv, int64_t D, uint32_t* Vp) {
  const __m512i idx_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                          6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i idx_hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23,
                                          54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
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
#endif

// Pack nv (<= kN) key rows into Kt[D][kN] fp32 (keys in lanes), zero padded.
template <class T>
void pack_k_f32(const T* k, int64_t ks, int nv, int64_t D, float* Kt, float* row) {
  if (nv < kN)
    for (int64_t d = 0; d < D; ++d) std::memset(Kt + d * kN + nv, 0, size_t(kN - nv) * 4);
  for (int n = 0; n < nv; ++n) {
    const float* src;
    if constexpr (std::is_same_v<T, float>) src = k + n * ks;
    else { cvt_row(k + n * ks, row, D); src = row; }
    for (int64_t d = 0; d < D; ++d) Kt[d * kN + n] = src[d];
  }
}

inline float dot_f32(const float* a, const float* b, int64_t D) {
  V acc = VT::zero();
  for (int64_t d = 0; d < D; d += W) acc = VT::fma(VT::load(a + d), VT::load(b + d), acc);
  return VT::hsum(acc);
}

// ---- one (batch, kv head) work item -----------------------------------------------------------
template <class T, bool kBf16Dot>
void group(const AttnArgs& a, int64_t b, int64_t h) {
  Scratch& s = scratch();
  const int64_t T_ = a.T, D = a.D, G = a.Hq / a.Hkv, M = T_ * G;
  const int64_t P = a.prefix_lens[b];
  const float c = a.sm_scale * kLog2e;
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;

  float* O = s.o.get<float>(size_t(M * D));
  float* mrow = s.ml.get<float>(size_t(2 * M));
  float* lrow = mrow + M;
  std::memset(O, 0, size_t(M * D) * sizeof(float));
  for (int64_t i = 0; i < M; ++i) mrow[i] = kNegInf, lrow[i] = 0.f;
  float* row = s.row.get<float>(size_t(4 * D + 64));

  // Q rows of the group, fp32 (or raw bf16 for the vdpbf16ps path).
  float* Qf = nullptr;
  const uint32_t* Qw = nullptr;
  if constexpr (kBf16Dot) {
    uint16_t* Qb = s.q.get<uint16_t>(size_t(M * D));
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t g = 0; g < G; ++g)
        std::memcpy(Qb + (t * G + g) * D, q + t * a.q_st + (h * G + g) * a.q_sh, size_t(D) * 2);
    Qw = reinterpret_cast<const uint32_t*>(Qb);
  } else {
    Qf = s.q.get<float>(size_t(M * D));
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t g = 0; g < G; ++g) cvt_row(q + t * a.q_st + (h * G + g) * a.q_sh, Qf + (t * G + g) * D, D);
  }

  // ---- 1. dense prefix ----
  if (P > 0) {
    float* S = s.s.get<float>(size_t(kR * kN));
    float* Pm = s.p.get<float>(size_t(kR * kN));
    float alpha[8];
    if constexpr (kBf16Dot) {
#if defined(DK_ISA_AVX512)
      uint32_t* Kp = s.kt.get<uint32_t>(size_t(D / 2 * kN));
      uint32_t* Vp = s.vb.get<uint32_t>(size_t(kN / 2 * D));
      uint32_t* Pw = s.sc.get<uint32_t>(size_t(kR * kN / 2));
      const int64_t D2 = D / 2;
      for (int64_t s0 = 0; s0 < P; s0 += kN) {
        const int nv = int(std::min<int64_t>(kN, P - s0));
        pack_k_bf16(reinterpret_cast<const bf16_t*>(k + s0 * a.k_ss), a.k_ss, nv, D, Kp);
        pack_v_bf16(reinterpret_cast<const bf16_t*>(v + s0 * a.v_ss), a.v_ss, nv, D, Vp);
        const int npairs = (nv + 1) / 2;
        for (int64_t r0 = 0; r0 < M; r0 += kR) {
          const int R = int(std::min<int64_t>(kR, M - r0));
          dispatch_rows(R, [&](auto RC) { s_tile_bf16<decltype(RC)::value>(Qw + r0 * D2, D2, Kp, S); });
          softmax_rows(R, S, nv, c, Pm, alpha, mrow + r0, lrow + r0);
          for (int r = 0; r < R; ++r)
            for (int n = 0; n < kN; n += 16)
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(reinterpret_cast<uint16_t*>(Pw + r * (kN / 2)) + n),
                                  (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(Pm + r * kN + n)));
          dispatch_rows(R, [&](auto RC) {
            pv_tile_bf16<decltype(RC)::value>(O + r0 * D, D, alpha, Pw, npairs, Vp);
          });
        }
      }
#endif
    } else {
      float* Kt = s.kt.get<float>(size_t(D * kN));
      float* Vb = nullptr;
      if constexpr (!std::is_same_v<T, float>) Vb = s.vb.get<float>(size_t(kN * D));
      for (int64_t s0 = 0; s0 < P; s0 += kN) {
        const int nv = int(std::min<int64_t>(kN, P - s0));
        pack_k_f32(k + s0 * a.k_ss, a.k_ss, nv, D, Kt, row);
        const float* vsrc;
        int64_t ldv;
        if constexpr (std::is_same_v<T, float>) {
          vsrc = v + s0 * a.v_ss;
          ldv = a.v_ss;
        } else {
          for (int n = 0; n < nv; ++n) cvt_row(v + (s0 + n) * a.v_ss, Vb + n * D, D);
          vsrc = Vb;
          ldv = D;
        }
        for (int64_t r0 = 0; r0 < M; r0 += kR) {
          const int R = int(std::min<int64_t>(kR, M - r0));
          dispatch_rows(R, [&](auto RC) { s_tile_f32<decltype(RC)::value>(Qf + r0 * D, D, Kt, S); });
          softmax_rows(R, S, nv, c, Pm, alpha, mrow + r0, lrow + r0);
          dispatch_rows(R, [&](auto RC) {
            pv_tile_f32<decltype(RC)::value>(O + r0 * D, D, alpha, Pm, nv, vsrc, ldv);
          });
        }
      }
    }
  }

  // ---- 2. sparse tree part ----
  {
    float* Kt = s.tk.get<float>(size_t(T_ * D));  // tree keys / values, fp32 rows
    float* Vt = s.tv.get<float>(size_t(T_ * D));
    for (int64_t j = 0; j < T_; ++j) {
      cvt_row(k + (P + j) * a.k_ss, Kt + j * D, D);
      cvt_row(v + (P + j) * a.v_ss, Vt + j * D, D);
    }
    int32_t* keys = s.keys.get<int32_t>(size_t(T_));
    float* sc = s.sc.get<float>(size_t(T_ + W));
    float* qrow = row;
    const uint8_t* mb = a.mask + b * a.mask_sb;
    for (int64_t t = 0; t < T_; ++t) {
      const uint8_t* mr = mb + t * a.mask_st;
      int nk = 0;
      if (a.mask_packed) {
        for (int64_t j = 0; j < T_; ++j)
          if ((mr[j >> 3] >> (j & 7)) & 1) keys[nk++] = int32_t(j);
      } else {
        for (int64_t j = 0; j < T_; ++j)
          if (mr[j]) keys[nk++] = int32_t(j);
      }
      if (nk == 0) continue;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t m = t * G + g;
        const float* qm;
        if constexpr (kBf16Dot) {
          cvt_row(q + t * a.q_st + (h * G + g) * a.q_sh, qrow, D);
          qm = qrow;
        } else {
          qm = Qf + m * D;
        }
        float mx = kNegInf;
        for (int i = 0; i < nk; ++i) {
          sc[i] = dot_f32(qm, Kt + keys[i] * D, D) * c;
          mx = std::max(mx, sc[i]);
        }
        const float m_new = std::max(mrow[m], mx);
        const float al = std::exp2(mrow[m] - m_new);
        for (int i = nk; i < ((nk + W - 1) / W) * W; ++i) sc[i] = kNegInf;
        const V mv = VT::set1(m_new);
        for (int i = 0; i < nk; i += W) VT::store(sc + i, VT::exp2(VT::sub(VT::load(sc + i), mv)));
        float* o = O + m * D;
        float lsum = 0.f;
        const V av = VT::set1(al);
        for (int64_t d = 0; d < D; d += W) VT::store(o + d, VT::mul(VT::load(o + d), av));
        for (int i = 0; i < nk; ++i) {
          const float p = sc[i];
          lsum += p;
          const V pv = VT::set1(p);
          const float* vr = Vt + keys[i] * D;
          for (int64_t d = 0; d < D; d += W) VT::store(o + d, VT::fma(pv, VT::load(vr + d), VT::load(o + d)));
        }
        lrow[m] = lrow[m] * al + lsum;
        mrow[m] = m_new;
      }
    }
  }

  // ---- 3. normalise, write out and lse ----
  T* out = static_cast<T*>(a.out);
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t m = t * G + g, hq = h * G + g;
      const int64_t oi = ((b * T_ + t) * a.Hq + hq);
      T* dst = out + oi * D;
      const float l = lrow[m];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const float* o = O + m * D;
      if constexpr (std::is_same_v<T, float>) {
        const V iv = VT::set1(inv);
        for (int64_t d = 0; d < D; d += W) VT::store(dst + d, VT::mul(VT::load(o + d), iv));
      } else {
        for (int64_t d = 0; d < D; ++d) store_val(dst + d, o[d] * inv);
      }
      a.lse[oi] = l > 0.f ? mrow[m] * kLn2 + std::log(l) : kNegInf;
    }
}

void tree_attention(const AttnArgs& a, int64_t begin, int64_t end) {
  for (int64_t w = begin; w < end; ++w) {
    const int64_t b = w / a.Hkv, h = w % a.Hkv;
    switch (a.dtype) {
      case DType::F32: group<float, false>(a, b, h); break;
#if defined(DK_ISA_AVX512)
      case DType::BF16: group<bf16_t, true>(a, b, h); break;
#else
      case DType::BF16: group<bf16_t, false>(a, b, h); break;
#endif
      case DType::F16: group<f16_t, false>(a, b, h); break;
    }
  }
}

}  // namespace
}  // namespace dk::cpu::DK_ISA_NAME

namespace dk::cpu {
#define DK_ATTN_STR2(x) #x
#define DK_ATTN_STR(x) DK_ATTN_STR2(x)
#define DK_ATTN_CAT2(a, b) a##b
#define DK_ATTN_CAT(a, b) DK_ATTN_CAT2(a, b)
const AttnTable& DK_ATTN_CAT(attn_table_, DK_ISA_NAME)() {
  static const AttnTable t{DK_ATTN_STR(DK_ISA_NAME), &DK_ISA_NAME::tree_attention};
  return t;
}
}  // namespace dk::cpu
