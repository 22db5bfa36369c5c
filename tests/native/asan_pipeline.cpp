// AddressSanitizer / UBSan driver for the whole-step pipeline kernel (csrc/cpu/pipeline.h) on
// every ISA path: odd vocabulary sizes up to whole-row lists of 9000 (the list steps' radix sort
// and multi-block walks), fp32 / bf16 / fp16, NaN / all -inf rows, every truncation alone and
// combined in each order, sample and mask modes, raw / processed logprobs with top-n lists, a
// partial bitmask, -1 padded id tables with repeats, and the deferred checks (an out-of-range id
// and a bad parameter make invalid rows and set the error flag). Every input and output lives in
// an exactly-sized heap buffer, so a read or write past it is reported. Built and run by .ci/run.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "cpu/kernels.h"

using namespace dk::cpu;

template <class T>
static T* heap(const std::vector<T>& v) {  // an exactly-sized copy (nullptr when empty)
  if (v.empty()) return nullptr;
  T* p = static_cast<T*>(std::malloc(v.size() * sizeof(T)));
  std::memcpy(p, v.data(), v.size() * sizeof(T));
  return p;
}

static uint16_t half_bits(float f, int dt) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (dt == 1) return uint16_t(u >> 16);  // bf16 (truncated)
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t r;
  std::memcpy(&r, &h, 2);
  return r;
}

static int run_table(const KernelTable& t) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 2.f);
  int calls = 0;
  struct Setting {
    double T, k, p, minp, rep, freq, pres, nsig, typ, eps, eta, toph, mtk;
  };
  const Setting settings[] = {
      {1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1},       // nothing
      {0.7, 50, 0.9, 0.05, 1.2, 0.3, 0.2, 0.0, 1.0, 0.0, 0.0, 0.0, 1},     // vLLM's set
      {1.3, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 2},       // typical, whole row
      {1.0, 0, 0.95, 0.0, 1.0, 0.0, 0.0, 1.5, 1.0, 1e-4, 1e-4, 0.0, 1},    // top-p, sigma, eps, eta
      {0.8, 600, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.97, 0.0, 0.0, 0.6, 3},    // top-k > 512, typical, top-h
      {0.9, 20, 0.8, 0.02, 1.1, 0.0, 0.0, 3.0, 0.95, 1e-3, 1e-3, 0.9, 2},  // everything
      {0.0, 0, 1.0, 0.0, 1.3, 0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 1},       // greedy with penalties
  };
  for (int64_t V : {int64_t(1), int64_t(17), int64_t(33), int64_t(4113), int64_t(9000)})
    for (int dt = 0; dt < 3; ++dt) {
      const int64_t B = 5;
      std::vector<float> f(size_t(B * V));
      for (auto& v : f) v = nd(rng);
      if (V > 2) f[size_t(1 * V + V / 2)] = NAN;                         // bad row
      for (int64_t i = 0; i < V; ++i) f[size_t(2 * V + i)] = -INFINITY;  // all -inf
      const size_t esz = dt == 0 ? 4 : 2;
      char* data = static_cast<char*>(std::malloc(size_t(B * V) * esz));
      for (int64_t i = 0; i < B * V; ++i) {
        if (dt == 0) {
          std::memcpy(data + 4 * i, &f[size_t(i)], 4);
        } else {
          const uint16_t h = half_bits(f[size_t(i)], dt);
          std::memcpy(data + 2 * i, &h, 2);
        }
      }
      const int64_t words = (V + 31) / 32 > 1 ? (V + 31) / 32 - 1 : 1;  // a partial bitmask
      std::vector<int32_t> bm(size_t(B * words));
      for (auto& w : bm) w = int32_t(rng() | rng());  // ~75% allowed
      const int64_t nb = 3, nh = 8;
      std::vector<int64_t> banned(size_t(B * nb)), bias_ids(size_t(B * nb)), prompt(size_t(B * nh)),
          output(size_t(B * nh));
      std::vector<float> bias_vals(size_t(B * nb));
      for (int64_t o = 0; o < B; ++o) {
        for (int64_t j = 0; j < nb; ++j) {
          banned[size_t(o * nb + j)] = j == nb - 1 ? -1 : int64_t(rng() % uint64_t(V));
          bias_ids[size_t(o * nb + j)] = j == 0 ? -1 : int64_t(rng() % uint64_t(V));
          bias_vals[size_t(o * nb + j)] = float(int(rng() % 7) - 3);
        }
        for (int64_t j = 0; j < nh; ++j) {
          prompt[size_t(o * nh + j)] = j >= nh - 2 ? -1 : int64_t(rng() % uint64_t(V));
          output[size_t(o * nh + j)] = int64_t(rng() % uint64_t(std::min<int64_t>(V, 4)));  // repeats
        }
      }
      for (const Setting& s : settings)
        for (int order = 0; order < 3; ++order)
          for (int mode = 0; mode < 2; ++mode)
            for (int deferred = 0; deferred < 2; ++deferred) {
              std::vector<double> params;
              for (int64_t o = 0; o < B; ++o) {
                const double row[] = {s.T,    s.k,   s.p,   s.minp, s.rep,  s.freq, s.pres,
                                      s.nsig, s.typ, s.eps, s.eta,  s.toph, s.mtk};
                params.insert(params.end(), row, row + dk::kPipeParams);
              }
              std::vector<int64_t> ban = banned;
              if (deferred) {
                params[size_t(3 * dk::kPipeParams + dk::kPTopP)] = NAN;  // row 3: a bad parameter
                ban[size_t(4 * nb)] = V;                                 // row 4: an id out of range
              }
              PipelineArgs a;
              a.in = Matrix{data, DType(dt), B, V, V};
              a.n_out = B;
              double* P = heap(params);
              int32_t* BM = heap(bm);
              int64_t *BAN = heap(ban), *BI = heap(bias_ids), *PR = heap(prompt), *OU = heap(output);
              float* BV = heap(bias_vals);
              a.params = P;
              a.order = order;
              a.bitmask = BM;
              a.bitmask_words = words;
              a.banned = BAN, a.n_banned = nb;
              a.bias_ids = BI, a.bias_vals = BV, a.n_bias = nb;
              a.prompt = PR, a.n_prompt = nh;
              a.output = OU, a.n_output = nh;
              a.seed = 11;
              a.mode = mode;
              a.top_n = mode == 0 ? std::min<int64_t>(V, 5) : 0;
              a.raw_logprobs = (calls & 1) != 0;
              a.want_logprob = mode == 0;
              int32_t flag = 0;
              if (deferred) a.error_flag = &flag, a.error_bit = 4;
              int64_t* tok = static_cast<int64_t*>(std::malloc(size_t(B) * 8));
              bool* valid = static_cast<bool*>(std::malloc(size_t(B)));
              float* lp = static_cast<float*>(std::malloc(size_t(B) * 4));
              int64_t* rank = static_cast<int64_t*>(std::malloc(size_t(B) * 8));
              int64_t* tids = a.top_n ? static_cast<int64_t*>(std::malloc(size_t(B * a.top_n) * 8)) : nullptr;
              float* tlp = a.top_n ? static_cast<float*>(std::malloc(size_t(B * a.top_n) * 4)) : nullptr;
              void* out = mode == 1 ? std::malloc(size_t(B * V) * esz) : nullptr;
              a.out_tokens = tok, a.out_valid = valid, a.out_logprob = lp, a.out_rank = rank;
              a.out_top_ids = tids, a.out_top_lp = tlp, a.out_logits = out;
              t.pipeline_rows(a, 0, B);
              ++calls;
              if (mode == 0)
                for (int64_t o = 0; o < B; ++o) {
                  // row 0 keeps survivors once V is past the few banned / masked tokens
                  if ((o == 0 && V >= 17 && !valid[o]) || tok[o] < 0 || tok[o] >= V || (!valid[o] && tok[o] != 0)) {
                    std::printf("FAIL pipeline %s V=%lld dt=%d order=%d row %lld: token %lld valid %d\n", t.name,
                                (long long)V, dt, order, (long long)o, (long long)tok[o], int(valid[o]));
                    return -1;
                  }
                  if ((o == 1 && V > 2) || o == 2 || (deferred && o >= 3)) {
                    if (valid[o]) {
                      std::printf("FAIL pipeline %s V=%lld: row %lld should be invalid\n", t.name, (long long)V,
                                  (long long)o);
                      return -1;
                    }
                  }
                }
              if (deferred && flag != 4) {
                std::printf("FAIL pipeline %s V=%lld: error flag %d\n", t.name, (long long)V, flag);
                return -1;
              }
              for (void* p :
                   {static_cast<void*>(P), static_cast<void*>(BM), static_cast<void*>(BAN), static_cast<void*>(BI),
                    static_cast<void*>(PR), static_cast<void*>(OU), static_cast<void*>(BV), static_cast<void*>(tok),
                    static_cast<void*>(valid), static_cast<void*>(lp), static_cast<void*>(rank),
                    static_cast<void*>(tids), static_cast<void*>(tlp), out})
                std::free(p);
            }
      std::free(data);
    }
  return calls;
}

int main() {
  const KernelTable* tabs[] = {&table_scalar(), cpu_has_avx2() ? &table_avx2() : nullptr,
                               cpu_has_avx512() && cpu_has_avx512bf16() ? &table_avx512() : nullptr};
  int total = 0;
  for (const KernelTable* t : tabs) {
    if (!t) continue;
    const int c = run_table(*t);
    if (c < 0) return 1;
    std::printf("asan pipeline %s: %d kernel calls clean\n", t->name, c);
    total += c;
  }
  std::printf("asan pipeline: %d kernel calls\n", total);
  return 0;
}
