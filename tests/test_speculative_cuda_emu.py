"""The CUDA speculative kernels (csrc/cuda/speculative.cuh) run on CPU threads by the emulator
(tests/cuda_emu) and compared with the CPU ops: same seed -> same tokens, counts, accept indices,
tree errors and build_tree outputs. This checks the CUDA kernels' logic (counter layout, the CPU's
summation order, the residual / materialisation steps, the walks) without a GPU; test_speculative.py's
test_cuda_matches_cpu runs the same comparison on a real GPU. Every case runs at the production
block size (speculative.cuh's kThreads) under two randomised thread orders of the emulator."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import emu  # noqa: E402
import emu_spec  # noqa: E402
import decodekit as dk  # noqa: E402
from test_speculative import fixed_tree_case  # noqa: E402

ops = torch.ops.decodekit
pytestmark = pytest.mark.skipif(emu_spec.compiler() is None, reason="no host C++ compiler to build the emulator")
NOF = (None, 1.0, None, 0, None, 1.0, None, 0.0, 0)  # no filters


def _schedules(name):
    """Two schedule seeds per case (never 0, the fixed thread order), different across cases."""
    h = sum(map(ord, name))
    return [1 + 2 * h, 2 + 2 * h]


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


@pytest.mark.parametrize("case", CHAIN, ids=[c[0] for c in CHAIN])
def test_chain_matches_cpu(case):
    _, c = case
    p, q, ids, lp = _chain_inputs(seed=len(case[0]))
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
    cpu = ops.chain_verify(target, ids, draft, nd, kind, T_arr, T_val, *NOF[2:], seed_arr, seed_val, off)
    for sched in _schedules(case[0]):
        emu.set_schedule_seed(sched)
        got = emu_spec.chain_verify(target, ids, draft, nd, kind, T_arr, T_val, seed_arr, seed_val, off)
        _same(cpu, got, f"{case[0]}, schedule {sched}")


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


@pytest.mark.parametrize("case", TREE, ids=[c[0] for c in TREE])
def test_tree_matches_cpu(case):
    _, c = case
    tree, cand, lt, qt = _tree_inputs(seed=len(case[0]))
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
    args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, target, draft, W, kind)
    cpu = ops.tree_verify(*args, None, c.get("T", 1.0), *NOF[2:], seed_arr, 9, 0, *co.values())
    for sched in _schedules(case[0]):
        emu.set_schedule_seed(sched)
        got = emu_spec.tree_verify(*args, None, c.get("T", 1.0), seed_arr, 9, 0, **co)
        _same(cpu, got[:3], f"{case[0]}, schedule {sched}")
        assert bool((got[3] == 0).all())


def test_tree_errors_match_cpu():
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


def test_build_tree_matches_cpu():
    g = _gen(4)
    for T in (1, 9, 20):
        B = 70  # more than one block of rows
        parents = torch.tensor(
            [[-1] + [int(torch.randint(0, t, (1,), generator=g)) for t in range(1, T)] for _ in range(B)]
        )
        prefix = torch.randint(0, 100, (B,), generator=g)
        cpu = ops.build_tree(parents, prefix)
        got, err, _ = emu_spec.build_tree(parents, prefix)
        assert bool((err == 0).all())
        assert all(torch.equal(a, b) for a, b in zip(cpu, got))
    _, err, node = emu_spec.build_tree(torch.tensor([[-1, 0, -1], [-1, 2, 1]]), torch.zeros(2, dtype=torch.int64))
    assert err.tolist() == [2, 4] and node.tolist() == [2, 1]


def test_bad_logits_rows_and_real_block_size():
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


@pytest.mark.parametrize("case", FILTERED, ids=[c[0] for c in FILTERED])
def test_chain_filters_match_cpu(case):
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
    cpu = ops.chain_verify(target, ids, draft, nd, 1, T_arr, T_val, *filt, None, 77, 0)
    for sched in _schedules(name)[: 1 if c.get("V", 0) > 10**5 else 2]:
        emu.set_schedule_seed(sched)
        got = emu_spec.chain_verify(target, ids, draft, nd, 1, T_arr, T_val, None, 77, 0, filters=filt)
        _same(cpu, got, f"{name}, schedule {sched}")


@pytest.mark.parametrize("case", FILTERED, ids=[c[0] for c in FILTERED])
def test_tree_filters_match_cpu(case):
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
    args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, target, qt, T, 1)
    _check_coverage(name, _support_sizes(target, T_arr, 0.8, filt))
    cpu = ops.tree_verify(*args, T_arr, 0.8, *filt, None, 13, 0)
    for sched in _schedules(name)[: 1 if V > 10**5 else 2]:
        emu.set_schedule_seed(sched)
        got = emu_spec.tree_verify(*args, T_arr, 0.8, None, 13, 0, filters=filt)
        _same(cpu, got[:3], f"{name}, schedule {sched}")
        assert bool((got[3] == 0).all())


def test_filters_bad_rows_match_cpu():
    """NaN and all -inf rows with filters on: the row stops there and emits token 0, other rows as
    on the CPU; also a row whose filters leave one token."""
    c = dict(k=30, p=0.8, mp=0.02)
    lp, q, ids = _filtered_chain_inputs(c, seed=3)
    lp[1, 0, 17] = float("nan")
    lp[2, 1] = float("-inf")
    lp[3, 2, 11] = float("inf")
    filt = (torch.tensor([30, 30, 30, 30, 1, 30]), 0, None, 0.8, None, 0.02, 0)
    emu.set_schedule_seed(11)
    for draft in (None, q):
        cpu = ops.chain_verify(lp, ids, draft, None, 1, None, 0.9, *filt, None, 4, 0)
        got = emu_spec.chain_verify(lp, ids, draft, None, 1, None, 0.9, None, 4, 0, filters=filt)
        _same(cpu, got, f"bad rows, draft {draft is not None}")
    assert cpu[0][1, 0] == 0 and cpu[2][1] == 0  # the NaN row emits token 0 at position 0
    tree, cand, lt, qt = _tree_inputs(B=3, V=700, seed=4)
    lt[0, 0, 5] = float("nan")
    lt[1, 1] = float("-inf")
    args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, lt, qt, 9, 1)
    filt = (None, 25, None, 0.9, None, 0.0, 1)
    cpu = ops.tree_verify(*args, None, 1.0, *filt, None, 8, 0)
    got = emu_spec.tree_verify(*args, None, 1.0, None, 8, 0, filters=filt)
    _same(cpu, got[:3], "tree bad rows")


def test_early_exit_work():
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


@pytest.mark.skipif(
    not (torch.cuda.is_available() and dk.build_info()["cuda"]), reason="needs a GPU and a CUDA build (none here)"
)
@pytest.mark.parametrize("case", FILTERED, ids=[c[0] for c in FILTERED])
def test_filters_cuda_matches_cpu(case):
    """The same matrix on a real GPU (never run so far: no GPU has been available)."""
    name, c = case
    lp, q, ids = _filtered_chain_inputs(c, seed=len(name))
    B = ids.shape[0]
    target = lp.to(c.get("dtype", torch.float32))
    draft = q if c.get("draft") else None
    filt = _filters(c, B)

    def on(t, d):
        return t.to(d) if isinstance(t, torch.Tensor) else t

    def run(d):
        f = tuple(on(t, d) for t in filt)
        out = ops.chain_verify(on(target, d), on(ids, d), on(draft, d), None, 1, None, 0.9, *f, None, 77, 0)
        return tuple(t.cpu() for t in out)

    _same(run("cpu"), run("cuda"), name)
