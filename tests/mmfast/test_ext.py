"""The C++ extension's JIT build (mmfast/_ext.py): one build folder per torch build, a message saying what
is built, and no endless wait on a lock file left by an interrupted build (issue 12, item 12)."""
import os
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch

from mmfast import _ext


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    """An empty torch-extensions root and a fresh extension state: nothing built, nothing loaded."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("MMFAST_NO_JIT", raising=False)
    monkeypatch.setattr(_ext, "_state", {"module": None, "error": None})
    return tmp_path


def _hold(path):
    """Hold the lock file the way a running build does: create it and (for torch's flock) lock it."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_build_folder_is_keyed_by_torch_and_python(ext_dir, monkeypatch):
    folder = _ext.build_dir("cpu")
    assert os.path.dirname(folder) == str(ext_dir)
    name = os.path.basename(folder)
    assert name.startswith("mmfast_C_cpu-") and torch.__version__.replace("+", "-") in name
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in name
    assert _ext.build_dir("cuda") != folder
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu128")
    assert _ext.build_dir("cpu") != folder  # another torch never shares (or waits on) this build


def test_a_stale_lock_file_blocks_only_where_torch_waits_on_the_file(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    lock.write_text("")  # left behind by a build that was killed
    monkeypatch.setattr(_ext, "_torch_uses_flock", lambda: False)  # torch < 2.13: FileBaton waits while it exists
    assert _ext.lock_held(str(lock))
    monkeypatch.setattr(_ext, "_torch_uses_flock", lambda: True)  # an OS lock: a dead holder holds nothing
    assert not _ext.lock_held(str(lock))
    fd = _hold(str(lock))  # a live build
    try:
        assert _ext.lock_held(str(lock))
    finally:
        os.close(fd)
    assert not _ext.lock_held(str(tmp_path / "absent"))


def test_waiting_on_a_lock_times_out_naming_it(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    lock.write_text("")
    monkeypatch.setattr(_ext, "_torch_uses_flock", lambda: False)
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        _ext._wait_for_lock(str(lock), 0.3)
    assert time.monotonic() - start < 5
    assert str(lock) in str(info.value) and f"rm {lock}" in str(info.value)


def test_load_gives_up_on_a_held_lock_and_says_why(ext_dir, monkeypatch, capsys):
    monkeypatch.setenv("MMFAST_EXT_LOCK_TIMEOUT", "0.5")
    monkeypatch.setattr(_ext.cpp_extension(), "load", lambda **kw: pytest.fail("built despite the lock"))
    lock = _ext.lock_path()
    fd = _hold(lock)
    try:
        assert _ext.load_extension() is None
    finally:
        os.close(fd)
    assert lock in _ext.extension_error() and "MMFAST_EXT_LOCK_TIMEOUT" in _ext.extension_error()
    assert "waiting up to" in capsys.readouterr().err


def test_build_says_what_is_built_and_where(ext_dir, monkeypatch, capsys):
    calls = []

    def fake_load(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(__name__="mmfast_C_fake", with_cuda=lambda: False)

    monkeypatch.setattr(_ext.cpp_extension(), "load", fake_load)
    assert _ext.load_extension() is not None
    (kwargs,) = calls
    assert kwargs["build_directory"] == _ext.build_dir() and kwargs["name"] == _ext.module_name()
    err = capsys.readouterr().err
    assert "building mmfast's C++ extension" in err and "first run only" in err and _ext.build_dir() in err


def test_loaded_extension_never_builds(ext_dir, monkeypatch):
    monkeypatch.setattr(_ext.cpp_extension(), "load", lambda **kw: pytest.fail("loaded_extension() started a build"))
    module, reason = _ext.loaded_extension()
    if module is None:
        assert "not built" in reason


def test_check_reports_a_held_lock_promptly(ext_dir, monkeypatch):
    """`python -m mmfast check` runs each cpp / cuda case after _require_backend: with the lock held it fails
    that case within MMFAST_EXT_LOCK_TIMEOUT, naming the lock, instead of waiting forever."""
    from mmfast import check

    monkeypatch.setenv("MMFAST_EXT_LOCK_TIMEOUT", "0.5")
    monkeypatch.setattr(_ext.cpp_extension(), "load", lambda **kw: pytest.fail("built despite the lock"))
    lock = _ext.lock_path()
    fd = _hold(lock)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="build lock") as info:
            check._require_backend("cpp")
    finally:
        os.close(fd)
    assert time.monotonic() - start < 10
    assert lock in str(info.value)


@pytest.mark.slow
def test_an_interrupted_build_does_not_hang_the_op(ext_dir):
    """A lock held in the build folder (as by a build still running, or by a killed one where torch waits on
    the file) makes the op fall back within MMFAST_EXT_LOCK_TIMEOUT, with a warning that names the lock."""
    lock = _ext.lock_path()
    fd = _hold(lock)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TORCH_EXTENSIONS_DIR=str(ext_dir), MMFAST_EXT_LOCK_TIMEOUT="1")
    code = textwrap.dedent("""
        import warnings
        import torch
        from mmfast.kernels import ema_update_
        ema, src = [torch.zeros(5)], [torch.ones(5)]
        warnings.simplefilter("always")
        ema_update_(ema, src, 0.75, backend="cpp")
        print("result", ema[0].tolist())
    """)
    try:
        start = time.monotonic()
        op = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        seconds = time.monotonic() - start
    finally:
        os.close(fd)
    assert op.returncode == 0, op.stderr
    assert "result [0.25, 0.25, 0.25, 0.25, 0.25]" in op.stdout  # the reference ran
    assert "falls back" in op.stderr and lock in op.stderr and f"rm {lock}" in op.stderr
    assert "waiting up to 1 s" in op.stderr
    assert seconds < 120
    assert not os.path.exists(os.path.join(os.path.dirname(lock), _ext.module_name() + ".so"))
