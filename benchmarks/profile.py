"""`python -m mmfast bench profile`: where a case's time goes, kernel by kernel.

For each workload of the named suites whose name contains one of the --match strings, every case is built as
the suites build it (the same inputs and functions the timings use), called once to warm up, then run
--calls times under ``torch.profiler``. The report lists per case its wall time per call and the device
kernels (CUDA; CPU ops elsewhere) by total time: calls, µs per call of the case, share of the case's wall
time, and how much of the wall time no kernel covered (launch gaps, host work, synchronisation). It is what a
missed target needs before anything is changed: which pass costs more than its FLOPs and bytes predict.

    python -m mmfast bench profile --suite gated_linear --match "fwd+bwd" --out DIR   # DIR/profile.md
"""
import argparse
import os
import time
from collections import defaultdict

TOP = 12


def _parser(prog):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    ap.add_argument("--suite", action="append", required=True, metavar="NAMES", help="suite(s), comma-separated")
    ap.add_argument("--match", action="append", default=[], metavar="TEXT",
                    help="profile the workloads whose name contains TEXT (repeatable; default: every workload)")
    ap.add_argument("--case", action="append", default=[], metavar="NAME",
                    help="only these cases (repeatable; default: every case of a matched workload)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes on any device (proves the command works)")
    size.add_argument("--quick", action="store_true", help="the GPU run's sizes (default)")
    ap.add_argument("--calls", type=int, default=3, help="profiled calls per case (default 3)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many seconds")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    ap.add_argument("--out", default=None, help="directory for profile.md (default: print only)")
    return ap


def _device_us(evt):
    value = getattr(evt, "self_device_time_total", None)
    return getattr(evt, "self_cuda_time_total", 0.0) if value is None else value


def profile_case(fn, device, calls):
    """(wall ms per call, [(kernel, count per call, µs per call)] by time) of `calls` profiled calls of fn."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    per_kernel = defaultdict(lambda: [0, 0.0])
    for evt in prof.key_averages():
        # CUDA: the device kernels themselves (self device time, no nesting); CPU: the ops' self CPU time
        us = _device_us(evt) if cuda else evt.self_cpu_time_total
        if us > 0:
            per_kernel[evt.key][0] += evt.count
            per_kernel[evt.key][1] += us
    rows = sorted(((k, c / calls, us / calls) for k, (c, us) in per_kernel.items()), key=lambda r: -r[2])
    return wall_ms, rows


def _table(name, wall_ms, rows):
    busy_us = sum(us for _, _, us in rows)
    lines = [f"#### {name}: {wall_ms:.3f} ms per call; kernels busy {busy_us / 1e3:.3f} ms "
             f"({100 * busy_us / 1e3 / wall_ms:.0f}% of the wall time; the rest: launches, host work, gaps)", "",
             "| kernel | calls | µs per call | share of wall |", "|---|---:|---:|---:|"]
    for key, count, us in rows[:TOP]:
        short = key if len(key) <= 90 else key[:87] + "..."
        lines.append(f"| `{short}` | {count:g} | {us:.1f} | {100 * us / 1e3 / wall_ms:.1f}% |")
    if len(rows) > TOP:
        rest = sum(us for _, _, us in rows[TOP:])
        lines.append(f"| ({len(rows) - TOP} more) | | {rest:.1f} | {100 * rest / 1e3 / wall_ms:.1f}% |")
    return lines + [""]


def main(argv=None, prog="python -m mmfast bench profile"):
    args = _parser(prog).parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = "smoke" if args.smoke or device.type != "cuda" else "quick"
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from mmfast.benchmarks.common import environment, prepare, suite_module, suite_name

    suites = [suite_name(n) for v in args.suite for n in v.split(",") if n]
    t_end = None if args.budget_s is None else time.monotonic() + args.budget_s
    env = environment(device)
    out = [f"# Kernel profile ({mode}, {env.get('card')}, torch {env['torch']}, Triton {env['triton']}, commit "
           f"{env.get('git_commit')})", ""]
    found = 0
    for suite in suites:
        for wl in suite_module(suite).workloads(mode, device):
            if args.match and not any(m in wl.name for m in args.match):
                continue
            found += 1
            out += [f"### {suite} / {wl.name}", "", wl.info.get("summary", ""), ""]
            state = wl.build()
            for case in wl.cases:
                if args.case and case.name not in args.case:
                    continue
                if t_end is not None and time.monotonic() > t_end:
                    out += [f"#### {case.name}: not profiled (budget)", ""]
                    continue
                fn, reason = prepare(case, state, device)
                if fn is None:
                    out += [f"#### {case.name}: skipped ({reason})", ""]
                    continue
                wall_ms, rows = profile_case(fn, device, args.calls)
                out += _table(case.name, wall_ms, rows)
                print(f"{suite} / {wl.name} / {case.name}: {wall_ms:.3f} ms, top: "
                      + ", ".join(f"{k[:40]} {us:.0f} us" for k, _, us in rows[:3]), flush=True)
            state = None
    if not found:
        print(f"{prog}: no workload of {suites} matches {args.match}")
        return 1
    text = "\n".join(out) + "\n"
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "profile.md")
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")
    return 0
