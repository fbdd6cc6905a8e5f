"""Shared transformer blocks: a pre-norm encoder layer (ViT / CLIP / SigLIP / timm / open_clip) over
`MultiheadAttention`, its MLP, and attention pooling (SigLIP's MAP head)."""
import torch
from torch import nn
from torch.nn import functional as F

from mmfast.kernels._common import check_bool, check_choice, check_int, check_scalar

from .attention import MultiheadAttention, shared_padding_mask

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu")


def activation(name, x):
    """The MLP activations of the models we convert from: exact GELU (ViT, timm, open_clip default),
    tanh GELU (SigLIP's ``gelu_pytorch_tanh``), OpenAI CLIP's ``quick_gelu`` x * sigmoid(1.702 x), ReLU."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.relu(x)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (timm's / HF's ``mlp.fc1`` / ``mlp.fc2`` names)."""

    def __init__(self, dim, hidden_dim, *, act="gelu", bias=True, device=None, dtype=None):
        super().__init__()
        check_int("Mlp", "dim", dim, lo=1)
        check_int("Mlp", "hidden_dim", hidden_dim, lo=1)
        check_choice("Mlp", "act", act, ACTIVATIONS)
        check_bool("Mlp", "bias", bias)
        self.act = act
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.fc2(activation(self.act, self.fc1(x)))

    def extra_repr(self):
        return f"act={self.act!r}"


class LayerScale(nn.Module):
    """Per-channel residual-branch scale ``x * gamma`` (CaiT / DeiT-3 / DINOv2; timm's ``LayerScale``, same
    parameter name), gamma initialised to `init_values`."""

    def __init__(self, dim, init_values=1e-5, *, device=None, dtype=None):
        super().__init__()
        check_int("LayerScale", "dim", dim, lo=1)
        check_scalar("LayerScale", "init_values", init_values)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values), device=device, dtype=dtype))

    def forward(self, x):
        return x * self.gamma


class TransformerLayer(nn.Module):
    """Pre-norm encoder layer: x + ls1(attn(norm1(x))); x + ls2(mlp(norm2(x))) (ViT, CLIP, SigLIP, timm's
    Block, open_clip's ResidualAttentionBlock). Attention is `MultiheadAttention` (fused qkv,
    flash_attention); ``forward(x, causal=, key_padding_mask=)`` — key_padding_mask (B, L) bool, True =
    padded key. `init_values` (a float) adds the `LayerScale`s ls1 / ls2 (timm's ``init_values``); None:
    none. `qk_norm` LayerNorms q and k per head with `norm_eps` (timm's Block passes its norm layer)."""

    def __init__(self, dim, num_heads, *, mlp_dim=None, act="gelu", qkv_bias=True, proj_bias=True, mlp_bias=True,
                 qk_norm=False, norm_eps=1e-6, init_values=None, backend="auto", device=None, dtype=None):
        super().__init__()
        check_int("TransformerLayer", "dim", dim, lo=1)
        check_scalar("TransformerLayer", "norm_eps", norm_eps, lo=0.0, lo_open=True)
        if init_values is not None:
            check_scalar("TransformerLayer", "init_values", init_values)
        mlp_dim = 4 * dim if mlp_dim is None else mlp_dim
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **factory)
        self.attn = MultiheadAttention(dim, num_heads, bias=qkv_bias, qk_norm=qk_norm, qk_norm_eps=norm_eps,
                                       backend=backend, **factory)
        if proj_bias != qkv_bias:  # MultiheadAttention has one bias flag; HF ViT's qkv_bias=False keeps o_proj's
            self.attn.out = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **factory)
        self.mlp = Mlp(dim, mlp_dim, act=act, bias=mlp_bias, **factory)
        scale = init_values is not None
        self.ls1 = LayerScale(dim, init_values, **factory) if scale else None
        self.ls2 = LayerScale(dim, init_values, **factory) if scale else None

    def forward(self, x, *, causal=False, key_padding_mask=None, block_mask=None):
        """block_mask: the causal / padding mask already built (``shared_padding_mask``), in their place."""
        masks = dict(block_mask=block_mask) if block_mask is not None else \
            dict(causal=causal, key_padding_mask=key_padding_mask)
        h = self.attn(self.norm1(x), **masks)
        x = x + (h if self.ls1 is None else self.ls1(h))
        h = self.mlp(self.norm2(x))
        return x + (h if self.ls2 is None else self.ls2(h))


class TransformerEncoder(nn.Module):
    """`depth` TransformerLayers (``layers.N``). ``forward(x, causal=, key_padding_mask=,
    output_hidden_states=)`` returns the last hidden state, or (last, [input, after layer 1, ...]) — HF's
    ``hidden_states`` tuple convention (embeddings first)."""

    def __init__(self, dim, depth, num_heads, **layer_kwargs):
        super().__init__()
        check_int("TransformerEncoder", "depth", depth, lo=0)
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads, **layer_kwargs) for _ in range(depth))

    def forward(self, x, *, causal=False, key_padding_mask=None, output_hidden_states=False):
        block_mask = None if not self.layers else shared_padding_mask(
            self.layers[0].attn, x.shape[1], x.shape[1], causal=causal, key_padding_mask=key_padding_mask,
            device=x.device)
        states = [x]
        for layer in self.layers:
            x = layer(x, causal=causal, key_padding_mask=key_padding_mask, block_mask=block_mask)
            states.append(x)
        return (x, states) if output_hidden_states else x


class AttentionPool(nn.Module):
    """Multihead attention pooling (SigLIP's / big_vision's MAP head): a learned probe attends to the
    tokens, then a pre-norm residual MLP; returns the probe's output (B, dim). Parameters: ``probe``
    (1, 1, dim), ``attn`` (a self-attention `MultiheadAttention` used with a context, so its fused qkv
    weight is ``nn.MultiheadAttention.in_proj_weight``), ``norm``, ``mlp``."""

    def __init__(self, dim, num_heads, *, mlp_dim=None, act="gelu_tanh", norm_eps=1e-6, backend="auto", device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.probe = nn.Parameter(torch.randn(1, 1, dim, **factory))
        self.attn = MultiheadAttention(dim, num_heads, backend=backend, **factory)
        self.norm = nn.LayerNorm(dim, eps=norm_eps, **factory)
        self.mlp = Mlp(dim, 4 * dim if mlp_dim is None else mlp_dim, act=act, **factory)

    def forward(self, x, *, key_padding_mask=None):
        h = self.attn(self.probe.expand(x.shape[0], -1, -1), x, key_padding_mask=key_padding_mask)
        return (h + self.mlp(self.norm(h)))[:, 0]
