"""CUDA sampling benchmark (issue 15): decodekit vs FlashInfer (flashinfer-python, when installed)
vs a torch chain (softmax / sort / cumsum / multinomial, as torch-only serving code does it), side
by side on the same inputs, with the read floor: the bytes of the logits (or probabilities) divided
by the measured device-to-device copy bandwidth.

decodekit runs twice per shape: with the split-row plan (several CTAs per row when there are fewer
rows than SMs; the default) and with DECODEKIT_SPLIT_ROWS=0 (one CTA per row), so the table shows
what splitting buys. The FlashInfer and decodekit calls are the same function names with the same
arguments (decodekit.compat.flashinfer mirrors flashinfer.sampling). A second table times chain
speculative verification (N drafts per row, default 4): a probability target with draft probs
through FlashInfer's chain_speculative_sampling on both sides, and a logits target with temperature
/ top-k / top-p, one decodekit call (chain_speculative_sampling_from_logits; its "1-CTA" column
turns the split prepared nodes off) against FlashInfer's softmax + top-k / top-p renorm +
chain_speculative_sampling, with one-hot drafts. A third table times the whole step (decodekit.sample
with a repetition penalty over a 64-token history, then top-k + top-p, top-p alone, min-p alone or
typical: top-p and min-p at the head of the list steps are applied by the row passes on all of a
split row's slices, typical's list steps run on one CTA per row over a whole-row list) against the
same step in torch ops.

    python benchmarks/sampling_cuda.py [--B 1 8 64 256] [--V 32000 128256] [--reps 100] [--N 4] [--graph]

Times are medians of CUDA-event timings (--graph: of CUDA-graph replays of one call, which removes
the launch overhead; a peer that cannot be captured shows "n/a"). Needs a CUDA device;
`--device cpu` runs the script's logic on the CPU (decodekit and torch only, wall clock) as a check
that it works.
"""

import argparse
import os
import statistics
import sys
import time

import torch
from cuda_timing import copy_bandwidth, cuda_time


def cpu_time(fn, warmup, reps, graph=False):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- the torch chain (what a torch-only engine runs) ---------------------------------------------
def t_sample(probs):
    return torch.multinomial(probs, 1).squeeze(1)


def t_top_k_probs(probs, k):
    v, i = probs.topk(k, dim=-1)
    return i.gather(1, torch.multinomial(v, 1)).squeeze(1)


def t_nucleus(probs, p):
    """(sorted probabilities with those outside the top-p nucleus zeroed, their indices)."""
    sp, si = probs.sort(dim=-1, descending=True)
    cum = sp.cumsum(-1)
    return sp.masked_fill(cum - sp > p * cum[:, -1:], 0.0), si


def t_top_p_probs(probs, p):
    sp, si = t_nucleus(probs, p)
    return si.gather(1, torch.multinomial(sp, 1)).squeeze(1)


def t_min_p_probs(probs, mp):
    return t_sample(probs.masked_fill(probs < mp * probs.amax(-1, keepdim=True), 0.0))


def t_top_k_top_p_logits(logits, k, p):
    v, i = logits.topk(k, dim=-1)
    return i.gather(1, t_top_p_probs(v.float().softmax(-1), p).unsqueeze(1)).squeeze(1)


def t_top_k_mask(logits, k):
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def t_top_p_renorm(probs, p):
    sp, si = t_nucleus(probs, p)
    out = torch.zeros_like(probs).scatter_(1, si, sp)
    return out / out.sum(-1, keepdim=True)


def cases():
    """(label, reads "logits" or "probs", call(api, logits, probs), torch chain(logits, probs))."""
    return [
        (
            "sampling_from_logits",
            "logits",
            lambda m, x, p: m.sampling_from_logits(x),
            lambda x, p: t_sample(x.softmax(-1)),
        ),
        (
            "top_k 50 (probs)",
            "probs",
            lambda m, x, p: m.top_k_sampling_from_probs(p, 50),
            lambda x, p: t_top_k_probs(p, 50),
        ),
        (
            "top_p 0.9 (probs)",
            "probs",
            lambda m, x, p: m.top_p_sampling_from_probs(p, 0.9),
            lambda x, p: t_top_p_probs(p, 0.9),
        ),
        (
            "min_p 0.1 (probs)",
            "probs",
            lambda m, x, p: m.min_p_sampling_from_probs(p, 0.1),
            lambda x, p: t_min_p_probs(p, 0.1),
        ),
        (
            "top_k 50 + top_p 0.9 (logits)",
            "logits",
            lambda m, x, p: m.top_k_top_p_sampling_from_logits(x, 50, 0.9),
            lambda x, p: t_top_k_top_p_logits(x, 50, 0.9),
        ),
        (
            "top_k_mask_logits 50",
            "logits",
            lambda m, x, p: m.top_k_mask_logits(x, 50),
            lambda x, p: t_top_k_mask(x, 50),
        ),
        (
            "top_p_renorm_probs 0.9",
            "probs",
            lambda m, x, p: m.top_p_renorm_probs(p, 0.9),
            lambda x, p: t_top_p_renorm(p, 0.9),
        ),
        ("softmax", "logits", lambda m, x, p: m.softmax(x), lambda x, p: x.softmax(-1)),
    ]


def us(t):
    return f"{t * 1e6:.1f}" if t else "n/a"


def ratio(t, base):
    return f"{t / base:.2f}x" if t and base else "n/a"


# ---- speculative verification (chain of N drafts) ------------------------------------------------
def t_chain(q, ids, p):
    """Chain verification in torch ops (as a torch-only engine writes it): draft j accepted with
    probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection a token from relu(p_j - q_j),
    else the bonus token from p_N."""
    B, N = ids.shape
    pj = p[:, :N].gather(2, ids.unsqueeze(2)).squeeze(2)
    qj = q.gather(2, ids.unsqueeze(2)).squeeze(2)
    ok = torch.rand(B, N, device=p.device) * qj < pj
    n_acc = torch.cumprod(ok.int(), 1).sum(1)
    row = torch.arange(B, device=p.device)
    pn = p[row, n_acc]
    qn = q[row, n_acc.clamp(max=N - 1)] * (n_acc < N).unsqueeze(1)
    resid = (pn - qn).clamp(min=0) + 1e-30
    return n_acc, torch.multinomial(resid, 1).squeeze(1)


def t_top_k_top_p_renorm(probs, k, p):
    kth = probs.topk(k, dim=-1).values[:, -1:]
    return t_top_p_renorm(probs.masked_fill(probs < kth, 0.0), p)


def spec_cases(B, N, V, x3, q, q1, ids, pt):
    """(label, decodekit call, FlashInfer call(fi) or None, torch call, bytes of one read of the
    inputs). x3: target logits [B, N+1, V]; pt = softmax(x3); q: draft probs [B, N, V]; q1: one-hot
    drafts of ids (FlashInfer takes draft probs only)."""
    import decodekit as dk
    from decodekit.compat import flashinfer as dkfi

    ids32 = ids.int()  # FlashInfer's kernels take int32 token ids

    def fi_logits(fi):
        pr = torch.softmax(x3 / 0.8, -1).reshape(-1, V)
        pr = fi.top_p_renorm_probs(fi.top_k_renorm_probs(pr, 50), 0.9).reshape(B, N + 1, V)
        return fi.chain_speculative_sampling(q1, ids32, pr)

    def t_logits():
        pr = t_top_k_top_p_renorm(torch.softmax(x3 / 0.8, -1).reshape(-1, V), 50, 0.9).reshape(B, N + 1, V)
        return t_chain(q1, ids, pr)

    return [
        (
            f"chain N={N}, probs target + draft probs",
            lambda: dkfi.chain_speculative_sampling(q, ids, pt),
            lambda fi: fi.chain_speculative_sampling(q, ids32, pt),
            lambda: t_chain(q, ids, pt),
            (pt.numel() + q.numel()) * 4,
        ),
        (
            f"chain N={N}, logits T 0.8 + top_k 50 + top_p 0.9, one-hot drafts",
            lambda: dk.chain_speculative_sampling_from_logits(None, ids, x3, temperature=0.8, top_k=50, top_p=0.9),
            fi_logits,
            t_logits,
            x3.numel() * 4,
        ),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--V", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--N", type=int, default=4, help="drafts per row of the speculative chains")
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("sampling_cuda: needs a CUDA device (or --device cpu for a dry run)")
    from decodekit.compat import flashinfer as dkfi

    fi = None
    if dev == "cuda":
        try:
            import flashinfer.sampling as fi
        except ImportError:
            fi = None
    timer = cuda_time if dev == "cuda" else cpu_time
    graph = args.graph and dev == "cuda"
    bw = copy_bandwidth(timer, dev, 1 << 28 if dev == "cuda" else 1 << 24)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (dry run)"
    print(f"{name}; torch {torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s; graph replays: {graph}")
    print(
        f"FlashInfer: {'flashinfer-python ' + getattr(sys.modules.get('flashinfer'), '__version__', '?') if fi else 'not installed'}"
    )
    print("op | B | V | dk us | dk 1-CTA us | FlashInfer us | torch us | FI/dk | torch/dk | floor us | dk/floor")
    warm = 3 if dev == "cpu" else 10

    def measure(fn):
        try:
            return timer(fn, warm, args.reps, graph)
        except Exception:  # a peer that cannot run (or be captured) here
            return None

    for V in args.V:
        for B in args.B:
            g = torch.Generator(device="cpu").manual_seed(B * 7 + V)
            x = (torch.randn(B, V, generator=g) * 3).to(dev)
            p = x.softmax(-1)
            for label, reads, call, chain in cases():
                floor = B * V * 4 / bw
                t_dk = measure(lambda: call(dkfi, x, p))
                t_one = None
                if dev == "cuda":
                    os.environ["DECODEKIT_SPLIT_ROWS"] = "0"
                    try:
                        t_one = measure(lambda: call(dkfi, x, p))
                    finally:
                        del os.environ["DECODEKIT_SPLIT_ROWS"]
                t_fi = measure(lambda: call(fi, x, p)) if fi else None
                t_th = measure(lambda: chain(x, p))

                print(
                    f"{label} | {B} | {V} | {us(t_dk)} | {us(t_one)} | {us(t_fi)} | {us(t_th)} | {ratio(t_fi, t_dk)} | "
                    f"{ratio(t_th, t_dk)} | {floor * 1e6:.1f} | {(t_dk / floor if t_dk else float('nan')):.1f}x"
                )

    # speculative chains: decodekit's one call (split prepared nodes for small batches: the "1-CTA"
    # column is DECODEKIT_SPLIT_ROWS=0, nodes on one block each or resolved on the walk) against
    # FlashInfer's chain_speculative_sampling (from logits: its softmax + top-k / top-p renorm first)
    N = args.N
    print(f"\nspeculative verification, {N} drafts per row (floor: one read of the target [and draft] rows)")
    print("op | B | V | dk us | dk 1-CTA us | FlashInfer us | torch us | FI/dk | torch/dk | floor us | dk/floor")
    for V in args.V:
        for B in args.B:
            g = torch.Generator(device="cpu").manual_seed(B * 11 + V)
            x3 = (torch.randn(B, N + 1, V, generator=g) * 3).to(dev)
            pt = x3.softmax(-1)
            q = (x3[:, :N] + torch.randn(B, N, V, generator=g).to(dev)).softmax(-1)
            ids = torch.multinomial(q.reshape(-1, V), 1, generator=None).reshape(B, N)
            q1 = torch.nn.functional.one_hot(ids, V).float()
            for label, dk_call, fi_call, th_call, nbytes in spec_cases(B, N, V, x3, q, q1, ids, pt):
                floor = nbytes / bw
                t_dk = measure(dk_call)
                t_one = None
                if dev == "cuda":
                    os.environ["DECODEKIT_SPLIT_ROWS"] = "0"
                    try:
                        t_one = measure(dk_call)
                    finally:
                        del os.environ["DECODEKIT_SPLIT_ROWS"]
                t_fi = measure(lambda: fi_call(fi)) if fi else None
                t_th = measure(th_call)
                print(
                    f"{label} | {B} | {V} | {us(t_dk)} | {us(t_one)} | {us(t_fi)} | {us(t_th)} | {ratio(t_fi, t_dk)} | "
                    f"{ratio(t_th, t_dk)} | {floor * 1e6:.1f} | {(t_dk / floor if t_dk else float('nan')):.1f}x"
                )

    # the whole step (decodekit.sample with the pipeline keywords): a repetition penalty over a
    # 64-token history, then truncations; with top-k first the list steps see <= k entries; top-p
    # or min-p alone are applied by the row passes; typical starts from the whole row and its list
    # steps run on one CTA per row (the open question of the split plan: the "1-CTA" column turns
    # the split row passes off too)
    print("\nwhole step: repetition_penalty 1.1 over 64 output tokens, T 0.8, then the truncations")
    print("op | B | V | dk us | dk 1-CTA us | torch us | torch/dk | floor us | dk/floor")
    for V in args.V:
        for B in args.B:
            g = torch.Generator(device="cpu").manual_seed(B * 13 + V)
            x = (torch.randn(B, V, generator=g) * 3).to(dev)
            hist = torch.randint(0, V, (B, 64), generator=g).to(dev)
            seeds = torch.arange(B, dtype=torch.int64, device=dev)
            for label, kw, chain in step_cases(x, hist):
                floor = B * V * 4 / bw
                t_dk = measure(lambda: dk_step(x, hist, seeds, kw))
                t_one = None
                if dev == "cuda":
                    os.environ["DECODEKIT_SPLIT_ROWS"] = "0"
                    try:
                        t_one = measure(lambda: dk_step(x, hist, seeds, kw))
                    finally:
                        del os.environ["DECODEKIT_SPLIT_ROWS"]
                t_th = measure(chain)
                print(
                    f"{label} | {B} | {V} | {us(t_dk)} | {us(t_one)} | {us(t_th)} | {ratio(t_th, t_dk)} | "
                    f"{floor * 1e6:.1f} | {(t_dk / floor if t_dk else float('nan')):.1f}x"
                )


# ---- the whole step (penalties + truncations in one call) ----------------------------------------
def dk_step(x, hist, seeds, kw):
    import decodekit as dk

    return dk.sample(x, temperature=0.8, repetition_penalty=1.1, output_token_ids=hist, seed=seeds, **kw)


def t_penalised(x, hist):
    """The repetition penalty in torch ops (divide positive logits of seen tokens, multiply negative
    ones), then temperature 0.8 and softmax."""
    seen = torch.gather(x, 1, hist)
    x = x.scatter(1, hist, torch.where(seen > 0, seen / 1.1, seen * 1.1))
    return (x / 0.8).softmax(-1)


def t_typical(probs, tp):
    """Typical sampling in torch ops (sort by |-log p - H|, keep the prefix reaching tp)."""
    logp = probs.clamp_min(1e-30).log()
    H = -(probs * logp).sum(-1, keepdim=True)
    _, idx = (-logp - H).abs().sort(-1)
    sp = probs.gather(1, idx)
    cum = sp.cumsum(-1)
    return idx.gather(1, torch.multinomial(sp.masked_fill(cum - sp >= tp, 0.0), 1)).squeeze(1)


def step_cases(x, hist):
    """(label, decodekit keywords, torch chain)."""
    return [
        (
            "step: top_k 50 + top_p 0.9",
            dict(top_k=50, top_p=0.9),
            lambda: t_top_p_probs_k(t_penalised(x, hist), 50, 0.9),
        ),
        ("step: top_p 0.9", dict(top_p=0.9), lambda: t_top_p_probs(t_penalised(x, hist), 0.9)),
        ("step: min_p 0.05", dict(min_p=0.05), lambda: t_min_p(t_penalised(x, hist), 0.05)),
        ("step: typical 0.9 (whole-row list)", dict(typical_p=0.9), lambda: t_typical(t_penalised(x, hist), 0.9)),
    ]


def t_min_p(probs, mp):
    """Min-p in torch ops (keep p >= min_p * max p, then draw)."""
    keep = probs >= mp * probs.amax(-1, keepdim=True)
    return torch.multinomial(probs.masked_fill(~keep, 0.0), 1).squeeze(1)


def t_top_p_probs_k(probs, k, p):
    v, i = probs.topk(k, dim=-1)
    return i.gather(1, t_top_p_probs(v / v.sum(-1, keepdim=True), p).unsqueeze(1)).squeeze(1)


if __name__ == "__main__":
    main()
