"""Timing helpers shared by the CUDA benchmark scripts of this folder."""

import statistics

import torch


def cuda_time(fn, warmup, reps, graph=False):
    """Median seconds of fn() by CUDA events; graph=True: of replays of a CUDA graph of one call."""
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def copy_bandwidth(timer=cuda_time, device="cuda", nbytes=1 << 30):
    """Device copy bandwidth in bytes/s: read + write of an nbytes buffer, counted as 2 * nbytes moved."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / timer(lambda: y.copy_(x), 3, 10)
