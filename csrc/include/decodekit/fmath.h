// exp / log approximations written ONCE as templates over a "lane type" F, so the scalar CPU
// path, the AVX2 and AVX-512 paths (F = 16-lane vector, overloads in csrc/cpu/simd.h) and the
// CUDA kernels (F = float) execute the same operations in the same order with explicit FMAs:
// every path gets bit-identical values, hence identical tokens for the same seed.
// Polynomials: Cephes expf/logf minimax coefficients (public-domain constants).
#pragma once
#include "decodekit/common.h"
#include "decodekit/contract.h"  // refuses fast-math builds
#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace dk {

// ---- the float overloads (scalar CPU path and CUDA) -------------------------------------
DK_HOST_DEVICE float v_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}
// On the device every operation is an explicitly rounded intrinsic (IEEE round-to-nearest, never
// contracted into an FMA, never approximated), so the results do not depend on -fmad or
// -prec-div (decodekit/contract.h).
#if defined(__CUDA_ARCH__)
DK_HOST_DEVICE float v_add(float a, float b) { return __fadd_rn(a, b); }
DK_HOST_DEVICE float v_sub(float a, float b) { return __fsub_rn(a, b); }
DK_HOST_DEVICE float v_mul(float a, float b) { return __fmul_rn(a, b); }
DK_HOST_DEVICE float v_div(float a, float b) { return __fdiv_rn(a, b); }
#else
DK_HOST_DEVICE float v_add(float a, float b) { return a + b; }
DK_HOST_DEVICE float v_sub(float a, float b) { return a - b; }
DK_HOST_DEVICE float v_mul(float a, float b) { return a * b; }
DK_HOST_DEVICE float v_div(float a, float b) { return a / b; }
#endif
DK_HOST_DEVICE float v_max(float a, float b) { return a > b ? a : b; }
DK_HOST_DEVICE float v_min(float a, float b) { return a < b ? a : b; }
DK_HOST_DEVICE float v_floor(float a) {
#if defined(__CUDA_ARCH__)
  return floorf(a);
#else
  return __builtin_floorf(a);
#endif
}
template <class F>
DK_HOST_DEVICE F v_set(float c);
template <>
DK_HOST_DEVICE_SPEC float v_set<float>(float c) {
  return c;
}
// 2^n for an integral-valued n in [-126, 127]
DK_HOST_DEVICE float v_pow2i(float n) { return bits_to_float(uint32_t(int32_t(n) + 127) << 23); }
// x < c ? a : b
DK_HOST_DEVICE float v_select_lt(float x, float c, float a, float b) { return x < c ? a : b; }
// exponent and mantissa split for log: x = m * 2^e with m in [1, 2) (x normal, > 0)
DK_HOST_DEVICE void v_split(float x, float& m, float& e) {
  uint32_t u = float_to_bits(x);
  e = float(int32_t(u >> 23) - 127);
  m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);
}

// ---- the shared algorithms ----------------------------------------------------------------
// exp(x); 0 for x < -87 (weights below e^-87 ~ 1.6e-38 are treated as zero), x clamped at 88.
template <class F>
DK_HOST_DEVICE F dk_exp(F x) {
  F xc = v_max(v_min(x, v_set<F>(88.0f)), v_set<F>(-87.0f));
  F n = v_floor(v_fma(xc, v_set<F>(1.44269504088896341f), v_set<F>(0.5f)));
  F r = v_fma(n, v_set<F>(-0.693359375f), xc);
  r = v_fma(n, v_set<F>(2.12194440e-4f), r);
  F p = v_set<F>(1.9875691500e-4f);
  p = v_fma(p, r, v_set<F>(1.3981999507e-3f));
  p = v_fma(p, r, v_set<F>(8.3334519073e-3f));
  p = v_fma(p, r, v_set<F>(4.1665795894e-2f));
  p = v_fma(p, r, v_set<F>(1.6666665459e-1f));
  p = v_fma(p, r, v_set<F>(5.0000001201e-1f));
  F r2 = v_mul(r, r);
  F y = v_add(v_fma(p, r2, r), v_set<F>(1.0f));
  y = v_mul(y, v_pow2i(n));
  return v_select_lt(x, v_set<F>(-87.0f), v_set<F>(0.0f), y);
}

// natural log for normal x > 0.
template <class F>
DK_HOST_DEVICE F dk_log(F x) {
  F m, e;
  v_split(x, m, e);
  // bring m into [sqrt(1/2), sqrt(2)): if m > sqrt2 then m /= 2, e += 1
  F big = v_select_lt(v_set<F>(1.41421356f), m, v_set<F>(1.0f), v_set<F>(0.0f));
  m = v_mul(m, v_sub(v_set<F>(1.0f), v_mul(big, v_set<F>(0.5f))));
  e = v_add(e, big);
  F f = v_sub(m, v_set<F>(1.0f));
  F z = v_mul(f, f);
  F p = v_set<F>(7.0376836292e-2f);
  p = v_fma(p, f, v_set<F>(-1.1514610310e-1f));
  p = v_fma(p, f, v_set<F>(1.1676998740e-1f));
  p = v_fma(p, f, v_set<F>(-1.2420140846e-1f));
  p = v_fma(p, f, v_set<F>(1.4249322787e-1f));
  p = v_fma(p, f, v_set<F>(-1.6668057665e-1f));
  p = v_fma(p, f, v_set<F>(2.0000714765e-1f));
  p = v_fma(p, f, v_set<F>(-2.4999993993e-1f));
  p = v_fma(p, f, v_set<F>(3.3333331174e-1f));
  F y = v_mul(v_mul(p, f), z);
  y = v_fma(e, v_set<F>(-2.12194440e-4f), y);
  y = v_fma(z, v_set<F>(-0.5f), y);
  F r = v_add(f, y);
  return v_fma(e, v_set<F>(0.693359375f), r);
}

// Gumbel noise g = -log(E), E = -log1p(-v) ~ Exp(1), from two random words (a, b) per element.
// v = a*2^-32 + b*2^-64 + 2^-65 in (0, 1): resolution near 0 is 2^-64, so g reaches ~44 and
// tokens down to ~e^-44 relative probability keep their (tiny) chance of winning.
// log1p(y) is computed as log(u) * y / (u - 1) with u = 1 + y (exact where u == 1: y).
template <class F>
DK_HOST_DEVICE F gumbel_from_uniform(F v) {
  F y = v_sub(v_set<F>(0.0f), v);
  F u = v_add(v_set<F>(1.0f), y);
  F um1 = v_sub(u, v_set<F>(1.0f));
  // where u == 1 (|y| < 2^-24): log1p(y) = y; else log(u) * y / (u - 1)
  F safe_um1 = v_select_lt(v_mul(um1, um1), v_set<F>(1e-30f), v_set<F>(1.0f), um1);
  F safe_u = v_select_lt(v_mul(um1, um1), v_set<F>(1e-30f), v_set<F>(2.0f), u);
  F l1p = v_mul(dk_log(safe_u), v_div(y, safe_um1));
  l1p = v_select_lt(v_mul(um1, um1), v_set<F>(1e-30f), y, l1p);
  F E = v_sub(v_set<F>(0.0f), l1p);
  return v_sub(v_set<F>(0.0f), dk_log(E));
}

}  // namespace dk
