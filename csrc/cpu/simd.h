// The 16-lane block abstraction every CPU kernel is written against.
//
// A VF is always 16 floats: one __m512 (AVX-512), two __m256 (AVX2) or a float[16] (scalar).
// Kernels walk a row in blocks of 16 and keep 16 "virtual lanes" of accumulators, so the order
// of every floating-point operation — and with it every sum, threshold and token — is the same
// on every ISA. Masks are uint16_t bit masks (bit j = lane j).
//
// This header is included only by csrc/cpu/isa/*.cpp, which are compiled three times with
// DK_ISA_SCALAR, DK_ISA_AVX2 or DK_ISA_AVX512 and their own -m flags.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include "decodekit/common.h"
#include "decodekit/fmath.h"
#include "decodekit/philox.h"
#if defined(DK_ISA_AVX512) || defined(DK_ISA_AVX2)
#include <immintrin.h>
#endif

#ifndef DK_ISA_NAME
#error "simd.h is only for csrc/cpu/isa/*.cpp (compiled per ISA with DK_ISA_NAME set)"
#endif

// Everything below lives in an ISA-specific inline namespace (dk::simd::avx512, ...), so the
// three compilations of the kernels never share a symbol (see common.h on ODR merging).
namespace dk::simd {
inline namespace DK_ISA_NAME {

using M16 = uint32_t;  // low 16 bits used

inline int popcount16(M16 m) { return __builtin_popcount(m & 0xffffu); }

// float -> fp16 bits, round to nearest even (bf16: dk::bf16_bits in common.h); NaN stays NaN with
// the quiet bit set and the top payload bits kept. Bit-identical to F16C's vcvtps2ph (the vector
// vstore overloads below) on all 2^32 inputs. Integer code, not a _Float16 cast: the cast calls
// libgcc's __truncsfhf2@GCC_12.0.0, which raised the wheel's manylinux tag, and g++ < 13 has no
// C++ _Float16 on Arm.
inline uint16_t f16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);                        // >= 65520 (and inf) -> inf
  if (a >= 0x38800000u) {  // normal half: rebias the exponent (127 -> 15), round at bit 13
    uint32_t r = a - 0x38000000u;
    r += 0x0fffu + ((r >> 13) & 1u);
    return uint16_t(sign | (r >> 13));
  }
  if (a < 0x33000000u) return uint16_t(sign);  // below 2^-25 (or exactly it: tie to even) -> 0
  // subnormal half: units of 2^-24; the mantissa with its implicit bit, shifted by 14..24
  const uint32_t shift = 126u - (a >> 23), m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  uint32_t q = m >> shift;
  q += (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
  return uint16_t(sign | q);
}

#if defined(DK_ISA_AVX512)
struct VF {
  __m512 v;
};
struct VI {
  __m512i v;
};
inline VF vset(float c) { return {_mm512_set1_ps(c)}; }
inline VF vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline VF vload(const bf16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline VF vload(const f16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
inline void vstore(float* p, VF a) { _mm512_storeu_ps(p, a.v); }
inline void vstore(bf16_t* p, VF a) {
  const __m512i u = _mm512_castps_si512(a.v), hi = _mm512_srli_epi32(u, 16);
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)))), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline void vstore(f16_t* p, VF a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline VF vadd(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VF vsub(VF a, VF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VF vmul(VF a, VF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VF vdiv(VF a, VF b) { return {_mm512_div_ps(a.v, b.v)}; }
inline VF vfma(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VF vmax(VF a, VF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VF vmin(VF a, VF b) { return {_mm512_min_ps(a.v, b.v)}; }
inline VF vfloor(VF a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)}; }
inline M16 vge(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ); }
inline M16 vgt(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
inline M16 vlt(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
inline M16 veq(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
inline M16 vnan(VF a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q); }
inline M16 vnan2(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q); }             // a or b NaN
inline VF vblend(M16 m, VF a, VF b) { return {_mm512_mask_blend_ps(__mmask16(m), a.v, b.v)}; }  // m ? b : a
inline VF vadd_mask(VF acc, M16 m, VF b) {
  return {_mm512_mask_add_ps(acc.v, __mmask16(m), acc.v, b.v)};
}  // acc + (m ? b : 0)
inline float vhmax(VF a) { return _mm512_reduce_max_ps(a.v); }
inline VF vpow2i(VF n) {
  __m512i i = _mm512_cvtps_epi32(n.v);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(i, _mm512_set1_epi32(127)), 23))};
}
inline void vsplit(VF x, VF& m, VF& e) {
  __m512i u = _mm512_castps_si512(x.v);
  e.v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(u, 23), _mm512_set1_epi32(127)));
  m.v = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(u, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f800000)));
}
// uint32 lanes (Philox)
inline VI iset(uint32_t c) { return {_mm512_set1_epi32(int(c))}; }
inline VI iiota(uint32_t base) {
  return {_mm512_add_epi32(_mm512_set1_epi32(int(base)),
                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))};
}
inline VI ixor(VI a, VI b) { return {_mm512_xor_si512(a.v, b.v)}; }
inline void imulhilo(VI a, uint32_t m, VI& hi, VI& lo) {
  __m512i M = _mm512_set1_epi32(int(m));
  __m512i even = _mm512_mul_epu32(a.v, M);                        // lanes 0,2,.. as 64-bit
  __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v, 32), M);  // lanes 1,3,..
  lo.v = _mm512_mullo_epi32(a.v, M);
  hi.v = _mm512_mask_blend_epi32(__mmask16(0xAAAA), _mm512_srli_epi64(even, 32), odd);
}
inline VF u32_to_float(VI a) {  // exact for values < 2^24, else rounded: unsigned convert
  return {_mm512_cvtepu32_ps(a.v)};
}
// float((mbits - bits(v)) >> S) per lane (distance of a positive v below m in its bit pattern)
template <int S>
inline VF vbitdist(VF v, uint32_t mbits) {
  __m512i d = _mm512_sub_epi32(_mm512_set1_epi32(int(mbits)), _mm512_castps_si512(v.v));
  return {_mm512_cvtepu32_ps(_mm512_srli_epi32(d, S))};
}
#elif defined(DK_ISA_AVX2)
struct VF {
  __m256 a, b;
};
struct VI {
  __m256i a, b;
};
inline VF vset(float c) {
  __m256 s = _mm256_set1_ps(c);
  return {s, s};
}
inline VF vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256 bf8(const bf16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline VF vload(const bf16_t* p) { return {bf8(p), bf8(p + 8)}; }
inline VF vload(const f16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline void vstore(float* p, VF x) {
  _mm256_storeu_ps(p, x.a);
  _mm256_storeu_ps(p + 8, x.b);
}
inline __m128i bf16_8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x), hi = _mm256_srli_epi32(u, 16);
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1)))), 16);
  // NaN: |u| > 0x7f800000 (a signed compare is fine: both sides are below 2^31)
  const __m256i nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline void vstore(bf16_t* p, VF x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_8(x.a));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), bf16_8(x.b));
}
inline void vstore(f16_t* p, VF x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8),
                   _mm256_cvtps_ph(x.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#define DK_AVX2_BIN(name, op) \
  inline VF name(VF x, VF y) { return {op(x.a, y.a), op(x.b, y.b)}; }
DK_AVX2_BIN(vadd, _mm256_add_ps)
DK_AVX2_BIN(vsub, _mm256_sub_ps)
DK_AVX2_BIN(vmul, _mm256_mul_ps)
DK_AVX2_BIN(vdiv, _mm256_div_ps)
DK_AVX2_BIN(vmax, _mm256_max_ps)
DK_AVX2_BIN(vmin, _mm256_min_ps)
#undef DK_AVX2_BIN
inline VF vfma(VF x, VF y, VF z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
inline VF vfloor(VF x) { return {_mm256_floor_ps(x.a), _mm256_floor_ps(x.b)}; }
template <int P>
inline M16 vcmp(VF x, VF y) {
  return M16(_mm256_movemask_ps(_mm256_cmp_ps(x.a, y.a, P))) |
         (M16(_mm256_movemask_ps(_mm256_cmp_ps(x.b, y.b, P))) << 8);
}
inline M16 vge(VF x, VF y) { return vcmp<_CMP_GE_OQ>(x, y); }
inline M16 vgt(VF x, VF y) { return vcmp<_CMP_GT_OQ>(x, y); }
inline M16 vlt(VF x, VF y) { return vcmp<_CMP_LT_OQ>(x, y); }
inline M16 veq(VF x, VF y) { return vcmp<_CMP_EQ_OQ>(x, y); }
inline M16 vnan(VF x) { return vcmp<_CMP_UNORD_Q>(x, x); }
inline M16 vnan2(VF x, VF y) { return vcmp<_CMP_UNORD_Q>(x, y); }
inline __m256 mask8(M16 m) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  __m256i v = _mm256_and_si256(_mm256_set1_epi32(int(m & 0xff)), bits);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, bits));
}
inline VF vblend(M16 m, VF x, VF y) {
  return {_mm256_blendv_ps(x.a, y.a, mask8(m)), _mm256_blendv_ps(x.b, y.b, mask8(m >> 8))};
}
inline VF vadd_mask(VF acc, M16 m, VF b) { return vadd(acc, vblend(m, vset(0.f), b)); }  // acc >= +0: same bits
inline float vhmax(VF x) {
  __m256 m = _mm256_max_ps(x.a, x.b);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}
inline __m256 pow2i8(__m256 n) {
  __m256i i = _mm256_cvtps_epi32(n);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(i, _mm256_set1_epi32(127)), 23));
}
inline VF vpow2i(VF n) { return {pow2i8(n.a), pow2i8(n.b)}; }
inline void split8(__m256 x, __m256& m, __m256& e) {
  __m256i u = _mm256_castps_si256(x);
  e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(u, 23), _mm256_set1_epi32(127)));
  m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
}
inline void vsplit(VF x, VF& m, VF& e) {
  split8(x.a, m.a, e.a);
  split8(x.b, m.b, e.b);
}
inline VI iset(uint32_t c) {
  __m256i s = _mm256_set1_epi32(int(c));
  return {s, s};
}
inline VI iiota(uint32_t base) {
  __m256i b = _mm256_add_epi32(_mm256_set1_epi32(int(base)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return {b, _mm256_add_epi32(b, _mm256_set1_epi32(8))};
}
inline VI ixor(VI x, VI y) { return {_mm256_xor_si256(x.a, y.a), _mm256_xor_si256(x.b, y.b)}; }
inline void mulhilo8(__m256i a, __m256i M, __m256i& hi, __m256i& lo) {
  __m256i even = _mm256_mul_epu32(a, M);
  __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), M);
  lo = _mm256_mullo_epi32(a, M);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
inline void imulhilo(VI x, uint32_t m, VI& hi, VI& lo) {
  __m256i M = _mm256_set1_epi32(int(m));
  mulhilo8(x.a, M, hi.a, lo.a);
  mulhilo8(x.b, M, hi.b, lo.b);
}
inline __m256 u32f8(__m256i a) {
  // exact unsigned -> float with one rounding: split into hi16 and lo16 parts
  __m256i lo = _mm256_and_si256(a, _mm256_set1_epi32(0xffff));
  __m256i hi = _mm256_srli_epi32(a, 16);
  __m256 fhi = _mm256_mul_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(65536.0f));  // exact
  return _mm256_add_ps(fhi, _mm256_cvtepi32_ps(lo));                             // one rounding
}
inline VF u32_to_float(VI x) { return {u32f8(x.a), u32f8(x.b)}; }
template <int S>
inline __m256 bitdist8(__m256 v, __m256i M) {
  return u32f8(_mm256_srli_epi32(_mm256_sub_epi32(M, _mm256_castps_si256(v)), S));
}
template <int S>
inline VF vbitdist(VF v, uint32_t mbits) {
  const __m256i M = _mm256_set1_epi32(int(mbits));
  return {bitdist8<S>(v.a, M), bitdist8<S>(v.b, M)};
}
#else  // scalar
struct VF {
  float v[16];
};
struct VI {
  uint32_t v[16];
};
#define DK_LOOP for (int j = 0; j < 16; ++j)
inline VF vset(float c) {
  VF r;
  DK_LOOP r.v[j] = c;
  return r;
}
template <class T>
inline VF vload(const T* p) {
  VF r;
  DK_LOOP r.v[j] = to_float(p[j]);
  return r;
}
inline void vstore(float* p, VF a) { DK_LOOP p[j] = a.v[j]; }
inline void vstore(bf16_t* p, VF a) { DK_LOOP p[j].x = dk::bf16_bits(a.v[j]); }
inline void vstore(f16_t* p, VF a) { DK_LOOP p[j].x = f16_bits(a.v[j]); }
inline VF vadd(VF a, VF b) {
  VF r;
  DK_LOOP r.v[j] = a.v[j] + b.v[j];
  return r;
}
inline VF vsub(VF a, VF b) {
  VF r;
  DK_LOOP r.v[j] = a.v[j] - b.v[j];
  return r;
}
inline VF vmul(VF a, VF b) {
  VF r;
  DK_LOOP r.v[j] = a.v[j] * b.v[j];
  return r;
}
inline VF vdiv(VF a, VF b) {
  VF r;
  DK_LOOP r.v[j] = a.v[j] / b.v[j];
  return r;
}
inline VF vfma(VF a, VF b, VF c) {
  VF r;
  DK_LOOP r.v[j] = dk::v_fma(a.v[j], b.v[j], c.v[j]);
  return r;
}
// max/min with the x86 semantics (second operand if unordered) for identical NaN behaviour
inline VF vmax(VF a, VF b) {
  VF r;
  DK_LOOP r.v[j] = a.v[j] > b.v[j] ? a.v[j] : b.v[j];
  return r;
}
inline VF vmin(VF a, VF b) {
  VF r;
  DK_LOOP r.v[j] = a.v[j] < b.v[j] ? a.v[j] : b.v[j];
  return r;
}
inline VF vfloor(VF a) {
  VF r;
  DK_LOOP r.v[j] = std::floor(a.v[j]);
  return r;
}
inline M16 vge(VF a, VF b) {
  M16 m = 0;
  DK_LOOP m |= M16(a.v[j] >= b.v[j]) << j;
  return m;
}
inline M16 vgt(VF a, VF b) {
  M16 m = 0;
  DK_LOOP m |= M16(a.v[j] > b.v[j]) << j;
  return m;
}
inline M16 vlt(VF a, VF b) {
  M16 m = 0;
  DK_LOOP m |= M16(a.v[j] < b.v[j]) << j;
  return m;
}
inline M16 veq(VF a, VF b) {
  M16 m = 0;
  DK_LOOP m |= M16(a.v[j] == b.v[j]) << j;
  return m;
}
inline M16 vnan(VF a) {
  M16 m = 0;
  DK_LOOP m |= M16(a.v[j] != a.v[j]) << j;
  return m;
}
inline M16 vnan2(VF a, VF b) {
  M16 m = 0;
  DK_LOOP m |= M16(a.v[j] != a.v[j] || b.v[j] != b.v[j]) << j;
  return m;
}
inline VF vblend(M16 m, VF a, VF b) {
  VF r;
  DK_LOOP r.v[j] = ((m >> j) & 1) ? b.v[j] : a.v[j];
  return r;
}
inline VF vadd_mask(VF acc, M16 m, VF b) {
  VF r;
  DK_LOOP r.v[j] = ((m >> j) & 1) ? acc.v[j] + b.v[j] : acc.v[j];
  return r;
}
inline float vhmax(VF a) {
  float m = a.v[0];
  for (int j = 1; j < 16; ++j) m = a.v[j] > m ? a.v[j] : m;
  return m;
}
inline VF vpow2i(VF n) {
  VF r;
  DK_LOOP r.v[j] = dk::v_pow2i(n.v[j]);
  return r;
}
inline void vsplit(VF x, VF& m, VF& e) { DK_LOOP dk::v_split(x.v[j], m.v[j], e.v[j]); }
inline VI iset(uint32_t c) {
  VI r;
  DK_LOOP r.v[j] = c;
  return r;
}
inline VI iiota(uint32_t base) {
  VI r;
  DK_LOOP r.v[j] = base + uint32_t(j);
  return r;
}
inline VI ixor(VI a, VI b) {
  VI r;
  DK_LOOP r.v[j] = a.v[j] ^ b.v[j];
  return r;
}
inline void imulhilo(VI a, uint32_t m, VI& hi, VI& lo) {
  DK_LOOP {
    uint64_t p = uint64_t(a.v[j]) * m;
    hi.v[j] = uint32_t(p >> 32);
    lo.v[j] = uint32_t(p);
  }
}
inline VF u32_to_float(VI a) {
  VF r;
  DK_LOOP {
    float fhi = float(a.v[j] >> 16) * 65536.0f;
    r.v[j] = fhi + float(a.v[j] & 0xffffu);
  }
  return r;
}
template <int S>
inline VF vbitdist(VF v, uint32_t mbits) {
  VI d;
  DK_LOOP {
    uint32_t b;
    std::memcpy(&b, &v.v[j], 4);
    d.v[j] = (mbits - b) >> S;
  }
  return u32_to_float(d);
}
#undef DK_LOOP
#endif

// Stores the lanes of v selected by m (in lane order) to val[0..) and their element indices
// base + lane to idx[0..); returns how many. Both buffers need 16 writable slots.
#if defined(DK_ISA_AVX512)
// Compressed in a register, then one full 16-lane store: the lanes past the count are scratch, so
// every caller leaves room for 16 at the write position. (The masked compress-to-memory form is
// microcoded on AMD Zen 4, ~10x slower per block: 0.35 ms of a 128K-entry collect.)
inline int vcompress(float* val, int32_t* idx, M16 m, VF v, int32_t base) {
  const __mmask16 k = __mmask16(m);
  _mm512_storeu_ps(val, _mm512_maskz_compress_ps(k, v.v));
  __m512i id = _mm512_add_epi32(_mm512_set1_epi32(base),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  _mm512_storeu_si512(idx, _mm512_maskz_compress_epi32(k, id));
  return popcount16(m);
}
// The lanes of a and b selected by m, in lane order, to pa[0..) and pb[0..); returns how many.
// Full 16-lane stores, as vcompress.
inline int vcompress2(float* pa, float* pb, M16 m, VF a, VF b) {
  const __mmask16 k = __mmask16(m);
  _mm512_storeu_ps(pa, _mm512_maskz_compress_ps(k, a.v));
  _mm512_storeu_ps(pb, _mm512_maskz_compress_ps(k, b.v));
  return popcount16(m);
}
#else
inline int vcompress2(float* pa, float* pb, M16 m, VF a, VF b) {
  alignas(64) float la[16], lb[16];
  vstore(la, a);
  vstore(lb, b);
  int n = 0;
  for (M16 t = m; t; t &= t - 1) {
    const int j = __builtin_ctz(t);
    pa[n] = la[j];
    pb[n] = lb[j];
    ++n;
  }
  return n;
}
inline int vcompress(float* val, int32_t* idx, M16 m, VF v, int32_t base) {
  alignas(64) float lane[16];
  vstore(lane, v);
  int n = 0;
  for (M16 b = m; b; b &= b - 1) {
    int j = __builtin_ctz(b);
    val[n] = lane[j];
    idx[n] = base + j;
    ++n;
  }
  return n;
}
#endif

// 16-lane loads of a partial block (n < 16 valid elements), the rest filled with `fill`.
template <class T>
inline VF vload_partial(const T* p, int n, float fill) {
  alignas(64) float tmp[16];
  for (int j = 0; j < 16; ++j) tmp[j] = j < n ? to_float(p[j]) : fill;
  return vload(tmp);
}

#if defined(DK_ISA_AVX2) && !defined(DK_ISA_AVX512)
// exact unsigned->float in AVX2 differs in rounding path from cvtepu32; make AVX-512 and scalar
// use the same hi/lo split so all three agree bit for bit.
#endif
}  // namespace DK_ISA_NAME
}  // namespace dk::simd

// Overloads that let the templates in decodekit/fmath.h run on 16-lane blocks (found by ADL).
namespace dk::simd {
inline namespace DK_ISA_NAME {
inline VF v_fma(VF a, VF b, VF c) { return vfma(a, b, c); }
inline VF v_add(VF a, VF b) { return vadd(a, b); }
inline VF v_sub(VF a, VF b) { return vsub(a, b); }
inline VF v_mul(VF a, VF b) { return vmul(a, b); }
inline VF v_div(VF a, VF b) { return vdiv(a, b); }
inline VF v_max(VF a, VF b) { return vmax(a, b); }
inline VF v_min(VF a, VF b) { return vmin(a, b); }
inline VF v_floor(VF a) { return vfloor(a); }
inline VF v_pow2i(VF n) { return vpow2i(n); }
inline VF v_select_lt(VF x, VF c, VF a, VF b) { return vblend(vlt(x, c), b, a); }
inline void v_split(VF x, VF& m, VF& e) { vsplit(x, m, e); }
}  // namespace DK_ISA_NAME
}  // namespace dk::simd
namespace dk {
template <>
inline simd::VF v_set<simd::VF>(float c) {
  return simd::vset(c);
}
}  // namespace dk

namespace dk::simd {
inline namespace DK_ISA_NAME {
// 16 double accumulators (virtual lane j = element j of each 16-block); reduce in fixed order.
#if defined(DK_ISA_AVX512)
struct VD {
  __m512d lo, hi;
};
inline VD vd_zero() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
inline void vd_add(VD& acc, VF x) {
  acc.lo = _mm512_add_pd(acc.lo, _mm512_cvtps_pd(_mm512_castps512_ps256(x.v)));
  acc.hi = _mm512_add_pd(acc.hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x.v), 1))));
}
inline void vd_store(double* p, const VD& a) {
  _mm512_storeu_pd(p, a.lo);
  _mm512_storeu_pd(p + 8, a.hi);
}
#elif defined(DK_ISA_AVX2)
struct VD {
  __m256d d0, d1, d2, d3;
};
inline VD vd_zero() {
  __m256d z = _mm256_setzero_pd();
  return {z, z, z, z};
}
inline void vd_add(VD& acc, VF x) {
  acc.d0 = _mm256_add_pd(acc.d0, _mm256_cvtps_pd(_mm256_castps256_ps128(x.a)));
  acc.d1 = _mm256_add_pd(acc.d1, _mm256_cvtps_pd(_mm256_extractf128_ps(x.a, 1)));
  acc.d2 = _mm256_add_pd(acc.d2, _mm256_cvtps_pd(_mm256_castps256_ps128(x.b)));
  acc.d3 = _mm256_add_pd(acc.d3, _mm256_cvtps_pd(_mm256_extractf128_ps(x.b, 1)));
}
inline void vd_store(double* p, const VD& a) {
  _mm256_storeu_pd(p, a.d0);
  _mm256_storeu_pd(p + 4, a.d1);
  _mm256_storeu_pd(p + 8, a.d2);
  _mm256_storeu_pd(p + 12, a.d3);
}
#else
struct VD {
  double v[16];
};
inline VD vd_zero() {
  VD r;
  for (int j = 0; j < 16; ++j) r.v[j] = 0.0;
  return r;
}
inline void vd_add(VD& acc, VF x) {
  for (int j = 0; j < 16; ++j) acc.v[j] += double(x.v[j]);
}
inline void vd_store(double* p, const VD& a) {
  for (int j = 0; j < 16; ++j) p[j] = a.v[j];
}
#endif
inline double vd_reduce(const VD& a) {
  double t[16];
  vd_store(t, a);
  double s = 0.0;
  for (int j = 0; j < 16; ++j) s += t[j];
  return s;
}
// Philox4x32-10 on 16 counters at once (lane j: counter word 0 = c0 lane j).
struct VPhilox {
  VI w0, w1, w2, w3;
};
inline VI iset_(uint32_t c) { return iset(c); }
inline VPhilox vphilox(VI c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  VI x0 = c0, x1 = iset(c1), x2 = iset(c2), x3 = iset(c3);
  for (int r = 0; r < 10; ++r) {
    VI hi0, lo0, hi1, lo1;
    imulhilo(x0, kPhiloxM0, hi0, lo0);
    imulhilo(x2, kPhiloxM1, hi1, lo1);
    VI n0 = ixor(ixor(hi1, x1), iset(k0));
    VI n2 = ixor(ixor(hi0, x3), iset(k1));
    x0 = n0;
    x1 = lo1;
    x2 = n2;
    x3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {x0, x1, x2, x3};
}
}  // namespace DK_ISA_NAME
}  // namespace dk::simd
