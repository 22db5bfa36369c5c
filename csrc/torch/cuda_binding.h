// Helpers of the CUDA bindings (csrc/cuda/*.cu): torch side, included only by CUDA translation units.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
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

}  // namespace dk::torchb
