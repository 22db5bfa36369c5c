// Sorts (key, position) pairs by key, ascending or descending, ties by position ascending: the
// list steps' sort on the CPU (csrc/cpu/pipeline.h SerialListOps::sort). Long inputs whose
// positions arrive ascending take an LSD radix sort (8 passes of 8 bits over the 64-bit order key
// of the double; stable, so equal keys keep their ascending positions); the others std::sort.
// -0 counts as +0 (the comparator's equality); NaN keys are not allowed. ISA-free, torch-free
// (tests/native/asan_key_sort.cpp checks it against std::sort under ASan / UBSan).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

// In the ISA's namespace when compiled per ISA (csrc/cpu/isa/*.cpp): its inline functions are
// compiled with that ISA's flags, so each object keeps its own copy (no cross-ISA ODR merge).
#if defined(DK_ISA_NAME)
namespace dk::cpu::DK_ISA_NAME {
#else
namespace dk::cpu {
#endif

struct KeySort {
  std::vector<std::pair<double, int32_t>> kp;
  std::vector<std::pair<uint64_t, int32_t>> a, b;
  static constexpr size_t kRadixMin = 4096;  // below: std::sort

  // kp holds the (key, position) pairs; on return they are in order (radix: only .second is set).
  void run(bool descending) {
    for (auto& e : kp) e.first = e.first == 0.0 ? 0.0 : e.first;
    bool pos_sorted = true;
    for (size_t q = 1; q < kp.size() && pos_sorted; ++q) pos_sorted = kp[q - 1].second < kp[q].second;
    if (kp.size() >= kRadixMin && pos_sorted) {
      radix(descending);
    } else if (descending) {
      std::sort(kp.begin(), kp.end(), [](const auto& x, const auto& y) {
        return x.first > y.first || (x.first == y.first && x.second < y.second);
      });
    } else {
      std::sort(kp.begin(), kp.end());
    }
  }

 private:
  void radix(bool descending) {
    const size_t n = kp.size();
    a.resize(n);
    b.resize(n);
    for (size_t q = 0; q < n; ++q) {
      uint64_t u;
      std::memcpy(&u, &kp[q].first, 8);
      u = (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);  // order-preserving
      a[q] = {descending ? ~u : u, kp[q].second};
    }
    for (int shift = 0; shift < 64; shift += 8) {
      size_t count[257] = {};
      for (size_t q = 0; q < n; ++q) ++count[((a[q].first >> shift) & 255u) + 1];
      if (count[((a[0].first >> shift) & 255u) + 1] == n) continue;  // one digit: nothing moves
      for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
      for (size_t q = 0; q < n; ++q) b[count[(a[q].first >> shift) & 255u]++] = a[q];
      a.swap(b);
    }
    for (size_t q = 0; q < n; ++q) kp[q].second = a[q].second;
  }
};

}  // namespace dk::cpu(::DK_ISA_NAME)
