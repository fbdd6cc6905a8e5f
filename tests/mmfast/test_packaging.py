"""A regular (non-editable) install ships every subpackage: the wheel holds each package directory, the
benchmark suites included (`python -m mmfast bench` outside a source checkout)."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _package_dirs(root, prefix):
    for dirpath, _, files in os.walk(os.path.join(REPO, root)):
        if "__init__.py" in files and "__pycache__" not in dirpath:
            rel = os.path.relpath(dirpath, os.path.join(REPO, root))
            yield prefix if rel == "." else f"{prefix}/{rel.replace(os.sep, '/')}"


def _builds_wheels_here():
    """Can this environment's setuptools build a wheel without build isolation? (setuptools >= 70.1 has
    bdist_wheel; older ones need the `wheel` package: the setuptools 65 that Python 3.11's venv ships lacks it.)"""
    try:
        import wheel  # noqa: F401

        return True
    except ImportError:
        import setuptools

        return tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1)


def test_wheel_contains_every_package(tmp_path):
    # build from a clean copy: setuptools' build/ keeps files of earlier builds, which would hide a gap
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "results",
                                                             ".venv", ".ext"))
    env = dict(os.environ, MMFAST_BUILD_EXT="0")
    isolation = ["--no-build-isolation"] if _builds_wheels_here() else []  # else pyproject's build requirements
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (wheel,) = [p for p in os.listdir(tmp_path / "dist") if p.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / "dist" / wheel).namelist())
    expected = (list(_package_dirs("mmfast", "mmfast")) + list(_package_dirs("kernels", "mmfast/kernels"))
                + list(_package_dirs("benchmarks", "mmfast/benchmarks")))
    assert len(expected) >= 6 and "mmfast/benchmarks" in expected
    missing = [p for p in expected if f"{p}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (setup.py `packages`): {missing}"
    suites = [f for f in os.listdir(os.path.join(REPO, "benchmarks")) if f.endswith(".py")]
    assert all(f"mmfast/benchmarks/{f}" in names for f in suites), sorted(n for n in names if "benchmarks" in n)

    # the installed command line, away from the checkout: -S keeps this environment's finders (which map
    # mmfast to the checkout) out; --help and --compare import no torch
    site = tmp_path / "site"
    zipfile.ZipFile(tmp_path / "dist" / wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRITON"))}
    env["PYTHONPATH"] = str(site)
    run = lambda *a: subprocess.run([sys.executable, "-S", *a], capture_output=True, text=True,  # noqa: E731
                                    env=env, cwd=tmp_path, timeout=120)
    where = run("-c", "import mmfast.benchmarks as m; print(m.__file__)")
    assert where.returncode == 0 and where.stdout.startswith(str(site)), where.stdout + where.stderr
    help_ = run("-m", "mmfast", "bench", "--help")
    assert help_.returncode == 0, help_.stderr
    assert help_.stdout.startswith("usage: python -m mmfast bench")
    report = {"env": {"card": "H100", "date": "2026-11-27", "git_commit": "abc"}, "mode": "quick",
              "rows": [{"workload": "w", "case": "mmfast_x", "ms": 1.0, "min_ms": 0.99, "p20_ms": 0.99, "p80_ms": 1.01}]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    same = run("-m", "mmfast", "bench", "--compare", str(tmp_path / "r.json"), "--new", str(tmp_path / "r.json"))
    assert same.returncode == 0 and "0 regression(s)" in same.stdout, same.stdout + same.stderr



def test_top_level_kernels_from_a_checkout_is_an_empty_package():
    """From a checkout, `kernels/` is importable as a top-level `kernels` (Hugging Face's kernel-hub package
    name, which transformers imports to probe it). That copy must register no op (a second registration of
    the mmfast:: ops corrupts the dispatcher) and must not look like a usable hub package."""
    code = ("import sys; import kernels, mmfast.kernels; "
            "print(kernels.__all__, [m for m in sys.modules if m.startswith('kernels.')], "
            "getattr(kernels, '__version__', 'N/A'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[]", "[]", "N/A"], res.stdout
