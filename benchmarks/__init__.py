"""Benchmarks for mmfast's kernels, installed as ``mmfast.benchmarks``: `python -m mmfast bench --suite ema`
(`python -m benchmarks` in a source checkout), or `pytest benchmarks/ --benchmark-only` in a checkout.

`run_suite(suites=["ema"], mode="smoke", out_dir=path, device="cpu")` runs them from Python and
returns the report dict (the CI smoke test calls it).
"""
__all__ = ["run_suite"]


def __getattr__(name):
    # lazy: importing the package (e.g. for `--help`) must not import torch
    if name == "run_suite":
        from .common import run_suite

        return run_suite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
