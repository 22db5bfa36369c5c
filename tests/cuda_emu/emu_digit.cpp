// Runs the radix selects' digit scans (csrc/cuda/radix_digit.h) on warp 0 of an emulated block,
// for tests/test_cuda_emu_runtime.py::test_digit_scans. Reads cases from stdin, one per line:
//   c <kk> <h_0> ... <h_255>            count form: prints "<digit> <count above>"
//   m <above> <P> <h_0> ... <h_255>     mass form: prints "<digit> <mass above>" (%.17g)
//   s <V> <n> <i_0> <w_0> ... <i_n-1> <w_n-1>   decodekit/contract.h's sparse_mass of the
//     weights w_q at increasing indices i_q, and the dense canonical mass of the same row (zeros
//     elsewhere: chunk_lane_sum per lane, lanes in order, chunks in order): prints both (%a)
// and runs each case under the schedule seed given as argv[1].
#include "emu_runtime.h"

#include <cstdio>
#include <cstdlib>

#include "cuda/radix_digit.h"
#include "decodekit/contract.h"

#include <vector>

struct Args {
  int mass;
  int64_t kk;
  double above, P;
  const unsigned* hc;
  const double* hm;
  uint32_t* d;
  int64_t* cnt;
  double* cum;
};

static void digit_kernel(Args a) {
  if (threadIdx.x >= 32) return;  // warp 0 only, as in the kernels
  if (a.mass)
    dk::cuda::pick_mass_digit(a.hm, a.above, a.P, a.d, a.cum);
  else
    dk::cuda::pick_count_digit(a.hc, a.kk, a.d, a.cnt);
}

int main(int argc, char** argv) {
  dk_emu_set_schedule_seed(argc > 1 ? std::atoll(argv[1]) : 1);
  char kind;
  while (std::scanf(" %c", &kind) == 1) {
    if (kind == 's') {
      long long V, n;
      if (std::scanf("%lld %lld", &V, &n) != 2) return 2;
      std::vector<int64_t> idx(size_t(n), 0);
      std::vector<float> w(size_t(n), 0.f), dense(size_t(V), 0.f);
      for (long long q = 0; q < n; ++q) {
        long long i;
        if (std::scanf("%lld %f", &i, &w[size_t(q)]) != 2) return 2;
        idx[size_t(q)] = i;
        dense[size_t(i)] = w[size_t(q)];
      }
      const double sp = dk::contract::sparse_mass(idx.data(), w.data(), n, [](int64_t) { return true; });
      double z = 0.0;
      for (int64_t c = 0; c < dk::contract::num_chunks(V); ++c) {
        double m = 0.0;
        for (int j = 0; j < dk::contract::kLanes; ++j)
          m += dk::contract::chunk_lane_sum(V, c, j, [&](int64_t i) { return dense[size_t(i)]; });
        z += m;
      }
      std::printf("%a %a\n", sp, z);
      continue;
    }
    unsigned hc[256];
    double hm[256];
    uint32_t d = 999;
    int64_t cnt = -1;
    double cum = -1.0;
    Args a{kind == 'm', 0, 0.0, 0.0, hc, hm, &d, &cnt, &cum};
    if (kind == 'c') {
      long long kk;
      if (std::scanf("%lld", &kk) != 1) return 2;
      a.kk = kk;
      for (int i = 0; i < 256; ++i)
        if (std::scanf("%u", &hc[i]) != 1) return 2;
    } else {
      if (std::scanf("%lf %lf", &a.above, &a.P) != 2) return 2;
      for (int i = 0; i < 256; ++i)
        if (std::scanf("%lf", &hm[i]) != 1) return 2;
    }
    dkemu::launch(1, 64, digit_kernel, a);
    if (dk_emu_take_error()) return 1;
    if (kind == 'c')
      std::printf("%u %lld\n", d, (long long)cnt);
    else
      std::printf("%u %.17g\n", d, cum);
  }
  return 0;
}
