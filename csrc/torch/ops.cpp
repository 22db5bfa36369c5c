// The op schemas of the filtering/sampling family. Other families add theirs with
// TORCH_LIBRARY_FRAGMENT(decodekit, m) in their own binding file.
#include <torch/library.h>

TORCH_LIBRARY(decodekit, m) {
  // Inverse-CDF sampling with optional temperature / top-k / top-p / min-p, from logits or probs.
  // order: 0 = sequential (top_k first), 1 = joint. Returns (tokens int64, valid bool, logprobs f32).
  m.def("sample(Tensor x, Tensor? indices, bool is_probs, Tensor? temperature_arr, float temperature_val, "
        "Tensor? top_k_arr, int top_k_val, Tensor? top_p_arr, float top_p_val, Tensor? min_p_arr, float min_p_val, "
        "int order, Tensor? seed_arr, int seed_val, int offset) -> (Tensor, Tensor, Tensor)");
  // Gumbel-max sampling from logits.
  m.def("gumbel_sample(Tensor logits, Tensor? indices, Tensor? seed_arr, int seed_val, int offset) -> (Tensor, Tensor)");
  // Filters writing a [B, V] output. kind: 0 = mask logits (-inf, same dtype), 1 = renorm probs (f32),
  // 2 = softmax (f32).
  m.def("filter(Tensor x, int kind, bool is_probs, Tensor? temperature_arr, float temperature_val, "
        "Tensor? top_k_arr, int top_k_val, Tensor? top_p_arr, float top_p_val, Tensor? min_p_arr, float min_p_val, "
        "int order) -> Tensor");
}
