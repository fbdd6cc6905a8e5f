"""Benchmark machinery shared by `python -m benchmarks` and the pytest-benchmark tests.

A suite module (e.g. benchmarks/ema.py) exposes `workloads(mode, device) -> [Workload]`. A Workload
builds its tensors once and carries its Cases; both runners iterate these same definitions, so a case
is defined in exactly one place.
"""
import datetime
import gc
import importlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch

SUITES = {"ema": "benchmarks.ema"}
MODES = ("smoke", "quick", "full")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Skip(Exception):
    """A case that cannot run here; its message is the reason printed in the table."""


@dataclass
class Case:
    name: str
    make: Callable[[Any], Callable[[], None]]  # built workload state -> the function to time
    note: str = ""
    # Work of one call when it differs from the workload's (e.g. fwd vs fwd+bwd cases of one workload).
    flops: Optional[int] = None
    bytes: Optional[int] = None


@dataclass
class Workload:
    name: str
    build: Callable[[], Any]  # allocates the (random) inputs; called once for all of its cases
    bytes_per_call: int  # minimal traffic of one call, the basis of GB/s
    info: dict
    cases: List[Case]
    baselines: dict = field(default_factory=dict)  # speed-up column label -> case name
    flops_per_call: int = 0  # useful FLOPs of one call (visible work only), the basis of TFLOP/s; 0: memory-bound op


def prepare(case, state, device):
    """(fn, None) ready to time, or (None, reason). The trial call also compiles kernels and builds
    extensions, so first-use costs never reach the timings; any failure becomes a skip, not a crash."""
    try:
        fn = case.make(state)
        fn()
        synchronize(device)
        return fn, None
    except Skip as exc:
        return None, str(exc)
    except Exception as exc:  # a backend in flux must not take the whole report down
        first = (str(exc).strip().splitlines() or [""])[0]
        return None, f"{type(exc).__name__}: {first[:200]}"


def peak_extra_bytes(fn, device):
    """Peak memory one call allocates beyond what is live before it (CUDA only; None on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated() - base


# ----------------------------------------------------------------------------------------------
# Timing


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_ms(fn, device, mode, max_s=None):
    """(median, min) milliseconds per call, warm-up excluded.

    CUDA: triton.testing.do_bench (it flushes L2 before every call). CPU: perf_counter repeats,
    stopping early once max_s is spent (at least 3 repeats). The min shows how noisy the median is.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        warmup, rep = {"smoke": (5, 20), "quick": (10, 60), "full": (25, 200)}[mode]
        median, fastest = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.0])
        return float(median), float(fastest)
    reps = {"smoke": 3, "quick": 5, "full": 10}[mode]
    max_s = 2.0 if max_s is None else max_s
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < max_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def measure_ceilings(device, mode):
    """Copy bandwidth (bytes = 2 x buffer: one read, one write) and, on CUDA, bf16 matmul TFLOP/s."""
    cuda = torch.device(device).type == "cuda"
    size = (64 << 20 if mode == "smoke" else 1 << 30) if cuda else (16 << 20 if mode == "smoke" else 256 << 20)
    src = torch.randn(size // 4, device=device)
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), device, mode)[0]
    out = {"copy_buffer_bytes": size, "copy_ms": ms, "copy_GBps": 2 * size / ms / 1e6}
    del src, dst
    if cuda:
        n = 2048 if mode == "smoke" else 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        ms = measure_ms(lambda: a @ b, device, mode)[0]
        out.update(matmul_n=n, matmul_bf16_TFLOPs=2 * n**3 / ms / 1e9)
        del a, b
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------
# Environment


def _run(cmd, timeout=10):
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
        return res.stdout.strip() if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device):
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        # BENCH_GIT_COMMIT: for copies of the tree that travel without .git (e.g. to a lent GPU machine)
        "git_commit": (_run(["git", "rev-parse", "HEAD"]) if shutil.which("git") else None) or os.environ.get("BENCH_GIT_COMMIT"),
    }
    if env["git_commit"]:
        env["git_dirty"] = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    try:
        import mmfast

        env["mmfast"] = mmfast.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        env["cpu"] = platform.processor() or None
    if torch.device(device).type == "cuda":
        idx = torch.device(device).index or torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env.update(
            card=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            gpu_memory_GiB=round(props.total_memory / 2**30, 1),
            cuda_runtime=torch.version.cuda,
        )
        if shutil.which("nvidia-smi"):
            q = _run(["nvidia-smi", f"--id={idx}", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                      "--format=csv,noheader"])
            if q:
                keys = ("driver", "max_sm_clock", "max_mem_clock", "power_limit")
                env.update({k: v.strip() for k, v in zip(keys, q.split(","))})
    else:
        env["card"] = env.get("cpu") or platform.machine()
    return env


def card_slug(env):
    return re.sub(r"[^a-z0-9]+", "-", (env.get("card") or "unknown").lower()).strip("-")[:40]


# ----------------------------------------------------------------------------------------------
# Running and reporting


def run_workloads(workloads, device, mode, ceilings, deadline=None, log=print):
    rows = []
    for wl in workloads:
        if deadline is not None and time.monotonic() > deadline:
            rows += [_row(wl, c, reason="time budget exhausted") for c in wl.cases]
            continue
        log(f"{wl.name}: {wl.info.get('summary', '')}")
        try:
            state = wl.build()
        except Exception as exc:  # e.g. out of memory on a smaller card: report it, go on
            rows += [_row(wl, c, reason=f"building inputs failed: {type(exc).__name__}: {exc}"[:250]) for c in wl.cases]
            continue
        for case in wl.cases:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                rows.append(_row(wl, case, reason="time budget exhausted"))
                continue
            fn, reason = prepare(case, state, device)
            ms = min_ms = extra = None
            if fn is not None:
                try:
                    extra = peak_extra_bytes(fn, device)
                    ms, min_ms = measure_ms(fn, device, mode, None if left is None else min(2.0, left))
                except Exception as exc:
                    reason = f"timing failed: {type(exc).__name__}: {exc}"[:250]
            rows.append(_row(wl, case, ms=ms, min_ms=min_ms, reason=reason, ceilings=ceilings, extra_bytes=extra))
            log(f"  {case.name:<28} " + (f"{ms:9.3f} ms" if ms is not None else f"skipped: {reason}"))
        _speedups([r for r in rows if r["workload"] == wl.name], wl.baselines)
        fn = state = None  # the last case's closure holds the tensors too
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _row(wl, case, ms=None, min_ms=None, reason=None, ceilings=None, extra_bytes=None):
    nbytes = wl.bytes_per_call if case.bytes is None else case.bytes
    flops = wl.flops_per_call if case.flops is None else case.flops
    row = {"workload": wl.name, **{k: v for k, v in wl.info.items() if k != "summary"}, "case": case.name,
           "bytes": nbytes, "flops": flops, "ms": ms, "min_ms": min_ms, "GBps": None, "pct_copy": None,
           "TFLOPs": None, "pct_matmul": None, "peak_extra_MiB": None if extra_bytes is None else extra_bytes / 2**20,
           "speedup": {}, "status": "ok" if ms is not None else "skipped", "reason": reason, "note": case.note}
    ceilings = ceilings or {}
    if ms is not None:
        row["GBps"] = nbytes / ms / 1e6
        copy = ceilings.get("copy_GBps")
        row["pct_copy"] = 100 * row["GBps"] / copy if copy else None
        if flops:
            row["TFLOPs"] = flops / ms / 1e9
            peak = ceilings.get("matmul_bf16_TFLOPs")
            row["pct_matmul"] = 100 * row["TFLOPs"] / peak if peak else None
    return row


def _speedups(rows, baselines):
    by_case = {r["case"]: r["ms"] for r in rows}
    for r in rows:
        for label, base in baselines.items():
            if r["ms"] and by_case.get(base):
                r["speedup"][label] = by_case[base] / r["ms"]


def run_suite(suites=("ema",), mode="full", out_dir=None, device=None, budget_s=None, log=print):
    """Run the named suites and return the report dict; with out_dir, also write report.json/.md there.

    mode: "smoke" (tiny, proves every case runs), "quick" (fewer repeats) or "full". device defaults to
    CUDA when available. budget_s bounds the whole run: cases past it are reported as skipped.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.monotonic()
    deadline = None if budget_s is None else start + budget_s
    env = environment(device)
    log(f"# {', '.join(suites)} on {env['card']} ({device}), mode={mode}")
    ceilings = measure_ceilings(device, mode)
    log(f"copy bandwidth: {ceilings['copy_GBps']:.1f} GB/s"
        + (f"; bf16 matmul: {ceilings['matmul_bf16_TFLOPs']:.0f} TFLOP/s" if "matmul_bf16_TFLOPs" in ceilings else ""))
    rows, workload_info = [], []
    for suite in suites:
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; choose from {sorted(SUITES)}")
        wls = importlib.import_module(SUITES[suite]).workloads(mode, device)
        workload_info += [{"suite": suite, "workload": w.name, "bytes_per_call": w.bytes_per_call,
                           "baselines": w.baselines, **w.info} for w in wls]
        rows += run_workloads(wls, device, mode, ceilings, deadline, log)
    report = {"schema": 1, "suites": list(suites), "mode": mode, "device": device, "budget_s": budget_s,
              "elapsed_s": round(time.monotonic() - start, 2), "env": env, "ceilings": ceilings,
              "workloads": workload_info, "rows": rows}
    if out_dir is not None:
        write_reports(report, out_dir)
    return report


def default_out_dir(report):
    date = report["env"]["date"][:16].replace(":", "").replace("T", "-")
    return os.path.join(REPO_ROOT, "benchmarks", "results", f"{date}-{card_slug(report['env'])}")


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def to_markdown(report):
    env, ceil = report["env"], report["ceilings"]
    lines = [f"# Benchmarks: {', '.join(report['suites'])} ({report['mode']})", "",
             f"- card: {env.get('card')}" + (f", driver {env['driver']}" if env.get("driver") else "")
             + (f", CUDA {env['cuda_runtime']}" if env.get("cuda_runtime") else ""),
             f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}, {env['cpu_threads']} CPU threads",
             f"- commit {env.get('git_commit') or 'unknown'}" + (" (dirty)" if env.get("git_dirty") else "")
             + f", date {env['date']}, run took {report['elapsed_s']} s",
             f"- copy bandwidth {ceil['copy_GBps']:.1f} GB/s ({ceil['copy_buffer_bytes'] >> 20} MiB `copy_`, read + write)"
             + (f"; bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s (n={ceil['matmul_n']})" if "matmul_n" in ceil else ""),
             "- ms: median per call (warm-up excluded); GB/s and % copy from it. GB/s counts the minimal traffic: "
             "the minimum bytes the case must move (EMA: read EMA + read param + write EMA); TFLOP/s counts useful (visible) "
             "FLOPs; extra MiB: peak memory a call allocates beyond its inputs (CUDA); x: speed-up over that baseline case.", ""]
    if report["device"] == "cpu":
        lines.insert(-1, "- CPU: `copy_` also reads its destination before writing it (write-allocate), so in-place "
                     "updates can pass 100% of copy bandwidth; a busy machine shows as min ms far below ms.")
    for w in report["workloads"]:
        rows = [r for r in report["rows"] if r["workload"] == w["workload"]]
        labels = list(w.get("baselines", {}))
        compute = any(r.get("flops") for r in rows)  # compute-bound workloads also show TFLOP/s vs the matmul peak
        memory = any(r.get("peak_extra_MiB") is not None for r in rows)
        head = "| case | ms | min ms | GB/s | % copy | " + ("TFLOP/s | % matmul | " if compute else "")
        head += ("extra MiB | " if memory else "") + " | ".join(f"x {k}" for k in labels) + " | note |"
        lines += [f"## {w['workload']}: {w.get('summary', '')}", "", head,
                  "|---|---:|---:|---:|---:|" + ("---:|---:|" if compute else "") + ("---:|" if memory else "")
                  + "---:|" * len(labels) + "---|"]
        for r in rows:
            note = r["note"] if r["status"] == "ok" else f"skipped: {r['reason']}"
            line = f"| {r['case']} | {_fmt(r['ms'], '.3f')} | {_fmt(r['min_ms'], '.3f')} | {_fmt(r['GBps'], '.1f')} | {_fmt(r['pct_copy'], '.0f')} | "
            if compute:
                line += f"{_fmt(r.get('TFLOPs'), '.1f')} | {_fmt(r.get('pct_matmul'), '.0f')} | "
            if memory:
                line += f"{_fmt(r.get('peak_extra_MiB'), '.1f')} | "
            lines.append(line + " | ".join(_fmt(r["speedup"].get(k), ".2f") for k in labels) + f" | {note} |")
        lines.append("")
    return "\n".join(lines)


def write_reports(report, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(to_markdown(report) + "\n")
    _plot(report, out_dir)


def _plot(report, out_dir):
    try:  # optional: only when matplotlib is installed
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in report["rows"] if r["GBps"]]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(ok) + 1))
    ax.barh([f"{r['workload']} | {r['case']}" for r in ok], [r["GBps"] for r in ok])
    ax.axvline(report["ceilings"]["copy_GBps"], color="k", linestyle="--", label="copy bandwidth")
    ax.set_xlabel("GB/s")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "report.png"), dpi=100)
    plt.close(fig)
