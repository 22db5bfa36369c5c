"""The CUDA path in a serving engine (README "CUDA in a serving engine"): sync-free ops, deferred
value checks, CUDA graph capture and device-side seeds.

GPU tests (skipped where no GPU is visible; none has run on real hardware yet): every op under
torch.cuda.set_sync_debug_mode("error"), inside torch.cuda.CUDAGraph capture + replay, and the
Philox state of torch's CUDA generator advancing across replays.

CPU tests: the wrappers' CUDA branch under FakeTensorMode (any read of a tensor value in Python
raises there); the deferred checks forced on the CPU (the bindings' sync-free code with the CPU
kernels: defined rows, other rows untouched, check_errors naming the argument); seeds and offsets
in memory (decodekit/rng.h row_rng_key) through the CPU kernels and the emulated CUDA kernels.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import cuda_cases as cc  # noqa: E402
import decodekit as dk  # noqa: E402

ops = dk.ops
NOF = (None, 1.0, None, 0, None, 1.0, None, 0.0, 0)  # no filters (the ops' filter arguments)
HAS_GPU = torch.cuda.is_available() and dk.build_info()["cuda"]
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU and a CUDA build of decodekit (none here)")


# ---- inputs shared by the GPU and CPU tests ----------------------------------------------------
# (made on `dev` directly, so the same code builds fake CUDA tensors under FakeTensorMode)
def _tree(B, T, dev):
    """A random tree batch: parents (node 0 root), candidates, target logits, draft probs."""
    torch.manual_seed(B * 100 + T)
    below = (torch.rand(B, T - 1, device=dev) * torch.arange(1, T, device=dev)).long()  # parent of t in [0, t)
    parents = torch.cat([torch.full((B, 1), -1, dtype=torch.int64, device=dev), below], 1)
    V = 300
    cand = torch.randint(0, V, (B, T), device=dev)
    lt = torch.randn(B, T, V, device=dev) * 2
    qt = (torch.randn(B, T, V, device=dev) * 2).softmax(-1)
    return parents, cand, lt, qt


def _attn(B, T, S, dev):
    torch.manual_seed(7)
    q = torch.randn(B, T, 4, 64, device=dev)
    k = torch.randn(B, S, 2, 64, device=dev)
    v = torch.randn(B, S, 2, 64, device=dev)
    mask = torch.ones(B, T, T, dtype=torch.bool, device=dev).tril()
    return q, k, v, mask


def op_calls(dev):
    """(name, fn) for every op with device tensors for every per-row argument: parameters,
    indices, seeds ([1] and [B]), offsets ([1] and [B]), num_draft_tokens, trees, coins, prefix_lens."""
    B, V = 6, 1000
    torch.manual_seed(0)
    x = torch.randn(B, V, device=dev) * 2
    probs = x.float().softmax(-1)
    d = dict(device=dev)
    idx = torch.tensor([5, 0, 3, 3, 1, 2, 4, 0], **d)
    n = idx.numel()
    T = torch.linspace(0.0, 1.5, n, **d)
    k = torch.tensor([0, 5, 50, 1, 2000, 10, 7, 3], **d)
    p = torch.linspace(0.3, 1.0, n, **d)
    mp = torch.linspace(0.0, 0.2, n, **d)
    seed1 = torch.tensor([1234], **d)
    seeds = torch.arange(n, **d) * 7919 + 1
    off1 = torch.tensor([3], **d)
    offs = torch.arange(n, **d) * 5
    N = 3
    lp = torch.randn(B, N + 1, V, device=dev) * 2
    pt = lp.softmax(-1)
    q = (torch.randn(B, N, V, device=dev) * 2).softmax(-1)
    ids = torch.randint(0, V, (B, N), device=dev)
    nd = torch.tensor([3, 0, 2, 1, 3, 2], **d)
    TB = torch.linspace(0.0, 1.2, B, **d)
    parents, cand, lt, qt = _tree(4, 7, dev)
    plen = torch.tensor([0, 5, 2, 9], **d)
    tree = dk.build_tree(parents, plen)
    tr = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling)
    coins = torch.rand(4, 7, device=dev)
    coins_final = torch.rand(4, device=dev)
    aq, ak, av, amask = _attn(4, 7, 20, dev)
    aplen = torch.tensor([0, 13, 4, 9], **d)
    P, ptabs = _pipe_inputs(n, V, dev)
    bm = torch.randint(-(2**31), 2**31 - 1, (B, (V + 31) // 32), dtype=torch.int32, **d)
    # rows of 3 chunks in a batch of 3: on a GPU these run the split-row plans (several CTAs per row)
    xs = torch.randn(3, 9000, device=dev) * 2
    ks, ps = torch.tensor([50, 0, 3000], **d), torch.tensor([0.9, 0.5, 1.0], **d)
    return [
        (
            "sample-split-filters",
            lambda: ops.sample(
                xs, None, False, T[:3] + 0.1, 1.0, ks, 0, ps, 1.0, mp[:3], 0.0, 0, seed1, 0, 0, offs[:3]
            ),
        ),
        ("sample-split-plain", lambda: ops.sample(xs, None, False, None, 0.8, *NOF[2:], seeds[:3], 0, 0)),
        ("gumbel-split", lambda: ops.gumbel_sample(xs, None, seed1, 0, 0, off1)),
        ("filter-split-mask", lambda: (ops.filter(xs, 0, False, None, 1.0, ks, 0, ps, 1.0, None, 0.0, 1),)),
        (
            "filter-split-renorm",
            lambda: (ops.filter(xs.softmax(-1), 1, True, None, 1.0, None, 50, ps, 1.0, None, 0.0, 0),),
        ),
        ("filter-split-softmax", lambda: (ops.filter(xs, 2, False, None, 0.7, *NOF[2:]),)),
        ("sample-logits", lambda: ops.sample(x, idx, False, T, 1.0, k, 0, p, 1.0, mp, 0.0, 0, seed1, 0, 0, offs)),
        (
            "sample-probs",
            lambda: ops.sample(probs, idx, True, None, 1.0, k, 0, p, 1.0, None, 0.0, 1, seeds, 0, 7, off1),
        ),
        ("gumbel", lambda: ops.gumbel_sample(x, idx, seed1, 0, 0, offs)),
        ("filter-mask", lambda: (ops.filter(x, 0, False, None, 1.0, k[:B], 0, p[:B], 1.0, None, 0.0, 0),)),
        ("filter-renorm", lambda: (ops.filter(probs, 1, True, None, 1.0, None, 0, p[:B], 1.0, mp[:B], 0.0, 1),)),
        ("filter-softmax", lambda: (ops.filter(x, 2, False, T[:B] + 0.5, 1.0, *NOF[2:]),)),
        ("chain-probs", lambda: ops.chain_verify(pt, ids, q, nd, 0, *NOF, seeds[:B], 0, 0, off1)),
        ("chain-logits", lambda: ops.chain_verify(lp, ids, None, nd, 1, TB, 1.0, *NOF[2:], seed1, 0, 0, offs[:B])),
        (
            "chain-logits-filters",
            lambda: ops.chain_verify(lp, ids, q, nd, 1, TB, 1.0, k[:B], 0, p[:B], 1.0, mp[:B], 0.0, 1, seeds[:B], 0, 0),
        ),
        ("tree-probs", lambda: ops.tree_verify(*tr, lt.softmax(-1), qt, 7, 0, *NOF, seed1, 0, 0, offset_arr=off1)),
        ("tree-logits", lambda: ops.tree_verify(*tr, lt, None, 4, 1, TB[:4], 1.0, *NOF[2:], seeds[:4], 0, 0)),
        (
            "tree-logits-filters",
            lambda: ops.tree_verify(*tr, lt, qt, 7, 1, TB[:4], 1.0, k[:4], 0, None, 0.9, mp[:4], 0.0, 0, seed1, 0, 0),
        ),
        ("tree-ids", lambda: ops.tree_verify(*tr, lt.argmax(-1), None, 7, 2, *NOF, None, 0, 0)),
        (
            "tree-coins",
            lambda: ops.tree_verify(*tr, lt.softmax(-1), None, 7, 0, *NOF, None, 0, 0, coins, coins_final, 0.5, 0.8),
        ),
        ("build-tree", lambda: ops.build_tree(parents, plen)),
        ("tree-attention", lambda: ops.tree_attention(aq, ak, av, amask, aplen, None, "NHD")),
        ("pipeline-sample", lambda: ops.pipeline(x, idx, P, 0, *ptabs, 0, 3, False, True, seed1, 0, 2, offs)),
        ("pipeline-vllm-raw", lambda: ops.pipeline(x, idx, P, 2, *ptabs, 0, 2, True, True, seeds, 0, 0, off1)),
        ("pipeline-mask", lambda: ops.pipeline(x, idx, P, 1, *ptabs, 1, 0, False, False, None, 0, 0)),
        ("bitmask-inplace", lambda: _bitmask_inplace(x.clone(), bm, idx[:4])),
    ]


def _pipe_inputs(n, V, dev):
    """Per-row params [n, 13] and the pipeline's tables (bitmask, bans, bias, histories), on dev."""
    from decodekit.pipeline import pack_params

    d = dict(device=dev)
    P = pack_params(
        n,
        dev,
        temperature=torch.linspace(0.0, 1.2, n, **d),
        top_k=torch.tensor([0, 5, 50, 1, 200, 10, 7, 3], **d)[:n],
        top_p=0.9,
        min_p=0.02,
        repetition_penalty=1.1,
        frequency_penalty=0.5,
        presence_penalty=0.5,
        typical_p=torch.full((n,), 0.97, **d),
    ).contiguous()
    g = torch.Generator(device="cpu").manual_seed(5)
    bits = torch.randint(-(2**31), 2**31 - 1, (n, (V + 31) // 32), dtype=torch.int32, generator=g) | 0x0F0F0F0F
    hist = torch.randint(-1, V, (n, 2, 12), generator=g)
    ban = torch.randint(-1, V, (n, 3), generator=g)
    bias_ids = torch.randint(-1, V, (n, 2), generator=g)
    bias_vals = torch.randn(n, 2, generator=g)
    tabs = (bits, ban, bias_ids, bias_vals, hist[:, 0], hist[:, 1])
    return P, tuple(t.to(dev) for t in tabs)


def _bitmask_inplace(x, bm, idx):
    ops.apply_token_bitmask_inplace(x, bm, idx)
    return x


def wrapper_calls(dev):
    """(name, fn) for the public wrappers with device tensors and seed=None (torch's generator).
    Every input is made here, outside the calls: copying a Python list to the GPU waits."""
    B, V = 4, 500
    d = dict(device=dev)
    x = torch.randn(B, V, **d)
    probs = x.softmax(-1)
    T0 = torch.tensor(0.8, **d)  # 0-D device tensors: broadcast, never read on the host
    k0, s0, o0 = torch.tensor(20, **d), torch.tensor(5, **d), torch.tensor(9, **d)
    idx = torch.tensor([1, 0], **d)
    T_rows, mp_rows, p_rows = torch.full((B,), 0.7, **d), torch.full((B,), 0.1, **d), torch.full((B,), 0.5, **d)
    offs = torch.arange(B, **d)
    parents, cand, lt, qt = _tree(3, 5, dev)
    tree = dk.build_tree(parents, torch.zeros(3, dtype=torch.int64, **d))
    tr = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling)
    ids = torch.randint(0, V, (B, 2), **d)
    lp = torch.randn(B, 3, V, **d)
    nd = torch.ones(B, dtype=torch.int64, **d)
    plen3, aplen = torch.arange(3, **d), torch.tensor([0, 7, 3], **d)
    aq, ak, av, amask = _attn(3, 5, 12, dev)
    hist = torch.randint(-1, V, (B, 16), **d)
    ban = torch.randint(-1, V, (B, 2), **d)
    bias = torch.randn(B, 2, **d)
    bm = torch.randint(-(2**31), 2**31 - 1, (B, (V + 31) // 32), dtype=torch.int32, **d) | 0x00FF00FF
    xb = x.clone()
    return [
        ("sample", lambda: dk.sample(x, temperature=T0, top_k=k0, top_p=0.9, return_valid=True)),
        ("sample-rows", lambda: dk.sample(x, temperature=T_rows, min_p=mp_rows)),
        ("sample-seed-offset", lambda: dk.sample(x, seed=s0, offset=o0)),
        ("sampling_from_logits", lambda: dk.sampling_from_logits(x, indices=idx)),
        ("sampling_from_probs", lambda: dk.sampling_from_probs(probs, offset=offs)),
        ("top_k_top_p_sampling_from_logits", lambda: dk.top_k_top_p_sampling_from_logits(x, k0, T0)),
        ("top_p_sampling_from_probs", lambda: dk.top_p_sampling_from_probs(probs, p_rows)),
        ("top_k_mask_logits", lambda: dk.top_k_mask_logits(x, k0)),
        ("top_p_renorm_probs", lambda: dk.top_p_renorm_probs(probs, p_rows)),
        ("min_p_renorm_probs", lambda: dk.min_p_renorm_probs(probs, mp_rows)),
        ("softmax", lambda: dk.softmax(x, temperature=T_rows)),
        (
            "chain_speculative_sampling",
            lambda: dk.chain_speculative_sampling(None, ids, lp.softmax(-1), num_draft_tokens=nd),
        ),
        (
            "chain_speculative_sampling_from_logits",
            lambda: dk.chain_speculative_sampling_from_logits(None, ids, lp, temperature=T0),
        ),
        (
            "chain_speculative_sampling_from_logits-filters",
            lambda: dk.chain_speculative_sampling_from_logits(
                None, ids, lp, temperature=T_rows, top_k=k0, top_p=p_rows, min_p=mp_rows, order="joint"
            ),
        ),
        ("greedy_verify", lambda: dk.greedy_verify(ids, lp)),
        ("tree_speculative_sampling", lambda: dk.tree_speculative_sampling(*tr, lt.softmax(-1), qt)),
        ("tree_speculative_sampling_from_logits", lambda: dk.tree_speculative_sampling_from_logits(*tr, lt)),
        (
            "tree_speculative_sampling_from_logits-filters",
            lambda: dk.tree_speculative_sampling_from_logits(
                *tr, lt, qt, temperature=T0, top_k=k0, top_p=0.9, min_p=0.05
            ),
        ),
        ("verify_tree_greedy", lambda: dk.verify_tree_greedy(*tr, lt)),
        ("build_tree", lambda: dk.build_tree(parents, plen3)),
        ("tree_attention", lambda: dk.tree_attention(aq, ak, av, amask, aplen)),
        (
            "sample-whole-step",
            lambda: dk.sample(
                x,
                temperature=T0,
                top_k=k0,
                top_p=0.9,
                repetition_penalty=1.1,
                prompt_token_ids=hist,
                output_token_ids=hist,
                allowed_token_bitmask=bm,
                banned_token_ids=ban,
                top_logprobs=3,
            ),
        ),
        (
            "sample-whole-step-rows",
            lambda: dk.sample(
                x,
                temperature=T_rows,
                typical_p=p_rows + 0.4,
                seed=s0,
                offset=offs,
                order="vllm",
                min_p=mp_rows,
                logit_bias=(ban, bias),
                return_valid=True,
            ),
        ),  # fmt: skip
        ("sample-whole-step-indices", lambda: dk.sample(x, indices=idx, eta=0.01, top_n_sigma=2.0)),
        ("apply_token_bitmask_inplace", lambda: _bitmask_inplace_wrapper(xb, bm, idx)),
        ("apply_penalties", lambda: dk.apply_penalties(x, output_token_ids=hist, frequency_penalty=k0 * 0.01)),
        ("typical_mask_logits", lambda: dk.typical_mask_logits(x, p_rows + 0.4)),
        ("top_h_mask_logits", lambda: dk.top_h_mask_logits(x, T0)),
    ]


def _bitmask_inplace_wrapper(x, bm, idx):
    dk.apply_token_bitmask_inplace(x, bm, indices=idx)
    return x


def _tensors(out):
    out = out if isinstance(out, tuple) else (out,)
    return [t for t in out if isinstance(t, torch.Tensor)]


# ---- GPU: no host sync, graph capture, generator state -----------------------------------------
@gpu
@pytest.mark.parametrize("which", ["ops", "wrappers"])
def test_every_op_is_sync_free(which):
    calls = op_calls("cuda") if which == "ops" else wrapper_calls("cuda")
    for _, fn in calls:  # warm-up: lazy allocations (error flag, generator) outside the check
        fn()
    torch.cuda.synchronize()
    dk.check_errors()
    for name, fn in calls:
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as e:
            raise AssertionError(f"{name} synchronised the host: {e}") from None
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    dk.check_errors()  # none of these inputs is bad


def _capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, _tensors(out)


@gpu
def test_every_op_graph_capture_and_replay():
    for name, fn in op_calls("cuda"):
        want = [t.clone() for t in _tensors(fn())]
        g, static = _capture(fn)
        for t in static:
            t.fill_(0) if t.dtype != torch.bool else t.fill_(False)
        g.replay()
        torch.cuda.synchronize()
        for a, b in zip(want, static):
            assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(), b.nan_to_num())), name


@gpu
def test_device_seed_changes_between_replays():
    x = torch.randn(16, 4000, device="cuda")
    seed = torch.tensor([1], device="cuda")
    fn = lambda: ops.sample(x, None, False, None, 0.9, None, 0, None, 0.95, None, 0.0, 0, seed, 0, 0)  # noqa: E731
    g, (tok, _, _) = _capture(fn)
    for s in (11, 12):
        seed.fill_(s)
        g.replay()
        want = ops.sample(x, None, False, None, 0.9, None, 0, None, 0.95, None, 0.0, 0, None, s, 0)[0]
        assert torch.equal(tok, want)


@gpu
def test_generator_state_advances_like_torch_samplers():
    x = torch.zeros(64, 4000, device="cuda")  # uniform rows: 64 independent draws per call
    torch.cuda.manual_seed(5)
    a = dk.sample(x)
    b = dk.sample(x)
    torch.cuda.manual_seed(5)
    assert torch.equal(dk.sample(x), a)  # reproducible from torch's seed
    assert not torch.equal(a, b)  # the offset advanced
    gen = torch.Generator(device="cuda").manual_seed(5)
    assert torch.equal(dk.sample(x, generator=gen), a)  # an explicit CUDA generator: the same state
    g, (tok,) = _capture(lambda: dk.sample(x))
    draws = []
    for _ in range(3):
        g.replay()
        draws.append(tok.clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


@gpu
def test_whole_step_generator_state_advances():
    x = torch.zeros(64, 4000, device="cuda")
    hist = torch.randint(0, 4000, (64, 8), device="cuda")
    fn = lambda: dk.sample(x, top_k=1000, repetition_penalty=1.3, prompt_token_ids=hist)  # noqa: E731
    torch.cuda.manual_seed(5)
    a, b = fn(), fn()
    torch.cuda.manual_seed(5)
    assert torch.equal(fn(), a) and not torch.equal(a, b)
    g, (tok,) = _capture(fn)
    draws = []
    for _ in range(2):
        g.replay()
        draws.append(tok.clone())
    assert not torch.equal(draws[0], draws[1])


@gpu
def test_whole_step_bad_values_on_cuda_are_deferred():
    x = torch.randn(4, 100, device="cuda")
    dk.check_errors()
    tok, valid = dk.sample(x, typical_p=torch.tensor([0.9, 0.0, 0.9, 0.9], device="cuda"), seed=1, return_valid=True)
    assert valid.tolist() == [True, False, True, True] and tok[1].item() == 0
    with pytest.raises(ValueError, match="pipeline"):
        dk.check_errors()


@gpu
def test_bad_values_on_cuda_are_deferred():
    x = torch.randn(4, 100, device="cuda")
    dk.check_errors()
    tok, valid = dk.sampling_from_logits(x, indices=torch.tensor([0, 9, 1], device="cuda"), seed=1, return_valid=True)
    assert valid.tolist() == [True, False, True] and tok[1].item() == 0
    with pytest.raises(ValueError, match="indices"):
        dk.check_errors()
    dk.check_errors()  # reset


# ---- CPU: the wrappers' CUDA branch reads no tensor value in Python ----------------------------
def test_fake_mode_catches_a_value_read():
    """The harness below is sensitive: a Python read of a fake CUDA tensor's value raises."""
    with FakeTensorMode():
        t = torch.ones(3, device="cuda")
        with pytest.raises(DataDependentOutputException):
            bool((t > 0).any())
        with pytest.raises(DataDependentOutputException):
            t.sum().item()


@pytest.mark.parametrize("i", range(len(wrapper_calls("cpu"))), ids=[n for n, _ in wrapper_calls("cpu")])
def test_wrappers_cuda_branch_reads_no_value(i):
    with FakeTensorMode():
        name, fn = wrapper_calls("cuda")[i]
        outs = _tensors(fn())
        assert outs and all(t.device.type == "cuda" for t in outs), name


def test_pipeline_params_never_pass_through_the_host():
    """The whole step's per-row parameter matrix is built on the logits' device: on the meta device
    (which has no values to copy) any move through the CPU or read of a value would raise."""
    from decodekit.pipeline import pack_params

    m = dict(device="meta")
    P = pack_params(4, torch.device("meta"), temperature=torch.ones(4, **m), top_k=torch.tensor(3, **m), top_p=0.9)
    assert P.device.type == "meta" and P.shape == (4, 13) and P.dtype == torch.float64
    P = pack_params(4, torch.device("meta"), temperature=0.7, min_tokens_to_keep=2)
    assert P.device.type == "meta" and P.shape == (4, 13)


# ---- CPU: the deferred checks (the CUDA bindings' code) with the CPU kernels -------------------
@pytest.fixture
def deferred():
    dk.check_errors()
    dk._set_deferred_checks(True)
    try:
        yield
    finally:
        dk._set_deferred_checks(False)
        try:
            dk.check_errors()
        except ValueError:
            pass


def _raises(match):
    with pytest.raises(ValueError, match=match):
        dk.check_errors()
    dk.check_errors()  # the read reset the flag


def test_every_op_runs_clean_in_deferred_mode(deferred):
    for name, fn in op_calls("cpu"):
        dk._set_deferred_checks(False)
        want = _tensors(fn())
        dk._set_deferred_checks(True)
        got = _tensors(fn())
        for a, b in zip(want, got):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), name
    dk.check_errors()


SAMPLE_BAD = [
    ("indices", dict(idx=[0, 4, 2, -1]), [1, 3]),
    ("temperature", dict(T=[1.0, float("nan"), 0.5, 1e-40]), [1, 3]),
    ("top_k", dict(k=[3.0, 2.5, float("inf"), 4.0]), [1]),
    ("top_p", dict(p=[0.9, 0.0, float("nan"), 1.0]), [1, 2]),
    ("min_p", dict(mp=[0.1, 1.5, -0.1, 0.0]), [1, 2]),
    ("offset", dict(off=[0, -1, 2**48, 5]), [1, 2]),
]


@pytest.mark.parametrize("case", SAMPLE_BAD, ids=[c[0] for c in SAMPLE_BAD])
def test_sample_bad_rows(deferred, case):
    name, bad, rows = case
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3

    def run(vals):
        idx = torch.tensor(vals["idx"]) if "idx" in vals else None
        T = torch.tensor(vals.get("T", [1.0] * 4), dtype=torch.float64)
        k = torch.tensor(vals.get("k", [3.0] * 4), dtype=torch.float64)
        p = torch.tensor(vals.get("p", [0.9] * 4), dtype=torch.float64)
        mp = torch.tensor(vals.get("mp", [0.0] * 4), dtype=torch.float64)
        off = torch.tensor(vals.get("off", [0] * 4))
        return ops.sample(x, idx, False, T, 1.0, k, 0, p, 1.0, mp, 0.0, 0, None, 77, 0, off)

    tok, valid, lp = run(bad)
    _raises(name)
    good = [r for r in range(4) if r not in rows]
    assert valid[rows].tolist() == [False] * len(rows) and tok[rows].tolist() == [0] * len(rows)
    assert lp[rows].tolist() == [0.0] * len(rows)
    clean = {key: [v if r not in rows else None for r, v in enumerate(vals)] for key, vals in bad.items()}
    fixed = {"idx": [0, 1, 2, 3], "T": [1.0] * 4, "k": [3.0] * 4, "p": [0.9] * 4, "mp": [0.0] * 4, "off": [0] * 4}
    clean = {key: [v if v is not None else fixed[key][r] for r, v in enumerate(vals)] for key, vals in clean.items()}
    ctok, cvalid, clp = run(clean)
    assert torch.equal(tok[good], ctok[good]) and torch.equal(lp[good], clp[good]) and bool(cvalid[good].all())


def test_filter_bad_rows_are_nan(deferred):
    x = torch.randn(3, 200)
    out = ops.filter(x, 0, False, None, 1.0, None, 0, torch.tensor([0.5, -1.0, 0.7]), 1.0, None, 0.0, 0)
    _raises("top_p")
    want = ops.filter(x, 0, False, None, 1.0, None, 0, torch.tensor([0.5, 1.0, 0.7]), 1.0, None, 0.0, 0)
    assert bool(out[1].isnan().all())
    assert torch.equal(out[[0, 2]], want[[0, 2]])
    ops.filter(x, 2, False, torch.tensor([1.0, 0.0, 2.0]), 1.0, *NOF[2:])  # softmax: temperature 0 is bad
    _raises("temperature")


def test_chain_bad_rows(deferred):
    g = torch.Generator().manual_seed(2)
    B, N, V = 4, 3, 50
    p = torch.randn(B, N + 1, V, generator=g).softmax(-1)
    ids = torch.randint(0, V, (B, N), generator=g)
    nd = torch.tensor([3, 5, 2, 3])  # row 1: num_draft_tokens > N
    ids_bad = ids.clone()
    ids_bad[3, 1] = V  # row 3: a draft id out of range
    ids_bad[2, 2] = -7  # row 2: out of range but beyond num_draft_tokens[2]: ignored
    out, acc, emi = ops.chain_verify(p, ids_bad, None, nd, 0, *NOF, None, 3, 0)
    with pytest.raises(ValueError, match="num_draft_tokens.*draft_token_ids|draft_token_ids.*num_draft_tokens"):
        dk.check_errors()
    assert out[[1, 3]].eq(-1).all() and acc[[1, 3]].eq(0).all() and emi[[1, 3]].eq(0).all()
    w_out, w_acc, w_emi = ops.chain_verify(p, ids, None, torch.tensor([3, 3, 2, 3]), 0, *NOF, None, 3, 0)
    for a, b in ((out, w_out), (acc, w_acc), (emi, w_emi)):
        assert torch.equal(a[[0, 2]], b[[0, 2]])


def test_chain_logits_bad_filter_rows(deferred):
    """The logits form's per-row filters under the deferred checks (the CUDA binding's path): a bad
    top_p / top_k / min_p value makes its row bad (nothing emitted), the others are verified with
    their filters exactly as with the eager checks."""
    g = torch.Generator().manual_seed(3)
    B, N, V = 4, 3, 60
    lp = torch.randn(B, N + 1, V, generator=g) * 2
    ids = torch.randint(0, V, (B, N), generator=g)
    k = torch.tensor([5.0, 2.5, 0.0, 9.0])  # row 1: not an integer
    p = torch.tensor([0.9, 0.8, float("nan"), 1.0])  # row 2: NaN
    mp = torch.tensor([0.0, 0.1, 0.05, 1.5])  # row 3: > 1
    out, acc, emi = ops.chain_verify(lp, ids, None, None, 1, None, 0.8, k, 0, p, 1.0, mp, 0.0, 0, None, 3, 0)
    with pytest.raises(ValueError, match="top_k.*top_p.*min_p"):
        dk.check_errors()
    assert out[1:].eq(-1).all() and acc[1:].eq(0).all() and emi[1:].eq(0).all()
    dk._set_deferred_checks(False)
    w = ops.chain_verify(lp[:1], ids[:1], None, None, 1, None, 0.8, k[:1], 0, p[:1], 1.0, mp[:1], 0.0, 0, None, 3, 0)
    dk._set_deferred_checks(True)
    assert torch.equal(out[:1], w[0]) and torch.equal(acc[:1], w[1]) and torch.equal(emi[:1], w[2])


def _tree_case(B=4, T=7):
    parents, cand, lt, qt = _tree(B, T, "cpu")
    tree = dk.build_tree(parents, 0)
    return tree, cand, lt.softmax(-1)


@pytest.mark.parametrize("bad", ["range", "shared", "cycle", "coins"])
def test_tree_bad_rows_are_skipped(deferred, bad):
    tree, cand, pt = _tree_case()
    ri, nt = tree.retrive_index.clone(), tree.retrive_next_token.clone()
    co = ()
    rows, arg = [1], "retrive_index"
    if bad == "range":
        ri[1, 3] = 4 * 7  # outside [0, B*T)
    elif bad == "shared":
        ri[1, 2] = ri[2, 5]  # rows 1 and 2 share a predicts slot: both skipped
        rows = [1, 2]
    elif bad == "cycle":
        nt[1, 0] = 0  # the root links to itself
        arg = "tree"
    else:
        c = torch.rand(4, 7, generator=torch.Generator().manual_seed(0))
        c[1, 4] = 1.5
        co = (c, torch.full((4,), 0.5))
        arg = "coins"
    args = (cand, ri, nt, tree.retrive_next_sibling, pt, None, 7, 0, *NOF, None, 5, 0, *co)
    pred, ai, an = ops.tree_verify(*args)
    _raises(arg)
    B, T = cand.shape
    pv = pred.view(B, T)
    for r in rows:
        assert ai[r].eq(-1).all() and an[r] == 0
    good = [r for r in range(B) if r not in rows]
    if co:
        co = (co[0].clamp(0, 1), co[1])
    dk._set_deferred_checks(False)
    w_pred, w_ai, w_an = ops.tree_verify(
        cand,
        tree.retrive_index,
        tree.retrive_next_token,
        tree.retrive_next_sibling,
        pt,
        None,
        7,
        0,
        *NOF,
        None,
        5,
        0,
        *co,
    )
    dk._set_deferred_checks(True)
    assert torch.equal(ai[good], w_ai[good]) and torch.equal(an[good], w_an[good])
    if bad != "shared":  # the canonical layout: row b owns slots b*T .. b*T + T - 1
        assert torch.equal(pv[good], w_pred.view(B, T)[good]) and pv[rows].eq(-1).all()


def test_build_tree_bad_rows(deferred):
    parents, _, _, _ = _tree(3, 6, "cpu")
    parents[2, 4] = 5  # row 2: a parent after its child
    plen = torch.tensor([4, -3, 0])  # row 1: negative prefix
    out = ops.build_tree(parents, plen)
    with pytest.raises(ValueError, match="prefix_lens.*parents|parents.*prefix_lens"):
        dk.check_errors()
    mask, pos, ri, nt, ns = out
    assert mask[1:].eq(0).all() and pos.view(3, 6)[1:].eq(-1).all()
    assert all(t[1:].eq(-1).all() for t in (ri, nt, ns))
    want = dk.build_tree(parents[:1], plen[:1])
    assert torch.equal(mask[:1], want.tree_mask) and torch.equal(pos[:6], want.positions)
    assert torch.equal(ri[:1], want.retrive_index) and torch.equal(nt[:1], want.retrive_next_token)


def test_tree_attention_bad_rows_are_nan(deferred):
    q, k, v, mask = _attn(3, 5, 12, "cpu")
    out, lse = ops.tree_attention(q, k, v, mask, torch.tensor([0, 8, 7]), None, "NHD")  # 8 + 5 > 12
    _raises("prefix_lens")
    assert out[1].isnan().all() and lse[1].isnan().all()
    want, wlse = ops.tree_attention(q, k, v, mask, torch.tensor([0, 0, 7]), None, "NHD")
    assert torch.equal(out[[0, 2]], want[[0, 2]]) and torch.equal(lse[[0, 2]], wlse[[0, 2]])


def _pipe_case():
    """4 rows, V=300: params with every column on, bitmask, bans, bias, histories (CPU)."""
    P, tabs = _pipe_inputs(4, 300, "cpu")
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(8)) * 3
    return x, P, list(tabs)


PIPE_BAD = [  # (what, rows, the words check_errors must name)
    ("params", [1, 3], "pipeline: a sampling parameter"),
    ("ids", [2], "banned_token_ids"),
    ("bias", [0], "logit_bias"),
    ("indices", [1], "indices"),
    ("offset", [3], "offset"),
]


@pytest.mark.parametrize("case", PIPE_BAD, ids=[c[0] for c in PIPE_BAD])
def test_pipeline_bad_rows(deferred, case):
    """The forced deferred checks on the CPU: a bad value gives its row the defined result (sample:
    token 0, valid False, logprob 0, rank 0, top ids 0 / -inf; mask: the raw row for a bad value,
    NaN for a bad index), the other rows are what the eager op gives, and check_errors names it."""
    what, rows, words = case
    x, P, tabs = _pipe_case()
    good_P, good_tabs = P.clone(), [t.clone() for t in tabs]
    idx = torch.tensor([3, 0, 2, 1])
    offs = torch.tensor([0, 5, 9, 2])
    bad_idx, bad_offs = idx, offs
    if what == "params":
        P[1, 2] = 0.0  # top_p 0
        P[3, 12] = 0.5  # min_tokens_to_keep not an integer
    elif what == "ids":
        tabs[1][2, 1] = 300  # banned id == V
    elif what == "bias":
        tabs[3][0, 1] = float("inf")
    elif what == "indices":
        bad_idx = torch.tensor([3, 4, 2, 1])
    else:
        bad_offs = torch.tensor([0, 5, 9, 2**48])
    out = ops.pipeline(x, bad_idx, P, 0, *tabs, 0, 3, False, True, None, 7, 0, bad_offs)
    _raises(words)
    tok, valid, lp, rank, tid, tlp, _ = out
    assert valid[rows].tolist() == [False] * len(rows) and tok[rows].eq(0).all() and lp[rows].eq(0).all()
    assert rank[rows].eq(0).all() and tid[rows].eq(0).all() and tlp[rows].eq(float("-inf")).all()
    dk._set_deferred_checks(False)
    want = ops.pipeline(x, idx, good_P, 0, *good_tabs, 0, 3, False, True, None, 7, 0, offs)
    dk._set_deferred_checks(True)
    good = [r for r in range(4) if r not in rows]
    for a, b in zip(out[:6], want[:6]):
        assert torch.equal(a[good], b[good])
    assert bool(want[1][rows].all())  # the rows are valid once their values are fixed
    if what == "offset":
        return
    masked = ops.pipeline(x, bad_idx, P, 0, *tabs, 1, 0, False, False, None, 0, 0)[6]
    _raises(words)
    dk._set_deferred_checks(False)
    want_m = ops.pipeline(x, idx, good_P, 0, *good_tabs, 1, 0, False, False, None, 0, 0)[6]
    dk._set_deferred_checks(True)
    assert torch.equal(masked[good], want_m[good])
    for r in rows:
        assert bool(masked[r].isnan().all()) if what == "indices" else torch.equal(masked[r], x[idx[r]])


def test_bitmask_inplace_bad_index_is_skipped(deferred):
    x = torch.randn(4, 100)
    bm = torch.randint(-(2**31), 2**31 - 1, (4, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    got = x.clone()
    dk.apply_token_bitmask_inplace(got, bm, indices=torch.tensor([2, 7, 0, -1]))
    _raises("indices")
    want = x.clone()
    dk.apply_token_bitmask_inplace(want, bm, indices=torch.tensor([2, 0]))
    assert torch.equal(got, want) and not torch.equal(got, x)


def test_pipeline_offset_tensors_and_one_seed_tensor():
    """The whole step takes offset tensors ([1] or one per row) and a one-seed tensor like sample:
    an int offset and an offset tensor add; row r with offsets[r] draws as offset=offsets[r] alone."""
    x = torch.randn(5, 400, generator=torch.Generator().manual_seed(3))
    kw = dict(top_p=0.9, repetition_penalty=1.2, prompt_token_ids=torch.randint(0, 400, (5, 8)))
    a = dk.sample(x, seed=11, offset=6, **kw)
    assert torch.equal(dk.sample(x, seed=11, offset=torch.tensor([6]), **kw), a)
    assert torch.equal(dk.sample(x, seed=torch.tensor([11]), offset=torch.tensor([6]), **kw), a)
    offs = torch.tensor([0, 6, 2**40, 9, 6])
    rows = dk.sample(x, seed=11, offset=offs, **kw)
    for r, o in enumerate(offs.tolist()):
        assert rows[r] == dk.sample(x, seed=11, offset=o, **kw)[r]
    draws = torch.stack([dk.sample(x, seed=11, offset=o, **kw) for o in range(8)])
    assert (draws != draws[0]).any()  # the offset changes the stream
    with pytest.raises(ValueError, match="offset"):
        dk.sample(x, seed=1, offset=torch.tensor([0, 1, 2, 3, -1]), **kw)


# ---- seeds and offsets in memory (decodekit/rng.h row_rng_key) ---------------------------------
def test_offset_tensors_on_cpu():
    x = torch.randn(5, 400, generator=torch.Generator().manual_seed(3))
    a = dk.sample(x, top_p=0.9, seed=11, offset=6)
    assert torch.equal(dk.sample(x, top_p=0.9, seed=11, offset=torch.tensor([6])), a)
    offs = torch.tensor([0, 6, 2**40, 9, 6])
    rows = dk.sample(x, top_p=0.9, seed=11, offset=offs)
    for r, o in enumerate(offs.tolist()):
        assert rows[r] == dk.sample(x, top_p=0.9, seed=11, offset=o)[r]
    # an int offset and an offset tensor add (as the generator's offset and the captured one do)
    plain = dk.sample(x, seed=11, offset=6)
    assert torch.equal(ops.sample(x, None, False, *NOF[:8], 0, None, 11, 2, torch.tensor([4]))[0], plain)
    with pytest.raises(ValueError, match="offset"):
        dk.sample(x, seed=1, offset=torch.tensor([0, 1, 2, 3, -1]))
    with pytest.raises(ValueError, match="offset"):
        dk.sample(x, seed=1, offset=torch.tensor([1, 2]))
    ids = torch.randint(0, 400, (5, 2))
    pt = torch.randn(5, 3, 400).softmax(-1)
    c1 = dk.chain_speculative_sampling(None, ids, pt, seed=4, offset=3)
    c2 = dk.chain_speculative_sampling(None, ids, pt, seed=4, offset=torch.tensor([3]))
    assert all(torch.equal(a, b) for a, b in zip(c1, c2))


def test_emulated_kernels_read_seed_and_offsets_in_memory():
    emu = pytest.importorskip("emu")
    if emu.compiler() is None:
        pytest.skip("no host C++ compiler to build the CUDA emulator")
    lib = emu.load()
    lib.dk_emu_set_device_rng.argtypes = [emu.ctypes.c_void_p, emu.ctypes.c_void_p, emu.ctypes.c_int64]
    x = cc.logits_family("randn", 5, 3000, seed=4)
    args = cc.sample_args(x, False, dict(k=50, p=0.9), seed=99, offset=0)
    seed = torch.tensor([99])
    offs = torch.tensor([0, 7, 2**33 + 1, 7, 5])
    with lib.fence() as F:  # the kernels read these through the pointers: fenced like the arguments
        try:
            lib.dk_emu_set_device_rng(F.ptr(seed, "seed"), F.ptr(offs, "offsets"), 1)
            got = emu.sample(*args[:13], 12345, 0)  # the scalar seed is ignored: seed_ptr wins
            got_g = emu.gumbel_sample(x, None, None, 12345, 0)
        finally:
            lib.dk_emu_set_device_rng(None, None, 0)
    for r, o in enumerate(offs.tolist()):
        want = ops.sample(*args[:14], o)
        assert got[0][r] == want[0][r] and got[1][r] == want[1][r], r
        assert got_g[0][r] == ops.gumbel_sample(x, None, None, 99, o)[0][r], r


def test_emulated_tree_kernel_skips_rows():
    emu_spec = pytest.importorskip("emu_spec")
    if emu_spec.compiler() is None:
        pytest.skip("no host C++ compiler to build the emulator")
    lib = emu_spec.load()
    lib.dk_emu_set_tree_skip.argtypes = [emu_spec.ctypes.c_void_p]
    tree, cand, pt = _tree_case()
    skip = torch.tensor([False, True, False, True])
    args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, pt, None, 7, 0)
    with lib.fence() as F:  # the kernel reads it through the pointer: fenced like the arguments
        try:
            lib.dk_emu_set_tree_skip(F.ptr(skip, "skip"))
            pred, ai, an, err, _ = emu_spec.tree_verify(*args, None, 1.0, None, 5, 0)
        finally:
            lib.dk_emu_set_tree_skip(None)
    want = ops.tree_verify(*args, *NOF, None, 5, 0)
    pv, wv = pred.view(4, 7), want[0].view(4, 7)
    assert torch.equal(pv[[0, 2]], wv[[0, 2]]) and torch.equal(ai[[0, 2]], want[1][[0, 2]])
    assert pv[[1, 3]].eq(-1).all() and ai[[1, 3]].eq(-1).all() and an[[1, 3]].eq(0).all()
    assert err.eq(0).all()
