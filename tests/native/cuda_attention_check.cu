// Torch-free compile check of csrc/cuda/attention.cuh (run by .ci/cuda_compile.sh with plain nvcc
// for sm_80 and sm_90): instantiates the three dtype kernels through the launcher.
#include "cuda/attention.cuh"

cudaError_t dk_check_tree_attention(const dk::cuda_attn::Params& p, int dtype) {
  return dk::cuda_attn::launch_tree_attention(p, dtype, nullptr);
}
