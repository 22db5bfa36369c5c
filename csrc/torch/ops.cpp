// The op schemas of the filtering/sampling family. Other families add theirs with
// TORCH_LIBRARY_FRAGMENT(decodekit, m) in their own binding file.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <cstdint>

TORCH_LIBRARY(decodekit, m) {
  // Inverse-CDF sampling with optional temperature / top-k / top-p / min-p, from logits or probs.
  // order: 0 = sequential (top_k first), 1 = joint. Returns (tokens int64, valid bool, logprobs f32).
  m.def(
      "sample(Tensor x, Tensor? indices, bool is_probs, Tensor? temperature_arr, float temperature_val, "
      "Tensor? top_k_arr, int top_k_val, Tensor? top_p_arr, float top_p_val, Tensor? min_p_arr, float min_p_val, "
      "int order, Tensor? seed_arr, int seed_val, int offset) -> (Tensor, Tensor, Tensor)");
  // Gumbel-max sampling from logits.
  m.def(
      "gumbel_sample(Tensor logits, Tensor? indices, Tensor? seed_arr, int seed_val, int offset) -> (Tensor, Tensor)");
  // Filters writing a [B, V] output. kind: 0 = mask logits (-inf, same dtype), 1 = renorm probs (f32),
  // 2 = softmax (f32).
  // One 63-bit seed from torch's default CPU generator, drawn exactly as
  // torch.randint(0, 2**63 - 1, (1,)) draws it: int64 [1] on the CPU. The Python wrappers call it
  // for seed=None inside torch.compile, so compiled and eager calls draw the same seed from the same
  // generator state (nondeterministic_seeded: never folded, deduplicated or replaced).
  m.def("draw_seed() -> Tensor", {at::Tag::nondeterministic_seeded});
  m.def(
      "filter(Tensor x, int kind, bool is_probs, Tensor? temperature_arr, float temperature_val, "
      "Tensor? top_k_arr, int top_k_val, Tensor? top_p_arr, float top_p_val, Tensor? min_p_arr, float min_p_val, "
      "int order) -> Tensor");
}

namespace {
at::Tensor draw_seed() { return at::randint(0, INT64_MAX, {1}, at::TensorOptions().dtype(at::kLong)); }
}  // namespace

TORCH_LIBRARY_IMPL(decodekit, CompositeExplicitAutograd, m) { m.impl("draw_seed", &draw_seed); }
