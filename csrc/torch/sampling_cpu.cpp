// CPU implementations of the sampling/filtering ops: checks, argument packing, threading.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "torch/checks.h"

namespace dk::torchb {
namespace {

template <class Fn>
void parallel_rows(int64_t n, Fn fn) {
  if (n == 0) return;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { fn(b, e); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cpu(const at::Tensor& x, const std::optional<at::Tensor>& indices,
                                                          bool is_probs, const std::optional<at::Tensor>& T_arr,
                                                          double T_val, const std::optional<at::Tensor>& k_arr,
                                                          int64_t k_val, const std::optional<at::Tensor>& p_arr,
                                                          double p_val, const std::optional<at::Tensor>& mp_arr,
                                                          double mp_val, int64_t order,
                                                          const std::optional<at::Tensor>& seed_arr, int64_t seed_val,
                                                          int64_t offset, const std::optional<at::Tensor>& offset_arr) {
  RowSetup rs = setup_rows(x, indices, seed_arr, seed_val, offset, is_probs ? "probs" : "logits", offset_arr);
  FilterPack fp =
      pack_filter(x, rs.n_out, is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order, rs.bad_ptr());
  cpu::SampleArgs a;
  a.filter = row_filter(fp);
  auto tokens = at::empty({rs.n_out}, x.options().dtype(at::kLong));
  auto valid = at::empty({rs.n_out}, x.options().dtype(at::kBool));
  auto logprobs = at::empty({rs.n_out}, x.options().dtype(at::kFloat));
  if (rs.n_out == 0) return {tokens, valid, logprobs};
  a.in = as_matrix(rs.x);
  a.indices = rs.idx_ptr();
  a.n_out = rs.n_out;
  rs.fill_rng(a, offset);
  a.out_tokens = tokens.data_ptr<int64_t>();
  a.out_valid = valid.data_ptr<bool>();
  a.out_logprob = logprobs.data_ptr<float>();
  const auto& tab = cpu::active();
  parallel_rows(rs.n_out, [&](int64_t b, int64_t e) { tab.sample_rows(a, b, e); });
  finish_bad_rows(rs, tokens, valid, &logprobs);
  return {tokens, valid, logprobs};
}

std::tuple<at::Tensor, at::Tensor> gumbel_sample_cpu(const at::Tensor& x, const std::optional<at::Tensor>& indices,
                                                     const std::optional<at::Tensor>& seed_arr, int64_t seed_val,
                                                     int64_t offset, const std::optional<at::Tensor>& offset_arr) {
  RowSetup rs = setup_rows(x, indices, seed_arr, seed_val, offset, "logits", offset_arr);
  auto tokens = at::empty({rs.n_out}, x.options().dtype(at::kLong));
  auto valid = at::empty({rs.n_out}, x.options().dtype(at::kBool));
  if (rs.n_out == 0) return {tokens, valid};
  cpu::SampleArgs a;
  a.in = as_matrix(rs.x);
  a.indices = rs.idx_ptr();
  a.n_out = rs.n_out;
  rs.fill_rng(a, offset);
  a.out_tokens = tokens.data_ptr<int64_t>();
  a.out_valid = valid.data_ptr<bool>();
  const auto& tab = cpu::active();
  parallel_rows(rs.n_out, [&](int64_t b, int64_t e) { tab.gumbel_rows(a, b, e); });
  finish_bad_rows(rs, tokens, valid, nullptr);
  return {tokens, valid};
}

at::Tensor filter_cpu(const at::Tensor& x, int64_t kind, bool is_probs, const std::optional<at::Tensor>& T_arr,
                      double T_val, const std::optional<at::Tensor>& k_arr, int64_t k_val,
                      const std::optional<at::Tensor>& p_arr, double p_val, const std::optional<at::Tensor>& mp_arr,
                      double mp_val, int64_t order) {
  check_filter_input(x, kind, is_probs);
  RowBad bad(x.size(0));
  FilterPack fp = pack_filter(x, x.size(0), is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order,
                              deferred(x) ? &bad : nullptr, kind != 2);
  cpu::FilterArgs a;
  a.filter = row_filter(fp);
  a.kind = cpu::FilterOut(kind);
  at::Tensor out = kind == 0 ? at::empty(x.sizes(), x.options()) : at::empty(x.sizes(), x.options().dtype(at::kFloat));
  if (x.size(0) == 0) return out;
  a.in = as_matrix(x);
  a.out = out.data_ptr();
  a.out_stride = out.size(1);
  const auto& tab = cpu::active();
  parallel_rows(x.size(0), [&](int64_t b, int64_t e) { tab.filter_rows(a, b, e); });
  finish_bad_filter_rows(bad, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) {
  m.impl("sample", &sample_cpu);
  m.impl("gumbel_sample", &gumbel_sample_cpu);
  m.impl("filter", &filter_cpu);
}

}  // namespace dk::torchb
