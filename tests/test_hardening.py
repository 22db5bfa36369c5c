"""Regression tests of the hardening issue: each case was a crash, a silent wrong result, a wrong
reference or an unclear error before its fix. Cases that crashed run in a subprocess."""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import decodekit as dk
from decodekit import reference as R
from stats import chisquare_ok


def _run_isolated(code: str):
    """Run `code` in a fresh interpreter; returns (returncode, stdout + stderr)."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


def _logits(B=4, V=50, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 2


# 1. crash: prefix_lens + T overflowed in the bounds check -------------------------------------
@pytest.mark.parametrize("plen", ["2**63 - 1", "2**63 - 2", "2**62"])
def test_tree_attention_huge_prefix_raises_not_crashes(plen):
    rc, out = _run_isolated(f"""
        import torch, decodekit as dk
        q = torch.randn(1, 3, 2, 64); k = torch.randn(1, 8, 1, 64); v = torch.randn(1, 8, 1, 64)
        m = torch.ones(1, 3, 3, dtype=torch.bool)
        try:
            dk.tree_attention(q, k, v, m, torch.tensor([{plen}]))
        except ValueError as e:
            assert "prefix_lens" in str(e), str(e)
            print("RAISED")
    """)
    assert rc == 0 and "RAISED" in out, out


def test_tree_attention_prefix_beyond_int64_names_argument():
    q = torch.randn(1, 3, 2, 64)
    k = v = torch.randn(1, 8, 1, 64)
    m = torch.ones(1, 3, 3, dtype=torch.bool)
    for bad in (2**64, -1, [2**63]):
        with pytest.raises(ValueError, match="prefix_lens"):
            dk.tree_attention(q, k, v, m, bad)


# 2. infinite / out-of-range temperature ----------------------------------------------------------
@pytest.mark.parametrize("T", [math.inf, 1e39, -1.0, math.nan, 1e-39])
def test_temperature_out_of_float32_range_raises(T):
    x = _logits()
    with pytest.raises(ValueError, match="temperature"):
        dk.sample(x, temperature=T, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        dk.softmax(x, temperature=T)
    with pytest.raises(ValueError, match="temperature"):
        dk.sample(x, temperature=torch.tensor([1.0, T, 1.0, 1.0], dtype=torch.float64), seed=0)
    ids = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="temperature"):
        dk.chain_speculative_sampling_from_logits(None, ids, torch.randn(4, 3, 50), temperature=T, seed=0)


def test_temperature_at_float32_limits_samples_in_range():
    x = _logits(8, 50)
    for T in (3.4028234e38, 1.2e-38):
        tok, valid = dk.sample(x, temperature=T, seed=1, return_valid=True)
        assert bool(valid.all()) and int(tok.min()) >= 0 and int(tok.max()) < 50
    # a huge temperature is uniform over the finite logits; a tiny one is greedy
    tok = dk.sample(x, temperature=1.2e-38, seed=1)
    assert torch.equal(tok, x.argmax(-1))


# 3. a positive top_p below float32's range -------------------------------------------------------
def test_top_p_below_float32_range_keeps_argmax():
    x = _logits(6, 40, seed=2)
    for p in (1e-50, torch.tensor([1e-50] * 6, dtype=torch.float64)):
        tok, valid = dk.sample(x, top_p=p, seed=3, return_valid=True)
        assert bool(valid.all())
        assert torch.equal(tok, x.argmax(-1))
        masked = dk.top_p_mask_logits(x, p)
        assert torch.equal(masked, R.top_p_mask_logits(x, p))
        assert int((masked > -math.inf).sum()) == 6
    probs = torch.softmax(x, -1)
    assert torch.equal(dk.top_p_renorm_probs(probs, 1e-50) > 0, R.top_p_renorm_probs(probs, 1e-50) > 0)


def test_top_p_tensor_error_quotes_the_value_given():
    x = _logits()
    with pytest.raises(ValueError, match=r"top_p.*-1e-50"):
        dk.sample(x, top_p=torch.tensor([0.5, -1e-50, 0.5, 0.5], dtype=torch.float64), seed=0)
    with pytest.raises(ValueError, match=r"top_p.*nan"):
        dk.top_p_mask_logits(x, torch.tensor([0.5, math.nan, 0.5, 0.5]))


# 4. Gumbel-max index precision past 2^24 ---------------------------------------------------------
def test_gumbel_index_exact_past_2_24(isa):
    V = 2**24 + 5
    x = torch.full((1, V), -math.inf)
    x[0, 2**24 + 1] = 0.0
    for seed in range(3):
        tok, valid = dk.sampling_from_logits(x, seed=seed, return_valid=True)
        assert bool(valid[0]) and int(tok[0]) == 2**24 + 1
    x[0, 2**24 + 3] = 0.0  # two finite tokens: both reachable, nothing else
    got = {int(dk.sampling_from_logits(x, seed=s)[0]) for s in range(24)}
    assert got == {2**24 + 1, 2**24 + 3}


# 5. vocabularies of 2^31 or more -----------------------------------------------------------------
def test_vocabulary_of_2_31_raises():
    x = torch.empty((1, 2**31 + 64), dtype=torch.bfloat16)  # never touched: the check comes first
    for fn in (
        lambda: dk.sample(x, seed=0),
        lambda: dk.sample(x, temperature=0.0),
        lambda: dk.top_k_sampling_from_probs(x, 1, seed=0),
        lambda: dk.sampling_from_logits(x, seed=0),
        lambda: dk.top_k_mask_logits(x, 1),
        lambda: dk.softmax(x),
    ):
        with pytest.raises(ValueError, match=r"V = 2147483712.*2\^31"):
            fn()


# 6. renormalisation of a row with a tiny total mass -----------------------------------------------
def test_renorm_of_tiny_mass_rows(isa):
    probs = torch.tensor([[1e-41, 2e-41, 0.0], [1e-44, 0.0, 3e-44], [0.25, 0.5, 0.25]])
    for op, arg in (("top_k_renorm_probs", 0), ("top_p_renorm_probs", 1.0), ("min_p_renorm_probs", 0.0)):
        out = getattr(dk, op)(probs, arg)
        ref = getattr(R, op)(probs, arg)
        assert torch.isfinite(out).all(), (op, out)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    # the exact answer, from the float32 inputs (1e-41 is a subnormal: its stored value counts)
    p = probs[0].double()
    torch.testing.assert_close(dk.top_k_renorm_probs(probs, 0)[0].double(), p / p.sum(), rtol=1e-6, atol=0)
    tok, valid = dk.sampling_from_probs(probs, seed=0, return_valid=True)
    assert bool(valid.all()) and int(tok[0]) in (0, 1) and int(tok[1]) in (0, 2)


# 7. large offsets and positions ----------------------------------------------------------------
def test_offset_limit():
    x = _logits()
    a = dk.sample(x, seed=5, offset=2**48 - 1)
    assert a.shape == (4,)
    for off in (2**48, 2**63, -1, 1.5):
        with pytest.raises(ValueError, match="offset"):
            dk.sample(x, seed=5, offset=off)
    # different offsets below the limit give different streams (no aliasing of the high bits)
    xs = torch.zeros(1, 1000).expand(1, 1000).contiguous()
    idx = torch.zeros(64, dtype=torch.int64)
    draws = {tuple(dk.sample(xs, indices=idx, seed=7, offset=o).tolist()) for o in (0, 2**32, 2**47, 2**48 - 1)}
    assert len(draws) == 4


def test_build_tree_positions_cannot_overflow():
    parents = torch.tensor([[-1, 0, 0, 1]])
    with pytest.raises(ValueError, match="prefix_lens"):
        dk.build_tree(parents, 2**63 - 1)
    with pytest.raises(ValueError, match="prefix_lens"):
        dk.build_tree(parents, torch.tensor([2**63 - 3]))
    t = dk.build_tree(parents, 2**63 - 1 - 4)
    assert int(t.positions.min()) >= 0 and int(t.positions.max()) == 2**63 - 1 - 4 + 2


# 8-10. the reference ---------------------------------------------------------------------------
def test_reference_top_p_one_keeps_earlier_filters():
    x = _logits(3, 20, seed=4)
    keep = R.survivors(x, top_k=1, top_p=1.0)
    assert torch.equal(keep.sum(-1), torch.ones(3, dtype=torch.int64))
    keep = R.survivors(x, top_k=3, top_p=torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
    assert int(keep[0].sum()) == 3 and int(keep[2].sum()) == 3
    d = R.target_distribution(x, top_k=2, top_p=1.0)
    assert torch.equal((d > 0).sum(-1), torch.full((3,), 2))
    assert torch.equal(dk.top_k_mask_logits(x, 2) > -math.inf, R.survivors(x, top_k=2, top_p=1.0))


@pytest.mark.parametrize("bad", ["nan", "posinf", "allneginf"])
def test_reference_greedy_verify_stops_on_bad_rows(bad):
    V = 8
    logits = torch.randn(2, 3, V)
    row = logits[0, 0]
    if bad == "nan":
        row[3] = math.nan
    elif bad == "posinf":
        row[3] = math.inf
    else:
        row[:] = -math.inf
    drafts = torch.zeros(2, 2, dtype=torch.int64)  # draft token 0 at the bad row
    ref = R.greedy_verify(drafts, logits)
    got = dk.greedy_verify(drafts, logits)
    assert int(ref[2][0]) == 0 and int(ref[0][0, 0]) == 0 and int(ref[0][0, 1]) == -1
    for a, b in zip(got, ref):
        assert torch.equal(a.long(), b.long())
    # the tree form: child token 0 of the root, whose target row is bad
    cand = torch.tensor([[5, 0, 1]])
    t = dk.build_tree(torch.tensor([[-1, 0, 0]]), 0)
    tl = torch.randn(1, 3, V)
    tl[0, 0] = row
    ref = R.verify_tree_greedy(cand, t.retrive_index, t.retrive_next_token, t.retrive_next_sibling, tl)
    got = dk.verify_tree_greedy(cand, t.retrive_index, t.retrive_next_token, t.retrive_next_sibling, tl)
    assert int(ref[2][0]) == 0
    for a, b in zip(got, ref):
        assert torch.equal(a.long(), b.long())


def test_reference_tree_sampling_all_zero_target_rows():
    V = 6
    cand = torch.tensor([[0, 2, 3]])
    t = dk.build_tree(torch.tensor([[-1, 0, 0]]), 0)
    target = torch.zeros(1, 3, V)
    draft = torch.full((1, 3, V), 1.0 / V)
    args = (cand, t.retrive_index, t.retrive_next_token, t.retrive_next_sibling, target, draft)
    ref = R.tree_speculative_sampling(*args, seed=3)
    got = dk.tree_speculative_sampling(*args, seed=3)
    for a, b in zip(got, ref):
        assert torch.equal(a.long(), b.long())


# 11. torch.compile(fullgraph=True) with the default seed -----------------------------------------
def _compiled_equals_eager(fn, *args):
    torch._dynamo.reset()
    c = torch.compile(fn, fullgraph=True)
    torch.manual_seed(123)
    eager = fn(*args)
    torch.manual_seed(123)
    comp = c(*args)
    torch.manual_seed(123)
    comp2 = c(*args)
    for a, b, b2 in zip(eager, comp, comp2):
        assert torch.equal(a, b) and torch.equal(b, b2)
    return eager


def test_compile_default_seed_samplers():
    x = _logits(5, 300, seed=9)
    p = torch.softmax(x, -1)
    fns = [
        lambda: (dk.sample(x, temperature=0.8, top_k=40, top_p=0.9),),
        lambda: (dk.sampling_from_probs(p),),
        lambda: (dk.sampling_from_logits(x),),
        lambda: (dk.top_k_sampling_from_probs(p, 10),),
        lambda: (dk.top_p_sampling_from_probs(p, 0.7),),
        lambda: (dk.min_p_sampling_from_probs(p, 0.1),),
        lambda: (dk.top_k_top_p_sampling_from_probs(p, 10, 0.8),),
        lambda: (dk.top_k_top_p_sampling_from_logits(x, 10, 0.8),),
        lambda: (dk.sample(x, indices=torch.tensor([0, 0, 3])),),  # n_out != B: scalar-seed streams
        lambda: (dk.sample(x[:1]),),  # n_out == 1
    ]
    for fn in fns:
        _compiled_equals_eager(fn)


def test_compile_default_seed_verifiers():
    B, N, V = 3, 3, 64
    g = torch.Generator().manual_seed(0)
    tp = torch.softmax(torch.randn(B, N + 1, V, generator=g), -1)
    dp = torch.softmax(torch.randn(B, N, V, generator=g), -1)
    ids = torch.randint(0, V, (B, N), generator=g)
    tl = torch.randn(B, N + 1, V, generator=g)
    t = dk.build_tree(torch.tensor([[-1, 0, 0, 1]] * B), 5)
    cand = torch.randint(0, V, (B, 4), generator=g)
    cand[:, 2] = (cand[:, 1] + 1) % V
    ttp = torch.softmax(torch.randn(B, 4, V, generator=g), -1)
    ttl = torch.randn(B, 4, V, generator=g)
    tree = (cand, t.retrive_index, t.retrive_next_token, t.retrive_next_sibling)
    fns = [
        lambda: dk.chain_speculative_sampling(dp, ids, tp),
        lambda: dk.chain_speculative_sampling(None, ids, tp),
        lambda: dk.chain_speculative_sampling_from_logits(dp, ids, tl, temperature=0.7, top_k=20),
        lambda: dk.tree_speculative_sampling(*tree, ttp),
        lambda: dk.tree_speculative_sampling_from_logits(*tree, ttl, temperature=0.9),
        lambda: dk.greedy_verify(ids, tl),
        lambda: dk.verify_tree_greedy(*tree, ttl),
    ]
    for fn in fns:
        _compiled_equals_eager(fn)


def test_compile_two_default_seed_calls_draw_two_seeds():
    x = torch.zeros(1, 100000)

    def f():
        return dk.sample(x), dk.sample(x)

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = f()
    torch.manual_seed(0)
    comp = torch.compile(f, fullgraph=True)()
    assert torch.equal(eager[0], comp[0]) and torch.equal(eager[1], comp[1])
    assert not torch.equal(comp[0], comp[1])  # two independent seeds (flat row of 10^5 tokens)


def test_compile_with_generator_is_a_clear_error():
    x = _logits()
    g = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="generator= cannot be used inside torch.compile"):
        torch.compile(lambda: dk.sample(x, generator=g), fullgraph=True)()


# 12. schema-cast errors become clear messages or valid calls -------------------------------------
def test_huge_ints_and_lists():
    x = _logits()
    assert torch.equal(dk.sample(x, top_k=2**70, seed=1), dk.sample(x, seed=1))  # k >= V disables
    assert torch.equal(dk.sample(x, top_k=-(2**70), seed=1), dk.sample(x, seed=1))  # k <= 0 disables
    assert torch.equal(
        dk.top_k_mask_logits(x, torch.tensor([1e30, 2.0, -1e30, 3.0])),
        R.top_k_mask_logits(x, torch.tensor([0, 2, 0, 3])),
    )
    with pytest.raises(ValueError, match="offset"):
        dk.sample(x, seed=1, offset=2**63)
    with pytest.raises(ValueError, match="seed"):
        dk.sample(x, seed=2**64)
    assert torch.equal(dk.sample(x, indices=[0, 1], seed=1), dk.sample(x, indices=torch.tensor([0, 1]), seed=1))
    with pytest.raises(ValueError, match="indices"):
        dk.sample(x, indices=[0, "a"], seed=1)
    ids = torch.zeros(2, 2, dtype=torch.int64)
    tp = torch.softmax(torch.randn(2, 3, 10), -1)
    a = dk.chain_speculative_sampling(None, ids, tp, seed=1, num_draft_tokens=[1, 2])
    b = dk.chain_speculative_sampling(None, ids, tp, seed=1, num_draft_tokens=torch.tensor([1, 2]))
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# 13. numpy scalars ---------------------------------------------------------------------------
def test_numpy_scalars_are_accepted():
    x = _logits()
    ref = dk.sample(x, seed=5, top_k=5, top_p=0.9, temperature=0.7, min_p=0.01, offset=3)
    got = dk.sample(
        x,
        seed=np.int64(5),
        top_k=np.int64(5),
        top_p=np.float32(0.9),
        temperature=np.float64(0.7),
        min_p=np.float32(0.01),
        offset=np.int32(3),
    )
    # float32(0.9) is the same float32 the kernel reads for 0.9
    assert torch.equal(ref, got)
    assert torch.equal(dk.top_k_mask_logits(x, np.int32(3)), dk.top_k_mask_logits(x, 3))
    with pytest.raises(TypeError, match="top_k"):
        dk.top_k_mask_logits(x, np.bool_(True))


def test_one_seed_tensor_is_the_scalar_form():
    x = _logits(6, 100, seed=1)
    a = dk.sample(x, seed=torch.tensor([77]))
    b = dk.sample(x, seed=77)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        dk.sample(x, seed=torch.tensor([1, 2]))


def test_tiny_mass_sampling_is_exact():
    """Sampling from a row of subnormal probabilities follows their ratios (10^6 draws)."""
    probs = torch.tensor([[1e-41, 2e-41, 0.0, 4e-41]])
    target = probs[0].double() / probs[0].double().sum()
    draws = dk.sampling_from_probs(probs, indices=torch.zeros(1_000_000, dtype=torch.int64), seed=11)
    ok, pv, msg = chisquare_ok(draws, target)
    assert ok, msg


def test_min_p_threshold_is_exact_on_probability_rows(isa):
    """Found by the long hypothesis run: keep p_i iff p_i >= min_p * max p exactly. A float32
    rounding of min_p * max (here in the subnormal range: 13.15 units rounds to 13) kept token 1."""
    p = torch.tensor([[3.0829e-44, 1.8217e-44, 1.3593e-43, 3.6854e-43, 2.2421e-43, 2.2421e-43]])
    out = dk.min_p_renorm_probs(p, 0.05)
    assert float(out[0, 1]) == 0.0 and bool((out[0, [0, 2, 3, 4, 5]] > 0).all())
    assert torch.equal(out > 0, R.min_p_renorm_probs(p, 0.05) > 0)
    draws = dk.min_p_sampling_from_probs(p, 0.05, indices=torch.zeros(20000, dtype=torch.int64), seed=1)
    assert not bool((draws == 1).any())
