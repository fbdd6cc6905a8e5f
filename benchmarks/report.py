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
    if env.get("triton_interpreter"):
        lines.append("- **Triton's interpreter** ran the Triton kernels (TRITON_INTERPRET=1): their timings are not GPU "
                     "speed; they only show that every case runs.")
    if report["device"] == "cpu":
        lines.append("- CPU: `copy_` also reads its destination before writing it (write-allocate), so in-place "
                     "updates can pass 100% of copy bandwidth; a busy machine shows as min ms far below ms.")
    return lines + [""]


def _rows_of(report, w):
    """The rows of workload entry w (two suites may hold workloads of one name: models repeats a CLIP loss)."""
    return [r for r in report["rows"] if r["workload"] == w["workload"]
            and (w.get("suite") is None or r.get("suite") == w["suite"])]


def glance_lines(report):
    """A line per workload where one of our cases ran: its ms and the speed-up over each baseline (baseline
    ms / ours), or why that baseline has no number."""
    lines = []
    for w in report["workloads"]:
        rows = {r["case"]: r for r in _rows_of(report, w)}
        ours = [r for name, r in rows.items() if name.startswith("mmfast") and r.get("ms")]
        if not ours:
            continue
        parts = []
        for r in ours:
            vs = []
            for label, base in w.get("baselines", {}).items():
                b = rows.get(base)
                if b is None:
                    continue
                if b.get("ms"):
                    vs.append(f"{b['ms'] / r['ms']:.2f}x vs {base} ({b['ms']:.3f} ms)")
                else:
                    vs.append(f"{base}: {b.get('reason') or 'not timed'}")
            parts.append(f"{r['case']} {r['ms']:.3f} ms" + (f": {'; '.join(vs)}" if vs else ""))
        lines.append(f"- {w.get('suite', '?')} / {w['workload']}: " + " | ".join(parts))
    return lines


def to_markdown(report):
    lines = _header(report)
    glance = glance_lines(report)
    if glance:
        lines += ["## At a glance: ours vs each baseline (x: baseline ms / ours; > 1 is faster)", ""] + glance + [""]
    for w in report["workloads"]:
        rows = _rows_of(report, w)
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
    """report.json, report.md and (with matplotlib) time.png and roofline.png in out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")]
    with open(written[0], "w") as f:
        json.dump(report, f, indent=1)
    with open(written[1], "w") as f:
        f.write(to_markdown(report) + "\n")
    return written + plot(report, out_dir)


DPI = 110


def _interpreted(report):
    return bool(report["env"].get("triton_interpreter"))


def _grid(plt, heights, width, ncols=2):
    """A figure with one panel per entry of `heights` (in inches), in `ncols` columns (1 for one panel);
    returns (fig, axes), unused cells switched off."""
    ncols = 1 if len(heights) == 1 else ncols
    nrows = -(-len(heights) // ncols)
    rows = [max(heights[r * ncols:(r + 1) * ncols]) for r in range(nrows)]
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, sum(rows) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": rows})
    flat = list(axes.flat)
    for ax in flat[len(heights):]:
        ax.axis("off")
    return fig, flat[:len(heights)]


def _suptitle(fig, report, what, note=""):
    env = report["env"]
    title = f"{what}: {env.get('card')} ({report['device']}), mode {report['mode']}" + (f"\n{note}" if note else "")
    if _interpreted(report):
        title += ("\nTriton kernels ran through Triton's interpreter (TRITON_INTERPRET=1, no GPU): "
                  "their timings are not GPU speed")
    fig.suptitle(title, fontsize=11, color="firebrick" if _interpreted(report) else "black")


def time_figure(plt, report, ok):
    """One panel per suite: a row per workload, a marker per case (log ms); no lines between cases."""
    suites = list(dict.fromkeys(r.get("suite", "") for r in ok))
    workloads = {s: list(dict.fromkeys(r["workload"] for r in ok if r.get("suite", "") == s)) for s in suites}
    fig, axes = _grid(plt, [0.42 * len(workloads[s]) + 1.3 for s in suites], width=7.6)
    markers = "o^sDvP<>Xh"
    for ax, suite in zip(axes, suites):
        rows = [r for r in ok if r.get("suite", "") == suite]
        names = workloads[suite]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        ours = [c for c in cases if c.startswith("mmfast")]
        peers = [c for c in cases if c not in ours]
        for i, case in enumerate(ours + peers):
            pts = [(names.index(r["workload"]), r["ms"]) for r in rows if r["case"] == case]
            offset = (i - (len(cases) - 1) / 2) * min(0.6 / max(len(cases), 1), 0.12)  # dodge: no overlaps
            mine = case in ours
            ax.scatter([p[1] for p in pts], [p[0] + offset for p in pts], label=case, zorder=3,
                       marker="*" if mine else markers[i % len(markers)], s=110 if mine else 36,
                       edgecolors="black" if mine else "none", linewidths=0.6)
        ax.set_xscale("log")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_ylim(len(names) - 0.5, -0.5)
        for y in range(len(names) - 1):
            ax.axhline(y + 0.5, color="0.85", linewidth=0.8)
        ax.grid(axis="x", which="major", color="0.9")
        ax.set_xlabel("ms per call (log scale; left is faster)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(suite, fontsize=10, loc="left", fontweight="bold")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                  title="★ mmfast", title_fontsize=7)
    _suptitle(fig, report, "time per call")
    fig.tight_layout()
    return fig


def roofline_figure(plt, report, roof):
    """One heat map per suite: workloads x cases, each cell the % of the roofline floor reached."""
    import numpy as np

    suites = list(dict.fromkeys(r.get("suite", "") for r in roof))
    shapes = {}
    for s in suites:
        rows = [r for r in roof if r.get("suite", "") == s]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        cases = [c for c in cases if c.startswith("mmfast")] + [c for c in cases if not c.startswith("mmfast")]
        shapes[s] = (list(dict.fromkeys(r["workload"] for r in rows)), cases, rows)
    width = max(0.62 * len(c) for _, c, _ in shapes.values()) + 2.6
    fig, axes = _grid(plt, [0.36 * len(w) + 1.9 for w, _, _ in shapes.values()], width=width)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.92")
    for ax, suite in zip(axes, suites):
        names, cases, rows = shapes[suite]
        data = np.full((len(names), len(cases)), np.nan)
        for r in rows:
            data[names.index(r["workload"]), cases.index(r["case"])] = r["pct_roofline"]
        ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        for r in rows:
            y, x = names.index(r["workload"]), cases.index(r["case"])
            pct = r["pct_roofline"]
            label = f"{pct:.0f}" + ("f" if r.get("bound") == "compute" else "")
            ax.text(x, y, label, ha="center", va="center", fontsize=8, color="black" if pct > 60 else "white")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_title(suite, fontsize=10, loc="left", fontweight="bold")
    _suptitle(fig, report, "% of roofline", "cell: max(bytes / copy bandwidth, FLOPs / matmul peak) over the time; "
              "f: the matmul peak binds; brighter is closer")
    fig.tight_layout()
    return fig


def plot(report, out_dir):
    """time.png: ms per call, a row per workload and a marker per case, a panel per suite;
    roofline.png: % of the roofline floor per workload and case (heat maps). Returns the files written
    ([] without matplotlib)."""
    try:  # optional: only when matplotlib is installed
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in report["rows"] if r.get("ms")]
    if not ok:
        return []
    figures = {"time.png": time_figure(plt, report, ok)}
    roof = [r for r in ok if r.get("pct_roofline") is not None]
    if roof:
        figures["roofline.png"] = roofline_figure(plt, report, roof)
    written = []
    for name, fig in figures.items():
        written.append(os.path.join(out_dir, name))
        fig.savefig(written[-1], dpi=DPI)
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
