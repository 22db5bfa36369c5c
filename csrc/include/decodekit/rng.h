// Uniform / exponential / Gumbel variates from Philox counters. Shared by CPU and CUDA.
#pragma once
#include "decodekit/philox.h"

namespace dk {

// 53-bit uniform double in the OPEN interval (0, 1): (k + 0.5) / 2^53, k in [0, 2^53).
DK_HOST_DEVICE double u53_open(uint32_t a, uint32_t b) {
  uint64_t k = (uint64_t(a >> 5) << 26) | uint64_t(b >> 6);
  return (double(k) + 0.5) * (1.0 / 9007199254740992.0);
}

// The single uniform a row uses for inverse-CDF sampling at draw `purpose`.
DK_HOST_DEVICE double row_uniform(const RngKey& k, uint32_t purpose) {
  Philox4 r = philox_draw(k, purpose, 0);
  return u53_open(r.v[0], r.v[1]);
}

// A second independent uniform from the same block (words 2,3).
DK_HOST_DEVICE double row_uniform2(const RngKey& k, uint32_t purpose) {
  Philox4 r = philox_draw(k, purpose, 0);
  return u53_open(r.v[2], r.v[3]);
}

}  // namespace dk
