"""`python -m mmfast check`: every op against its reference at small, realistic shapes on this device.

On a CPU-only machine the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set by
the CLI before mmfast.kernels is imported). Exit status is non-zero if any case fails.
"""
import importlib
from dataclasses import dataclass

import torch

from ._table import print_table, progress

# One module per kernel family under mmfast/checks/, each with `cases(device)` yielding
# (op, backend, dtype, shape, run) where run() -> (max_error, tolerance, bitwise, passed).
FAMILIES = ("ema", "attention", "contrastive", "patch_embed", "gated_linear")


@dataclass
class CheckResult:
    op: str
    backend: str
    dtype: str
    shape: str
    max_error: float
    tolerance: float
    bitwise: bool  # bit-for-bit equal to the reference (for ops that promise it)
    passed: bool
    detail: str = ""


def _require_backend(backend):
    """A backend that would fall back to another one has not been checked: fail its cases instead."""
    if backend in ("cpp", "cuda"):
        from ._ext import extension_error, load_extension

        ext = load_extension()
        if ext is None:
            raise RuntimeError(f"extension unavailable: {extension_error()}")
        if backend == "cuda" and not ext.with_cuda():
            raise RuntimeError("mmfast._C was built without CUDA")


def _check_families(families):
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown kernel families {unknown}; choose from {', '.join(FAMILIES)}")


def run_checks(device=None, families=FAMILIES):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _check_families(families)
    cases = [case for family in families for case in importlib.import_module(f"mmfast.checks.{family}").cases(device)]
    results = []
    for op, backend, dtype, shape, run in progress(cases, f"checking {len(cases)} cases on {device}"):
        try:
            _require_backend(backend)
            err, tol, bitwise, ok = run()
            results.append(CheckResult(op, backend, dtype, shape, err, tol, bitwise, ok))
        except Exception as exc:  # a crash is a failed check, reported in the table
            results.append(CheckResult(op, backend, dtype, shape, float("nan"), float("nan"), False, False,
                                       f"{type(exc).__name__}: {exc}"))
    return device, results


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmfast check", description=__doc__)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--only", default=None, metavar="FAMILIES",
                        help=f"comma-separated kernel families to check (default: all of {', '.join(FAMILIES)})")
    args = parser.parse_args(argv)
    families = FAMILIES if args.only is None else tuple(f.strip() for f in args.only.split(",") if f.strip())
    try:
        _check_families(families)
    except ValueError as exc:
        parser.error(f"--only: {exc}")
    device, results = run_checks(args.device, families)
    rows = [
        (r.op, r.backend, r.dtype, r.shape, f"{r.max_error:.2e}", f"{r.tolerance:.2e}",
         "yes" if r.bitwise else "no", "PASS" if r.passed else "FAIL " + r.detail)
        for r in results
    ]
    mode = "" if device.type == "cuda" else " (Triton through the interpreter)"
    print_table(f"mmfast check on {device}{mode}", ["op", "backend", "dtype", "shape", "max error vs fp64",
                                                    "tolerance", "bitwise = reference", "result"], rows)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0
