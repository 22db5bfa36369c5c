// Sync-free ("deferred") value checks of the bindings (README "CUDA in a serving engine").
//
// On CUDA tensors a binding checks metadata only (shapes, dtypes, devices, strides) on the host.
// The VALUES of parameters, indices, offsets, num_draft_tokens, retrive_index, coins and
// prefix_lens are checked by tensor ops queued on the input's stream, never read on the host:
//   - a row whose value is bad gets a defined result (see each op) and its kernel inputs are
//     replaced by safe ones first, so no kernel reads or writes out of bounds;
//   - the problem sets a bit of a per-device int32 error flag, which only decodekit.check_errors()
//     (torch.ops.decodekit.check_errors) reads: that read is the one host sync, made when the
//     user asks, and it raises a ValueError naming the arguments and resets the flag.
// CPU tensors keep the eager ValueErrors (the checks in checks.h / speculative_common.h), unless
// the deferred mode is forced for tests (decodekit._set_deferred_checks(True)).
#pragma once
#include <ATen/ATen.h>
#include <cstdint>
#include <string>

namespace dk::torchb {

// Error flag bits (one per argument family).
enum DeferredError : int32_t {
  kErrIndices = 1 << 0,       // indices outside [0, B)
  kErrTemperature = 1 << 1,   // temperature outside {0} U [FLT_MIN, FLT_MAX] (or 0 for softmax), NaN
  kErrTopK = 1 << 2,          // a float top_k that is not an integer
  kErrTopP = 1 << 3,          // top_p <= 0 or NaN
  kErrMinP = 1 << 4,          // min_p outside [0, 1] or NaN
  kErrOffset = 1 << 5,        // an offset tensor value outside [0, 2^48)
  kErrDraftIds = 1 << 6,      // draft_token_ids outside [0, V) (within num_draft_tokens)
  kErrNumDraft = 1 << 7,      // num_draft_tokens outside [0, N]
  kErrSpecFilters = 1 << 8,   // top_k / top_p / min_p enabled in the CUDA logits form of verification
  kErrRetriveIndex = 1 << 9,  // retrive_index outside [0, B*T) or not distinct
  kErrTree = 1 << 10,         // candidates / retrive_next_* do not form a valid tree
  kErrCoins = 1 << 11,        // coins outside [0, 1] or NaN
  kErrPrefixLens = 1 << 12,   // prefix_lens < 0, or beyond the keys (tree_attention) / int64 (build_tree)
  kErrParents = 1 << 13,      // parents do not form a valid tree (build_tree)
  kErrPipeValues = 1 << 14,   // pipeline: a params value out of range, a list id outside [-1, V), a non-finite bias
};

// The per-device flag (int32 [1], zero-initialised on first use; allocate it before a graph
// capture by calling any op once, as a warm-up does).
at::Tensor error_flag(const at::Device& device);
// Read (one host sync), reset and raise a ValueError listing the problems; no-op when clear.
void check_errors_now();
// Whether bindings use the deferred checks on t's device: always on CUDA; on the CPU only when forced.
bool deferred(const at::Tensor& t);
void set_deferred_on_cpu(bool on);

// Rows found bad on the device, accumulated over the checks of one call (bool [n] or undefined).
struct RowBad {
  int64_t n = 0;
  at::Tensor rows;
  explicit RowBad(int64_t n_rows) : n(n_rows) {}
  // bad: bool [n] or [1] (broadcast to every row); sets `bit` in the error flag where any.
  void add(const at::Tensor& bad, int32_t bit) {
    if (bad.numel() == 0) return;
    error_flag(bad.device()).bitwise_or_(bad.any().to(at::kInt).mul(bit));
    at::Tensor b = bad.reshape({-1}).expand({n});
    rows = rows.defined() ? rows.logical_or(b) : b.clone();
  }
  bool any_possible() const { return rows.defined(); }
};

// Where bad: 0; elsewhere v (v int64).
inline at::Tensor safe_index(const at::Tensor& v, const at::Tensor& bad) {
  return at::where(bad, at::zeros({}, v.options()), v);
}

}  // namespace dk::torchb
