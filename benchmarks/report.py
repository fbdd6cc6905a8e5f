"""Benchmark reports: markdown table, PNG plots (time per case across sizes; % of roofline), and the
`--compare OLD.json` regression check. Input is the report dict `benchmarks.common.run_suite` returns."""
import json
import os


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def _header(report):
    env, ceil = report["env"], report["ceilings"]
    matmul = ceil.get("matmul_TFLOPs", ceil.get("matmul_bf16_TFLOPs"))
    lines = [f"# Benchmarks: {', '.join(report['suites'])} ({report['mode']})", "",
             f"- card: {env.get('card')}" + (f", driver {env['driver']}" if env.get("driver") else "")
             + (f", CUDA {env['cuda_runtime']}" if env.get("cuda_runtime") else ""),
             f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}, {env['cpu_threads']} CPU threads",
             f"- commit {env.get('git_commit') or 'unknown'}" + (" (dirty)" if env.get("git_dirty") else "")
             + f", date {env['date']}, run took {report['elapsed_s']} s",
             f"- ceilings measured in this run: copy {ceil['copy_GBps']:.1f} GB/s ({ceil['copy_buffer_bytes'] >> 20} MiB "
             "`copy_`, read + write)" + (f"; {ceil.get('matmul_dtype', 'bf16')} matmul {matmul:.2f} TFLOP/s "
                                         f"(n={ceil['matmul_n']})" if matmul else ""),
             "- ms: median per call (warm-up excluded, L2 flushed before each call on CUDA); GB/s counts the minimum "
             "bytes the case must move (EMA: read EMA + read param + write EMA); TFLOP/s counts useful (visible) "
             "FLOPs; % roof: the roofline floor max(bytes / copy, FLOPs / matmul) over the time, with the binding "
             "ceiling (mem / flop); extra MiB: peak memory a call allocates beyond its inputs (CUDA); "
             "x: speed-up over that baseline case, measured in the same run."]
    if report["device"] == "cpu":
        lines.append("- CPU: `copy_` also reads its destination before writing it (write-allocate), so in-place "
                     "updates can pass 100% of copy bandwidth; a busy machine shows as min ms far below ms.")
    return lines + [""]


def to_markdown(report):
    lines = _header(report)
    for w in report["workloads"]:
        rows = [r for r in report["rows"] if r["workload"] == w["workload"]]
        labels = list(w.get("baselines", {}))
        compute = any(r.get("flops") for r in rows)  # compute-bound workloads also show TFLOP/s
        memory = any(r.get("peak_extra_MiB") is not None for r in rows)
        head = "| case | ms | min ms | GB/s | % copy | " + ("TFLOP/s | % matmul | " if compute else "")
        head += "% roof | " + ("extra MiB | " if memory else "") + " | ".join(f"x {k}" for k in labels) + " | note |"
        lines += [f"## {w['workload']}: {w.get('summary', '')}", "", head,
                  "|---|---:|---:|---:|---:|" + ("---:|---:|" if compute else "") + "---:|" + ("---:|" if memory else "")
                  + "---:|" * len(labels) + "---|"]
        for r in rows:
            note = r["note"] if r["status"] == "ok" else f"skipped: {r['reason']}"
            line = (f"| {r['case']} | {_fmt(r['ms'], '.3f')} | {_fmt(r['min_ms'], '.3f')} | {_fmt(r['GBps'], '.1f')} | "
                    f"{_fmt(r['pct_copy'], '.0f')} | ")
            if compute:
                line += f"{_fmt(r.get('TFLOPs'), '.1f')} | {_fmt(r.get('pct_matmul'), '.0f')} | "
            roof = r.get("pct_roofline")
            line += ("—" if roof is None else f"{roof:.0f} {'mem' if r.get('bound') == 'memory' else 'flop'}") + " | "
            if memory:
                line += f"{_fmt(r.get('peak_extra_MiB'), '.1f')} | "
            lines.append(line + " | ".join(_fmt(r["speedup"].get(k), ".2f") for k in labels) + f" | {note} |")
        lines.append("")
    return "\n".join(lines)


def write_reports(report, out_dir):
    """report.json, report.md and (with matplotlib) time.png and roofline.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(to_markdown(report) + "\n")
    plot(report, out_dir)


def plot(report, out_dir):
    """time.png: ms per case across the workloads of each suite (log scale, one line per method);
    roofline.png: % of the roofline floor per case. Returns the files written ([] without matplotlib)."""
    try:  # optional: only when matplotlib is installed
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in report["rows"] if r.get("ms")]
    if not ok:
        return []
    written = []
    suites = list(dict.fromkeys(r.get("suite", "") for r in ok))
    fig, axes = plt.subplots(len(suites), 1, figsize=(11, 3.6 * len(suites)), squeeze=False)
    for ax, suite in zip(axes[:, 0], suites):
        rows = [r for r in ok if r.get("suite", "") == suite]
        workloads = list(dict.fromkeys(r["workload"] for r in rows))
        for case in dict.fromkeys(r["case"] for r in rows):
            pts = [(workloads.index(r["workload"]), r["ms"]) for r in rows if r["case"] == case]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=case,
                    linewidth=2.5 if case.startswith("mmfast") else 1.2)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, rotation=20, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms per call")
        ax.set_title(f"{suite} on {report['env'].get('card')}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "time.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    roof = [r for r in ok if r.get("pct_roofline") is not None]
    if roof:
        fig, ax = plt.subplots(figsize=(10, 0.22 * len(roof) + 1.2))
        colors = ["tab:blue" if r.get("bound") == "memory" else "tab:orange" for r in roof]
        ax.barh([f"{r['workload']} | {r['case']}" for r in roof], [r["pct_roofline"] for r in roof], color=colors)
        ax.axvline(100, color="k", linestyle="--")
        ax.set_xlabel("% of roofline (blue: copy bandwidth binds, orange: matmul peak binds)")
        ax.tick_params(axis="y", labelsize=6)
        ax.invert_yaxis()
        fig.tight_layout()
        written.append(os.path.join(out_dir, "roofline.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def _spread(row):
    """Relative p20..p80 spread of a row's repeats: the noise a change must exceed to count."""
    if row.get("p20_ms") is None or row.get("p80_ms") is None or not row.get("ms"):
        return (row["ms"] - row["min_ms"]) / row["ms"] if row.get("min_ms") and row.get("ms") else 0.0
    return (row["p80_ms"] - row["p20_ms"]) / row["ms"]


def compare(old, new, min_change=0.03):
    """Rows of (workload, case, old ms, new ms, ratio, verdict) for cases timed in both reports.

    A case regressed when it got slower by more than the larger of min_change and either run's
    repeat spread; it improved symmetrically; other changes are noise. Different cards or modes are
    compared all the same, but flagged in the verdict of every row.
    """
    same_setup = old["env"].get("card") == new["env"].get("card") and old["mode"] == new["mode"]
    before = {(r["workload"], r["case"]): r for r in old["rows"] if r.get("ms")}
    out = []
    for r in new["rows"]:
        o = before.get((r["workload"], r["case"]))
        if not r.get("ms") or o is None:
            continue
        ratio = r["ms"] / o["ms"]
        noise = max(min_change, _spread(o), _spread(r))
        verdict = "regression" if ratio > 1 + noise else "improvement" if ratio < 1 / (1 + noise) else "noise"
        if not same_setup:
            verdict += " (different card or mode)"
        out.append({"workload": r["workload"], "case": r["case"], "old_ms": o["ms"], "new_ms": r["ms"],
                    "ratio": ratio, "noise": noise, "verdict": verdict})
    return out


def compare_markdown(rows, old, new):
    lines = [f"# Comparison: {old['env'].get('git_commit', '?')[:10]} ({old['env'].get('card')}, {old['env']['date']}) "
             f"-> {new['env'].get('git_commit', '?')[:10]} ({new['env'].get('card')}, {new['env']['date']})", "",
             "ratio = new ms / old ms; noise = the larger of 3% and either run's p20..p80 repeat spread.", "",
             "| workload | case | old ms | new ms | ratio | noise | verdict |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['case']} | {r['old_ms']:.3f} | {r['new_ms']:.3f} | {r['ratio']:.3f} | "
                     f"{100 * r['noise']:.0f}% | {r['verdict']} |")
    regressions = sum(r["verdict"].startswith("regression") for r in rows)
    lines += ["", f"{regressions} regression(s) in {len(rows)} compared case(s)"]
    return "\n".join(lines)
