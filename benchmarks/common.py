"""Benchmark machinery shared by `python -m mmfast bench` (`python -m benchmarks` in a checkout) and the
pytest-benchmark tests.

The suites are the kernel families of ``mmfast.kernels._registry.FAMILIES``: family NAME's suite is
``benchmarks/NAME.py``, installed as ``mmfast.benchmarks.NAME``; EXTRA_SUITES (e.g. ``models``: whole
training steps) follow them. A suite module exposes
`workloads(mode, device) -> [Workload]`. A Workload builds its tensors once and carries its Cases; both
runners iterate these same definitions, so a case is defined in exactly one place.
"""
import datetime
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

# reports are written by benchmarks/report.py; re-exported here for callers of the first version
from .report import to_markdown, write_reports  # noqa: F401

MODES = ("smoke", "quick", "full")
# names the command line also accepts: the suite of the gated linear family was called "gated"
ALIASES = {"gated": "gated_linear"}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_checkout():
    """The repository root when these benchmarks run from a source checkout (git, benchmarks/results),
    None when they run installed as mmfast.benchmarks."""
    if os.path.isfile(os.path.join(REPO_ROOT, "setup.py")) and os.path.isdir(os.path.join(REPO_ROOT, "kernels")):
        return REPO_ROOT
    return None


# suites that are no kernel family (benchmarks/NAME.py all the same), run after the families'
EXTRA_SUITES = ("swap", "models", "vlm")


def suite_names():
    """Every suite: the registry's families in its order, then EXTRA_SUITES (imports mmfast.kernels: set
    TRITON_INTERPRET before)."""
    from mmfast.kernels._registry import NAMES

    return tuple(NAMES) + EXTRA_SUITES


def suite_name(name):
    """The registry's name for a suite name given on the command line (aliases accepted)."""
    return ALIASES.get(name, name)


def suite_module(name):
    name = suite_name(name)
    if name in EXTRA_SUITES:
        import importlib

        return importlib.import_module(f"{__package__}.{name}")
    from mmfast.kernels._registry import family

    return family(name).benchmarks


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


def measure(fn, device, mode, max_s=None):
    """Milliseconds per call, warm-up excluded: {"ms": median, "min_ms", "p20_ms", "p80_ms"}.

    CUDA: triton.testing.do_bench with CUDA events; it overwrites a 256 MB buffer before every call, so
    no call finds its inputs in L2 (the same effect as rotating inputs, without extra copies). CPU:
    perf_counter repeats, stopping early once max_s is spent (at least 3 repeats). The p20..p80 spread
    is the noise `--compare` uses to tell a regression from jitter.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        warmup, rep = {"smoke": (5, 20), "quick": (10, 60), "full": (25, 200)}[mode]
        median, fastest, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.0, 0.2, 0.8])
        return {"ms": float(median), "min_ms": float(fastest), "p20_ms": float(p20), "p80_ms": float(p80)}
    reps = {"smoke": 3, "quick": 5, "full": 10}[mode]
    max_s = 2.0 if max_s is None else max_s
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < max_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times = sorted(t * 1e3 for t in times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"ms": statistics.median(times), "min_ms": times[0], "p20_ms": pick(0.2), "p80_ms": pick(0.8)}


def measure_ms(fn, device, mode, max_s=None):
    """(median, min) milliseconds per call; see measure()."""
    t = measure(fn, device, mode, max_s)
    return t["ms"], t["min_ms"]


def measure_ceilings(device, mode):
    """The two ceilings every row is measured against: copy bandwidth (bytes = 2 x buffer: one read,
    one write) and matmul throughput through torch (bf16 on CUDA, fp32 on the CPU)."""
    cuda = torch.device(device).type == "cuda"
    size = (64 << 20 if mode == "smoke" else 1 << 30) if cuda else (16 << 20 if mode == "smoke" else 256 << 20)
    src = torch.randn(size // 4, device=device)
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), device, mode)[0]
    out = {"copy_buffer_bytes": size, "copy_ms": ms, "copy_GBps": 2 * size / ms / 1e6}
    del src, dst
    n = (2048 if mode == "smoke" else 8192) if cuda else (256 if mode == "smoke" else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = measure_ms(lambda: a @ b, device, mode)[0]
    out.update(matmul_n=n, matmul_dtype=str(dtype).replace("torch.", ""), matmul_TFLOPs=2 * n**3 / ms / 1e9)
    if cuda:
        out["matmul_bf16_TFLOPs"] = out["matmul_TFLOPs"]
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------
# Environment


def _run(cmd, timeout=10):
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=source_checkout())
        return res.stdout.strip() if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device):
    import triton

    from mmfast.kernels._common import interpreting

    checkout = source_checkout() is not None
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        # Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1): their timings are not GPU speed
        "triton_interpreter": interpreting(),
        # BENCH_GIT_COMMIT: for copies of the tree that travel without .git (e.g. to a lent GPU machine)
        # (first: a copy may sit inside some other repository, whose HEAD is not this tree's)
        "git_commit": os.environ.get("BENCH_GIT_COMMIT")
        or (_run(["git", "rev-parse", "HEAD"]) if checkout and shutil.which("git") else None),
    }
    if env["git_commit"] and checkout and not os.environ.get("BENCH_GIT_COMMIT"):
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


def _row(wl, case, timing=None, reason=None, ceilings=None, extra_bytes=None):
    """One report row. Roofline: the case cannot beat max(bytes / copy bandwidth, FLOPs / matmul peak);
    pct_roofline is that floor over the measured time, `bound` says which ceiling sets it."""
    nbytes = wl.bytes_per_call if case.bytes is None else case.bytes
    flops = wl.flops_per_call if case.flops is None else case.flops
    timing = timing or {}
    ms = timing.get("ms")
    row = {"workload": wl.name, **{k: v for k, v in wl.info.items() if k != "summary"}, "case": case.name,
           "bytes": nbytes, "flops": flops, "ms": ms, "min_ms": timing.get("min_ms"), "p20_ms": timing.get("p20_ms"),
           "p80_ms": timing.get("p80_ms"), "GBps": None, "pct_copy": None, "TFLOPs": None, "pct_matmul": None,
           "bound": None, "pct_roofline": None, "peak_extra_MiB": None if extra_bytes is None else extra_bytes / 2**20,
           "speedup": {}, "status": "ok" if ms is not None else "skipped", "reason": reason, "note": case.note}
    ceilings = ceilings or {}
    if ms is not None:
        row["GBps"] = nbytes / ms / 1e6
        copy = ceilings.get("copy_GBps")
        row["pct_copy"] = 100 * row["GBps"] / copy if copy else None
        peak = ceilings.get("matmul_TFLOPs", ceilings.get("matmul_bf16_TFLOPs"))
        if flops:
            row["TFLOPs"] = flops / ms / 1e9
            row["pct_matmul"] = 100 * row["TFLOPs"] / peak if peak else None
        floors = {"memory": nbytes / copy / 1e6 if copy and nbytes else 0.0,
                  "compute": flops / peak / 1e9 if peak and flops else 0.0}
        row["bound"] = max(floors, key=floors.get)
        if floors[row["bound"]] > 0:
            row["pct_roofline"] = 100 * floors[row["bound"]] / ms
    return row


def run_suite(suites=("ema",), mode="full", out_dir=None, device=None, budget_s=None, log=print, select=None,
              checkpoint=None):
    """Run the named suites and return the report dict; with out_dir, also write report.json/.md there.

    mode: "smoke" (tiny, proves every case runs), "quick" (fewer repeats) or "full". device defaults to
    CUDA when available. budget_s bounds the whole run: the cases run in benchmarks/schedule.py's order
    (each workload's mmfast cases with their baselines, the suites round-robin, attention first) and the
    ones that do not fit are reported as skipped with the reason. select: "headline" runs only the
    workloads whose info marks them headline (the first numbers a GPU run must bring back), "rest" only the
    others, None all. checkpoint(report): called with the report so far after every workload (a run cut
    short by an outer timeout still leaves what it measured).
    """
    from .schedule import run_jobs, schedule

    suites, device, by_suite = _select(suites, mode, device, select)
    start = time.monotonic()
    deadline = None if budget_s is None else start + budget_s
    env = environment(device)
    log(f"# {', '.join(suites)} on {env['card']} ({device}), mode={mode}"
        + ("" if budget_s is None else f", budget {budget_s:.0f} s"))
    ceilings = measure_ceilings(device, mode)
    log(f"copy bandwidth: {ceilings['copy_GBps']:.1f} GB/s; {ceilings['matmul_dtype']} matmul: "
        f"{ceilings['matmul_TFLOPs']:.2f} TFLOP/s")
    workload_info = [{"suite": suite, "workload": w.name, "bytes_per_call": w.bytes_per_call,
                      "baselines": w.baselines, **w.info} for suite, wls in by_suite.items() for w in wls]

    def report(rows):
        return {"schema": 2, "suites": list(suites), "mode": mode, "select": select, "device": device,
                "budget_s": budget_s, "elapsed_s": round(time.monotonic() - start, 2), "env": env,
                "ceilings": ceilings, "workloads": workload_info, "rows": rows}

    jobs = schedule(by_suite, budgeted=budget_s is not None)
    rows = run_jobs(jobs, device, mode, ceilings, deadline, budget_s, log,
                    checkpoint=None if checkpoint is None else lambda rows: checkpoint(report(rows)))
    out = report(rows)
    if out_dir is not None:
        write_reports(out, out_dir)
    return out


def _select(suites, mode, device, select):
    """(suite names, device, {suite: [Workload]}) after checking the arguments."""
    if select not in (None, "headline", "rest"):
        raise ValueError(f"select must be None, 'headline' or 'rest', got {select!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    suites = [suite_name(s) for s in suites]
    known = suite_names()
    unknown = [s for s in suites if s not in known]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {', '.join(known)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    by_suite = {}
    for suite in suites:
        wls = suite_module(suite).workloads(mode, device)
        if select is not None:
            wls = [w for w in wls if bool(w.info.get("headline")) == (select == "headline")]
        by_suite[suite] = wls
    return suites, device, by_suite


def plan_suite(suites, mode, device, select=None, budget_s=None):
    """The jobs a run would do, with the estimated seconds of each (schedule.plan); runs nothing. device may
    be "cuda" on a machine without one (the workloads are only described, not built)."""
    from .schedule import plan, schedule

    suites, device, by_suite = _select(suites, mode, device, select)
    return plan(schedule(by_suite, budgeted=budget_s is not None), device, budget_s)


def default_out_dir(report):
    """benchmarks/results/<date>-<card> in a source checkout, else ./mmfast-benchmarks/<date>-<card>."""
    date = report["env"]["date"][:16].replace(":", "").replace("T", "-")
    checkout = source_checkout()
    if checkout:
        root = os.path.join(checkout, "benchmarks", "results")
    else:
        root = os.path.join(os.getcwd(), "mmfast-benchmarks")
    return os.path.join(root, f"{date}-{card_slug(report['env'])}")
