"""The CUDA emulator with ThreadSanitizer (tests/cuda_emu/emu_runtime.h, namespace dkemu::tsan):
races that no thread order exposes. The emulator runs each emulated thread until its next barrier,
so a missing __syncwarp between lanes that meet at a shuffle anyway, or a plain `+=` where an
atomicAdd belongs, gives the right values under every schedule; on a GPU both are data races.
Built with -fsanitize=thread, every emulated thread is a ThreadSanitizer fiber ordered only by what
a GPU orders (barriers, __syncwarp; not shuffles; nothing between the blocks of a launch), and
every load and store of the kernels is checked.

- test_tsan_finds_races_no_schedule_shows: selftest kernels with such a race are reported under
  every seed tried, while their values come out right; the same kernels with the barrier / atomic
  are not reported.
- test_kernels_have_no_data_race: the emulator cases of the op suites (a selection that covers every
  kernel family at its production block size, see emu.SANITIZER_CASES) run in a subprocess with the
  ThreadSanitizer runtime preloaded; any report fails the test and is printed.

Both skip off x86-64, where the compiler has no ThreadSanitizer runtime, and where the runtime
cannot start (it names the reason: "FATAL: ThreadSanitizer: ...", e.g. an address-space layout it
does not support). ThreadSanitizer sees races between the threads of one block, and between the
blocks of a launch that run on different fiber sets (two sets alternate along the run order, so
half of the block pairs; the randomised block order of test_cuda_emu_runtime.py covers the rest
for value-changing races)."""

import os
import platform
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import emu  # noqa: E402

# The ThreadSanitizer build needs the emulator's x86-64 fiber switch (emu_runtime.h).
TSAN = emu.runtime("tsan") if emu.compiler() and platform.machine() == "x86_64" else None
pytestmark = pytest.mark.skipif(TSAN is None, reason="no x86-64 host compiler with a ThreadSanitizer runtime")


@pytest.mark.parametrize(
    "mode, line, hidden",
    [
        ("lanes", "slot[t ^ 1u]", (0, 1, 2)),  # a shuffle where a __syncwarp belongs
        ("count", "counter[t % 8] += 1", (0, 1, 2)),  # a plain add where an atomicAdd belongs
        ("broadcast", "a.out[blockIdx.x * kN + t] = total", (0,)),  # the removed __syncthreads
        ("total", "*a.count += 1", (0, 1, 2)),  # a plain add where an atomicAdd belongs, between blocks
    ],
)
def test_tsan_finds_races_no_schedule_shows(mode, line, hidden):
    """The race is reported under the fixed order (seed 0) and random ones, and the values are
    right under the seeds in `hidden` (every seed for lanes, count and total: the emulator alone
    passes those kernels; the removed __syncthreads only under the fixed order); with the fence, no
    report. The report names the kernel and the line of one of the racing accesses."""
    src = (emu.HERE / "emu_selftest.cpp").read_text().splitlines()
    lines = {i + 1 for i, s in enumerate(src) if line in s}
    assert lines, line
    for seed in (0, 1, 2):
        r = emu.run_selftest_under("tsan", mode, 0, seed)
        if seed in hidden:
            assert r.stdout.split() == ["wrong", "0"], (mode, seed, r.stdout, r.stderr[-2000:])
        assert r.returncode == 66 and "WARNING: ThreadSanitizer: data race" in r.stderr, (mode, seed, r.stderr[-2000:])
        assert f"{mode}_kernel" in r.stderr and any(f"emu_selftest.cpp:{n} " in r.stderr for n in lines), r.stderr[
            -3000:
        ]
        ok = emu.run_selftest_under("tsan", mode, 1, seed)
        assert ok.returncode == 0 and ok.stdout.split() == ["wrong", "0"], (mode, seed, ok.stderr[-2000:])
        assert "ThreadSanitizer" not in ok.stderr, ok.stderr[-3000:]


def test_kernels_have_no_data_race(tmp_path):
    """emu.SANITIZER_CASES, or with DK_EMU_TSAN_ALL=1 every emulator item of tests/ (hours: ~40x
    the plain emulator suites)."""
    everything = os.environ.get("DK_EMU_TSAN_ALL") == "1"
    here = Path(__file__).resolve().parent
    cases = (
        [str(here), "-k", "emu and not tsan and not asan"]
        if everything
        else [str(here / c) for c in emu.SANITIZER_CASES]
    )
    r = emu.run_under("tsan", cases, tmp_path, timeout=None if everything else 1800, shards=1 if everything else 3)
    print(r.stdout[-3000:])
    emu.check_run(r, tmp_path, "tsan", every_listed=not everything)
