// CUDA implementations of the sampling/filtering ops: the same checks and argument packing as
// csrc/torch/sampling_cpu.cpp (shared in csrc/torch/checks.h), then one launch on the current
// stream. No math here; the kernels live in csrc/cuda/sampling.cuh.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include "cuda/sampling.cuh"
#include "torch/cuda_binding.h"
#include "torch/checks.h"

namespace dk::torchb {
namespace {

cuda::SampleArgs sample_args(const RowSetup& rs, int64_t offset) {
  cuda::SampleArgs a;
  a.in = as_matrix(rs.x);
  a.indices = rs.idx_ptr();
  a.n_out = rs.n_out;
  rs.fill_rng(a, offset);
  return a;
}

// The workspace a plan needs (the caching allocator's, no sync; undefined when none), its pointer
// put in the plan. The tensor is freed after the launches are queued: stream-ordered, so safe.
at::Tensor plan_workspace(cuda::SplitArgs& plan, const at::Tensor& x) {
  at::Tensor ws;
  if (const int64_t n = cuda::sample_workspace_elems(plan)) {
    ws = at::empty({n}, x.options().dtype(at::kDouble));
    plan.a.workspace = ws.data_ptr<double>();
  }
  return ws;
}

// A sample / Gumbel-max plan with its workspace, on x's stream.
void launch(cuda::SplitArgs plan, const at::Tensor& x) {
  const at::Tensor ws = plan_workspace(plan, x);
  C10_CUDA_CHECK(cuda::launch_sample(plan, stream_of(x)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& indices, bool is_probs,
    const std::optional<at::Tensor>& T_arr, double T_val, const std::optional<at::Tensor>& k_arr, int64_t k_val,
    const std::optional<at::Tensor>& p_arr, double p_val, const std::optional<at::Tensor>& mp_arr, double mp_val,
    int64_t order, const std::optional<at::Tensor>& seed_arr, int64_t seed_val, int64_t offset,
    const std::optional<at::Tensor>& offset_arr) {
  check_cuda(x, is_probs ? "probs" : "logits");
  c10::cuda::CUDAGuard guard(x.device());
  RowSetup rs = setup_rows(x, indices, seed_arr, seed_val, offset, is_probs ? "probs" : "logits", offset_arr);
  FilterPack fp =
      pack_filter(x, rs.n_out, is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order, rs.bad_ptr());
  auto tokens = at::empty({rs.n_out}, x.options().dtype(at::kLong));
  auto valid = at::empty({rs.n_out}, x.options().dtype(at::kBool));
  auto logprobs = at::empty({rs.n_out}, x.options().dtype(at::kFloat));
  if (rs.n_out == 0) return {tokens, valid, logprobs};
  cuda::SampleArgs a = sample_args(rs, offset);
  a.filter = row_filter(fp);
  a.out_tokens = tokens.data_ptr<int64_t>();
  a.out_valid = valid.data_ptr<bool>();
  a.out_logprob = logprobs.data_ptr<float>();
  launch(cuda::split_plan(a, device_sms(x), false), x);
  finish_bad_rows(rs, tokens, valid, &logprobs);
  return {tokens, valid, logprobs};
}

std::tuple<at::Tensor, at::Tensor> gumbel_sample_cuda(const at::Tensor& x, const std::optional<at::Tensor>& indices,
                                                      const std::optional<at::Tensor>& seed_arr, int64_t seed_val,
                                                      int64_t offset, const std::optional<at::Tensor>& offset_arr) {
  check_cuda(x, "logits");
  c10::cuda::CUDAGuard guard(x.device());
  RowSetup rs = setup_rows(x, indices, seed_arr, seed_val, offset, "logits", offset_arr);
  auto tokens = at::empty({rs.n_out}, x.options().dtype(at::kLong));
  auto valid = at::empty({rs.n_out}, x.options().dtype(at::kBool));
  if (rs.n_out == 0) return {tokens, valid};
  cuda::SampleArgs a = sample_args(rs, offset);
  a.out_tokens = tokens.data_ptr<int64_t>();
  a.out_valid = valid.data_ptr<bool>();
  launch(cuda::split_plan(a, device_sms(x), true), x);
  finish_bad_rows(rs, tokens, valid, nullptr);
  return {tokens, valid};
}

at::Tensor filter_cuda(const at::Tensor& x, int64_t kind, bool is_probs, const std::optional<at::Tensor>& T_arr,
                       double T_val, const std::optional<at::Tensor>& k_arr, int64_t k_val,
                       const std::optional<at::Tensor>& p_arr, double p_val, const std::optional<at::Tensor>& mp_arr,
                       double mp_val, int64_t order) {
  check_cuda(x, is_probs ? "probs" : "logits");
  c10::cuda::CUDAGuard guard(x.device());
  check_filter_input(x, kind, is_probs);
  RowBad bad(x.size(0));
  FilterPack fp = pack_filter(x, x.size(0), is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order,
                              &bad, kind != 2);
  at::Tensor out = kind == 0 ? at::empty(x.sizes(), x.options()) : at::empty(x.sizes(), x.options().dtype(at::kFloat));
  if (x.size(0) == 0) return out;
  cuda::FilterArgs a;
  a.in = as_matrix(x);
  a.filter = row_filter(fp);
  a.kind = cuda::FilterOut(kind);
  a.out = out.data_ptr();
  a.out_stride = out.size(1);
  cuda::SplitFilterArgs plan = cuda::filter_plan(a, device_sms(x));
  const at::Tensor ws = plan_workspace(plan.sa, x);
  C10_CUDA_CHECK(cuda::launch_filter(plan, stream_of(x)));
  finish_bad_filter_rows(bad, out);
  return out;
}

// torch's CUDA generator for one call (ops.cpp, philox_state): outside a graph capture its seed
// and offset as values; under capture the graph-safe state (device pointers to the seed and the
// offset, plus the offset captured for this call, at::cuda::philox::unpack's reading), turned
// into tensors by device copies that every replay re-runs. Returned as the one-seed tensor and the
// [1] offset tensor the ops take; the kernels read them (decodekit/rng.h row_rng_key).
std::tuple<at::Tensor, at::Tensor> philox_state_cuda(const at::Tensor& like, int64_t increment,
                                                     std::optional<at::Generator> generator) {
  check_cuda(like, "like");
  DK_CHECK(increment >= 1, "increment must be >= 1, got ", increment);
  c10::cuda::CUDAGuard guard(like.device());
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(like.device().index()));
  at::PhiloxCudaState st;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    st = gen->philox_cuda_state(uint64_t(increment));
  }
  const auto opts = like.options().dtype(at::kLong);
  if (!st.captured_) return {at::full({1}, int64_t(st.seed_.val), opts), at::full({1}, int64_t(st.offset_.val), opts)};
  at::Tensor seed = at::from_blob(st.seed_.ptr, {1}, opts).clone();
  at::Tensor off = at::from_blob(st.offset_.ptr, {1}, opts).add(int64_t(st.offset_intragraph_));
  return {seed, off};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) {
  m.impl("philox_state", &philox_state_cuda);
  m.impl("sample", &sample_cuda);
  m.impl("gumbel_sample", &gumbel_sample_cuda);
  m.impl("filter", &filter_cuda);
}

}  // namespace dk::torchb
