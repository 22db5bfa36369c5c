"""The whole sampling step (issue 11) against reference.py and transformers, on every ISA path:
processed logits bit for bit, survivor masks exactly, logprobs / ranks / top-n, tokens identical
across ISAs, bad rows, input errors, and the chain's draws (10^6, chi-square, zero outside)."""

import pytest
import torch

import decodekit as dk
from decodekit import reference as R
from decodekit.pipeline import _mask
from stats import N_DRAWS, assert_matches

NEG = float("-inf")
ISA_LIST = (
    ["scalar"]
    + (["avx2"] if dk.cpu_features()["avx2"] else [])
    + (["avx512"] if dk.cpu_features()["avx512"] and dk.cpu_features()["avx512_bf16"] else [])
)


def _logits(B, V, seed, head=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 2.0
    x[:, :head] += torch.rand(B, head, generator=g) * 6
    return x


def _inputs(B, V, seed, L=40):
    g = torch.Generator().manual_seed(1000 + seed)
    bm = torch.randint(-(2**31), 2**31 - 1, (B, (V + 31) // 32), dtype=torch.int32, generator=g)
    bm[:, 0] |= 0x1F  # the head stays allowed
    hist = torch.randint(-1, V, (B, L), generator=g)
    bans = torch.randint(-1, V, (B, 3), generator=g)
    bias_ids = torch.randint(-1, V, (B, 4), generator=g)
    bias_ids[:, 0] = 2  # repeated ids add up in order
    bias_ids[:, 1] = 2
    bias_vals = torch.randn(B, 4, generator=g)
    return dict(
        allowed_token_bitmask=bm,
        banned_token_ids=bans,
        logit_bias=(bias_ids, bias_vals),
        prompt_token_ids=hist[:, : L // 2],
        output_token_ids=hist[:, L // 2 :],
        repetition_penalty=1.3,
        frequency_penalty=0.4,
        presence_penalty=0.3,
    )


FILTERS = {
    "typical": dict(typical_p=0.7),
    "epsilon": dict(epsilon=1e-3),
    "eta": dict(eta=1e-3),
    "top_h": dict(top_h=0.6),
    "top_n_sigma": dict(top_n_sigma=1.0),
    "k_p_minp": dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05),
    "k_typ_eta_h_mtk": dict(temperature=1.3, top_k=50, typical_p=0.9, eta=1e-3, top_h=0.8, min_tokens_to_keep=3),
    "p_minp_eps_sigma": dict(top_p=0.9, min_p=0.1, epsilon=1e-3, top_n_sigma=2.0),
    "everything": dict(
        temperature=0.8,
        top_n_sigma=3.0,
        top_k=300,
        top_p=0.97,
        min_p=0.001,
        typical_p=0.95,
        epsilon=1e-4,
        eta=1e-4,
        top_h=0.9,
        min_tokens_to_keep=2,
    ),
    "mtk_large": dict(top_p=0.05, min_p=0.5, epsilon=0.2, min_tokens_to_keep=7),
}


@pytest.fixture(params=ISA_LIST)
def isa(request):
    dk.set_isa(request.param)
    yield request.param
    dk.set_isa("auto")


@pytest.mark.parametrize("V", [1003, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_processed_logits_bit_exact(isa, V, dtype):
    x = _logits(5, V, 1).to(dtype)
    kw = _inputs(5, V, 1)
    got = dk.apply_penalties(x, **kw)
    ref = R.process_logits(x, **kw).to(dtype)
    assert got.dtype == dtype and torch.equal(got, ref)


@pytest.mark.parametrize("order", ["sequential", "vllm", "joint"])
@pytest.mark.parametrize("name", list(FILTERS))
def test_masks_equal_reference(isa, order, name):
    V = 1003
    for seed in range(2):
        x = _logits(4, V, seed)
        kw = _inputs(4, V, seed)
        f = FILTERS[name]
        got = _mask(x, order=order, **kw, **f)
        y = R.process_logits(x, **kw)
        keep = R.pipeline_keep(y, order=order, **f)
        assert torch.equal(got, torch.where(keep, y, torch.full_like(y, NEG))), (name, order, seed)


def test_masks_on_a_large_row(isa):
    """V = 128256: the top-k window / profile path and the chunked stats run on real sizes."""
    V = 128256
    x = _logits(2, V, 5)
    kw = _inputs(2, V, 5, L=512)
    for f in (FILTERS["k_p_minp"], FILTERS["k_typ_eta_h_mtk"], dict(top_n_sigma=1.5, top_k=50, top_p=0.9)):
        got = _mask(x, **kw, **f)
        y = R.process_logits(x, **kw)
        keep = R.pipeline_keep(y, **f)
        assert torch.equal(got, torch.where(keep, y, torch.full_like(y, NEG))), f


hf = pytest.importorskip("transformers.generation.logits_process")


@pytest.mark.parametrize("mtk", [1, 4])
def test_standalone_ops_equal_transformers(isa, mtk):
    x = _logits(6, 777, 3)
    cases = [
        (dk.typical_mask_logits(x, 0.6, mtk), hf.TypicalLogitsWarper(0.6, min_tokens_to_keep=mtk)),
        (dk.epsilon_mask_logits(x, 2e-3, mtk), hf.EpsilonLogitsWarper(2e-3, min_tokens_to_keep=mtk)),
        (dk.eta_mask_logits(x, 2e-3, mtk), hf.EtaLogitsWarper(2e-3, min_tokens_to_keep=mtk)),
        (_mask(x, top_k=3, min_tokens_to_keep=mtk), hf.TopKLogitsWarper(3, min_tokens_to_keep=mtk)),
        (_mask(x, top_p=0.3, min_tokens_to_keep=mtk), hf.TopPLogitsWarper(0.3, min_tokens_to_keep=mtk)),
        (_mask(x, min_p=0.3, min_tokens_to_keep=mtk), hf.MinPLogitsWarper(0.3, min_tokens_to_keep=mtk)),
    ]
    if mtk == 1:
        cases.append((dk.top_h_mask_logits(x, 0.5), hf.TopHLogitsWarper(0.5)))
    for got, proc in cases:
        assert torch.equal(got, proc(None, x.clone())), type(proc).__name__
    ids = torch.randint(0, 777, (6, 30), generator=torch.Generator().manual_seed(0))
    got = dk.apply_penalties(x, prompt_token_ids=ids[:, :10], output_token_ids=ids[:, 10:], repetition_penalty=1.2)
    assert torch.equal(got, hf.RepetitionPenaltyLogitsProcessor(1.2)(ids, x.clone()))


def test_top_n_sigma_mask(isa):
    x = _logits(3, 999, 4)
    x[1, 10:500] = NEG
    got = dk.top_n_sigma_mask_logits(x, 1.2)
    for b in range(3):
        f = x[b][x[b] > NEG].double()
        keep = x[b].double() >= f.max() - 1.2 * f.std(unbiased=False)
        assert torch.equal(got[b], torch.where(keep, x[b], torch.full_like(x[b], NEG)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_token_bitmask_inplace(isa, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 100, generator=g).to(dtype)
    bm = torch.randint(-(2**31), 2**31 - 1, (4, 4), dtype=torch.int32, generator=g)
    a, b = x.clone(), x.clone()
    dk.apply_token_bitmask_inplace(a, bm)
    R.apply_token_bitmask_inplace(b, bm)
    assert torch.equal(a, b) and not torch.equal(a, x)
    a, b = x.clone(), x.clone()
    dk.apply_token_bitmask_inplace(a, bm, indices=[1, 3])
    R.apply_token_bitmask_inplace(b, bm, indices=[1, 3])
    assert torch.equal(a, b) and torch.equal(a[0], x[0]) and torch.equal(a[2], x[2])
    # a narrower bitmask leaves the tokens past 32 * words untouched (xgrammar)
    a = x.clone()
    dk.apply_token_bitmask_inplace(a, bm[:, :2])
    assert torch.equal(a[:, 64:], x[:, 64:])
    v = x[0].clone()
    dk.apply_token_bitmask_inplace(v, bm[0])
    assert torch.equal(v, a[0] if False else R_one(x[0], bm[0]))


def R_one(row, words):
    r = row.clone()[None]
    R.apply_token_bitmask_inplace(r, words[None])
    return r[0]


@pytest.mark.parametrize("mode", ["processed", "raw"])
@pytest.mark.parametrize("T", [0.7, 0.0])
def test_logprobs_and_ranks(isa, mode, T):
    V = 2000
    x = _logits(6, V, 8)
    kw = _inputs(6, V, 8)
    f = dict(temperature=T, top_k=40, top_p=0.9, min_p=0.02)
    out = dk.sample(x, **f, **kw, top_logprobs=8, logprobs_mode=mode, seed=11)
    ref = R.pipeline(x, **f, **kw, top_logprobs=8, logprobs_mode=mode)
    assert out.valid.all()
    assert torch.equal(out.top_ids, ref["top_ids"])
    torch.testing.assert_close(out.top_logprobs.double(), ref["top_logprobs"], atol=2e-5, rtol=0)
    lp = ref["logprobs"]
    for b in range(6):
        t = int(out.tokens[b])
        assert ref["dist"][b, t] > 0
        assert abs(float(out.logprobs[b]) - float(lp[b, t])) < 2e-5
        assert int(out.ranks[b]) == int((lp[b] >= lp[b, t]).sum())


def test_tokens_identical_across_isas():
    V = 5000
    x = _logits(16, V, 9)
    kw = _inputs(16, V, 9)
    f = dict(temperature=0.9, top_k=100, typical_p=0.95, eta=1e-4, top_h=0.95, top_n_sigma=3.0)
    res = []
    for isa in ISA_LIST:
        dk.set_isa(isa)
        res.append(dk.sample(x, **f, **kw, top_logprobs=3, seed=123))
    dk.set_isa("auto")
    for r in res[1:]:
        for a, b in zip(r, res[0]):
            assert torch.equal(a, b)


def test_bad_rows_are_isolated(isa):
    V = 300
    x = _logits(4, V, 10)
    x[2, 7] = float("nan")
    bm = torch.full((4, (V + 31) // 32), -1, dtype=torch.int32)
    bm[1] = 0  # nothing allowed
    out = dk.sample(x, allowed_token_bitmask=bm, top_k=10, seed=3, return_valid=True)
    tok, valid = out
    assert valid.tolist() == [True, False, False, True]
    assert tok[1] == 0 and tok[2] == 0
    alone = dk.sample(x[[0, 3]], allowed_token_bitmask=bm[[0, 3]], top_k=10, seed=torch.tensor([0, 0]))
    both = dk.sample(x, allowed_token_bitmask=bm, top_k=10, seed=torch.tensor([0, 0, 0, 0]))
    assert torch.equal(both[[0, 3]], alone)
    # all of a row banned -> bad row too; other rows unaffected
    bans = torch.full((4, V), -1, dtype=torch.int64)
    bans[0] = torch.arange(V)
    t, v = dk.sample(x[[0, 3, 3, 3]], banned_token_ids=bans, seed=5, return_valid=True)
    assert not v[0] and t[0] == 0 and v[1:].all()


def test_bad_input_errors():
    V = 100
    x = _logits(2, V, 0)
    bad = [
        (dict(banned_token_ids=torch.tensor([[5, -2]] * 2)), "banned_token_ids"),
        (dict(banned_token_ids=torch.tensor([[5, V]] * 2)), "banned_token_ids"),
        (dict(prompt_token_ids=torch.tensor([[V + 3]] * 2)), "prompt_token_ids"),
        (dict(output_token_ids=torch.tensor([[1]] * 3)), "output_token_ids"),
        (dict(logit_bias=(torch.tensor([[1]] * 2), torch.tensor([[1.0, 2.0]] * 2))), "logit_bias"),
        (dict(logit_bias=(torch.tensor([[-5]] * 2), torch.tensor([[1.0]] * 2))), "logit_bias"),
        (dict(allowed_token_bitmask=torch.zeros(2, 3, dtype=torch.int32)), "allowed_token_bitmask"),
        (dict(allowed_token_bitmask=torch.zeros(2, 4, dtype=torch.int64)), "allowed_token_bitmask"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(repetition_penalty=torch.tensor([1.0, 0.0])), "repetition_penalty"),
        (dict(typical_p=0.0), "typical_p"),
        (dict(typical_p=1.5), "typical_p"),
        (dict(epsilon=1.0), "epsilon"),
        (dict(eta=-0.1), "eta"),
        (dict(top_h=1.1), "top_h"),
        (dict(min_tokens_to_keep=0), "min_tokens_to_keep"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(top_logprobs=-1), "top_logprobs"),
        (dict(top_logprobs=V + 1), "top_logprobs"),
        (dict(logprobs_mode="logits"), "logprobs_mode"),
        (dict(order="random", typical_p=0.5), "order"),
    ]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            dk.sample(x, seed=0, **kw)
    with pytest.raises(ValueError, match="typical_p"):
        dk.typical_mask_logits(x, 0.0)
    with pytest.raises(ValueError, match="bitmask"):
        dk.apply_token_bitmask_inplace(x, torch.zeros(2, 4, dtype=torch.int64))


def test_vllm_order_differs_from_sequential_where_it_should():
    """min-p before top-p (vLLM) renormalises top-p's mass over the min-p survivors."""
    x = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]))
    f = dict(top_p=0.75, min_p=0.4)  # min-p keeps p >= 0.16: the first three (mass 0.9)
    seq = _mask(x, order="sequential", **f)
    vll = _mask(x, order="vllm", **f)
    # sequential: 0.4 + 0.3 < 0.75 of the whole row keeps the third; vllm: (0.4 + 0.3) / 0.9 >= 0.75 drops it
    assert (seq > NEG).sum() == 3 and (vll > NEG).sum() == 2
    for o in ("sequential", "vllm"):
        assert torch.equal(_mask(x, order=o, **f) > NEG, R.pipeline_keep(x.float(), order=o, **f))


def test_opcheck_and_compile():
    x = _logits(3, 200, 1)
    kw = _inputs(3, 200, 1)
    from decodekit.pipeline import pack_params

    P = pack_params(3, temperature=0.8, top_k=20, typical_p=0.9)
    args = (
        x,
        None,
        P,
        0,
        kw["allowed_token_bitmask"],
        kw["banned_token_ids"],
        kw["logit_bias"][0],
        kw["logit_bias"][1],
        kw["prompt_token_ids"],
        kw["output_token_ids"],
        0,
        4,
        False,
        True,
        None,
        7,
        0,
    )
    torch.library.opcheck(torch.ops.decodekit.pipeline, args, test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(lambda t: dk.sample(t, temperature=0.8, top_k=20, typical_p=0.9, seed=7, **kw), fullgraph=False)
    assert torch.equal(f(x), dk.sample(x, temperature=0.8, top_k=20, typical_p=0.9, seed=7, **kw))


CHAIN_CASES = {
    "bench_chain": dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05),
    "entropy_chain": dict(temperature=1.2, typical_p=0.9, epsilon=1e-3, eta=2e-3, top_h=0.9, min_tokens_to_keep=2),
    "vllm_sigma": dict(temperature=0.9, top_n_sigma=2.0, top_k=30, top_p=0.85, min_p=0.02, order="vllm"),
}


@pytest.mark.parametrize("name", list(CHAIN_CASES))
def test_full_chain_draws_chi_square(name):
    """10^6 draws of one row (repeated through `indices`) through bitmask, bans, bias, penalties
    and the truncations; chi-square against reference.pipeline's distribution, zero draws outside."""
    V = 256
    x = _logits(1, V, 21, head=12) * 0.6
    one = _inputs(1, V, 21)
    n = N_DRAWS
    kw = {}
    for k, v in one.items():
        if k == "logit_bias":
            kw[k] = (v[0].expand(n, -1), v[1].expand(n, -1))
        elif isinstance(v, torch.Tensor):
            kw[k] = v.expand(n, -1)
        else:
            kw[k] = v
    f = dict(CHAIN_CASES[name])
    order = f.pop("order", "sequential")
    idx = torch.zeros(n, dtype=torch.int64)
    tok = dk.sample(x, indices=idx, order=order, seed=2024, **kw, **f)
    ref = R.pipeline(x, order=order, **one, **f)
    target = ref["dist"][0]
    assert 3 < int((target > 0).sum()) < V
    assert_matches(tok, target, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ["sequential", "vllm"])
def test_sampler_survivors_equal_reference(isa, dtype, order):
    """The sampler's own survivor set (its processed top-V logprobs are finite exactly on it) equals
    reference.pipeline_keep; top-k runs on the sampler's fast path here (no processed row written),
    bf16 rows bring ties at the k-th value."""
    V = 3000
    x = (_logits(6, V, 12) * 0.5).to(dtype)
    kw = _inputs(6, V, 12, L=300)
    for f in (
        dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05),
        dict(temperature=1.1, top_k=7),
        dict(temperature=0.9, top_k=200, typical_p=0.8, eta=1e-3, min_tokens_to_keep=3),
    ):
        out = dk.sample(x, order=order, top_logprobs=V, seed=4, **kw, **f)
        y = R.process_logits(x, **kw)
        keep = R.pipeline_keep(y, order=order, **f)
        got = torch.zeros_like(keep)
        for b in range(6):
            ids = out.top_ids[b][out.top_logprobs[b] > NEG]
            got[b, ids] = True
        assert torch.equal(got, keep), (f, (got != keep).sum())
        assert keep[torch.arange(6), out.tokens].all()


def test_fast_top_k_start_keeps_every_tie_at_the_kth_value(isa):
    """The fast top-k start reads the row once (a heap of the k best plus the values it evicted or
    refused at its worst): rows built to stress it (a rising ramp, so every value evicts the worst;
    a falling ramp; few distinct values, so the k-th value has hundreds of ties before and after
    the heap fills; a constant row; bans and the bitmask leaving fewer than k finite values) give
    reference.pipeline_keep's survivors exactly."""
    V = 4099  # not a multiple of 64: the tail blocks too
    ramp = torch.arange(V, dtype=torch.float32) / 64
    g = torch.Generator().manual_seed(5)
    rows = [
        ramp,
        ramp.flip(0),
        torch.randint(0, 6, (V,), generator=g).float(),
        torch.randint(0, 3, (V,), generator=g).float().flip(0),
        torch.zeros(V),
        (torch.randn(V, generator=g) * 4).round() / 4,
    ]
    x = torch.stack(rows)
    B = x.shape[0]
    bm = torch.full((B, (V + 31) // 32), -1, dtype=torch.int32)
    bm[5, 3:] = 0  # row 5: 96 allowed tokens
    bans = torch.full((B, 2), -1, dtype=torch.int64)
    bans[4] = torch.tensor([0, 7])
    hist = torch.randint(0, V, (B, 64), generator=g)
    kw = dict(
        allowed_token_bitmask=bm,
        banned_token_ids=bans,
        prompt_token_ids=hist[:, :32],
        output_token_ids=hist[:, 32:],
        repetition_penalty=1.2,
        frequency_penalty=0.25,
    )
    for f in (dict(temperature=1.0, top_k=10), dict(temperature=0.5, top_k=100, top_p=0.95), dict(top_k=500)):
        out = dk.sample(x, order="vllm", top_logprobs=V, seed=3, **kw, **f)
        keep = R.pipeline_keep(R.process_logits(x, **kw), order="vllm", **f)
        got = torch.zeros_like(keep)
        for b in range(B):
            got[b, out.top_ids[b][out.top_logprobs[b] > NEG]] = True
        assert torch.equal(got, keep), (f, (got != keep).sum(1))
        assert keep[torch.arange(B), out.tokens].all()


def test_python_m_decodekit_shows_the_whole_step(capsys):
    from decodekit.__main__ import pipeline_demo

    pipeline_demo()
    out = capsys.readouterr().out
    assert "top-5 ids equal reference.pipeline: True" in out
    assert "tokens inside the reference survivors: True" in out
    assert "valid=False: True" in out and ": True; row 3" in out


def test_pipeline_benchmark_runs(tmp_path):
    from decodekit.bench import pipeline as PB

    path = tmp_path / "p.json"
    res = PB.run(shapes=[(2, 3000)], json_path=str(path))
    r = res["results"][0]
    for k in ("decodekit_hot", "torch_cold", "floor_cold"):
        assert r[k] > 0
    assert path.exists()
