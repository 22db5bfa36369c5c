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

std::tuple<at::Tensor, at::Tensor> tree_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, const at::Tensor& tree_mask,
                                                       const at::Tensor& prefix_lens, std::optional<double> sm_scale,
                                                       c10::string_view kv_layout) {
  AttnShape s = check_tree_attention(q_in, k_in, v_in, tree_mask, prefix_lens, kv_layout);
  if (sm_scale) DK_CHECK(std::isfinite(*sm_scale) && *sm_scale != 0.0, "sm_scale must be finite and nonzero, got ", *sm_scale);
  c10::cuda::CUDAGuard guard(q_in.device());
  auto out = at::empty({s.B, s.T, s.Hq, s.D}, q_in.options());
  auto lse = at::empty({s.B, s.T, s.Hq}, q_in.options().dtype(at::kFloat));
  auto plens = prefix_lens.to(at::kLong).contiguous();
  check_prefix_lens_values(plens, s);
  if (s.B == 0 || s.T == 0 || s.Hq == 0) return {out, lse};
  auto q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  auto k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  auto v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  auto mask = tree_mask.contiguous();
  dk::cuda_attn::Params p;
  p.B = s.B; p.T = s.T; p.Hq = s.Hq; p.Hkv = s.Hkv; p.D = s.D; p.S = s.S;
  const int sd = s.hnd ? 2 : 1, hd = s.hnd ? 1 : 2;
  p.q = q.data_ptr(); p.q_sb = q.stride(0); p.q_st = q.stride(1); p.q_sh = q.stride(2);
  p.k = k.data_ptr(); p.k_sb = k.stride(0); p.k_ss = k.stride(sd); p.k_sh = k.stride(hd);
  p.v = v.data_ptr(); p.v_sb = v.stride(0); p.v_ss = v.stride(sd); p.v_sh = v.stride(hd);
  p.mask = static_cast<const uint8_t*>(mask.data_ptr());
  p.mask_packed = s.packed;
  p.mask_sb = mask.stride(0); p.mask_st = mask.stride(1);
  p.prefix_lens = plens.data_ptr<int64_t>();
  p.sm_scale = float(sm_scale ? *sm_scale : 1.0 / std::sqrt(double(s.D)));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const int dtype = int(float_dtype(q, "q"));
  cudaError_t e = dk::cuda_attn::launch_tree_attention(p, dtype, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == cudaSuccess, "tree_attention CUDA launch failed: ", cudaGetErrorString(e));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) { m.impl("tree_attention", &tree_attention_cuda); }

}  // namespace dk::torchb
