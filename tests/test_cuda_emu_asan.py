"""The CUDA emulator with AddressSanitizer (tests/cuda_emu/emu_runtime.h, dkemu::asan): reads of a
fenced buffer's slack. Every buffer a kernel reaches through a pointer (a tensor emu.py copies in,
a workspace) lies between two inaccessible pages, as close to one of them as its alignment allows;
the few bytes between the buffer and that page (the slack), and the rest of the page on the other
side, hold a NaN pattern. A read there does not fault, and when its value never reaches a result
(a 16-byte load of a row's last group that runs past the row's end, its extra lanes then dropped)
no test can see it; on a GPU it is a read past the allocation. Built with -fsanitize=address, the
emulator poisons the slack, and AddressSanitizer reports every load or store there.

- test_asan_finds_reads_of_the_slack: the selftest kernel `read` reading one float past either end
  of its buffer is reported, naming the kernel and the line; in bounds, nothing is.
- test_kernels_read_no_slack: the emulator cases of emu.SANITIZER_CASES (every kernel family at its
  production block size) run in a subprocess with the AddressSanitizer runtime preloaded; any
  report fails the test and is printed.

Both skip where the compiler has no AddressSanitizer runtime, or where it cannot start."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import emu  # noqa: E402

ASAN = emu.runtime("asan") if emu.compiler() else None
pytestmark = pytest.mark.skipif(ASAN is None, reason="no host compiler with an AddressSanitizer runtime")


@pytest.mark.parametrize("index, at_end", [(1, 0), (-1, 1)])
def test_asan_finds_reads_of_the_slack(index, at_end):
    """`emu_selftest read <seed> <index> <at_end>`: thread t reads buffer[index + t] of a 64-float
    buffer. index 1 with the buffer against the page before it, or -1 with it against the page
    after, reads one float of the slack on the unfenced side: no fault, a NaN (the plain emulator
    prints "nan 1"); AddressSanitizer reports a use of poisoned memory in read_kernel at the load.
    In bounds (index 0), under both placements, nothing is reported."""
    src = (emu.HERE / "emu_selftest.cpp").read_text().splitlines()
    line = next(i + 1 for i, s in enumerate(src) if "static void read_kernel" in s)
    for seed in (0, 1):
        r = emu.run_selftest_under("asan", "read", seed, index, at_end)
        assert r.returncode == 66 and "AddressSanitizer: use-after-poison" in r.stderr, (seed, r.stderr[-3000:])
        assert " in read_kernel " in r.stderr and f"emu_selftest.cpp:{line}" in r.stderr, r.stderr[-3000:]
        ok = emu.run_selftest_under("asan", "read", seed, 0, at_end)
        assert ok.returncode == 0 and ok.stdout.split() == ["nan", "0"], (seed, ok.stderr[-3000:])
        assert "AddressSanitizer" not in ok.stderr, ok.stderr[-3000:]


def test_asan_finds_reads_of_a_red_zone():
    """`emu_selftest inner_read <seed> <index>`: 32 threads read A[index + t] of a workspace whose
    32-float region A is followed by a red zone (test_cuda_emu_runtime.py
    test_emulator_fences_the_regions_of_a_workspace): index 1 reads the zone's first float, which
    AddressSanitizer reports in read_kernel; index 0 reads A only, and nothing is reported."""
    for seed in (0, 1):
        r = emu.run_selftest_under("asan", "inner_read", seed, 1)
        assert r.returncode == 66 and "AddressSanitizer: use-after-poison" in r.stderr, (seed, r.stderr[-3000:])
        assert " in read_kernel " in r.stderr, r.stderr[-3000:]
        ok = emu.run_selftest_under("asan", "inner_read", seed, 0)
        assert ok.returncode == 0 and ok.stdout.split() == ["nan", "0"], (seed, ok.stderr[-3000:])
        assert "AddressSanitizer" not in ok.stderr, ok.stderr[-3000:]


def test_kernels_read_no_slack(tmp_path):
    """emu.SANITIZER_CASES under AddressSanitizer: no kernel touches a buffer's slack."""
    here = Path(__file__).resolve().parent
    r = emu.run_under("asan", [str(here / c) for c in emu.SANITIZER_CASES], tmp_path)
    print(r.stdout[-3000:])
    emu.check_run(r, tmp_path, "asan")
