"""Executable specification: plain torch, slow, obviously correct (docs/semantics.md).

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
        if p[b] >= 1:  # disabled: keeps what the earlier filters kept
            if among is not None:
                keep[b] = among[b]
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


def survivors(
    x: torch.Tensor, *, is_probs=False, temperature=1.0, top_k=None, top_p=None, min_p=None, order="sequential"
) -> torch.Tensor:
    """Bool mask of the tokens that survive the filters (docs/semantics.md, "Filters"). A row with
    temperature 0 is greedy: its only survivor is the argmax (lowest index on ties)."""
    T = None if is_probs else _rows(temperature, x.shape[0], torch.float64)
    greedy = torch.zeros(x.shape[0], dtype=torch.bool) if T is None else T == 0
    if bool(greedy.any()):
        T = torch.where(greedy, torch.ones_like(T), T)
    w = weights(x, is_probs, T)
    vals = x.double() if is_probs else x.double() / T[:, None]
    keep = top_k_keep(vals, top_k)
    if top_p is not None:
        if order == "joint":
            keep = keep & top_p_keep(w, top_p)
        else:
            keep = top_p_keep(w, top_p, among=keep)
    if min_p is not None:
        keep &= min_p_keep(w, min_p)
    keep &= w > 0
    for b in torch.nonzero(greedy).reshape(-1).tolist():
        keep[b] = False
        keep[b, int(torch.argmax(x[b].double()))] = True
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


# =================================================================================================
# Speculative verification (chain / tree, stochastic / greedy) and build_tree
# =================================================================================================
# The stochastic references draw decodekit's own Philox uniforms (csrc/include/decodekit/philox.h,
# speculative.h) so that, for probability inputs, they give the kernels' tokens: acceptance tests are
# the same float64 comparisons; residual draws differ from the kernels only if u * Z falls within
# float64 rounding of a cumulative-sum boundary (never, in practice). Everything else is plain torch
# / Python, one row and one node at a time.

_M32 = 0xFFFFFFFF


def _philox4x32_10(c, k0, k1):
    c0, c1, c2, c3 = c
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _M32, p1 & _M32, ((p0 >> 32) ^ c3 ^ k1) & _M32, p0 & _M32
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def _u53_open(a, b):
    k = ((a >> 5) << 26) | (b >> 6)
    return (float(k) + 0.5) * (1.0 / 9007199254740992.0)


def _spec_key(seed, offset, b):
    """(k0, k1, stream, offset_lo, offset_hi16) of batch row b: per-row seeds (a tensor) use stream 0,
    one scalar seed uses stream b."""
    if isinstance(seed, torch.Tensor):
        s, stream = int(seed[b]), 0
    else:
        s, stream = int(seed), b
    s &= (1 << 64) - 1
    return (s & _M32, (s >> 32) & _M32, stream & _M32, offset & _M32, (offset >> 32) & 0xFFFF)


def _spec_philox(key, purpose, block):
    k0, k1, stream, lo, hi16 = key
    return _philox4x32_10((block & _M32, (purpose & 0xFFFF) | (hi16 << 16), stream, lo), k0, k1)


def spec_accept_uniform(key, depth, sib=0):
    r = _spec_philox(key, 256 + 2 * depth, sib >> 1)
    return _u53_open(r[2], r[3]) if sib & 1 else _u53_open(r[0], r[1])


def spec_draw_uniform(key, depth):
    r = _spec_philox(key, 256 + 2 * depth + 1, 0)
    return _u53_open(r[0], r[1])


def _inverse_cdf(w: torch.Tensor, u: float) -> int:
    """First index whose float64 cumulative weight exceeds u * total; -1 without positive mass."""
    c = torch.cumsum(w.double(), 0)
    Z = float(c[-1])
    if not Z > 0:
        return -1
    i = int(torch.searchsorted(c, torch.tensor([u * Z], dtype=torch.float64), right=True)[0])
    return min(i, int(torch.nonzero(w > 0).max()))


def _div(a: float, b: float) -> float:
    """IEEE float64 division (x / 0 is +-inf or NaN, as in the kernels, not a ZeroDivisionError)."""
    return float(torch.tensor(a, dtype=torch.float64) / b)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _verify_node(p, q, kids, key, depth, coin=None):
    """One node: p target row (float32 probs), q draft row or None, kids = child tokens in order.
    A token repeated among the children is skipped once its first copy is rejected (no residual mass
    left). coin = (node coin, final coin, threshold_single, threshold_acc): caller coins (one-hot
    drafts only), SGLang's rule. Returns (index of the accepted child or -1, emitted token)."""
    removed = []
    Mr = Mq = 0.0
    r_f, Zr = None, 1.0  # materialised residual (float32 row) and its mass
    scf = _f32(1.0)
    pending = broke = False  # draft probs: the last rejection not yet subtracted / no mass left
    for i, x in enumerate(kids):
        if x in removed:
            continue
        if q is None:
            px = float(p[x])
            if coin is not None:
                ok = coin[0] <= (Mr + px) / max(coin[3], 1e-9) or px >= coin[2]
            else:
                ok = spec_accept_uniform(key, depth, i) * (1.0 - Mr) < px
            if ok:
                return i, x
            Mr += px
        else:
            if pending:
                base = p.clamp(min=0) if r_f is None else r_f * _f32(1.0 / Zr)
                r_f = (base - q * scf).clamp(min=0)
                r_f[removed] = 0
                Zr = float(r_f.double().sum())
                pending = False
                if not Zr > 0:  # no residual mass left (rounding, or an all-zero target): draw from p
                    broke = True
                    break
            qi = _div(float(q[x]), 1.0 - Mq)
            rx = float(p[x]) if r_f is None else float(r_f[x]) / Zr
            if spec_accept_uniform(key, depth, i) * qi < rx:
                return i, x
            scf = _f32(_div(1.0, 1.0 - Mq))
            Mq += float(q[x])
            pending = True
        removed.append(x)
    u = spec_draw_uniform(key, depth) if coin is None else coin[1]
    bonus = p.clamp(min=0)
    if not removed or broke:
        w = bonus
    elif q is None:
        w = bonus.clone()
        w[removed] = 0
    else:
        base = bonus if r_f is None else r_f * _f32(1.0 / Zr)
        w = (base - q * scf).clamp(min=0)
        w[removed] = 0
    tok = _inverse_cdf(w, u)
    if tok < 0:
        tok = _inverse_cdf(bonus, u)
    return -1, max(tok, 0)


def _bad_row(row: torch.Tensor) -> bool:
    """A logits row with NaN, +inf or nothing above -inf (README: verification stops there, emits 0)."""
    return bool(torch.isnan(row).any()) or bool(torch.isposinf(row).any()) or not bool((row > NEG_INF).any())


def _argmax(row: torch.Tensor) -> int:
    """Lowest index of the max (token 0 for a bad row)."""
    return 0 if _bad_row(row) else int(torch.argmax(row.float()))


def _greedy_choice(row: torch.Tensor):
    """Greedy verification at one position: (the token to accept / emit, whether a draft may be
    accepted). A bad row accepts nothing, even a draft equal to the token 0 it emits."""
    return _argmax(row), not _bad_row(row)


def chain_speculative_sampling(
    draft_probs, draft_token_ids, target_probs, *, num_draft_tokens=None, seed=0, offset=0, greedy_rows=None
):
    """Chain verification (docs/semantics.md, "Chain") with decodekit's uniforms. target_probs [B, N+1, V]
    float32, draft_probs [B, N, V] or None (one-hot). greedy_rows: optional bool [B] of rows whose
    target rows are LOGITS verified greedily. Returns (ids [B, N+1] -1 padded, accepted [B], emitted [B])."""
    B, N = draft_token_ids.shape
    out = torch.full((B, N + 1), -1, dtype=torch.int64)
    acc = torch.zeros(B, dtype=torch.int32)
    emi = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        key = _spec_key(seed, offset, b)
        n = N if num_draft_tokens is None else int(num_draft_tokens[b])
        greedy = greedy_rows is not None and bool(greedy_rows[b])
        stop, emit = None, 0
        for j in range(n):
            x = int(draft_token_ids[b, j])
            p = target_probs[b, j]
            q = None if draft_probs is None else draft_probs[b, j]
            if greedy:
                e, usable = _greedy_choice(p)
                ok = usable and x == e
            elif stop is None:
                i, e = _verify_node(p, q, [x], key, j)
                ok = i == 0
            else:
                ok = spec_accept_uniform(key, j, 0) * (1.0 if q is None else float(q[x])) < float(p[x])
            acc[b] += int(ok)
            if stop is None:
                if ok:
                    out[b, j] = x
                else:
                    stop, emit = j, e
        if stop is None:
            stop = n
            emit = _argmax(target_probs[b, n]) if greedy else _verify_node(target_probs[b, n], None, [], key, n)[1]
        out[b, stop] = emit
        emi[b] = stop
    return out, acc, emi


def greedy_verify(draft_token_ids, target_logits, *, num_draft_tokens=None):
    B = draft_token_ids.shape[0]
    return chain_speculative_sampling(
        None,
        draft_token_ids,
        target_logits,
        num_draft_tokens=num_draft_tokens,
        greedy_rows=torch.ones(B, dtype=torch.bool),
    )


def _filtered_probs(logits, temperature, top_k, top_p, min_p, order):
    """[B, R, V] logits -> float32 [B, R, V] target distributions per row's parameters; plus the
    bool [B] of greedy rows (temperature 0, whose rows are returned as the logits themselves)."""
    B, R, V = logits.shape
    T = _rows(temperature, B, torch.float64)
    greedy = T == 0
    out = torch.empty(B, R, V, dtype=torch.float32)
    for b in range(B):
        if greedy[b]:
            out[b] = logits[b].float()
            continue
        kw = dict(temperature=float(T[b]), order=order)
        for name, v, dt in (
            ("top_k", top_k, torch.int64),
            ("top_p", top_p, torch.float64),
            ("min_p", min_p, torch.float64),
        ):
            if v is not None:
                kw[name] = _rows(v, B, dt)[b].item()
        out[b] = target_distribution(logits[b].float(), **kw).float()
    return out, greedy


def chain_speculative_sampling_from_logits(
    draft_probs,
    draft_token_ids,
    target_logits,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    order="sequential",
    num_draft_tokens=None,
    seed=0,
    offset=0,
):
    """The logits form: each position's target is the filtered distribution of section 3."""
    probs, greedy = _filtered_probs(target_logits, temperature, top_k, top_p, min_p, order)
    return chain_speculative_sampling(
        draft_probs,
        draft_token_ids,
        probs,
        num_draft_tokens=num_draft_tokens,
        seed=seed,
        offset=offset,
        greedy_rows=greedy,
    )


def build_tree(parents, prefix_lens):
    """(tree_mask uint8 [B, T, ceil(T/8)], positions int64 [B*T], retrive_index, retrive_next_token,
    retrive_next_sibling int64 [B, T]) from a valid parent array."""
    B, T = parents.shape
    W = (T + 7) // 8
    prefix = _rows(prefix_lens, B, torch.int64) if not isinstance(prefix_lens, torch.Tensor) else prefix_lens
    dense = torch.zeros(B, T, W * 8, dtype=torch.bool)
    positions = torch.zeros(B * T, dtype=torch.int64)
    ri = torch.arange(B * T, dtype=torch.int64).reshape(B, T)
    nt = torch.full((B, T), -1, dtype=torch.int64)
    ns = torch.full((B, T), -1, dtype=torch.int64)
    for b in range(B):
        par = [int(v) for v in parents[b]]
        assert par[0] == -1 and all(0 <= par[t] < t for t in range(1, T)), "invalid tree"
        for t in range(T):
            a, depth = t, 0
            while a != -1:
                dense[b, t, a] = True
                a = par[a]
                depth += 1 if a != -1 else 0
            positions[b * T + t] = int(prefix[b]) + depth
        for t in range(1, T):
            kids = [c for c in range(1, T) if par[c] == par[t]]
            if kids[0] == t:
                nt[b, par[t]] = t
            i = kids.index(t)
            if i + 1 < len(kids):
                ns[b, t] = kids[i + 1]
    weights = 1 << torch.arange(8, dtype=torch.int64)
    mask = (dense.reshape(B, T, W, 8).long() * weights).sum(-1).to(torch.uint8)
    return mask, positions, ri, nt, ns


def _children(nt, ns, node):
    out, c = [], int(nt[node])
    while c != -1:
        out.append(c)
        c = int(ns[c])
    return out


def tree_speculative_sampling(
    candidates,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    target_probs,
    draft_probs=None,
    *,
    num_speculative_tokens=None,
    seed=0,
    offset=0,
    greedy_rows=None,
    target_predict=None,
    coins=None,
    coins_final=None,
    threshold_single=1.0,
    threshold_acc=1.0,
):
    """Tree verification in SGLang's layout (docs/semantics.md, "Trees"). Returns (predicts [B*T] (-1 where not
    written), accept_index int32 [B, W] (-1 padded), accept_token_num int32 [B]). greedy_rows: bool [B]
    of rows whose target rows are logits verified greedily; target_predict [B, T]: greedy ids.
    coins [B, T] / coins_final [B]: caller uniforms (one coin per node) with SGLang's thresholds."""
    B, T = candidates.shape
    W = T if num_speculative_tokens is None else num_speculative_tokens
    predicts = torch.full((B * T,), -1, dtype=torch.int64)
    accept_index = torch.full((B, W), -1, dtype=torch.int32)
    accept_num = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        key = _spec_key(seed, offset, b)
        greedy = target_predict is not None or (greedy_rows is not None and bool(greedy_rows[b]))
        ri = retrive_index[b]
        accept_index[b, 0] = int(ri[0])
        cur, acc = 0, 0
        while True:
            kids = _children(retrive_next_token[b], retrive_next_sibling[b], cur) if acc < W - 1 else []
            toks = [int(candidates[b, c]) for c in kids]
            if greedy:
                if target_predict is not None:
                    choice, usable = int(target_predict[b, cur]), True
                else:
                    choice, usable = _greedy_choice(target_probs[b, cur])
                i, e = (toks.index(choice), choice) if usable and choice in toks else (-1, choice)
            else:
                q = None if draft_probs is None else draft_probs[b, cur]
                coin = (
                    None
                    if coins is None
                    else (float(coins[b, cur]), float(coins_final[b]), threshold_single, threshold_acc)
                )
                i, e = _verify_node(target_probs[b, cur], q, toks, key, acc, coin)
            predicts[int(ri[cur])] = e
            if i < 0:
                break
            acc += 1
            cur = kids[i]
            accept_index[b, acc] = int(ri[cur])
        accept_num[b] = acc
    return predicts, accept_index, accept_num


def verify_tree_greedy(
    candidates, retrive_index, retrive_next_token, retrive_next_sibling, target, *, num_speculative_tokens=None
):
    """target: logits [B, T, V] or predicted ids [B, T]."""
    if target.dtype.is_floating_point:
        return tree_speculative_sampling(
            candidates,
            retrive_index,
            retrive_next_token,
            retrive_next_sibling,
            target,
            num_speculative_tokens=num_speculative_tokens,
            greedy_rows=torch.ones(candidates.shape[0], dtype=torch.bool),
        )
    return tree_speculative_sampling(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        None,
        num_speculative_tokens=num_speculative_tokens,
        target_predict=target,
    )


def tree_speculative_sampling_from_logits(
    candidates,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    target_logits,
    draft_probs=None,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    order="sequential",
    num_speculative_tokens=None,
    seed=0,
    offset=0,
    **coins,
):
    probs, greedy = _filtered_probs(target_logits, temperature, top_k, top_p, min_p, order)
    return tree_speculative_sampling(
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        probs,
        draft_probs,
        num_speculative_tokens=num_speculative_tokens,
        seed=seed,
        offset=offset,
        greedy_rows=greedy,
        **coins,
    )


# ---- benchmark baselines (plain torch, what serving code does) ---------------------------------
def chain_speculative_sampling_hf(draft_probs, draft_token_ids, target_probs, generator=None):
    """Hugging Face assisted generation's _speculative_sampling logic, batched over B rows: full-row
    probability ratios p/q for every draft position, torch.rand acceptance (r <= ratio), the residual
    clamp(p - q, 0) / sum for every position (the stop position differs per row), then multinomial
    from the residual at the stop (or p_{N+1} when all are accepted). Returns (ids, emitted)."""
    B, N = draft_token_ids.shape
    ids = draft_token_ids.long()
    ratio = target_probs[:, :N] / draft_probs  # [B, N, V]
    ratio_i = ratio.gather(-1, ids[..., None]).squeeze(-1)  # [B, N]
    r = torch.rand(ratio_i.shape, generator=generator)
    accepted = r <= ratio_i
    n_matches = ((~accepted).cumsum(-1) < 1).sum(-1)  # [B]
    resid = (target_probs[:, :N] - draft_probs).clamp(min=0)
    resid = resid / resid.sum(-1, keepdim=True)
    rows = torch.cat([resid, target_probs[:, N:]], 1)[torch.arange(B), n_matches]
    t = torch.multinomial(rows, 1, generator=generator).squeeze(-1)
    pos = torch.arange(N + 1)
    out = torch.where(pos[None, :] < n_matches[:, None], torch.cat([ids, ids[:, :1]], 1), torch.full_like(pos, -1))
    out[torch.arange(B), n_matches] = t
    return out, n_matches


def chain_speculative_sampling_gather(draft_probs, draft_token_ids, target_probs, generator=None):
    """A leaner plain-torch port: gather p(x_j), q(x_j) first and build the residual only for the one
    row each batch row stops at (still several full passes over that row: sub, clamp, sum, div,
    multinomial)."""
    B, N = draft_token_ids.shape
    ids = draft_token_ids.long()
    ar = torch.arange(B)
    p_i = target_probs[:, :N].gather(-1, ids[..., None]).squeeze(-1)
    q_i = draft_probs.gather(-1, ids[..., None]).squeeze(-1)
    accepted = torch.rand(p_i.shape, generator=generator) * q_i < p_i
    n_matches = ((~accepted).cumsum(-1) < 1).sum(-1)
    p_rows = target_probs[ar, n_matches]
    q_rows = draft_probs[ar, n_matches.clamp(max=N - 1)]
    resid = torch.where((n_matches < N)[:, None], (p_rows - q_rows).clamp(min=0), p_rows)
    t = torch.multinomial(resid / resid.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
    pos = torch.arange(N + 1)
    out = torch.where(pos[None, :] < n_matches[:, None], torch.cat([ids, ids[:, :1]], 1), torch.full_like(pos, -1))
    out[ar, n_matches] = t
    return out, n_matches


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
        out[:, :, j // 8] |= mask[:, :, j].to(torch.uint8) << (j % 8)
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
        dense[b, 0, :, P : P + T] = tree_mask[b].cpu()
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


# =================================================================================================
# The whole sampling step (issue 11): bitmask, bans, logit bias, penalties, temperature, every
# truncation (top-n-sigma, top-k, top-p, min-p, typical, epsilon, eta, top-h, min_tokens_to_keep)
# in "sequential", "vllm" or "joint" order, the draw, and raw / processed logprobs.
# Processing (bitmask .. penalties) is float32 arithmetic, element by element in a fixed order, so
# the kernels reproduce it bit for bit; the truncations are float64 on the processed logits.
# =================================================================================================
PIPELINE_STEPS = {
    "sequential": ["top_n_sigma", "top_k", "top_p", "min_p", "typical", "epsilon", "eta", "top_h"],
    "vllm": ["top_n_sigma", "min_p", "top_k", "top_p", "typical", "epsilon", "eta", "top_h"],
    "joint": ["top_n_sigma", "top_k", "top_p", "min_p", "typical", "epsilon", "eta", "top_h"],
}
TOP_H_CANDIDATES = 100  # TopHLogitsWarper.top_n in transformers


def unpack_bitmask(bitmask: torch.Tensor, V: int) -> torch.Tensor:
    """bool [B, V]: bit j of int32 word w allows token 32*w + j (xgrammar's layout); tokens past
    32 * bitmask.shape[-1] are allowed."""
    bm = bitmask.to(torch.int64)
    bits = (bm[..., None] >> torch.arange(32)) & 1
    bits = bits.reshape(*bm.shape[:-1], -1).bool()
    if bits.shape[-1] >= V:
        return bits[..., :V]
    pad = torch.ones(*bits.shape[:-1], V - bits.shape[-1], dtype=torch.bool)
    return torch.cat([bits, pad], -1)


def apply_token_bitmask_inplace(logits: torch.Tensor, bitmask: torch.Tensor, indices=None) -> None:
    """xgrammar semantics: logits[i] (every i, or each i in `indices`) gets -inf where bit
    i of bitmask[i] is 0; only the first min(V, 32 * bitmask.shape[-1]) tokens are touched."""
    x = logits if logits.dim() == 2 else logits[None]
    bm = bitmask if bitmask.dim() == 2 else bitmask[None]
    n = min(x.shape[-1], 32 * bm.shape[-1])
    rows = range(x.shape[0]) if indices is None else [int(i) for i in indices]
    for i in rows:
        allowed = unpack_bitmask(bm[i : i + 1], n)[0]
        x[i, :n] = torch.where(allowed, x[i, :n], torch.full_like(x[i, :n], NEG_INF))


def _ids(t, b):
    if t is None:
        return []
    return [int(v) for v in t[b].tolist() if int(v) >= 0]


def process_logits(
    logits,
    *,
    allowed_token_bitmask=None,
    banned_token_ids=None,
    logit_bias=None,
    prompt_token_ids=None,
    output_token_ids=None,
    repetition_penalty=1.0,
    frequency_penalty=0.0,
    presence_penalty=0.0,
) -> torch.Tensor:
    """float32 [B, V]: bitmask and bans (-inf), then logit bias (y += v, entry by entry in order),
    then the repetition penalty once per distinct token of prompt + output (y / r if y > 0 else
    y * r), then y = (y - f * count) - q for every token with count > 0 in the output."""
    y = logits.float().clone()
    B, V = y.shape
    if allowed_token_bitmask is not None:
        y[~unpack_bitmask(allowed_token_bitmask, V)] = NEG_INF
    for b in range(B):
        for t in _ids(banned_token_ids, b):
            y[b, t] = NEG_INF
    if logit_bias is not None:
        ids, vals = logit_bias
        vals = vals.float()
        for b in range(B):
            for j, t in enumerate(ids[b].tolist()):
                if t >= 0:
                    y[b, t] = y[b, t] + vals[b, j]
    r = _rows(repetition_penalty, B, torch.float32)
    f = _rows(frequency_penalty, B, torch.float32)
    q = _rows(presence_penalty, B, torch.float32)
    for b in range(B):
        hist = sorted(set(_ids(prompt_token_ids, b)) | set(_ids(output_token_ids, b)))
        if r[b] != 1 and hist:
            v = y[b, hist]
            y[b, hist] = torch.where(v > 0, v / r[b], v * r[b])
        out = _ids(output_token_ids, b)
        if out and (f[b] != 0 or q[b] != 0):
            cnt = torch.bincount(torch.tensor(out), minlength=V)
            toks = torch.nonzero(cnt).reshape(-1)
            y[b, toks] = (y[b, toks] - f[b] * cnt[toks].float()) - q[b]
    return y


def _mth_largest(z, A, m):
    v = torch.sort(z[A], descending=True).values
    return v[min(m, len(v)) - 1]


def _step_keep(step, y, z, A, prm, mtk):
    """Keep mask of one truncation acting on the renormalised distribution over the set A."""
    V = z.shape[0]
    za = torch.where(A, z, torch.full_like(z, NEG_INF))
    mx = za.max()
    w = torch.where(A, torch.exp(za - mx), torch.zeros_like(z))
    Z = w.sum()
    p = w / Z
    lp = torch.where(A, za - mx - torch.log(Z), torch.zeros_like(z))
    ent = -(p * lp).sum()
    top_m = z >= _mth_largest(z, A, mtk)  # min_tokens_to_keep (ties at the m-th value kept)
    if step == "top_n_sigma":
        n = prm["top_n_sigma"]
        ya = y.double()[A]
        mean = ya.sum() / ya.numel()
        sd = torch.sqrt(((ya - mean) ** 2).sum() / ya.numel())
        return y.double() >= ya.max() - n * sd
    if step == "top_k":
        k = max(int(prm["top_k"]), mtk)
        if int(A.sum()) <= k:
            return torch.ones_like(A)
        return z >= _mth_largest(z, A, k)
    if step == "top_p":
        keep = top_p_keep(w[None], float(prm["top_p"]), among=A[None])[0]
        return keep | top_m
    if step == "min_p":
        return (w >= prm["min_p"] * w.max()) | top_m
    if step == "typical":
        s = torch.where(A, (-lp - ent).abs(), torch.full_like(z, float("inf")))
        ss, order = torch.sort(s)
        ps = p[order]
        # mass of the tokens with a strictly smaller shifted score (ties grouped)
        uniq, inv = torch.unique_consecutive(ss, return_inverse=True)
        csum = torch.cumsum(ps, 0)
        first = torch.zeros(len(uniq), dtype=torch.long)
        first.scatter_reduce_(0, inv, torch.arange(V), reduce="amin", include_self=False)
        below = torch.where(first > 0, csum[(first - 1).clamp(min=0)], torch.zeros_like(uniq))
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order] = below[inv] < prm["typical_p"]
        sm = torch.sort(s[A]).values[min(mtk, int(A.sum())) - 1]
        return keep | (s <= sm)
    if step == "epsilon":
        return (p >= prm["epsilon"]) | top_m
    if step == "eta":
        e = prm["eta"]
        eta = min(e, math.sqrt(e) * math.exp(-float(ent)))
        return (p >= eta) | top_m
    if step == "top_h":
        N = A & (z >= _mth_largest(z, A, TOP_H_CANDIDATES))
        zn = torch.where(N, z, torch.full_like(z, NEG_INF))
        wn = torch.where(N, torch.exp(zn - mx), torch.zeros_like(z))
        qn = wn / wn.sum()
        lq = torch.where(N, zn - mx - torch.log(wn.sum()), torch.zeros_like(z))
        term = -qn * lq
        tau = prm["top_h"] * float(term.sum())
        # cumulative entropy of the strictly more probable tokens plus the token's own term
        above = torch.zeros(V, dtype=torch.float64)
        idx = torch.nonzero(N).reshape(-1)
        vals = z[idx]
        srt, o = torch.sort(vals, descending=True)
        cum, j = 0.0, 0
        while j < len(srt):
            g = j
            while g < len(srt) and srt[g] == srt[j]:
                g += 1
            for t in range(j, g):
                above[idx[o[t]]] = cum
            cum += float(term[idx[o[j:g]]].sum())
            j = g
        keep = N & (above + term <= tau)
        return keep | (z >= mx) | top_m
    raise ValueError(step)


def _enabled(step, prm, V):
    v = prm.get(step)
    if v is None:
        return False
    if step == "top_k":
        return 1 <= int(v) < V
    if step == "top_p":
        return v < 1
    if step == "typical_p":
        return v < 1
    return v > 0


PIPELINE_PARAMS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "top_n_sigma",
    "typical_p",
    "epsilon",
    "eta",
    "top_h",
    "min_tokens_to_keep",
)
_STEP_PARAM = {
    "top_n_sigma": "top_n_sigma",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical": "typical_p",
    "epsilon": "epsilon",
    "eta": "eta",
    "top_h": "top_h",
}


def _row_params(b, kw, B):
    prm = {}
    for name in PIPELINE_PARAMS:
        v = kw.get(name)
        if v is None:
            prm[name] = None
        elif isinstance(v, torch.Tensor) and v.dim() == 1:
            prm[name] = v[b].item()
        else:
            prm[name] = float(v) if not isinstance(v, torch.Tensor) else v.item()
    return prm


def pipeline_keep(y: torch.Tensor, *, order="sequential", **kw) -> torch.Tensor:
    """bool [B, V]: the survivors of the truncations on processed float32 logits y (temperature
    0 means greedy: no truncation). Empty rows stay empty (the caller's bad row)."""
    B, V = y.shape
    out = torch.zeros(B, V, dtype=torch.bool)
    for b in range(B):
        prm = _row_params(b, kw, B)
        T = 1.0 if prm["temperature"] is None else prm["temperature"]
        mtk = 1 if prm["min_tokens_to_keep"] is None else int(prm["min_tokens_to_keep"])
        yb = y[b]
        finite = yb.double() > NEG_INF
        if not bool(finite.any()) or T == 0:
            out[b] = finite
            continue
        z = yb.double() / T
        alive = finite.clone()
        for step in PIPELINE_STEPS[order]:
            sp = {_STEP_PARAM[step]: prm[_STEP_PARAM[step]]}
            if not _enabled(_STEP_PARAM[step], sp, V):
                continue
            A = finite if order == "joint" else alive
            alive = alive & _step_keep(step, yb, z, A, sp, mtk)
        out[b] = alive
    return out


def _ids_ok(t, V, name):
    if t is not None and t.numel() and (int(t.min()) < -1 or int(t.max()) >= V):
        raise ValueError(f"{name} must hold token ids in [0, {V}) or -1 (padding)")


def pipeline(
    logits,
    *,
    indices=None,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    top_n_sigma=None,
    typical_p=None,
    epsilon=None,
    eta=None,
    top_h=None,
    min_tokens_to_keep=1,
    order="sequential",
    allowed_token_bitmask=None,
    banned_token_ids=None,
    logit_bias=None,
    prompt_token_ids=None,
    output_token_ids=None,
    repetition_penalty=1.0,
    frequency_penalty=0.0,
    presence_penalty=0.0,
    top_logprobs=0,
    logprobs_mode="processed",
    uniforms=None,
):
    """The whole step for every output row (row i reads logits[indices[i]]). Returns a dict:
    processed (float32 logits after bitmask .. penalties), keep (survivors), valid, dist (float64
    renormalised survivor distribution; one-hot at the greedy token for temperature 0),
    logprobs (float64 [B, V] of the chosen mode: raw = log_softmax(logits), processed =
    log-distribution of the survivors, -inf elsewhere, log_softmax(processed) for temperature 0),
    top_ids / top_logprobs ([B, n], descending logprob, ties by lowest index) and, given
    `uniforms` (one float64 in (0, 1) per row), tokens / token_logprobs / ranks (rank = number of
    tokens whose logprob is >= the token's)."""
    x = logits if indices is None else logits[indices.long()]
    B, V = x.shape
    for name, t in (
        ("banned_token_ids", banned_token_ids),
        ("prompt_token_ids", prompt_token_ids),
        ("output_token_ids", output_token_ids),
        ("logit_bias", None if logit_bias is None else logit_bias[0]),
    ):
        _ids_ok(t, V, name)
    y = process_logits(
        x,
        allowed_token_bitmask=allowed_token_bitmask,
        banned_token_ids=banned_token_ids,
        logit_bias=logit_bias,
        prompt_token_ids=prompt_token_ids,
        output_token_ids=output_token_ids,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )
    kw = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        top_n_sigma=top_n_sigma,
        typical_p=typical_p,
        epsilon=epsilon,
        eta=eta,
        top_h=top_h,
        min_tokens_to_keep=min_tokens_to_keep,
    )
    keep = pipeline_keep(y, order=order, **kw)
    valid = ~(bad_rows(x, False) | bad_rows(y, False))
    T = _rows(temperature, B, torch.float64)
    dist = torch.zeros(B, V, dtype=torch.float64)
    proc_lp = torch.full((B, V), NEG_INF, dtype=torch.float64)
    for b in range(B):
        if not valid[b]:
            continue
        yb = y[b].double()
        if T[b] == 0:
            g = _argmax(y[b])
            dist[b, g] = 1.0
            proc_lp[b] = torch.log_softmax(yb, -1)
            continue
        z = torch.where(keep[b], yb / T[b], torch.full_like(yb, NEG_INF))
        proc_lp[b] = torch.log_softmax(z, -1)
        dist[b] = proc_lp[b].exp()
    lp = torch.log_softmax(x.double(), -1) if logprobs_mode == "raw" else proc_lp
    res = dict(processed=y, keep=keep, valid=valid, dist=dist, logprobs=lp)
    n = int(top_logprobs or 0)
    if n:
        ids = torch.zeros(B, n, dtype=torch.int64)
        vals = torch.full((B, n), NEG_INF, dtype=torch.float64)
        for b in range(B):
            if valid[b]:
                o = sorted(range(V), key=lambda i: (-float(lp[b, i]), i))[:n]
                ids[b] = torch.tensor(o)
                vals[b] = lp[b, o]
        res.update(top_ids=ids, top_logprobs=vals)
    if uniforms is not None:
        toks = torch.zeros(B, dtype=torch.int64)
        tlp = torch.zeros(B, dtype=torch.float64)
        ranks = torch.zeros(B, dtype=torch.int64)
        for b in range(B):
            if not valid[b]:
                continue
            t = _inverse_cdf(dist[b], float(uniforms[b]))
            toks[b] = t
            tlp[b] = lp[b, t]
            ranks[b] = int((lp[b] >= lp[b, t]).sum())
        res.update(tokens=toks, token_logprobs=tlp, ranks=ranks)
    return res


def pipeline_torch_vllm(
    logits,
    *,
    allowed_token_bitmask,
    prompt_token_ids,
    output_token_ids,
    repetition_penalty,
    frequency_penalty,
    presence_penalty,
    temperature,
    top_k,
    top_p,
    min_p,
    top_logprobs,
    generator=None,
):
    """The same chain written in torch the way vLLM's V1 sampler writes it (the benchmark baseline):
    the bitmask expanded to a [B, V] bool mask, [B, V] token counts rebuilt from the histories by
    scatter_add every step, penalties, temperature, min-p, then top-k / top-p by a full sort, the
    multinomial draw and the top-n logprobs of the processed distribution. Each step is a full-row
    torch op that writes a [B, V] tensor."""
    B, V = logits.shape
    x = logits.float()
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((allowed_token_bitmask[:, :, None] >> shifts) & 1).reshape(B, -1)[:, :V].bool()
    x = x.masked_fill(~allowed, NEG_INF)

    def counts(ids):
        c = torch.zeros(B, V + 1, dtype=torch.int64)
        c.scatter_add_(1, torch.where(ids < 0, V, ids), torch.ones_like(ids))
        return c[:, :V]

    out_counts = counts(output_token_ids)
    seen = (counts(prompt_token_ids) > 0) | (out_counts > 0)
    rep = torch.where(seen, torch.tensor(repetition_penalty, dtype=torch.float32), torch.tensor(1.0))
    x = torch.where(x > 0, x / rep, x * rep)
    x = x - frequency_penalty * out_counts
    x = x - presence_penalty * (out_counts > 0).float()
    x = x / temperature
    probs = x.softmax(-1)
    x = x.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), NEG_INF)
    srt, idx = x.sort(-1, descending=False)
    kth = srt[:, V - top_k : V - top_k + 1]
    srt = srt.masked_fill(srt < kth, NEG_INF)
    ps = srt.softmax(-1)
    mask = ps.cumsum(-1) <= 1 - top_p
    mask[:, -1] = False
    srt = srt.masked_fill(mask, NEG_INF)
    x = srt.scatter(-1, idx, srt)
    lp = x.log_softmax(-1)
    tok = torch.multinomial(lp.exp(), 1, generator=generator)
    tok_lp = lp.gather(-1, tok)
    rank = (lp >= tok_lp).sum(-1)
    top = lp.topk(top_logprobs, -1)
    return tok.squeeze(-1), tok_lp.squeeze(-1), rank, top.indices, top.values
