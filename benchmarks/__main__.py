"""python -m mmfast bench [--suite ema,attention,...] [--quick | --smoke] [--headline | --rest] [--budget-s N]
                         [--out DIR] [--device cpu|cuda] [--compare OLD.json [--new NEW.json]] [--plan]
python -m mmfast bench tune --family attention [--budget-s N] [--shapes all|headline] [--dry-run]
python -m mmfast bench profile --suite NAMES [--match TEXT] [--case NAME] [--smoke] [--calls N] [--out DIR]
(`python -m benchmarks` in a source checkout is the same command)

Runs the suites (default: all; one per kernel family of mmfast.kernels._registry), writes report.json,
report.md, time.png and roofline.png to --out (default: benchmarks/results/<date>-<card>/ in a source
checkout, ./mmfast-benchmarks/<date>-<card>/ otherwise), lists the files it wrote and prints a short
summary (the full tables are in report.md). With --compare, also compares against an earlier
report.json and exits 1 when a case regressed beyond noise; with --compare and --new, compares two
existing reports without running anything. With --budget-s, each workload's mmfast cases run together with
their baselines, the suites round-robin (attention first), and what does not fit is skipped with the reason
(benchmarks/schedule.py); --plan prints that order with the estimated seconds and runs nothing (--device
cuda is then accepted without a GPU). With --out, report.json is rewritten after every workload, so a run
killed by an outer timeout still leaves what it measured.
"""
import argparse
import json
import os
import sys


def _names(values):
    return [n.strip() for v in values or ["all"] for n in v.split(",") if n.strip()]


def _load(path):
    with open(path) as f:
        return json.load(f)


def _parser(prog):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", action="append", metavar="NAMES",
                    help="comma-separated suites, repeatable: the kernel families (ema, attention, contrastive, "
                    "patch_embed, gated_linear; `python -m mmfast info` lists them), swap (Hugging Face models before / after "
                    "mmfast.patch), models (training steps of CLIP and BLIP "
                    "vs Hugging Face / open_clip) or all (default)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats: fits a short GPU lease")
    size.add_argument("--smoke", action="store_true", help="tiny sizes on any device: proves every case runs (seconds)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--headline", action="store_true",
                       help="only the headline workloads (attention at FlashAttention-3's L=1024 / 4096 D=64 and "
                       "ViT-L/14@336, CLIP loss at 32k, EMA on ViT-L, ViT-L/14 patch embedding, one gated GEMM and "
                       "block, CLIP's training step patched): the GPU check's first step")
    which.add_argument("--rest", action="store_true", help="every workload but the headline ones")
    ap.add_argument("--budget-s", type=float, help="wall-clock budget: each workload's mmfast cases with their "
                    "baselines, the suites round-robin, attention first; what does not fit is reported as skipped")
    ap.add_argument("--out", help="report directory (default: see above)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    ap.add_argument("--compare", metavar="OLD.json", help="compare with an earlier report; exit 1 on a regression")
    ap.add_argument("--new", metavar="NEW.json", help="with --compare: compare this report instead of running")
    ap.add_argument("--plan", action="store_true", help="print the order the cases would run in, with estimated "
                    "seconds (and what --budget-s would skip); run nothing")
    return ap


def summary(report):
    """A few lines for the terminal: per suite, cases timed and skipped; per workload ours vs each baseline."""
    from mmfast.benchmarks.report import glance_lines

    lines = []
    for suite in report["suites"]:
        rows = [r for r in report["rows"] if r.get("suite") == suite]
        ok = [r for r in rows if r.get("ms")]
        skipped = f", {len(rows) - len(ok)} skipped" if len(ok) < len(rows) else ""
        lines.append(f"{suite}: {len(ok)} of {len(rows)} cases timed{skipped}")
    lines += glance_lines(report)
    if report["env"].get("triton_interpreter"):
        lines.append("Triton kernels ran through Triton's interpreter (TRITON_INTERPRET=1): "
                     "their timings are not GPU speed.")
    return "\n".join(lines)


def print_plan(planned, budget_s):
    """The planned order: a line per workload and part, its estimated seconds and the running total."""
    for i, (job, s, total) in enumerate(planned):
        when = f"{total:6.0f} s" if total is not None else "  (skip)"
        cases = ", ".join(c.name for c in job.cases)
        print(f"{i + 1:3d} {when} {s:5.0f} s  {job.suite} / {job.workload.name} [{job.part}]: {cases}")
    fits = [t for _, _, t in planned if t is not None]
    print(f"estimated: {fits[-1] if fits else 0:.0f} s for {len(fits)} of {len(planned)} jobs"
          + ("" if budget_s is None else f" within --budget-s {budget_s:.0f}"))


def main(argv=None, prog="python -m benchmarks"):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tune"]:
        from mmfast.benchmarks.tune import main as tune_main

        return tune_main(argv[1:], prog=prog + " tune")
    if argv[:1] == ["profile"]:
        from mmfast.benchmarks.profile import main as profile_main

        return profile_main(argv[1:], prog=prog + " profile")
    ap = _parser(prog)
    args = ap.parse_args(argv)  # before any torch import: --help answers at once
    if args.new and not args.compare:
        ap.error("--new needs --compare OLD.json")
    if args.compare and args.new:
        from mmfast.benchmarks.report import compare, compare_markdown

        old, new = _load(args.compare), _load(args.new)
        rows = compare(old, new)
        print(compare_markdown(rows, old, new))
        return 1 if any(r["verdict"].startswith("regression") for r in rows) else 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available() and not args.plan:
        ap.error("--device cuda: no CUDA device is visible")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if mode == "smoke" and (args.device == "cpu" or not torch.cuda.is_available()):
        # smoke proves every case runs, ours included: Triton kernels go through the interpreter off the GPU.
        # Set before the registry imports mmfast.kernels (Triton decides at @jit time whether to interpret).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from mmfast.benchmarks.common import default_out_dir, run_suite, suite_name, suite_names
    from mmfast.benchmarks.report import compare, compare_markdown, write_reports

    names = [suite_name(n) for n in _names(args.suite)]
    known = suite_names()
    suites = list(known) if "all" in names else list(dict.fromkeys(names))
    unknown = [n for n in suites if n not in known]
    if unknown:
        ap.error(f"unknown suite(s) {unknown}; choose from {', '.join(known)} or all")
    select = "headline" if args.headline else "rest" if args.rest else None
    if args.plan:
        from mmfast.benchmarks.common import plan_suite

        print_plan(plan_suite(suites, mode, args.device, select, args.budget_s), args.budget_s)
        return 0
    checkpoint = None
    if args.out:
        def checkpoint(partial):
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "report.json"), "w") as f:
                json.dump(dict(partial, partial=True), f, indent=1)

    report = run_suite(suites, mode=mode, device=args.device, budget_s=args.budget_s, select=select,
                       checkpoint=checkpoint)
    out = args.out or default_out_dir(report)
    written = write_reports(report, out)
    print()
    print(summary(report))
    status = 0
    if args.compare:
        old = _load(args.compare)
        rows = compare(old, report)
        text = compare_markdown(rows, old, report)
        path = os.path.join(out, "compare.md")
        with open(path, "w") as f:
            f.write(text + "\n")
        written.append(path)
        print("\n".join(line for line in text.splitlines() if "| regression" in line or "regression(s)" in line))
        status = 1 if any(r["verdict"].startswith("regression") for r in rows) else 0
    print("wrote:")
    for path in written:
        print(f"  {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
