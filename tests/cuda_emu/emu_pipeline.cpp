// C entry points that run csrc/cuda/pipeline.cuh's kernel under the CPU emulator (ctypes; host
// pointers stand in for device pointers).
#include "emu_runtime.h"
#include "cuda/pipeline.cuh"

using namespace dk::cuda;

#include <vector>

static std::vector<int64_t> g_start;  // dk_emu_pipeline_start_size

extern "C" {
// pipe_plan's CTAs per row for these sizes (no data is read).
int dk_emu_pipe_plan_splits(int64_t n_out, int64_t V, int n_sms, int64_t min_slice) {
  PipeArgs a;
  a.n_out = n_out;
  a.V = V;
  return pipe_plan(a, n_sms, min_slice).splits;
}

// ids: [bitmask, banned, bias_ids, bias_vals, prompt, output] pointers; dims: [words, n_banned,
// n_bias, n_prompt, n_output]; outs: [tokens, valid, logprob, rank, top_ids, top_lp, logits].
// Runs pipeline.cuh's launch plan (pipe_plan(n_sms, min_slice) + run_pipe_plan, the launches of
// launch_pipeline on a GPU) with a workspace of the plan's size filled with 0xFF bytes (NaN doubles
// and floats, -1 ids and counts: a phase that reads what no earlier phase wrote goes wrong).
// Returns the CTAs per row of the row passes.
int dk_emu_pipeline(const void* x, int dtype, int64_t V, int64_t row_stride, const int64_t* indices, int64_t n_out,
                    const double* params, int order, void** ins, const int64_t* dims, const int64_t* seeds,
                    uint64_t seed, uint64_t offset, const int64_t* seed_ptr, const int64_t* offsets,
                    int64_t offset_stride, int32_t* error_flag, int32_t error_bit, int mode, int64_t top_n,
                    int raw_logprobs, int want_logprob, void** outs, int n_sms, int64_t min_slice) {
  PipeArgs a;
  a.x = x;
  a.dtype = PipeDType(dtype);
  a.V = V;
  a.row_stride = row_stride;
  a.indices = indices;
  a.n_out = n_out;
  a.params = params;
  a.order = order;
  a.bitmask = static_cast<const int32_t*>(ins[0]);
  a.bitmask_words = dims[0];
  a.banned = static_cast<const int64_t*>(ins[1]);
  a.n_banned = dims[1];
  a.bias_ids = static_cast<const int64_t*>(ins[2]);
  a.bias_vals = static_cast<const float*>(ins[3]);
  a.n_bias = dims[2];
  a.prompt = static_cast<const int64_t*>(ins[4]);
  a.n_prompt = dims[3];
  a.output = static_cast<const int64_t*>(ins[5]);
  a.n_output = dims[4];
  a.seeds = seeds;
  a.seed = seed;
  a.offset = offset;
  a.seed_ptr = seed_ptr;
  a.offsets = offsets;
  a.offset_stride = offset_stride;
  a.error_flag = error_flag;
  a.error_bit = error_bit;
  a.mode = mode;
  a.top_n = top_n;
  a.raw_logprobs = raw_logprobs != 0;
  a.want_logprob = want_logprob != 0;
  a.out_tokens = static_cast<int64_t*>(outs[0]);
  a.out_valid = static_cast<bool*>(outs[1]);
  a.out_logprob = static_cast<float*>(outs[2]);
  a.out_rank = static_cast<int64_t*>(outs[3]);
  a.out_top_ids = static_cast<int64_t*>(outs[4]);
  a.out_top_lp = static_cast<float*>(outs[5]);
  a.out_logits = outs[6];
  a = pipe_plan(a, n_sms, min_slice);
  auto ws = dkemu::Guarded::bytes("dk_emu_pipeline: the workspace",
                                  size_t(pipe_workspace_bytes(n_out, V, pipe_list_entries(a), a.splits)), 0xFF);
  a.workspace = ws.data();
  {  // each row's regions fenced from one another (DK_WS_REDZONE)
    const PipeWs lay = pipe_ws_layout(V, pipe_list_entries(a), a.splits);
    static_assert(sizeof(PipeWs) % sizeof(int64_t) == 0, "PipeWs: int64 offsets");
    int64_t f[sizeof(PipeWs) / sizeof(int64_t)];
    std::memcpy(f, &lay, sizeof lay);
    std::vector<size_t> starts;
    for (int64_t o = 0; o < n_out; ++o)
      for (const int64_t off : f) starts.push_back(size_t(o * lay.row + off));  // (row: the next row's start)
    ws.fence_gaps(starts, size_t(n_out * lay.row), DK_WS_REDZONE);
  }
  const auto launch = [](auto kernel, unsigned grid, const PipeArgs& args) {
    dkemu::launch(grid, kPipeThreads, kernel, args);
  };
  switch (a.dtype) {
    case PipeDType::F32: pdetail::run_pipe_plan<float>(a, launch); break;
    case PipeDType::BF16: pdetail::run_pipe_plan<dk::bf16_t>(a, launch); break;
    case PipeDType::F16: pdetail::run_pipe_plan<dk::f16_t>(a, launch); break;
  }
  ws.check();
  // each row's start-list length (the collect phase's counts added over the slices; 0 where the
  // scan ran and no collect; -1 where no scan ran either (invalid values): the 0xFF fill is left)
  g_start.assign(size_t(n_out), -1);
  const PipeWs lay = pipe_ws_layout(V, pipe_list_entries(a), a.splits);
  for (int64_t o = 0; o < n_out; ++o) {
    const auto* counts = reinterpret_cast<const int64_t*>(ws.data<unsigned char>() + o * lay.row + lay.counts);
    int64_t n = 0;
    for (int s = 0; s < a.splits && n >= 0; ++s) n = counts[s] < 0 ? -1 : n + counts[s];
    g_start[size_t(o)] = n;
  }
  return a.splits;
}

// Row o's start-list length in the last dk_emu_pipeline call (0: none built; -1: row not scanned).
int64_t dk_emu_pipeline_start_size(int64_t o) { return g_start[size_t(o)]; }
}

template <class T>
struct MaskK {
  static void fn(BitmaskInplaceArgs a) { pdetail::bitmask_inplace_kernel<T>(a); }
};

extern "C" void dk_emu_bitmask_inplace(void* x, int dtype, int64_t row_stride, const int32_t* words,
                                       int64_t word_stride, int64_t tokens, const int64_t* indices, int64_t rows) {
  BitmaskInplaceArgs a;
  a.x = x;
  a.dtype = PipeDType(dtype);
  a.row_stride = row_stride;
  a.words = words;
  a.word_stride = word_stride;
  a.tokens = tokens;
  a.indices = indices;
  a.rows = rows;
  switch (a.dtype) {
    case PipeDType::F32: dkemu::launch(unsigned(rows), kPipeThreads, MaskK<float>::fn, a); break;
    case PipeDType::BF16: dkemu::launch(unsigned(rows), kPipeThreads, MaskK<dk::bf16_t>::fn, a); break;
    case PipeDType::F16: dkemu::launch(unsigned(rows), kPipeThreads, MaskK<dk::f16_t>::fn, a); break;
  }
}

// pipeline.cuh's block_top_p (the GPU's top-p cut on the list) on one block of the production
// size: the smallest value of v[0..n) whose strictly greater values weigh < P (weights w).
struct TopPArgs {
  const float *v, *w;
  int64_t n;
  double P;
  float* out;
};
static void top_p_fn(TopPArgs a) {
  __shared__ pdetail::PipeShared sh;
  const float t = pdetail::block_top_p(a.v, a.w, a.n, a.P, sh);
  if (threadIdx.x == 0) *a.out = t;
}
extern "C" float dk_emu_block_top_p(const float* v, const float* w, int64_t n, double P) {
  float t = 0.f;
  dkemu::launch(1u, kPipeThreads, top_p_fn, TopPArgs{v, w, n, P, &t});
  return t;
}

// pipeline.cuh's block_low_cut (typical's cut on the list) on one block of the production size:
// the largest score of sc[0..n) whose strictly smaller scores weigh < P (weights w, or 1 each when
// w is null).
struct LowCutArgs {
  const double* sc;
  const float* w;
  int64_t n;
  double P;
  double* out;
};
static void low_cut_fn(LowCutArgs a) {
  __shared__ pdetail::PipeShared sh;
  const double t = pdetail::block_low_cut(a.sc, a.w, a.n, a.P, sh);
  if (threadIdx.x == 0) *a.out = t;
}
extern "C" double dk_emu_block_low_cut(const double* sc, const float* w, int64_t n, double P) {
  double t = 0.0;
  dkemu::launch(1u, kPipeThreads, low_cut_fn, LowCutArgs{sc, w, n, P, &t});
  return t;
}
