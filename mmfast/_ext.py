"""The C++/CUDA extension `mmfast._C`: prebuilt by setup.py (MMFAST_BUILD_EXT=1) or JIT-built here.

On first use, a missing extension is compiled with ninja through torch.utils.cpp_extension.load
(cached under TORCH_EXTENSIONS_DIR, so later processes load it in milliseconds). CUDA sources are
compiled only when a CUDA device and nvcc are present. MMFAST_NO_JIT=1 forbids the JIT build.
"""
import os
import threading

import torch

_lock = threading.Lock()
_state = {"module": None, "error": None}


def csrc_dir():
    """csrc/ of a source checkout, else the copy installed as mmfast/csrc."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "csrc")):
        if os.path.isfile(os.path.join(candidate, "ema_cpu.cpp")):
            return candidate
    raise FileNotFoundError("mmfast's C++ sources (csrc/) were not found next to the package")


def _with_cuda():
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and CUDA_HOME is not None and os.environ.get("MMFAST_SKIP_CUDA", "0") != "1"


def _jit_build():
    from torch.utils.cpp_extension import load

    src = csrc_dir()
    files = sorted(os.listdir(src))
    sources = [os.path.join(src, f) for f in files if f.endswith(".cpp")]
    # No -std flag: torch's own (-std=c++20, which ATen >= 2.10 requires) applies.
    cflags = ["-O3", "-fopenmp"]
    kwargs = {}
    name = "mmfast_C_cpu"
    if _with_cuda():
        sources += [os.path.join(src, f) for f in files if f.endswith(".cu")]
        cflags.append("-DMMFAST_WITH_CUDA")
        kwargs["extra_cuda_cflags"] = ["-O3", "-DMMFAST_WITH_CUDA"]
        name = "mmfast_C_cuda"
    return load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[src],
        verbose=os.environ.get("MMFAST_VERBOSE_BUILD", "0") == "1",
        **kwargs,
    )


def load_extension(required=False):
    """Return the extension module, or None when it cannot be had (required=True raises instead)."""
    with _lock:
        if _state["module"] is None and _state["error"] is None:
            try:
                from mmfast import _C  # noqa: F401  (prebuilt by setup.py)

                _state["module"] = _C
            except ImportError:
                if os.environ.get("MMFAST_NO_JIT", "0") == "1":
                    _state["error"] = "mmfast._C is not built and MMFAST_NO_JIT=1 forbids building it"
                else:
                    try:
                        _state["module"] = _jit_build()
                    except Exception as exc:  # compiler missing, build failure: report, don't crash imports
                        _state["error"] = f"building mmfast._C failed: {type(exc).__name__}: {exc}"
    if _state["module"] is None and required:
        raise RuntimeError(_state["error"])
    return _state["module"]


def extension_status():
    """(available, detail) for `python -m mmfast info`; builds the extension if needed."""
    module = load_extension()
    if module is None:
        return False, _state["error"]
    return True, f"{module.__name__} ({'CUDA+CPU' if getattr(module, 'with_cuda', lambda: False)() else 'CPU only'})"


def loaded_extension():
    """(module, None) when the extension is loaded or prebuilt, else (None, why); never starts a build."""
    if _state["module"] is not None:
        return _state["module"], None
    if _state["error"] is not None:
        return None, _state["error"]
    try:
        from mmfast import _C

        return _C, None
    except ImportError:
        return None, "mmfast._C is not built (backend='cpp' / 'cuda' builds it on first use; or MMFAST_BUILD_EXT=1 pip install)"


def extension_error():
    """Why the extension is unavailable (None when it loaded or was never asked for)."""
    return _state["error"]
