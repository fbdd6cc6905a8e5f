"""Benchmarks for mmfast's kernels: `python -m benchmarks --suite ema`, or `pytest benchmarks/ --benchmark-only`.

`run_suite(suites=["ema"], mode="smoke", out_dir=path, device="cpu")` runs them from Python and
returns the report dict (the CI smoke test calls it).
"""
from .common import run_suite

__all__ = ["run_suite"]
