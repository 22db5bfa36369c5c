// C entry points that run csrc/cuda/speculative.cuh's kernels under the CPU emulator
// (tests/cuda_emu/emu_spec.py loads this through ctypes; host pointers stand in for device
// pointers). Flat argument lists mirror the fields of the kernels' argument structs.
#include <cmath>
#include <optional>
#include <vector>
#include "emu_runtime.h"
#define DK_SPEC_COUNT_WORK 1   // the kernels' work counters (dk_emu_spec_work)
#define DK_SPLIT_COUNT_WORK 1  // the split phases' block counter (dk_emu_split_blocks)
#include "cuda/speculative.cuh"
#include "emu_sample_ws.h"

using namespace dk::cuda::spec;

template <class T>
struct ChainK {
  static void fn(ChainArgs a) { chain_kernel<T>(a); }
};
template <class T>
struct TreeK {
  static void fn(TreeArgs a) { tree_kernel<T>(a); }
};
static void build_fn(BuildArgs a) { build_tree_kernel(a); }

template <template <class> class K, class A>
static void run(const Target& t, unsigned grid, const A& a) {
  if (t.kind != Kind::Logits || t.dtype == DType::F32)
    dkemu::launch(grid, kThreads, K<float>::fn, a);
  else if (t.dtype == DType::BF16)
    dkemu::launch(grid, kThreads, K<dk::bf16_t>::fn, a);
  else
    dkemu::launch(grid, kThreads, K<dk::f16_t>::fn, a);
}

// The logits form's filter parameters, set before dk_emu_chain / dk_emu_tree (dk_emu_set_filters) and
// applied to the next calls: per-row pointers or scalars, as dk::RowFilter (decodekit/contract.h).
static dk::RowFilter g_filter;

static Target make_target(const void* data, int kind, int dtype, int64_t V, int64_t sb, int64_t sr, const float* temp,
                          float temp_val) {
  Target t;
  t.kind = Kind(kind);
  t.data = data;
  t.dtype = DType(dtype);
  t.V = V;
  t.stride_b = sb;
  t.stride_r = sr;
  t.filter = g_filter;
  t.filter.temperature = {temp, temp_val};
  return t;
}

// The fields every verification kernel's arguments share: target, draft, counter-based RNG, the
// per-row lane workspace and the survivor-list workspace (list_per_row entries per row).
template <class A>
void set_common(A& a, const void* target, int kind, int dtype, int64_t V, int64_t tsb, int64_t tsr, const float* temp,
                float temp_val, const float* draft, int64_t dsb, int64_t dsr, const int64_t* seeds, uint64_t seed,
                uint64_t offset, double* lanes, int64_t lanes_per_row_, int32_t* list_idx, float* list_w) {
  a.target = make_target(target, kind, dtype, V, tsb, tsr, temp, temp_val);
  a.draft.data = draft;
  a.draft.stride_b = dsb;
  a.draft.stride_r = dsr;
  a.rng.seeds = seeds;
  a.rng.seed = seed;
  a.rng.offset = offset;
  a.ws.lanes = lanes;
  a.ws.lanes_per_row = lanes_per_row_;
  a.ws.list_idx = list_idx;
  a.ws.list_w = list_w;
  a.ws.list_per_row = list_per_row(V > 0 ? V : 1);
}

// The red zones that end each row of the per-row scratch (lanes, survivor lists, residual rows:
// speculative.cuh lanes_per_row etc.), fenced for a call and checked after its launches.
struct RowScratchZones {
  dkemu::RowZones lanes, idx, w, resid;
  RowScratchZones(const Workspace& ws, int64_t B)
      : lanes("the lane workspace", ws.lanes, B, size_t(ws.lanes_per_row) * sizeof(*ws.lanes), DK_WS_REDZONE),
        idx("the survivor lists (ids)", ws.list_idx, B, size_t(ws.list_per_row) * sizeof(*ws.list_idx), DK_WS_REDZONE),
        w("the survivor lists (weights)", ws.list_w, B, size_t(ws.list_per_row) * sizeof(*ws.list_w), DK_WS_REDZONE),
        resid("the residual rows", ws.resid, B, size_t(ws.resid_per_row) * sizeof(*ws.resid), DK_WS_REDZONE) {}
  void check() const {
    for (const auto* z : {&lanes, &idx, &w, &resid}) z->check();
  }
};

// Rows the bindings' deferred checks skip (TreeArgs::skip), set before dk_emu_tree.
static const bool* g_tree_skip = nullptr;

// The SM count the launches plan with (speculative.cuh prepare_plan; 0: never prepare), set by
// dk_emu_spec_set_sms. When the plan prepares, the nodes' workspace is held here for the call and
// the prepare launch runs before the walk, as csrc/cuda/speculative.cu does.
static int64_t g_n_sms = 0;
static int g_last_node_splits = 0;  // blocks per prepared node in the last prepared call (node_plan)
struct PrepWs {                     // exactly the sizes speculative.cu allocates, between guard pages (dkemu::Guarded)
  std::optional<dkemu::Guarded> sums, idx, w;
  std::optional<dkemu::Guarded> split;  // the split plan's workspace (NaN-filled)
  void check() const {
    for (const auto* g : {&sums, &idx, &w, &split})
      if (*g) (*g)->check();
  }
};
template <class A>
static void prepare(A& a, int64_t R, bool chain, const int64_t* num_draft, PrepWs& keep) {
  if (!prepare_plan(a.target.kind, a.B, R, g_n_sms, chain)) return;
  Prepared& p = a.ws.pre;
  p.R = R;
  p.list_per_node = a.ws.list_per_row;
  keep.sums.emplace(
      dkemu::Guarded::of("dk_emu_chain / dk_emu_tree: the prepared node sums", size_t(a.B * R), NodeSum{}));
  keep.idx.emplace(dkemu::Guarded::of("dk_emu_chain / dk_emu_tree: the prepared node lists (ids)",
                                      size_t(a.B * R * p.list_per_node), int32_t(0)));
  keep.w.emplace(dkemu::Guarded::of("dk_emu_chain / dk_emu_tree: the prepared node lists (weights)",
                                    size_t(a.B * R * p.list_per_node), 0.f));
  p.sums = keep.sums->data<NodeSum>();
  p.list_idx = keep.idx->data<int32_t>();
  p.list_w = keep.w->data<float>();
  {  // each node's list ends in a red zone (list_per_row: DK_WS_REDZONE)
    std::vector<size_t> starts;
    for (int64_t k = 0; k < a.B * R; ++k) starts.push_back(size_t(k * p.list_per_node) * 4);
    keep.idx->fence_gaps(starts, size_t(a.B * R * p.list_per_node) * 4, DK_WS_REDZONE);
    keep.w->fence_gaps(starts, size_t(a.B * R * p.list_per_node) * 4, DK_WS_REDZONE);
  }
  // speculative.cu's plan_nodes, then launch_prepare's sequence (run_prepare)
  p.split = node_plan(a.target, a.B, R, g_n_sms);
  if (p.split.splits > 1) {
    keep.split.emplace(dkemu::Guarded::of("dk_emu_chain / dk_emu_tree: the split nodes' workspace",
                                          size_t(dk::cuda::sample_workspace_elems(p.split)), std::nan("")));
    p.split.a.workspace = keep.split->data<double>();
    dkemu::fence_sample_ws(*keep.split, p.split);
  }
  g_last_node_splits = p.split.splits;
  auto launch = [](auto kernel, unsigned grid, const auto& args) { dkemu::launch(grid, kThreads, kernel, args); };
  if (a.target.dtype == DType::F32)
    run_prepare<float>(a.target, num_draft, a.ws, a.B, launch);
  else if (a.target.dtype == DType::BF16)
    run_prepare<dk::bf16_t>(a.target, num_draft, a.ws, a.B, launch);
  else
    run_prepare<dk::f16_t>(a.target, num_draft, a.ws, a.B, launch);
}

extern "C" {
int dk_emu_spec_threads() { return kThreads; }
void dk_emu_spec_set_sms(int64_t n) { g_n_sms = n; }
// Whether the last dk_emu_chain / dk_emu_tree prepared its nodes.
static int g_last_prepared = 0;
int dk_emu_spec_last_prepared() { return g_last_prepared; }
// Blocks per node of the last call's prepared nodes (1: prepare_kernel; > 1: the split plan).
int dk_emu_spec_last_node_splits() { return g_last_prepared ? g_last_node_splits : 0; }
// The walk re-resolves every prepared node and compares (speculative.cuh walk_node); returns the
// mismatches since the last call and resets them.
void dk_emu_spec_check_prepared(int on) { g_check_prepared = on != 0; }
int64_t dk_emu_spec_prepared_mismatch() {
  const int64_t n = g_prepared_mismatch;
  g_prepared_mismatch = 0;
  return n;
}
void dk_emu_set_tree_skip(const bool* skip) { g_tree_skip = skip; }
int64_t dk_emu_spec_lanes(int64_t V) { return lanes_per_row(V); }
int64_t dk_emu_spec_list(int64_t V) { return list_per_row(V); }
int64_t dk_emu_spec_resid(int64_t V) { return resid_per_row(V); }
// Blocks of the split phases (sampling.cuh split_enter) that resolved a row since the last call
// (which resets the count).
int64_t dk_emu_split_blocks() {
  const int64_t n = dk::cuda::g_split_blocks;
  dk::cuda::g_split_blocks = 0;
  return n;
}
// Target rows resolved and normaliser passes made since the last call (which resets them).
void dk_emu_spec_work(int64_t* out) {
  out[0] = g_rows_resolved;
  out[1] = g_z_passes;
  g_rows_resolved = g_z_passes = 0;
}
void dk_emu_set_filters(int order, const int64_t* k, int64_t k_val, const float* p, float p_val, const float* mp,
                        float mp_val) {
  g_filter = dk::RowFilter{};
  g_filter.order = dk::FilterOrder(order);
  g_filter.top_k = {k, k_val};
  g_filter.top_p = {p, p_val};
  g_filter.min_p = {mp, mp_val};
}

void dk_emu_chain(const void* target, int kind, int dtype, int64_t V, int64_t tsb, int64_t tsr, const float* temp,
                  float temp_val, const float* draft, int64_t dsb, int64_t dsr, const int64_t* ids,
                  const int64_t* num_draft, int64_t B, int64_t N, const int64_t* seeds, uint64_t seed, uint64_t offset,
                  int64_t* out_ids, int32_t* out_acc, int32_t* out_emi, double* lanes, int64_t* removed,
                  int32_t* list_idx, float* list_w) {
  ChainArgs a;
  set_common(a, target, kind, dtype, V, tsb, tsr, temp, temp_val, draft, dsb, dsr, seeds, seed, offset, lanes,
             lanes_per_row(V), list_idx, list_w);
  a.draft_ids = ids;
  a.num_draft = num_draft;
  a.B = B;
  a.N = N;
  a.out_ids = out_ids;
  a.out_accepted = out_acc;
  a.out_emitted = out_emi;
  a.ws.removed = removed;
  a.ws.removed_per_row = 1;
  const RowScratchZones zones(a.ws, B);
  PrepWs keep;
  prepare(a, N + 1, true, num_draft, keep);
  g_last_prepared = a.ws.pre.sums != nullptr;
  run<ChainK>(a.target, unsigned(B), a);
  keep.check();
  zones.check();
}

void dk_emu_tree(const void* target, int kind, int dtype, int64_t V, int64_t tsb, int64_t tsr, const float* temp,
                 float temp_val, const float* draft, int64_t dsb, int64_t dsr, const int64_t* cand, const int64_t* ri,
                 const int64_t* nt, const int64_t* ns, int64_t B, int64_t T, int64_t W, const int64_t* seeds,
                 uint64_t seed, uint64_t offset, int64_t* predicts, int32_t* accept_index, int32_t* accept_num,
                 int32_t* err, int64_t* err_node, double* lanes, float* resid, int64_t* removed, uint8_t* seen,
                 int64_t* stack, const double* coins, const double* coins_final, double thr_single, double thr_acc,
                 int32_t* list_idx, float* list_w) {
  TreeArgs a;
  a.coins = coins;
  a.coins_final = coins_final;
  a.thr_single = thr_single;
  a.thr_acc = thr_acc;
  set_common(a, target, kind, dtype, V, tsb, tsr, temp, temp_val, draft, dsb, dsr, seeds, seed, offset, lanes,
             lanes_per_row(V > 0 ? V : 1), list_idx, list_w);
  a.cand = cand;
  a.retrive_index = ri;
  a.next_token = nt;
  a.next_sibling = ns;
  a.B = B;
  a.T = T;
  a.W = W;
  a.predicts = predicts;
  a.accept_index = accept_index;
  a.accept_num = accept_num;
  a.err = err;
  a.err_node = err_node;
  a.skip = g_tree_skip;
  a.ws.resid = resid;
  a.ws.resid_per_row = resid_per_row(V);
  a.ws.removed = removed;
  a.ws.removed_per_row = T;
  a.ws.seen = seen;
  a.ws.stack = stack;
  a.ws.tree_per_row = T;
  const RowScratchZones zones(a.ws, B);
  PrepWs keep;
  prepare(a, T, false, nullptr, keep);
  g_last_prepared = a.ws.pre.sums != nullptr;
  run<TreeK>(a.target, unsigned(B), a);
  keep.check();
  zones.check();
}

void dk_emu_build_tree(const int64_t* parents, const int64_t* prefix, int64_t B, int64_t T, uint8_t* mask,
                       int64_t* positions, int64_t* ri, int64_t* nt, int64_t* ns, int32_t* err, int64_t* err_node) {
  BuildArgs a;
  a.parents = parents;
  a.prefix_lens = prefix;
  a.B = B;
  a.T = T;
  a.mask = mask;
  a.positions = positions;
  a.retrive_index = ri;
  a.next_token = nt;
  a.next_sibling = ns;
  a.err = err;
  a.err_node = err_node;
  dkemu::launch(unsigned((B + kThreads - 1) / kThreads), kThreads, build_fn, a);
}
}
