// C entry points that run csrc/cuda/pipeline.cuh's kernel under the CPU emulator (ctypes; host
// pointers stand in for device pointers).
#include "emu_runtime.h"
#include "cuda/pipeline.cuh"

using namespace dk::cuda;

template <class T>
struct PipeK {
  static void fn(PipeArgs a) { pdetail::pipeline_kernel<T>(a); }
};

extern "C" {
int64_t dk_emu_pipeline_ws_bytes(int64_t n_out, int64_t V, int64_t N) { return pipe_workspace_bytes(n_out, V, N); }

// ids: [bitmask, banned, bias_ids, bias_vals, prompt, output] pointers; dims: [words, n_banned,
// n_bias, n_prompt, n_output]; outs: [tokens, valid, logprob, rank, top_ids, top_lp, logits].
void dk_emu_pipeline(const void* x, int dtype, int64_t V, int64_t row_stride, const int64_t* indices, int64_t n_out,
                     const double* params, int order, void** ins, const int64_t* dims, const int64_t* seeds,
                     uint64_t seed, uint64_t offset, const int64_t* seed_ptr, const int64_t* offsets,
                     int64_t offset_stride, int32_t* error_flag, int32_t error_bit, int mode, int64_t top_n,
                     int raw_logprobs, int want_logprob, void** outs, void* workspace) {
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
  a.workspace = workspace;
  switch (a.dtype) {
    case PipeDType::F32: dkemu::launch(unsigned(n_out), kPipeThreads, PipeK<float>::fn, a); break;
    case PipeDType::BF16: dkemu::launch(unsigned(n_out), kPipeThreads, PipeK<dk::bf16_t>::fn, a); break;
    case PipeDType::F16: dkemu::launch(unsigned(n_out), kPipeThreads, PipeK<dk::f16_t>::fn, a); break;
  }
}
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
