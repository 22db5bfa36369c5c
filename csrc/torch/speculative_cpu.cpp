// Speculative verification: the CPU impls (schemas: csrc/torch/ops.cpp).
// Checks, allocation, argument packing and at::parallel_for over rows only; the math lives in
// csrc/cpu/isa/speculative.cpp and csrc/include/decodekit/speculative.h.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <string>
#include "cpu/spec_kernels.h"
#include "decodekit/speculative.h"
#include "torch/checks.h"
#include "torch/speculative_common.h"

namespace dk::torchb {
namespace {

template <class Fn>
void parallel_rows(int64_t n, Fn fn) {
  if (n == 0) return;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { fn(b, e); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_verify_cpu(
    const at::Tensor& target, const at::Tensor& draft_token_ids, const std::optional<at::Tensor>& draft_probs,
    const std::optional<at::Tensor>& num_draft_tokens, int64_t target_kind, const std::optional<at::Tensor>& T_arr,
    double T_val, const std::optional<at::Tensor>& k_arr, int64_t k_val, const std::optional<at::Tensor>& p_arr,
    double p_val, const std::optional<at::Tensor>& mp_arr, double mp_val, int64_t order,
    const std::optional<at::Tensor>& seed_arr, int64_t seed_val, int64_t offset,
    const std::optional<at::Tensor>& offset_arr) {
  spec::ChainSetup cs =
      spec::setup_chain(target, draft_token_ids, draft_probs, num_draft_tokens, target_kind, seed_arr, offset_arr);
  spec::FilterKeep keep;
  cpu::ChainArgs a;
  a.target = spec::make_target(target, target_kind);
  if (target_kind == 1)
    a.target.filter =
        spec::make_filter(keep, cs.B, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order, cs.bad_ptr());
  spec::ChainOut o = spec::chain_outputs(cs, draft_token_ids.options());
  if (cs.B > 0) {
    spec::pack_chain(a, cs, o, draft_probs, seed_val, offset);
    const auto& tab = cpu::spec_active();
    parallel_rows(cs.B, [&](int64_t b, int64_t e) { tab.chain_rows(a, b, e); });
    spec::finish_chain_rows(cs, o);
  }
  return {o.out_ids, o.accepted, o.emitted};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_cpu(
    const at::Tensor& candidates, const at::Tensor& retrive_index, const at::Tensor& retrive_next_token,
    const at::Tensor& retrive_next_sibling, const at::Tensor& target, const std::optional<at::Tensor>& draft_probs,
    int64_t W, int64_t target_kind, const std::optional<at::Tensor>& T_arr, double T_val,
    const std::optional<at::Tensor>& k_arr, int64_t k_val, const std::optional<at::Tensor>& p_arr, double p_val,
    const std::optional<at::Tensor>& mp_arr, double mp_val, int64_t order, const std::optional<at::Tensor>& seed_arr,
    int64_t seed_val, int64_t offset, const std::optional<at::Tensor>& coins,
    const std::optional<at::Tensor>& coins_final, double threshold_single, double threshold_acc,
    const std::optional<at::Tensor>& offset_arr) {
  spec::TreeSetup ts = spec::setup_tree(candidates, retrive_index, retrive_next_token, retrive_next_sibling, target,
                                        draft_probs, W, target_kind, seed_arr, offset_arr);
  spec::setup_coins(ts, candidates, coins, coins_final, threshold_single, threshold_acc, draft_probs);
  spec::FilterKeep keep;
  cpu::TreeArgs a;
  a.target = spec::make_target(target, target_kind);
  if (target_kind == 1)
    a.target.filter =
        spec::make_filter(keep, ts.B, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order, ts.bad_ptr());
  spec::TreeOut o = spec::tree_outputs(ts, W, candidates.options());
  if (ts.B > 0) {
    spec::pack_tree(a, ts, W, o, target_kind, target, draft_probs, seed_val, offset);
    const auto& tab = cpu::spec_active();
    parallel_rows(ts.B, [&](int64_t b, int64_t e) { tab.tree_rows(a, b, e); });
    if (ts.deferred)
      spec::finish_tree_rows(ts, o);
    else
      spec::raise_tree_errors(o.err, o.err_node, false);
  }
  return {o.predicts, o.accept_index, o.accept_num};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_tree_cpu(const at::Tensor& parents,
                                                                                      const at::Tensor& prefix_lens) {
  spec::BuildSetup bs = spec::setup_build(parents, prefix_lens);
  spec::BuildOut o = spec::build_outputs(bs, parents.options());
  if (bs.B > 0) {
    cpu::BuildTreeArgs a;
    spec::pack_build(a, bs, o);
    parallel_rows(bs.B, [&](int64_t b, int64_t e) { cpu::build_tree_rows(a, b, e); });
    if (bs.deferred)
      spec::finish_build_rows(bs, o);
    else
      spec::raise_tree_errors(o.err, o.err_node, true);
  }
  return {o.mask, o.positions, o.ri, o.nt, o.ns};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) {
  m.impl("chain_verify", &chain_verify_cpu);
  m.impl("tree_verify", &tree_verify_cpu);
  m.impl("build_tree", &build_tree_cpu);
}

}  // namespace dk::torchb
