"""Property-based tests (hypothesis): every op family against reference.py on random shapes,
dtypes, ties, -inf entries, bad rows, per-row parameters and extreme values.

CI runs a fixed, derandomised budget (profile "ci"). A longer search:
    DECODEKIT_HYPOTHESIS_EXAMPLES=5000 python -m pytest tests/test_properties.py -q
(the variable sets max_examples per test and switches to random seeds; see the README)."""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import decodekit as dk
from decodekit import reference as R
from conftest import ISAS

_N = int(os.environ.get("DECODEKIT_HYPOTHESIS_EXAMPLES", "0"))
settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long",
    max_examples=max(_N, 1),
    derandomize=False,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
PROFILE = settings.get_profile("long" if _N else "ci")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F32_MAX = 3.4028234663852886e38


def f32(v: float) -> float:
    """The float32 value the kernels read for a Python float parameter (the reference gets it too);
    a positive value below float32's range stays as given (the ops' rule: it keeps only the argmax)."""
    return v if 0 < v < 1e-38 else float(np.float32(v))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality, NaN equal to NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


@st.composite
def logits_rows(draw, min_b=0, max_b=5, max_v=300, dtypes=DTYPES, bad=True):
    """[B, V] logits: each row gaussian with a random scale, optionally quantised (ties), with
    -inf holes, extreme values, or a bad row (all -inf / NaN / +inf)."""
    B = draw(st.integers(min_b, max_b))
    V = draw(st.integers(1, max_v))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rows = []
    for _ in range(B):
        scale = draw(st.sampled_from([0.01, 1.0, 3.0, 10.0, 100.0]))
        r = torch.randn(V, generator=g, dtype=torch.float64) * scale
        style = draw(
            st.sampled_from(
                ["plain", "ties", "holes", "extreme", "bad"] if bad else ["plain", "ties", "holes", "extreme"]
            )
        )
        if style == "ties":
            r = torch.round(r / scale * 2) / 2
        elif style == "holes":
            r[torch.rand(V, generator=g) < draw(st.sampled_from([0.1, 0.5, 0.95]))] = -math.inf
        elif style == "extreme":
            big = draw(st.sampled_from([1e4, 6e4, 1e30, F32_MAX]))
            r[torch.rand(V, generator=g) < 0.2] = -big
            r[int(torch.randint(0, V, (1,), generator=g))] = big if dtype == torch.float32 else 6e4
        elif style == "bad":
            kind = draw(st.sampled_from(["allneginf", "nan", "posinf"]))
            if kind == "allneginf":
                r[:] = -math.inf
            else:
                r[int(torch.randint(0, V, (1,), generator=g))] = math.nan if kind == "nan" else math.inf
        rows.append(r)
    x = torch.stack(rows) if rows else torch.empty(0, V, dtype=torch.float64)
    return x.to(dtype)


def per_row(draw, B, values):
    """A parameter as a scalar or as a per-row tensor."""
    if B > 0 and draw(st.booleans()):
        return torch.tensor([draw(values) for _ in range(B)], dtype=torch.float64)
    return draw(values)


K = st.sampled_from([-1, 0, 1, 2, 3, 7, 50, 1000])
P = st.sampled_from([1e-50, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0, 2.0]).map(f32)
MINP = st.sampled_from([0.0, 1e-6, 0.05, 0.3, 0.9, 1.0]).map(f32)
TEMP = st.sampled_from([0.0, 0.1, 0.7, 1.0, 3.0]).map(f32)


def _f32_rows(v):
    """A per-row tensor as the float32 values the kernels read (tiny positive values kept as given)."""
    if not isinstance(v, torch.Tensor):
        return v
    return torch.where((v > 0) & (v < 1e-38), v, v.float().double())


def _k_rows(v):
    return v.long() if isinstance(v, torch.Tensor) else v


@pytest.fixture(params=ISAS)
def any_isa(request):
    dk.set_isa(request.param)
    yield request.param
    dk.set_isa("auto")


# ---- masks and renorms: exact equality with the reference ------------------------------------
@PROFILE
@given(data=st.data())
def test_masks_equal_reference(any_isa, data):
    x = data.draw(logits_rows())
    B = x.shape[0]
    which = data.draw(st.sampled_from(["top_k", "top_p", "min_p"]))
    if which == "top_k":
        k = per_row(data.draw, B, K)
        k = k.long() if isinstance(k, torch.Tensor) else k
        assert same(dk.top_k_mask_logits(x, k), R.top_k_mask_logits(x, k))
    elif which == "top_p":
        p = _f32_rows(per_row(data.draw, B, P))
        got, ref = dk.top_p_mask_logits(x, p), R.top_p_mask_logits(x, p)
        assert same(got, ref), (x, p)
    else:
        mp = _f32_rows(per_row(data.draw, B, MINP))
        assert same(dk.min_p_mask_logits(x, mp), R.min_p_mask_logits(x, mp))


@st.composite
def probs_rows(draw, max_b=5, max_v=300):
    x = draw(logits_rows(max_b=max_b, max_v=max_v, dtypes=[torch.float32], bad=False))
    style = draw(st.sampled_from(["softmax", "tiny", "unnormalised", "bad"]))
    p = torch.softmax(x.double(), -1).nan_to_num(0.0)
    if style == "tiny":
        p = p * draw(st.sampled_from([1e-30, 1e-38, 1e-42]))
    elif style == "unnormalised":
        p = p * draw(st.sampled_from([0.5, 3.0]))
    p = p.float()
    if style == "bad" and p.shape[0] > 0:
        p[0] = draw(st.sampled_from([0.0, -0.1, math.nan, math.inf]))
    return p


@PROFILE
@given(data=st.data())
def test_renorms_equal_reference(any_isa, data):
    probs = data.draw(probs_rows())
    B = probs.shape[0]
    which = data.draw(st.sampled_from(["top_k", "top_p", "min_p"]))
    arg = {
        "top_k": lambda: _k_rows(per_row(data.draw, B, K)),
        "top_p": lambda: _f32_rows(per_row(data.draw, B, P)),
        "min_p": lambda: _f32_rows(per_row(data.draw, B, MINP)),
    }[which]()
    got = getattr(dk, f"{which}_renorm_probs")(probs, arg)
    ref = getattr(R, f"{which}_renorm_probs")(probs, arg)
    assert torch.equal(got > 0, ref > 0), "kept sets differ"
    torch.testing.assert_close(got, ref, rtol=3e-7, atol=0)


@PROFILE
@given(data=st.data())
def test_softmax_matches_reference(data):
    x = data.draw(logits_rows())
    T = _f32_rows(per_row(data.draw, x.shape[0], TEMP.filter(lambda t: t > 0)))
    got, ref = dk.softmax(x, T), R.softmax(x, T)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    # float32 weights exp((x - max) * (1/T)): the argument is rounded in float32, so the relative
    # error grows with |argument| (about 1.2e-7 per unit), plus a few ulp of exp and of the sum;
    # weights below e^-87 are 0 (README "Exactness"), so outputs under ~1.7e-38 may be 0
    Tt = R._rows(T, x.shape[0], torch.float64)[:, None]
    z = x.double() / Tt
    arg = (z - z.max(-1, keepdim=True).values).abs().nan_to_num(0.0, posinf=0.0)
    tol = (6e-7 + 2.4e-7 * arg) * ref.double().abs() + 1.7e-38
    ok = ((got.double() - ref.double()).abs() <= tol) | (got.isnan() & ref.isnan())
    assert bool(ok.all()), (x, T, got, ref)


# ---- samplers: the token is a survivor, bad rows are flagged, greedy is the argmax ------------
@PROFILE
@given(data=st.data())
def test_sample_draws_a_survivor(any_isa, data):
    x = data.draw(logits_rows())
    B = x.shape[0]
    T = _f32_rows(per_row(data.draw, B, TEMP))
    k = _k_rows(per_row(data.draw, B, K))
    p = _f32_rows(per_row(data.draw, B, P))
    mp = _f32_rows(per_row(data.draw, B, MINP))
    order = data.draw(st.sampled_from(["sequential", "joint"]))
    seed = data.draw(st.integers(-(2**63), 2**64 - 1))
    tok, valid = dk.sample(x, temperature=T, top_k=k, top_p=p, min_p=mp, order=order, seed=seed, return_valid=True)
    bad = R.bad_rows(x, False)
    assert torch.equal(valid, ~bad)
    Tr = R._rows(T, B, torch.float64)
    for b in range(B):
        if bad[b]:
            assert int(tok[b]) == 0
            continue
        if Tr[b] == 0:
            assert int(tok[b]) == int(torch.argmax(x[b].double()))
            continue
        row = lambda v: v[b : b + 1] if isinstance(v, torch.Tensor) else v  # noqa: E731
        keep = R.survivors(
            x[b : b + 1], temperature=float(Tr[b]), top_k=row(k), top_p=row(p), min_p=row(mp), order=order
        )[0]
        assert bool(keep[int(tok[b])]), (b, int(tok[b]))


@PROFILE
@given(data=st.data())
def test_probs_samplers_draw_a_survivor(any_isa, data):
    probs = data.draw(probs_rows())
    B = probs.shape[0]
    k = _k_rows(per_row(data.draw, B, K))
    p = _f32_rows(per_row(data.draw, B, P))
    seed = data.draw(st.integers(0, 2**63 - 1))
    tok, valid = dk.top_k_top_p_sampling_from_probs(probs, k, p, seed=seed, return_valid=True)
    bad = R.bad_rows(probs, True)
    assert torch.equal(valid, ~bad)
    keep = R.survivors(probs, is_probs=True, top_k=k, top_p=p)
    for b in range(B):
        assert int(tok[b]) == 0 if bad[b] else bool(keep[b, int(tok[b])])


@PROFILE
@given(data=st.data())
def test_gumbel_draws_a_finite_token(any_isa, data):
    x = data.draw(logits_rows())
    tok, valid = dk.sampling_from_logits(x, seed=data.draw(st.integers(0, 2**40)), return_valid=True)
    bad = R.bad_rows(x, False)
    assert torch.equal(valid, ~bad)
    for b in range(x.shape[0]):
        assert int(tok[b]) == 0 if bad[b] else bool(x[b, int(tok[b])] > -math.inf)


# ---- speculative verification: exact equality with the reference ------------------------------
@st.composite
def chain_case(draw):
    B = draw(st.integers(0, 4))
    N = draw(st.integers(1, 4))
    V = draw(st.integers(2, 64))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sharp = draw(st.sampled_from([0.3, 1.0, 4.0]))
    target = torch.softmax(torch.randn(B, N + 1, V, generator=g) * sharp, -1)
    draft = torch.softmax(torch.randn(B, N, V, generator=g) * sharp, -1) if draw(st.booleans()) else None
    if draft is not None and draw(st.booleans()):
        draft = 0.5 * draft + 0.5 * target[:, :N]  # a drafter close to the target: long accepted prefixes
    ids = torch.randint(0, V, (B, N), generator=g)
    if draw(st.booleans()) and B > 0:
        ids = target[:, :N].argmax(-1)  # drafts the target likes
    ragged = torch.randint(0, N + 1, (B,), generator=g) if draw(st.booleans()) else None
    return target, draft, ids, ragged


@PROFILE
@given(case=chain_case(), seed=st.integers(0, 2**63 - 1), offset=st.integers(0, 2**48 - 1))
def test_chain_equals_reference(any_isa, case, seed, offset):
    target, draft, ids, ragged = case
    got = dk.chain_speculative_sampling(draft, ids, target, seed=seed, offset=offset, num_draft_tokens=ragged)
    ref = R.chain_speculative_sampling(draft, ids, target, seed=seed, offset=offset, num_draft_tokens=ragged)
    for a, b in zip(got, ref):
        assert torch.equal(a.long(), b.long())


@PROFILE
@given(data=st.data())
def test_chain_from_logits_and_greedy_equal_reference(any_isa, data):
    B, N = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 3))
    x = data.draw(logits_rows(min_b=B * (N + 1), max_b=B * (N + 1), max_v=80, dtypes=[torch.float32]))
    V = x.shape[1]
    logits = x.reshape(B, N + 1, V)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    ids = torch.randint(0, V, (B, N), generator=g)
    if B > 0 and data.draw(st.booleans()):
        ids = logits[:, :N].nan_to_num(0.0).argmax(-1)
    got = dk.greedy_verify(ids, logits)
    ref = R.greedy_verify(ids, logits)
    for a, b in zip(got, ref):
        assert torch.equal(a.long(), b.long())
    assume(not bool(R.bad_rows(x, False).any()))  # sampled verification of bad rows: token 0, tested above
    T = _f32_rows(per_row(data.draw, B, TEMP))
    k = _k_rows(per_row(data.draw, B, K))
    p = _f32_rows(per_row(data.draw, B, P))
    seed = data.draw(st.integers(0, 2**63 - 1))
    got = dk.chain_speculative_sampling_from_logits(None, ids, logits, temperature=T, top_k=k, top_p=p, seed=seed)
    ref = R.chain_speculative_sampling_from_logits(None, ids, logits, temperature=T, top_k=k, top_p=p, seed=seed)
    for a, b in zip(got, ref):
        assert torch.equal(a.long(), b.long())


@st.composite
def tree_case(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 12))
    V = draw(st.integers(T + 1, 64))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    parents = torch.full((B, T), -1, dtype=torch.int64)
    cand = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        for t in range(1, T):
            parents[b, t] = int(torch.randint(0, t, (1,), generator=g))
        perm = torch.randperm(V, generator=g)[:T]  # distinct tokens: distinct siblings
        cand[b] = perm
    plen = draw(st.integers(0, 2**40))
    return parents, cand, V, g, plen


@PROFILE
@given(case=tree_case(), data=st.data())
def test_tree_ops_equal_reference(any_isa, case, data):
    parents, cand, V, g, plen = case
    B, T = parents.shape
    got_tree = dk.build_tree(parents, plen)
    ref_tree = R.build_tree(parents, plen)
    for a, b in zip(got_tree, ref_tree):
        assert torch.equal(a, b)
    args = (cand, got_tree.retrive_index, got_tree.retrive_next_token, got_tree.retrive_next_sibling)
    sharp = data.draw(st.sampled_from([0.5, 2.0, 6.0]))
    target = torch.softmax(torch.randn(B, T, V, generator=g) * sharp, -1)
    if data.draw(st.booleans()):
        target[0, 0] = 0.0  # an all-zero target row
    draft = torch.softmax(torch.randn(B, T, V, generator=g) * sharp, -1) if data.draw(st.booleans()) else None
    seed = data.draw(st.integers(0, 2**63 - 1))
    W = data.draw(st.sampled_from([None, 1, 2, T]))
    got = dk.tree_speculative_sampling(*args, target, draft, seed=seed, num_speculative_tokens=W)
    ref = R.tree_speculative_sampling(*args, target, draft, seed=seed, num_speculative_tokens=W)
    for a, b in zip(got, ref):
        assert torch.equal(a.long(), b.long())
    logits = torch.randn(B, T, V, generator=g) * sharp
    if data.draw(st.booleans()):
        logits[0, 0, 1:] = -math.inf  # a certain choice
        logits[0, 0, 0] = data.draw(st.sampled_from([0.0, math.nan, -math.inf]))
    got = dk.verify_tree_greedy(*args, logits, num_speculative_tokens=W)
    ref = R.verify_tree_greedy(*args, logits, num_speculative_tokens=W)
    for a, b in zip(got, ref):
        assert torch.equal(a.long(), b.long())


# ---- tree attention: close to the float64 reference --------------------------------------------
@PROFILE
@given(data=st.data())
def test_tree_attention_matches_reference(any_isa, data):
    B = data.draw(st.integers(0, 2))
    T = data.draw(st.integers(1, 20))
    Hkv = data.draw(st.sampled_from([1, 2]))
    Hq = Hkv * data.draw(st.sampled_from([1, 2, 4]))
    D = data.draw(st.sampled_from([64, 80, 128]))
    dtype = data.draw(st.sampled_from(DTYPES))
    layout = data.draw(st.sampled_from(["NHD", "HND"]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    plens = [data.draw(st.integers(0, 70)) for _ in range(B)]
    S = max(plens, default=0) + T + data.draw(st.integers(0, 3))
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype)
    shape = (B, S, Hkv, D) if layout == "NHD" else (B, Hkv, S, D)
    k = (torch.randn(shape, generator=g) * data.draw(st.sampled_from([0.1, 1.0, 4.0]))).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(B, T, T, generator=g) < data.draw(st.sampled_from([0.0, 0.3, 1.0]))
    if data.draw(st.booleans()):
        mask = dk.pack_tree_mask(mask) if B > 0 else mask  # the packed form
    out, lse = dk.tree_attention(
        q, k, v, mask, torch.tensor(plens, dtype=torch.int64), kv_layout=layout, return_lse=True
    )
    ro, rl = R.tree_attention(q, k, v, mask, torch.tensor(plens, dtype=torch.int64), kv_layout=layout)
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out.float(), ro.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse, rl, rtol=1e-4, atol=1e-3)
