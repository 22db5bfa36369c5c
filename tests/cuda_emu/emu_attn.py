"""Runs csrc/cuda/attention.cuh's tree-attention kernel on CPU fibers (emu_runtime.h) with the
calling convention of torch.ops.decodekit.tree_attention, so tests can compare the CUDA kernel's
logic with the CPU kernel on a machine without a GPU. Built with the host compiler on first use,
cached in build/cuda_emu keyed by a hash of the sources."""

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCES = [
    HERE / "emu_runtime.h",
    HERE / "emu_attention.cpp",
    ROOT / "csrc/cuda/attention.cuh",
    *sorted((ROOT / "csrc/include/decodekit").glob("*.h")),
]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_lib = None


def compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def load():
    global _lib
    if _lib is None:
        h = hashlib.sha256()
        for s in SOURCES:
            h.update(s.read_bytes())
        out_dir = ROOT / "build" / "cuda_emu"
        out_dir.mkdir(parents=True, exist_ok=True)
        lib = out_dir / f"emu_attention_{h.hexdigest()[:16]}.so"
        if not lib.exists():
            tmp = lib.with_suffix(f".tmp{os.getpid()}.so")
            subprocess.run(
                [
                    compiler(),
                    "-std=c++20",
                    "-O2",
                    "-ffp-contract=off",
                    "-fno-math-errno",
                    "-fPIC",
                    "-shared",
                    f"-I{ROOT / 'csrc/include'}",
                    f"-I{ROOT / 'csrc'}",
                    f"-I{HERE}",
                    str(HERE / "emu_attention.cpp"),
                    "-o",
                    str(tmp),
                ],
                check=True,
            )
            os.replace(tmp, lib)
        L, P, I, F = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        _lib = ctypes.CDLL(str(lib))
        _lib.dk_emu_tree_attention.argtypes = [
            I,
            L,
            L,
            L,
            L,
            L,
            L,
            P,
            L,
            L,
            L,
            P,
            L,
            L,
            L,
            P,
            L,
            L,
            L,
            P,
            I,
            L,
            L,
            P,
            F,
            P,
            P,
        ]
        _lib.dk_emu_tree_attention.restype = None
    return _lib


def tree_attention(q, k, v, tree_mask, prefix_lens, sm_scale=None, kv_layout="NHD"):
    """(out, lse) from the emulated CUDA kernel; same arguments as torch.ops.decodekit.tree_attention."""
    lib = load()
    B, T, Hq, D = q.shape
    hnd = kv_layout == "HND"
    S, Hkv = (k.shape[2], k.shape[1]) if hnd else (k.shape[1], k.shape[2])
    sd, hd = (2, 1) if hnd else (1, 2)
    mask = tree_mask.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    pl = torch.as_tensor(prefix_lens).to(torch.int64).contiguous()
    out = torch.empty(B, T, Hq, D, dtype=q.dtype)
    lse = torch.empty(B, T, Hq, dtype=torch.float32)
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    lib.dk_emu_tree_attention(
        _DTYPES[q.dtype],
        B,
        T,
        Hq,
        Hkv,
        D,
        S,
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.data_ptr(),
        k.stride(0),
        k.stride(sd),
        k.stride(hd),
        v.data_ptr(),
        v.stride(0),
        v.stride(sd),
        v.stride(hd),
        mask.data_ptr(),
        int(tree_attention_is_packed(tree_mask)),
        mask.stride(0),
        mask.stride(1),
        pl.data_ptr(),
        scale,
        out.data_ptr(),
        lse.data_ptr(),
    )
    return out, lse


def tree_attention_is_packed(tree_mask):
    return tree_mask.dtype == torch.uint8
