// AddressSanitizer / UBSan driver for the torch-free sampling kernels: every ISA path, odd
// vocabulary sizes, all dtypes, bad rows, candidate-buffer overflow, large top_k. Inputs live
// in exactly-sized heap buffers so any read past a row is reported. Built and run by .ci/run.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "cpu/kernels.h"

using namespace dk::cpu;

static uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}
static uint16_t to_f16(float f) {  // crude but valid half encoding for test data
  if (std::isnan(f)) return 0x7e00;
  if (std::isinf(f)) return f > 0 ? 0x7c00 : 0xfc00;
  int e;
  float m = std::frexp(std::fabs(f), &e);
  uint16_t s = f < 0 ? 0x8000 : 0;
  int he = e + 14;
  if (he <= 0) return s;
  if (he >= 31) return s | 0x7bff;
  return s | uint16_t(he << 10) | uint16_t(int((m * 2 - 1) * 1024) & 0x3ff);
}

static int run_table(const KernelTable& t) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 2.f);
  int checks = 0;
  const int64_t Vs[] = {1, 15, 16, 17, 33, 4113};
  for (int64_t V : Vs) {
    for (int dt = 0; dt < 3; ++dt) {
      const int64_t B = 6;
      std::vector<float> f(B * V);
      for (auto& v : f) v = nd(rng);
      for (int64_t i = 0; i < V; ++i) f[1 * V + i] = 0.25f;      // flat row (overflow path)
      f[2 * V + V / 2] = NAN;                                    // bad row
      for (int64_t i = 0; i < V; ++i) f[3 * V + i] = -INFINITY;  // all -inf
      if (V > 3) f[4 * V + 1] = INFINITY;                        // +inf row
      size_t esz = dt == 0 ? 4 : 2;
      char* data = static_cast<char*>(std::malloc(B * V * esz));
      for (int64_t i = 0; i < B * V; ++i) {
        if (dt == 0)
          std::memcpy(data + 4 * i, &f[i], 4);
        else {
          uint16_t h = dt == 1 ? to_bf16(f[i]) : to_f16(f[i]);
          std::memcpy(data + 2 * i, &h, 2);
        }
      }
      Matrix m{data, DType(dt), B, V, V};
      std::vector<int64_t> tok(B), seeds(B);
      bool* valid = static_cast<bool*>(std::malloc(B));
      for (int64_t i = 0; i < B; ++i) seeds[i] = 100 + i;
      int64_t kvals[] = {0, 3, V / 2 + 1, 5000};
      float pvals[] = {1.f, 0.3f, 1e-6f};
      float mpvals[] = {0.f, 0.05f};
      float Tvals[] = {1.f, 0.f, 1e-3f};
      for (int64_t k : kvals)
        for (float p : pvals)
          for (float mp : mpvals)
            for (int order = 0; order < 2; ++order) {
              for (int probs = 0; probs < 2; ++probs)
                for (float T : Tvals) {
                  if (probs && T != 1.f) continue;
                  SampleArgs a;
                  a.in = m;
                  a.filter.is_probs = probs;
                  a.filter.temperature.scalar = T;
                  a.filter.top_k.scalar = k;
                  a.filter.top_p.scalar = p;
                  a.filter.min_p.scalar = mp;
                  a.filter.order = FilterOrder(order);
                  a.n_out = B;
                  a.seeds = seeds.data();
                  a.out_tokens = tok.data();
                  a.out_valid = valid;
                  t.sample_rows(a, 0, B);
                  for (int64_t i = 0; i < B; ++i)
                    if (tok[i] < 0 || tok[i] >= V) {
                      std::printf("FAIL token %lld out of range (V=%lld)\n", (long long)tok[i], (long long)V);
                      return -1;
                    }
                  ++checks;
                  if (k == 3 && order == 0 && T == 1.f) {
                    for (int kind = 0; kind < 3; ++kind) {
                      FilterArgs fa;
                      fa.in = m;
                      fa.filter = a.filter;
                      fa.kind = FilterOut(kind);
                      size_t osz = kind == 0 ? esz : 4;
                      void* out = std::malloc(B * V * osz);
                      fa.out = out;
                      fa.out_stride = V;
                      t.filter_rows(fa, 0, B);
                      std::free(out);
                      ++checks;
                    }
                  }
                }
            }
      SampleArgs g;
      g.in = m;
      g.n_out = B;
      g.seed = 7;
      g.out_tokens = tok.data();
      g.out_valid = valid;
      t.gumbel_rows(g, 0, B);
      for (int64_t i = 0; i < B; ++i)
        if (tok[i] < 0 || tok[i] >= V) {
          std::printf("FAIL gumbel token\n");
          return -1;
        }
      ++checks;
      std::free(valid);
      std::free(data);
    }
  }
  return checks;
}

// The hardening cases: renormalising rows of subnormal total mass (1 / Z overflows float32) must
// give finite outputs summing to 1, and Gumbel-max must return an index past 2^24 exactly.
static int run_hardening(const KernelTable& t) {
  int checks = 0;
  for (int64_t V : {int64_t(4), int64_t(4113)}) {
    std::vector<float> p(size_t(V), 0.f);
    for (int64_t i = 0; i < V; ++i) p[size_t(i)] = (i % 3 == 2) ? 0.f : 1e-41f * float(1 + i % 5);
    float* data = static_cast<float*>(std::malloc(size_t(V) * 4));
    std::memcpy(data, p.data(), size_t(V) * 4);
    float* out = static_cast<float*>(std::malloc(size_t(V) * 4));
    FilterArgs fa;
    fa.in = Matrix{data, DType::F32, 1, V, V};
    fa.filter.is_probs = true;
    fa.filter.temperature.scalar = 1.f;
    fa.filter.top_p.scalar = 1.f;  // every filter off: plain renormalisation
    fa.kind = FilterOut::RenormProbs;
    fa.out = out;
    fa.out_stride = V;
    t.filter_rows(fa, 0, 1);
    double sum = 0.0;
    for (int64_t i = 0; i < V; ++i) {
      if (!std::isfinite(out[i])) {
        std::printf("FAIL renorm of a tiny-mass row: out[%lld] = %g\n", (long long)i, out[i]);
        return -1;
      }
      sum += out[i];
    }
    if (std::fabs(sum - 1.0) > 1e-5) {
      std::printf("FAIL renorm of a tiny-mass row sums to %g\n", sum);
      return -1;
    }
    std::free(out);
    std::free(data);
    ++checks;
  }
  const int64_t V = (int64_t(1) << 24) + 5;
  float* x = static_cast<float*>(std::malloc(size_t(V) * 4));
  for (int64_t i = 0; i < V; ++i) x[i] = -INFINITY;
  x[(int64_t(1) << 24) + 1] = 0.f;
  int64_t tok = -1;
  bool valid = false;
  SampleArgs g;
  g.in = Matrix{x, DType::F32, 1, V, V};
  g.n_out = 1;
  g.seed = 3;
  g.out_tokens = &tok;
  g.out_valid = &valid;
  t.gumbel_rows(g, 0, 1);
  std::free(x);
  if (!valid || tok != (int64_t(1) << 24) + 1) {
    std::printf("FAIL gumbel index past 2^24: %lld\n", (long long)tok);
    return -1;
  }
  return checks + 1;
}

int main() {
  int total = 0;
  const KernelTable* tabs[] = {&table_scalar(), cpu_has_avx2() ? &table_avx2() : nullptr,
                               cpu_has_avx512() && cpu_has_avx512bf16() ? &table_avx512() : nullptr};
  for (auto* t : tabs) {
    if (!t) continue;
    int c = run_table(*t);
    const int h = c < 0 ? 0 : run_hardening(*t);
    c = h < 0 ? -1 : c + h;
    if (c < 0) {
      std::printf("1 passed, 1 failed\n");
      return 1;
    }
    std::printf("asan sampling %s: %d kernel calls clean\n", t->name, c);
    total += c;
  }
  std::printf("asan sampling: %d kernel calls\n", total);
  return 0;
}
