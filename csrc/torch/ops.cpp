// Every op schema of decodekit, one m.def per op, with its implementations named beside it:
//   CPU impls in csrc/torch/*_cpu.cpp, CUDA impls in csrc/cuda/*.cu (TORCH_LIBRARY_IMPL blocks there),
//   fake (meta) impls beside the Python wrappers (python/decodekit/*.py, @register_fake), and the
//   executable specification in python/decodekit/reference.py.
// Also here: the ops with no device kernel (draw_seed, check_errors, _set_deferred_checks) and the
// per-device error flag of the deferred checks (torch/deferred_checks.h).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include "torch/deferred_checks.h"

TORCH_LIBRARY(decodekit, m) {
  // ---- sampling family --------------------------------------------------------------------------
  // Inverse-CDF sampling with optional temperature / top-k / top-p / min-p, from logits or probs.
  // order: 0 = sequential (top_k first), 1 = joint. Returns (tokens int64, valid bool, logprobs f32).
  // seed_arr: int64 [n] (per output row) or [1] (the scalar form); offset_arr: int64 [n] or [1],
  // added to offset. Both may live on the device (read by the kernels only).
  //   CPU: sample_cpu (torch/sampling_cpu.cpp)          CUDA: sample_cuda (cuda/sampling.cu)
  m.def(
      "sample(Tensor x, Tensor? indices, bool is_probs, Tensor? temperature_arr, float temperature_val, "
      "Tensor? top_k_arr, int top_k_val, Tensor? top_p_arr, float top_p_val, Tensor? min_p_arr, float min_p_val, "
      "int order, Tensor? seed_arr, int seed_val, int offset, Tensor? offset_arr=None) -> (Tensor, Tensor, Tensor)");
  // Gumbel-max sampling from logits.
  //   CPU: gumbel_sample_cpu (torch/sampling_cpu.cpp)   CUDA: gumbel_sample_cuda (cuda/sampling.cu)
  m.def(
      "gumbel_sample(Tensor logits, Tensor? indices, Tensor? seed_arr, int seed_val, int offset, "
      "Tensor? offset_arr=None) -> (Tensor, Tensor)");
  // Filters writing a [B, V] output. kind: 0 = mask logits (-inf, same dtype), 1 = renorm probs (f32),
  // 2 = softmax (f32).
  //   CPU: filter_cpu (torch/sampling_cpu.cpp)          CUDA: filter_cuda (cuda/sampling.cu)
  m.def(
      "filter(Tensor x, int kind, bool is_probs, Tensor? temperature_arr, float temperature_val, "
      "Tensor? top_k_arr, int top_k_val, Tensor? top_p_arr, float top_p_val, Tensor? min_p_arr, float min_p_val, "
      "int order) -> Tensor");
  // One 63-bit seed from torch's default CPU generator, drawn exactly as
  // torch.randint(0, 2**63 - 1, (1,)) draws it: int64 [1] on the CPU. The Python wrappers call it
  // for seed=None inside torch.compile, so compiled and eager calls draw the same seed from the same
  // generator state (nondeterministic_seeded: never folded, deduplicated or replaced).
  //   any device: draw_seed (here)
  m.def("draw_seed() -> Tensor", {at::Tag::nondeterministic_seeded});
  // The seed and offset of torch's CUDA generator (the default one of like's device, or
  // `generator`) for one call, advancing it by `increment`: (seed int64 [1], offset int64 [1]) on
  // like's device. Under CUDA graph capture they are computed on the device from the generator's
  // graph-safe state (seed and offset pointers plus the captured offset, as
  // at::cuda::philox::unpack reads them), so every replay samples a fresh stream.
  //   CUDA: philox_state_cuda (cuda/sampling.cu)
  m.def("philox_state(Tensor like, int increment, Generator? generator=None) -> (Tensor, Tensor)",
        {at::Tag::nondeterministic_seeded});
  // The deferred checks (torch/deferred_checks.h): read, reset and raise the error flags.
  //   any device: check_errors, _set_deferred_checks (here)
  m.def("check_errors() -> ()");
  m.def("_set_deferred_checks(bool on) -> ()");

  // ---- the whole sampling step (issue 11) ---------------------------------------------------------
  // x [B, V] logits; output row o reads x[indices[o]] (indices None: o). params float64
  // [n_out, 13] (columns: decodekit/pipeline.h PipeParam). order: 0 sequential, 1 joint, 2 vllm.
  // bitmask int32 [n_out, ceil(V/32)]; banned / bias_ids / prompt / output int64 [n_out, M] padded
  // with -1; bias_vals float32 like bias_ids. mode 0: sample -> (tokens int64 [n], valid bool [n],
  // logprob f32 [n], rank int64 [n], top_ids int64 [n, top_n], top_logprobs f32 [n, top_n], empty);
  // mode 1: (empties..., logits [n, V] in x's dtype: processed logits, -inf outside the survivors).
  // seed_arr / offset_arr as for sample (device tensors read by the kernel only).
  //   CPU: pipeline_cpu (torch/pipeline_cpu.cpp)        CUDA: pipeline_cuda (cuda/pipeline.cu)
  m.def(
      "pipeline(Tensor x, Tensor? indices, Tensor params, int order, Tensor? bitmask, Tensor? banned, "
      "Tensor? bias_ids, Tensor? bias_vals, Tensor? prompt, Tensor? output, int mode, int top_n, "
      "bool raw_logprobs, bool want_logprob, Tensor? seed_arr, int seed_val, int offset, Tensor? offset_arr=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // xgrammar's apply_token_bitmask_inplace: logits[i] (each i, or each i in indices) gets -inf
  // where bit i of bitmask[i] is 0; only the first min(V, 32 * words) tokens are touched.
  //   CPU: apply_token_bitmask_cpu (torch/pipeline_cpu.cpp)  CUDA: apply_token_bitmask_cuda (cuda/pipeline.cu)
  m.def("apply_token_bitmask_inplace(Tensor(a!) logits, Tensor bitmask, Tensor? indices) -> ()");

  // ---- speculative verification ---------------------------------------------------------------
  // Chain verification. target_kind: 0 = target probs [B, N+1, V] (float32), 1 = target logits
  // [B, N+1, V] with per-row temperature (0 = greedy) / top-k / top-p / min-p applied inside the
  // kernel. draft_probs [B, N, V] float32 or None (one-hot drafts). num_draft_tokens [B] or None.
  // Returns (output_token_ids int64 [B, N+1] padded with -1, accepted_num int32 [B],
  // emitted_num int32 [B]).
  //   CPU: chain_verify_cpu (torch/speculative_cpu.cpp) CUDA: chain_verify_cuda (cuda/speculative.cu)
  m.def(
      "chain_verify(Tensor target, Tensor draft_token_ids, Tensor? draft_probs, Tensor? num_draft_tokens, "
      "int target_kind, Tensor? temperature_arr, float temperature_val, Tensor? top_k_arr, int top_k_val, "
      "Tensor? top_p_arr, float top_p_val, Tensor? min_p_arr, float min_p_val, int order, Tensor? seed_arr, "
      "int seed_val, int offset, Tensor? offset_arr=None) -> (Tensor, Tensor, Tensor)");
  // Tree verification in SGLang's layout. target_kind: 0 = probs [B, T, V], 1 = logits [B, T, V]
  // (filters as above), 2 = predicted ids [B, T] (greedy). num_speculative_tokens = accept_index
  // width W. coins [B, T] / coins_final [B] (both or neither; one-hot drafts): caller uniforms
  // instead of Philox, with SGLang's threshold_single / threshold_acc (decodekit/speculative.h
  // SpecCoin). Returns (predicts int64 [B*T] (-1 where not written), accept_index int32 [B, W]
  // (-1 padded), accept_token_num int32 [B]).
  //   CPU: tree_verify_cpu (torch/speculative_cpu.cpp)  CUDA: tree_verify_cuda (cuda/speculative.cu)
  m.def(
      "tree_verify(Tensor candidates, Tensor retrive_index, Tensor retrive_next_token, "
      "Tensor retrive_next_sibling, Tensor target, Tensor? draft_probs, int num_speculative_tokens, "
      "int target_kind, Tensor? temperature_arr, float temperature_val, Tensor? top_k_arr, int top_k_val, "
      "Tensor? top_p_arr, float top_p_val, Tensor? min_p_arr, float min_p_val, int order, Tensor? seed_arr, "
      "int seed_val, int offset, Tensor? coins=None, Tensor? coins_final=None, float threshold_single=1.0, "
      "float threshold_acc=1.0, Tensor? offset_arr=None) -> (Tensor, Tensor, Tensor)");
  // Tree from a parent array [B, T] (-1 for the root, node 0). Returns (packed tree mask uint8
  // [B, T, ceil(T/8)], positions int64 [B*T], retrive_index, retrive_next_token,
  // retrive_next_sibling int64 [B, T]).
  //   CPU: build_tree_cpu (torch/speculative_cpu.cpp)   CUDA: build_tree_cuda (cuda/speculative.cu)
  m.def("build_tree(Tensor parents, Tensor prefix_lens) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- tree attention ---------------------------------------------------------------------------
  // q [B,T,Hq,D]; k, v [B,S,Hkv,D] (kv_layout "NHD") or [B,Hkv,S,D] ("HND"); tree_mask bool [B,T,T] or
  // packed uint8 [B,T,ceil(T/8)] (little-endian bits); prefix_lens int [B]. sm_scale None means 1/sqrt(D).
  // Returns (out [B,T,Hq,D] in q's dtype, lse [B,T,Hq] float32, natural log).
  //   CPU: tree_attention_cpu (torch/attention_cpu.cpp) CUDA: tree_attention_cuda (cuda/attention.cu)
  m.def(
      "tree_attention(Tensor q, Tensor k, Tensor v, Tensor tree_mask, Tensor prefix_lens, float? sm_scale, "
      "str kv_layout) -> (Tensor, Tensor)");
}

namespace dk::torchb {

namespace {
std::mutex g_flag_mu;
std::map<std::pair<int, int>, at::Tensor> g_flags;  // (device type, index) -> int32 [1]
bool g_deferred_cpu = false;

const std::pair<int32_t, const char*> kErrorText[] = {
    {kErrIndices, "indices: a value outside [0, B)"},
    {kErrTemperature,
     "temperature: a value that is neither 0 (greedy) nor a normal float32 in [1.1754944e-38, 3.4028235e+38] "
     "(or 0 for softmax), or NaN"},
    {kErrTopK, "top_k: a float value that is not an integer"},
    {kErrTopP, "top_p: a value <= 0 or NaN (top_p must be in (0, 1]; values >= 1 disable it)"},
    {kErrMinP, "min_p: a value outside [0, 1] or NaN"},
    {kErrOffset, "offset: an offset tensor value outside [0, 2^48)"},
    {kErrDraftIds, "draft_token_ids: a value outside [0, V) (within num_draft_tokens)"},
    {kErrNumDraft, "num_draft_tokens: a value outside [0, N]"},
    {kErrSpecFilters,
     "top_k / top_p / min_p: enabled in the logits form of speculative verification, which runs them on the CPU "
     "only for now"},
    {kErrRetriveIndex, "retrive_index: a value outside [0, B*T), or a value used twice"},
    {kErrTree, "tree: candidates / retrive_next_token / retrive_next_sibling do not form a valid tree"},
    {kErrCoins, "coins: a value outside [0, 1] or NaN"},
    {kErrPrefixLens, "prefix_lens: a value < 0, or too large (tree_attention: prefix_lens + T > S)"},
    {kErrParents, "parents: not a valid tree (build_tree)"},
    {kErrPipeValues,
     "pipeline: a sampling parameter out of its range (temperature, top_k, top_p, min_p, penalties, typical_p, "
     "epsilon, eta, top_h, top_n_sigma, min_tokens_to_keep), a token id outside [-1, V) in banned_token_ids / "
     "logit_bias / prompt_token_ids / output_token_ids, or a non-finite logit_bias value"},
};
}  // namespace

at::Tensor error_flag(const at::Device& device) {
  std::lock_guard<std::mutex> lock(g_flag_mu);
  auto key = std::make_pair(int(device.type()), int(device.has_index() ? device.index() : 0));
  auto it = g_flags.find(key);
  if (it != g_flags.end()) return it->second;
  at::Tensor f = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device));
  g_flags.emplace(key, f);
  return f;
}

bool deferred(const at::Tensor& t) { return t.is_cuda() || (g_deferred_cpu && t.is_cpu()); }

void set_deferred_on_cpu(bool on) { g_deferred_cpu = on; }

void check_errors_now() {
  std::map<std::pair<int, int>, at::Tensor> flags;
  {
    std::lock_guard<std::mutex> lock(g_flag_mu);
    flags = g_flags;
  }
  std::string msg;
  for (auto& kv : flags) {
    const int32_t bits = kv.second.item<int32_t>();  // the one host read, made because the user asked
    if (bits == 0) continue;
    kv.second.zero_();
    msg += std::string(msg.empty() ? "" : "; ") + "on " + kv.second.device().str() + ":";
    for (const auto& e : kErrorText)
      if (bits & e.first) msg += std::string(" [") + e.second + "]";
  }
  TORCH_CHECK_VALUE(msg.empty(),
                    "decodekit: invalid values reached ops with deferred checks (their rows got the "
                    "documented defined results): ",
                    msg);
}

namespace {
at::Tensor draw_seed() { return at::randint(0, INT64_MAX, {1}, at::TensorOptions().dtype(at::kLong)); }
void check_errors_op() { check_errors_now(); }
void set_deferred_op(bool on) { set_deferred_on_cpu(on); }
}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CompositeExplicitAutograd, m) {
  m.impl("draw_seed", &draw_seed);
  m.impl("check_errors", &check_errors_op);
  m.impl("_set_deferred_checks", &set_deferred_op);
}

}  // namespace dk::torchb
