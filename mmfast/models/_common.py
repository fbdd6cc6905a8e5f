"""Shared pieces of the model layer: HF-style output containers, presets, weight copying."""
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import nn


class ModelOutput(OrderedDict):
    """Hugging Face's ``ModelOutput`` contract without depending on transformers: fields by attribute and
    by key, ``None`` fields left out of ``keys()`` / ``to_tuple()``, integer indexing over the set ones."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                super().__setitem__(f.name, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __setattr__(self, name, value):
        if value is not None and name in {f.name for f in fields(self)}:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def to_tuple(self):
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass(eq=False)
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: torch.Tensor = None
    pooler_output: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    logits: Optional[torch.Tensor] = None


@dataclass(eq=False)
class MaskedPatchOutput(ModelOutput):
    """ViT masked-patch prediction: loss over the chosen patches, logits (B, N, 2^(3 bits)) over the mean
    colour bins, target (B, N) bin ids, target_mask (B, N) the patches predicted."""
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    target: Optional[torch.Tensor] = None
    target_mask: Optional[torch.Tensor] = None


@dataclass(eq=False)
class CLIPOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits_per_image: torch.Tensor = None
    logits_per_text: torch.Tensor = None
    text_embeds: torch.Tensor = None
    image_embeds: torch.Tensor = None
    text_model_output: Any = None
    vision_model_output: Any = None


def build_preset(cls, presets, name, overrides):
    """``cls(**presets[name])`` with `overrides` replacing constructor arguments (``backend=`` ...): the body
    of every model's ``from_preset``; ValueError naming the presets otherwise."""
    if name not in presets:
        raise ValueError(f"{cls.__name__}.from_preset: name must be a preset, one of {tuple(presets)}, got {name!r}")
    return cls(**{**presets[name], **overrides})


def clip_vision_args(img, patch, width, depth, heads):
    """ViT constructor arguments of OpenAI CLIP's image tower (QuickGELU, bias-free patch conv, LayerNorm
    before the blocks, the pooled token normalised): CLIP's presets and the towers of LLaVA's."""
    return dict(img_size=img, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, act="quick_gelu",
                norm_eps=1e-5, patch_bias=False, pre_norm=True, final_norm="pooled")


def check_output_attentions(owner, output_attentions):
    """Hugging Face's ``output_attentions``: accepted as False / None only. mmfast's attention is
    flash_attention, which never forms the (B, H, L, L) probabilities (that is what makes it fast), so there
    is nothing to return; computing them apart would be a second, unfused attention. Run the Hugging Face
    model with ``attn_implementation="eager"`` to inspect attention maps."""
    if output_attentions:
        raise ValueError(f"{owner}: output_attentions=True is not supported: flash_attention never forms the "
                         "attention probabilities; use the Hugging Face model (attn_implementation='eager') for them")


def hf_return(out, return_dict):
    """The output object, or HF's ``return_dict=False`` tuple of its set fields (None fields left out)."""
    return out if return_dict is None or return_dict else out.to_tuple()


def copy_weights(pairs, owner):
    """Copy each (destination parameter, source tensor) with a shape check naming the owner."""
    with torch.no_grad():
        for name, dst, src in pairs:
            if dst is None and src is None:
                continue
            if dst is None or src is None:
                raise ValueError(f"{owner}: {name}: {'source' if dst is None else 'model'} has a tensor the other lacks")
            src = src.detach()
            if tuple(dst.shape) != tuple(src.shape):
                if dst.numel() != src.numel():
                    raise ValueError(f"{owner}: {name}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
                src = src.reshape(dst.shape)
            dst.copy_(src)


def module_pairs(prefix, dst, src):
    """(name, dst.weight, src.weight), (name, dst.bias, src.bias) for two nn.Linear / nn.LayerNorm-like modules."""
    return [(f"{prefix}.weight", dst.weight, src.weight), (f"{prefix}.bias", dst.bias, getattr(src, "bias", None))]


def _get(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def layer_pairs(encoder, their_layers, names):
    """(name, ours, theirs) for each layer of a `TransformerEncoder`. `names` maps our parts (q, k, v or
    qkv, out, norm1, norm2, fc1, fc2) to attribute paths in their layer; q / k / v land in slices of our
    fused qkv (views, so the pairs also serve the reverse copy), ``qkv`` may be an nn.Linear (timm) or an
    nn.MultiheadAttention (open_clip, its in_proj)."""
    if len(encoder.layers) != len(their_layers):
        raise ValueError(f"layer counts differ: {len(encoder.layers)} vs {len(their_layers)}")
    pairs = []
    for i, (ours, theirs) in enumerate(zip(encoder.layers, their_layers)):
        p = f"layers.{i}"
        qkv_w, qkv_b = ours.attn.qkv.weight, ours.attn.qkv.bias
        if "qkv" in names:
            qkv = _get(theirs, names["qkv"])
            w, b = (qkv.weight, qkv.bias) if isinstance(qkv, nn.Linear) else (qkv.in_proj_weight, qkv.in_proj_bias)
            pairs += [(f"{p}.qkv.weight", qkv_w, w), (f"{p}.qkv.bias", qkv_b, b)]
        else:
            D = qkv_w.shape[0] // 3
            for j, key in enumerate(("q", "k", "v")):
                lin = _get(theirs, names[key])
                sl = slice(j * D, (j + 1) * D)
                pairs += [(f"{p}.{key}.weight", qkv_w[sl], lin.weight),
                          (f"{p}.{key}.bias", None if qkv_b is None else qkv_b[sl], lin.bias)]
        for key, mine in (("out", ours.attn.out), ("norm1", ours.norm1), ("norm2", ours.norm2), ("fc1", ours.mlp.fc1),
                          ("fc2", ours.mlp.fc2)):
            pairs += module_pairs(f"{p}.{key}", mine, _get(theirs, names[key]))
    return pairs


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def check_ids(op, input_ids, attention_mask, name="input_ids"):
    """ValueError naming the argument unless `input_ids` is a (B, L) int64 tensor and `attention_mask` None or
    of its shape."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"{op}: {name} must be a (B, L) int64 tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(f"{op}: attention_mask must have {name}' shape {tuple(input_ids.shape)}, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")


def gated_xattn_pairs(prefix, ours, theirs, gates, qk_norms=None):
    """(name, ours, theirs) weight pairs of a transformers Llama-style gated cross-attention layer (Mllama's
    ``MllamaCrossAttentionDecoderLayer``, Idefics' ``IdeficsGatedCrossAttentionLayer``) into a
    :class:`GatedCrossAttentionBlock`: input_layernorm, ``cross_attn`` q / k+v / o projections,
    post_attention_layernorm, ``mlp`` gate+up / down projections; `gates` names the layer's (attention, MLP)
    gate attributes, `qk_norms` the ``cross_attn``'s (q, k) norm modules (None: none)."""
    a, mlp = theirs.cross_attn, theirs.mlp
    pairs = [(f"{prefix}.input_layernorm", ours.norm_attn_weight, theirs.input_layernorm.weight),
             (f"{prefix}.cross_attn.q_proj", ours.wq, a.q_proj.weight),
             (f"{prefix}.cross_attn.k_proj+v_proj", ours.wkv, torch.cat([a.k_proj.weight, a.v_proj.weight])),
             (f"{prefix}.cross_attn.o_proj", ours.wo, a.o_proj.weight),
             (f"{prefix}.{gates[0]}", ours.attn_gate, getattr(theirs, gates[0])),
             (f"{prefix}.post_attention_layernorm", ours.norm_ff_weight, theirs.post_attention_layernorm.weight),
             (f"{prefix}.mlp.gate_proj+up_proj", ours.w_in, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
             (f"{prefix}.mlp.down_proj", ours.w_out, mlp.down_proj.weight),
             (f"{prefix}.{gates[1]}", ours.ff_gate, getattr(theirs, gates[1]))]
    if qk_norms is not None:
        pairs += [(f"{prefix}.cross_attn.{qk_norms[0]}", ours.q_norm_weight, getattr(a, qk_norms[0]).weight),
                  (f"{prefix}.cross_attn.{qk_norms[1]}", ours.k_norm_weight, getattr(a, qk_norms[1]).weight)]
    return pairs
