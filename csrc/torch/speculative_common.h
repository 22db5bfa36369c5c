// Input checks and argument packing of the speculative ops, shared by the CPU and CUDA bindings.
// No math here: shapes, dtypes, devices, ranges, and the error messages of the tree walks.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include "cpu/spec_kernels.h"
#include "decodekit/speculative.h"
#include "torch/checks.h"

namespace dk::torchb::spec {

inline void check_int_tensor(const at::Tensor& t, const char* name) {
  DK_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name, " must be int32 or int64, got ",
           t.scalar_type());
}

inline void check_last_contig(const at::Tensor& t, const char* name) {
  DK_CHECK(t.numel() == 0 || t.size(-1) == 1 || t.stride(-1) == 1, name,
           " must be contiguous in the last dimension (stride(-1) == 1), got strides ", t.strides());
}

inline void check_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  DK_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), " (the device of the draft token ids), got ",
           t.device());
}

inline cpu::SpecTarget make_target(const at::Tensor& target, int64_t kind) {
  cpu::SpecTarget t;
  t.kind = cpu::SpecTargetKind(kind);
  if (kind == 2) return t;  // ids: filled by the caller
  t.data = target.data_ptr();
  t.dtype = float_dtype(target, kind == 0 ? "target_probs" : "target_logits");
  t.V = target.size(2);
  t.stride_b = target.stride(0);
  t.stride_r = target.stride(1);
  return t;
}

// The filter parameters of the logits form, checked and converted by the sampling family's
// pack_filter_params (the kernels read them on the host, so the tensors are brought to the CPU).
using FilterKeep = FilterPack;

inline std::optional<at::Tensor> on_cpu(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->cpu()) : std::nullopt;
}

inline cpu::RowFilter make_filter(FilterKeep& keep, int64_t n, const std::optional<at::Tensor>& T_arr, double T_val,
                                  const std::optional<at::Tensor>& k_arr, int64_t k_val,
                                  const std::optional<at::Tensor>& p_arr, double p_val,
                                  const std::optional<at::Tensor>& mp_arr, double mp_val, int64_t order,
                                  RowBad* bad = nullptr) {
  keep = pack_filter_params(n, false, on_cpu(T_arr), T_val, on_cpu(k_arr), k_val, on_cpu(p_arr), p_val, on_cpu(mp_arr),
                            mp_val, order, bad);
  return row_filter(keep);
}

// Seeds of B rows (checks.h seed_rows: n seeds, or one seed: read as the scalar form into
// seed_val from a CPU tensor, kept in `one` for the kernels from a device tensor).
inline std::optional<at::Tensor> seeds_of(const std::optional<at::Tensor>& seed_arr, const at::Tensor& ref, int64_t B,
                                          std::optional<int64_t>& scalar_seed, std::optional<at::Tensor>& one) {
  if (!seed_arr) return std::nullopt;
  if (!seed_arr->is_cpu()) check_device(ref, *seed_arr, "seed");
  int64_t v = 0;
  auto seeds = seed_rows(seed_arr, B, v, &one);
  if (!seeds && !one)
    scalar_seed = v;
  else if (seeds && seeds->device() != ref.device())
    seeds = seeds->to(ref.device());
  return seeds;
}

// What every speculative setup shares: seeds (per-row, one device seed, or a scalar read from a
// CPU tensor), offsets, and the deferred checks' bad rows.
struct SpecRows {
  int64_t B = 0;
  std::optional<at::Tensor> seeds, seed_one;
  std::optional<int64_t> scalar_seed;  // a one-seed CPU tensor read as the scalar form
  OffsetPack offsets;
  bool deferred = false;
  RowBad bad{0};
  RowBad* bad_ptr() { return deferred ? &bad : nullptr; }
};

inline void check_target_kind(const at::Tensor& target, int64_t kind, bool tree) {
  DK_CHECK(kind == 0 || kind == 1 || (tree && kind == 2), "target_kind must be 0 (probs), 1 (logits)",
           tree ? " or 2 (predicted ids)" : "", ", got ", kind);
  if (kind == 0)
    DK_CHECK(target.scalar_type() == at::kFloat, "target_probs must be float32, got ", target.scalar_type());
  if (kind == 1) float_dtype(target, "target_logits");
}

struct ChainSetup : SpecRows {
  int64_t N = 0, V = 0;
  at::Tensor ids;
  std::optional<at::Tensor> num_draft;
};

inline ChainSetup setup_chain(const at::Tensor& target, const at::Tensor& draft_token_ids,
                              const std::optional<at::Tensor>& draft_probs,
                              const std::optional<at::Tensor>& num_draft_tokens, int64_t kind,
                              const std::optional<at::Tensor>& seed_arr,
                              const std::optional<at::Tensor>& offset_arr = std::nullopt) {
  const char* tname = kind == 0 ? "target_probs" : "target_logits";
  check_target_kind(target, kind, false);
  DK_CHECK(draft_token_ids.dim() == 2, "draft_token_ids must be 2-D [B, N], got shape ", draft_token_ids.sizes());
  check_int_tensor(draft_token_ids, "draft_token_ids");
  ChainSetup s;
  s.B = draft_token_ids.size(0);
  s.N = draft_token_ids.size(1);
  s.deferred = deferred(draft_token_ids);
  s.bad = RowBad(s.B);
  DK_CHECK(s.N <= kSpecMaxDepth - 1, "draft_token_ids may have at most ", kSpecMaxDepth - 1, " columns, got ", s.N);
  DK_CHECK(target.dim() == 3, tname, " must be 3-D [B, N+1, V], got shape ", target.sizes());
  check_device(draft_token_ids, target, tname);
  DK_CHECK(target.size(0) == s.B && target.size(1) == s.N + 1, tname, " must have shape [B, N+1, V] = [", s.B, ", ",
           s.N + 1, ", V] to match draft_token_ids ", draft_token_ids.sizes(), ", got ", target.sizes());
  s.V = target.size(2);
  DK_CHECK(s.V >= 1, tname, " must have V >= 1, got shape ", target.sizes());
  DK_CHECK(s.V < (int64_t(1) << 31), tname, " must have V < 2^31, got ", s.V);
  check_last_contig(target, tname);
  if (draft_probs) {
    check_device(draft_token_ids, *draft_probs, "draft_probs");
    DK_CHECK(draft_probs->scalar_type() == at::kFloat, "draft_probs must be float32, got ", draft_probs->scalar_type());
    DK_CHECK(draft_probs->dim() == 3 && draft_probs->size(0) == s.B && draft_probs->size(1) == s.N &&
                 draft_probs->size(2) == s.V,
             "draft_probs must have shape [B, N, V] = [", s.B, ", ", s.N, ", ", s.V, "], got ", draft_probs->sizes());
    check_last_contig(*draft_probs, "draft_probs");
  }
  s.ids = draft_token_ids.to(at::kLong).contiguous();
  at::Tensor valid;
  if (num_draft_tokens) {
    check_device(draft_token_ids, *num_draft_tokens, "num_draft_tokens");
    check_int_tensor(*num_draft_tokens, "num_draft_tokens");
    DK_CHECK(num_draft_tokens->dim() == 1 && num_draft_tokens->size(0) == s.B,
             "num_draft_tokens must be a 1-D tensor of length B = ", s.B, ", got shape ", num_draft_tokens->sizes());
    s.num_draft = num_draft_tokens->to(at::kLong).contiguous();
    if (s.deferred) {
      at::Tensor b = s.num_draft->lt(0).logical_or(s.num_draft->gt(s.N));
      s.bad.add(b, kErrNumDraft);
      s.num_draft = safe_index(*s.num_draft, b).contiguous();
    } else if (s.B > 0) {
      const int64_t mn = s.num_draft->min().item<int64_t>(), mx = s.num_draft->max().item<int64_t>();
      DK_CHECK(mn >= 0 && mx <= s.N, "num_draft_tokens values must be in [0, N] = [0, ", s.N, "], got range [", mn,
               ", ", mx, "]");
    }
    valid = at::arange(s.N, s.ids.options()).unsqueeze(0) < s.num_draft->unsqueeze(1);
  }
  if (s.deferred && s.B > 0 && s.N > 0) {
    at::Tensor oob = s.ids.lt(0).logical_or(s.ids.ge(s.V));
    if (valid.defined()) oob = oob.logical_and(valid);
    s.bad.add(oob.any(1), kErrDraftIds);
    s.ids = safe_index(s.ids, oob).contiguous();
  } else if (s.B > 0 && s.N > 0) {
    at::Tensor v = valid.defined() ? s.ids.masked_select(valid) : s.ids;
    if (v.numel() > 0) {
      const int64_t mn = v.min().item<int64_t>(), mx = v.max().item<int64_t>();
      DK_CHECK(mn >= 0 && mx < s.V, "draft_token_ids must be in [0, V) = [0, ", s.V, "), got range [", mn, ", ", mx,
               "]");
    }
  }
  s.seeds = seeds_of(seed_arr, draft_token_ids, s.B, s.scalar_seed, s.seed_one);
  s.offsets = pack_offsets(offset_arr, s.B, draft_token_ids, s.bad_ptr());
  return s;
}

struct TreeSetup : SpecRows {
  int64_t T = 0, V = 0;
  at::Tensor cand, ri, nt, ns;
  std::optional<at::Tensor> coins, coins_final;  // float64, contiguous (caller coins)
  double thr_single = 1.0, thr_acc = 1.0;
};

// Caller coins (SGLang's uniform_samples [B, T] and uniform_samples_for_final_sampling [B]) and the
// acceptance thresholds: both coin tensors or neither, floating, values in [0, 1]; one-hot drafts
// only; thresholds in [0, 1], and other than 1 only with coins.
inline void setup_coins(TreeSetup& s, const at::Tensor& candidates, const std::optional<at::Tensor>& coins,
                        const std::optional<at::Tensor>& coins_final, double thr_single, double thr_acc,
                        const std::optional<at::Tensor>& draft_probs) {
  DK_CHECK(thr_single >= 0.0 && thr_single <= 1.0, "threshold_single must be in [0, 1], got ", thr_single);
  DK_CHECK(thr_acc >= 0.0 && thr_acc <= 1.0, "threshold_acc must be in [0, 1], got ", thr_acc);
  DK_CHECK(coins.has_value() == coins_final.has_value(),
           "coins and coins_final must be given together (or neither), got ",
           coins ? "coins only" : "coins_final only");
  if (!coins) {
    DK_CHECK(thr_single == 1.0 && thr_acc == 1.0,
             "threshold_single / threshold_acc other than 1 need caller coins (coins, coins_final)");
    return;
  }
  DK_CHECK(!draft_probs, "coins are supported with one-hot drafts only (draft_probs must be None)");
  const std::pair<const at::Tensor*, const char*> cs[] = {{&*coins, "coins"}, {&*coins_final, "coins_final"}};
  for (const auto& c : cs) {
    check_device(candidates, *c.first, c.second);
    DK_CHECK(at::isFloatingType(c.first->scalar_type()), c.second, " must be a floating tensor, got ",
             c.first->scalar_type());
  }
  DK_CHECK(coins->dim() == 2 && coins->size(0) == s.B && coins->size(1) == s.T, "coins must have shape [B, T] = [", s.B,
           ", ", s.T, "], got ", coins->sizes());
  DK_CHECK(coins_final->dim() == 1 && coins_final->size(0) == s.B, "coins_final must have shape [B] = [", s.B,
           "], got ", coins_final->sizes());
  s.coins = coins->to(at::kDouble).contiguous();
  s.coins_final = coins_final->to(at::kDouble).contiguous();
  if (s.deferred) {
    at::Tensor ok = s.coins->ge(0.0).logical_and(s.coins->le(1.0)).all(1);
    ok = ok.logical_and(s.coins_final->ge(0.0).logical_and(s.coins_final->le(1.0)));
    s.bad.add(ok.logical_not(), kErrCoins);
  }
  for (const auto& c : {std::make_pair(*s.coins, "coins"), std::make_pair(*s.coins_final, "coins_final")}) {
    if (s.deferred) break;
    if (c.first.numel() == 0) continue;
    // NaN fails both comparisons
    DK_CHECK(at::logical_and(c.first >= 0.0, c.first <= 1.0).all().item<bool>(), c.second,
             " must hold values in [0, 1] (uniform coins), got a value outside or NaN");
  }
  s.thr_single = thr_single;
  s.thr_acc = thr_acc;
}

inline TreeSetup setup_tree(const at::Tensor& candidates, const at::Tensor& retrive_index,
                            const at::Tensor& retrive_next_token, const at::Tensor& retrive_next_sibling,
                            const at::Tensor& target, const std::optional<at::Tensor>& draft_probs, int64_t W,
                            int64_t kind, const std::optional<at::Tensor>& seed_arr,
                            const std::optional<at::Tensor>& offset_arr = std::nullopt) {
  check_target_kind(target, kind, true);
  DK_CHECK(candidates.dim() == 2 && candidates.size(1) >= 1, "candidates must be 2-D [B, T] with T >= 1, got shape ",
           candidates.sizes());
  check_int_tensor(candidates, "candidates");
  TreeSetup s;
  s.B = candidates.size(0);
  s.T = candidates.size(1);
  s.deferred = deferred(candidates);
  s.bad = RowBad(s.B);
  const std::pair<const at::Tensor*, const char*> links[] = {{&retrive_index, "retrive_index"},
                                                             {&retrive_next_token, "retrive_next_token"},
                                                             {&retrive_next_sibling, "retrive_next_sibling"}};
  for (const auto& l : links) {
    check_int_tensor(*l.first, l.second);
    check_device(candidates, *l.first, l.second);
    DK_CHECK(l.first->dim() == 2 && l.first->size(0) == s.B && l.first->size(1) == s.T, l.second,
             " must have the shape of candidates [", s.B, ", ", s.T, "], got ", l.first->sizes());
  }
  DK_CHECK(W >= 1 && W <= kSpecMaxDepth, "num_speculative_tokens must be in [1, ", kSpecMaxDepth, "], got ", W);
  DK_CHECK(s.B * s.T < (int64_t(1) << 31), "B * T must be < 2^31, got ", s.B * s.T);
  check_device(candidates, target, "target");
  if (kind == 2) {
    check_int_tensor(target, "target_predict");
    DK_CHECK(target.dim() == 2 && target.size(0) == s.B && target.size(1) == s.T,
             "target_predict must have the shape of candidates [", s.B, ", ", s.T, "], got ", target.sizes());
    DK_CHECK(!draft_probs, "draft_probs must be None for greedy verification with predicted ids");
  } else {
    const char* tname = kind == 0 ? "target_probs" : "target_logits";
    DK_CHECK(target.dim() == 3 && target.size(0) == s.B && target.size(1) == s.T, tname,
             " must have shape [B, T, V] = [", s.B, ", ", s.T, ", V] to match candidates, got ", target.sizes());
    s.V = target.size(2);
    DK_CHECK(s.V >= 1 && s.V < (int64_t(1) << 31), tname, " must have 1 <= V < 2^31, got shape ", target.sizes());
    check_last_contig(target, tname);
    if (draft_probs) {
      check_device(candidates, *draft_probs, "draft_probs");
      DK_CHECK(draft_probs->scalar_type() == at::kFloat, "draft_probs must be float32, got ",
               draft_probs->scalar_type());
      DK_CHECK(draft_probs->dim() == 3 && draft_probs->size(0) == s.B && draft_probs->size(1) == s.T &&
                   draft_probs->size(2) == s.V,
               "draft_probs must have shape [B, T, V] = [", s.B, ", ", s.T, ", ", s.V, "], got ", draft_probs->sizes());
      check_last_contig(*draft_probs, "draft_probs");
    }
  }
  s.cand = candidates.to(at::kLong).contiguous();
  s.ri = retrive_index.to(at::kLong).contiguous();
  s.nt = retrive_next_token.to(at::kLong).contiguous();
  s.ns = retrive_next_sibling.to(at::kLong).contiguous();
  if (s.deferred && s.B > 0) {
    // as below, on the device: a row with a value out of range or a slot shared with any node
    // (in its own row or another) is bad, and its kernel block is skipped (TreeArgs::skip)
    at::Tensor flat = s.ri.reshape(-1);
    at::Tensor oob = flat.lt(0).logical_or(flat.ge(s.B * s.T));
    at::Tensor slot = safe_index(flat, oob);
    at::Tensor count = at::zeros({s.B * s.T}, flat.options()).index_add_(0, slot, oob.logical_not().to(at::kLong));
    at::Tensor shared = count.index_select(0, slot).gt(1).logical_and(oob.logical_not());
    s.bad.add(oob.logical_or(shared).reshape({s.B, s.T}).any(1), kErrRetriveIndex);
  } else if (s.B > 0) {
    // retrive_index addresses predicts [B*T]: every value in range and distinct (rows never share a slot)
    at::Tensor flat = s.ri.reshape(-1);
    const int64_t mn = flat.min().item<int64_t>(), mx = flat.max().item<int64_t>();
    DK_CHECK(mn >= 0 && mx < s.B * s.T, "retrive_index values must be in [0, B*T) = [0, ", s.B * s.T, "), got range [",
             mn, ", ", mx, "]");
    // distinct: the canonical layout (b*T + t, as build_tree makes) or, otherwise, no slot counted twice
    if (flat.numel() > 1 && !at::equal(flat, at::arange(s.B * s.T, flat.options()))) {
      DK_CHECK(at::bincount(flat, {}, s.B * s.T).max().item<int64_t>() <= 1,
               "retrive_index values must be distinct (each node owns one predicts slot)");
    }
  }
  s.seeds = seeds_of(seed_arr, candidates, s.B, s.scalar_seed, s.seed_one);
  s.offsets = pack_offsets(offset_arr, s.B, candidates, s.bad_ptr());
  return s;
}

struct BuildSetup {
  int64_t B = 0, T = 0;
  at::Tensor parents, prefix_lens;
  bool deferred = false;
  RowBad bad{0};
};

inline BuildSetup setup_build(const at::Tensor& parents, const at::Tensor& prefix_lens) {
  DK_CHECK(parents.dim() == 2 && parents.size(1) >= 1, "parents must be 2-D [B, T] with T >= 1, got shape ",
           parents.sizes());
  check_int_tensor(parents, "parents");
  check_int_tensor(prefix_lens, "prefix_lens");
  BuildSetup s;
  s.B = parents.size(0);
  s.T = parents.size(1);
  DK_CHECK(s.B * s.T < (int64_t(1) << 31), "B * T must be < 2^31, got ", s.B * s.T);
  DK_CHECK(prefix_lens.device() == parents.device(), "prefix_lens must be on ", parents.device(), ", got ",
           prefix_lens.device());
  DK_CHECK(prefix_lens.dim() == 1 && prefix_lens.size(0) == s.B, "prefix_lens must be a 1-D tensor of length B = ", s.B,
           ", got shape ", prefix_lens.sizes());
  s.parents = parents.to(at::kLong).contiguous();
  s.prefix_lens = prefix_lens.to(at::kLong).contiguous();
  s.deferred = deferred(parents);
  s.bad = RowBad(s.B);
  if (s.deferred) {
    at::Tensor b = s.prefix_lens.lt(0).logical_or(s.prefix_lens.gt(INT64_MAX - s.T));
    s.bad.add(b, kErrPrefixLens);
    s.prefix_lens = safe_index(s.prefix_lens, b).contiguous();
  } else if (s.B > 0) {
    const auto mn = s.prefix_lens.min().item<int64_t>(), mx = s.prefix_lens.max().item<int64_t>();
    DK_CHECK(mn >= 0, "prefix_lens must be >= 0, got ", mn);
    // positions are prefix_lens[b] + depth with depth <= T - 1: keep them inside int64
    DK_CHECK(mx <= INT64_MAX - s.T,
             "prefix_lens must be <= 2^63 - 1 - T (positions = prefix_lens + depth must fit "
             "in int64), got ",
             mx, " with T = ", s.T);
  }
  return s;
}

// ---- outputs and argument packing, shared by the CPU and CUDA bindings -----------------------
// The CPU (cpu::ChainArgs, ...) and CUDA (cuda::spec::ChainArgs, ...) argument structs use the same
// field names, so one template fills either; the caller adds its device's workspace and launches.

template <class A>
void pack_draft_rng(A& a, const std::optional<at::Tensor>& draft_probs, const SpecRows& r, int64_t seed_val,
                    int64_t offset) {
  check_offset(offset);
  if (draft_probs) {
    a.draft.data = draft_probs->data_ptr<float>();
    a.draft.stride_b = draft_probs->stride(0);
    a.draft.stride_r = draft_probs->stride(1);
  }
  a.rng.seeds = r.seeds ? r.seeds->data_ptr<int64_t>() : nullptr;
  a.rng.seed = uint64_t(r.scalar_seed.value_or(seed_val));
  a.rng.seed_ptr = r.seed_one ? r.seed_one->data_ptr<int64_t>() : nullptr;
  a.rng.offset = uint64_t(offset);
  a.rng.offsets = r.offsets.ptr();
  a.rng.offset_stride = r.offsets.stride;
}

struct ChainOut {
  at::Tensor out_ids, accepted, emitted;
};

inline ChainOut chain_outputs(const ChainSetup& s, const at::TensorOptions& opts) {
  return {at::empty({s.B, s.N + 1}, opts.dtype(at::kLong)), at::zeros({s.B}, opts.dtype(at::kInt)),
          at::zeros({s.B}, opts.dtype(at::kInt))};
}

template <class A>
void pack_chain(A& a, const ChainSetup& s, ChainOut& o, const std::optional<at::Tensor>& draft_probs, int64_t seed_val,
                int64_t offset) {
  pack_draft_rng(a, draft_probs, s, seed_val, offset);
  a.draft_ids = s.ids.data_ptr<int64_t>();
  a.num_draft = s.num_draft ? s.num_draft->data_ptr<int64_t>() : nullptr;
  a.B = s.B;
  a.N = s.N;
  a.out_ids = o.out_ids.data_ptr<int64_t>();
  a.out_accepted = o.accepted.data_ptr<int32_t>();
  a.out_emitted = o.emitted.data_ptr<int32_t>();
}

struct TreeOut {
  at::Tensor predicts, accept_index, accept_num, err, err_node;
  at::Tensor target_ids;  // target_kind 2: the predicted ids as contiguous int64
};

inline TreeOut tree_outputs(const TreeSetup& s, int64_t W, const at::TensorOptions& opts) {
  TreeOut o;
  o.predicts = at::full({s.B * s.T}, -1, opts.dtype(at::kLong));
  o.accept_index = at::full({s.B, W}, -1, opts.dtype(at::kInt));
  o.accept_num = at::zeros({s.B}, opts.dtype(at::kInt));
  return o;
}

// For B > 0: the error buffers, the predicted ids (target_kind 2) and every field but the target's
// kind / logits data (set by the caller's make_target).
template <class A>
void pack_tree(A& a, const TreeSetup& s, int64_t W, TreeOut& o, int64_t kind, const at::Tensor& target,
               const std::optional<at::Tensor>& draft_probs, int64_t seed_val, int64_t offset) {
  const auto opts = s.cand.options();
  o.err = at::zeros({s.B}, opts.dtype(at::kInt));
  o.err_node = at::zeros({s.B}, opts.dtype(at::kLong));
  if (kind == 2) {
    o.target_ids = target.to(at::kLong).contiguous();
    a.target.data = o.target_ids.data_ptr<int64_t>();
    a.target.stride_b = s.T;
    a.target.stride_r = 1;
  }
  pack_draft_rng(a, draft_probs, s, seed_val, offset);
  a.skip = s.bad.any_possible() ? s.bad.rows.data_ptr<bool>() : nullptr;
  a.cand = s.cand.data_ptr<int64_t>();
  a.retrive_index = s.ri.data_ptr<int64_t>();
  a.next_token = s.nt.data_ptr<int64_t>();
  a.next_sibling = s.ns.data_ptr<int64_t>();
  a.B = s.B;
  a.T = s.T;
  a.W = W;
  a.predicts = o.predicts.data_ptr<int64_t>();
  a.accept_index = o.accept_index.data_ptr<int32_t>();
  a.accept_num = o.accept_num.data_ptr<int32_t>();
  a.coins = s.coins ? s.coins->data_ptr<double>() : nullptr;
  a.coins_final = s.coins_final ? s.coins_final->data_ptr<double>() : nullptr;
  a.thr_single = s.thr_single;
  a.thr_acc = s.thr_acc;
  a.err = o.err.data_ptr<int32_t>();
  a.err_node = o.err_node.data_ptr<int64_t>();
}

struct BuildOut {
  at::Tensor mask, positions, ri, nt, ns, err, err_node;
};

inline BuildOut build_outputs(const BuildSetup& s, const at::TensorOptions& opts) {
  const int64_t B = s.B, T = s.T, W = (T + 7) / 8;
  BuildOut o;
  o.mask = at::empty({B, T, W}, opts.dtype(at::kByte));
  o.positions = at::empty({B * T}, opts.dtype(at::kLong));
  o.ri = at::empty({B, T}, opts.dtype(at::kLong));
  o.nt = at::empty({B, T}, opts.dtype(at::kLong));
  o.ns = at::empty({B, T}, opts.dtype(at::kLong));
  o.err = at::zeros({B}, opts.dtype(at::kInt));
  o.err_node = at::zeros({B}, opts.dtype(at::kLong));
  return o;
}

template <class A>
void pack_build(A& a, const BuildSetup& s, BuildOut& o) {
  a.parents = s.parents.data_ptr<int64_t>();
  a.prefix_lens = s.prefix_lens.data_ptr<int64_t>();
  a.B = s.B;
  a.T = s.T;
  a.mask = o.mask.data_ptr<uint8_t>();
  a.positions = o.positions.data_ptr<int64_t>();
  a.retrive_index = o.ri.data_ptr<int64_t>();
  a.next_token = o.nt.data_ptr<int64_t>();
  a.next_sibling = o.ns.data_ptr<int64_t>();
  a.err = o.err.data_ptr<int32_t>();
  a.err_node = o.err_node.data_ptr<int64_t>();
}

inline std::string tree_error(int code, int64_t node) {
  const std::string n = std::to_string(node);
  switch (code) {
    case kTreeRootNotFirst: return "node 0 must be the root (parent -1), got parents[0] != -1";
    case kTreeTwoRoots: return "node " + n + " has parent -1: two roots (only node 0 may be the root)";
    case kTreeParentRange: return "node " + n + " links to an index outside [-1, T)";
    case kTreeCycle: return "node " + n + " lies on a cycle of parent links";
    case kTreeParentAfterChild:
      return "node " + n + " has a parent with a larger index (parents must come before their children)";
    case kTreeRootAsChild: return "node " + n + " links to node 0 (the root cannot be a child or a sibling)";
    case kTreeReachedTwice:
      return "node " + n + " is reached twice (a cycle or a shared child in retrive_next_token / retrive_next_sibling)";
    case kTreeTokenRange: return "node " + n + " has a candidate token outside [0, V)";
    default: return "error " + std::to_string(code) + " at node " + n;
  }
}

// Deferred checks, after the kernels: the defined results of bad rows, and the kernels' tree
// errors folded into the error flag (the eager path raises them instead).
inline void finish_chain_rows(const ChainSetup& s, ChainOut& o) {
  if (!s.bad.any_possible()) return;
  o.out_ids.masked_fill_(s.bad.rows.unsqueeze(1), -1);  // nothing emitted
  o.accepted.masked_fill_(s.bad.rows, 0);
  o.emitted.masked_fill_(s.bad.rows, 0);
}
inline void finish_tree_rows(TreeSetup& s, const TreeOut& o) {
  // skipped rows keep the pre-filled outputs (predicts -1, accept_index -1, accept_num 0), as do
  // rows whose tree the kernel found invalid
  if (o.err.defined()) s.bad.add(o.err.ne(0), kErrTree);
}
inline void finish_build_rows(BuildSetup& s, BuildOut& o) {
  s.bad.add(o.err.ne(0), kErrParents);
  if (!s.bad.any_possible()) return;
  const at::Tensor rows = s.bad.rows;
  o.mask.masked_fill_(rows.reshape({s.B, 1, 1}), 0);
  o.positions.view({s.B, s.T}).masked_fill_(rows.unsqueeze(1), -1);
  for (at::Tensor* t : {&o.ri, &o.nt, &o.ns}) t->masked_fill_(rows.unsqueeze(1), -1);
}

// Raise the first row's tree error (err/err_node computed by the kernels; any device).
inline void raise_tree_errors(const at::Tensor& err, const at::Tensor& err_node, bool build) {
  if (err.numel() == 0) return;
  at::Tensor nz = (err != 0).nonzero();
  if (nz.numel() == 0) return;
  const int64_t b = nz[0][0].item<int64_t>();
  const int code = err[b].item<int>();
  const int64_t node = err_node[b].item<int64_t>();
  DK_CHECK(false, build ? "parents" : "tree", " of batch row ", b, " is not a valid tree: ", tree_error(code, node));
}

}  // namespace dk::torchb::spec
