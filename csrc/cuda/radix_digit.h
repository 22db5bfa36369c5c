// The digit scans of the 8-bit radix selects (sampling.cuh's top-k and top-p selects, the
// whole-step kernel's m-th largest), shared by the CUDA kernels. Torch-free; the CPU-thread
// emulator of tests/cuda_emu compiles it as plain C++.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DK_DIGIT_FN __device__ __forceinline__
#else
#define DK_DIGIT_FN inline
#endif

namespace dk::cuda {

// The 8-bit radix passes over 32-bit order keys, from the top: pass q (0..3) histograms the digit
// at radix_shift(q) (24, 16, 8, 0) of the keys that match the prefix found so far in the bits
// radix_high_mask(shift) selects (those above the digit; none for the top digit). radix_mask(q):
// the mask of the prefix before pass q (q = 4: all 32 bits, the key found).
DK_DIGIT_FN int radix_shift(int q) { return 24 - 8 * q; }
DK_DIGIT_FN uint32_t radix_high_mask(int shift) { return shift >= 24 ? 0u : ~0u << (shift + 8); }
DK_DIGIT_FN uint32_t radix_mask(int q) { return radix_high_mask(radix_shift(q)); }

// The digit scans of the radix selects run on warp 0: lane l owns the 8 digits 255 - 8l down to
// 248 - 8l (the scan order, from the top), so a scan is 8 steps per lane plus a 5-step warp scan
// instead of 256 steps on one thread. Call from the threads of warp 0 only.

// Count form (top-k): the largest digit d >= 1 whose count from the top (digits >= d) reaches kk,
// else 0, and the count of the digits > d. Integer sums: the digit and count of the sequential
// scan from the top, exactly. The lane that finds them writes them to *d_out / *above_out.
DK_DIGIT_FN void pick_count_digit(const unsigned* h, int64_t kk, uint32_t* d_out, int64_t* above_out) {
  const int lane = int(threadIdx.x), hi = 255 - 8 * lane;
  int64_t local = 0;
  for (int b = 0; b < 8; ++b) local += h[hi - b];
  int64_t incl = local;
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  const unsigned hit = __ballot_sync(0xffffffffu, incl >= kk);
  const int L = hit ? __ffs(hit) - 1 : 31;  // none: digit 0 (lane 31 walks down to it)
  if (lane == L) {
    int64_t cum = incl - local;
    int d = hi;
    for (; d > hi - 8; --d) {  // (lanes before 31 always cross inside their 8 digits)
      if (d == 0 || cum + int64_t(h[d]) >= kk) break;
      cum += h[d];
    }
    *d_out = uint32_t(d);
    *above_out = cum;
  }
}

// Mass form (top-p): the first digit from the top where above + the mass from the top reaches P;
// if rounding leaves the total just under P, the lowest digit with mass (0 if none). *cum_out =
// above + the mass of the digits above the chosen one. Fixed order, so deterministic: per lane
// the sum of its 8 digits in order, an inclusive scan of the lane sums in lane order (5 shuffle
// steps), then each lane walks its digits from above + the mass of the lanes before it.
DK_DIGIT_FN void pick_mass_digit(const double* h, double above, double P, uint32_t* d_out, double* cum_out) {
  const int lane = int(threadIdx.x), hi = 255 - 8 * lane;
  double local = 0.0;
  for (int b = 0; b < 8; ++b) local = __dadd_rn(local, h[hi - b]);
  double incl = local;
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl = __dadd_rn(y, incl);
  }
  double excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.0;
  double cum = __dadd_rn(above, excl), cum_last = 0.0;
  int d = -1, last = -1;
  for (int b = hi; b > hi - 8; --b) {
    const double m = h[b];
    if (m > 0.0) {
      last = b;
      cum_last = cum;
    }
    if (__dadd_rn(cum, m) >= P) {
      d = b;
      break;
    }
    cum = __dadd_rn(cum, m);
  }
  const unsigned hit = __ballot_sync(0xffffffffu, d >= 0);
  if (hit) {
    if (lane == __ffs(hit) - 1) {
      *d_out = uint32_t(d);
      *cum_out = cum;
    }
    return;
  }
  int hl = last >= 0 ? lane : -1;  // the highest lane with mass holds the lowest digit with mass
  for (int o = 16; o > 0; o >>= 1) {
    const int y = __shfl_xor_sync(0xffffffffu, hl, o);
    hl = y > hl ? y : hl;
  }
  if (lane == (hl < 0 ? 0 : hl)) {
    *d_out = uint32_t(hl < 0 ? 0 : last);
    *cum_out = hl < 0 ? above : cum_last;
  }
}

}  // namespace dk::cuda
