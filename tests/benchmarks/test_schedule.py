"""benchmarks/schedule.py: the order and budget of a budgeted benchmark run (the GPU check's headline step),
with fake cases on a fake clock: no GPU, no kernels."""
import pytest

from mmfast.benchmarks import ema
from mmfast.benchmarks.common import Case, Skip, Workload
from mmfast.benchmarks.report import glance_lines
from mmfast.benchmarks.schedule import plan, run_jobs, schedule


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _case(clock, name, seconds, fails=False):
    def make(state):
        clock.now += seconds  # what compiling and timing this case costs
        if fails:
            raise Skip("our kernel does not support this shape")
        return lambda: None

    return Case(name, make)


def _workload(clock, name, costs, baselines, failing=()):
    cases = [_case(clock, c, s, c in failing) for c, s in costs.items()]
    return Workload(name, build=lambda: None, bytes_per_call=10**6, info={"summary": name}, cases=cases,
                    baselines=baselines)


ATTN = {"mmfast_triton": 2, "sdpa_flash": 1, "sdpa_cudnn": 1, "flex_attention": 10, "sdpa_math": 1}
ATTN_BASE = {"sdpa": "sdpa_flash", "cudnn": "sdpa_cudnn", "flex": "flex_attention"}


def _suites(clock, failing=()):
    # given in the command line's (registry) order: ema first; the round-robin puts attention first
    return {
        "ema": [_workload(clock, f"ema{i}", {"loop_mul_add": 1, "timm": 1, "mmfast_triton": 1}, {"loop": "loop_mul_add"})
                for i in range(2)],
        "attention": [_workload(clock, f"attn{i}", ATTN, ATTN_BASE, failing) for i in range(3)],
        "contrastive": [_workload(clock, "clip", {"mmfast": 2, "open_clip": 1}, {"naive": "open_clip"})],
    }


def test_round_robin_attention_first_ours_with_baselines_then_the_other_peers():
    jobs = schedule(_suites(Clock()), budgeted=True)
    key = [(j.suite, j.workload.name) for j in jobs if j.part == "key"]
    assert key == [("attention", "attn0"), ("contrastive", "clip"), ("ema", "ema0"),
                   ("attention", "attn1"), ("ema", "ema1"), ("attention", "attn2")]
    first = jobs[0]
    assert [c.name for c in first.cases] == ["mmfast_triton", "sdpa_flash", "sdpa_cudnn", "flex_attention"]
    others = [j for j in jobs if j.part == "others"]
    assert jobs[len(key):] == others  # the other peers only after every workload's comparison
    assert [(j.workload.name, [c.name for c in j.cases]) for j in others][:2] == [
        ("attn0", ["sdpa_math"]), ("ema0", ["timm"])]
    planned = plan(jobs, "cpu", budget_s=8)  # priors on the CPU: 1 s a case, 1 s a workload's inputs
    assert [(j.workload.name, s, t) for j, s, t in planned[:3]] == [("attn0", 5, 5), ("clip", 3, 8), ("ema0", 3, None)]
    unbudgeted = schedule(_suites(Clock()), budgeted=False)  # suite by suite, every case at once
    assert [j.workload.name for j in unbudgeted] == ["ema0", "ema1", "attn0", "attn1", "attn2", "clip"]


def _run(budget, failing=()):
    clock = Clock()
    jobs = schedule(_suites(clock, failing), budgeted=True)
    rows = run_jobs(jobs, "cpu", "smoke", {}, deadline=budget, budget_s=budget, log=lambda *_: None, clock=clock)
    return rows, clock


def _by_workload(rows):
    out = {}
    for r in rows:
        out.setdefault(r["workload"], {})[r["case"]] = r
    return out


def test_budget_never_splits_ours_from_its_baselines():
    rows, clock = _run(budget=40)
    wl = _by_workload(rows)
    assert clock.now <= 40
    for name in ("attn0", "clip", "ema0", "attn1", "ema1"):  # 14 + 3 + 2 + 14 + 2 s
        assert all(wl[name][c]["status"] == "ok" for c in ("mmfast_triton", "sdpa_flash", "sdpa_cudnn",
                                                           "flex_attention") if c in wl[name]), name
    # attn2 would need ~15 s (FlexAttention's 10 s compile, learnt from attn0) with 5 s left: all of it skipped
    attn2 = wl["attn2"]
    assert {r["status"] for r in attn2.values()} == {"skipped"}
    assert "ours + baselines need ~15 s together, 5 s left" in attn2["mmfast_triton"]["reason"]
    assert "mmfast case and baselines were not timed" in attn2["sdpa_math"]["reason"]
    for cases in wl.values():  # never ours alone, never the baselines alone
        timed = {c for c, r in cases.items() if r["status"] == "ok"}
        ours = {c for c in timed if c.startswith("mmfast")}
        assert bool(ours) == bool(timed - ours - {"sdpa_math", "timm"}), cases
    assert wl["attn0"]["mmfast_triton"]["speedup"]["flex"] == pytest.approx(
        wl["attn0"]["flex_attention"]["ms"] / wl["attn0"]["mmfast_triton"]["ms"])


def test_baselines_of_a_workload_whose_own_case_failed_are_not_timed():
    rows, _ = _run(budget=100, failing=("mmfast_triton",))
    attn0 = _by_workload(rows)["attn0"]
    assert attn0["mmfast_triton"]["reason"] == "our kernel does not support this shape"
    assert "no mmfast case of this workload ran" in attn0["flex_attention"]["reason"]
    assert _by_workload(rows)["clip"]["open_clip"]["status"] == "ok"


def test_glance_line_per_workload_ours_vs_each_baseline():
    rows, _ = _run(budget=40)
    workloads = [{"suite": s, "workload": w.name, "baselines": w.baselines}
                 for s, wls in _suites(Clock()).items() for w in wls]
    lines = glance_lines({"workloads": workloads, "rows": rows})
    attn0 = next(ln for ln in lines if "attn0" in ln)
    assert attn0.startswith("- attention / attn0: mmfast_triton ")
    assert all(f"x vs {b} (" in attn0 for b in ATTN_BASE.values())
    assert not any("attn2" in ln for ln in lines)  # nothing of ours ran there


@pytest.mark.parametrize("built", [False, True], ids=["not-built", "built"])
def test_ema_extension_case_never_waits_on_a_build(monkeypatch, built):
    import mmfast._ext as ext

    def no_build(*args, **kwargs):
        raise AssertionError("the benchmark must not build or wait for the extension here")

    monkeypatch.setattr(ext, "load_extension", no_build)
    monkeypatch.setattr(ext, "lock_path", lambda flavour=None: "/tmp/lock")
    monkeypatch.setattr(ext, "lock_held", lambda path: True)  # the GPU check's background build runs
    with pytest.raises(Skip, match="extension not built yet: another process is building it"):
        ema._require_backend("cuda")
    monkeypatch.setattr(ext, "lock_held", lambda path: False)  # the build ended (or never started)
    monkeypatch.setenv("MMFAST_NO_JIT", "1")

    class Module:
        @staticmethod
        def with_cuda():
            return True

    monkeypatch.setattr(ext, "loaded_extension", lambda: (Module, None) if built else (None, "not built"))
    if built:
        ema._require_backend("cuda")
    else:
        with pytest.raises(Skip, match=r"extension not built yet \(not built\)"):
            ema._require_backend("cuda")
