"""`python -m mmfast` commands: info, check (the quick start's main job), usage, --help speed.

The check with other Triton releases' interpreters is a CI step (.ci/run), not a test: it needs those
releases installed.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import mmfast.kernels as kernels
from mmfast import check
from mmfast.kernels._registry import FAMILIES, OPS

SUBCOMMANDS = ("check", "bench", "info", "compile-report", "verify", "train")


def _run(*args, timeout=600, env=None):
    env = dict(os.environ if env is None else env)
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
    assert "No CUDA runtime is found" not in out.stderr


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


def test_check_reads_the_registry():
    assert check.family_names() == tuple(f.name for f in FAMILIES)
    with pytest.raises(ValueError, match="unknown kernel families"):
        check.run_checks("cpu", ["nonexistent"])


def test_check_float64_passes_the_dtype_and_names_it(monkeypatch, capsys):
    seen = []

    def cases(device, dtype=None):
        seen.append(dtype)
        yield ("ema_update_", "reference", "fp64", "(3,)", lambda: (0.0, 1e-10, True, True))

    monkeypatch.setattr(FAMILIES[0].checks, "cases", cases)
    assert check.main(["--device", "cpu", "--only", FAMILIES[0].name, "--dtype", "float64"]) == 0
    assert seen == [torch.float64]
    assert "float64" in capsys.readouterr().out


def test_check_float64_reports_a_family_without_it(monkeypatch, capsys):
    """A family whose cases() takes no dtype yet fails with a clear reason instead of crashing."""
    monkeypatch.setattr(FAMILIES[0].checks, "cases", lambda device: iter(()))
    assert check.main(["--device", "cpu", "--only", FAMILIES[0].name, "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    assert "takes no dtype" in out and FAMILIES[0].name in out


@pytest.mark.slow
def test_check_float64_runs_only_the_reference_and_passes():
    """Every family's float64 mode: backend='reference' in float64 against an independent float64 torch
    formulation (issue 12, item 3)."""
    _, results = check.run_checks("cpu", dtype=torch.float64)
    assert set(OPS) <= {r.op for r in results}, "every op of the registry has a float64 case"
    failed = [(r.op, r.backend, r.dtype, r.detail) for r in results if not r.passed]
    assert not failed, failed
    assert {r.backend for r in results} == {"reference"}


def test_info_lists_versions_and_what_auto_runs_per_op(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    out = _run("info", env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert torch.__version__ in out.stdout
    for op in OPS:
        assert op in out.stdout
    assert "runs reference" in out.stdout  # CPU tensors
    assert "TRITON_INTERPRET=1" in out.stdout  # why triton cannot run on CPU tensors without the interpreter
    if importlib.util.find_spec("mmfast._C") is None:  # not prebuilt by setup.py
        assert "not built" in out.stdout  # the extension: reported, never built by info
    assert not any(files for _, _, files in os.walk(tmp_path)), "info started a C++ build"
    assert "No CUDA runtime is found" not in out.stderr


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_imports_no_torch(command):
    """--help stays instant by not importing torch (seconds on a cold start); asserted by what is imported, not
    by a wall-clock limit, which a loaded CI machine would break at random."""
    code = ("import sys\nfrom mmfast.__main__ import main\ntry:\n    main([%r, '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch imported' if 'torch' in sys.modules else 'no torch')") % command
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m mmfast" in out.stdout
    assert out.stdout.strip().endswith("no torch"), out.stdout[-500:]


def test_info_honours_help():
    out = _run("info", "--help", timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m mmfast info"), out.stdout


def test_unknown_command_prints_usage():
    out = _run("frobnicate", timeout=60)
    assert out.returncode == 2
    assert "compile-report" in out.stdout and "unknown command" in out.stderr
