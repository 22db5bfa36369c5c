"""Runs csrc/cuda/pipeline.cuh's processing kernel on CPU threads (emu_runtime.h) with the calling
convention of decodekit.apply_penalties' op (inputs already checked by the binding). Built with the
host compiler on first use, cached under build/cuda_emu."""

import ctypes
import hashlib
import os
import subprocess
from pathlib import Path

import torch

import emu

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCES = [
    HERE / "emu_runtime.h",
    HERE / "emu_pipeline.cpp",
    ROOT / "csrc/cuda/pipeline.cuh",
    *sorted((ROOT / "csrc/include/decodekit").glob("*.h")),
]
_lib = []


def load(threads: int = 64):
    if _lib:
        return _lib[0]
    h = hashlib.sha256(str(threads).encode())
    for s in SOURCES:
        h.update(s.read_bytes())
    out_dir = ROOT / "build" / "cuda_emu"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"emu_pipeline_{threads}_{h.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".tmp{os.getpid()}.so")
        subprocess.run(
            [
                emu.compiler(),
                "-std=c++20",
                "-O2",
                "-ffp-contract=off",
                "-fno-math-errno",
                "-fPIC",
                "-shared",
                f"-DDK_PIPE_THREADS={threads}",
                f"-I{ROOT / 'csrc/include'}",
                f"-I{ROOT / 'csrc'}",
                f"-I{HERE}",
                str(HERE / "emu_pipeline.cpp"),
                "-o",
                str(tmp),
            ],
            check=True,
        )
        os.replace(tmp, lib)
    _lib.append(ctypes.CDLL(str(lib)))
    return _lib[0]


def process(
    x, params, *, indices=None, bitmask=None, banned=None, bias_ids=None, bias_vals=None, prompt=None, output=None
):
    """The processed logits [n_out, V] (x's dtype), as decodekit.apply_penalties."""
    lib = load()
    dt = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x.dtype]
    n = x.shape[0] if indices is None else indices.numel()
    V = x.shape[1]
    keep = []

    def ptr(t, dtype):
        if t is None:
            return None, 0
        t = t.to(dtype).contiguous()
        keep.append(t)
        return t.data_ptr(), (t.shape[1] if t.dim() == 2 else 0)

    out = torch.empty(n, V, dtype=x.dtype)
    P = params.to(torch.float64).contiguous()
    idx, _ = ptr(indices, torch.int64)
    bm, words = ptr(bitmask, torch.int32)
    ban, nb = ptr(banned, torch.int64)
    bid, nbias = ptr(bias_ids, torch.int64)
    bv, _ = ptr(bias_vals, torch.float32)
    pr, npr = ptr(prompt, torch.int64)
    ou, nou = ptr(output, torch.int64)
    L, p = ctypes.c_int64, ctypes.c_void_p
    lib.dk_emu_process.argtypes = [p, ctypes.c_int, L, L, p, L, p, p, L, p, L, p, p, L, p, L, p, L, p]
    xs = x.contiguous()
    lib.dk_emu_process(
        xs.data_ptr(),
        dt,
        V,
        V,
        idx,
        n,
        P.data_ptr(),
        bm,
        words,
        ban,
        nb,
        bid,
        bv,
        nbias,
        pr,
        npr,
        ou,
        nou,
        out.data_ptr(),
    )
    return out
