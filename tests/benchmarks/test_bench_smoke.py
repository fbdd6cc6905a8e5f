"""The benchmark suites never rot: every suite runs at its smoke size on the CPU in CI.

`python -m mmfast bench --smoke` runs the same cases at tiny sizes through the reference / interpreter
paths; timings here mean nothing, the test checks that every case either runs or says why it cannot.
The suites are the registry's families (mmfast.kernels._registry) and common.EXTRA_SUITES (e.g. swap: whole
models before / after mmfast.patch), installed as mmfast.benchmarks.
"""
import json
import os

import pytest

from mmfast.benchmarks.common import EXTRA_SUITES, run_suite, suite_names
from mmfast.kernels._registry import NAMES


def test_one_suite_per_family_then_the_extra_suites():
    assert tuple(suite_names()) == tuple(NAMES) + tuple(EXTRA_SUITES)
    for name in suite_names():
        assert os.path.basename(__import__(f"mmfast.benchmarks.{name}", fromlist=["_"]).__file__) == f"{name}.py"


# suites whose mmfast cases are converted from transformers' models (swap: patches them)
NEEDS_TRANSFORMERS = ("swap", "models", "vlm")


@pytest.mark.parametrize("suite", suite_names())
def test_suite_runs_at_smoke_size(suite, tmp_path):
    if suite in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers", reason=f"the {suite} suite compares with transformers' models")
    report = run_suite([suite], mode="smoke", out_dir=str(tmp_path), device="cpu", log=lambda *_: None)
    assert report["rows"], f"suite {suite} defines no cases"
    for workload in {r["workload"] for r in report["rows"]}:
        rows = [r for r in report["rows"] if r["workload"] == workload]
        assert any(r["status"] == "ok" for r in rows), f"{suite}/{workload}: no case ran: {[r['reason'] for r in rows]}"
        for r in rows:
            if r["status"] == "ok":
                assert r["ms"] > 0 and r["GBps"] > 0, r
            else:
                assert r["reason"], f"{suite}/{workload}/{r['case']} skipped without a reason"
            if r["case"].startswith("mmfast"):  # our own kernels must always run, on every device
                assert r["status"] == "ok", f"{suite}/{workload}/{r['case']}: {r['reason']}"
    assert json.load(open(os.path.join(tmp_path, "report.json")))["suites"] == [suite]
    markdown = open(os.path.join(tmp_path, "report.md")).read()
    assert all(r["case"] in markdown for r in report["rows"])


def test_the_contrastive_tuning_candidate_holds_only_during_its_calls():
    """The candidate case overrides the gemm backend's launch configs while it runs, and restores them even
    when a call fails (the default case timed after it must run the defaults)."""
    from mmfast.benchmarks.contrastive import _with_gemm_config
    from mmfast.kernels.contrastive._configs import GEMM

    before = {k: dict(GEMM[k]) for k in ("fwd", "grad")}
    seen = []
    _with_gemm_config(lambda: seen.append(GEMM["grad"]["num_warps"]), {"grad": {"num_warps": 8}})()
    assert seen == [8] and {k: GEMM[k] for k in before} == before

    def fail():
        raise RuntimeError("launch failed")
    with pytest.raises(RuntimeError, match="launch failed"):
        _with_gemm_config(fail, {"fwd": {"num_warps": 8}})()
    assert {k: GEMM[k] for k in before} == before
