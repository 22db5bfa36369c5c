"""decodekit.hf: custom_generate loop, drop-in warpers, assisted generation (tiny random Llama, no hub)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import decodekit as dk  # noqa: E402
import decodekit.hf as dkhf  # noqa: E402
from stats import N_DRAWS, assert_matches  # noqa: E402
from transformers.generation import logits_process as lp  # noqa: E402

NEG = float("-inf")


def tiny_llama(V=64, seed=0, layers=1, hidden=32, init=0.3):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=hidden // 2, max_position_embeddings=512, initializer_range=init,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


def prompts(B, L, V, seed=1):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


SAMPLING = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)


def hf_warp(scores, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05):
    """transformers' own warper chain in its generate order."""
    chain = transformers.LogitsProcessorList([lp.TemperatureLogitsWarper(temperature), lp.TopKLogitsWarper(top_k),
                                              lp.TopPLogitsWarper(top_p), lp.MinPLogitsWarper(min_p)])
    return chain(None, scores)


# ---------------------------------------------------------------------------------------------
# decodekit.hf.generate
def test_greedy_token_identical_to_hf():
    model = tiny_llama()
    ids = prompts(3, 7, 64)
    for extra in ({}, dict(repetition_penalty=1.3, no_repeat_ngram_size=3)):
        ref = model.generate(ids, do_sample=False, max_new_tokens=24, **extra)
        out = model.generate(ids, do_sample=False, max_new_tokens=24, custom_generate=dkhf.generate, **extra)
        assert out.shape == ref.shape == (3, 31)
        assert torch.equal(out, ref), extra


def test_greedy_eos_padding_and_outputs_like_hf():
    model = tiny_llama()
    ids = prompts(4, 5, 64, seed=2)
    kw = dict(do_sample=False, max_new_tokens=16, eos_token_id=[3, 7, 11], pad_token_id=0,
              return_dict_in_generate=True, output_scores=True, output_logits=True)
    ref = model.generate(ids, **kw)
    out = model.generate(ids, custom_generate=dkhf.generate, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == len(out.logits) == len(ref.logits)
    for a, b in zip(out.scores, ref.scores):
        assert torch.equal(a, b)
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)


def test_seeding_reproduces_a_run():
    model = tiny_llama()
    ids = prompts(2, 6, 64)
    runs = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        runs.append(model.generate(ids, max_new_tokens=20, custom_generate=dkhf.generate, **SAMPLING))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_split_processors_absorbs_only_a_trailing_run_in_order():
    T, K, P, M = (lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(5), lp.TopPLogitsWarper(0.9),
                  lp.MinPLogitsWarper(0.1))
    rep = lp.RepetitionPenaltyLogitsProcessor(1.2)
    head, params = dkhf.split_processors([rep, T, K, P, M])
    assert list(head) == [rep] and params == dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1)
    head, params = dkhf.split_processors([T, rep, K, P])        # temperature after an unknown processor
    assert list(head) == [T, rep] and params == dict(top_k=5, top_p=0.9)
    head, params = dkhf.split_processors([P, K])                # not decodekit's order: only the last
    assert list(head) == [P] and params == dict(top_k=5)
    odd = [lp.TopPLogitsWarper(0.9, min_tokens_to_keep=2), lp.TopKLogitsWarper(3, filter_value=-1e4)]
    head, params = dkhf.split_processors(odd)                   # not exact in decodekit: stay in HF
    assert list(head) == odd and params == {}
    head, params = dkhf.split_processors([dkhf.TemperatureLogitsWarper(0.5), dkhf.TopKLogitsWarper(4)])
    assert len(head) == 0 and params == dict(temperature=0.5, top_k=4)


def test_survivor_sets_equal_hf_warpers_at_every_step():
    """Along decodekit's own trajectory, every step's scores (HF meaning: warped) equal transformers'
    warpers applied to that step's raw logits, and the drawn token is one of the survivors."""
    V = 512
    model = tiny_llama(V=V, hidden=32, init=0.5)
    ids = prompts(8, 6, V)
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=40, custom_generate=dkhf.generate, return_dict_in_generate=True,
                         output_scores=True, output_logits=True, **SAMPLING)
    sizes = []
    for step, (s, raw) in enumerate(zip(out.scores, out.logits)):
        ref = hf_warp(raw)
        assert torch.equal(torch.isfinite(s), torch.isfinite(ref)), step
        assert torch.equal(s, ref), step
        tok = out.sequences[:, 6 + step]
        assert bool(torch.isfinite(s.gather(1, tok[:, None])).all()), step
        sizes.append(torch.isfinite(s).sum(-1))
    sizes = torch.stack(sizes)
    assert int(sizes.min()) == 1 and int(sizes.max()) > 5  # the filters did bite, and not only to 1 token


def _first_token_probs(model, prompt, extra_head=()):
    with torch.no_grad():
        raw = model(prompt[None]).logits[:, -1].float()
    s = transformers.LogitsProcessorList(list(extra_head))(prompt[None], raw) if extra_head else raw
    return torch.softmax(hf_warp(s), -1)[0]


@pytest.mark.parametrize("rep", [None, 1.5])
def test_first_token_distribution_is_hf_chi_square(rep):
    """10^6 first tokens from generate (one prompt repeated over the batch, fresh seeds) follow the
    distribution of HF's processors + warpers, with no draw outside its support."""
    V = 256
    model = tiny_llama(V=V, hidden=32, init=0.05)
    prompt = prompts(1, 3, V, seed=3)[0]
    extra = {} if rep is None else dict(repetition_penalty=rep)
    head = [] if rep is None else [lp.RepetitionPenaltyLogitsProcessor(rep)]
    probs = _first_token_probs(model, prompt, head)
    assert 3 < int((probs > 0).sum()) < 20
    B, draws = 125_000, []
    torch.manual_seed(1234)
    while sum(d.numel() for d in draws) < N_DRAWS:
        out = model.generate(prompt.expand(B, -1), max_new_tokens=1, custom_generate=dkhf.generate, **SAMPLING,
                             **extra)
        draws.append(out[:, -1])
    assert_matches(torch.cat(draws), probs, what=f"first token, repetition_penalty={rep}")


# ---------------------------------------------------------------------------------------------
# drop-in warpers: transformers' own test cases (tests/generation/test_logits_process.py), as facts
def _uniform(B, V):
    return torch.ones((B, V)) / V


def test_ported_temperature_case():
    scores = _uniform(2, 20)
    scores[1, 5] = 1 / 20 + 0.1
    scores[1, 10] = 1 / 20 - 0.4
    probs = torch.softmax(scores, -1)
    sharp = torch.softmax(dkhf.TemperatureLogitsWarper(0.5)(None, scores), -1)
    smooth = torch.softmax(dkhf.TemperatureLogitsWarper(1.3)(None, scores), -1)
    torch.testing.assert_close(probs[0], sharp[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(probs[0], smooth[0], rtol=1e-3, atol=1e-3)
    assert probs[1].max() < sharp[1].max() and probs[1].min() > sharp[1].min()
    assert probs[1].max() > smooth[1].max() and probs[1].min() < smooth[1].min()
    assert not torch.all(scores == dkhf.TemperatureLogitsWarper(1.3)(None, scores))
    for bad in (0.0, -1.0, 1):
        with pytest.raises(ValueError):
            dkhf.TemperatureLogitsWarper(bad)


def test_ported_top_k_cases():
    V, B = 10, 2
    ramp = torch.arange(V, dtype=torch.float).unsqueeze(0).repeat(B, 1)
    ramp[1:, : V // 2] += V
    out = dkhf.TopKLogitsWarper(3)(None, ramp)
    assert torch.isinf(out[0]).tolist() == 7 * [True] + 3 * [False]
    assert torch.isinf(out[1]).tolist() == 2 * [True] + 3 * [False] + 5 * [True]
    assert not torch.all(out == ramp)
    safety = dkhf.TopKLogitsWarper(top_k=1, filter_value=0.0, min_tokens_to_keep=3)
    assert (safety(None, _uniform(B, 5)) == 0.0).long().sum(-1).tolist() == [0, 0]
    ramp5 = torch.arange(5, dtype=torch.float).unsqueeze(0).repeat(B, 1)
    assert (safety(None, ramp5) == 0.0).long().sum(-1).tolist() == [2, 2]
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError):
            dkhf.TopKLogitsWarper(bad)


def test_ported_top_p_cases():
    dist = torch.log(torch.tensor([[0.3, 0.1, 0.1, 0.5], [0.15, 0.3, 0.3, 0.25]]))
    warp = dkhf.TopPLogitsWarper(0.8)
    filtered = torch.exp(warp(None, dist))
    torch.testing.assert_close(filtered, torch.tensor([[0.3, 0.0, 0.0, 0.5], [0.0, 0.3, 0.3, 0.25]]),
                               rtol=1e-3, atol=1e-3)
    assert not torch.all(warp(None, dist) == dist)
    ramp = torch.arange(10, dtype=torch.float).unsqueeze(0).repeat(2, 1) - 5
    ramp[1] *= 100.0
    out = dkhf.TopPLogitsWarper(0.9, min_tokens_to_keep=2, filter_value=0.0)(None, ramp)
    assert (out != 0.0).long().sum(-1).tolist() == [3, 2]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            dkhf.TopPLogitsWarper(bad)


def test_ported_min_p_cases():
    dist = torch.log(torch.tensor([[0.9, 0.0274, 0.047, 0.0274], [0.15, 0.3, 0.3, 0.25], [0.97, 0.01, 0.01, 0.01]]))
    warp = dkhf.MinPLogitsWarper(0.05)
    filtered = torch.exp(warp(None, dist))
    torch.testing.assert_close(filtered, torch.tensor([[0.9, 0.0, 0.047, 0.0], [0.15, 0.3, 0.3, 0.25],
                                                       [0.97, 0.0, 0.0, 0.0]]), rtol=1e-3, atol=1e-3)
    assert not torch.all(warp(None, dist) == dist)
    ramp = torch.arange(10, dtype=torch.float) - 5
    ramp = ramp.unsqueeze(0).repeat(2, 1)
    ramp[1] *= 100.0
    out = dkhf.MinPLogitsWarper(0.9, min_tokens_to_keep=2, filter_value=0.0)(None, ramp)
    assert (out != 0.0).long().sum(-1).tolist() == [2, 2]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            dkhf.MinPLogitsWarper(bad)


WARPERS = [
    ("TopKLogitsWarper", dict(top_k=5)), ("TopKLogitsWarper", dict(top_k=1, min_tokens_to_keep=4)),
    ("TopKLogitsWarper", dict(top_k=5000)), ("TopPLogitsWarper", dict(top_p=0.9)),
    ("TopPLogitsWarper", dict(top_p=0.3, min_tokens_to_keep=3, filter_value=-50.0)),
    ("TopPLogitsWarper", dict(top_p=0.0)), ("TopPLogitsWarper", dict(top_p=1.0)),
    ("MinPLogitsWarper", dict(min_p=0.1)), ("MinPLogitsWarper", dict(min_p=0.5, min_tokens_to_keep=5)),
    ("MinPLogitsWarper", dict(min_p=0.0)), ("TemperatureLogitsWarper", dict(temperature=0.6)),
]


@pytest.mark.parametrize("name,kw", WARPERS)
def test_drop_in_equals_transformers_without_ties(name, kw):
    """Random logits (no ties): outputs equal transformers' own class exactly, in every dtype."""
    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        for scale in (0.5, 3.0):
            x = (torch.randn(6, 1000, generator=g) * scale)
            if dtype == torch.bfloat16:  # bf16 rounding makes ties; keep rows tie-free at the top
                x = x.to(dtype)
                if any(len(set(r.tolist())) < r.numel() for r in x.float().topk(50, -1).values):
                    continue
            ref = getattr(lp, name)(**kw)(None, x)
            out = getattr(dkhf, name)(**kw)(None, x)
            assert out.dtype == ref.dtype and out.shape == ref.shape
            assert torch.equal(out, ref), (name, kw, dtype, scale)
    assert isinstance(getattr(dkhf, name)(**kw), getattr(lp, name))


def test_tie_rule_is_the_only_difference():
    """Rows built of tied values: decodekit's top-p keeps a tie group whole, HF's sort order can
    split it. Every token where the two differ is in the tie group at HF's cut, and decodekit's
    set is exactly HF's set plus the rest of that group. Top-k and min-p agree everywhere."""
    g = torch.Generator().manual_seed(3)
    levels = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.5, 0.0, -1.0])
    splits = 0
    for trial in range(200):
        x = levels[torch.randint(0, len(levels), (4, 24), generator=g)]
        p = float(torch.rand((), generator=g) * 0.9 + 0.05)
        ref = lp.TopPLogitsWarper(p)(None, x)
        out = dkhf.TopPLogitsWarper(p)(None, x)
        hf_keep, dk_keep = torch.isfinite(ref), torch.isfinite(out)
        assert bool((hf_keep <= dk_keep).all())  # decodekit keeps a superset
        for b in range(4):
            diff = dk_keep[b] & ~hf_keep[b]
            if diff.any():
                splits += 1
                cut = x[b][hf_keep[b]].min()  # the lowest value HF kept: its tie group was split
                assert bool((x[b][diff] == cut).all())
                assert torch.equal(dk_keep[b], x[b] >= cut)
        for name, kw in (("TopKLogitsWarper", dict(top_k=3)), ("MinPLogitsWarper", dict(min_p=0.3))):
            assert torch.equal(getattr(dkhf, name)(**kw)(None, x), getattr(lp, name)(**kw)(None, x))
    assert splits > 10  # the case really occurs in this test


def test_drop_in_classes_inside_generate():
    model = tiny_llama()
    ids = prompts(2, 5, 64)
    procs = transformers.LogitsProcessorList([dkhf.TopKLogitsWarper(4), dkhf.MinPLogitsWarper(0.2)])
    torch.manual_seed(3)
    out = model.generate(ids, do_sample=True, max_new_tokens=12, logits_processor=procs,
                         return_dict_in_generate=True, output_scores=True)
    for s in out.scores:  # plain HF generate with decodekit's classes in its list
        assert int(torch.isfinite(s).sum(-1).max()) <= 4


# ---------------------------------------------------------------------------------------------
# assisted generation verified by decodekit's chain verification
def _draft_of(target, noise, seed=0):
    import copy
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=g))
    return draft


def test_assisted_greedy_identical_to_plain_greedy():
    target = tiny_llama(V=64, layers=2, init=0.2)
    draft = _draft_of(target, 0.2)
    for seed in range(3):
        ids = prompts(1, 6, 64, seed=seed)
        ref = target.generate(ids, do_sample=False, max_new_tokens=30, repetition_penalty=1.2)
        stats = {}
        out = target.generate(ids, do_sample=False, max_new_tokens=30, repetition_penalty=1.2,
                              custom_generate=dkhf.generate, draft_model=draft, num_draft_tokens=3, dk_stats=stats)
        assert torch.equal(out, ref), seed
        assert stats["drafted"] > 0 and 0 < stats["accepted"] <= stats["drafted"]
        assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]
        assert stats["steps"] == 30 and stats["rounds"] < 30  # fewer target passes than tokens
    # HF's own keyword reaches the loop too
    stats = {}
    out = target.generate(ids, do_sample=False, max_new_tokens=12, custom_generate=dkhf.generate,
                          assistant_model=draft, dk_stats=stats)
    assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=12)) and stats["rounds"] > 0


def test_assisted_stops_at_eos_like_plain_generate():
    target = tiny_llama(V=64, layers=2, init=0.2)
    draft = _draft_of(target, 0.05)
    ids = prompts(1, 6, 64, seed=4)
    plain = target.generate(ids, do_sample=False, max_new_tokens=20)
    eos = int(plain[0, 6 + 5])  # a token the greedy run emits at step 6
    ref = target.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=eos)
    out = target.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=eos, custom_generate=dkhf.generate,
                          draft_model=draft, num_draft_tokens=4)
    assert torch.equal(out, ref)


def test_assisted_sampling_is_lossless_chi_square():
    """The first two tokens of assisted sampling (draft = a noisy copy, 2 drafts per round) follow
    the target's own filtered distribution: chi-square on the 2-token joint distribution."""
    V = 16
    target = tiny_llama(V=V, layers=1, init=0.15, seed=5)
    draft = _draft_of(target, 0.6, seed=1)
    prompt = prompts(1, 5, V, seed=6)
    kw = dict(do_sample=True, temperature=1.3, top_k=12, top_p=0.95)

    def warp(s):
        return torch.softmax(hf_warp(s, temperature=1.3, top_k=12, top_p=0.95, min_p=0.0), -1)

    with torch.no_grad():
        p1 = warp(target(prompt).logits[:, -1].float())[0]
        nxt = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = warp(target(nxt).logits[:, -1].float())
    joint = (p1[:, None] * p2).reshape(-1)
    draws, accepted, drafted = [], 0, 0
    torch.manual_seed(99)
    runs = 2000  # each run is a whole generate call (~20 ms idle); 10^6 is not feasible here
    for _ in range(runs):
        stats = {}
        out = target.generate(prompt, max_new_tokens=2, custom_generate=dkhf.generate, draft_model=draft,
                              num_draft_tokens=2, dk_stats=stats, **kw)
        draws.append(int(out[0, 5]) * V + int(out[0, 6]))
        accepted, drafted = accepted + stats["accepted"], drafted + stats["drafted"]
    assert_matches(torch.tensor(draws), joint, what="assisted first two tokens")
    # a noisy draft: both accepted and rejected drafts occurred (the residual path was exercised)
    assert 0.2 < accepted / drafted < 0.95, (accepted, drafted)


# ---------------------------------------------------------------------------------------------
# the tree-attention hook in a real decode loop
def _hook_llama(V=96, layers=2, Hq=32, Hkv=8, D=128, hidden=256):
    """A tiny random Llama with Llama-8B-shaped attention (32 q / 8 kv heads, head dim 128)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=Hq, num_key_value_heads=Hkv,
                                   head_dim=D, max_position_embeddings=512, initializer_range=0.05,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def hook_counts():
    import decodekit.attention as dka
    dka.HOOK_COUNTS.clear()
    yield dka.HOOK_COUNTS
    dka.HOOK_COUNTS.clear()


PREFILL = "fallback: prefill (no cached prefix)"
SMALL_DECODE = "fallback: decode step below the kernel's break-even size (or not fp32)"


def test_hook_reaches_kernel_in_plain_generate(hook_counts):
    """Plain greedy generate: every decode step (T = 1) runs the kernel, the prefill goes to SDPA,
    and tokens and logits equal eager attention's."""
    import decodekit.attention as dka
    model = _hook_llama()
    ids = prompts(2, 40, 96)
    assert 2 * 32 * 40 * 128 >= dka.HOOK_MIN_DECODE_WORK
    model.set_attn_implementation("eager")
    ref = model.generate(ids, do_sample=False, max_new_tokens=16, return_dict_in_generate=True, output_logits=True)
    model.set_attn_implementation(dk.register_hf_attention())
    out = model.generate(ids, do_sample=False, max_new_tokens=16, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert dict(hook_counts) == {"kernel": 2 * 15, PREFILL: 2}


def test_hook_small_decode_falls_back_and_is_counted(hook_counts):
    model = _hook_llama(Hq=2, Hkv=1, D=64, hidden=128)
    ids = prompts(1, 10, 96)
    model.set_attn_implementation(dk.register_hf_attention())
    out = model.generate(ids, do_sample=False, max_new_tokens=8)
    model.set_attn_implementation("eager")
    assert torch.equal(out, model.generate(ids, do_sample=False, max_new_tokens=8))
    assert dict(hook_counts) == {PREFILL: 2, SMALL_DECODE: 2 * 7}


def test_hook_forward_equals_eager_with_the_cache_api(hook_counts):
    """Prefill, a decode step, a 5-token causal block and a 7-node tree over a DynamicCache (cache=
    keyword): logits equal eager attention at fp32 tolerance; the causal block and the tree take the
    kernel, the prefill and the short decode step (B * Hq * S * D = 53k) go to SDPA."""
    from decodekit import reference as ref
    model = _hook_llama()
    ids = prompts(1, 30, 96, seed=3)
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 3]])
    tm = ref.tree_mask_from_parents(parents)
    res = {}
    for impl in ("eager", dk.register_hf_attention()):
        model.set_attn_implementation(impl)
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            a = model(ids[:, :12], cache=cache, use_cache=True).logits
            b = model(ids[:, 12:13], cache=cache, use_cache=True).logits
            c = model(ids[:, 13:18], cache=cache, use_cache=True).logits
            mask = dk.tree_attention_mask(tm, [18], 25, dtype=torch.float32)
            d = model(ids[:, 18:25], cache=cache, position_ids=18 + ref.tree_depths(parents), attention_mask=mask,
                      use_cache=True).logits
        res[impl] = torch.cat([a, b, c, d], 1)
    torch.testing.assert_close(res["decodekit_tree"], res["eager"], atol=2e-5, rtol=1e-4)
    assert dict(hook_counts) == {PREFILL: 2, SMALL_DECODE: 2, "kernel": 2 * 2}


def test_hook_fallback_rule_for_padding(hook_counts):
    model = _hook_llama()
    padded = prompts(2, 40, 96, seed=6)
    mask = torch.ones_like(padded)
    mask[1, :3] = 0  # left padding in row 1
    outs = {}
    for impl in ("eager", dk.register_hf_attention()):
        model.set_attn_implementation(impl)
        outs[impl] = model.generate(padded, attention_mask=mask, do_sample=False, max_new_tokens=4, pad_token_id=0)
    assert torch.equal(outs["decodekit_tree"], outs["eager"])
    assert dict(hook_counts) == {PREFILL: 2,
                                 "fallback: mask is not a tree over a fully visible prefix (padding, window or bias)": 6}
