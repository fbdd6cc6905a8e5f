"""Inputs `mmfast.verify` generates for a transformers model given without any (``python -m mmfast verify`` on
a config or a Hub id): images at the vision config's size and / or token ids with a padded row, for the model
types whose forward needs nothing else. The others (LLaVA's image tokens, Mllama's tiles, BLIP's captions, ...)
need the user's inputs: a ValueError says so.
"""
import inspect

import torch

SIMPLE = ("vit", "clip", "clip_vision_model", "clip_text_model", "siglip", "siglip_vision_model", "siglip_text_model")


def _sub(config, key, field):
    """The sub-config `key` of a composite model, else the config itself when it has `field`."""
    sub = getattr(config, key, None)
    return sub if sub is not None else (config if hasattr(config, field) else None)


def example_inputs(model, *, seed=0, batch=2):
    config = model.config
    if config.model_type not in SIMPLE:
        raise ValueError(f"mmfast.verify: no generated inputs for transformers model type {config.model_type!r} "
                         f"(only {', '.join(SIMPLE)}); pass inputs=")
    params = inspect.signature(model.forward).parameters
    weight = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    vision = _sub(config, "vision_config", "image_size")
    if "pixel_values" in params and vision is not None:
        size = vision.image_size if isinstance(vision.image_size, (tuple, list)) else (vision.image_size,) * 2
        inputs["pixel_values"] = torch.randn(batch, vision.num_channels, *size, generator=g).to(weight.device,
                                                                                               weight.dtype)
    text = _sub(config, "text_config", "vocab_size")
    if "input_ids" in params and text is not None:
        length = min(8, getattr(text, "max_position_embeddings", 8))
        ids = torch.randint(3, text.vocab_size, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[-1, length // 2 + 1:] = 0   # the last row right-padded
        ids = ids.masked_fill(mask == 0, getattr(text, "pad_token_id", None) or 0)
        inputs.update(input_ids=ids.to(weight.device), attention_mask=mask.to(weight.device))
    if not inputs:
        raise ValueError(f"mmfast.verify: cannot generate inputs for {type(model).__name__}; pass inputs=")
    return inputs
