"""The one benchmark runner behind `python -m decodekit bench` and `python benchmarks/run.py`.

Each benchmark is a module decodekit.bench.<name> with `run(quick: bool = False, json_path=None) -> dict`;
modules that do not exist (yet) are skipped with a note, so the runner works on any checkout.
"""

import argparse
import importlib
import importlib.util
import inspect
import os
import time
import traceback
from typing import Dict, List, Optional

import torch

BENCHMARKS = ("sampling", "pipeline", "speculative", "attention", "hf")


def available() -> List[str]:
    out = []
    for name in BENCHMARKS:
        try:
            if importlib.util.find_spec(f"decodekit.bench.{name}") is not None:
                out.append(name)
        except ImportError:
            pass
    return out


def load(name: str):
    """The benchmark module, or None when it does not exist."""
    if name not in available():
        return None
    return importlib.import_module(f"decodekit.bench.{name}")


def _call(fn, **kwargs):
    """Call fn with the keyword arguments its signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def parse_only(only) -> List[str]:
    if not only:
        return list(BENCHMARKS)
    names = [s.strip() for s in (only.split(",") if isinstance(only, str) else only) if s.strip()]
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        raise SystemExit(f"--only: unknown benchmark(s) {bad}; choose from {', '.join(BENCHMARKS)}")
    return names


def run_all(
    quick: bool = False, only=None, out_dir: str = "bench_results", threads: Optional[int] = None, clock: str = "wall"
) -> Dict:
    """Run the selected benchmarks; returns {name: result dict or None}. A failing benchmark is reported
    and the others still run."""
    names = parse_only(only)
    threads = threads or int(os.environ.get("DECODEKIT_BENCH_THREADS", 0)) or min(2, os.cpu_count() or 1)
    if clock == "cpu":
        threads = 1  # CPU time of the calling thread is only the whole cost when everything runs on it
    torch.set_num_threads(threads)
    print(
        f"decodekit benchmarks ({'quick' if quick else 'full'}): torch.set_num_threads({threads}), "
        f"clock={clock}, results under {out_dir}/"
    )
    results: Dict = {}
    for name in names:
        mod = load(name)
        if mod is None or not hasattr(mod, "run"):
            print(f"\n[{name}] skipped: decodekit.bench.{name} is not in this build")
            results[name] = None
            continue
        json_path = os.path.join(out_dir, f"{name}{'_quick' if quick else ''}{'_cpu' if clock == 'cpu' else ''}.json")
        t0 = time.perf_counter()
        try:
            results[name] = _call(
                mod.run,
                quick=quick,
                json_path=json_path,
                threads=threads,
                **({"clock": clock} if clock != "wall" else {}),
            )
        except Exception:  # keep going: one broken benchmark must not hide the others
            traceback.print_exc()
            print(f"[{name}] FAILED after {time.perf_counter() - t0:.1f} s")
            results[name] = {"error": traceback.format_exc()}
        torch.set_num_threads(threads)
    return results


def add_args(p: argparse.ArgumentParser, default_quick: bool):
    if default_quick:
        p.add_argument("--full", action="store_true", help="all shapes (minutes) instead of the quick subset")
    else:
        p.add_argument("--quick", action="store_true", help="a small subset of shapes (well under a minute each)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for every benchmark (default: min(2, cores) or $DECODEKIT_BENCH_THREADS)",
    )
    p.add_argument("--out", default="bench_results", help="folder for the JSON files and plots")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall (default): median wall time; cpu: median CPU time of the calling thread with 1 thread "
        "(numbers that hold on a busy shared machine; benchmarks without the option ignore it)",
    )


def main(argv=None, prog: str = "benchmarks/run.py", default_quick: bool = False) -> int:
    p = argparse.ArgumentParser(
        prog=prog,
        description="decodekit microbenchmarks: decodekit, the torch reference "
        "and the installed peers side by side, with the memory-read floor",
    )
    add_args(p, default_quick)
    a = p.parse_args(argv)
    quick = (not a.full) if default_quick else a.quick
    res = run_all(quick=quick, only=a.only, out_dir=a.out, threads=a.threads, clock=a.clock)
    return 1 if any(isinstance(r, dict) and "error" in r for r in res.values()) else 0
