// CUDA implementations of the whole-step ops (pipeline, apply_token_bitmask_inplace): the shared
// checks and packing of csrc/torch/pipeline_checks.h in their metadata-only form (shapes, dtypes,
// devices; no device value is read on the host: the deferred checks of deferred_checks.h), then
// one launch on the current stream. Sync-free and graph-capturable. No math
// here; the kernels live in csrc/cuda/pipeline.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include "cuda/pipeline.cuh"
#include "torch/cuda_binding.h"
#include "torch/pipeline_checks.h"

namespace dk::torchb {
namespace {

static_assert(int(cpu::DType::F32) == int(cuda::PipeDType::F32) &&
                  int(cpu::DType::BF16) == int(cuda::PipeDType::BF16) &&
                  int(cpu::DType::F16) == int(cuda::PipeDType::F16),
              "dtype codes shared by the CPU and CUDA kernels");

void check_on_cuda(const at::Tensor& x, const char* name) {
  DK_CHECK(x.is_cuda(), name, " must be a CUDA tensor here (got a tensor on ", x.device(),
           "); all tensor arguments must be on the same device");
}

PipeOut7 pipeline_cuda(const at::Tensor& x, const std::optional<at::Tensor>& indices, const at::Tensor& params,
                       int64_t order, const std::optional<at::Tensor>& bitmask, const std::optional<at::Tensor>& banned,
                       const std::optional<at::Tensor>& bias_ids, const std::optional<at::Tensor>& bias_vals,
                       const std::optional<at::Tensor>& prompt, const std::optional<at::Tensor>& output, int64_t mode,
                       int64_t top_n, bool raw_logprobs, bool want_logprob, const std::optional<at::Tensor>& seed_arr,
                       int64_t seed_val, int64_t offset, const std::optional<at::Tensor>& offset_arr) {
  check_on_cuda(x, "logits");
  c10::cuda::CUDAGuard guard(x.device());
  RowSetup rs = setup_rows(x, indices, seed_arr, seed_val, offset, "logits", offset_arr);  // deferred on CUDA
  const int64_t n = rs.n_out;
  PipelinePack pk = pack_pipeline(x, n, params, order, bitmask, banned, bias_ids, bias_vals, prompt, output, mode,
                                  top_n, /*check_values=*/false);
  PipeOut7 outs = pipeline_outputs(x, n, mode, top_n);
  if (n == 0) return outs;
  cuda::PipeArgs a;
  const cpu::Matrix m = as_matrix(rs.x);
  a.x = m.data;
  a.dtype = cuda::PipeDType(int(m.dtype));
  a.V = m.V;
  a.row_stride = m.row_stride;
  fill_pipeline_args(a, rs, pk, offset, mode, top_n, raw_logprobs, want_logprob, outs);
  a = cuda::pipe_plan(a, device_sms(x));  // one CTA per row, or split rows when rows < SMs
  auto ws = at::empty({cuda::pipe_workspace_bytes(n, a.V, cuda::pipe_list_entries(a), a.splits)},
                      x.options().dtype(at::kByte));
  a.workspace = ws.data_ptr();
  C10_CUDA_CHECK(cuda::launch_pipeline(a, stream_of(x)));
  finish_bad_pipeline_rows(rs, outs, mode);
  return outs;
}

void apply_token_bitmask_cuda(at::Tensor logits, const at::Tensor& bitmask, const std::optional<at::Tensor>& indices) {
  check_on_cuda(logits, "logits");
  c10::cuda::CUDAGuard guard(logits.device());
  BitmaskPack bp = pack_bitmask_inplace(logits, bitmask, indices);
  if (bp.rows == 0) return;
  const cpu::BitmaskArgs c = bp.args();
  cuda::BitmaskInplaceArgs a;
  a.x = c.data;
  a.dtype = cuda::PipeDType(int(c.dtype));
  a.row_stride = c.row_stride;
  a.words = c.words;
  a.word_stride = c.word_stride;
  a.tokens = c.tokens;
  a.indices = c.indices;
  a.rows = bp.rows;
  C10_CUDA_CHECK(cuda::launch_bitmask_inplace(a, stream_of(logits)));
}

}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CUDA, m) {
  m.impl("pipeline", &pipeline_cuda);
  m.impl("apply_token_bitmask_inplace", &apply_token_bitmask_cuda);
}

}  // namespace dk::torchb
