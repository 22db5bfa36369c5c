// Input checks and argument packing of the pipeline ops (shared by the CPU and CUDA bindings).
// Shapes, dtypes, devices and ranges only; every error is a ValueError naming the argument. With
// the deferred checks (deferred_checks.h: always on CUDA, forced on the CPU for tests) only
// metadata is checked here (check_values = false: no device value is read on the host): the
// kernels (csrc/cuda/pipeline.cuh, csrc/cpu/pipeline.h) make a row with a bad value invalid and set
// kErrPipeValues in the error flag; bad indices / offsets are handled as for the sampling ops.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include "torch/checks.h"

namespace dk::torchb {

// Names of the params columns (decodekit/pipeline.h PipeParam), as the Python keywords.
inline const char* pipe_param_name(int c) {
  static const char* names[kPipeParams] = {"temperature",
                                           "top_k",
                                           "top_p",
                                           "min_p",
                                           "repetition_penalty",
                                           "frequency_penalty",
                                           "presence_penalty",
                                           "top_n_sigma",
                                           "typical_p",
                                           "epsilon",
                                           "eta",
                                           "top_h",
                                           "min_tokens_to_keep"};
  return names[c];
}

// Range of one parameter value; returns the rule it breaks (nullptr when fine).
inline const char* pipe_param_error(int c, double v) {
  if (pipe_param_ok(c, v)) return nullptr;
  if (std::isnan(v)) return "must not be NaN";
  switch (c) {
    case kPT: return "must be 0 (greedy) or in [1.1754944e-38, 3.4028235e+38] (a normal float32)";
    case kPTopK: return "must be an integer";
    case kPTopP: return "must be in (0, 1]";
    case kPMinP: return "must be in [0, 1]";
    case kPRep: return "must be finite and > 0 (1 = off)";
    case kPTypical: return "must be in (0, 1] (1 = off)";
    case kPEps:
    case kPEta: return "must be in [0, 1) (0 = off)";
    case kPTopH: return "must be in [0, 1] (0 = off)";
    case kPMtk: return "must be an integer >= 1";
    default: return "must be finite";
  }
}

// A [n, M] table of token ids padded with -1 (int32 or int64), as contiguous int64.
inline std::optional<at::Tensor> id_table(const at::Tensor& x, const std::optional<at::Tensor>& t, int64_t n, int64_t V,
                                          const char* name, bool check_values) {
  if (!t) return std::nullopt;
  check_same_device(x, t, name);
  DK_CHECK(t->scalar_type() == at::kLong || t->scalar_type() == at::kInt, name, " must be int64 or int32, got ",
           t->scalar_type());
  DK_CHECK(t->dim() == 2 && t->size(0) == n, name, " must be 2-D [", n, ", M] (one row per output row), got shape ",
           t->sizes());
  at::Tensor c = t->to(at::kLong).contiguous();
  if (check_values && c.numel()) {
    const int64_t mn = c.min().item<int64_t>(), mx = c.max().item<int64_t>();
    DK_CHECK(mn >= -1 && mx < V, name, " must hold token ids in [0, ", V, ") or -1 (padding), got range [", mn, ", ",
             mx, "]");
  }
  return c;
}

struct PipelinePack {
  at::Tensor params;
  int order = 0;
  std::optional<at::Tensor> bitmask, banned, bias_ids, bias_vals, prompt, output;
  template <class Args>  // cpu::PipelineArgs, cuda::PipeArgs
  void fill(Args& a) const {
    a.params = params.data_ptr<double>();
    a.order = order;
    if (bitmask) {
      a.bitmask = bitmask->data_ptr<int32_t>();
      a.bitmask_words = bitmask->size(1);
    }
    if (banned) {
      a.banned = banned->data_ptr<int64_t>();
      a.n_banned = banned->size(1);
    }
    if (bias_ids) {
      a.bias_ids = bias_ids->data_ptr<int64_t>();
      a.bias_vals = bias_vals->data_ptr<float>();
      a.n_bias = bias_ids->size(1);
    }
    if (prompt) {
      a.prompt = prompt->data_ptr<int64_t>();
      a.n_prompt = prompt->size(1);
    }
    if (output) {
      a.output = output->data_ptr<int64_t>();
      a.n_output = output->size(1);
    }
  }
};

inline PipelinePack pack_pipeline(const at::Tensor& x, int64_t n, const at::Tensor& params, int64_t order,
                                  const std::optional<at::Tensor>& bitmask, const std::optional<at::Tensor>& banned,
                                  const std::optional<at::Tensor>& bias_ids, const std::optional<at::Tensor>& bias_vals,
                                  const std::optional<at::Tensor>& prompt, const std::optional<at::Tensor>& output,
                                  int64_t mode, int64_t top_n, bool check_values = true) {
  const int64_t V = x.size(1);
  DK_CHECK(order >= 0 && order <= 2, "order must be 0 (sequential), 1 (joint) or 2 (vllm), got ", order);
  DK_CHECK(mode == 0 || mode == 1, "mode must be 0 (sample) or 1 (mask logits), got ", mode);
  DK_CHECK(top_n >= 0 && top_n <= V, "top_logprobs must be in [0, V = ", V, "], got ", top_n);
  PipelinePack p;
  p.order = int(order);
  DK_CHECK(params.dim() == 2 && params.size(0) == n && params.size(1) == kPipeParams, "params must be [", n, ", ",
           int(kPipeParams), "], got shape ", params.sizes());
  // CPU: to the host and range-checked; CUDA: stays on the device, the kernel checks each row
  // (pipe_param_ok). top_k beyond +-4e18 (and +-inf) is clamped by pipe_row on both.
  check_same_device(x, params, "params");
  p.params = params.to(check_values ? at::Device(at::kCPU) : x.device()).to(at::kDouble).contiguous();
  if (check_values) {
    const double* q = p.params.data_ptr<double>();
    for (int64_t r = 0; r < n; ++r)
      for (int c = 0; c < kPipeParams; ++c)
        if (const char* e = pipe_param_error(c, q[r * kPipeParams + c]))
          DK_CHECK(false, pipe_param_name(c), " ", e, ", got ", q[r * kPipeParams + c],
                   n > 1 ? " (in one of the rows)" : "");
  }
  if (bitmask) {
    check_same_device(x, bitmask, "allowed_token_bitmask");
    DK_CHECK(bitmask->scalar_type() == at::kInt, "allowed_token_bitmask must be int32, got ", bitmask->scalar_type());
    DK_CHECK(bitmask->dim() == 2 && bitmask->size(0) == n && bitmask->size(1) == (V + 31) / 32,
             "allowed_token_bitmask must be [", n, ", ", (V + 31) / 32, "] (int32 words, ceil(V/32)), got shape ",
             bitmask->sizes());
    p.bitmask = bitmask->contiguous();
  }
  p.banned = id_table(x, banned, n, V, "banned_token_ids", check_values);
  p.bias_ids = id_table(x, bias_ids, n, V, "logit_bias", check_values);
  DK_CHECK(bool(bias_ids) == bool(bias_vals), "logit_bias must be a pair (token_ids, values)");
  if (bias_vals) {
    check_same_device(x, bias_vals, "logit_bias");
    DK_CHECK(bias_vals->sizes() == bias_ids->sizes(), "logit_bias values must have the shape of its token ids ",
             bias_ids->sizes(), ", got ", bias_vals->sizes());
    p.bias_vals = bias_vals->to(at::kFloat).contiguous();
    if (check_values && p.bias_vals->numel())
      DK_CHECK(p.bias_vals->isfinite().all().item<bool>(), "logit_bias values must be finite");
  }
  p.prompt = id_table(x, prompt, n, V, "prompt_token_ids", check_values);
  p.output = id_table(x, output, n, V, "output_token_ids", check_values);
  return p;
}

// The op's seven outputs (sample mode: tokens, valid, logprob, rank, top ids, top logprobs; mask
// mode: the logits), empty where the mode does not produce them.
using PipeOut7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
inline PipeOut7 pipeline_outputs(const at::Tensor& x, int64_t n, int64_t mode, int64_t top_n) {
  auto L = x.options().dtype(at::kLong);
  auto F = x.options().dtype(at::kFloat);
  const int64_t s = mode == 0 ? n : 0;
  return {at::empty({s}, L),
          at::empty({s}, x.options().dtype(at::kBool)),
          at::empty({s}, F),
          at::empty({s}, L),
          at::empty({s, top_n}, L),
          at::empty({s, top_n}, F),
          at::empty({mode == 0 ? 0 : n, x.size(1)}, x.options())};
}
template <class Args>
void set_pipeline_outputs(Args& a, PipeOut7& o, int64_t mode);

// The argument fields the CPU and CUDA bindings fill alike: rows, tables, randomness (row_rng_key's
// fields), mode, outputs and (deferred checks) the error flag the kernel sets for a bad value.
template <class Args>  // cpu::PipelineArgs, cuda::PipeArgs
void fill_pipeline_args(Args& a, const RowSetup& rs, const PipelinePack& pk, int64_t offset, int64_t mode,
                        int64_t top_n, bool raw_logprobs, bool want_logprob, PipeOut7& outs) {
  a.indices = rs.idx_ptr();
  a.n_out = rs.n_out;
  pk.fill(a);
  rs.fill_rng(a, offset);
  a.mode = int(mode);
  a.top_n = top_n;
  a.raw_logprobs = raw_logprobs;
  a.want_logprob = want_logprob;
  if (rs.deferred) {
    a.error_flag = error_flag(rs.x.device()).data_ptr<int32_t>();
    a.error_bit = kErrPipeValues;
  }
  set_pipeline_outputs(a, outs, mode);
}

// Deferred checks, after the kernel: rows with a bad index or offset get the defined result (sample:
// token 0, valid False, logprob 0, rank 0, top ids 0 with logprobs -inf; mask mode: a NaN row).
inline void finish_bad_pipeline_rows(const RowSetup& rs, PipeOut7& o, int64_t mode) {
  if (!rs.bad.any_possible()) return;
  if (mode == 1) return finish_bad_filter_rows(rs.bad, std::get<6>(o));
  finish_bad_rows(rs, std::get<0>(o), std::get<1>(o), &std::get<2>(o));
  std::get<3>(o).masked_fill_(rs.bad.rows, 0);
  std::get<4>(o).masked_fill_(rs.bad.rows.unsqueeze(1), 0);
  std::get<5>(o).masked_fill_(rs.bad.rows.unsqueeze(1), -std::numeric_limits<double>::infinity());
}

template <class Args>  // cpu::PipelineArgs, cuda::PipeArgs
void set_pipeline_outputs(Args& a, PipeOut7& o, int64_t mode) {
  if (mode == 0) {
    a.out_tokens = std::get<0>(o).template data_ptr<int64_t>();
    a.out_valid = std::get<1>(o).template data_ptr<bool>();
    a.out_logprob = std::get<2>(o).template data_ptr<float>();
    a.out_rank = std::get<3>(o).template data_ptr<int64_t>();
    a.out_top_ids = std::get<4>(o).template data_ptr<int64_t>();
    a.out_top_lp = std::get<5>(o).template data_ptr<float>();
  } else {
    a.out_logits = std::get<6>(o).data_ptr();
  }
}

// apply_token_bitmask_inplace (xgrammar semantics).
struct BitmaskPack {
  at::Tensor logits, bitmask;
  std::optional<at::Tensor> idx;
  int64_t rows = 0;
  cpu::BitmaskArgs args() const {
    cpu::BitmaskArgs a;
    a.data = logits.data_ptr();
    a.dtype = float_dtype(logits, "logits");
    a.row_stride = logits.dim() == 2 ? logits.stride(0) : 0;
    a.words = bitmask.data_ptr<int32_t>();
    a.word_stride = bitmask.dim() == 2 ? bitmask.stride(0) : 0;
    a.tokens = std::min<int64_t>(logits.size(-1), 32 * bitmask.size(-1));
    a.indices = idx ? idx->data_ptr<int64_t>() : nullptr;
    return a;
  }
};

inline BitmaskPack pack_bitmask_inplace(const at::Tensor& logits, const at::Tensor& bitmask,
                                        const std::optional<at::Tensor>& indices) {
  float_dtype(logits, "logits");
  check_same_device(logits, bitmask, "bitmask");
  check_same_device(logits, indices, "indices");
  DK_CHECK(logits.dim() == 1 || logits.dim() == 2, "logits must be 1-D or 2-D, got shape ", logits.sizes());
  DK_CHECK(bitmask.dim() == logits.dim(), "bitmask must have the same number of dimensions as logits, got ",
           bitmask.dim(), " and ", logits.dim());
  DK_CHECK(bitmask.scalar_type() == at::kInt, "bitmask must be int32, got ", bitmask.scalar_type());
  DK_CHECK(logits.stride(-1) == 1, "logits must be contiguous in the last dimension");
  BitmaskPack p;
  p.logits = logits;
  p.bitmask = bitmask.contiguous();
  const int64_t B = logits.dim() == 2 ? logits.size(0) : 1;
  DK_CHECK(p.bitmask.dim() == 1 || p.bitmask.size(0) == B, "bitmask must have one row per logits row (", B,
           "), got shape ", bitmask.sizes());
  if (indices) {
    DK_CHECK(logits.dim() == 2, "indices need 2-D logits");
    if (deferred(logits)) {  // a bad index (outside [0, B)) becomes -1: the kernels skip that entry
      DK_CHECK(indices->dim() == 1, "indices must be 1-D, got shape ", indices->sizes());
      DK_CHECK(indices->scalar_type() == at::kLong || indices->scalar_type() == at::kInt,
               "indices must be int32 or int64, got ", indices->scalar_type());
      at::Tensor idx = indices->to(at::kLong);
      at::Tensor b = idx.lt(0).logical_or(idx.ge(B));
      RowBad(idx.numel()).add(b, kErrIndices);
      p.idx = at::where(b, at::full({}, -1, idx.options()), idx).contiguous();
    } else {
      check_indices(*indices, B, "indices");
      p.idx = indices->to(at::kLong).contiguous();
    }
    p.rows = indices->size(0);
  } else {
    p.rows = B;
  }
  return p;
}

}  // namespace dk::torchb
