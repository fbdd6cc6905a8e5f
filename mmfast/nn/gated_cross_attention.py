"""Flamingo's GATED XATTN-DENSE block (and Llama 3.2 Vision's / Idefics' variants) and the Perceiver
resampler, built on ``flash_attention`` (interval masks) and ``tanh_gated_linear`` (fused gated residual).

The modules hold parameters and call the functional ops; the readable specs they are tested against are
``gated_xattn_dense_reference`` and ``perceiver_resampler_reference`` in ``mmfast.kernels.reference``.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.kernels import flash_attention, tanh_gated_linear
from mmfast.kernels.attention.masks import media_intervals

VARIANTS = ("flamingo", "mllama")


def _rms_norm(x, weight, eps):
    # Hugging Face's MllamaTextRMSNorm: normalise in fp32, cast back, then scale
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class GatedCrossAttentionBlock(nn.Module):
    """``y = x + tanh(α)·XAttn(norm(x), media)``; ``y = y + tanh(β)·FFN(norm(y))``, α = β = 0 at init.

    variant="flamingo" (lucidrains/flamingo-pytorch, open_flamingo): LayerNorm, bias-free Q / fused KV /
    out projections, GELU MLP, a text token attends to the visual tokens of the most recent image at or
    before it (``media_mode``), tokens before any image get attention output 0 (their FFN still applies).
    variant="mllama" (Hugging Face MllamaCrossAttentionDecoderLayer): RMSNorm, grouped KV heads
    (``kv_heads``), per-head RMSNorm of q and k (qk-norm), SiLU-gated MLP, and the full-text-row mask:
    rows that see no image keep exactly their input (their MLP update is zeroed as Hugging Face does, and
    their attention output is 0 as in Meta's reference, where Hugging Face would attend uniformly).
    The layer order is the same in both (pre-norm attention, then pre-norm MLP); where the blocks sit in
    the language model (before every 4th block in Flamingo, every 5th layer in Llama 3.2) is up to the
    model. ``gate="vector"`` gives per-channel gates (Idefics' ``alpha_type="vector"``).

    What is fused: both gated residuals are ``tanh_gated_linear`` (out-projection / down-projection GEMM
    with bias-free gate, residual and row mask in the epilogue, and the gates' gradients inside the
    backward GEMMs); attention is ``flash_attention`` with the media intervals (no dense (L, T·n) mask,
    KV blocks outside a row tile's images are skipped); rows that see no image skip their out-projection
    tiles. The up-projection and activation stay as torch ops (see kernels/gated_linear.py).

    forward(x (B, L, D), media (B, T, n, D_media) — n visual tokens per image, T images per sample —,
    media_locations (B, L) bool/int marking each image's placeholder token, or explicit
    ``kv_start``/``kv_end`` intervals over the T·n keys; ``media_padding_mask`` (B, T·n) bool marks padded
    visual tokens, e.g. unused Llama 3.2 tiles) -> (B, L, D).
    """

    def __init__(self, dim, heads, dim_head=None, *, dim_media=None, kv_heads=None, ff_mult=4, hidden=None,
                 variant="flamingo", gate="scalar", media_mode=None, eps=None, backend="auto"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if gate not in ("scalar", "vector"):
            raise ValueError(f"gate must be 'scalar' or 'vector', got {gate!r}")
        self.variant, self.heads = variant, heads
        self.kv_heads = kv_heads or heads
        if heads % self.kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({self.kv_heads})")
        self.dim_head = dim_head or dim // heads
        self.media_mode = media_mode or ("most_recent" if variant == "flamingo" else "most_recent_group")
        self.eps = eps if eps is not None else (1e-5 if variant == "flamingo" else 1e-6)
        self.backend = backend
        mllama = variant == "mllama"
        dim_media = dim_media or dim
        inner, inner_kv = heads * self.dim_head, self.kv_heads * self.dim_head
        hidden = hidden or int(dim * ff_mult)

        def w(*shape):
            return nn.Parameter(torch.empty(*shape))

        self.norm_attn_weight = nn.Parameter(torch.ones(dim))
        self.norm_attn_bias = None if mllama else nn.Parameter(torch.zeros(dim))
        self.wq, self.wkv, self.wo = w(inner, dim), w(2 * inner_kv, dim_media), w(dim, inner)
        self.q_norm_weight = nn.Parameter(torch.ones(self.dim_head)) if mllama else None
        self.k_norm_weight = nn.Parameter(torch.ones(self.dim_head)) if mllama else None
        self.attn_gate = nn.Parameter(torch.zeros(1 if gate == "scalar" else dim))
        self.norm_ff_weight = nn.Parameter(torch.ones(dim))
        self.norm_ff_bias = None if mllama else nn.Parameter(torch.zeros(dim))
        self.w_in = w(2 * hidden if mllama else hidden, dim)  # mllama: [gate_proj; up_proj]
        self.w_out = w(dim, hidden)
        self.ff_gate = nn.Parameter(torch.zeros(1 if gate == "scalar" else dim))
        for p in (self.wq, self.wkv, self.wo, self.w_in, self.w_out):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # nn.Linear's default

    def _norm(self, x, weight, bias):
        if self.variant == "mllama":
            return _rms_norm(x, weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)

    def forward(self, x, media, media_locations=None, *, kv_start=None, kv_end=None, media_padding_mask=None):
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, L, D), got {tuple(x.shape)}")
        if media.dim() != 4 or media.shape[0] != x.shape[0]:
            raise ValueError(f"media must have shape (B, T, n, D_media) with B = {x.shape[0]}, got {tuple(media.shape)}")
        B, L, _ = x.shape
        T, n = media.shape[1], media.shape[2]
        if media_locations is not None:
            if kv_start is not None or kv_end is not None:
                raise ValueError("pass media_locations or kv_start/kv_end, not both")
            kv_start, kv_end = media_intervals(media_locations.to(torch.int32), 1, n, mode=self.media_mode)
        elif kv_start is None or kv_end is None:
            raise ValueError("pass media_locations (B, L) or both kv_start and kv_end")
        dh = self.dim_head
        h = self._norm(x, self.norm_attn_weight, self.norm_attn_bias)
        q = F.linear(h, self.wq).view(B, L, self.heads, dh)
        kv = F.linear(media.reshape(B, T * n, media.shape[-1]), self.wkv)  # T = 0 (a text-only batch) is fine
        k = kv[..., : self.kv_heads * dh].view(B, T * n, self.kv_heads, dh)  # strided views: no copy
        v = kv[..., self.kv_heads * dh :].view(B, T * n, self.kv_heads, dh)
        if self.variant == "mllama":
            # the norm's fp32 weight promotes under autocast; attention runs in the projections' dtype
            q = _rms_norm(q, self.q_norm_weight, self.eps).to(v.dtype)
            k = _rms_norm(k, self.k_norm_weight, self.eps).to(v.dtype)
        o = flash_attention(q, k, v, kv_start=kv_start, kv_end=kv_end, key_padding_mask=media_padding_mask,
                            backend=self.backend)
        # rows that see no image: attention output exactly 0 and no bias, so their update is 0 either way;
        # the mask lets the GEMM skip their tiles
        no_image = kv_end <= kv_start
        if no_image.dim() == 1:
            no_image = no_image.expand(B, L)
        # weights in the activations' dtype (a no-op unless under autocast, whose matmuls do the same); the
        # residual stream x keeps its own dtype (fp32 under autocast: the update is added in fp32)
        x = tanh_gated_linear(o.reshape(B, L, -1), self.wo.to(o.dtype), None, self.attn_gate, x, row_mask=no_image,
                              backend=self.backend)
        h = self._norm(x, self.norm_ff_weight, self.norm_ff_bias)
        if self.variant == "mllama":
            g, u = F.linear(h, self.w_in).chunk(2, dim=-1)
            act = F.silu(g) * u
        else:
            act = F.gelu(F.linear(h, self.w_in))
        row_mask = no_image if self.variant == "mllama" else None
        return tanh_gated_linear(act, self.w_out.to(act.dtype), None, self.ff_gate, x, row_mask=row_mask,
                                 backend=self.backend)


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver resampler: `num_latents` learned latents cross-attend, over `depth` layers,
    to ``[visual features; latents]`` (keys and values from both, as in the paper), each layer followed
    by an FFN; output (B, T, num_latents, D) after a final LayerNorm (lucidrains/flamingo-pytorch).

    Video: x (B, T, n, D) gets a learned time embedding per frame (``num_time_embeds`` ≥ T) and each
    frame is resampled on its own; images are x (B, n, D) or T = 1.

    Two KV sources without the concatenation: the reference concatenates LN(x) and LN(latents) in every
    layer, a copy of (n + 64)·D elements per frame (read + write: 2·(n + 64)·D element moves; at n = 256,
    D = inner = 1024 on an H100 that is ~20% of the K/V projection's time — 4 bytes moved per element at
    ~3 TB/s against 4·inner FLOPs per element at ~700 TFLOP/s). Instead the media and latent K/V are
    projected separately and attended to by two ``flash_attention`` calls whose outputs are merged
    exactly by their log-sum-exps: ``o = σ(lse₁ − lse₂)·o₁ + σ(lse₂ − lse₁)·o₂``, an elementwise op over
    the 64 latent rows only (~3·64·inner element moves per frame, independent of n: 30% of the copy at
    n = 256, 9% at n = 1024), differentiable through the LSEs. The price is a second (64-key) attention
    launch per layer.
    """

    def __init__(self, dim, depth, heads=8, dim_head=64, num_latents=64, num_time_embeds=None, ff_mult=4,
                 backend="auto"):
        super().__init__()
        self.heads, self.dim_head, self.backend = heads, dim_head, backend
        inner, hidden = heads * dim_head, int(dim * ff_mult)
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.time_pos_emb = nn.Parameter(torch.randn(num_time_embeds, 1, dim)) if num_time_embeds else None
        self.layers = nn.ModuleList()
        for _ in range(depth):
            layer = nn.Module()
            for name in ("norm_media", "norm_latents", "norm_ff"):
                setattr(layer, f"{name}_weight", nn.Parameter(torch.ones(dim)))
                setattr(layer, f"{name}_bias", nn.Parameter(torch.zeros(dim)))
            layer.wq, layer.wkv, layer.wo = (nn.Parameter(torch.empty(inner, dim)),
                                             nn.Parameter(torch.empty(2 * inner, dim)),
                                             nn.Parameter(torch.empty(dim, inner)))
            layer.w1, layer.w2 = nn.Parameter(torch.empty(hidden, dim)), nn.Parameter(torch.empty(dim, hidden))
            for p in (layer.wq, layer.wkv, layer.wo, layer.w1, layer.w2):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            self.layers.append(layer)
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.norm_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4:
            raise ValueError(f"x must have shape (B, n, D) or (B, T, n, D), got {tuple(x.shape)}")
        B, T, n, D = x.shape
        if self.time_pos_emb is not None:
            if T > self.time_pos_emb.shape[0]:
                raise ValueError(f"{T} frames but only {self.time_pos_emb.shape[0]} time embeddings")
            x = x + self.time_pos_emb[:T].to(x.dtype)
        x = x.reshape(B * T, n, D)
        lat = self.latents.to(x.dtype).expand(B * T, -1, -1)
        H, dh = self.heads, self.dim_head
        inner = H * dh
        for layer in self.layers:
            xm = F.layer_norm(x, (D,), layer.norm_media_weight, layer.norm_media_bias)
            ln = F.layer_norm(lat, (D,), layer.norm_latents_weight, layer.norm_latents_bias)
            q = F.linear(ln, layer.wq).view(B * T, -1, H, dh)
            kv_m = F.linear(xm, layer.wkv)
            kv_l = F.linear(ln, layer.wkv)
            o1, lse1 = flash_attention(q, kv_m[..., :inner].view(B * T, n, H, dh), kv_m[..., inner:].view(B * T, n, H, dh),
                                       return_lse=True, backend=self.backend)
            o2, lse2 = flash_attention(q, kv_l[..., :inner].view(B * T, -1, H, dh), kv_l[..., inner:].view(B * T, -1, H, dh),
                                       return_lse=True, backend=self.backend)
            w1 = torch.sigmoid(lse1 - lse2).transpose(1, 2).unsqueeze(-1).to(o1.dtype)  # (BT, Lq, H, 1)
            o = w1 * o1 + (1 - w1) * o2
            lat = F.linear(o.reshape(B * T, -1, inner), layer.wo) + lat
            h = F.layer_norm(lat, (D,), layer.norm_ff_weight, layer.norm_ff_bias)
            lat = F.linear(F.gelu(F.linear(h, layer.w1)), layer.w2) + lat
        out = F.layer_norm(lat, (D,), self.norm_weight, self.norm_bias)
        return out.view(B, T, -1, D)
