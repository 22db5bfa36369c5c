"""Chain speculative verification: decodekit vs plain-torch references, side by side.

References (python/decodekit/reference.py):
  hf      chain_speculative_sampling_hf: Hugging Face assisted generation's _speculative_sampling
          logic batched over B rows (full-row p/q ratios for every position, torch.rand acceptance,
          clamp(p - q, 0) / sum residuals, multinomial).
  gather  chain_speculative_sampling_gather: a leaner torch port that gathers p(x_j), q(x_j) first
          and builds only the one residual row each batch row needs.
decodekit reads, per row, p(x_j) and q(x_j) for its N drafts plus one residual row (p and q at the
stop position, or p_{N+1} for the bonus token); "MB read" counts exactly that (a single element as
one 64-byte line) and "floor" is that volume over the measured DRAM read bandwidth.
Timings are medians with the caches flushed before every call (harness.timeit(cold=True)); the
"hot" column repeats decodekit without flushing.

    python -m decodekit.bench.speculative [--quick] [--threads N]
    (or benchmarks/run.py --only speculative, which calls run(quick=...))
"""

import sys
from typing import Dict, List

import torch

import decodekit as dk
from decodekit import reference as ref
from decodekit.bench import harness

V_DEFAULT = 128256


def _inputs(B, N, V, seed=0):
    """Target and draft distributions that resemble a model and its drafter (acceptance ~0.6-0.8)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N + 1, V, generator=g) * 2.5
    target = logits.softmax(-1)
    draft = (logits[:, :N] + torch.randn(B, N, V, generator=g) * 0.8).softmax(-1)
    ids = torch.multinomial(draft.reshape(-1, V), 1, generator=g).reshape(B, N)
    return draft, ids, target


def _bytes_read(emitted: torch.Tensor, N: int, V: int) -> int:
    """decodekit's reads: 2 * N single elements (one cache line each) per row for the accept tests
    (every position, for FlashInfer's accepted count), plus p and q rows at the stop position or the
    p_{N+1} row for the bonus."""
    B = emitted.numel()
    rejected = int((emitted < N).sum())
    return B * 2 * N * 64 + rejected * 2 * V * 4 + (B - rejected) * V * 4


def run(quick: bool = False, threads: int = None, V: int = V_DEFAULT) -> Dict:
    if threads is None:  # keep what the caller (benchmarks/run.py --threads) set
        threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    shapes = [(1, 1), (8, 4)] if quick else [(b, n) for b in (1, 8, 32) for n in (1, 4, 8)]
    reps = 5 if quick else 11
    bw = harness.bandwidth(cold=True)
    rows: List[List[str]] = []
    results = []
    for B, N in shapes:
        draft, ids, target = _inputs(B, N, V, seed=B * 100 + N)
        gen = torch.Generator().manual_seed(1)
        out, acc, emi = dk.chain_speculative_sampling(draft, ids, target, seed=1)
        nbytes = _bytes_read(emi, N, V)
        floor = harness.floor_seconds(nbytes, cold=True)
        t_dk = harness.timeit(
            lambda: dk.chain_speculative_sampling(draft, ids, target, seed=1),
            reps=2 * reps + 1,
            warmup=2,
            cold=True,
            min_time=0.0,
        )
        t_hot = harness.timeit(
            lambda: dk.chain_speculative_sampling(draft, ids, target, seed=1), reps=3 * reps, warmup=2, min_time=0.1
        )
        t_hf = harness.timeit(
            lambda: ref.chain_speculative_sampling_hf(draft, ids, target, generator=gen),
            reps=reps,
            warmup=1,
            cold=True,
            min_time=0.0,
        )
        t_ga = harness.timeit(
            lambda: ref.chain_speculative_sampling_gather(draft, ids, target, generator=gen),
            reps=reps,
            warmup=1,
            cold=True,
            min_time=0.0,
        )
        rate = float(acc.double().sum()) / max(1, B * N)
        rows.append(
            [
                B,
                N,
                V,
                f"{rate:.2f}",
                f"{float(emi.double().mean()):.2f}",
                harness.fmt_us(t_dk),
                harness.fmt_us(t_hot),
                harness.fmt_us(t_hf),
                f"{t_hf / t_dk:.1f}x",
                harness.fmt_us(t_ga),
                f"{t_ga / t_dk:.1f}x",
                f"{nbytes / 1e6:.2f}",
                harness.fmt_us(floor),
                f"{t_dk / floor:.1f}",
            ]
        )
        results.append(
            dict(
                B=B,
                N=N,
                V=V,
                accept_rate=rate,
                mean_emitted=float(emi.double().mean()),
                decodekit_s=t_dk,
                decodekit_hot_s=t_hot,
                torch_hf_s=t_hf,
                torch_gather_s=t_ga,
                speedup_vs_hf=t_hf / t_dk,
                speedup_vs_gather=t_ga / t_dk,
                bytes_read=nbytes,
                floor_s=floor,
            )
        )
    title = (
        f"chain_speculative_sampling, fp32 probs, V={V}, {threads} threads "
        f"(torch.set_num_threads), DRAM read bandwidth {bw / 1e9:.1f} GB/s\n{harness.machine()}\n"
        f"times in us, medians, caches flushed before every call (hot: not flushed)"
    )
    harness.print_table(
        title,
        [
            "B",
            "N",
            "V",
            "accept",
            "emitted",
            "decodekit",
            "dk hot",
            "torch HF-logic",
            "vs HF",
            "torch gather",
            "vs gather",
            "MB read",
            "floor",
            "dk/floor",
        ],
        rows,
    )
    return {
        "benchmark": "chain_speculative_sampling",
        "threads": threads,
        "machine": harness.machine(),
        "bandwidth_Bps": bw,
        "quick": quick,
        "results": results,
    }


if __name__ == "__main__":
    t = None
    if "--threads" in sys.argv:
        t = int(sys.argv[sys.argv.index("--threads") + 1])
    run(quick="--quick" in sys.argv, threads=t)
