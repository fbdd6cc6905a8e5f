"""`python -m mmfast check`: every op against its reference at small, realistic shapes on this device.

On a CPU-only machine the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set
before mmfast.kernels is imported). `--dtype float64` runs only backend="reference", in float64, against
an independent float64 torch formulation of each op. Exit status is non-zero if any case fails.
"""
import inspect
from dataclasses import dataclass

from ._cli import prepare_device

# The families come from mmfast.kernels._registry.FAMILIES; family NAME's cases live in
# mmfast/checks/NAME.py as `cases(device, dtype=None)` yielding (op, backend, dtype, shape, run) where
# run() -> (max_error, tolerance, bitwise, passed).
DTYPES = ("float64",)


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


def family_names():
    from mmfast.kernels._registry import NAMES

    return NAMES


def _check_families(families):
    names = family_names()
    unknown = sorted(set(families) - set(names))
    if unknown:
        raise ValueError(f"unknown kernel families {unknown}; choose from {', '.join(names)}")


def _family_cases(name, device, dtype):
    """The family's cases, or one failing row that says why it has none for `dtype`."""
    from mmfast.kernels._registry import family

    fam = family(name)
    module = fam.checks
    if dtype is None:
        return list(module.cases(device))
    if "dtype" not in inspect.signature(module.cases).parameters:
        reason = (f"mmfast.checks.{name}.cases(device) takes no dtype: family {name!r} has no "
                  f"{str(dtype).replace('torch.', '')} check yet")

        def missing():
            raise NotImplementedError(reason)

        return [(op, "reference", str(dtype).replace("torch.", ""), "—", missing) for op in fam.ops]
    return list(module.cases(device, dtype=dtype))


def run_checks(device=None, families=None, dtype=None):
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    families = family_names() if families is None else tuple(families)
    _check_families(families)
    cases = [case for name in families for case in _family_cases(name, device, dtype)]
    results = []
    from ._table import progress

    for op, backend, case_dtype, shape, run in progress(cases, f"checking {len(cases)} cases on {device}"):
        try:
            _require_backend(backend)
            err, tol, bitwise, ok = run()
            results.append(CheckResult(op, backend, case_dtype, shape, err, tol, bitwise, ok))
        except Exception as exc:  # a crash is a failed check, reported in the table
            results.append(CheckResult(op, backend, case_dtype, shape, float("nan"), float("nan"), False, False,
                                       f"{type(exc).__name__}: {exc}"))
    return device, results


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmfast check", description=__doc__)
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--only", default=None, metavar="FAMILIES",
                        help="comma-separated kernel families to check (default: every family of "
                        "mmfast.kernels._registry; `python -m mmfast info` lists them)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="float64: run backend='reference' in float64 against an independent float64 torch "
                        "formulation (what checking a model's numerics in float64 runs)")
    return parser


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)  # before any torch import: --help answers at once

    import torch

    prepare_device(parser, args.device)
    families = None if args.only is None else tuple(f.strip() for f in args.only.split(",") if f.strip())
    if families is not None:
        try:
            _check_families(families)
        except ValueError as exc:
            parser.error(f"--only: {exc}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    device, results = run_checks(args.device, families, dtype)
    rows = [
        (r.op, r.backend, r.dtype, r.shape, f"{r.max_error:.2e}", f"{r.tolerance:.2e}",
         "yes" if r.bitwise else "no", "PASS" if r.passed else "FAIL " + r.detail)
        for r in results
    ]
    if dtype is not None:
        mode = f", {args.dtype}: backend='reference' against an independent {args.dtype} formulation"
    else:
        from mmfast.kernels._common import interpreting

        mode = " (Triton through the interpreter)" if device.type == "cpu" and interpreting() else ""
    from ._table import print_table

    print_table(f"mmfast check on {device}{mode}", ["op", "backend", "dtype", "shape", "max error vs fp64",
                                                    "tolerance", "bitwise = reference", "result"], rows)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0
