"""The CUDA emulator itself (tests/cuda_emu/emu_runtime.h) and the kernel-side contracts that are
not an op: what the emulator catches (a removed __syncthreads, bad warp ops), two block sizes of
one kernel in one process, the radix selects' warp-level digit scans (csrc/cuda/radix_digit.h)
and top-p's canonical sparse mass (contract.h). The ops' own cases run on every backend in
tests/test_ops_*.py (tests/backends.py)."""

import ctypes
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import emu  # noqa: E402

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no host C++ compiler to build the CUDA emulator")


# ---- what the emulator catches ------------------------------------------------------------------
def _selftest(*argv, env=None):
    exe = emu.selftest_exe("emu_selftest", ["-O1", *emu.sanitize_flags()])
    return subprocess.run([str(exe), *map(str, argv)], capture_output=True, text=True, timeout=120, env=env)


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


def test_emulator_runs_blocks_in_a_random_order():
    """A block reading what an earlier block of the same launch wrote (no launch boundary between):
    the fixed block order hides it, the randomised orders expose it (the split-row phases of
    sampling.cuh rely on launch boundaries for every cross-CTA read)."""
    assert _selftest("blocks", 0).stdout.split() == ["wrong", "0"]
    for seed in (1, 2, 3):
        r = _selftest("blocks", seed)
        assert r.returncode == 0 and int(r.stdout.split()[1]) > 0, (seed, r.stdout)


@pytest.mark.parametrize(
    "mode, message",
    [("exited", "names lane 16, which has exited"), ("outside", "reads a lane outside its mask")],
)
def test_emulator_rejects_bad_warp_ops(mode, message):
    """A full-mask shuffle after half the warp returned, and a shuffle reading a lane outside its
    mask, fail the launch with a message instead of exchanging with whoever is there."""
    r = _selftest(mode, 1)
    assert r.returncode != 0 and "no failure" not in r.stdout
    assert message in r.stderr, r.stderr


def test_emulator_watchdog_ends_a_thread_that_never_yields():
    """A thread stuck in a loop never reaches a barrier, so the scheduler never runs again: the
    launch watchdog ($DK_EMU_LAUNCH_TIMEOUT) fails the launch with the launch, block and thread
    named instead of letting the test hang (an out-of-bounds -1 index reading a NaN into a loop's
    exit test hung the suite once), and the emulator goes on: a broadcast launched afterwards in
    the same process is right. Without the watchdog the same program does not end."""
    env = dict(os.environ, DK_EMU_LAUNCH_TIMEOUT="1")
    t0 = time.monotonic()
    r = _selftest("spin", 1, env=env)
    assert r.returncode == 1 and r.stdout.split() == ["after:", "wrong", "0"], (r.stdout, r.stderr)
    assert "still running after the watchdog's limit (block 0, thread 5)" in r.stderr, r.stderr
    assert "a launch of 1 blocks x 64 threads" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60
    with pytest.raises(subprocess.TimeoutExpired):  # the loop really does not end by itself
        subprocess.run(
            [str(emu.ROOT / "build" / "cuda_emu" / "emu_selftest"), "spin", "1"],
            env=dict(os.environ, DK_EMU_LAUNCH_TIMEOUT="0"),
            capture_output=True,
            timeout=3,
        )


@pytest.mark.skipif(not emu.sanitize_flags(), reason="DK_EMU_SANITIZE=0")
def test_emulator_catches_a_shared_array_overrun():
    """The emulator libraries and this program are built with UBSan's index checks in trap mode:
    threads writing past a __shared__ array fail the launch (the trap, caught) instead of silently
    writing a neighbour (a shared-memory overrun that the GPU would not report either)."""
    r = _selftest("overrun", 1)
    assert r.returncode == 1 and "no failure" not in r.stdout, (r.stdout, r.stderr)
    assert "an index out of bounds (UBSan's bounds / object-size check trapped)" in r.stderr, r.stderr
    assert "of a launch of 1 blocks x 64 threads" in r.stderr, r.stderr


def test_emulator_catches_a_stack_overflow():
    """Each emulated thread (fiber) has a 256 KiB stack with an inaccessible page below it: a
    thread that recurses past it fails the launch, named, instead of overwriting the next fiber's
    stack or the heap; a launch after it in the same process is right."""
    r = _selftest("stack", 1)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "emulated thread 3 overflowed its 262144-byte stack" in r.stderr, r.stderr
    assert "(block 0, thread 3 of a launch of 1 blocks x 64 threads)" in r.stderr, r.stderr
    assert r.stdout.split() == ["after:", "wrong", "0"], r.stdout


def test_emulator_poisons_shared_memory_each_block():
    """A block starts with shared memory it has not written: the emulator fills the registered
    __shared__ variables with the poison pattern before each block, so reads of entries the block
    never wrote give NaN instead of a fresh static's zeros (or what the block before left)."""
    assert _selftest("unwritten", 1, 1).stdout.split() == ["nan", "1024"]
    assert _selftest("unwritten", 1, 0).stdout.split() == ["nan", "0"]  # what the emulator did before


@pytest.mark.parametrize("which", ["sampling", "speculative", "pipeline", "attention"])
def test_every_shared_variable_is_registered(which):
    """emu.py finds each library's emulated __shared__ variables in its symbol table (nm): every
    variable the kernel sources declare __shared__ (and the attention kernels' emulated dynamic
    shared memory) is found, in every instantiation, and nothing of the runtime's own."""
    import shutil

    import emu_attn
    import emu_pipe
    import emu_spec

    if shutil.which("nm") is None:
        pytest.skip("no nm (binutils): the emulator runs without shared-memory poison")

    lib = {"sampling": emu.load, "speculative": emu_spec.load, "pipeline": emu_pipe.load, "attention": emu_attn.load}
    found, anchor = emu.shared_statics(lib[which]()._cdll._name)
    assert anchor is not None and found
    assert not any(n.startswith("dkemu::") for n in found)
    names = {n.rsplit("::", 1)[1] for n in found}
    src = {"sampling": ["sampling.cuh"], "speculative": ["speculative.cuh", "sampling.cuh"],
           "pipeline": ["pipeline.cuh"], "attention": []}[which]  # fmt: skip
    declared = {
        m for f in src for m in re.findall(r"__shared__ \w+(?:::\w+)* (\w+)", (emu.ROOT / "csrc/cuda" / f).read_text())
    }
    assert declared <= names, (declared, names)
    if which == "attention":
        assert names == {"smem", "smem_raw"}, names
    kernels = {n.split("(")[0] for n in found}
    assert all(k.split("::")[-1].endswith(("_kernel", "_fn")) or "_kernel<" in k for k in kernels), kernels


GUARD_PAGE = "a read or write out of bounds: byte {} of selftest buffer (256 bytes: the guard page {} it)"


@pytest.mark.parametrize("at_end", [1, 0])
def test_emulator_catches_writes_outside_a_buffer(at_end):
    """The drivers allocate every workspace exactly at its plan's size (as the CUDA launchers do)
    between two inaccessible pages (dkemu::Guarded), the buffer against one of them. A write into
    that guard page faults and fails the launch, naming the buffer, the byte and the thread; a write
    into the slack on the other side fails the buffer's check, naming the bytes; in bounds passes."""
    assert _selftest("guard", 1, 0, at_end).stdout.split() == ["ok"]
    fault, slack = (1, -1) if at_end else (-1, 1)
    r = _selftest("guard", 1, fault, at_end)
    assert r.returncode == 1 and "ok" not in r.stdout.split(), (r.stdout, r.stderr)
    byte, where, thread = (256, "after", 63) if at_end else (-4, "before", 0)
    assert GUARD_PAGE.format(byte, where) in r.stderr, r.stderr
    assert f"(block 0, thread {thread} of a launch of 1 blocks x 64 threads)" in r.stderr, r.stderr
    r = _selftest("guard", 1, slack, at_end)
    assert r.returncode == 1 and "ok" not in r.stdout.split(), (r.stdout, r.stderr)
    span = "bytes 256 .. 259" if at_end == 0 else "bytes -4 .. -1"
    assert "selftest buffer: a launch wrote outside its 256-byte buffer: " + span in r.stderr, r.stderr


@pytest.mark.parametrize("at_end", [1, 0])
def test_emulator_catches_reads_outside_a_buffer(at_end):
    """Reads through a global-memory pointer: a read of the guard page fails the launch naming the
    byte; a read of the slack on the other side gives the poison pattern, a NaN."""
    assert _selftest("read", 1, 0, at_end).stdout.split() == ["nan", "0"]
    fault, slack = (1, -1) if at_end else (-1, 1)
    r = _selftest("read", 1, fault, at_end)
    byte, where = (256, "after") if at_end else (-4, "before")
    assert r.returncode == 1 and GUARD_PAGE.format(byte, where) in r.stderr, (r.stdout, r.stderr)
    assert _selftest("read", 1, slack, at_end).stdout.split() == ["nan", "1"]


def test_emulator_fences_the_regions_of_a_workspace():
    """The emulator libraries leave DK_WS_REDZONE bytes after every region of a workspace layout
    (decodekit/common.h; 256 unless $DK_EMU_WS_REDZONE says otherwise) and the drivers fence them
    (Guarded::fence_gaps): a kernel running from one region into the next writes a red zone, which
    fails the buffer's check naming the bytes, or reads the NaN pattern instead of its neighbour's
    values (test_cuda_emu_asan.py: AddressSanitizer reports the read). Here 32 threads reach
    A[index + t] of a 32-float region A followed by a 64-byte zone, then region B."""
    assert _selftest("inner_guard", 1, 0).stdout.split() == ["ok"]
    r = _selftest("inner_guard", 1, 1)
    assert r.returncode == 1 and "ok" not in r.stdout.split(), (r.stdout, r.stderr)
    msg = "selftest workspace: a launch wrote into a red zone between two regions of its layout: bytes 128 .. 131"
    assert msg + " (the zone: bytes 128 .. 191)" in r.stderr, r.stderr
    assert _selftest("inner_read", 1, 0).stdout.split() == ["nan", "0"]
    assert _selftest("inner_read", 1, 1).stdout.split() == ["nan", "1"]
    assert _selftest("inner_read", 1, 16).stdout.split() == ["nan", "16"]  # all of the zone, none of B


def test_emulator_fences_tensor_arguments():
    """Every tensor a wrapper hands to an emulator library is copied into fenced memory (emu.Fence)
    and the outputs are copied back. Here the filter kernel is told of 2 rows of 1000 elements but
    gets a tensor of 1990: the last row's reads past its end hit the guard page when the call's
    buffers sit against the page after them, and the failure names the argument and the byte."""
    lib = emu.load()
    x = torch.randn(2000)
    out = torch.full((2, 1000), 7.0)
    args = (0, 2, 1000, 1000, 0, 0, None, 1.0, None, 0, None, 1.0, None, 0.0, 0, out, 1000, 0)
    for turn in (0, 1, 2):  # every placement; in bounds, the output (no filter: the logits) comes back
        emu._fence_turn[0] = turn
        out.fill_(7.0)
        lib.dk_emu_filter(x, *args)
        assert torch.equal(out.view(-1), x)
    at = r"byte 79\d\d of dk_emu_filter argument 0 \(float32 \[1990\]\) \(7960 bytes: the guard page after it\)"
    for turn in (0, 1):  # the end exactly at the page; the start 16-byte aligned (8 bytes of slack)
        emu._fence_turn[0] = turn
        with pytest.raises(emu.EmulatorError, match=at):
            lib.dk_emu_filter(x[:1990].clone(), *args)


def test_emulator_fences_the_gaps_between_rows(monkeypatch):
    """The wrappers pass row inputs as views of wider tensors (emu.gapped: 64 bytes after each row,
    the kernels given the row stride) and Fence.ptr makes the gaps red zones. Here the sampling
    kernel is told that rows are one element longer than they are (a kernel that strays one
    element past its row), for output rows 0..2 of a 4-row tensor: with the gaps every row reads
    the poison pattern there (a NaN: bad rows); packed (DK_EMU_ROW_GAP=0) it reads the next row's
    first value and samples as if nothing were wrong. Also: the gaps hold the pattern inside the
    fenced copy, a write there fails the call naming the zone, and close() copies back only the
    rows (the wider tensor's gap bytes stay as they were)."""
    lib = emu.load()
    B, V = 4, 100
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(3))

    def valid_when_one_longer(xg):
        dt, rows, _, stride = emu._matrix(xg)
        tok, valid, lp = torch.zeros(B - 1, dtype=torch.int64), torch.zeros(B - 1, dtype=torch.bool), torch.zeros(B - 1)
        fargs = emu._filter_args(None, 1.0, None, 0, None, 1.0, None, 0.0)
        idx = torch.arange(B - 1)
        lib.dk_emu_sample(xg, dt, rows, V + 1, stride, 0, 0, *fargs, idx, B - 1, None, 5, 0, tok, valid, lp, 0, 0)
        return valid.tolist()

    xg = emu.gapped(x)
    assert xg.stride() == (V + 16, 1) and torch.equal(xg, x)
    assert emu._row_layout(xg) == (B, (V + 16) * 4, V * 4) and emu._row_layout(x) is None
    assert valid_when_one_longer(xg) == [False] * (B - 1)
    monkeypatch.setenv("DK_EMU_ROW_GAP", "0")
    assert emu.gapped(x) is x and valid_when_one_longer(emu.gapped(x)) == [True] * (B - 1)
    monkeypatch.delenv("DK_EMU_ROW_GAP")

    wide = xg._base if xg._base is not None else None
    assert wide is not None and wide.shape == (B, V + 16)
    wide[:, V:] = 5.0
    with lib.fence() as F:
        p = F.ptr(xg, "rows")
        gap = torch.frombuffer((ctypes.c_ubyte * 64).from_address(p + 4 * V), dtype=torch.float32)
        assert bool(gap.isnan().all())  # the pattern, not the 5.0 of the wider tensor
        ctypes.memmove(p, ctypes.byref(ctypes.c_float(9.0)), 4)  # row 0, element 0: copied back
    assert xg[0, 0].item() == 9.0 and bool((wide[:, V:] == 5.0).all())
    with pytest.raises(emu.EmulatorError, match="wrote into a red zone between two regions"):
        with lib.fence() as F:
            p = F.ptr(xg, "rows")
            ctypes.memmove(p + 4 * (2 * (V + 16) + V + 3), ctypes.byref(ctypes.c_float(1.0)), 4)  # row 2's gap


def test_emulator_failure_raises_in_python_and_the_suite_goes_on(monkeypatch):
    """In a test process, a failure the emulator records during a library call raises EmulatorError
    with its message (an abort would end the whole pytest run and lose the message to the output
    capture); the library works on the next call. Here the watchdog's limit is set far below the
    call's running time, so a real sampling call fails."""
    import cuda_cases as cc

    x = cc.logits_family("randn", 4, 20000, seed=3)
    want = emu.gumbel_sample(x, None, None, 7, 0)[0]
    monkeypatch.setenv("DK_EMU_LAUNCH_TIMEOUT", "0.000001")
    with pytest.raises(emu.EmulatorError, match="still running after the watchdog's limit"):
        emu.gumbel_sample(x, None, None, 7, 0)
    monkeypatch.delenv("DK_EMU_LAUNCH_TIMEOUT")
    assert torch.equal(emu.gumbel_sample(x, None, None, 7, 0)[0], want)


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


# ---- the radix selects' digit scans (csrc/cuda/radix_digit.h) -------------------------------------
def _digit_scans(lines, seed):
    exe = emu.ROOT / "build" / "cuda_emu" / "emu_digit"
    src = [
        emu.HERE / "emu_digit.cpp",
        emu.HERE / "emu_runtime.h",
        emu.ROOT / "csrc/cuda/radix_digit.h",
        emu.ROOT / "csrc/include/decodekit/contract.h",
    ]
    if not exe.exists() or exe.stat().st_mtime < max(p.stat().st_mtime for p in src):
        exe.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            emu.compiler(),
            "-std=c++20",
            "-O1",
            "-ffp-contract=off",
            f"-I{emu.HERE}",
            f"-I{emu.ROOT / 'csrc'}",
            f"-I{emu.ROOT / 'csrc/include'}",
            str(src[0]),
            "-o",
            str(exe),
        ]
        subprocess.run(cmd, check=True)
    r = subprocess.run(
        [str(exe), str(seed)], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return [(int(a), b) for a, b in (ln.split() for ln in r.stdout.splitlines())]


def _seq_count(h, kk):
    """The sequential scan from the top (what thread 0 did before): the largest digit d >= 1 whose
    count from the top reaches kk, else 0; and the count above d."""
    cum, d = 0, 255
    while d > 0 and cum + h[d] < kk:
        cum += h[d]
        d -= 1
    return d, cum


def _seq_mass(h, above, P):
    """The sequential mass scan from the top (the previous thread-0 loop)."""
    cum, last = above, -1
    for d in range(255, -1, -1):
        if h[d] > 0.0:
            last = d
        if cum + h[d] >= P:
            return d, cum
        cum += h[d]
    d = max(last, 0)
    return d, above + sum(h[q] for q in range(255, d, -1)) if last >= 0 else above


def _par_mass(h, above, P):
    """radix_digit.h's pick_mass_digit in Python doubles (the same IEEE additions in the same
    order): lane sums of 8 digits, an inclusive Hillis-Steele scan over the lanes, per-lane walks."""
    local = []
    for lane in range(32):
        s = 0.0
        for b in range(8):
            s += h[255 - 8 * lane - b]
        local.append(s)
    incl = local[:]
    o = 1
    while o < 32:
        incl = [incl[j - o] + incl[j] if j >= o else incl[j] for j in range(32)]
        o *= 2
    found, lasts = None, []
    for lane in range(32):
        cum = above + (incl[lane - 1] if lane else 0.0)
        last = None
        for b in range(255 - 8 * lane, 247 - 8 * lane, -1):
            if h[b] > 0.0:
                last = (b, cum)
            if cum + h[b] >= P:
                if found is None:
                    found = (b, cum)
                break
            cum += h[b]
        lasts.append(last)
    if found is not None:
        return found
    with_mass = [x for x in lasts if x is not None]
    return with_mass[-1] if with_mass else (0, above)


def _digit_histograms(gen):
    hs = []
    for kind in range(6):
        for _ in range(8):
            if kind == 0:  # dense
                h = torch.randint(0, 50, (256,), generator=gen)
            elif kind == 1:  # a few bins
                h = torch.zeros(256, dtype=torch.int64)
                idx = torch.randint(0, 256, (3,), generator=gen)
                h[idx] = torch.randint(1, 1000, (3,), generator=gen)
            elif kind == 2:  # everything in digit 0 or 255
                h = torch.zeros(256, dtype=torch.int64)
                h[0 if _ % 2 else 255] = 7
            elif kind == 3:  # a bulk at the low digits (logits sharing their top bits)
                h = torch.zeros(256, dtype=torch.int64)
                h[:12] = torch.randint(0, 5000, (12,), generator=gen)
            elif kind == 4:  # sparse
                h = (torch.rand(256, generator=gen) < 0.05).long() * torch.randint(1, 9, (256,), generator=gen)
            else:
                h = torch.zeros(256, dtype=torch.int64)
            hs.append([int(v) for v in h])
    return hs


@pytest.mark.parametrize("seed", [1, 2])
def test_digit_scans(seed):
    """The radix selects' digit scans run on warp 0 (8 digits per lane + a warp scan) instead of
    one thread. Count form: the sequential scan's digit and count exactly, every rank from 1 to
    past the total. Mass form: with integer masses (exact sums) the sequential scan's digit and
    mass above; with real masses, bit for bit the parallel definition written out in Python
    doubles; P beyond the total (rounding) gives the lowest digit with mass; no mass: digit 0."""
    gen = torch.Generator().manual_seed(100 + seed)
    hs = _digit_histograms(gen)
    lines, want = [], []
    for h in hs:
        total = sum(h)
        ranks = sorted({1, total, total + 1, *torch.randint(1, total + 2, (6,), generator=gen).tolist()})
        for kk in ranks:
            lines.append("c %d %s" % (kk, " ".join(map(str, h))))
            want.append(_seq_count(h, kk))
    got = _digit_scans(lines, seed)
    assert [(d, int(c)) for d, c in got] == want
    lines, want_seq, want_par = [], [], []
    for h in hs:
        hf = [float(v) for v in h]
        total = sum(hf)
        for above, P in [(0.0, 0.5), (3.0, 3.0 + total / 2 + 0.5), (1.0, 1.0 + total), (0.0, total + 1.0), (2.0, 1.0)]:
            lines.append("m %r %r %s" % (above, P, " ".join(map(repr, hf))))
            want_seq.append(_seq_mass(hf, above, P))
        r = (torch.rand(256, generator=gen, dtype=torch.float64) * torch.tensor([v > 0 for v in h])).tolist()
        rt = sum(r)
        for P in (1e-3 * rt, 0.5 * rt, 0.9 * rt, rt, 1.5 * rt + 1e-9):
            lines.append("m %r %r %s" % (0.25, 0.25 + P, " ".join(map(repr, r))))
            want_par.append(_par_mass(r, 0.25, 0.25 + P))
    got = _digit_scans(lines, seed)
    exact, real = [], []
    for i, (d, c) in enumerate(got):
        (exact if i % 10 < 5 else real).append((d, float(c)))
    assert exact == want_seq
    assert real == want_par


def test_sparse_mass_is_the_canonical_mass():
    """Top-p's Z over the top-k survivors: the CPU sums its index-ordered candidate list with
    contract.h's sparse_mass, the GPU the masked whole row in the canonical (chunk, lane) order;
    the two are the same double, bit for bit (the omitted terms are +0.0)."""
    gen = torch.Generator().manual_seed(5)
    lines = []
    for V, n in [(100, 7), (4096, 300), (4097, 50), (20000, 2000), (128256, 50), (128256, 4000), (9000, 0)]:
        idx = torch.randperm(V, generator=gen)[:n].sort().values
        # a wide dynamic range, so that the double sums round and their order matters
        w = torch.exp2(torch.rand(n, generator=gen, dtype=torch.float64) * 100 - 80).float()
        w[::7] = 0.0  # zero weights among the survivors (exp underflow)
        lines.append("s %d %d %s" % (V, n, " ".join(f"{int(i)} {float(x)!r}" for i, x in zip(idx, w))))
    _digit_scans([], 1)  # builds the program
    exe = emu.ROOT / "build" / "cuda_emu" / "emu_digit"
    r = subprocess.run([str(exe), "1"], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pairs = [ln.split() for ln in r.stdout.splitlines()]
    assert len(pairs) == len(lines)
    for sp, dense in pairs:
        assert sp == dense
    assert len({p[0] for p in pairs}) == len(pairs)  # distinct totals: the cases are not trivial


# ---- the tensor-core fragment operations of emu_mma.h (mma.sync, ldmatrix, cp.async) -------------
def _emu():
    import emu_attn

    return emu_attn


def bits16(x):
    """16-bit patterns (as int64) of a bf16 / fp16 tensor."""
    return x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def pack_pair(lo, hi):
    v = int(lo) | (int(hi) << 16)
    return v - (1 << 32) if v >= 1 << 31 else v  # as int32


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


# ---- the emulator libraries' cache keys ----------------------------------------------------------
def _includes(path, out):
    """Every project file `path` includes with #include "...", recursively (resolved like the
    emulator's build: the file's folder, csrc/, csrc/include/)."""
    for name in re.findall(r'^\s*#include "([^"]+)"', path.read_text(), flags=re.M):
        for base in (path.parent, emu.ROOT / "csrc", emu.ROOT / "csrc/include"):
            f = (base / name).resolve()
            if f.is_file():
                if f not in out:
                    out.add(f)
                    _includes(f, out)
                break
    return out


def test_emulator_cache_keys_cover_every_included_header():
    """An emulator library is cached under a hash of its SOURCES; a header it includes that is not
    in SOURCES can change without a rebuild (csrc/cuda/radix_digit.h was missing from all three
    sampling-family lists, so an edited digit scan ran a stale library)."""
    import emu_attn
    import emu_pipe
    import emu_spec

    for mod, cpp in [
        (emu, "emu_sampling.cpp"),
        (emu_spec, "emu_speculative.cpp"),
        (emu_pipe, "emu_pipeline.cpp"),
        (emu_attn, "emu_attention.cpp"),
    ]:
        listed = {p.resolve() for p in mod.SOURCES}
        missing = sorted(str(f) for f in _includes(emu.HERE / cpp, set()) - listed)
        assert not missing, (cpp, missing)
