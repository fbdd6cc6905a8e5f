"""benchmarks/gpu_check.sh's pieces that run without a GPU. The script itself runs end to end in CI
(`.ci/run`'s gpu-image step: `--dry-run` on torch 2.11 + Triton 3.6, mmfast imported from the source tree);
here: the finder of its source-tree import (the fallback when `pip install -e .` fails; CI's step proves the
import itself, in an environment without mmfast installed) and its step order."""
import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _finder():
    path = os.path.join(ROOT, "benchmarks", "srcpath", "sitecustomize.py")
    spec = importlib.util.spec_from_file_location("_srcpath_under_test", path)
    module = importlib.util.module_from_spec(spec)
    before = list(sys.meta_path)
    spec.loader.exec_module(module)
    sys.meta_path[:] = before  # this process keeps its own import machinery
    return module.SourceTreeFinder()


def test_source_tree_finder_maps_the_relocated_packages():
    finder = _finder()
    cases = {"mmfast.kernels": "kernels/__init__.py", "mmfast.kernels.attention._launch": "kernels/attention/_launch.py",
             "mmfast.benchmarks.tune": "benchmarks/tune.py", "mmfast.kernels._tuned": "kernels/_tuned.py"}
    for name, rel in cases.items():
        assert finder.find_spec(name, None).origin == os.path.join(ROOT, rel), name
    csrc = finder.find_spec("mmfast.csrc", None)  # sources only, no __init__.py
    assert list(csrc.submodule_search_locations) == [os.path.join(ROOT, "csrc")]
    assert finder.find_spec("mmfast.kernels.nope", None) is None
    assert finder.find_spec("mmfast.nn", None) is None  # not relocated: found on the root by the usual finder


def test_script_order_headline_first_full_suite_last():
    text = open(SCRIPT).read()
    steps = re.findall(r"^\s*step (\w+) ", text, flags=re.M)
    gpu = [s for s in dict.fromkeys(steps)]
    gpu = [s for s in gpu if s != "wheels"]  # only where a session carried optional wheels, right after pip
    assert gpu[:4] == ["pip", "info", "bench_headline", "tune"], gpu
    assert gpu.index("check") < gpu.index("pytest_cuda") < gpu.index("pytest_all") < gpu.index("compile_report")
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_step_shares_of_a_450_s_run():
    """The budget goes where the 2026-11-28 run lacked it: the headline's benchmarks get >= 150 s (its step
    keeps 25 s for start-up, plots and finishing a started workload), the tuner <= 90 s, check and
    pytest -m cuda >= 60 s each, and the reserves hold those shares while earlier steps run."""
    text = open(SCRIPT).read()
    shares = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^\s*step (\w+) (\d+) (\d+) ", text, flags=re.M)}
    cap = {name: c for name, (c, _) in shares.items()}
    reserve = {name: r for name, (_, r) in shares.items()}
    assert "--budget-s $(( cap > 60 ? cap - $(secs 25)" in text and cap["bench_headline"] - 25 >= 150
    assert cap["tune"] <= 90 and cap["check"] >= 60 and cap["pytest_cuda"] >= 60
    assert reserve["bench_headline"] >= cap["tune"] + 60 + 60
    assert reserve["tune"] >= 60 + 60 and reserve["check"] >= 60
    assert 10 + cap["bench_headline"] + cap["tune"] + 60 + 60 <= 440  # pip and info take ~10 s
    # the C++ extension builds in the background, never in a benchmark step
    assert re.search(r"^timeout .* python -c '.*load_extension\(\).*' >\"\$OUT_DIR/build_ext.log\" 2>&1 &$", text,
                     flags=re.M | re.S)
    assert all("env MMFAST_NO_JIT=1 python -m mmfast bench" in line
               for line in text.splitlines() if re.match(r"\s*step bench_", line))


def test_every_suite_has_headline_workloads_and_others():
    """`bench --headline` (the GPU check's first step) and `--rest` split every suite's GPU workloads; the
    attention headline is FlashAttention-3's L=1024 / 4096 at D=64 and ViT-L/14@336, fwd and fwd+bwd, in that
    order; the CLIP loss's is N = 32k."""
    import torch

    from mmfast.benchmarks.common import suite_module, suite_names

    for name in suite_names():
        if name == "vlm" and importlib.util.find_spec("transformers") is None:
            continue  # its workloads are transformers' configs
        wls = suite_module(name).workloads("quick", torch.device("cuda"))
        headline = [w.name for w in wls if w.info.get("headline")]
        assert headline and len(headline) < len(wls), (name, headline)
        if name == "attention":
            assert headline == [f"{s} {d}" for s in ("fa3_L1024_D64", "fa3_L4096_D64", "vit_l14_336")
                                for d in ("fwd", "fwd+bwd")]
            assert all(w.baselines == {"sdpa": "sdpa_flash", "cudnn": "sdpa_cudnn", "flex": "flex_attention"}
                       for w in wls if w.name in headline)
        if name == "contrastive":
            assert headline == ["clip_loss N=32768 D=512"]
