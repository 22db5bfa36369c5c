// C entry points that run csrc/cuda/sampling.cuh's kernels under the CPU emulator
// (tests/cuda_emu/emu.py loads this as a shared library through ctypes for tests/test_ops_sampling.py;
// host pointers stand in for device pointers).
#include "emu_runtime.h"
#include "cuda/sampling.cuh"
#include "emu_sample_ws.h"

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
// split_plan's CTAs per row for a launch of n_out rows of V elements with scalar top-k k and top-p p
// (no data is read: the plan depends on the sizes and the scalar arguments only).
int dk_emu_plan_splits(int64_t n_out, int64_t V, int n_sms, int64_t k, float p, int gumbel) {
  SampleArgs a;
  a.in = Matrix{nullptr, DType::F32, n_out, V, V};
  a.n_out = n_out;
  a.filter.top_k = {nullptr, k};
  a.filter.top_p = {nullptr, p};
  return split_plan(a, n_sms, gumbel != 0).splits;
}

// Runs sampling.cuh's launch plan (split_plan + run_sample_plan, the sequence launch_sample runs on
// a GPU) with a NaN-filled workspace of the plan's size. Returns the number of CTAs per row that ran
// (n_sms > 0: the plan of a device with that many SMs).
int dk_emu_sample(const void* x, int dtype, int64_t rows, int64_t V, int64_t row_stride, int is_probs, int order,
                  const float* T, float T_val, const int64_t* k, int64_t k_val, const float* p, float p_val,
                  const float* mp, float mp_val, const int64_t* indices, int64_t n_out, const int64_t* seeds,
                  uint64_t seed, uint64_t offset, int64_t* out_tokens, bool* out_valid, float* out_logprob, int gumbel,
                  int n_sms) {
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
  SplitArgs sa = split_plan(a, n_sms, gumbel != 0);
  auto ws = dkemu::Guarded::of("dk_emu_sample: the workspace", size_t(sample_workspace_elems(sa)), std::nan(""));
  sa.a.workspace = ws.data<double>();
  dkemu::fence_sample_ws(ws, sa);
  run_sample_plan(sa,
                  [](auto kernel, unsigned grid, const auto& args) { dkemu::launch(grid, kThreads, kernel, args); });
  ws.check();
  return sa.splits;
}

int dk_emu_filter(const void* x, int dtype, int64_t rows, int64_t V, int64_t row_stride, int is_probs, int order,
                  const float* T, float T_val, const int64_t* k, int64_t k_val, const float* p, float p_val,
                  const float* mp, float mp_val, int kind, void* out, int64_t out_stride, int n_sms) {
  FilterArgs a;
  a.in = Matrix{x, DType(dtype), rows, V, row_stride};
  a.filter = make_filter(is_probs, order, T, T_val, k, k_val, p, p_val, mp, mp_val);
  a.kind = FilterOut(kind);
  a.out = out;
  a.out_stride = out_stride;
  // sampling.cuh's launch_filter: filter_plan + run_filter_plan
  SplitFilterArgs f = filter_plan(a, n_sms);
  auto ws = dkemu::Guarded::of("dk_emu_filter: the workspace", size_t(sample_workspace_elems(f.sa)), std::nan(""));
  f.sa.a.workspace = ws.data<double>();
  dkemu::fence_sample_ws(ws, f.sa);
  run_filter_plan(f, [](auto kernel, unsigned grid, const auto& args) { dkemu::launch(grid, kThreads, kernel, args); });
  ws.check();
  return f.sa.splits;
}
}
