"""The three backends every op-family test module (tests/test_ops_*.py) runs its cases on:

- "cpu": the CPU op (torch.ops.decodekit on CPU tensors);
- "cuda_emu": the CUDA kernels' code run on CPU threads by the emulator of tests/cuda_emu (emu.py,
  emu_spec.py, emu_pipe.py, emu_attn.py), under randomised thread schedules (`schedules`);
- "cuda": the op on CUDA tensors (arguments moved with cuda_cases.to_device, results moved back).

`params` builds the (backend, case) items of a module with each backend's skip mark: no host C++
compiler for "cuda_emu"; no visible GPU or a build without CUDA kernels for "cuda".
"""

import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import cuda_cases as cc  # noqa: E402
import decodekit  # noqa: E402
import emu  # noqa: E402

ops = decodekit.ops
BACKENDS = ("cpu", "cuda_emu", "cuda")

if not torch.cuda.is_available():
    CUDA_SKIP = "no CUDA device visible (torch.cuda.is_available() is False)"
elif not decodekit.build_info()["cuda"]:
    CUDA_SKIP = "decodekit was built without CUDA kernels (DECODEKIT_CUDA=ON to build them)"
else:
    CUDA_SKIP = None
EMU_SKIP = "no host C++ compiler to build the CUDA emulator" if emu.compiler() is None else None

MARKS = {
    "cpu": [],
    "cuda_emu": [pytest.mark.skip(reason=EMU_SKIP)] if EMU_SKIP else [],
    "cuda": [pytest.mark.skip(reason=CUDA_SKIP)] if CUDA_SKIP else [],
}
# for tests that only make sense on one backend (the GPU-only and emulator-only tests)
needs_cuda = pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")
needs_emu = pytest.mark.skipif(EMU_SKIP is not None, reason=EMU_SKIP or "")


def params(cases):
    """pytest params (backend, index, case) with ids "<backend>-<case id>". `cases` maps each
    backend to its list of (id, case); the index is the case's position in its backend's list
    (the emulator derives its schedule seeds from it)."""
    out = []
    for b in BACKENDS:
        for i, (cid, case) in enumerate(cases[b]):
            out.append(pytest.param(b, i, case, id=f"{b}-{cid}", marks=MARKS[b]))
    return out


def schedules(first, n):
    """Schedule seeds first, first + 1, ..., first + n - 1 of the emulator (never 0: that is the
    fixed thread order)."""
    assert first >= 1
    return list(range(first, first + n))


def emulated(seeds, fn, *args, **kw):
    """fn(*args) under each of the emulator's schedule seeds `seeds`: the list of results."""
    out = []
    for s in seeds:
        emu.set_schedule_seed(s)
        out.append(fn(*args, **kw))
    return out


def to_cpu(out):
    if isinstance(out, torch.Tensor):
        return out.cpu()
    if isinstance(out, (tuple, list)):
        return type(out)(to_cpu(t) for t in out)
    return out


def on_cuda(op, *args):
    """op(*args) with every tensor argument moved to the GPU, the outputs moved back."""
    return to_cpu(op(*cc.to_device(args, "cuda")))


@contextmanager
def one_thread():
    """torch on one intra-op thread: reference.py's many small row-by-row ops run ~40x faster
    on the 2-core machine than with torch's thread pool spinning up for each of them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
