// Uniform / exponential / Gumbel variates from Philox counters. Shared by CPU and CUDA.
#pragma once
#include "decodekit/philox.h"

namespace dk {

// The Philox key of output row `row`, resolved where the kernel runs (host or device). Every
// kernel family's argument struct carries the same six fields:
//   seeds         per-row seeds [n] (row i's stream is keyed by seeds[i] alone), or null;
//   seed_ptr      ONE seed in memory (on the GPU: a device tensor, read here, never on the host), or null;
//   seed          the scalar seed when seeds and seed_ptr are null;
//   offsets       offsets in memory: [n] (offset_stride 1) or [1] (offset_stride 0), or null;
//   offset        added to offsets[row * offset_stride] (the whole offset when offsets is null).
// With one seed (seed_ptr or seed) the row index is the stream word of the counter. torch's CUDA
// generator state under graph capture (seed and offset pointers plus the captured offset, as
// at::cuda::philox::unpack reads them) is this form: seed_ptr, offsets with stride 0, offset.
template <class A>
DK_HOST_DEVICE RngKey row_rng_key(const A& a, int64_t row) {
  const uint64_t off = a.offset + (a.offsets ? uint64_t(a.offsets[row * a.offset_stride]) : uint64_t(0));
  if (a.seeds) return make_rng_key(uint64_t(a.seeds[row]), off, 0u);
  return make_rng_key(a.seed_ptr ? uint64_t(*a.seed_ptr) : a.seed, off, uint32_t(row));
}

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
