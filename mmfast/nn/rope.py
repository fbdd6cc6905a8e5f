"""Rotary position embeddings (RoPE) as Llama uses them, Llama 3's frequency scaling, and position ids
of padded batches.

The rotation pairs dimension i with i + D/2 (the "rotate half" layout of Hugging Face's Llama, not the
interleaved pairs of Meta's original code; checkpoints converted to HF are permuted to match it).
"""
import math

import torch
from torch import nn

from mmfast.kernels._common import check_choice, check_int, check_scalar

from . import liger

ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_inv_freq(head_dim, theta=10000.0, scaling=None):
    """The D/2 inverse frequencies theta^(-2i/D) (fp32), with Llama 3's scaling when `scaling` is a dict
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` (transformers' ``_compute_llama3_parameters``): wavelengths
    shorter than original / high_freq_factor are kept, longer than original / low_freq_factor divided by
    `factor`, and those between interpolated smoothly."""
    op = "rope_inv_freq"
    check_int(op, "head_dim", head_dim, lo=2)
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim must be even, got {head_dim}")
    check_scalar(op, "theta", theta, lo=0.0, lo_open=True)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = "default" if scaling is None else scaling.get("rope_type", "default")
    check_choice(op, "scaling['rope_type']", rope_type, ROPE_TYPES)
    if rope_type == "default":
        return inv_freq
    missing = [key for key in _LLAMA3_KEYS if key not in scaling]
    if missing:
        raise ValueError(f"{op}: llama3 scaling needs {missing} in `scaling`, got {sorted(scaling)}")
    factor, low, high, old_context = (scaling[key] for key in _LLAMA3_KEYS)
    check_scalar(op, "factor", factor, lo=0.0, lo_open=True)
    check_scalar(op, "low_freq_factor", low, lo=0.0, lo_open=True)
    check_scalar(op, "high_freq_factor", high, lo=low, lo_open=True)
    check_scalar(op, "original_max_position_embeddings", old_context, lo=0.0, lo_open=True)
    # the same operations in the same order as transformers, so the buffers agree bit for bit
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def position_ids_from_mask(attention_mask, length, past_length=0, device=None):
    """Position ids (B, length) of the last `length` columns of a (B, past_length + length) 1-keep / 0-pad
    mask: each real token's index among the real tokens of its row (left padding shifts nothing), 0 on
    pads. With no mask: past_length .. past_length + length - 1. Hugging Face's ``generate`` computes the
    same (its plain Llama forward uses the column index instead, which differs on left-padded rows)."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + length, device=device)[None]
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    return positions[:, -length:]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    """Rotate q (B, L, H, D) and k (B, L, Hkv, D) by the angles whose cos / sin are (B or 1, L, D).
    Computed in q's dtype as transformers does (cos and sin are rounded to it first). On CUDA with
    Liger-Kernel installed (``mmfast.nn.liger``) its Triton kernel (``liger_rope``, layout (B, H, L, D)) runs
    instead; its backward rotates the incoming gradient in place, as the attention's fresh dq / dk allow."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    if liger.runs_on(q):
        # Liger rotates a contiguous (B, L, H, D) tensor in place (it copies any other): never the caller's
        q, k = (t.clone() if t.is_contiguous() else t for t in (q, k))
        q, k = liger.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RotaryEmbedding(nn.Module):
    """cos / sin tables of the rotary angles for given position ids. ``inv_freq`` is a non-persistent fp32
    buffer (as in transformers: not in checkpoints, recomputed from the config).

    Args:
        head_dim: D (even); theta: the base (Llama 2: 10000, Llama 3: 500000);
        scaling: None or Llama 3's ``rope_scaling`` / ``rope_parameters`` dict (see `rope_inv_freq`).
    """

    def __init__(self, head_dim, theta=10000.0, scaling=None, device=None):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.scaling = None if scaling is None else dict(scaling)
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling).to(device), persistent=False)

    def extra_repr(self):
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.scaling}"

    def forward(self, position_ids):
        """position_ids (B, L) int -> (cos, sin), each (B, L, D) fp32 (angles in fp32, as transformers)."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=position_ids.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()
