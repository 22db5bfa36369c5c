// CUDA impl of decodekit::tree_attention: checks, allocation, argument packing, launch.
// The kernels are csrc/cuda/attention_mma.cuh (tensor cores: bf16 / fp16, D = 64 / 128 / 256) and
// csrc/cuda/attention.cuh (CUDA cores: the rest), both torch-free.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cmath>
#include "cuda/attention_mma.cuh"
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
  cuda::MmaAttnArgs a;
  pack_tree_attention(a, p, sm_scale);
  at::Tensor part_o, part_lse;  // split-KV partial states, freed (stream-ordered) on return
  if (cuda::tree_attention_mma_ok(a)) {
    cuda::attn_mma::plan(a);
    if (a.splits > 1) {
      const int64_t R = a.B * a.T * a.Hq;
      part_o = at::empty({a.splits, R, a.D}, q.options().dtype(at::kFloat));
      part_lse = at::empty({a.splits, R}, q.options().dtype(at::kFloat));
      a.part_o = part_o.data_ptr<float>();
      a.part_lse = part_lse.data_ptr<float>();
    }
  }
  cudaError_t e = cuda::launch_tree_attention_auto(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == cudaSuccess, "tree_attention CUDA launch failed: ", cudaGetErrorString(e));
  finish_tree_attention(p);
  return {p.out, p.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) { m.impl("tree_attention", &tree_attention_cuda); }

}  // namespace dk::torchb
