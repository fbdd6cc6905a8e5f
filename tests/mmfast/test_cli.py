"""`python -m mmfast` commands: info, check (the quick start's main job), usage."""
import os
import subprocess
import sys

import pytest
import torch

import mmfast.kernels as kernels
from mmfast import check


def _run(*args, timeout=600):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CLI must set it up itself on a CPU machine
    return subprocess.run([sys.executable, "-m", "mmfast", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.slow
def test_check_passes_and_prints_every_backend():
    out = _run("check")
    assert out.returncode == 0, out.stdout + out.stderr
    backends = ("triton", "cuda", "reference") if torch.cuda.is_available() else ("triton", "cpp", "reference")
    for backend in backends:
        assert f"│ {backend}" in out.stdout or f" {backend} " in out.stdout, out.stdout
    assert " 0 failed" in out.stdout
    assert "FAIL" not in out.stdout


@pytest.mark.slow
def test_check_passes_with_triton_3_9_interpreter():
    """The newest Triton we support runs every kernel through its interpreter too (its interpreter has
    rejected code that 3.8's took). 3.6's interpreter is not run: it cannot take a runtime loop bound
    with numpy 2.x at all (compiled 3.6 kernels are covered by the compile gate)."""
    import triton

    from mmfast import compile_report

    if triton.__version__.startswith("3.9"):
        pytest.skip("Triton 3.9 is this environment's own: the check above runs it")
    try:
        python = compile_report.triton_env("3.9.0")
    except RuntimeError as exc:
        pytest.skip(f"triton==3.9.0 cannot be installed here (no package index?): {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([python, "-m", "mmfast", "check"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " 0 failed" in out.stdout


def test_check_reports_a_wrong_kernel(monkeypatch, capsys):
    real = kernels.ema_update_

    def off_by_one_ulp(ema, src, momentum, **kwargs):
        real(ema, src, momentum, **kwargs)
        for e in ema:
            e.copy_(torch.nextafter(e, torch.full_like(e, float("inf"))))

    monkeypatch.setattr(kernels, "ema_update_", off_by_one_ulp)
    assert check.main(["--device", "cpu", "--only", "ema"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "\n0 passed" in out


def test_info_lists_versions_and_backends():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    assert torch.__version__ in out.stdout
    assert "backend reference" in out.stdout


def test_unknown_command_prints_usage():
    out = _run("frobnicate")
    assert out.returncode == 2
    assert "compile-report" in out.stdout
