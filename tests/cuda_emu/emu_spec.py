"""Runs csrc/cuda/speculative.cuh's kernels on CPU threads (emu_runtime.h) with the calling
convention of torch.ops.decodekit.{chain_verify, tree_verify, build_tree} (inputs already valid;
the checks are the bindings' job), so tests can compare the CUDA kernels with the CPU kernels
on a machine without a GPU. Built with the host compiler on first use, cached under build/."""

import ctypes
from pathlib import Path

import emu
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCES = [
    HERE / "emu_runtime.h",
    HERE / "emu_sample_ws.h",
    HERE / "emu_speculative.cpp",
    ROOT / "csrc/cuda/speculative.cuh",
    ROOT / "csrc/cuda/sampling.cuh",
    *sorted((ROOT / "csrc/cuda").glob("*.h")),
    *sorted((ROOT / "csrc/include/decodekit").glob("*.h")),
]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_libs = {}
compiler = emu.compiler


def load(threads=None):
    """The speculative kernels' emulator library; threads=None: the production block size
    (speculative.cuh's kThreads, which is sampling.cuh's: DK_CUDA_THREADS sets both)."""
    if threads in _libs:
        return _libs[threads]
    L = emu.build_shared("emu_speculative", "emu_speculative.cpp", SOURCES, "DK_CUDA_THREADS", threads)
    P, I, Q, F, U = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_uint64
    L.dk_emu_spec_lanes.argtypes, L.dk_emu_spec_lanes.restype = [Q], Q
    L.dk_emu_spec_list.argtypes, L.dk_emu_spec_list.restype = [Q], Q
    L.dk_emu_spec_resid.argtypes, L.dk_emu_spec_resid.restype = [Q], Q
    L.dk_emu_set_filters.argtypes, L.dk_emu_set_filters.restype = [I, P, Q, P, F, P, F], None
    L.dk_emu_spec_work.argtypes, L.dk_emu_spec_work.restype = [P], None
    L.dk_emu_split_blocks.argtypes, L.dk_emu_split_blocks.restype = [], Q
    L.dk_emu_spec_set_sms.argtypes, L.dk_emu_spec_set_sms.restype = [Q], None
    L.dk_emu_spec_last_prepared.argtypes, L.dk_emu_spec_last_prepared.restype = [], I
    L.dk_emu_spec_last_node_splits.argtypes, L.dk_emu_spec_last_node_splits.restype = [], I
    L.dk_emu_spec_check_prepared.argtypes, L.dk_emu_spec_check_prepared.restype = [I], None
    L.dk_emu_spec_prepared_mismatch.argtypes, L.dk_emu_spec_prepared_mismatch.restype = [], Q
    L.dk_emu_spec_set_sms(_n_sms[0])
    L.dk_emu_spec_check_prepared(int(_n_sms[0] > 0 and _check[0]))
    L.dk_emu_chain.argtypes = [P, I, I, Q, Q, Q, P, F, P, Q, Q, P, P, Q, Q, P, U, U, P, P, P, P, P, P, P]
    L.dk_emu_tree.argtypes = [
        P,
        I,
        I,
        Q,
        Q,
        Q,
        P,
        F,
        P,
        Q,
        Q,
        P,
        P,
        P,
        P,
        Q,
        Q,
        Q,
        P,
        U,
        U,
        P,
        P,
        P,
        P,
        P,
        P,
        P,
        P,
        P,
        P,
        P,
        P,
        ctypes.c_double,
        ctypes.c_double,
        P,
        P,
    ]
    L.dk_emu_build_tree.argtypes = [P, P, Q, Q, P, P, P, P, P, P, P]
    for f in (L.dk_emu_chain, L.dk_emu_tree, L.dk_emu_build_tree):
        f.restype = None
    _libs[threads] = L
    return L


_n_sms = [0]
_check = [True]  # set_sms's check, for the libraries loaded after it


def set_sms(n, check=True):
    """The SM count the chain / tree launches plan with (speculative.cuh prepare_plan): 0 (the
    default) never prepares the nodes ahead; a large count prepares whenever the plan allows.
    check (n > 0): the walk also resolves every prepared node itself and counts the differences
    (prepared_mismatch; the work counters then count both)."""
    _n_sms[0], _check[0] = n, check
    for L in _libs.values():
        L.dk_emu_spec_set_sms(n)
        L.dk_emu_spec_check_prepared(int(n > 0 and check))


def prepared_mismatch(threads=None):
    """Prepared nodes whose summary or survivor list differed from the walk's own since the last
    call (resets the count)."""
    return load(threads).dk_emu_spec_prepared_mismatch()


def last_prepared(threads=None):
    """Whether the last chain / tree call prepared its nodes (prepare_kernel or the split plan ran
    before the walk)."""
    return bool(load(threads).dk_emu_spec_last_prepared())


def last_node_splits(threads=None):
    """Blocks per prepared node in the last chain / tree call: 0 (not prepared), 1 (prepare_kernel,
    one block per node) or the split plan's slices per node (speculative.cuh node_plan)."""
    return load(threads).dk_emu_spec_last_node_splits()


def work(threads=None):
    """(target rows resolved, normaliser passes) by the kernels since the last call; resets them."""
    out = torch.zeros(2, dtype=torch.int64)
    load(threads).dk_emu_spec_work(out)
    return tuple(out.tolist())


def split_blocks(threads=None):
    """Blocks of the split phases that resolved a row (sampling.cuh split_enter) since the last
    call; resets the count."""
    return load(threads).dk_emu_split_blocks()


def _i64(t):
    return None if t is None else t.to(torch.int64).contiguous()


NO_FILTERS = (None, 0, None, 1.0, None, 0.0, 0)  # (k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order)


def _set_filters(L, filters):
    """The logits form's top-k / top-p / min-p / order (the ops' argument order) for the next call;
    returns the fence holding the per-row tensors' fenced copies, to be closed after that call."""
    k_arr, k_val, p_arr, p_val, mp_arr, mp_val, order = filters
    keep = [
        None if k_arr is None else k_arr.to(torch.int64).contiguous(),
        None if p_arr is None else p_arr.to(torch.float32).contiguous(),
        None if mp_arr is None else mp_arr.to(torch.float32).contiguous(),
    ]
    F = L.fence()
    k, p, mp = (F.ptr(t, name) for t, name in zip(keep, ("top_k", "top_p", "min_p")))
    L.dk_emu_set_filters(order, k, int(k_val), p, float(p_val), mp, float(mp_val))
    return F


def _head(tgt, kind, dt, V, sb, sr, temp, T_val, draft):
    """The target / draft arguments dk_emu_chain and dk_emu_tree begin with (the checked call
    fences the tensors, emu.Fence, and passes None as NULL)."""
    draft = None if draft is None else emu.gapped(draft)  # rows with red zones between them
    ds = (0, 0) if draft is None else (draft.stride(0), draft.stride(1))
    return (tgt, kind, dt, V, sb, sr, temp, float(T_val), draft, *ds)


def _lists(L, B, V):
    per = L.dk_emu_spec_list(max(V, 1))
    return torch.empty(B, per, dtype=torch.int32), torch.empty(B, per, dtype=torch.float32)


def _target(target, kind, T_arr, T_val):
    if kind == 2:
        t = _i64(target)
        return t, 0, 0, t.shape[1], 1, None
    temp = None if T_arr is None else T_arr.to(torch.float32).contiguous()
    target = emu.gapped(target)  # rows with red zones between them
    return target, _DTYPES[target.dtype], target.shape[2], target.stride(0), target.stride(1), temp


def chain_verify(
    target,
    ids,
    draft,
    num_draft,
    kind,
    T_arr=None,
    T_val=1.0,
    seed_arr=None,
    seed_val=0,
    offset=0,
    threads=None,
    filters=NO_FILTERS,
):
    L = load(threads)
    fence = _set_filters(L, filters)  # closed after the call
    B, N = ids.shape
    tgt, dt, V, sb, sr, temp = _target(target, kind, T_arr, T_val)
    ids64, nd, seeds = _i64(ids), _i64(num_draft), _i64(seed_arr)
    out = torch.empty(B, N + 1, dtype=torch.int64)
    acc = torch.zeros(B, dtype=torch.int32)
    emi = torch.zeros(B, dtype=torch.int32)
    lanes = torch.empty(B, L.dk_emu_spec_lanes(V), dtype=torch.float64)
    removed = torch.empty(B, 1, dtype=torch.int64)
    lidx, lw = _lists(L, B, V)
    with fence:
        L.dk_emu_chain(
            *_head(tgt, kind, dt, V, sb, sr, temp, T_val, draft), ids64, nd, B, N,
            seeds, seed_val & (2**64 - 1), offset, out, acc, emi, lanes, removed, lidx, lw,
        )  # fmt: skip
    return out, acc, emi


def tree_verify(
    cand,
    ri,
    nt,
    ns,
    target,
    draft,
    W,
    kind,
    T_arr=None,
    T_val=1.0,
    seed_arr=None,
    seed_val=0,
    offset=0,
    threads=None,
    coins=None,
    coins_final=None,
    threshold_single=1.0,
    threshold_acc=1.0,
    filters=NO_FILTERS,
):
    L = load(threads)
    fence = _set_filters(L, filters)  # closed after the call
    B, T = cand.shape
    tgt, dt, V, sb, sr, temp = _target(target, kind, T_arr, T_val)
    V = V if kind != 2 else 1
    c, r, n1, n2, seeds = _i64(cand), _i64(ri), _i64(nt), _i64(ns), _i64(seed_arr)
    pred = torch.full((B * T,), -1, dtype=torch.int64)
    ai = torch.full((B, W), -1, dtype=torch.int32)
    an = torch.zeros(B, dtype=torch.int32)
    err = torch.zeros(B, dtype=torch.int32)
    err_node = torch.zeros(B, dtype=torch.int64)
    lanes = torch.empty(B, L.dk_emu_spec_lanes(max(V, 1)), dtype=torch.float64)
    resid = torch.empty(B, L.dk_emu_spec_resid(V), dtype=torch.float32)
    removed = torch.empty(B, T, dtype=torch.int64)
    seen = torch.empty(B, T, dtype=torch.uint8)
    stack = torch.empty(B, T, dtype=torch.int64)
    co = None if coins is None else coins.double().contiguous()
    cf = None if coins_final is None else coins_final.double().contiguous()
    lidx, lw = _lists(L, B, V)
    with fence:
        L.dk_emu_tree(
            *_head(tgt, kind, dt, V, sb, sr, temp, T_val, draft), c, r, n1, n2, B, T, W,
            seeds, seed_val & (2**64 - 1), offset, pred, ai, an, err, err_node, lanes, resid, removed, seen, stack,
            co, cf, float(threshold_single), float(threshold_acc), lidx, lw,
        )  # fmt: skip
    return pred, ai, an, err, err_node


def build_tree(parents, prefix_lens, threads=None):
    L = load(threads)
    B, T = parents.shape
    W = (T + 7) // 8
    par, pre = _i64(parents), _i64(prefix_lens)
    mask = torch.empty(B, T, W, dtype=torch.uint8)
    pos = torch.empty(B * T, dtype=torch.int64)
    ri, nt, ns = (torch.empty(B, T, dtype=torch.int64) for _ in range(3))
    err = torch.zeros(B, dtype=torch.int32)
    err_node = torch.zeros(B, dtype=torch.int64)
    L.dk_emu_build_tree(par, pre, B, T, mask, pos, ri, nt, ns, err, err_node)
    return (mask, pos, ri, nt, ns), err, err_node
