"""Report logic of the benchmark suite: roofline columns, regression detection, plots, the CLI."""
import json
import os
import subprocess
import sys

import pytest

from mmfast.benchmarks.common import Case, Workload, _row
from mmfast.benchmarks.report import compare, plot, roofline_figure, time_figure, to_markdown

CEILINGS = {"copy_GBps": 1000.0, "matmul_TFLOPs": 500.0, "matmul_dtype": "bfloat16", "matmul_n": 8192,
            "copy_buffer_bytes": 1 << 30}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _workload(flops=0):
    return Workload("w", build=lambda: None, bytes_per_call=10**9, info={"summary": "s"},
                    cases=[Case("mmfast_x", make=lambda s: None)], flops_per_call=flops)


def _timing(ms, spread=0.01):
    return {"ms": ms, "min_ms": ms * (1 - spread), "p20_ms": ms * (1 - spread), "p80_ms": ms * (1 + spread)}


def test_memory_bound_row_uses_copy_bandwidth():
    row = _row(_workload(), _workload().cases[0], timing=_timing(2.0), ceilings=CEILINGS)
    assert row["bound"] == "memory"
    assert row["GBps"] == pytest.approx(500.0) and row["pct_roofline"] == pytest.approx(50.0)


def test_compute_bound_row_uses_matmul_peak_and_case_override():
    wl = _workload(flops=10**12)
    case = Case("mmfast_bwd", make=lambda s: None, flops=4 * 10**12)  # per-case work overrides the workload's
    row = _row(wl, case, timing=_timing(16.0), ceilings=CEILINGS)
    assert row["bound"] == "compute"
    assert row["TFLOPs"] == pytest.approx(250.0) and row["pct_roofline"] == pytest.approx(50.0)


def _report(ms_by_case, spread=0.01):
    rows = [dict(_row(_workload(), Case(name, make=lambda s: None), timing=_timing(ms, spread), ceilings=CEILINGS),
                 suite="ema") for name, ms in ms_by_case.items()]
    return {"suites": ["ema"], "mode": "quick", "device": "cuda", "elapsed_s": 1.0, "ceilings": CEILINGS,
            "env": {"card": "H100", "date": "2026-11-27", "torch": "x", "triton": "y", "python": "3", "cpu_threads": 2,
                    "git_commit": "abc"},
            "workloads": [{"workload": "w", "summary": "s", "baselines": {}}], "rows": rows}


def test_compare_flags_only_changes_beyond_noise():
    old = _report({"a": 1.0, "b": 1.0, "c": 1.0})
    new = _report({"a": 1.02, "b": 1.30, "c": 0.70})
    verdicts = {r["case"]: r["verdict"] for r in compare(old, new)}
    assert verdicts == {"a": "noise", "b": "regression", "c": "improvement"}
    noisy = compare(_report({"b": 1.0}, spread=0.4), _report({"b": 1.30}, spread=0.4))
    assert noisy[0]["verdict"] == "noise"  # a 30% change inside a +-40% spread proves nothing


def test_markdown_and_plots(tmp_path):
    report = _report({"mmfast_x": 2.0, "peer": 3.0})
    text = to_markdown(report)
    assert "| mmfast_x | 2.000 |" in text and "% roof" in text
    assert "interpreter" not in text
    pytest.importorskip("matplotlib", reason="plots are optional: matplotlib not installed")
    written = plot(report, str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == ["roofline.png", "time.png"]
    assert all(os.path.getsize(p) > 1000 for p in written)


def _many_suites():
    """Five suites with several workloads and cases each, as a full run has."""
    rows, workloads = [], []
    suites = ("ema", "attention", "contrastive", "patch_embed", "gated_linear")
    for s, suite in enumerate(suites):
        for w in range(2 + s):
            wl = Workload(f"{suite}_w{w}", build=lambda: None, bytes_per_call=10**8 * (w + 1), info={"summary": ""},
                          cases=[], flops_per_call=10**10 * (w + 1) if s % 2 else 0)
            workloads.append({"suite": suite, "workload": wl.name, "baselines": {}})
            for c, case in enumerate(("mmfast_triton", "mmfast_reference", "torch_a", "torch_b", "peer_c")):
                rows.append(dict(_row(wl, Case(case, make=lambda s: None), timing=_timing(0.1 * (c + 1) * (w + 1)),
                                      ceilings=CEILINGS), suite=suite))
    report = _report({})
    report.update(suites=list(suites), rows=rows, workloads=workloads)
    return report


def test_time_plot_marks_cases_without_joining_them():
    plt = pytest.importorskip("matplotlib.pyplot", reason="plots are optional: matplotlib not installed")
    report = _many_suites()
    fig = time_figure(plt, report, report["rows"])
    try:
        panels = [ax for ax in fig.axes if ax.collections]
        assert [ax.get_title(loc="left") for ax in panels] == report["suites"]  # grouped by suite
        for ax in panels:
            assert len(ax.collections) == 5  # one marker set per case
            for line in ax.get_lines():  # only horizontal separators between workloads: no line joins cases
                assert len(set(line.get_ydata())) == 1, line.get_ydata()
        width, height = fig.get_size_inches()
        assert width <= 16 and height <= 16 and 0.5 <= width / height <= 2, (width, height)
        assert "interpreter" not in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_plots_say_when_timings_came_from_the_interpreter():
    plt = pytest.importorskip("matplotlib.pyplot", reason="plots are optional: matplotlib not installed")
    report = _many_suites()
    report["env"]["triton_interpreter"] = True
    assert "interpreter" in to_markdown(report)
    for make in (time_figure, roofline_figure):
        fig = make(plt, report, report["rows"])
        try:
            assert "Triton's interpreter" in fig._suptitle.get_text()
        finally:
            plt.close(fig)


def test_roofline_plot_is_readable():
    plt = pytest.importorskip("matplotlib.pyplot", reason="plots are optional: matplotlib not installed")
    report = _many_suites()
    fig = roofline_figure(plt, report, report["rows"])
    try:
        width, height = fig.get_size_inches()
        assert width <= 18 and height <= 16 and 0.5 <= width / height <= 2, (width, height)
        panels = [ax for ax in fig.axes if ax.images]
        assert [ax.get_title(loc="left") for ax in panels] == report["suites"]
        for ax in panels:
            assert all(t.get_fontsize() >= 8 for t in ax.get_yticklabels() + ax.get_xticklabels())
            # every case of every workload is labelled with its number
            assert len(ax.texts) == len([r for r in report["rows"] if r["suite"] == ax.get_title(loc="left")])
    finally:
        plt.close(fig)


def _cli(*args, module="benchmarks", timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "mmfast", "bench"] if module == "mmfast" else [sys.executable, "-m", "benchmarks"]
    return subprocess.run(cmd + list(args), cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("module", ["benchmarks", "mmfast"])
def test_cli_compare_exit_status(tmp_path, module):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_report({"a": 1.0})))
    new.write_text(json.dumps(_report({"a": 2.0})))
    slower = _cli("--compare", str(old), "--new", str(new), module=module)
    assert slower.returncode == 1 and "1 regression(s)" in slower.stdout
    same = _cli("--compare", str(old), "--new", str(old), module=module)
    assert same.returncode == 0 and "0 regression(s)" in same.stdout
    bad = _cli("--suite", "nonexistent", module=module)
    assert bad.returncode == 2 and "unknown suite" in bad.stderr


@pytest.mark.slow
def test_cli_run_lists_what_it_wrote_and_prints_a_summary(tmp_path):
    pytest.importorskip("matplotlib", reason="plots are optional: matplotlib not installed")
    out = tmp_path / "run"
    res = _cli("--smoke", "--device", "cpu", "--suite", "contrastive", "--out", str(out), module="mmfast")
    assert res.returncode == 0, res.stdout + res.stderr
    listed = res.stdout.split("wrote:", 1)[1].split()
    assert sorted(os.path.basename(p) for p in listed) == ["report.json", "report.md", "roofline.png", "time.png"]
    assert all(os.path.exists(p) for p in listed)
    assert "| case |" not in res.stdout  # the tables are in report.md, not dumped to the terminal
    assert "contrastive: " in res.stdout and "interpreter" in res.stdout
    assert json.loads((out / "report.json").read_text())["env"]["triton_interpreter"] is True


def test_cli_accepts_the_old_suite_name_gated(tmp_path):
    """`gated` was the gated_linear suite's name: still accepted (no case runs within a zero budget)."""
    res = _cli("--smoke", "--device", "cpu", "--suite", "gated", "--budget-s", "0", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["suites"] == ["gated_linear"] and all(r["reason"] == "time budget exhausted" for r in report["rows"])


def test_readme_results_section_is_generated_not_typed():
    from mmfast.benchmarks import readme

    assert readme.main(["--check"]) == 0, "README.md's GPU results section is stale: run python -m benchmarks.readme"


def test_readme_section_from_a_cuda_report(tmp_path):
    from mmfast.benchmarks import readme

    folder = tmp_path / "2026-11-27-h100"
    folder.mkdir()
    report = _report({"mmfast_triton": 1.0, "peer": 2.0})
    report["rows"][0]["speedup"] = {"peer": 2.0}
    (folder / "report.json").write_text(json.dumps(report))
    body = readme.section(str(tmp_path))
    assert "### ema: H100, 2026-11-27" in body and "| w | mmfast_triton | 1.000 |" in body and "peer 2.00x" in body
    assert "| w | peer |" not in body  # only our own cases are listed; peers are in the linked report
