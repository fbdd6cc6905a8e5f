"""MultiheadAttention: self- and cross-attention over `mmfast.kernels.flash_attention`."""
import torch
from torch import nn
from torch.nn import functional as F

from mmfast.kernels._common import check_bool, check_choice, check_int, check_scalar
from mmfast.kernels._registry import accelerated_backends
from mmfast.kernels.attention._configs import MAX_HEAD_DIM

from .plain import plain

QK_NORMS = (False, True, "layernorm", "rmsnorm")


def shared_padding_mask(attn, seqlen_q, seqlen_k, *, causal, key_padding_mask, device):
    """The block mask of a causal / padding mask that every layer of a stack applies, built once for all of
    them (``flash_attention(..., block_mask=)``) instead of by each layer's call: a build is tens of small
    device ops. None without padding (masks without tensors are cached per shape by flash_attention) or where
    `attn` (a layer's MultiheadAttention) runs the reference backend, which reads the mask arguments."""
    from mmfast.kernels import build_block_mask
    from mmfast.kernels._dispatch import resolve_backend

    if key_padding_mask is None or resolve_backend("flash_attention", attn.backend, device) == "reference":
        return None
    return build_block_mask(seqlen_q, seqlen_k, causal=causal, key_padding_mask=key_padding_mask, device=device,
                            validate=False)  # no index ranges to check: a padding mask only


class MultiheadAttention(nn.Module):
    """Multi-head self- or cross-attention, batch first, calling `flash_attention`.

    Self-attention (``kv_dim=None``) uses one fused QKV projection (weight rows ``[q heads; k heads;
    v heads]``, the layout of ``torch.nn.MultiheadAttention.in_proj_weight``) and hands the kernel
    q/k/v as strided views of its output, without copies. Cross-attention (``kv_dim`` given: text →
    image features, Q-Former queries → ViT features) uses a q projection and a fused KV projection of
    the context. A self-attention module also accepts a `context` of width `embed_dim` (a Perceiver
    resampler's latents attending to ``[features; latents]``): it then projects q and kv with slices of
    the fused weight.

    Args:
        embed_dim: width E of the queries' input and of the output.
        num_heads: query heads H; head dim D = E / H.
        kv_dim: width of the context (cross-attention); None for self-attention.
        num_kv_heads: key/value heads for GQA / MQA (H must be a multiple); default H.
        bias: biases on the projections.
        qk_norm: normalise q and k per head over D before the dot product: ``"layernorm"`` (or True;
            ViT-22B, timm's ``qk_norm``) or ``"rmsnorm"`` (Llama 3.2 Vision's cross-attention).
        qk_norm_eps: the norms' epsilon.
        softmax_scale: default 1/sqrt(D).
        backend: forwarded to `flash_attention`.

    Attention dropout is not offered (the kernel has none); dropout on the output belongs to the block.
    """

    def __init__(self, embed_dim, num_heads, *, kv_dim=None, num_kv_heads=None, bias=True, qk_norm=False,
                 qk_norm_eps=1e-6, softmax_scale=None, backend="auto", device=None, dtype=None):
        super().__init__()
        op = "MultiheadAttention"
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            check_int(op, name, value, lo=1)
        if kv_dim is not None:
            check_int(op, "kv_dim", kv_dim, lo=1)
        if embed_dim % num_heads:
            raise ValueError(f"{op}: embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"{op}: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} (GQA)")
        if embed_dim // num_heads > MAX_HEAD_DIM:
            raise ValueError(f"{op}: the head dim embed_dim / num_heads = {embed_dim // num_heads} must be at most "
                             f"{MAX_HEAD_DIM} (flash_attention's limit)")
        check_bool(op, "bias", bias)
        if not (isinstance(qk_norm, bool) or (isinstance(qk_norm, str) and qk_norm in QK_NORMS)):
            raise ValueError(f"{op}: qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        check_scalar(op, "qk_norm_eps", qk_norm_eps, lo=0.0, lo_open=True)
        if softmax_scale is not None:
            check_scalar(op, "softmax_scale", softmax_scale)
        check_choice(op, "backend", backend, ("auto", "reference") + accelerated_backends("flash_attention"))
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kv_dim = kv_dim
        self.softmax_scale = softmax_scale
        self.backend = backend
        q_out, kv_out = num_heads * self.head_dim, 2 * num_kv_heads * self.head_dim
        if kv_dim is None:
            self.qkv = nn.Linear(embed_dim, q_out + kv_out, bias=bias, **factory)
        else:
            self.q = nn.Linear(embed_dim, q_out, bias=bias, **factory)
            self.kv = nn.Linear(kv_dim, kv_out, bias=bias, **factory)
        self.out = nn.Linear(q_out, embed_dim, bias=bias, **factory)
        if qk_norm:
            norm = nn.RMSNorm if qk_norm == "rmsnorm" else nn.LayerNorm
            self.q_norm = norm(self.head_dim, eps=qk_norm_eps, **factory)
            self.k_norm = norm(self.head_dim, eps=qk_norm_eps, **factory)
        else:
            self.q_norm = self.k_norm = None
        self.qk_norm = "layernorm" if qk_norm is True else qk_norm

    def extra_repr(self):
        kind = "self" if self.kv_dim is None else f"cross, kv_dim={self.kv_dim}"
        return (f"{self.embed_dim}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"{kind}, qk_norm={self.qk_norm}, backend={self.backend!r}")

    def _project(self, x, context):
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        lead = x.shape[:-1]
        if self.kv_dim is None and context is None:
            qkv = self.qkv(x).unflatten(-1, (H + 2 * Hkv, D))
            return qkv[..., :H, :], qkv[..., H:H + Hkv, :], qkv[..., H + Hkv:, :]
        if context is None:
            raise ValueError("this is a cross-attention module (kv_dim given): forward needs `context`")
        if context.dim() != x.dim():
            raise ValueError(f"context must have x's number of dims ({x.dim()}: (B, Lk, kv_dim), or (total_k, kv_dim) "
                             f"with cu_seqlens), got shape {tuple(context.shape)}")
        if self.kv_dim is None:
            if context.shape[-1] != self.embed_dim:
                raise ValueError(f"context width must be embed_dim={self.embed_dim} for a self-attention module "
                                 f"(build with kv_dim= for another width), got {context.shape[-1]}")
            if plain(self.qkv, nn.Linear):
                w, b = self.qkv.weight, self.qkv.bias
                q = F.linear(x, w[:H * D], None if b is None else b[:H * D])
                kv = F.linear(context, w[H * D:], None if b is None else b[H * D:])
            else:  # a LoRA / quantized qkv: its own forward, each half of it used
                q, kv = self.qkv(x)[..., :H * D], self.qkv(context)[..., H * D:]
        else:
            if context.shape[-1] != self.kv_dim:
                raise ValueError(f"context width must be kv_dim={self.kv_dim}, got {context.shape[-1]}")
            q, kv = self.q(x), self.kv(context)
        kv = kv.unflatten(-1, (2 * Hkv, D))
        return q.view(*lead, H, D), kv[..., :Hkv, :], kv[..., Hkv:, :]

    def forward(self, x, context=None, *, causal=False, kv_start=None, kv_end=None, key_padding_mask=None,
                block_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
        """x: (B, Lq, embed_dim), or packed (total_q, embed_dim) with cu_seqlens_q/k; context: (B, Lk, kv_dim)
        (cross-attention) or None. The mask arguments go to `flash_attention` unchanged: `causal`
        (bottom-right aligned), interval masks `kv_start`/`kv_end` (see `mmfast.kernels.attention.masks`),
        `key_padding_mask` (B, Lk), precomputed `block_mask` metadata. Returns x's shape."""
        from mmfast.kernels import flash_attention

        if x.dim() not in (2, 3) or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, {self.embed_dim}) or packed (total, {self.embed_dim}), got {tuple(x.shape)}")
        if x.dim() == 2 and cu_seqlens_q is None:
            raise ValueError("packed x of shape (total, embed_dim) needs cu_seqlens_q (and cu_seqlens_k)")
        q, k, v = self._project(x, context)
        if self.q_norm is not None:
            # CUDA autocast runs layer_norm in fp32 (and the norms' fp32 weights promote): attention runs in
            # the projections' dtype, as without the norms
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        options = dict(kv_start=kv_start, kv_end=kv_end, key_padding_mask=key_padding_mask, block_mask=block_mask,
                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                       max_seqlen_k=max_seqlen_k, softmax_scale=self.softmax_scale)
        o = flash_attention(q, k, v, causal=causal, backend=self.backend,
                            **{name: value for name, value in options.items() if value is not None})
        return self.out(o.flatten(-2))

    @classmethod
    def from_torch(cls, mha, *, qk_norm=False, backend="auto"):
        """Build from a ``torch.nn.MultiheadAttention`` with its weights copied (either `batch_first`:
        this module is always batch first). Separate kdim/vdim projections become the cross-attention
        layout (q + fused kv; needs kdim == vdim)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise ValueError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("from_torch: add_bias_kv / add_zero_attn are not supported")
        if mha.dropout:
            raise ValueError(f"from_torch: attention dropout ({mha.dropout}) is not supported by flash_attention")
        weight = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        has_bias = mha.in_proj_bias is not None
        factory = {"device": weight.device, "dtype": weight.dtype}
        E = mha.embed_dim
        if mha._qkv_same_embed_dim:
            new = cls(E, mha.num_heads, bias=has_bias, qk_norm=qk_norm, backend=backend, **factory)
            new_weights = [(new.qkv.weight, mha.in_proj_weight)]
            if has_bias:
                new_weights.append((new.qkv.bias, mha.in_proj_bias))
        else:
            if mha.kdim != mha.vdim:
                raise ValueError(f"from_torch: kdim ({mha.kdim}) != vdim ({mha.vdim}) has no fused KV layout")
            new = cls(E, mha.num_heads, kv_dim=mha.kdim, bias=has_bias, qk_norm=qk_norm, backend=backend, **factory)
            new_weights = [(new.q.weight, mha.q_proj_weight),
                           (new.kv.weight, torch.cat([mha.k_proj_weight, mha.v_proj_weight]))]
            if has_bias:
                new_weights += [(new.q.bias, mha.in_proj_bias[:E]), (new.kv.bias, mha.in_proj_bias[E:])]
        new_weights.append((new.out.weight, mha.out_proj.weight))
        if has_bias:
            new_weights.append((new.out.bias, mha.out_proj.bias))
        with torch.no_grad():
            for dst, src in new_weights:
                dst.copy_(src)
        return new
