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
  kernel family at its production block size, see TSAN_CASES) run in a subprocess with the
  ThreadSanitizer runtime preloaded; any report fails the test and is printed.

Both skip off x86-64, where the compiler has no ThreadSanitizer runtime, and where the runtime
cannot start (it names the reason: "FATAL: ThreadSanitizer: ...", e.g. an address-space layout it
does not support). ThreadSanitizer sees races between the threads of one block, and between the
blocks of a launch that run on different fiber sets (two sets alternate along the run order, so
half of the block pairs; the randomised block order of test_cuda_emu_runtime.py covers the rest
for value-changing races)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import emu  # noqa: E402

# The ThreadSanitizer build needs the emulator's x86-64 fiber switch (emu_runtime.h).
TSAN = emu.tsan_runtime() if emu.compiler() and platform.machine() == "x86_64" else None
pytestmark = pytest.mark.skipif(TSAN is None, reason="no x86-64 host compiler with a ThreadSanitizer runtime")


def _selftest_tsan(*argv):
    exe = emu.selftest_exe("emu_selftest_tsan", ["-O1", "-g", "-fsanitize=thread", "-DDK_EMU_TSAN=1"])
    env = dict(os.environ, TSAN_OPTIONS="exitcode=66")
    r = subprocess.run([str(exe), *map(str, argv)], capture_output=True, text=True, timeout=120, env=env)
    _skip_if_tsan_cannot_start(r)
    return r


def _skip_if_tsan_cannot_start(r):
    for line in r.stderr.splitlines():
        if line.startswith("FATAL: ThreadSanitizer"):
            pytest.skip(f"the ThreadSanitizer runtime cannot start here: {line}")


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
        r = _selftest_tsan(mode, 0, seed)
        if seed in hidden:
            assert r.stdout.split() == ["wrong", "0"], (mode, seed, r.stdout, r.stderr[-2000:])
        assert r.returncode == 66 and "WARNING: ThreadSanitizer: data race" in r.stderr, (mode, seed, r.stderr[-2000:])
        assert f"{mode}_kernel" in r.stderr and any(f"emu_selftest.cpp:{n} " in r.stderr for n in lines), r.stderr[
            -3000:
        ]
        ok = _selftest_tsan(mode, 1, seed)
        assert ok.returncode == 0 and ok.stdout.split() == ["wrong", "0"], (mode, seed, ok.stderr[-2000:])
        assert "ThreadSanitizer" not in ok.stderr, ok.stderr[-3000:]


# The emulator cases run under ThreadSanitizer: every kernel family of the four emulator libraries
# at its production block size (single-CTA and split-row paths, the whole-step pipeline with its
# truncations, the speculative chain / tree kernels with filters, both attention kernels), picked
# among the suites' cases for a small vocabulary (ThreadSanitizer runs them 20-100x slower).
TSAN_CASES = [
    "test_ops_sampling.py::test_emu_production_block_size",
    "test_ops_sampling.py::test_sample[cuda_emu-logits-ties-torch.float32-plain]",
    "test_ops_sampling.py::test_sample[cuda_emu-logits-randn-torch.float32-p0.5_minp0.2_joint]",
    "test_ops_sampling.py::test_sample[cuda_emu-probs-zipf-k20_minp0.1]",
    "test_ops_sampling.py::test_gumbel_sample[cuda_emu-ties-torch.float16]",
    "test_ops_sampling.py::test_filter[cuda_emu-mask-randn-torch.float32-k5000_chunked]",
    "test_ops_sampling.py::test_filter[cuda_emu-mask-bad-torch.bfloat16-p0.9]",
    "test_ops_sampling.py::test_emu_split_sample[logits-peaked-V12289-torch.bfloat16-T0.7]",
    "test_ops_sampling.py::test_emu_split_filtered[logits-ties-minp0.05]",
    "test_ops_sampling.py::test_emu_split_gumbel[randn-V9000-torch.bfloat16]",
    "test_ops_sampling.py::test_emu_split_filter[softmax-randn]",
    "test_ops_pipeline.py::test_cut_where_the_mass_reaches_p_exactly[ks0-setting0-2-cuda_emu]",
    "test_ops_pipeline.py::test_emu_start_list_is_exact[0]",
    "test_ops_pipeline.py::test_emu_seed_and_offsets_read_from_memory[1]",
    "test_ops_pipeline.py::test_apply_token_bitmask_inplace[dtype1-cuda_emu]",
    "test_ops_pipeline.py::test_each_truncation_each_order[vllm-epsilon-cuda_emu]",
    "test_ops_pipeline.py::test_each_truncation_each_order[joint-top_h-cuda_emu]",
    "test_ops_pipeline.py::test_emu_split_rows_at_production_sizes[1]",
    "test_ops_speculative.py::test_tree[cuda_emu-greedy-ids]",
    "test_ops_speculative.py::test_tree[cuda_emu-probs-draft]",
    "test_ops_speculative.py::test_chain[cuda_emu-probs-draft-ragged]",
    "test_ops_speculative.py::test_chain[cuda_emu-logits-temp-draft]",
    "test_ops_speculative.py::test_chain_filters[cuda_emu-minp]",
    "test_ops_speculative.py::test_tree_filters[cuda_emu-minp]",
    "test_ops_speculative.py::test_emu_early_exit_work",
    "test_ops_speculative.py::test_emu_bad_logits_rows_and_real_block_size",
    "test_ops_speculative.py::test_build_tree[cuda_emu]",
    "test_ops_attention.py::test_tree_attention[1-0-64-(32, 8)-NHD-bf16-1-cuda_emu]",
    "test_ops_attention.py::test_tree_attention[1-1-256-(32, 32)-HND-bf16-3-cuda_emu]",
    "test_ops_attention.py::test_empty_rows_and_split_edges[cuda_emu]",
    "test_ops_attention.py::test_emu_auto_picks_the_cuda_core_kernel_for_unaligned_rows",
    "test_cuda_emu_runtime.py::test_emulated_mma_matches_matrix_product[f16]",
    "test_cuda_emu_runtime.py::test_digit_scans[1]",
    "test_cuda_sync.py::test_emulated_kernels_read_seed_and_offsets_in_memory",
    "test_cuda_sync.py::test_emulated_tree_kernel_skips_rows",
]


def test_kernels_have_no_data_race(tmp_path):
    """TSAN_CASES, or with DK_EMU_TSAN_ALL=1 every emulator item of tests/ (hours: ~40x the plain
    emulator suites)."""
    everything = os.environ.get("DK_EMU_TSAN_ALL") == "1"
    env = dict(
        os.environ,
        DK_EMU_TSAN="1",
        DK_EMU_LAUNCH_TIMEOUT="0",  # ThreadSanitizer is slow; the watchdog's limit is for hangs
        OMP_NUM_THREADS="1",  # torch's own worker threads synchronise in ways ThreadSanitizer does not see
        LD_PRELOAD=TSAN,
        TSAN_OPTIONS=f"exitcode=66 log_path={tmp_path / 'tsan'}",
    )
    here = Path(__file__).resolve().parent
    cases = [str(here), "-k", "emu and not tsan"] if everything else [str(here / c) for c in TSAN_CASES]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "--durations=5", *cases]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=None if everything else 1800)
    _skip_if_tsan_cannot_start(r)
    print(r.stdout[-3000:])
    reports = sorted(tmp_path.glob("tsan*"))
    text = "\n".join(p.read_text() for p in reports)
    assert not reports, f"ThreadSanitizer reported:\n{text[:20000]}"
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    assert " passed" in r.stdout, r.stdout[-3000:]
    if not everything:  # every listed case ran
        assert " skipped" not in r.stdout and "deselected" not in r.stdout, r.stdout[-3000:]
