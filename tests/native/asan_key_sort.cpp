// csrc/cpu/key_sort.h against std::sort with the comparator it implements (key ascending or
// descending, ties by position ascending; -0 == +0), under AddressSanitizer + UBSan
// (tests/native/build_asan.sh): random keys with many ties, negative and positive, both zeros,
// subnormals and infinities, on both sides of the radix threshold.
#include <cmath>
#include <cstdio>
#include <random>
#include "cpu/key_sort.h"

int main() {
  std::mt19937_64 g(7);
  int failures = 0, cases = 0;
  for (size_t n : {size_t(1), size_t(17), size_t(4095), size_t(4096), size_t(9000), size_t(70000)})
    for (int kind = 0; kind < 4; ++kind)
      for (bool desc : {false, true}) {
        dk::cpu::KeySort ks;
        ks.kp.resize(n);
        for (size_t q = 0; q < n; ++q) {
          double k;
          switch (kind) {
            case 0: k = std::ldexp(double(g() % 2001) - 1000.0, int(g() % 9) - 4); break;  // ties
            case 1: k = std::ldexp(double(int64_t(g() >> 11)) - 4.5e15, -30); break;       // all distinct
            case 2: k = (g() & 1) ? 0.0 : -0.0; break;                                     // zeros
            default: {
              const double v[] = {-INFINITY, -1e308, -5e-324, -0.0, 0.0, 5e-324, 1e-300, 1.0, INFINITY};
              k = v[g() % 9];
            }
          }
          ks.kp[q] = {k, int32_t(q)};
        }
        auto want = ks.kp;
        std::sort(want.begin(), want.end(), [desc](const auto& x, const auto& y) {
          return desc ? (x.first > y.first || (x.first == y.first && x.second < y.second))
                      : (x.first < y.first || (x.first == y.first && x.second < y.second));
        });
        ks.run(desc);
        ++cases;
        for (size_t q = 0; q < n; ++q)
          if (ks.kp[q].second != want[q].second) {
            std::printf("key_sort: n=%zu kind=%d desc=%d: position %zu holds %d, want %d\n", n, kind, int(desc), q,
                        ks.kp[q].second, want[q].second);
            ++failures;
            break;
          }
      }
  std::printf("asan_key_sort: %d cases, %d failed\n", cases, failures);
  return failures ? 1 : 0;
}
