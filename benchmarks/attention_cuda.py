"""CUDA tree-attention benchmark (the issue-16 shapes): decodekit's tensor-core kernel vs torch SDPA
with the equivalent dense bool mask vs FlashInfer's custom-mask single prefill (when
flashinfer-python is installed), side by side on the same inputs, with the K/V read floor.

    python benchmarks/attention_cuda.py [--prefix 2048 8192] [--T 64] [--reps 100]

B = 1, Hq/Hkv = 32/8, D = 128, bf16, NHD cache, a random tree. Times are medians of CUDA-event
timings. The floor is the bytes of K and V (read once) divided by the measured device-to-device
copy bandwidth (read + write of a 1 GiB buffer, counted as 2 GiB moved).
Needs a CUDA device; it exits with a message otherwise.
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from cuda_timing import copy_bandwidth, cuda_time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_cuda: needs a CUDA device")
    import decodekit
    from decodekit import reference as ref

    try:
        import flashinfer
    except ImportError:
        flashinfer = None
    B, Hq, Hkv, D, T, dt = 1, 32, 8, 128, args.T, torch.bfloat16
    bw = copy_bandwidth()
    print(
        f"{torch.cuda.get_device_name()}; torch {torch.__version__} (CUDA {torch.version.cuda}); copy bandwidth {bw / 1e9:.0f} GB/s"
    )
    print(
        "prefix | decodekit us | SDPA us | FlashInfer us | SDPA/dk | FI/dk | dk TFLOP/s | K/V floor us | max |dk - SDPA|"
    )
    gen = torch.Generator().manual_seed(0)
    for P in args.prefix:
        S = P + T
        parents = torch.full((B, T), -1, dtype=torch.int64)
        for i in range(1, T):
            parents[:, i] = torch.randint(0, i, (B,), generator=gen)
        tm = ref.tree_mask_from_parents(parents).cuda()
        q = torch.randn(B, T, Hq, D, generator=gen).to(dt).cuda()
        k = torch.randn(B, S, Hkv, D, generator=gen).to(dt).cuda()
        v = torch.randn(B, S, Hkv, D, generator=gen).to(dt).cuda()
        pl = torch.full((B,), P, dtype=torch.int64, device="cuda")
        packed = decodekit.pack_tree_mask(tm)
        dense = decodekit.tree_attention_mask(tm, pl, S)  # [B, 1, T, S] bool
        qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        def f_dk():
            return decodekit.tree_attention(q, k, v, packed, pl, kv_layout="NHD")

        def f_sdpa():
            return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=dense, enable_gqa=True)

        t_dk = cuda_time(f_dk, 10, args.reps)
        t_sd = cuda_time(f_sdpa, 10, args.reps)
        t_fi = None
        if flashinfer is not None:
            m2 = dense[0, 0].contiguous()

            def f_fi():
                return flashinfer.single_prefill_with_kv_cache(q[0], k[0], v[0], custom_mask=m2, kv_layout="NHD")

            t_fi = cuda_time(f_fi, 10, args.reps)
        err = (f_dk().float() - f_sdpa().transpose(1, 2).float()).abs().max().item()
        flops = 4.0 * Hq * D * (T * P + int(tm.sum()))
        floor = 2 * Hkv * S * D * 2 / bw
        fi = f"{t_fi * 1e6:.1f}" if t_fi else "n/a"
        fir = f"{t_fi / t_dk:.2f}x" if t_fi else "n/a"
        print(
            f"{P} | {t_dk * 1e6:.1f} | {t_sd * 1e6:.1f} | {fi} | {t_sd / t_dk:.2f}x | {fir} | "
            f"{flops / t_dk / 1e12:.1f} | {floor * 1e6:.1f} | {err:.3g}"
        )


if __name__ == "__main__":
    main()
