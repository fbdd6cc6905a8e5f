"""Backend selection shared by every public op.

``backend="auto"`` resolves, in order: the ``MMFAST_BACKEND`` environment variable (when set to
something other than ``auto``), then the op's preference for the tensors' device: Triton (or the CUDA
extension) on CUDA tensors, the PyTorch reference on CPU tensors. ``MMFAST_BACKEND=triton`` together
with ``TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors through Triton's interpreter.
"""
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")

_warned = set()


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


def warn_once(key, message):
    """Warn once per process and key: fallbacks must be visible but not flood a training log."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(op, backend, device, supported):
    """Return the concrete backend for `op` on `device`.

    `supported` lists the accelerated backends the op implements, in order of preference on CUDA; the
    reference is always available.
    Raises ValueError for unknown names and for a backend that cannot run on `device`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("MMFAST_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"MMFAST_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env != "auto" and env in supported:
            backend = env
    if backend == "auto":
        if device.type == "cuda":
            return supported[0]
        return "reference"
    if backend == "reference":
        return backend
    if backend not in supported:
        raise ValueError(f"{op}: backend {backend!r} is not implemented; choose from {('auto',) + tuple(supported)}")
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 (set before importing "
            f"mmfast.kernels) to run the kernels on the CPU through Triton's interpreter; got device {device}"
        )
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got device {device}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"{op}: backend='cpp' is the CPU C++ implementation and needs CPU tensors, got {device}")
    return backend


def cuda_available() -> bool:
    return torch.cuda.is_available()
