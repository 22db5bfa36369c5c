"""The bad-input matrix: risky calls of every public op, each run in a child interpreter so that a
crash (segfault, abort) fails that one case instead of killing the test run.

A case is (op, call, expect). `call` is Python code evaluated with `dk`, `torch`, `math` and the
fixtures below in scope; `expect` is either an error ("raise:Type:regex": the message must name the
argument) or "ok:<check>", a Python expression on the result `r` that must hold (bad rows give a
defined result and leave the other rows alone).

The cases of one op run in one child; if the child dies, the cases it did not finish run again in a
new child, so only the crashing case fails."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import decodekit as dk

PRELUDE = textwrap.dedent("""
    import math, torch, decodekit as dk
    torch.manual_seed(0)
    X = torch.randn(3, 40)                       # logits
    P = torch.softmax(torch.randn(3, 40), -1)    # probs
    NANROW = X.clone(); NANROW[1, 5] = math.nan  # row 1 bad, rows 0 and 2 fine
    NEGROW = X.clone(); NEGROW[1] = -math.inf
    PZERO = P.clone(); PZERO[1] = 0.0
    IDS = torch.randint(0, 40, (3, 2))
    TP = torch.softmax(torch.randn(3, 3, 40), -1)
    DP = torch.softmax(torch.randn(3, 2, 40), -1)
    TL = torch.randn(3, 3, 40)
    TREE = dk.build_tree(torch.tensor([[-1, 0, 0, 1]] * 2), 0)
    CAND = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    TT = (CAND, TREE.retrive_index, TREE.retrive_next_token, TREE.retrive_next_sibling)
    TTP = torch.softmax(torch.randn(2, 4, 40), -1)
    TTL = torch.randn(2, 4, 40)
    Q = torch.randn(1, 3, 2, 64); K = torch.randn(1, 8, 1, 64); VV = torch.randn(1, 8, 1, 64)
    M = torch.ones(1, 3, 3, dtype=torch.bool)
    def fine(r, rows=(0, 2)):  # the good rows of a batch with a bad row 1 still hold a real result
        return all(bool(torch.isfinite(r[i]).any()) for i in rows)
""")

V_ERR = "raise:ValueError:"
T_ERR = "raise:(TypeError|ValueError):"


def _logit_filter_cases(op, param, bad_values, nan_row="torch.equal(r[1].isnan(), NANROW[1].isnan())"):
    """Masks return a bad row unchanged; softmax returns NaN there."""
    cases = [
        (f"dk.{op}(X.double(), {param})", V_ERR + "float32, bfloat16 or float16"),
        (f"dk.{op}(X[0], {param})", V_ERR + "must be 2-D"),
        (f"dk.{op}(torch.randn(8, 3).t(), {param})", V_ERR + "contiguous"),
        (f"dk.{op}(torch.empty(2, 0), {param})", V_ERR + "V >= 1"),
        (f"dk.{op}(torch.empty(0, 5), {param})", "ok:r.shape == (0, 5)"),
        (f"dk.{op}(NANROW, {param})", f"ok:{nan_row} and fine(r)"),
        (f"dk.{op}(NEGROW, {param})", "ok:fine(r)"),
        (f"dk.{op}(torch.empty((1, 2**31 + 1), dtype=torch.bfloat16), {param})", V_ERR + r"2\^31"),
        (f"dk.{op}(X, torch.tensor([{param}] * 2))", V_ERR + "1-D tensor of length 3"),
        (f"dk.{op}(X, 'a')", T_ERR + "must be a number"),
    ]
    cases += [(f"dk.{op}(X, {v})", V_ERR + name) for name, v in bad_values]
    return cases


def _probs_filter_cases(op, param, bad_values):
    cases = [
        (f"dk.{op}(P.double(), {param})", V_ERR + "float32"),
        (f"dk.{op}(P[0], {param})", V_ERR + "must be 2-D"),
        (f"dk.{op}(PZERO, {param})", "ok:bool((r[1] == 0).all()) and fine(r)"),
        (f"dk.{op}(torch.tensor([[1e-41, 2e-41, 0.0]]), {param})", "ok:bool(torch.isfinite(r).all())"),
    ]
    cases += [(f"dk.{op}(P, {v})", V_ERR + name) for name, v in bad_values]
    return cases


_K_BAD = [("top_k must be an integer", "1.5"), ("top_k must be an integer", "math.nan")]
_P_BAD = [("top_p", "0.0"), ("top_p", "-1e-50"), ("top_p", "math.nan"), ("top_p", "torch.tensor([0.5, 0.0, 0.5])")]
_MP_BAD = [("min_p", "1.5"), ("min_p", "-0.1"), ("min_p", "math.nan"), ("min_p", "math.inf")]
_T_BAD = [
    ("temperature", "math.inf"),
    ("temperature", "1e39"),
    ("temperature", "-1.0"),
    ("temperature", "1e-39"),
    ("temperature", "0.0"),
]


def _sampler_cases(call, x="X", bad=NotImplemented):
    """Cases of a sampler `call` (a format string with {x} for the input and {kw} for extra keywords)."""
    c = lambda xx, kw="": call.format(x=xx, kw=kw)  # noqa: E731
    return [
        (c(f"{x}.double()"), V_ERR + "float32"),
        (c(f"{x}[0]"), V_ERR + "must be 2-D"),
        (c(f"{x}", ", seed=2**64"), V_ERR + "seed"),
        (c(f"{x}", ", seed=1.5"), V_ERR + "seed"),
        (c(f"{x}", ", seed=torch.tensor([1, 2])"), V_ERR + "seed"),
        (c(f"{x}", ", offset=2**48"), V_ERR + "offset"),
        (c(f"{x}", ", offset=-1"), V_ERR + "offset"),
        (c(f"{x}", ", indices=torch.tensor([0, 3])"), V_ERR + "indices values"),
        (c(f"{x}", ", indices=torch.tensor([-2**62])"), V_ERR + "indices values"),
        (c(f"{x}", ", indices=[0, 'x']"), V_ERR + "indices"),
        (c(f"{x}", ", indices=[2, 2, 0], seed=1"), "ok:r.shape == (3,)"),
        (c(f"{x}", ", out_dtype=torch.float32"), V_ERR + "out_dtype"),
        (c(f"torch.empty(0, 5)", ""), "ok:r.shape == (0,)"),
        (
            c(f"{bad}", ", seed=3, return_valid=True"),
            "ok:r[0][1] == 0 and not bool(r[1][1]) and bool(r[1][0]) and bool(r[1][2])",
        ),
    ]


CASES = {
    "softmax": _logit_filter_cases("softmax", "1.0", _T_BAD, nan_row="bool(r[1].isnan().all())"),
    "top_k_mask_logits": _logit_filter_cases("top_k_mask_logits", "3", _K_BAD),
    "top_p_mask_logits": _logit_filter_cases("top_p_mask_logits", "0.5", _P_BAD),
    "min_p_mask_logits": _logit_filter_cases("min_p_mask_logits", "0.1", _MP_BAD),
    "top_k_renorm_probs": _probs_filter_cases("top_k_renorm_probs", "3", _K_BAD),
    "top_p_renorm_probs": _probs_filter_cases("top_p_renorm_probs", "0.5", _P_BAD),
    "min_p_renorm_probs": _probs_filter_cases("min_p_renorm_probs", "0.1", _MP_BAD),
    "sampling_from_probs": _sampler_cases("dk.sampling_from_probs({x}{kw})", "P", "PZERO"),
    "sampling_from_logits": _sampler_cases("dk.sampling_from_logits({x}{kw})", "X", "NANROW"),
    "top_k_sampling_from_probs": _sampler_cases("dk.top_k_sampling_from_probs({x}, 5{kw})", "P", "PZERO")
    + [("dk.top_k_sampling_from_probs(P, 2**70, seed=1)", "ok:r.shape == (3,)")],
    "top_p_sampling_from_probs": _sampler_cases("dk.top_p_sampling_from_probs({x}, 0.5{kw})", "P", "PZERO")
    + [("dk.top_p_sampling_from_probs(P, 1e-50, seed=1)", "ok:torch.equal(r, P.argmax(-1))")]
    + [(f"dk.top_p_sampling_from_probs(P, {v})", V_ERR + n) for n, v in _P_BAD],
    "min_p_sampling_from_probs": _sampler_cases("dk.min_p_sampling_from_probs({x}, 0.1{kw})", "P", "PZERO")
    + [(f"dk.min_p_sampling_from_probs(P, {v})", V_ERR + n) for n, v in _MP_BAD],
    "top_k_top_p_sampling_from_probs": _sampler_cases(
        "dk.top_k_top_p_sampling_from_probs({x}, 5, 0.9{kw})", "P", "PZERO"
    )
    + [("dk.top_k_top_p_sampling_from_probs(P, 5, 0.9, filter_apply_order='x')", V_ERR + "filter_apply_order")],
    "top_k_top_p_sampling_from_logits": _sampler_cases(
        "dk.top_k_top_p_sampling_from_logits({x}, 5, 0.9{kw})", "X", "NEGROW"
    ),
    "sample": _sampler_cases("dk.sample({x}, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05{kw})", "X", "NANROW")
    + [(f"dk.sample(X, temperature={v})", V_ERR + n) for n, v in _T_BAD if v != "0.0"]
    + [(f"dk.sample(X, top_p={v})", V_ERR + n) for n, v in _P_BAD]
    + [(f"dk.sample(X, min_p={v})", V_ERR + n) for n, v in _MP_BAD]
    + [
        ("dk.sample(X, top_k=2**70, seed=1)", "ok:torch.equal(r, dk.sample(X, seed=1))"),
        ("dk.sample(X, order='x')", V_ERR + "filter_apply_order"),
        ("dk.sample(X, temperature=0.0, seed=torch.tensor([1, 2, 3]))", "ok:torch.equal(r, X.argmax(-1))"),
    ],
    "chain_speculative_sampling": [
        ("dk.chain_speculative_sampling(DP, IDS, TP, seed=1)", "ok:r[0].shape == (3, 3)"),
        ("dk.chain_speculative_sampling(DP, IDS + 40, TP)", V_ERR + "draft"),
        ("dk.chain_speculative_sampling(DP, IDS - 41, TP)", V_ERR + "draft"),
        ("dk.chain_speculative_sampling(DP, IDS, TP[:, :2])", V_ERR + "target_probs"),
        ("dk.chain_speculative_sampling(DP[..., :7], IDS, TP)", V_ERR + "draft_probs"),
        ("dk.chain_speculative_sampling(DP, IDS.float(), TP)", V_ERR + "draft_token_ids"),
        ("dk.chain_speculative_sampling(DP, IDS, TP.double())", V_ERR + "target_probs"),
        ("dk.chain_speculative_sampling(DP, IDS, TP, offset=2**48)", V_ERR + "offset"),
        ("dk.chain_speculative_sampling(DP, IDS, TP, num_draft_tokens=[1, 5, 0])", V_ERR + "num_draft_tokens"),
        ("dk.chain_speculative_sampling(DP, IDS, TP, num_draft_tokens=[1, 2, 0], seed=2)", "ok:r[0].shape == (3, 3)"),
        ("dk.chain_speculative_sampling(DP, IDS, TP * math.nan, seed=2)", "ok:bool((r[0][:, 0] >= 0).all())"),
        ("dk.chain_speculative_sampling(DP, IDS, torch.zeros_like(TP), seed=2)", "ok:bool((r[0][:, 0] >= 0).all())"),
        (
            "dk.chain_speculative_sampling(None, torch.zeros(2, 0, dtype=torch.long), TP[:2, :1], seed=2)",
            "ok:r[0].shape == (2, 1)",
        ),
    ],
    "chain_speculative_sampling_from_logits": [
        (
            "dk.chain_speculative_sampling_from_logits(None, IDS, TL, temperature=0.5, top_k=5, seed=1)",
            "ok:r[0].shape == (3, 3)",
        ),
        ("dk.chain_speculative_sampling_from_logits(None, IDS, TL, temperature=math.inf)", V_ERR + "temperature"),
        ("dk.chain_speculative_sampling_from_logits(None, IDS, TL, top_p=0.0)", V_ERR + "top_p"),
        ("dk.chain_speculative_sampling_from_logits(None, IDS, TL, min_p=2.0)", V_ERR + "min_p"),
        ("dk.chain_speculative_sampling_from_logits(None, IDS, TL.double())", V_ERR + "target_logits"),
        (
            "dk.chain_speculative_sampling_from_logits(None, IDS, TL * math.nan, seed=1)",
            "ok:torch.equal(r[0][:, 0], torch.zeros(3, dtype=torch.long))",
        ),
    ],
    "greedy_verify": [
        ("dk.greedy_verify(IDS, TL)", "ok:r[0].shape == (3, 3)"),
        ("dk.greedy_verify(IDS + 40, TL)", V_ERR + "draft"),
        ("dk.greedy_verify(IDS, TL[:, :2])", V_ERR + "target_logits"),
        (
            "dk.greedy_verify(torch.zeros_like(IDS), torch.full_like(TL, -math.inf))",
            "ok:torch.equal(r[2], torch.zeros(3, dtype=torch.int32))",
        ),
    ],
    "build_tree": [
        ("dk.build_tree(torch.tensor([[-1, 0, 1]]), 2**63 - 1)", V_ERR + "prefix_lens"),
        ("dk.build_tree(torch.tensor([[-1, 0, 1]]), -1)", V_ERR + "prefix_lens"),
        ("dk.build_tree(torch.tensor([[-1, 0, 1]]), 2**64)", V_ERR + "prefix_lens"),
        ("dk.build_tree(torch.tensor([[-1, 2, 0]]), 0)", V_ERR + "parent"),
        ("dk.build_tree(torch.tensor([[-1, -1, 0]]), 0)", V_ERR + "root"),
        ("dk.build_tree(torch.tensor([[-1, 2**62, 0]]), 0)", V_ERR + "parent"),
        ("dk.build_tree(torch.tensor([[0, 0, 0]]), 0)", V_ERR + "parent"),
        ("dk.build_tree(torch.tensor([-1, 0]), 0)", V_ERR + "parents"),
        ("dk.build_tree(torch.tensor([[-1, 0]]), 'a')", T_ERR + "prefix_lens"),
    ],
    "tree_speculative_sampling": [
        ("dk.tree_speculative_sampling(*TT, TTP, seed=1)", "ok:r[0].shape == (8,)"),
        ("dk.tree_speculative_sampling(*TT, TTP, TTP, seed=1)", "ok:r[0].shape == (8,)"),
        ("dk.tree_speculative_sampling(CAND + 40, *TT[1:], TTP)", V_ERR + "candidate"),
        ("dk.tree_speculative_sampling(*TT, TTP[:, :3])", V_ERR + "target_probs"),
        ("dk.tree_speculative_sampling(*TT, TTP, offset=-5)", V_ERR + "offset"),
        ("dk.tree_speculative_sampling(*TT, torch.zeros_like(TTP), TTP, seed=2)", "ok:r[0].shape == (8,)"),
        ("dk.tree_speculative_sampling(*TT, TTP * math.nan, seed=2)", "ok:r[0].shape == (8,)"),
        ("dk.tree_speculative_sampling(*TT, TTP, num_speculative_tokens=2**40)", V_ERR + "num_speculative_tokens"),
    ],
    "tree_speculative_sampling_from_logits": [
        (
            "dk.tree_speculative_sampling_from_logits(*TT, TTL, temperature=0.8, top_p=0.9, seed=1)",
            "ok:r[0].shape == (8,)",
        ),
        ("dk.tree_speculative_sampling_from_logits(*TT, TTL, temperature=1e39)", V_ERR + "temperature"),
        ("dk.tree_speculative_sampling_from_logits(*TT, TTL * math.nan, seed=1)", "ok:r[0].shape == (8,)"),
    ],
    "verify_tree_greedy": [
        ("dk.verify_tree_greedy(*TT, TTL)", "ok:r[0].shape == (8,)"),
        ("dk.verify_tree_greedy(*TT, TTL[..., :3])", V_ERR + "candidate"),
        ("dk.verify_tree_greedy(*TT, CAND)", "ok:r[0].shape == (8,)"),
        (
            "dk.verify_tree_greedy(*TT, torch.full_like(TTL, math.nan))",
            "ok:torch.equal(r[2], torch.zeros(2, dtype=torch.int32))",
        ),
    ],
    "tree_attention": [
        ("dk.tree_attention(Q, K, VV, M, 2**63 - 1)", V_ERR + "prefix_lens"),
        ("dk.tree_attention(Q, K, VV, M, torch.tensor([2**63 - 1]))", V_ERR + "prefix_lens"),
        ("dk.tree_attention(Q, K, VV, M, torch.tensor([2**63 - 3]))", V_ERR + "prefix_lens"),
        ("dk.tree_attention(Q, K, VV, M, 2**64)", V_ERR + "prefix_lens"),
        ("dk.tree_attention(Q, K, VV, M, -1)", V_ERR + "prefix_lens"),
        ("dk.tree_attention(Q, K, VV, M, 6)", V_ERR + "prefix_lens"),
        ("dk.tree_attention(Q, K, VV, M, 5)", "ok:r.shape == Q.shape"),
        ("dk.tree_attention(Q, K[..., :32], VV, M, 0)", V_ERR + "k"),
        ("dk.tree_attention(Q.half(), K, VV, M, 0)", V_ERR + "dtype"),
        ("dk.tree_attention(Q, K, VV, M[..., :2], 0)", V_ERR + "tree_mask"),
        ("dk.tree_attention(Q, K, VV, M, 0, kv_layout='XYZ')", V_ERR + "kv_layout"),
        (
            "dk.tree_attention(torch.randn(1, 3, 3, 64), torch.randn(1, 8, 2, 64), torch.randn(1, 8, 2, 64), M, 0)",
            V_ERR + "q heads",
        ),
        ("dk.tree_attention(Q, K * math.nan, VV, M, 0)", "ok:r.shape == Q.shape"),
    ],
    "tree_attention_mask": [
        ("dk.tree_attention_mask(M, 2)", "ok:r.shape == (1, 1, 3, 5)"),
        ("dk.tree_attention_mask(M, -1)", V_ERR + "prefix_lens"),
        ("dk.tree_attention_mask(M, 2**64)", V_ERR + "prefix_lens"),
        ("dk.tree_attention_mask(M[0], 2)", V_ERR + "tree_mask"),
    ],
    "typical_mask_logits": _logit_filter_cases(
        "typical_mask_logits", "0.9", [("typical_p", "0.0"), ("typical_p", "1.5"), ("typical_p", "math.nan")]
    ),
    "epsilon_mask_logits": _logit_filter_cases(
        "epsilon_mask_logits", "1e-3", [("epsilon", "-0.1"), ("epsilon", "1.0"), ("epsilon", "math.nan")]
    ),
    "eta_mask_logits": _logit_filter_cases(
        "eta_mask_logits", "1e-3", [("eta", "-0.1"), ("eta", "1.0"), ("eta", "math.nan")]
    ),
    "top_n_sigma_mask_logits": _logit_filter_cases(
        "top_n_sigma_mask_logits", "1.0", [("top_n_sigma", "math.nan"), ("top_n_sigma", "math.inf")]
    ),
    "top_h_mask_logits": _logit_filter_cases(
        "top_h_mask_logits", "0.5", [("top_h", "-0.1"), ("top_h", "1.5"), ("top_h", "math.nan")]
    ),
    "apply_penalties": [
        (
            "dk.apply_penalties(X, output_token_ids=IDS, repetition_penalty=1.1, frequency_penalty=0.5)",
            "ok:r.shape == X.shape",
        ),
        ("dk.apply_penalties(X, output_token_ids=IDS + 40, repetition_penalty=1.1)", V_ERR + "output_token_ids"),
        ("dk.apply_penalties(X, prompt_token_ids=IDS * 0 - 2, repetition_penalty=1.1)", V_ERR + "prompt_token_ids"),
        ("dk.apply_penalties(X, output_token_ids=IDS[:2], repetition_penalty=1.1)", V_ERR + "output_token_ids"),
        ("dk.apply_penalties(X, output_token_ids=IDS, repetition_penalty=0.0)", V_ERR + "repetition_penalty"),
        ("dk.apply_penalties(X, output_token_ids=IDS, frequency_penalty=math.nan)", V_ERR + "frequency_penalty"),
        ("dk.apply_penalties(X, banned_token_ids=torch.tensor([[2**40]] * 3))", V_ERR + "banned_token_ids"),
        (
            "dk.apply_penalties(X, allowed_token_bitmask=torch.zeros(3, 1, dtype=torch.int32))",
            V_ERR + "allowed_token_bitmask",
        ),
        ("dk.apply_penalties(X, logit_bias=(IDS, torch.full((3, 2), math.inf)))", V_ERR + "logit_bias"),
        ("dk.apply_penalties(NANROW, output_token_ids=IDS, repetition_penalty=1.3)", "ok:fine(r)"),
    ],
    "apply_token_bitmask_inplace": [
        ("dk.apply_token_bitmask_inplace(X.clone(), torch.zeros(3, 2, dtype=torch.int32))", "ok:r is None"),
        ("dk.apply_token_bitmask_inplace(X.clone(), torch.zeros(3, 2, dtype=torch.int64))", V_ERR + "bitmask"),
        ("dk.apply_token_bitmask_inplace(X.clone(), torch.zeros(4, 2, dtype=torch.int32))", V_ERR + "bitmask"),
        (
            "dk.apply_token_bitmask_inplace(X.clone(), torch.zeros(3, 2, dtype=torch.int32), indices=torch.tensor([5]))",
            V_ERR + "indices",
        ),
        ("dk.apply_token_bitmask_inplace(X.double(), torch.zeros(3, 2, dtype=torch.int32))", V_ERR + "logits"),
    ],
    "pack_tree_mask": [
        ("dk.unpack_tree_mask(dk.pack_tree_mask(M), 3)", "ok:torch.equal(r, M)"),
    ],
}

_WORKER = textwrap.dedent("""
    import json, re, sys, traceback
    exec(PRELUDE)
    for i, (call, expect) in CASES:
        res = {"i": i}
        try:
            r = eval(call)
            res["outcome"] = "returned"
            if expect.startswith("ok:"):
                res["check"] = bool(eval(expect[3:]))
        except Exception as e:  # noqa: BLE001
            res["outcome"] = "raised"
            res["type"] = type(e).__name__
            res["msg"] = str(e).splitlines()[0][:500] if str(e) else ""
        print("@@" + json.dumps(res), flush=True)
""")

_RESULTS = {}


def _run_op(op):
    """Results of every case of `op`, restarting the child after a crash."""
    if op in _RESULTS:
        return _RESULTS[op]
    cases = list(enumerate(CASES[op]))
    out = {}
    while cases:
        code = f"PRELUDE = {PRELUDE!r}\nCASES = {cases!r}\n" + _WORKER
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
        for line in p.stdout.splitlines():
            if line.startswith("@@"):
                r = json.loads(line[2:])
                out[r["i"]] = r
        left = [c for c in cases if c[0] not in out]
        if left and p.returncode != 0:  # the first unfinished case crashed the child
            out[left[0][0]] = {"outcome": "crashed", "rc": p.returncode, "stderr": p.stderr[-2000:]}
            left = left[1:]
        elif left:
            for i, _ in left:
                out[i] = {"outcome": "missing", "stderr": p.stderr[-2000:]}
            left = []
        cases = left
    _RESULTS[op] = out
    return out


PARAMS = [(op, i) for op in CASES for i in range(len(CASES[op]))]


def test_matrix_covers_every_public_op():
    public = {n for n in dk.__all__ if callable(getattr(dk, n)) and not isinstance(getattr(dk, n), type)}
    public -= {"cpu_features", "build_info", "set_isa", "check_errors", "register_hf_attention", "unpack_tree_mask"}
    missing = public - set(CASES)
    assert not missing, f"bad-input cases missing for {sorted(missing)}"


@pytest.mark.parametrize("op,i", PARAMS, ids=[f"{op}-{i}" for op, i in PARAMS])
def test_bad_input(op, i):
    import re

    call, expect = CASES[op][i]
    r = _run_op(op)[i]
    assert r["outcome"] not in ("crashed", "missing"), (
        f"{call}: child {r['outcome']} (rc {r.get('rc')}):\n{r.get('stderr')}"
    )
    if expect.startswith("raise:"):
        _, types, pattern = expect.split(":", 2)
        assert r["outcome"] == "raised", f"{call} returned instead of raising {types}"
        assert re.fullmatch(types, r["type"]), f"{call} raised {r['type']}: {r['msg']}"
        assert re.search(pattern, r["msg"]), f"{call}: message {r['msg']!r} does not match {pattern!r}"
    else:
        assert r["outcome"] == "returned", f"{call} raised {r.get('type')}: {r.get('msg')}"
        assert r.get("check"), f"{call}: check {expect[3:]!r} failed"
