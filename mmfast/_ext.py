"""The C++/CUDA extension `mmfast._C`: prebuilt by setup.py (MMFAST_BUILD_EXT=1) or JIT-built here.

On first use (``backend="cpp"`` / ``"cuda"`` of ``ema_update_``), a missing extension is compiled with
ninja through ``torch.utils.cpp_extension.load``, once, into a folder of the torch-extensions root
(``TORCH_EXTENSIONS_DIR``, else torch's per-user cache) named by the torch version, its CUDA version
and the Python version, so environments with different torch releases never share (or wait on) one
build. Later processes import the built module directly. CUDA sources are compiled only when a CUDA
device and nvcc are present.

A build holds a ``lock`` file in its folder. A process killed mid-build can leave it behind, and torch
waits on it without limit; here the wait ends after ``MMFAST_EXT_LOCK_TIMEOUT`` seconds (default 300)
with an error that names the lock file, and the op falls back with its one-time warning.

Environment: ``MMFAST_NO_JIT=1`` forbids the JIT build; ``MMFAST_SKIP_CUDA=1`` builds the CPU part
only; ``MMFAST_EXT_LOCK_TIMEOUT`` (seconds); ``MMFAST_VERBOSE_BUILD=1`` shows the compiler's output.
"""
import os
import sys
import threading
import time

_lock = threading.Lock()
_state = {"module": None, "error": None}
LOCK_TIMEOUT_S = 300.0


def csrc_dir():
    """csrc/ of a source checkout, else the copy installed as mmfast/csrc."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "csrc")):
        if os.path.isfile(os.path.join(candidate, "ema_cpu.cpp")):
            return candidate
    raise FileNotFoundError("mmfast's C++ sources (csrc/) were not found next to the package")


def cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning (logged at
    import on machines that have a CUDA toolkit but no GPU, where it means nothing to our users)."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as module
    finally:
        logger.setLevel(level)
    return module


def _with_cuda():
    import torch

    if not torch.cuda.is_available() or os.environ.get("MMFAST_SKIP_CUDA", "0") == "1":
        return False
    return cpp_extension().CUDA_HOME is not None


def _flavour():
    """"cuda" when the CUDA sources are compiled too, else "cpu"."""
    return "cuda" if _with_cuda() else "cpu"


def module_name(flavour=None):
    return f"mmfast_C_{flavour or _flavour()}"


def build_dir(flavour=None):
    """This environment's build folder: keyed by the torch build (version, CUDA) and Python, so that two
    environments never share one build (an ABI mismatch) or wait on each other's lock."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = cpp_extension().get_default_build_root()
    key = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "-")
    return os.path.join(root, f"{module_name(flavour)}-{key}")


def lock_path(flavour=None):
    return os.path.join(build_dir(flavour), "lock")


def _sources(flavour):
    src = csrc_dir()
    files = sorted(os.listdir(src))
    exts = (".cpp", ".h", ".cu", ".cuh") if flavour == "cuda" else (".cpp", ".h")
    return src, [os.path.join(src, f) for f in files if f.endswith(exts)]


def _built_library(flavour):
    """Path of this environment's JIT-built library when it is newer than every source, else None."""
    import sysconfig

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    folder = build_dir(flavour)
    candidates = [os.path.join(folder, module_name(flavour) + s) for s in (".so", suffix)]
    library = next((p for p in candidates if os.path.isfile(p)), None)
    if library is None:
        return None
    built = os.path.getmtime(library)
    if any(os.path.getmtime(s) > built for s in _sources(flavour)[1]):
        return None
    return library


def _import_library(name, path):
    import importlib.util

    import torch  # noqa: F401  (the library links against torch's)

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lock_timeout():
    raw = os.environ.get("MMFAST_EXT_LOCK_TIMEOUT", "")
    try:
        return float(raw) if raw.strip() else LOCK_TIMEOUT_S
    except ValueError:
        return LOCK_TIMEOUT_S


def _torch_uses_flock():
    """torch >= 2.13 holds an OS lock (released when its holder dies) on the ``lock`` file; older torch
    waits while the file merely exists, so a file left by a killed build blocks it forever."""
    return hasattr(cpp_extension(), "FileLock")


def lock_held(path):
    """Would torch's build wait on the lock file at `path` now?"""
    if not os.path.exists(path):
        return False
    if not _torch_uses_flock():
        return True
    try:
        import fcntl
    except ImportError:  # no flock (Windows): assume the file means a build is running
        return True
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _wait_for_lock(path, timeout):
    """Return once no build holds `path`; raise TimeoutError (naming the file) after `timeout` seconds."""
    start = time.monotonic()
    told = False
    while lock_held(path):
        # told before the timeout check: on a loaded machine the first check can already be past a short timeout
        if not told:
            print(f"mmfast: waiting up to {timeout:.0f} s for another build of the C++ extension "
                  f"(lock file {path}) ...", file=sys.stderr, flush=True)
            told = True
        waited = time.monotonic() - start
        if waited >= timeout:
            raise TimeoutError(
                f"waited {waited:.0f} s for the build lock {path}: another process is building mmfast's C++ "
                f"extension, or a build that was interrupted left the lock behind. If no build is running, "
                f"delete it (rm {path}) and run again; MMFAST_EXT_LOCK_TIMEOUT sets how long to wait")
        time.sleep(min(0.2, max(0.01, timeout - waited)))


class _NoBuild(RuntimeError):
    """The extension is not built and building it is not allowed."""


def _jit_build(allow_build=True):
    import torch

    flavour = _flavour()
    name = module_name(flavour)
    library = _built_library(flavour)
    if library is not None:  # built by an earlier process: no ninja, no lock
        try:
            return _import_library(name, library)
        except ImportError:  # e.g. a library cut short by a killed build: build it again
            pass
    if not allow_build:
        raise _NoBuild("mmfast._C is not built and MMFAST_NO_JIT=1 forbids building it")
    src, sources = _sources(flavour)
    sources = [s for s in sources if s.endswith((".cpp", ".cu"))]
    # No -std flag: torch's own (-std=c++20, which ATen >= 2.10 requires) applies.
    cflags = ["-O3", "-fopenmp"]
    kwargs = {}
    if flavour == "cuda":
        cflags.append("-DMMFAST_WITH_CUDA")
        kwargs["extra_cuda_cflags"] = ["-O3", "-DMMFAST_WITH_CUDA"]
    folder = build_dir(flavour)
    os.makedirs(folder, exist_ok=True)
    _wait_for_lock(os.path.join(folder, "lock"), _lock_timeout())
    what = "CPU and CUDA" if flavour == "cuda" else "CPU"
    print(f"mmfast: building mmfast's C++ extension ({what}; backend='cpp'/'cuda' of ema_update_ use it) for "
          f"torch {torch.__version__} in {folder} (first run only, about a minute; MMFAST_NO_JIT=1 skips it) ...",
          file=sys.stderr, flush=True)
    return cpp_extension().load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[src],
        build_directory=folder,
        verbose=os.environ.get("MMFAST_VERBOSE_BUILD", "0") == "1",
        **kwargs,
    )


def load_extension(required=False):
    """Return the extension module, or None when it cannot be had (required=True raises instead).

    May build it (once per environment); never waits on another build's lock longer than
    MMFAST_EXT_LOCK_TIMEOUT seconds.
    """
    with _lock:
        if _state["module"] is None and _state["error"] is None:
            try:
                from mmfast import _C  # noqa: F401  (prebuilt by setup.py)

                _state["module"] = _C
            except ImportError:
                try:
                    _state["module"] = _jit_build(allow_build=os.environ.get("MMFAST_NO_JIT", "0") != "1")
                except (TimeoutError, _NoBuild) as exc:
                    _state["error"] = str(exc)
                except Exception as exc:  # compiler missing, build failure: report, don't crash imports
                    _state["error"] = f"building mmfast._C failed: {type(exc).__name__}: {exc}"
    if _state["module"] is None and required:
        raise RuntimeError(_state["error"])
    return _state["module"]


def loaded_extension():
    """(module, None) when the extension is loaded, prebuilt or already JIT-built for this environment,
    else (None, why); never starts a build and never waits on a lock."""
    if _state["module"] is not None:
        return _state["module"], None
    if _state["error"] is not None:
        return None, _state["error"]
    try:
        from mmfast import _C

        return _C, None
    except ImportError:
        pass
    try:
        flavour = _flavour()
        library = _built_library(flavour)
        if library is not None:
            with _lock:
                if _state["module"] is None:
                    _state["module"] = _import_library(module_name(flavour), library)
            return _state["module"], None
    except Exception as exc:  # a broken cached build: say so, the next load_extension() rebuilds it
        return None, f"the built mmfast._C could not be imported: {type(exc).__name__}: {exc}"
    if os.environ.get("MMFAST_NO_JIT", "0") == "1":
        return None, "mmfast._C is not built and MMFAST_NO_JIT=1 forbids building it"
    return None, ("mmfast._C is not built yet (backend='cpp' / 'cuda' builds it on first use, about a minute; "
                  "or MMFAST_BUILD_EXT=1 pip install)")


def extension_error():
    """Why the extension is unavailable (None when it loaded or was never asked for)."""
    return _state["error"]
