// Torch-free CPU interface of the speculative-verification kernels. Each ISA (scalar, avx2,
// avx512) provides one SpecTable (csrc/cpu/isa/speculative.cpp); spec_active() picks the one that
// matches the sampling family's active path (DECODEKIT_ISA / set_isa / cpuid).
#pragma once
#include <cstdint>
#include "cpu/kernels.h"

namespace dk::cpu {

using dk::SpecTargetKind;  // decodekit/contract.h

// Target rows [B, R, V] (R = N + 1 for a chain, T for a tree), last dim contiguous.
struct SpecTarget {
  SpecTargetKind kind = SpecTargetKind::Probs;
  const void* data = nullptr;  // probs: float; logits: dtype; ids: int64 [B, R] (no V)
  DType dtype = DType::F32;
  int64_t V = 0;
  int64_t stride_b = 0, stride_r = 0;  // elements
  RowFilter filter;                    // logits: per batch row; temperature 0 = greedy
};

// Draft probabilities [B, N or T, V] float32, or none (one-hot drafts).
struct SpecDraft {
  const float* data = nullptr;
  int64_t stride_b = 0, stride_r = 0;
};

struct SpecRng {
  const int64_t* seeds = nullptr;  // per batch row, or nullptr
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t *seed_ptr = nullptr, *offsets = nullptr;  // seed / offsets in memory (decodekit/rng.h)
  int64_t offset_stride = 0;
};

struct ChainArgs {
  SpecTarget target;
  SpecDraft draft;
  const int64_t* draft_ids = nullptr;  // [B, N] contiguous
  const int64_t* num_draft = nullptr;  // [B] or nullptr (every row has N)
  int64_t B = 0, N = 0;
  SpecRng rng;
  int64_t* out_ids = nullptr;       // [B, N + 1], padded with -1
  int32_t* out_accepted = nullptr;  // [B] drafts that pass the test, each considered on its own
  int32_t* out_emitted = nullptr;   // [B] drafts emitted (the accepted prefix)
};

struct TreeArgs {
  SpecTarget target;
  SpecDraft draft;
  const int64_t* cand = nullptr;  // [B, T] contiguous, node 0 = root
  const int64_t* retrive_index = nullptr;
  const int64_t* next_token = nullptr;
  const int64_t* next_sibling = nullptr;
  int64_t B = 0, T = 0;
  int64_t W = 0;  // accept_index width: at most W - 1 drafts are accepted
  SpecRng rng;
  const double* coins = nullptr;        // [B, T] caller coins per node (SpecCoin), or nullptr (Philox)
  const double* coins_final = nullptr;  // [B] residual / bonus coins (with coins)
  double thr_single = 1.0, thr_acc = 1.0;
  int64_t* predicts = nullptr;      // [B * T] (indexed by retrive_index), pre-filled with -1
  int32_t* accept_index = nullptr;  // [B, W], pre-filled with -1
  int32_t* accept_num = nullptr;    // [B]
  int32_t* err = nullptr;           // [B] SpecTreeError per row (0 = ok)
  int64_t* err_node = nullptr;      // [B]
  const bool* skip = nullptr;       // [B] rows to leave untouched (deferred checks), or nullptr
};

struct SpecTable {
  const char* name;
  void (*chain_rows)(const ChainArgs&, int64_t begin, int64_t end);
  void (*tree_rows)(const TreeArgs&, int64_t begin, int64_t end);
};

const SpecTable& spec_table_scalar();
const SpecTable& spec_table_avx2();
const SpecTable& spec_table_avx512();
const SpecTable& spec_active();  // by active_isa_id()

// build_tree: a walk, plain C++ (csrc/cpu/spec_tree.cpp).
struct BuildTreeArgs {
  const int64_t* parents = nullptr;      // [B, T] contiguous
  const int64_t* prefix_lens = nullptr;  // [B]
  int64_t B = 0, T = 0;
  uint8_t* mask = nullptr;           // [B, T, ceil(T/8)]
  int64_t* positions = nullptr;      // [B * T]
  int64_t* retrive_index = nullptr;  // [B, T]
  int64_t* next_token = nullptr;     // [B, T]
  int64_t* next_sibling = nullptr;   // [B, T]
  int32_t* err = nullptr;            // [B]
  int64_t* err_node = nullptr;       // [B]
};
void build_tree_rows(const BuildTreeArgs& a, int64_t begin, int64_t end);

}  // namespace dk::cpu
