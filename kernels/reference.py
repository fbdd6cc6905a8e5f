"""Readable PyTorch references: the spec every test and benchmark imports.

Each reference states the math of one op in plain PyTorch. Kernels must match these within the
numerics rule in tests/numerics.py (or bit-for-bit where the op says so).
"""
from collections import defaultdict

import torch


def ema_update_reference(ema_tensors, tensors, momentum, *, ema_buffers=(), buffers=()):
    """θ_ema ← m·θ_ema + (1−m)·θ for every pair, in place; buffers are copied.

    Written as ``torch._foreach_lerp_(ema, θ, 1 − m)``, which is what the kernels reproduce bit for
    bit: with w = 1 − m rounded to fp32 and arithmetic in fp32 (the "opmath" of fp16/bf16),
    ``ema + w·(θ − ema)`` when |w| < 0.5 and ``θ − (θ − ema)·(1 − w)`` otherwise, each a single fused
    multiply-add, rounded once to the EMA's dtype. Pairs of different dtypes are computed in fp32.
    `momentum` is a Python float or a 0-dim tensor.
    """
    weight = 1.0 - momentum if not isinstance(momentum, torch.Tensor) else 1.0 - momentum.float()
    groups = defaultdict(lambda: ([], []))
    for e, t in zip(ema_tensors, tensors):
        groups[(e.dtype, t.dtype)][0].append(e)
        groups[(e.dtype, t.dtype)][1].append(t)
    for (ema_dtype, src_dtype), (ema_group, src_group) in groups.items():
        if ema_dtype == src_dtype:
            torch._foreach_lerp_(ema_group, src_group, weight)
        else:
            wide = [e.float() for e in ema_group]
            torch._foreach_lerp_(wide, [t.float() for t in src_group], weight)
            torch._foreach_copy_(ema_group, wide)
    if len(ema_buffers):
        torch._foreach_copy_(list(ema_buffers), list(buffers))
