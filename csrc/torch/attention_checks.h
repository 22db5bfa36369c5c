// Tree-attention input checks shared by the CPU and CUDA impls. No math: shapes, dtypes, devices.
#pragma once
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include "torch/checks.h"

namespace dk::torchb {

// Shared by the CPU and CUDA impls: validates every argument and returns the sizes.
struct AttnShape {
  int64_t B, T, Hq, Hkv, D, S;
  bool hnd, packed;
};

inline AttnShape check_tree_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& tree_mask, const at::Tensor& prefix_lens,
                                      c10::string_view kv_layout) {
  DK_CHECK(kv_layout == "NHD" || kv_layout == "HND", "kv_layout must be \"NHD\" or \"HND\", got \"",
           std::string(kv_layout), "\"");
  const bool hnd = kv_layout == "HND";
  DK_CHECK(q.dim() == 4, "q must be 4-D [B, T, Hq, D], got shape ", q.sizes());
  const char* kv_shape = hnd ? "[B, Hkv, S, D] (kv_layout=\"HND\")" : "[B, S, Hkv, D] (kv_layout=\"NHD\")";
  DK_CHECK(k.dim() == 4, "k must be 4-D ", kv_shape, ", got shape ", k.sizes());
  DK_CHECK(v.dim() == 4, "v must be 4-D ", kv_shape, ", got shape ", v.sizes());
  float_dtype(q, "q");
  DK_CHECK(k.scalar_type() == q.scalar_type(), "k must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type());
  DK_CHECK(v.scalar_type() == q.scalar_type(), "v must have q's dtype ", q.scalar_type(), ", got ", v.scalar_type());
  DK_CHECK(k.device() == q.device(), "k must be on q's device ", q.device(), ", got ", k.device());
  DK_CHECK(v.device() == q.device(), "v must be on q's device ", q.device(), ", got ", v.device());
  DK_CHECK(tree_mask.device() == q.device(), "tree_mask must be on q's device ", q.device(), ", got ",
           tree_mask.device());
  DK_CHECK(prefix_lens.device() == q.device(), "prefix_lens must be on q's device ", q.device(), ", got ",
           prefix_lens.device());
  AttnShape s;
  s.B = q.size(0);
  s.T = q.size(1);
  s.Hq = q.size(2);
  s.D = q.size(3);
  s.hnd = hnd;
  const int64_t kB = k.size(0), kS = k.size(hnd ? 2 : 1), kH = k.size(hnd ? 1 : 2), kD = k.size(3);
  DK_CHECK(s.D == 64 || s.D == 80 || s.D == 96 || s.D == 128 || s.D == 256,
           "q head dim must be one of 64, 80, 96, 128, 256, got ", s.D);
  DK_CHECK(kB == s.B, "k batch size must equal q's (", s.B, "), got ", kB, " (k shape ", k.sizes(), ")");
  DK_CHECK(kD == s.D, "k head dim must equal q's (", s.D, "), got ", kD, " (k shape ", k.sizes(), ")");
  DK_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  s.Hkv = kH;
  s.S = kS;
  DK_CHECK(s.Hkv >= 1 && s.Hq % s.Hkv == 0, "q heads (", s.Hq, ") must be a multiple of the k/v heads (", s.Hkv,
           ") for grouped-query attention");
  const int64_t T8 = (s.T + 7) / 8;
  DK_CHECK(tree_mask.dim() == 3 && tree_mask.size(0) == s.B && tree_mask.size(1) == s.T, "tree_mask must be bool [",
           s.B, ", ", s.T, ", ", s.T, "] or packed uint8 [", s.B, ", ", s.T, ", ", T8, "], got shape ",
           tree_mask.sizes());
  if (tree_mask.scalar_type() == at::kBool) {
    DK_CHECK(tree_mask.size(2) == s.T, "tree_mask (bool) must have shape [", s.B, ", ", s.T, ", ", s.T, "], got ",
             tree_mask.sizes());
    s.packed = false;
  } else {
    DK_CHECK(tree_mask.scalar_type() == at::kByte,
             "tree_mask must be bool [B, T, T] or packed uint8 [B, T, ceil(T/8)], got dtype ", tree_mask.scalar_type());
    DK_CHECK(tree_mask.size(2) == T8, "tree_mask (packed uint8) must have shape [", s.B, ", ", s.T, ", ", T8, "], got ",
             tree_mask.sizes());
    s.packed = true;
  }
  DK_CHECK(prefix_lens.dim() == 1 && prefix_lens.size(0) == s.B, "prefix_lens must be 1-D of length ", s.B,
           ", got shape ", prefix_lens.sizes());
  DK_CHECK(prefix_lens.scalar_type() == at::kLong || prefix_lens.scalar_type() == at::kInt,
           "prefix_lens must be int32 or int64, got ", prefix_lens.scalar_type());
  return s;
}

// prefix_lens values (an int64 tensor): 0 <= prefix_lens[b] and prefix_lens[b] + T <= S.
inline void check_prefix_lens_values(const at::Tensor& plens, const AttnShape& s) {
  if (s.B == 0) return;
  const auto mn = plens.min().item<int64_t>();
  const auto mx = plens.max().item<int64_t>();
  DK_CHECK(mn >= 0, "prefix_lens must be >= 0, got ", mn);
  DK_CHECK(mx <= s.S - s.T, "prefix_lens[b] + T must be <= the k/v length S = ", s.S,
           " (the tree's keys are at positions prefix_lens[b] .. prefix_lens[b] + T - 1), got max prefix_lens ", mx,
           " with T = ", s.T);
}

// Everything an impl needs after the checks: outputs, the int64 prefix lengths and the inputs with
// a unit last stride (the only layout requirement of the kernels). empty: nothing to compute.
struct AttnPrep {
  AttnShape s;
  at::Tensor out, lse, plens, q, k, v, mask;
  bool empty = false;
  RowBad bad{0};  // deferred checks: batch rows whose prefix_lens is out of range
};

// Deferred checks (deferred_checks.h): a prefix length outside [0, S - T] marks its batch row bad
// and reads as 0; S < T is a shape error (no prefix length fits).
inline at::Tensor deferred_prefix_lens(const at::Tensor& plens, const AttnShape& s, RowBad& bad) {
  DK_CHECK(s.B == 0 || s.S >= s.T, "prefix_lens[b] + T must be <= the k/v length S = ", s.S,
           ", which is shorter than the T = ", s.T, " tree keys");
  at::Tensor b = plens.lt(0).logical_or(plens.gt(s.S - s.T));
  bad.add(b, kErrPrefixLens);
  return safe_index(plens, b).contiguous();
}

// Deferred checks, after the kernel: a bad batch row's out and lse are NaN.
inline void finish_tree_attention(AttnPrep& p) {
  if (!p.bad.any_possible()) return;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  p.out.masked_fill_(p.bad.rows.reshape({p.s.B, 1, 1, 1}), nan);
  p.lse.masked_fill_(p.bad.rows.reshape({p.s.B, 1, 1}), nan);
}

inline AttnPrep prepare_tree_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& tree_mask, const at::Tensor& prefix_lens,
                                       std::optional<double> sm_scale, c10::string_view kv_layout) {
  AttnPrep p;
  p.s = check_tree_attention(q, k, v, tree_mask, prefix_lens, kv_layout);
  const AttnShape& s = p.s;
  if (sm_scale)
    DK_CHECK(std::isfinite(*sm_scale) && *sm_scale != 0.0, "sm_scale must be finite and nonzero, got ", *sm_scale);
  p.out = at::empty({s.B, s.T, s.Hq, s.D}, q.options());
  p.lse = at::empty({s.B, s.T, s.Hq}, q.options().dtype(at::kFloat));
  p.plens = prefix_lens.to(at::kLong).contiguous();
  if (deferred(q)) {
    p.bad = RowBad(s.B);
    p.plens = deferred_prefix_lens(p.plens, s, p.bad);
  } else {
    check_prefix_lens_values(p.plens, s);
  }
  p.empty = s.B == 0 || s.T == 0 || s.Hq == 0;
  if (p.empty) return p;
  p.q = q.stride(3) == 1 ? q : q.contiguous();
  p.k = k.stride(3) == 1 ? k : k.contiguous();
  p.v = v.stride(3) == 1 ? v : v.contiguous();
  p.mask = tree_mask.contiguous();
  return p;
}

// Fills the CPU (cpu::AttnArgs) or CUDA (cuda::TreeAttnArgs) kernel arguments: same field names.
template <class A>
void pack_tree_attention(A& a, const AttnPrep& p, std::optional<double> sm_scale) {
  const AttnShape& s = p.s;
  a.dtype = decltype(a.dtype)(float_dtype(p.q, "q"));
  a.B = s.B;
  a.T = s.T;
  a.Hq = s.Hq;
  a.Hkv = s.Hkv;
  a.D = s.D;
  a.S = s.S;
  const int sd = s.hnd ? 2 : 1, hd = s.hnd ? 1 : 2;
  a.q = p.q.data_ptr();
  a.q_sb = p.q.stride(0);
  a.q_st = p.q.stride(1);
  a.q_sh = p.q.stride(2);
  a.k = p.k.data_ptr();
  a.k_sb = p.k.stride(0);
  a.k_ss = p.k.stride(sd);
  a.k_sh = p.k.stride(hd);
  a.v = p.v.data_ptr();
  a.v_sb = p.v.stride(0);
  a.v_ss = p.v.stride(sd);
  a.v_sh = p.v.stride(hd);
  a.mask = static_cast<const uint8_t*>(p.mask.data_ptr());
  a.mask_packed = s.packed;
  a.mask_sb = p.mask.stride(0);
  a.mask_st = p.mask.stride(1);
  a.prefix_lens = p.plens.data_ptr<int64_t>();
  a.sm_scale = float(sm_scale ? *sm_scale : 1.0 / std::sqrt(double(s.D)));
  a.out = p.out.data_ptr();
  a.lse = p.lse.data_ptr<float>();
}

}  // namespace dk::torchb
