// Tree attention: input checks, argument packing and the CPU impl (schema: csrc/torch/ops.cpp; no math here:
// the kernel is csrc/cpu/isa/attention.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include "cpu/attention_kernels.h"
#include "torch/attention_checks.h"

namespace dk::torchb {
namespace {

std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& tree_mask, const at::Tensor& prefix_lens,
                                                      std::optional<double> sm_scale, c10::string_view kv_layout) {
  AttnPrep p = prepare_tree_attention(q, k, v, tree_mask, prefix_lens, sm_scale, kv_layout);
  if (p.empty) return {p.out, p.lse};
  cpu::AttnArgs a;
  pack_tree_attention(a, p, sm_scale);
  const auto& tab = cpu::attn_active();
  at::parallel_for(0, p.s.B * p.s.Hkv, 1, [&](int64_t b, int64_t e) { tab.tree_attention(a, b, e); });
  finish_tree_attention(p);
  return {p.out, p.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) { m.impl("tree_attention", &tree_attention_cpu); }

}  // namespace dk::torchb
