"""decodekit's benchmark runner (also reachable as `python -m decodekit bench` and benchmarks/run.py)."""
