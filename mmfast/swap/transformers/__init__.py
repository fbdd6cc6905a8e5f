"""mmfast's kernels in Hugging Face transformers models, per instance.

``patch(model, options, state)`` (called by `mmfast.patch`):

- attention: registers "mmfast" in ``transformers.AttentionInterface`` (`_attention.mmfast_attention`) and
  in ``masking_utils.AttentionMaskInterface`` (`_masks.build_mask`: without it transformers hands the
  attention no padding mask at all), then ``model.set_attn_implementation("mmfast")`` on private copies of
  the model's configs (the originals, shared with any model built from them, are never modified;
  `unpatch` puts them back);
- patch embeddings (`_embeddings`) and contrastive losses (`_losses`): ``forward`` replaced per instance;
- model-specific modules that bypass the interface: the entry's ``extra`` function.

Only model types in `TABLE` are patched, and only when every sub-config's type is in it too; any other
model is left untouched with the reason in the report. After ``import mmfast.swap.transformers`` and
`register()`, ``from_pretrained(..., attn_implementation="mmfast")`` works as well.

Supported: transformers >= 4.57, < 6 (`SUPPORTED`; tested with 4.57.6, the last 4.x, 5.17, the lent GPU
image's, and 5.24, the newest release; where they differ the code checks the feature, not the version).
The mask builder takes both contracts (5.x: q_length / q_offset; 4.5x: the query positions as
``cache_position``). On 4.5x, BLIP-2's Q-Former attention does not call the interface: `_blip2` swaps it per
instance there. Outside the range a model is left unchanged with that message.
"""
import copy
import dataclasses
import importlib
import inspect
import sys
from typing import Optional

from .. import _core

NAME = "transformers"


def example_inputs(model, *, seed=0, batch=2):
    """Inputs for `mmfast.verify` (ViT, CLIP, SigLIP and their towers; others: ValueError): see `_inputs`."""
    from ._inputs import example_inputs as generate

    return generate(model, seed=seed, batch=batch)
SUPPORTED = ((4, 57), (6, 0))   # [low, high): 4.57 is the lowest release verified


@dataclasses.dataclass(frozen=True)
class Entry:
    """What mmfast swaps in one model type.

    attention: its attention layers call ``AttentionInterface`` (set attn_implementation "mmfast").
    embeddings / loss: swap the `_embeddings` / `_losses` modules found in it.
    extra: the name of a sibling module (e.g. "_mllama") whose ``patch(model, options, state)`` swaps the
        modules that bypass the interface; imported only when such a model is patched, after the
        attention implementation is set (so it may call `_attention.mmfast_attention` itself).
    note: a line for the report's message.
    """
    attention: bool = True
    embeddings: bool = False
    loss: bool = False
    extra: Optional[str] = None
    note: str = ""


TABLE = {
    "vit": Entry(embeddings=True),
    "clip": Entry(embeddings=True, loss=True),
    "clip_vision_model": Entry(embeddings=True),
    "clip_text_model": Entry(),
    "siglip": Entry(embeddings=True, loss=True),
    "siglip_vision_model": Entry(embeddings=True),
    "siglip_text_model": Entry(),
    "blip-2": Entry(embeddings=True, note="no ITC loss in transformers' BLIP-2; Q-Former runs fp32 attention",
                    extra="_blip2"),
    "blip_2_vision_model": Entry(embeddings=True),
    "blip_2_qformer": Entry(extra="_blip2"),
    "opt": Entry(),
    "llama": Entry(),
    # language models of LLaVA / LLaVA-NeXT checkpoints: decoders whose every attention layer calls the
    # interface; sliding windows reach the kernel as per-row key intervals (the "mmfast" mask builder keeps the
    # pattern and the attention reads its rows), logit softcap (Gemma 2) runs the eager math per call, counted
    "mistral": Entry(),
    "qwen2": Entry(),
    "qwen3": Entry(),
    "gemma": Entry(),
    "gemma2": Entry(),
    "phi3": Entry(),
    "llava": Entry(embeddings=True),
    "llava_next": Entry(embeddings=True),
    # BLIP (v1): no attention layer uses the interface, and its text decoder adds the mask built for its
    # config's implementation to eager scores: keep that implementation (attention=False)
    "blip": Entry(attention=False, embeddings=True, extra="_blip"),
    "blip_text_model": Entry(attention=False, extra="_blip"),
    "blip_vision_model": Entry(attention=False, embeddings=True, extra="_blip"),
    "mllama": Entry(extra="_mllama"),
    "mllama_text_model": Entry(extra="_mllama"),
    "mllama_vision_model": Entry(extra="_mllama"),
    "idefics": Entry(extra="_idefics"),
    "idefics_vision": Entry(extra="_idefics"),
    "idefics_perciever": Entry(extra="_idefics"),  # sic: transformers' spelling
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


def _uses_interface(cls):
    """Whether the class's forward dispatches through ALL_ATTENTION_FUNCTIONS (an attention layer)."""
    forward = inspect.unwrap(cls.forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _private_configs(model, configs):
    """Give the model its own copies of its configs before setting the implementation on them.

    transformers shares config objects (``CLIPModel(config)`` keeps ``config``, and its sub-models the
    sub-configs): setting "mmfast" on them would leak into any model built from them later. Each module's
    ``config`` attribute is swapped per instance (restored by unpatch), the sharing inside the model kept.
    """
    memo = {}
    for config in configs:
        copy.deepcopy(config, memo)
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and id(config) in memo:
            _core.set_instance_attr(module, "config", memo[id(config)])
    return [memo[id(c)] for c in configs]


def _patch_attention(model, configs, options, state):
    from ._attention import CTX, NAME as ATTN, AttentionContext

    register()
    before = {id(c): c._attn_implementation for c in configs}
    before = {id(new): before[id(old)] for old, new in zip(configs, _private_configs(model, configs))}
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


def _version_problem():
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED
    if not low <= version < high:
        return (f"transformers {transformers.__version__} is outside the range mmfast supports "
                f"(>= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))})")
    return None


def _why_not(configs):
    problem = _version_problem()
    if problem:
        return problem
    unknown = sorted({c.model_type for c in configs if c.model_type not in TABLE})
    if unknown:
        return (f"transformers model type(s) {', '.join(map(repr, unknown))} not in mmfast's table "
                f"(known: {', '.join(sorted(TABLE))})")
    return None


def patch(model, options, state):
    configs = _configs(model)
    problem = _why_not(configs)
    if problem:
        # leave the model exactly as it was: not even the patch state stays on it
        state.report.message = problem + "; nothing was changed"
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
        importlib.import_module(f"{__name__}.{extra}").patch(model, options, state)
    notes = [e.note for e in entries if e.note]
    if notes:
        state.report.message = "; ".join(dict.fromkeys(notes))
