// Internal header of csrc/cpu/isa/attention.cpp (compiled once per ISA): the pieces every
// tree-attention engine shares. Constants (key block kN, log2 / ln conversions), the exp2
// polynomials, the fp32 vector traits VT of this ISA (kR rows per micro tile, exp2, bf16 / fp16 row
// conversion), cvt_row / store_scaled, the per-thread scratch buffers, the 16 x 16 transpose of the
// AVX-512 packers and the K / V block prefetcher.
// Each attention_*.h opens dk::cpu::DK_ISA_NAME::(anonymous) itself; include only from attention.cpp.
#pragma once
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

namespace dk::cpu::DK_ISA_NAME {
namespace {

constexpr int kN = 64;  // keys per prefix block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

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

#if defined(DK_ISA_AVX512)
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

}  // namespace
}  // namespace dk::cpu::DK_ISA_NAME
