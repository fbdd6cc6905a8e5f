"""python -m benchmarks [--suite ema,attention,...] [--quick | --smoke] [--budget-s N] [--out DIR]
                        [--device cpu|cuda] [--compare OLD.json [--new NEW.json]]

Runs the suites (default: all), writes report.json / report.md / time.png / roofline.png to --out
(default benchmarks/results/<date>-<card>/). With --compare, also compares against an earlier
report.json and exits 1 when a case regressed beyond noise; with --compare and --new, compares two
existing reports without running anything.
"""
import argparse
import json
import os
import sys

import torch

from .common import SUITES, default_out_dir, run_suite
from .report import compare, compare_markdown, to_markdown, write_reports


def _suites(values):
    names = [n.strip() for v in values or ["all"] for n in v.split(",") if n.strip()]
    if "all" in names:
        return sorted(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {unknown}; choose from {sorted(SUITES)} or 'all'")
    return list(dict.fromkeys(names))


def _load(path):
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", action="append", metavar="NAMES",
                    help=f"comma-separated suites, repeatable: {', '.join(sorted(SUITES))} or all (default)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats: fits a short GPU lease")
    size.add_argument("--smoke", action="store_true", help="tiny sizes on any device: proves every case runs (seconds)")
    ap.add_argument("--budget-s", type=float, help="wall-clock budget; cases past it are reported as skipped")
    ap.add_argument("--out", help="report directory (default: benchmarks/results/<date>-<card>)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    ap.add_argument("--compare", metavar="OLD.json", help="compare with an earlier report; exit 1 on a regression")
    ap.add_argument("--new", metavar="NEW.json", help="with --compare: compare this report instead of running")
    args = ap.parse_args(argv)
    if args.new and not args.compare:
        ap.error("--new needs --compare OLD.json")
    if args.compare and args.new:
        old, new = _load(args.compare), _load(args.new)
        rows = compare(old, new)
        print(compare_markdown(rows, old, new))
        return 1 if any(r["verdict"].startswith("regression") for r in rows) else 0
    try:
        suites = _suites(args.suite)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if mode == "smoke" and (args.device == "cpu" or not torch.cuda.is_available()):
        # smoke proves every case runs, ours included: Triton kernels go through the interpreter off the GPU.
        # Set before any suite imports mmfast.kernels (Triton decides at @jit time whether to interpret).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    report = run_suite(suites, mode=mode, device=args.device, budget_s=args.budget_s)
    out = args.out or default_out_dir(report)
    write_reports(report, out)
    print()
    print(to_markdown(report))
    print(f"wrote {out}/report.json and {out}/report.md")
    if args.compare:
        old = _load(args.compare)
        rows = compare(old, report)
        text = compare_markdown(rows, old, report)
        with open(os.path.join(out, "compare.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        return 1 if any(r["verdict"].startswith("regression") for r in rows) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
