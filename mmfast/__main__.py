"""mmfast command line: `python -m mmfast {info,check,compile-report,bench,verify,train}`.

Nothing heavy is imported before a subcommand has parsed its arguments, so `--help` answers at once.
"""
import os
import sys

COMMANDS = {
    "info": "versions, device, and per op: what backend='auto' runs here and why any backend is unavailable",
    "check": "run every op against its reference on this device and print a table (exit 1 on failure)",
    "compile-report": "compile every Triton kernel config and csrc/*.cu for sm_80/sm_90; fail on spills",
    "bench": "the benchmark suites (mmfast.benchmarks; `python -m benchmarks` in a source checkout)",
    "verify": "build a model (HF config dir, timm / open_clip name), patch it, compare with the unpatched run",
    "train": "train clip|moco|albef|blip (--preset tiny --steps N); one process or torchrun with DDP / FSDP2",
}


def _info_parser():
    import argparse

    return argparse.ArgumentParser(
        prog="python -m mmfast info",
        description="Versions, the device, the C++/CUDA extension, and for every op of the registry what "
        "backend='auto' runs on CUDA and on CPU tensors here and why each other backend cannot run. "
        "Never builds the C++ extension.")


def _op_rows(cuda):
    """(op, backend, on CUDA tensors, on CPU tensors) for every op of the registry: xformers-style reasons."""
    import torch

    from mmfast.kernels._dispatch import auto_backend, resolve_backend, unavailable_reason
    from mmfast.kernels._registry import FAMILIES

    devices = (torch.device("cuda"), torch.device("cpu"))
    rows = []
    for fam in FAMILIES:
        for op, accelerated in fam.ops.items():
            auto = []
            for device in devices:
                if device.type == "cuda" and not cuda:
                    auto.append("— (no CUDA device here)")
                    continue
                try:
                    chosen = resolve_backend(op, "auto", device)
                except ValueError as exc:
                    chosen = f"error: {exc}"
                note = " (MMFAST_BACKEND)" if chosen != auto_backend(op, device) else ""
                auto.append(f"runs {chosen}{note}")
            rows.append((op, "auto", *auto))
            for backend in tuple(accelerated) + ("reference",):
                cells = []
                for device in devices:
                    if device.type == "cuda" and not cuda:
                        cells.append("—")
                        continue
                    reason = unavailable_reason(backend, device)
                    cells.append("yes" if reason is None else f"no: {reason}")
                rows.append(("", backend, *cells))
    return rows


def info(argv=None):
    _info_parser().parse_args(argv)
    import platform

    import torch
    import triton

    from . import _ext
    from ._table import print_table
    from .compile_report import find_nvcc

    cuda = torch.cuda.is_available()
    nvcc = find_nvcc()
    module, reason = _ext.loaded_extension()
    if module is not None:
        ext = f"{module.__name__} ({'CUDA+CPU' if module.with_cuda() else 'CPU only'}), loaded from {module.__file__}"
    else:
        ext = reason
    rows = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("mmfast", __import__("mmfast").__version__),
        ("torch", torch.__version__),
        ("triton", triton.__version__),
        ("CUDA (torch build)", torch.version.cuda or "none"),
        ("device", torch.cuda.get_device_name() if cuda else "cpu (no CUDA device)"),
        ("nvcc", nvcc or "not found"),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")),
        ("MMFAST_BACKEND", os.environ.get("MMFAST_BACKEND", "unset (auto)")),
        ("C++ extension", ext),
        ("extension build folder", _ext.build_dir()),
    ]
    print_table("mmfast info", ["item", "value"], rows)
    print_table("backends per op: what backend='auto' runs, and whether each backend can run here (and why not)",
                ["op", "backend", "on CUDA tensors", "on CPU tensors"], _op_rows(cuda))
    return 0


def _usage(file=sys.stdout):
    print("usage: python -m mmfast {" + ",".join(COMMANDS) + "} [options]   (COMMAND --help for its options)\n",
          file=file)
    for name, text in COMMANDS.items():
        print(f"  {name:<15} {text}", file=file)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _usage()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"python -m mmfast: unknown command {command!r}\n", file=sys.stderr)
        _usage()
        return 2
    if command == "info":
        return info(rest)
    if command == "check":
        from .check import main as check_main

        return check_main(rest)
    if command == "verify":
        from .verify_cli import main as verify_main

        return verify_main(rest)
    if command == "bench":
        from mmfast.benchmarks.__main__ import main as bench_main

        return bench_main(rest, prog="python -m mmfast bench")
    if command == "train":
        from .training import main as train_main

        return train_main(rest)
    from .compile_report import main as report_main

    return report_main(rest)


if __name__ == "__main__":
    sys.exit(main())
