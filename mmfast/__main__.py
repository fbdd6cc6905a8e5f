"""mmfast command line: `python -m mmfast {info,check,compile-report,bench}`."""
import os
import sys

COMMANDS = {
    "info": "versions, device, available backends and the C++/CUDA extension",
    "check": "run every op against its reference on this device and print a table (exit 1 on failure)",
    "compile-report": "compile every Triton kernel config and csrc/*.cu for sm_80/sm_90; fail on spills",
    "bench": "the benchmark suites (same as `python -m benchmarks`, run from a source checkout)",
}


def info(argv=None):
    import platform
    import shutil

    import torch
    import triton

    from ._ext import extension_status, load_extension
    from ._table import print_table

    cuda = torch.cuda.is_available()
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    ext_ok, ext_detail = extension_status()
    ext_cuda = ext_ok and load_extension().with_cuda()
    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton.__version__),
        ("CUDA (torch build)", torch.version.cuda or "none"),
        ("device", torch.cuda.get_device_name() if cuda else "cpu (no CUDA device)"),
        ("nvcc", nvcc if nvcc and os.path.exists(nvcc) else "not found"),
        ("backend triton", "yes" if cuda else "CPU only through the interpreter (TRITON_INTERPRET=1)"),
        ("backend cuda (mmfast._C)", "yes" if cuda and ext_cuda else "no"),
        ("backend cpp (mmfast._C)", "yes" if ext_ok else "no"),
        ("extension", ext_detail),
        ("backend reference", "yes"),
    ]
    print_table("mmfast info", ["item", "value"], rows)
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m mmfast {" + ",".join(COMMANDS) + "} [options]\n")
        for name, text in COMMANDS.items():
            print(f"  {name:<15} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        return info(rest)
    if command == "check":
        import torch

        if not torch.cuda.is_available():
            # before mmfast.kernels is imported: Triton decides at @jit time whether to interpret
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from .check import main as check_main

        return check_main(rest)
    if command == "bench":
        try:
            from benchmarks.__main__ import main as bench_main
        except ImportError:
            print("python -m mmfast bench: the benchmarks live in the source tree (benchmarks/), which is not "
                  "importable here; run it from a checkout of mmfast's repository", file=sys.stderr)
            return 2
        return bench_main(rest)
    from .compile_report import main as report_main

    return report_main(rest)


if __name__ == "__main__":
    sys.exit(main())
