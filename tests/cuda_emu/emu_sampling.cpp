// C entry points that run csrc/cuda/sampling.cuh's kernels under the CPU emulator
// (tests/cuda_emu/emu.py loads this as a shared library through ctypes for tests/test_ops_sampling.py;
// host pointers stand in for device pointers).
#include "emu_runtime.h"
#include "cuda/sampling.cuh"

using namespace dk::cuda;

static RowFilterArgs make_filter(int is_probs, int order, const float* T, float T_val, const int64_t* k, int64_t k_val,
                                 const float* p, float p_val, const float* mp, float mp_val) {
  RowFilterArgs f;
  f.is_probs = is_probs != 0;
  f.order = order;
  f.temperature = T;
  f.temperature_val = T_val;
  f.top_k = k;
  f.top_k_val = k_val;
  f.top_p = p;
  f.top_p_val = p_val;
  f.min_p = mp;
  f.min_p_val = mp_val;
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

void dk_emu_sample(const void* x, int dtype, int64_t rows, int64_t V, int64_t row_stride, int is_probs, int order,
                   const float* T, float T_val, const int64_t* k, int64_t k_val, const float* p, float p_val,
                   const float* mp, float mp_val, const int64_t* indices, int64_t n_out, const int64_t* seeds,
                   uint64_t seed, uint64_t offset, int64_t* out_tokens, bool* out_valid, float* out_logprob,
                   double* workspace, int gumbel) {
  SampleArgs a;
  a.x = x;
  a.dtype = DType(dtype);
  a.rows = rows;
  a.V = V;
  a.row_stride = row_stride;
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
  if (gumbel)
    run<GumbelK>(a.dtype, unsigned(n_out), a);
  else
    run<SampleK>(a.dtype, unsigned(n_out), a);
}

void dk_emu_filter(const void* x, int dtype, int64_t rows, int64_t V, int64_t row_stride, int is_probs, int order,
                   const float* T, float T_val, const int64_t* k, int64_t k_val, const float* p, float p_val,
                   const float* mp, float mp_val, int kind, void* out, int64_t out_stride) {
  FilterArgs a;
  a.x = x;
  a.dtype = DType(dtype);
  a.rows = rows;
  a.V = V;
  a.row_stride = row_stride;
  a.filter = make_filter(is_probs, order, T, T_val, k, k_val, p, p_val, mp, mp_val);
  a.kind = FilterOut(kind);
  a.out = out;
  a.out_stride = out_stride;
  run<FilterK>(a.dtype, unsigned(rows), a);
}
}
