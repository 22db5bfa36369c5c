"""Tree attention: kernel vs torch SDPA (dense equivalent mask) and the float64 reference, on every
ISA path; the dense-mask helper; a tiny Llama scoring a token tree in one forward pass; bad input."""

import pytest
import torch
import torch.nn.functional as F

import decodekit
from decodekit import reference as ref

from conftest import ISAS  # noqa: E402  (the `isa` fixture of conftest.py forces each CPU path in turn)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 80, 96, 128, 256]
# (atol, rtol) against fp32 SDPA on the same (upcast) inputs; bf16/fp16 include the output rounding
TOL = {torch.float32: (3e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}


def random_parents(B, T, gen):
    """Random trees: parent[0] = -1, parent[i] uniform in [0, i) (so parent < child)."""
    par = torch.full((B, T), -1, dtype=torch.int64)
    for i in range(1, T):
        par[:, i] = torch.randint(0, i, (B,), generator=gen)
    return par


def make_case(B, T, Hq, Hkv, D, prefix, dtype, layout, gen, slack=3):
    S = max(prefix) + T + slack
    shape = (B, S, Hkv, D) if layout == "NHD" else (B, Hkv, S, D)
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    parents = random_parents(B, T, gen)
    return q, k, v, ref.tree_mask_from_parents(parents), torch.tensor(prefix, dtype=torch.int64)


def sdpa_expected(q, k, v, tree_mask, prefix_lens, layout, sm_scale=None):
    """torch SDPA in fp32 with the dense mask from decodekit.tree_attention_mask."""
    if layout == "NHD":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    B, T, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    mask = decodekit.tree_attention_mask(tree_mask, prefix_lens, S)
    kk = k.float().repeat_interleave(Hq // Hkv, dim=1)
    vv = v.float().repeat_interleave(Hq // Hkv, dim=1)
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), kk, vv, attn_mask=mask, scale=sm_scale)
    return out.transpose(1, 2)


def check_close(out, exp, dtype, what):
    atol, rtol = TOL[dtype]
    err = (out.float() - exp).abs()
    bad = err > atol + rtol * exp.abs()
    assert not bad.any(), f"{what}: max err {err.max().item():.3g} at {bad.nonzero()[0].tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_matches_sdpa(isa, dtype):
    """Every head dim x GQA ratio {1, 4, 8} x layout, random trees, T not a multiple of 8, per-batch
    prefixes including 0 and lengths that are not a multiple of the kernel's key block."""
    gen = torch.Generator().manual_seed(1)
    cases = 0
    for D in HEAD_DIMS:
        for ratio, Hkv in ((1, 2), (4, 1), (8, 1)):
            for layout in ("NHD", "HND"):
                T = [5, 13, 22][cases % 3]
                prefix = [[0, 77], [130, 3], [64, 0]][cases % 3]
                q, k, v, tm, pl = make_case(2, T, ratio * Hkv, Hkv, D, prefix, dtype, layout, gen)
                mask = tm if cases % 2 else decodekit.pack_tree_mask(tm)
                out = decodekit.tree_attention(q, k, v, mask, pl, kv_layout=layout)
                assert out.dtype == dtype and out.shape == q.shape
                check_close(
                    out, sdpa_expected(q, k, v, tm, pl, layout), dtype, f"{isa} {dtype} D={D} G={ratio} {layout} T={T}"
                )
                cases += 1
    assert cases == 30


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_lse_matches_reference(isa, dtype):
    gen = torch.Generator().manual_seed(2)
    for layout, D, (Hq, Hkv) in (("NHD", 128, (8, 2)), ("HND", 80, (4, 4))):
        q, k, v, tm, pl = make_case(3, 11, Hq, Hkv, D, [0, 65, 200], dtype, layout, gen)
        out, lse = decodekit.tree_attention(q, k, v, tm, pl, kv_layout=layout, return_lse=True, sm_scale=0.3)
        rout, rlse = ref.tree_attention(q, k, v, tm, pl, kv_layout=layout, sm_scale=0.3)
        assert lse.dtype == torch.float32 and lse.shape == (3, 11, Hq)
        # natural log: lse = log(sum_s exp(scale * q.k_s)); check base e directly on one row too
        atol = 1e-4 if dtype == torch.float32 else 5e-3
        torch.testing.assert_close(lse, rlse, atol=atol, rtol=1e-5)
        check_close(out, rout.float(), dtype, f"{isa} {dtype} reference")
    anc = tm[2, 4].nonzero().flatten()
    keys = torch.cat([torch.arange(200), 200 + anc])
    s = 0.3 * (k[2, 1, keys].double() @ q[2, 4, 1].double())
    assert abs(lse[2, 4, 1].item() - torch.logsumexp(s, 0).item()) < atol


@pytest.mark.skipif("avx512" not in ISAS, reason="needs AVX-512 BF16")
@pytest.mark.parametrize("mode", ["amx", "dpbf16", "fma"])
def test_bf16_kernels(mode, monkeypatch):
    """The AVX-512 path has three bf16 kernels: AMX tiles (default where the CPU/OS allow it),
    vdpbf16ps (default otherwise) and fp32 FMA after conversion; DECODEKIT_ATTN_BF16 forces one."""
    monkeypatch.setenv("DECODEKIT_ATTN_BF16", mode)
    decodekit.set_isa("avx512")
    try:
        gen = torch.Generator().manual_seed(8)
        for D in HEAD_DIMS:
            for T, prefix, (Hq, Hkv) in ((1, [0, 300], (4, 4)), (21, [129, 64], (8, 1)), (17, [5, 0], (16, 2))):
                q, k, v, tm, pl = make_case(2, T, Hq, Hkv, D, prefix, torch.bfloat16, "HND", gen)
                out, lse = decodekit.tree_attention(q, k, v, tm, pl, kv_layout="HND", return_lse=True)
                check_close(out, sdpa_expected(q, k, v, tm, pl, "HND"), torch.bfloat16, f"{mode} D={D} T={T}")
                rlse = ref.tree_attention(q, k, v, tm, pl, kv_layout="HND")[1]
                torch.testing.assert_close(lse, rlse, atol=5e-3, rtol=1e-5)
    finally:
        decodekit.set_isa("auto")


@pytest.mark.skipif("avx512" not in ISAS, reason="needs AVX-512 BF16")
@pytest.mark.parametrize("mode", ["amx", "dpbf16"])
def test_bf16_kernels_rescaling_and_tree_blocks(mode, monkeypatch):
    """Scores that grow along the prefix (the running max moves often and by a lot: the AMX path's
    lazy rescaling), trees longer than one 64-key block (the AMX path runs the tree keys as masked
    blocks and skips row tiles that attend none of a block), chains, prefix 0 and odd head dims."""
    monkeypatch.setenv("DECODEKIT_ATTN_BF16", mode)
    decodekit.set_isa("avx512")
    try:
        gen = torch.Generator().manual_seed(9)
        for D, T, P, (Hq, Hkv) in (
            (128, 130, 300, (8, 1)),
            (80, 70, 0, (4, 2)),
            (96, 65, 64, (2, 2)),
            (256, 9, 200, (4, 1)),
        ):
            q, k, v, tm, pl = make_case(1, T, Hq, Hkv, D, [P], torch.bfloat16, "HND", gen)
            # keys whose scores rise by ~4 (natural log units) per 64 keys
            ramp = torch.linspace(0.2, 1.0 + 0.07 * P / 8, k.shape[2])[None, None, :, None]
            k = (k.float() * ramp).to(torch.bfloat16)
            for mask in (tm, torch.ones(T, T, dtype=torch.bool).tril()[None]):
                out, lse = decodekit.tree_attention(
                    q, k, v, decodekit.pack_tree_mask(mask), pl, kv_layout="HND", return_lse=True
                )
                check_close(out, sdpa_expected(q, k, v, mask, pl, "HND"), torch.bfloat16, f"{mode} D={D} T={T} P={P}")
                rlse = ref.tree_attention(q, k, v, mask, pl, kv_layout="HND")[1]
                torch.testing.assert_close(lse, rlse, atol=5e-3, rtol=1e-4)
    finally:
        decodekit.set_isa("auto")


def test_edge_shapes(isa):
    gen = torch.Generator().manual_seed(3)
    # T = 1 (plain decode), prefix 0 everywhere, T not a multiple of 8, a 256-node tree
    for B, T, prefix in ((2, 1, [0, 9]), (3, 7, [0, 0, 0]), (1, 1, [0]), (2, 9, [64, 128]), (1, 256, [70])):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, tm, pl = make_case(B, T, 4, 2, 64, prefix, dtype, "NHD", gen)
            out = decodekit.tree_attention(q, k, v, decodekit.pack_tree_mask(tm), pl)
            check_close(out, sdpa_expected(q, k, v, tm, pl, "NHD"), dtype, f"{isa} B={B} T={T} P={prefix}")
    # a chain (causal mask) of 70 nodes == causal attention
    q, k, v, tm, pl = make_case(1, 70, 2, 2, 64, [5], torch.float32, "HND", gen)
    chain = torch.ones(70, 70, dtype=torch.bool).tril()[None]
    out = decodekit.tree_attention(q, k, v, chain, pl, kv_layout="HND")
    check_close(out, sdpa_expected(q, k, v, chain, pl, "HND"), torch.float32, "chain")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_empty_rows_and_batches(dtype):
    q = torch.randn(2, 3, 4, 64).to(dtype)
    k = torch.randn(2, 8, 2, 64).to(dtype)
    v = torch.randn(2, 8, 2, 64).to(dtype)
    tm = torch.zeros(2, 3, 3, dtype=torch.bool)
    tm[1, 2, 0] = True
    out, lse = decodekit.tree_attention(q, k, v, tm, torch.tensor([0, 0]), return_lse=True)
    # a query that attends nothing: out = 0, lse = -inf (as FlashInfer); others are normal
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    assert (out[1, :2] == 0).all() and torch.isfinite(lse[1, 2]).all()
    torch.testing.assert_close(out[1, 2], v[1, 0].repeat_interleave(2, 0))
    # B = 0
    o0 = decodekit.tree_attention(q[:0], k[:0], v[:0], tm[:0], torch.zeros(0, dtype=torch.int64))
    assert o0.shape == (0, 3, 4, 64)


def test_threads_and_strides_do_not_change_results():
    gen = torch.Generator().manual_seed(4)
    q, k, v, tm, pl = make_case(2, 12, 8, 2, 128, [100, 31], torch.float32, "NHD", gen)
    base = decodekit.tree_attention(q, k, v, tm, pl)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decodekit.tree_attention(q, k, v, tm, pl)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(base, one)
    # prefix_lens as a list / an int tensor of another dtype
    assert torch.equal(base, decodekit.tree_attention(q, k, v, tm, [100, 31]))
    assert torch.equal(base, decodekit.tree_attention(q, k, v, tm, pl.int()))
    # a strided q (a view of a bigger tensor) and HND views of an NHD cache
    big = torch.randn(2, 12, 16, 128, generator=gen)
    qv = big[:, :, ::2]
    o1 = decodekit.tree_attention(qv, k, v, tm, pl)
    o2 = decodekit.tree_attention(qv.contiguous(), k.transpose(1, 2), v.transpose(1, 2), tm, pl, kv_layout="HND")
    assert torch.equal(o1, o2)


def test_dense_mask_helper():
    gen = torch.Generator().manual_seed(5)
    par = random_parents(3, 19, gen)
    tm = ref.tree_mask_from_parents(par)
    packed = decodekit.pack_tree_mask(tm)
    assert packed.shape == (3, 19, 3) and packed.dtype == torch.uint8
    assert torch.equal(packed, ref.pack_tree_mask(tm))
    assert torch.equal(decodekit.unpack_tree_mask(packed, 19), tm)
    pl = torch.tensor([0, 5, 40])
    dense = decodekit.tree_attention_mask(tm, pl)
    assert dense.shape == (3, 1, 19, 59) and dense.dtype == torch.bool
    assert torch.equal(dense, ref.tree_attention_dense_mask(tm, pl, 59))
    assert torch.equal(decodekit.tree_attention_mask(packed, pl, 64), ref.tree_attention_dense_mask(tm, pl, 64))
    add = decodekit.tree_attention_mask(tm, pl, 64, dtype=torch.bfloat16)
    assert add.dtype == torch.bfloat16
    assert torch.equal(add == 0, ref.tree_attention_dense_mask(tm, pl, 64))
    assert (add[add != 0] == torch.finfo(torch.bfloat16).min).all()
    # ancestor-or-self: node t sees exactly its root path
    t = 18
    path = []
    j = t
    while j >= 0:
        path.append(j)
        j = int(par[1, j])
    assert sorted(tm[1, t].nonzero().flatten().tolist()) == sorted(path)


def test_opcheck_and_compile():
    gen = torch.Generator().manual_seed(6)
    q, k, v, tm, pl = make_case(2, 6, 4, 2, 64, [3, 10], torch.float32, "NHD", gen)
    torch.library.opcheck(decodekit.ops.tree_attention, (q, k, v, tm, pl, None, "NHD"))
    torch.library.opcheck(
        decodekit.ops.tree_attention,
        (q.bfloat16(), k.bfloat16(), v.bfloat16(), decodekit.pack_tree_mask(tm), pl.int(), 0.2, "NHD"),
    )
    f = torch.compile(lambda *a: decodekit.tree_attention(*a, return_lse=True), fullgraph=True, backend="eager")
    o, l = f(q, k, v, tm, pl)
    o2, l2 = decodekit.tree_attention(q, k, v, tm, pl, return_lse=True)
    assert torch.equal(o, o2) and torch.equal(l, l2)


def test_bad_input():
    q = torch.randn(2, 4, 8, 64)
    k = torch.randn(2, 20, 2, 64)
    v = torch.randn(2, 20, 2, 64)
    tm = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    pl = torch.tensor([3, 16])
    decodekit.tree_attention(q, k, v, tm, pl)  # fine: 16 + 4 <= 20

    def bad(match, *args, **kw):
        with pytest.raises(ValueError, match=match):
            decodekit.tree_attention(*args, **kw)

    bad("v must have k's shape", q, k, torch.randn(2, 20, 4, 64), tm, pl)  # mismatched kv heads
    bad(
        "must be a multiple of the k/v heads",
        torch.randn(2, 4, 6, 64),
        torch.randn(2, 20, 4, 64),
        torch.randn(2, 20, 4, 64),
        tm,
        pl,
    )  # Hq % Hkv != 0
    bad("k head dim", q, torch.randn(2, 20, 2, 128), torch.randn(2, 20, 2, 128), tm, pl)
    bad(
        "head dim must be one of",
        torch.randn(2, 4, 8, 32),
        torch.randn(2, 20, 2, 32),
        torch.randn(2, 20, 2, 32),
        tm,
        pl,
    )
    bad("k batch size", q, k[:1], v[:1], tm, pl)
    bad(r"prefix_lens\[b\] \+ T must be <= the k/v length S = 20", q, k, v, tm, torch.tensor([3, 17]))
    bad("prefix_lens must be >= 0", q, k, v, tm, torch.tensor([-1, 2]))
    bad("prefix_lens must be 1-D of length 2", q, k, v, tm, torch.tensor([1, 2, 3]))
    bad("prefix_lens must be int32 or int64", q, k, v, tm, torch.tensor([1.0, 2.0]))
    bad(r"tree_mask must be bool \[2, 4, 4\]", q, k, v, tm[:, :3], pl)
    bad(r"tree_mask \(bool\) must have shape \[2, 4, 4\]", q, k, v, torch.ones(2, 4, 5, dtype=torch.bool), pl)
    bad(r"tree_mask \(packed uint8\) must have shape \[2, 4, 1\]", q, k, v, torch.ones(2, 4, 2, dtype=torch.uint8), pl)
    bad("tree_mask must be bool", q, k, v, tm.float(), pl)
    bad("q must be float32, bfloat16 or float16", q.double(), k.double(), v.double(), tm, pl)
    bad("k must have q's dtype", q, k.bfloat16(), v, tm, pl)
    bad("v must have q's dtype", q, k, v.half(), tm, pl)
    bad("q must be 4-D", q[0], k, v, tm, pl)
    bad("kv_layout must be", q, k, v, tm, pl, kv_layout="BHSD")
    bad("k must be on q's device", q, k.to("meta"), v, tm, pl)
    bad("tree_mask must be on q's device", q, k, v, tm.to("meta"), pl)
    bad("sm_scale must be finite", q, k, v, tm, pl, sm_scale=float("nan"))
    with pytest.raises(ValueError, match="kv_len must be >="):
        decodekit.tree_attention_mask(tm, pl, 10)


# ---- a real model: tiny Llama, one forward pass over a token tree ---------------------------------
def _tiny_llama(Hq=2, Hkv=1, D=64, layers=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=Hq * D,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=Hq,
        num_key_value_heads=Hkv,
        head_dim=D,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return cfg, transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["sdpa", "decodekit"])
def test_llama_tree_forward_equals_sequential(impl, monkeypatch):
    transformers = pytest.importorskip("transformers")
    cfg, model = _tiny_llama()
    gen = torch.Generator().manual_seed(7)
    P, T = 12, 11
    parents = random_parents(1, T, gen)
    prefix = torch.randint(0, cfg.vocab_size, (1, P), generator=gen)
    tokens = torch.randint(0, cfg.vocab_size, (1, T), generator=gen)
    tm = ref.tree_mask_from_parents(parents)
    positions = P + ref.tree_depths(parents)
    calls = []
    if impl == "decodekit":
        import decodekit.attention as dka

        orig = dka.tree_attention
        monkeypatch.setattr(dka, "tree_attention", lambda *a, **k: calls.append(1) or orig(*a, **k))
        model.set_attn_implementation(decodekit.register_hf_attention())
    else:
        model.set_attn_implementation("sdpa")
    mask = decodekit.tree_attention_mask(tm, [P], P + T, dtype=torch.float32)  # additive, HF convention
    with torch.no_grad():
        cache = transformers.DynamicCache(config=cfg)
        model(prefix, cache=cache, use_cache=True)
        calls.clear()  # count the tree step only (the causal prefix step may take the kernel too)
        tree_logits = model(tokens, cache=cache, position_ids=positions, attention_mask=mask).logits[0]
        model.set_attn_implementation("sdpa")
        for t in range(T):
            path, j = [], t
            while j >= 0:
                path.append(j)
                j = int(parents[0, j])
            seq = torch.cat([prefix[0], tokens[0, path[::-1]]])[None]
            seq_logits = model(seq).logits[0, -1]
            torch.testing.assert_close(tree_logits[t], seq_logits, atol=2e-5, rtol=1e-4)
    if impl == "decodekit":
        assert len(calls) == cfg.num_hidden_layers  # the tree step ran through the kernel in every layer


def test_demo_runs(capsys):
    pytest.importorskip("transformers")
    from decodekit.bench import attention as bench_attn

    res = bench_attn.demo(rounds=3, verbose=False)
    assert res["matches_greedy"], res
    assert res["kernel_calls"] > 0


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the CUDA path is compiled, not run, in CI)"
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(9)
    for D in HEAD_DIMS:
        for layout in ("NHD", "HND"):
            q, k, v, tm, pl = make_case(2, 37, 8, 2, D, [0, 100], dtype, layout, gen)
            mask = decodekit.pack_tree_mask(tm)
            o_cpu, l_cpu = decodekit.tree_attention(q, k, v, mask, pl, kv_layout=layout, return_lse=True)
            o_gpu, l_gpu = decodekit.tree_attention(
                q.cuda(), k.cuda(), v.cuda(), mask.cuda(), pl.cuda(), kv_layout=layout, return_lse=True
            )
            check_close(o_gpu.cpu(), o_cpu.float(), dtype, f"cuda {dtype} D={D} {layout}")
            torch.testing.assert_close(l_gpu.cpu(), l_cpu, atol=1e-3, rtol=1e-5)


# ---- the CUDA kernel's logic, run on CPU fibers by the emulator of tests/cuda_emu -----------------
def _emu():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
    import emu_attn

    if emu_attn.compiler() is None:
        pytest.skip("no host C++ compiler to build the CUDA emulator")
    return emu_attn


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_cuda_kernel_emulated_matches_cpu(dtype):
    """csrc/cuda/attention.cuh under DK_CUDA_EMULATE (CPU fibers) vs the CPU op: every head dim, both
    layouts, packed and bool masks, GQA, prefix 0 and prefixes off the 32-key tile, T = 1 and T > 32."""
    emu = _emu()
    gen = torch.Generator().manual_seed(10)
    cases = [
        (64, "NHD", 2, 37, 8, 2, [0, 45]),
        (80, "HND", 1, 1, 4, 4, [33]),
        (96, "NHD", 1, 5, 8, 1, [0]),
        (128, "HND", 2, 9, 4, 1, [64, 7]),
        (256, "NHD", 1, 3, 2, 2, [31]),
    ]
    for i, (D, layout, B, T, Hq, Hkv, prefix) in enumerate(cases):
        q, k, v, tm, pl = make_case(B, T, Hq, Hkv, D, prefix, dtype, layout, gen)
        mask = decodekit.pack_tree_mask(tm) if i % 2 else tm
        o_cpu, l_cpu = decodekit.tree_attention(q, k, v, mask, pl, kv_layout=layout, return_lse=True)
        # "auto": the tensor-core kernel for bf16 / fp16 at D = 64 / 128 / 256, else the CUDA-core one
        for impl in ("auto", "simt"):
            o_emu, l_emu = emu.tree_attention(q, k, v, mask, pl, None, layout, impl=impl)
            check_close(o_emu, o_cpu.float(), dtype, f"emulated CUDA ({impl}) {dtype} D={D} {layout}")
            check_close(o_emu, sdpa_expected(q, k, v, tm, pl, layout), dtype, f"emulated CUDA vs SDPA D={D}")
            torch.testing.assert_close(l_emu, l_cpu, atol=1e-3 if dtype == torch.float32 else 5e-3, rtol=1e-5)


def test_cuda_kernel_emulated_empty_rows():
    emu = _emu()
    q = torch.randn(1, 3, 2, 64)
    k = torch.randn(1, 3, 2, 64)
    v = torch.randn(1, 3, 2, 64)
    tm = torch.zeros(1, 3, 3, dtype=torch.bool)
    tm[0, 2, 1] = True
    o, l = emu.tree_attention(q, k, v, tm, torch.tensor([0]))
    assert (o[0, :2] == 0).all() and torch.isneginf(l[0, :2]).all()
    torch.testing.assert_close(o[0, 2], v[0, 1])
