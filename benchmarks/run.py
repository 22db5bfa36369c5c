#!/usr/bin/env python3
"""decodekit's benchmark runner (the same as `python -m decodekit bench`).

    python benchmarks/run.py [--quick] [--only sampling,speculative,attention] [--threads N] [--out DIR]

Runs decodekit.bench.<name>.run(quick=...) for every benchmark module present in the installed
decodekit; results (JSON + PNG) go to bench_results/.
"""

import sys

from decodekit.bench.runner import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="benchmarks/run.py", default_quick=False))
