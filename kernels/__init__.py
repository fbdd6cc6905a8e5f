"""mmfast.kernels: fused Triton / CUDA C++ kernels for vision-language models, with PyTorch references."""
from ._dispatch import BACKENDS, interpreting
from .attention import AttentionBlockMask, build_block_mask, flash_attention
from .contrastive import contrastive_loss, siglip_loss
from .ema import ema_update_
from .gated_linear import tanh_gated_linear
from .patch_embed import patch_embed, tile_patch_embed

__all__ = ["AttentionBlockMask", "BACKENDS", "build_block_mask", "contrastive_loss", "flash_attention", "ema_update_", "interpreting", "patch_embed", "siglip_loss", "tanh_gated_linear", "tile_patch_embed"]
