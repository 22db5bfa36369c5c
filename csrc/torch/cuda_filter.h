// The CUDA kernels' view of checked filter parameters (dk::cuda::RowFilterArgs, sampling.cuh):
// pointers into a FilterPack's tensors (checks.h), shared by the CUDA bindings of the sampling
// family (csrc/cuda/sampling.cu) and of speculative verification (csrc/cuda/speculative.cu).
// Included by .cu translation units only.
#pragma once
#include "cuda/sampling.cuh"
#include "torch/checks.h"

namespace dk::torchb {

inline cuda::RowFilterArgs cuda_filter(const FilterPack& fp) {
  cuda::RowFilterArgs f;
  f.is_probs = fp.is_probs;
  f.order = int(fp.order);
  f.temperature = fp.T_ptr();
  f.temperature_val = fp.T_val;
  f.top_k = fp.k_ptr();
  f.top_k_val = fp.k_val;
  f.top_p = fp.p_ptr();
  f.top_p_val = fp.p_val;
  f.min_p = fp.mp_ptr();
  f.min_p_val = fp.mp_val;
  return f;
}

}  // namespace dk::torchb
