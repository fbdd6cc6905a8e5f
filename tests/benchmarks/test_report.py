"""Report logic of the benchmark suite: roofline columns, regression detection, plots, the CLI."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.common import Case, Workload, _row
from benchmarks.report import compare, plot, to_markdown

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
    pytest.importorskip("matplotlib", reason="plots are optional: matplotlib not installed")
    written = plot(report, str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == ["roofline.png", "time.png"]
    assert all(os.path.getsize(p) > 1000 for p in written)


def test_cli_compare_exit_status(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_report({"a": 1.0})))
    new.write_text(json.dumps(_report({"a": 2.0})))
    run = lambda *a: subprocess.run([sys.executable, "-m", "benchmarks", *a], cwd=REPO, capture_output=True, text=True)  # noqa: E731
    slower = run("--compare", str(old), "--new", str(new))
    assert slower.returncode == 1 and "1 regression(s)" in slower.stdout
    same = run("--compare", str(old), "--new", str(old))
    assert same.returncode == 0 and "0 regression(s)" in same.stdout
    bad = run("--suite", "nonexistent")
    assert bad.returncode == 2 and "unknown suite" in bad.stderr


def test_readme_results_section_is_generated_not_typed():
    from benchmarks import readme

    assert readme.main(["--check"]) == 0, "README.md's GPU results section is stale: run python -m benchmarks.readme"


def test_readme_section_from_a_cuda_report(tmp_path):
    from benchmarks import readme

    folder = tmp_path / "2026-11-27-h100"
    folder.mkdir()
    report = _report({"mmfast_triton": 1.0, "peer": 2.0})
    report["rows"][0]["speedup"] = {"peer": 2.0}
    (folder / "report.json").write_text(json.dumps(report))
    body = readme.section(str(tmp_path))
    assert "### ema: H100, 2026-11-27" in body and "| w | mmfast_triton | 1.000 |" in body and "peer 2.00x" in body
    assert "| w | peer |" not in body  # only our own cases are listed; peers are in the linked report
