// decodekit: torch-free common definitions shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>

// On the host these helpers have internal linkage (static): the CPU kernels are compiled once
// per ISA with different -m flags, and an `inline` function with external linkage would be
// merged across those objects by the linker (one ODR copy, possibly built with AVX-512, called
// from the scalar path). DK_HOST_DEVICE_SPEC is for explicit specializations (no storage class).
#if defined(__CUDACC__)
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#define DK_HOST_DEVICE_SPEC __host__ __device__ __forceinline__
#define DK_DEVICE __device__ __forceinline__
#define DK_DEVICE_NOINLINE __device__ __noinline__  // a real call: keeps a kernel under its register cap
#else
#define DK_HOST_DEVICE static inline
#define DK_HOST_DEVICE_SPEC inline
#define DK_DEVICE inline  // device-only code: never compiled into the per-ISA CPU objects
#define DK_DEVICE_NOINLINE inline
#endif

// Bytes left unused after every region of a CUDA workspace layout (csrc/cuda/pipeline.cuh
// pipe_ws_layout, sampling.cuh sample_layout): 0 in every real build. The CUDA emulator builds
// with a red zone there (tests/cuda_emu/emu.py, $DK_EMU_WS_REDZONE) and fences it (poison pattern,
// AddressSanitizer poisoning, a check after the launches), so a kernel that reads or writes past
// one region into the next fails a test instead of silently using its neighbour's bytes. A
// multiple of 16: every region keeps its alignment.
#ifndef DK_WS_REDZONE
#define DK_WS_REDZONE 0
#endif
static_assert(DK_WS_REDZONE % 16 == 0 && DK_WS_REDZONE >= 0, "DK_WS_REDZONE: a multiple of 16 bytes");

namespace dk {

// Raw 16-bit float storage types (bit patterns); conversions below are exact.
struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

DK_HOST_DEVICE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}
DK_HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

DK_HOST_DEVICE float to_float(float v) { return v; }
DK_HOST_DEVICE float to_float(bf16_t v) { return bits_to_float(uint32_t(v.x) << 16); }
DK_HOST_DEVICE float to_float(f16_t v) {
  // IEEE half -> float, exact (handles subnormals, inf, nan).
  uint32_t h = v.x;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: value = man * 2^-24
    float f = float(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

// float -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN. Bit-exact on host and device.
DK_HOST_DEVICE uint16_t bf16_bits(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

DK_HOST_DEVICE uint64_t double_to_bits(double d) {
#if defined(__CUDA_ARCH__)
  return uint64_t(__double_as_longlong(d));
#else
  uint64_t u;
  __builtin_memcpy(&u, &d, 8);
  return u;
#endif
}
DK_HOST_DEVICE double bits_to_double(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double((long long)u);
#else
  double d;
  __builtin_memcpy(&d, &u, 8);
  return d;
#endif
}

// Order-preserving map double -> uint64 (larger double => larger key) and back. NaN is not ordered.
DK_HOST_DEVICE uint64_t double_key(double d) {
  const uint64_t u = double_to_bits(d);
  return u ^ (uint64_t(int64_t(u) >> 63) | (uint64_t(1) << 63));
}
DK_HOST_DEVICE double key_to_double(uint64_t k) { return bits_to_double((k >> 63) ? (k & ~(uint64_t(1) << 63)) : ~k); }

// Order-preserving map float -> uint32 (larger float => larger key). NaN is not ordered.
DK_HOST_DEVICE uint32_t float_key(float f) {
  const uint32_t u = float_to_bits(f);
  return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);  // negative: ~u; else: the sign bit set (no branch)
}

// The same keys with -0 as +0 (the value compares treat them as equal: selections by key must
// too). -0's key is one below +0's; no branch (the values come in no order).
DK_HOST_DEVICE uint32_t float_key_z(float f) {
  const uint32_t k = float_key(f);
  return k + uint32_t(k == 0x7fffffffu);
}
DK_HOST_DEVICE uint64_t double_key_z(double d) {
  const uint64_t k = double_key(d);
  return k + uint64_t(k == 0x7fffffffffffffffull);
}

// Renormalisation e / Z as (e * pre) * inv with inv = float(1 / (Z * pre)): pre = 1 unless the total
// mass Z is below 2^-64, where pre = 2^64 keeps 1 / (Z * pre) inside float32 (1 / Z overflows for
// Z < ~2.9e-39). Scaling by a power of two is exact, and e <= Z keeps e * pre finite.
struct RenormScale {
  float pre, inv;
};
DK_HOST_DEVICE RenormScale renorm_scale(double Z) {
  const double pre = Z < 5.421010862427522e-20 ? 18446744073709551616.0 : 1.0;
  RenormScale r;
  r.pre = float(pre);
  r.inv = float(1.0 / (Z * pre));
  return r;
}

// The min-p weight threshold of a probability row: keep p_i iff p_i >= min_p * max_j p_j, exactly.
// The product of two floats is exact in double; rounding it UP to a float keeps a float compare
// deciding the same (a float rounding of min_p * max could keep a p_i just below the product, e.g.
// in the subnormal range). Logits rows need none of this: their max weight is exp(0) = 1.
DK_HOST_DEVICE float min_p_threshold(float min_p, float max_p) {
  const double prod = double(min_p) * double(max_p);
  float f = float(prod);
  if (double(f) < prod) f = bits_to_float(float_to_bits(f) + 1u);  // prod >= 0: the next float up
  return f;
}

constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kPosInf = __builtin_huge_valf();
constexpr float kLowestFloat = -3.4028234663852886e38f;  // -FLT_MAX: the smallest finite float

// Ranges of the filter parameters (the torch bindings' ValueErrors and the CUDA kernels' per-row
// checks): temperature 0 (greedy) or a normal float32 in [2^-126, FLT_MAX]; top_p > 0; min_p in [0, 1].
DK_HOST_DEVICE bool temperature_ok(double v) {
  return v == 0.0 || (v >= 1.1754943508222875e-38 && v <= 3.4028234663852886e38);
}
DK_HOST_DEVICE bool top_p_ok(double v) { return v > 0.0; }
DK_HOST_DEVICE bool min_p_ok(double v) { return v >= 0.0 && v <= 1.0; }

}  // namespace dk
