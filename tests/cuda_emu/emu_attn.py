"""Runs the CUDA tree-attention kernels on CPU fibers (emu_runtime.h): csrc/cuda/attention.cuh's
CUDA-core kernel and csrc/cuda/attention_mma.cuh's tensor-core kernel (mma / ldmatrix / cp.async
emulated lane by lane by emu_mma.h), with the calling convention of torch.ops.decodekit.tree_attention,
so tests can compare the CUDA kernels' logic with the CPU kernel on a machine without a GPU. Also
exposes single-warp mma.sync and ldmatrix for the fragment-layout unit tests. Built with the host
compiler on first use, cached in build/cuda_emu keyed by a hash of the sources."""

import ctypes
import math
from pathlib import Path

import torch

import emu

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCES = [
    HERE / "emu_runtime.h",
    HERE / "emu_mma.h",
    HERE / "emu_attention.cpp",
    ROOT / "csrc/cuda/attention.cuh",
    ROOT / "csrc/cuda/attention_mma.cuh",
    *sorted((ROOT / "csrc/include/decodekit").glob("*.h")),
]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_lib = None


compiler = emu.compiler


def load():
    global _lib
    if _lib is None:
        _lib = emu.build_shared("emu_attention", "emu_attention.cpp", SOURCES)
        L, P, I, F = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        # dtype, B, T, Hq, Hkv, D, S, q + 3 strides, k + 3, v + 3, mask, packed, 2 mask strides,
        # prefix_lens, sm_scale, out, lse, impl, force_splits
        _lib.dk_emu_tree_attention.argtypes = [I] + [L] * 6 + ([P] + [L] * 3) * 3 + [P, I, L, L, P, F, P, P, I, I]
        _lib.dk_emu_tree_attention.restype = None
        _lib.dk_emu_mma_splits.argtypes = [L] * 5
        _lib.dk_emu_mma_splits.restype = I
        _lib.dk_emu_mma_fragments.argtypes = [I, P, P, P, P]
        _lib.dk_emu_mma_fragments.restype = None
        _lib.dk_emu_ldmatrix.argtypes = [P, L, P, P, I, I, P]
        _lib.dk_emu_ldmatrix.restype = None
        _lib.dk_emu_cp_async_probe.argtypes = [P, P, P]
        _lib.dk_emu_cp_async_probe.restype = None
    return _lib


_IMPLS = {"auto": -1, "simt": 0, "mma": 1}


def tree_attention(q, k, v, tree_mask, prefix_lens, sm_scale=None, kv_layout="NHD", impl="auto", splits=0):
    """(out, lse) from the emulated CUDA kernel; same arguments as torch.ops.decodekit.tree_attention.
    impl: "auto" (what the CUDA launcher picks), "simt" (CUDA-core kernel) or "mma" (tensor cores);
    splits > 0 forces the tensor-core kernel's split-KV count (0: the launcher's rule)."""
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
        q,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k,
        k.stride(0),
        k.stride(sd),
        k.stride(hd),
        v,
        v.stride(0),
        v.stride(sd),
        v.stride(hd),
        mask,
        int(tree_attention_is_packed(tree_mask)),
        mask.stride(0),
        mask.stride(1),
        pl,
        scale,
        out,
        lse,
        _IMPLS[impl],
        int(splits),
    )
    return out, lse


def mma_splits(B, T, Hq, Hkv, S):
    """Split-KV count the tensor-core launcher's rule picks for these sizes."""
    return load().dk_emu_mma_splits(B, T, Hq, Hkv, S)


def mma_fragments(a, b, c, f16):
    """Emulated mma.sync m16n8k16 of one warp: a int32 [32, 4], b int32 [32, 2] (packed 16-bit pairs),
    c float32 [32, 4] per lane; returns d float32 [32, 4]."""
    a, b, c = (x.contiguous() for x in (a, b, c))
    d = torch.empty(32, 4, dtype=torch.float32)
    load().dk_emu_mma_fragments(int(f16), a, b, c, d)
    return d


def ldmatrix(src, rows, cols, nmat, trans):
    """Emulated ldmatrix .x{nmat}{.trans} of one warp from the 16-bit matrix src (int16 2-D, rows
    16-byte aligned); lane l addresses src[rows[l], cols[l]:]. Returns int32 [32, 4] registers."""
    assert src.dtype == torch.int16 and src.stride(1) == 1 and src.data_ptr() % 16 == 0  # the fenced copy keeps it
    rows = torch.as_tensor(rows, dtype=torch.int32).contiguous()
    cols = torch.as_tensor(cols, dtype=torch.int32).contiguous()
    out = torch.zeros(32, 4, dtype=torch.int32)
    load().dk_emu_ldmatrix(src, src.stride(0), rows, cols, nmat, int(trans), out)
    return out


def tree_attention_is_packed(tree_mask):
    return tree_mask.dtype == torch.uint8


def cp_async_probe():
    """The five 16-bit values dk_emu_cp_async_probe observes (see emu_attention.cpp)."""
    a = torch.full((8,), 0x1111, dtype=torch.int16)
    b = torch.full((8,), 0x2222, dtype=torch.int16)
    got = torch.zeros(5, dtype=torch.int16)
    load().dk_emu_cp_async_probe(a, b, got)
    return [int(x) & 0xFFFF for x in got]
