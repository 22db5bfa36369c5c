// The whole sampling step (issue 11): the input checks and
// the CPU impls (schemas: csrc/torch/ops.cpp). Checks, allocation and argument packing only; the math lives in
// csrc/cpu/pipeline.h and csrc/include/decodekit/pipeline.h.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include "torch/pipeline_checks.h"

namespace dk::torchb {
namespace {

using Out7 = PipeOut7;

Out7 pipeline_cpu(const at::Tensor& x, const std::optional<at::Tensor>& indices, const at::Tensor& params,
                  int64_t order, const std::optional<at::Tensor>& bitmask, const std::optional<at::Tensor>& banned,
                  const std::optional<at::Tensor>& bias_ids, const std::optional<at::Tensor>& bias_vals,
                  const std::optional<at::Tensor>& prompt, const std::optional<at::Tensor>& output, int64_t mode,
                  int64_t top_n, bool raw_logprobs, bool want_logprob, const std::optional<at::Tensor>& seed_arr,
                  int64_t seed_val, int64_t offset, const std::optional<at::Tensor>& offset_arr) {
  RowSetup rs = setup_rows(x, indices, seed_arr, seed_val, offset, "logits", offset_arr);
  const int64_t n = rs.n_out;
  PipelinePack pk = pack_pipeline(x, n, params, order, bitmask, banned, bias_ids, bias_vals, prompt, output, mode,
                                  top_n, /*check_values=*/!rs.deferred);
  Out7 outs = pipeline_outputs(x, n, mode, top_n);
  if (n == 0) return outs;
  cpu::PipelineArgs a;
  a.in = as_matrix(rs.x);
  fill_pipeline_args(a, rs, pk, offset, mode, top_n, raw_logprobs, want_logprob, outs);
  const auto& tab = cpu::active();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { tab.pipeline_rows(a, b, e); });
  finish_bad_pipeline_rows(rs, outs, mode);
  return outs;
}

void apply_token_bitmask_cpu(at::Tensor logits, const at::Tensor& bitmask, const std::optional<at::Tensor>& indices) {
  BitmaskPack bp = pack_bitmask_inplace(logits, bitmask, indices);
  if (bp.rows == 0) return;
  cpu::BitmaskArgs a = bp.args();
  const auto& tab = cpu::active();
  at::parallel_for(0, bp.rows, 1, [&](int64_t b, int64_t e) { tab.bitmask_rows(a, b, e); });
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CPU, m) {
  m.impl("pipeline", &pipeline_cpu);
  m.impl("apply_token_bitmask_inplace", &apply_token_bitmask_cpu);
}

}  // namespace dk::torchb
