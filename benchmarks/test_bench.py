"""pytest-benchmark view of every suite: `pytest benchmarks/ --benchmark-only`.

The same Workload/Case definitions as `python -m benchmarks`: on CUDA at the quick size, elsewhere at
the smoke size (set BENCH_MODE=smoke|quick|full to choose). Lives under benchmarks/, so `pytest tests`
(the project's testpaths) never collects it.
"""
import functools
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from mmfast.benchmarks.common import prepare, suite_module, suite_names  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODE = os.environ.get("BENCH_MODE", "quick" if DEVICE == "cuda" else "smoke")
WORKLOADS = {(suite, w.name): w for suite in suite_names() for w in suite_module(suite).workloads(MODE, DEVICE)}
PARAMS = [pytest.param(key, c, id=f"{key[0]}-{key[1].replace(' ', '-')}-{c.name}")
          for key, w in WORKLOADS.items() for c in w.cases]


@functools.lru_cache(maxsize=1)  # cases arrive grouped by workload: build each one once, keep one alive
def _state(key):
    return WORKLOADS[key].build()


@pytest.mark.benchmark(max_time=0.25 if MODE == "smoke" else 1.0, min_rounds=5)
@pytest.mark.parametrize("key,case", PARAMS)
def test_case(benchmark, key, case):
    wl = WORKLOADS[key]
    fn, reason = prepare(case, _state(key), DEVICE)
    if fn is None:
        pytest.skip(reason)
    benchmark.group = f"{key[0]}: {key[1]}"
    benchmark.extra_info.update(bytes=wl.bytes_per_call if case.bytes is None else case.bytes,
                                flops=wl.flops_per_call if case.flops is None else case.flops, **{
                                    k: v for k, v in wl.info.items() if isinstance(v, (int, float, str))})
    if DEVICE == "cuda":
        benchmark(lambda: (fn(), torch.cuda.synchronize()))
    else:
        benchmark(fn)
