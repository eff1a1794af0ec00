"""Benchmarks of decomp: each script writes JSON rows, then renders markdown (and plots) from them.

Run them as modules from the repository root, e.g. ``python -m benchmarks.bench_tucker``.
"""
