// AddressSanitizer / UBSan driver for the torch-free tree-attention kernels: every ISA path (and,
// on AVX-512, every bf16 kernel: AMX, vdpbf16ps, FMA), all dtypes and head dims, both cache
// layouts, packed and bool masks, prefixes of 0 and off the 64-key block, T not a multiple of 8.
// Every tensor lives in an exactly-sized heap buffer, so a read past the cache or a row is
// reported. Results of every path are compared with a double-precision reference here.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "cpu/attention_kernels.h"

using namespace dk::cpu;

static float from_bits16(uint16_t h, DType dt) {
  if (dt == DType::BF16) return dk::to_float(dk::bf16_t{h});
  return dk::to_float(dk::f16_t{h});
}
static uint16_t to_f16(float f) {  // round to nearest via the value grid (test data is small, normal)
  _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

struct Case {
  int64_t B, T, Hq, Hkv, D;
  std::vector<int64_t> prefix;
  bool hnd, packed;
  DType dt;
};

static int run_case(const AttnTable& tab, const Case& c, std::mt19937& rng) {
  const int64_t B = c.B, T = c.T, Hq = c.Hq, Hkv = c.Hkv, D = c.D, G = Hq / Hkv;
  int64_t S = 0;
  for (auto p : c.prefix) S = std::max(S, p + T);
  const size_t es = c.dt == DType::F32 ? 4 : 2;
  std::normal_distribution<float> nd(0.f, 1.f);
  const size_t nq = size_t(B * T * Hq * D), nk = size_t(B * S * Hkv * D);
  std::vector<float> qf(nq), kf(nk), vf(nk);
  // exactly sized raw buffers
  char* q = static_cast<char*>(std::malloc(nq * es));
  char* k = static_cast<char*>(std::malloc(nk * es));
  char* v = static_cast<char*>(std::malloc(nk * es));
  auto fill = [&](std::vector<float>& f, char* raw) {
    for (size_t i = 0; i < f.size(); ++i) {
      float x = nd(rng);
      if (c.dt == DType::F32) {
        std::memcpy(raw + 4 * i, &x, 4);
      } else {
        uint16_t h = c.dt == DType::BF16 ? dk::bf16_bits(x) : to_f16(x);
        std::memcpy(raw + 2 * i, &h, 2);
        x = from_bits16(h, c.dt);
      }
      f[i] = x;
    }
  };
  fill(qf, q);
  fill(kf, k);
  fill(vf, v);
  // random tree: parent[i] in [0, i)
  std::vector<int> parent(size_t(B * T));
  std::vector<uint8_t> dense(size_t(B * T * T), 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      parent[b * T + t] = t == 0 ? -1 : int(rng() % uint32_t(t));
      for (int64_t j = t; j >= 0; j = parent[b * T + j]) dense[(b * T + t) * T + j] = 1;
    }
  const int64_t T8 = (T + 7) / 8;
  const size_t mask_bytes = c.packed ? size_t(B * T * T8) : size_t(B * T * T);
  uint8_t* mask = static_cast<uint8_t*>(std::malloc(mask_bytes));
  std::memset(mask, 0, mask_bytes);
  for (int64_t bt = 0; bt < B * T; ++bt)
    for (int64_t j = 0; j < T; ++j)
      if (dense[bt * T + j]) {
        if (c.packed)
          mask[bt * T8 + j / 8] |= uint8_t(1u << (j % 8));
        else
          mask[bt * T + j] = 1;
      }
  int64_t* pl = static_cast<int64_t*>(std::malloc(size_t(B) * 8));
  for (int64_t b = 0; b < B; ++b) pl[b] = c.prefix[size_t(b)];
  char* out = static_cast<char*>(std::malloc(nq * es));
  float* lse = static_cast<float*>(std::malloc(size_t(B * T * Hq) * 4));

  AttnArgs a;
  a.dtype = c.dt;
  a.B = B;
  a.T = T;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.D = D;
  a.S = S;
  a.q = q;
  a.q_sb = T * Hq * D;
  a.q_st = Hq * D;
  a.q_sh = D;
  auto kv_strides = [&](int64_t& sb, int64_t& ss, int64_t& sh) {
    sb = S * Hkv * D;
    if (c.hnd) {
      sh = S * D;
      ss = D;
    } else {
      ss = Hkv * D;
      sh = D;
    }
  };
  a.k = k;
  kv_strides(a.k_sb, a.k_ss, a.k_sh);
  a.v = v;
  kv_strides(a.v_sb, a.v_ss, a.v_sh);
  a.mask = mask;
  a.mask_packed = c.packed;
  a.mask_sb = c.packed ? T * T8 : T * T;
  a.mask_st = c.packed ? T8 : T;
  a.prefix_lens = pl;
  a.sm_scale = float(1.0 / std::sqrt(double(D)));
  a.out = out;
  a.lse = lse;
  tab.tree_attention(a, 0, B * Hkv);

  // double-precision reference
  int bad = 0;
  const double tol = c.dt == DType::F32 ? 2e-5 : c.dt == DType::F16 ? 4e-3 : 3e-2;
  std::vector<double> sc(static_cast<size_t>(S));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const int64_t h = hq / G;
        const float* qr = &qf[size_t(((b * T + t) * Hq + hq) * D)];
        double mx = -INFINITY;
        std::vector<int64_t> keys;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t j = s - pl[b];
          if (s < pl[b] || (j >= 0 && j < T && dense[(b * T + t) * T + j])) keys.push_back(s);
        }
        for (int64_t s : keys) {
          const float* kr = &kf[size_t(b * a.k_sb + s * a.k_ss + h * a.k_sh)];
          double d = 0;
          for (int64_t x = 0; x < D; ++x) d += double(qr[x]) * kr[x];
          sc[size_t(s)] = d * a.sm_scale;
          mx = std::max(mx, sc[size_t(s)]);
        }
        double l = 0;
        for (int64_t s : keys) l += std::exp(sc[size_t(s)] - mx);
        const int64_t oi = (b * T + t) * Hq + hq;
        if (std::fabs(lse[oi] - (mx + std::log(l))) > 1e-3) ++bad;
        for (int64_t x = 0; x < D; ++x) {
          double o = 0;
          for (int64_t s : keys)
            o += std::exp(sc[size_t(s)] - mx) / l * vf[size_t(b * a.v_sb + s * a.v_ss + h * a.v_sh + x)];
          float got;
          if (c.dt == DType::F32)
            std::memcpy(&got, out + 4 * size_t(oi * D + x), 4);
          else {
            uint16_t hbits;
            std::memcpy(&hbits, out + 2 * size_t(oi * D + x), 2);
            got = from_bits16(hbits, c.dt);
          }
          if (!(std::fabs(got - o) <= tol * (1 + std::fabs(o)))) ++bad;
        }
      }
  if (bad)
    std::printf("FAIL %s dt=%d D=%ld T=%ld Hq=%ld Hkv=%ld hnd=%d packed=%d: %d mismatches\n", tab.name, int(c.dt),
                long(D), long(T), long(Hq), long(Hkv), int(c.hnd), int(c.packed), bad);
  std::free(q);
  std::free(k);
  std::free(v);
  std::free(mask);
  std::free(pl);
  std::free(out);
  std::free(lse);
  return bad ? 1 : 0;
}

int main() {
  std::mt19937 rng(7);
  std::vector<const AttnTable*> tabs{&attn_table_scalar()};
  if (cpu_has_avx2()) tabs.push_back(&attn_table_avx2());
  if (cpu_has_avx512() && cpu_has_avx512bf16()) tabs.push_back(&attn_table_avx512());
  int fails = 0, cases = 0;
  const char* modes[] = {"amx", "dpbf16", "fma"};
  for (const AttnTable* tab : tabs) {
    const bool avx512 = std::strcmp(tab->name, "avx512") == 0;
    for (int mode = 0; mode < (avx512 ? 3 : 1); ++mode) {
      if (avx512) setenv("DECODEKIT_ATTN_BF16", modes[mode], 1);
      for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
        if (mode > 0 && dt != DType::BF16) continue;
        for (int64_t D : {64, 80, 96, 128, 256}) {
          const Case cs[] = {
              {2, 13, 8, 2, D, {0, 70}, false, true, dt},
              {1, 1, 4, 4, D, {129}, true, false, dt},
              {2, 5, 8, 1, D, {64, 3}, true, true, dt},
              {1, 70, 4, 1, D, {0}, true, true, dt},  // two tree blocks (the AMX path runs them as masked blocks)
          };
          for (const Case& c : cs) {
            fails += run_case(*tab, c, rng);
            ++cases;
          }
        }
      }
    }
    unsetenv("DECODEKIT_ATTN_BF16");
  }
  std::printf("asan_attention: %d cases, %d failed\n", cases, fails);
  return fails ? 1 : 0;
}
