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
import shutil
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCES = [
    HERE / "emu_runtime.h",
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
    neighbour. Global-memory pointers (tensors) are not checked. DK_EMU_SANITIZE=0 turns it off."""
    if os.environ.get("DK_EMU_SANITIZE", "1") == "0":
        return []
    return ["-fsanitize=bounds,object-size", "-fsanitize-undefined-trap-on-error"]


class EmulatorError(RuntimeError):
    """A failure the emulator caught in a kernel during a library call: a bad warp op, a deadlock,
    the launch watchdog, an index trap, a write outside a workspace (emu_runtime.h)."""


class _Checked:
    """One library function; after each call, the failure the emulator recorded during it (if any)
    is raised as EmulatorError. Attributes (argtypes, restype) go to the ctypes function."""

    __slots__ = ("_fn", "_take")

    def __init__(self, fn, take):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_take", take)

    def __setattr__(self, name, value):
        setattr(self._fn, name, value)

    def __getattr__(self, name):
        return getattr(self._fn, name)

    def __call__(self, *args):
        r = self._fn(*args)
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
        object.__setattr__(self, "_cdll", cdll)
        object.__setattr__(self, "_take", take)
        object.__setattr__(self, "_fns", {})

    def __getattr__(self, name):
        fns = self._fns
        if name not in fns:
            fns[name] = _Checked(getattr(self._cdll, name), self._take)
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
    L.dk_emu_set_schedule_seed.argtypes, L.dk_emu_set_schedule_seed.restype = [ctypes.c_int64], None
    if _schedule[0] is not None:
        L.dk_emu_set_schedule_seed(_schedule[0])
    _loaded.append(L)
    return L


_loaded = []


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


def _ptr(t):
    return None if t is None else t.data_ptr()


def _row(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


def _matrix(x):
    assert x.dim() == 2 and (x.size(0) == 0 or x.size(1) == 1 or x.stride(1) == 1)
    return _DTYPES[x.dtype], x.size(0), x.size(1), (x.stride(0) if x.size(0) > 1 else x.size(1))


def _filter_args(T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val):
    keep = [
        _row(T_arr, torch.float32),
        _row(k_arr, torch.int64),
        _row(p_arr, torch.float32),
        _row(mp_arr, torch.float32),
    ]
    return keep, [_ptr(keep[0]), T_val, _ptr(keep[1]), k_val, _ptr(keep[2]), p_val, _ptr(keep[3]), mp_val]


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
    dt, rows, V, stride = _matrix(x)
    idx = _row(indices, torch.int64)
    n = rows if idx is None else idx.numel()
    seeds = _row(seed_arr, torch.int64)
    keep, fargs = _filter_args(T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val)
    tok = torch.empty(n, dtype=torch.int64)
    valid = torch.empty(n, dtype=torch.bool)
    lp = torch.empty(n, dtype=torch.float32)
    last_splits[0] = 1
    if n:
        last_splits[0] = lib.dk_emu_sample(
            x.data_ptr(),
            dt,
            rows,
            V,
            stride,
            int(is_probs),
            order,
            *fargs,
            _ptr(idx),
            n,
            _ptr(seeds),
            seed_val & (2**64 - 1),
            offset,
            tok.data_ptr(),
            valid.data_ptr(),
            lp.data_ptr(),
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
    dt, rows, V, stride = _matrix(x)
    keep, fargs = _filter_args(T_arr, T_val, k_arr, k_val, p_arr, p_val, mp_arr, mp_val)
    out = torch.empty(x.shape, dtype=x.dtype if kind == 0 else torch.float32)
    last_splits[0] = 1
    if rows:
        last_splits[0] = lib.dk_emu_filter(
            x.data_ptr(), dt, rows, V, stride, int(is_probs), order, *fargs, kind, out.data_ptr(), out.size(1), n_sms
        )
    return out
