// The CPU's mass select: over (value, weight) pairs a[0..n) (.v float or double, .w float), the
// smallest value whose strictly greater values weigh < P, or the smallest value when no prefix of
// tie groups reaches P (top_p_quickselect's definition, decodekit/pipeline.h). The list steps'
// top-p cut, typical's cut (on negated scores) and the m-th largest (weight 1 each, P = m) on the
// CPU (csrc/cpu/pipeline.h SerialListOps).
//
// Histograms of the values' order keys narrow the search, 11 bits per level from the top: one
// pass adds each bin's count and mass (the weights in index order), the scan from the highest bin
// takes the one at which the mass above plus its own reaches P (or, when none does, the lowest
// bin held), and that bin's entries move to the front (order kept) for the next level, until at
// most kRest entries (or no more key bits) are left; top_p_quickselect finishes them, starting
// from the mass above. Two streaming passes over a long list instead of the quickselect's branchy
// partitions (at 128K entries ~1.8 ms -> ~0.3 ms on the development machine). The masses are added
// in this fixed order; the GPU (csrc/cuda/pipeline.cuh block_mass_select) adds per 2-bit radix
// digit in another, so a cut whose mass above lies within a few double ulps of P may differ (README).
// ISA-free, torch-free (tests/native/asan_mass_select.cpp checks it against the definition).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>
#include "decodekit/common.h"
#include "decodekit/pipeline.h"

#if defined(DK_ISA_NAME)
namespace dk::cpu::DK_ISA_NAME {
#else
namespace dk::cpu {
#endif

struct MassSelect {
  static constexpr int kBits = 11;
  static constexpr uint32_t kBins = 1u << kBits;
  static constexpr int64_t kRest = 4096;  // at most this many left: the quickselect
  std::vector<double> mass;
  std::vector<uint32_t> count;

  // The order key of a value (-0 as +0) at the top of 64 bits.
  static uint64_t order_key(float v) { return uint64_t(float_key_z(v)) << 32; }
  static uint64_t order_key(double v) { return double_key_z(v); }

  // n >= 1, P > 0 (p * Z, typical_p * Z or m: at P <= 0 the quickselect gives +inf); a is permuted.
  template <class VWT>
  decltype(VWT::v) run(VWT* a, int64_t n, double P) {
    constexpr int kLow = sizeof(decltype(VWT::v)) == 4 ? 32 : 0;  // float keys: the top 32 bits
    mass.resize(kBins);
    count.resize(kBins);
    double above = 0.0;  // the mass of the values above the chosen bins
    for (int shift = 64 - kBits; n > kRest; shift -= kBits) {
      const int sh = shift > 0 ? shift : 0;
      const uint64_t mask = (uint64_t(1) << (shift > 0 ? kBits : kBits + shift)) - 1u;
      std::fill(mass.begin(), mass.end(), 0.0);
      std::fill(count.begin(), count.end(), 0u);
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t b = uint32_t((order_key(a[j].v) >> sh) & mask);
        mass[b] += double(a[j].w);
        ++count[b];
      }
      // the bin that reaches P or, when none does, the lowest bin held; `above` then holds the mass
      // above it (not the total: the quickselect adds the bin's own masses to it)
      int64_t bin = -1;
      double at = above;  // the mass above `bin`
      for (int64_t b = int64_t(mask); b >= 0; --b) {
        if (!count[size_t(b)]) continue;
        bin = b;
        at = above;
        if (above + mass[size_t(b)] >= P) break;
        above += mass[size_t(b)];
      }
      above = at;
      int64_t c = 0;
      for (int64_t j = 0; j < n; ++j)
        if (((order_key(a[j].v) >> sh) & mask) == uint64_t(bin)) a[c++] = a[j];
      n = c;
      if (sh <= kLow) break;  // every bit of the key taken: the rest are ties
    }
    return top_p_quickselect(a, n, P, above);
  }
};

}  // namespace
