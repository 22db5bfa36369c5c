#!/usr/bin/env python3
"""Before / after timing of the whole-step op's list steps (and the sampler's top-p / min-p) for
two builds of decodekit, each installed in its own Python environment.

    python benchmarks/ab_list_steps.py BEFORE_PYTHON AFTER_PYTHON [--runs N] [--only TEXT]

Each interpreter runs this file with --worker in a fresh process: dk.sample(x, seed=1,
temperature=0.7, ...) on N(0, 9) logits of V = 128256 (B = 1 and 8), torch.set_num_threads(1),
the median of 21 calls per case (the "ties" case: the row's 50 largest values kept, the next 20,000
set to the smallest of them, so top-h's 100th largest candidate value has 20,000 ties). The two
builds alternate N times (default 5); the table gives the
median over the runs of each build, and whether both builds drew the same tokens. --only TEXT: the
cases whose name contains TEXT.
"""

import json
import statistics
import subprocess
import sys
import time

CASES = [
    ("sample top_p=0.9", dict(top_p=0.9)),
    ("sample min_p=0.05", dict(min_p=0.05)),
    ("pipeline top_p=0.9", dict(top_p=0.9, order="vllm")),
    ("pipeline min_p=0.05", dict(min_p=0.05, order="vllm")),
    ("pipeline typical_p=0.9", dict(typical_p=0.9)),
    ("pipeline typical_p=0.9 mtk=5", dict(typical_p=0.9, min_tokens_to_keep=5)),
    ("pipeline eta=3e-4", dict(eta=3e-4)),
    ("pipeline top_h=0.5", dict(top_h=0.5)),
    ("pipeline top_h=0.5, 20000 ties at the 100th", dict(top_h=0.5, ties=20000)),
    ("pipeline top_k=50 typical_p=0.9", dict(top_k=50, typical_p=0.9)),
    ("pipeline rep=1.1 top_k=50 top_p=0.9", dict(repetition_penalty=1.1, history=True, top_k=50, top_p=0.9)),
]


def worker(only=""):
    import torch

    import decodekit as dk

    torch.set_num_threads(1)
    out = {}
    for B in (1, 8):
        x = torch.randn(B, 128256, generator=torch.Generator().manual_seed(0)) * 3
        for name, kw in CASES:
            if only not in name:
                continue
            kw = dict(kw)
            if kw.pop("history", False):
                kw["output_token_ids"] = [list(range(0, 4000, 7))] * B
            xs = x
            nt = kw.pop("ties", 0)
            if nt:
                s = x.sort(dim=1, descending=True).values
                c = s[:, 50 + nt - 1 : 50 + nt]
                xs = torch.where((x < s[:, 49:50]) & (x >= c), c.expand_as(x), x)

            def f(xs=xs, kw=kw):
                r = dk.sample(xs, seed=1, temperature=0.7, **kw)
                return r[0] if isinstance(r, tuple) else r

            for _ in range(3):
                f()
            ts = []
            for _ in range(21):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            out[f"B={B} {name}"] = (statistics.median(ts) * 1e3, f().tolist())
    print(json.dumps(out))


def main(argv):
    if argv and argv[0] == "--worker":
        return worker(argv[1] if len(argv) > 1 else "")
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 5
    only = argv[argv.index("--only") + 1] if "--only" in argv else ""
    pys = [
        a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] not in ("--runs", "--only"))
    ][:2]
    if len(pys) != 2:
        print(__doc__)
        return 2
    res = {p: [] for p in pys}
    for _ in range(runs):
        for p in pys:
            r = subprocess.run([p, __file__, "--worker", only], capture_output=True, text=True, check=True, cwd="/")
            res[p].append(json.loads(r.stdout.strip().splitlines()[-1]))
    before, after = pys
    print("| case | before | after | speed-up | same tokens |\n|---|---:|---:|---:|---|")
    for name in res[after][0]:
        b = statistics.median(r[name][0] for r in res[before])
        a = statistics.median(r[name][0] for r in res[after])
        same = all(r[name][1] == res[before][0][name][1] for r in res[before] + res[after])
        print(f"| {name} | {b:.3f} ms | {a:.3f} ms | {b / a:.1f}x | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
