"""`python -m mmfast check`: every op against its reference at small, realistic shapes on this device.

On a CPU-only machine the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1 is set by
the CLI before mmfast.kernels is imported). Exit status is non-zero if any case fails.
"""
from dataclasses import dataclass

import torch

from ._table import print_table, progress


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


def _vit_param_shapes(depth, dim, mlp_ratio=4, patch=16, tokens=197):
    """Parameter shapes of a small ViT: a realistic mix of big matrices and tiny vectors."""
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    hidden = dim * mlp_ratio
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,)]
        shapes += [(dim,), (dim,), (hidden, dim), (hidden,), (dim, hidden), (dim,)]
    return shapes + [(dim,), (dim,)]


def _ema_cases(device):
    from mmfast.kernels import ema_update_
    from mmfast.kernels.reference import ema_update_reference

    shapes = _vit_param_shapes(depth=2, dim=96)
    numel = sum(torch.Size(s).numel() for s in shapes)
    backends = ("triton", "cuda", "reference") if device.type == "cuda" else ("triton", "cpp", "reference")
    dtype_pairs = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    momentum = 0.996
    for backend in backends:
        for ema_dtype, src_dtype in dtype_pairs:

            def run(backend=backend, ema_dtype=ema_dtype, src_dtype=src_dtype):
                g = torch.Generator().manual_seed(0)
                ema = [torch.randn(s, generator=g).to(device, ema_dtype) for s in shapes]
                src = [torch.randn(s, generator=g).to(device, src_dtype) for s in shapes]
                exact = [(e.double() * momentum + s.double() * (1 - momentum)) for e, s in zip(ema, src)]
                expected = [e.clone() for e in ema]
                ema_update_reference(expected, src, momentum)
                ema_update_(ema, src, momentum, backend=backend)
                err = max((e.double() - x).abs().max().item() for e, x in zip(ema, exact))
                ref_err = max((e.double() - x).abs().max().item() for e, x in zip(expected, exact))
                bitwise = all(torch.equal(a, b) for a, b in zip(ema, expected))
                tol = 2 * ref_err + 1e-7
                return err, tol, bitwise, err <= tol and bitwise

            yield ("ema_update_", backend, f"{names[ema_dtype]}<-{names[src_dtype]}",
                   f"ViT-2x96 list ({len(shapes)} tensors, {numel:,} el)", run)


def _require_backend(backend):
    """A backend that would fall back to another one has not been checked: fail its cases instead."""
    if backend in ("cpp", "cuda"):
        from ._ext import extension_error, load_extension

        ext = load_extension()
        if ext is None:
            raise RuntimeError(f"extension unavailable: {extension_error()}")
        if backend == "cuda" and not ext.with_cuda():
            raise RuntimeError("mmfast._C was built without CUDA")


def run_checks(device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = list(_ema_cases(device))
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
    args = parser.parse_args(argv)
    device, results = run_checks(args.device)
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
