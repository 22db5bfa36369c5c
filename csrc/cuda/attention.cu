// CUDA impl of decodekit::tree_attention: checks, allocation, argument packing, launch.
// The kernel is csrc/cuda/attention.cuh (torch-free).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cmath>
#include "cuda/attention.cuh"
#include "torch/attention_checks.h"

namespace dk::torchb {
namespace {

std::tuple<at::Tensor, at::Tensor> tree_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& tree_mask, const at::Tensor& prefix_lens,
                                                       std::optional<double> sm_scale, c10::string_view kv_layout) {
  DK_CHECK(q.is_cuda(), "q must be a CUDA tensor here, got a tensor on ", q.device());
  c10::cuda::CUDAGuard guard(q.device());
  AttnPrep p = prepare_tree_attention(q, k, v, tree_mask, prefix_lens, sm_scale, kv_layout);
  if (p.empty) return {p.out, p.lse};
  cuda::TreeAttnArgs a;
  pack_tree_attention(a, p, sm_scale);
  cudaError_t e = cuda::launch_tree_attention(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == cudaSuccess, "tree_attention CUDA launch failed: ", cudaGetErrorString(e));
  finish_tree_attention(p);
  return {p.out, p.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) { m.impl("tree_attention", &tree_attention_cuda); }

}  // namespace dk::torchb
