// Tree attention: op schema, input checks, argument packing and the CPU impl (no math here:
// the kernel is csrc/cpu/isa/attention.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include "cpu/attention_kernels.h"
#include "torch/attention_checks.h"

TORCH_LIBRARY_FRAGMENT(decodekit, m) {
  // q [B,T,Hq,D]; k, v [B,S,Hkv,D] (kv_layout "NHD") or [B,Hkv,S,D] ("HND"); tree_mask bool [B,T,T] or
  // packed uint8 [B,T,ceil(T/8)] (little-endian bits); prefix_lens int [B]. sm_scale None means 1/sqrt(D).
  // Returns (out [B,T,Hq,D] in q's dtype, lse [B,T,Hq] float32, natural log).
  m.def("tree_attention(Tensor q, Tensor k, Tensor v, Tensor tree_mask, Tensor prefix_lens, float? sm_scale, "
        "str kv_layout) -> (Tensor, Tensor)");
}

namespace dk::torchb {
namespace {

std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, const at::Tensor& tree_mask,
                                                      const at::Tensor& prefix_lens, std::optional<double> sm_scale,
                                                      c10::string_view kv_layout) {
  AttnShape s = check_tree_attention(q_in, k_in, v_in, tree_mask, prefix_lens, kv_layout);
  if (sm_scale) DK_CHECK(std::isfinite(*sm_scale) && *sm_scale != 0.0, "sm_scale must be finite and nonzero, got ", *sm_scale);
  auto out = at::empty({s.B, s.T, s.Hq, s.D}, q_in.options());
  auto lse = at::empty({s.B, s.T, s.Hq}, q_in.options().dtype(at::kFloat));
  auto plens = prefix_lens.to(at::kLong).contiguous();
  check_prefix_lens_values(plens, s);
  if (s.B == 0 || s.T == 0 || s.Hq == 0) return {out, lse};
  // The kernel needs a unit stride in the last dimension only.
  auto q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  auto k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  auto v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  auto mask = tree_mask.contiguous();

  cpu::AttnArgs a;
  a.dtype = float_dtype(q, "q");
  a.B = s.B; a.T = s.T; a.Hq = s.Hq; a.Hkv = s.Hkv; a.D = s.D; a.S = s.S;
  a.q = q.data_ptr();
  a.q_sb = q.stride(0); a.q_st = q.stride(1); a.q_sh = q.stride(2);
  const int sd = s.hnd ? 2 : 1, hd = s.hnd ? 1 : 2;
  a.k = k.data_ptr();
  a.k_sb = k.stride(0); a.k_ss = k.stride(sd); a.k_sh = k.stride(hd);
  a.v = v.data_ptr();
  a.v_sb = v.stride(0); a.v_ss = v.stride(sd); a.v_sh = v.stride(hd);
  a.mask = static_cast<const uint8_t*>(mask.data_ptr());
  a.mask_packed = s.packed;
  a.mask_sb = mask.stride(0); a.mask_st = mask.stride(1);
  a.prefix_lens = plens.data_ptr<int64_t>();
  a.sm_scale = float(sm_scale ? *sm_scale : 1.0 / std::sqrt(double(s.D)));
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  const auto& tab = cpu::attn_active();
  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t b, int64_t e) { tab.tree_attention(a, b, e); });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) { m.impl("tree_attention", &tree_attention_cpu); }

}  // namespace dk::torchb
