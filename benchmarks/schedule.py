"""The order in which a budgeted benchmark run times its cases, and the runner that keeps to it.

A short GPU lease must bring back comparisons, not lone numbers: a case is worth little without the
baselines it is measured against (`Workload.baselines`). So a budgeted run (``--budget-s``):

1. times each workload's *key* cases together: ours (``mmfast*``) first, then its baselines, before moving
   on; the other peers of every workload come in a second pass, with what the budget leaves;
2. interleaves the suites round-robin in PRIORITY order (attention first): every suite gets its first
   workload before any suite gets its second;
3. starts a workload's cases only when their estimated seconds (compiles and JIT included: a first
   torch.compile costs far more than its timing) fit in what is left, else skips them all with the
   reason, so no mmfast case is reported without its baselines, nor baselines without ours. Estimates
   start from PRIOR_S and then follow what this run measured for a case of the same name.

An unbudgeted run times every case of every workload, suite by suite.
"""
import gc
import time
from dataclasses import dataclass
from typing import List

import torch

from .common import Case, Workload, _row, measure, peak_extra_bytes, prepare

# suites first in the round-robin; the ones not named follow in their own order. Attention vs SDPA is the
# comparison a reader looks for first; the swap and models suites build whole models (slow to start) and
# models' headline repeats contrastive's CLIP loss with its memory.
PRIORITY = ("attention", "contrastive", "gated_linear", "patch_embed", "ema", "swap", "models")

# CUDA seconds a case costs before this run has timed one of its name: compile / JIT / autotune, the trial
# call and the timing (do_bench's quick warm-up and repeats are 10 + 60 ms of GPU time). Rough: the
# 2026-11-28 H100 headline step timed ~30 cases, 4 under torch.compile, in ~55 s besides the C++ build;
# torch.compile (FlexAttention, the "compiled" baselines) costs most, once per new shape.
PRIOR_S = {"compile": 10.0, "mmfast": 3.0, "model": 8.0, "other": 1.0}
BUILD_S = 1.0  # allocating a workload's inputs
# A started workload may run past the deadline by this share of the budget (at most GRACE_MAX_S seconds) to
# finish its baselines when the estimate was short; the GPU check's `timeout` leaves more than that.
GRACE_SHARE, GRACE_MAX_S = 0.1, 10.0


def is_ours(case_name):
    return case_name.startswith("mmfast")


@dataclass
class Job:
    suite: str
    workload: Workload
    cases: List[Case]
    part: str  # "key": ours + baselines; "others": the remaining peers; "all": every case (no budget)


def key_cases(wl):
    """Ours first, then the baselines (in the workload's case order); all cases when either side is empty."""
    base = set(wl.baselines.values())
    ours = [c for c in wl.cases if is_ours(c.name)]
    baselines = [c for c in wl.cases if c.name in base and not is_ours(c.name)]
    return ours + baselines if ours and baselines else list(wl.cases)


def schedule(by_suite, budgeted, priority=PRIORITY):
    """Jobs in the order to run them. by_suite: {suite: [Workload]} in the command line's suite order."""
    if not budgeted:
        return [Job(s, w, list(w.cases), "all") for s, wls in by_suite.items() for w in wls]
    suites = [s for s in priority if s in by_suite] + [s for s in by_suite if s not in priority]
    rounds = max((len(by_suite[s]) for s in suites), default=0)
    order = [(s, by_suite[s][i]) for i in range(rounds) for s in suites if i < len(by_suite[s])]
    jobs = [Job(s, w, key_cases(w), "key") for s, w in order]
    for s, w in order:
        key = {c.name for c in key_cases(w)}
        others = [c for c in w.cases if c.name not in key]
        if others:
            jobs.append(Job(s, w, others, "others"))
    return jobs


def prior_s(case, suite, device):
    """First-use seconds of a case before this run has timed one like it (PRIOR_S)."""
    name = case.name.lower()
    if torch.device(device).type != "cuda":
        return PRIOR_S["other"]  # CPU: the smoke sizes, the interpreter; no torch.compile cost to speak of
    if "flex" in name or "compile" in name:
        return PRIOR_S["compile"]
    if suite in ("swap", "models"):
        return PRIOR_S["model"]
    return PRIOR_S["mmfast"] if is_ours(name) else PRIOR_S["other"]


class Estimator:
    """Seconds a job will take: a case's last measured seconds in this run, else its prior."""

    def __init__(self, device):
        self.device = device
        self.seen = {}

    def case_s(self, case, suite):
        return self.seen.get((suite, case.name), prior_s(case, suite, self.device))

    def job_s(self, job):
        return BUILD_S + sum(self.case_s(c, job.suite) for c in job.cases)

    def observe(self, case, suite, seconds):
        self.seen[(suite, case.name)] = seconds


def plan(jobs, device, budget_s=None):
    """[(job, estimated seconds, cumulative seconds)] from the priors alone: what a run intends to do."""
    est, out, total = Estimator(device), [], 0.0
    for job in jobs:
        s = est.job_s(job)
        total += s
        out.append((job, s, total))
        if budget_s is not None and total > budget_s:
            total -= s  # it would be skipped; later (cheaper) jobs may still fit
            out[-1] = (job, s, None)
    return out


def _skip_rows(job, reason):
    return [dict(_row(job.workload, c, reason=reason), suite=job.suite) for c in job.cases]


def run_jobs(jobs, device, mode, ceilings, deadline=None, budget_s=None, log=print, clock=time.monotonic,
             checkpoint=None):
    """Run the jobs in order; returns report rows (each with "suite" and "seconds": prepare + timing).

    deadline: a clock() value past which no job starts; a job starts only when its estimate fits.
    checkpoint(rows): called after every job (e.g. to save a partial report.json)."""
    est = Estimator(device)
    grace = 0.0 if budget_s is None else min(GRACE_MAX_S, GRACE_SHARE * budget_s)
    rows, compared = [], {}  # (suite, workload) -> did one of our cases run in its key job
    for i, job in enumerate(jobs):
        wl = job.workload
        need = est.job_s(job)
        left = None if deadline is None else deadline - clock()
        if job.part == "others" and not compared.get((job.suite, wl.name)):
            rows += _skip_rows(job, "not timed: this workload's mmfast case and baselines were not timed")
            continue
        if left is not None and (left <= 0 or need > left):
            what = "ours + baselines" if job.part == "key" else "the other peers"
            reason = ("time budget exhausted" if left <= 0 else
                      f"time budget: {what} need ~{need:.0f} s together, {left:.0f} s left")
            rows += _skip_rows(job, reason)
            log(f"[{i + 1}/{len(jobs)}] {job.suite} / {wl.name} ({what}): skipped, {reason}")
            continue
        tag = {"key": "ours + baselines", "others": "other peers", "all": "all cases"}[job.part]
        log(f"[{i + 1}/{len(jobs)}] {job.suite} / {wl.name} ({tag}, est. {need:.0f} s"
            + ("" if left is None else f", {left:.0f} s left") + f"): {wl.info.get('summary', '')}")
        try:
            state = wl.build()
        except Exception as exc:  # e.g. out of memory on a smaller card: report it, go on
            rows += _skip_rows(job, f"building inputs failed: {type(exc).__name__}: {exc}"[:250])
            continue
        ours_ran = None
        for case in job.cases:
            now = clock()
            if deadline is not None and now > deadline + grace:
                rows.append(dict(_row(wl, case, reason="time budget exhausted (within the workload)"), suite=job.suite))
                continue
            if job.part == "key" and deadline is not None and not is_ours(case.name) and ours_ran is False:
                # a budgeted run keeps its time for workloads that compare something
                rows.append(dict(_row(wl, case, reason="not timed: no mmfast case of this workload ran (see their "
                                      "reasons); the time went to the other workloads"), suite=job.suite))
                continue
            left = None if deadline is None else max(0.0, deadline + grace - now)
            fn, reason = prepare(case, state, device)
            timing = extra = None
            if fn is not None:
                try:
                    extra = peak_extra_bytes(fn, device)
                    timing = measure(fn, device, mode, None if left is None else min(2.0, left))
                except Exception as exc:
                    reason = f"timing failed: {type(exc).__name__}: {exc}"[:250]
            seconds = clock() - now
            est.observe(case, job.suite, seconds)
            if is_ours(case.name):
                ours_ran = bool(ours_ran) or timing is not None
            row = dict(_row(wl, case, timing=timing, reason=reason, ceilings=ceilings, extra_bytes=extra),
                       suite=job.suite, seconds=round(seconds, 2))
            rows.append(row)
            log(f"  {case.name:<28} " + (f"{row['ms']:9.3f} ms" if timing else f"skipped: {reason}")
                + f"  ({seconds:.1f} s)")
        compared[(job.suite, wl.name)] = bool(ours_ran)
        fn = state = None  # the last case's closure holds the tensors too
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        if checkpoint is not None:
            checkpoint(rows)
    _speedups(rows, {(j.suite, j.workload.name): j.workload.baselines for j in jobs})
    return rows


def _speedups(rows, baselines):
    """speedup[label] = baseline ms / case ms, within each (suite, workload): two suites may share a name."""
    ms = {(r["suite"], r["workload"], r["case"]): r["ms"] for r in rows}
    for r in rows:
        for label, base in baselines.get((r["suite"], r["workload"]), {}).items():
            b = ms.get((r["suite"], r["workload"], base))
            if r["ms"] and b:
                r["speedup"][label] = b / r["ms"]
