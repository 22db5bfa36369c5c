// Compile check of the torch-free CUDA speculative kernels with plain nvcc (no torch):
//   nvcc -std=c++20 -arch=sm_80 -Icsrc/include -Icsrc -c tests/cuda/speculative_compile.cu -o /tmp/x.o
//   nvcc -std=c++20 -arch=sm_90 -Icsrc/include -Icsrc -c tests/cuda/speculative_compile.cu -o /tmp/x.o
#include "cuda/speculative.cuh"

cudaError_t dk_spec_compile_check(cudaStream_t s) {
  dk::cuda::spec::ChainArgs c;
  dk::cuda::spec::TreeArgs t;
  dk::cuda::spec::BuildArgs b;
  cudaError_t e = dk::cuda::spec::launch_chain(c, s);
  if (e == cudaSuccess) e = dk::cuda::spec::launch_tree(t, s);
  if (e == cudaSuccess) e = dk::cuda::spec::launch_build_tree(b, s);
  return e;
}
