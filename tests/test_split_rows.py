"""Split rows (csrc/cuda/sampling.cuh split_plan): with fewer rows than SMs, an unfiltered sample
(greedy, temperature only, plain probabilities) or a Gumbel-max row is cut into slices of whole
4096-element chunks, one CTA each (two or three launches). The result must be the one-CTA kernels'
and the CPU's, bit for bit: tokens, valid flags, log-probabilities.

Backends: "cuda_emu" runs the kernels on CPU threads (tests/cuda_emu) with a chosen SM count, so
the plan splits the rows into 2, 3 or one-chunk slices; "cuda" runs the op on a real GPU, which
splits these small batches by its own SM count (skipped without a GPU). Filtered rows (top-k,
top-p, min-p, per-row tensors) never split: their plan keeps one CTA per row.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import cuda_cases as cc  # noqa: E402
import emu  # noqa: E402
import decodekit  # noqa: E402

ops = decodekit.ops


def _backend_skip(backend):
    if backend == "cuda_emu" and emu.compiler() is None:
        pytest.skip("no host C++ compiler to build the CUDA emulator")
    if backend == "cuda" and not (torch.cuda.is_available() and decodekit.build_info()["cuda"]):
        pytest.skip("needs a GPU and a CUDA build of decodekit (none here)")


def _cases():
    out = []
    fams = [("randn", 3, 9000), ("neginf", 2, 40000), ("peaked", 2, 12289), ("bad", 6, 8193)]
    for fam, B, V in fams:
        x = cc.logits_family(fam, B, V, seed=V)
        for dt in (cc.F32, cc.BF16, cc.F16):
            for label, f in [("plain", {}), ("T0.7", dict(T=0.7)), ("greedy", dict(T=0.0))]:
                out.append((f"logits-{fam}-V{V}-{dt}-{label}", cc.sample_args(x.to(dt), False, f, seed=7 + len(out))))
    out.append(
        ("logits-V128256-T0.8", cc.sample_args(cc.logits_family("randn", 1, 128256, seed=1), False, dict(T=0.8)))
    )
    out.append(
        (
            "logits-per-row-T",
            cc.sample_args(cc.logits_family("randn", 4, 9000, seed=2), False, dict(T=[0.5, 0.0, 1.0, 2.0])),
        )
    )
    x = cc.logits_family("randn", 3, 20000, seed=3)
    idx = torch.tensor([2, 0, 2])
    out.append(
        ("indices-seeds", cc.sample_args(x, False, dict(T=1.1), indices=idx, seeds=torch.tensor([4, 4, 9]), seed=0))
    )
    out.append(("offset", cc.sample_args(x, False, dict(), seed=-5, offset=2**40 + 3)))
    for fam in ("randn", "zipf", "zeros", "unnormalised"):
        out.append((f"probs-{fam}", cc.sample_args(cc.probs_family(fam, 3, 16385, seed=5), True, {}, seed=11)))
    return out


SAMPLE = _cases()
FILTERED = [
    ("k50", cc.sample_args(cc.logits_family("randn", 2, 9000, seed=8), False, dict(k=50))),
    ("p0.9", cc.sample_args(cc.logits_family("randn", 2, 9000, seed=8), False, dict(p=0.9))),
    ("minp", cc.sample_args(cc.logits_family("randn", 2, 9000, seed=8), False, dict(mp=0.05))),
    ("per-row-k", cc.sample_args(cc.logits_family("randn", 2, 9000, seed=8), False, dict(k=[0, 9000]))),
]


def _same(cpu, got):
    for c, g in zip(cpu, got):
        assert torch.equal(c, g.cpu()), (c, g)


def _expected_splits(n_out, V, n_sms):
    nch = -(-V // 4096)
    if n_sms <= 0 or n_out >= n_sms or nch < 2:
        return 1
    want = min(nch, -(-n_sms // n_out))
    per = -(-nch // want)
    return -(-nch // per)


@pytest.mark.parametrize("backend", ["cuda_emu", "cuda"])
@pytest.mark.parametrize("i", range(len(SAMPLE)), ids=[c[0] for c in SAMPLE])
def test_split_sample_matches_cpu(backend, i):
    _backend_skip(backend)
    _, args = SAMPLE[i]
    cpu = ops.sample(*args)
    if backend == "cuda":
        _same(cpu, ops.sample(*cc.to_device(args, "cuda")))
        return
    x, indices = args[0], args[1]
    n_out = x.shape[0] if indices is None else indices.numel()
    V = x.shape[1]
    seen = set()
    for j, n_sms in enumerate((2 * n_out, 3 * n_out, 10**6)):
        emu.set_schedule_seed(1 + 3 * i + j)
        got = emu.sample(*args, n_sms=n_sms)
        assert emu.last_splits[0] == _expected_splits(n_out, V, n_sms) > 1
        seen.add(emu.last_splits[0])
        _same(cpu, got)
    assert max(seen) == -(-V // 4096)  # one chunk per CTA in the last plan


@pytest.mark.parametrize("i", range(len(FILTERED)), ids=[c[0] for c in FILTERED])
def test_filtered_rows_do_not_split(i):
    _backend_skip("cuda_emu")
    _, args = FILTERED[i]
    got = emu.sample(*args, n_sms=10**6)
    assert emu.last_splits[0] == 1
    _same(ops.sample(*args), got)


GUMBEL = []
for fam, B, V in [
    ("randn", 3, 9000),
    ("ties", 2, 12289),
    ("neginf", 2, 40000),
    ("bad", 5, 8193),
    ("peaked", 2, 128256),
]:
    for dt in (cc.F32, cc.BF16):
        GUMBEL.append((f"{fam}-V{V}-{dt}", (cc.logits_family(fam, B, V, seed=3).to(dt), None, None, 99, 0)))
GUMBEL.append(
    (
        "indices-seeds",
        (cc.logits_family("randn", 2, 20000, seed=4), torch.tensor([1, 1, 0]), torch.tensor([3, 3, 4]), 0, 5),
    )
)


@pytest.mark.parametrize("backend", ["cuda_emu", "cuda"])
@pytest.mark.parametrize("i", range(len(GUMBEL)), ids=[c[0] for c in GUMBEL])
def test_split_gumbel_matches_cpu(backend, i):
    _backend_skip(backend)
    _, args = GUMBEL[i]
    cpu = ops.gumbel_sample(*args)
    if backend == "cuda":
        _same(cpu, ops.gumbel_sample(*cc.to_device(args, "cuda")))
        return
    x, indices = args[0], args[1]
    n_out = x.shape[0] if indices is None else indices.numel()
    for j, n_sms in enumerate((2 * n_out, 10**6)):
        emu.set_schedule_seed(2 + 2 * i + j)
        got = emu.gumbel_sample(*args, n_sms=n_sms)
        assert emu.last_splits[0] == _expected_splits(n_out, x.shape[1], n_sms) > 1
        _same(cpu, got)
