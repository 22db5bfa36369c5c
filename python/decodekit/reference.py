"""Executable specification: plain torch, slow, obviously correct (DESIGN.md section 3).

Tests compare the kernels with these functions; benchmarks use them as the torch baseline.
Filters are computed in float64 so that the reference itself has no rounding surprises.
Convention for bad rows (NaN / +inf / all -inf logits; NaN, negative, inf or all-zero probs):
mask ops return the row unchanged, renorm ops return zeros, softmax returns NaN, samplers
return token 0 with valid=False.
"""
import math
from typing import Optional

import torch

NEG_INF = float("-inf")


def _rows(v, n, dtype):
    """Per-row parameter as a 1-D tensor of length n."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor) and v.dim() == 1:
        return v.to(dtype)
    return torch.full((n,), float(v) if dtype.is_floating_point else int(v), dtype=dtype)


def bad_rows(x: torch.Tensor, is_probs: bool) -> torch.Tensor:
    x = x.double()
    bad = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1)
    if is_probs:
        bad |= (x < 0).any(-1) | ~(x > 0).any(-1)
    else:
        bad |= ~(x > NEG_INF).any(-1)
    return bad


def weights(x: torch.Tensor, is_probs: bool, temperature=None) -> torch.Tensor:
    """Unnormalised float64 weights: probs as given, or exp((logits - max) / T)."""
    x = x.double()
    if is_probs:
        return x.clone()
    T = _rows(temperature if temperature is not None else 1.0, x.shape[0], torch.float64)
    z = x / T[:, None]
    m = z.max(-1, keepdim=True).values
    return torch.exp(z - m)


def top_k_keep(vals: torch.Tensor, k) -> torch.Tensor:
    """Keep every entry >= the k-th largest value (ties kept); k <= 0 or >= V keeps all."""
    B, V = vals.shape
    k = _rows(k, B, torch.int64)
    keep = torch.ones_like(vals, dtype=torch.bool)
    if k is None:
        return keep
    for b in range(B):
        kb = int(k[b])
        if 1 <= kb < V:
            kth = torch.topk(vals[b], kb).values[-1]
            keep[b] = vals[b] >= kth
    return keep


def top_p_keep(w: torch.Tensor, p, among: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keep i iff the mass (within `among`) of entries strictly heavier than i is < p * total."""
    B, V = w.shape
    p = _rows(p, B, torch.float64)
    keep = torch.ones_like(w, dtype=torch.bool)
    if p is None:
        return keep
    for b in range(B):
        if p[b] >= 1:
            continue
        wb = w[b] if among is None else torch.where(among[b], w[b], torch.zeros_like(w[b]))
        Z = wb.sum()
        vals, order = torch.sort(wb, descending=True)
        csum = torch.cumsum(vals, 0)
        # mass strictly above each distinct value: cumsum before its tie group starts
        uniq, inv = torch.unique_consecutive(vals, return_inverse=True)
        first = torch.zeros(len(uniq), dtype=torch.long)
        first.scatter_reduce_(0, inv, torch.arange(V), reduce="amin", include_self=False)
        above = torch.where(first > 0, csum[(first - 1).clamp(min=0)], torch.zeros_like(uniq))
        kept_sorted = above[inv] < p[b] * Z
        kb = torch.zeros(V, dtype=torch.bool)
        kb[order] = kept_sorted
        if among is not None:
            kb &= among[b]
        keep[b] = kb
    return keep


def min_p_keep(w: torch.Tensor, min_p) -> torch.Tensor:
    B = w.shape[0]
    mp = _rows(min_p, B, torch.float64)
    if mp is None:
        return torch.ones_like(w, dtype=torch.bool)
    return w >= mp[:, None] * w.max(-1, keepdim=True).values


def survivors(x: torch.Tensor, *, is_probs=False, temperature=1.0, top_k=None, top_p=None, min_p=None,
              order="sequential") -> torch.Tensor:
    """Bool mask of the tokens that survive the filters (DESIGN.md section 3)."""
    w = weights(x, is_probs, None if is_probs else temperature)
    vals = x.double() if is_probs else x.double() / _rows(temperature, x.shape[0], torch.float64)[:, None]
    keep = top_k_keep(vals, top_k)
    if top_p is not None:
        if order == "joint":
            keep = keep & top_p_keep(w, top_p)
        else:
            keep = top_p_keep(w, top_p, among=keep)
    if min_p is not None:
        keep &= min_p_keep(w, min_p)
    keep &= w > 0
    return keep


def target_distribution(x: torch.Tensor, **filters) -> torch.Tensor:
    """float64 [B, V]: the renormalised survivor distribution a sampler must follow."""
    is_probs = filters.get("is_probs", False)
    w = weights(x, is_probs, None if is_probs else filters.get("temperature", 1.0))
    keep = survivors(x, **filters)
    w = torch.where(keep, w, torch.zeros_like(w))
    return w / w.sum(-1, keepdim=True)


# ---- filters with the public names ------------------------------------------------------------
def softmax(logits, temperature=None):
    T = 1.0 if temperature is None else temperature
    out = weights(logits, False, T)
    out = out / out.sum(-1, keepdim=True)
    out[bad_rows(logits, False)] = float("nan")
    return out.float()


def _mask(logits, keep):
    out = torch.where(keep, logits, torch.full_like(logits, NEG_INF))
    bad = bad_rows(logits, False)
    out[bad] = logits[bad]
    return out


def top_k_mask_logits(logits, top_k):
    return _mask(logits, top_k_keep(logits.double(), top_k))


def top_p_mask_logits(logits, top_p):
    return _mask(logits, top_p_keep(weights(logits, False), top_p))


def min_p_mask_logits(logits, min_p):
    return _mask(logits, min_p_keep(weights(logits, False), min_p))


def _renorm(probs, keep):
    w = torch.where(keep, probs.double(), torch.zeros((), dtype=torch.float64))
    out = (w / w.sum(-1, keepdim=True)).float()
    out[bad_rows(probs, True)] = 0.0
    return out


def top_k_renorm_probs(probs, top_k):
    return _renorm(probs, top_k_keep(probs.double(), top_k))


def top_p_renorm_probs(probs, top_p):
    return _renorm(probs, top_p_keep(probs.double(), top_p))


def min_p_renorm_probs(probs, min_p):
    return _renorm(probs, min_p_keep(probs.double(), min_p))


# ---- the torch sampling baseline (what a plain-torch serving loop does) -----------------------
def sample(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, generator=None):
    """Plain-torch sampler used as the benchmark baseline: temperature, torch.topk, sort + cumsum
    top-p, min-p, softmax, torch.multinomial. (Its top-p cut follows sort order on exact ties.)"""
    x = logits.float() / temperature
    if top_k is not None and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, NEG_INF)
    if top_p is not None and top_p < 1:
        srt, idx = torch.sort(x, dim=-1, descending=True)
        probs = srt.softmax(-1)
        cum = probs.cumsum(-1)
        remove = (cum - probs) >= top_p
        x = x.scatter(-1, idx, srt.masked_fill(remove, NEG_INF))
    if min_p is not None and min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, NEG_INF)
    return torch.multinomial(x.softmax(-1), 1, generator=generator).squeeze(-1)


# =============================================================================================
# Tree attention (verification step of tree speculative decoding)
# ---------------------------------------------------------------------------------------------
# A token tree of T nodes is given by a parent array (parent[i] < i, -1 for the root(s)). Its
# attention mask is "ancestor-or-self": node t sees node j iff j is t or an ancestor of t. The
# tree's keys sit at cache positions prefix_len .. prefix_len + T - 1 and a node's position id is
# prefix_len + depth. Query t of batch b attends every key s < prefix_lens[b] and tree key j iff
# tree_mask[b, t, j]; lse is the NATURAL log of the sum of exp(scaled scores).
# =============================================================================================
def tree_mask_from_parents(parents) -> torch.Tensor:
    """Ancestor-or-self mask bool [B, T, T] from parent arrays [B, T] (parent < child, -1 = root)."""
    parents = torch.as_tensor(parents, dtype=torch.int64)
    if parents.dim() == 1:
        parents = parents[None]
    B, T = parents.shape
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            j = t
            while j >= 0:
                mask[b, t, j] = True
                p = int(parents[b, j])
                assert p < j, "parents must satisfy parent < child"
                j = p
    return mask


def tree_depths(parents) -> torch.Tensor:
    """Depth of every node (roots have depth 0), int64 [B, T]."""
    parents = torch.as_tensor(parents, dtype=torch.int64)
    if parents.dim() == 1:
        parents = parents[None]
    depth = torch.zeros_like(parents)
    for b in range(parents.shape[0]):
        for t in range(parents.shape[1]):
            p = int(parents[b, t])
            depth[b, t] = 0 if p < 0 else depth[b, p] + 1
    return depth


def pack_tree_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [B, T, T] -> uint8 [B, T, ceil(T/8)], bit j % 8 of byte j // 8 (little-endian bit order,
    as FlashInfer segment_packbits(bitorder="little") applied per row)."""
    B, T, T2 = mask.shape
    out = torch.zeros(B, T, (T2 + 7) // 8, dtype=torch.uint8)
    for j in range(T2):
        out[:, :, j // 8] |= (mask[:, :, j].to(torch.uint8) << (j % 8))
    return out


def unpack_tree_mask(packed: torch.Tensor, T: int) -> torch.Tensor:
    """uint8 [B, T, ceil(T/8)] -> bool [B, T, T]."""
    cols = [((packed[:, :, j // 8] >> (j % 8)) & 1).bool() for j in range(T)]
    return torch.stack(cols, dim=-1)


def tree_attention_dense_mask(tree_mask: torch.Tensor, prefix_lens, kv_len: int) -> torch.Tensor:
    """The dense bool mask [B, 1, T, kv_len] (True = attend) equivalent to (tree_mask, prefix_lens)."""
    B, T = tree_mask.shape[:2]
    if tree_mask.dtype != torch.bool:
        tree_mask = unpack_tree_mask(tree_mask, T)
    prefix_lens = torch.as_tensor(prefix_lens, dtype=torch.int64).reshape(-1).expand(B)
    dense = torch.zeros(B, 1, T, kv_len, dtype=torch.bool)
    for b in range(B):
        P = int(prefix_lens[b])
        dense[b, 0, :, :P] = True
        dense[b, 0, :, P:P + T] = tree_mask[b].cpu()
    return dense.to(tree_mask.device)


def tree_attention(q, k, v, tree_mask, prefix_lens, *, sm_scale=None, kv_layout="NHD"):
    """Reference tree attention in float64. Returns (out [B,T,Hq,D] in q's dtype, lse [B,T,Hq] float32).
    A query that attends nothing (prefix 0 and an empty mask row) gets out = 0 and lse = -inf."""
    if kv_layout == "HND":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    mask = tree_attention_dense_mask(tree_mask, prefix_lens, S)[:, 0]  # [B, T, S]
    G = Hq // Hkv
    kk = k.double().repeat_interleave(G, dim=2)  # [B, S, Hq, D]
    vv = v.double().repeat_interleave(G, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.double(), kk) * scale
    scores = scores.masked_fill(~mask[:, None], NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, T]
    p = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhts,bshd->bthd", p, vv)
    return out.to(q.dtype), lse.transpose(1, 2).float().contiguous()
