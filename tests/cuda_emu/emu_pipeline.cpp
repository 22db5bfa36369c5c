// C entry points that run csrc/cuda/pipeline.cuh's kernels under the CPU emulator (ctypes; host
// pointers stand in for device pointers).
#include "emu_runtime.h"
#include "cuda/pipeline.cuh"

using namespace dk::cuda;

template <class T>
struct ProcK {
  static void fn(ProcessArgs a) { pdetail::process_kernel<T>(a); }
};

extern "C" {
void dk_emu_process(const void* x, int dtype, int64_t V, int64_t row_stride, const int64_t* indices, int64_t n_out,
                    const double* params, const int32_t* bitmask, int64_t words, const int64_t* banned,
                    int64_t n_banned, const int64_t* bias_ids, const float* bias_vals, int64_t n_bias,
                    const int64_t* prompt, int64_t n_prompt, const int64_t* output, int64_t n_output, void* out) {
  ProcessArgs a;
  a.x = x;
  a.dtype = PipeDType(dtype);
  a.V = V;
  a.row_stride = row_stride;
  a.indices = indices;
  a.n_out = n_out;
  a.params = params;
  a.bitmask = bitmask;
  a.bitmask_words = words;
  a.banned = banned;
  a.n_banned = n_banned;
  a.bias_ids = bias_ids;
  a.bias_vals = bias_vals;
  a.n_bias = n_bias;
  a.prompt = prompt;
  a.n_prompt = n_prompt;
  a.output = output;
  a.n_output = n_output;
  a.out = out;
  switch (a.dtype) {
    case PipeDType::F32: dkemu::launch(unsigned(n_out), kPipeThreads, ProcK<float>::fn, a); break;
    case PipeDType::BF16: dkemu::launch(unsigned(n_out), kPipeThreads, ProcK<dk::bf16_t>::fn, a); break;
    case PipeDType::F16: dkemu::launch(unsigned(n_out), kPipeThreads, ProcK<dk::f16_t>::fn, a); break;
  }
}
}
