"""Tree attention: benchmark against torch SDPA (CPU, bool mask) and a tree speculative decoding
demo on a tiny random Llama.

    python -c "from decodekit.bench import attention as a; a.run(quick=True)"
    python -c "from decodekit.bench import attention as a; a.demo()"
"""

import copy
import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from . import harness

SHAPES_T = (16, 64, 128)
SHAPES_PREFIX = (512, 2048, 8192)
HQ, D = 32, 128


def _random_parents(T: int, gen: torch.Generator) -> torch.Tensor:
    par = torch.full((T,), -1, dtype=torch.int64)
    for i in range(1, T):
        par[i] = int(torch.randint(0, i, (1,), generator=gen))
    return par


def _tree_mask(parents: torch.Tensor) -> torch.Tensor:
    T = parents.shape[0]
    m = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        j = t
        while j >= 0:
            m[t, j] = True
            j = int(parents[j])
    return m


def _case(T, P, Hkv, dtype, gen, B=1):
    S = P + T
    q = torch.randn(B, T, HQ, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)  # HND: the Hugging Face cache layout
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    tm = _tree_mask(_random_parents(T, gen))[None].expand(B, T, T).contiguous()
    return q, k, v, tm, torch.full((B,), P, dtype=torch.int64)


def _paired(fa, fb, big: bool):
    """Medians of harness.timeit rounds taken alternately (A, B, A, B, ...), so that both sides see
    the same machine load (the development machine is shared); returns (median A, median B)."""
    import statistics

    rounds = 3 if big else 5
    kw = dict(warmup=1, reps=3, min_time=0.0) if big else dict(warmup=1, reps=5, min_time=0.05)
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(harness.timeit(fa, **kw))
        tb.append(harness.timeit(fb, **kw))
    return statistics.median(ta), statistics.median(tb)


def run(quick: bool = False, threads: Optional[int] = None, json_path: Optional[str] = None) -> Dict:
    """Time decodekit.tree_attention against torch SDPA (bool mask, same inputs) and print a table."""
    import decodekit

    if threads is None:
        threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    print(
        f"tree attention: {harness.machine()}; torch.set_num_threads({threads}); "
        f"decodekit ISA {decodekit.cpu_features()['active_isa']}"
    )
    bw = harness.bandwidth(cold=True)
    print(f"measured read bandwidth {bw / 1e9:.1f} GB/s (K/V floor = bytes of K and V / bandwidth)")
    if quick:
        configs = [
            (torch.float32, 64, 2048, 32),
            (torch.float32, 64, 2048, 8),
            (torch.bfloat16, 64, 2048, 32),
            (torch.bfloat16, 64, 2048, 8),
            (torch.float32, 16, 512, 8),
            (torch.bfloat16, 16, 512, 8),
        ]
    else:
        configs = [
            (dt, T, P, Hkv)
            for dt in (torch.float32, torch.bfloat16)
            for Hkv in (32, 8)
            for P in SHAPES_PREFIX
            for T in SHAPES_T
        ]
    gen = torch.Generator().manual_seed(0)
    rows: List[Dict] = []
    table = []
    for dtype, T, P, Hkv in configs:
        q, k, v, tm, pl = _case(T, P, Hkv, dtype, gen)
        dense = decodekit.tree_attention_mask(tm, pl, P + T)  # [B, 1, T, S] bool
        q_sdpa = q.transpose(1, 2).contiguous()
        gqa = Hkv != HQ

        def f_dk():
            return decodekit.tree_attention(q, k, v, tm, pl, kv_layout="HND")

        def f_sdpa():
            return F.scaled_dot_product_attention(q_sdpa, k, v, attn_mask=dense, enable_gqa=gqa)

        t_dk, t_sd = _paired(f_dk, f_sdpa, big=T * P >= 128 * 8192 // 2)
        nnz = int(tm.sum())
        flops = 4.0 * HQ * D * (T * P + nnz)
        kv_bytes = 2 * Hkv * (P + T) * D * k.element_size()
        floor = kv_bytes / bw
        r = dict(
            dtype=str(dtype).replace("torch.", ""),
            T=T,
            prefix=P,
            Hq=HQ,
            Hkv=Hkv,
            D=D,
            decodekit_s=t_dk,
            sdpa_s=t_sd,
            speedup=t_sd / t_dk,
            decodekit_gflops=flops / t_dk / 1e9,
            sdpa_gflops=flops / t_sd / 1e9,
            kv_floor_s=floor,
        )
        rows.append(r)
        table.append(
            [
                r["dtype"],
                T,
                P,
                f"{HQ}/{Hkv}",
                harness.fmt_us(t_dk),
                harness.fmt_us(t_sd),
                f"{r['speedup']:.2f}x",
                f"{r['decodekit_gflops']:.1f}",
                f"{r['sdpa_gflops']:.1f}",
                harness.fmt_us(floor),
            ]
        )
    harness.print_table(
        f"tree attention, B=1, D={D}, HND cache, random tree (times in us, median)",
        [
            "dtype",
            "T",
            "prefix",
            "Hq/Hkv",
            "decodekit",
            "torch SDPA",
            "speedup",
            "dk GFLOP/s",
            "SDPA GFLOP/s",
            "K/V floor",
        ],
        table,
    )
    result = dict(
        machine=harness.machine(), threads=threads, bandwidth=bw, isa=decodekit.cpu_features()["active_isa"], rows=rows
    )
    if json_path:
        harness.save_json(json_path, result)
    return result


# ---- demo: tree speculative decoding on a tiny Llama ---------------------------------------------
def _build_draft_tree(draft, committed: torch.Tensor, root: int, depth: int, branching: int):
    """BFS token tree: node 0 = root; each node gets the draft's top-`branching` next tokens as
    children, down to `depth`. Returns (tokens [T], parents [T])."""
    tokens, parents, depths = [root], [-1], [0]
    frontier = [0]
    for _ in range(depth):
        new = []
        for node in frontier:
            path, j = [], node
            while j >= 0:
                path.append(tokens[j])
                j = parents[j]
            seq = torch.cat([committed, torch.tensor(path[::-1])])[None]
            with torch.no_grad():
                top = draft(seq).logits[0, -1].topk(branching).indices.tolist()
            for tok in top:
                tokens.append(tok)
                parents.append(node)
                depths.append(depths[node] + 1)
                new.append(len(tokens) - 1)
        frontier = new
    return torch.tensor(tokens), torch.tensor(parents)


def _greedy_walk(tokens, parents, target_predict):
    """Accept children while they equal the target's argmax; returns (accepted node ids, bonus token)."""
    node, acc = 0, [0]
    while True:
        pred = int(target_predict[node])
        child = next((c for c in range(len(tokens)) if int(parents[c]) == node and int(tokens[c]) == pred), None)
        if child is None:
            return acc, pred
        acc.append(child)
        node = child


def _retrive_lists(parents: torch.Tensor):
    """SGLang's first-child / next-sibling lists for one tree."""
    T = parents.shape[0]
    nxt = torch.full((T,), -1, dtype=torch.int64)
    sib = torch.full((T,), -1, dtype=torch.int64)
    last = {}
    for c in range(1, T):
        p = int(parents[c])
        if p in last:
            sib[last[p]] = c
        else:
            nxt[p] = c
        last[p] = c
    return nxt, sib


def _verify(tokens, parents, target_predict, log):
    acc, bonus = _greedy_walk(tokens, parents, target_predict)
    import decodekit

    if hasattr(decodekit, "verify_tree_greedy"):
        try:  # SGLang layout (docs/semantics.md, "Trees"); cross-check against the plain walk
            nxt, sib = _retrive_lists(parents)
            res = decodekit.verify_tree_greedy(
                tokens[None], torch.arange(len(tokens))[None], nxt[None], sib[None], target_predict[None]
            )
            predicts, accept_index, accept_num = res[0], res[1], res[2]
            n = int(accept_num.reshape(-1)[0]) + 1
            idx = [int(i) for i in accept_index.reshape(-1)[:n]]
            if idx == acc:
                log(f"  decodekit.verify_tree_greedy agrees: accepted nodes {idx}")
            else:
                log(f"  decodekit.verify_tree_greedy returned {idx}, plain walk {acc}: using the walk")
        except Exception as e:  # noqa: BLE001  (API of another branch; the demo must not depend on it)
            log(f"  decodekit.verify_tree_greedy not usable here ({type(e).__name__}: {e}); plain greedy walk")
    return acc, bonus


def _tree_rounds(target, draft, cfg, prompt, rounds, depth, branching, log):
    """Greedy tree speculative decoding with the target's current attention implementation: each
    round the draft builds a token tree, the target scores it in ONE forward pass (4-D tree mask
    over the DynamicCache), the accepted path's KV entries are kept. Returns (tokens after the
    prompt, accepted per round, seconds spent in the target's tree forward passes)."""
    import time

    import transformers
    import decodekit
    import decodekit.attention as dka

    cache = transformers.DynamicCache(config=cfg)
    with torch.no_grad():
        root = int(target(prompt[None], cache=cache, use_cache=True).logits[0, -1].argmax())
    committed = prompt.clone()  # tokens whose KV is in the cache; `root` is decided but not cached
    accepted, t_verify = [], 0.0
    for r in range(rounds):
        tokens, parents = _build_draft_tree(draft, committed, root, depth, branching)
        T, P = tokens.shape[0], committed.shape[0]
        tm = dka.pack_tree_mask(_tree_mask(parents))[None]
        depths = torch.zeros(T, dtype=torch.int64)
        for c in range(1, T):
            depths[c] = depths[int(parents[c])] + 1
        mask = decodekit.tree_attention_mask(tm, [P], P + T, dtype=torch.float32)
        t0 = time.thread_time()
        with torch.no_grad():
            logits = target(tokens[None], cache=cache, position_ids=(P + depths)[None], attention_mask=mask).logits[0]
        t_verify += time.thread_time() - t0
        acc, bonus = _verify(tokens, parents, logits.argmax(-1), log)
        # keep the KV entries of the accepted path (root first), drop the rest of the tree
        keep = torch.cat([torch.arange(P), P + torch.tensor(acc)])
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, keep].contiguous()
            layer.values = layer.values[:, :, keep].contiguous()
        committed = torch.cat([committed, tokens[acc]])
        root = bonus
        accepted.append(len(acc))
        log(
            f"  round {r}: tree of {T} nodes, one forward pass, emitted {len(acc)} token(s) "
            f"{tokens[acc][1:].tolist() + [bonus]}"
        )
    return torch.cat([committed, torch.tensor([root])])[prompt.shape[0] :], accepted, t_verify


def _counts_line(counts) -> str:
    k = counts.get("kernel", 0)
    fb = {key[len("fallback: ") :]: v for key, v in counts.items() if key.startswith("fallback: ")}
    return f"kernel {k}, SDPA fallback {sum(fb.values())}" + (
        f" ({'; '.join(f'{r}: {n}' for r, n in fb.items())})" if fb else ""
    )


def demo(
    rounds: int = 6,
    depth: int = 3,
    branching: int = 2,
    prompt_len: int = 12,
    verbose: bool = True,
    seed: int = 0,
    gen_tokens: int = 24,
    timing_reps: int = 3,
) -> Dict:
    """See _demo; runs with torch.set_num_threads(1) so that the timings (CPU time of this thread)
    hold on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(rounds, depth, branching, prompt_len, verbose, seed, gen_tokens, timing_reps)
    finally:
        torch.set_num_threads(threads)


def _demo(
    rounds: int,
    depth: int,
    branching: int,
    prompt_len: int,
    verbose: bool,
    seed: int,
    gen_tokens: int,
    timing_reps: int,
) -> Dict:
    """Tree speculative decoding, greedy: a perturbed copy of a tiny random Llama drafts a token tree,
    the target verifies the whole tree in ONE forward pass through decodekit's tree attention kernel
    (registered as a transformers attention implementation), and the accepted path's KV entries are
    kept. The result must equal plain greedy decoding of the target. Then: plain `generate` with the
    hook (how many attention calls reached the kernel, how many fell back and why), and the same
    tree rounds timed with the hook and with SDPA."""
    import time

    import transformers
    import decodekit
    import decodekit.attention as dka

    log = print if verbose else (lambda *a, **k: None)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        initializer_range=0.1,
    )
    target = transformers.LlamaForCausalLM(cfg).eval()
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p))  # draft = target with 10% weight noise
    draft.set_attn_implementation("sdpa")
    name = decodekit.register_hf_attention()
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=gen)
    log(
        f"tree speculative decoding demo: tiny Llama ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv heads, head dim {cfg.head_dim}), "
        f"draft = perturbed copy, tree depth {depth} x branching {branching}"
    )

    target.set_attn_implementation(name)
    dka.HOOK_COUNTS.clear()
    out, accepted_per_round, _ = _tree_rounds(target, draft, cfg, prompt, rounds, depth, branching, log)
    tree_counts = dict(dka.HOOK_COUNTS)
    # the same rounds timed with the hook and with the target on SDPA (the tree mask then goes in as the
    # 4-D attention_mask), alternating so that load on a shared machine hits both; medians
    times = {name: [], "sdpa": []}
    out_sdpa = None
    for _ in range(timing_reps):
        for impl in (name, "sdpa"):
            target.set_attn_implementation(impl)
            t0 = time.thread_time()
            o, _, t_ver = _tree_rounds(target, draft, cfg, prompt, rounds, depth, branching, lambda *a, **k: None)
            times[impl].append((time.thread_time() - t0, t_ver))
            if impl == "sdpa":
                out_sdpa = o
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    (t_dk, t_ver_dk), (t_sd, t_ver_sd) = med[name], med["sdpa"]
    target.set_attn_implementation("sdpa")

    # plain greedy decoding of the target (SDPA, KV cache), same number of tokens
    cache = transformers.DynamicCache(config=cfg)
    seq = prompt[None]
    ref_tokens = []
    with torch.no_grad():
        logits = target(seq, cache=cache, use_cache=True).logits
        for _ in range(out.shape[0]):
            nxt = logits[0, -1].argmax()
            ref_tokens.append(int(nxt))
            logits = target(nxt.reshape(1, 1), cache=cache, use_cache=True).logits
    ok = out.tolist() == ref_tokens
    log(
        f"{out.shape[0]} tokens from {rounds} tree-verification forward passes of the target (plain greedy: "
        f"{out.shape[0]} passes); identical to plain greedy decoding: {ok} (SDPA rounds give the same tokens: "
        f"{out_sdpa.tolist() == out.tolist()}); attention calls: {_counts_line(tree_counts)}"
    )
    log(
        f"  {rounds} rounds (draft tree building included) in {t_dk * 1e3:.1f} ms with the hook vs {t_sd * 1e3:.1f} ms "
        f"on SDPA; the target's tree passes alone: {t_ver_dk * 1e3:.1f} vs {t_ver_sd * 1e3:.1f} ms (medians of "
        f"{timing_reps} alternating runs, CPU time, 1 thread; tiny model, so the draft and the framework dominate)"
    )

    # plain generate with the hook (the fallback rule of decodekit.attention.hf_attention_forward): the
    # demo model above, and one whose attention is shaped like Llama-3-8B's (32 q / 8 kv heads, head dim 128)
    big_cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=512,
        initializer_range=0.05,
    )
    torch.manual_seed(seed)
    big = transformers.LlamaForCausalLM(big_cfg).eval()
    gen_runs = {}
    for label, model, ids in (
        ("demo model, B=1, prompt 12", target, prompt[None]),
        ("32/8 heads x 128, B=2, prompt 40", big, torch.randint(0, 64, (2, 40), generator=gen)),
    ):
        model.set_attn_implementation(name)
        dka.HOOK_COUNTS.clear()
        t0 = time.thread_time()
        g_dk = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=gen_tokens,
            min_new_tokens=gen_tokens,
        )
        t_g_dk = time.thread_time() - t0
        counts = dict(dka.HOOK_COUNTS)
        model.set_attn_implementation("sdpa")
        t0 = time.thread_time()
        g_sd = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=gen_tokens,
            min_new_tokens=gen_tokens,
        )
        t_g_sd = time.thread_time() - t0
        model.set_attn_implementation("eager")
        g_eager = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=gen_tokens,
            min_new_tokens=gen_tokens,
        )
        model.set_attn_implementation("sdpa")
        same = torch.equal(g_dk, g_eager) and torch.equal(g_sd, g_eager)
        n_calls = model.config.num_hidden_layers * gen_tokens
        log(
            f"plain model.generate({gen_tokens} new tokens), {label}: {n_calls} attention calls: {_counts_line(counts)}; "
            f"tokens equal eager attention's: {same}; {t_g_dk * 1e3:.0f} ms with the hook, {t_g_sd * 1e3:.0f} ms on SDPA "
            f"(CPU time, 1 thread)"
        )
        gen_runs[label] = dict(counts=counts, matches_eager=same, ms_hook=t_g_dk * 1e3, ms_sdpa=t_g_sd * 1e3)
    gen_ok = all(r["matches_eager"] for r in gen_runs.values())
    return dict(
        matches_greedy=ok,
        tokens=out.tolist(),
        reference=ref_tokens,
        accepted_per_round=accepted_per_round,
        kernel_calls=tree_counts.get("kernel", 0),
        tree_counts=tree_counts,
        generate=gen_runs,
        generate_matches_eager=gen_ok,
        round_ms=dict(hook=t_dk * 1e3, sdpa=t_sd * 1e3),
        verify_ms=dict(hook=t_ver_dk * 1e3, sdpa=t_ver_sd * 1e3),
    )


if __name__ == "__main__":
    import sys

    if "demo" in sys.argv[1:]:
        demo()
    else:
        run(quick="--quick" in sys.argv[1:], json_path=os.environ.get("DK_BENCH_JSON"))
