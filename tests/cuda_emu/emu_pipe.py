"""Runs csrc/cuda/pipeline.cuh's kernel on CPU threads (emu_runtime.h) with the calling convention
of the torch op decodekit::pipeline (what csrc/cuda/pipeline.cu passes: metadata checked, values
not). Built with the host compiler on first use, cached under build/cuda_emu."""

import ctypes
from pathlib import Path

import torch

import emu

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCES = [
    HERE / "emu_runtime.h",
    HERE / "emu_pipeline.cpp",
    ROOT / "csrc/cuda/pipeline.cuh",
    *sorted((ROOT / "csrc/cuda").glob("*.h")),
    *sorted((ROOT / "csrc/include/decodekit").glob("*.h")),
]
_lib = {}


def load(threads=None):
    """The whole-step kernel's emulator library; threads=None: pipeline.cuh's production block
    size (kPipeThreads)."""
    if threads not in _lib:
        _lib[threads] = emu.build_shared("emu_pipeline", "emu_pipeline.cpp", SOURCES, "DK_PIPE_THREADS", threads)
    return _lib[threads]


def pipeline(
    x,
    indices,
    params,
    order,
    bitmask,
    banned,
    bias_ids,
    bias_vals,
    prompt,
    output,
    mode,
    top_n,
    raw_logprobs,
    want_logprob,
    seed_arr,
    seed_val,
    offset,
    offset_arr=None,
    *,
    error_flag=None,
    error_bit=0,
    n_sms=0,
    min_slice=4096,
):
    """The 7 outputs of torch.ops.decodekit.pipeline (same arguments), computed by the CUDA kernel.
    A one-seed tensor and offset_arr are passed as the CUDA launcher passes device tensors: as
    pointers the kernel reads (seed_ptr, offsets), never read here. error_flag: an int32 [1] tensor
    the kernel ORs error_bit into for a row with a bad value (the launcher's deferred checks).
    n_sms > 0: the launch plan of a device with that many SMs (pipeline.cuh pipe_plan, slices of
    at least min_slice elements; a GPU's are kChunk = 4096); last_splits[0] then tells how many CTAs
    per row ran the row passes."""
    lib = load()
    with lib.fence() as F:  # the pointers inside ins / outs are fenced here, the direct arguments by the call
        return _pipeline(lib, F, x, indices, params, order, bitmask, banned, bias_ids, bias_vals, prompt, output,
                         mode, top_n, raw_logprobs, want_logprob, seed_arr, seed_val, offset, offset_arr,
                         error_flag, error_bit, n_sms, min_slice)  # fmt: skip


def _pipeline(lib, F, x, indices, params, order, bitmask, banned, bias_ids, bias_vals, prompt, output, mode, top_n,
              raw_logprobs, want_logprob, seed_arr, seed_val, offset, offset_arr, error_flag, error_bit, n_sms,
              min_slice):  # fmt: skip
    dt = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x.dtype]
    n = x.shape[0] if indices is None else indices.numel()
    V = x.shape[1]

    def ptr(t, dtype, name):
        if t is None:
            return None, 0
        t = t.to(dtype).contiguous()
        return F.ptr(t, name), (t.shape[1] if t.dim() == 2 else 0)

    bm, words = ptr(bitmask, torch.int32, "bitmask")
    ban, nb = ptr(banned, torch.int64, "banned")
    bid, nbias = ptr(bias_ids, torch.int64, "bias_ids")
    bv, _ = ptr(bias_vals, torch.float32, "bias_vals")
    pr, npr = ptr(prompt, torch.int64, "prompt")
    ou, nou = ptr(output, torch.int64, "output")
    idx, _ = ptr(indices, torch.int64, "indices")
    seeds = seed_one = offs = None
    if seed_arr is not None:  # one seed per output row, or one for all in memory (as checks.h seed_rows)
        sa = seed_arr.reshape(-1).to(torch.int64)
        if sa.numel() == 1 and n != 1:
            seed_one, _ = ptr(sa, torch.int64, "seed")
        else:
            seeds, _ = ptr(sa, torch.int64, "seed")
    off_stride = 0
    if offset_arr is not None:  # [n] or [1] (stride 0), as checks.h pack_offsets
        oa = offset_arr.reshape(-1).to(torch.int64)
        off_stride = 0 if oa.numel() == 1 else 1
        offs, _ = ptr(oa, torch.int64, "offset")
    flag = None if error_flag is None else F.ptr(error_flag, "error_flag")
    P = params.to(torch.float64).contiguous()
    sample = mode == 0
    m = n if sample else 0
    tokens = torch.zeros(m, dtype=torch.int64)
    valid = torch.zeros(m, dtype=torch.bool)
    lp = torch.zeros(m, dtype=torch.float32)
    rank = torch.zeros(m, dtype=torch.int64)
    top_ids = torch.zeros(m, top_n, dtype=torch.int64)
    top_lp = torch.zeros(m, top_n, dtype=torch.float32)
    logits = torch.zeros(0 if sample else n, V, dtype=x.dtype)
    L, p = ctypes.c_int64, ctypes.c_void_p
    ins = (p * 6)(bm, ban, bid, bv, pr, ou)
    dims = (L * 5)(words, nb, nbias, npr, nou)
    names = ("tokens", "valid", "logprob", "rank", "top_ids", "top_logprobs", "logits")
    outs = (p * 7)(*[F.ptr(t, name) for t, name in zip((tokens, valid, lp, rank, top_ids, top_lp, logits), names)])
    xs = emu.gapped(x.contiguous())  # rows with red zones between them (x's row stride: row_stride)
    stride = emu._matrix(xs)[3]
    lib.dk_emu_pipeline.argtypes = [
        p, ctypes.c_int, L, L, p, L, p, ctypes.c_int, p, p, p,
        ctypes.c_uint64, ctypes.c_uint64, p, p, L, p, ctypes.c_int32,
        ctypes.c_int, L, ctypes.c_int, ctypes.c_int, p, ctypes.c_int, L,
    ]  # fmt: skip
    lib.dk_emu_pipeline.restype = ctypes.c_int
    last_splits[0] = 1
    if n:
        last_splits[0] = lib.dk_emu_pipeline(
            xs, dt, V, stride, idx, n, P, int(order), ins, dims, seeds,
            int(seed_val) & (2**64 - 1), int(offset) & (2**64 - 1), seed_one, offs, off_stride, flag,
            int(error_bit), int(mode), int(top_n),
            int(bool(raw_logprobs)), int(bool(want_logprob)), outs, int(n_sms), int(min_slice),
        )  # fmt: skip
    return tokens, valid, lp, rank, top_ids, top_lp, logits


last_splits = [1]  # CTAs per row of the last pipeline() call's row passes


def start_sizes(n):
    """The start-list length of rows 0..n-1 in the last pipeline() call (the collect phase's counts
    over all slices; 0 where the row built none, -1 where invalid values stopped it before the
    scan): what top-k's radix passes and top-n-sigma's bound let through."""
    lib = load()
    lib.dk_emu_pipeline_start_size.argtypes = [ctypes.c_int64]
    lib.dk_emu_pipeline_start_size.restype = ctypes.c_int64
    return [lib.dk_emu_pipeline_start_size(o) for o in range(n)]


def plan_splits(n_out, V, n_sms, min_slice=4096):
    """pipeline.cuh pipe_plan's CTAs per row for these sizes (no launch)."""
    lib = load()
    lib.dk_emu_pipe_plan_splits.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64]
    lib.dk_emu_pipe_plan_splits.restype = ctypes.c_int
    return lib.dk_emu_pipe_plan_splits(n_out, V, n_sms, min_slice)


def apply_token_bitmask_inplace(logits, bitmask, indices=None):
    """xgrammar's in-place mask by the CUDA kernel (2-D logits, contiguous rows)."""
    lib = load()
    dt = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[logits.dtype]
    bm = bitmask.to(torch.int32).contiguous()
    idx = None if indices is None else indices.to(torch.int64).contiguous()
    rows = logits.shape[0] if idx is None else idx.numel()
    tokens = min(logits.shape[1], 32 * bm.shape[1])
    L, p = ctypes.c_int64, ctypes.c_void_p
    lib.dk_emu_bitmask_inplace.argtypes = [p, ctypes.c_int, L, p, L, L, p, L]
    lib.dk_emu_bitmask_inplace(logits, dt, logits.stride(0), bm, bm.shape[1], tokens, idx, rows)


def block_top_p(v, w, P):
    """pipeline.cuh's block_top_p (the GPU's top-p cut on the list) on one emulated block of the
    production size: the smallest value of v whose strictly greater values weigh < P (weights w)."""
    L = load()
    f = L.dk_emu_block_top_p
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double], ctypes.c_float
    v, w = v.float().contiguous(), w.float().contiguous()
    return float(f(v, w, v.numel(), float(P)))


def block_low_cut(sc, w, P):
    """pipeline.cuh's block_low_cut (typical's cut on the list) on one emulated block of the
    production size: the largest score of sc (float64) whose strictly smaller scores weigh < P
    (weights w, float32, or 1 each when w is None)."""
    L = load()
    f = L.dk_emu_block_low_cut
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double], ctypes.c_double
    sc = sc.double().contiguous()
    w = None if w is None else w.float().contiguous()
    return float(f(sc, w, sc.numel(), float(P)))
