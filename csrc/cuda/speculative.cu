// CUDA implementations of the speculative ops: the checks of csrc/torch/speculative_common.h (shared
// with the CPU binding), workspace allocation, argument packing, one launch on the current stream.
// No math here; the kernels live in csrc/cuda/speculative.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include "cuda/speculative.cuh"
#include "torch/speculative_common.h"

namespace dk::torchb {
namespace {

namespace cs = dk::cuda::spec;

static_assert(int(cpu::DType::F32) == int(cs::DType::F32) && int(cpu::DType::BF16) == int(cs::DType::BF16) &&
                  int(cpu::DType::F16) == int(cs::DType::F16),
              "dtype codes shared by the CPU and CUDA kernels");

void check_cuda(const at::Tensor& x, const char* name) {
  DK_CHECK(x.is_cuda(), name, " must be a CUDA tensor here (got a tensor on ", x.device(),
           "); all tensor arguments must be on the same device");
}

// The logits form on CUDA: temperature (0 = greedy) only; top-k / top-p / min-p must be disabled.
struct CudaTemp {
  std::optional<at::Tensor> T;
};

// Sync-free: scalar filter values are host values (checked here); per-row tensors are checked on
// the device, a row with top_k / top_p / min_p enabled (or a bad temperature) being a bad row.
cs::Target cuda_target(const at::Tensor& target, int64_t kind, int64_t B, CudaTemp& keep, RowBad& bad,
                       const std::optional<at::Tensor>& T_arr, double T_val, const std::optional<at::Tensor>& k_arr,
                       int64_t k_val, const std::optional<at::Tensor>& p_arr, double p_val,
                       const std::optional<at::Tensor>& mp_arr, double mp_val) {
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
  const int64_t V = t.V;
  const bool k_on = !k_arr && k_val >= 1 && k_val < V;
  const bool p_on = !p_arr && p_val < 1.0;
  const bool mp_on = !mp_arr && mp_val > 0.0;
  DK_CHECK(!k_on && !p_on && !mp_on,
           "top_k / top_p / min_p in the logits form of speculative verification run on the CPU only for now; on "
           "CUDA pass target probabilities (filtered with top_k_renorm_probs / top_p_renorm_probs / ...) or "
           "temperature alone");
  const std::pair<const std::optional<at::Tensor>*, const char*> per_row[] = {
      {&k_arr, "top_k"}, {&p_arr, "top_p"}, {&mp_arr, "min_p"}};
  for (const auto& pr : per_row) {
    if (!*pr.first) continue;
    check_cuda(**pr.first, pr.second);
    const at::Tensor& v = row_shape(**pr.first, B, pr.second);
    // enabled (NaN counts as enabled): k in [1, V); p < 1 or NaN; min_p > 0 or NaN
    at::Tensor on = pr.first == &k_arr   ? v.ge(1).logical_and(v.lt(V))
                    : pr.first == &p_arr ? v.ge(1).logical_not()
                                         : v.le(0).logical_not();
    bad.add(on, kErrSpecFilters);
  }
  if (T_arr) {
    check_cuda(*T_arr, "temperature");
    keep.T = deferred_temperature(row_shape(*T_arr, B, "temperature"), bad, true);
    t.temperature = keep.T->data_ptr<float>();
  } else {
    check_temperature(T_val);
    t.temperature_val = float(T_val);
  }
  return t;
}

struct CudaWs {
  at::Tensor lanes, resid, removed, seen, stack;
};

cs::Workspace make_ws(CudaWs& keep, const at::TensorOptions& opts, int64_t B, int64_t V, int64_t T, bool resid) {
  cs::Workspace w;
  w.lanes_per_row = cs::lanes_per_row(std::max<int64_t>(V, 1));
  keep.lanes = at::empty({B, w.lanes_per_row}, opts.dtype(at::kDouble));
  w.lanes = keep.lanes.data_ptr<double>();
  w.removed_per_row = std::max<int64_t>(T, 1);
  keep.removed = at::empty({B, w.removed_per_row}, opts.dtype(at::kLong));
  w.removed = keep.removed.data_ptr<int64_t>();
  if (resid) {
    w.resid_per_row = (V + 15) / 16 * 16;
    keep.resid = at::empty({B, w.resid_per_row}, opts.dtype(at::kFloat));
    w.resid = keep.resid.data_ptr<float>();
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

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

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
  CudaTemp keepT;
  cs::ChainArgs a;
  a.target =
      cuda_target(target, target_kind, s.B, keepT, s.bad, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val);
  const auto opts = draft_token_ids.options();
  spec::ChainOut o = spec::chain_outputs(s, opts);
  if (s.B == 0) return {o.out_ids, o.accepted, o.emitted};
  CudaWs keep;
  a.ws = make_ws(keep, opts, s.B, s.V, 0, false);
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
  CudaTemp keepT;
  cs::TreeArgs a;
  a.target =
      cuda_target(target, target_kind, s.B, keepT, s.bad, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val);
  const auto opts = candidates.options();
  spec::TreeOut o = spec::tree_outputs(s, W, opts);
  if (s.B == 0) return {o.predicts, o.accept_index, o.accept_num};
  CudaWs keep;
  a.ws = make_ws(keep, opts, s.B, s.V, s.T, draft_probs.has_value());
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
