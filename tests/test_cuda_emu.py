"""The CUDA sampling/filter kernels (csrc/cuda/sampling.cuh) run on CPU threads by a small
emulator (tests/cuda_emu) and compared with the CPU ops: same seed -> same tokens, identical
filter outputs. This checks the kernels' logic (counter layout, canonical sums, thresholds,
method choice) on machines without a GPU; tests/test_cuda.py runs the same cases on a real GPU.

Every case runs at the production block size (sampling.cuh's kThreads) under randomised thread
orders (emu_runtime.h): SEEDS_PER_CASE schedule seeds per case, different seeds for different
cases. The last tests show what the emulator catches (a removed __syncthreads, bad warp ops).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import cuda_cases as cc  # noqa: E402
import emu  # noqa: E402
import decodekit  # noqa: E402

ops = decodekit.ops
pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no host C++ compiler to build the CUDA emulator")

SEEDS_PER_CASE = 2


def _emulated(i, fn, *args):
    """fn(*args) under each of case i's schedule seeds (never 0: that is the fixed order)."""
    out = []
    for j in range(SEEDS_PER_CASE):
        emu.set_schedule_seed(1 + SEEDS_PER_CASE * i + j)
        out.append(fn(*args))
    return out


# smaller rows than the GPU tests (the emulator pays per barrier); still > one 4096-chunk
SAMPLE = cc.sample_cases(V=6000, light=True) + cc.special_sample_cases()


def _same_sample(cpu, got, args):
    tok_c, val_c, lp_c = cpu
    tok_g, val_g, lp_g = got
    assert torch.equal(val_c, val_g), (val_c, val_g)
    assert torch.equal(tok_c, tok_g), (tok_c, tok_g)
    # the emulator uses the host log(), so logprobs are bit-identical here (on a GPU: last-bit)
    assert torch.equal(lp_c, lp_g), (lp_c, lp_g)


@pytest.mark.parametrize("i", range(len(SAMPLE)), ids=[c[0] for c in SAMPLE])
def test_sample_matches_cpu(i):
    _, args = SAMPLE[i]
    cpu = ops.sample(*args)
    for got in _emulated(i, emu.sample, *args):
        _same_sample(cpu, got, args)


GUMBEL = cc.gumbel_cases()


@pytest.mark.parametrize("i", range(len(GUMBEL)), ids=[c[0] for c in GUMBEL])
def test_gumbel_matches_cpu(i):
    _, args = GUMBEL[i]
    tc, vc = ops.gumbel_sample(*args)
    for tg, vg in _emulated(i, emu.gumbel_sample, *args):
        assert torch.equal(vc, vg) and torch.equal(tc, tg), (tc, tg, vc, vg)


FILTER = cc.filter_cases(V=4500, light=True)


@pytest.mark.parametrize("i", range(len(FILTER)), ids=[c[0] for c in FILTER])
def test_filter_matches_cpu(i):
    _, args = FILTER[i]
    c = ops.filter(*args)
    for g in _emulated(i, emu.filter, *args):
        assert c.dtype == g.dtype
        assert torch.equal(c.isnan(), g.isnan())
        assert torch.equal(torch.nan_to_num(c), torch.nan_to_num(g))


def test_production_block_size():
    """The default build is the production block size, and a small block (more elements per
    thread) gives the CPU's tokens too."""
    import re

    src = (emu.ROOT / "csrc/cuda/sampling.cuh").read_text()
    assert emu.load().dk_emu_threads() == int(re.search(r"#define DK_CUDA_THREADS (\d+)", src).group(1))
    emu.set_schedule_seed(7)
    for name, args in SAMPLE[::40]:
        _same_sample(ops.sample(*args), emu.sample(*args, threads=64), args)


# ---- what the emulator catches ------------------------------------------------------------------
def _selftest(*argv):
    exe = emu.ROOT / "build" / "cuda_emu" / "emu_selftest"
    src = [emu.HERE / "emu_selftest.cpp", emu.HERE / "emu_runtime.h"]
    if not exe.exists() or exe.stat().st_mtime < max(p.stat().st_mtime for p in src):
        exe.parent.mkdir(parents=True, exist_ok=True)
        cmd = [emu.compiler(), "-std=c++20", "-O1", f"-I{emu.HERE}", str(src[0]), "-o", str(exe)]
        subprocess.run(cmd, check=True)
    return subprocess.run([str(exe), *map(str, argv)], capture_output=True, text=True, timeout=120)


def test_emulator_catches_a_removed_syncthreads():
    """A broadcast from thread 0 through shared memory without the __syncthreads() between the
    write and the reads: the fixed thread order (seed 0, the old emulator) hides the race, every
    randomised order exposes it; with the barrier every order is right."""
    for seed in (0, 1, 2, 3, 4):
        r = _selftest("broadcast", 1, seed)
        assert r.returncode == 0 and r.stdout.split() == ["wrong", "0"], (seed, r.stdout, r.stderr)
    assert _selftest("broadcast", 0, 0).stdout.split() == ["wrong", "0"]  # hidden by the fixed order
    for seed in (1, 2, 3, 4):
        r = _selftest("broadcast", 0, seed)
        assert r.returncode == 0 and int(r.stdout.split()[1]) > 0, (seed, r.stdout)


@pytest.mark.parametrize(
    "mode, message",
    [("exited", "names lane 16, which has exited"), ("outside", "reads a lane outside its mask")],
)
def test_emulator_rejects_bad_warp_ops(mode, message):
    """A full-mask shuffle after half the warp returned, and a shuffle reading a lane outside its
    mask, abort with a message instead of exchanging with whoever is there."""
    r = _selftest(mode, 1)
    assert r.returncode != 0 and "no abort" not in r.stdout
    assert message in r.stderr, r.stderr


def test_two_block_sizes_in_one_process():
    # The emulated __shared__ arrays are function-local statics sized by the block size; GCC makes
    # them process-unique symbols unless the libraries are built with -fno-gnu-unique, and then a
    # 512-thread library loaded after a 64-thread one overran the 64-thread arrays (a segfault).
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
sys.path.insert(0, {str(Path(__file__).resolve().parent / "cuda_emu")!r})
import cuda_cases as cc, emu
x = cc.logits_family("randn", 5, 3000, seed=4)
a = emu.gumbel_sample(x, None, None, 12345, 0, threads=64)[0]
b = emu.gumbel_sample(x, None, None, 12345, 0)[0]
assert a.tolist() == b.tolist(), (a, b)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
