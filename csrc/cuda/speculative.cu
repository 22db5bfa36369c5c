// CUDA implementations of the speculative ops: the checks of csrc/torch/speculative_common.h (shared
// with the CPU binding), workspace allocation, argument packing, one launch on the current stream.
// No math here; the kernels live in csrc/cuda/speculative.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include "cuda/speculative.cuh"
#include "torch/cuda_binding.h"
#include "torch/speculative_common.h"

namespace dk::torchb {
namespace {

namespace cs = dk::cuda::spec;

static_assert(int(cpu::DType::F32) == int(cs::DType::F32) && int(cpu::DType::BF16) == int(cs::DType::BF16) &&
                  int(cpu::DType::F16) == int(cs::DType::F16),
              "dtype codes shared by the CPU and CUDA kernels");

// The logits form's filters (temperature, top-k, top-p, min-p, order), checked sync-free by the
// sampling family's pack_filter: scalar values on the host, per-row tensors on the device (a bad
// value makes a bad row, checks.h / deferred_checks.h). Probability / id targets take none.
cs::Target cuda_target(const at::Tensor& target, int64_t kind, int64_t B, FilterPack& keep, RowBad& bad,
                       const std::optional<at::Tensor>& T_arr, double T_val, const std::optional<at::Tensor>& k_arr,
                       int64_t k_val, const std::optional<at::Tensor>& p_arr, double p_val,
                       const std::optional<at::Tensor>& mp_arr, double mp_val, int64_t order) {
  cs::Target t;
  t.kind = cs::Kind(kind);
  if (kind == 2) return t;
  cpu::SpecTarget ct = spec::make_target(target, kind);
  t.data = ct.data;
  t.dtype = cs::DType(int(ct.dtype));
  t.V = ct.V;
  t.stride_b = ct.stride_b;
  t.stride_r = ct.stride_r;
  if (kind != 1) return t;
  keep = pack_filter(target, B, false, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order, &bad);
  t.filter = row_filter(keep);
  return t;
}

struct CudaWs {
  at::Tensor lanes, resid, removed, seen, stack, list_idx, list_w, pre_sums, pre_idx, pre_w, pre_split;
};

// With prepared nodes: their split plan over several blocks per node when the nodes are fewer than
// the SMs (speculative.cuh node_plan; host arithmetic on sizes) and its workspace.
void plan_nodes(CudaWs& keep, cs::Workspace& w, const cs::Target& t, int64_t B, int64_t n_sms,
                const at::TensorOptions& opts) {
  if (!w.pre.sums) return;
  w.pre.split = cs::node_plan(t, B, w.pre.R, n_sms);
  if (w.pre.split.splits <= 1) return;
  keep.pre_split = at::empty({cuda::sample_workspace_elems(w.pre.split)}, opts.dtype(at::kDouble));
  w.pre.split.a.workspace = keep.pre_split.data_ptr<double>();
}

// pre_R > 0: the launch prepares its R nodes per row ahead of the walk (speculative.cuh
// prepare_plan): their summaries and survivor lists.
cs::Workspace make_ws(CudaWs& keep, const at::TensorOptions& opts, int64_t B, int64_t V, int64_t T, bool resid,
                      bool logits, int64_t pre_R = 0) {
  cs::Workspace w;
  w.lanes_per_row = cs::lanes_per_row(std::max<int64_t>(V, 1));
  keep.lanes = at::empty({B, w.lanes_per_row}, opts.dtype(at::kDouble));
  w.lanes = keep.lanes.data_ptr<double>();
  w.removed_per_row = std::max<int64_t>(T, 1);
  keep.removed = at::empty({B, w.removed_per_row}, opts.dtype(at::kLong));
  w.removed = keep.removed.data_ptr<int64_t>();
  if (resid) {
    w.resid_per_row = cs::resid_per_row(V);
    keep.resid = at::empty({B, w.resid_per_row}, opts.dtype(at::kFloat));
    w.resid = keep.resid.data_ptr<float>();
  }
  if (logits) {  // a listed survivor set per row (the filtered node target)
    w.list_per_row = cs::list_per_row(V);
    keep.list_idx = at::empty({B, w.list_per_row}, opts.dtype(at::kInt));
    keep.list_w = at::empty({B, w.list_per_row}, opts.dtype(at::kFloat));
    w.list_idx = keep.list_idx.data_ptr<int32_t>();
    w.list_w = keep.list_w.data_ptr<float>();
  }
  if (pre_R > 0) {
    cs::Prepared& p = w.pre;
    p.R = pre_R;
    keep.pre_sums = at::empty({B * pre_R * int64_t(sizeof(cs::NodeSum))}, opts.dtype(at::kByte));
    p.sums = reinterpret_cast<cs::NodeSum*>(keep.pre_sums.data_ptr<uint8_t>());
    if (logits) {
      p.list_per_node = cs::list_per_row(V);
      keep.pre_idx = at::empty({B * pre_R, p.list_per_node}, opts.dtype(at::kInt));
      keep.pre_w = at::empty({B * pre_R, p.list_per_node}, opts.dtype(at::kFloat));
      p.list_idx = keep.pre_idx.data_ptr<int32_t>();
      p.list_w = keep.pre_w.data_ptr<float>();
    }
  }
  if (T > 0) {
    w.tree_per_row = T;
    keep.seen = at::empty({B, T}, opts.dtype(at::kByte));
    keep.stack = at::empty({B, T}, opts.dtype(at::kLong));
    w.seen = keep.seen.data_ptr<uint8_t>();
    w.stack = keep.stack.data_ptr<int64_t>();
  }
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_verify_cuda(
    const at::Tensor& target, const at::Tensor& draft_token_ids, const std::optional<at::Tensor>& draft_probs,
    const std::optional<at::Tensor>& num_draft_tokens, int64_t target_kind, const std::optional<at::Tensor>& T_arr,
    double T_val, const std::optional<at::Tensor>& k_arr, int64_t k_val, const std::optional<at::Tensor>& p_arr,
    double p_val, const std::optional<at::Tensor>& mp_arr, double mp_val, int64_t order,
    const std::optional<at::Tensor>& seed_arr, int64_t seed_val, int64_t offset,
    const std::optional<at::Tensor>& offset_arr) {
  check_cuda(draft_token_ids, "draft_token_ids");
  c10::cuda::CUDAGuard guard(draft_token_ids.device());
  spec::ChainSetup s =
      spec::setup_chain(target, draft_token_ids, draft_probs, num_draft_tokens, target_kind, seed_arr, offset_arr);
  DK_CHECK(order == 0 || order == 1, "filter order must be 0 (sequential) or 1 (joint), got ", order);
  FilterPack keepF;
  cs::ChainArgs a;
  a.target = cuda_target(target, target_kind, s.B, keepF, s.bad, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr,
                         mp_val, order);
  const auto opts = draft_token_ids.options();
  spec::ChainOut o = spec::chain_outputs(s, opts);
  if (s.B == 0) return {o.out_ids, o.accepted, o.emitted};
  CudaWs keep;
  const int64_t n_sms = device_sms(draft_token_ids);
  const bool pre = cs::prepare_plan(a.target.kind, s.B, s.N + 1, n_sms, true);
  a.ws = make_ws(keep, opts, s.B, s.V, 0, false, target_kind == 1, pre ? s.N + 1 : 0);
  plan_nodes(keep, a.ws, a.target, s.B, n_sms, opts);
  spec::pack_chain(a, s, o, draft_probs, seed_val, offset);
  C10_CUDA_CHECK(cs::launch_chain(a, stream_of(draft_token_ids)));
  spec::finish_chain_rows(s, o);
  return {o.out_ids, o.accepted, o.emitted};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_cuda(
    const at::Tensor& candidates, const at::Tensor& retrive_index, const at::Tensor& retrive_next_token,
    const at::Tensor& retrive_next_sibling, const at::Tensor& target, const std::optional<at::Tensor>& draft_probs,
    int64_t W, int64_t target_kind, const std::optional<at::Tensor>& T_arr, double T_val,
    const std::optional<at::Tensor>& k_arr, int64_t k_val, const std::optional<at::Tensor>& p_arr, double p_val,
    const std::optional<at::Tensor>& mp_arr, double mp_val, int64_t order, const std::optional<at::Tensor>& seed_arr,
    int64_t seed_val, int64_t offset, const std::optional<at::Tensor>& coins,
    const std::optional<at::Tensor>& coins_final, double threshold_single, double threshold_acc,
    const std::optional<at::Tensor>& offset_arr) {
  check_cuda(candidates, "candidates");
  c10::cuda::CUDAGuard guard(candidates.device());
  spec::TreeSetup s = spec::setup_tree(candidates, retrive_index, retrive_next_token, retrive_next_sibling, target,
                                       draft_probs, W, target_kind, seed_arr, offset_arr);
  spec::setup_coins(s, candidates, coins, coins_final, threshold_single, threshold_acc, draft_probs);
  DK_CHECK(order == 0 || order == 1, "filter order must be 0 (sequential) or 1 (joint), got ", order);
  FilterPack keepF;
  cs::TreeArgs a;
  a.target = cuda_target(target, target_kind, s.B, keepF, s.bad, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr,
                         mp_val, order);
  const auto opts = candidates.options();
  spec::TreeOut o = spec::tree_outputs(s, W, opts);
  if (s.B == 0) return {o.predicts, o.accept_index, o.accept_num};
  CudaWs keep;
  const int64_t n_sms = device_sms(candidates);
  const bool pre = cs::prepare_plan(a.target.kind, s.B, s.T, n_sms, false);
  a.ws = make_ws(keep, opts, s.B, s.V, s.T, draft_probs.has_value(), target_kind == 1, pre ? s.T : 0);
  plan_nodes(keep, a.ws, a.target, s.B, n_sms, opts);
  spec::pack_tree(a, s, W, o, target_kind, target, draft_probs, seed_val, offset);
  C10_CUDA_CHECK(cs::launch_tree(a, stream_of(candidates)));
  spec::finish_tree_rows(s, o);
  return {o.predicts, o.accept_index, o.accept_num};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_tree_cuda(const at::Tensor& parents,
                                                                                       const at::Tensor& prefix_lens) {
  check_cuda(parents, "parents");
  c10::cuda::CUDAGuard guard(parents.device());
  spec::BuildSetup s = spec::setup_build(parents, prefix_lens);
  spec::BuildOut o = spec::build_outputs(s, parents.options());
  if (s.B > 0) {
    cs::BuildArgs a;
    spec::pack_build(a, s, o);
    C10_CUDA_CHECK(cs::launch_build_tree(a, stream_of(parents)));
    spec::finish_build_rows(s, o);
  }
  return {o.mask, o.positions, o.ri, o.nt, o.ns};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) {
  m.impl("chain_verify", &chain_verify_cuda);
  m.impl("tree_verify", &tree_verify_cuda);
  m.impl("build_tree", &build_tree_cuda);
}

}  // namespace dk::torchb
