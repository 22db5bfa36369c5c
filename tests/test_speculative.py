"""Speculative verification: losslessness (chi-square, n = 10^6), acceptance rates, exact agreement
with reference.py, determinism across runs / threads / ISA paths, and the bad-input matrix."""

import itertools
import math

import pytest
import torch

import decodekit as dk
import decodekit.reference as ref
from stats import assert_matches

N_STAT = 1_000_000
ISAS = (
    ["scalar"]
    + (["avx2"] if dk.cpu_features()["avx2"] else [])
    + (["avx512"] if dk.cpu_features()["avx512"] and dk.cpu_features()["avx512_bf16"] else [])
)


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    dk.set_isa("auto")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- small "language models": context -> distribution tables ----------------------------------
def _tables(V, seed, peak=2.0):
    """Target logits L1 [V], L2 [V, V] (second token given the first), L3 [V, V]; draft probs
    Q1 [V], Q2 [V, V] (a noisy copy of the target, so acceptance rates are moderate)."""
    g = _gen(seed)
    L1 = torch.randn(V, generator=g) * peak
    L2 = torch.randn(V, V, generator=g) * peak
    L3 = torch.randn(V, V, generator=g)
    Q1 = (L1 + torch.randn(V, generator=g) * 1.5).softmax(-1)
    Q2 = (L2 + torch.randn(V, V, generator=g) * 1.5).softmax(-1)
    return L1, L2, L3, Q1, Q2


FILTERS = {
    "none": {},
    "temp": {"temperature": 0.7},
    "top_k": {"temperature": 0.8, "top_k": 3},
    "top_p": {"top_p": 0.75},
    "min_p": {"min_p": 0.15},
}


class Target:
    """The target as the kernel sees it (probs, or logits + filters) and as the test expects it."""

    def __init__(self, form, filt):
        self.form, self.filt = form, FILTERS[filt]

    def rows(self, L):  # what is passed to the op
        return L.softmax(-1) if self.form == "probs" else L

    def expected(self, L):  # float64 distribution(s) the emitted tokens must follow
        if self.form == "probs":
            return L.double().softmax(-1)
        L2d = L.reshape(-1, L.shape[-1])
        return ref.target_distribution(L2d, **self.filt).reshape(L.shape)

    def chain(self, draft_probs, ids, target, **kw):
        if self.form == "probs":
            return dk.chain_speculative_sampling(draft_probs, ids, target, **kw)
        return dk.chain_speculative_sampling_from_logits(draft_probs, ids, target, **self.filt, **kw)

    def tree(self, cand, tree, target, draft_probs, **kw):
        args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, target, draft_probs)
        if self.form == "probs":
            return dk.tree_speculative_sampling(*args, **kw)
        return dk.tree_speculative_sampling_from_logits(*args, **self.filt, **kw)


def _sample_rows(probs, g):
    """One token per row of probs [n, V]."""
    return torch.multinomial(probs, 1, generator=g).squeeze(-1)


def _without_replacement(probs, k, g):
    """k distinct tokens per row of probs [n, V], in the order of successive draws without
    replacement (Gumbel-top-k)."""
    u = torch.rand(probs.shape, generator=g, dtype=torch.float64).clamp_min(1e-300)
    keys = probs.double().log() - (-u.log()).log()
    return keys.topk(k, dim=-1).indices


def fixed_tree_case(B, V, seed, scale=1.0):
    """A fixed 9-node tree (parents [-1, 0, 0, 0, 1, 1, 2, 4, 4] in every row), random target
    logits lt [B, T, V] (standard normal times scale), draft probabilities qt and candidates drawn
    from qt without replacement among siblings. Returns (parents, lt, qt, cand)."""
    T = 9
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4, 4]).expand(B, T)
    g = _gen(seed)
    lt = torch.randn(B, T, V, generator=g) * scale
    qt = (lt + torch.randn(B, T, V, generator=g)).softmax(-1)
    cand = torch.zeros(B, T, dtype=torch.int64)
    for node in range(T):
        kids = [c for c in range(1, T) if int(parents[0, c]) == node]
        if kids:
            cand[:, kids] = _without_replacement(qt[:, node], len(kids), g)
    return parents, lt, qt, cand


# ---- chain losslessness ------------------------------------------------------------------------
def _chain_pairs(tg, with_draft, n, seed):
    """First two emitted tokens of a generation verified with N = 2 drafts per round (a second round
    from context y1 when the first round emits only one token)."""
    V = 8
    L1, L2, L3, Q1, Q2 = _tables(V, seed)
    g = _gen(seed + 1)
    x1 = torch.multinomial(Q1, n, replacement=True, generator=g)
    x2 = _sample_rows(Q2[x1], g)
    target = torch.stack([tg.rows(L1).expand(n, V), tg.rows(L2)[x1], tg.rows(L3)[x2]], 1)
    draft = torch.stack([Q1.expand(n, V), Q2[x1]], 1) if with_draft else None
    ids = torch.stack([x1, x2], 1)
    out, acc, emi = tg.chain(draft, ids, target, seed=seed)
    assert int(emi.min()) >= 0 and int(emi.max()) <= 2
    y1 = out[:, 0].clone()
    y2 = out[:, 1].clone()
    redo = emi == 0
    m = int(redo.sum())
    c = y1[redo]
    x1b = _sample_rows(Q2[c], g)
    target2 = torch.stack([tg.rows(L2)[c], tg.rows(L3)[x1b]], 1)
    out2, _, _ = tg.chain(Q2[c].unsqueeze(1) if with_draft else None, x1b.unsqueeze(1), target2, seed=seed + 7)
    y2[redo] = out2[:, 0]
    assert m > 1000 and int((~redo).sum()) > 1000  # both branches exercised
    E1, E2 = tg.expected(L1), tg.expected(L2)
    return y1, y2, E1, (E1[:, None] * E2).reshape(-1), V


@pytest.mark.parametrize(
    "form,filt", [("probs", "none"), ("logits", "temp"), ("logits", "top_k"), ("logits", "top_p"), ("logits", "min_p")]
)
@pytest.mark.parametrize("with_draft", [True, False], ids=["draft_probs", "one_hot"])
def test_chain_lossless(form, filt, with_draft):
    tg = Target(form, filt)
    y1, y2, E1, E12, V = _chain_pairs(tg, with_draft, N_STAT, seed=11 + 3 * list(FILTERS).index(filt))
    assert_matches(y1, E1, what=f"chain first token ({form}/{filt})")
    assert_matches(y1 * V + y2, E12, what=f"chain first two tokens ({form}/{filt})")


# ---- tree losslessness -------------------------------------------------------------------------
SHAPES = {
    "star3": [-1, 0, 0, 0],
    "binary": [-1, 0, 0, 1, 1, 2, 2],
    "mixed": [-1, 0, 1, 0, 0, 3],
}


def _tree_round(tg, parents, root_target, root_draft, next_target, next_draft, deep_target, with_draft, g, seed):
    """One verification of a tree per row: the root's target / draft rows are given ([m, V], target
    form); a depth-1 node with token x has target next_target[x] and draft next_draft[x]; deeper nodes
    get deep_target[x] and a uniform draft. Children are drawn without replacement from their
    parent's draft row."""
    m, V = root_target.shape
    T = len(parents)
    tree = dk.build_tree(torch.tensor(parents).expand(m, T), 0)
    cand = torch.zeros(m, T, dtype=torch.int64)
    depth = [0] * T
    for t in range(1, T):
        depth[t] = depth[parents[t]] + 1
    target = torch.empty(m, T, V, dtype=root_target.dtype)
    draft = torch.empty(m, T, V)
    target[:, 0], draft[:, 0] = root_target, root_draft
    for node in range(T):
        if node > 0:
            tok = cand[:, node]
            target[:, node] = next_target[tok] if depth[node] == 1 else deep_target[tok]
            draft[:, node] = next_draft[tok] if depth[node] == 1 else 1.0 / V
        kids = [c for c in range(1, T) if parents[c] == node]
        if kids:
            cand[:, kids] = _without_replacement(draft[:, node], len(kids), g)
    pred, ai, an = tg.tree(cand, tree, target, draft if with_draft else None, seed=seed)
    return pred.reshape(m, T), ai - (torch.arange(m) * T)[:, None].int(), an


def _tree_pairs(tg, shape, with_draft, n, seed, chunk=250_000):
    V = 8
    L1, L2, L3, Q1, Q2 = _tables(V, seed)
    R1, R2, R3 = tg.rows(L1), tg.rows(L2), tg.rows(L3)
    g = _gen(seed + 1)
    ys1, ys2 = [], []
    for ci, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        pred, ai, an = _tree_round(
            tg, SHAPES[shape], R1.expand(m, V), Q1.expand(m, V), R2, Q2, R3, with_draft, g, seed + 100 * ci
        )
        y1 = pred[:, 0].clone()
        assert int(y1.min()) >= 0
        y2 = torch.full_like(y1, -1)
        acc = an >= 1
        node1 = ai[acc, 1].long()
        y2[acc] = pred[acc].gather(1, node1[:, None]).squeeze(1)
        # rows that emitted one token: a second round from context y1 (a fixed top-2 tree per context;
        # any lossless verifier of the second position will do, and that one is tested on its own)
        _second_round(tg, y1, y2, ~acc, R2, R3, Q2, seed + 100 * ci + 50)
        assert int((~acc).sum()) > 100 and int(acc.sum()) > 100
        ys1.append(y1)
        ys2.append(y2)
    y1, y2 = torch.cat(ys1), torch.cat(ys2)
    E1, E2 = tg.expected(L1), tg.expected(L2)
    return y1, y2, E1, (E1[:, None] * E2).reshape(-1), V


def _fixed_tree(root_target, root_draft, parents, R2, R3, Q2):
    """A deterministic top-k drafter's tree for one root context: children of a node are the most
    likely tokens of its draft row; depth-1 nodes continue with R2 / Q2, deeper ones with R3."""
    T, V = len(parents), root_target.shape[-1]
    cand = torch.zeros(T, dtype=torch.int64)
    target = torch.empty(T, V, dtype=root_target.dtype)
    draft = torch.empty(T, V)
    target[0], draft[0] = root_target, root_draft
    for node in range(T):
        if node > 0:
            depth1 = parents[node] == 0
            target[node] = (R2 if depth1 else R3)[cand[node]]
            draft[node] = Q2[cand[node]] if depth1 else 1.0 / V
        kids = [c for c in range(1, T) if parents[c] == node]
        cand[kids] = draft[node].topk(len(kids)).indices
    return cand, target


def _run_fixed(tg, cand, target, parents, m, seed):
    T, V = len(parents), target.shape[-1]
    tree = dk.build_tree(torch.tensor(parents).expand(m, T), 0)
    pred, ai, an = tg.tree(cand.expand(m, T), tree, target.expand(m, T, V), None, seed=seed)
    return pred.reshape(m, T), ai - (torch.arange(m) * T)[:, None].int(), an


def _second_round(tg, y1, y2, rows, R2, R3, Q2, seed):
    """y2[rows] = the first token emitted by a verification from context y1 (grouped by y1)."""
    for v in range(R2.shape[0]):
        sel = rows & (y1 == v)
        k = int(sel.sum())
        if k:
            cand, target = _fixed_tree(R2[v], Q2[v], [-1, 0, 0], R2, R3, Q2)
            y2[sel] = _run_fixed(tg, cand, target, [-1, 0, 0], k, seed + v)[0][:, 0]


def _tree_pairs_fixed(tg, shape, n, seed, chunk=500_000):
    """One-hot drafts from a deterministic top-k drafter (EAGLE-style): every row verifies the same
    tree (children of a node = the k most likely tokens of its draft row), so the inputs are
    stride-0 expansions. Rows that emit only one token continue with a second round, grouped by
    their first token."""
    V = 8
    L1, L2, L3, Q1, Q2 = _tables(V, seed)
    R1, R2, R3 = tg.rows(L1), tg.rows(L2), tg.rows(L3)
    parents = SHAPES[shape]
    T = len(parents)

    cand1, target1 = _fixed_tree(R1, Q1, parents, R2, R3, Q2)
    ys1, ys2 = [], []
    for ci, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        pred, ai, an = _run_fixed(tg, cand1, target1, parents, m, seed + 100 * ci)
        y1 = pred[:, 0].clone()
        y2 = torch.full_like(y1, -1)
        acc = an >= 1
        y2[acc] = pred[acc].gather(1, ai[acc, 1].long()[:, None]).squeeze(1)
        _second_round(tg, y1, y2, ~acc, R2, R3, Q2, seed + 100 * ci + 50)
        assert int(acc.sum()) > 100 and int((~acc).sum()) > 100
        ys1.append(y1)
        ys2.append(y2)
    y1, y2 = torch.cat(ys1), torch.cat(ys2)
    E1, E2 = tg.expected(L1), tg.expected(L2)
    return y1, y2, E1, (E1[:, None] * E2).reshape(-1), V


def _check_tree(tg, shape, with_draft, seed, what):
    if with_draft:
        y1, y2, E1, E12, V = _tree_pairs(tg, shape, True, N_STAT, seed)
    else:
        y1, y2, E1, E12, V = _tree_pairs_fixed(tg, shape, N_STAT, seed)
    assert_matches(y1, E1, what=f"{what}: root token")
    assert_matches(y1 * V + y2, E12, what=f"{what}: two-level path")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("with_draft", [True, False], ids=["draft_probs", "one_hot"])
def test_tree_lossless(shape, with_draft):
    _check_tree(Target("probs", "none"), shape, with_draft, 5 + list(SHAPES).index(shape), f"tree {shape}")


@pytest.mark.parametrize(
    "filt,shape,with_draft",
    [(f, s, d) for f, s in (("top_k", "star3"), ("top_p", "binary"), ("min_p", "mixed")) for d in (True, False)]
    + [("temp", "star3", True)],
)
def test_tree_lossless_filtered_logits(filt, shape, with_draft):
    _check_tree(Target("logits", filt), shape, with_draft, 40 + list(FILTERS).index(filt), f"tree {shape} ({filt})")


# ---- acceptance rates --------------------------------------------------------------------------
@pytest.mark.parametrize("with_draft", [True, False], ids=["draft_probs", "one_hot"])
def test_chain_acceptance_rate(with_draft):
    """Fixed p_j, q_j per position: drafts are accepted independently with rate
    alpha_j = sum_x min(p_j, q_j) (one-hot drafts x ~ q_j: sum_x q_j p_j). The emitted count follows
    P(k) = prod_{j<k} alpha_j (1 - alpha_k), its mean is sum_k prod_{j<=k} alpha_j, and FlashInfer's
    accepted count (each draft on its own) has mean sum_j alpha_j."""
    n, N, V = N_STAT, 4, 16
    g = _gen(3)
    p = (torch.randn(N + 1, V, generator=g) * 1.5).softmax(-1)
    q = (p[:N].log() + torch.randn(N, V, generator=g)).softmax(-1)
    ids = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(N)], 1)
    out, acc, emi = dk.chain_speculative_sampling(
        q.expand(n, N, V) if with_draft else None, ids, p.expand(n, N + 1, V), seed=77
    )
    pd, qd = p.double(), q.double()
    alpha = torch.minimum(pd[:N], qd).sum(-1) if with_draft else (pd[:N] * qd).sum(-1)
    probs = torch.tensor(
        [float(torch.prod(alpha[:k])) * (1 - float(alpha[k])) for k in range(N)] + [float(torch.prod(alpha))],
        dtype=torch.float64,
    )
    assert_matches(emi, probs, what="emitted count distribution")
    ks = torch.arange(N + 1, dtype=torch.float64)
    mean, var = float((probs * ks).sum()), float((probs * ks**2).sum() - (probs * ks).sum() ** 2)
    z = (emi.double().mean().item() - mean) / math.sqrt(var / n)
    assert abs(z) < 5, f"mean emitted {emi.double().mean().item():.5f} vs theory {mean:.5f} (z={z:.1f})"
    a_mean, a_var = float(alpha.sum()), float((alpha * (1 - alpha)).sum())
    z = (acc.double().mean().item() - a_mean) / math.sqrt(a_var / n)
    assert abs(z) < 5, f"mean accepted {acc.double().mean().item():.5f} vs theory {a_mean:.5f} (z={z:.1f})"
    # the emitted prefix is the drafts; padding is -1
    pos = torch.arange(N + 1)
    assert torch.equal(torch.where(pos < emi[:, None], out, -1)[:, :N], torch.where(pos[:N] < emi[:, None], ids, -1))
    assert bool((out[pos[None, :] > emi[:, None]] == -1).all())


# ---- exact agreement with reference.py ---------------------------------------------------------
def _chain_inputs(B, N, V, seed, peak=3.0):
    g = _gen(seed)
    lp = torch.randn(B, N + 1, V, generator=g) * peak
    p = lp.softmax(-1)
    q = (lp[:, :N] + torch.randn(B, N, V, generator=g) * 0.7).softmax(-1)
    ids = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, N)
    return p, q, ids, lp


@pytest.mark.parametrize("V", [50, 5000])
def test_chain_matches_reference(V):
    B, N = 64, 4
    p, q, ids, _ = _chain_inputs(B, N, V, seed=V)
    nd = torch.randint(0, N + 1, (B,), generator=_gen(1))
    seeds = torch.randint(0, 2**62, (B,), generator=_gen(2))
    for dq, num, seed, off in itertools.product((q, None), (None, nd), (1234, seeds), (0, 2**40 + 5)):
        got = dk.chain_speculative_sampling(dq, ids, p, seed=seed, offset=off, num_draft_tokens=num)
        exp = ref.chain_speculative_sampling(dq, ids, p, seed=seed, offset=off, num_draft_tokens=num)
        for a, b, name in zip(got, exp, ("ids", "accepted", "emitted")):
            assert torch.equal(a.long(), b.long()), name


@pytest.mark.parametrize("V", [12, 5000])
def test_tree_matches_reference(V):
    B = 48
    parents, lp, q, cand = fixed_tree_case(B, V, V, scale=2)
    tree = dk.build_tree(parents, 3)
    p = lp.softmax(-1)
    args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, p)
    for dq, W, seed in itertools.product((q, None), (None, 2, 1), (99, torch.arange(B) * 7919)):
        got = dk.tree_speculative_sampling(*args, dq, seed=seed, num_speculative_tokens=W)
        exp = ref.tree_speculative_sampling(*args, dq, seed=seed, num_speculative_tokens=W)
        for a, b, name in zip(got, exp, ("predicts", "accept_index", "accept_token_num")):
            assert torch.equal(a.long(), b.long()), name


# ---- greedy verifiers: exact asserts -----------------------------------------------------------
def _random_parents(kind, T, g):
    if kind == "chain":
        return [-1] + list(range(T - 1))
    if kind == "star":
        return [-1] + [0] * (T - 1)
    return [-1] + [int(torch.randint(0, t, (1,), generator=g)) for t in range(1, T)]


def _greedy_case(kind, B, T, V, g, boost=0.8):
    """A random tree per row (distinct sibling tokens) and target logits whose argmax at a node is one
    of its children's tokens with probability `boost` (so deep acceptance happens)."""
    parents = torch.tensor([_random_parents(kind, T, g) for _ in range(B)])
    cand = torch.zeros(B, T, dtype=torch.int64)
    logits = torch.randn(B, T, V, generator=g)
    for b in range(B):
        for node in range(T):
            kids = [c for c in range(1, T) if int(parents[b, c]) == node]
            if kids:
                cand[b, kids] = torch.randperm(V, generator=g)[: len(kids)]
                if float(torch.rand(1, generator=g)) < boost:
                    pick = kids[int(torch.randint(0, len(kids), (1,), generator=g))]
                    logits[b, node, cand[b, pick]] = logits[b, node].max() + 1.0
    return parents, cand, logits


@pytest.mark.parametrize(
    "kind,T", [("random", 12), ("random", 40), ("chain", 24), ("star", 30), ("random", 1), ("chain", 1)]
)
def test_verify_tree_greedy_matches_reference(kind, T):
    g = _gen(T * 31 + len(kind))
    B, V = 32, 48
    parents, cand, logits = _greedy_case(kind, B, T, V, g)
    tree = dk.build_tree(parents, torch.randint(0, 50, (B,), generator=g))
    args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling)
    for W in (None, 1, 3):
        for target in (logits, logits.argmax(-1), logits.to(torch.bfloat16)):
            got = dk.verify_tree_greedy(*args, target, num_speculative_tokens=W)
            exp = ref.verify_tree_greedy(*args, target, num_speculative_tokens=W)
            for a, b, name in zip(got, exp, ("predicts", "accept_index", "accept_token_num")):
                assert torch.equal(a.long(), b.long()), (name, W, target.dtype)
    # temperature 0 in the logits form is the same walk
    got = dk.tree_speculative_sampling_from_logits(*args, logits, temperature=0.0, seed=5)
    exp = dk.verify_tree_greedy(*args, logits)
    assert all(torch.equal(a, b) for a, b in zip(got, exp))


def test_verify_tree_greedy_whole_depth():
    """A chain of depth 15 and a tree whose deepest path is the target's choice everywhere: every
    draft on the path is accepted and the bonus comes from the leaf."""
    g = _gen(8)
    B, V = 8, 30
    for parents_row in ([-1] + list(range(15)), [-1, 0, 0, 1, 1, 3, 3, 5, 0, 8]):
        T = len(parents_row)
        parents = torch.tensor(parents_row).expand(B, T)
        _, cand, logits = _greedy_case("star", B, T, V, g, boost=0.0)
        for b in range(B):
            for node in range(T):
                kids = [c for c in range(1, T) if parents_row[c] == node]
                if kids:
                    cand[b, kids] = torch.randperm(V, generator=g)[: len(kids)]
        # deepest path: follow parents from the last-created deepest node
        depth = [0] * T
        for t in range(1, T):
            depth[t] = depth[parents_row[t]] + 1
        leaf = max(range(T), key=lambda t: depth[t])
        path = [leaf]
        while parents_row[path[-1]] != -1:
            path.append(parents_row[path[-1]])
        path = path[::-1]
        for a, c in zip(path, path[1:]):
            logits[torch.arange(B), a, cand[:, c]] = logits[:, a].max(-1).values + 1
        tree = dk.build_tree(parents, 0)
        pred, ai, an = dk.verify_tree_greedy(
            cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, logits
        )
        assert bool((an == depth[leaf]).all())
        exp = ref.verify_tree_greedy(
            cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, logits
        )
        assert all(torch.equal(x.long(), y.long()) for x, y in zip((pred, ai, an), exp))
        assert torch.equal(ai[:, 1 : len(path)].long() % T, torch.tensor(path[1:]).expand(B, -1))
        assert torch.equal(pred.reshape(B, T)[:, leaf], logits[:, leaf].argmax(-1))


def test_greedy_verify_matches_reference():
    g = _gen(4)
    B, N, V = 64, 6, 40
    logits = torch.randn(B, N + 1, V, generator=g).round(decimals=1)  # ties
    ids = logits[:, :N].argmax(-1)
    flip = torch.rand(B, N, generator=g) < 0.15
    ids = torch.where(flip, torch.randint(0, V, (B, N), generator=g), ids)
    ids[0] = logits[0, :N].argmax(-1)  # a fully accepted row
    nd = torch.randint(0, N + 1, (B,), generator=g)
    for num in (None, nd):
        for lg in (logits, logits.half()):
            got = dk.greedy_verify(ids, lg, num_draft_tokens=num)
            exp = ref.greedy_verify(ids, lg.float(), num_draft_tokens=num)
            assert all(torch.equal(a.long(), b.long()) for a, b in zip(got, exp))
    out, acc, emi = dk.greedy_verify(ids, logits)
    assert int(emi[0]) == N and int(out[0, N]) == int(logits[0, N].argmax())
    # ties: lowest index wins
    lg = torch.zeros(1, 2, 5)
    lg[0, :, 1] = lg[0, :, 3] = 2.0
    out, _, _ = dk.greedy_verify(torch.tensor([[3]]), lg)
    assert out.tolist() == [[1, -1]]
    out, _, _ = dk.greedy_verify(torch.tensor([[1]]), lg)
    assert out.tolist() == [[1, 1]]


def test_logits_form_temperature_zero_rows_are_greedy():
    p, q, ids, lp = _chain_inputs(16, 3, 30, seed=3)
    T = torch.tensor([0.0, 1.0] * 8)
    out, acc, emi = dk.chain_speculative_sampling_from_logits(q, ids, lp, temperature=T, top_k=5, seed=1)
    g_out, g_acc, g_emi = dk.greedy_verify(ids, lp)
    assert torch.equal(out[::2], g_out[::2]) and torch.equal(emi[::2], g_emi[::2])


def test_logits_form_agrees_with_reference():
    """The logits form against reference.py (which filters in float64): decisions can only differ
    where a uniform falls within ~1e-6 relative of a threshold."""
    B, N, V = 120, 3, 64
    p, q, ids, lp = _chain_inputs(B, N, V, seed=9, peak=2.0)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02)
    got = dk.chain_speculative_sampling_from_logits(q, ids, lp, seed=3, **kw)
    exp = ref.chain_speculative_sampling_from_logits(q, ids, lp, seed=3, **kw)
    same = (got[0] == exp[0]).all(-1)
    assert float(same.double().mean()) >= 0.98
    assert float((got[1] == exp[1]).double().mean()) >= 0.98 and float((got[2] == exp[2]).double().mean()) >= 0.98
    # every emitted token survives the filters
    surv = ref.survivors(lp.reshape(-1, V), temperature=0.9, top_k=20, top_p=0.9, min_p=0.02).reshape(B, N + 1, V)
    pos = got[2].long()
    tok = got[0].gather(1, pos[:, None]).squeeze(1)
    assert bool(surv[torch.arange(B), pos, tok].all())


def test_build_tree_matches_reference():
    g = _gen(12)
    for T in (1, 2, 7, 8, 9, 33):
        B = 10
        parents = torch.tensor([_random_parents("random", T, g) for _ in range(B)])
        prefix = torch.randint(0, 1000, (B,), generator=g)
        got = dk.build_tree(parents.int(), prefix.int())
        exp = ref.build_tree(parents, prefix)
        for a, b, name in zip(got, exp, got._fields):
            assert a.dtype == b.dtype and torch.equal(a, b), name
    # mask layout: little-endian bits (FlashInfer segment_packbits)
    t = dk.build_tree(torch.tensor([[-1, 0, 1, 0, 3, 4, 5, 6, 7, 8]]), 0)
    assert t.tree_mask.shape == (1, 10, 2)
    assert t.tree_mask[0, 9].tolist() == [0b11111001, 0b11]


# ---- determinism: runs, threads, ISA paths, per-row seeds -------------------------------------
def _all_outputs():
    """Every stochastic form on inputs that exercise the vector paths (V > one chunk, list and
    full-row targets, multi-child residuals)."""
    B, N, V = 24, 4, 5000
    p, q, ids, lp = _chain_inputs(B, N, V, seed=21, peak=1.0)
    nd = torch.randint(0, N + 1, (B,), generator=_gen(22))
    outs = []
    outs += dk.chain_speculative_sampling(q, ids, p, seed=5, num_draft_tokens=nd)
    outs += dk.chain_speculative_sampling(None, ids, p, seed=6)
    for kw in ({}, {"top_k": 40}, {"top_p": 0.8, "temperature": 1.3}, {"min_p": 0.3}, {"min_p": 0.001}):
        outs += dk.chain_speculative_sampling_from_logits(q, ids, lp, seed=7, **kw)
        outs += dk.chain_speculative_sampling_from_logits(None, ids, lp.to(torch.bfloat16), seed=8, **kw)
    outs += dk.greedy_verify(ids, lp)
    parents, lt, qt, cand = fixed_tree_case(B, V, 23)
    tree = dk.build_tree(parents, 0)
    args = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling)
    outs += dk.tree_speculative_sampling(*args, lt.softmax(-1), qt, seed=9)
    outs += dk.tree_speculative_sampling(*args, lt.softmax(-1), None, seed=10)
    for kw in ({}, {"top_k": 50}, {"top_p": 0.9}):
        outs += dk.tree_speculative_sampling_from_logits(*args, lt, qt, seed=11, **kw)
        outs += dk.tree_speculative_sampling_from_logits(*args, lt, None, seed=12, **kw)
    return outs


def test_same_seed_same_result_runs_threads_isas():
    base = _all_outputs()
    assert all(torch.equal(a, b) for a, b in zip(base, _all_outputs()))
    nthreads = torch.get_num_threads()
    try:
        for isa, threads in itertools.product(ISAS, (1, 2)):
            dk.set_isa(isa)
            torch.set_num_threads(threads)
            got = _all_outputs()
            bad = [i for i, (a, b) in enumerate(zip(base, got)) if not torch.equal(a, b)]
            assert not bad, f"isa={isa} threads={threads}: outputs {bad} differ"
    finally:
        torch.set_num_threads(nthreads)


def test_per_row_seeds_independent_of_batch():
    B, N, V = 40, 3, 300
    p, q, ids, lp = _chain_inputs(B, N, V, seed=31)
    seeds = torch.randint(0, 2**62, (B,), generator=_gen(32))
    idx = torch.tensor([7, 3, 30, 11])
    full = dk.chain_speculative_sampling(q, ids, p, seed=seeds, offset=3)
    sub = dk.chain_speculative_sampling(q[idx], ids[idx], p[idx], seed=seeds[idx], offset=3)
    assert all(torch.equal(a[idx], b) for a, b in zip(full, sub))
    full = dk.chain_speculative_sampling_from_logits(None, ids, lp, seed=seeds, top_p=0.9)
    sub = dk.chain_speculative_sampling_from_logits(None, ids[idx], lp[idx], seed=seeds[idx], top_p=0.9)
    assert all(torch.equal(a[idx], b) for a, b in zip(full, sub))
    # trees: the sub-batch has its own retrive_index (b*T + t)
    T = 4
    par = torch.tensor([-1, 0, 0, 1]).expand(B, T)
    cand = torch.stack([torch.randperm(V, generator=_gen(i))[:T] for i in range(B)])
    tp = torch.randn(B, T, V, generator=_gen(33)).softmax(-1)
    tf = dk.build_tree(par, 0)
    ts = dk.build_tree(par[idx], 0)
    pf, af, nf = dk.tree_speculative_sampling(
        cand, tf.retrive_index, tf.retrive_next_token, tf.retrive_next_sibling, tp, seed=seeds
    )
    ps, as_, ns = dk.tree_speculative_sampling(
        cand[idx], ts.retrive_index, ts.retrive_next_token, ts.retrive_next_sibling, tp[idx], seed=seeds[idx]
    )
    assert torch.equal(pf.reshape(B, T)[idx], ps.reshape(len(idx), T)) and torch.equal(nf[idx], ns)
    assert torch.equal(af[idx] % T, as_ % T)
    # one scalar seed: rows draw independent streams; the generator makes runs reproducible
    torch.manual_seed(5)
    a = dk.chain_speculative_sampling(q, ids, p)
    torch.manual_seed(5)
    b = dk.chain_speculative_sampling(q, ids, p)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_output_conventions():
    p, q, ids, lp = _chain_inputs(4, 3, 20, seed=1)
    out, acc, emi = dk.chain_speculative_sampling(q, ids, p, seed=1, out_dtype=torch.int32)
    assert out.dtype == torch.int32 and acc.dtype == torch.int32 and emi.dtype == torch.int32
    acc_buf = torch.full((4,), 10, dtype=torch.int32)
    emi_buf = torch.zeros(4, dtype=torch.int32)
    out2, acc2, emi2 = dk.chain_speculative_sampling(q, ids, p, acc_buf, emi_buf, seed=1)
    assert acc2 is acc_buf and torch.equal(acc_buf, acc + 10) and torch.equal(emi_buf, emi)
    # B = 0 and N = 0
    o, a, e = dk.chain_speculative_sampling(q[:0], ids[:0], p[:0], seed=1)
    assert o.shape == (0, 4)
    o, a, e = dk.chain_speculative_sampling(None, ids[:, :0], p[:, :1], seed=1)
    assert o.shape == (4, 1) and bool((e == 0).all()) and bool((o >= 0).all())


def test_opcheck_and_compile():
    p, q, ids, lp = _chain_inputs(3, 2, 16, seed=2)
    ops = torch.ops.decodekit
    torch.library.opcheck(
        ops.chain_verify,
        (p, ids, q, None, 0, None, 1.0, None, 0, None, 1.0, None, 0.0, 0, None, 5, 0),
        test_utils=("test_schema", "test_faketensor"),
    )
    parents = torch.tensor([[-1, 0, 0, 1]] * 3)
    torch.library.opcheck(
        ops.build_tree, (parents, torch.zeros(3, dtype=torch.int64)), test_utils=("test_schema", "test_faketensor")
    )
    t = dk.build_tree(parents, 0)
    cand = torch.tensor([[0, 1, 2, 3]] * 3)
    tp = torch.rand(3, 4, 16).softmax(-1)
    torch.library.opcheck(
        ops.tree_verify,
        (
            cand,
            t.retrive_index,
            t.retrive_next_token,
            t.retrive_next_sibling,
            tp,
            None,
            3,
            0,
            None,
            1.0,
            None,
            0,
            None,
            1.0,
            None,
            0.0,
            0,
            None,
            5,
            0,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        ops.tree_verify,
        (
            cand,
            t.retrive_index,
            t.retrive_next_token,
            t.retrive_next_sibling,
            tp,
            None,
            3,
            0,
            None,
            1.0,
            None,
            0,
            None,
            1.0,
            None,
            0.0,
            0,
            None,
            5,
            0,
            torch.rand(3, 4),
            torch.rand(3),
            0.5,
            0.7,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )

    @torch.compile(fullgraph=True)
    def f(ids, lg):
        return dk.greedy_verify(ids, lg)

    assert all(torch.equal(a, b) for a, b in zip(f(ids, lp), dk.greedy_verify(ids, lp)))


# ---- bad inputs --------------------------------------------------------------------------------
def _bad_chain_cases():
    p, q, ids, lp = _chain_inputs(2, 3, 10, seed=0)
    C = dk.chain_speculative_sampling
    L = dk.chain_speculative_sampling_from_logits
    return [
        ("draft_token_ids must be 2-D", lambda: C(q, ids[0], p)),
        ("target_probs must have shape", lambda: C(q, ids, p[:, :3])),
        ("target_probs must have shape", lambda: C(q, ids, p[:1])),
        ("draft_probs must have shape", lambda: C(q[..., :9], ids, p)),
        ("draft_probs must have shape", lambda: C(q[:, :2], ids, p)),
        ("target_probs must be float32", lambda: C(q, ids, p.double())),
        ("draft_probs must be float32", lambda: C(q.to(torch.bfloat16), ids, p)),
        ("draft_token_ids must be int32 or int64", lambda: C(q, ids.float(), p)),
        ("draft_token_ids must be in [0, V)", lambda: C(q, ids.masked_fill(ids == ids[0, 0], 10), p)),
        ("draft_token_ids must be in [0, V)", lambda: C(None, ids - 100, p)),
        ("num_draft_tokens values must be in [0, N]", lambda: C(q, ids, p, num_draft_tokens=torch.tensor([1, 4]))),
        ("num_draft_tokens must be a 1-D tensor", lambda: C(q, ids, p, num_draft_tokens=torch.tensor([1]))),
        ("contiguous in the last dimension", lambda: C(q, ids, p.transpose(1, 2).contiguous().transpose(1, 2))),
        ("seed must be an int or an int64 tensor of length 1 or 2", lambda: C(q, ids, p, seed=torch.tensor([1, 2, 3]))),
        ("temperature must be 0 (greedy) or in", lambda: L(q, ids, lp, temperature=-1.0)),
        ("top_p must be in (0, 1]", lambda: L(q, ids, lp, top_p=0.0)),
        ("min_p must be in [0, 1]", lambda: L(q, ids, lp, min_p=2.0)),
        ("target_logits must be float32, bfloat16 or float16", lambda: L(q, ids, lp.double())),
        ("draft_token_ids must be in [0, V)", lambda: dk.greedy_verify(ids + 10, lp)),
    ]


def _tree_fixture():
    parents = torch.tensor([[-1, 0, 0, 1, 1]] * 2)
    t = dk.build_tree(parents, 0)
    cand = torch.tensor([[0, 1, 2, 3, 4]] * 2)
    tp = torch.rand(2, 5, 10).softmax(-1)
    return t, cand, tp


def _bad_tree_cases():
    t, cand, tp = _tree_fixture()
    S = dk.tree_speculative_sampling
    ri, nt, ns = t.retrive_index, t.retrive_next_token, t.retrive_next_sibling

    def mod(x, b, i, v):
        x = x.clone()
        x[b, i] = v
        return x

    return [
        ("candidates must be 2-D", lambda: S(cand[0], ri, nt, ns, tp)),
        ("retrive_next_token must have the shape", lambda: S(cand, ri, nt[:, :4], ns, tp)),
        ("target_probs must have shape", lambda: S(cand, ri, nt, ns, tp[:, :4])),
        ("draft_probs must have shape", lambda: S(cand, ri, nt, ns, tp, tp[..., :9])),
        ("retrive_index values must be distinct", lambda: S(cand, mod(ri, 1, 2, 0), nt, ns, tp)),
        ("retrive_index values must be in", lambda: S(cand, mod(ri, 1, 2, 10), nt, ns, tp)),
        ("is reached twice", lambda: S(cand, ri, mod(nt, 1, 3, 1), ns, tp)),  # cycle 1 -> 3 -> 1
        ("is reached twice", lambda: S(cand, ri, nt, mod(ns, 0, 2, 1), tp)),  # sibling cycle
        ("outside [-1, T)", lambda: S(cand, ri, mod(nt, 0, 0, 5), ns, tp)),
        ("links to node 0", lambda: S(cand, ri, mod(nt, 0, 1, 0), ns, tp)),
        ("coins and coins_final must be given together", lambda: S(cand, ri, nt, ns, tp, coins=tp[..., 0])),
        ("coins must have shape", lambda: S(cand, ri, nt, ns, tp, coins=tp[:, 0], coins_final=tp[:, 0, 0])),
        ("coins_final must have shape", lambda: S(cand, ri, nt, ns, tp, coins=tp[..., 0], coins_final=tp[0, 0])),
        ("coins must hold values in", lambda: S(cand, ri, nt, ns, tp, coins=tp[..., 0] + 1, coins_final=tp[:, 0, 0])),
        (
            "coins_final must hold values in",
            lambda: S(cand, ri, nt, ns, tp, coins=tp[..., 0], coins_final=tp[:, 0, 0] * float("nan")),
        ),
        (
            "coins are supported with one-hot drafts only",
            lambda: S(cand, ri, nt, ns, tp, tp, coins=tp[..., 0], coins_final=tp[:, 0, 0]),
        ),
        ("coins must be a floating tensor", lambda: S(cand, ri, nt, ns, tp, coins=cand, coins_final=tp[:, 0, 0])),
        ("need caller coins", lambda: S(cand, ri, nt, ns, tp, threshold_acc=0.5)),
        (
            "threshold_single must be in [0, 1]",
            lambda: S(cand, ri, nt, ns, tp, coins=tp[..., 0], coins_final=tp[:, 0, 0], threshold_single=2.0),
        ),
        (
            "threshold_acc must be in [0, 1]",
            lambda: S(cand, ri, nt, ns, tp, coins=tp[..., 0], coins_final=tp[:, 0, 0], threshold_acc=-1.0),
        ),
        ("candidate token outside [0, V)", lambda: S(mod(cand, 0, 4, 10), ri, nt, ns, tp)),
        ("num_speculative_tokens must be in", lambda: S(cand, ri, nt, ns, tp, num_speculative_tokens=0)),
        (
            "draft_probs must be None",
            lambda: torch.ops.decodekit.tree_verify(
                cand, ri, nt, ns, cand, tp, 5, 2, None, 1.0, None, 0, None, 1.0, None, 0.0, 0, None, 0, 0
            ),
        ),
        ("target_probs must be float32", lambda: S(cand, ri, nt, ns, tp.half())),
        ("must be int32 or int64", lambda: S(cand.float(), ri, nt, ns, tp)),
        ("is reached twice", lambda: dk.verify_tree_greedy(cand, ri, mod(nt, 1, 3, 1), ns, tp.argmax(-1))),
    ]


def _bad_build_cases():
    B = dk.build_tree
    return [
        ("two roots", lambda: B(torch.tensor([[-1, 0, -1]]), 0)),
        ("node 0 must be the root", lambda: B(torch.tensor([[0, 0, 1]]), 0)),
        ("outside [-1, T)", lambda: B(torch.tensor([[-1, 0, 3]]), 0)),
        ("outside [-1, T)", lambda: B(torch.tensor([[-1, 0, -2]]), 0)),
        ("parent with a larger index", lambda: B(torch.tensor([[-1, 2, 0]]), 0)),
        ("cycle", lambda: B(torch.tensor([[-1, 2, 1]]), 0)),
        ("cycle", lambda: B(torch.tensor([[-1, 0, 2]]), 0)),
        ("prefix_lens must be a 1-D tensor of length B", lambda: B(torch.tensor([[-1, 0]]), torch.tensor([1, 2]))),
        ("parents must be int32 or int64", lambda: B(torch.tensor([[-1.0, 0.0]]), 0)),
        ("parents must be 2-D", lambda: B(torch.tensor([-1, 0]), torch.tensor([0]))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_chain_cases())))
def test_bad_chain_inputs(case):
    msg, fn = _bad_chain_cases()[case]
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        fn()


@pytest.mark.parametrize("case", range(len(_bad_tree_cases())))
def test_bad_tree_inputs(case):
    msg, fn = _bad_tree_cases()[case]
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        fn()


@pytest.mark.parametrize("case", range(len(_bad_build_cases())))
def test_bad_build_tree_inputs(case):
    msg, fn = _bad_build_cases()[case]
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        fn()


def test_bad_rows_do_not_crash():
    """NaN / all -inf logits rows stop verification with token 0; other rows are unaffected."""
    p, q, ids, lp = _chain_inputs(4, 3, 30, seed=6)
    lp2 = lp.clone()
    lp2[1, 0] = float("nan")
    lp2[2, 0] = float("-inf")
    a = dk.chain_speculative_sampling_from_logits(q, ids, lp2, seed=1)
    b = dk.chain_speculative_sampling_from_logits(q, ids, lp, seed=1)
    assert a[0][1].tolist()[:2] == [0, -1] and a[0][2].tolist()[:2] == [0, -1]
    assert torch.equal(a[0][[0, 3]], b[0][[0, 3]])
    z = torch.zeros(2, 4, 30)
    out, _, _ = dk.chain_speculative_sampling(None, ids[:2], z, seed=1)
    assert bool((out[:, 0] == 0).all())


# ---- CUDA (compiled here, run where a GPU exists): same tokens as the CPU for the same seed ------
@pytest.mark.skipif(
    not torch.cuda.is_available() or not dk.build_info().get("cuda", False), reason="needs a CUDA build and a GPU"
)
def test_cuda_matches_cpu():
    dev = "cuda"
    B, N, V = 16, 4, 5000
    p, q, ids, lp = _chain_inputs(B, N, V, seed=50, peak=1.0)
    nd = torch.randint(0, N + 1, (B,), generator=_gen(51))
    seeds = torch.randint(0, 2**62, (B,), generator=_gen(52))
    cases = [
        lambda d: dk.chain_speculative_sampling(q.to(d), ids.to(d), p.to(d), seed=5, num_draft_tokens=nd.to(d)),
        lambda d: dk.chain_speculative_sampling(None, ids.to(d), p.to(d), seed=seeds.to(d), offset=9),
        lambda d: dk.chain_speculative_sampling_from_logits(q.to(d), ids.to(d), lp.to(d), temperature=0.8, seed=6),
        lambda d: dk.chain_speculative_sampling_from_logits(None, ids.to(d), lp.to(d).half(), seed=7),
        lambda d: dk.greedy_verify(ids.to(d), lp.to(d)),
    ]
    parents, lt, qt, cand = fixed_tree_case(B, V, 53)

    def tree(d):
        t = dk.build_tree(parents.to(d), 3)
        return t, (cand.to(d), t.retrive_index, t.retrive_next_token, t.retrive_next_sibling)

    cases += [
        lambda d: tuple(tree(d)[0]),
        lambda d: dk.tree_speculative_sampling(*tree(d)[1], lt.softmax(-1).to(d), qt.to(d), seed=8),
        lambda d: dk.tree_speculative_sampling(*tree(d)[1], lt.softmax(-1).to(d), None, seed=seeds.to(d)),
        lambda d: dk.tree_speculative_sampling_from_logits(*tree(d)[1], lt.to(d), qt.to(d), temperature=1.1, seed=9),
        lambda d: dk.verify_tree_greedy(*tree(d)[1], lt.to(d)),
        lambda d: dk.verify_tree_greedy(*tree(d)[1], lt.argmax(-1).to(d)),
    ]
    rep = cand.clone()
    rep[:, 2] = rep[:, 1]  # repeated sibling tokens
    coins, fin = torch.rand(B, 9, generator=_gen(54)), torch.rand(B, generator=_gen(55))

    def rtree(d):
        t = dk.build_tree(parents.to(d), 3)
        return (rep.to(d), t.retrive_index, t.retrive_next_token, t.retrive_next_sibling)

    cases += [
        lambda d: dk.tree_speculative_sampling(*rtree(d), lt.softmax(-1).to(d), qt.to(d), seed=10),
        lambda d: dk.tree_speculative_sampling(
            *rtree(d), lt.softmax(-1).to(d), coins=coins.to(d), coins_final=fin.to(d), threshold_acc=0.7
        ),
        lambda d: dk.verify_tree_greedy(*rtree(d), lt.argmax(-1).to(d)),
    ]
    for i, case in enumerate(cases):
        cpu, gpu = case("cpu"), case(dev)
        for a, b in zip(cpu, gpu):
            assert torch.equal(a, b.cpu()), f"case {i}"
    with pytest.raises(ValueError, match="CPU only"):
        dk.chain_speculative_sampling_from_logits(q.to(dev), ids.to(dev), lp.to(dev), top_k=5, seed=1)


def test_unreachable_nodes_are_ignored():
    """Nodes no walk can reach (SGLang leaves such nodes when a drafted parent is dropped) are never
    visited, even if their links form a cycle; a wide star with a repeated token is walked (the first
    matching sibling wins)."""
    t = dk.build_tree(torch.tensor([[-1, 0, 0, 1, 1]]), 0)
    nt, ns = t.retrive_next_token.clone(), t.retrive_next_sibling.clone()
    nt[0, 1] = -1
    nt[0, 3], ns[0, 4] = 4, 3
    tp = torch.rand(1, 5, 10, generator=_gen(1)).softmax(-1)
    pred, ai, an = dk.tree_speculative_sampling(torch.tensor([[0, 1, 2, 3, 3]]), t.retrive_index, nt, ns, tp, seed=1)
    assert int(an[0]) <= 1 and int(ai[0, 2]) == -1
    T = 3000
    t = dk.build_tree(torch.tensor([[-1] + [0] * (T - 1)]), 0)
    cand = torch.arange(T)[None].clone()
    cand[0, 2500] = 7  # repeats node 7's token
    tgt = torch.zeros(1, T, 4000)
    tgt[0, 0, 7] = 1.0
    pred, ai, an = dk.verify_tree_greedy(cand, t.retrive_index, t.retrive_next_token, t.retrive_next_sibling, tgt)
    assert ai[0, :2].tolist() == [0, 7] and int(an[0]) == 1  # the first matching sibling wins


# ---- repeated sibling tokens and caller coins --------------------------------------------------
def _repeat_star_first_tokens(p, q, n, seed, coins=False, chunk=250_000):
    """Root children x1, x1, x2, x2, x1 (x1 != x2; drawn from q without replacement when q is given,
    else uniformly), each a leaf. Returns the token emitted after the root in n independent rows."""
    V = p.shape[0]
    T = 6
    g = _gen(seed)
    out = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        src = (q if q is not None else torch.full((V,), 1.0 / V)).expand(m, V)
        x = _without_replacement(src, 2, g)
        cand = torch.stack([torch.zeros(m, dtype=torch.int64), x[:, 0], x[:, 0], x[:, 1], x[:, 1], x[:, 0]], 1)
        tree = dk.build_tree(torch.tensor([-1, 0, 0, 0, 0, 0]).expand(m, T), 0)
        tp = p.expand(m, T, V)
        dq = None if q is None else q.expand(m, T, V)
        kw = dict(coins=torch.rand(m, T, generator=g), coins_final=torch.rand(m, generator=g)) if coins else {}
        pred, _, _ = dk.tree_speculative_sampling(
            cand,
            tree.retrive_index,
            tree.retrive_next_token,
            tree.retrive_next_sibling,
            tp,
            dq,
            seed=seed + start,
            **kw,
        )
        out.append(pred.reshape(m, T)[:, 0])
    return torch.cat(out)


@pytest.mark.parametrize("mode", ["one_hot", "draft_probs", "one_hot_coins"])
def test_repeated_siblings_lossless(mode):
    """Repeated sibling tokens (a rejected token repeated later among the siblings) keep verification
    lossless: the token after the root follows the target exactly (chi-square, n = 10^6). With draft
    probs the distinct children are a draw without replacement from q and the repeats are skipped;
    with caller coins (one coin per node, thresholds 1) the one-hot rule is driven by the coins."""
    g = _gen(11)
    V = 8
    p = (torch.randn(V, generator=g) * 1.5).softmax(-1)
    q = (p.log() + torch.randn(V, generator=g)).softmax(-1) if mode == "draft_probs" else None
    toks = _repeat_star_first_tokens(p, q, N_STAT, seed=7, coins=mode == "one_hot_coins")
    assert_matches(toks, p, what=f"repeated siblings, {mode}")


def _repeat_tree_case(B, V, seed):
    parents, lt, qt, cand = fixed_tree_case(B, V, seed, scale=2)
    cand = cand.clone()
    cand[:, 2] = cand[:, 1]  # root children: x, x, y
    cand[1::2, 8] = cand[1::2, 7]  # node 4's children repeat in odd rows
    return parents, lt, qt, cand


@pytest.mark.parametrize("V", [12, 5000])
def test_repeated_siblings_and_coins_match_reference(V):
    """The kernel follows reference.py exactly with repeated sibling tokens (draft probs, one-hot,
    greedy logits / ids: first match wins) and with caller coins and thresholds."""
    B = 40
    parents, lt, qt, cand = _repeat_tree_case(B, V, V + 1)
    tree = dk.build_tree(parents, 0)
    links = (cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling)
    p = lt.softmax(-1)
    for dq, W in itertools.product((qt, None), (None, 3)):
        got = dk.tree_speculative_sampling(*links, p, dq, seed=5, num_speculative_tokens=W)
        exp = ref.tree_speculative_sampling(*links, p, dq, seed=5, num_speculative_tokens=W)
        assert all(torch.equal(a.long(), b.long()) for a, b in zip(got, exp)), (dq is None, W)
    ids = lt.argmax(-1)
    ids[::3, 0] = cand[::3, 1]  # the repeated token is the target's choice at the root
    for target in (ids, torch.nn.functional.one_hot(ids, V).float()):
        got = dk.verify_tree_greedy(*links, target)
        exp = ref.verify_tree_greedy(*links, target)
        assert all(torch.equal(a.long(), b.long()) for a, b in zip(got, exp))
    assert int(got[2][::3].min()) >= 1  # rows whose root choice is the repeated token accept it
    g = _gen(V)
    coins, fin = torch.rand(B, 9, generator=g), torch.rand(B, generator=g)
    for ts, ta in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.3), (0.0, 0.0)):
        got = dk.tree_speculative_sampling(
            *links, p, coins=coins, coins_final=fin, threshold_single=ts, threshold_acc=ta
        )
        exp = ref.tree_speculative_sampling(
            *links, p, coins=coins, coins_final=fin, threshold_single=ts, threshold_acc=ta
        )
        assert all(torch.equal(a.long(), b.long()) for a, b in zip(got, exp)), (ts, ta)
        if ts == 0.0:  # threshold_single 0 accepts the first child at every depth
            assert got[2].tolist() == [3] * B
    got = dk.tree_speculative_sampling_from_logits(*links, lt, coins=coins, coins_final=fin, temperature=0.7)
    exp = ref.tree_speculative_sampling_from_logits(*links, lt, coins=coins, coins_final=fin, temperature=0.7)
    # the reference filters logits in float64: only decisions within rounding of a coin may differ
    assert float((got[2] == exp[2]).double().mean()) >= 0.95
    assert float((got[0] == exp[0]).double().mean()) >= 0.95
