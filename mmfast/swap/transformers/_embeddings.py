"""Vision patch embeddings of transformers models through `mmfast.kernels.patch_embed`.

Each swapped forward keeps the module's signature, checks and parameters (conv weight / bias, [CLS],
position table, mask token) and reproduces ``interpolate_pos_encoding`` (bicubic, ``size=``,
align_corners=False: patch_embed's ``pos_resample="hf"``) with the table's own square grid.
"""
import math

import torch
from torch import nn

from mmfast.kernels import patch_embed

from .. import _core


def _grid(rows):
    side = int(math.isqrt(rows))
    return (side, side)


def _pos_grid(module, table_rows, interpolate):
    """The table's grid as HF reads it: the configured grid, or the square one when it interpolates."""
    size = module.image_size if isinstance(module.image_size, (tuple, list)) else (module.image_size,) * 2
    patch = module.patch_size if isinstance(module.patch_size, (tuple, list)) else (module.patch_size,) * 2
    if interpolate:
        return _grid(table_rows)
    return (size[0] // patch[0], size[1] // patch[1])


def clip_forward(backend):
    def forward(self, pixel_values, interpolate_pos_encoding=False):
        _, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model ({self.image_size}*{self.image_size}).")
        conv = self.patch_embedding
        table = self.position_embedding.weight
        return patch_embed(pixel_values.to(dtype=conv.weight.dtype), conv.weight, conv.bias, pos_embed=table,
                           cls_token=self.class_embedding,
                           pos_grid=_pos_grid(self, table.shape[0] - 1, interpolate_pos_encoding),
                           pos_resample="hf", backend=backend)
    return forward


def siglip_forward(backend):
    def forward(self, pixel_values, interpolate_pos_encoding=False):
        _, _, height, width = pixel_values.shape
        conv = self.patch_embedding
        table = self.position_embedding.weight
        grid = _pos_grid(self, table.shape[0], interpolate_pos_encoding)
        if not interpolate_pos_encoding and (height // self.patch_size, width // self.patch_size) != grid:
            # the original adds the table as is and fails on the shape: never resample silently
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({self.image_size}*"
                             f"{self.image_size}); pass interpolate_pos_encoding=True to resample the positions")
        return patch_embed(pixel_values.to(dtype=conv.weight.dtype), conv.weight, conv.bias, pos_embed=table,
                           pos_grid=grid,
                           pos_resample="hf", backend=backend)
    return forward


def vit_forward(backend):
    def forward(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=False):
        _, num_channels, height, width = pixel_values.shape
        patches = self.patch_embeddings
        if num_channels != patches.num_channels:
            raise ValueError("Make sure that the channel dimension of the pixel values match with the one set in the "
                             f"configuration. Expected {patches.num_channels} but got {num_channels}.")
        size = patches.image_size   # (the embeddings' own copy is 5.x only)
        if not interpolate_pos_encoding and (height != size[0] or width != size[1]):
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({size[0]}*{size[1]}).")
        table = self.position_embeddings
        masked = {}
        if bool_masked_pos is not None:
            masked = dict(token_mask=bool_masked_pos.bool(), mask_token=self.mask_token)
        conv = patches.projection
        out = patch_embed(pixel_values, conv.weight, conv.bias, pos_embed=table, cls_token=self.cls_token,
                          pos_grid=_pos_grid(patches, table.shape[1] - 1, interpolate_pos_encoding),
                          pos_resample="hf", backend=backend, **masked)
        return self.dropout(out)
    return forward


def blip_forward(backend):
    """BLIP (v1) and BLIP-2: [CLS] and the (1, 1 + N, D) table cast to the conv's dtype as transformers does. Without
    interpolate_pos_encoding transformers adds the table's first 1 + N rows whatever the grid (no check):
    so does this. A size not divisible by the patch is cropped, as the stride-P "valid" conv ignores the
    remainder."""
    def forward(self, pixel_values, interpolate_pos_encoding=False):
        _, _, height, width = pixel_values.shape
        conv = self.patch_embedding
        P = conv.kernel_size
        grid = (height // P[0], width // P[1])
        rows = self.position_embedding.shape[1]
        if torch.jit.is_tracing() or (not interpolate_pos_encoding and grid[0] * grid[1] + 1 > rows):
            return _core.original(self)(pixel_values, interpolate_pos_encoding)   # transformers' own (error)
        dtype = conv.weight.dtype
        table = self.position_embedding[0].to(dtype)
        if interpolate_pos_encoding:
            pos_grid = _grid(rows - 1)   # transformers resamples unless the grid is the table's own
        else:
            table, pos_grid = table[: grid[0] * grid[1] + 1], grid
        images = pixel_values[..., : grid[0] * P[0], : grid[1] * P[1]].to(dtype=dtype)
        return patch_embed(images, conv.weight, conv.bias, pos_embed=table, cls_token=self.class_embedding.to(dtype),
                           pos_grid=pos_grid, pos_resample="hf", backend=backend)
    return forward


# the submodules whose weights the kernel reads instead of calling them (a LoRA layer there: the original runs)
_CONV_AND_TABLE = {"patch_embedding": nn.Conv2d, "position_embedding": nn.Embedding}

# class name -> (forward factory, was, now, parts); modules found by class name, classes never reassigned
TABLE = {name: (factory, name, "mmfast.kernels.patch_embed", parts) for name, factory, parts in (
    ("CLIPVisionEmbeddings", clip_forward, _CONV_AND_TABLE),
    ("SiglipVisionEmbeddings", siglip_forward, _CONV_AND_TABLE),
    ("ViTEmbeddings", vit_forward, {"patch_embeddings.projection": nn.Conv2d}),
    ("BlipVisionEmbeddings", blip_forward, {"patch_embedding": nn.Conv2d}),
    # the same code as BLIP's (transformers copies it)
    ("Blip2VisionEmbeddings", blip_forward, {"patch_embedding": nn.Conv2d}),
)}


def patch(model, options, state):
    _core.replace_forwards_by_class(model, TABLE, options.backend, state.report, "transformers")
