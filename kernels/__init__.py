"""mmfast.kernels: fused Triton / CUDA C++ kernels for vision-language models, with PyTorch references."""
# Only as mmfast.kernels. From a source checkout (its root on sys.path: `python -m pytest`, `python -m mmfast`)
# this folder is also importable as a top-level `kernels`: the name of Hugging Face's kernel-hub package, which
# transformers probes by importing it. A second copy would register every mmfast:: custom op again, and the
# dispatcher then fails at random (vector::reserve, bad_alloc, wrong argument counts, crashes). So that copy
# stays empty: no ops, no version, and transformers sees no usable `kernels` package.
if __name__ == "mmfast.kernels":
    from ._dispatch import BACKENDS, interpreting
    from .attention import AttentionBlockMask, build_block_mask, flash_attention
    from .contrastive import contrastive_loss, siglip_loss
    from .ema import ema_update_
    from .gated_linear import tanh_gated_linear
    from .patch_embed import patch_embed, tile_patch_embed

    __all__ = ["AttentionBlockMask", "BACKENDS", "build_block_mask", "contrastive_loss", "flash_attention", "ema_update_", "interpreting", "patch_embed", "siglip_loss", "tanh_gated_linear", "tile_patch_embed"]
else:
    __all__ = []
