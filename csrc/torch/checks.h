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

}  // namespace dk::torchb
