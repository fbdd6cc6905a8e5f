"""Backend selection: one meaning of ``backend=`` for every public op.

- ``"reference"``: the readable PyTorch spec in ``kernels/reference.py``, on any device, any floating
  dtype including float64 (what "check numerics against reference PyTorch" runs).
- ``"triton"``: the Triton kernels (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 through
  Triton's interpreter). fp16 / bf16 / fp32.
- ``"cuda"`` / ``"cpp"``: the C++ extension ``mmfast._C`` on CUDA / CPU tensors (the EMA).
- ``"gemm"``: cuBLAS GEMMs (``torch.mm`` with fp32 results) with Triton kernels for the passes around
  them, where that beats one fused Triton kernel (the gated linear layer; the contrastive losses at large
  N); runs where ``"triton"`` does (the CPU through Triton's interpreter).
- ``"chunked"``: a memory-bounded PyTorch implementation (the contrastive losses: O(N) extra memory
  where the reference materialises the N x M logits).
- ``"auto"``: ``MMFAST_BACKEND`` when set (and implemented by the op), else on CUDA tensors the first
  available of the op's accelerated backends in its order of preference (``kernels/_registry.py``:
  the CUDA extension where the op has one and it is built, "gemm" for the gated linear layer, else Triton);
  on CPU tensors the reference.
  ``python -m mmfast info`` prints, per op, what auto runs here and why each other backend cannot.
"""
import os

from ._common import interpreting
from ._registry import accelerated_backends

BACKENDS = ("auto", "triton", "gemm", "cuda", "cpp", "chunked", "reference")


def _extension(with_cuda):
    """(module or None, why not) for the already-built extension; never starts a build."""
    from mmfast._ext import loaded_extension

    module, reason = loaded_extension()
    if module is not None and with_cuda and not module.with_cuda():
        return None, "mmfast._C was built without CUDA"
    return module, reason


def _device_reason(backend, device):
    """None when tensors of `device` suit `backend` at all, else why not (the extension aside)."""
    if backend in ("triton", "gemm") and not (device.type == "cuda" or (device.type == "cpu" and interpreting())):
        return (f"needs CUDA tensors, or TRITON_INTERPRET=1 (set before importing mmfast.kernels) to run on the "
                f"CPU through Triton's interpreter; got {device.type} tensors")
    if backend == "cuda" and device.type != "cuda":
        return f"needs CUDA tensors, got {device.type} tensors"
    if backend == "cpp" and device.type != "cpu":
        return f"is the CPU C++ implementation and needs CPU tensors, got {device.type} tensors"
    if backend not in BACKENDS:
        return f"is not a backend; choose from {BACKENDS}"
    return None


def unavailable_reason(backend, device):
    """None when `backend` can run on tensors of `device` here, else the reason it cannot."""
    reason = _device_reason(backend, device)
    if reason is None and backend in ("cuda", "cpp"):
        reason = _extension(with_cuda=backend == "cuda")[1]
    return reason


def auto_backend(op, device):
    """What ``backend="auto"`` runs for `op` on tensors of `device` (ignoring MMFAST_BACKEND)."""
    if device.type == "cuda":
        for backend in accelerated_backends(op):
            if backend != "chunked" and unavailable_reason(backend, device) is None:
                return backend
    return "reference"


def resolve_backend(op, backend, device):
    """Return the concrete backend for public op `op` on `device`.

    Raises ValueError for unknown names, for a backend `op` does not implement and for one that cannot
    run on `device`. The C++ backends are resolved by the op itself (it may build the extension or fall
    back with a one-time warning); the others are checked here.
    """
    choices = ("auto", "reference") + tuple(accelerated_backends(op))
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {choices}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("MMFAST_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"MMFAST_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env != "auto" and env in choices:
            backend = env
    if backend == "auto":
        return auto_backend(op, device)
    if backend not in choices:
        raise ValueError(f"{op}: backend {backend!r} is not implemented; choose from {choices}")
    # the extension itself is the op's to resolve (it may build it, or fall back with a warning)
    reason = _device_reason(backend, device)
    if reason:
        raise ValueError(f"{op}: backend={backend!r} {reason}")
    return backend
