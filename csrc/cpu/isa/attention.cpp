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
//      ancestors and itself), gathered per query and shared by its G heads. The AMX path instead
//      runs the tree keys as further key blocks of its tile pipeline with per-row lane masks, and
//      skips every (row tile, tree block) pair with no attended key (so a deep tree's early tokens
//      never touch its later blocks).
//   3. out = O / l, lse = ln(sum exp(scaled scores)).
// Scores are kept in the log2 domain (scaled by sm_scale * log2(e)) so the softmax uses exp2.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include "cpu/attention_kernels.h"
#include "cpu/simd.h"
#if defined(DK_ISA_AVX512) || defined(DK_ISA_AVX2)
#include <immintrin.h>
#endif
#if defined(DK_ISA_AVX512)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace dk::cpu::DK_ISA_NAME {
namespace {

constexpr int kN = 64;  // keys per prefix block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kLazy = 8.f;  // AMX softmax: how far (log2) scores may exceed the running max

// 2^f on [-0.5, 0.5]: Taylor coefficients ln(2)^k / k! (degree 7: relative error < 1e-8 + rounding).
// A lower degree is used where the probabilities are rounded to bf16 anyway (degree 4: < 5e-5).
constexpr float kExp2Coef[8] = {1.0f,
                                0.6931471805599453f,
                                0.2402265069591007f,
                                0.05550410866482158f,
                                0.009618129107628477f,
                                0.0013333558146428443f,
                                0.00015403530393381608f,
                                1.525273380405984e-05f};
// Degree 3, fitted for minimal relative error on [-0.5, 0.5] (< 7.6e-5, below the 2^-9 rounding of
// the bf16 weights it feeds): the AMX path's weights.
constexpr float kExp2Mm3[4] = {0.9999281764030457f, 0.6932609677314758f, 0.24260972440242767f, 0.05517098307609558f};

// ---- fp32 vector traits ----------------------------------------------------------------------
#if defined(DK_ISA_AVX512)
struct VT {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int kR = 6;   // rows per micro tile
  static constexpr int kSC = 4;  // key vectors per S micro tile (64 keys)
  static constexpr int kPV = 4;  // d vectors per PV micro tile
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float c) { return _mm512_set1_ps(c); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static float hmax(V a) { return _mm512_reduce_max_ps(a); }
  static float hmin(V a) { return _mm512_reduce_min_ps(a); }
  static float hsum(V a) { return _mm512_reduce_add_ps(a); }
  static bool any_gt(V a, float x) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(x), _CMP_GT_OQ) != 0; }
  // Deg 3 uses kExp2Mm3; kClamp = false needs x > -inf (no NaN from -inf - -inf).
  template <int Deg = 7, bool kClamp = true>
  static V exp2(V x) {
    if constexpr (kClamp) x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));  // -inf -> 2^-127 (~1e-38)
    V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V f = _mm512_sub_ps(x, n);
    return _mm512_scalef_ps(poly2<Deg>(f), n);
  }
  template <int Deg>
  static V poly2(V f) {
    const float* k = Deg == 3 ? kExp2Mm3 : kExp2Coef;
    V p = _mm512_set1_ps(k[Deg]);
    for (int i = Deg - 1; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(k[i]));
    return p;
  }
  static void cvt_row(const bf16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; i += 16)
      _mm512_storeu_ps(d + i,
                       _mm512_castsi512_ps(_mm512_slli_epi32(
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
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static float hmax(V a) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
  }
  static float hmin(V a) {
    __m128 h = _mm_min_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_min_ps(h, _mm_movehl_ps(h, h));
    h = _mm_min_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
  }
  static float hsum(V a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
  }
  static bool any_gt(V a, float x) { return _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(x), _CMP_GT_OQ)) != 0; }
  template <int Deg = 7>
  static V exp2(V x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));  // -inf -> 2^-126: negligible next to 1
    V n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V f = _mm256_sub_ps(x, n);
    V p = _mm256_set1_ps(kExp2Coef[Deg]);
    for (int i = Deg - 1; i >= 0; --i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Coef[i]));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static void cvt_row(const bf16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; i += 8)
      _mm256_storeu_ps(d + i,
                       _mm256_castsi256_ps(_mm256_slli_epi32(
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
  static V min(V a, V b) { return a < b ? a : b; }
  static float hmax(V a) { return a; }
  static float hmin(V a) { return a; }
  static float hsum(V a) { return a; }
  static bool any_gt(V a, float x) { return a > x; }
  template <int Deg = 7>
  static V exp2(V x) {
    return std::exp2(x);
  }
  static void cvt_row(const bf16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = to_float(s[i]);
  }
  static void cvt_row(const f16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = to_float(s[i]);
  }
};
#endif
using V = VT::V;
constexpr int W = VT::W;
constexpr int kR = VT::kR;
static_assert(kN % (W * VT::kSC) == 0, "key block must be a whole number of S micro tiles");

inline void cvt_row(const float* s, float* d, int64_t n) { std::memcpy(d, s, size_t(n) * sizeof(float)); }
inline void cvt_row(const bf16_t* s, float* d, int64_t n) { VT::cvt_row(s, d, n); }
inline void cvt_row(const f16_t* s, float* d, int64_t n) { VT::cvt_row(s, d, n); }

// dst[0 .. D) = o * inv in the storage type (D a multiple of 16; bf16 / fp16 rounded to nearest
// even, as simd::vstore does on every ISA).
template <class T>
void store_scaled(T* dst, const float* o, float inv, int64_t D) {
  const simd::VF iv = simd::vset(inv);
  for (int64_t d = 0; d < D; d += 16) simd::vstore(dst + d, simd::vmul(simd::vload(o + d), iv));
}

// ---- per-thread scratch ----------------------------------------------------------------------
struct Buf {
  void* p = nullptr;
  size_t cap = 0;
  template <class T>
  T* get(size_t n) {
    size_t bytes = n * sizeof(T) + 64;
    if (bytes > cap) {
      std::free(p);
      cap = (bytes + 4095) & ~size_t(4095);
      p = std::aligned_alloc(64, cap);
      if (!p) {
        cap = 0;
        throw std::bad_alloc();
      }
    }
    return static_cast<T*>(p);
  }
  ~Buf() { std::free(p); }
};
struct Scratch {
  Buf q, o, ml, s, p, kt, vb, tk, tv, row, sc, keys, qt, ot, km, act;
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

// 16 x 16 transpose of 32-bit elements: r[i][j] -> r[j][i].
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // u[4g + i], 128-bit lane L = column 4L + i of rows 4g .. 4g+3
  for (int i = 0; i < 4; ++i) {
    __m512i v0 = _mm512_shuffle_i32x4(u[i], u[4 + i], 0x44), v1 = _mm512_shuffle_i32x4(u[i], u[4 + i], 0xee);
    __m512i w0 = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0x44), w1 = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0xee);
    r[i] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[4 + i] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    r[8 + i] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + i] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
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
#endif

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

// Prefetches the next key block's K and V rows into L2 a few cache lines at a time, interleaved
// with the compute on the current block (a burst of ~1000 prefetches would stall on fill buffers).
struct BlockPrefetch {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t ks = 0, vs = 0, rows = 0, lines_per_row = 0, per_step = 0;
  int64_t row = 0, line = 0;  // next line to prefetch: row in [0, 2*rows) (K rows, then V rows)
  template <class T>
  void start(const T* kn, int64_t k_ss, const T* vn, int64_t v_ss, int64_t nrows, int64_t D, int64_t steps) {
    k = reinterpret_cast<const char*>(kn);
    v = reinterpret_cast<const char*>(vn);
    ks = k_ss * int64_t(sizeof(T));
    vs = v_ss * int64_t(sizeof(T));
    rows = std::max<int64_t>(nrows, 0);
    lines_per_row = (D * int64_t(sizeof(T)) + 63) / 64;
    per_step = (2 * rows * lines_per_row + steps - 1) / std::max<int64_t>(steps, 1);
    row = line = 0;
  }
  // Counters instead of a division per line: this runs inside the compute loops.
  void step() {
    int64_t n = per_step;
    while (n > 0 && row < 2 * rows) {
      const char* base = row < rows ? k + row * ks : v + (row - rows) * vs;
      const int64_t e = std::min(lines_per_row, line + n);
      n -= e - line;
      for (; line < e; ++line) __builtin_prefetch(base + line * 64, 0, 2);
      if (line == lines_per_row) line = 0, ++row;
    }
  }
};

inline float dot_f32(const float* a, const float* b, int64_t D) {
  V acc = VT::zero();
  for (int64_t d = 0; d < D; d += W) acc = VT::fma(VT::load(a + d), VT::load(b + d), acc);
  return VT::hsum(acc);
}

#if defined(DK_ISA_AVX512)
// ---- AMX (tile) path for bf16: S = Q K^T and O += P V with tdpbf16ps ---------------------------
// Tiles (all 16 rows x 64 bytes): 0-3 accumulators, 4-5 A operands, 6-7 B operands. The B operands
// use the same pair-interleaved ("VNNI") packing as the vdpbf16ps path: Kp [D/2][kN] words, Vp
// [kN/2][D] words. Rows are processed 16 at a time; Q and O are padded to a multiple of 16 rows.
struct alignas(64) TileCfg {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_ready() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    if (!(d & (1u << 24)) || !(d & (1u << 22))) return false;  // AMX-TILE, AMX-BF16
    // Linux: ask for the XTILEDATA state (ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18).
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

// Which bf16 kernel the AVX-512 path uses: AMX when the CPU/OS allow it, else vdpbf16ps.
// DECODEKIT_ATTN_BF16=dpbf16 | amx | fma forces one (amx falls back to dpbf16 when unavailable).
int bf16_mode() {
  const char* e = std::getenv("DECODEKIT_ATTN_BF16");
  if (e && std::strcmp(e, "dpbf16") == 0) return 1;
  if (e && std::strcmp(e, "fma") == 0) return 0;
  return amx_ready() ? 2 : 1;
}

#define DK_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

DK_AMX_TARGET void amx_config() {
  TileCfg cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  // inline asm with a memory operand: GCC 12 drops the stores to cfg before _tile_loadconfig
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg) : "memory");
}
DK_AMX_TARGET void amx_release() { _tile_release(); }

// The AMX path works transposed, with the 16 query rows of a tile in the N (column) dimension:
//   S^T[key][row] = K . Q^T     A = 16 key rows x 32 d of Kc (K copied per block, not transposed);
//                               B = Q^T as pairs, Qt[Dq/2][16] words (packed once per item)
//   O^T[d][row] += V^T . P^T    A = 16 d rows x 32 keys of Vt[D][kN] (bf16, packed per block);
//                               B = P^T as pairs, Pt[kN/2][16] words (written by the softmax)
// so the online softmax works on vectors whose 16 lanes are the 16 rows of the tile: per-row maxima,
// rescale factors and sums are plain lane-wise operations (no horizontal reductions, no per-row
// branches).

// C tiles 0-3 (16 x 16 fp32 each) to p, p + 256, p + 512, p + 768 (rows 64 bytes apart).
DK_AMX_TARGET inline void store_c4(float* p) {
  _tile_stored(0, p, 64);
  _tile_stored(1, p + 256, 64);
  _tile_stored(2, p + 512, 64);
  _tile_stored(3, p + 768, 64);
}

// St[kN][16] = K . Qt, K packed as Kc[Dq/32][kN][32] bf16 (each A tile one contiguous 1 KiB).
DK_AMX_TARGET void amx_scores_t(const uint32_t* Qt, int64_t Dq, const bf16_t* Kc, float* St) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t dc = 0; dc < Dq; dc += 32) {
    const bf16_t* kp = Kc + dc * kN;
    _tile_stream_loadd(6, Qt + (dc / 2) * 16, 64);
    _tile_loadd(4, kp, 64);
    _tile_loadd(5, kp + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, kp + 1024, 64);
    _tile_dpbf16ps(1, 5, 6);
    _tile_loadd(4, kp + 1536, 64);
    _tile_dpbf16ps(2, 7, 6);
    _tile_dpbf16ps(3, 4, 6);
  }
  store_c4(St);
}

// Kc[Dq/32][kN][32] from nv key rows ks apart (zero for d >= D and keys >= nv). A contiguous copy
// beats tile loads straight from the cache rows (~0.5 ms of 4 at T=64, prefix 2048, GQA 32/8).
void pack_kc_bf16(const bf16_t* k, int64_t ks, int nv, int64_t D, int64_t Dq, bf16_t* Kc) {
  for (int64_t dc = 0; dc < Dq; dc += 32) {
    const __mmask32 lm = D - dc >= 32 ? ~__mmask32(0) : __mmask32((1u << (D - dc)) - 1);
    bf16_t* dst = Kc + dc * kN;
    for (int n = 0; n < kN; ++n)
      _mm512_store_si512(dst + n * 32, n < nv ? _mm512_maskz_loadu_epi16(lm, k + n * ks + dc) : _mm512_setzero_si512());
  }
}

// Ot[D][16] += Vt[D][kN] . Pt (the two P^T halves stay in tiles 6, 7 across the d tiles). O^T (and,
// in the scores, Q^T) comes from L2 with the streaming tile load (TILELOADDT1), so that it does not
// push the block's Kc / V^T, which every row tile reuses, out of L1 (~4% in alternating runs).
DK_AMX_TARGET void amx_pv_t(const uint32_t* Pt, const uint32_t* Vt, int64_t D, float* Ot) {
  _tile_loadd(6, Pt, 64);
  _tile_loadd(7, Pt + 256, 64);
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    float* o = Ot + d * 16;
    const uint32_t* vt = Vt + d * (kN / 2);
    _tile_stream_loadd(0, o, 64);
    _tile_stream_loadd(1, o + 256, 64);
    _tile_stream_loadd(2, o + 512, 64);
    _tile_stream_loadd(3, o + 768, 64);
    _tile_loadd(4, vt, kN * 2);
    _tile_loadd(5, vt + 16, kN * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(0, 5, 7);
    _tile_loadd(4, vt + 16 * (kN / 2), kN * 2);
    _tile_loadd(5, vt + 16 * (kN / 2) + 16, kN * 2);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(1, 5, 7);
    _tile_loadd(4, vt + 32 * (kN / 2), kN * 2);
    _tile_loadd(5, vt + 32 * (kN / 2) + 16, kN * 2);
    _tile_dpbf16ps(2, 4, 6);
    _tile_dpbf16ps(2, 5, 7);
    _tile_loadd(4, vt + 48 * (kN / 2), kN * 2);
    _tile_loadd(5, vt + 48 * (kN / 2) + 16, kN * 2);
    _tile_dpbf16ps(3, 4, 6);
    _tile_dpbf16ps(3, 5, 7);
    store_c4(o);
  }
  for (; d < D; d += 16) {  // D = 80, 96: 16-row remainder
    float* o = Ot + d * 16;
    const uint32_t* vt = Vt + d * (kN / 2);
    _tile_stream_loadd(0, o, 64);
    _tile_loadd(4, vt, kN * 2);
    _tile_loadd(5, vt + 16, kN * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(0, 5, 7);
    _tile_stored(0, o, 64);
  }
}

// Online softmax of one transposed tile: St[kN][16] raw scores (key n of the 16 rows in one vector).
// m, L: the 16 rows' running max (log2 domain) and sum. Key n takes part in the lanes of km[n]
// (kMasked: padded keys of a partial block, or tree keys a row does not attend: weight exactly 0).
// Writes the bf16 weights as pairs Pt[kN/2][16] and returns the rescale factors 2^(m_old - m_new).
template <bool kMasked>
__m512 softmax_t(const float* St, const uint16_t* km, float c, uint32_t* Pt, float* m, float* L) {
  const __m512 cv = _mm512_set1_ps(c);
  const __m512 m_old = _mm512_load_ps(m);
  // The weights 2^(c*s - mu) of the block for row maxima mu: written to Pt as bf16 pairs (rounded to
  // nearest: the round bit is added, then the low half dropped), summed into sum; tmax gets the
  // largest exponent c*s - mu of the keys that take part.
  auto weights = [&](__m512 mu, __m512& sum, __m512& tmax) {
    const __m512 negm = _mm512_sub_ps(_mm512_setzero_ps(), mu);
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    __m512 t0max = _mm512_set1_ps(kNegInf), t1max = t0max;
    const __m512i half = _mm512_set1_epi32(0x8000), hi16 = _mm512_set1_epi32(int(0xffff0000u));
    for (int n = 0; n < kN; n += 2) {
      const __m512 t0 = _mm512_fmadd_ps(_mm512_load_ps(St + 16 * n), cv, negm);
      const __m512 t1 = _mm512_fmadd_ps(_mm512_load_ps(St + 16 * n + 16), cv, negm);
      // lanes that do not take part may be +-inf / NaN here (mu = -inf): the masks exclude them
      __m512 e0 = VT::template exp2<3, false>(t0);
      __m512 e1 = VT::template exp2<3, false>(t1);
      if constexpr (kMasked) {
        e0 = _mm512_maskz_mov_ps(km[n], e0);
        e1 = _mm512_maskz_mov_ps(km[n + 1], e1);
        t0max = _mm512_mask_max_ps(t0max, km[n], t0max, t0);
        t1max = _mm512_mask_max_ps(t1max, km[n + 1], t1max, t1);
      } else {
        t0max = _mm512_max_ps(t0max, t0);
        t1max = _mm512_max_ps(t1max, t1);
      }
      sum0 = _mm512_add_ps(sum0, e0);
      sum1 = _mm512_add_ps(sum1, e1);
      // word = (bf16(e1) << 16) | bf16(e0): (u1 & 0xffff0000) | (u0 >> 16)
      const __m512i u0 = _mm512_add_epi32(_mm512_castps_si512(e0), half);
      const __m512i u1 = _mm512_add_epi32(_mm512_castps_si512(e1), half);
      _mm512_store_si512(Pt + 8 * n, _mm512_ternarylogic_epi32(hi16, u1, _mm512_srli_epi32(u0, 16), 0xca));
    }
    sum = _mm512_add_ps(sum0, sum1);
    tmax = _mm512_max_ps(t0max, t1max);
  };
  // Lazy rescaling: a row's running max only moves when the block's scaled scores exceed it by more
  // than kLazy (log2 units). Weights up to 2^kLazy are exact enough in fp32 / bf16, most blocks leave
  // O^T alone (with the exact max, each new block raised some lane's max most of the time), and once
  // every row has a finite max the weights are computed in one pass over the scores: only when some
  // row's max has to move (rare after the first blocks) are they computed again.
  __m512 m_new = m_old, sum, tmax;
  if (_mm512_cmp_ps_mask(m_old, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ) == 0) {
    weights(m_old, sum, tmax);
    const __mmask16 up = _mm512_cmp_ps_mask(tmax, _mm512_set1_ps(kLazy), _CMP_GT_OQ);
    if (up) {
      m_new = _mm512_mask_add_ps(m_old, up, m_old, tmax);
      weights(m_new, sum, tmax);
    }
  } else {
    // block max of the scaled scores, taken on the raw scores (c > 0: max, c < 0: min), four chains
    __m512 mx[4];
    for (int j = 0; j < 4; ++j) mx[j] = _mm512_set1_ps(c > 0 ? kNegInf : -kNegInf);
    if (c > 0) {
      for (int n = 0; n < kN; n += 4)
        for (int j = 0; j < 4; ++j)
          mx[j] = kMasked ? _mm512_mask_max_ps(mx[j], km[n + j], mx[j], _mm512_load_ps(St + 16 * (n + j)))
                          : _mm512_max_ps(mx[j], _mm512_load_ps(St + 16 * (n + j)));
      mx[0] = _mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]));
    } else {
      for (int n = 0; n < kN; n += 4)
        for (int j = 0; j < 4; ++j)
          mx[j] = kMasked ? _mm512_mask_min_ps(mx[j], km[n + j], mx[j], _mm512_load_ps(St + 16 * (n + j)))
                          : _mm512_min_ps(mx[j], _mm512_load_ps(St + 16 * (n + j)));
      mx[0] = _mm512_min_ps(_mm512_min_ps(mx[0], mx[1]), _mm512_min_ps(mx[2], mx[3]));
    }
    const __m512 x = _mm512_mul_ps(mx[0], cv);
    m_new =
        _mm512_mask_mov_ps(m_old, _mm512_cmp_ps_mask(x, _mm512_add_ps(m_old, _mm512_set1_ps(kLazy)), _CMP_GT_OQ), x);
    weights(m_new, sum, tmax);
  }
  const __m512 alpha = VT::exp2(_mm512_sub_ps(m_old, m_new));
  _mm512_store_ps(m, m_new);
  _mm512_store_ps(L, _mm512_fmadd_ps(_mm512_load_ps(L), alpha, sum));
  return alpha;
}

// Vt[D][kN] bf16 (keys consecutive per d; keys nv .. kN-1 zero) from nv value rows vs apart: per
// 16 key pairs and 16 d, the pair-interleaved words (V[2np][d], V[2np+1][d]) of each pair, then a
// 16 x 16 word transpose straight into Vt (no intermediate buffer: it would take L1 from the
// tile operands).
void pack_vt_bf16(const bf16_t* v, int64_t vs, int nv, int64_t D, uint32_t* Vt) {
  const __m512i idx_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                          37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i idx_hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                                          22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int p0 = 0; p0 < kN / 2; p0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const bool two = d0 + 32 <= D;  // else 16 d remain (D = 80)
      const __mmask32 lm = two ? ~__mmask32(0) : __mmask32(0xffff);
      __m512i lo[16], hi[16];
      for (int i = 0; i < 16; ++i) {
        const int n = 2 * (p0 + i);
        const __m512i A = n < nv ? _mm512_maskz_loadu_epi16(lm, v + n * vs + d0) : _mm512_setzero_si512();
        const __m512i B = n + 1 < nv ? _mm512_maskz_loadu_epi16(lm, v + (n + 1) * vs + d0) : _mm512_setzero_si512();
        lo[i] = _mm512_permutex2var_epi16(A, idx_lo, B);
        if (two) hi[i] = _mm512_permutex2var_epi16(A, idx_hi, B);
      }
      transpose16(lo);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(Vt + (d0 + i) * (kN / 2) + p0, lo[i]);
      if (two) {
        transpose16(hi);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(Vt + (d0 + 16 + i) * (kN / 2) + p0, hi[i]);
      }
    }
}
#endif

// ---- one (batch, kv head) work item -----------------------------------------------------------
// kMode: 0 = fp32 FMA (every ISA; bf16/fp16 converted while packing), 1 = vdpbf16ps, 2 = AMX.
template <class T, int kMode>
void group(const AttnArgs& a, int64_t b, int64_t h) {
  Scratch& s = scratch();
  const int64_t T_ = a.T, D = a.D, G = a.Hq / a.Hkv, M = T_ * G;
  const int64_t Mp = kMode == 2 ? (M + 15) / 16 * 16 : M;  // AMX works on 16-row tiles
  const int64_t P = a.prefix_lens[b];
  const float c = a.sm_scale * kLog2e;
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;

  float* O = s.o.get<float>(size_t(Mp * D));
  float* mrow = s.ml.get<float>(size_t((2 + W) * Mp));
  float* lrow = mrow + Mp;
  float* Lv = lrow + Mp;  // W lane sums per row during the prefix (reduced into lrow after it)
  for (int64_t i = 0; i < Mp; ++i) mrow[i] = kNegInf;
  std::memset(lrow, 0, size_t(Mp) * sizeof(float));  // (the W-lane paths set lrow from Lv after the prefix)
  if constexpr (kMode != 2) {                        // (the AMX path accumulates in O^T and writes all of O from it)
    std::memset(O, 0, size_t(Mp * D) * sizeof(float));
    std::memset(Lv, 0, size_t(W * M) * sizeof(float));
  }
  float* row = s.row.get<float>(size_t(4 * D + 64));

  // Q rows of the group: fp32, or raw bf16 for the vdpbf16ps / AMX paths (zero pad rows for AMX).
  float* Qf = nullptr;
  uint16_t* Qb = nullptr;
  // AMX consumes d in chunks of 32: Q rows (and K pair rows) are zero padded to Dq = roundup(D, 32).
  const int64_t Dq = kMode == 2 ? (D + 31) / 32 * 32 : D;
  if constexpr (kMode != 0) {
    Qb = s.q.get<uint16_t>(size_t(Mp * Dq));
    if (Mp > M || Dq > D) std::memset(Qb, 0, size_t(Mp * Dq) * 2);
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t g = 0; g < G; ++g)
        std::memcpy(Qb + (t * G + g) * Dq, q + t * a.q_st + (h * G + g) * a.q_sh, size_t(D) * 2);
  } else {
    Qf = s.q.get<float>(size_t(M * D));
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t g = 0; g < G; ++g) cvt_row(q + t * a.q_st + (h * G + g) * a.q_sh, Qf + (t * G + g) * D, D);
  }

  // ---- 1. dense prefix ----
  if (P > 0 || kMode == 2) {  // (the AMX path runs the tree keys as masked blocks too)
    if constexpr (kMode == 1) {
#if defined(DK_ISA_AVX512)
      float* S = s.s.get<float>(size_t(kR * kN));
      float alpha[16];
      const uint32_t* Qw = reinterpret_cast<const uint32_t*>(Qb);
      uint32_t* Kp = s.kt.get<uint32_t>(size_t(D / 2 * kN));
      uint32_t* Vp = s.vb.get<uint32_t>(size_t(kN / 2 * D));
      uint32_t* Pw = s.sc.get<uint32_t>(size_t(kR * kN / 2));
      const int64_t D2 = D / 2;
      for (int64_t s0 = 0; s0 < P; s0 += kN) {
        const int nv = int(std::min<int64_t>(kN, P - s0));
        BlockPrefetch pf;
        pf.start(k + (s0 + kN) * a.k_ss, a.k_ss, v + (s0 + kN) * a.v_ss, a.v_ss,
                 std::min<int64_t>(kN, std::max<int64_t>(0, P - s0 - kN)), D, (M + kR - 1) / kR);
        pack_k_bf16(reinterpret_cast<const bf16_t*>(k + s0 * a.k_ss), a.k_ss, nv, D, Kp);
        pack_v_bf16(reinterpret_cast<const bf16_t*>(v + s0 * a.v_ss), a.v_ss, nv, D, Vp);
        const int npairs = (nv + 1) / 2;
        for (int64_t r0 = 0; r0 < M; r0 += kR) {
          const int R = int(std::min<int64_t>(kR, M - r0));
          dispatch_rows(R, [&](auto RC) { s_tile_bf16<decltype(RC)::value>(Qw + r0 * D2, D2, Kp, S); });
          pf.step();
          softmax_rows<true>(R, S, nv, c, Pw, alpha, mrow + r0, Lv + r0 * W);
          dispatch_rows(R, [&](auto RC) { pv_tile_bf16<decltype(RC)::value>(O + r0 * D, D, alpha, Pw, npairs, Vp); });
        }
      }
#endif
    } else if constexpr (kMode == 2) {
#if defined(DK_ISA_AVX512)
      // Q^T pairs per row tile: Qt[i][p][r] = word p of row 16i + r (the 16 x 16 word blocks of Qb,
      // transposed).
      const int64_t ntiles = Mp / 16, D2q = Dq / 2;
      uint32_t* Qt = s.qt.get<uint32_t>(size_t(Mp * D2q));
      for (int64_t i = 0; i < ntiles; ++i)
        for (int64_t p0 = 0; p0 < D2q; p0 += 16) {
          __m512i r[16];
          for (int j = 0; j < 16; ++j)
            r[j] = _mm512_loadu_si512(reinterpret_cast<const uint32_t*>(Qb) + (16 * i + j) * D2q + p0);
          transpose16(r);
          for (int j = 0; j < 16; ++j) _mm512_storeu_si512(Qt + (i * D2q + p0 + j) * 16, r[j]);
        }
      float* Ot = s.ot.get<float>(size_t(Mp * D));  // O^T per row tile: [ntiles][D][16]
      std::memset(Ot, 0, size_t(Mp * D) * sizeof(float));
      uint32_t* Vt = s.kt.get<uint32_t>(size_t(kN / 2 * D));
      bf16_t* Kb = s.tk.get<bf16_t>(size_t(kN * Dq));   // Kc: the key block, packed
      float* St = s.p.get<float>(size_t(2 * 16 * kN));  // two of each: the tile pipeline below
      uint32_t* Pt = s.sc.get<uint32_t>(size_t(2 * 16 * kN / 2));
      uint16_t* kmt = s.km.get<uint16_t>(size_t(ntiles * kN));  // tree blocks: lane masks per tile
      int32_t* tl = s.act.get<int32_t>(size_t(ntiles));         // the row tiles a block is run for
      alignas(64) uint16_t km[kN];
      // Key blocks: the prefix in blocks of kN, then the tree keys P .. P+T-1 in blocks of kN, which
      // run the same tile code with per-lane masks (row m attends tree key j iff mask[m / G][j]);
      // a row tile that attends no key of a tree block skips it.
      const int64_t nprefix = (P + kN - 1) / kN, nblocks = nprefix + (T_ + kN - 1) / kN;
      auto block_range = [&](int64_t bi, int64_t& s0, int& nv) {
        s0 = bi < nprefix ? bi * kN : P + (bi - nprefix) * kN;
        nv = int(std::min<int64_t>(kN, (bi < nprefix ? P : P + T_) - s0));
      };
      const uint8_t* mb = a.mask + b * a.mask_sb;
      bool first = true;
      amx_config();
      for (int64_t bi = 0; bi < nblocks; ++bi) {
        int64_t s0, s1 = 0;
        int nv, nv1 = 0;
        block_range(bi, s0, nv);
        if (bi + 1 < nblocks) block_range(bi + 1, s1, nv1);
        const bool tree = bi >= nprefix, masked = tree || nv < kN;
        const uint16_t* kmask = km;
        int64_t kmask_st = 0;  // lane masks of tile i: kmask + i * kmask_st
        int64_t nt = 0;
        if (!tree) {
          for (int n = 0; n < kN; ++n) km[n] = n < nv ? 0xffff : 0;
          for (int64_t i = 0; i < ntiles; ++i) tl[nt++] = int32_t(i);
        } else {
          std::memset(kmt, 0, size_t(ntiles * kN) * 2);
          const int64_t j0 = s0 - P;
          for (int64_t t = 0; t < T_; ++t) {
            const uint8_t* mr = mb + t * a.mask_st;
            uint64_t bits = 0;
            for (int n = 0; n < nv; ++n) {
              const int64_t j = j0 + n;
              const bool on = a.mask_packed ? (mr[j >> 3] >> (j & 7)) & 1 : mr[j] != 0;
              bits |= uint64_t(on) << n;
            }
            for (int64_t g = 0; g < G && bits; ++g) {
              const int64_t m = t * G + g;
              for (uint64_t x = bits; x; x &= x - 1)
                kmt[(m >> 4) * kN + __builtin_ctzll(x)] |= uint16_t(1u << (m & 15));
            }
          }
          for (int64_t i = 0; i < ntiles; ++i) {
            bool any = false;
            for (int n = 0; n < nv && !any; ++n) any = kmt[i * kN + n] != 0;
            if (any) tl[nt++] = int32_t(i);
          }
          kmask = kmt;
          kmask_st = kN;
        }
        BlockPrefetch pf;
        pf.start(k + s1 * a.k_ss, a.k_ss, v + s1 * a.v_ss, a.v_ss, nv1, D, 4 * std::max<int64_t>(nt, 1));
        if (nt == 0) continue;
        pack_kc_bf16(reinterpret_cast<const bf16_t*>(k + s0 * a.k_ss), a.k_ss, nv, D, Dq, Kb);
        pack_vt_bf16(reinterpret_cast<const bf16_t*>(v + s0 * a.v_ss), a.v_ss, nv, D, Vt);
        // Software pipeline over the row tiles: in step j the tile unit is given the scores of tile
        // j+1 and P V of tile j-1 (whole: issuing P V in two halves from inside the softmax was ~7%
        // slower) before the vector units run the softmax of tile j (two score and two P buffers).
        // The pipeline drains at the end of the key block (running it across blocks was slower).
        amx_scores_t(Qt + tl[0] * D2q * 16, Dq, Kb, St);
        for (int64_t j = 0; j < nt; ++j) {
          const int64_t i = tl[j];
          float* Scur = St + (j & 1) * 16 * kN;
          uint32_t* Pcur = Pt + (j & 1) * 8 * kN;
          // the next block's K/V prefetches go out in four small bursts per tile (a burst of ~30
          // lines stalls on the fill buffers)
          pf.step();
          if (j + 1 < nt) amx_scores_t(Qt + tl[j + 1] * D2q * 16, Dq, Kb, St + ((j + 1) & 1) * 16 * kN);
          pf.step();
          if (j > 0) amx_pv_t(Pt + ((j - 1) & 1) * 8 * kN, Vt, D, Ot + tl[j - 1] * 16 * D);
          pf.step();
          const uint16_t* kmi = kmask + i * kmask_st;
          const __m512 al = masked ? softmax_t<true>(Scur, kmi, c, Pcur, mrow + 16 * i, lrow + 16 * i)
                                   : softmax_t<false>(Scur, kmi, c, Pcur, mrow + 16 * i, lrow + 16 * i);
          pf.step();
          // O^T *= alpha before this tile's P V (next step); the running max rarely moves
          if (!first && _mm512_cmp_ps_mask(al, _mm512_set1_ps(1.f), _CMP_NEQ_UQ)) {
            float* o = Ot + i * 16 * D;
            for (int64_t d = 0; d < D; ++d) _mm512_store_ps(o + 16 * d, _mm512_mul_ps(_mm512_load_ps(o + 16 * d), al));
          }
        }
        amx_pv_t(Pt + ((nt - 1) & 1) * 8 * kN, Vt, D, Ot + tl[nt - 1] * 16 * D);
        first = false;
      }
      amx_release();
      // O (row-major) from O^T, 16 x 16 blocks
      for (int64_t i = 0; i < ntiles; ++i)
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
          __m512i r[16];
          for (int j = 0; j < 16; ++j) r[j] = _mm512_load_si512(Ot + (i * D + d0 + j) * 16);
          transpose16(r);
          for (int j = 0; j < 16; ++j) _mm512_storeu_si512(O + (16 * i + j) * D + d0, r[j]);
        }
#endif
    } else {
      float* Kt = s.kt.get<float>(size_t(D * kN));
      float* Sall = s.p.get<float>(size_t(M * kN));  // scores, then probabilities, of every row
      float* alall = s.sc.get<float>(size_t(M + 16));
      float* Vb = nullptr;
      if constexpr (!std::is_same_v<T, float>) Vb = s.vb.get<float>(size_t(kN * D));
      for (int64_t s0 = 0; s0 < P; s0 += kN) {
        const int nv = int(std::min<int64_t>(kN, P - s0));
        BlockPrefetch pf;
        pf.start(k + (s0 + kN) * a.k_ss, a.k_ss, v + (s0 + kN) * a.v_ss, a.v_ss,
                 std::min<int64_t>(kN, std::max<int64_t>(0, P - s0 - kN)), D, 2 * ((M + kR - 1) / kR));
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
        // Three sweeps over the group's rows so that one packed operand stays in L1 per sweep:
        // S = Q K^T (Kt resident), online softmax in place (S -> P), O = O*alpha + P V (V resident).
        for (int64_t r0 = 0; r0 < M; r0 += kR) {
          const int R = int(std::min<int64_t>(kR, M - r0));
          dispatch_rows(R, [&](auto RC) { s_tile_f32<decltype(RC)::value>(Qf + r0 * D, D, Kt, Sall + r0 * kN); });
          pf.step();
        }
        for (int64_t r0 = 0; r0 < M; r0 += 16) {
          const int R = int(std::min<int64_t>(16, M - r0));
          softmax_rows<false>(R, Sall + r0 * kN, nv, c, Sall + r0 * kN, alall + r0, mrow + r0, Lv + r0 * W);
        }
        for (int64_t r0 = 0; r0 < M; r0 += kR) {
          const int R = int(std::min<int64_t>(kR, M - r0));
          dispatch_rows(R, [&](auto RC) {
            pv_tile_f32<decltype(RC)::value>(O + r0 * D, D, alall + r0, Sall + r0 * kN, nv, vsrc, ldv);
          });
          pf.step();
        }
      }
    }
  }

  if constexpr (kMode != 2)  // the AMX path keeps lrow itself
    for (int64_t i = 0; i < M; ++i) lrow[i] = VT::hsum(VT::load(Lv + i * W));

  // ---- 2. sparse tree part (the AMX path did it above) ----
  if constexpr (kMode != 2) {
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
        if constexpr (kMode != 0) {
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
      store_scaled(dst, O + m * D, inv, D);
      a.lse[oi] = l > 0.f ? mrow[m] * kLn2 + std::log(l) : kNegInf;
    }
}

void tree_attention(const AttnArgs& a, int64_t begin, int64_t end) {
#if defined(DK_ISA_AVX512)
  const int bf16 = a.dtype == DType::BF16 ? bf16_mode() : 0;
#endif
  for (int64_t w = begin; w < end; ++w) {
    const int64_t b = w / a.Hkv, h = w % a.Hkv;
    switch (a.dtype) {
      case DType::F32: group<float, 0>(a, b, h); break;
#if defined(DK_ISA_AVX512)
      case DType::BF16:
        switch (bf16) {
          case 2: group<bf16_t, 2>(a, b, h); break;
          case 1: group<bf16_t, 1>(a, b, h); break;
          default: group<bf16_t, 0>(a, b, h); break;
        }
        break;
#else
      case DType::BF16: group<bf16_t, 0>(a, b, h); break;
#endif
      case DType::F16: group<f16_t, 0>(a, b, h); break;
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
