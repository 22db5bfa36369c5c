"""Lossless speculative verification: chain and tree, stochastic and greedy.

Names and argument orders follow FlashInfer (`chain_speculative_sampling`) and SGLang (trees:
`candidates`, `retrive_index`, `retrive_next_token`, `retrive_next_sibling`; outputs `predicts`,
`accept_index`, `accept_token_num`), with decodekit's conventions (outputs returned, int64 ids);
decodekit.compat.flashinfer / decodekit.compat.sglang take the peers' exact signatures. decodekit
extensions are keyword-only. Semantics: docs/semantics.md, "Speculative verification"; the accept rules are spelled out in
csrc/cpu/isa/speculative.cpp and the randomness layout in csrc/include/decodekit/speculative.h.

Decisions where the peers are silent or differ:
- Token ids are int64 (torch convention; ``out_dtype=torch.int32`` gives FlashInfer's/SGLang's
  dtype); counts and ``accept_index`` are int32 as in FlashInfer / SGLang.
- ``accepted_num`` is FlashInfer's metric: the number of drafts that pass the accept test when each
  is considered on its own (not stopping at the first rejection); ``emitted_num`` is the accepted
  prefix length. ``maybe_output_*`` tensors, when given, are incremented in place (FlashInfer) and
  returned.
- Probability rows are used as given (assumed to sum to 1); NaN or negative entries count as 0 in
  residual draws. A logits row that is all -inf or holds NaN / +inf stops verification at that
  position and emits token 0.
- Trees: children are tried in ``retrive_next_sibling`` order. With draft probs, the i-th child is
  taken to be drawn from the node's draft distribution with the earlier siblings removed (sampling
  without replacement); this makes multi-child verification exactly lossless. Without draft probs
  (one-hot / top-k drafters, SGLang's "target only") it is lossless for any children.
- Repeated sibling tokens are accepted (SGLang's drafters produce them). Greedy: the first matching
  child in sibling order wins. Stochastic: a child whose token was already rejected at the same node
  is skipped (its residual mass is 0, so it could never be accepted); it changes nothing, so the
  walk is the walk of the tree without the repeat: lossless for one-hot drafts, and with draft
  probs lossless when the children left after removing repeats are a draw without replacement.
- ``coins`` [B, T] / ``coins_final`` [B] (keyword, one-hot drafts): caller uniforms in place of
  Philox, SGLang's convention: one coin per node whose children are tried (child x_i accepted iff
  coin <= (M + p(x_i)) / threshold_acc or p(x_i) >= threshold_single, M = target mass of the
  children rejected before it) and one coin for the residual / bonus draw. Thresholds of 1 are the
  lossless case (exactly the one-hot rule, driven by one coin per node).
- ``predicts`` is [B*T] indexed by ``retrive_index``; slots that are not written hold -1.
- The seed / offset / generator rules are the sampling family's (docs/semantics.md, "Randomness").
"""

from typing import NamedTuple, Optional

import torch

from ._ops import ops
from .attention import _prefix_tensor
from .sampling import Param, _indices, _order, _rng, _split

__all__ = [
    "chain_speculative_sampling",
    "chain_speculative_sampling_from_logits",
    "greedy_verify",
    "build_tree",
    "SpecTree",
    "tree_speculative_sampling",
    "tree_speculative_sampling_from_logits",
    "verify_tree_greedy",
]

_PROBS, _LOGITS, _IDS = 0, 1, 2
_NO_FILTERS = (None, 1.0, None, 0, None, 1.0, None, 0.0, 0)


# ---- fake (meta) impls of this module's ops (schemas: csrc/torch/ops.cpp) ----------------------
@torch.library.register_fake("decodekit::chain_verify")
def _chain_verify_fake(target, draft_token_ids, *_params, **_kw):  # the rest sets no shape
    B, N = draft_token_ids.shape
    return (
        draft_token_ids.new_empty((B, N + 1), dtype=torch.int64),
        draft_token_ids.new_empty((B,), dtype=torch.int32),
        draft_token_ids.new_empty((B,), dtype=torch.int32),
    )


@torch.library.register_fake("decodekit::tree_verify")
def _tree_verify_fake(
    candidates,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    target,
    draft_probs,
    num_speculative_tokens,
    *_p,
    **_kw,
):  # the rest sets no shape
    B, T = candidates.shape
    return (
        candidates.new_empty((B * T,), dtype=torch.int64),
        candidates.new_empty((B, num_speculative_tokens), dtype=torch.int32),
        candidates.new_empty((B,), dtype=torch.int32),
    )


@torch.library.register_fake("decodekit::build_tree")
def _build_tree_fake(parents, prefix_lens):
    B, T = parents.shape
    return (
        parents.new_empty((B, T, (T + 7) // 8), dtype=torch.uint8),
        parents.new_empty((B * T,), dtype=torch.int64),
        parents.new_empty((B, T), dtype=torch.int64),
        parents.new_empty((B, T), dtype=torch.int64),
        parents.new_empty((B, T), dtype=torch.int64),
    )


def _filter_args(temperature, top_k, top_p, min_p, order, B=None):
    """The filter arguments of the ops; B (batch rows) broadcasts 0-D device tensors."""
    T_arr, T_val = _split(temperature, 1.0, "temperature", n=B)
    k_arr, k_val = _split(top_k, 0, "top_k", int, n=B)
    p_arr, p_val = _split(top_p, 1.0, "top_p", n=B)
    mp_arr, mp_val = _split(min_p, 0.0, "min_p", n=B)
    return (T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, _order(order))


def _ids_out(ids, out_dtype):
    if out_dtype is None or out_dtype == torch.int64:
        return ids
    if out_dtype != torch.int32:
        raise ValueError(f"out_dtype must be torch.int64 or torch.int32, got {out_dtype}")
    return ids.to(torch.int32)


def _accumulate(out, value, name):
    if out is None:
        return value
    if not isinstance(out, torch.Tensor) or out.shape != value.shape:
        raise ValueError(f"{name} must be a tensor of shape {tuple(value.shape)}")
    out.add_(value.to(out.dtype))
    return out


def _batch(t):
    """B of a [B, ...] tensor argument (a shape, never a value)."""
    return t.shape[0] if isinstance(t, torch.Tensor) and t.dim() >= 1 else None


def _check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _num_draft(num_draft_tokens, draft_token_ids):
    """num_draft_tokens as a tensor (a sequence of ints is accepted), on the drafts' device."""
    if num_draft_tokens is None or isinstance(num_draft_tokens, torch.Tensor):
        return num_draft_tokens
    return _indices(num_draft_tokens, draft_token_ids.device, "num_draft_tokens")


def _chain(
    target,
    target_name,
    draft_token_ids,
    draft_probs,
    num_draft_tokens,
    kind,
    filters,
    seed,
    offset,
    generator,
    out_acc,
    out_emi,
    out_dtype,
):
    """The common body of the chain wrappers: argument checks, seeds, the op, the optional
    accumulation into caller tensors (FlashInfer's maybe_output_* arguments) and the id dtype."""
    _check_tensor(target, target_name)
    _check_tensor(draft_token_ids, "draft_token_ids")
    seed_arr, seed_val, off, off_arr = _rng(seed, offset, generator, draft_token_ids)
    ids, acc, emi = ops.chain_verify(
        target,
        draft_token_ids,
        draft_probs,
        _num_draft(num_draft_tokens, draft_token_ids),
        kind,
        *filters,
        seed_arr,
        seed_val,
        off,
        off_arr,
    )
    acc = _accumulate(out_acc, acc, "maybe_output_accepted_token_num")
    emi = _accumulate(out_emi, emi, "maybe_output_emitted_draft_token_num")
    return _ids_out(ids, out_dtype), acc, emi


# ---------------------------------------------------------------------------------------------
# chains
def chain_speculative_sampling(
    draft_probs: Optional[torch.Tensor],
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    maybe_output_accepted_token_num: Optional[torch.Tensor] = None,
    maybe_output_emitted_draft_token_num: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    seed=None,
    offset=None,
    *,
    num_draft_tokens: Optional[torch.Tensor] = None,
    out_dtype=None,
):
    """Verify a chain of N drafts per row against the target (lossless rejection sampling).

    draft_probs [B, N, V] float32 or None (one-hot drafts: n-gram / EAGLE-style drafters),
    draft_token_ids [B, N], target_probs [B, N+1, V] float32. Draft j is accepted with probability
    min(1, p_j(x_j) / q_j(x_j)) (one-hot: p_j(x_j)); at the first rejection a token is drawn from
    normalize(max(p_j - q_j, 0)) (one-hot: p_j without x_j); if all are accepted a bonus token is
    drawn from p_{N+1}. num_draft_tokens [B] (keyword) makes the batch ragged: row b verifies its
    first num_draft_tokens[b] drafts, its bonus comes from target_probs[b, num_draft_tokens[b]].

    Returns (output_token_ids [B, N+1] padded with -1, accepted_num [B], emitted_num [B]).
    """
    return _chain(
        target_probs,
        "target_probs",
        draft_token_ids,
        draft_probs,
        num_draft_tokens,
        _PROBS,
        _NO_FILTERS,
        seed,
        offset,
        generator,
        maybe_output_accepted_token_num,
        maybe_output_emitted_draft_token_num,
        out_dtype,
    )


def chain_speculative_sampling_from_logits(
    draft_probs: Optional[torch.Tensor],
    draft_token_ids: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    temperature: Param = 1.0,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    order: str = "sequential",
    num_draft_tokens=None,
    maybe_output_accepted_token_num=None,
    maybe_output_emitted_draft_token_num=None,
    generator=None,
    seed=None,
    offset=None,
    out_dtype=None,
):
    """chain_speculative_sampling against target LOGITS [B, N+1, V] (fp32/bf16/fp16) and the row's
    sampling parameters: the target at every position is the filtered, renormalised distribution
    the ordinary sampler draws from (temperature -> top-k -> top-p -> min-p, docs/semantics.md "Filters"),
    resolved inside the kernel, so verified and replacement tokens obey the same filters.
    temperature == 0 (per row) means greedy verification (accept while draft == argmax)."""
    return _chain(
        target_logits,
        "target_logits",
        draft_token_ids,
        draft_probs,
        num_draft_tokens,
        _LOGITS,
        _filter_args(temperature, top_k, top_p, min_p, order, _batch(draft_token_ids)),
        seed,
        offset,
        generator,
        maybe_output_accepted_token_num,
        maybe_output_emitted_draft_token_num,
        out_dtype,
    )


def greedy_verify(draft_token_ids: torch.Tensor, target_logits: torch.Tensor, *, num_draft_tokens=None, out_dtype=None):
    """Greedy chain verification: accept drafts while draft == argmax(target_logits[:, j]) (lowest
    index on ties), then emit the argmax at the first mismatch (or at position N).
    Returns (output_token_ids [B, N+1] padded with -1, accepted_num [B], emitted_num [B]) with
    accepted_num counting every position whose draft equals the argmax."""
    _check_tensor(target_logits, "target_logits")
    _check_tensor(draft_token_ids, "draft_token_ids")
    ids, acc, emi = ops.chain_verify(
        target_logits,
        draft_token_ids,
        None,
        _num_draft(num_draft_tokens, draft_token_ids),
        _LOGITS,
        None,
        0.0,
        None,
        0,
        None,
        1.0,
        None,
        0.0,
        0,
        None,
        0,
        0,
    )
    return _ids_out(ids, out_dtype), acc, emi


# ---------------------------------------------------------------------------------------------
# trees
class SpecTree(NamedTuple):
    """build_tree's outputs (a tuple; unpack it or use the names)."""

    tree_mask: torch.Tensor  # uint8 [B, T, ceil(T/8)], little-endian bits
    positions: torch.Tensor  # int64 [B*T], prefix_len + depth
    retrive_index: torch.Tensor  # int64 [B, T], b*T + t
    retrive_next_token: torch.Tensor  # int64 [B, T], first child (lowest index) or -1
    retrive_next_sibling: torch.Tensor  # int64 [B, T], next sibling (by index) or -1


def build_tree(parents: torch.Tensor, prefix_lens) -> SpecTree:
    """Tree structures from a parent array [B, T] (parents[b, 0] == -1: node 0 is the root, the last
    verified token; every other node's parent has a smaller index). prefix_lens: int or [B].

    Returns SpecTree(tree_mask, positions, retrive_index, retrive_next_token, retrive_next_sibling):
    the packed mask (bit j of row t set iff j is t or an ancestor of t, FlashInfer segment_packbits
    layout; feed it to tree_attention), positions = prefix_len + depth in SGLang's flat [B*T] layout,
    and SGLang's retrive_* lists (children in increasing index order). An invalid tree (two roots,
    a parent out of range or after its child, a cycle) is a ValueError naming the row and node."""
    _check_tensor(parents, "parents")
    B = parents.shape[0] if parents.dim() >= 1 else 0
    return SpecTree(*ops.build_tree(parents, _prefix_tensor(prefix_lens, B, parents.device)))


def _tree_width(num_speculative_tokens, candidates):
    if num_speculative_tokens is None:
        return candidates.shape[1] if candidates.dim() == 2 else 1
    if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int):
        raise ValueError(f"num_speculative_tokens must be an int, got {type(num_speculative_tokens).__name__}")
    return num_speculative_tokens


def tree_speculative_sampling(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: Optional[torch.Tensor] = None,
    *,
    num_speculative_tokens: Optional[int] = None,
    deterministic: bool = True,
    generator=None,
    seed=None,
    offset=None,
    out_dtype=None,
    coins=None,
    coins_final=None,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
):
    """Multi-draft rejection sampling down a token tree (SpecInfer), SGLang's layout.

    candidates [B, T] (node 0 = root, the last verified token), retrive_* [B, T] (build_tree),
    target_probs [B, T, V] (target_probs[b, t] = the target after node t), draft_probs [B, T, V]
    (the draft distribution node t's children were drawn from) or None (one-hot drafts).
    From the root: the children of the current node are tried in order against the residual target
    (see the module docstring); the walk moves to the accepted child, and a node where no child is
    accepted emits a token from the residual (a leaf or the depth limit: a bonus token from p).
    num_speculative_tokens = W, the width of accept_index (at most W - 1 drafts are accepted;
    default T). coins / coins_final / threshold_*: caller uniforms (see the module docstring).

    Returns (predicts [B*T]: predicts[retrive_index[b, t]] = the token following accepted node t,
    -1 elsewhere; accept_index [B, W]: retrive_index of the root and the accepted nodes, -1 padded;
    accept_token_num [B]: accepted drafts)."""
    _check_tensor(candidates, "candidates")
    _check_tensor(target_probs, "target_probs")
    seed_arr, seed_val, off, off_arr = _rng(seed, offset, generator, candidates)
    W = _tree_width(num_speculative_tokens, candidates)
    pred, ai, an = ops.tree_verify(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target_probs,
        draft_probs,
        W,
        _PROBS,
        *_NO_FILTERS,
        seed_arr,
        seed_val,
        off,
        coins,
        coins_final,
        float(threshold_single),
        float(threshold_acc),
        off_arr,
    )
    return _ids_out(pred, out_dtype), ai, an


def tree_speculative_sampling_from_logits(
    candidates,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    target_logits: torch.Tensor,
    draft_probs: Optional[torch.Tensor] = None,
    *,
    temperature: Param = 1.0,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    order: str = "sequential",
    num_speculative_tokens: Optional[int] = None,
    generator=None,
    seed=None,
    offset=None,
    out_dtype=None,
    coins=None,
    coins_final=None,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
):
    """tree_speculative_sampling against target LOGITS [B, T, V] plus per-row sampling parameters,
    the filters applied inside the kernel at every node visited; temperature 0 = greedy."""
    _check_tensor(candidates, "candidates")
    _check_tensor(target_logits, "target_logits")
    seed_arr, seed_val, off, off_arr = _rng(seed, offset, generator, candidates)
    W = _tree_width(num_speculative_tokens, candidates)
    pred, ai, an = ops.tree_verify(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target_logits,
        draft_probs,
        W,
        _LOGITS,
        *_filter_args(temperature, top_k, top_p, min_p, order, _batch(candidates)),
        seed_arr,
        seed_val,
        off,
        coins,
        coins_final,
        float(threshold_single),
        float(threshold_acc),
        off_arr,
    )
    return _ids_out(pred, out_dtype), ai, an


def verify_tree_greedy(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target: torch.Tensor,
    *,
    num_speculative_tokens: Optional[int] = None,
    out_dtype=None,
):
    """Greedy tree verification (SGLang verify_tree_greedy): from the root, accept the child whose
    token equals the target's choice at the current node, until none does; then emit that choice.
    target: logits [B, T, V] (argmax, lowest index on ties, computed only at the nodes visited) or
    SGLang's target_predict ids [B, T]. Returns (predicts, accept_index, accept_token_num)."""
    _check_tensor(candidates, "candidates")
    _check_tensor(target, "target")
    W = _tree_width(num_speculative_tokens, candidates)
    if target.dtype.is_floating_point:
        args = (_LOGITS, None, 0.0, None, 0, None, 1.0, None, 0.0, 0)
    else:
        args = (_IDS,) + _NO_FILTERS
    pred, ai, an = ops.tree_verify(
        candidates, retrive_index, retrive_next_token, retrive_next_sibling, target, None, W, *args, None, 0, 0
    )
    return _ids_out(pred, out_dtype), ai, an
