// C entry points that run csrc/cuda/sampling.cuh's kernels under the CPU emulator
// (tests/cuda_emu/emu.py loads this as a shared library through ctypes for tests/test_ops_sampling.py;
// host pointers stand in for device pointers).
#include "emu_runtime.h"
#include "cuda/sampling.cuh"

using namespace dk::cuda;

static RowFilter make_filter(int is_probs, int order, const float* T, float T_val, const int64_t* k, int64_t k_val,
                             const float* p, float p_val, const float* mp, float mp_val) {
  RowFilter f;
  f.is_probs = is_probs != 0;
  f.order = dk::FilterOrder(order);
  f.temperature = {T, T_val};
  f.top_k = {k, k_val};
  f.top_p = {p, p_val};
  f.min_p = {mp, mp_val};
  return f;
}

template <template <class> class K, class A>
static void run(DType dt, unsigned grid, const A& a) {
  switch (dt) {
    case DType::F32: dkemu::launch(grid, kThreads, K<float>::fn, a); break;
    case DType::BF16: dkemu::launch(grid, kThreads, K<dk::bf16_t>::fn, a); break;
    case DType::F16: dkemu::launch(grid, kThreads, K<dk::f16_t>::fn, a); break;
  }
}
template <class T>
struct SampleK {
  static void fn(SampleArgs a) { detail::sample_kernel<T>(a); }
};
template <class T>
struct GumbelK {
  static void fn(SampleArgs a) { detail::gumbel_kernel<T>(a); }
};
template <class T>
struct SplitScanK {
  static void fn(SplitArgs a) { detail::split_scan_kernel<T>(a); }
};
template <class T>
struct SplitMassK {
  static void fn(SplitArgs a) { detail::split_mass_kernel<T>(a); }
};
template <class T>
struct SplitDrawK {
  static void fn(SplitArgs a) { detail::split_draw_kernel<T>(a); }
};
template <class T>
struct FilterK {
  static void fn(FilterArgs a) { detail::filter_kernel<T>(a); }
};

// Device-side randomness (decodekit/rng.h row_rng_key): a seed and offsets "in device memory",
// set before dk_emu_sample / dk_emu_sample's gumbel form and applied to the next calls.
static const int64_t* g_seed_ptr = nullptr;
static const int64_t* g_offsets = nullptr;
static int64_t g_offset_stride = 0;

extern "C" {
int dk_emu_threads() { return kThreads; }
void dk_emu_set_device_rng(const int64_t* seed_ptr, const int64_t* offsets, int64_t offset_stride) {
  g_seed_ptr = seed_ptr;
  g_offsets = offsets;
  g_offset_stride = offset_stride;
}
int64_t dk_emu_workspace_elems(int64_t n_out, int64_t V) { return sample_workspace_elems(n_out, V); }

// Returns the number of CTAs per row that ran (n_sms > 0 may split unfiltered rows).
int dk_emu_sample(const void* x, int dtype, int64_t rows, int64_t V, int64_t row_stride, int is_probs, int order,
                  const float* T, float T_val, const int64_t* k, int64_t k_val, const float* p, float p_val,
                  const float* mp, float mp_val, const int64_t* indices, int64_t n_out, const int64_t* seeds,
                  uint64_t seed, uint64_t offset, int64_t* out_tokens, bool* out_valid, float* out_logprob,
                  double* workspace, int gumbel, int n_sms) {
  SampleArgs a;
  a.in = Matrix{x, DType(dtype), rows, V, row_stride};
  a.filter = make_filter(is_probs, order, T, T_val, k, k_val, p, p_val, mp, mp_val);
  a.indices = indices;
  a.n_out = n_out;
  a.seeds = seeds;
  a.seed = seed;
  a.offset = offset;
  a.seed_ptr = g_seed_ptr;
  a.offsets = g_offsets;
  a.offset_stride = g_offset_stride;
  a.out_tokens = out_tokens;
  a.out_valid = out_valid;
  a.out_logprob = out_logprob;
  a.workspace = workspace;
  // sampling.cuh's launch_sample / launch_gumbel: the split-row plan, else one CTA per row
  SplitArgs sa = split_plan(a, n_sms, gumbel != 0);
  if (sa.splits > 1) {
    sa.parts = split_parts(workspace, n_out, V);
    run<SplitScanK>(a.in.dtype, unsigned(n_out * sa.splits), sa);
    if (!gumbel) run<SplitMassK>(a.in.dtype, unsigned(n_out * sa.splits), sa);
    run<SplitDrawK>(a.in.dtype, unsigned(n_out), sa);
    return sa.splits;
  }
  if (gumbel)
    run<GumbelK>(a.in.dtype, unsigned(n_out), a);
  else
    run<SampleK>(a.in.dtype, unsigned(n_out), a);
  return 1;
}

void dk_emu_filter(const void* x, int dtype, int64_t rows, int64_t V, int64_t row_stride, int is_probs, int order,
                   const float* T, float T_val, const int64_t* k, int64_t k_val, const float* p, float p_val,
                   const float* mp, float mp_val, int kind, void* out, int64_t out_stride) {
  FilterArgs a;
  a.in = Matrix{x, DType(dtype), rows, V, row_stride};
  a.filter = make_filter(is_probs, order, T, T_val, k, k_val, p, p_val, mp, mp_val);
  a.kind = FilterOut(kind);
  a.out = out;
  a.out_stride = out_stride;
  run<FilterK>(a.in.dtype, unsigned(rows), a);
}
}
