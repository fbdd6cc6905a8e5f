"""A regular (non-editable) install ships every subpackage: the wheel holds each package directory."""
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


def test_wheel_contains_every_package(tmp_path):
    # build from a clean copy: setuptools' build/ keeps files of earlier builds, which would hide a gap
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "results"))
    env = dict(os.environ, MMFAST_BUILD_EXT="0")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (wheel,) = [p for p in os.listdir(tmp_path / "dist") if p.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / "dist" / wheel).namelist())
    expected = list(_package_dirs("mmfast", "mmfast")) + list(_package_dirs("kernels", "mmfast/kernels"))
    assert len(expected) >= 5
    missing = [p for p in expected if f"{p}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (setup.py `packages`): {missing}"
