"""Tree attention: the attention step of tree speculative decoding (SpecInfer, Medusa, EAGLE).

T draft tokens arranged as a tree are scored in one forward pass. Query t of batch b attends every
cached key s < prefix_lens[b] (dense) and the tree key at position prefix_lens[b] + j iff
tree_mask[b, t, j] (sparse; usually "ancestor-or-self"). Semantics: docs/semantics.md, "Tree attention".
"""

import collections
import math
from typing import Optional, Sequence, Union

import torch

from ._ops import ops
from .sampling import _is_int

__all__ = ["tree_attention", "tree_attention_mask", "pack_tree_mask", "unpack_tree_mask", "register_hf_attention"]

PrefixLens = Union[int, Sequence[int], torch.Tensor]


# ---- fake (meta) impls of this module's ops (schemas: csrc/torch/ops.cpp) ----------------------
@torch.library.register_fake("decodekit::tree_attention")
def _tree_attention_fake(q, k, v, tree_mask, prefix_lens, sm_scale, kv_layout):
    B, T, Hq, D = q.shape
    return q.new_empty((B, T, Hq, D)), q.new_empty((B, T, Hq), dtype=torch.float32)


def _prefix_tensor(prefix_lens: PrefixLens, B: int, device) -> torch.Tensor:
    """prefix_lens as an int64 tensor [B] (an int, a sequence of ints or an int tensor is accepted;
    Python / numpy ints must lie in [0, 2^63), the op checks the rest)."""
    if isinstance(prefix_lens, torch.Tensor):
        if prefix_lens.dim() == 0:
            return prefix_lens.reshape(1).expand(B).to(device=device, dtype=torch.int64)
        return prefix_lens
    vals = [prefix_lens] if _is_int(prefix_lens) else prefix_lens
    if not isinstance(vals, (list, tuple)) or not all(_is_int(v) for v in vals):
        raise TypeError(
            f"prefix_lens must be an int, a sequence of ints or an int tensor [B], got {type(prefix_lens).__name__}"
        )
    bad = [int(v) for v in vals if not 0 <= int(v) < 2**63]
    if bad:
        raise ValueError(f"prefix_lens must be in [0, 2^63), got {bad[0]}")
    if _is_int(prefix_lens):
        return torch.full((B,), int(prefix_lens), dtype=torch.int64, device=device)
    return torch.tensor([int(v) for v in vals], dtype=torch.int64, device=device)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    prefix_lens: PrefixLens,
    *,
    sm_scale: Optional[float] = None,
    kv_layout: str = "NHD",
    return_lse: bool = False,
):
    """Attention of T tree queries over a KV cache holding the prefix and the tree's own keys.

    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] (kv_layout="NHD") or [B, Hkv, S, D] ("HND", the Hugging
    Face cache layout); Hq % Hkv == 0 (GQA); D in {64, 80, 96, 128, 256}; fp32 / bf16 / fp16 (all
    three the same dtype), fp32 accumulation. The tree's keys are at positions prefix_lens[b] ..
    prefix_lens[b] + T - 1, so S >= prefix_lens[b] + T. tree_mask: bool [B, T, T] or packed uint8
    [B, T, ceil(T/8)] (bit j % 8 of byte j // 8, FlashInfer segment_packbits little-endian).
    sm_scale defaults to 1/sqrt(D).

    Returns out [B, T, Hq, D] in q's dtype, and with return_lse=True also lse [B, T, Hq] float32:
    the natural log of sum_s exp(sm_scale * q.k_s) over the attended keys (-inf, with out = 0, for
    a query that attends no key at all).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("tree_mask", tree_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, T, Hq, D], got shape {tuple(q.shape)}")
    plens = _prefix_tensor(prefix_lens, q.shape[0], q.device)
    for name, t in (("k", k), ("v", v), ("tree_mask", tree_mask), ("prefix_lens", plens)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if sm_scale is not None:
        sm_scale = float(sm_scale)
    out, lse = ops.tree_attention(q, k, v, tree_mask, plens, sm_scale, kv_layout)
    return (out, lse) if return_lse else out


def pack_tree_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., T] -> uint8 [..., ceil(T/8)] with little-endian bit order (bit j % 8 of byte j // 8)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    T = mask.shape[-1]
    pad = (-T) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(*mask.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=mask.device)).to(torch.uint8)
    return (m * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_tree_mask(packed: torch.Tensor, T: int) -> torch.Tensor:
    """uint8 [..., ceil(T/8)] -> bool [..., T] (inverse of pack_tree_mask)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    bits = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :T].bool()


def tree_attention_mask(
    tree_mask: torch.Tensor, prefix_lens: PrefixLens, kv_len: Optional[int] = None, *, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """The dense mask [B, 1, T, kv_len] equivalent to tree_attention's (tree_mask, prefix_lens), for
    torch SDPA (attn_mask=) or a Hugging Face model (a 4-D attention_mask is used as given).

    Key s is visible to query t of batch b iff s < prefix_lens[b], or s = prefix_lens[b] + j with
    tree_mask[b, t, j]. kv_len defaults to max(prefix_lens) + T; keys past prefix_lens[b] + T are
    hidden. dtype=torch.bool gives True = attend (SDPA's convention); a floating dtype gives an
    additive mask: 0 where visible, torch.finfo(dtype).min where hidden (the Hugging Face convention).
    """
    if tree_mask.dim() != 3:
        raise ValueError(
            f"tree_mask must be bool [B, T, T] or packed uint8 [B, T, ceil(T/8)], got shape {tuple(tree_mask.shape)}"
        )
    B, T = tree_mask.shape[:2]
    if tree_mask.dtype == torch.uint8:
        if tree_mask.shape[2] != (T + 7) // 8:
            raise ValueError(
                f"tree_mask (packed uint8) must have shape [{B}, {T}, {(T + 7) // 8}], got {tuple(tree_mask.shape)}"
            )
        tree_mask = unpack_tree_mask(tree_mask, T)
    elif tree_mask.dtype != torch.bool or tree_mask.shape[2] != T:
        raise ValueError(
            f"tree_mask must be bool [{B}, {T}, {T}] or packed uint8 [{B}, {T}, {(T + 7) // 8}], got "
            f"{tree_mask.dtype} {tuple(tree_mask.shape)}"
        )
    device = tree_mask.device
    plens = _prefix_tensor(prefix_lens, B, device).to(device=device, dtype=torch.int64)
    if plens.shape != (B,):
        raise ValueError(f"prefix_lens must be 1-D of length {B}, got shape {tuple(plens.shape)}")
    if B and int(plens.min()) < 0:
        raise ValueError(f"prefix_lens must be >= 0, got {int(plens.min())}")
    need = (int(plens.max()) if B else 0) + T
    if kv_len is None:
        kv_len = need
    elif kv_len < need:
        raise ValueError(f"kv_len must be >= max(prefix_lens) + T = {need}, got {kv_len}")
    s = torch.arange(kv_len, device=device)
    P = plens[:, None]  # [B, 1]
    prefix = (s[None, :] < P)[:, None, :]  # [B, 1, S]
    j = s[None, :] - P  # tree index of key s, [B, S]
    in_tree = (j >= 0) & (j < T)
    jc = j.clamp(0, max(T - 1, 0))[:, None, :].expand(B, T, kv_len)
    tree = torch.gather(tree_mask, 2, jc) & in_tree[:, None, :]
    dense = (prefix | tree)[:, None]  # [B, 1, T, S]
    if dtype == torch.bool:
        return dense
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.bool or a floating dtype, got {dtype}")
    return torch.zeros(dense.shape, dtype=dtype, device=device).masked_fill_(~dense, torch.finfo(dtype).min)


# ---- Hugging Face transformers integration --------------------------------------------------
HF_ATTENTION_NAME = "decodekit_tree"


def _tree_from_dense(attention_mask: torch.Tensor, T: int, S: int):
    """Recover (tree_mask bool [B, T, T], prefix_len) from a 4-D HF/SDPA mask whose last T key slots
    are the tree and whose first S - T slots are fully visible; None if the mask is not of that form."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-2] != T:
        return None
    m = attention_mask[:, 0]
    if m.shape[-1] < S:
        return None
    m = m[..., :S]
    if m.dtype == torch.bool:
        vis = m
    else:
        vis = m == 0
        hidden = m <= torch.finfo(m.dtype).min / 2
        if not bool((vis | hidden).all()):
            return None  # a bias that is neither 0 nor "masked": not a plain tree mask
    P = S - T
    if P > 0 and not bool(vis[..., :P].all()):
        return None  # padding or a sliding window in the prefix
    return vis[..., P:].contiguous(), P


# How the hook decided, per call: "kernel" or "fallback: <reason>" (see hf_attention_forward).
HOOK_COUNTS: "collections.Counter[str]" = collections.Counter()

# Decode steps (one query per sequence over the whole cache) take the kernel where it was measured
# to be at least as fast as SDPA: fp32 with B * Hq * S * D >= HOOK_MIN_DECODE_WORK (development
# machine, 1 thread: 0.96-1.36x SDPA's time ratio from 2^17-2^19, 8.3x at Hq/Hkv 32/8, D 128,
# S 2048; below ~2^17 the op's fixed cost (~10 us) loses to SDPA; bf16 decode was slower than
# SDPA at every size measured up to S = 1024).
HOOK_MIN_DECODE_WORK = 1 << 18


def _fallback_reason(query, key, value, dropout, kwargs) -> Optional[str]:
    D = query.shape[-1]
    if dropout != 0.0:
        return "dropout"
    if D not in (64, 80, 96, 128, 256):
        return f"head dim {D}"
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ):
        return "dtype"
    if query.device.type != "cpu":
        return "device"  # the CUDA kernel exists but has not run on a GPU yet
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return "score bias / softcap"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    return None


def hf_attention_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None, **kwargs
):
    """A transformers attention function (AttentionInterface signature) that runs decodekit's tree
    attention kernel: query [B, Hq, T, D], key/value [B, Hkv, S, D] (the HF cache layout, kv_layout
    "HND"; GQA without repeat_kv).

    Which calls take the kernel (the fallback rule; every decision is counted in HOOK_COUNTS):
    - a tree passed as `tree_mask` / `prefix_lens` keywords to the model call: always;
    - a 4-D mask (bool or additive 0 / min) whose first P = S - T keys are all visible (P >= 1) and
      whose last T keys form any T x T pattern: a tree (or causal) verification step over the
      cache, e.g. from tree_attention_mask(...);
    - a decode step (T = 1; transformers passes no mask when there is no padding) over the whole
      cache, when it is fp32 and B * Hq * S * D >= HOOK_MIN_DECODE_WORK (where the kernel was
      measured to be at least as fast as SDPA).
    SDPA takes the rest: a prefill (T > 1 queries and no cached prefix: SDPA's dense causal path
    beat the kernel's per-query tree walk at every size measured), smaller or non-fp32 decode
    steps, padding or a sliding window in the prefix, a mask that is not 0 / min, is_causal=False
    without a mask, dropout, a head dim outside {64, 80, 96, 128, 256}, mixed or other dtypes, a
    non-CPU device, softcap / position bias, output_attentions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, T, D = query.shape
    S = key.shape[2]
    tree_mask, prefix_lens = kwargs.pop("tree_mask", None), kwargs.pop("prefix_lens", None)
    reason = _fallback_reason(query, key, value, dropout, kwargs)
    if reason is None and tree_mask is None:
        P = None
        if attention_mask is not None:
            found = _tree_from_dense(attention_mask, T, S)
            if found is None:
                reason = "mask is not a tree over a fully visible prefix (padding, window or bias)"
            else:
                tree_mask, P = found
        elif T == 1:
            tree_mask, P = torch.ones((1, 1, 1), dtype=torch.bool), S - 1
        elif not kwargs.get("is_causal", getattr(module, "is_causal", True)):
            reason = "no mask and not causal"
        else:
            P = 0  # SDPA's is_causal without a mask: a prefill
        if reason is None:
            if P == 0 and T > 1:
                reason = "prefill (no cached prefix)"
            elif T == 1 and (query.dtype != torch.float32 or B * Hq * S * D < HOOK_MIN_DECODE_WORK):
                reason = "decode step below the kernel's break-even size (or not fp32)"
            else:
                tree_mask = tree_mask.expand(B, T, T)
                prefix_lens = torch.full((B,), P, dtype=torch.int64)
    if reason is not None:
        HOOK_COUNTS[f"fallback: {reason}"] += 1
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    HOOK_COUNTS["kernel"] += 1
    out = tree_attention(query.transpose(1, 2), key, value, tree_mask, prefix_lens, sm_scale=scaling, kv_layout="HND")
    return out, None


def register_hf_attention(name: str = HF_ATTENTION_NAME) -> str:
    """Register hf_attention_forward with transformers' AttentionInterface (and SDPA-style masks with
    AttentionMaskInterface) under `name`, so `model.set_attn_implementation(name)` or
    `from_pretrained(..., attn_implementation=name)` uses decodekit for tree verification."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, hf_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
