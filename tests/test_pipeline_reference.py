"""reference.py's whole-step definitions against transformers' own processors (issue 11): every
truncation alone and in HF's warper order, with min_tokens_to_keep, and the repetition penalty.
Random rows have no exact ties, so the documented tie rule never comes into play here."""

import pytest
import torch

from decodekit import reference as R

tr = pytest.importorskip("transformers")
from transformers.generation import logits_process as LP  # noqa: E402

V = 500


def _rows(seed, B=6, V=V):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 2.0
    x[:, :5] += torch.rand(B, 5, generator=g) * 6  # a head of a few likely tokens
    return x


def _hf_keep(proc, x):
    return proc(None, x.clone()) > float("-inf")


CASES = [
    ("top_k", dict(top_k=20), lambda m: LP.TopKLogitsWarper(20, min_tokens_to_keep=m)),
    ("top_k_small", dict(top_k=2), lambda m: LP.TopKLogitsWarper(2, min_tokens_to_keep=m)),
    ("top_p", dict(top_p=0.8), lambda m: LP.TopPLogitsWarper(0.8, min_tokens_to_keep=m)),
    ("top_p_tiny", dict(top_p=0.05), lambda m: LP.TopPLogitsWarper(0.05, min_tokens_to_keep=m)),
    ("min_p", dict(min_p=0.2), lambda m: LP.MinPLogitsWarper(0.2, min_tokens_to_keep=m)),
    ("typical", dict(typical_p=0.7), lambda m: LP.TypicalLogitsWarper(0.7, min_tokens_to_keep=m)),
    ("typical_small", dict(typical_p=0.2), lambda m: LP.TypicalLogitsWarper(0.2, min_tokens_to_keep=m)),
    ("epsilon", dict(epsilon=3e-3), lambda m: LP.EpsilonLogitsWarper(3e-3, min_tokens_to_keep=m)),
    ("eta", dict(eta=2e-3), lambda m: LP.EtaLogitsWarper(2e-3, min_tokens_to_keep=m)),
    ("top_h", dict(top_h=0.5), lambda m: LP.TopHLogitsWarper(0.5)),
    ("top_h_high", dict(top_h=0.97), lambda m: LP.TopHLogitsWarper(0.97)),
]


@pytest.mark.parametrize("mtk", [1, 3, 40])
@pytest.mark.parametrize("name,kw,make", CASES, ids=[c[0] for c in CASES])
def test_single_warper_matches_hf(name, kw, make, mtk):
    if name.startswith("top_h") and mtk != 1:
        pytest.skip("TopHLogitsWarper has no min_tokens_to_keep")
    for seed in range(4):
        x = _rows(seed)
        ref = R.pipeline_keep(x, min_tokens_to_keep=mtk, **kw)
        hf = _hf_keep(make(mtk), x)
        assert torch.equal(ref, hf), (name, seed, (ref != hf).nonzero()[:5].tolist())


def test_warper_chain_matches_hf():
    """temperature -> top-k -> top-p -> min-p -> typical -> epsilon -> eta -> top-h, each acting on the
    renormalised survivors of the ones before it (HF's warper list)."""
    for seed in range(6):
        x = _rows(100 + seed)
        kw = dict(
            temperature=0.8, top_k=300, top_p=0.97, min_p=0.001, typical_p=0.95, epsilon=1e-4, eta=1e-4, top_h=0.9
        )
        procs = [
            LP.TemperatureLogitsWarper(0.8),
            LP.TopKLogitsWarper(300),
            LP.TopPLogitsWarper(0.97),
            LP.MinPLogitsWarper(0.001),
            LP.TypicalLogitsWarper(0.95),
            LP.EpsilonLogitsWarper(1e-4),
            LP.EtaLogitsWarper(1e-4),
            LP.TopHLogitsWarper(0.9),
        ]
        s = x.clone()
        for p in procs:
            s = p(None, s)
        ref = R.pipeline_keep(x, **kw)
        assert torch.equal(ref, s > float("-inf")), seed


def test_repetition_penalty_matches_hf():
    g = torch.Generator().manual_seed(7)
    x = _rows(7)
    B = x.shape[0]
    ids = torch.randint(0, V, (B, 40), generator=g)
    ref = R.process_logits(x, prompt_token_ids=ids[:, :25], output_token_ids=ids[:, 25:], repetition_penalty=1.3)
    hf = LP.RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone())
    assert torch.equal(ref, hf)


def test_top_n_sigma_definition():
    """llama.cpp's top-n-sigma: population std of the finite logits, keep >= max - n * std."""
    x = _rows(3)
    x[0, 100:200] = float("-inf")
    keep = R.pipeline_keep(x, top_n_sigma=1.5)
    for b in range(x.shape[0]):
        f = x[b][x[b] > float("-inf")].double()
        thr = f.max() - 1.5 * f.std(unbiased=False)
        assert torch.equal(keep[b], x[b].double() >= thr)
