"""Flash attention (forward + backward) with interval, causal and padding masks, varlen and GQA.

- :func:`flash_attention` — the public op (see its docstring for shapes, masks and math);
- :func:`build_block_mask` / :class:`AttentionBlockMask` — precomputed block-sparse metadata for one
  mask, reusable across calls and layers (``flash_attention(..., block_mask=bm)``);
- :func:`compile_specs` — every kernel x launch config, for the GPU-readiness gate;
- ``masks`` — builders for the interval masks of the seed models.

Layout: ``_fwd.py`` / ``_bwd.py`` the Triton kernels, ``_blockmask.py`` the metadata, ``_configs.py``
launch configs and compile specs, ``_api.py`` validation, launchers, custom ops, autograd and the op.
"""
from . import masks
from ._api import flash_attention
from ._blockmask import AttentionBlockMask, build_block_mask
from ._configs import compile_specs

__all__ = ["AttentionBlockMask", "build_block_mask", "compile_specs", "flash_attention", "masks"]
