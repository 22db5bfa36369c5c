// Counter-based Philox4x32-10 (Salmon et al., SC'11), one implementation for CPU and CUDA.
#pragma once
#include "decodekit/common.h"

namespace dk {

struct Philox4 {
  uint32_t v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

DK_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  uint64_t p = uint64_t(a) * uint64_t(b);
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
}

// 10 rounds of Philox4x32 on counter c with key (k0, k1).
DK_HOST_DEVICE Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, c.v[0], hi0, lo0);
    philox_mulhilo(kPhiloxM1, c.v[2], hi1, lo1);
    Philox4 n;
    n.v[0] = hi1 ^ c.v[1] ^ k0;
    n.v[1] = lo1;
    n.v[2] = hi0 ^ c.v[3] ^ k1;
    n.v[3] = lo0;
    c = n;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// decodekit's counter layout (normative; the CUDA kernels use the same):
//   key     = (seed low 32 bits, seed high 32 bits)
//   counter = (block, purpose, stream, offset)
//     block   : index of the 4-word block inside a draw (element index / 2 for per-element draws)
//     purpose : which draw inside an op (0 = the row's sampling uniform; speculative ops use
//               1 + step, and so on); the high 16 bits carry bits 32..47 of the offset
//     stream  : 0 with per-row seeds; the output row index with one scalar seed
//     offset  : the user's offset (low 32 bits)
struct RngKey {
  uint32_t k0, k1;  // key from the seed
  uint32_t stream;
  uint32_t offset_lo;
  uint32_t offset_hi16;
};

DK_HOST_DEVICE RngKey make_rng_key(uint64_t seed, uint64_t offset, uint32_t stream) {
  RngKey k;
  k.k0 = uint32_t(seed);
  k.k1 = uint32_t(seed >> 32);
  k.stream = stream;
  k.offset_lo = uint32_t(offset);
  k.offset_hi16 = uint32_t(offset >> 32) & 0xffffu;
  return k;
}

DK_HOST_DEVICE Philox4 philox_draw(const RngKey& k, uint32_t purpose, uint32_t block) {
  Philox4 c;
  c.v[0] = block;
  c.v[1] = (purpose & 0xffffu) | (k.offset_hi16 << 16);
  c.v[2] = k.stream;
  c.v[3] = k.offset_lo;
  return philox4x32_10(c, k.k0, k.k1);
}

}  // namespace dk
