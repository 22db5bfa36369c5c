// Speculative verification: the randomness layout, the accept rules and the tree walks, shared
// by the CPU kernels (csrc/cpu/isa/speculative.cpp) and the CUDA kernels (csrc/cuda/speculative.cuh).
// Torch-free, header-only, DK_HOST_DEVICE.
//
// Randomness (normative; the CUDA kernels use the same, so a GPU run gives the CPU's tokens):
//   key / stream as in philox.h (per-row seed: stream 0; one scalar seed: stream = batch row).
//   purpose 256 + 2*d     : acceptance uniforms at draft position d (chain) or tree depth d (the
//                           depth of the node whose children are tried). Sibling i (0-based, in
//                           retrive_next_sibling order) uses block i/2, words (0,1) if i is even
//                           else (2,3). Sibling 0 is row_uniform(key, 256 + 2*d), so a chain is
//                           exactly a tree with one child per node.
//   purpose 256 + 2*d + 1 : the one residual / bonus draw at position / depth d (block 0, words 0,1).
// A chain row with n drafts uses at most n acceptance uniforms and one draw; no draw is made for
// positions it does not have (ragged rows draw no extra randomness).
#pragma once
#include "decodekit/rng.h"

namespace dk {

constexpr uint32_t kSpecPurposeBase = 256u;
// Deepest position / depth whose purposes still fit in the 16 purpose bits.
constexpr int64_t kSpecMaxDepth = (0xffff - 257) / 2;

DK_HOST_DEVICE uint32_t spec_accept_purpose(int64_t depth) { return kSpecPurposeBase + 2u * uint32_t(depth); }
DK_HOST_DEVICE uint32_t spec_draw_purpose(int64_t depth) { return kSpecPurposeBase + 2u * uint32_t(depth) + 1u; }

// Acceptance uniform in (0, 1) for sibling `sib` at depth `depth`.
DK_HOST_DEVICE double spec_accept_uniform(const RngKey& k, int64_t depth, int64_t sib) {
  Philox4 r = philox_draw(k, spec_accept_purpose(depth), uint32_t(sib >> 1));
  return (sib & 1) ? u53_open(r.v[2], r.v[3]) : u53_open(r.v[0], r.v[1]);
}
// The residual / bonus uniform at depth `depth`.
DK_HOST_DEVICE double spec_draw_uniform(const RngKey& k, int64_t depth) {
  return row_uniform(k, spec_draw_purpose(depth));
}

// The accept rule, in double: accept x with probability min(1, r(x) / q(x)), i.e. iff u * q < r
// (u in (0,1)). One-hot drafts have q = 1 (accept with probability r(x)). r(x) = 0 never accepts;
// q(x) = 0 < r(x) always accepts.
DK_HOST_DEVICE bool spec_accept(double u, double r, double q) { return u * q < r; }

// Caller-given coins (SGLang's tree_speculative_sampling_target_only convention; one-hot drafts only):
// one uniform per node (`node`, the coin of the node whose children are tried) replaces the
// per-sibling uniforms, and `final` replaces the residual / bonus uniform. Child x_i (p = its target
// probability, M = the target mass of the children rejected before it) is accepted iff
// node <= (M + p) / max(thr_acc, 1e-9) or p >= thr_single. With thr_single = thr_acc = 1 this is the
// one-hot rule above driven by one coin (u_i = (node - M) / (1 - M) is uniform given the earlier
// rejections): lossless. Smaller thresholds accept more (SGLang's relaxed, lossy acceptance).
struct SpecCoin {
  double node = 0.0, final = 0.0;
  double thr_single = 1.0, thr_acc = 1.0;
};
DK_HOST_DEVICE bool spec_coin_accept(const SpecCoin& c, double M, double p) {
  const double ta = c.thr_acc > 1e-9 ? c.thr_acc : 1e-9;
  return c.node <= (M + p) / ta || p >= c.thr_single;
}

// ---- trees ------------------------------------------------------------------------------------
// Error codes of the tree walks (0 = ok). `node` receives the offending node.
enum SpecTreeError : int {
  kTreeOk = 0,
  kTreeRootNotFirst = 1,      // build_tree: parents[0] != -1
  kTreeTwoRoots = 2,          // build_tree: parents[t] == -1 for t >= 1
  kTreeParentRange = 3,       // build_tree: parent < -1 or >= T; verify: a link outside [-1, T)
  kTreeCycle = 4,             // build_tree: a cycle through the node
  kTreeParentAfterChild = 5,  // build_tree: parents[t] > t without a cycle
  kTreeRootAsChild = 6,       // verify: node 0 appears as a child or a sibling
  kTreeReachedTwice = 7,      // verify: a node is reached twice (cycle or shared child)
                              // (8 was "two siblings carry the same token": repeated siblings are
                              // allowed now, see verify_node in csrc/cpu/isa/speculative.cpp)
  kTreeTokenRange = 9,        // verify: a reachable node's token is outside [0, V)
};

// Build one row of a tree from its parent array (parents[t] = parent of node t, -1 for the root,
// node 0). Outputs: mask (T rows of W = ceil(T/8) bytes, bit j of row t = j is t or an ancestor
// of t, little-endian bit order), positions (prefix_len + depth), retrive_index (base + t),
// retrive_next_token (first child = lowest index, or -1), retrive_next_sibling (next sibling by
// index, or -1). Requires parents[t] < t for t >= 1 (checked: every violation is an error, never a
// hang). Returns an error code and sets *bad_node.
template <class I>
DK_HOST_DEVICE int build_tree_row(const I* parents, int64_t T, int64_t prefix_len, int64_t base, uint8_t* mask,
                                  int64_t* positions, int64_t* retrive_index, int64_t* next_token,
                                  int64_t* next_sibling, int64_t* bad_node) {
  const int64_t W = (T + 7) / 8;
  // validate first (no output depends on an invalid parent)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = int64_t(parents[t]);
    *bad_node = t;
    if (t == 0) {
      if (p != -1) return kTreeRootNotFirst;
      continue;
    }
    if (p == -1) return kTreeTwoRoots;
    if (p < -1 || p >= T) return kTreeParentRange;
    if (p >= t) {
      // a cycle through t? follow at most T parent links from t
      int64_t c = p;
      for (int64_t steps = 0; steps < T && c >= 0 && c < T; ++steps) {
        if (c == t) return kTreeCycle;
        c = int64_t(parents[c]);
      }
      return kTreeParentAfterChild;
    }
  }
  *bad_node = -1;
  for (int64_t t = 0; t < T; ++t) {
    retrive_index[t] = base + t;
    next_token[t] = -1;
    next_sibling[t] = -1;
  }
  // children in increasing index order: walk t downwards, pushing each at the front
  for (int64_t t = T - 1; t >= 1; --t) {
    const int64_t p = int64_t(parents[t]);
    next_sibling[t] = next_token[p];
    next_token[p] = t;
  }
  for (int64_t t = 0; t < T; ++t) {
    uint8_t* row = mask + t * W;
    if (t == 0) {
      for (int64_t w = 0; w < W; ++w) row[w] = 0;
      positions[0] = prefix_len;
    } else {
      const int64_t p = int64_t(parents[t]);
      const uint8_t* prow = mask + p * W;
      for (int64_t w = 0; w < W; ++w) row[w] = prow[w];
      positions[t] = positions[p] + 1;
    }
    row[t >> 3] = uint8_t(row[t >> 3] | (1u << (t & 7)));
  }
  return kTreeOk;
}

// Check that retrive_next_token / retrive_next_sibling describe a tree rooted at node 0: every link
// in [-1, T), node 0 never a child, no node reached twice (so every walk ends), reachable tokens in
// [0, V). Sibling tokens may repeat (the walks give a repeated token no mass once its first copy is
// rejected). `seen` is scratch of T bytes. Iterative (explicit stack in `stack`, T entries). Returns
// an error code and sets *bad_node.
template <class I>
DK_HOST_DEVICE int check_tree_row(const I* cand, const I* next_token, const I* next_sibling, int64_t T, int64_t V,
                                  uint8_t* seen, int64_t* stack, int64_t* bad_node) {
  for (int64_t t = 0; t < T; ++t) seen[t] = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t a = int64_t(next_token[t]), b = int64_t(next_sibling[t]);
    *bad_node = t;
    if (a < -1 || a >= T || b < -1 || b >= T) return kTreeParentRange;
    if (a == 0 || b == 0) return kTreeRootAsChild;
  }
  int64_t sp = 0;
  stack[sp++] = 0;
  seen[0] = 1;
  while (sp > 0) {
    const int64_t n = stack[--sp];
    // children of n: the sibling chain from next_token[n]; each visited node is marked, so a
    // cycle in the chain or a shared child is found before any loop can repeat
    for (int64_t c = int64_t(next_token[n]); c != -1; c = int64_t(next_sibling[c])) {
      *bad_node = c;
      if (seen[c]) return kTreeReachedTwice;
      seen[c] = 1;
      const int64_t x = int64_t(cand[c]);
      if (x < 0 || x >= V) return kTreeTokenRange;
      stack[sp++] = c;
    }
  }
  *bad_node = -1;
  return kTreeOk;
}

}  // namespace dk
