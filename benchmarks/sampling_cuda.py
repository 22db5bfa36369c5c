"""CUDA sampling benchmark (issue 15): decodekit vs FlashInfer (flashinfer-python, when installed)
vs a torch chain (softmax / sort / cumsum / multinomial, as torch-only serving code does it), side
by side on the same inputs, with the read floor: the bytes of the logits (or probabilities) divided
by the measured device-to-device copy bandwidth.

decodekit runs twice per shape: with the split-row plan (several CTAs per row when there are fewer
rows than SMs; the default) and with DECODEKIT_SPLIT_ROWS=0 (one CTA per row), so the table shows
what splitting buys. The FlashInfer and decodekit calls are the same function names with the same
arguments (decodekit.compat.flashinfer mirrors flashinfer.sampling).

    python benchmarks/sampling_cuda.py [--B 1 8 64 256] [--V 32000 128256] [--reps 100] [--graph]

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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--V", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--reps", type=int, default=100)
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

                def us(t):
                    return f"{t * 1e6:.1f}" if t else "n/a"

                def ratio(t):
                    return f"{t / t_dk:.2f}x" if t and t_dk else "n/a"

                print(
                    f"{label} | {B} | {V} | {us(t_dk)} | {us(t_one)} | {us(t_fi)} | {us(t_th)} | {ratio(t_fi)} | "
                    f"{ratio(t_th)} | {floor * 1e6:.1f} | {(t_dk / floor if t_dk else float('nan')):.1f}x"
                )


if __name__ == "__main__":
    main()
