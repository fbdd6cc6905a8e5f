"""python -m benchmarks --suite ema [--quick | --smoke] [--budget-s N] [--out DIR] [--device cpu|cuda]"""
import argparse
import sys

import torch

from .common import SUITES, default_out_dir, run_suite, to_markdown, write_reports


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--suite", action="append", choices=sorted(SUITES), help="suite to run (repeatable; default: ema)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: proves every case runs (seconds)")
    ap.add_argument("--budget-s", type=float, help="wall-clock budget; cases past it are reported as skipped")
    ap.add_argument("--out", help="report directory (default: benchmarks/results/<date>-<card>)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    report = run_suite(args.suite or ["ema"], mode=mode, device=args.device, budget_s=args.budget_s)
    out = args.out or default_out_dir(report)
    write_reports(report, out)
    print()
    print(to_markdown(report))
    print(f"wrote {out}/report.json and {out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
