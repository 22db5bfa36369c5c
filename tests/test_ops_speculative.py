"""Chain / tree verification and build_tree on every backend (tests/backends.py): "cpu",
"cuda_emu" (csrc/cuda/speculative.cuh's kernels on CPU threads) and "cuda" (a real GPU).

On every backend a case's outputs are checked against reference.py (the specification), which
draws decodekit's own Philox uniforms: the probability and greedy forms and build_tree give the
reference's outputs exactly; so does the logits form with a temperature / filters on these inputs
(reference.py filters in float64, so in general it may differ where a uniform falls within
rounding of a threshold: test_speculative.py; it does not here). reference.py's outputs are
computed once per case and shared by the backends. On "cuda_emu" and "cuda" the outputs must also
be the CPU op's exactly (tokens, counts, accept indices, tree errors, build_tree outputs). Under the emulator
every case runs at the production block size (speculative.cuh's kThreads) under two randomised
thread orders (`_schedules`); the emulator-only tests below check the tree kernel's error codes,
the small block size and the kernels' early exits (work counters).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backends as bk
import decodekit as dk
import emu
import emu_spec
from decodekit import reference as R
from test_speculative import fixed_tree_case

ops = torch.ops.decodekit
NOF = (None, 1.0, None, 0, None, 1.0, None, 0.0, 0)  # no filters
ORDER = {0: "sequential", 1: "joint"}


def _schedules(name):
    """Two schedule seeds per case (never 0, the fixed thread order), different across cases."""
    h = sum(map(ord, name))
    return [1 + 2 * h, 2 + 2 * h]


def _named(cases):
    """Every backend runs the same cases; the case item carries its name (the schedule seeds)."""
    return dict.fromkeys(bk.BACKENDS, [(name, (name, c)) for name, c in cases])


def _run(backend, cpu, op, emu_fn, args, emu_args, emu_kw, scheds, what, n_out=3):
    """The backend's outputs of one case (the first n_out), checked against the CPU's `cpu` on
    cuda_emu (every schedule seed) and cuda. Returns the outputs to check against reference.py."""
    if backend == "cpu":
        return cpu
    if backend == "cuda_emu":
        # both launch plans: nodes resolved on the walk (0 SMs) and prepared ahead (prepare_plan
        # with a large SM count: logits targets), one per schedule seed (both if only one seed)
        plans = [0, 1 << 20]
        runs = list(zip(scheds, plans)) if len(scheds) > 1 else [(scheds[0], p) for p in plans]
        try:
            for sched, sms in runs:
                emu.set_schedule_seed(sched)
                emu_spec.set_sms(sms)
                got = emu_fn(*emu_args, **emu_kw)
                plan = "prepared nodes" if emu_spec.last_prepared() else "nodes on the walk"
                _same(cpu, got[:n_out], f"{what}, schedule {sched}, {plan}")
                assert emu_spec.prepared_mismatch() == 0, f"{what}: a prepared node differs from the walk's"
                if n_out == 3 and len(got) > 3 and emu_fn is emu_spec.tree_verify:
                    assert bool((got[3] == 0).all())
        finally:
            emu_spec.set_sms(0)
        return got[:n_out]
    got = bk.on_cuda(op, *args)
    _same(cpu, got, f"{what}, cuda")
    # the other plan: DECODEKIT_SPLIT_ROWS=0 (read per call) never prepares the nodes ahead
    old = os.environ.get("DECODEKIT_SPLIT_ROWS")
    os.environ["DECODEKIT_SPLIT_ROWS"] = "0"
    try:
        _same(cpu, bk.on_cuda(op, *args), f"{what}, cuda, nodes on the walk")
    finally:
        if old is None:
            del os.environ["DECODEKIT_SPLIT_ROWS"]
        else:
            os.environ["DECODEKIT_SPLIT_ROWS"] = old
    return got


def _filter_kw(T, filt):
    """reference.py's keyword arguments for (temperature, the op's filter tuple)."""
    k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order = filt
    return dict(
        temperature=T,
        top_k=k_arr if k_arr is not None else (k_val or None),
        top_p=p_arr if p_arr is not None else (None if p_val >= 1.0 else p_val),
        min_p=mp_arr if mp_arr is not None else (mp_val or None),
        order=ORDER[order],
    )


_REF = {}  # reference.py's outputs per case: the same for every backend, computed once


def _reference(key, fn, *args, **kw):
    if key not in _REF:
        with bk.one_thread():
            _REF[key] = fn(*args, **kw)
    return _REF[key]


def _check_chain_reference(got, target, ids, draft, nd, kind, T, filt, seed, off, what):
    if kind == 0:
        exp = _reference(
            what, R.chain_speculative_sampling, draft, ids, target, num_draft_tokens=nd, seed=seed, offset=off
        )
    else:  # (the greedy rows and the filtered targets of reference.py's logits form)
        kw = _filter_kw(T, filt)
        f = R.chain_speculative_sampling_from_logits
        exp = _reference(what, f, draft, ids, target, num_draft_tokens=nd, seed=seed, offset=off, **kw)
    _same(exp, got, f"{what}: reference.py")


def _check_tree_reference(got, links, target, draft, W, kind, T, filt, seed, off, co, what):
    if kind == 0:
        f, kw = R.tree_speculative_sampling, dict(seed=seed, offset=off, **co)
        exp = _reference(what, f, *links, target, draft, num_speculative_tokens=W, **kw)
    elif kind == 2:
        exp = _reference(what, R.verify_tree_greedy, *links, target, num_speculative_tokens=W)
    else:
        f, kw = R.tree_speculative_sampling_from_logits, dict(seed=seed, offset=off, **_filter_kw(T, filt), **co)
        exp = _reference(what, f, *links, target, draft, num_speculative_tokens=W, **kw)
    _same(exp, got, f"{what}: reference.py")


def _gen(s):
    return torch.Generator().manual_seed(s)


def _chain_inputs(B=6, N=3, V=5000, seed=0):
    g = _gen(seed)
    lp = torch.randn(B, N + 1, V, generator=g) * 1.5
    p = lp.softmax(-1)
    q = (lp[:, :N] + torch.randn(B, N, V, generator=g) * 0.5).softmax(-1)
    ids = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, N)
    return p, q, ids, lp


def _same(a, b, what):
    for x, y, name in zip(a, b, ("0", "1", "2")):
        assert torch.equal(x.long(), y.long()), f"{what}: output {name}\n{x}\n{y}"


CHAIN = [
    ("probs-draft-ragged", dict(kind=0, draft=True, ragged=True, seed=11)),
    ("probs-onehot-rowseeds", dict(kind=0, draft=False, rowseeds=True, offset=2**40 + 3)),
    ("logits-temp-draft", dict(kind=1, draft=True, T=0.8)),
    ("logits-temprows-bf16-onehot", dict(kind=1, draft=False, T="rows", dtype=torch.bfloat16)),
    ("greedy-f16", dict(kind=1, draft=False, T=0.0, dtype=torch.float16, ragged=True)),
]


def _tree_inputs(B=5, V=5000, seed=0):
    parents, lt, qt, cand = fixed_tree_case(B, V, seed)
    return dk.build_tree(parents, 0), cand, lt, qt


TREE = [
    ("probs-draft", dict(kind=0, draft=True)),
    ("probs-onehot-rowseeds-W2", dict(kind=0, draft=False, rowseeds=True, W=2)),
    ("logits-temp-draft", dict(kind=1, draft=True, T=1.1)),
    ("greedy-logits", dict(kind=1, draft=False, T=0.0)),
    ("greedy-ids", dict(kind=2, draft=False)),
    ("probs-draft-repeats", dict(kind=0, draft=True, dups=True)),
    ("probs-onehot-repeats", dict(kind=0, draft=False, dups=True)),
    ("greedy-ids-repeats", dict(kind=2, draft=False, dups=True)),
    ("probs-onehot-coins", dict(kind=0, draft=False, dups=True, coins=(1.0, 1.0))),
    ("logits-temp-coins-thresholds", dict(kind=1, draft=False, T=0.8, coins=(0.3, 0.6))),
]


@pytest.mark.parametrize("backend, i, case", bk.params(_named(CHAIN)))
def test_chain(backend, i, case):
    name, c = case
    p, q, ids, lp = _chain_inputs(seed=len(name))
    B, N = ids.shape
    kind = c["kind"]
    target = p if kind == 0 else lp.to(c.get("dtype", torch.float32))
    draft = q if c.get("draft") else None
    nd = torch.tensor([0, 3, 1, 2, 3, 2])[:B] if c.get("ragged") else None
    seed_arr = torch.randint(0, 2**62, (B,), generator=_gen(7)) if c.get("rowseeds") else None
    seed_val, off = c.get("seed", 5), c.get("offset", 0)
    T = c.get("T", 1.0)
    T_arr = torch.tensor([0.0, 1.0, 0.7, 0.0, 1.3, 0.9]) if T == "rows" else None
    T_val = 1.0 if T == "rows" else T
    args = (target, ids, draft, nd, kind, T_arr, T_val, *NOF[2:], seed_arr, seed_val, off)
    cpu = ops.chain_verify(*args)
    emu_args = (target, ids, draft, nd, kind, T_arr, T_val, seed_arr, seed_val, off)
    got = _run(backend, cpu, ops.chain_verify, emu_spec.chain_verify, args, emu_args, {}, _schedules(name), name)
    seed = seed_arr if seed_arr is not None else seed_val
    T_ref = T_arr if T_arr is not None else T_val
    _check_chain_reference(got, target, ids, draft, nd, kind, T_ref, NOF[2:], seed, off, f"chain {name}")


@pytest.mark.parametrize("backend, i, case", bk.params(_named(TREE)))
def test_tree(backend, i, case):
    name, c = case
    tree, cand, lt, qt = _tree_inputs(seed=len(name))
    B, T = cand.shape
    kind = c["kind"]
    target = lt.softmax(-1) if kind == 0 else (lt if kind == 1 else lt.argmax(-1))
    draft = qt if c.get("draft") else None
    seed_arr = torch.randint(0, 2**62, (B,), generator=_gen(3)) if c.get("rowseeds") else None
    W = c.get("W", T)
    if c.get("dups"):  # repeated sibling tokens: node 2 repeats node 1, node 5 repeats node 4
        cand = cand.clone()
        cand[:, 2] = cand[:, 1]
        cand[:, 5] = cand[:, 4]
        if kind == 2:  # the target picks the repeated token at the root of some rows
            target = target.clone()
            target[::2, 0] = cand[::2, 1]
    co = {}
    if c.get("coins"):
        g = _gen(5)
        co = dict(
            coins=torch.rand(B, T, generator=g),
            coins_final=torch.rand(B, generator=g),
            threshold_single=c["coins"][0],
            threshold_acc=c["coins"][1],
        )
    links = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling)
    Tv = c.get("T", 1.0)
    args = (*links, target, draft, W, kind, None, Tv, *NOF[2:], seed_arr, 9, 0, *co.values())
    cpu = ops.tree_verify(*args)
    emu_args = (*links, target, draft, W, kind, None, Tv, seed_arr, 9, 0)
    got = _run(backend, cpu, ops.tree_verify, emu_spec.tree_verify, args, emu_args, co, _schedules(name), name)
    seed = seed_arr if seed_arr is not None else 9
    _check_tree_reference(got, links, target, draft, W, kind, Tv, NOF[2:], seed, 0, co, f"tree {name}")


@bk.needs_emu
def test_emu_tree_errors_match_cpu():
    tree, cand, lt, qt = _tree_inputs(B=3, V=40)
    nt = tree.retrive_next_token.clone()
    nt[1, 3] = 1  # row 1: a cycle 1 -> 3 -> 1
    cand2 = cand.clone()
    cand2[2, 2] = cand2[2, 1]  # row 2: repeated sibling tokens (allowed)
    _, _, _, err, node = emu_spec.tree_verify(
        cand2, tree.retrive_index, nt, tree.retrive_next_sibling, lt.softmax(-1), None, 9, 0
    )
    assert err.tolist() == [0, 7, 0]  # row 1: reached twice
    with pytest.raises(ValueError, match="batch row 1 .* reached twice"):
        dk.tree_speculative_sampling(cand2, tree.retrive_index, nt, tree.retrive_next_sibling, lt.softmax(-1))


@pytest.mark.parametrize("backend", [pytest.param(b, marks=bk.MARKS[b]) for b in bk.BACKENDS])
def test_build_tree(backend):
    """build_tree on 70 rows (more than one block of rows) of random trees: reference.py's outputs
    (dtypes and values) on every backend, the CPU op's on cuda_emu / cuda; the emulated kernel's
    error codes for invalid parents."""
    g = _gen(4)
    for T in (1, 9, 20):
        B = 70  # more than one block of rows
        parents = torch.tensor(
            [[-1] + [int(torch.randint(0, t, (1,), generator=g)) for t in range(1, T)] for _ in range(B)]
        )
        prefix = torch.randint(0, 100, (B,), generator=g)
        cpu = ops.build_tree(parents, prefix)
        if backend == "cpu":
            got = cpu
        elif backend == "cuda_emu":
            got, err, _ = emu_spec.build_tree(parents, prefix)
            assert bool((err == 0).all())
            assert all(torch.equal(a, b) for a, b in zip(cpu, got))
        else:
            got = bk.on_cuda(ops.build_tree, parents, prefix)
            assert all(torch.equal(a, b) for a, b in zip(cpu, got))
        with bk.one_thread():
            exp = R.build_tree(parents, prefix)
        for a, b in zip(got, exp):
            assert a.dtype == b.dtype and torch.equal(a, b), T
    if backend == "cuda_emu":
        _, err, node = emu_spec.build_tree(torch.tensor([[-1, 0, -1], [-1, 2, 1]]), torch.zeros(2, dtype=torch.int64))
        assert err.tolist() == [2, 4] and node.tolist() == [2, 1]


@bk.needs_emu
def test_emu_bad_logits_rows_and_real_block_size():
    p, q, ids, lp = _chain_inputs(B=4, V=3000, seed=9)
    lp[1, 0, 5] = float("nan")
    lp[2, 1] = float("-inf")
    emu.set_schedule_seed(5)
    for threads in (64, None):  # None: the production block size
        cpu = ops.chain_verify(lp, ids, q, None, 1, None, 0.9, *NOF[2:], None, 3, 0)
        got = emu_spec.chain_verify(lp, ids, q, None, 1, None, 0.9, None, 3, 0, threads=threads)
        _same(cpu, got, f"bad rows, {threads or 'production'} threads")


# ---- the logits form with filters: the filtered node target (select_row + the CPU's list / chunk
# choice) gives the CPU's tokens, chain and tree, at the production block size ------------------
def _filters(c, B):
    """(k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order): scalars, or per-row tensors with some
    rows disabled (k = 0, p = 1, min_p = 0) when c["rows"]."""
    k, p, mp = c.get("k", 0), c.get("p", 1.0), c.get("mp", 0.0)
    order = c.get("order", 0)
    if not c.get("rows"):
        return (None, k, None, p, None, mp, order)
    g = _gen(31)
    ks = torch.tensor([k, 0, 3 * k + 1, 1, k, 7][:B]) if k else None
    ps = torch.tensor([p, 1.0, 0.5, 0.97, 0.3, p][:B]) if p < 1.0 else None
    mps = (torch.rand(B, generator=g) * 2 * mp).index_fill(0, torch.tensor([1]), 0.0) if mp > 0 else None
    return (ks, 0, ps, 1.0, mps, 0.0, order)


FILTERED = [
    # name, case: k / p / mp / order / rows (per-row tensors) / dtype / draft / scale / V / B
    ("topk", dict(k=20)),
    ("topp-list", dict(p=0.6, scale=3.0)),
    ("topp-chunked", dict(p=0.95, scale=0.5)),  # |S| > kListMax: the chunked draw over the row
    ("minp", dict(mp=0.05)),
    ("minp-tiny-chunked", dict(mp=1e-6, scale=0.5)),
    ("k-p-seq", dict(k=300, p=0.8, draft=True)),
    ("k-p-joint", dict(k=300, p=0.8, order=1, draft=True)),
    ("k-p-mp-seq-rows-bf16", dict(k=40, p=0.9, mp=0.1, rows=True, dtype=torch.bfloat16, draft=True)),
    ("k-p-mp-joint-rows-f16", dict(k=40, p=0.9, mp=0.1, order=1, rows=True, dtype=torch.float16)),
    ("p-mp-rows-draft", dict(p=0.7, mp=0.05, rows=True, draft=True, scale=2.0)),
    ("k-p-V128256", dict(k=50, p=0.9, draft=True, V=128256, B=2, scale=3.0)),
]


def _support_sizes(target, T_arr, T_val, filt):
    """|S| at every node (the CPU filter op: finite entries of the masked logits), [B, R]."""
    B, R, V = target.shape
    k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order = filt

    def rows(t):
        return None if t is None else t.repeat_interleave(R)

    T = T_arr if T_arr is not None else torch.full((B,), T_val)
    T = torch.where(T == 0, torch.ones_like(T), T)  # greedy rows: no filter anyway
    x = target.reshape(B * R, V)
    m = ops.filter(x, 0, False, rows(T), 1.0, rows(k_arr), k_val, rows(p_arr), p_val, rows(mp_arr), mp_val, order)
    return m.float().isfinite().sum(-1).reshape(B, R)


def _check_coverage(name, sizes):
    """The case exercises what its name says: the chunked draw (|S| > kListMax) somewhere in the
    "chunked" cases, a listed S (|S| <= kListMax) somewhere in the others."""
    if "chunked" in name:
        assert int(sizes.max()) > 2048, name
    else:
        assert int(sizes.min()) <= 2048, name


def _filtered_chain_inputs(c, seed):
    B, V = c.get("B", 6), c.get("V", 5000)
    p, q, ids, lp = _chain_inputs(B=B, V=V, seed=seed)
    lp = lp / 1.5 * c.get("scale", 1.5)
    q = (lp[:, :-1] + torch.randn(lp[:, :-1].shape, generator=_gen(seed + 1))).softmax(-1)
    # drafts mostly inside the filtered support: the argmax of the draft row, or a draft sample
    top = q.argmax(-1)
    pick = torch.rand(ids.shape, generator=_gen(seed + 2)) < 0.7
    ids = torch.where(pick, top, torch.multinomial(q.reshape(-1, V), 1, generator=_gen(seed + 3)).reshape(ids.shape))
    return lp, q, ids


@pytest.mark.parametrize("backend, i, case", bk.params(_named(FILTERED)))
def test_chain_filters(backend, i, case):
    name, c = case
    lp, q, ids = _filtered_chain_inputs(c, seed=len(name))
    B, N = ids.shape
    target = lp.to(c.get("dtype", torch.float32))
    draft = q if c.get("draft") else None
    filt = _filters(c, B)
    T_arr = torch.tensor([0.9, 1.0, 0.7, 0.0, 1.3, 0.8])[:B] if c.get("rows") else None
    T_val = 0.9
    nd = torch.tensor([3, 0, 1, 2, 3, 2])[:B]
    _check_coverage(name, _support_sizes(target, T_arr, T_val, filt))
    args = (target, ids, draft, nd, 1, T_arr, T_val, *filt, None, 77, 0)
    cpu = ops.chain_verify(*args)
    emu_args = (target, ids, draft, nd, 1, T_arr, T_val, None, 77, 0)
    scheds = _schedules(name)[: 1 if c.get("V", 0) > 10**5 else 2]
    got = _run(backend, cpu, ops.chain_verify, emu_spec.chain_verify, args, emu_args, dict(filters=filt), scheds, name)
    T_ref = T_arr if T_arr is not None else T_val
    _check_chain_reference(got, target, ids, draft, nd, 1, T_ref, filt, 77, 0, f"chain filters {name}")


@pytest.mark.parametrize("backend, i, case", bk.params(_named(FILTERED)))
def test_tree_filters(backend, i, case):
    name, c = case
    B, V = c.get("B", 5), c.get("V", 5000)
    tree, cand, lt, qt = _tree_inputs(B=B, V=V, seed=len(name) + 100)
    lt = lt * c.get("scale", 1.5)
    qt = (lt + torch.randn(lt.shape, generator=_gen(len(name)))).softmax(-1)
    if not c.get("draft"):
        qt = None
    target = lt.to(c.get("dtype", torch.float32))
    filt = _filters(c, B)
    T_arr = torch.tensor([0.9, 1.0, 0.7, 0.0, 1.3])[:B] if c.get("rows") else None
    T = tree.retrive_index.shape[1]
    links = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling)
    _check_coverage(name, _support_sizes(target, T_arr, 0.8, filt))
    args = (*links, target, qt, T, 1, T_arr, 0.8, *filt, None, 13, 0)
    cpu = ops.tree_verify(*args)
    emu_args = (*links, target, qt, T, 1, T_arr, 0.8, None, 13, 0)
    scheds = _schedules(name)[: 1 if V > 10**5 else 2]
    got = _run(backend, cpu, ops.tree_verify, emu_spec.tree_verify, args, emu_args, dict(filters=filt), scheds, name)
    T_ref = T_arr if T_arr is not None else 0.8
    _check_tree_reference(got, links, target, qt, T, 1, T_ref, filt, 13, 0, {}, f"tree filters {name}")


@bk.needs_emu
def test_emu_filters_bad_rows_match_cpu():
    """NaN and all -inf rows with filters on: the row stops there and emits token 0, other rows as
    on the CPU; also a row whose filters leave one token. Every launch plan: nodes on the walk,
    prepared one block per node, prepared by the split plan (several blocks per node)."""
    c = dict(k=30, p=0.8, mp=0.02)
    lp, q, ids = _filtered_chain_inputs(c, seed=3)
    lp[1, 0, 17] = float("nan")
    lp[2, 1] = float("-inf")
    lp[3, 2, 11] = float("inf")
    lp[4, 1, 4500] = float("nan")  # in the second chunk (the split plan's second slice)
    ids[4, 0] = lp[4, 0].argmax()  # (row 4 has top-k 1: position 0 accepted, position 1 reached)
    filt = (torch.tensor([30, 30, 30, 30, 1, 30]), 0, None, 0.8, None, 0.02, 0)
    emu.set_schedule_seed(11)
    tree, cand, lt, qt = _tree_inputs(B=3, V=700, seed=4)
    lt[0, 0, 5] = float("nan")
    lt[1, 1] = float("-inf")
    targs = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, lt, qt, 9, 1)
    tfilt = (None, 25, None, 0.9, None, 0.0, 1)
    try:
        # 0 SMs: on the walk; 24 SMs: 6 x 4 nodes, one block each; 1 << 20: 2 slices per node
        for sms, splits in ((0, 0), (24, 1), (1 << 20, 2)):
            emu_spec.set_sms(sms)
            # rows 1 and 4 (NaN at positions 0 and 1) also greedy: temperature 0 on a bad row
            for draft, T_arr in ((None, None), (q, None), (None, torch.tensor([0.9, 0.0, 0.9, 0.9, 0.0, 0.9]))):
                cpu = ops.chain_verify(lp, ids, draft, None, 1, T_arr, 0.9, *filt, None, 4, 0)
                got = emu_spec.chain_verify(lp, ids, draft, None, 1, T_arr, 0.9, None, 4, 0, filters=filt)
                _same(cpu, got, f"bad rows, draft {draft is not None}, T {T_arr}, {sms} SMs")
                assert emu_spec.last_node_splits() == splits and emu_spec.prepared_mismatch() == 0
                assert cpu[0][1, 0] == 0 and cpu[2][1] == 0  # the NaN row emits token 0 at position 0
                assert cpu[2][4] == 1 and cpu[0][4, 1] == 0  # accepted, then the NaN position: token 0
            cpu = ops.tree_verify(*targs, None, 1.0, *tfilt, None, 8, 0)
            got = emu_spec.tree_verify(*targs, None, 1.0, None, 8, 0, filters=tfilt)
            _same(cpu, got[:3], "tree bad rows")
            assert emu_spec.prepared_mismatch() == 0
    finally:
        emu_spec.set_sms(0)


def _node_splits_rule(n_nodes, V, n_sms):
    """speculative.cuh node_plan, stated here: the sampling kernels' split plan over the nodes
    (fewer nodes than SMs and rows of >= 2 chunks of 4096: about n_sms blocks in all, whole chunks
    per slice), else 1 (one block per node)."""
    nch = -(-V // 4096)
    if n_sms <= 0 or n_nodes >= n_sms or nch < 2:
        return 1
    want = min(nch, -(-n_sms // n_nodes))
    per = -(-nch // want)
    return -(-nch // per)


@bk.needs_emu
def test_emu_split_prepared_nodes():
    """With fewer prepared nodes than SMs, each node is a row of the sampling kernels' split plan
    (speculative.cuh node_plan / run_prepare: the split phases over several blocks per node, then
    split_node_kernel turns their state into the node's summary and survivor list). At the
    production size (B = 1, N = 4, V = 128256 bf16 on 132 SMs: 16 slices per node) and on smaller
    rows: the walk's own resolution of every node agrees field by field and list entry by entry
    (prepared_mismatch), the tokens are the CPU's, chain positions past num_draft are skipped
    (work counters), greedy rows (temperature 0) and listed / chunked supports included."""
    emu.set_schedule_seed(5)
    try:
        # the production shape: 1 x 5 nodes, 31 chunks, 132 SMs
        B, N, V = 1, 4, 128256
        lp = (torch.randn(B, N + 1, V, generator=_gen(41)) * 3).bfloat16()
        ids = lp[:, :N].float().argmax(-1)
        ids[0, 2] = lp[0, 2].float().topk(3).indices[2]
        filt = (None, 50, None, 0.9, None, 0.0, 0)
        emu_spec.set_sms(132)
        cpu = ops.chain_verify(lp, ids, None, None, 1, None, 0.8, *filt, None, 9, 0)
        got = emu_spec.chain_verify(lp, ids, None, None, 1, None, 0.8, None, 9, 0, filters=filt)
        assert emu_spec.last_node_splits() == _node_splits_rule(5, V, 132) == 16
        _same(cpu, got, "chain, 128256, 132 SMs")
        assert emu_spec.prepared_mismatch() == 0
        # smaller rows, per-row temperatures with a greedy row, ragged drafts, every filter
        B, N, V = 4, 3, 5 * 4096 + 123
        g = _gen(42)
        lp = torch.randn(B, N + 1, V, generator=g) * 2
        ids = torch.where(torch.rand(B, N, generator=g) < 0.6, lp[:, :N].argmax(-1), lp[:, :N].argmin(-1))
        nd = torch.tensor([3, 0, 2, 1])
        T_arr = torch.tensor([0.9, 0.0, 1.2, 0.7])
        for filt in (
            (torch.tensor([40, 0, 7000, 3]), 0, None, 0.9, None, 0.0, 0),  # 7000: |S| > kListMax, chunked
            (None, 0, torch.tensor([0.5, 0.9, 1.0, 0.99]), 1.0, None, 0.03, 1),
            (None, 0, None, 1.0, torch.tensor([0.0, 0.1, 0.0, 0.2]), 0.0, 0),
        ):
            if filt[0] is not None:  # row 2's support is chunked (> kListMax), row 0's listed
                sizes = _support_sizes(lp, T_arr, 1.0, filt)
                assert int(sizes[2].min()) > 2048 and int(sizes[0].max()) <= 2048
            cpu = ops.chain_verify(lp, ids, None, nd, 1, T_arr, 1.0, *filt, None, 3, 0)
            for sms in (40, 17, 16, 1 << 20):
                emu_spec.set_sms(sms, check=False)
                emu_spec.work(), emu_spec.split_blocks()
                # the split phases' blocks with every draft (a node's blocks per phase launch, the
                # same for every node: the launches follow the filters, not the row)
                emu_spec.chain_verify(lp, ids, None, None, 1, T_arr, 1.0, None, 3, 0, filters=filt)
                full, _ = emu_spec.split_blocks(), emu_spec.work()
                got = emu_spec.chain_verify(lp, ids, None, nd, 1, T_arr, 1.0, None, 3, 0, filters=filt)
                splits = _node_splits_rule(B * (N + 1), V, sms)
                assert emu_spec.last_node_splits() == splits, sms
                _same(cpu, got, f"chain, {sms} SMs, {filt}")
                # one resolution per node up to num_draft; a Z per non-greedy node (row 1 is greedy)
                assert emu_spec.work() == (int((nd + 1).sum()), int((nd + 1).sum()) - 1), sms
                # every split phase skips the positions past num_draft too
                ragged = emu_spec.split_blocks()
                assert (full > 0) == (splits > 1) and ragged * B * (N + 1) == full * int((nd + 1).sum()), sms
                emu_spec.set_sms(sms)
                got = emu_spec.chain_verify(lp, ids, None, nd, 1, T_arr, 1.0, None, 3, 0, filters=filt)
                _same(cpu, got, f"chain, {sms} SMs, {filt}, checked")
                assert emu_spec.prepared_mismatch() == 0
        tree, cand, lt, qt = _tree_inputs(B=2, V=3 * 4096, seed=7)
        T = cand.shape[1]
        args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, lt, qt, 9, 1)
        filt = (None, 30, None, 0.8, None, 0.01, 0)
        cpu = ops.tree_verify(*args, None, 1.0, *filt, None, 2, 0)
        emu_spec.set_sms(4 * T)
        got = emu_spec.tree_verify(*args, None, 1.0, None, 2, 0, filters=filt)
        assert emu_spec.last_node_splits() == _node_splits_rule(2 * T, 3 * 4096, 4 * T) == 2
        _same(cpu, got[:3], "tree, split nodes")
        assert emu_spec.prepared_mismatch() == 0
    finally:
        emu_spec.set_sms(0)


@bk.needs_emu
def test_emu_early_exit_work():
    """The chain kernel stops verifying at the first rejection: later positions only feed the
    accepted count, and their normaliser pass is made only when the accept test can still pass
    (drafts outside the top-k support: none; drafts at the argmax: one each). The tree kernel
    resolves only the nodes it visits (accept_num + 1 per row). Outputs as on the CPU."""
    B, N, V = 3, 4, 3000
    lp = torch.randn(B, N + 1, V, generator=_gen(21)) * 2
    filt = (None, 5, None, 1.0, None, 0.0, 0)
    worst, best = lp[:, :N].argmin(-1), lp[:, :N].argmax(-1)
    emu.set_schedule_seed(3)
    for later, z_later in ((worst, 0), (best, 1)):
        ids = later.clone()
        ids[:, 0] = worst[:, 0]  # position 0 is outside the top 5: rejected
        cpu = ops.chain_verify(lp, ids, None, None, 1, None, 1.0, *filt, None, 5, 0)
        emu_spec.work()
        got = emu_spec.chain_verify(lp, ids, None, None, 1, None, 1.0, None, 5, 0, filters=filt)
        _same(cpu, got, "early exit")
        assert got[2].tolist() == [0] * B  # every row stops at position 0
        if not z_later:
            assert got[1].tolist() == [0] * B  # nothing later is in the support
        # rows resolved: the N positions (no bonus row after a rejection); Z: the stop node + later
        assert emu_spec.work() == (B * N, B * (1 + z_later * (N - 1)))
    tree, cand, lt, qt = _tree_inputs(B=4, V=2000, seed=5)
    lt = lt * 3
    cand = cand.clone()
    cand[0, 1] = lt[0, 0].argmax()  # row 0 accepts at the root (one-hot, top-k 5, p(argmax) large)
    args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, lt, None, 9, 1)
    cpu = ops.tree_verify(*args, None, 1.0, *filt, None, 2, 0)
    emu_spec.work()
    got = emu_spec.tree_verify(*args, None, 1.0, None, 2, 0, filters=filt)
    _same(cpu, got[:3], "tree early exit")
    visited = int((got[2] + 1).sum())
    assert emu_spec.work() == (visited, visited) and visited > B


@bk.needs_emu
def test_emu_prepared_nodes_alone():
    """test_emu_prepared_nodes in a process of its own, where the speculative library is first
    loaded after emu_spec.set_sms(8, check=False) (regression: such a library kept the walk's
    cross-check on, so the work counters counted the prepared nodes twice: 29, not 17; in the suite
    an earlier test had loaded it)."""
    item = f"{Path(__file__).resolve()}::test_emu_prepared_nodes"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", item], capture_output=True, text=True
    )
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


@bk.needs_emu
def test_emu_prepared_nodes_in_two_calls():
    """The prepare launch (speculative.cuh prepare_kernel) in one chain call and one tree call on
    small rows, each with every node prepared: cheap enough for the sanitizer runs
    (emu.SANITIZER_CASES; test_emu_prepared_nodes, with its walks beside them, takes over a minute
    under ThreadSanitizer). Outputs equal the CPU's, with top-k and top-p filters."""
    B, N, V = 3, 3, 500
    lp = torch.randn(B, N + 1, V, generator=_gen(33)) * 2
    ids = torch.where(torch.rand(B, N, generator=_gen(34)) < 0.6, lp[:, :N].argmax(-1), lp[:, :N].argmin(-1))
    nd = torch.tensor([3, 1, 2])
    filt = (None, 40, None, 0.9, None, 0.0, 0)
    cpu = ops.chain_verify(lp, ids, None, nd, 1, None, 0.8, *filt, None, 5, 0)
    try:
        emu_spec.set_sms(4, check=False)  # B * R = 12 nodes: 3 waves of 4 < R = 4 positions
        emu_spec.work()
        got = emu_spec.chain_verify(lp, ids, None, nd, 1, None, 0.8, None, 5, 0, filters=filt)
        assert emu_spec.last_prepared()
        _same(cpu, got, "chain")
        assert emu_spec.work() == (int((nd + 1).sum()),) * 2
        tree, cand, lt, qt = _tree_inputs(B=2, V=500, seed=8)
        T = cand.shape[1]
        args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, lt, qt, 9, 1)
        cpu = ops.tree_verify(*args, None, 1.0, *filt, None, 2, 0)
        emu_spec.set_sms((2 * T + 1) // 2, check=False)  # the 2 * T nodes in 2 waves
        emu_spec.work()
        got = emu_spec.tree_verify(*args, None, 1.0, None, 2, 0, filters=filt)
        assert emu_spec.last_prepared()
        _same(cpu, got[:3], "tree")
        assert emu_spec.work() == (2 * T, 2 * T)
    finally:
        emu_spec.set_sms(0)


@bk.needs_emu
def test_emu_prepared_nodes():
    """Small batches resolve every node ahead of the walk, one block per node (speculative.cuh
    prepare_kernel), when prepare_plan says so: logits targets only; chain when the B * (N + 1)
    nodes take fewer waves of n_sms blocks than N + 1 positions in turn, tree when its B * T nodes
    fit in 2 waves. The walk then resolves nothing itself (the work counters count the prepare
    launch's nodes: chain positions 0..num_draft[b], every tree node) and the outputs are the
    CPU's, with rejections, accepts and filters."""
    B, N, V = 6, 3, 3000
    lp = torch.randn(B, N + 1, V, generator=_gen(31)) * 2
    ids = torch.where(torch.rand(B, N, generator=_gen(32)) < 0.6, lp[:, :N].argmax(-1), lp[:, :N].argmin(-1))
    nd = torch.tensor([3, 0, 1, 2, 3, 2])
    filt = (None, 40, None, 0.9, None, 0.0, 0)
    cpu = ops.chain_verify(lp, ids, None, nd, 1, None, 0.8, *filt, None, 5, 0)
    emu.set_schedule_seed(7)
    # B * R = 24 nodes: 8 SMs give 3 waves < R = 4 (prepared), 6 SMs give 4 (on the walk)
    for sms, prepared in ((8, True), (6, False), (0, False)):
        emu_spec.set_sms(sms, check=False)
        emu_spec.work()
        got = emu_spec.chain_verify(lp, ids, None, nd, 1, None, 0.8, None, 5, 0, filters=filt)
        assert emu_spec.last_prepared() == prepared, sms
        _same(cpu, got, f"chain, {sms} SMs")
        if prepared:
            assert emu_spec.work() == (int((nd + 1).sum()),) * 2
    emu_spec.set_sms(1 << 20)
    got = emu_spec.chain_verify(lp.float(), ids, None, nd, 0, None, 1.0, None, 5, 0)  # probabilities: never
    assert not emu_spec.last_prepared()
    tree, cand, lt, qt = _tree_inputs(B=5, V=2000, seed=6)
    T = cand.shape[1]
    args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, lt, qt, 9, 1)
    cpu = ops.tree_verify(*args, None, 1.0, *filt, None, 2, 0)
    for sms, prepared in (((5 * T + 1) // 2, True), ((5 * T + 1) // 2 - 1, False)):
        emu_spec.set_sms(sms, check=False)
        emu_spec.work()
        got = emu_spec.tree_verify(*args, None, 1.0, None, 2, 0, filters=filt)
        assert emu_spec.last_prepared() == prepared, sms
        _same(cpu, got[:3], f"tree, {sms} SMs")
        if prepared:
            assert emu_spec.work() == (5 * T, 5 * T)
    emu_spec.set_sms(0)
