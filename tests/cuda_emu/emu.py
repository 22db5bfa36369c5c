"""Runs csrc/cuda/sampling.cuh's kernels on CPU threads (emu_runtime.h) with the same calling
convention as torch.ops.decodekit.{sample,gumbel_sample,filter}, so tests can compare the CUDA
kernels' logic with the CPU engine on a machine without a GPU.

The shared library is built with the host C++ compiler on first use and cached next to the
build tree, keyed by a hash of the sources and the block size (default: the production block
size, sampling.cuh's kThreads). set_schedule_seed() picks the emulator's thread order.
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCES = [
    HERE / "emu_runtime.h",
    HERE / "emu_sample_ws.h",
    HERE / "emu_sampling.cpp",
    ROOT / "csrc/cuda/sampling.cuh",
    *sorted((ROOT / "csrc/cuda").glob("*.h")),
    *sorted((ROOT / "csrc/include/decodekit").glob("*.h")),
]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_libs = {}
_failed = {}
_schedule = [None]  # the emulator's schedule seed (None: $DK_EMU_SEED, else 1)


def compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def unique_flags():
    """GCC emits the function-local statics of inline functions (the emulated __shared__ arrays,
    sized by the block size) as STB_GNU_UNIQUE symbols, which the dynamic loader binds ONCE per
    process even across RTLD_LOCAL libraries: a library built for 512 threads loaded after one
    built for 64 would use the 64-thread arrays and overrun them. -fno-gnu-unique keeps each
    library's statics its own."""
    try:
        out = subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return []
    return [] if "clang" in out.lower() else ["-fno-gnu-unique"]


def sanitize_flags():
    """UBSan's index checks in the emulator libraries, in trap mode (no runtime library): an index
    outside an array of known size (the emulated __shared__ arrays are statics of known size) or
    past an object whose size the compiler sees after inlining executes a trap, which the emulator
    turns into a failure of the launch naming the function (EmulatorError), instead of reading a
    neighbour. Global-memory pointers are checked by the guard pages instead (Fence, emu_runtime.h
    Guarded). DK_EMU_SANITIZE=0 turns it off."""
    if os.environ.get("DK_EMU_SANITIZE", "1") == "0":
        return []
    return ["-fsanitize=bounds,object-size", "-fsanitize-undefined-trap-on-error"]


def redzone_flags():
    """The red zone the emulator libraries leave after every region of a CUDA workspace layout
    (decodekit/common.h DK_WS_REDZONE; the drivers fence it: emu_runtime.h Guarded::fence_gaps), so
    a kernel that runs from one region into the next fails a test: a write there fails the
    buffer's check, a read gives the NaN pattern (and AddressSanitizer reports it). $DK_EMU_WS_REDZONE
    bytes, default 256 (a multiple of 16); 0: the GPU's layout, regions back to back."""
    n = int(os.environ.get("DK_EMU_WS_REDZONE", "256"))
    if n < 0 or n % 16:
        raise ValueError(f"DK_EMU_WS_REDZONE={n}: a multiple of 16 bytes, >= 0")
    return [f"-DDK_WS_REDZONE={n}"]


def tsan_flags():
    """DK_EMU_TSAN=1: the emulator libraries built with ThreadSanitizer (emu_runtime.h namespace
    dkemu::tsan: every emulated thread a fiber, ordered only by what a GPU orders), which checks
    every load and store of the kernels for a data race between the threads of a block. Such a
    library loads only into a process started with the ThreadSanitizer runtime preloaded
    (runtime("tsan"); tests/test_cuda_emu_tsan.py runs the suites that way)."""
    if os.environ.get("DK_EMU_TSAN", "0") != "1":
        return []
    return ["-fsanitize=thread", "-DDK_EMU_TSAN=1", "-g"]


def coverage_flags():
    """DK_EMU_GCOV=1: the emulator libraries built with gcov's line counters (tests/cuda_emu/
    coverage.py: which kernel lines a selection of cases reaches)."""
    if os.environ.get("DK_EMU_GCOV", "0") != "1":
        return []
    return ["--coverage"]


def asan_flags():
    """DK_EMU_ASAN=1: the emulator libraries built with AddressSanitizer, which poisons the slack
    around every fenced buffer (emu_runtime.h Guarded, dkemu::asan), so a kernel's read there is
    reported even when its value never reaches a result. Loads only into a process started with
    the AddressSanitizer runtime preloaded (runtime("asan"); tests/test_cuda_emu_asan.py)."""
    if os.environ.get("DK_EMU_ASAN", "0") != "1":
        return []
    return ["-fsanitize=address", "-fsanitize-recover=address", "-fno-omit-frame-pointer", "-DDK_EMU_ASAN=1", "-g"]


# The emulator cases the sanitizer builds run (tests/test_cuda_emu_tsan.py, test_cuda_emu_asan.py;
# ids relative to tests/): every kernel family of the four emulator libraries at its production
# block size (single-CTA and split-row paths, the whole-step pipeline with its truncations, the
# speculative chain / tree kernels with filters, both attention kernels), picked among the suites'
# cases for a small vocabulary (ThreadSanitizer runs them 20-200x slower). tests/cuda_emu/
# coverage.py measures what they reach: 98% of the kernel lines the whole emulator suite executes
# (2532 of 2571, twentieth session). Six cases came then for lines the first 37 never reached:
# the split top-k / top-p phases, the renormalising filters (split and one-CTA), greedy sampling,
# the whole-step kernel's rank / logprob phases, the greedy tree from logits, the prepared nodes.
# Ten more in the twenty-first session (53 cases, 2630 of 2633 lines): the fp16 attention and
# whole-step stores, the whole-step invalid-value row, the one-CTA softmax and its bad row, the
# fp16 filter plan, the split list draw and masked write, the tree's coin thresholds, a new test
# written for them, test_emu_rare_list_steps_in_one_launch (eta's cut, typical's
# min_tokens_to_keep cut, top-h's tie group: the items that reached those cost 478 s
# (test_top_h_ties_at_the_100th_candidate) and 101 s (test_each_truncation_each_order[sequential-
# k_typ_eta_h_mtk]) under ThreadSanitizer), and test_emu_split_draw_in_one_call (the whole-step
# split draw's sums phase). The twenty-second session's test_emu_early_top_p_in_one_call (54 cases,
# 2737 of 2740 lines): the whole-step kernel's early top-p / min-p passes. The twenty-fifth session
# measured each case's lines alone (gcov, one pytest run per case) and its time under
# ThreadSanitizer: seven items took 55-84 s each (over half the run) for 0-33 lines no other case
# reached. Two small tests now reach those lines (test_emu_kernel_paths_in_two_calls: the fp16
# store, the joint order's AND, list top-p / min-p, the invalid and bad rows in both modes, top-n
# padding, the split draw over zero weights; test_emu_prepared_nodes_in_two_calls: the speculative
# prepare launch), and the seven left the list (they still run in the plain emulator suites):
# 51 cases reach all 2806 lines the 55 reached (2808 of the 2811 lines the whole suite executes).
SANITIZER_CASES = [
    "test_ops_sampling.py::test_emu_production_block_size",
    "test_ops_sampling.py::test_sample[cuda_emu-logits-ties-torch.float32-plain]",
    "test_ops_sampling.py::test_sample[cuda_emu-logits-randn-torch.float32-p0.5_minp0.2_joint]",
    "test_ops_sampling.py::test_sample[cuda_emu-probs-zipf-k20_minp0.1]",
    "test_ops_sampling.py::test_sample[cuda_emu-V1]",  # rows shorter than a 16-byte group:
    "test_ops_sampling.py::test_sample[cuda_emu-V2-probs-minp]",  # a vector load past the end hits the slack
    "test_ops_sampling.py::test_gumbel_sample[cuda_emu-ties-torch.float16]",
    "test_ops_sampling.py::test_filter[cuda_emu-mask-randn-torch.float32-k5000_chunked]",
    "test_ops_sampling.py::test_filter[cuda_emu-mask-bad-torch.bfloat16-p0.9]",
    "test_ops_sampling.py::test_emu_split_sample[logits-peaked-V12289-torch.bfloat16-T0.7]",
    "test_ops_sampling.py::test_emu_split_filtered[logits-ties-minp0.05]",
    "test_ops_sampling.py::test_emu_split_gumbel[randn-V9000-torch.bfloat16]",
    "test_ops_sampling.py::test_emu_split_filter[softmax-randn]",
    "test_ops_sampling.py::test_emu_split_filter[renorm-zipf-k100_p0.8_seq]",
    "test_ops_sampling.py::test_filter[cuda_emu-renorm-randn-k100_p0.8_joint]",
    "test_ops_sampling.py::test_sample[cuda_emu-logits-randn-torch.float32-greedy]",
    "test_ops_sampling.py::test_filter[cuda_emu-softmax-bad-T0.6]",
    "test_ops_sampling.py::test_filter[cuda_emu-mask-randn-torch.float16-k50]",
    "test_ops_sampling.py::test_emu_split_filtered[logits-randn-k50]",
    "test_ops_sampling.py::test_emu_split_filter[mask-randn-k50]",
    "test_ops_pipeline.py::test_cut_where_the_mass_reaches_p_exactly[ks0-setting0-2-cuda_emu]",
    "test_ops_pipeline.py::test_emu_start_list_is_exact[0]",
    "test_ops_pipeline.py::test_emu_seed_and_offsets_read_from_memory[1]",
    "test_ops_pipeline.py::test_apply_token_bitmask_inplace[dtype1-cuda_emu]",
    "test_ops_pipeline.py::test_emu_rare_list_steps_in_one_launch",
    "test_ops_pipeline.py::test_emu_early_eta_in_one_call",
    "test_ops_pipeline.py::test_emu_split_draw_in_one_call",
    "test_ops_pipeline.py::test_emu_early_top_p_in_one_call",
    "test_ops_pipeline.py::test_emu_kernel_paths_in_two_calls[0]",
    "test_ops_pipeline.py::test_emu_kernel_paths_in_two_calls[64]",
    "test_ops_speculative.py::test_tree[cuda_emu-greedy-ids]",
    "test_ops_speculative.py::test_tree[cuda_emu-probs-draft]",
    "test_ops_speculative.py::test_chain[cuda_emu-probs-draft-ragged]",
    "test_ops_speculative.py::test_chain[cuda_emu-logits-temp-draft]",
    "test_ops_speculative.py::test_chain_filters[cuda_emu-minp]",
    "test_ops_speculative.py::test_tree_filters[cuda_emu-minp]",
    "test_ops_speculative.py::test_tree[cuda_emu-greedy-logits]",
    "test_ops_speculative.py::test_emu_prepared_nodes_in_two_calls",
    "test_ops_speculative.py::test_tree[cuda_emu-logits-temp-coins-thresholds]",
    "test_ops_speculative.py::test_emu_early_exit_work",
    "test_ops_speculative.py::test_emu_bad_logits_rows_and_real_block_size",
    "test_ops_speculative.py::test_build_tree[cuda_emu]",
    "test_ops_attention.py::test_tree_attention[1-0-64-(32, 8)-NHD-bf16-1-cuda_emu]",
    "test_ops_attention.py::test_tree_attention[1-1-256-(32, 32)-HND-bf16-3-cuda_emu]",
    "test_ops_attention.py::test_tree_attention[7-1-128-(32, 32)-HND-f16-1-cuda_emu]",
    "test_ops_attention.py::test_empty_rows_and_split_edges[cuda_emu]",
    "test_ops_attention.py::test_emu_auto_picks_the_cuda_core_kernel_for_unaligned_rows",
    "test_cuda_emu_runtime.py::test_emulated_mma_matches_matrix_product[f16]",
    "test_cuda_emu_runtime.py::test_digit_scans[1]",
    "test_cuda_sync.py::test_emulated_kernels_read_seed_and_offsets_in_memory",
    "test_cuda_sync.py::test_emulated_tree_kernel_skips_rows",
]


# The runtime options of each sanitizer's runs (exit code 66 when it reported; ASan: report every
# finding, no leak check: the Python process leaks by design; no fake stacks: fiber stacks).
SANITIZER_OPTIONS = {
    "tsan": "exitcode=66",
    "asan": "exitcode=66:halt_on_error=0:detect_leaks=0:detect_stack_use_after_return=0",
}


def run_selftest_under(name, *argv):
    """tests/cuda_emu/emu_selftest.cpp built with sanitizer `name` ("tsan", "asan") and run with
    argv under its options; the CompletedProcess (the calling test skips where the runtime cannot
    start: skip_if_cannot_start)."""
    flag = {"tsan": "thread", "asan": "address"}[name]
    exe = selftest_exe(f"emu_selftest_{name}", ["-O1", "-g", f"-fsanitize={flag}", f"-DDK_EMU_{name.upper()}=1"])
    env = dict(os.environ, **{f"{name.upper()}_OPTIONS": SANITIZER_OPTIONS[name]})
    r = subprocess.run([str(exe), *map(str, argv)], capture_output=True, text=True, timeout=120, env=env)
    skip_if_cannot_start(r)
    return r


def run_under(name, cases, log_dir, timeout=1800, shards=3):
    """Runs the pytest items `cases` in subprocesses with the emulator libraries built with
    sanitizer `name` ("tsan": DK_EMU_TSAN=1, "asan": DK_EMU_ASAN=1) and its runtime preloaded, each
    report written under log_dir (log_path); a CompletedProcess of them all (the worst exit code,
    the outputs one after another; the calling test skips where the runtime cannot start:
    skip_if_cannot_start). Each process uses one OpenMP thread (torch's workers synchronise
    in ways ThreadSanitizer does not see) and no launch watchdog (a sanitizer build is slow; the
    watchdog's limit is for hangs). The items are dealt round-robin to `shards` processes that run
    at once (a sanitized run is single-threaded; with 3, SANITIZER_CASES' five slowest items, 40-70 s
    each under ThreadSanitizer, are spread over the three); shards=1 for arguments that are not a
    list of items."""
    opts = SANITIZER_OPTIONS[name]
    env = dict(
        os.environ,
        **{f"DK_EMU_{name.upper()}": "1"},
        DK_EMU_LAUNCH_TIMEOUT="0",
        OMP_NUM_THREADS="1",
        # (the C++ runtime too for ASan: its __cxa_throw interceptor needs it loaded first, or
        # the first C++ exception, a CPU op's ValueError, fails a CHECK)
        LD_PRELOAD=" ".join(
            p for p in [runtime(name), compiler_lib("libstdc++.so.6") if name == "asan" else None] if p
        ),
        **{f"{name.upper()}_OPTIONS": f"{opts}:log_path={Path(log_dir) / name}"},
    )
    # the four libraries at their production block size, two at a time (the run would build them
    # one after another); a failure here is left for the run to report
    pre = [
        subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); {code}"], env=env)
        for code in (
            "import emu, emu_pipe; emu.load(); emu_pipe.load()",
            "import emu_spec, emu_attn; emu_spec.load(); emu_attn.load()",
        )
    ]
    for p in pre:
        p.wait()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "--durations=5"]
    # (outputs to files, not pipes: a process whose pipe fills would wait for the ones read before it)
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(min(shards, len(cases)))]
    procs = [
        subprocess.Popen([*cmd, *cases[j::shards]], env=env, stdout=o, stderr=e, text=True)
        for j, (o, e) in enumerate(files)
    ]
    deadline = None if timeout is None else time.monotonic() + timeout  # for the whole run
    try:
        for p in procs:
            p.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            p.kill()
    out, err = "", ""
    for o, e in files:
        o.seek(0), e.seek(0)
        out, err = out + o.read(), err + e.read()
        o.close(), e.close()
    rc = next((p.returncode for p in procs if p.returncode), 0)
    r = subprocess.CompletedProcess(cmd, rc, out, err)
    skip_if_cannot_start(r)
    return r


def skip_if_cannot_start(r):
    """Skips the calling test where a sanitizer runtime said in run `r` that it cannot run in this
    process (an address-space layout it does not support), naming its line."""
    for line in r.stderr.splitlines():
        if line.startswith("FATAL: ThreadSanitizer") or "ASan cannot proceed" in line:
            import pytest

            pytest.skip(f"the sanitizer runtime cannot start here: {line}")


def check_run(r, log_dir, name, every_listed=True):
    """Fails on any report a run_under(name) wrote, then on a failed or empty run; every_listed:
    no listed case was skipped or deselected."""
    reports = sorted(Path(log_dir).glob(f"{name}*"))
    text = "\n".join(p.read_text() for p in reports)
    assert not reports, f"{name} reported:\n{text[:20000]}"
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    assert " passed" in r.stdout, r.stdout[-3000:]
    if every_listed:
        assert " skipped" not in r.stdout and "deselected" not in r.stdout, r.stdout[-3000:]


def selftest_exe(name, flags):
    """tests/cuda_emu/emu_selftest.cpp built into build/cuda_emu/<name> with `flags` (rebuilt when
    it or emu_runtime.h is newer); its path."""
    exe = ROOT / "build" / "cuda_emu" / name
    src = [HERE / "emu_selftest.cpp", HERE / "emu_runtime.h"]
    if not exe.exists() or exe.stat().st_mtime < max(p.stat().st_mtime for p in src):
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_name(f"{exe.name}.tmp{os.getpid()}")
        subprocess.run([compiler(), "-std=c++20", *flags, f"-I{HERE}", str(src[0]), "-o", str(tmp)], check=True)
        os.replace(tmp, exe)
    return exe


def runtime(name):
    """The compiler's sanitizer runtime library lib<name>.so (to preload; name: "tsan", "asan"),
    or None."""
    return compiler_lib(f"lib{name}.so")


def compiler_lib(filename):
    """The path of a library of the compiler's (-print-file-name), or None."""
    try:
        out = subprocess.run([compiler(), f"-print-file-name={filename}"], capture_output=True, text=True)
    except (OSError, TypeError):
        return None
    path = Path(out.stdout.strip())
    return str(path.resolve()) if path.is_absolute() and path.exists() else None


class EmulatorError(RuntimeError):
    """A failure the emulator caught in a kernel during a library call: a bad warp op, a deadlock,
    the launch watchdog, an index trap, a read or write outside a fenced buffer (a tensor or a
    workspace: emu_runtime.h Guarded)."""


_fence_turn = [0]


def _row_layout(t):
    """(rows, row stride in bytes, row width in bytes) of a tensor whose rows (its last dimension,
    stride 1) lie at one stride with a gap after each (every leading dimension steps whole rows, as
    in a view t[..., :V] of a wider tensor); None for any other layout (contiguous included)."""
    if t.dim() < 2 or t.numel() == 0 or t.stride(-1) != 1:
        return None
    rs, width = t.stride(-2), t.size(-1)
    if rs <= width or t.numel() // width < 2:
        return None
    for d in range(t.dim() - 2):  # leading dimensions: whole rows at the same stride
        if t.size(d) > 1 and t.stride(d) != t.size(d + 1) * t.stride(d + 1):
            return None
    es = t.element_size()
    return t.numel() // width, rs * es, width * es


def gapped(t, gap=None):
    """t (rows along its last dimension) as a view of a wider tensor: each row followed by `gap`
    bytes (DK_EMU_ROW_GAP, default 64; 0: t unchanged), a multiple of 16 so that every row keeps the
    16-byte alignment it has in t's contiguous layout. The emulator wrappers pass their row inputs
    (and the filter's output rows) this way, with the row stride, as the kernels take it; Fence.ptr
    makes the gaps red zones, so a kernel that strays from row r into row r + 1 reads poison (NaN
    in every float type; AddressSanitizer reports the read) instead of row r + 1's values."""
    gap = int(os.environ.get("DK_EMU_ROW_GAP", "64")) if gap is None else gap
    if gap <= 0 or t.dim() < 2 or t.numel() == 0 or t.numel() // t.size(-1) < 2:  # (one row: no gap)
        return t
    assert gap % 16 == 0 and gap % t.element_size() == 0, gap
    V = t.size(-1)
    wide = torch.empty(*t.shape[:-1], V + gap // t.element_size(), dtype=t.dtype)
    view = wide[..., :V]
    view.copy_(t)
    return view


class Fence:
    """Fenced copies of the tensors one library call (or a few calls in a row) reads and writes, so
    that the emulator catches a kernel's stray read or write through a global-memory pointer, as it
    catches one in a workspace. ptr(t) copies the bytes t spans into a buffer of the library's
    fenced memory (emu_runtime.h dk_emu_fence_alloc: exactly that size, between two inaccessible
    pages) and returns its address. A kernel that reaches a guard page fails the launch with
    EmulatorError naming the buffer and the byte; the slack between the buffer and the pages reads
    as NaN / a negative int, and a write there fails at close(). Consecutive fences take turns:
      0: against the page after the buffer, the start only element-aligned, so the buffer ends
         exactly at the page (a 16-byte-aligned tensor may then arrive unaligned, and the kernels
         take their element-load paths, as for an offset view on a GPU);
      1: against the page after it, keeping t's own start alignment up to 16 bytes (the kernels
         take the same load paths as with t; the slack after the end is under 16 bytes);
      2: against the page before it, its start page-aligned.
    A tensor whose rows lie at a stride with a gap after each (gapped(), _row_layout) gets its gaps
    fenced too: red zones inside the buffer (dk_emu_fence_row_gaps). close() copies back every
    buffer the call changed (the outputs; a gapped tensor's rows only) and frees them. Use as a
    context manager. DK_EMU_FENCE=0 passes the tensors' own memory."""

    def __init__(self, cdll, take):
        self._cdll, self._take, self._bufs = cdll, take, []
        self.turn = _fence_turn[0] % 3
        _fence_turn[0] += 1

    def ptr(self, t, name="a tensor"):
        if t is None:
            return None
        ref = t.data_ptr()
        if os.environ.get("DK_EMU_FENCE", "1") == "0":  # off: the tensor's own memory
            self._bufs.append((t, None, 0, None))
            return ref
        n = 0 if t.numel() == 0 else (1 + sum((d - 1) * st for d, st in zip(t.shape, t.stride()))) * t.element_size()
        align = t.element_size() if self.turn == 0 or ref == 0 else min(16, ref & -ref)
        label = f"{name} ({str(t.dtype).replace('torch.', '')} {list(t.shape)})".encode()
        p = self._cdll.dk_emu_fence_alloc(n, align, int(self.turn < 2), label)
        ctypes.memmove(p, ref, n)
        rows = _row_layout(t)
        if rows:  # the gaps between its rows: red zones (the bytes there are not t's)
            self._cdll.dk_emu_fence_row_gaps(p, *rows)
        self._bufs.append((t, p, n, rows))  # t stays alive until close() (a temporary's memory is not reused)
        return p

    def close(self):
        bufs, self._bufs = self._bufs, []
        for t, p, n, rows in bufs:
            if p is None:
                continue
            if n and rows:  # t's rows only (the gaps are poisoned, and t's owner's bytes there are not t's)
                R, stride, width = rows
                src, dst = (
                    torch.frombuffer((ctypes.c_ubyte * n).from_address(a), dtype=torch.uint8).as_strided(
                        (R, width), (stride, 1)
                    )
                    for a in (p, t.data_ptr())
                )
                if not torch.equal(src, dst):
                    dst.copy_(src)
            elif n and ctypes.string_at(p, n) != ctypes.string_at(t.data_ptr(), n):
                ctypes.memmove(t.data_ptr(), p, n)
            self._cdll.dk_emu_fence_free(p)
        err = self._take()
        if err:
            raise EmulatorError(err.decode(errors="replace"))

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        else:  # the call failed: free the buffers, keep its exception
            try:
                self.close()
            except EmulatorError:
                pass


class _Checked:
    """One library function; after each call, the failure the emulator recorded during it (if any)
    is raised as EmulatorError. Tensor arguments are passed as fenced copies (Fence), copied back
    after the call. Attributes (argtypes, restype) go to the ctypes function."""

    __slots__ = ("_fn", "_take", "_lib")

    def __init__(self, fn, take, lib):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_take", take)
        object.__setattr__(self, "_lib", lib)

    def __setattr__(self, name, value):
        setattr(self._fn, name, value)

    def __getattr__(self, name):
        return getattr(self._fn, name)

    def __call__(self, *args):
        if not any(isinstance(a, torch.Tensor) for a in args):
            r = self._fn(*args)
        else:
            with self._lib.fence() as F:
                name = self._fn.__name__
                r = self._fn(*(F.ptr(a, f"{name} argument {i}") if isinstance(a, torch.Tensor) else a
                               for i, a in enumerate(args)))  # fmt: skip
        err = self._take()
        if err:
            raise EmulatorError(err.decode(errors="replace"))
        return r


class CheckedLibrary:
    """An emulator library whose every call is checked (_Checked): a kernel bug the emulator finds
    fails the calling test with the emulator's message, and the rest of the suite runs."""

    def __init__(self, cdll):
        take = cdll.dk_emu_take_error
        take.argtypes, take.restype = [], ctypes.c_char_p
        cdll.dk_emu_fence_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p]
        cdll.dk_emu_fence_alloc.restype = ctypes.c_void_p
        cdll.dk_emu_fence_free.argtypes, cdll.dk_emu_fence_free.restype = [ctypes.c_void_p], None
        cdll.dk_emu_fence_row_gaps.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_size_t]
        cdll.dk_emu_fence_row_gaps.restype = None
        object.__setattr__(self, "_cdll", cdll)
        object.__setattr__(self, "_take", take)
        object.__setattr__(self, "_fns", {})

    def fence(self):
        """A Fence on this library's fenced memory, for pointers the wrapper passes inside arrays
        or that must outlive one call (tensor arguments of a call are fenced by the call itself)."""
        return Fence(self._cdll, self._take)

    def __getattr__(self, name):
        fns = self._fns
        if name not in fns:
            fns[name] = _Checked(getattr(self._cdll, name), self._take, self)
        return fns[name]


def build_shared(stem, cpp, sources, define=None, threads=None):
    """Builds tests/cuda_emu/<cpp> into build/cuda_emu/<stem>_<threads>_<hash>.so (cached by a
    hash of `sources` and the block size). threads=None: the header's production block size."""
    flags = [
        "-std=c++20",
        "-O2",
        "-ffp-contract=off",
        "-fno-math-errno",
        "-fPIC",
        "-shared",
        *unique_flags(),
        *sanitize_flags(),
        *redzone_flags(),
        *tsan_flags(),
        *asan_flags(),
        *coverage_flags(),
    ]
    h = hashlib.sha256(f"{threads} {' '.join(flags)}".encode())
    for s in sources:
        h.update(s.read_bytes())
    out_dir = ROOT / "build" / "cuda_emu"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"{stem}_{threads or 'prod'}_{h.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".tmp{os.getpid()}.so")
        cmd = [compiler(), *flags]
        if threads is not None:
            cmd.append(f"-D{define}={threads}")
        cmd += [f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc'}", f"-I{HERE}", str(HERE / cpp), "-o", str(tmp)]
        subprocess.run(cmd, check=True)
        os.replace(tmp, lib)
    L = CheckedLibrary(ctypes.CDLL(str(lib)))
    register_shared(L, lib)
    L.dk_emu_set_schedule_seed.argtypes, L.dk_emu_set_schedule_seed.restype = [ctypes.c_int64], None
    if _schedule[0] is not None:
        L.dk_emu_set_schedule_seed(_schedule[0])
    _loaded.append(L)
    return L


_loaded = []

# A function-local static of a function outside the emulator runtime: an emulated __shared__
# variable (emu_runtime.h defines __shared__ as static); the runtime's own statics are in dkemu::.
_SHARED = re.compile(r"^(?!dkemu::|dk_emu_|typeinfo |guard variable |vtable ).*\)::[A-Za-z_]\w*$")


def shared_statics(path):
    """{demangled name: (link-time address, size)} of the emulated __shared__ variables of the
    library at `path` (nm's symbol table), and the link-time address of dk_emu_take_error."""
    out = subprocess.run(["nm", "-C", "--defined-only", "-S", str(path)], capture_output=True, text=True, check=True)
    found, anchor = {}, None
    for line in out.stdout.splitlines():
        parts = line.split(" ", 3)  # address, size, type, name (symbols without a size have 3 fields)
        if len(parts) == 4 and parts[3] == "dk_emu_take_error":
            anchor = int(parts[0], 16)
        elif len(parts) == 4 and parts[2] in "bBdDvVu" and _SHARED.match(parts[3]):
            found[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    return found, anchor


def register_shared(L, path):
    """Tells library L where its emulated __shared__ variables are (emu_runtime.h poison_shared:
    filled with the poison pattern before each block). DK_EMU_POISON=0: none registered."""
    if os.environ.get("DK_EMU_POISON", "1") == "0" or shutil.which("nm") is None:
        return
    found, anchor = shared_statics(path)
    base = ctypes.cast(L._cdll.dk_emu_take_error, ctypes.c_void_p).value - anchor
    pairs = [v for addr, size in found.values() for v in (base + addr, size)]
    L._cdll.dk_emu_set_shared.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    L._cdll.dk_emu_set_shared((ctypes.c_uint64 * max(1, len(pairs)))(*pairs), len(found))


def set_schedule_seed(seed):
    """Thread order of later launches in every emulator library loaded through build_shared: a
    random permutation per scheduling round from `seed` (0: the fixed order 0, 1, 2, ...);
    None: $DK_EMU_SEED, else 1."""
    _schedule[0] = seed
    for L in _loaded:
        L.dk_emu_set_schedule_seed(-1 if seed is None else seed)


def load(threads=None):
    """The sampling kernels' emulator library; threads=None: sampling.cuh's kThreads."""
    if threads in _failed:  # build once per session, fail fast afterwards
        raise RuntimeError(f"the CUDA emulator failed to build: {_failed[threads]}")
    if threads not in _libs:
        try:
            lib = build_shared("emu_sampling", "emu_sampling.cpp", SOURCES, "DK_CUDA_THREADS", threads)
        except Exception as e:
            _failed[threads] = e
            raise
        P, I, L, F, U = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_uint64
        lib.dk_emu_sample.argtypes = [P, I, L, L, L, I, I, P, F, P, L, P, F, P, F, P, L, P, U, U, P, P, P, I, I]
        lib.dk_emu_sample.restype = ctypes.c_int
        lib.dk_emu_filter.argtypes = [P, I, L, L, L, I, I, P, F, P, L, P, F, P, F, I, P, L, I]
        lib.dk_emu_filter.restype = ctypes.c_int
        lib.dk_emu_threads.restype = ctypes.c_int
        lib.dk_emu_plan_splits.argtypes = [L, L, I, L, F, I]
        lib.dk_emu_plan_splits.restype = ctypes.c_int
        _libs[threads] = lib
    return _libs[threads]


def _row(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


def _matrix(x):
    assert x.dim() == 2 and (x.size(0) == 0 or x.size(1) == 1 or x.stride(1) == 1)
    return _DTYPES[x.dtype], x.size(0), x.size(1), (x.stride(0) if x.size(0) > 1 else x.size(1))


def _filter_args(T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val):
    """The filter arguments as the library takes them (tensors: fenced by the call)."""
    T, k, p, mp = (
        _row(T_arr, torch.float32),
        _row(k_arr, torch.int64),
        _row(p_arr, torch.float32),
        _row(mp_arr, torch.float32),
    )
    return [T, T_val, k, k_val, p, p_val, mp, mp_val]


def sample(
    x,
    indices,
    is_probs,
    T_arr,
    T_val,
    k_arr,
    k_val,
    p_arr,
    p_val,
    mp_arr,
    mp_val,
    order,
    seed_arr,
    seed_val,
    offset,
    *,
    threads=None,
    gumbel=False,
    n_sms=0,
):
    """n_sms > 0: the launch plans split rows for a device with that many SMs (sampling.cuh
    split_plan); last_splits[0] then tells how many CTAs per row ran."""
    lib = load(threads)
    x = gapped(x)  # rows with red zones between them
    dt, rows, V, stride = _matrix(x)
    idx = _row(indices, torch.int64)
    n = rows if idx is None else idx.numel()
    seeds = _row(seed_arr, torch.int64)
    fargs = _filter_args(T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val)
    tok = torch.empty(n, dtype=torch.int64)
    valid = torch.empty(n, dtype=torch.bool)
    lp = torch.empty(n, dtype=torch.float32)
    last_splits[0] = 1
    if n:
        last_splits[0] = lib.dk_emu_sample(
            x,
            dt,
            rows,
            V,
            stride,
            int(is_probs),
            order,
            *fargs,
            idx,
            n,
            seeds,
            seed_val & (2**64 - 1),
            offset,
            tok,
            valid,
            lp,
            int(gumbel),
            n_sms,
        )
    return tok, valid, lp


last_splits = [1]  # CTAs per row of the last sample() / gumbel_sample() call


def plan_splits(n_out, V, n_sms, k=0, p=1.0, gumbel=False, threads=None):
    """sampling.cuh split_plan's CTAs per row for these sizes and scalar filters (no launch)."""
    return load(threads).dk_emu_plan_splits(n_out, V, n_sms, k, p, int(gumbel))


def gumbel_sample(logits, indices, seed_arr, seed_val, offset, *, threads=None, n_sms=0):
    tok, valid, _ = sample(
        logits,
        indices,
        False,
        None,
        1.0,
        None,
        0,
        None,
        1.0,
        None,
        0.0,
        0,
        seed_arr,
        seed_val,
        offset,
        threads=threads,
        gumbel=True,
        n_sms=n_sms,
    )
    return tok, valid


def filter(
    x, kind, is_probs, T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order, *, threads=None, n_sms=0
):
    """n_sms > 0: the plan of a device with that many SMs (sampling.cuh filter_plan); last_splits[0]
    then tells how many CTAs per row ran."""
    lib = load(threads)
    x = gapped(x)  # rows with red zones between them
    dt, rows, V, stride = _matrix(x)
    fargs = _filter_args(T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val)
    out = gapped(torch.empty(x.shape, dtype=x.dtype if kind == 0 else torch.float32))
    last_splits[0] = 1
    if rows:
        last_splits[0] = lib.dk_emu_filter(
            x, dt, rows, V, stride, int(is_probs), order, *fargs, kind, out, _matrix(out)[3], n_sms
        )
    return out.contiguous()
