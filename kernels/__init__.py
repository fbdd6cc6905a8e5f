"""mmfast.kernels: fused Triton / CUDA C++ kernels for vision-language models, with PyTorch references."""
from ._dispatch import BACKENDS, interpreting
from .attention import AttentionBlockMask, build_block_mask, flash_attention
from .ema import ema_update_

__all__ = ["AttentionBlockMask", "BACKENDS", "build_block_mask", "ema_update_", "flash_attention", "interpreting"]
