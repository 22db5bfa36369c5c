"""Loads the native extension and registers the fake (meta) implementations of every op."""

import torch

from . import _C  # noqa: F401  (registers the ops via TORCH_LIBRARY)

ops = torch.ops.decodekit


def _n_out(x, indices):
    return x.shape[0] if indices is None else indices.shape[0]


@torch.library.register_fake("decodekit::sample")
def _sample_fake(
    x,
    indices,
    is_probs,
    temperature_arr,
    temperature_val,
    top_k_arr,
    top_k_val,
    top_p_arr,
    top_p_val,
    min_p_arr,
    min_p_val,
    order,
    seed_arr,
    seed_val,
    offset,
):
    n = _n_out(x, indices)
    return (
        x.new_empty((n,), dtype=torch.int64),
        x.new_empty((n,), dtype=torch.bool),
        x.new_empty((n,), dtype=torch.float32),
    )


@torch.library.register_fake("decodekit::gumbel_sample")
def _gumbel_fake(logits, indices, seed_arr, seed_val, offset):
    n = _n_out(logits, indices)
    return logits.new_empty((n,), dtype=torch.int64), logits.new_empty((n,), dtype=torch.bool)


@torch.library.register_fake("decodekit::draw_seed")
def _draw_seed_fake():
    return torch.empty((1,), dtype=torch.int64, device="cpu")


@torch.library.register_fake("decodekit::filter")
def _filter_fake(
    x,
    kind,
    is_probs,
    temperature_arr,
    temperature_val,
    top_k_arr,
    top_k_val,
    top_p_arr,
    top_p_val,
    min_p_arr,
    min_p_val,
    order,
):
    return x.new_empty(x.shape, dtype=x.dtype if kind == 0 else torch.float32)


@torch.library.register_fake("decodekit::pipeline")
def _pipeline_fake(
    x,
    indices,
    params,
    order,
    bitmask,
    banned,
    bias_ids,
    bias_vals,
    prompt,
    output,
    mode,
    top_n,
    raw_logprobs,
    want_logprob,
    seed_arr,
    seed_val,
    offset,
):
    n = _n_out(x, indices)
    s = n if mode == 0 else 0
    return (
        x.new_empty((s,), dtype=torch.int64),
        x.new_empty((s,), dtype=torch.bool),
        x.new_empty((s,), dtype=torch.float32),
        x.new_empty((s,), dtype=torch.int64),
        x.new_empty((s, top_n), dtype=torch.int64),
        x.new_empty((s, top_n), dtype=torch.float32),
        x.new_empty((n - s, x.shape[1])),
    )


@torch.library.register_fake("decodekit::apply_token_bitmask_inplace")
def _bitmask_fake(logits, bitmask, indices):
    return None


# ---- speculative verification (chain / tree / build_tree) -----------------------------------
@torch.library.register_fake("decodekit::chain_verify")
def _chain_verify_fake(
    target,
    draft_token_ids,
    draft_probs,
    num_draft_tokens,
    target_kind,
    temperature_arr,
    temperature_val,
    top_k_arr,
    top_k_val,
    top_p_arr,
    top_p_val,
    min_p_arr,
    min_p_val,
    order,
    seed_arr,
    seed_val,
    offset,
):
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
    target_kind,
    temperature_arr,
    temperature_val,
    top_k_arr,
    top_k_val,
    top_p_arr,
    top_p_val,
    min_p_arr,
    min_p_val,
    order,
    seed_arr,
    seed_val,
    offset,
    coins=None,
    coins_final=None,
    threshold_single=1.0,
    threshold_acc=1.0,
):
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


@torch.library.register_fake("decodekit::tree_attention")
def _tree_attention_fake(q, k, v, tree_mask, prefix_lens, sm_scale, kv_layout):
    B, T, Hq, D = q.shape
    return q.new_empty((B, T, Hq, D)), q.new_empty((B, T, Hq), dtype=torch.float32)
