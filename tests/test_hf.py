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
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=512,
        initializer_range=init,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def prompts(B, L, V, seed=1):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


SAMPLING = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)


def hf_warp(scores, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05):
    """transformers' own warper chain in its generate order."""
    chain = transformers.LogitsProcessorList(
        [
            lp.TemperatureLogitsWarper(temperature),
            lp.TopKLogitsWarper(top_k),
            lp.TopPLogitsWarper(top_p),
            lp.MinPLogitsWarper(min_p),
        ]
    )
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
    kw = dict(
        do_sample=False,
        max_new_tokens=16,
        eos_token_id=[3, 7, 11],
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
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
    T, K, P, M = (
        lp.TemperatureLogitsWarper(0.7),
        lp.TopKLogitsWarper(5),
        lp.TopPLogitsWarper(0.9),
        lp.MinPLogitsWarper(0.1),
    )
    rep, ngram = lp.RepetitionPenaltyLogitsProcessor(1.2), lp.NoRepeatNGramLogitsProcessor(2)
    head, params = dkhf.split_processors([rep, T, K, P, M])
    assert len(head) == 0 and params == dict(
        repetition_penalty=1.2, _prompt_ignore_length=None, temperature=0.7, top_k=5, top_p=0.9, min_p=0.1
    )
    head, params = dkhf.split_processors([rep, ngram, T, K])  # an unknown processor ends the run
    assert list(head) == [rep, ngram] and params == dict(temperature=0.7, top_k=5)
    head, params = dkhf.split_processors([T, ngram, K, P])  # temperature after an unknown processor
    assert list(head) == [T, ngram] and params == dict(top_k=5, top_p=0.9)
    head, params = dkhf.split_processors([P, K])  # not decodekit's order: only the last
    assert list(head) == [P] and params == dict(top_k=5)
    H = lp.TopHLogitsWarper(0.5)  # HF: top-h before top-k; decodekit: last
    head, params = dkhf.split_processors([T, H, K])
    assert list(head) == [T, H] and params == dict(top_k=5)
    head, params = dkhf.split_processors([T, H])
    assert len(head) == 0 and params == dict(temperature=0.7, top_h=0.5)
    odd = [lp.TopPLogitsWarper(0.9, min_tokens_to_keep=2), lp.MinPLogitsWarper(0.1, min_tokens_to_keep=3)]
    head, params = dkhf.split_processors(odd)  # one min_tokens_to_keep per pass
    assert list(head) == odd[:1] and params == dict(min_p=0.1, min_tokens_to_keep=3)
    odd = [lp.TopKLogitsWarper(3, filter_value=-1e4)]  # a finite fill value: not exact, stays in HF
    head, params = dkhf.split_processors(odd)
    assert list(head) == odd and params == {}
    head, params = dkhf.split_processors([dkhf.TemperatureLogitsWarper(0.5), dkhf.TopKLogitsWarper(4)])
    assert len(head) == 0 and params == dict(temperature=0.5, top_k=4)


STEP_CONFIGS = {
    "T+top-k+top-p+min-p": (
        SAMPLING,
        lambda: [
            lp.TemperatureLogitsWarper(0.7),
            lp.TopKLogitsWarper(20),
            lp.TopPLogitsWarper(0.9),
            lp.MinPLogitsWarper(0.05),
        ],
    ),
    "rep+T+top-k+typical+epsilon+eta": (
        dict(
            do_sample=True,
            repetition_penalty=1.3,
            temperature=0.8,
            top_k=40,
            typical_p=0.9,
            epsilon_cutoff=3e-3,
            eta_cutoff=2e-3,
        ),
        lambda: [
            lp.RepetitionPenaltyLogitsProcessor(1.3),
            lp.TemperatureLogitsWarper(0.8),
            lp.TopKLogitsWarper(40),
            lp.TypicalLogitsWarper(0.9),
            lp.EpsilonLogitsWarper(3e-3),
            lp.EtaLogitsWarper(2e-3),
        ],
    ),
    "T+top-h": (
        dict(do_sample=True, temperature=0.9, top_h=0.6, top_k=0),  # top_k=0: no default top-k 50
        lambda: [lp.TemperatureLogitsWarper(0.9), lp.TopHLogitsWarper(0.6)],
    ),
}


@pytest.mark.parametrize("config", list(STEP_CONFIGS))
def test_survivor_sets_equal_hf_warpers_at_every_step(config):
    """Along decodekit's own trajectory, every step's scores (HF meaning: processed and warped) equal
    transformers' processors applied to that step's raw logits, the survivor sets included, and the
    drawn token is one of the survivors. Every processor of the config was absorbed."""
    V = 512
    gen_kw, chain = STEP_CONFIGS[config]
    model = tiny_llama(V=V, hidden=32, init=0.5)
    ids = prompts(8, 6, V)
    torch.manual_seed(0)
    stats = {}
    out = model.generate(
        ids,
        max_new_tokens=40,
        custom_generate=dkhf.generate,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        dk_stats=stats,
        **gen_kw,
    )
    assert stats["head"] == [], stats
    hf = transformers.LogitsProcessorList(chain())
    sizes = []
    for step, (s, raw) in enumerate(zip(out.scores, out.logits)):
        ref = hf(out.sequences[:, : 6 + step], raw.clone())
        assert torch.equal(torch.isfinite(s), torch.isfinite(ref)), step
        torch.testing.assert_close(s, ref, rtol=1e-6, atol=1e-6)
        tok = out.sequences[:, 6 + step]
        assert bool(torch.isfinite(s.gather(1, tok[:, None])).all()), step
        sizes.append(torch.isfinite(s).sum(-1))
    sizes = torch.stack(sizes)
    assert int(sizes.max()) > 3  # the filters did not collapse every row to one token


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
        out = model.generate(prompt.expand(B, -1), max_new_tokens=1, custom_generate=dkhf.generate, **SAMPLING, **extra)
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
    torch.testing.assert_close(
        filtered, torch.tensor([[0.3, 0.0, 0.0, 0.5], [0.0, 0.3, 0.3, 0.25]]), rtol=1e-3, atol=1e-3
    )
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
    torch.testing.assert_close(
        filtered,
        torch.tensor([[0.9, 0.0, 0.047, 0.0], [0.15, 0.3, 0.3, 0.25], [0.97, 0.0, 0.0, 0.0]]),
        rtol=1e-3,
        atol=1e-3,
    )
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
    ("TopKLogitsWarper", dict(top_k=5)),
    ("TopKLogitsWarper", dict(top_k=1, min_tokens_to_keep=4)),
    ("TopKLogitsWarper", dict(top_k=5000)),
    ("TopPLogitsWarper", dict(top_p=0.9)),
    ("TopPLogitsWarper", dict(top_p=0.3, min_tokens_to_keep=3, filter_value=-50.0)),
    ("TopPLogitsWarper", dict(top_p=0.0)),
    ("TopPLogitsWarper", dict(top_p=1.0)),
    ("MinPLogitsWarper", dict(min_p=0.1)),
    ("MinPLogitsWarper", dict(min_p=0.5, min_tokens_to_keep=5)),
    ("MinPLogitsWarper", dict(min_p=0.0)),
    ("TemperatureLogitsWarper", dict(temperature=0.6)),
    ("TypicalLogitsWarper", dict(mass=0.9)),
    ("TypicalLogitsWarper", dict(mass=0.3, min_tokens_to_keep=4)),
    ("TypicalLogitsWarper", dict(mass=0.5, filter_value=-7.0)),
    ("EpsilonLogitsWarper", dict(epsilon=3e-3)),
    ("EpsilonLogitsWarper", dict(epsilon=0.2, min_tokens_to_keep=3)),
    ("EtaLogitsWarper", dict(epsilon=2e-3)),
    ("EtaLogitsWarper", dict(epsilon=0.3, min_tokens_to_keep=2)),
    ("TopHLogitsWarper", dict(top_h=0.4)),
    ("TopHLogitsWarper", dict(top_h=0.7, filter_value=0.0)),
]


@pytest.mark.parametrize("name,kw", WARPERS)
def test_drop_in_equals_transformers_without_ties(name, kw):
    """Rows without ties: outputs equal transformers' own class exactly on float32 (what generate feeds
    them). bf16 rows (distinct values): decodekit computes in float32 where transformers computes
    softmax / cumsum in bf16, so the output equals transformers' on the float32 upcast, in bf16."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.randn(6, 1000, generator=g) * scale for scale in (0.5, 3.0)]
    # bf16: 200 distinct values (spacing 0.03 > bf16's 2^-6 step below 4) in random order
    rows += [
        torch.stack([(torch.randperm(200, generator=g).float() * 0.03 - 3.0) * scale for _ in range(4)]).to(
            torch.bfloat16
        )
        for scale in (1.0, 0.5)
    ]
    for x in rows:
        ref = getattr(lp, name)(**kw)(None, x.float()).to(x.dtype)
        out = getattr(dkhf, name)(**kw)(None, x)
        assert out.dtype == x.dtype and out.shape == ref.shape
        assert torch.equal(out, ref), (name, kw, x.dtype)
    assert isinstance(getattr(dkhf, name)(**kw), getattr(lp, name))


def test_ported_typical_cases():
    dist = torch.log(torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.4, 0.2, 0.2, 0.2]]))
    warp = dkhf.TypicalLogitsWarper(0.5)
    torch.testing.assert_close(
        torch.exp(warp(None, dist)), torch.tensor([[0.97, 0.0, 0.0, 0.0], [0.0, 0.2, 0.2, 0.2]]), rtol=1e-3, atol=1e-3
    )
    assert not torch.all(warp(None, dist) == dist)
    safety = dkhf.TypicalLogitsWarper(mass=0.5, filter_value=0.0, min_tokens_to_keep=3)
    assert (safety(None, _uniform(2, 5)) == 0.0).long().sum(-1).tolist() == [0, 0]
    ramp = torch.arange(10, dtype=torch.float).unsqueeze(0).repeat(2, 1) - 5
    ramp[1] *= 100.0
    out = dkhf.TypicalLogitsWarper(0.7, min_tokens_to_keep=2, filter_value=0.0)(None, ramp)
    assert (out != 0.0).long().sum(-1).tolist() == [2, 2]
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            dkhf.TypicalLogitsWarper(bad)


def test_ported_epsilon_cases():
    dist = torch.log(torch.tensor([[0.87, 0.099, 0.001, 0.03], [0.4, 0.299, 0.101, 0.2]]))
    warp = dkhf.EpsilonLogitsWarper(0.1)
    torch.testing.assert_close(
        torch.exp(warp(None, dist)), torch.tensor([[0.87, 0, 0, 0], [0.4, 0.299, 0.101, 0.2]]), rtol=1e-3, atol=1e-3
    )
    assert not torch.all(warp(None, dist) == dist)
    ramp = torch.arange(10, dtype=torch.float).unsqueeze(0).repeat(2, 1) - 5
    ramp[1] *= 100.0
    out = dkhf.EpsilonLogitsWarper(5e-2, min_tokens_to_keep=2, filter_value=0.0)(None, ramp)
    assert (out != 0.0).long().sum(-1).tolist() == [3, 2]
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError):
            dkhf.EpsilonLogitsWarper(bad)


def test_ported_eta_cases():
    dist = torch.log(torch.tensor([[0.0, 0.1, 0.8, 0.1], [0.01, 0.04, 0.9, 0.05]]))
    warp = dkhf.EtaLogitsWarper(0.0625, device="cpu")
    torch.testing.assert_close(
        torch.exp(warp(None, dist)), torch.tensor([[0.0, 0.1, 0.8, 0.1], [0.0, 0.0, 0.9, 0.0]]), rtol=1e-3, atol=1e-3
    )
    assert not torch.all(warp(None, dist) == dist)
    ramp = torch.arange(10, dtype=torch.float).unsqueeze(0).repeat(2, 1) - 5
    ramp[1] *= 100.0
    out = dkhf.EtaLogitsWarper(0.1, min_tokens_to_keep=2, filter_value=0.0, device="cpu")(None, ramp)
    assert (out != 0.0).long().sum(-1).tolist() == [2, 2]
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError):
            dkhf.EtaLogitsWarper(bad)


def test_ported_top_h_cases():
    cases = [
        ([0.97, 0.01, 0.01, 0.01], 0.3, [0.97, 0.0, 0.0, 0.0]),
        ([0.4, 0.3, 0.2, 0.1], 0.7, [0.4, 0.3, 0.0, 0.0]),
        ([0.25, 0.25, 0.25, 0.25], 1.0, [0.25, 0.25, 0.25, 0.25]),
        ([0.75, 0.25, 0.0, 0.0], 0.4, [0.75, 0, 0, 0]),
    ]
    for probs, h, expected in cases:
        dist = torch.log(torch.tensor([probs]))
        out = torch.exp(dkhf.TopHLogitsWarper(top_h=h)(None, dist.clone()))
        torch.testing.assert_close(out, torch.tensor([expected]), rtol=1e-3, atol=1e-3)
    # HF: "processor should not change logits in-place" (on a uniform row, where HF keeps 2 of the 4
    # tied tokens by sort order and decodekit keeps the tie group whole: the tie rule)
    uniform = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    before = uniform.clone()
    out = dkhf.TopHLogitsWarper(top_h=0.5)(None, uniform)
    assert torch.equal(uniform, before) and out.data_ptr() != uniform.data_ptr()
    assert int(torch.isfinite(lp.TopHLogitsWarper(top_h=0.5)(None, uniform)).sum()) == 2
    assert int(torch.isfinite(out).sum()) == 4
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            dkhf.TopHLogitsWarper(bad)


def test_ported_repetition_penalty_cases():
    V = 10
    ids = torch.tensor([[0, 1], [5, 0]])
    scores = _uniform(2, V)
    scores[0, 0] = -(1 / V)
    scores[1, 5] = 4 / V
    out = dkhf.RepetitionPenaltyLogitsProcessor(penalty=2.0)(ids, scores)
    assert out[0, 0].item() == pytest.approx(-(1 / V) * 2) and out[0, 1].item() == pytest.approx((1 / V) / 2)
    assert out[1, 0].item() == pytest.approx((1 / V) / 2) and out[1, 5].item() == pytest.approx((4 / V) / 2)
    assert not torch.all(scores == out)
    # prompt_ignore_length: the prompt itself is not penalised, later tokens are
    ign = dkhf.RepetitionPenaltyLogitsProcessor(penalty=2.0, prompt_ignore_length=ids.shape[-1])
    assert torch.all(ign(ids, scores) == scores)
    longer = torch.tensor([[0, 1, 0, 1], [5, 0, 5, 0]])
    out = ign(longer, scores)
    assert out[0, 0].item() == pytest.approx(-(1 / V) * 2) and out[1, 5].item() == pytest.approx((4 / V) / 2)
    for bad in (0.0, -1.0, 1):
        with pytest.raises(ValueError):
            dkhf.RepetitionPenaltyLogitsProcessor(bad)


def test_repetition_penalty_equals_transformers_on_random_histories():
    g = torch.Generator().manual_seed(11)
    for _ in range(20):
        x = torch.randn(5, 300, generator=g) * 3
        ids = torch.randint(0, 320, (5, 40), generator=g)  # some ids past the vocabulary (ignored by HF)
        pen = float(torch.rand((), generator=g) * 2 + 0.3)
        for pil in (None, 7, torch.tensor([0, 3, 40, 12, 5])):
            ref = lp.RepetitionPenaltyLogitsProcessor(pen, prompt_ignore_length=pil)(ids, x)
            out = dkhf.RepetitionPenaltyLogitsProcessor(pen, prompt_ignore_length=pil)(ids, x)
            assert torch.equal(out, ref)


def test_tie_rule_is_the_only_difference():
    """Rows built of tied values: decodekit's top-p and top-h keep a tie group whole, HF's sort order
    can split it. Every token where the two differ is in the tie group at HF's cut, and decodekit's
    set is exactly HF's set plus the rest of that group. Top-k and min-p agree everywhere."""
    g = torch.Generator().manual_seed(3)
    levels = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.5, 0.0, -1.0])
    splits = 0
    for trial in range(200):
        x = levels[torch.randint(0, len(levels), (4, 24), generator=g)]
        p = float(torch.rand((), generator=g) * 0.9 + 0.05)
        name = "TopPLogitsWarper" if trial % 2 == 0 else "TopHLogitsWarper"
        kw = dict(top_p=p) if trial % 2 == 0 else dict(top_h=p)
        ref = getattr(lp, name)(**kw)(None, x)
        out = getattr(dkhf, name)(**kw)(None, x)
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
    out = model.generate(
        ids, do_sample=True, max_new_tokens=12, logits_processor=procs, return_dict_in_generate=True, output_scores=True
    )
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
        out = target.generate(
            ids,
            do_sample=False,
            max_new_tokens=30,
            repetition_penalty=1.2,
            custom_generate=dkhf.generate,
            draft_model=draft,
            num_draft_tokens=3,
            dk_stats=stats,
        )
        assert torch.equal(out, ref), seed
        assert stats["drafted"] > 0 and 0 < stats["accepted"] <= stats["drafted"]
        assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]
        assert stats["steps"] == 30 and stats["rounds"] < 30  # fewer target passes than tokens
    # HF's own keyword reaches the loop too
    stats = {}
    out = target.generate(
        ids, do_sample=False, max_new_tokens=12, custom_generate=dkhf.generate, assistant_model=draft, dk_stats=stats
    )
    assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=12)) and stats["rounds"] > 0


def test_assisted_stops_at_eos_like_plain_generate():
    target = tiny_llama(V=64, layers=2, init=0.2)
    draft = _draft_of(target, 0.05)
    ids = prompts(1, 6, 64, seed=4)
    plain = target.generate(ids, do_sample=False, max_new_tokens=20)
    eos = int(plain[0, 6 + 5])  # a token the greedy run emits at step 6
    ref = target.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=eos)
    out = target.generate(
        ids,
        do_sample=False,
        max_new_tokens=20,
        eos_token_id=eos,
        custom_generate=dkhf.generate,
        draft_model=draft,
        num_draft_tokens=4,
    )
    assert torch.equal(out, ref)


ASSISTED = {
    # absorbed warpers all resolved inside the chain-verification kernel (logits form)
    "T+top-k+top-p": (
        2000,
        dict(do_sample=True, temperature=1.3, top_k=12, top_p=0.95),
        lambda: [lp.TemperatureLogitsWarper(1.3), lp.TopKLogitsWarper(12), lp.TopPLogitsWarper(0.95)],
    ),
    # the whole step (repetition penalty, typical) per position, verification from probabilities
    "rep+T+typical": (
        1000,
        dict(do_sample=True, repetition_penalty=1.4, temperature=1.2, top_k=0, typical_p=0.9),
        lambda: [
            lp.RepetitionPenaltyLogitsProcessor(1.4),
            lp.TemperatureLogitsWarper(1.2),
            lp.TypicalLogitsWarper(0.9),
        ],
    ),
}


@pytest.mark.parametrize("config", list(ASSISTED))
def test_assisted_sampling_is_lossless_chi_square(config):
    """The first two tokens of assisted sampling (draft = a noisy copy, 2 drafts per round) follow
    the target's own processed distribution: chi-square on the 2-token joint distribution. Each run
    is a whole generate call (~20 ms on an idle core), so the runs are 10^3, not 10^6."""
    runs, kw, chain = ASSISTED[config]
    V = 16
    target = tiny_llama(V=V, layers=1, init=0.15, seed=5)
    draft = _draft_of(target, 0.6, seed=1)
    prompt = prompts(1, 5, V, seed=6)
    procs = transformers.LogitsProcessorList(chain())

    def dist(ids):
        with torch.no_grad():
            raw = target(ids).logits[:, -1].float()
        return torch.softmax(procs(ids, raw), -1)

    p1 = dist(prompt)[0]
    p2 = dist(torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1))
    joint = (p1[:, None] * p2).reshape(-1)
    draws, accepted, drafted = [], 0, 0
    torch.manual_seed(99)
    for _ in range(runs):
        stats = {}
        out = target.generate(
            prompt,
            max_new_tokens=2,
            custom_generate=dkhf.generate,
            draft_model=draft,
            num_draft_tokens=2,
            dk_stats=stats,
            **kw,
        )
        draws.append(int(out[0, 5]) * V + int(out[0, 6]))
        accepted, drafted = accepted + stats["accepted"], drafted + stats["drafted"]
    assert stats["head"] == []
    assert_matches(torch.tensor(draws), joint, what=f"assisted first two tokens, {config}")
    # a noisy draft: both accepted and rejected drafts occurred (the residual path was exercised)
    assert 0.2 < accepted / drafted < 0.95, (accepted, drafted)


@pytest.mark.parametrize("config", list(ASSISTED))
def test_assisted_verification_is_lossless_at_1e6_draws(config):
    """The power the generate-level test above lacks: 10^6 assisted runs of the first two tokens
    through the code `generate(..., draft_model=)` runs each round: `draft_token` (the draft's
    filtered q and its draw) and `verify_drafts` (decodekit's chain verification, or the whole step
    + verification from probabilities), batched. The models' outputs for every context a run can
    reach (prompt + up to 3 tokens, V=16: 4369 contexts) are computed once by real forward passes,
    then gathered per run. Round 1 drafts 2 tokens; a run whose first round emits one token gets a
    second round (1 draft) from prompt + that token. The joint distribution of the first two tokens
    equals the non-assisted one (HF's own processors on the target's logits): chi-square, no draw
    outside the support."""
    _, _, chain = ASSISTED[config]
    V, chunk = 16, 250_000
    target = tiny_llama(V=V, layers=1, init=0.15, seed=5)
    draft = _draft_of(target, 0.6, seed=1)
    prompt = prompts(1, 5, V, seed=6)
    procs = transformers.LogitsProcessorList(chain())
    head, params = dkhf.split_processors(procs)  # what generate() does with HF's processor list
    assert len(head) == 0 and params, "every processor of the config is absorbed into decodekit's step"

    # contexts prompt + t (t: 0..3 tokens, index = base-V number of t) and the models' last logits there
    ctx = [prompt]
    for depth in range(1, 4):
        prev = ctx[-1]
        ctx.append(torch.cat([prev.repeat_interleave(V, 0), torch.arange(V).repeat(prev.shape[0])[:, None]], 1))
    with torch.no_grad():
        tgt = [target(c).logits[:, -1].float() for c in ctx]
        drf = [draft(c).logits[:, -1].float() for c in ctx[:3]]

    def run(depth, idx, n):
        """One round after context (depth, idx) [M] with n drafts: returns (out, emitted)."""
        M = idx.shape[0]
        seq = ctx[depth][idx]
        Q, d, at = [], [], [idx]  # at[j]: index of the context with the first j drafts
        for j in range(n):
            tok, q = dkhf.draft_token(drf[depth + j][at[j]], seq, params, True)
            Q.append(q)
            d.append(tok)
            at.append(at[j] * V + tok)
            seq = torch.cat([seq, tok[:, None]], 1)
        tl = torch.stack([tgt[depth + j][at[j]] for j in range(n + 1)], 1)
        out, emitted = dkhf.verify_drafts(torch.stack(Q, 1), torch.stack(d, 1), tl, seq, params, True)
        assert out.shape == (M, n + 1)
        return out, emitted

    def dist(c):
        return torch.softmax(procs(c, target(c).logits[:, -1].float()), -1)

    with torch.no_grad():
        joint = (dist(ctx[0])[0][:, None] * dist(ctx[1])).reshape(-1)
    torch.manual_seed(7)
    draws, accepted, drafted = [], 0, 0
    for _ in range(N_DRAWS // chunk):
        out, emitted = run(0, torch.zeros(chunk, dtype=torch.int64), 2)
        first, second = out[:, 0], out[:, 1].clone()
        one = emitted == 0
        assert bool((second[one] == -1).all()) and bool((second[~one] >= 0).all())
        nxt, e2 = run(1, first[one], 1)  # the next round from prompt + first
        second[one] = nxt[:, 0]
        draws.append(first * V + second)
        accepted += int(emitted.sum()) + int(e2.sum())
        drafted += 2 * chunk + int(one.sum())
    draws = torch.cat(draws)
    assert draws.numel() == N_DRAWS
    assert_matches(draws, joint, what=f"assisted first two tokens at 10^6 runs, {config}")
    # a noisy draft: accepted and rejected drafts both occur (the residual path is exercised)
    assert 0.2 < accepted / drafted < 0.95, (accepted, drafted)


# ---------------------------------------------------------------------------------------------
# the tree-attention hook in a real decode loop
def _hook_llama(V=96, layers=2, Hq=32, Hkv=8, D=128, hidden=256):
    """A tiny random Llama with Llama-8B-shaped attention (32 q / 8 kv heads, head dim 128)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=Hq,
        num_key_value_heads=Hkv,
        head_dim=D,
        max_position_embeddings=512,
        initializer_range=0.05,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
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
            d = model(
                ids[:, 18:25],
                cache=cache,
                position_ids=18 + ref.tree_depths(parents),
                attention_mask=mask,
                use_cache=True,
            ).logits
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
    assert dict(hook_counts) == {
        PREFILL: 2,
        "fallback: mask is not a tree over a fully visible prefix (padding, window or bias)": 6,
    }


# ---------------------------------------------------------------------------------------------
# benchmark and `python -m decodekit` line (tiny shapes; timings not checked)
def test_bench_hf_runs_tiny(tmp_path, capsys):
    import json
    from decodekit.bench import hf as bench_hf, runner

    assert "hf" in runner.available()
    path = tmp_path / "hf.json"
    res = bench_hf.run(shapes=[(1000, 2)], new_tokens=4, reps=1, json_path=str(path), clock="cpu")
    out = capsys.readouterr().out
    assert "sampling inside model.generate" in out and "dk.hf greedy" in out
    row = json.loads(path.read_text())["rows"][0]
    assert set(row["seconds"]) == {"HF", "HF+dk procs", "dk.hf", "greedy", "dk.hf greedy"}
    assert all(v > 0 for v in row["seconds"].values()) and res["clock"] == "cpu"
    demo = bench_hf.one_line_demo(V=1000, B=2, new_tokens=4)
    assert demo["speedup"] > 0 and len(demo["tokens"]) == 4
