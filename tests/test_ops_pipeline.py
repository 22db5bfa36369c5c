"""The whole sampling step (torch.ops.decodekit.pipeline; csrc/cuda/pipeline.cuh on CUDA) on every
backend (tests/backends.py): "cpu", "cuda_emu" (the kernel on CPU threads) and "cuda" (a real GPU),
over every truncation alone and combined, each order, both logprob modes, bad rows, three dtypes,
indices, per-row parameters and one full-vocabulary row.

On every backend a call's outputs are checked against reference.pipeline (the specification):
valid flags; bad rows give token 0; every token has positive reference probability, its logprob
and rank are the reference's (logprob within 2e-5, test_pipeline.py's tolerance); the top-n lists
are the reference's ids with logprobs within 2e-5; the masked logits (mode 1) are the reference's
processed logits with -inf outside its survivors, exactly. On "cuda_emu" the outputs must also be
the CPU op's bit for bit (tokens, valid flags, logprobs, ranks, top-n lists, masked logits); on
"cuda" the same, up to the documented last-bit difference of libdevice's double log in the
logprobs. The emulator-only tests at the end check what only the kernel does (invalid values make
invalid rows and set the error flag; seed and offsets read from memory)."""

import hashlib
import math

import pytest
import torch

import backends as bk
import decodekit
import emu_pipe
from decodekit import reference as R
from decodekit.pipeline import pack_params
from test_pipeline import FILTERS, _inputs, _logits

ORDERS = {"sequential": 0, "joint": 1, "vllm": 2}
ORDER_NAMES = {v: k for k, v in ORDERS.items()}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG = float("-inf")
BACKEND_PARAMS = [pytest.param(b, marks=bk.MARKS[b]) for b in bk.BACKENDS]
on_backends = pytest.mark.parametrize("backend", BACKEND_PARAMS)


def _bits(t):
    if t.dtype in (torch.float32,):
        return t.view(torch.int32)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t


class _Args(tuple):
    """The op's positional arguments; .spec keeps the unpacked keywords for reference.pipeline."""


def _args(x, kw, params, *, indices=None, order=0, mode=0, top_n=0, raw=False, want=True, seed_arr=None):
    n = x.shape[0] if indices is None else indices.shape[0]
    P = pack_params(n, **params).contiguous()
    bias = kw.get("logit_bias") or (None, None)
    a = _Args(
        (
            x,
            indices,
            P,
            order,
            kw.get("allowed_token_bitmask"),
            kw.get("banned_token_ids"),
            bias[0],
            bias[1],
            kw.get("prompt_token_ids"),
            kw.get("output_token_ids"),
            mode,
            top_n,
            raw,
            want,
            seed_arr,
            12345,
            7,
        )
    )
    a.spec = dict(kw=kw, params=params, indices=indices, order=order, mode=mode, top_n=top_n, raw=raw, want=want)
    return a


NAMES = ["tokens", "valid", "logprob", "rank", "top_ids", "top_logprobs", "logits"]


_REF = {}  # reference.pipeline's result per argument values: computed once for all backends


def _key(args):
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            data = a.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            parts.append((str(a.dtype), tuple(a.shape), hashlib.sha1(data).hexdigest()))
        else:
            parts.append(a)
    return tuple(parts)


def _reference(args):
    s = args.spec
    key = _key(args)
    if key not in _REF:
        with bk.one_thread():
            _REF[key] = R.pipeline(
                args[0].float(),
                indices=s["indices"],
                order=ORDER_NAMES[s["order"]],
                **s["kw"],
                **s["params"],
                logprobs_mode="raw" if s["raw"] else "processed",
            )
    return _REF[key]


def _top_n(ref, n):
    """reference.pipeline's top_ids / top_logprobs (descending logprob, ties by lowest index), with
    a stable sort instead of its per-element Python sort (seconds at V = 128256)."""
    L = ref["logprobs"]
    ids = torch.sort(-L, dim=-1, stable=True).indices[:, :n]
    return ids, L.gather(1, ids)


def _check_reference(args, out):
    """The outputs `out` of pipeline(*args) against reference.pipeline."""
    s = args.spec
    x = args[0]
    ref = _reference(args)
    tok, valid, lp, rank, top_ids, top_lp, masked = out
    v = ref["valid"]
    if s["mode"] == 1:  # masked logits: the processed row with -inf outside the survivors
        y = ref["processed"]
        exp = torch.where(ref["keep"], y, torch.full_like(y, NEG)).to(masked.dtype)
        raw = x if s["indices"] is None else x[s["indices"]]
        bad_in = R.bad_rows(raw, False)  # a bad input row passes through as it is
        exp[bad_in] = raw[bad_in]
        assert torch.equal(_bits(masked), _bits(exp)), "masked logits differ from reference.py"
        return
    assert torch.equal(valid, v), ("valid", valid, v)
    assert bool((tok[~v] == 0).all()), tok
    r = torch.arange(tok.numel())[v]
    t = tok[v]
    assert bool((ref["dist"][r, t] > 0).all()), ("token outside reference.py's survivors", tok)
    L = ref["logprobs"]
    if s["want"]:
        torch.testing.assert_close(lp[v].double(), L[r, t], atol=2e-5, rtol=0)
        assert torch.equal(rank[v], (L[r] >= L[r, t][:, None]).sum(-1)), ("rank", rank)
    if s["top_n"]:
        ids, vals = _top_n(ref, s["top_n"])
        assert torch.equal(top_ids[v], ids[v]), ("top ids", top_ids, ids)
        torch.testing.assert_close(top_lp[v].double(), vals[v], atol=2e-5, rtol=0)


def _same_bits(args, cpu, got, what, rows=None):
    """The emulator's outputs `got` equal the CPU op's `cpu` bit for bit (of `rows` only; not the
    logprobs and ranks a sample call without them does not compute)."""
    mode, want = args[10], args[13]
    for j, (c, g) in enumerate(zip(cpu, got)):
        if mode == 0 and j in (2, 3) and not want:
            continue  # not computed
        if rows is not None and c.shape[0]:
            c, g = c[rows], g[rows]
        assert c.shape == g.shape, NAMES[j]
        assert torch.equal(_bits(c), _bits(g)), f"{NAMES[j]} differ ({what}):\ncpu {c}\nemu {g}"


def _check(backend, args, rows=None):
    """Runs the op on `backend`: its outputs equal the CPU op's (on cuda_emu bitwise, of `rows`
    only; on cuda up to the last bit of the logprobs) and agree with reference.pipeline."""
    cpu = torch.ops.decodekit.pipeline(*args)
    mode, want = args[10], args[13]
    if backend == "cpu":
        got = cpu
    elif backend == "cuda_emu":
        # both launch plans: one CTA per row, and the split plan (pipe_plan) of a 64-SM device with
        # slices of >= 16 elements (a GPU's are >= 4096), so that the small rows here split too
        n_out, V = (args[0].shape[0] if args[1] is None else args[1].numel()), args[0].shape[1]
        for n_sms in (0, 64):
            got = emu_pipe.pipeline(*args, n_sms=n_sms, min_slice=16)
            if n_sms and 0 < n_out < n_sms and V >= 32:
                assert emu_pipe.last_splits[0] > 1, (n_out, V)
            _same_bits(args, cpu, got, f"n_sms {n_sms}", rows)
    else:
        got = bk.on_cuda(torch.ops.decodekit.pipeline, *args)
        for j, (c, g) in enumerate(zip(cpu, got)):
            if mode == 0 and j in (2, 3) and not want:
                continue
            if j in (2, 5):  # libdevice's double log: the last float bit
                torch.testing.assert_close(g, c, rtol=2e-7, atol=1e-7)
            else:
                assert torch.equal(_bits(c), _bits(g)), NAMES[j]
    if rows is None:
        _check_reference(args, got)
    return cpu, got


def _proc(B, V, seed):
    kw = _inputs(B, V, seed)
    params = {k: kw.pop(k) for k in ("repetition_penalty", "frequency_penalty", "presence_penalty")}
    return kw, params


@on_backends
@pytest.mark.parametrize("name", sorted(FILTERS))
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_each_truncation_each_order(backend, name, order):
    B, V = 4, 1003
    x = _logits(B, V, 3)
    kw, params = _proc(B, V, 3)
    params.update(FILTERS[name])
    params.setdefault("temperature", 0.9)
    for mode in (0, 1):
        _check(backend, _args(x, kw, params, order=ORDERS[order], mode=mode, top_n=3 if mode == 0 else 0))


@on_backends
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_all_truncations_combined(backend, dtype, order):
    B, V = 5, 777  # V not a multiple of the tile (64 threads) nor of 32
    x = _logits(B, V, 11).to(dtype)
    kw, params = _proc(B, V, 11)
    params.update(
        temperature=0.8,
        top_k=40,
        top_p=0.95,
        min_p=0.02,
        typical_p=0.9,
        epsilon=1e-4,
        eta=1e-4,
        top_h=0.9,
        top_n_sigma=2.5,
        min_tokens_to_keep=2,
    )
    for raw in (False, True):
        _check(backend, _args(x, kw, params, order=ORDERS[order], top_n=5, raw=raw))
    _check(backend, _args(x, kw, params, order=ORDERS[order], mode=1))


@on_backends
@pytest.mark.parametrize("dtype", DTYPES)
def test_processing_only(backend, dtype):
    """apply_penalties' path (mask mode, nothing truncated) and a plain draw."""
    B, V = 5, 1003
    x = _logits(B, V, 3).to(dtype)
    x[4, 17] = float("nan")  # a bad row passes through on both
    kw, params = _proc(B, V, 3)
    _check(backend, _args(x, kw, params, mode=1))
    _check(backend, _args(x, kw, params, top_n=4))


@on_backends
@pytest.mark.parametrize("raw", [False, True])
def test_logprobs_greedy_and_modes(backend, raw):
    B, V = 4, 600
    x = _logits(B, V, 5)
    x[1, 10] = x[1, 3] = 50.0  # a tied max: the lowest index wins
    kw, params = _proc(B, V, 5)
    for T in (0.0, 0.6, 1.0):
        p = dict(params, temperature=T, top_k=30, top_p=0.9)
        for n in (0, 1, 7, 45):  # 45 > |survivors| of some rows: padded with the lowest free ids
            _check(backend, _args(x, kw, p, top_n=n, raw=raw))
        _check(backend, _args(x, kw, p, top_n=0, raw=raw, want=False))


@on_backends
@pytest.mark.parametrize("raw", [False, True])
def test_logprobs_top_n_ties_across_slices(backend, raw):
    """Raw / greedy top-n lists whose n-th largest value is held by many tokens across the slices
    of a split row (integer logits: each of 9 values held by ~1/9 of the row; the emulator splits
    these rows into slices of 16): every value above it, then the lowest indices holding it; the
    rank counts the ties of the token's value (>=). Also the processed lists (temperature 0.8)."""
    B, V = 3, 1003
    g = torch.Generator().manual_seed(77)
    x = torch.randint(-4, 5, (B, V), generator=g).float()
    x[0, 700] = 9.0  # one value above all the ties, in a late slice
    kw, params = _proc(B, V, 77)
    for T in (0.0, 0.8):
        p = dict(params, temperature=T, top_k=40)
        for n in (1, 5, 150, 300):
            _check(backend, _args(x, kw, p, top_n=n, raw=raw))


@on_backends
def test_top_k_paths_and_min_tokens_to_keep(backend):
    """top-k <= 512 (the CPU's streaming scan), > 512 (its window profile), >= V; min_tokens_to_keep."""
    B, V = 3, 1500
    x = _logits(B, V, 9)
    kw, _ = _proc(B, V, 9)
    for k in (1, 50, 700, 1499, 5000):
        for mtk in (1, 3, 900):
            p = dict(temperature=1.3, top_k=k, top_p=0.97, min_p=0.01, typical_p=0.95, min_tokens_to_keep=mtk)
            for order in (0, 2):
                _check(backend, _args(x, kw, p, order=order, top_n=2))
                _check(backend, _args(x, {}, p, order=order, mode=1))


@on_backends
def test_bad_rows_and_indices_and_per_row_params(backend):
    B, V = 6, 900
    x = _logits(B, V, 21)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    kw, params = _proc(4, V, 21)
    kw["allowed_token_bitmask"][2] = 0  # nothing allowed: a bad row
    kw["banned_token_ids"][3, 0] = 0  # the row's head banned
    idx = torch.tensor([0, 1, 5, 5])  # output rows read rows 0, 1, 5, 5
    params.update(
        temperature=torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=torch.float64),
        top_k=torch.tensor([5, 0, 3, 100], dtype=torch.float64),
        top_p=0.9,
    )
    seeds = torch.tensor([1, 2, 3, 4])
    for raw in (False, True):
        cpu, _ = _check(backend, _args(x, kw, params, indices=idx, top_n=3, raw=raw, seed_arr=seeds))
        assert cpu[1].tolist() == [False, False, False, True]
    _check(backend, _args(x, kw, params, indices=idx, mode=1))


@bk.needs_emu
def test_emu_invalid_values_give_invalid_rows():
    """Values the CUDA launcher does not read (no sync): bad ids, non-finite bias, out-of-range
    parameters; the CPU binding raises ValueError, the kernel marks only that row invalid."""
    B, V = 4, 500
    x = _logits(B, V, 2)
    kw, params = _proc(B, V, 2)
    kw["banned_token_ids"][1, 2] = V  # out of range
    kw["logit_bias"][1][2, 3] = float("nan")
    params.update(temperature=0.9, top_k=20, typical_p=torch.tensor([0.9, 0.9, 0.9, 0.0], dtype=torch.float64))
    args = _args(x, kw, params, top_n=2)
    with pytest.raises(ValueError):
        torch.ops.decodekit.pipeline(*args)
    ok = dict(kw)
    ok["banned_token_ids"] = kw["banned_token_ids"].clamp(max=V - 1)
    bias_vals = kw["logit_bias"][1].nan_to_num(0.0)
    ok["logit_bias"] = (kw["logit_bias"][0], bias_vals)
    cpu = torch.ops.decodekit.pipeline(*_args(x, ok, params | {"typical_p": 0.9}, top_n=2))
    for n_sms in (0, 64):  # one CTA per row, and the split plan
        got = emu_pipe.pipeline(*args, n_sms=n_sms, min_slice=16)
        assert got[1].tolist() == [True, False, False, False]
        assert got[0][1:].tolist() == [0, 0, 0]
        assert torch.equal(cpu[0][:1], got[0][:1]) and torch.equal(_bits(cpu[2][:1]), _bits(got[2][:1]))
        masked = emu_pipe.pipeline(*_args(x, kw, params | {"typical_p": 0.9}, mode=1), n_sms=n_sms, min_slice=16)[6]
        assert torch.equal(masked[1], x[1]) and torch.equal(masked[2], x[2])  # raw rows pass through


@bk.needs_emu
def test_emu_invalid_values_set_the_error_flag():
    """The kernel ORs the launcher's error bit into the flag for a row with a bad value, and leaves
    it clear when every value is in range; the CPU op with the deferred checks forced gives the
    same rows (the CUDA launcher's code path with the CPU kernel)."""
    B, V = 4, 500
    x = _logits(B, V, 5)
    kw, params = _proc(B, V, 5)
    params.update(temperature=0.9, top_k=20)
    flag = torch.zeros(1, dtype=torch.int32)
    emu_pipe.pipeline(*_args(x, kw, params, top_n=2), error_flag=flag, error_bit=1 << 14)
    assert flag.item() == 0
    kw["output_token_ids"][2, 0] = -2  # below the padding value
    args = _args(x, kw, params, top_n=2)
    for n_sms in (64, 0):  # the split plan, then one CTA per row
        flag.zero_()
        got = emu_pipe.pipeline(*args, error_flag=flag, error_bit=1 << 14, n_sms=n_sms, min_slice=16)
        assert flag.item() == 1 << 14
        assert got[1].tolist() == [True, True, False, True]
    decodekit.check_errors()
    decodekit._set_deferred_checks(True)
    try:
        cpu = torch.ops.decodekit.pipeline(*args)
        with pytest.raises(ValueError, match="output_token_ids"):
            decodekit.check_errors()
    finally:
        decodekit._set_deferred_checks(False)
    for j, (c, g) in enumerate(zip(cpu, got)):
        assert torch.equal(_bits(c), _bits(g)), j


def _split_plan_rule(n_out, V, n_sms, min_slice=4096):
    """pipeline.cuh pipe_plan in Python: slices of >= min_slice elements, about n_sms CTAs in all,
    per rounded up to a multiple of 16; one CTA per row once the rows fill the SMs."""
    if n_sms <= 0 or n_out <= 0 or n_out >= n_sms:
        return 1
    n = min(-(-n_sms // n_out), V // min_slice)
    if n < 2:
        return 1
    per = -(-(-(-V // n)) // 16) * 16
    return max(1, -(-V // per))


@on_backends
@pytest.mark.parametrize("at", ["first", "middle", "last"])
def test_every_slice_counts(backend, at):
    """The row's max, a NaN and the top-k values in the first, a middle or the last element of the
    row: under the split plan (on cuda_emu: slices of 64 elements) each lands in another slice, and
    the verdict, the greedy token, the k-th largest and the start list must see every slice."""
    B, V = 4, 1001  # odd: rows 1-3 start off 16-byte alignment (element loads), row 0 on it
    p = {"first": 0, "middle": 517, "last": V - 1}[at]
    x = _logits(B, V, 23)
    x[0, p] = 12.0  # greedy: the max
    x[1, p] = 12.0  # sampling with top-k 3: the max plus the next two
    x[1, (p + 333) % V] = 11.0
    x[1, (p + 666) % V] = 11.5
    x[2, p] = float("nan")  # a bad row
    x[3, p] = 9.0  # typical / min-p around it
    kw = {k: None for k in ("allowed_token_bitmask", "banned_token_ids", "prompt_token_ids", "output_token_ids")}
    T = torch.tensor([0.0, 1.0, 1.0, 0.7], dtype=torch.float64)
    k = torch.tensor([0, 3, 0, 0], dtype=torch.int64)
    params = dict(temperature=T, top_k=k, min_p=0.01, typical_p=0.95)
    for mode in (0, 1):
        cpu, _ = _check(backend, _args(x, kw, params, mode=mode, top_n=3 if mode == 0 else 0))
        if mode == 0:
            assert cpu[0][0] == p and cpu[1].tolist() == [True, True, False, True], cpu
            assert cpu[4][1].sort().values.tolist() == sorted([p, (p + 333) % V, (p + 666) % V]), cpu[4]


@bk.needs_emu
def test_emu_split_plan_rule():
    """The split plan's CTAs per row at its edges (no launch): a row splits when there are fewer
    rows than SMs and it holds two slices of at least 4096 elements (a GPU's rule)."""
    assert emu_pipe.plan_splits(1, 128256, 132) == 31
    assert emu_pipe.plan_splits(4, 128256, 132) == 31  # 124 CTAs in all
    assert emu_pipe.plan_splits(8, 128256, 132) == 17
    assert emu_pipe.plan_splits(132, 128256, 132) == 1  # the rows fill the SMs
    assert emu_pipe.plan_splits(1, 8191, 132) == 1 and emu_pipe.plan_splits(1, 8192, 132) == 2
    assert emu_pipe.plan_splits(1, 128256, 0) == 1  # DECODEKIT_SPLIT_ROWS=0: no SM count, no split
    for n_out in (1, 2, 3, 7, 31, 65, 131, 132, 200):
        for V in (100, 4096, 8192, 9000, 32000, 128256, 152064, 256000):
            for n_sms in (0, 1, 16, 108, 132):
                assert emu_pipe.plan_splits(n_out, V, n_sms) == _split_plan_rule(n_out, V, n_sms), (n_out, V, n_sms)
    for V in (32, 50, 500, 3000):  # the emulator tests' small slices
        assert emu_pipe.plan_splits(3, V, 64, 16) == _split_plan_rule(3, V, 64, 16) > 1, V


@bk.needs_emu
@pytest.mark.parametrize("n_sms", [0, 64])
def test_emu_start_list_is_exact(n_sms):
    """The start list holds exactly the k largest values (tie-free rows) after top-k's radix passes,
    and exactly the values >= max - n * sigma after top-n-sigma's passes, on one CTA and over 47
    slices: the list steps that follow repeat both cuts, so the tokens alone would hide a looser
    (or garbage) prefilter. A greedy row collects nothing."""
    B, V = 4, 3000
    g = torch.Generator().manual_seed(5)
    x = (torch.randperm(B * V, generator=g).reshape(B, V).float() - 5000.0) / 64.0  # distinct, exact
    kw = {k: None for k in ("allowed_token_bitmask", "banned_token_ids", "prompt_token_ids", "output_token_ids")}
    ks = [1, 37, 700, 5]
    T = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    emu_pipe.pipeline(*_args(x, kw, dict(temperature=T, top_k=torch.tensor(ks))), n_sms=n_sms, min_slice=16)
    assert emu_pipe.last_splits[0] == (1 if n_sms == 0 else 16)
    assert emu_pipe.start_sizes(B) == ks[:3] + [0]
    nsig = 1.5
    emu_pipe.pipeline(*_args(x, kw, dict(temperature=1.0, top_n_sigma=nsig)), n_sms=n_sms, min_slice=16)
    xd = x.double()
    t = xd.amax(-1) - nsig * xd.std(-1, correction=0)
    assert bool(((xd - t[:, None]).abs() > 1e-6).all())  # no value at the bound: rounding cannot matter
    assert emu_pipe.start_sizes(B) == (xd >= t[:, None]).sum(-1).tolist()


@bk.needs_emu
@pytest.mark.parametrize("mode", [0, 1])
def test_emu_split_rows_at_production_sizes(mode):
    """A batch of 2 rows of 128256 bf16 logits on a 132-SM device's plan (31 slices of 4144 elements
    per row, as on an H100): every phase (prep of the id lists, scan, top-n-sigma's and top-k's
    passes, collect, final) over the real slice sizes; the outputs equal the CPU op's bit for bit."""
    B, V = 2, 128256
    x = _logits(B, V, 41).to(torch.bfloat16)
    kw, params = _proc(B, V, 41)
    params.update(temperature=0.8, top_k=300, top_n_sigma=3.0, top_p=0.9, typical_p=0.95, min_p=0.01)
    args = _args(x, kw, params, mode=mode, top_n=4 if mode == 0 else 0)
    cpu = torch.ops.decodekit.pipeline(*args)
    got = emu_pipe.pipeline(*args, n_sms=132)
    assert emu_pipe.last_splits[0] == 31
    for j, (c, g) in enumerate(zip(cpu, got)):
        assert torch.equal(_bits(c), _bits(g)), NAMES[j]
    if mode == 0:
        _check_reference(args, got)


@bk.needs_emu
@pytest.mark.parametrize("n_offsets", [1, 5])
def test_emu_seed_and_offsets_read_from_memory(n_offsets):
    """A one-seed tensor and offset tensors reach the kernel as pointers it reads (what the CUDA
    launcher passes for device tensors: decodekit/rng.h row_rng_key); the tokens equal the CPU op's,
    where a one-seed CPU tensor is read on the host, and row r draws as with offset 7 + offsets[r]."""
    B, V = 5, 3000
    x = _logits(B, V, 12)
    kw, params = _proc(B, V, 12)
    params.update(temperature=1.0, top_p=0.95)
    offs = torch.tensor([3, 0, 2**33 + 1, 9, 3][:n_offsets])
    seed = torch.tensor([99])
    args = _args(x, kw, params, top_n=2, seed_arr=seed) + (offs,)
    cpu = torch.ops.decodekit.pipeline(*args)
    got = emu_pipe.pipeline(*args[:15], 12345, *args[16:])  # the scalar seed is ignored: seed_ptr wins
    for j, (c, g) in enumerate(zip(cpu, got)):
        assert torch.equal(_bits(c), _bits(g)), j
    for r in range(B):
        o = int(offs[r if n_offsets > 1 else 0])
        one = list(_args(x, kw, params, top_n=2))
        one[15], one[16] = 99, 7 + o
        assert got[0][r] == torch.ops.decodekit.pipeline(*one)[0][r], r


@on_backends
def test_full_vocabulary_row(backend):
    B, V = 2, 128256
    x = _logits(B, V, 31).to(torch.bfloat16)
    kw, params = _proc(B, V, 31)
    params.update(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05)
    _check(backend, _args(x, kw, params, top_n=5))
    _check(backend, _args(x, kw, params, top_n=5, raw=True))


@on_backends
@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_row_mass_in_the_canonical_order(backend, raw, temperature):
    """The raw / greedy logprobs' log-mass follows the canonical row order (per 4096-element chunk
    16 lanes, chunk masses in chunk order; decodekit/contract.h) on every backend. The row makes
    the order visible: one logit 0 and 40000 at -38 (weight ~3e-17, under half an ulp of 1), so a
    lane holding the max loses every tiny term, and the max token's logprob, -log Z ~ -1.2e-12,
    shows Z's last bits (a 16-lane sum over the whole row gives another float). At temperature 1
    in processed mode the same holds for the list mass (the survivors are the whole row)."""
    B, V = 2, 40000
    x = torch.full((B, V), -38.0)
    x[0, 0] = 0.0
    x[1, 4097] = 0.0
    kw = {k: None for k in ("allowed_token_bitmask", "banned_token_ids", "prompt_token_ids", "output_token_ids")}
    params = dict(temperature=temperature)
    cpu, _ = _check(backend, _args(x, kw, params, top_n=2, raw=raw))
    assert bool((cpu[0] == torch.tensor([0, 4097])).all()), cpu[0]
    assert bool((cpu[5][:, 0] < 0).all()) and bool((cpu[5][:, 0] > -1e-10).all()), cpu[5]


def _ln2_logits(ks, pad=0):
    """Logits -k * ln 2 (float32): weight exp(-k ln 2) = 2^-k exactly; pad tokens of weight 0."""
    l2 = float(torch.tensor(0.6931471805599453, dtype=torch.float32))
    return torch.tensor([[-k * l2 for k in ks] + [-200.0] * pad], dtype=torch.float32)


@on_backends
@pytest.mark.parametrize(
    "ks,setting,kept",
    [
        # weights 1, 1/2, 1/4, 1/4 (Z = 2): the mass from the top reaches top_p * Z = 1.5 exactly
        # at the second value, so the cut is there (a tie group stays while the mass above it < P)
        ([0, 1, 2, 2], dict(top_p=0.75), 2),
        # typical: scores |-log p - H| put 1/2 first, then 1; their mass reaches 0.75 * Z exactly
        ([0, 1, 2, 2], dict(typical_p=0.75), 2),
        # 256 values of weight 2^-9 after the max, then 512 of weight 2^-10 (Z = 2): the mass
        # reaches 1.5 at the last 2^-9, the walk's element 256 (in its second 256-block)
        ([0] + [9] * 256 + [10] * 512, dict(top_p=0.75), 257),
    ],
)
def test_cut_where_the_mass_reaches_p_exactly(backend, ks, setting, kept):
    """Top-p and typical keep a group while the mass before it is < P: when the running mass hits
    P exactly, the group that reached it is the last one kept (masked logits, every backend)."""
    x = _ln2_logits(ks, pad=3)
    kw = {k: None for k in ("allowed_token_bitmask", "banned_token_ids", "prompt_token_ids", "output_token_ids")}
    cpu, _ = _check(backend, _args(x, kw, dict(temperature=1.0, **setting), mode=1))
    alive = cpu[6][0] > NEG
    order = torch.argsort(torch.tensor(ks), stable=True)[:kept] if "typical_p" not in setting else torch.tensor([0, 1])
    assert int(alive.sum()) == kept and bool(alive[order].all()), alive


@on_backends
@pytest.mark.parametrize(
    "setting",
    [
        dict(typical_p=0.9),
        dict(top_p=0.95),
        dict(top_h=0.5, eta=1e-4),
        dict(top_n_sigma=2.5, typical_p=0.99, epsilon=1e-5),
    ],
    ids=["typical", "top_p", "top_h_eta", "sigma_typical_eps"],
)
def test_whole_row_lists(backend, setting):
    """The list steps on a start list of thousands of entries (no top-k before them): on the GPU
    the bitonic sort runs several pairs per thread (V = 9000 pads to 16384) and the walk's masses
    span many 256-blocks; the row sums span three chunks. Processed top-5 lists sort the survivors."""
    B, V = 2, 9000
    x = _logits(B, V, 17)
    kw, params = _proc(B, V, 17)
    params.update(temperature=1.5, **setting)
    for order in (0, 1):
        _check(backend, _args(x, kw, params, order=order, top_n=5))


def _top_h_tie_rows(V):
    """Rows whose 100th largest value has hundreds of ties: 20 distinct values then 600 at 2.0
    (row 0); 10 at 5.0, 10 at 4.0, then 500 at 2.0 (row 1); values on a 0.5 grid (row 2); a
    constant row (3); 60 finite values, 30 of them tied at the lowest (row 4)."""
    g = torch.Generator().manual_seed(23)
    below = -1.0 - torch.rand(V, generator=g) * 4  # distinct values under the groups
    r0 = below.clone()
    r0[torch.randperm(V, generator=g)[:620]] = torch.cat([5.0 - 0.1 * torch.arange(20.0), torch.full((600,), 2.0)])
    r1 = below.clone()
    r1[torch.randperm(V, generator=g)[:520]] = torch.cat(
        [torch.full((10,), 5.0), torch.full((10,), 4.0), torch.full((500,), 2.0)]
    )
    r2 = (torch.randn(V, generator=g) * 2).round() / 2
    r3 = torch.zeros(V)
    r4 = torch.full((V,), NEG)
    r4[torch.randperm(V, generator=g)[:60]] = torch.cat([torch.randn(30, generator=g) + 3, torch.zeros(30)])
    return torch.stack([r0, r1, r2, r3, r4])


@on_backends
def test_top_h_ties_at_the_100th_candidate(backend):
    """Top-h's candidates are the values >= the 100th largest cv, ties kept, so ties at cv can make
    them hundreds (or the whole row); only the < 100 above cv are sorted, the ones at cv follow in
    index order and are kept or dropped as one group, decided by its first entry. Against the CPU op
    (on cuda_emu bitwise, both launch plans) and reference.pipeline_keep, masks and tokens, over a
    sweep of top_h that keeps the group at cv in some rows and drops it in others."""
    V = 1500
    x = _top_h_tie_rows(V)
    kw = {k: None for k in ("allowed_token_bitmask", "banned_token_ids", "prompt_token_ids", "output_token_ids")}
    kept = set()
    for t in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0):
        params = dict(temperature=1.0, top_h=t)
        cpu, _ = _check(backend, _args(x, kw, params, mode=1))
        keep = R.pipeline_keep(x, top_h=t)
        assert torch.equal(cpu[6] > NEG, keep), t
        kept.update((r, bool(keep[r][x[r] == 2.0].all())) for r in (0, 1))
        assert all(bool(keep[r][x[r] == 2.0].all()) == bool(keep[r][x[r] == 2.0].any()) for r in (0, 1)), t
        _check(backend, _args(x, kw, params, top_n=5))
    assert kept == {(0, True), (0, False), (1, True), (1, False)}, kept


@on_backends
@pytest.mark.parametrize("order", [0, 2])
def test_top_h_nearly_flat_candidates(backend, order):
    """Top-h over 150 nearly equal top values (5 - 1e-4 i) and a low rest: every one of its 100
    candidates weighs about 1 / 100 of their mass, so how many it keeps (about top_h * 100) moves
    when a candidate is lost or added (the CUDA kernel cuts the start list at the 100th largest
    value when top-h is the first list step: cut at the 99th, 54 / 79 / 98 would stay at top_h
    0.555 / 0.805 / 0.995 instead of 55 / 80 / 99).
    Masked logits and draws with processed top-5 logprobs agree with the CPU op (bit for bit in the
    emulator, both plans) and with reference.py."""
    V = 3000
    g = torch.Generator().manual_seed(71)
    x = -6.0 - torch.rand(2, V, generator=g) * 3
    for r in range(2):
        x[r, torch.randperm(V, generator=g)[:150]] = 5.0 - 1e-4 * torch.arange(150.0) * (r + 1)
    kw = {k: None for k in ("allowed_token_bitmask", "banned_token_ids", "prompt_token_ids", "output_token_ids")}
    for t, n in ((0.3, 29), (0.555, 55), (0.805, 80), (0.995, 99)):
        # top-h alone, and after top-p / min-p that keep all 150 (applied before the list is built
        # on CUDA, which also cuts it at the 100th largest value there): the same 100 candidates
        for before in ({}, {"top_p": 0.99999}, {"min_p": 1e-3}):
            params = dict(temperature=1.0, top_h=t, **before)
            cpu, _ = _check(backend, _args(x, kw, params, order=order, mode=1))
            assert (cpu[6] > NEG).sum(-1).tolist() == [n, n], (t, before, cpu[6])
            _check(backend, _args(x, kw, params, order=order, top_n=5))


@bk.needs_emu
@pytest.mark.parametrize("logprobs", ["none", "raw", "processed"])
def test_emu_split_draw_without_truncation(logprobs):
    """Rows with nothing to truncate draw on the split plan from the walk sums the slices compute
    in place (phase_sums, split_draw), with no move of the list onto one CTA. Their tokens, and the
    raw or processed logprobs / ranks / top-n lists that follow (processed: the rank and logprobs
    phases over the row, normalised by the split draw's walk total), equal the CPU op's and the
    one-CTA plan's bit for bit: rows whose bitmask forbids long stretches (empty slices, slices of a
    few entries, so that 16-groups and 256-blocks of the list straddle slices; a row with fewer
    allowed tokens than the top-n list, padded with -inf), a row with top-p beside them (early
    top-p, then the split draw; with processed logprobs its list steps run on one CTA)."""
    B, V = 4, 20011  # 16 slices of ~1250: each CTA sums several 256-blocks of a list
    x = _logits(B, V, 17)
    words = (V + 31) // 32
    bm = torch.full((B, words), -1, dtype=torch.int32)
    bm[0, 10:400] = 0  # tokens 320..12799 forbidden: several empty slices
    bm[1, 5:90:3] = 0x00010001  # runs of 32 tokens with two allowed: short slices
    bm[3, :] = 0
    bm[3, 300] = 0x00410001  # three tokens allowed (9600, 9616, 9622): fewer than the top-4 list
    kw = {k: None for k in ("banned_token_ids", "prompt_token_ids", "output_token_ids")}
    kw["allowed_token_bitmask"] = bm
    params = dict(
        temperature=torch.tensor([0.7, 1.0, 1.3, 0.9], dtype=torch.float64),
        top_p=torch.tensor([1.0, 1.0, 0.8, 1.0], dtype=torch.float64),
        repetition_penalty=1.2,
    )
    kw["output_token_ids"] = torch.randint(0, V, (B, 30), generator=torch.Generator().manual_seed(5))
    want, raw, top_n = {"none": (False, False, 0), "raw": (True, True, 4), "processed": (True, False, 4)}[logprobs]
    for seed in (1, 2, 3):
        args = _args(x, kw, params, top_n=top_n, raw=raw, want=want, seed_arr=torch.arange(B) + 100 * seed)
        _check("cuda_emu", args)  # both plans, bit for bit, and reference.py
        assert emu_pipe.last_splits[0] == 16, emu_pipe.last_splits  # (the split plan ran last)


@bk.needs_emu
def test_emu_split_draw_in_one_call():
    """The split draw without truncation in one call of the split plan (32 slices, each summing
    several 256-blocks of the list; a bitmask empties some slices): outputs equal the CPU op's. Cheap
    enough for the sanitizer runs (emu.SANITIZER_CASES), which check the sums phase's reads of
    the slices' lists and its writes of the walk sums across the CTAs of the launch."""
    B, V = 2, 20011
    x = _logits(B, V, 29)
    bm = torch.full((B, (V + 31) // 32), -1, dtype=torch.int32)
    bm[1, 40:300] = 0
    kw = {k: None for k in ("banned_token_ids", "prompt_token_ids", "output_token_ids")}
    kw["allowed_token_bitmask"] = bm
    args = _args(x, kw, dict(temperature=0.8, repetition_penalty=1.1), want=False)
    cpu = torch.ops.decodekit.pipeline(*args)
    got = emu_pipe.pipeline(*args, n_sms=64, min_slice=16)
    assert emu_pipe.last_splits[0] == 32, emu_pipe.last_splits
    _same_bits(args, cpu, got, "split plan")


def _early_top_p_rows(B, V, seed, dtype):
    """Rows for the early top-p tests: logits rounded to 1/8 (tie groups spread over every chunk,
    some at the cut), a bitmask forbidding a stretch of one row and every other token of another,
    repetition and frequency penalties over an output history."""
    x = (_logits(B, V, seed) * 8).round() / 8
    words = (V + 31) // 32
    bm = torch.full((B, words), -1, dtype=torch.int32)
    bm[1, 20:300] = 0  # tokens 640..9599: several slices and two chunks without a value
    bm[2:3, :] = 0x55555555  # every other token (B > 2)
    kw = {k: None for k in ("banned_token_ids", "prompt_token_ids")}
    kw["allowed_token_bitmask"] = bm
    kw["output_token_ids"] = torch.randint(0, V, (B, 40), generator=torch.Generator().manual_seed(seed))
    return x.to(dtype), kw


@bk.needs_emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", [0, 2])
def test_emu_early_top_p_and_min_p(dtype, order):
    """Top-p and min-p at the head of the list steps (no top-k, top-n-sigma or min_tokens_to_keep
    before them; not joint) are applied before the list is built: top-p's cut by a mass-weighted
    radix select over the processed row (per-chunk mass histograms that the slices of a split row
    compute and add in chunk order; over min-p's survivors when min-p comes first, the vllm order),
    min-p's test in the collect. Rows: top-p alone (then the split draw), top-p with min-p, top-p
    then typical, a cut at the max (top_p 1e-6), nearly all kept (0.999999), min-p alone, min-p
    then typical, min-p + top-p then eta; ties at the cut (logits rounded to 1/8), bitmask and
    penalties; beside them rows that are not early (top-k first; top-n-sigma; min_tokens_to_keep
    3). Both plans (one CTA per row; 6 / 32 slices over 5 chunks, so some slices hold no chunk)
    give the CPU op's tokens, logprobs, top-n lists and masked logits bit for bit, and agree with
    reference.pipeline."""
    B, V = 11, 20011
    x, kw = _early_top_p_rows(B, V, 31, dtype)
    f64 = dict(dtype=torch.float64)
    params = dict(
        temperature=torch.tensor([0.7, 1.0, 1.3, 0.9, 1.0, 0.8, 1.1, 1.0, 0.6, 1.2, 1.0], **f64),
        top_p=torch.tensor([0.9, 0.5, 0.95, 1e-6, 0.999999, 0.9, 0.8, 0.7, 1.0, 1.0, 0.6], **f64),
        min_p=torch.tensor([0.0, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.02, 0.1, 0.3, 0.001], **f64),
        typical_p=torch.tensor([1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 1.0], **f64),
        eta=torch.tensor([0.0] * 10 + [1e-3], **f64),
        top_k=torch.tensor([0, 0, 0, 0, 0, 50, 0, 0, 0, 0, 0], **f64),
        top_n_sigma=torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0], **f64),
        min_tokens_to_keep=torch.tensor([1, 1, 1, 1, 1, 1, 1, 3, 1, 1, 1], **f64),
        repetition_penalty=1.2,
        frequency_penalty=0.1,
    )
    for top_n, raw, want in ((0, False, False), (3, False, True), (3, True, True)):
        args = _args(x, kw, params, order=order, top_n=top_n, raw=raw, want=want, seed_arr=torch.arange(B) + 7)
        _check("cuda_emu", args)
    _check("cuda_emu", _args(x, kw, params, order=order, mode=1))
    # B = 2: 32 slices, most of them without a chunk of their own
    x2, kw2 = _early_top_p_rows(2, V, 33, dtype)
    p2 = {k: (v[[1, 8]] if isinstance(v, torch.Tensor) else v) for k, v in params.items()}  # min-p with, without top-p
    _check("cuda_emu", _args(x2, kw2, p2, order=order, want=False))


@bk.needs_emu
def test_emu_early_top_p_in_one_call():
    """Early top-p in one call of the split plan (B = 2, 32 slices over 2 chunks; top-p alone and
    min-p then top-p, the vllm order): outputs equal the CPU op's. Cheap enough for the sanitizer runs
    (emu.SANITIZER_CASES), which check the pass launches' writes of the chunk histograms and the
    select's state and their reads in the next launch across the CTAs."""
    x, kw = _early_top_p_rows(2, 4500, 37, torch.float32)
    params = dict(
        temperature=0.9, top_p=0.9, min_p=torch.tensor([0.0, 0.05], dtype=torch.float64), repetition_penalty=1.1
    )
    args = _args(x, kw, params, order=2, want=False)
    cpu = torch.ops.decodekit.pipeline(*args)
    got = emu_pipe.pipeline(*args, n_sms=64, min_slice=16)
    assert emu_pipe.last_splits[0] == 32, emu_pipe.last_splits
    _same_bits(args, cpu, got, "split plan")


@bk.needs_emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("order", [0, 2])
def test_emu_early_epsilon_and_eta(dtype, order):
    """On the split plan, epsilon or eta as the first list step after early min-p (or the first of
    all) is cut by the slices in the scan and pass launches (phase_early_eps): the start list
    collected by the scan (after min-p: by pass 1), Z and eta's entropy as walk totals over it
    where the slices left it, in list order as the CPU's step sums them, and each slice compacts its
    part before the final phase moves the survivors onto one CTA. Rows: epsilon alone, eta alone
    on both sides of min(eta, sqrt(eta) exp(-H)), epsilon then eta, eta then top-h, min-p with eta
    (min-p first in both orders: then eta over its survivors), a cut that only the max passes, many
    survivors (temperature 1.5); beside them rows that are not early (top-p then epsilon: top-p's
    passes come first; typical before epsilon; min_tokens_to_keep 3; top-k first). Ties at the cut
    (logits rounded to 1/8), bitmask and penalties. Both plans give the CPU op's tokens, logprobs,
    top-n lists and masked logits bit for bit, and agree with reference.pipeline."""
    B, V = 12, 20011
    x, kw = _early_top_p_rows(B, V, 41, dtype)
    f64 = dict(dtype=torch.float64)
    z = [0.0] * B
    params = dict(
        temperature=torch.tensor([0.7, 1.0, 0.3, 0.9, 1.0, 0.8, 1.1, 1.0, 0.6, 1.2, 1.0, 1.5], **f64),
        epsilon=torch.tensor([3e-4, 0, 0, 1e-3, 0, 1e-3, 0, 0.5, 1e-3, 1e-3, 0, 1e-4], **f64),
        eta=torch.tensor([0, 2e-3, 2e-3, 1e-3, 1e-3, 0, 5e-4, 0, 0, 0, 1e-3, 0], **f64),
        top_h=torch.tensor([0, 0, 0, 0, 0.8, 0, 0, 0, 0, 0, 0, 0], **f64),
        top_p=torch.tensor([1, 1, 1, 1, 1, 0.9, 1, 1, 1, 1, 1, 1], **f64),
        min_p=torch.tensor(z[:6] + [0.02] + z[7:], **f64),
        typical_p=torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0.9, 1, 1, 1], **f64),
        min_tokens_to_keep=torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 1, 1], **f64),
        top_k=torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 50, 0], **f64),
        repetition_penalty=1.2,
        frequency_penalty=0.1,
    )
    for top_n, raw, want in ((0, False, False), (3, False, True), (3, True, True)):
        args = _args(x, kw, params, order=order, top_n=top_n, raw=raw, want=want, seed_arr=torch.arange(B) + 3)
        _check("cuda_emu", args)
        assert emu_pipe.last_splits[0] == 6, emu_pipe.last_splits  # (the split plan ran last)
    cpu, _ = _check("cuda_emu", _args(x, kw, params, order=order, mode=1))
    kept = (cpu[6] > NEG).sum(-1)
    # the processed rows (mask mode with nothing to truncate), for what the cuts should do
    plain = dict(params, epsilon=0.0, eta=0.0, top_h=0.0, top_p=1.0, min_p=0.0, typical_p=1.0, top_k=0)
    proc = torch.ops.decodekit.pipeline(*_args(x, kw, plain, order=order, mode=1))[6].float()
    assert kept[7] == (proc[7] == proc[7].max()).sum(), kept  # epsilon 0.5: the max's group only
    assert 1 < kept[0] < V // 10 and kept[11] > kept[0], kept  # the cuts cut, and keep more at T 1.5
    for r, below in ((1, True), (2, False)):  # eta's cut: row 1 sqrt(eta) exp(-H) (< eta), row 2 eta
        p = torch.softmax(proc[r].double() / float(params["temperature"][r]), -1)
        ent = -(p[p > 0] * p[p > 0].log()).sum()
        eta = float(params["eta"][r])
        assert (eta**0.5 * float(torch.exp(-ent)) < eta) == below, (r, float(ent))


@bk.needs_emu
@pytest.mark.parametrize("order", [0, 2])
def test_emu_top_h_after_early_top_p_and_min_p(order):
    """Top-h after the early top-p / min-p (nothing else between; no top-k, top-n-sigma or
    min_tokens_to_keep > 1): their survivors are the values above a threshold, so top-h's
    candidates among them (those >= their 100th largest value) are the row's values >= its 100th
    largest that pass top-p / min-p; the collect cuts the start list there too (top-k's passes
    with k = 100) and top-h runs on that short list. Rows: top-p 0.95 (thousands survive), top-p
    0.05 (fewer than 100), min-p, min-p + top-p, top-h alone; beside them top-p with
    min_tokens_to_keep 3 (not early). Ties at the 100th value (logits rounded to 1/8), bitmask and
    penalties. Both plans give the CPU op's outputs bit for bit and agree with reference.pipeline;
    the start lists of the early rows hold no value below the row's 100th largest."""
    B, V = 6, 20011
    x, kw = _early_top_p_rows(B, V, 47, torch.float32)
    f64 = dict(dtype=torch.float64)
    params = dict(
        temperature=torch.tensor([1.0, 0.7, 1.1, 0.9, 1.0, 1.0], **f64),
        top_p=torch.tensor([0.95, 0.05, 1.0, 0.9, 1.0, 0.9], **f64),
        min_p=torch.tensor([0.0, 0.0, 0.05, 0.001, 0.0, 0.0], **f64),
        top_h=torch.tensor([0.6, 0.8, 0.7, 0.5, 0.6, 0.6], **f64),
        min_tokens_to_keep=torch.tensor([1, 1, 1, 1, 1, 3], **f64),
        repetition_penalty=1.2,
        frequency_penalty=0.1,
    )
    for top_n, raw, want in ((0, False, False), (3, False, True), (3, True, True)):
        _check("cuda_emu", _args(x, kw, params, order=order, top_n=top_n, raw=raw, want=want))
    _check("cuda_emu", _args(x, kw, params, order=order, mode=1))
    plain = dict(params, top_p=1.0, min_p=0.0, top_h=0.0)
    proc = torch.ops.decodekit.pipeline(*_args(x, kw, plain, order=order, mode=1))[6].float()
    at_100 = proc.topk(100, -1).values[:, -1]
    above = (proc >= at_100[:, None]).sum(-1).tolist()
    for n_sms in (0, 64):
        emu_pipe.pipeline(*_args(x, kw, params, order=order, want=False), n_sms=n_sms, min_slice=16)
        got = emu_pipe.start_sizes(B)
        assert all(0 < got[r] <= above[r] for r in range(5)), (n_sms, got, above)
        assert got[5] > 1000, got  # (top-p 0.9's survivors: not cut at the 100th value)


@bk.needs_emu
def test_emu_early_eta_in_one_call():
    """Early eta, and min-p then epsilon, in one call of the split plan (B = 2, 32 slices): the
    start list collected by the scan launch (eta) or pass 1 (after min-p), the next passes' walk
    sums of the weights and of eta's terms, and the cut, each launch reading what the CTAs of the
    one before wrote; outputs equal the CPU op's. Cheap enough for the sanitizer runs
    (emu.SANITIZER_CASES)."""
    x, kw = _early_top_p_rows(2, 4500, 43, torch.float32)
    f64 = dict(dtype=torch.float64)
    params = dict(
        temperature=0.9,
        eta=torch.tensor([2e-3, 0.0], **f64),
        epsilon=torch.tensor([0.0, 5e-4], **f64),
        min_p=torch.tensor([0.0, 0.01], **f64),
        repetition_penalty=1.1,
    )
    args = _args(x, kw, params, want=False)
    cpu = torch.ops.decodekit.pipeline(*args)
    got = emu_pipe.pipeline(*args, n_sms=64, min_slice=16)
    assert emu_pipe.last_splits[0] == 32, emu_pipe.last_splits
    _same_bits(args, cpu, got, "split plan")


@bk.needs_emu
def test_emu_rare_list_steps_in_one_launch():
    """The list steps the larger cases reach only through many launches, each in one launch of the
    one-CTA plan (cheap enough for the sanitizer runs, emu.SANITIZER_CASES): eta's entropy cut
    (rows on both sides of min(eta, sqrt(eta) exp(-H))), typical's min_tokens_to_keep cut (a cut
    that keeps fewer than min_tokens_to_keep), both on whole-row lists, and
    top-h's tie group at its 100th candidate spread to all its entries (rows with hundreds of ties
    at the 100th largest value). Outputs equal the CPU op's bit for bit and agree with
    reference.pipeline."""
    kw = {k: None for k in ("allowed_token_bitmask", "banned_token_ids", "prompt_token_ids", "output_token_ids")}
    x = _logits(2, 300, 5)
    ties = _top_h_tie_rows(700)[:2]
    typical = dict(temperature=0.9, typical_p=0.05, min_tokens_to_keep=5)  # the cut keeps < 5: mtk's
    eta = dict(temperature=0.9, eta=5e-3)  # row 1: eta < sqrt(eta) exp(-H), row 0 the other way
    for rows, params, mode in (
        (x, typical, 1),
        (x, eta, 1),
        (x, typical | eta, 0),
        (ties, dict(temperature=1.0, top_h=0.35), 1),
    ):
        args = _args(rows, kw, params, mode=mode, top_n=2 if mode == 0 else 0)
        cpu = torch.ops.decodekit.pipeline(*args)
        _same_bits(args, cpu, emu_pipe.pipeline(*args, n_sms=0), str(params))
        _check_reference(args, cpu)
    keep = R.pipeline_keep(ties, top_h=0.35)
    # the groups at 2.0 (the 100th largest value of both rows) are kept whole or dropped whole
    assert all(bool(keep[r][ties[r] == 2.0].all()) == bool(keep[r][ties[r] == 2.0].any()) for r in (0, 1))


@bk.needs_emu
@pytest.mark.parametrize("n_sms", [0, 64])
def test_emu_kernel_paths_in_two_calls(n_sms):
    """Kernel paths that the sanitizer runs (emu.SANITIZER_CASES) used to reach only through items
    of 1-2 minutes each under ThreadSanitizer, in two small calls per launch plan (one CTA per row;
    the split plan, 4 slices per row): (1) fp16 logits in mask mode (the fp16 store), the joint
    order (the steps' keep flags ANDed), top-p and min-p as list steps after top-k (top-p by the
    block's mass select), a row whose typical_p is out of range (the kernel's invalid row: it ORs
    the error bit and passes its logits through) and a greedy row (written processed); (2)
    processed top-n lists longer than the survivors (padded with the lowest free ids), a row with
    no truncation whose bitmask forbids every other token (on the split plan: the slices' walk sums
    and the split draw over zero weights), a greedy row and a NaN row.
    Outputs equal the CPU op's bit for bit (call 1: its valid rows, against the CPU op with the bad
    value replaced) and agree with reference.pipeline (call 2)."""
    B, V = 4, 600
    none = {k: None for k in ("allowed_token_bitmask", "banned_token_ids", "prompt_token_ids", "output_token_ids")}
    x = _logits(B, V, 13).to(torch.float16)
    typ = torch.tensor([0.9, 0.95, 0.0, 0.9], dtype=torch.float64)  # row 2: out of range
    T = torch.tensor([0.9, 0.9, 0.9, 0.0], dtype=torch.float64)  # row 3: greedy (written processed)
    p1 = dict(temperature=T, top_k=50, top_p=0.9, min_p=0.02, typical_p=typ)
    flag = torch.zeros(1, dtype=torch.int32)
    args = _args(x, none, p1, order=ORDERS["joint"], mode=1)
    got = emu_pipe.pipeline(*args, n_sms=n_sms, min_slice=150, error_flag=flag, error_bit=1 << 3)
    assert emu_pipe.last_splits[0] == (1 if n_sms == 0 else 4)
    assert flag.item() == 1 << 3
    assert torch.equal(_bits(got[6][2]), _bits(x[2]))  # the invalid row passes through
    ok = _args(x, none, p1 | {"typical_p": torch.tensor([0.9, 0.95, 0.9, 0.9], dtype=torch.float64)}, order=1, mode=1)
    cpu = torch.ops.decodekit.pipeline(*ok)
    _same_bits(ok, cpu, got, "fp16 joint mask", rows=[0, 1, 3])
    assert 0 < int(torch.isfinite(got[6][:2]).sum(-1).max()) <= 50 and bool(torch.isfinite(got[6][3]).all())

    x = _logits(B, V, 14)
    x[3, 100] = float("nan")  # a bad row: token 0, invalid, top-n list of zeros
    bm = torch.full((B, (V + 31) // 32), -1, dtype=torch.int32)
    bm[1] = 0x55555555  # every other token
    kw = dict(none, allowed_token_bitmask=bm)
    p2 = dict(temperature=torch.tensor([0.8, 1.0, 0.0, 1.0], dtype=torch.float64), top_k=torch.tensor([5, 0, 0, 0]))
    args = _args(x, kw, p2, top_n=40)
    cpu = torch.ops.decodekit.pipeline(*args)
    got = emu_pipe.pipeline(*args, n_sms=n_sms, min_slice=150)
    _same_bits(args, cpu, got, f"n_sms {n_sms}")
    _check_reference(args, got)
    assert got[1].tolist() == [True, True, True, False] and got[4][3].eq(0).all()
    assert (
        torch.isfinite(got[5][0]).sum() == 5
        and got[4][0, 5:].tolist() == [t for t in range(40) if t not in got[4][0, :5]][:35]
    )


@bk.needs_cuda
@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("split", ["1", "0"])
def test_cuda_device_matches_cpu(order, split, monkeypatch):
    """On a GPU: the same tokens, valid flags, ranks and top ids as the CPU op; logprobs equal up to
    the documented last-bit difference of libdevice's double log. 6 rows of 32000: the split plan
    (7 slices per row on a GPU of >= 42 SMs), and with DECODEKIT_SPLIT_ROWS=0 one CTA per row.
    Three settings: every truncation (top-k first), top-p and min-p alone (the early steps, then
    the split draw), and temperature only (the split draw and split processed logprobs)."""
    monkeypatch.setenv("DECODEKIT_SPLIT_ROWS", split)
    B, V = 6, 32000
    x = _logits(B, V, 41)
    x[5, 3] = float("nan")
    kw, params = _proc(B, V, 41)
    params.update(temperature=0.8, top_k=60, top_p=0.92, min_p=0.02, typical_p=0.97, min_tokens_to_keep=2)
    early = {k: v for k, v in params.items() if k not in ("top_k", "typical_p", "min_tokens_to_keep")}
    plain = {k: v for k, v in early.items() if k not in ("top_p", "min_p")}
    for raw, setting in ((False, params), (True, params), (False, early), (False, plain), (True, plain)):
        args = _args(x, kw, setting, order=ORDERS[order], top_n=5, raw=raw)
        cpu = torch.ops.decodekit.pipeline(*args)
        dev_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        dev = [t.cpu() for t in torch.ops.decodekit.pipeline(*dev_args)]
        for j in (0, 1, 3, 4):
            assert torch.equal(cpu[j], dev[j])
        for j in (2, 5):
            torch.testing.assert_close(dev[j], cpu[j], rtol=2e-7, atol=1e-7)
    masked = torch.ops.decodekit.pipeline(
        *tuple(
            a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(x, kw, params, order=ORDERS[order], mode=1)
        )
    )[6]
    assert torch.equal(
        masked.cpu(), torch.ops.decodekit.pipeline(*_args(x, kw, params, order=ORDERS[order], mode=1))[6]
    )


@on_backends
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_token_bitmask_inplace(backend, dtype):
    """apply_token_bitmask_inplace: reference.py's result bit for bit on every backend (the CPU
    op's on cuda_emu / cuda)."""
    B, V = 5, 1000  # 32 words cover 1024 > V: only the first V tokens are touched
    x = _logits(B, V, 8).to(dtype)
    bm = torch.randint(-(2**31), 2**31 - 1, (B, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    for idx in (None, torch.tensor([4, 0, 2])):
        cpu, got, ref = x.clone(), x.clone(), x.clone()
        decodekit.apply_token_bitmask_inplace(cpu, bm, indices=idx)
        if backend == "cpu":
            got = cpu
        elif backend == "cuda_emu":
            emu_pipe.apply_token_bitmask_inplace(got, bm, indices=idx)
        else:
            dev = got.cuda()
            decodekit.apply_token_bitmask_inplace(dev, bm.cuda(), indices=None if idx is None else idx.cuda())
            got = dev.cpu()
        assert torch.equal(_bits(cpu), _bits(got))
        assert not torch.equal(_bits(cpu), _bits(x))
        R.apply_token_bitmask_inplace(ref, bm, indices=idx)
        assert torch.equal(_bits(got), _bits(ref))


def _mass_cut(v, w, P):
    """The mass selects' definition: the smallest value of v whose strictly greater values weigh
    < P (weights w); the smallest value when no prefix of tie groups reaches P."""
    above = 0.0
    for val in sorted(set(v), reverse=True):
        g = sum(wj for vj, wj in zip(v, w) if vj == val)
        if above + g >= P:
            return val
        above += g
    return min(v)


@bk.needs_emu
def test_emu_block_top_p_cut():
    """The GPU's top-p cut on the list (pipeline.cuh block_top_p: a mass-weighted radix select, 2
    bits per pass) against its definition, the smallest value whose strictly greater values weigh
    < P, on one block of the production size. Weights are powers of two, so every mass is exact in
    any order and the cut is the definition's exactly: P between, at (>=: the group that reaches P
    is the last kept) and past group boundaries, P above the total (the smallest value, even with
    weight 0), P <= 0 (the largest value); ties, -0 / +0, values over the whole float range, lists
    of 1 to 5000 entries (several per thread)."""
    g = torch.Generator().manual_seed(3)
    checked = 0
    for n in (1, 7, 513, 5000):
        for kind in range(4):
            if kind == 3 and n <= 512:
                continue
            if kind == 0:  # many ties, signed zeros
                v = (torch.randint(-3, 4, (n,), generator=g).float() * 0.5).tolist()
                v = [(-0.0 if j % 2 else 0.0) if x == 0 else x for j, x in enumerate(v)]
            elif kind == 1:  # the whole float range: every digit pass decides something
                v = (torch.randn(n, generator=g) * torch.pow(10.0, torch.randint(-30, 30, (n,), generator=g))).tolist()
                v[0] = -3.4028234663852886e38
            elif kind == 2:  # near neighbours: values one ulp apart
                base = torch.full((n,), 1.5)
                v = torch.nextafter(base, torch.full((n,), 2.0)).tolist()[: n // 2] + base.tolist()[n // 2 :]
            else:  # the largest values in pairs one ulp apart, the pair's entries on one thread (0,
                # 512), two lanes of a warp (1, 2) or two warps (3, 35): the select must see that
                # two entries share the digits (no early exit on either), else the cut can be wrong
                v = [-float(j) for j in range(n)]
                for a, b, x in ((0, 512, 100.5), (1, 2, 90.5), (3, 35, 80.5)):  # not near a power of 2
                    v[a], v[b] = x, torch.nextafter(torch.tensor(x), torch.tensor(200.0)).item()
            w = torch.pow(2.0, -torch.randint(0, 20, (n,), generator=g).double()).tolist()
            w[-1] = 0.0  # a held value with no mass
            total = sum(w)
            cum, Ps = 0.0, [0.0, -1.0, total * 2, total, math.nextafter(total, math.inf), total * 1.01]
            for val in sorted(set(v), reverse=True)[:8]:
                cum += sum(wj for vj, wj in zip(v, w) if vj == val)
                Ps += [cum, cum * 0.999, cum * 1.001]
            Ps += (torch.rand(4, generator=g).double() * total).tolist()
            vt = torch.tensor(v, dtype=torch.float32)
            wt = torch.tensor(w, dtype=torch.float32)
            for P in Ps:
                want = _mass_cut(vt.tolist(), wt.double().tolist(), P)
                got = emu_pipe.block_top_p(vt, wt, P)
                assert got == want, (n, kind, P, got, want)
                checked += 1
    assert checked > 150


@bk.needs_emu
def test_emu_block_low_cut():
    """The GPU's typical cut on the list (pipeline.cuh block_low_cut: the mass select of top-p,
    mirrored, over 64-bit order keys of double scores) against its definition, the largest score
    whose strictly smaller scores weigh < P (the largest score when no prefix of tie groups reaches
    P), on one block of the production size; power-of-two weights (exact masses in any order).
    Distinct scores end the select early (a digit held by one entry: its key is read), ties and
    one-ulp clusters run all 32 passes; weight 1 each (w = None) with P = m gives the m-th smallest
    score (typical's min_tokens_to_keep)."""
    g = torch.Generator().manual_seed(5)
    checked = 0
    for n in (1, 7, 600, 5000):
        for kind in range(5):
            if kind == 4 and n <= 512:
                continue
            if kind == 0:  # ties
                sc = (torch.randint(0, 6, (n,), generator=g).double() * 0.25).tolist()
            elif kind == 1:  # the whole double range, +inf: distinct, early exits
                sc = (
                    torch.rand(n, generator=g).double()
                    * torch.pow(10.0, torch.randint(-300, 300, (n,), generator=g).double())
                ).tolist()
                sc[0] = math.inf
            elif kind == 2:  # one-ulp clusters: the top 50 bits of the keys do not separate them
                sc = [2.0] * n
                for j in range(n):
                    for _ in range(j % 7):
                        sc[j] = math.nextafter(sc[j], 3.0)
            elif kind == 3:  # typical's own scores: |-log p - H| of a softmax
                lp = torch.log_softmax(torch.randn(n, generator=g).double() * 3, 0)
                H = -(lp.exp() * lp).sum()
                sc = (-lp - H).abs().tolist()
            else:  # the smallest scores in pairs one ulp apart on one thread / two lanes / two warps
                sc = [10.0 + j for j in range(n)]
                for a, b, x in ((0, 512, 1.25), (1, 2, 2.5), (3, 35, 3.75)):  # not near a power of 2
                    sc[a], sc[b] = x, math.nextafter(x, 0.0)
            w = torch.pow(2.0, -torch.randint(0, 20, (n,), generator=g).double()).float()
            w[-1] = 0.0
            wd = w.double().tolist()
            total = sum(wd)
            cum, Ps = 0.0, [total * 2, total, math.nextafter(total, math.inf), total * 1.01, 1e-300]
            for val in sorted(set(sc))[:8]:
                cum += sum(wj for sj, wj in zip(sc, wd) if sj == val)
                Ps += [cum, cum * 0.999, cum * 1.001]
            Ps += (torch.rand(4, generator=g).double() * total).tolist()
            st = torch.tensor(sc, dtype=torch.float64)
            for P in Ps:
                if P <= 0:
                    continue
                want = -_mass_cut([-x for x in sc], wd, P)  # the largest score, mirrored
                got = emu_pipe.block_low_cut(st, w, P)
                assert got == want, (n, kind, P, got, want)
                checked += 1
            for m in sorted({1, 2, n // 3 + 1, n}):  # weight 1 each, P = m: the m-th smallest
                m = min(m, n)
                want = sorted(sc)[m - 1]
                got = emu_pipe.block_low_cut(st, None, float(m))
                assert got == want, (n, kind, m, got, want)
                checked += 1
    assert checked > 250
