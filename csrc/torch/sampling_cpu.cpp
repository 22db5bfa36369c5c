// CPU implementations of the sampling/filtering ops: checks, argument packing, threading.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "torch/checks.h"

namespace dk::torchb {
namespace {

struct FilterParams {
  std::optional<at::Tensor> T, k, p, mp;  // keep converted tensors alive
};

cpu::RowFilter make_filter(FilterParams& keep, int64_t n, bool is_probs, const std::optional<at::Tensor>& T_arr,
                           double T_val, const std::optional<at::Tensor>& k_arr, int64_t k_val,
                           const std::optional<at::Tensor>& p_arr, double p_val,
                           const std::optional<at::Tensor>& mp_arr, double mp_val, int64_t order) {
  DK_CHECK(order == 0 || order == 1, "filter order must be 0 (sequential/top_k_first) or 1 (joint), got ", order);
  cpu::RowFilter f;
  f.is_probs = is_probs;
  f.order = cpu::FilterOrder(order);
  keep.T = per_row(T_arr, n, at::kFloat, "temperature");
  keep.k = per_row(k_arr, n, at::kLong, "top_k");
  keep.p = per_row(p_arr, n, at::kFloat, "top_p");
  keep.mp = per_row(mp_arr, n, at::kFloat, "min_p");
  if (keep.T) { check_temperature(*keep.T); f.temperature.ptr = keep.T->data_ptr<float>(); }
  else { check_temperature(T_val); f.temperature.scalar = float(T_val); }
  if (keep.k) f.top_k.ptr = keep.k->data_ptr<int64_t>(); else f.top_k.scalar = k_val;
  if (keep.p) { check_top_p(*keep.p); f.top_p.ptr = keep.p->data_ptr<float>(); }
  else { check_top_p(p_val); f.top_p.scalar = float(p_val); }
  if (keep.mp) { check_min_p(*keep.mp); f.min_p.ptr = keep.mp->data_ptr<float>(); }
  else { check_min_p(mp_val); f.min_p.scalar = float(mp_val); }
  return f;
}

template <class Fn>
void parallel_rows(int64_t n, Fn fn) {
  if (n == 0) return;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { fn(b, e); });
}

struct RowSetup {
  at::Tensor x;
  std::optional<at::Tensor> idx, seeds;
  int64_t n_out = 0;
};

RowSetup setup_rows(const at::Tensor& x_in, const std::optional<at::Tensor>& indices,
                    const std::optional<at::Tensor>& seed_arr, const char* xname) {
  check_matrix(x_in, xname);
  float_dtype(x_in, xname);
  check_same_device(x_in, indices, "indices");
  check_same_device(x_in, seed_arr, "seed");
  RowSetup r;
  r.x = x_in;
  r.n_out = x_in.size(0);
  if (indices) {
    check_indices(*indices, x_in.size(0), "indices");
    r.idx = indices->to(at::kLong).contiguous();
    r.n_out = indices->size(0);
  }
  if (seed_arr) {
    DK_CHECK(seed_arr->scalar_type() == at::kLong || seed_arr->scalar_type() == at::kInt,
             "seed must be an int or an int64 tensor, got ", seed_arr->scalar_type());
    r.seeds = per_row(seed_arr, r.n_out, at::kLong, "seed");
  }
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& indices, bool is_probs,
    const std::optional<at::Tensor>& T_arr, double T_val, const std::optional<at::Tensor>& k_arr, int64_t k_val,
    const std::optional<at::Tensor>& p_arr, double p_val, const std::optional<at::Tensor>& mp_arr, double mp_val,
    int64_t order, const std::optional<at::Tensor>& seed_arr, int64_t seed_val, int64_t offset) {
  RowSetup rs = setup_rows(x, indices, seed_arr, is_probs ? "probs" : "logits");
  FilterParams keep;
  cpu::SampleArgs a;
  a.filter = make_filter(keep, rs.n_out, is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order);
  auto tokens = at::empty({rs.n_out}, x.options().dtype(at::kLong));
  auto valid = at::empty({rs.n_out}, x.options().dtype(at::kBool));
  auto logprobs = at::empty({rs.n_out}, x.options().dtype(at::kFloat));
  if (rs.n_out == 0) return {tokens, valid, logprobs};
  a.in = as_matrix(rs.x);
  a.indices = rs.idx ? rs.idx->data_ptr<int64_t>() : nullptr;
  a.n_out = rs.n_out;
  a.seeds = rs.seeds ? rs.seeds->data_ptr<int64_t>() : nullptr;
  a.seed = uint64_t(seed_val);
  a.offset = uint64_t(offset);
  a.out_tokens = tokens.data_ptr<int64_t>();
  a.out_valid = valid.data_ptr<bool>();
  a.out_logprob = logprobs.data_ptr<float>();
  const auto& tab = cpu::active();
  parallel_rows(rs.n_out, [&](int64_t b, int64_t e) { tab.sample_rows(a, b, e); });
  return {tokens, valid, logprobs};
}

std::tuple<at::Tensor, at::Tensor> gumbel_sample_cpu(const at::Tensor& x, const std::optional<at::Tensor>& indices,
                                                     const std::optional<at::Tensor>& seed_arr, int64_t seed_val,
                                                     int64_t offset) {
  RowSetup rs = setup_rows(x, indices, seed_arr, "logits");
  auto tokens = at::empty({rs.n_out}, x.options().dtype(at::kLong));
  auto valid = at::empty({rs.n_out}, x.options().dtype(at::kBool));
  if (rs.n_out == 0) return {tokens, valid};
  cpu::SampleArgs a;
  a.in = as_matrix(rs.x);
  a.indices = rs.idx ? rs.idx->data_ptr<int64_t>() : nullptr;
  a.n_out = rs.n_out;
  a.seeds = rs.seeds ? rs.seeds->data_ptr<int64_t>() : nullptr;
  a.seed = uint64_t(seed_val);
  a.offset = uint64_t(offset);
  a.out_tokens = tokens.data_ptr<int64_t>();
  a.out_valid = valid.data_ptr<bool>();
  const auto& tab = cpu::active();
  parallel_rows(rs.n_out, [&](int64_t b, int64_t e) { tab.gumbel_rows(a, b, e); });
  return {tokens, valid};
}

at::Tensor filter_cpu(const at::Tensor& x, int64_t kind, bool is_probs, const std::optional<at::Tensor>& T_arr,
                      double T_val, const std::optional<at::Tensor>& k_arr, int64_t k_val,
                      const std::optional<at::Tensor>& p_arr, double p_val, const std::optional<at::Tensor>& mp_arr,
                      double mp_val, int64_t order) {
  const char* name = is_probs ? "probs" : "logits";
  check_matrix(x, name);
  float_dtype(x, name);
  DK_CHECK(kind >= 0 && kind <= 2, "filter kind must be 0, 1 or 2, got ", kind);
  FilterParams keep;
  cpu::FilterArgs a;
  a.filter = make_filter(keep, x.size(0), is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order);
  a.kind = cpu::FilterOut(kind);
  at::Tensor out = kind == 0 ? at::empty(x.sizes(), x.options()) : at::empty(x.sizes(), x.options().dtype(at::kFloat));
  if (x.size(0) == 0) return out;
  a.in = as_matrix(x);
  a.out = out.data_ptr();
  a.out_stride = out.size(1);
  const auto& tab = cpu::active();
  parallel_rows(x.size(0), [&](int64_t b, int64_t e) { tab.filter_rows(a, b, e); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) {
  m.impl("sample", &sample_cpu);
  m.impl("gumbel_sample", &gumbel_sample_cpu);
  m.impl("filter", &filter_cpu);
}

}  // namespace dk::torchb
