"""Liger-Kernel (optional, the ``[liger]`` extra): its Triton kernels for the language-model parts outside
mmfast's five kernel families — RMSNorm, RoPE, SwiGLU and the training loss (fused linear cross-entropy) of
``mmfast.nn.decoder``. Each caller asks :func:`runs_on` and otherwise runs the PyTorch code beside the call,
which is the specification (transformers' Llama math); the tests hold the two paths to each other.

Liger runs where ``liger_kernel`` imports, the tensor is on CUDA and ``MMFAST_LIGER`` was not ``0`` at import. Its
RMSNorm runs out of place: Liger's default (``in_place=True``) writes dX into the incoming gradient, which is
wrong wherever that gradient also flows elsewhere (a norm's output added to a residual: Liger's own Gemma 2
bug); releases without the ``in_place`` keyword (before 0.4) are therefore not used for RMSNorm.
"""
import importlib.util
import inspect
import os

import torch


# MMFAST_LIGER=0 turns Liger off (read once: the check below stays constant under torch.compile)
ENABLED = os.environ.get("MMFAST_LIGER", "1") != "0" and importlib.util.find_spec("liger_kernel") is not None
# the devices whose tensors Liger's kernels take; the tests add "cpu" to run them through Triton's interpreter
DEVICES = ("cuda",)
_LOADED = []  # [functional or None, whether its RMSNorm runs out of place], filled at the first call


def functional():
    """``liger_kernel.transformers.functional``, or None where it does not import (broken against this torch /
    Triton: the PyTorch path runs). Imported at the first call on a device Liger serves, not with mmfast: it
    imports transformers (about 2 s)."""
    if not _LOADED:
        try:
            from liger_kernel.transformers import functional as ops
        except Exception:
            ops = None
        _LOADED[:] = [ops, ops is not None and "in_place" in inspect.signature(ops.liger_rms_norm).parameters]
    return _LOADED[0]


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing (an import is not traceable)
def _usable(op: str) -> bool:
    return functional() is not None and (op != "rms_norm" or _LOADED[1])


def runs_on(x: torch.Tensor, op: str = "") -> bool:
    """Whether Liger's kernel runs for tensor `x` (op "rms_norm" also needs the out-of-place keyword)."""
    return ENABLED and x.device.type in DEVICES and _usable(op)


def rms_norm(x, weight, eps):
    """Hugging Face's ``LlamaRMSNorm`` rounding order (``casting_mode="llama"``), out of place."""
    return functional().liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=False)


def rope(q, k, cos, sin):
    """q (B, H, L, D), k (B, Hkv, L, D), cos / sin (B or 1, L, D) -> the rotated (q, k)."""
    return functional().liger_rope(q, k, cos, sin)


def swiglu(gate, up):
    return functional().liger_swiglu(gate, up)


def linear_cross_entropy(h, weight, targets):
    """Mean cross-entropy of ``h @ weight.T`` against `targets` (-100 ignored), logits never materialised."""
    return functional().liger_fused_linear_cross_entropy(h, weight, targets, ignore_index=-100)
