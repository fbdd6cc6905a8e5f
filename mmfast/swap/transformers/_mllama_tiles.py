"""Mllama's tile patch embedding through `mmfast.kernels.tile_patch_embed`.

transformers computes it inline in ``MllamaVisionModel.forward``: ``patch_embedding`` (conv, no bias),
``pre_tile_positional_embedding`` (gated, patch rows only), ``apply_class_embedding`` ([CLS] first),
``gated_positional_embedding`` ((1 − tanh g)·table + tanh g·tile table[aspect ratio]). Rather than copy
that forward (and its output-capturing decorators), the model's forward is wrapped per instance: the
wrapper computes the whole (B·M, T, 1 + N, D) embedding in one ``tile_patch_embed`` call, then runs the
original forward, in which the four stages (swapped per instance too) hand that result on: the conv
returns its patch rows as a view, the two embeddings pass it through, ``apply_class_embedding`` returns
the whole result. Each stage checks it runs in order on the tensor it expects, and the wrapper that all
four ran: a transformers release that reorders the stages raises instead of computing something else.
Outside such a call (a stage module called on its own, a copy of the model) the stages run the original.

Every tile is computed, unused ones (``aspect_ratio_mask`` 0) included, with no ``tile_mask``: real
queries of the vision encoder attend to the padded tiles' tokens (transformers' m·mᵀ mask), so their
embeddings are part of the result. Inputs transformers would reject or that the kernel does not take
(another tile count or image size than the config's, a conv with hooks on it) run the original forward,
counted in the report.
"""
import contextvars
import dataclasses

import torch
from torch import nn

from mmfast.kernels import tile_patch_embed

from .._core import foreign_forward, mark_output, marks_output, not_plain, original, replace_forward, set_instance_attr
from ._bypass import Fallback, forward_swapped

_RUN = contextvars.ContextVar("mmfast_mllama_tiles", default=None)
STAGES = ("patch_embedding", "pre_tile_positional_embedding", "apply_class_embedding", "gated_positional_embedding")


@dataclasses.dataclass
class _Run:
    model: torch.nn.Module
    out: torch.Tensor          # (B·M, T, 1 + N, D)
    done: int = 0              # stages run so far

    def step(self, stage, module, hidden_states=None, shape=None):
        """Whether this call of `stage` on `module` belongs to the run (else: run the original)."""
        owner = self.model if stage == "apply_class_embedding" else getattr(self.model, stage, None)
        if module is not owner:
            return False
        expected = STAGES[self.done] if self.done < len(STAGES) else "no further stage"
        if expected != stage or (shape is not None and tuple(hidden_states.shape) != shape):
            got = f" on {tuple(hidden_states.shape)} (expected {shape})" if shape is not None else ""
            raise RuntimeError(
                f"mmfast: MllamaVisionModel.forward ran {stage}{got} where mmfast expected {expected}: this "
                "transformers release computes the tile embeddings differently; mmfast.unpatch(model) or patch "
                "with patch_embed=False")
        self.done += 1
        return True


def _embed(model, pixel_values, aspect_ratio_ids, backend):
    """The (B·M, T, 1 + N, D) embedding, or Fallback."""
    conv = model.patch_embedding
    why = not_plain(model, {"patch_embedding": nn.Conv2d, "pre_tile_positional_embedding.embedding": nn.Embedding,
                            "gated_positional_embedding.tile_embedding": nn.Embedding})
    if why is not None:
        raise Fallback(why)
    if pixel_values.dim() != 6:
        raise Fallback(f"pixel_values of shape {tuple(pixel_values.shape)}, not (B, images, tiles, C, H, W)")
    B, M, T, C, H, W = pixel_values.shape
    P = conv.kernel_size[0]
    if T != model.max_num_tiles or (H // P) * (W // P) + 1 != model.num_patches:
        raise Fallback(f"{T} tiles of {H}x{W} where the config has {model.max_num_tiles} tiles of "
                       f"{model.num_patches - 1} patches")
    pos, tiles = model.gated_positional_embedding, model.pre_tile_positional_embedding
    if aspect_ratio_ids.numel() != B * M or conv.stride != conv.kernel_size or conv.groups != 1 or not tiles.is_gated:
        raise Fallback("aspect_ratio_ids not one per image, a convolution other than stride = kernel, or an "
                       "ungated pre-tile embedding")
    # the "valid" stride-P conv ignores a remainder of pixels: so does the crop (a view)
    images = pixel_values.reshape(B * M, T, C, H, W)[..., : H // P * P, : W // P * P]
    images = images.to(conv.weight.device, conv.weight.dtype)
    out = tile_patch_embed(images, conv.weight, conv.bias, cls_token=model.class_embedding,
                           pos_embed=pos.embedding, pos_gate=pos.gate, tile_pos_embed=pos.tile_embedding.weight,
                           tile_embed=tiles.embedding.weight, tile_embed_gate=tiles.gate,
                           aspect_ratio_ids=aspect_ratio_ids.reshape(-1).to(conv.weight.device), backend=backend)
    return mark_output(out) if marks_output(conv) else out


def _model_forward(state):
    backend = state.options.backend

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask, **kwargs):
        run_original = original(self)
        try:
            out = _embed(self, pixel_values, aspect_ratio_ids, backend)
        except Fallback as why:
            state.report.count_fallback(f"MllamaVisionModel tile embedding: {why}")
            return run_original(pixel_values, aspect_ratio_ids, aspect_ratio_mask, **kwargs)
        run = _Run(self, out)
        token = _RUN.set(run)
        try:
            result = run_original(pixel_values, aspect_ratio_ids, aspect_ratio_mask, **kwargs)
        finally:
            _RUN.reset(token)
        if run.done != len(STAGES):
            raise RuntimeError(f"mmfast: MllamaVisionModel.forward ran {run.done} of the {len(STAGES)} embedding "
                               "stages mmfast replaces (transformers changed it); mmfast.unpatch(model)")
        return result

    return forward


def _active(stage, module, hidden_states=None, shape=None):
    run = _RUN.get()
    return run if run is not None and run.step(stage, module, hidden_states, shape) else None


def _conv_forward(self, pixel_values):
    run = _active("patch_embedding", self)
    if run is None:
        return original(self)(pixel_values)
    # (B·M·T, D, 1, N): transformers flattens and transposes it back into the patch rows (views, no copy)
    BM, T, L, D = run.out.shape
    return run.out.reshape(BM * T, L, D)[:, 1:].transpose(1, 2).unsqueeze(2)


def _pre_tile_forward(self, hidden_states, aspect_ratio_ids):
    run = _RUN.get()
    shape = None if run is None else (run.out.shape[0], run.out.shape[1], run.out.shape[2] - 1, run.out.shape[3])
    if _active("pre_tile_positional_embedding", self, hidden_states, shape) is None:
        return original(self)(hidden_states, aspect_ratio_ids)
    return hidden_states   # already in run.out


def _apply_class_embedding(self, hidden_states):
    run = _RUN.get()
    shape = None if run is None else (run.out.shape[0] * run.out.shape[1], run.out.shape[2] - 1, run.out.shape[3])
    if _active("apply_class_embedding", self, hidden_states, shape) is None:
        return original(self, "apply_class_embedding")(hidden_states)
    return run.out.reshape(shape[0], shape[1] + 1, shape[2])


def _position_forward(self, hidden_states, aspect_ratio_ids):
    run = _RUN.get()
    shape = None if run is None else tuple(run.out.shape)
    if _active("gated_positional_embedding", self, hidden_states, shape) is None:
        return original(self)(hidden_states, aspect_ratio_ids)
    return hidden_states


def patch_tiles(model, options, state):
    """Swap the tile embedding of every MllamaVisionModel in `model`."""
    import types

    from transformers.models.mllama import modeling_mllama as hf

    was = "MllamaVisionModel embedding (conv, pre-tile, [CLS], gated position tables: eager)"
    for path, module in model.named_modules():
        if type(module) is not hf.MllamaVisionModel:
            continue
        if not options.patch_embed:
            state.report.leave(path, was, "patch_embed=False")
            continue
        if forward_swapped(module):
            continue
        why = foreign_forward(module, module.patch_embedding, module.pre_tile_positional_embedding,
                              module.gated_positional_embedding)
        if why is not None:
            state.report.leave(path, was, why)
            continue
        replace_forward(module, _model_forward(state))
        replace_forward(module.patch_embedding, _conv_forward)
        replace_forward(module.pre_tile_positional_embedding, _pre_tile_forward)
        replace_forward(module.gated_positional_embedding, _position_forward)
        set_instance_attr(module, "apply_class_embedding", types.MethodType(_apply_class_embedding, module))
        state.report.add(path, was, "mmfast.kernels.tile_patch_embed (all tiles, one launch)")
