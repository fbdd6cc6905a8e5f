"""Flamingo's GATED XATTN-DENSE block (and Llama 3.2 Vision's / Idefics' variants) and the Perceiver
resampler (and Idefics' variant), built on ``flash_attention`` (interval masks) and ``tanh_gated_linear``
(fused gated residual).

The modules hold parameters and call the functional ops; the readable specs they are tested against,
``gated_xattn_dense_reference`` and ``perceiver_resampler_reference``, are at the bottom of this file.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.kernels import flash_attention, tanh_gated_linear
from mmfast.kernels._common import check_bool, check_choice, check_int, check_scalar
from mmfast.kernels.attention.masks import MEDIA_MODES, media_intervals

from .plain import plain
from .split_attention import EMPTY_ROWS, cross_attention

VARIANTS = ("flamingo", "mllama", "idefics")
PERCEIVER_ACTS = ("gelu", "relu")
# the backends both functional ops implement (flash_attention and tanh_gated_linear)
MODULE_BACKENDS = ("auto", "triton", "reference")


def gated_linear_residual(a, linear, gate, residual, *, row_mask=None, fused=True, backend="auto", on_unfused=None):
    """``residual + tanh(gate) · linear(a)``, the update zeroed on `row_mask` rows: one ``tanh_gated_linear``
    where `fused` and `linear` is a plain nn.Linear (:func:`mmfast.nn.plain.plain`), else as eager code writes
    it, `linear` called: a LoRA or quantized layer's own forward runs (then ``on_unfused(linear)``, if given,
    when `fused` was asked for)."""
    if fused:
        if plain(linear, nn.Linear):
            return tanh_gated_linear(a, linear.weight, linear.bias, gate, residual, row_mask=row_mask,
                                     backend=backend)
        if on_unfused is not None:
            on_unfused(linear)
    update = linear(a)
    if row_mask is not None:
        update = update.masked_fill(row_mask[..., None], 0.0)
    return residual + torch.tanh(gate) * update


def _optional_int(op, name, value, lo=1):
    return None if value is None else check_int(op, name, value, lo=lo)


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
    variant="idefics" (Hugging Face IdeficsGatedCrossAttentionLayer): RMSNorm, separate q / k / v / o
    projections (``kv_heads`` = heads), optional per-head RMSNorm of q and k (``qk_norm``, its
    ``qk_layer_norms``), SiLU-gated MLP; rows that see no image get attention output 0 (its
    ``cross_attention_gate``) but keep their MLP update (it gates the MLP by ``alpha_dense`` only).
    The layer order is the same in both (pre-norm attention, then pre-norm MLP); where the blocks sit in
    the language model (before every 4th block in Flamingo, every 5th layer in Llama 3.2) is up to the
    model. ``gate="vector"`` gives per-channel gates (Idefics' ``alpha_type="vector"``).
    ``empty_rows="all_keys"`` (variant="mllama" only) gives Hugging Face's rows that see no image: their
    attention runs over every visual token, padded ones included, and is added through the gate (only
    their MLP update is zeroed); the default "zero" is Meta's.

    What is fused: both gated residuals are ``tanh_gated_linear`` (out-projection / down-projection GEMM
    with bias-free gate, residual and row mask in the epilogue, and the gates' gradients inside the
    backward GEMMs); attention is ``flash_attention`` with the media intervals (no dense (L, T·n) mask,
    KV blocks outside a row tile's images are skipped); rows that see no image skip their out-projection
    tiles. The up-projection and activation stay as torch ops (see kernels/gated_linear/__init__.py).

    forward(x (B, L, D), media (B, T, n, D_media) — n visual tokens per image, T images per sample —,
    media_locations (B, L) bool/int marking each image's placeholder token, or explicit
    ``kv_start``/``kv_end`` intervals over the T·n keys; ``media_padding_mask`` (B, T·n) bool marks padded
    visual tokens, e.g. unused Llama 3.2 tiles) -> (B, L, D). Decoding passes ``kv=media_kv(media)``
    (computed once per image) instead of `media`.
    """

    def __init__(self, dim, heads, dim_head=None, *, dim_media=None, kv_heads=None, ff_mult=4, hidden=None,
                 variant="flamingo", gate="scalar", media_mode=None, eps=None, empty_rows="zero", qk_norm=None,
                 backend="auto"):
        super().__init__()
        op = "GatedCrossAttentionBlock"
        check_int(op, "dim", dim, lo=1)
        check_int(op, "heads", heads, lo=1)
        _optional_int(op, "dim_head", dim_head)
        if dim_head is None and dim < heads:
            raise ValueError(f"{op}: dim ({dim}) must be at least heads ({heads}) when dim_head is not given "
                             f"(dim_head = dim // heads)")
        _optional_int(op, "dim_media", dim_media)
        _optional_int(op, "kv_heads", kv_heads)
        check_scalar(op, "ff_mult", ff_mult, lo=0, lo_open=True)
        _optional_int(op, "hidden", hidden)
        if hidden is None and int(dim * ff_mult) < 1:
            raise ValueError(f"{op}: ff_mult ({ff_mult}) gives an FFN of int(dim * ff_mult) = 0 channels")
        check_choice(op, "variant", variant, VARIANTS)
        check_choice(op, "gate", gate, ("scalar", "vector"))
        if media_mode is not None:
            check_choice(op, "media_mode", media_mode, MEDIA_MODES)
        if eps is not None:
            check_scalar(op, "eps", eps, lo=0, lo_open=True)
        check_choice(op, "backend", backend, MODULE_BACKENDS)
        check_choice(op, "empty_rows", empty_rows, EMPTY_ROWS)
        if empty_rows != "zero" and variant != "mllama":
            raise ValueError(f"{op}: empty_rows={empty_rows!r} is Hugging Face Mllama's; variant must be 'mllama'")
        # qk-norm: always in Mllama, optional in Idefics (qk_layer_norms), never in Flamingo
        qk_norm = (variant == "mllama") if qk_norm is None else qk_norm
        check_bool(op, "qk_norm", qk_norm)
        if qk_norm != (variant == "mllama") and variant != "idefics":
            raise ValueError(f"{op}: qk_norm={qk_norm} with variant={variant!r}; only variant='idefics' chooses it")
        self.variant, self.heads, self.empty_rows = variant, heads, empty_rows
        self.kv_heads = kv_heads or heads
        if heads % self.kv_heads:
            raise ValueError(f"{op}: heads ({heads}) must be a multiple of kv_heads ({self.kv_heads})")
        self.dim_head = dim_head or dim // heads
        self.media_mode = media_mode or ("most_recent_group" if variant == "mllama" else "most_recent")
        self.eps = eps if eps is not None else (1e-5 if variant == "flamingo" else 1e-6)
        self.backend = backend
        llama_style = variant != "flamingo"  # RMSNorm and a SiLU-gated MLP (Mllama, Idefics)
        dim_media = dim_media or dim
        inner, inner_kv = heads * self.dim_head, self.kv_heads * self.dim_head
        hidden = hidden or int(dim * ff_mult)

        def w(*shape):
            return nn.Parameter(torch.empty(*shape))

        self.norm_attn_weight = nn.Parameter(torch.ones(dim))
        self.norm_attn_bias = None if llama_style else nn.Parameter(torch.zeros(dim))
        self.wq, self.wkv, self.wo = w(inner, dim), w(2 * inner_kv, dim_media), w(dim, inner)
        self.q_norm_weight = nn.Parameter(torch.ones(self.dim_head)) if qk_norm else None
        self.k_norm_weight = nn.Parameter(torch.ones(self.dim_head)) if qk_norm else None
        self.attn_gate = nn.Parameter(torch.zeros(1 if gate == "scalar" else dim))
        self.norm_ff_weight = nn.Parameter(torch.ones(dim))
        self.norm_ff_bias = None if llama_style else nn.Parameter(torch.zeros(dim))
        self.w_in = w(2 * hidden if llama_style else hidden, dim)  # mllama / idefics: [gate_proj; up_proj]
        self.w_out = w(dim, hidden)
        self.ff_gate = nn.Parameter(torch.zeros(1 if gate == "scalar" else dim))
        for p in (self.wq, self.wkv, self.wo, self.w_in, self.w_out):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # nn.Linear's default

    def _norm(self, x, weight, bias):
        if self.variant != "flamingo":
            return _rms_norm(x, weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)

    def media_kv(self, media):
        """Keys and values (B, T·n, kv_heads, dim_head) of `media` (B, T, n, D_media), k after its norm:
        what decoding computes once per image and passes back as ``forward(..., kv=)``."""
        if media.dim() != 4:
            raise ValueError(f"media must have shape (B, T, n, D_media), got {tuple(media.shape)}")
        B, T, n = media.shape[:3]
        dh = self.dim_head
        kv = F.linear(media.reshape(B, T * n, media.shape[-1]), self.wkv)  # T = 0 (a text-only batch) is fine
        k = kv[..., : self.kv_heads * dh].view(B, T * n, self.kv_heads, dh)  # strided views: no copy
        v = kv[..., self.kv_heads * dh :].view(B, T * n, self.kv_heads, dh)
        if self.k_norm_weight is not None:
            # the norm's fp32 weight promotes under autocast; attention runs in the projections' dtype
            k = _rms_norm(k, self.k_norm_weight, self.eps).to(v.dtype)
        return k, v

    def forward(self, x, media=None, media_locations=None, *, kv_start=None, kv_end=None, media_padding_mask=None,
                kv=None):
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, L, D), got {tuple(x.shape)}")
        if (media is None) == (kv is None):
            raise ValueError("pass exactly one of media (B, T, n, D_media) and kv (keys, values from media_kv)")
        if media is not None and (media.dim() != 4 or media.shape[0] != x.shape[0]):
            raise ValueError(f"media must have shape (B, T, n, D_media) with B = {x.shape[0]}, got {tuple(media.shape)}")
        B, L, _ = x.shape
        k, v = self.media_kv(media) if kv is None else kv
        if k.shape[0] != B or k.shape[2:] != (self.kv_heads, self.dim_head):
            raise ValueError(f"kv: keys must be (B={B}, K, {self.kv_heads}, {self.dim_head}), got {tuple(k.shape)}")
        if media is None and media_locations is not None:
            raise ValueError("media_locations needs media (n tokens per image); with kv pass kv_start / kv_end")
        n = media.shape[2] if media is not None else None
        if media_locations is not None:
            if kv_start is not None or kv_end is not None:
                raise ValueError("pass media_locations or kv_start/kv_end, not both")
            kv_start, kv_end = media_intervals(media_locations.to(torch.int32), 1, n, mode=self.media_mode)
        elif kv_start is None or kv_end is None:
            raise ValueError("pass media_locations (B, L) or both kv_start and kv_end")
        dh = self.dim_head
        h = self._norm(x, self.norm_attn_weight, self.norm_attn_bias)
        q = F.linear(h, self.wq).view(B, L, self.heads, dh)
        if self.q_norm_weight is not None:
            q = _rms_norm(q, self.q_norm_weight, self.eps).to(v.dtype)
        no_image = kv_end <= kv_start
        if no_image.dim() == 1:
            no_image = no_image.expand(B, L)
        if self.empty_rows == "all_keys":
            o = cross_attention(q, k, v, kv_start.expand(B, L), kv_end.expand(B, L), media_padding_mask,
                                empty_rows="all_keys", backend=self.backend)
            attn_rows = None  # Hugging Face adds those rows' attention over every key
        else:
            o = flash_attention(q, k, v, kv_start=kv_start, kv_end=kv_end, key_padding_mask=media_padding_mask,
                                backend=self.backend)
            # rows that see no image: attention output exactly 0 and no bias, so their update is 0 either way;
            # the mask lets the GEMM skip their tiles
            attn_rows = no_image
        # under autocast tanh_gated_linear casts o and the weight as F.linear would; the residual stream x
        # keeps its own dtype (fp32 under autocast: the update is added in fp32)
        x = tanh_gated_linear(o.reshape(B, L, -1), self.wo, None, self.attn_gate, x, row_mask=attn_rows,
                              backend=self.backend)
        h = self._norm(x, self.norm_ff_weight, self.norm_ff_bias)
        if self.variant != "flamingo":
            g, u = F.linear(h, self.w_in).chunk(2, dim=-1)
            act = F.silu(g) * u
        else:
            act = F.gelu(F.linear(h, self.w_in))
        row_mask = no_image if self.variant == "mllama" else None
        return tanh_gated_linear(act, self.w_out, None, self.ff_gate, x, row_mask=row_mask, backend=self.backend)


_PERCEIVER_ACT = {"gelu": F.gelu, "relu": F.relu}


def _qk_norm(layer, which, t):
    """The perceiver's optional LayerNorm of q or k over each head's channels (Idefics' qk_layer_norms)."""
    weight = getattr(layer, f"{which}_norm_weight", None)
    if weight is None:
        return t
    return F.layer_norm(t, (t.shape[-1],), weight, getattr(layer, f"{which}_norm_bias"))


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver resampler: `num_latents` learned latents cross-attend, over `depth` layers,
    to ``[visual features; latents]`` (keys and values from both, as in the paper), each layer followed
    by an FFN; output (B, T, num_latents, D) after a final LayerNorm (lucidrains/flamingo-pytorch).

    Video: x (B, T, n, D) gets a learned time embedding per frame (``num_time_embeds`` ≥ T) and each
    frame is resampled on its own; images are x (B, n, D) or T = 1.

    Hugging Face's IdeficsPerceiverResampler is ``act="relu"`` (its FFN: LN → Linear → ReLU → Linear) with
    ``qk_norm`` = its ``qk_layer_norms_perceiver`` (LayerNorm over each head's q and k, weight and bias).

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
                 act="gelu", qk_norm=False, backend="auto"):
        super().__init__()
        op = "PerceiverResampler"
        check_int(op, "dim", dim, lo=1)
        check_int(op, "depth", depth, lo=1)
        check_int(op, "heads", heads, lo=1)
        check_int(op, "dim_head", dim_head, lo=1)
        check_int(op, "num_latents", num_latents, lo=1)
        _optional_int(op, "num_time_embeds", num_time_embeds)
        check_scalar(op, "ff_mult", ff_mult, lo=0, lo_open=True)
        if int(dim * ff_mult) < 1:
            raise ValueError(f"{op}: ff_mult ({ff_mult}) gives an FFN of int(dim * ff_mult) = 0 channels")
        check_choice(op, "act", act, PERCEIVER_ACTS)
        check_bool(op, "qk_norm", qk_norm)
        check_choice(op, "backend", backend, MODULE_BACKENDS)
        self.heads, self.dim_head, self.backend, self.act = heads, dim_head, backend, act
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
            if qk_norm:
                for name in ("q_norm", "k_norm"):
                    setattr(layer, f"{name}_weight", nn.Parameter(torch.ones(dim_head)))
                    setattr(layer, f"{name}_bias", nn.Parameter(torch.zeros(dim_head)))
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
            q = _qk_norm(layer, "q", F.linear(ln, layer.wq).view(B * T, -1, H, dh))
            kv_m = F.linear(xm, layer.wkv)
            kv_l = F.linear(ln, layer.wkv)
            k_m = _qk_norm(layer, "k", kv_m[..., :inner].view(B * T, n, H, dh))
            k_l = _qk_norm(layer, "k", kv_l[..., :inner].view(B * T, -1, H, dh))
            o1, lse1 = flash_attention(q, k_m, kv_m[..., inner:].view(B * T, n, H, dh), return_lse=True,
                                       backend=self.backend)
            o2, lse2 = flash_attention(q, k_l, kv_l[..., inner:].view(B * T, -1, H, dh), return_lse=True,
                                       backend=self.backend)
            w1 = torch.sigmoid(lse1 - lse2).transpose(1, 2).unsqueeze(-1).to(o1.dtype)  # (BT, Lq, H, 1)
            o = w1 * o1 + (1 - w1) * o2
            lat = F.linear(o.reshape(B * T, -1, inner), layer.wo) + lat
            h = F.layer_norm(lat, (D,), layer.norm_ff_weight, layer.norm_ff_bias)
            lat = F.linear(_PERCEIVER_ACT[self.act](F.linear(h, layer.w1)), layer.w2) + lat
        out = F.layer_norm(lat, (D,), self.norm_weight, self.norm_bias)
        return out.view(B, T, -1, D)


# ----------------------------------------------------------------------------------------------
# References: the readable specs the modules are tested against (the eager code of the models they
# replace, with the same parameter names as the modules)


def gated_xattn_dense_reference(x, media, media_locations, p, *, heads, kv_heads=None, variant="flamingo",
                                only_attend_immediate_media=True, eps=None, media_padding_mask=None):
    """Flamingo's GATED XATTN-DENSE block, as lucidrains/flamingo-pytorch writes it (variant="flamingo"),
    Hugging Face's MllamaCrossAttentionDecoderLayer (variant="mllama") or IdeficsGatedCrossAttentionLayer
    (variant="idefics": Mllama's parts, qk-norm only when `p` holds its weights, and no row mask on the MLP:
    Idefics' ``cross_attention_gate`` zeroes only the attention output of rows that see no image).

    x (B, L, D); media (B, T, n, D_media); media_locations (B, L) marks each image's placeholder token;
    `p` maps the parameter names of ``mmfast.nn.GatedCrossAttentionBlock`` to tensors. The media mask is
    Flamingo's: ``text_time = cumsum(media_locations)``, a token sees image t iff text_time == t (or
    >= t without ``only_attend_immediate_media``); tokens with text_time 0 attend to nothing (output 0).
    Mllama: RMSNorm, qk-norm per head, GQA (``repeat_kv``), SiLU-gated MLP whose output is multiplied by
    the full-text-row mask (rows that see no image). Its attention rows that see no image are 0 here
    (Meta's llama-models; Hugging Face instead lets such rows attend to every key), so those rows keep
    exactly their input.
    """
    F = torch.nn.functional
    mllama = variant == "mllama"
    llama_style = variant in ("mllama", "idefics")
    eps = eps if eps is not None else (1e-6 if llama_style else 1e-5)
    B, L, D = x.shape
    T, n = media.shape[1], media.shape[2]
    kv_heads = kv_heads or heads

    def norm(t, w, b):
        return _rms_norm(t, w, eps) if llama_style else F.layer_norm(t, (D,), w, b, eps)

    h = norm(x, p["norm_attn_weight"], p.get("norm_attn_bias"))
    q = F.linear(h, p["wq"])
    k, v = F.linear(media.reshape(B, T * n, -1), p["wkv"]).chunk(2, dim=-1)
    q = q.view(B, L, heads, -1).transpose(1, 2)
    k = k.reshape(B, T * n, kv_heads, -1).transpose(1, 2)
    v = v.reshape(B, T * n, kv_heads, -1).transpose(1, 2)
    if p.get("q_norm_weight") is not None:
        q = _rms_norm(q, p["q_norm_weight"], eps)
        k = _rms_norm(k, p["k_norm_weight"], eps)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    sim = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, L, T·n)
    text_time = media_locations.to(torch.int64).cumsum(dim=-1)  # images at or before each token
    media_time = torch.arange(T, device=x.device).repeat_interleave(n) + 1
    op = torch.eq if only_attend_immediate_media else torch.ge
    visible = op(text_time[:, None, :, None], media_time[None, None, None, :])
    if media_padding_mask is not None:
        visible = visible & ~media_padding_mask[:, None, None, :]
    sim = sim.masked_fill(~visible, -torch.finfo(sim.dtype).max)
    attn = sim.softmax(dim=-1)
    attn = attn.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)  # text before any image: no media
    out = (attn @ v).transpose(1, 2).reshape(B, L, -1)
    x = x + torch.tanh(p["attn_gate"]) * F.linear(out, p["wo"])
    h = norm(x, p["norm_ff_weight"], p.get("norm_ff_bias"))
    if llama_style:
        gate_proj, up_proj = F.linear(h, p["w_in"]).chunk(2, dim=-1)
        ff = F.linear(F.silu(gate_proj) * up_proj, p["w_out"])
        if mllama:
            full_text_row_masked_out_mask = visible.any(dim=-1)[:, 0, :, None].to(ff.dtype)
            ff = full_text_row_masked_out_mask * ff
    else:
        ff = F.linear(F.gelu(F.linear(h, p["w_in"])), p["w_out"])
    return x + torch.tanh(p["ff_gate"]) * ff


def perceiver_resampler_reference(x, p, *, depth, heads, act="gelu"):
    """Flamingo's Perceiver resampler as lucidrains/flamingo-pytorch writes it: per layer
    ``latents = attn(LN(x), LN(latents)) + latents`` with keys/values from ``cat(LN(x), LN(latents))``,
    then ``latents = FFN(latents) + latents`` (LN → Linear → GELU → Linear); final LayerNorm.

    x (B, n, D) or (B, T, n, D) (video: time embeddings ``p["time_pos_emb"][:T]`` added per frame);
    `p` maps ``mmfast.nn.PerceiverResampler``'s parameter names to tensors. Hugging Face Idefics' variant:
    ``act="relu"``, and q / k LayerNormed per head where `p` holds ``layers.i.q_norm_weight`` etc.
    (its ``qk_layer_norms_perceiver``, applied after the split into heads). Returns (B, T, latents, D).
    """
    F = torch.nn.functional
    if x.dim() == 3:
        x = x.unsqueeze(1)
    B, T, n, D = x.shape
    if p.get("time_pos_emb") is not None:
        x = x + p["time_pos_emb"][:T]
    latents = p["latents"].expand(B, T, -1, -1)
    for i in range(depth):
        g = lambda name: p[f"layers.{i}.{name}"]  # noqa: E731
        xm = F.layer_norm(x, (D,), g("norm_media_weight"), g("norm_media_bias"))
        ln = F.layer_norm(latents, (D,), g("norm_latents_weight"), g("norm_latents_bias"))
        q = F.linear(ln, g("wq"))
        kv_input = torch.cat((xm, ln), dim=-2)
        k, v = F.linear(kv_input, g("wkv")).chunk(2, dim=-1)
        q, k, v = (t.reshape(B, T, t.shape[2], heads, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))
        if p.get(f"layers.{i}.q_norm_weight") is not None:
            q = F.layer_norm(q, (q.shape[-1],), g("q_norm_weight"), g("q_norm_bias"))
            k = F.layer_norm(k, (k.shape[-1],), g("k_norm_weight"), g("k_norm_bias"))
        sim = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        out = (sim.softmax(dim=-1) @ v).permute(0, 2, 3, 1, 4).reshape(B, T, -1, q.shape[1] * q.shape[-1])
        latents = F.linear(out, g("wo")) + latents
        h = F.layer_norm(latents, (D,), g("norm_ff_weight"), g("norm_ff_bias"))
        latents = F.linear(_PERCEIVER_ACT[act](F.linear(h, g("w1"))), g("w2")) + latents
    return F.layer_norm(latents, (D,), p["norm_weight"], p["norm_bias"])
