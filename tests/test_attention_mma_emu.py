"""The tensor-core tree-attention kernel (csrc/cuda/attention_mma.cuh) run by the CPU emulator of
tests/cuda_emu (emu_mma.h: mma.sync m16n8k16, ldmatrix, deferred cp.async), and the emulated
fragment operations themselves checked against the PTX ISA fragment tables, written out again here.

The kernel matrix: T in {1, 7, 64, 130}, prefix in {0, 1, 2047}, D in {64, 128, 256}, GQA 32/8 and
32/32, NHD / HND, bf16 / fp16, with and without split-KV. By default a subset that still takes every
value of every axis runs; DK_EMU_FULL=1 runs the whole product (slow), or the part that
DK_EMU_FULL_CASES / DK_EMU_FULL_RANGE select (see select_cases)."""

import itertools
import os
import time

import pytest
import torch

import decodekit
from test_attention import check_close, make_case, sdpa_expected


def _emu():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
    import emu_attn

    if emu_attn.compiler() is None:
        pytest.skip("no host C++ compiler to build the CUDA emulator")
    return emu_attn


def bits16(x):
    """16-bit patterns (as int64) of a bf16 / fp16 tensor."""
    return x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def pack_pair(lo, hi):
    v = int(lo) | (int(hi) << 16)
    return v - (1 << 32) if v >= 1 << 31 else v  # as int32


# ---- fragment operations --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_emulated_mma_matches_matrix_product(dtype):
    """Random A (16x16), B (16x8), C (16x8) split into per-lane fragments by the PTX ISA tables for
    mma.m16n8k16 (.row.col, fp32 accumulators); the emulated D = A B + C, reassembled, equals the
    float64 matrix product rounded to fp32."""
    emu = _emu()
    gen = torch.Generator().manual_seed(16)
    for trial in range(20):
        scale = 4.0 ** (trial % 5 - 2)
        A = (torch.randn(16, 16, generator=gen) * scale).to(dtype)
        B = (torch.randn(16, 8, generator=gen) * scale).to(dtype)
        C = torch.randn(16, 8, generator=gen) * (trial % 3)
        ab, bb = bits16(A), bits16(B)
        a = torch.zeros(32, 4, dtype=torch.int32)
        b = torch.zeros(32, 2, dtype=torch.int32)
        c = torch.zeros(32, 4, dtype=torch.float32)
        for lane in range(32):
            g, i = lane // 4, lane % 4
            for reg, (row, col) in enumerate([(g, 2 * i), (g + 8, 2 * i), (g, 2 * i + 8), (g + 8, 2 * i + 8)]):
                a[lane, reg] = pack_pair(ab[row, col], ab[row, col + 1])
            for reg, k in enumerate([2 * i, 2 * i + 8]):
                b[lane, reg] = pack_pair(bb[k, g], bb[k + 1, g])
            for reg, (row, col) in enumerate([(g, 2 * i), (g, 2 * i + 1), (g + 8, 2 * i), (g + 8, 2 * i + 1)]):
                c[lane, reg] = C[row, col]
        d = emu.mma_fragments(a, b, c, dtype == torch.float16)
        D = torch.empty(16, 8)
        for lane in range(32):
            g, i = lane // 4, lane % 4
            for reg, (row, col) in enumerate([(g, 2 * i), (g, 2 * i + 1), (g + 8, 2 * i), (g + 8, 2 * i + 1)]):
                D[row, col] = d[lane, reg]
        exp = (A.double() @ B.double() + C.double()).float()
        torch.testing.assert_close(D, exp, atol=0, rtol=2**-23)


@pytest.mark.parametrize("nmat", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True], ids=["rows", "trans"])
def test_emulated_ldmatrix_layout(nmat, trans):
    """ldmatrix .m8n8 .x1 / .x2 / .x4 (and .trans) from scattered 16-byte-aligned rows: lane 8j + r
    gives row r of matrix j; register j of lane l holds elements (l/4, 2(l%4)), (l/4, 2(l%4)+1) of
    matrix j, or with .trans (2(l%4), l/4), (2(l%4)+1, l/4)."""
    emu = _emu()
    gen = torch.Generator().manual_seed(17)
    src = torch.randint(-(2**15), 2**15, (40, 32), generator=gen, dtype=torch.int32).to(torch.int16)
    rows = torch.randperm(40, generator=gen)[:32].to(torch.int32)
    cols = (torch.randint(0, 4, (32,), generator=gen) * 8).to(torch.int32)
    out = emu.ldmatrix(src, rows, cols, nmat, trans)
    u = src.to(torch.int64) & 0xFFFF

    def elem(j, r, cidx):  # element (r, cidx) of matrix j
        lane = 8 * j + r
        return u[rows[lane], cols[lane] + cidx]

    for lane in range(32):
        for j in range(4):
            if j >= nmat:
                assert out[lane, j] == 0, "registers past .x{nmat} must stay untouched"
                continue
            if trans:
                lo, hi = elem(j, 2 * (lane % 4), lane // 4), elem(j, 2 * (lane % 4) + 1, lane // 4)
            else:
                lo, hi = elem(j, lane // 4, 2 * (lane % 4)), elem(j, lane // 4, 2 * (lane % 4) + 1)
            assert int(out[lane, j]) == pack_pair(lo, hi), (lane, j)


def test_emulated_cp_async_lands_only_at_wait():
    """Deferred cp.async: before the wait_group that covers its group the destination holds poison
    (0xffff, NaN in bf16 / fp16); wait_group 1 lands the older group only; wait_group 0 lands all."""
    emu = _emu()
    got = emu.cp_async_probe()
    assert got == [0xFFFF, 0x1111, 0xFFFF, 0x1111, 0x2222], [hex(x) for x in got]


def test_split_rule():
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


@pytest.mark.parametrize("case", default_matrix(), ids=lambda c: "-".join(map(str, c)))
def test_mma_kernel_emulated_matches_cpu(case):
    emu = _emu()
    T, prefix, D, gqa, layout, dt, splits = case
    o, tm, pl, q, k, v = run_case(emu, *case, seed=hash(case) % 1000)
    check_close(o, sdpa_expected(q, k, v, tm, pl, layout), _DT[dt], "emulated mma vs SDPA")


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
def test_mma_kernel_emulated_full_matrix():
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


def test_mma_kernel_emulated_empty_rows_and_split_edges():
    """Rows attending no key (out 0, lse -inf), a batch whose prefix leaves later splits empty, and
    the launcher's own split rule, against the CPU op."""
    emu = _emu()
    gen = torch.Generator().manual_seed(18)
    q, k, v, tm, _ = make_case(2, 5, 4, 2, 64, [600, 0], torch.bfloat16, "NHD", gen)
    tm[0, 1] = False
    tm[1, :3] = False
    pl = torch.tensor([600, 0])
    for splits in (0, 1, 4):
        o, lse = emu.tree_attention(q, k, v, tm, pl, None, "NHD", impl="mma", splits=splits)
        o_cpu, l_cpu = decodekit.tree_attention(q, k, v, tm, pl, kv_layout="NHD", return_lse=True)
        check_close(o, o_cpu.float(), torch.bfloat16, f"splits={splits}")
        torch.testing.assert_close(lse, l_cpu, atol=5e-3, rtol=1e-5)
        assert torch.isneginf(lse[1, :3]).all() and (o[1, :3] == 0).all()
        assert torch.isfinite(lse[0]).all()


def test_auto_picks_the_cuda_core_kernel_for_unaligned_rows():
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
