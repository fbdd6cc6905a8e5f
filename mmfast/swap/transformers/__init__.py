"""mmfast's kernels in Hugging Face transformers models, per instance.

``patch(model, options, state)`` (called by `mmfast.patch`):

- attention: registers "mmfast" in ``transformers.AttentionInterface`` (`_attention.mmfast_attention`) and
  in ``masking_utils.AttentionMaskInterface`` (`_masks.build_mask`: without it transformers hands the
  attention no padding mask at all), then ``model.set_attn_implementation("mmfast")``; the previous
  implementation of every (sub-)config is restored by `unpatch`;
- patch embeddings (`_embeddings`) and contrastive losses (`_losses`): ``forward`` replaced per instance;
- model-specific modules that bypass the interface: the entry's ``extra`` function.

Only model types in `TABLE` are patched, and only when every sub-config's type is in it too; any other
model is left untouched with the reason in the report. After ``import mmfast.swap.transformers`` and
`register()`, ``from_pretrained(..., attn_implementation="mmfast")`` works as well.

Supported: transformers >= 5.0 (the AttentionMaskInterface / ``set_attn_implementation`` API this relies
on; tested with 5.24).
"""
import dataclasses
import importlib
import inspect
import sys
from typing import Callable, Optional

from .. import _core

NAME = "transformers"


@dataclasses.dataclass(frozen=True)
class Entry:
    """What mmfast swaps in one model type.

    attention: its attention layers call ``AttentionInterface`` (set attn_implementation "mmfast").
    embeddings / loss: swap the `_embeddings` / `_losses` modules found in it.
    extra: ``fn(model, options, state)`` for modules that bypass the interface (per-model files).
    """
    attention: bool = True
    embeddings: bool = False
    loss: bool = False
    extra: Optional[Callable] = None
    note: str = ""


def _bypass(module, fn):
    """A per-model file's patch function, imported only when a model of that type is patched."""
    def extra(model, options, state):
        return getattr(importlib.import_module(f"{__name__}.{module}"), fn)(model, options, state)
    extra.__name__ = fn
    return extra


# one object per model family: patch() runs each distinct extra once
_BLIP = _bypass("_blip", "patch_blip")
_MLLAMA = _bypass("_mllama", "patch_mllama")
_IDEFICS = _bypass("_idefics", "patch_idefics")

TABLE = {
    "vit": Entry(embeddings=True),
    "clip": Entry(embeddings=True, loss=True),
    "clip_vision_model": Entry(embeddings=True),
    "clip_text_model": Entry(),
    "siglip": Entry(embeddings=True, loss=True),
    "siglip_vision_model": Entry(embeddings=True),
    "siglip_text_model": Entry(),
    "blip-2": Entry(note="no ITC loss in transformers' BLIP-2; Q-Former runs fp32 attention"),
    "blip_2_vision_model": Entry(),
    "blip_2_qformer": Entry(),
    "opt": Entry(note="OPT passes scaling=1.0 (pre-scaled queries)"),
    "llama": Entry(),
    "llava": Entry(embeddings=True),
    "llava_next": Entry(embeddings=True),
    # BLIP (v1): no attention layer uses the interface, and its text decoder adds the mask built for its
    # config's implementation to eager scores: keep that implementation (attention=False)
    "blip": Entry(attention=False, extra=_BLIP),
    "blip_text_model": Entry(attention=False, extra=_BLIP),
    "blip_vision_model": Entry(attention=False, extra=_BLIP),
    "mllama": Entry(extra=_MLLAMA),
    "mllama_text_model": Entry(extra=_MLLAMA),
    "mllama_vision_model": Entry(extra=_MLLAMA),
    "idefics": Entry(extra=_IDEFICS),
    "idefics_vision": Entry(extra=_IDEFICS),
    "idefics_perciever": Entry(extra=_IDEFICS),  # sic: transformers' spelling
}


def claims(model):
    """A transformers PreTrainedModel (checked without importing transformers)."""
    module = sys.modules.get("transformers")
    if module is None:
        return False
    return isinstance(model, module.PreTrainedModel)


def register():
    """Register "mmfast" in both of transformers' registries (process-wide; selects nothing by itself)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from ._attention import NAME as ATTN, mmfast_attention
    from ._masks import build_mask

    AttentionInterface.register(ATTN, mmfast_attention)
    AttentionMaskInterface.register(ATTN, build_mask)


def _configs(model):
    """Every config the model's attention layers may read: the model's, its sub-configs (any depth) and
    those of nested PreTrainedModels."""
    from transformers import PreTrainedModel

    found, todo = {}, [model.config]
    todo += [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while todo:
        config = todo.pop()
        if config is None or id(config) in found:
            continue
        found[id(config)] = config
        todo += [getattr(config, key, None) for key in getattr(config, "sub_configs", {})]
    return list(found.values())


def _unknown_types(configs):
    return sorted({c.model_type for c in configs if c.model_type not in TABLE})


def _uses_interface(cls):
    """Whether the class's forward dispatches through ALL_ATTENTION_FUNCTIONS (an attention layer)."""
    forward = inspect.unwrap(cls.forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _patch_attention(model, configs, options, state):
    from ._attention import CTX, NAME as ATTN, AttentionContext

    register()
    saved = [(c, c.__dict__.get("_attn_implementation_internal")) for c in configs]
    before = {id(c): c._attn_implementation for c in configs}

    def undo():
        for config, value in saved:
            config._attn_implementation_internal = value

    state.undo.append(undo)
    model.set_attn_implementation(ATTN)
    ctx = AttentionContext(options.backend, state.report)
    for path, module in model.named_modules():
        cls = type(module)
        if not _uses_interface(cls):
            continue
        was = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if was != ATTN:  # set_attn_implementation refused this sub-model (it logged why)
            state.report.leave(path, cls.__name__, f"its config kept attn_implementation={was!r}")
            continue
        _core.set_instance_attr(module, CTX, ctx)
        state.report.add(path, f"{cls.__name__} ({before.get(id(module.config), '?')})",
                         "mmfast.kernels.flash_attention")


def patch(model, options, state):
    configs = _configs(model)
    unknown = _unknown_types(configs)
    if unknown:
        state.report.message = (f"transformers model type(s) {', '.join(map(repr, unknown))} not in mmfast's table "
                                f"(known: {', '.join(sorted(TABLE))}); nothing was changed")
        _core.unpatch_model(model)
        return
    entries = [TABLE[c.model_type] for c in configs]
    from . import _embeddings, _losses

    if options.attention and any(e.attention for e in entries):
        _patch_attention(model, configs, options, state)
    if options.patch_embed and any(e.embeddings for e in entries):
        _embeddings.patch(model, options, state)
    if options.loss and any(e.loss for e in entries):
        _losses.patch(model, options, state)
    for extra in dict.fromkeys(e.extra for e in entries if e.extra is not None):
        extra(model, options, state)
    notes = [e.note for e in entries if e.note]
    if notes:
        state.report.message = "; ".join(dict.fromkeys(notes))
