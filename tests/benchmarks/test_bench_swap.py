"""The swap suite's own measurement: the share of a call's time in mmfast kernels (its smoke run, with
backend "reference", calls no custom op; test_bench_smoke runs every model there)."""
import torch

import mmfast.kernels
from mmfast.benchmarks import swap


def test_kernel_share_counts_the_mmfast_custom_ops():
    # backend "triton": the custom ops (under the interpreter here) that a GPU run profiles
    q, k, v = (torch.randn(1, 16, 2, 16) for _ in range(3))
    calls = []

    def fn():
        calls.append(1)
        mmfast.kernels.flash_attention(q, k, v, backend="triton")
        torch.randn(256, 256) @ torch.randn(256, 256)  # time outside our kernels

    ours, wall, n = swap.kernel_share(fn, "cpu", walls=1)
    assert n == 1 and len(calls) == 3  # warm-up, profiled, timed
    assert 0 < ours < 10 * wall  # profiled CPU time, compared with an unprofiled call's wall time


def test_every_model_of_the_issue_has_a_fwd_and_a_train_workload_with_its_target():
    wls = {w.name: w for w in swap.workloads("quick", torch.device("cuda"))}
    models = [s.name for s in swap.SPECS]
    assert len(models) == 9
    for name in models:
        fwd, train = wls[f"{name} fwd"], wls[f"{name} train"]
        assert fwd.info["target_speedup"] == 1.0 and "target: mmfast >= 1.0x sdpa" in fwd.info["summary"]
        want = 1.0 if name.startswith("vit") else 1.5 if name.startswith(("mllama", "idefics")) else 1.2
        assert train.info["target_speedup"] == want, name
        assert [c.name for c in train.cases] == ["sdpa", "mmfast"] and train.baselines == {"sdpa": "sdpa"}
        assert train.bytes_per_call == 3 * fwd.bytes_per_call > 0
