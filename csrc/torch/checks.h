// Input checks shared by the binding files. No math here: shapes, dtypes, devices, ranges.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <optional>
#include <string>
#include "cpu/kernels.h"

namespace dk::torchb {

#define DK_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

inline cpu::DType float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::DType::F32;
    case at::kBFloat16: return cpu::DType::BF16;
    case at::kHalf: return cpu::DType::F16;
    default: break;
  }
  DK_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  return cpu::DType::F32;
}

inline void check_matrix(const at::Tensor& t, const char* name) {
  DK_CHECK(t.dim() == 2, name, " must be 2-D [B, V], got shape ", t.sizes());
  DK_CHECK(t.size(1) >= 1, name, " must have V >= 1 columns, got shape ", t.sizes());
  DK_CHECK(t.size(0) == 0 || t.size(1) == 1 || t.stride(1) == 1, name,
           " must be contiguous in the last dimension (stride(1) == 1), got strides ", t.strides());
}

inline cpu::Matrix as_matrix(const at::Tensor& t) {
  cpu::Matrix m;
  m.data = t.data_ptr();
  m.dtype = float_dtype(t, "input");
  m.rows = t.size(0);
  m.V = t.size(1);
  m.row_stride = t.size(0) > 1 ? t.stride(0) : t.size(1);
  return m;
}

inline void check_same_device(const at::Tensor& ref, const std::optional<at::Tensor>& t, const char* name) {
  if (t) DK_CHECK(t->device() == ref.device(), name, " must be on ", ref.device(), ", got ", t->device());
}

// A per-row parameter tensor: 1-D of length n, converted to `dtype`, contiguous.
inline std::optional<at::Tensor> per_row(const std::optional<at::Tensor>& t, int64_t n, at::ScalarType dtype,
                                         const char* name) {
  if (!t) return std::nullopt;
  DK_CHECK(t->dim() == 1 && t->size(0) == n, name, " must be a scalar or a 1-D tensor of length ", n,
           ", got shape ", t->sizes());
  return t->to(dtype).contiguous();
}

inline void check_indices(const at::Tensor& idx, int64_t B, const char* name) {
  DK_CHECK(idx.dim() == 1, name, " must be 1-D, got shape ", idx.sizes());
  DK_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, name, " must be int32 or int64, got ",
           idx.scalar_type());
  if (idx.numel() > 0) {
    auto mn = idx.min().item<int64_t>(), mx = idx.max().item<int64_t>();
    DK_CHECK(mn >= 0 && mx < B, name, " values must be in [0, ", B, "), got range [", mn, ", ", mx, "]");
  }
}

// Range checks of filter parameters (scalar and tensor forms).
inline void check_temperature(double v) { DK_CHECK(v >= 0.0, "temperature must be >= 0 (0 = greedy), got ", v); }
inline void check_top_p(double v) { DK_CHECK(v > 0.0, "top_p must be in (0, 1], got ", v); }
inline void check_min_p(double v) { DK_CHECK(v >= 0.0 && v <= 1.0, "min_p must be in [0, 1], got ", v); }
inline void check_temperature(const at::Tensor& t) {
  if (t.numel()) DK_CHECK(!(t < 0).any().item<bool>() && !t.isnan().any().item<bool>(),
                          "temperature must be >= 0 (0 = greedy) in every row, got min ", t.min().item<double>());
}
inline void check_top_p(const at::Tensor& t) {
  if (t.numel()) DK_CHECK(!(t <= 0).any().item<bool>() && !t.isnan().any().item<bool>(),
                          "top_p must be in (0, 1] in every row, got min ", t.min().item<double>());
}
inline void check_min_p(const at::Tensor& t) {
  if (t.numel()) DK_CHECK(!((t < 0) | (t > 1)).any().item<bool>() && !t.isnan().any().item<bool>(),
                          "min_p must be in [0, 1] in every row, got range [", t.min().item<double>(), ", ",
                          t.max().item<double>(), "]");
}

// ---- argument packing shared by the CPU and CUDA bindings of the sampling/filter ops ---------
// (checks and dtype conversions only; each binding copies the pointers into its kernel structs)

// Per-row filter parameters, checked and converted (the converted tensors are kept alive here).
struct FilterPack {
  bool is_probs = false;
  int64_t order = 0;
  std::optional<at::Tensor> T, k, p, mp;  // float32, int64, float32, float32; 1-D of length n
  float T_val = 1.f;
  int64_t k_val = 0;
  float p_val = 1.f, mp_val = 0.f;
  const float* T_ptr() const { return T ? T->data_ptr<float>() : nullptr; }
  const int64_t* k_ptr() const { return k ? k->data_ptr<int64_t>() : nullptr; }
  const float* p_ptr() const { return p ? p->data_ptr<float>() : nullptr; }
  const float* mp_ptr() const { return mp ? mp->data_ptr<float>() : nullptr; }
};

inline FilterPack pack_filter(const at::Tensor& x, int64_t n, bool is_probs, const std::optional<at::Tensor>& T_arr,
                              double T_val, const std::optional<at::Tensor>& k_arr, int64_t k_val,
                              const std::optional<at::Tensor>& p_arr, double p_val,
                              const std::optional<at::Tensor>& mp_arr, double mp_val, int64_t order) {
  DK_CHECK(order == 0 || order == 1, "filter order must be 0 (sequential/top_k_first) or 1 (joint), got ", order);
  check_same_device(x, T_arr, "temperature");
  check_same_device(x, k_arr, "top_k");
  check_same_device(x, p_arr, "top_p");
  check_same_device(x, mp_arr, "min_p");
  FilterPack f;
  f.is_probs = is_probs;
  f.order = order;
  f.T = per_row(T_arr, n, at::kFloat, "temperature");
  f.k = per_row(k_arr, n, at::kLong, "top_k");
  f.p = per_row(p_arr, n, at::kFloat, "top_p");
  f.mp = per_row(mp_arr, n, at::kFloat, "min_p");
  if (f.T) check_temperature(*f.T); else { check_temperature(T_val); f.T_val = float(T_val); }
  if (!f.k) f.k_val = k_val;
  if (f.p) check_top_p(*f.p); else { check_top_p(p_val); f.p_val = float(p_val); }
  if (f.mp) check_min_p(*f.mp); else { check_min_p(mp_val); f.mp_val = float(mp_val); }
  return f;
}

// Rows of a sampling op: the checked input, gathered indices (int64) and per-output-row seeds.
struct RowSetup {
  at::Tensor x;
  std::optional<at::Tensor> idx, seeds;
  int64_t n_out = 0;
  const int64_t* idx_ptr() const { return idx ? idx->data_ptr<int64_t>() : nullptr; }
  const int64_t* seeds_ptr() const { return seeds ? seeds->data_ptr<int64_t>() : nullptr; }
};

inline RowSetup setup_rows(const at::Tensor& x_in, const std::optional<at::Tensor>& indices,
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

inline void check_filter_input(const at::Tensor& x, int64_t kind, bool is_probs) {
  const char* name = is_probs ? "probs" : "logits";
  check_matrix(x, name);
  float_dtype(x, name);
  DK_CHECK(kind >= 0 && kind <= 2, "filter kind must be 0, 1 or 2, got ", kind);
}

}  // namespace dk::torchb
