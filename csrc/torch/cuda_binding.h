// Helpers of the CUDA bindings (csrc/cuda/*.cu): torch side, included only by CUDA translation units.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <atomic>
#include <cstdlib>
#include "torch/checks.h"

namespace dk::torchb {

inline void check_cuda(const at::Tensor& x, const char* name) {
  DK_CHECK(x.is_cuda(), name, " must be a CUDA tensor here (got a tensor on ", x.device(),
           "); all tensor arguments must be on the same device");
}

// The current CUDA stream of x's device (the ops launch there).
inline cudaStream_t stream_of(const at::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

// The device's SM count for the plans that spread small batches over the GPU (sampling.cuh
// split_plan / filter_plan, speculative.cuh prepare_plan): a device attribute
// (no device round trip), cached per device. (Not at::cuda::getDeviceProperties: its header,
// ATen/cuda/CUDAContext.h, includes cusparse.h / cublas headers that a plain nvcc install lacks.)
// DECODEKIT_SPLIT_ROWS=0 in the environment turns those plans off (one CTA per row, as before
// them): read per call, for benchmarks that compare both plans in one process.
inline int device_sms(const at::Tensor& x) {
  if (const char* e = std::getenv("DECODEKIT_SPLIT_ROWS"); e && e[0] == '0' && e[1] == '\0') return 0;
  static std::atomic<int> cache[64] = {};
  const int dev = x.device().index();
  if (dev < 0 || dev >= 64) return 0;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace dk::torchb
