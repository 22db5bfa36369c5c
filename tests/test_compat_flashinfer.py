"""decodekit.compat.flashinfer against the cases of FlashInfer's own sampling tests.

Every test below takes one test of FlashInfer's tests/utils/test_sampling.py (named in its
docstring): the same parameter grid (batch sizes, vocabulary sizes, distributions, thresholds,
dtypes) and the same claims, checked on the CPU through ``decodekit.compat.flashinfer``, which is
imported the way an engine imports ``flashinfer.sampling``. Two adaptations: the device (CPU) and
the size of the repeated-call loops (FlashInfer calls a sampler 1000-5000 times on a GPU; here the
draws come from fewer calls, see TRIALS). Where FlashInfer checks sampling frequencies by cosine
similarity (> 0.99), these tests use decodekit's stronger test instead: 10^6 draws, a chi-square
test at alpha = 1e-4 and zero draws outside the support. The one documented difference allowed is
the tie rule (ties at the top-k / top-p cut are kept or dropped together), which no case here hits.

The grid is FlashInfer's full grid (1911 items) plus one test of the signatures. The default run
takes the subset that fits CI (batch 1 up to V = 32000, batch <= 99 at V = 111, the frequency
tests at V = 111, 10 calls per loop); DECODEKIT_COMPAT_FULL=1 runs every item with 1000 calls per
loop (hours on 2 CPU cores).
"""

import os

import pytest
import torch

import decodekit.compat.flashinfer as sampling
from stats import N_DRAWS, assert_matches

FULL = os.environ.get("DECODEKIT_COMPAT_FULL") == "1"
DEV = "cpu"
# FlashInfer: 1000 calls of the sampler per case; DECODEKIT_COMPAT_TRIALS overrides
TRIALS = int(os.environ.get("DECODEKIT_COMPAT_TRIALS", 1000 if FULL else 10))


def _ci(*, B=1, V=111):
    """Skip an item outside the CI subset unless DECODEKIT_COMPAT_FULL=1. The subset: batch 1 with
    V <= 32000, and batch <= 99 with V = 111."""
    if not FULL and (B > 99 or V > 32000 or (B > 1 and V > 111)):
        pytest.skip("outside the CI subset (DECODEKIT_COMPAT_FULL=1 runs the full FlashInfer grid)")


def normal_distribution(std):
    def f(shape, device):
        return torch.randn(shape, device=device) * std

    f.__name__ = f"normal(std={std})"
    return f


def gumbel_distribution(beta):
    def f(shape, device):
        u = torch.rand(shape, device=device)
        return torch.log(-torch.log(u + 1e-20) + 1e-20) / beta

    f.__name__ = f"gumbel(beta={beta})"
    return f


DISTS = [normal_distribution(1), normal_distribution(5), gumbel_distribution(0.1)]
DIST_IDS = [d.__name__ for d in DISTS]
BATCH = [1, 99, 989]
VOCAB = [111, 32000, 128256]


def _probs(B, V):
    x = torch.rand(B, V, device=DEV)
    return x / x.sum(-1, keepdim=True)


def _rand_probs_case(B, V, k=0):
    """The common start of FlashInfer's support tests: skip k > V, torch.manual_seed(42), and
    normalised torch.rand probabilities [B, V]."""
    if k > V:
        pytest.skip("k should be less than vocab_size")
    _ci(B=B, V=V)
    torch.manual_seed(42)
    return _probs(B, V)


def _top_p_mask(probs, p, eps=0.0, strict=True):
    """FlashInfer's mask: ascending sort, a token is kept when the cdf up to it is > 1 - p (- eps)."""
    srt, idx = torch.sort(probs, descending=False)
    cdf = torch.cumsum(srt, -1)
    keep = (cdf > (1 - p) - eps) if strict else (cdf >= (1 - p))
    mask = torch.zeros_like(probs, dtype=torch.int32)
    mask.scatter_add_(1, idx, keep.int())
    return mask


def _one_row_draws(fn, probs_row, *args, **kw):
    """N_DRAWS draws from one row (indices repeat row 0), as FlashInfer's frequency tests do."""
    idx = torch.zeros(N_DRAWS, dtype=torch.int32, device=DEV)
    return fn(probs_row, *args, indices=idx, **kw)


# ---- softmax ------------------------------------------------------------------------------------
@pytest.mark.parametrize("neg_inf_input", [True, False])
@pytest.mark.parametrize("temperature_arr", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("distribution", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_softmax(batch_size, vocab_size, distribution, temperature, temperature_arr, neg_inf_input):
    """FlashInfer test_softmax: softmax(logits / T) equals torch's within 1e-5, with a scalar or
    per-row temperature and with a random share of -inf logits."""
    _ci(B=batch_size, V=vocab_size)
    torch.manual_seed(42)
    logits = distribution((batch_size, vocab_size), DEV)
    if neg_inf_input:
        n = torch.randint(0, logits.numel() - 1, ()).item()
        logits.view(-1).index_fill_(0, torch.randperm(logits.numel())[:n], float("-inf"))
    if temperature_arr:
        t = torch.full((batch_size,), temperature, device=DEV)
        probs, expect = sampling.softmax(logits, temperature=t), torch.softmax(logits / t[:, None], -1)
    else:
        probs, expect = sampling.softmax(logits, temperature=temperature), torch.softmax(logits / temperature, -1)
    assert probs.dtype == torch.float32
    assert torch.allclose(probs, expect, atol=1e-5, equal_nan=True)


# ---- sampling frequencies ------------------------------------------------------------------------
@pytest.mark.parametrize("zero_ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("distribution", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("vocab_size", VOCAB)
def test_sampling_freq(vocab_size, distribution, zero_ratio):
    """FlashInfer test_sampling_freq: sampling_from_probs follows softmax(logits) with a share of
    tokens at probability 0 (never drawn)."""
    _ci(V=vocab_size if vocab_size == 111 else 10**9)
    torch.manual_seed(42)
    logits = distribution((1, vocab_size), DEV)
    zero = torch.randperm(vocab_size)[: int(vocab_size * zero_ratio)]
    logits[:, zero] = float("-inf")
    probs = torch.softmax(logits, -1)
    s = _one_row_draws(sampling.sampling_from_probs, probs)
    assert s.dtype == torch.int32
    assert_matches(s, probs[0], what="sampling_from_probs")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("distribution", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("vocab_size", VOCAB)
def test_top_p_sampling_freq(vocab_size, distribution, p):
    """FlashInfer test_top_p_sampling_freq: every draw lies in the top-p nucleus and the draws
    follow top_p_renorm_probs."""
    _ci(V=vocab_size if vocab_size == 111 else 10**9)
    torch.manual_seed(42)
    probs = torch.softmax(distribution((1, vocab_size), DEV), -1)
    mask = _top_p_mask(probs, p)
    renorm = sampling.top_p_renorm_probs(probs, p)
    s = _one_row_draws(sampling.top_p_sampling_from_probs, probs, p)
    assert bool((mask[0, s.long()] == 1).all())
    assert_matches(s, renorm[0], what="top_p_sampling_from_probs")


@pytest.mark.parametrize("k", [10, 100, 500])
@pytest.mark.parametrize("distribution", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("vocab_size", VOCAB)
def test_top_k_sampling_freq(vocab_size, distribution, k):
    """FlashInfer test_top_k_sampling_freq: draws lie in the top-k and follow top_k_renorm_probs."""
    if k > vocab_size:
        pytest.skip("k should be less than vocab_size")
    _ci(V=vocab_size if vocab_size == 111 else 10**9)
    torch.manual_seed(42)
    probs = torch.softmax(distribution((1, vocab_size), DEV), -1)
    pivot = torch.sort(probs, descending=True)[0][:, k - 1]
    mask = (probs >= pivot[:, None]).int()
    renorm = sampling.top_k_renorm_probs(probs, k)
    s = _one_row_draws(sampling.top_k_sampling_from_probs, probs, k)
    assert bool((mask[0, s.long()] == 1).all())
    assert_matches(s, renorm[0], what="top_k_sampling_from_probs")


@pytest.mark.parametrize("distribution", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("vocab_size", VOCAB)
def test_sampling_from_logits_freq(vocab_size, distribution):
    """FlashInfer test_sampling_from_logits_freq: Gumbel-max draws follow softmax(logits)."""
    _ci(V=vocab_size if vocab_size == 111 else 10**9)
    torch.manual_seed(42)
    logits = distribution((1, vocab_size), DEV)
    s = _one_row_draws(sampling.sampling_from_logits, logits)
    assert_matches(s, torch.softmax(logits, -1)[0], what="sampling_from_logits")


# ---- supports: every draw in range / in the filter's set -------------------------------------------
def _draws_in(call, vocab_size, mask=None):
    """TRIALS calls; every id in [0, V) and, with a mask [B, V], where the mask is 1."""
    for _ in range(TRIALS):
        s = call()
        assert bool(((s >= 0) & (s < vocab_size)).all())
        if mask is not None:
            assert bool((mask[torch.arange(mask.shape[0]), s.long()] == 1).all())


@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_sampling(batch_size, vocab_size):
    """FlashInfer test_sampling: sampling_from_probs returns ids in [0, V)."""
    probs = _rand_probs_case(batch_size, vocab_size)
    assert sampling.sampling_from_probs(probs).shape == (batch_size,)
    _draws_in(lambda: sampling.sampling_from_probs(probs), vocab_size)


@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_sampling_from_logits(batch_size, vocab_size):
    """FlashInfer test_sampling_from_logits: ids in [0, V)."""
    _ci(B=batch_size, V=vocab_size)
    torch.manual_seed(42)
    logits = torch.randn(batch_size, vocab_size, device=DEV)
    _draws_in(lambda: sampling.sampling_from_logits(logits), vocab_size)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_top_p_sampling(batch_size, vocab_size, p):
    """FlashInfer test_top_p_sampling: every draw lies in the nucleus (cdf > 1 - p - 1e-4)."""
    probs = _rand_probs_case(batch_size, vocab_size)
    _draws_in(lambda: sampling.top_p_sampling_from_probs(probs, p), vocab_size, _top_p_mask(probs, p, eps=1e-4))


@pytest.mark.parametrize("k", [10, 100, 500])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_top_k_sampling(batch_size, vocab_size, k):
    """FlashInfer test_top_k_sampling: every draw is >= the k-th largest probability."""
    probs = _rand_probs_case(batch_size, vocab_size, k)
    pivot = torch.sort(probs, descending=True)[0][:, k - 1]
    _draws_in(lambda: sampling.top_k_sampling_from_probs(probs, k), vocab_size, (probs >= pivot[:, None]).int())


@pytest.mark.parametrize("k", [10, 100, 500])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_top_k_sampling_with_variable_k(batch_size, vocab_size, k):
    """FlashInfer test_top_k_sampling_with_variable_k: a per-row top_k tensor (1..k)."""
    probs = _rand_probs_case(batch_size, vocab_size, k)
    ks = torch.randint(1, k + 1, (batch_size,), device=DEV)
    rows = torch.arange(batch_size)
    pivot = torch.sort(probs, descending=True)[0][rows, ks - 1]
    _draws_in(lambda: sampling.top_k_sampling_from_probs(probs, ks), vocab_size, (probs >= pivot[:, None]).int())


@pytest.mark.parametrize("p", [0.05, 0.1, 0.2, 0.7, 1])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_min_p_sampling(batch_size, vocab_size, p):
    """FlashInfer test_min_p_sampling: every draw has probability >= min_p * max probability."""
    probs = _rand_probs_case(batch_size, vocab_size)
    mask = (probs >= p * probs.max(-1, keepdim=True).values).int()
    min_p = torch.full((batch_size,), p, device=DEV)
    _draws_in(lambda: sampling.min_p_sampling_from_probs(probs, min_p), vocab_size, mask)


def _joint_k(vocab_size, p):
    return int(vocab_size * 0.5) if p == 0.1 else int(vocab_size * 0.1)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_top_k_top_p_joint_sampling_from_probs(batch_size, vocab_size, p):
    """FlashInfer test_top_k_top_p_joint_sampling_from_probs: filter_apply_order="joint" draws lie
    in the intersection of the top-k set and the top-p nucleus (per-row tensors)."""
    _ci(B=batch_size, V=vocab_size)
    torch.manual_seed(42)
    k = _joint_k(vocab_size, p)
    probs = _probs(batch_size, vocab_size)
    pivot = torch.sort(probs, descending=True)[0][:, k - 1]
    mask = torch.minimum(_top_p_mask(probs, p, eps=1e-4), (probs >= pivot[:, None]).int())
    tp = torch.full((batch_size,), p, device=DEV)
    tk = torch.full((batch_size,), k, device=DEV)
    _draws_in(
        lambda: sampling.top_k_top_p_sampling_from_probs(probs, tk, tp, filter_apply_order="joint"), vocab_size, mask
    )


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("k", [100])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_top_k_top_p_sampling_from_probs_logits_alignment(batch_size, vocab_size, k, p):
    """FlashInfer test_top_k_top_p_sampling_from_probs_logits_alignment: from logits and from
    softmax(logits) with the same generator state ("top_k_first"), >= 95% of the tokens agree."""
    _ci(B=batch_size, V=vocab_size)
    torch.manual_seed(42)
    logits = torch.randn(batch_size, vocab_size, device=DEV) * 5
    g1 = torch.Generator(DEV)
    g2 = g1.clone_state()
    a = sampling.top_k_top_p_sampling_from_logits(logits, k, p, filter_apply_order="top_k_first", generator=g1)
    b = sampling.top_k_top_p_sampling_from_probs(
        torch.softmax(logits, -1), k, p, filter_apply_order="top_k_first", generator=g2
    )
    assert float((a == b).double().mean()) >= 0.95


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_top_k_top_p_joint_sampling_from_logits(batch_size, vocab_size, p):
    """FlashInfer test_top_k_top_p_joint_sampling_from_logits: "joint" from logits gives exactly the
    tokens of "joint" from softmax(logits) for the same generator state."""
    _ci(B=batch_size, V=vocab_size)
    torch.manual_seed(42)
    logits = torch.rand(batch_size, vocab_size, device=DEV) * 5
    g1 = torch.Generator(DEV)
    g2 = g1.clone_state()
    k = _joint_k(vocab_size, p)
    a = sampling.top_k_top_p_sampling_from_logits(logits, k, p, filter_apply_order="joint", generator=g1)
    b = sampling.top_k_top_p_sampling_from_probs(
        torch.softmax(logits, -1), k, p, filter_apply_order="joint", generator=g2
    )
    assert torch.equal(a, b)


# ---- renorm / mask ----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_top_p_renorm_probs(batch_size, vocab_size, p):
    """FlashInfer test_top_p_renorm_probs: equals the sort-based renormalised nucleus within 1e-3."""
    probs = _rand_probs_case(batch_size, vocab_size)
    expect = probs * _top_p_mask(probs, p, strict=False)
    expect = expect / expect.sum(-1, keepdim=True)
    torch.testing.assert_close(expect, sampling.top_p_renorm_probs(probs, p), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", [4, 99, 989])
def test_top_p_renorm_probs_per_request(batch_size, vocab_size):
    """FlashInfer test_top_p_renorm_probs_per_request: per-row top_p = linspace(0.1, 0.9, B)."""
    probs = _rand_probs_case(batch_size, vocab_size)
    tp = torch.linspace(0.1, 0.9, batch_size, device=DEV)
    srt, idx = torch.sort(probs, descending=False)
    keep = (torch.cumsum(srt, -1) >= (1 - tp[:, None])).int()
    mask = torch.zeros_like(probs, dtype=torch.int32).scatter_add_(1, idx, keep)
    expect = probs * mask
    expect = expect / expect.sum(-1, keepdim=True)
    torch.testing.assert_close(expect, sampling.top_p_renorm_probs(probs, tp), rtol=1e-3, atol=1e-3)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("k", [10, 100, 500])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", [1, 19, 99, 989])
def test_top_k_renorm_probs(batch_size, vocab_size, k, distribution, dtype):
    """FlashInfer test_top_k_renorm_probs: the input dtype comes back, rows sum to 1 (1e-2), and the
    number of kept entries lies between k (or the nonzero count) - 1 and the tie range + 1."""
    if k > vocab_size:
        pytest.skip("k should be less than vocab_size")
    _ci(B=batch_size, V=vocab_size)
    torch.manual_seed(42)
    probs = torch.softmax(distribution((batch_size, vocab_size), DEV), -1).to(dtype)
    out = sampling.top_k_renorm_probs(probs, k)
    assert out.dtype == dtype
    sums = out.float().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-2, atol=1e-2)
    kept = (out > 0).sum(-1)
    pivot = torch.sort(probs, descending=True)[0][:, k - 1]
    upper = (probs > pivot[:, None]).sum(-1) + (probs == pivot[:, None]).sum(-1)
    lower = torch.minimum(torch.full_like(kept, k), (probs > 0).sum(-1))
    assert bool((kept >= (lower - 1).clamp(min=0)).all()) and bool((kept <= upper + 1).all())


def _mixed_k(vocab_size):
    g = torch.Generator(DEV).manual_seed(42)
    x = torch.rand((1024, vocab_size), device=DEV, generator=g)
    ks = torch.randint(1, 1000, (1024,), device=DEV, generator=torch.Generator(DEV).manual_seed(42))
    full = torch.randint(0, 2, (1024,), generator=torch.Generator(DEV).manual_seed(42), dtype=torch.bool)
    return x, ks.masked_fill(full, vocab_size)


def _check_mixed_k(kept, src, ks, vocab_size):
    for i in range(src.shape[0]):
        k, c = int(ks[i]), int(kept[i])
        if k >= vocab_size:
            assert c == vocab_size
        else:
            thr = torch.topk(src[i].float(), k).values[-1]
            assert k - 1 <= c <= int((src[i].float() >= thr).sum()) + 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_renorm_probs_mixed_k_persistent_loop(dtype):
    """FlashInfer test_top_k_renorm_probs_mixed_k_persistent_loop: B = 1024, V = 131072, per-row k
    in [1, 1000) with half the rows at k = V (no filtering)."""
    _ci(B=1024, V=131072)
    x, ks = _mixed_k(128 * 1024)
    probs = torch.softmax(x, -1).to(dtype)
    out = sampling.top_k_renorm_probs(probs, ks)
    assert out.dtype == dtype
    sums = out.float().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-2, atol=1e-2)
    _check_mixed_k((out > 0).sum(-1), probs, ks, 128 * 1024)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neginf_input", [False, True])
@pytest.mark.parametrize("distribution", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("k", [10, 100, 500])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", [1, 19, 99, 989])
def test_top_k_mask_logits(batch_size, vocab_size, k, distribution, neginf_input, dtype):
    """FlashInfer test_top_k_mask_logits: the input dtype comes back, softmax of the result sums to
    1, and the finite count lies between min(k, finite inputs) - 1 and the tie range + 1."""
    if k > vocab_size:
        pytest.skip("k should be less than vocab_size")
    _ci(B=batch_size, V=vocab_size)
    torch.manual_seed(42)
    logits = distribution((batch_size, vocab_size), DEV)
    if neginf_input:
        n = torch.randint(1, vocab_size * batch_size, (1,)).item()
        idx = torch.randperm(batch_size * vocab_size)[:n]
        logits[idx // vocab_size, idx % vocab_size] = float("-inf")
    logits = logits.to(dtype)
    out = sampling.top_k_mask_logits(logits, k)
    assert out.dtype == dtype
    sums = torch.softmax(out.float(), -1).sum(-1)
    live = torch.isfinite(logits).any(-1)  # an all -inf row has no softmax (NaN in torch as well)
    torch.testing.assert_close(sums[live], torch.ones_like(sums[live]), rtol=1e-3, atol=1e-3)
    finite = torch.isfinite(out).sum(-1)
    n_in = torch.isfinite(logits).sum(-1)
    ek = torch.minimum(torch.full_like(n_in, k), n_in)
    srt = torch.sort(logits, descending=True)[0]
    pivot = torch.stack(
        [
            srt[i, int(ek[i]) - 1] if int(ek[i]) > 0 else torch.tensor(float("-inf"), dtype=dtype)
            for i in range(batch_size)
        ]
    )
    upper = (logits > pivot[:, None]).sum(-1) + ((logits == pivot[:, None]) & torch.isfinite(logits)).sum(-1)
    assert bool((finite >= (ek - 1).clamp(min=0)).all()) and bool((finite <= upper + 1).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_mask_logits_mixed_k_persistent_loop(dtype):
    """FlashInfer test_top_k_mask_logits_mixed_k_persistent_loop: as the renorm case, on logits."""
    _ci(B=1024, V=131072)
    x, ks = _mixed_k(128 * 1024)
    logits = x.to(dtype)
    out = sampling.top_k_mask_logits(logits, ks)
    assert out.dtype == dtype
    _check_mixed_k(torch.isfinite(out).sum(-1), logits, ks, 128 * 1024)


# ---- chain speculative sampling -------------------------------------------------------------------
@pytest.mark.parametrize("onehot_target", [False, True])
@pytest.mark.parametrize("num_speculate_tokens", [1, 3, 5, 7])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_chain_speculative_sampling(batch_size, vocab_size, num_speculate_tokens, onehot_target):
    """FlashInfer test_chain_speculative_sampling: with a one-hot target that repeats the drafts the
    output is exactly the target's tokens; otherwise the ids are < V, -1 after the first rejection,
    and emitted + 1 = the number of ids that are not -1. Ten calls per case, int32 counters."""
    _ci(B=batch_size, V=vocab_size)
    n = num_speculate_tokens
    if batch_size * (2 * n + 1) * vocab_size * 4 > 2**31:
        pytest.skip("draft + target probabilities > 2 GiB: too much for the shared CPU machine")
    q = torch.rand(batch_size, n, vocab_size, device=DEV)
    q = q / q.sum(-1, keepdim=True)
    ids = torch.randint(vocab_size, (batch_size, n), device=DEV)
    if onehot_target:
        tgt_ids = torch.randint(vocab_size, (batch_size, n + 1), device=DEV)
        tgt_ids[:, :n] = ids
        target = torch.zeros(batch_size, n + 1, vocab_size, device=DEV).scatter_(2, tgt_ids[..., None], 1)
    else:
        target = torch.rand(batch_size, n + 1, vocab_size, device=DEV)
        target = target / target.sum(-1, keepdim=True)
    for _ in range(10):
        acc = torch.zeros(batch_size, dtype=torch.int32, device=DEV)
        emi = torch.zeros(batch_size, dtype=torch.int32, device=DEV)
        out, acc2, emi2 = sampling.chain_speculative_sampling(q, ids, target, acc, emi)
        assert out.dtype == torch.int32 and acc2 is acc and emi2 is emi
        if onehot_target:
            assert torch.equal(out.long(), tgt_ids)
        else:
            assert out.shape == (batch_size, n + 1) and bool((out[out >= 0] < vocab_size).all())
            bad = out[:, :-1] != ids
            for r in range(batch_size):
                pos = torch.nonzero(bad[r]).flatten()
                if len(pos):
                    assert bool((pos[1:] == pos[:-1] + 1).all())
                    assert bool((out[r, pos[0] + 1 :] == -1).all())
        assert torch.equal(emi + 1, (out != -1).sum(1).int())


# ---- parameter tensors ----------------------------------------------------------------------------
def _param_checks(call, good_scalar, make, batch_size, vocab_size):
    assert call(good_scalar).shape[0] == batch_size
    with pytest.raises(ValueError, match=r"Expected a 1D tensor or scalar.*got a 2D tensor"):
        call(make([[good_scalar] * vocab_size] * batch_size))
    with pytest.raises(
        ValueError,
        match=r"Expected a 1D tensor of shape \(batch_size,\) or scalar.*got a "
        r"0-dimensional tensor",
    ):
        call(make(good_scalar))
    if batch_size > 1:
        with pytest.raises(ValueError, match="Sampling parameter.*batch size mismatch"):
            call(make([good_scalar]))
    assert call(make([good_scalar] * batch_size)).shape[0] == batch_size


@pytest.mark.parametrize("p", [0.05, 0.1, 0.2, 0.7, 1])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_tensor_validation_min_p(batch_size, vocab_size, p):
    """FlashInfer test_tensor_validation_min_p: 0-D / 2-D / wrong-length min_p tensors raise."""
    probs = _rand_probs_case(batch_size, vocab_size)
    _param_checks(
        lambda mp: sampling.min_p_sampling_from_probs(probs, mp),
        p,
        lambda v: torch.tensor(v, dtype=torch.float32, device=DEV),
        batch_size,
        vocab_size,
    )


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_check_tensor_param_top_p(batch_size, vocab_size, p):
    """FlashInfer test_check_tensor_param_top_p: top_p_renorm_probs with an int32 top_p tensor (the
    values truncate to 0: the most probable token(s) only) and the 0-D / 2-D / length errors."""
    probs = _rand_probs_case(batch_size, vocab_size)
    out = sampling.top_p_renorm_probs(probs, torch.tensor([p] * batch_size, dtype=torch.int, device=DEV))
    # top_p 0 keeps the most probable token(s): every entry equal to the row max (the tie rule)
    assert torch.equal(out > 0, probs == probs.max(-1, keepdim=True).values)
    _param_checks(
        lambda tp: sampling.top_p_renorm_probs(probs, tp),
        p,
        lambda v: torch.tensor(v, dtype=torch.int, device=DEV),
        batch_size,
        vocab_size,
    )


@pytest.mark.parametrize("k", [10, 100, 500])
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_check_tensor_param_top_k(batch_size, vocab_size, k):
    """FlashInfer test_check_tensor_param_top_k: the same checks for top_k_renorm_probs."""
    probs = _rand_probs_case(batch_size, vocab_size, k)
    _param_checks(
        lambda tk: sampling.top_k_renorm_probs(probs, tk),
        k,
        lambda v: torch.tensor(v, dtype=torch.int, device=DEV),
        batch_size,
        vocab_size,
    )


# ---- seeds, offsets, generators ---------------------------------------------------------------------
@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_sampling_from_probs_seed_offset_reproducibility(batch_size, vocab_size):
    """FlashInfer test_sampling_from_probs_seed_offset_reproducibility."""
    probs = _rand_probs_case(batch_size, vocab_size)
    a = sampling.sampling_from_probs(probs, seed=12345, offset=0)
    assert torch.equal(a, sampling.sampling_from_probs(probs, seed=12345, offset=0))


@pytest.mark.parametrize("vocab_size", VOCAB)
@pytest.mark.parametrize("batch_size", BATCH)
def test_sampling_from_logits_seed_offset_reproducibility(batch_size, vocab_size):
    """FlashInfer test_sampling_from_logits_seed_offset_reproducibility."""
    _ci(B=batch_size, V=vocab_size)
    torch.manual_seed(42)
    logits = torch.randn(batch_size, vocab_size, device=DEV)
    a = sampling.sampling_from_logits(logits, seed=12345, offset=0)
    assert torch.equal(a, sampling.sampling_from_logits(logits, seed=12345, offset=0))


@pytest.mark.parametrize("vocab_size", VOCAB)
def test_sampling_different_seed_offset_produces_different_results(vocab_size):
    """FlashInfer test_sampling_different_seed_offset_produces_different_results (B = 1000)."""
    _ci(B=1000 if vocab_size > 111 else 1, V=vocab_size)
    torch.manual_seed(42)
    probs = _probs(1000, vocab_size)
    s1 = sampling.sampling_from_probs(probs, seed=12345, offset=0)
    s2 = sampling.sampling_from_probs(probs, seed=67890, offset=0)
    o2 = sampling.sampling_from_probs(probs, seed=12345, offset=1000)
    assert float((s1 == s2).double().mean()) < 1 and float((s1 == o2).double().mean()) < 1


@pytest.mark.parametrize("indices_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("sampling_type", ["from_probs", "from_logits", "top_p", "top_k", "min_p", "top_k_top_p"])
@pytest.mark.parametrize("vocab_size", [111, 32000])
@pytest.mark.parametrize("batch_size", BATCH)
def test_int64_indices_sampling(batch_size, vocab_size, sampling_type, indices_dtype):
    """FlashInfer test_int64_indices_sampling: with indices, the ids come back in indices' dtype."""
    _ci(B=batch_size, V=vocab_size)
    torch.manual_seed(42)
    logits = torch.randn(batch_size, vocab_size, device=DEV)
    probs = torch.softmax(logits, -1)
    idx = torch.arange(batch_size, dtype=indices_dtype, device=DEV)
    k = min(100, vocab_size)
    s = {
        "from_probs": lambda: sampling.sampling_from_probs(probs, indices=idx),
        "from_logits": lambda: sampling.sampling_from_logits(logits, indices=idx),
        "top_p": lambda: sampling.top_p_sampling_from_probs(probs, 0.9, indices=idx),
        "top_k": lambda: sampling.top_k_sampling_from_probs(probs, k, indices=idx),
        "min_p": lambda: sampling.min_p_sampling_from_probs(probs, 0.1, indices=idx),
        "top_k_top_p": lambda: sampling.top_k_top_p_sampling_from_probs(
            probs, k, 0.9, indices=idx, filter_apply_order="joint"
        ),
    }[sampling_type]()
    assert s.dtype == indices_dtype and s.shape == (batch_size,)
    assert bool(((s >= 0) & (s < vocab_size)).all())


@pytest.mark.parametrize("vocab_size", [111, 32000])
@pytest.mark.parametrize("batch_size", [1, 19, 99])
def test_sampling_with_default_device_cuda(batch_size, vocab_size):
    """FlashInfer test_sampling_with_default_device_cuda (a regression test of the default-device
    generator path), on the CPU: the same calls under torch.set_default_device(DEV)."""
    torch.manual_seed(42)
    old = torch.get_default_device()
    try:
        torch.set_default_device(DEV)
        logits = torch.randn(batch_size, vocab_size, device=DEV)
        for s in (
            sampling.top_k_top_p_sampling_from_logits(logits, top_k=100, top_p=0.9),
            sampling.sampling_from_probs(torch.softmax(logits, -1)),
            sampling.top_p_sampling_from_probs(torch.softmax(logits, -1), 0.9),
        ):
            assert s.shape == (batch_size,) and bool(((s >= 0) & (s < vocab_size)).all())
    finally:
        torch.set_default_device(old)


@pytest.mark.parametrize("vocab_size", [111, 32000])
@pytest.mark.parametrize("batch_size", [1, 4, 19])
def test_sampling_nan_input(batch_size, vocab_size):
    """FlashInfer test_sampling_nan_input: NaN rows give token 0 and valid=False, the other rows are
    valid, for every sampler with return_valid."""
    torch.manual_seed(42)
    probs = _probs(batch_size, vocab_size)
    bad = sorted({0, batch_size // 2, batch_size - 1})
    probs[bad] = float("nan")
    good = [i for i in range(batch_size) if i not in bad]
    for s, v in (
        sampling.sampling_from_probs(probs, return_valid=True),
        sampling.top_k_sampling_from_probs(probs, top_k=50, return_valid=True),
        sampling.top_p_sampling_from_probs(probs, top_p=0.9, return_valid=True),
        sampling.min_p_sampling_from_probs(probs, min_p=0.1, return_valid=True),
        sampling.top_k_top_p_sampling_from_probs(
            probs, top_k=50, top_p=0.9, filter_apply_order="joint", return_valid=True
        ),
    ):
        assert all(int(s[i]) == 0 and not bool(v[i]) for i in bad)
        assert all(bool(v[i]) and 0 <= int(s[i]) < vocab_size for i in good)


# ---- conventions the FlashInfer tests rely on implicitly ---------------------------------------------
def test_signatures_and_conventions():
    """Every function of flashinfer.sampling exists with FlashInfer's parameter names in order; ids
    are int32; FlashInfer's errors (seed / offset mix, bad filter order, NaN check) are raised."""
    import inspect

    expect = {
        "softmax": ["logits", "temperature", "enable_pdl"],
        "sampling_from_logits": ["logits", "indices", "deterministic", "generator", "check_nan", "seed", "offset"],
        "sampling_from_probs": [
            "probs",
            "indices",
            "deterministic",
            "generator",
            "check_nan",
            "seed",
            "offset",
            "return_valid",
        ],
        "top_p_sampling_from_probs": [
            "probs",
            "top_p",
            "indices",
            "deterministic",
            "generator",
            "check_nan",
            "seed",
            "offset",
            "return_valid",
        ],
        "top_k_sampling_from_probs": [
            "probs",
            "top_k",
            "indices",
            "deterministic",
            "generator",
            "check_nan",
            "seed",
            "offset",
            "return_valid",
        ],
        "min_p_sampling_from_probs": [
            "probs",
            "min_p",
            "indices",
            "deterministic",
            "generator",
            "check_nan",
            "seed",
            "offset",
            "return_valid",
        ],
        "top_k_top_p_sampling_from_logits": [
            "logits",
            "top_k",
            "top_p",
            "indices",
            "filter_apply_order",
            "deterministic",
            "generator",
            "check_nan",
            "seed",
            "offset",
        ],
        "top_k_top_p_sampling_from_probs": [
            "probs",
            "top_k",
            "top_p",
            "indices",
            "filter_apply_order",
            "deterministic",
            "generator",
            "check_nan",
            "seed",
            "offset",
            "return_valid",
        ],
        "top_p_renorm_probs": ["probs", "top_p", "is_deterministic"],
        "top_k_renorm_probs": ["probs", "top_k"],
        "top_k_mask_logits": ["logits", "top_k"],
        "chain_speculative_sampling": [
            "draft_probs",
            "draft_token_ids",
            "target_probs",
            "maybe_output_accepted_token_num",
            "maybe_output_emitted_draft_token_num",
            "deterministic",
            "generator",
            "seed",
            "offset",
        ],
    }
    for name, params in expect.items():
        assert list(inspect.signature(getattr(sampling, name)).parameters) == params, name
    assert sampling.top_p_renorm_prob is sampling.top_p_renorm_probs
    assert sampling.top_k_renorm_prob is sampling.top_k_renorm_probs
    probs = _probs(4, 50)
    with pytest.raises(ValueError, match="both be tensors or both be scalars"):
        sampling.sampling_from_probs(probs, seed=torch.tensor([1]), offset=0)
    with pytest.raises(ValueError, match="Invalid filter_apply_order"):
        sampling.top_k_top_p_sampling_from_probs(probs, 5, 0.9, filter_apply_order="bogus")
    with pytest.raises(ValueError, match="NaN"):
        sampling.sampling_from_probs(probs * float("nan"), check_nan=True)
    # seed tensors: length 1 = one seed for the batch (same as the int), length B = per-row seeds
    a = sampling.sampling_from_probs(probs, seed=7, offset=3)
    b = sampling.sampling_from_probs(probs, seed=torch.tensor([7]), offset=torch.tensor([3]))
    assert torch.equal(a, b) and a.dtype == torch.int32
    c = sampling.sampling_from_probs(probs, seed=torch.arange(4), offset=torch.tensor([3, 3, 3, 3]))
    # a per-row seed gives the row the tokens it gets alone (row 0 of a one-row call with that seed)
    assert torch.equal(
        c[2:3], sampling.sampling_from_probs(probs[2:3], seed=torch.tensor([2]), offset=torch.tensor([3]))
    )
    # offset tensors: length B = per-row offsets (row r as with offset[r] alone), as FlashInfer
    d = sampling.sampling_from_probs(probs, seed=torch.tensor([7]), offset=torch.tensor([0, 1, 2, 3]))
    for r in range(4):
        assert d[r] == sampling.sampling_from_probs(probs, seed=7, offset=r)[r]
    # seed alone (no offset) draws from the generator, as FlashInfer
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(
        sampling.sampling_from_probs(probs, generator=g1, seed=5), sampling.sampling_from_probs(probs, generator=g2)
    )
