"""Inputs and filter settings on which a CUDA implementation of the sampling/filter ops must give
exactly the CPU result (same seed -> same tokens). Used by tests/test_ops_sampling.py on every
backend of tests/backends.py (cpu, cuda_emu: the CUDA kernels run on CPU threads, cuda: a real GPU).

Each case yields the positional arguments of torch.ops.decodekit.{sample,gumbel_sample,filter}
on the CPU; `to_device` moves the tensor arguments.
"""

import torch

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SEQ, JOINT = 0, 1


def logits_family(name: str, B: int, V: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "randn":
        return torch.randn(B, V, generator=g) * 3
    if name == "flat":
        return torch.randn(B, V, generator=g) * 0.05
    if name == "peaked":
        x = torch.randn(B, V, generator=g)
        x[:, torch.randint(0, V, (1,), generator=g)] += 25
        return x
    if name == "zipf":
        r = torch.randperm(V, generator=g).repeat(B, 1).float() + 1
        return -1.1 * torch.log(r)
    if name == "ties":  # few distinct values: big tie groups at every threshold
        return torch.randint(0, 6, (B, V), generator=g).float() * 0.5
    if name == "neginf":  # a third of the vocabulary masked out
        x = torch.randn(B, V, generator=g) * 2
        x[torch.rand(B, V, generator=g) < 0.33] = float("-inf")
        return x
    if name == "bad":  # row 0 NaN, row 1 all -inf, row 2 +inf, rest fine
        x = torch.randn(max(B, 4), V, generator=g)
        x[0, V // 2] = float("nan")
        x[1] = float("-inf")
        x[2, 0] = float("inf")
        return x
    raise ValueError(name)


def probs_family(name: str, B: int, V: int, seed: int = 0) -> torch.Tensor:
    if name == "zeros":  # probabilities with exact zeros and one all-zero (bad) row
        p = torch.softmax(logits_family("randn", B, V, seed), -1)
        p[torch.rand(B, V, generator=torch.Generator().manual_seed(seed + 1)) < 0.5] = 0
        p[-1] = 0
        return p
    if name == "unnormalised":
        return torch.softmax(logits_family("randn", B, V, seed), -1) * 7.5
    return torch.softmax(logits_family(name, B, V, seed).double(), -1).float()


# (label, dict of filter settings); T, k, p, mp may be scalars or per-row lists
FILTERS = [
    ("plain", dict()),
    ("T0.7", dict(T=0.7)),
    ("greedy", dict(T=0.0)),
    ("k1", dict(k=1)),
    ("k50", dict(k=50)),
    ("k5000_chunked", dict(k=5000)),  # |S| > 2048: chunked draw
    ("p0.9", dict(p=0.9)),
    ("p0.999", dict(p=0.999)),
    ("minp0.05", dict(mp=0.05)),
    ("minp1e-3", dict(mp=1e-3)),
    ("minp_tiny", dict(mp=1e-36)),  # below the CPU's min-p window: chunked draw
    ("k100_p0.8_seq", dict(k=100, p=0.8, order=SEQ)),
    ("k100_p0.8_joint", dict(k=100, p=0.8, order=JOINT)),
    ("k3000_p0.95_minp0.01_T1.3_seq", dict(T=1.3, k=3000, p=0.95, mp=0.01, order=SEQ)),
    ("k3000_p0.95_minp0.01_T1.3_joint", dict(T=1.3, k=3000, p=0.95, mp=0.01, order=JOINT)),
    ("k20_minp0.1", dict(k=20, mp=0.1)),
    ("p0.5_minp0.2_joint", dict(p=0.5, mp=0.2, order=JOINT)),
    (
        "per_row",
        dict(T=[0.5, 1.0, 0.0, 2.0], k=[0, 10, 300, 5000], p=[1.0, 0.9, 0.5, 0.97], mp=[0.0, 0.0, 0.05, 0.001]),
    ),
]


def _param(v, n, dtype, default):
    """(tensor or None, scalar) as the op schema wants them."""
    if v is None:
        return None, default
    if isinstance(v, list):
        return torch.tensor((v * n)[:n], dtype=dtype), default
    return None, v


def sample_args(x, is_probs, f, *, indices=None, seeds=None, seed=1234, offset=0):
    n = x.shape[0] if indices is None else indices.numel()
    T_arr, T_val = _param(None if is_probs else f.get("T"), n, torch.float32, 1.0)
    k_arr, k_val = _param(f.get("k"), n, torch.int64, 0)
    p_arr, p_val = _param(f.get("p"), n, torch.float32, 1.0)
    mp_arr, mp_val = _param(f.get("mp"), n, torch.float32, 0.0)
    return (
        x,
        indices,
        is_probs,
        T_arr,
        float(T_val),
        k_arr,
        int(k_val),
        p_arr,
        float(p_val),
        mp_arr,
        float(mp_val),
        int(f.get("order", SEQ)),
        seeds,
        seed,
        offset,
    )


def filter_args(x, kind, is_probs, f):
    B = x.shape[0]
    T_arr, T_val = _param(None if is_probs else f.get("T"), B, torch.float32, 1.0)
    k_arr, k_val = _param(f.get("k"), B, torch.int64, 0)
    p_arr, p_val = _param(f.get("p"), B, torch.float32, 1.0)
    mp_arr, mp_val = _param(f.get("mp"), B, torch.float32, 0.0)
    return (
        x,
        kind,
        is_probs,
        T_arr,
        float(T_val),
        k_arr,
        int(k_val),
        p_arr,
        float(p_val),
        mp_arr,
        float(mp_val),
        int(f.get("order", SEQ)),
    )


def to_device(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


# the filter settings also run in bf16 / fp16 when light=True (the dtype only changes the load)
LIGHT = ("plain", "greedy", "k50", "p0.9", "k100_p0.8_seq", "k3000_p0.95_minp0.01_T1.3_joint", "per_row")


def sample_cases(V=9000, B=4, light=False):
    """(id, args) for ops.sample: every filter setting on logits (fp32/bf16/fp16) and probs."""
    out = []
    for fam in ("randn", "ties", "neginf"):
        x = logits_family(fam, B, V, seed=len(out))
        for dt in (F32, BF16, F16):
            for label, f in FILTERS:
                if light and dt != F32 and label not in LIGHT:
                    continue
                out.append((f"logits-{fam}-{dt}-{label}", sample_args(x.to(dt), False, f, seed=77 + len(out))))
    for fam in ("randn", "zipf", "zeros", "unnormalised"):
        x = probs_family(fam, B, V, seed=len(out))
        for label, f in FILTERS:
            if label in ("greedy", "T0.7"):
                continue
            out.append((f"probs-{fam}-{label}", sample_args(x, True, f, seed=5 + len(out))))
    return out


def special_sample_cases():
    """Indices, per-row seeds, offsets, bad rows, tiny and odd V, peaked rows."""
    out = []
    x = logits_family("randn", 3, 5000, seed=11)
    idx = torch.tensor([2, 2, 2, 0, 1, 2])
    out.append(("indices-scalar-seed", sample_args(x, False, dict(k=40), indices=idx, seed=9)))
    out.append(
        (
            "indices-per-row-seeds",
            sample_args(x, False, dict(p=0.9), indices=idx, seeds=torch.tensor([5, 5, 6, -1, 2**62, 7]), seed=0),
        )
    )
    out.append(("offset-high-bits", sample_args(x, False, dict(), seed=-3, offset=2**40 + 17)))
    out.append(("bad-rows", sample_args(logits_family("bad", 6, 700), False, dict(k=10, p=0.9))))
    out.append(("bad-rows-plain", sample_args(logits_family("bad", 6, 700), False, dict())))
    out.append(("bad-rows-greedy", sample_args(logits_family("bad", 6, 700), False, dict(T=0.0))))
    out.append(("peaked", sample_args(logits_family("peaked", 4, 6000), False, dict(T=0.3))))
    out.append(("flat-p", sample_args(logits_family("flat", 4, 6000), False, dict(p=0.3))))
    for V in (1, 2, 15, 17, 33, 4095, 4097, 8193):
        out.append((f"V{V}", sample_args(logits_family("randn", 3, V, seed=V), False, dict(k=min(V, 3), p=0.7))))
        out.append((f"V{V}-plain", sample_args(logits_family("randn", 3, V, seed=V), False, dict())))
        out.append((f"V{V}-probs-minp", sample_args(probs_family("randn", 3, V, seed=V), True, dict(mp=0.2))))
    return out


def gumbel_cases():
    out = []
    for fam in ("randn", "flat", "ties", "neginf", "bad", "peaked"):
        for dt in (F32, BF16, F16):
            x = logits_family(fam, 5, 3001, seed=3).to(dt)
            out.append((f"{fam}-{dt}", (x, None, None, 99, 0)))
    x = logits_family("randn", 2, 777, seed=4)
    out.append(("indices-seeds", (x, torch.tensor([1, 1, 0]), torch.tensor([3, 3, 4]), 0, 5)))
    out.append(("indices-scalar", (x, torch.tensor([1, 1, 0]), None, 12, 2**33)))
    out.append(("V1", (torch.zeros(2, 1), None, None, 1, 0)))
    return out


def filter_cases(V=7000, B=4, light=False):
    out = []
    sel = [s for s in FILTERS if s[0] not in ("greedy", "minp_tiny")]
    for fam in ("randn", "ties", "neginf", "bad"):
        x = logits_family(fam, B, V, seed=21)
        for dt in (F32, BF16, F16):
            for label, f in sel:
                if light and dt != F32 and label not in LIGHT:
                    continue
                out.append((f"mask-{fam}-{dt}-{label}", filter_args(x.to(dt), 0, False, f)))
        for T in (1.0, 0.6, [0.5, 1.0, 2.0, 4.0]):
            out.append((f"softmax-{fam}-T{T}", filter_args(x, 2, False, dict(T=T))))
    for fam in ("randn", "zipf", "zeros", "unnormalised"):
        x = probs_family(fam, B, V, seed=22)
        for label, f in sel:
            if "T" in f:
                continue
            out.append((f"renorm-{fam}-{label}", filter_args(x, 1, True, f)))
    return out
