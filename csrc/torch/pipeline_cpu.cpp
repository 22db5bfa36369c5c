// The whole sampling step (issue 11): op schemas (a TORCH_LIBRARY_FRAGMENT of decodekit), the
// input checks and the CPU impls. Checks, allocation and argument packing only; the math lives in
// csrc/cpu/pipeline.h and csrc/include/decodekit/pipeline.h.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include "torch/pipeline_checks.h"

TORCH_LIBRARY_FRAGMENT(decodekit, m) {
  // x [B, V] logits; output row o reads x[indices[o]] (indices None: o). params float64
  // [n_out, 13] (columns: decodekit/pipeline.h PipeParam). order: 0 sequential, 1 joint, 2 vllm.
  // bitmask int32 [n_out, ceil(V/32)]; banned / bias_ids / prompt / output int64 [n_out, M] padded
  // with -1; bias_vals float32 like bias_ids. mode 0: sample -> (tokens int64 [n], valid bool [n],
  // logprob f32 [n], rank int64 [n], top_ids int64 [n, top_n], top_logprobs f32 [n, top_n], empty);
  // mode 1: (empties..., logits [n, V] in x's dtype: processed logits, -inf outside the survivors).
  m.def(
      "pipeline(Tensor x, Tensor? indices, Tensor params, int order, Tensor? bitmask, Tensor? banned, "
      "Tensor? bias_ids, Tensor? bias_vals, Tensor? prompt, Tensor? output, int mode, int top_n, "
      "bool raw_logprobs, bool want_logprob, Tensor? seed_arr, int seed_val, int offset) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // xgrammar's apply_token_bitmask_inplace: logits[i] (each i, or each i in indices) gets -inf
  // where bit i of bitmask[i] is 0; only the first min(V, 32 * words) tokens are touched.
  m.def("apply_token_bitmask_inplace(Tensor(a!) logits, Tensor bitmask, Tensor? indices) -> ()");
}

namespace dk::torchb {
namespace {

using Out7 = PipeOut7;

Out7 pipeline_cpu(const at::Tensor& x, const std::optional<at::Tensor>& indices, const at::Tensor& params,
                  int64_t order, const std::optional<at::Tensor>& bitmask, const std::optional<at::Tensor>& banned,
                  const std::optional<at::Tensor>& bias_ids, const std::optional<at::Tensor>& bias_vals,
                  const std::optional<at::Tensor>& prompt, const std::optional<at::Tensor>& output, int64_t mode,
                  int64_t top_n, bool raw_logprobs, bool want_logprob, const std::optional<at::Tensor>& seed_arr,
                  int64_t seed_val, int64_t offset) {
  RowSetup rs = setup_rows(x, indices, seed_arr, seed_val, offset, "logits");
  const int64_t n = rs.n_out;
  PipelinePack pk =
      pack_pipeline(x, n, params, order, bitmask, banned, bias_ids, bias_vals, prompt, output, mode, top_n);
  Out7 outs = pipeline_outputs(x, n, mode, top_n);
  if (n == 0) return outs;
  cpu::PipelineArgs a;
  a.in = as_matrix(rs.x);
  a.indices = rs.idx_ptr();
  a.n_out = n;
  pk.fill(a);
  a.seeds = rs.seeds_ptr();
  a.seed = uint64_t(rs.seed_val);
  a.offset = uint64_t(offset);
  a.mode = int(mode);
  a.top_n = top_n;
  a.raw_logprobs = raw_logprobs;
  a.want_logprob = want_logprob;
  set_pipeline_outputs(a, outs, mode);
  const auto& tab = cpu::active();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { tab.pipeline_rows(a, b, e); });
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
