"""Tree attention (decodekit.tree_attention) on every backend (tests/backends.py): "cpu", "cuda_emu"
(csrc/cuda/attention_mma.cuh's tensor-core kernel, or the launcher's own choice, run by the CPU
emulator of tests/cuda_emu: emu_mma.h emulates mma.sync m16n8k16, ldmatrix and deferred cp.async;
the fragment operations themselves are checked in test_cuda_emu_runtime.py) and "cuda" (a real
GPU, the op's own kernel choice).

On every backend a case's output is checked against the fp32 SDPA of the dense tree mask
(test_attention.py's sdpa_expected, within its per-dtype tolerances); on "cuda_emu" and "cuda" it
must also match the CPU op (output within the same tolerances, log-sum-exp within 5e-3).

The kernel matrix: T in {1, 7, 64, 130}, prefix in {0, 1, 2047}, D in {64, 128, 256}, GQA 32/8 and
32/32, NHD / HND, bf16 / fp16, with and without split-KV. By default a subset that still takes every
value of every axis runs; DK_EMU_FULL=1 runs the whole product under the emulator (slow), or the
part that DK_EMU_FULL_CASES / DK_EMU_FULL_RANGE select (see select_cases)."""

import itertools
import os
import time

import pytest
import torch

import backends as bk
import decodekit
from test_attention import check_close, make_case, sdpa_expected

BACKEND_PARAMS = [pytest.param(b, marks=bk.MARKS[b]) for b in bk.BACKENDS]
on_backends = pytest.mark.parametrize("backend", BACKEND_PARAMS)


def _emu():
    import emu_attn

    if emu_attn.compiler() is None:
        pytest.skip("no host C++ compiler to build the CUDA emulator")
    return emu_attn


def _on_backend(backend, q, k, v, mask, pl, layout, splits=None):
    """(out, lse) of the op on `backend`, and the CPU op's; checked against each other (not on cpu)."""
    o_cpu, l_cpu = decodekit.tree_attention(q, k, v, mask, pl, kv_layout=layout, return_lse=True)
    if backend == "cpu":
        return o_cpu.float(), l_cpu, o_cpu, l_cpu
    if backend == "cuda_emu":
        o, lse = _emu().tree_attention(q, k, v, mask, pl, None, layout, impl="mma", splits=splits)
    else:
        o, lse = bk.to_cpu(
            decodekit.tree_attention(
                q.cuda(), k.cuda(), v.cuda(), mask.cuda(), pl.cuda(), kv_layout=layout, return_lse=True
            )
        )
        o = o.float()
    return o, lse, o_cpu, l_cpu


def test_emu_split_rule():
    emu = _emu()
    # B=1, Hkv=8, T x G = 64 x 4 rows -> 4 row tiles x 8 = 32 blocks < 132: split a long prefix
    assert emu.mma_splits(1, 64, 32, 8, 2048 + 64) == 5  # ceil(132/32) = 5, <= 2048 // 256
    assert emu.mma_splits(1, 64, 32, 8, 8192 + 64) == 5
    assert emu.mma_splits(1, 1, 32, 32, 600 + 1) == 2  # 32 blocks: ceil(132/32) = 5, but 600 // 256 = 2
    assert emu.mma_splits(1, 64, 32, 8, 512 + 64) == 1  # prefix <= 2 * 256: no split
    assert emu.mma_splits(64, 64, 32, 8, 8192 + 64) == 1  # 2048 blocks: already a full wave
    assert emu.mma_splits(1, 1, 8, 1, 1 << 20) == 32  # capped


# ---- the kernel -----------------------------------------------------------------------------------
T_VALUES, PREFIX_VALUES, D_VALUES = (1, 7, 64, 130), (0, 1, 2047), (64, 128, 256)
GQA_VALUES, LAYOUTS, DTYPES, SPLITS = ((32, 8), (32, 32)), ("NHD", "HND"), ("bf16", "f16"), (1, 3)
_DT = {"bf16": torch.bfloat16, "f16": torch.float16}


def full_matrix():
    return list(itertools.product(T_VALUES, PREFIX_VALUES, D_VALUES, GQA_VALUES, LAYOUTS, DTYPES, SPLITS))


def default_matrix():
    """Every value of every axis at least once, long prefixes only with small T, G and D."""
    return [
        (1, 0, 64, (32, 8), "NHD", "bf16", 1),
        (7, 1, 128, (32, 32), "HND", "f16", 1),
        (7, 2047, 64, (32, 8), "HND", "bf16", 3),
        (1, 2047, 128, (32, 32), "NHD", "f16", 1),
        (64, 1, 256, (32, 8), "NHD", "f16", 3),
        (130, 0, 128, (32, 8), "HND", "bf16", 1),
        (130, 1, 64, (32, 32), "NHD", "bf16", 3),
        (1, 1, 256, (32, 32), "HND", "bf16", 3),
        (1, 2047, 256, (32, 8), "NHD", "f16", 3),
    ]


def run_case(emu, T, prefix, D, gqa, layout, dt, splits, seed):
    Hq, Hkv = gqa
    dtype = _DT[dt]
    gen = torch.Generator().manual_seed(seed)
    q, k, v, tm, pl = make_case(1, T, Hq, Hkv, D, [prefix], dtype, layout, gen)
    mask = decodekit.pack_tree_mask(tm) if seed % 2 else tm
    o, lse = emu.tree_attention(q, k, v, mask, pl, None, layout, impl="mma", splits=splits)
    o_cpu, l_cpu = decodekit.tree_attention(q, k, v, mask, pl, kv_layout=layout, return_lse=True)
    what = f"mma T={T} P={prefix} D={D} {Hq}/{Hkv} {layout} {dt} splits={splits}"
    check_close(o, o_cpu.float(), dtype, what)
    torch.testing.assert_close(lse, l_cpu, atol=5e-3, rtol=1e-5, msg=what)
    return o, tm, pl, q, k, v


@on_backends
@pytest.mark.parametrize("case", default_matrix(), ids=lambda c: "-".join(map(str, c)))
def test_tree_attention(backend, case):
    """The default matrix: on cuda_emu the tensor-core kernel with the case's split count."""
    T, prefix, D, (Hq, Hkv), layout, dt, splits = case
    dtype = _DT[dt]
    seed = hash(case) % 1000
    gen = torch.Generator().manual_seed(seed)
    q, k, v, tm, pl = make_case(1, T, Hq, Hkv, D, [prefix], dtype, layout, gen)
    mask = decodekit.pack_tree_mask(tm) if seed % 2 else tm
    o, lse, o_cpu, l_cpu = _on_backend(backend, q, k, v, mask, pl, layout, splits)
    what = f"{backend} T={T} P={prefix} D={D} {Hq}/{Hkv} {layout} {dt} splits={splits}"
    if backend != "cpu":
        check_close(o, o_cpu.float(), dtype, what)
        torch.testing.assert_close(lse, l_cpu, atol=5e-3, rtol=1e-5, msg=what)
    check_close(o, sdpa_expected(q, k, v, tm, pl, layout), dtype, f"{what} vs SDPA")


def case_fields(case):
    """The case as the strings DK_EMU_FULL_CASES matches: T, prefix, D, "Hq/Hkv", layout, dtype, splits."""
    T, prefix, D, (Hq, Hkv), layout, dt, splits = case
    return [str(T), str(prefix), str(D), f"{Hq}/{Hkv}", layout, dt, str(splits)]


def select_cases(cases, patterns=None, index_range=None):
    """(index in `cases`, case) pairs picked by DK_EMU_FULL_CASES-style patterns (comma-separated;
    each a colon-separated prefix of case_fields, "*" matching any value, e.g. "130:2047:128" or
    "*:*:256:32/8") and a DK_EMU_FULL_RANGE-style "start:stop" slice of the indices."""
    picked = list(enumerate(cases))
    if patterns:
        pats = [p.strip().split(":") for p in patterns.split(",") if p.strip()]
        if any(len(p) > 7 for p in pats):
            raise ValueError(f"DK_EMU_FULL_CASES: at most 7 fields a pattern, got {patterns!r}")
        picked = [(i, c) for i, c in picked if any(all(a in ("*", b) for a, b in zip(p, case_fields(c))) for p in pats)]
    if index_range:
        lo, _, hi = index_range.partition(":")
        lo, hi = int(lo or 0), int(hi or len(cases))
        picked = [(i, c) for i, c in picked if lo <= i < hi]
    return picked


def test_case_selection():
    cases = full_matrix()
    assert len(cases) == 576 and len(set(cases)) == 576
    assert select_cases(cases) == list(enumerate(cases))
    got = select_cases(cases, "130:2047:128, 64:2047:256")
    assert len(got) == 32 and {c[:3] for _, c in got} == {(130, 2047, 128), (64, 2047, 256)}
    assert all(cases[i] == c for i, c in got)
    assert len(select_cases(cases, "*:*:*:32/32:HND:f16:3")) == 36
    assert select_cases(cases, None, "570:") == list(enumerate(cases))[570:]
    assert [i for i, _ in select_cases(cases, "1", "10:20")] == list(range(10, 20))
    assert select_cases(cases, "999") == []
    with pytest.raises(ValueError, match="DK_EMU_FULL_CASES"):
        select_cases(cases, "1:0:64:32/8:NHD:bf16:1:extra")


@pytest.mark.skipif(os.environ.get("DK_EMU_FULL") != "1", reason="the full matrix: set DK_EMU_FULL=1 (slow)")
def test_emu_mma_kernel_full_matrix():
    """DK_EMU_FULL_CASES / DK_EMU_FULL_RANGE pick a part (select_cases); the seed of a case is its
    index in the full matrix, whatever the selection."""
    emu = _emu()
    cases = full_matrix()
    picked = select_cases(cases, os.environ.get("DK_EMU_FULL_CASES"), os.environ.get("DK_EMU_FULL_RANGE"))
    assert picked, "the selection picks no case"
    for n, (i, case) in enumerate(picked):
        t0 = time.perf_counter()
        run_case(emu, *case, seed=i)
        dt = time.perf_counter() - t0
        print(f"full matrix {n + 1}/{len(picked)} ok: #{i} {case} {dt:.1f} s", flush=True)  # progress with -s


@on_backends
def test_empty_rows_and_split_edges(backend):
    """Rows attending no key (out 0, lse -inf), a batch whose prefix leaves later splits empty (on
    cuda_emu: split counts 0 = the launcher's own rule, 1 and 4), against the CPU op; the rows that
    attend a key against SDPA."""
    gen = torch.Generator().manual_seed(18)
    q, k, v, tm, _ = make_case(2, 5, 4, 2, 64, [600, 0], torch.bfloat16, "NHD", gen)
    tm[0, 1] = False
    tm[1, :3] = False
    pl = torch.tensor([600, 0])
    exp = sdpa_expected(q, k, v, tm, pl, "NHD")
    for splits in (0, 1, 4) if backend == "cuda_emu" else (None,):
        o, lse, o_cpu, l_cpu = _on_backend(backend, q, k, v, tm, pl, "NHD", splits)
        if backend != "cpu":
            check_close(o, o_cpu.float(), torch.bfloat16, f"splits={splits}")
            torch.testing.assert_close(lse, l_cpu, atol=5e-3, rtol=1e-5)
        assert torch.isneginf(lse[1, :3]).all() and (o[1, :3] == 0).all()
        assert torch.isfinite(lse[0]).all()
        check_close(o[0], exp[0], torch.bfloat16, f"{backend} vs SDPA, batch 0")
        check_close(o[1, 3:], exp[1, 3:], torch.bfloat16, f"{backend} vs SDPA, batch 1")


def test_emu_auto_picks_the_cuda_core_kernel_for_unaligned_rows():
    """A q whose rows are not 16-byte aligned (a slice at an odd element offset) cannot use cp.async:
    "auto" runs the CUDA-core kernel and still matches the CPU op."""
    emu = _emu()
    gen = torch.Generator().manual_seed(19)
    q, k, v, tm, pl = make_case(1, 3, 4, 2, 64, [40], torch.float16, "NHD", gen)
    qq = torch.zeros(1, 3, 4, 65, dtype=torch.float16)
    qq[..., 1:] = q
    q_off = qq[..., 1:]
    o, lse = emu.tree_attention(q_off, k, v, tm, pl, None, "NHD")
    o_cpu, l_cpu = decodekit.tree_attention(q, k, v, tm, pl, kv_layout="NHD", return_lse=True)
    check_close(o, o_cpu.float(), torch.float16, "auto, unaligned q")
    torch.testing.assert_close(lse, l_cpu, atol=5e-3, rtol=1e-5)
