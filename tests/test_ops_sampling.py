"""sample / gumbel_sample / filter on every backend (tests/backends.py): "cpu", "cuda_emu" (the
CUDA kernels of csrc/cuda/sampling.cuh on CPU threads) and "cuda" (a real GPU), on the cases of
tests/cuda_cases.py.

On every backend a case's result is checked against reference.py (the specification): `sample`'s
valid flags are the reference's bad-row verdicts, bad rows give token 0, every other token is a
survivor of the reference's filters and its log-probability is the reference's within 1e-5;
`gumbel_sample` the same without filters; `filter`'s masks equal the reference's exactly, its
renormalised and softmax outputs within the CPU tests' tolerances (test_sampling.py). On
"cuda_emu" and "cuda" the result must also be the CPU op's exactly (same seed -> same tokens,
valid flags, identical filter outputs; log-probabilities bit for bit under the emulator, which
uses the host log(), and to the last float bit on a GPU, whose log() is libdevice's).

Case lists: "cpu" and "cuda_emu" run the emulator's matrix (smaller rows, bf16 / fp16 on a subset
of the filter settings: the emulator pays per barrier); "cuda" runs the full matrix. Under the
emulator every case runs at the production block size under SEEDS_PER_CASE randomised thread
orders (emu_runtime.h), different seeds for different cases.

Known, documented divergence (csrc/cuda/sampling.cuh): a top-p cut whose mass lies within double
rounding of p * Z may land on a neighbouring value; none of these inputs come near that.
"""

import functools
import re

import pytest
import torch

import backends as bk
import cuda_cases as cc
import decodekit
import emu
from decodekit import reference as R

ops = decodekit.ops
SEEDS_PER_CASE = 2
ORDER = {cc.SEQ: "sequential", cc.JOINT: "joint"}


def _emulated(i, fn, *args):
    """fn(*args) under each of case i's schedule seeds (never 0: that is the fixed order)."""
    return bk.emulated(bk.schedules(1 + SEEDS_PER_CASE * i, SEEDS_PER_CASE), fn, *args)


def _cached(fn):
    """The reference of a case is computed once per session (cpu and cuda_emu share case lists)."""
    memo = {}

    def wrapper(args):
        key = id(args)
        if key not in memo:
            with bk.one_thread():
                memo[key] = (args, fn(args))  # keeps args alive, so the id stays unique
        return memo[key][1]

    return wrapper


# ---- the reference side -------------------------------------------------------------------------
def _disabled(arr, val, off):
    return arr if arr is not None else (None if val == off else val)


def _reference_filters(x, is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order):
    """(temperatures or None, survivors) of reference.py for float32 rows x."""
    n = x.shape[0]
    T = None
    if not is_probs:
        T = T_arr.double() if T_arr is not None else torch.full((n,), float(T_val), dtype=torch.float64)
    keep = R.survivors(
        x,
        is_probs=is_probs,
        temperature=1.0 if T is None else T,
        top_k=_disabled(k_arr, k_val, 0),
        top_p=_disabled(p_arr, p_val, 1.0),
        min_p=_disabled(mp_arr, mp_val, 0.0),
        order=ORDER[order],
    )
    return T, keep


@_cached
def _sample_reference(args):
    """(bad rows, survivors, log of the renormalised survivor distribution) of every output row."""
    x, indices, is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order = args[:12]
    xs = (x if indices is None else x[indices]).float()
    T, keep = _reference_filters(xs, is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order)
    Tw = None if T is None else torch.where(T == 0, torch.ones_like(T), T)  # greedy rows: one survivor
    w = torch.where(keep, R.weights(xs, is_probs, Tw), torch.zeros((), dtype=torch.float64))
    return R.bad_rows(xs, is_probs), keep, torch.log(w / w.sum(-1, keepdim=True))


def _check_sample_reference(args, tok, valid, lp=None):
    bad, keep, logp = _sample_reference(args)
    assert torch.equal(valid, ~bad), (valid, bad)
    assert bool((tok[bad] == 0).all()), tok
    r = torch.arange(tok.numel())[valid]
    t = tok[valid]
    assert bool(keep[r, t].all()), ("not a survivor of reference.py's filters", tok, keep[r, t])
    if lp is not None:
        torch.testing.assert_close(lp[valid].double(), logp[r, t], rtol=1e-5, atol=1e-5)


@_cached
def _filter_reference(args):
    """reference.py's output for ops.filter(*args), and the rows it defines (see below)."""
    x, kind, is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order = args
    x = x.float()
    if kind == 2:
        return R.softmax(x, T_val if T_arr is None else T_arr.double()), None
    T, keep = _reference_filters(x, is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order)
    # reference.py defines temperature 0 for samplers (one survivor: the lowest-index argmax); the
    # filter op's greedy row keeps the whole tie group at the row's max (the T -> 0 limit)
    greedy = torch.zeros(x.shape[0], dtype=torch.bool) if T is None else T == 0
    for b in torch.nonzero(greedy).reshape(-1).tolist():
        keep[b] = x[b] == x[b].max()
    return (R._mask(x, keep) if kind == 0 else R._renorm(x, keep)), greedy


def _check_filter_reference(args, out):
    kind = args[1]
    ref, _ = _filter_reference(args)
    if kind == 0:  # masks: exactly the reference (bad rows pass through)
        assert out.dtype == args[0].dtype
        assert torch.equal(out.float().isnan(), ref.isnan())
        assert torch.equal(out.float().nan_to_num(), ref.nan_to_num())
    elif kind == 1:  # renormalised probabilities: the same kept set, values within 1-2 ulp
        assert torch.equal(out > 0, ref > 0), "kept sets differ"
        torch.testing.assert_close(out, ref, rtol=2e-7, atol=0)
    else:  # softmax (NaN rows for bad rows)
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-12, equal_nan=True)


# ---- sample ---------------------------------------------------------------------------------------
# the emulator's matrix: smaller rows than the GPU's (the emulator pays per barrier); still more
# than one 4096-chunk
SAMPLE_EMU = cc.sample_cases(V=6000, light=True) + cc.special_sample_cases()
SAMPLE = {"cpu": SAMPLE_EMU, "cuda_emu": SAMPLE_EMU, "cuda": cc.sample_cases() + cc.special_sample_cases()}


def _same_sample_emu(cpu, got):
    tok_c, val_c, lp_c = cpu
    tok_g, val_g, lp_g = got
    assert torch.equal(val_c, val_g), (val_c, val_g)
    assert torch.equal(tok_c, tok_g), (tok_c, tok_g)
    # the emulator uses the host log(), so logprobs are bit-identical here (on a GPU: last-bit)
    assert torch.equal(lp_c, lp_g), (lp_c, lp_g)


def _same_sample_gpu(cpu, gpu):
    tok_c, val_c, lp_c = cpu
    tok_g, val_g, lp_g = gpu
    assert torch.equal(val_c, val_g), (val_c, val_g)
    assert torch.equal(tok_c, tok_g), (tok_c, tok_g)
    # log(double) of CUDA's libdevice vs glibc: at most the last float bit
    torch.testing.assert_close(lp_g, lp_c, rtol=3e-7, atol=1e-7)


def _on_backend(backend, i, cpu, op, emu_fn, args, same_emu, same_gpu):
    """The op's result on `backend` for case i: the CPU result `cpu` itself; else every emulated
    schedule's result (each checked by same_emu(cpu, got)) or the GPU's (same_gpu(cpu, got)); returns
    the last one."""
    if backend == "cpu":
        return cpu
    if backend == "cuda_emu":
        for got in _emulated(i, emu_fn, *args):
            same_emu(cpu, got)
        return got
    got = bk.on_cuda(op, *args)
    same_gpu(cpu, got)
    return got


@pytest.mark.parametrize("backend, i, args", bk.params(SAMPLE))
def test_sample(backend, i, args):
    got = _on_backend(backend, i, ops.sample(*args), ops.sample, emu.sample, args, _same_sample_emu, _same_sample_gpu)
    _check_sample_reference(args, *got)


# ---- gumbel_sample --------------------------------------------------------------------------------
GUMBEL_CASES = cc.gumbel_cases()
GUMBEL = dict.fromkeys(bk.BACKENDS, GUMBEL_CASES)


def _gumbel_as_sample(args):
    """gumbel_sample's arguments as `sample`'s (no filters), for the reference check."""
    x, indices, seeds, seed, offset = args
    return (x, indices, False, None, 1.0, None, 0, None, 1.0, None, 0.0, cc.SEQ, seeds, seed, offset)


def _same_gumbel(cpu, got):
    (tc, vc), (tg, vg) = cpu, got
    assert torch.equal(vc, vg) and torch.equal(tc, tg), (tc, tg, vc, vg)


@pytest.mark.parametrize("backend, i, args", bk.params(GUMBEL))
def test_gumbel_sample(backend, i, args):
    cpu = ops.gumbel_sample(*args)
    tg, vg = _on_backend(backend, i, cpu, ops.gumbel_sample, emu.gumbel_sample, args, _same_gumbel, _same_gumbel)
    _check_sample_reference(_gumbel_as_sample(args), tg, vg)


# ---- filter -----------------------------------------------------------------------------------------
FILTER_EMU = cc.filter_cases(V=4500, light=True)
FILTER = {"cpu": FILTER_EMU, "cuda_emu": FILTER_EMU, "cuda": cc.filter_cases()}


def _same_filter(c, g):
    assert c.dtype == g.dtype
    assert torch.equal(c.isnan(), g.isnan())
    assert torch.equal(torch.nan_to_num(c), torch.nan_to_num(g))


@pytest.mark.parametrize("backend, i, args", bk.params(FILTER))
def test_filter(backend, i, args):
    g = _on_backend(backend, i, ops.filter(*args), ops.filter, emu.filter, args, _same_filter, _same_filter)
    _check_filter_reference(args, g)


# ---- the emulator's block sizes -------------------------------------------------------------------
@bk.needs_emu
def test_emu_production_block_size():
    """The default build is the production block size, and a small block (more elements per
    thread) gives the CPU's tokens too."""
    src = (emu.ROOT / "csrc/cuda/sampling.cuh").read_text()
    assert emu.load().dk_emu_threads() == int(re.search(r"#define DK_CUDA_THREADS (\d+)", src).group(1))
    emu.set_schedule_seed(7)
    for name, args in SAMPLE_EMU[::40]:
        _same_sample_emu(ops.sample(*args), emu.sample(*args, threads=64))


# ---- GPU only: sizes, streams, the public API, errors ---------------------------------------------
DEV = "cuda"


@bk.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "label,f",
    [
        ("plain", {}),
        ("k50_p0.9", dict(k=50, p=0.9)),
        ("p0.95", dict(p=0.95)),
        ("minp0.02_T0.8", dict(mp=0.02, T=0.8)),
        ("k1000_p0.98_joint", dict(k=1000, p=0.98, order=cc.JOINT)),
    ],
)
def test_cuda_llm_vocab(dtype, label, f):
    """A real vocabulary size (128256, 32 chunks), a batch of 16 rows."""
    x = cc.logits_family("randn", 16, 128256, seed=1).to(dtype)
    args = cc.sample_args(x, False, f, seed=2024)
    _same_sample_gpu(ops.sample(*args), bk.on_cuda(ops.sample, *args))


@bk.needs_cuda
def test_cuda_many_streams_through_indices():
    """20000 outputs drawn from 3 rows through `indices` (scalar seed: one stream per output)."""
    x = cc.logits_family("randn", 3, 4000, seed=8)
    idx = torch.arange(20000) % 3
    for f in ({}, dict(k=30, p=0.8), dict(mp=0.05)):
        args = cc.sample_args(x, False, f, indices=idx, seed=31337)
        _same_sample_gpu(ops.sample(*args), bk.on_cuda(ops.sample, *args))
    tc, _ = ops.gumbel_sample(x, idx, None, 5, 0)
    tg, _ = ops.gumbel_sample(x.to(DEV), idx.to(DEV), None, 5, 0)
    assert torch.equal(tc, tg.cpu())


@bk.needs_cuda
def test_cuda_public_api_matches_cpu():
    torch.manual_seed(0)
    logits = torch.randn(8, 32000)
    probs = torch.softmax(logits, -1)
    for fn, x, kw in [
        (decodekit.sample, logits, dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.01)),
        (decodekit.top_k_top_p_sampling_from_probs, probs, dict(top_k=20, top_p=0.8)),
        (decodekit.sampling_from_logits, logits, {}),
        (decodekit.min_p_sampling_from_probs, probs, dict(min_p=0.1)),
    ]:
        a = fn(x, seed=7, **kw)
        b = fn(x.to(DEV), seed=7, **kw)
        assert b.device.type == "cuda"
        assert torch.equal(a, b.cpu()), fn.__name__
    seeds = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    a = decodekit.sample(logits, top_p=0.9, seed=seeds)
    b = decodekit.sample(logits.to(DEV), top_p=0.9, seed=seeds.to(DEV))
    assert torch.equal(a, b.cpu())


@bk.needs_cuda
def test_cuda_deterministic_and_stream_ordered():
    x = cc.logits_family("randn", 64, 50000, seed=3).to(DEV)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        a = ops.sample(*cc.sample_args(x, False, dict(p=0.9), seed=1))[0]
    s.synchronize()
    b = ops.sample(*cc.sample_args(x, False, dict(p=0.9), seed=1))[0]
    assert torch.equal(a, b)


@bk.needs_cuda
def test_cuda_errors_name_the_argument():
    x = torch.randn(4, 100, device=DEV)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample(x, None, False, torch.ones(4), 1.0, None, 0, None, 1.0, None, 0.0, 0, None, 0, 0)
    with pytest.raises(ValueError, match="indices"):
        ops.sample(x, torch.tensor([0, 1]), False, None, 1.0, None, 0, None, 1.0, None, 0.0, 0, None, 0, 0)
    with pytest.raises(ValueError, match="top_p"):
        ops.sample(x, None, False, None, 1.0, None, 0, None, 0.0, None, 0.0, 0, None, 0, 0)
    with pytest.raises(ValueError, match="seed"):
        ops.sample(x, None, False, None, 1.0, None, 0, None, 1.0, None, 0.0, 0, torch.tensor([1, 2]).to(DEV), 0, 0)


@bk.needs_cuda
def test_cuda_empty_batch():
    x = torch.empty(0, 10, device=DEV)
    tok, valid, lp = ops.sample(*cc.sample_args(x, False, dict(k=3)))
    assert tok.shape == (0,) and tok.device.type == "cuda"
    assert ops.gumbel_sample(x, None, None, 0, 0)[0].shape == (0,)
    assert ops.filter(*cc.filter_args(x, 0, False, dict(k=3))).shape == (0, 10)


@bk.needs_cuda
def test_cuda_opcheck():
    x = torch.randn(3, 300, device=DEV)
    torch.library.opcheck(ops.sample, cc.sample_args(x, False, dict(k=5, p=0.9), seed=1))
    torch.library.opcheck(ops.gumbel_sample, (x, None, None, 1, 0))
    torch.library.opcheck(ops.filter, cc.filter_args(x, 0, False, dict(k=5)))


# ---- split rows (csrc/cuda/sampling.cuh split_plan) -------------------------------------------------
# With fewer rows than SMs, an unfiltered sample (greedy, temperature only, plain probabilities) or
# a Gumbel-max row is cut into slices of whole 4096-element chunks, one CTA each. The result must
# be the one-CTA kernels' and the CPU's bit for bit (tokens, valid flags, log-probabilities). The
# emulator runs the plan for a chosen SM count (2-slice, 3-slice and one-chunk-per-CTA plans); a
# real GPU splits these small batches by its own SM count. Filtered rows: SPLIT_FILTERED below.
def _split_cases():
    out = []
    fams = [("randn", 3, 9000), ("neginf", 2, 40000), ("peaked", 2, 12289), ("bad", 6, 8193)]
    for fam, B, V in fams:
        x = cc.logits_family(fam, B, V, seed=V)
        for dt in (cc.F32, cc.BF16, cc.F16):
            for label, f in [("plain", {}), ("T0.7", dict(T=0.7)), ("greedy", dict(T=0.0))]:
                out.append((f"logits-{fam}-V{V}-{dt}-{label}", cc.sample_args(x.to(dt), False, f, seed=7 + len(out))))
    out.append(
        ("logits-V128256-T0.8", cc.sample_args(cc.logits_family("randn", 1, 128256, seed=1), False, dict(T=0.8)))
    )
    out.append(
        (
            "logits-per-row-T",
            cc.sample_args(cc.logits_family("randn", 4, 9000, seed=2), False, dict(T=[0.5, 0.0, 1.0, 2.0])),
        )
    )
    x = cc.logits_family("randn", 3, 20000, seed=3)
    idx = torch.tensor([2, 0, 2])
    out.append(
        ("indices-seeds", cc.sample_args(x, False, dict(T=1.1), indices=idx, seeds=torch.tensor([4, 4, 9]), seed=0))
    )
    out.append(("offset", cc.sample_args(x, False, dict(), seed=-5, offset=2**40 + 3)))
    for fam in ("randn", "zipf", "zeros", "unnormalised"):
        out.append((f"probs-{fam}", cc.sample_args(cc.probs_family(fam, 3, 16385, seed=5), True, {}, seed=11)))
    return out


SPLIT_SAMPLE = _split_cases()


def _split_filtered_cases():
    """Rows WITH top-k / top-p / min-p: every filter setting of tests/cuda_cases.py (ties and masked
    rows too), bf16 / fp16, probabilities, bad rows, indices with per-row seeds, the list draw and the
    chunked draw (k5000, minp_tiny), and a V = 128256 row."""
    out = []
    for fam in ("randn", "ties", "neginf"):
        x = cc.logits_family(fam, 2, 9000, seed=21)
        for label, f in cc.FILTERS:
            if label in ("plain", "T0.7", "greedy"):
                continue  # SPLIT_SAMPLE's
            out.append((f"logits-{fam}-{label}", cc.sample_args(x, False, f, seed=3 + len(out))))
    x = cc.logits_family("randn", 2, 12289, seed=22)
    for dt in (cc.BF16, cc.F16):
        for label in ("k50", "p0.9", "k100_p0.8_seq", "k3000_p0.95_minp0.01_T1.3_joint", "per_row"):
            out.append(
                (f"logits-{dt}-{label}", cc.sample_args(x.to(dt), False, dict(cc.FILTERS)[label], seed=len(out)))
            )
    for fam in ("zipf", "zeros"):
        x = cc.probs_family(fam, 3, 9000, seed=23)
        for label in ("k50", "p0.9", "minp0.05", "k100_p0.8_joint", "per_row"):
            out.append((f"probs-{fam}-{label}", cc.sample_args(x, True, dict(cc.FILTERS)[label], seed=len(out))))
    out.append(("bad-rows", cc.sample_args(cc.logits_family("bad", 4, 8193), False, dict(k=10, p=0.9), seed=2)))
    x = cc.logits_family("randn", 3, 20000, seed=24)
    out.append(
        (
            "indices-seeds",
            cc.sample_args(
                x, False, dict(p=0.9), indices=torch.tensor([2, 0, 2]), seeds=torch.tensor([4, 4, 9]), seed=0
            ),
        )
    )
    x = cc.logits_family("randn", 1, 128256, seed=25)
    out.append(("V128256-k50-p0.9", cc.sample_args(x, False, dict(k=50, p=0.9, T=0.8), seed=26)))
    return out


SPLIT_FILTERED = _split_filtered_cases()


def _same_split(cpu, got):
    for c, g in zip(cpu, got):
        assert torch.equal(c, g.cpu()), (c, g)


def _expected_splits(n_out, V, n_sms, top_p=False):
    nch = -(-V // 4096)
    if n_sms <= 0 or n_out >= n_sms or nch < 2:
        return 1
    if top_p and 2 * n_out * nch * 256 * 8 > 32 << 20:  # top-p's chunk histograms over 32 MiB
        return 1
    want = min(nch, -(-n_sms // n_out))
    per = -(-nch // want)
    return -(-nch // per)


def _n_out(args):
    x, indices = args[0], args[1]
    return x.shape[0] if indices is None else indices.numel()


def _run_plans(seed0, run, cpu, same, n_out, V, sms):
    """run(n_sms=...) for each SM count in sms (schedule seed seed0 + its position): the plan must split
    as _expected_splits says, and the result must be the CPU's (same(cpu, got)). Returns the last
    result and the split counts seen."""
    seen = []
    for j, n_sms in enumerate(sms):
        emu.set_schedule_seed(seed0 + j)
        got = run(n_sms=n_sms)
        assert emu.last_splits[0] == _expected_splits(n_out, V, n_sms) > 1
        seen.append(emu.last_splits[0])
        same(cpu, got)
    return got, seen


@bk.needs_emu
def test_emu_split_plan_rule():
    """split_plan's CTAs per row over sizes, SM counts and filters: the README's rule, including no
    split at n_out >= n_sms or one chunk, and none with top-p once its chunk histograms would pass
    32 MiB (8192 (row, chunk) pairs)."""
    seen = set()
    for n_out in (1, 2, 7, 64, 131, 132, 200):
        for V in (100, 4096, 4097, 32000, 128256, 151936, 16 * 2**20):
            for n_sms in (0, 1, 2, 108, 132):
                for k, p in ((0, 1.0), (50, 1.0), (0, 0.9), (50, 0.9)):
                    want = _expected_splits(n_out, V, n_sms, top_p=p < 1.0)
                    assert emu.plan_splits(n_out, V, n_sms, k, p) == want, (n_out, V, n_sms, k, p)
                    seen.add(want)
                assert emu.plan_splits(n_out, V, n_sms, gumbel=True) == _expected_splits(n_out, V, n_sms)
    assert emu.plan_splits(3, 16 * 2**20, 132, 0, 0.9) == 1 and emu.plan_splits(3, 16 * 2**20, 132) > 1
    assert 1 in seen and 32 in seen and max(seen) > 32


@bk.needs_emu
@pytest.mark.parametrize("i", range(len(SPLIT_SAMPLE)), ids=[c[0] for c in SPLIT_SAMPLE])
def test_emu_split_sample(i):
    _, args = SPLIT_SAMPLE[i]
    n, V = _n_out(args), args[0].shape[1]
    run = functools.partial(emu.sample, *args)
    got, seen = _run_plans(1 + 3 * i, run, ops.sample(*args), _same_split, n, V, (2 * n, 3 * n, 10**6))
    assert max(seen) == -(-V // 4096)  # one chunk per CTA in the last plan
    _check_sample_reference(args, *got)


@bk.needs_cuda
@pytest.mark.parametrize("i", range(len(SPLIT_SAMPLE)), ids=[c[0] for c in SPLIT_SAMPLE])
def test_cuda_split_sample(i):
    """On a GPU these small batches split by the device's own SM count."""
    _, args = SPLIT_SAMPLE[i]
    _same_split(ops.sample(*args), ops.sample(*cc.to_device(args, "cuda")))


@bk.needs_emu
@pytest.mark.parametrize("i", range(len(SPLIT_FILTERED)), ids=[c[0] for c in SPLIT_FILTERED])
def test_emu_split_filtered(i):
    """Filtered rows split too (the radix selects' histograms per slice / per chunk): the same tokens,
    valid flags and log-probabilities as the CPU op for a 2-slice plan and one chunk per CTA."""
    _, args = SPLIT_FILTERED[i]
    n, V = _n_out(args), args[0].shape[1]
    run = functools.partial(emu.sample, *args)
    got, _ = _run_plans(5 + 2 * i, run, ops.sample(*args), _same_split, n, V, (2 * n, 10**6))
    _check_sample_reference(args, *got)


@bk.needs_cuda
@pytest.mark.parametrize("i", range(len(SPLIT_FILTERED)), ids=[c[0] for c in SPLIT_FILTERED])
def test_cuda_split_filtered(i):
    _, args = SPLIT_FILTERED[i]
    _same_split(ops.sample(*args), ops.sample(*cc.to_device(args, "cuda")))


SPLIT_GUMBEL = []
for fam, B, V in [
    ("randn", 3, 9000),
    ("ties", 2, 12289),
    ("neginf", 2, 40000),
    ("bad", 5, 8193),
    ("peaked", 2, 128256),
]:
    for dt in (cc.F32, cc.BF16):
        SPLIT_GUMBEL.append((f"{fam}-V{V}-{dt}", (cc.logits_family(fam, B, V, seed=3).to(dt), None, None, 99, 0)))
SPLIT_GUMBEL.append(
    (
        "indices-seeds",
        (cc.logits_family("randn", 2, 20000, seed=4), torch.tensor([1, 1, 0]), torch.tensor([3, 3, 4]), 0, 5),
    )
)


@bk.needs_emu
@pytest.mark.parametrize("i", range(len(SPLIT_GUMBEL)), ids=[c[0] for c in SPLIT_GUMBEL])
def test_emu_split_gumbel(i):
    _, args = SPLIT_GUMBEL[i]
    n, V = _n_out(args), args[0].shape[1]
    run = functools.partial(emu.gumbel_sample, *args)
    got, _ = _run_plans(2 + 2 * i, run, ops.gumbel_sample(*args), _same_split, n, V, (2 * n, 10**6))
    _check_sample_reference(_gumbel_as_sample(args), *got)


@bk.needs_cuda
@pytest.mark.parametrize("i", range(len(SPLIT_GUMBEL)), ids=[c[0] for c in SPLIT_GUMBEL])
def test_cuda_split_gumbel(i):
    _, args = SPLIT_GUMBEL[i]
    _same_split(ops.gumbel_sample(*args), ops.gumbel_sample(*cc.to_device(args, "cuda")))


# ---- split filter rows (csrc/cuda/sampling.cuh filter_plan) -------------------------------------
def _split_filter_cases():
    """Masked logits (every filter setting; temperature 0; bf16 / fp16; bad rows), renormalised
    probabilities and softmax, on rows of 3 and 4 chunks."""
    out = []
    for fam in ("randn", "ties", "neginf", "bad"):
        x = cc.logits_family(fam, 2, 9000, seed=31)
        for label, f in cc.FILTERS:
            if label in ("plain", "T0.7", "minp_tiny") or (fam != "randn" and label not in cc.LIGHT):
                continue
            out.append((f"mask-{fam}-{label}", cc.filter_args(x, 0, False, f)))
        out.append((f"softmax-{fam}", cc.filter_args(x, 2, False, dict(T=[0.7, 1.3]))))
        # the op's softmax ignores is_probs (T = 1, logits semantics), split or not
        out.append((f"softmax-is-probs-{fam}", cc.filter_args(x, 2, True, {})))
    x = cc.logits_family("randn", 2, 12289, seed=32)
    for dt in (cc.BF16, cc.F16):
        for label in ("k50", "p0.9", "k100_p0.8_joint", "per_row"):
            out.append((f"mask-{dt}-{label}", cc.filter_args(x.to(dt), 0, False, dict(cc.FILTERS)[label])))
    for fam in ("zipf", "zeros", "unnormalised"):
        x = cc.probs_family(fam, 2, 9000, seed=33)
        for label in ("k50", "k5000_chunked", "p0.9", "minp0.05", "k100_p0.8_seq", "per_row"):
            out.append((f"renorm-{fam}-{label}", cc.filter_args(x, 1, True, dict(cc.FILTERS)[label])))
    return out


SPLIT_FILTER = _split_filter_cases()


@bk.needs_emu
@pytest.mark.parametrize("i", range(len(SPLIT_FILTER)), ids=[c[0] for c in SPLIT_FILTER])
def test_emu_split_filter(i):
    """The filter outputs of split rows equal the CPU op's (and so the one-CTA kernel's) exactly."""
    _, args = SPLIT_FILTER[i]
    B, V = args[0].shape
    run = functools.partial(emu.filter, *args)
    got, _ = _run_plans(9 + 2 * i, run, ops.filter(*args), _same_filter, B, V, (2 * B, 10**6))
    if "greedy" not in SPLIT_FILTER[i][0] and "is-probs" not in SPLIT_FILTER[i][0]:  # (no reference for these)
        _check_filter_reference(args, got)


@bk.needs_cuda
@pytest.mark.parametrize("i", range(len(SPLIT_FILTER)), ids=[c[0] for c in SPLIT_FILTER])
def test_cuda_split_filter(i):
    _, args = SPLIT_FILTER[i]
    _same_filter(ops.filter(*args), ops.filter(*cc.to_device(args, "cuda")).cpu())
