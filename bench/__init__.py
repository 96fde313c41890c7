"""Benchmarks against their baselines; `make bench` runs `python -m bench.run`."""
