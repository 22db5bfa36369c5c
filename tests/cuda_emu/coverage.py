"""Which kernel lines a selection of emulator cases reaches: the sanitizer cases against the whole
emulator suite.

    python tests/cuda_emu/coverage.py            # both selections, then the comparison
    python tests/cuda_emu/coverage.py --missed   # and every line the sanitizer cases miss
    python tests/cuda_emu/coverage.py --per-case # each sanitizer case alone: its lines, and the
                                                 # lines no other case reaches

Runs (1) every emulator item of tests/ (`-k "emu and not tsan and not asan"`) and (2)
emu.SANITIZER_CASES, each in a pytest subprocess with the libraries built with gcov's line counters
(DK_EMU_GCOV=1) and its own GCOV_PREFIX (build/cuda_emu/coverage/all, /san; --reuse keeps the
counts of the previous run of (1)), then reads the counts with `gcov --json-format` and prints, per
kernel file (csrc/cuda, csrc/include/decodekit), the lines (1) executes and how many of them (2)
executes; --missed lists the others by function. A line counts as reached when any library (any
block size) executed it. Takes ~4 min on a 2-core machine with the libraries built. Not a test: a
measure of what the ThreadSanitizer and AddressSanitizer runs (tests/test_cuda_emu_tsan.py,
_asan.py) see."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import emu  # noqa: E402

KERNEL_DIRS = ("csrc/cuda/", "csrc/include/decodekit/")


def reached(args, prefix, run=True):
    """Runs pytest with `args` under gcov into `prefix` (a fresh directory; run=False: reads the
    counts a previous run left there); {(file, line): function} of the kernel lines executed, and
    the set of kernel lines instrumented."""
    if run:
        shutil.rmtree(prefix, ignore_errors=True)
        env = dict(os.environ, DK_EMU_GCOV="1", GCOV_PREFIX=str(prefix))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
        if (r := subprocess.run(cmd, env=env, cwd=emu.ROOT)).returncode != 0:
            sys.exit(f"pytest {' '.join(args)} failed ({r.returncode})")
    hit, lines = {}, set()
    for gcda in Path(prefix).rglob("*.gcda"):
        gcno = Path(str(gcda)[len(str(prefix)) :]).with_suffix(".gcno")
        shutil.copy(gcno, gcda.with_suffix(".gcno"))
        out = subprocess.run(
            ["gcov", "--json-format", "--stdout", "--demangled-names", str(gcda)],
            capture_output=True,
            text=True,
            check=True,
            cwd=gcda.parent,
        ).stdout
        for doc in out.splitlines():
            for f in json.loads(doc)["files"]:
                name = os.path.normpath(f["file"])
                if "csrc/" not in name or not (name := name[name.rfind("csrc/") :]).startswith(KERNEL_DIRS):
                    continue
                for ln in f["lines"]:
                    key = (name, ln["line_number"])
                    lines.add(key)
                    if ln["count"] > 0:
                        hit[key] = ln.get("function_name", "?")
    return hit, lines


def per_case(prefix):
    """Each of emu.SANITIZER_CASES alone under the counters: how many kernel lines it executes and
    how many of them no other case executes (with those lines), the cases in list order; then the
    union. A case with no line of its own adds nothing to what the sanitizer runs reach (its time
    under ThreadSanitizer is the cost: the pytest durations of tests/test_cuda_emu_tsan.py's
    shards)."""
    hits = {c: set(reached([str(emu.ROOT / "tests" / c)], prefix)[0]) for c in emu.SANITIZER_CASES}
    for c, h in hits.items():
        own = sorted(h - set().union(*(g for d, g in hits.items() if d != c)))
        shown = ", ".join(f"{f.rsplit('/', 1)[-1]}:{ln}" for f, ln in own[:8]) + (" ..." if len(own) > 8 else "")
        print(f"{len(h):5} lines, {len(own):4} only here  {c}" + (f"  ({shown})" if own else ""))
    print(f"{len(set().union(*hits.values())):5} lines in all ({len(hits)} cases)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--missed", action="store_true", help="list the lines the sanitizer cases miss")
    ap.add_argument("--reuse", action="store_true", help="the whole suite's counts from the previous run")
    ap.add_argument(
        "--per-case",
        action="store_true",
        help="run each sanitizer case alone (~2-12 s each) and list its lines and the lines only it reaches",
    )
    a = ap.parse_args()
    out = emu.ROOT / "build" / "cuda_emu" / "coverage"
    if a.per_case:
        per_case(out / "case")
        return
    every, lines = reached([str(emu.ROOT / "tests"), "-k", "emu and not tsan and not asan"], out / "all", not a.reuse)
    san, _ = reached([str(emu.ROOT / "tests" / c) for c in emu.SANITIZER_CASES], out / "san")
    per = defaultdict(lambda: [0, 0, 0])
    for f, ln in lines:
        per[f][0] += 1
    for key in every:
        per[key[0]][1] += 1
        per[key[0]][2] += key in san
    print(f"{'file':44} {'lines':>6} {'suite':>6} {'sanitizer cases':>16}")
    tot = [0, 0, 0]
    for f in sorted(per):
        n, e, s = per[f]
        tot = [tot[0] + n, tot[1] + e, tot[2] + s]
        print(f"{f:44} {n:6} {e:6} {s:9} ({100 * s / max(e, 1):3.0f}%)")
    print(f"{'all':44} {tot[0]:6} {tot[1]:6} {tot[2]:9} ({100 * tot[2] / max(tot[1], 1):3.0f}%)")
    if a.missed:
        by_fn = defaultdict(list)
        for key, fn in every.items():
            if key not in san:
                by_fn[(key[0], fn)].append(key[1])
        for (f, fn), lns in sorted(by_fn.items(), key=lambda kv: (kv[0][0], min(kv[1]))):
            print(f"{f}:{min(lns)}-{max(lns)} ({len(lns)} lines) {fn}")


if __name__ == "__main__":
    main()
