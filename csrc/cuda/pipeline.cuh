// CUDA kernels of the whole sampling step (issue 11), first part: the processing of a row
// (grammar bitmask, bans, logit bias, repetition / frequency / presence penalties), i.e. what
// decodekit.apply_penalties returns, and xgrammar's apply_token_bitmask_inplace. Torch-free:
// compiles with plain nvcc (.ci/cuda_compile.sh); tests/cuda_emu runs it on CPU threads.
//
// Contract: the same processed logits as the CPU kernel (csrc/cpu/pipeline.h) bit for bit. Every
// per-element step is the shared DK_HOST_DEVICE code of decodekit/pipeline.h, in the same order:
// the CPU applies the sparse steps step by step over the lists, which for one token is the
// sequence ban -> its bias entries in list order -> the repetition penalty once -> the count
// penalties, and tokens never interact; here one thread owns each distinct touched token and runs
// that sequence for it (O(N^2 / threads) per row for N list entries, no shared state).
//
// Not here yet: the truncations (top-n-sigma, top-k, ..., top-h), the draw and the logprobs of the
// pipeline op on CUDA.
#pragma once
#if !defined(DK_CUDA_EMULATE)
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include <cstdint>
#include "decodekit/common.h"
#include "decodekit/pipeline.h"

#if defined(__CUDACC__)
#define DK_PIPE_FN __device__ __forceinline__
#else
#define DK_PIPE_FN inline
#endif

namespace dk::cuda {

#ifndef DK_PIPE_THREADS
#define DK_PIPE_THREADS 256
#endif
constexpr unsigned kPipeThreads = DK_PIPE_THREADS;

enum class PipeDType : int { F32 = 0, BF16 = 1, F16 = 2 };  // = dk::cpu::DType

struct ProcessArgs {
  const void* x = nullptr;
  PipeDType dtype = PipeDType::F32;
  int64_t V = 0, row_stride = 0;
  const int64_t* indices = nullptr;  // output row o reads x[indices[o]]
  int64_t n_out = 0;
  const double* params = nullptr;    // [n_out, kPipeParams]
  const int32_t* bitmask = nullptr;  // [n_out, words]
  int64_t bitmask_words = 0;
  const int64_t* banned = nullptr;
  int64_t n_banned = 0;
  const int64_t* bias_ids = nullptr;
  const float* bias_vals = nullptr;
  int64_t n_bias = 0;
  const int64_t* prompt = nullptr;
  int64_t n_prompt = 0;
  const int64_t* output = nullptr;
  int64_t n_output = 0;
  void* out = nullptr;  // [n_out, V], dtype of x
};

struct BitmaskInplaceArgs {
  void* x = nullptr;
  PipeDType dtype = PipeDType::F32;
  int64_t row_stride = 0;
  const int32_t* words = nullptr;
  int64_t word_stride = 0;
  int64_t tokens = 0;
  const int64_t* indices = nullptr;
  int64_t rows = 0;
};

namespace pdetail {

template <class T>
DK_PIPE_FN void store(T* p, float v);
template <>
DK_PIPE_FN void store<float>(float* p, float v) {
  *p = v;
}
template <>
DK_PIPE_FN void store<bf16_t>(bf16_t* p, float v) {
  p->x = dk::bf16_bits(v);
}
template <>
DK_PIPE_FN void store<f16_t>(f16_t* p, float v) {  // round to nearest even, as the CPU
#if defined(__CUDACC__)
  p->x = __half_as_ushort(__float2half_rn(v));
#else
  const _Float16 h = static_cast<_Float16>(v);
  __builtin_memcpy(&p->x, &h, 2);
#endif
}

// Entry p of the concatenated id lists [banned | bias ids | prompt | output] of row o.
DK_PIPE_FN int64_t list_id(const ProcessArgs& a, int64_t o, int64_t p) {
  if (p < a.n_banned) return a.banned[o * a.n_banned + p];
  p -= a.n_banned;
  if (p < a.n_bias) return a.bias_ids[o * a.n_bias + p];
  p -= a.n_bias;
  if (p < a.n_prompt) return a.prompt[o * a.n_prompt + p];
  p -= a.n_prompt;
  return a.output[o * a.n_output + p];
}

template <class T>
DK_PIPE_FN void process_row(const ProcessArgs& a, int64_t o, unsigned tid, unsigned nthreads) {
  const int64_t V = a.V;
  const int64_t src = a.indices ? a.indices[o] : o;
  const T* x = static_cast<const T*>(a.x) + src * a.row_stride;
  T* out = static_cast<T*>(a.out) + o * V;
  const int32_t* bm = a.bitmask ? a.bitmask + o * a.bitmask_words : nullptr;
  const int64_t bm_tokens = bm ? (V < 32 * a.bitmask_words ? V : 32 * a.bitmask_words) : 0;
  const double* q = a.params + o * kPipeParams;
  const float rep = float(q[kPRep]), freq = float(q[kPFreq]), pres = float(q[kPPres]);
  auto base = [&](int64_t t) {
    return (bm && t < bm_tokens && !bitmask_allows(bm, t)) ? -__builtin_huge_valf() : to_float(x[t]);
  };
  // a row with NaN or +inf passes through unchanged (as the CPU's mask mode)
  __shared__ int bad;
  if (tid == 0) bad = 0;
  __syncthreads();
  for (int64_t i = tid; i < V; i += nthreads) {
    const float v = to_float(x[i]);
    if (v != v || v == __builtin_huge_valf()) bad = 1;
  }
  __syncthreads();
  if (bad) {
    for (int64_t i = tid; i < V; i += nthreads) out[i] = x[i];
    return;
  }
  for (int64_t i = tid; i < V; i += nthreads) store(out + i, base(i));
  __syncthreads();
  const int64_t N = a.n_banned + a.n_bias + a.n_prompt + a.n_output;
  const bool rep_on = rep != 1.f, cnt_on = freq != 0.f || pres != 0.f;
  for (int64_t p = tid; p < N; p += nthreads) {
    const int64_t t = list_id(a, o, p);
    if (t < 0) continue;
    bool first = true;  // the thread of the first entry naming t owns t
    for (int64_t r = 0; r < p && first; ++r) first = list_id(a, o, r) != t;
    if (!first) continue;
    float v = base(t);
    bool changed = false;
    for (int64_t j = 0; j < a.n_banned; ++j)
      if (a.banned[o * a.n_banned + j] == t) {
        v = -__builtin_huge_valf();
        changed = true;
      }
    for (int64_t j = 0; j < a.n_bias; ++j)
      if (a.bias_ids[o * a.n_bias + j] == t) {
        v = v + a.bias_vals[o * a.n_bias + j];
        changed = true;
      }
    bool seen = false;
    uint32_t c = 0;
    for (int64_t j = 0; j < a.n_prompt; ++j) seen |= a.prompt[o * a.n_prompt + j] == t;
    for (int64_t j = 0; j < a.n_output; ++j) c += a.output[o * a.n_output + j] == t;
    if (rep_on && (seen || c > 0)) {
      v = repetition_apply(v, rep);
      changed = true;
    }
    if (cnt_on && c > 0) {
      v = count_penalty_apply(v, freq, pres, c);
      changed = true;
    }
    if (changed) store(out + t, v);
  }
}

template <class T>
__global__ void __launch_bounds__(kPipeThreads) process_kernel(ProcessArgs a) {
  process_row<T>(a, int64_t(blockIdx.x), threadIdx.x, kPipeThreads);
}

template <class T>
__global__ void __launch_bounds__(kPipeThreads) bitmask_inplace_kernel(BitmaskInplaceArgs a) {
  const int64_t j = blockIdx.x;
  const int64_t r = a.indices ? a.indices[j] : j;
  T* x = static_cast<T*>(a.x) + r * a.row_stride;
  const int32_t* w = a.words + r * a.word_stride;
  for (int64_t i = threadIdx.x; i < a.tokens; i += kPipeThreads)
    if (!bitmask_allows(w, i)) store(x + i, -__builtin_huge_valf());
}

}  // namespace pdetail

#if !defined(DK_CUDA_EMULATE)
inline cudaError_t launch_process(const ProcessArgs& a, cudaStream_t stream) {
  if (a.n_out == 0) return cudaSuccess;
  const dim3 grid(unsigned(a.n_out)), block(kPipeThreads);
  switch (a.dtype) {
    case PipeDType::F32: pdetail::process_kernel<float><<<grid, block, 0, stream>>>(a); break;
    case PipeDType::BF16: pdetail::process_kernel<bf16_t><<<grid, block, 0, stream>>>(a); break;
    case PipeDType::F16: pdetail::process_kernel<f16_t><<<grid, block, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

inline cudaError_t launch_bitmask_inplace(const BitmaskInplaceArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const dim3 grid(unsigned(a.rows)), block(kPipeThreads);
  switch (a.dtype) {
    case PipeDType::F32: pdetail::bitmask_inplace_kernel<float><<<grid, block, 0, stream>>>(a); break;
    case PipeDType::BF16: pdetail::bitmask_inplace_kernel<bf16_t><<<grid, block, 0, stream>>>(a); break;
    case PipeDType::F16: pdetail::bitmask_inplace_kernel<f16_t><<<grid, block, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

// Odr-uses every launcher of this header (.ci/cuda_compile.sh compiles all instantiations).
inline void instantiate_pipeline() {
  ProcessArgs p;
  BitmaskInplaceArgs b;
  (void)launch_process(p, nullptr);
  (void)launch_bitmask_inplace(b, nullptr);
}
#endif

}  // namespace dk::cuda
