"""mmfast.kernels: fused Triton / CUDA C++ kernels for vision-language models, with PyTorch references."""
from ._dispatch import BACKENDS, interpreting
from .ema import ema_update_

__all__ = ["BACKENDS", "ema_update_", "interpreting"]
