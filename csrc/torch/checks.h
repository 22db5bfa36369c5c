// Input checks shared by the binding files. No math here: shapes, dtypes, devices, ranges.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include "cpu/kernels.h"
#include "torch/deferred_checks.h"

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

// Numeric limits (README "Limits"): V and the number of rows fit in int32 (token ids and Philox
// streams are 32-bit), offsets fit in 48 bits (the counter layout of philox.h).
constexpr int64_t kMaxV = 2147483647;            // 2^31 - 1
constexpr int64_t kMaxRows = 2147483647;         // 2^31 - 1
constexpr int64_t kMaxOffset = 281474976710655;  // 2^48 - 1
constexpr double kF32Max = 3.4028234663852886e38;
constexpr double kF32MinNormal = 1.1754943508222875e-38;

inline void check_matrix(const at::Tensor& t, const char* name) {
  DK_CHECK(t.dim() == 2, name, " must be 2-D [B, V], got shape ", t.sizes());
  DK_CHECK(t.size(1) >= 1, name, " must have V >= 1 columns, got shape ", t.sizes());
  DK_CHECK(t.size(1) <= kMaxV, name, " has V = ", t.size(1), " columns; decodekit supports V <= 2^31 - 1");
  DK_CHECK(t.size(0) <= kMaxRows, name, " has ", t.size(0), " rows; decodekit supports at most 2^31 - 1");
  DK_CHECK(t.size(0) == 0 || t.size(1) == 1 || t.stride(1) == 1, name,
           " must be contiguous in the last dimension (stride(1) == 1), got strides ", t.strides());
}

inline void check_offset(int64_t offset) {
  DK_CHECK(offset >= 0 && offset <= kMaxOffset, "offset must be in [0, 2^48), got ", offset);
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

// A per-row parameter tensor must be 1-D of length n (returned unchanged).
inline const at::Tensor& row_shape(const at::Tensor& t, int64_t n, const char* name) {
  DK_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be a scalar or a 1-D tensor of length ", n, ", got shape ",
           t.sizes());
  return t;
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

// Range checks of filter parameters, on the values as given (a float64 tensor or a double), before
// any conversion to the kernels' float32, so a message quotes what the user passed:
//   temperature: 0 (greedy) or a normal float32 in [2^-126, FLT_MAX] (1 / T must be finite);
//   top_p: > 0 (p >= 1 disables; a p below float32's range keeps the argmax tie group, as any p < 1/V);
//   min_p: in [0, 1].
// (temperature_ok, top_p_ok, min_p_ok: decodekit/common.h, shared with the CUDA kernels' per-row checks)
inline const char* temperature_rule() {
  return "temperature must be 0 (greedy) or in [1.1754944e-38, 3.4028235e+38] (a normal float32)";
}
inline void check_temperature(double v) { DK_CHECK(temperature_ok(v), temperature_rule(), ", got ", v); }
inline void check_top_p(double v) {
  DK_CHECK(top_p_ok(v), "top_p must be in (0, 1] (values >= 1 disable it), got ", v);
}
inline void check_min_p(double v) { DK_CHECK(min_p_ok(v), "min_p must be in [0, 1], got ", v); }

// The first value of a per-row parameter tensor outside its range (NaN counts as outside), if any.
template <class Ok>
std::optional<double> first_bad(const at::Tensor& t, Ok ok) {
  if (t.numel() == 0) return std::nullopt;
  at::Tensor d = t.to(at::kDouble).cpu().contiguous();
  const double* v = d.data_ptr<double>();
  for (int64_t i = 0; i < d.numel(); ++i)
    if (!ok(v[i])) return v[i];
  return std::nullopt;
}

// float32 copies the kernels read; a positive top_p below float32's range becomes FLT_MIN (same result).
inline float top_p_f32(double v) { return v > 0.0 && v < kF32MinNormal ? float(kF32MinNormal) : float(v); }

// Checked per-row parameter tensors in the kernels' dtypes (float32 / int64), contiguous, on `dev`.
inline at::Tensor temperature_rows(const at::Tensor& t) {
  auto bad = first_bad(t, temperature_ok);
  DK_CHECK(!bad, temperature_rule(), " in every row, got ", *bad);
  return t.to(at::kFloat).contiguous();
}
inline at::Tensor top_p_rows(const at::Tensor& t) {
  auto bad = first_bad(t, top_p_ok);
  DK_CHECK(!bad, "top_p must be in (0, 1] in every row (values >= 1 disable it), got ", *bad);
  return t.to(at::kDouble).clamp_min(kF32MinNormal).to(at::kFloat).contiguous();
}
inline at::Tensor min_p_rows(const at::Tensor& t) {
  auto bad = first_bad(t, min_p_ok);
  DK_CHECK(!bad, "min_p must be in [0, 1] in every row, got ", *bad);
  return t.to(at::kFloat).contiguous();
}
// top_k: integers; k <= 0 or k >= V disables, so float values beyond +-4e18 (and +-inf) are
// clamped there before the int64 conversion (same meaning, no overflow).
inline at::Tensor top_k_rows(const at::Tensor& t) {
  if (!t.is_floating_point()) return t.to(at::kLong).contiguous();
  auto bad = first_bad(t, [](double v) { return std::isinf(v) || v == std::floor(v); });
  DK_CHECK(!bad, "top_k must hold integers in every row, got ", *bad);
  return t.to(at::kDouble).clamp(-4e18, 4e18).to(at::kLong).contiguous();
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

// The deferred form of the range checks above (deferred_checks.h): computed on t's device, the bad
// rows noted in `bad` (with `bit`) and given the neutral value (the filter disabled, T = 1).
inline at::Tensor deferred_temperature(const at::Tensor& t, RowBad& bad, bool zero_ok) {
  at::Tensor d = t.to(at::kDouble);
  at::Tensor ok = d.ge(kF32MinNormal).logical_and(d.le(kF32Max));
  if (zero_ok) ok = ok.logical_or(d.eq(0.0));
  bad.add(ok.logical_not(), kErrTemperature);
  return at::where(ok, d, 1.0).to(at::kFloat).contiguous();
}
inline at::Tensor deferred_top_p(const at::Tensor& t, RowBad& bad) {
  at::Tensor d = t.to(at::kDouble);
  at::Tensor ok = d.gt(0.0);
  bad.add(ok.logical_not(), kErrTopP);
  return at::where(ok, d, 1.0).clamp_min(kF32MinNormal).to(at::kFloat).contiguous();
}
inline at::Tensor deferred_min_p(const at::Tensor& t, RowBad& bad) {
  at::Tensor d = t.to(at::kDouble);
  at::Tensor ok = d.ge(0.0).logical_and(d.le(1.0));
  bad.add(ok.logical_not(), kErrMinP);
  return at::where(ok, d, 0.0).to(at::kFloat).contiguous();
}
inline at::Tensor deferred_top_k(const at::Tensor& t, RowBad& bad) {
  if (!t.is_floating_point()) return t.to(at::kLong).contiguous();
  at::Tensor d = t.to(at::kDouble);
  at::Tensor ok = d.isinf().logical_or(d.eq(d.floor()));
  bad.add(ok.logical_not(), kErrTopK);
  return at::where(ok, d, 0.0).clamp(-4e18, 4e18).to(at::kLong).contiguous();
}

// The checks and conversions of the four filter parameters, shared by every op that takes them
// (sampling, filters, speculative verification from logits). Tensors are 1-D of length n.
// bad == nullptr: eager ValueErrors (the CPU); else the deferred checks (CUDA), bad rows noted there.
// zero_temperature_ok: false for softmax (temperature must be > 0 there).
inline FilterPack pack_filter_params(int64_t n, bool is_probs, const std::optional<at::Tensor>& T_arr, double T_val,
                                     const std::optional<at::Tensor>& k_arr, int64_t k_val,
                                     const std::optional<at::Tensor>& p_arr, double p_val,
                                     const std::optional<at::Tensor>& mp_arr, double mp_val, int64_t order,
                                     RowBad* bad = nullptr, bool zero_temperature_ok = true) {
  DK_CHECK(order == 0 || order == 1, "filter order must be 0 (sequential/top_k_first) or 1 (joint), got ", order);
  FilterPack f;
  f.is_probs = is_probs;
  f.order = order;
  if (T_arr)
    f.T = bad ? deferred_temperature(row_shape(*T_arr, n, "temperature"), *bad, zero_temperature_ok)
              : temperature_rows(row_shape(*T_arr, n, "temperature"));
  else {
    check_temperature(T_val);
    f.T_val = float(T_val);
  }
  if (k_arr)
    f.k = bad ? deferred_top_k(row_shape(*k_arr, n, "top_k"), *bad) : top_k_rows(row_shape(*k_arr, n, "top_k"));
  else
    f.k_val = k_val;
  if (p_arr)
    f.p = bad ? deferred_top_p(row_shape(*p_arr, n, "top_p"), *bad) : top_p_rows(row_shape(*p_arr, n, "top_p"));
  else {
    check_top_p(p_val);
    f.p_val = top_p_f32(p_val);
  }
  if (mp_arr)
    f.mp = bad ? deferred_min_p(row_shape(*mp_arr, n, "min_p"), *bad) : min_p_rows(row_shape(*mp_arr, n, "min_p"));
  else {
    check_min_p(mp_val);
    f.mp_val = float(mp_val);
  }
  return f;
}

inline FilterPack pack_filter(const at::Tensor& x, int64_t n, bool is_probs, const std::optional<at::Tensor>& T_arr,
                              double T_val, const std::optional<at::Tensor>& k_arr, int64_t k_val,
                              const std::optional<at::Tensor>& p_arr, double p_val,
                              const std::optional<at::Tensor>& mp_arr, double mp_val, int64_t order,
                              RowBad* bad = nullptr, bool zero_temperature_ok = true) {
  check_same_device(x, T_arr, "temperature");
  check_same_device(x, k_arr, "top_k");
  check_same_device(x, p_arr, "top_p");
  check_same_device(x, mp_arr, "min_p");
  return pack_filter_params(n, is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order, bad,
                            zero_temperature_ok);
}

// The kernels' view of checked filter parameters (pointers into the pack's tensors): the one
// dk::RowFilter of decodekit/contract.h, for the CPU and the CUDA kernels alike.
inline dk::RowFilter row_filter(const FilterPack& fp) {
  dk::RowFilter f;
  f.is_probs = fp.is_probs;
  f.order = cpu::FilterOrder(fp.order);
  f.temperature.ptr = fp.T_ptr();
  f.temperature.scalar = fp.T_val;
  f.top_k.ptr = fp.k_ptr();
  f.top_k.scalar = fp.k_val;
  f.top_p.ptr = fp.p_ptr();
  f.top_p.scalar = fp.p_val;
  f.min_p.ptr = fp.mp_ptr();
  f.min_p.scalar = fp.mp_val;
  return f;
}

// Seeds of n output rows: a tensor of n seeds (row i's stream is keyed by seed[i] alone), or a
// tensor holding ONE seed, which is the scalar form (every output row draws its own stream, the
// row index being part of the counter). A one-seed CPU tensor is read here into seed_val; one on
// a device is kept in `one` and read by the kernel (seed_ptr), never on the host. For n == 1 both
// readings give the same stream. The one-seed tensor is how a seed drawn inside a compiled graph,
// or by torch's CUDA generator (philox_state), reaches the op.
inline std::optional<at::Tensor> seed_rows(const std::optional<at::Tensor>& seed_arr, int64_t n, int64_t& seed_val,
                                           std::optional<at::Tensor>* one = nullptr) {
  if (!seed_arr) return std::nullopt;
  DK_CHECK(seed_arr->scalar_type() == at::kLong || seed_arr->scalar_type() == at::kInt,
           "seed must be an int or an int64 tensor, got ", seed_arr->scalar_type());
  DK_CHECK(seed_arr->dim() <= 1 && (seed_arr->numel() == n || seed_arr->numel() == 1),
           "seed must be an int or an "
           "int64 tensor of length 1 or ",
           n, " (one seed per output row), got shape ", seed_arr->sizes());
  if (seed_arr->numel() == 1 && n != 1) {
    if (one && !seed_arr->is_cpu()) {
      *one = seed_arr->reshape({-1}).to(at::kLong).contiguous();
      return std::nullopt;
    }
    seed_val = seed_arr->to(at::kLong).cpu().item<int64_t>();
    return std::nullopt;
  }
  return seed_arr->reshape({-1}).to(at::kLong).contiguous();
}

// Offsets as a tensor (offset_arr, added to the int offset): int64 [n] (per output row) or [1], on
// the input's device. Eager: every value in [0, 2^48) (a ValueError otherwise); deferred: a bad
// value marks its rows (all rows for a [1] tensor) and reads as 0.
struct OffsetPack {
  std::optional<at::Tensor> t;
  int64_t stride = 0;
  const int64_t* ptr() const { return t ? t->data_ptr<int64_t>() : nullptr; }
};

inline OffsetPack pack_offsets(const std::optional<at::Tensor>& offset_arr, int64_t n, const at::Tensor& ref,
                               RowBad* bad) {
  OffsetPack o;
  if (!offset_arr) return o;
  DK_CHECK(offset_arr->scalar_type() == at::kLong || offset_arr->scalar_type() == at::kInt,
           "offset must be an int or an int64 tensor, got ", offset_arr->scalar_type());
  DK_CHECK(offset_arr->dim() <= 1 && (offset_arr->numel() == n || offset_arr->numel() == 1),
           "offset must be an int or an int64 tensor of length 1 or ", n, " (one offset per output row), got shape ",
           offset_arr->sizes());
  DK_CHECK(offset_arr->device() == ref.device(), "offset must be on ", ref.device(), ", got ", offset_arr->device());
  at::Tensor v = offset_arr->reshape({-1}).to(at::kLong).contiguous();
  if (bad) {
    at::Tensor b = v.lt(0).logical_or(v.gt(kMaxOffset));
    bad->add(b, kErrOffset);
    v = safe_index(v, b).contiguous();
  } else {
    auto first = first_bad(v, [](double d) { return d >= 0 && d <= double(kMaxOffset); });
    DK_CHECK(!first, "offset must be in [0, 2^48) in every row, got ", int64_t(*first));
  }
  o.stride = v.numel() == 1 ? 0 : 1;
  o.t = v;
  return o;
}

// Rows of a sampling op: the checked input, gathered indices (int64), per-output-row seeds, the
// device seed / offsets, and (deferred checks) the rows found bad.
struct RowSetup {
  at::Tensor x;
  std::optional<at::Tensor> idx, seeds, seed_one;
  OffsetPack offsets;
  int64_t n_out = 0;
  int64_t seed_val = 0;  // the scalar seed when seed_arr held one seed (else the caller's)
  bool deferred = false;
  RowBad bad{0};
  RowBad* bad_ptr() { return deferred ? &bad : nullptr; }
  const int64_t* idx_ptr() const { return idx ? idx->data_ptr<int64_t>() : nullptr; }
  const int64_t* seeds_ptr() const { return seeds ? seeds->data_ptr<int64_t>() : nullptr; }
  const int64_t* seed_one_ptr() const { return seed_one ? seed_one->data_ptr<int64_t>() : nullptr; }
  // Copies the randomness fields into a kernel argument struct (CPU or CUDA: same field names).
  template <class A>
  void fill_rng(A& a, int64_t offset) const {
    a.seeds = seeds_ptr();
    a.seed = uint64_t(seed_val);
    a.seed_ptr = seed_one_ptr();
    a.offset = uint64_t(offset);
    a.offsets = offsets.ptr();
    a.offset_stride = offsets.stride;
  }
};

inline RowSetup setup_rows(const at::Tensor& x_in, const std::optional<at::Tensor>& indices,
                           const std::optional<at::Tensor>& seed_arr, int64_t seed_val, int64_t offset,
                           const char* xname, const std::optional<at::Tensor>& offset_arr = std::nullopt) {
  check_offset(offset);
  check_matrix(x_in, xname);
  float_dtype(x_in, xname);
  check_same_device(x_in, indices, "indices");
  if (seed_arr && !seed_arr->is_cpu()) check_same_device(x_in, seed_arr, "seed");
  RowSetup r;
  r.x = x_in;
  r.seed_val = seed_val;
  r.n_out = x_in.size(0);
  r.deferred = deferred(x_in);
  if (indices) {
    r.n_out = indices->size(0);
    if (r.deferred) {
      DK_CHECK(indices->dim() == 1, "indices must be 1-D, got shape ", indices->sizes());
      DK_CHECK(indices->scalar_type() == at::kLong || indices->scalar_type() == at::kInt,
               "indices must be int32 or int64, got ", indices->scalar_type());
      DK_CHECK(x_in.size(0) > 0 || r.n_out == 0, "indices must be in [0, B) but ", xname, " has no rows (B = 0)");
      at::Tensor idx = indices->to(at::kLong);
      at::Tensor b = idx.lt(0).logical_or(idx.ge(x_in.size(0)));
      r.bad = RowBad(r.n_out);
      r.bad.add(b, kErrIndices);
      r.idx = safe_index(idx, b).contiguous();
    } else {
      check_indices(*indices, x_in.size(0), "indices");
      r.idx = indices->to(at::kLong).contiguous();
    }
  }
  DK_CHECK(r.n_out <= kMaxRows, "indices has ", r.n_out, " entries; decodekit supports at most 2^31 - 1 output rows");
  if (r.bad.n != r.n_out) r.bad = RowBad(r.n_out);
  r.seeds = seed_rows(seed_arr, r.n_out, r.seed_val, &r.seed_one);
  if (r.seeds && r.seeds->device() != x_in.device()) r.seeds = r.seeds->to(x_in.device());
  r.offsets = pack_offsets(offset_arr, r.n_out, x_in, r.bad_ptr());
  return r;
}

// Deferred checks, after the kernel: the bad rows of a sampling op get token 0, valid False, logprob 0.
inline void finish_bad_rows(const RowSetup& rs, at::Tensor& tokens, at::Tensor& valid, at::Tensor* logprobs) {
  if (!rs.bad.any_possible()) return;
  tokens.masked_fill_(rs.bad.rows, 0);
  valid.masked_fill_(rs.bad.rows, false);
  if (logprobs) logprobs->masked_fill_(rs.bad.rows, 0.0);
}

// Deferred checks, after the kernel: a filter row whose parameter is bad comes out as NaN.
inline void finish_bad_filter_rows(const RowBad& bad, at::Tensor& out) {
  if (bad.any_possible()) out.masked_fill_(bad.rows.unsqueeze(1), std::numeric_limits<double>::quiet_NaN());
}

inline void check_filter_input(const at::Tensor& x, int64_t kind, bool is_probs) {
  const char* name = is_probs ? "probs" : "logits";
  check_matrix(x, name);
  float_dtype(x, name);
  DK_CHECK(kind >= 0 && kind <= 2, "filter kind must be 0, 1 or 2, got ", kind);
}

}  // namespace dk::torchb
