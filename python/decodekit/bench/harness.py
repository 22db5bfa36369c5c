"""Timing helpers shared by every benchmark: median of repeated runs after warm-up, memory
bandwidth measurement for the read floor, hot/cold cache handling and table printing."""

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

_FLUSH = None


def flush_caches(nbytes: int = 512 << 20):
    """Evict caches by streaming through a buffer larger than the LLC (cold measurements)."""
    global _FLUSH
    if _FLUSH is None or _FLUSH.numel() * 4 < nbytes:
        _FLUSH = torch.ones(nbytes // 4, dtype=torch.float32)
    _FLUSH.add_(1.0)


def timeit(
    fn: Callable, *, warmup: int = 3, reps: int = 15, min_time: float = 0.2, cold: bool = False, max_reps: int = 2000
) -> float:
    """Median wall time of fn() in seconds. cold=True flushes the caches before every call."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start < min_time and len(times) < max_reps):
        if cold:
            flush_caches()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_BW: Dict[str, float] = {}


def bandwidth(cold: bool = True, clock: Callable[[], float] = time.perf_counter) -> float:
    """Measured read bandwidth in bytes/s with the current torch thread count: a sum over a
    buffer far larger than the LLC (cold) or one that fits in L2 (hot)."""
    key = f"{cold}-{torch.get_num_threads()}-{clock.__name__}"
    if key not in _BW:
        n = (1 << 30) if cold else (1 << 20)  # 1 GiB vs 1 MiB of float32
        buf = torch.ones(n // 4, dtype=torch.float32)
        for _ in range(2):
            buf.sum()
        # the best of the runs, not the median: a floor wants the bandwidth the machine can reach, and on
        # a shared machine a preempted run would otherwise drag it down (seen: 0.1 GB/s "hot" under load)
        times = []
        for _ in range(7 if cold else 200):
            t0 = clock()
            buf.sum()
            times.append(clock() - t0)
        _BW[key] = n / min(times)
    return _BW[key]


def floor_seconds(nbytes: int, cold: bool) -> float:
    return nbytes / bandwidth(cold)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def fmt_us(t: Optional[float]) -> str:
    if t is None:
        return "-"
    return f"{t * 1e6:,.1f}"


def print_table(title: str, header: List[str], rows: List[List[str]]):
    widths = (
        [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
        if rows
        else [len(h) for h in header]
    )
    print(f"\n{title}")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths)) + " |")


def save_json(path: str, payload):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
