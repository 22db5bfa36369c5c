// csrc/cpu/mass_select.h against its definition (the smallest value whose strictly greater values
// weigh < P; the smallest value when no prefix of tie groups reaches P), under AddressSanitizer +
// UBSan (tests/native/build_asan.sh). Weights are powers of two (and zeros), so every mass is exact
// in any order and the select must give the definition's value exactly: float and double values,
// many ties, all distinct over a wide range, clusters one ulp apart (every histogram level
// decides), signed zeros and infinities; P at, just below and just above group boundaries, above
// the total, tiny (P > 0: p * Z, typical_p * Z, m); weight 1 each with P = m (the m-th largest);
// lists on both sides of kRest.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <vector>
#include <type_traits>
#include "cpu/mass_select.h"

// PipeVW (float values) or PipeDW (double values)
template <class K>
using PairOf = std::conditional_t<sizeof(K) == 4, dk::PipeVW, dk::PipeDW>;

template <class K>
static K definition(const std::vector<PairOf<K>>& a, double P) {
  std::map<K, double, std::greater<K>> groups;  // -0 and +0 fall into one group (they compare equal)
  for (const auto& e : a) groups[e.v] += double(e.w);
  double above = 0.0;
  K last = 0;
  for (const auto& [v, m] : groups) {
    last = v;
    if (above + m >= P) return v;
    above += m;
  }
  return last;
}

template <class K>
static int run(std::mt19937_64& g, int& cases) {
  using Pair = PairOf<K>;
  int failures = 0;
  dk::cpu::MassSelect ms;
  for (int64_t n : {1, 7, 4096, 4097, 9000, 70000})
    for (int kind = 0; kind < 5; ++kind) {
      std::vector<Pair> a(static_cast<size_t>(n));
      const K base = K(1.5);
      for (int64_t q = 0; q < n; ++q) {
        K v;
        switch (kind) {
          case 0: v = K(std::ldexp(double(int64_t(g() % 41) - 20), int(g() % 3) - 1)); break;  // ties
          case 1: v = K(std::ldexp(double(int64_t(g() >> 12)) - 2e15, int(g() % 60) - 30)); break;
          case 2: {  // one ulp apart: a dense cluster the top bits cannot split
            v = base;
            for (int s = int(g() % 3000); s > 0; --s) v = std::nextafter(v, K(2));
            break;
          }
          case 3: v = (g() & 1) ? K(0) : K(-0.0); break;
          default: {
            const K inf = K(INFINITY);
            const K vals[] = {-inf, K(-1e30), K(-0.0), K(0), K(1e-30), K(3), inf};
            v = vals[g() % 7];
          }
        }
        const float w = (g() % 17 == 0) ? 0.f : std::ldexp(1.f, -int(g() % 20));
        a[size_t(q)] = Pair{v, w};
      }
      double total = 0.0;
      for (const auto& e : a) total += double(e.w);
      std::vector<double> Ps = {2.0 * total, total, std::nextafter(total, 1e300), total * 1.01, 1e-300};  // P > 0
      {
        std::map<K, double, std::greater<K>> groups;
        for (const auto& e : a) groups[e.v] += double(e.w);
        double cum = 0.0;
        int t = 0;
        for (const auto& [v, m] : groups) {
          cum += m;
          Ps.insert(Ps.end(), {cum, std::nextafter(cum, 0.0), std::nextafter(cum, 1e300)});
          if (++t == 6) break;
        }
      }
      for (int t = 0; t < 6; ++t) Ps.push_back(total * double(g() % 1000001) / 1e6);
      for (double P : Ps) {
        if (!(P > 0.0)) continue;
        auto b = a;
        const K got = ms.run(b.data(), n, P), want = definition<K>(a, P);
        ++cases;
        if (!(got == want)) {
          std::printf("mass_select<%s>: n=%lld kind=%d P=%.17g: got %.17g, want %.17g\n",
                      sizeof(K) == 4 ? "float" : "double", (long long)n, kind, P, double(got), double(want));
          ++failures;
        }
      }
      for (int64_t m0 : {int64_t(1), int64_t(2), n / 3 + 1, n}) {  // weight 1 each, P = m: the m-th largest
        const int64_t m = std::min(m0, n);
        std::vector<Pair> b(a.size());
        std::vector<K> vs(a.size());
        for (size_t q = 0; q < a.size(); ++q) b[q] = Pair{a[q].v, 1.f}, vs[q] = a[q].v;
        std::nth_element(vs.begin(), vs.begin() + (m - 1), vs.end(), std::greater<K>());
        const K got = ms.run(b.data(), n, double(m));
        ++cases;
        if (!(got == vs[size_t(m - 1)])) {
          std::printf("mass_select<%s> m-th largest: n=%lld kind=%d m=%lld: got %.17g, want %.17g\n",
                      sizeof(K) == 4 ? "float" : "double", (long long)n, kind, (long long)m, double(got),
                      double(vs[size_t(m - 1)]));
          ++failures;
        }
      }
    }
  return failures;
}

int main() {
  std::mt19937_64 g(11);
  int cases = 0;
  const int failures = run<float>(g, cases) + run<double>(g, cases);
  std::printf("asan_mass_select: %d cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}
