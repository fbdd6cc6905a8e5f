"""pytest-benchmark view of the EMA suite: `pytest benchmarks/ --benchmark-only`.

Same Workload/Case definitions as `python -m benchmarks`, at the smoke size on the CPU. Lives under
benchmarks/, so `pytest tests` (the project's testpaths) never collects it.
"""
import functools

import pytest

pytest.importorskip("pytest_benchmark")

from benchmarks.common import prepare  # noqa: E402
from benchmarks.ema import workloads  # noqa: E402

DEVICE = "cpu"
WORKLOADS = {w.name: w for w in workloads("smoke", DEVICE)}
PARAMS = [pytest.param(w.name, c, id=f"{w.name.replace(' ', '-')}-{c.name}") for w in WORKLOADS.values() for c in w.cases]


@functools.lru_cache(maxsize=1)  # cases arrive grouped by workload: build each one once, keep one alive
def _state(name):
    return WORKLOADS[name].build()


@pytest.mark.benchmark(max_time=0.25, min_rounds=5)  # smoke sizes: a quarter second per case is plenty
@pytest.mark.parametrize("workload,case", PARAMS)
def test_ema(benchmark, workload, case):
    wl = WORKLOADS[workload]
    fn, reason = prepare(case, _state(workload), DEVICE)
    if fn is None:
        pytest.skip(reason)
    benchmark.group = workload
    benchmark.extra_info.update(bytes_per_call=wl.bytes_per_call, params=wl.info["params"], tensors=wl.info["tensors"])
    benchmark(fn)
