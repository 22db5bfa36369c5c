"""`python -m decodekit`: what this build is, the ops at work on a small example, and the quick
comparison tables.

    python -m decodekit                        build info, cpu features, demo, quick benchmark tables (~1-2 min)
    python -m decodekit demo                   build info, cpu features and the demo only (seconds)
    python -m decodekit bench [--full] [--only sampling,speculative,attention] [--threads N] [--out DIR]
                                               the benchmarks (quick subset unless --full)
"""

import argparse
import importlib.util
import sys
import time

import torch

import decodekit as dk
from decodekit import reference as ref
from decodekit.bench import runner

T, K, P, MP = 0.7, 50, 0.9, 0.05


def info():
    bi = dk.build_info()
    cf = dk.cpu_features()
    print(
        f"decodekit {dk.__version__}  (torch {torch.__version__}, built with torch {bi.get('torch')}, "
        f"compiler {bi.get('compiler')}, CUDA kernels {'built' if bi.get('cuda') else 'not built'})"
    )
    print(
        f"CPU kernel paths compiled: {', '.join(bi.get('isa_paths', ()))}; cpu features: "
        + ", ".join(f"{k}={v}" for k, v in cf.items() if k != "active_isa")
        + f"; active path: {cf.get('active_isa')}"
    )
    print(f"torch threads: {torch.get_num_threads()}; cuda available: {torch.cuda.is_available()}")


def _isa_paths():
    bi, cf = dk.build_info(), dk.cpu_features()
    return [isa for isa in bi.get("isa_paths", ("scalar",)) if isa == "scalar" or cf.get(isa)]


def _example_logits(V: int = 32000):
    """Five rows: three LLM-like rows (confident, middling, unsure), a flat randn row and a NaN row."""
    from decodekit.bench.sampling import flat_logits, llm_logits

    pool = llm_logits(32, V, seed=11)
    top = torch.softmax(pool / T, -1).max(-1).values
    order = torch.argsort(top, descending=True)
    picks = [int(order[0]), int(order[len(order) // 2]), int(order[-1])]
    x = torch.cat([pool[picks], flat_logits(1, V, seed=5), torch.zeros(1, V)])
    x[4, 123] = float("nan")
    kinds = ["llm, confident", "llm, middling", "llm, unsure", "flat randn", "bad (NaN)"]
    return x, kinds


def demo():
    print("\n--- the ops at work: 5 rows, V=32000, temperature 0.7 -> top-k 50 -> top-p 0.9 -> min-p 0.05 ---")
    x, kinds = _example_logits()
    B, V = x.shape
    z = x / T
    mk = dk.top_k_mask_logits(z, K)
    mp = dk.top_p_mask_logits(mk, P)  # top-p on the renormalised top-k survivors (sequential order)
    mm = dk.min_p_mask_logits(mp, MP)
    n_k, n_p, n_m = (torch.isfinite(m).sum(-1) for m in (mk, mp, mm))
    ref_keep = ref.survivors(x, temperature=T, top_k=K, top_p=P, min_p=MP)
    good = ~ref.bad_rows(x, False)
    top = torch.softmax(z, -1).max(-1).values

    paths = _isa_paths()
    tokens, valid = {}, None
    for isa in paths:
        dk.set_isa(isa)
        tokens[isa], valid = dk.sample(x, temperature=T, top_k=K, top_p=P, min_p=MP, seed=42, return_valid=True)
    dk.set_isa("auto")
    gumbel = dk.sampling_from_logits(x, seed=42)
    probs = torch.softmax(x[:4], -1)
    topp = dk.top_p_sampling_from_probs(probs, P, seed=42)

    hdr = (
        f"{'row':>3}  {'kind':16s} {'p(top)':>7} {'top-k':>6} {'->top-p':>8} {'->min-p':>8} {'ref':>5}  "
        f"{'token (' + '/'.join(paths) + ')':>28} {'valid':>6} {'in set':>6} {'gumbel':>7} {'top-p probs':>11}"
    )
    print(hdr)
    for b in range(B):
        toks = [int(tokens[i][b]) for i in paths]
        same = "=" if len(set(toks)) == 1 else "DIFFER"
        tok = toks[0]
        in_set = bool(ref_keep[b, tok]) if bool(good[b]) else "-"
        ptop = f"{float(top[b]):.3f}" if bool(good[b]) else "nan"
        tp = str(int(topp[b])) if b < 4 else "-"
        cnt = [str(int(c[b])) if bool(good[b]) else "-" for c in (n_k, n_p, n_m)]
        print(
            f"{b:>3}  {kinds[b]:16s} {ptop:>7} {cnt[0]:>6} {cnt[1]:>8} {cnt[2]:>8} "
            f"{int(ref_keep[b].sum()):>5}  {str(tok) + ' on ' + str(len(paths)) + ' paths ' + same:>28} "
            f"{str(bool(valid[b])):>6} {str(in_set):>6} {int(gumbel[b]):>7} {tp:>11}"
        )
    agree = bool((n_m[good] == ref_keep[good].sum(-1)).all())
    same_all = all(torch.equal(tokens[paths[0]], tokens[i]) for i in paths)
    print(
        f"survivor counts equal the reference (reference.survivors): {agree}; same tokens on every ISA path "
        f"({', '.join(paths)}): {same_all}; the NaN row gives token {int(tokens[paths[0]][4])} with valid=False: "
        f"{not bool(valid[4])}"
    )

    # per-row seeds: a request keeps its tokens when the batch around it changes
    seeds = torch.tensor([101, 202, 303, 404], dtype=torch.int64)
    a = dk.sample(x[:4], temperature=T, top_p=P, seed=seeds)
    perm = torch.tensor([2, 0, 3, 1])
    b2 = dk.sample(x[:4][perm], temperature=T, top_p=P, seed=seeds[perm])
    print(
        f"per-row seeds {seeds.tolist()}: tokens {a.tolist()}; same rows shuffled -> {b2.tolist()} "
        f"(unshuffled {b2[torch.argsort(perm)].tolist()}, equal: {torch.equal(a, b2[torch.argsort(perm)])})"
    )
    # one source row drawn many times through `indices`: independent exact samples
    n = 20000
    idx = torch.zeros(n, dtype=torch.long)
    draws = dk.sample(x[1:2], temperature=T, top_k=K, top_p=P, min_p=MP, seed=7, indices=idx)
    target = ref.target_distribution(x[1:2], temperature=T, top_k=K, top_p=P, min_p=MP)[0]
    emp = torch.bincount(draws, minlength=V).double() / n
    support = torch.nonzero(target > 0).flatten().tolist()
    print(
        f"row 1 drawn {n}x via indices: support {support}; target "
        f"{[round(float(target[i]), 3) for i in support]}; empirical {[round(float(emp[i]), 3) for i in support]}; "
        f"outside support: {int((emp[target == 0] > 0).sum())}"
    )


# Optional packages, what is skipped without them, and how to get them. The bench extra
# (pip install "decodekit[bench]") brings transformers and matplotlib; llama-cpp-python compiles
# llama.cpp, so no extra pulls it in.
OPTIONAL = (  # (module, what needs it, demo part or only the tables, what installs it)
    (
        "transformers",
        "the attention demo (a tiny Llama) and the Hugging Face column of the tables",
        True,
        "pip install 'decodekit[bench]'",
    ),
    ("matplotlib", "the plots", False, "pip install 'decodekit[bench]'"),
    ("llama_cpp", "the llama.cpp column of the sampling tables", False, "pip install llama-cpp-python"),
)


def missing_optional():
    """The OPTIONAL entries whose package is not installed."""
    return [o for o in OPTIONAL if importlib.util.find_spec(o[0]) is None]


def report_skipped(tables: bool):
    for mod, what, in_demo, how in missing_optional():
        if in_demo or tables:
            print(f"skipped {what}: {mod} is not installed ({how} adds it)")


def pipeline_demo():
    """The whole sampling step (issue 11) on 4 rows: grammar bitmask, EOS ban, logit bias, penalties
    from the token history, every truncation, top-5 logprobs; checked against reference.pipeline."""
    from decodekit.bench.pipeline import chain_inputs
    from decodekit.bench.sampling import llm_logits

    B, V = 4, 32000
    print(
        f"\n--- the whole sampling step: {B} rows, V={V}: bitmask (30% allowed), EOS (id 2) banned, bias +3 on "
        "id 7, rep 1.1 / freq 0.5 / pres 0.5 over a 512-token history, T 0.8, top-k 50, top-p 0.95, min-p 0.02, "
        "typical 0.95, eta 1e-4, top_logprobs 5 ---"
    )
    x = llm_logits(B, V, seed=3)
    step = dict(
        chain_inputs(B, V, seed=3),
        banned_token_ids=torch.full((B, 1), 2),
        logit_bias=(torch.full((B, 1), 7), torch.full((B, 1), 3.0)),
        repetition_penalty=1.1,
        frequency_penalty=0.5,
        presence_penalty=0.5,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        min_p=0.02,
        typical_p=0.95,
        eta=1e-4,
    )
    step["allowed_token_bitmask"][3] = 0  # row 3: the grammar allows nothing -> a bad row
    outs = {}
    for isa in _isa_paths():
        dk.set_isa(isa)
        outs[isa] = dk.sample(x, top_logprobs=5, seed=9, **step)
    dk.set_isa("auto")
    out = next(iter(outs.values()))
    r = ref.pipeline(x, top_logprobs=5, **step)
    for b in range(B):
        n_surv = int(r["keep"][b].sum()) if bool(r["valid"][b]) else 0
        print(
            f"row {b}: token {int(out.tokens[b])} (valid={bool(out.valid[b])}, logprob {float(out.logprobs[b]):.3f}, "
            f"rank {int(out.ranks[b])}), {n_surv} survivors; top-5 ids {out.top_ids[b].tolist()}"
        )
    same = all(all(torch.equal(a, c) for a, c in zip(o, out)) for o in outs.values())
    in_support = all(bool(r["dist"][b, int(out.tokens[b])] > 0) for b in range(B) if bool(out.valid[b]))
    print(
        f"top-5 ids equal reference.pipeline: {torch.equal(out.top_ids, r['top_ids'])}; tokens inside the "
        f"reference survivors: {in_support}; same outputs on every ISA path ({', '.join(outs)}): {same}; "
        f"row 3 (nothing allowed) valid=False: {not bool(out.valid[3])}"
    )


def _other_demos():
    missing = {o[0] for o in missing_optional()}
    for name in ("speculative", "attention"):
        mod = runner.load(name)
        if name == "attention" and "transformers" in missing:
            continue  # reported by report_skipped()
        if mod is not None and hasattr(mod, "demo"):
            print(f"\n--- {name} demo ---")
            try:
                mod.demo()
            except Exception as e:  # a demo must not stop the tour
                print(f"[{name} demo failed: {type(e).__name__}: {e}]")


def hf_demo():
    """The one-line Hugging Face call: model.generate(..., custom_generate=decodekit.hf.generate)."""
    print(
        "\n--- Hugging Face transformers: model.generate(ids, do_sample=True, temperature=0.7, top_k=50, top_p=0.9, "
        "custom_generate=decodekit.hf.generate) ---"
    )
    try:
        from decodekit.bench import hf as bench_hf

        r = bench_hf.one_line_demo()
    except ImportError as e:
        print(f"[skipped: {e}]")
        return
    except Exception as e:  # a demo must not stop the tour
        print(f"[hf demo failed: {type(e).__name__}: {e}]")
        return
    print(
        f"tiny random Llama (1 layer, hidden 32), V={r['V']}, B={r['B']}, {r['new_tokens']} new tokens: HF's own "
        f"loop {r['hf_ms']:.1f} ms, decodekit.hf.generate {r['dk_ms']:.1f} ms -> {r['speedup']:.1f}x "
        f"(whole generate call, CPU time of 1 thread; row 0 tokens {r['tokens'][:8]}...)"
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return runner.main(argv[1:], prog="python -m decodekit bench", default_quick=True)
    p = argparse.ArgumentParser(
        prog="python -m decodekit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "demo", "info"],
        help="all (default): info + demo + quick tables; demo: info + demo; info: build info only",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the benchmark tables")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    info()
    if a.what == "info":
        return 0
    report_skipped(tables=a.what == "all")
    demo()
    pipeline_demo()
    _other_demos()
    hf_demo()
    if a.what == "demo":
        return 0
    print("\n--- quick comparison tables (full run: python -m decodekit bench --full) ---")
    res = runner.run_all(quick=True, threads=a.threads)
    print(f"\n(python -m decodekit took {time.perf_counter() - t0:.0f} s)")
    return 1 if any(isinstance(r, dict) and "error" in r for r in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
