"""decodekit.compat.sglang against the cases of sgl-kernel's speculative tests.

The cases come from sgl-kernel's tests/speculative/test_eagle_utils.py (verify_tree_greedy: one
fixed two-row tree with its expected outputs), tests/speculative/test_speculative_sampling.py
(tree_speculative_sampling_target_only: the same tree at temperature 0.01, thresholds 1/1 and
0/0, with expected outputs) and SGLang's CPU tests of verify_tree_greedy (a chain with 0..3
accepted drafts, a hand-made chain, and EAGLE-shaped random trees with topk 4, 3 steps, 16 draft
tokens over a 3-token vocabulary, so repeated sibling tokens occur). Adapted in device (CPU) and
import (``decodekit.compat.sglang``) only; the expected outputs are sgl-kernel's. Beyond them: the
caller-buffer semantics, losslessness with SGLang's coins and repeated siblings (chi-square,
n = 10^6), and the sampler backend's own logic (SGLang itself pins torch 2.14.1 and CUDA
packages, so it is not installed next to decodekit's torch here; see the README).
"""

import importlib.util

import pytest
import torch

import decodekit as dk
import decodekit.compat.sglang as sgl
import decodekit.reference as ref
from stats import N_DRAWS, assert_matches

DEV = "cpu"


# ---- sgl-kernel's fixed tree ---------------------------------------------------------------------
def _fixed_tree():
    """Two rows of 6 nodes: row 0 = root -> 1 -> 2 and root -> 1 -> 3 -> 4 -> 5 (node 3 a sibling of
    node 2); row 1 = root -> 4 -> 5 and 4's sibling 1 -> 2 -> 3."""
    cand = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]], dtype=torch.int64, device=DEV)
    ri = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]], dtype=torch.int64, device=DEV)
    nt = torch.tensor([[1, 2, -1, 4, 5, -1], [4, 2, 3, -1, 5, -1]], dtype=torch.int64, device=DEV)
    ns = torch.tensor([[-1, 3, -1, -1, -1, -1], [-1, -1, -1, -1, 1, -1]], dtype=torch.int64, device=DEV)
    logits = torch.full((2, 6, 20), 1.0, device=DEV)
    logits[0, 0, 3] = logits[0, 3, 4] = logits[0, 4, 5] = 10
    logits[1, 0, 11] = logits[1, 4, 12] = 10
    for i in range(2):
        for j in range(6):
            if logits[i, j].max() < 10:
                logits[i, j, 18] = 10
    return cand, ri, nt, ns, logits


def _outputs(n_pred, B, W):
    return (
        torch.full((n_pred,), -1, dtype=torch.int32, device=DEV),
        torch.full((B, W), -1, dtype=torch.int32, device=DEV),
        torch.zeros(B, dtype=torch.int32, device=DEV),
    )


@pytest.mark.parametrize("spelling", ["retrive", "retrieve"])
def test_verify_tree_greedy(spelling):
    """sgl-kernel test_verify_tree_greedy (expected outputs from sgl-kernel); both keyword spellings."""
    cand, ri, nt, ns, logits = _fixed_tree()
    predicts, accept_index, accept_num = _outputs(12, 2, 4)
    out = sgl.verify_tree_greedy(
        predicts=predicts,
        accept_index=accept_index,
        accept_token_num=accept_num,
        candidates=cand,
        **{f"{spelling}_index": ri, f"{spelling}_next_token": nt, f"{spelling}_next_sibling": ns},
        target_predict=logits.argmax(-1),
    )
    assert out is None
    assert predicts.tolist() == [3, -1, -1, 4, 5, 18, 11, -1, -1, -1, 12, 18]
    assert accept_index.tolist() == [[0, 3, 4, 5], [6, 10, 11, -1]]
    assert accept_num.tolist() == [3, 2]


@pytest.mark.parametrize(
    "threshold_single,threshold_acc,exp_pred,exp_ai,exp_num",
    [
        (1, 1, [3, -1, -1, 4, 5, 18, 11, -1, -1, -1, 12, 18], [[0, 3, 4, 5], [6, 10, 11, -1]], [3, 2]),
        (0, 0, [1, 2, 18, -1, -1, -1, 11, -1, -1, -1, 12, 18], [[0, 1, 2, -1], [6, 10, 11, -1]], [2, 2]),
    ],
)
@pytest.mark.parametrize("draft_probs_kwarg", [False, True])
def test_tree_speculative_sampling_target_only(
    threshold_single, threshold_acc, exp_pred, exp_ai, exp_num, draft_probs_kwarg
):
    """sgl-kernel test_tree_speculative_sampling_target_only: target probs softmax(logits / 0.01),
    random coins, thresholds (1, 1) = lossless and (0, 0) = accept the first child at every depth
    (expected outputs from sgl-kernel). The older signature's draft_probs keyword is accepted."""
    cand, ri, nt, ns, logits = _fixed_tree()
    B, T = cand.shape
    predicts, accept_index, accept_num = _outputs(len(exp_pred), B, len(exp_ai[0]))
    target_probs = torch.softmax(logits / torch.tensor([0.01, 0.01])[:, None, None], -1)
    extra = dict(draft_probs=torch.zeros_like(target_probs)) if draft_probs_kwarg else {}
    sgl.tree_speculative_sampling_target_only(
        predicts=predicts,
        accept_index=accept_index,
        accept_token_num=accept_num,
        candidates=cand,
        retrive_index=ri,
        retrive_next_token=nt,
        retrive_next_sibling=ns,
        uniform_samples=torch.rand(B, T, device=DEV),
        uniform_samples_for_final_sampling=torch.rand(B, device=DEV),
        target_probs=target_probs,
        threshold_single=threshold_single,
        threshold_acc=threshold_acc,
        deterministic=True,
        **extra,
    )
    assert predicts.tolist() == exp_pred
    assert accept_index.tolist() == exp_ai
    assert accept_num.tolist() == exp_num


# ---- SGLang's CPU greedy cases ------------------------------------------------------------------------
def _plain_greedy_walk(cand, ri, nt, ns, target_predict, W):
    """The greedy walk written out: at each node try the children in sibling order and accept the
    first whose token equals target_predict.flat[retrive_index of the node]."""
    B, T = cand.shape
    pred = torch.full((B * T,), -1, dtype=torch.int32)
    ai = torch.full((B, W), -1, dtype=torch.int32)
    num = torch.zeros(B, dtype=torch.int32)
    flat = target_predict.reshape(-1)
    for b in range(B):
        last = int(ri[b, 0])
        ai[b, 0] = last
        cur, n = 0, 0
        for _ in range(1, W):
            cur = int(nt[b, cur])
            while cur != -1:
                if int(cand[b, cur]) == int(flat[last]):
                    pred[last] = int(flat[last])
                    n += 1
                    ai[b, n] = int(ri[b, cur])
                    last = int(ri[b, cur])
                    break
                cur = int(ns[b, cur])
            if cur == -1:
                break
        num[b] = n
        pred[last] = int(flat[last])
    return pred, ai, num


def _run_greedy(cand, ri, nt, ns, target_predict, W):
    B, T = cand.shape
    out = _outputs(B * T, B, W)
    sgl.verify_tree_greedy(*out, cand, ri, nt, ns, target_predict)
    exp = _plain_greedy_walk(cand, ri, nt, ns, target_predict, W)
    for a, e, name in zip(out, exp, ("predicts", "accept_index", "accept_token_num")):
        assert torch.equal(a, e), name
    return out


@pytest.mark.parametrize("bs", [1, 3])
def test_verify_tree_greedy_chain_topk1(bs):
    """SGLang CPU test_verify_tree_greedy_chain_topk1: chains of 3 drafts (topk 1) where row b has
    exactly (b mod 4) leading drafts equal to the target (3 for a single row)."""
    torch.manual_seed(1234)
    T, steps, vocab = 4, 3, 100
    ri = torch.arange(T).repeat(bs, 1) + torch.arange(bs)[:, None] * T
    nt = torch.tensor([[1, 2, 3, -1]]).repeat(bs, 1)
    ns = torch.full((bs, T), -1)
    target = torch.randint(0, vocab, (bs, T))
    cand = torch.randint(0, vocab, (bs, T))
    forced = [b % (steps + 1) if bs > 1 else steps for b in range(bs)]
    for b, m in enumerate(forced):
        for i in range(m):
            cand[b, i + 1] = target[b, i]
        for i in range(m, T - 1):
            cand[b, i + 1] = (target[b, i] + 1) % vocab
    _, _, num = _run_greedy(cand, ri, nt, ns, target, steps + 1)
    assert num.tolist() == forced


def test_verify_tree_greedy_chain_hand_case():
    """SGLang CPU test_verify_tree_greedy_chain_hand_case: drafts 3, 4 match, 5 does not."""
    pred, ai, num = _run_greedy(
        torch.tensor([[10, 3, 4, 5]]),
        torch.arange(4)[None],
        torch.tensor([[1, 2, 3, -1]]),
        torch.full((1, 4), -1),
        torch.tensor([[3, 4, 9, 9]]),
        4,
    )
    assert pred.tolist() == [3, 4, 9, -1] and ai.tolist() == [[0, 1, 2, -1]] and num.tolist() == [2]


def _eagle_parents(bs, topk, steps, draft_token_num, g):
    """Random EAGLE-shaped trees: every step gives each of the `topk` best nodes of the previous step
    (the root first) `topk` children scored by cumulative probability; then the draft_token_num - 1
    best nodes of all steps are kept (a child scores lower than its parent, so the kept set is closed
    under parents). Returns parents [bs, draft_token_num] in node order."""
    out = []
    for _ in range(bs):
        nodes = [(-1, 1.0)]  # (parent node id, cumulative score); node 0 = root
        frontier = [0]
        for _ in range(steps):
            new = []
            for f in frontier:
                for s in torch.rand(topk, generator=g).tolist():
                    nodes.append((f, nodes[f][1] * s))
                    new.append(len(nodes) - 1)
            frontier = sorted(new, key=lambda i: -nodes[i][1])[:topk]
        order = sorted(range(1, len(nodes)), key=lambda i: -nodes[i][1])[: draft_token_num - 1]
        keep = [0] + sorted(order)
        pos = {n: i for i, n in enumerate(keep)}
        out.append([-1] + [pos[nodes[n][0]] for n in keep[1:]])
    return torch.tensor(out)


@pytest.mark.parametrize("bs", [1, 3])
def test_verify_tree_greedy_tree_topk4(bs):
    """SGLang CPU test_verify_tree_greedy_tree_topk4: EAGLE trees (topk 4, 3 steps, 16 draft tokens)
    with random candidates and target tokens from a 3-token vocabulary, so siblings repeat tokens;
    the first matching sibling wins, and some drafts are accepted."""
    g = torch.Generator().manual_seed(1234)
    topk, steps, T, vocab = 4, 3, 16, 3
    for rep in range(20):
        tree = dk.build_tree(_eagle_parents(bs, topk, steps, T, g), torch.randint(4, 32, (bs,), generator=g))
        assert int((tree.retrive_next_sibling != -1).sum()) > 0  # the trees branch
        cand = torch.randint(0, vocab, (bs, T), generator=g)
        target = torch.randint(0, vocab, (bs, T), generator=g)
        _, _, num = _run_greedy(
            cand, tree.retrive_index, tree.retrive_next_token, tree.retrive_next_sibling, target, steps + 1
        )
        if rep == 0:
            assert int(num.sum()) > 0


# ---- beyond sgl-kernel's cases ---------------------------------------------------------------------
def test_outputs_written_in_place_only_where_the_walk_writes():
    """sgl-kernel writes the accepted path's predicts / accept_index entries and accept_token_num;
    other slots keep the caller's values. Dtypes are the caller's (int64 predicts here)."""
    cand, ri, nt, ns, logits = _fixed_tree()
    predicts = torch.full((12,), -7, dtype=torch.int64)
    accept_index = torch.full((2, 4), -9, dtype=torch.int32)
    accept_num = torch.full((2,), 5, dtype=torch.int32)
    sgl.verify_tree_greedy(predicts, accept_index, accept_num, cand, ri, nt, ns, logits.argmax(-1))
    assert predicts.tolist() == [3, -7, -7, 4, 5, 18, 11, -7, -7, -7, 12, 18]
    assert accept_index.tolist() == [[0, 3, 4, 5], [6, 10, 11, -9]] and accept_num.tolist() == [3, 2]
    with pytest.raises(ValueError, match="accept_index must be a 2-D tensor"):
        sgl.verify_tree_greedy(predicts, accept_index[0], accept_num, cand, ri, nt, ns, logits.argmax(-1))


def test_target_predict_read_at_retrive_index():
    """target_predict is read at retrive_index (flat), as sgl-kernel does: permuting the slots of
    retrive_index and target_predict together leaves the walk unchanged."""
    cand, ri, nt, ns, logits = _fixed_tree()
    tp = logits.argmax(-1)
    perm = torch.tensor([[5, 4, 3, 2, 1, 0], [11, 10, 9, 8, 7, 6]])  # node t of row b owns slot perm[b, t]
    tp2 = torch.empty(12, dtype=tp.dtype)
    tp2[perm.reshape(-1)] = tp.reshape(-1)
    out = _outputs(12, 2, 4)
    sgl.verify_tree_greedy(*out, cand, perm, nt, ns, tp2)
    assert out[2].tolist() == [3, 2]
    assert out[1].tolist() == [[5, 2, 1, 0], [11, 7, 6, -1]]


def test_target_only_lossless_with_coins_and_repeated_siblings():
    """With uniform coins and thresholds 1, the token after the root follows the target exactly
    (chi-square, n = 10^6), with root children x, x, y, x (x repeated after its rejection)."""
    V, T = 7, 5
    g = torch.Generator().manual_seed(3)
    p = (torch.randn(V, generator=g) * 1.3).softmax(-1)
    B = N_DRAWS
    x = torch.randint(0, V, (B,), generator=g)
    y = (x + torch.randint(1, V, (B,), generator=g)) % V
    cand = torch.stack([torch.zeros_like(x), x, x, y, x], 1)
    tree = dk.build_tree(torch.tensor([-1, 0, 0, 0, 0]).expand(B, T), 0)
    predicts, accept_index, accept_num = _outputs(B * T, B, T)
    sgl.tree_speculative_sampling_target_only(
        predicts,
        accept_index,
        accept_num,
        cand,
        tree.retrive_index,
        tree.retrive_next_token,
        tree.retrive_next_sibling,
        torch.rand(B, T, generator=g),
        torch.rand(B, generator=g),
        p.expand(B, T, V),
    )
    assert_matches(predicts.reshape(B, T)[:, 0], p, what="target-only with coins and repeated siblings")
    # the repeat is never accepted: an accepted root child is node 1 (x) or node 3 (y)
    acc = accept_index[:, 1][accept_num > 0] - torch.arange(B)[accept_num > 0] * T
    assert set(acc.unique().tolist()) <= {1, 3}


# ---- the sampler backend -------------------------------------------------------------------------------
def _backend_draws(probs_row, top_k, top_p, min_p, need_min_p):
    B = N_DRAWS
    V = probs_row.shape[0]
    return sgl.sample_from_probs(
        probs_row.expand(B, V),
        torch.full((B,), top_k, dtype=torch.int32),
        torch.full((B,), top_p),
        torch.full((B,), min_p),
        need_min_p,
    )


@pytest.mark.parametrize(
    "top_k,top_p,min_p,need_min_p",
    [(1 << 30, 1.0, 0.0, False), (5, 0.8, 0.0, False), (1 << 30, 0.6, 0.0, False), (6, 0.9, 0.15, True)],
)
def test_sampler_backend_follows_sglang_filters(top_k, top_p, min_p, need_min_p):
    """sample_from_probs draws exactly from SGLang's filtered distribution (chi-square, n = 10^6):
    joint top-k / top-p without min-p; top-k -> top-p -> min-p with min-p. top_k = 1 << 30 is
    SGLang's "no limit". Ids are int32."""
    g = torch.Generator().manual_seed(top_k % 97)
    V = 40
    probs = (torch.randn(V, generator=g) * 1.5).softmax(-1)
    s = _backend_draws(probs, top_k, top_p, min_p, need_min_p)
    assert s.dtype == torch.int32
    order = "sequential" if need_min_p else "joint"
    expect = ref.target_distribution(
        probs[None], is_probs=True, top_k=min(top_k, V), top_p=top_p, min_p=min_p if need_min_p else None, order=order
    )[0]
    assert_matches(s, expect, what=f"backend k={top_k} p={top_p} min_p={min_p}")


def test_sampler_backend_seeds():
    """Per-request seeds: a row's token depends only on (seed, position), not on the batch."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 300, generator=g).softmax(-1)
    args = (torch.full((6,), 50, dtype=torch.int32), torch.full((6,), 0.95), torch.zeros(6), False)
    seeds, pos = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([10, 11, 12, 13, 14, 15])
    a = sgl.sample_from_probs(probs, *args, sampling_seed=seeds, positions=pos)
    assert torch.equal(a, sgl.sample_from_probs(probs, *args, sampling_seed=seeds, positions=pos))
    b = sgl.sample_from_probs(
        probs[2:4],
        *(x[2:4] if isinstance(x, torch.Tensor) else x for x in args),
        sampling_seed=seeds[2:4],
        positions=pos[2:4],
    )
    assert torch.equal(a[2:4], b)
    c = sgl.sample_from_probs(probs, *args, sampling_seed=seeds, positions=pos + 1)
    assert bool((a != c).any())  # another position, another draw


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed")
def test_register_needs_sglang():
    """register() imports SGLang's registry; without sglang it raises ImportError (nothing mocked)."""
    with pytest.raises(ImportError):
        sgl.register()


def _sglang_sampler_module():
    """SGLang's sampler module where it imports (sglang 0.5.23 pins torch 2.14.1: see the README on
    how it was imported next to torch 2.13), else skip."""
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed")
    try:
        import sglang.srt.layers.sampler as mod
    except Exception as e:  # its import chain needs the serving stack
        pytest.skip(f"sglang.srt.layers.sampler does not import here: {type(e).__name__}: {e}")
    return mod


def test_register_with_sglang_registry():
    """register() against SGLang's own registry: the backend name becomes a --sampling-backend
    choice, SGLang's create_sampler factory entry is a subclass of SGLang's Sampler, and its
    _sample_from_probs (called with SGLang's own SamplingBatchInfo) draws from SGLang's filtered
    distribution (joint top-k / top-p; chi-square, 10^6 draws) with int32 ids and no mask capture."""
    mod = _sglang_sampler_module()
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo
    from sglang.srt.server_args import SAMPLING_BACKEND_CHOICES

    sgl.register("decodekit")
    factory = mod._CUSTOM_SAMPLER_FACTORIES["decodekit"]
    assert "decodekit" in SAMPLING_BACKEND_CHOICES
    assert issubclass(factory, mod.Sampler) and factory._sample_from_probs is not mod.Sampler._sample_from_probs
    # SGLang's Sampler.__init__ reads the tensor-parallel group of a running server: the method
    # under test needs none of it, so the instance gets nn.Module's initialisation only
    sampler = factory.__new__(factory)
    torch.nn.Module.__init__(sampler)
    V, B, k, p = 40, 100_000, 6, 0.8
    probs = (torch.randn(V, generator=torch.Generator().manual_seed(4)) * 1.5).softmax(-1)
    info = SamplingBatchInfo(
        temperatures=torch.ones(B, 1),
        top_ps=torch.full((B,), p),
        top_ks=torch.full((B,), k, dtype=torch.int32),
        min_ps=torch.zeros(B),
        is_all_greedy=False,
        is_any_greedy=False,
        need_top_p_sampling=True,
        need_top_k_sampling=True,
        need_min_p_sampling=False,
        vocab_size=V,
        device="cpu",
    )
    draws = []
    for _ in range(N_DRAWS // B):
        ids, capture = sampler._sample_from_probs(probs.expand(B, V).contiguous(), info, torch.zeros(B), False)
        assert capture is None and ids.dtype == torch.int32
        draws.append(ids)
    expect = ref.target_distribution(probs[None], is_probs=True, top_k=k, top_p=p, order="joint")[0]
    assert_matches(torch.cat(draws), expect, what="SGLang-registered decodekit backend")
