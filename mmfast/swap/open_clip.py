"""open_clip: the towers' nn.MultiheadAttention, the visual patch embedding and ClipLoss / SigLipLoss on mmfast.

Masks are never trusted by their looks: the text tower's float −inf causal buffer is compared with the causal
mask once (at patch time, again only if the buffer is replaced or written to), and a call's mask is treated
as causal only when it *is* that buffer (same storage, shape and strides). A padding mask counts only when it
is the very tensor the patched text ``_embeds`` just built from the token ids. Anything else runs
torch's own MultiheadAttention, counted in the report.
"""
import types
import weakref

import torch
import torch.nn.functional as F

from ._core import foreign_forward, not_plain, original, set_instance_attr
from .timm import _configure, _fallback, _library, join

NAME = "open_clip"

# (open_clip module, what runs now, when the original runs instead)
TABLE = (
    ("nn.MultiheadAttention in ResidualAttentionBlock (both towers) and AttentionalPooler (attention-pool head)",
     "mmfast.kernels.flash_attention",
     "fused in_proj read in place for self-attention, separate projections for the pool's cross-attention; "
     "text: the verified causal buffer -> causal=True, the pad / CoCa [CLS] mask built by TextTransformer._embeds "
     "-> key_padding_mask (+ causal); key_padding_mask bool. need_weights=True, attention dropout while "
     "training, bias_k / add_zero_attn, other masks: torch's forward (counted)"),
    ("open_clip VisionTransformer._embeds (conv1 + class_embedding + positional_embedding)",
     "mmfast.kernels.patch_embed", "then patch_dropout and ln_pre as open_clip; another image size: open_clip's"),
    ("open_clip ClipLoss", "mmfast.kernels.contrastive_loss",
     "logit_scale is already exp()'d (log_scale=False, no clamp); a logit_bias cancels in the softmax; "
     "world_size > 1 only with local_loss and gather_with_grad (the value is then the global batch's loss on "
     "every rank, the mean of open_clip's per-rank values; DDP-averaged gradients are the same); horovod: left"),
    ("open_clip SigLipLoss", "mmfast.kernels.siglip_loss",
     "every dist_impl: one all-gather; the value is the global loss (mean of the per-rank values)"),
    ("open_clip TimmModel trunk", "mmfast.swap.timm", "the timm table"),
)


def claims(model):
    return _library(model) == "open_clip" or (
        _library(model) not in ("transformers", "timm") and any(_library(m) == "open_clip" for m in model.modules()))


def patch(model, options, state):
    from open_clip.loss import ClipLoss, SigLipLoss
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import TextTransformer, VisionTransformer

    from . import timm as timm_swap

    report = state.report
    # image towers: their attention never takes a text tower's causal mask
    image_towers = [p for p, m in model.named_modules() if isinstance(m, (VisionTransformer, TimmModel))]
    causal_owners = {}
    for path, module in model.named_modules():
        buf = getattr(module, "attn_mask", None)
        if isinstance(buf, torch.Tensor):
            ctx = _CausalBuffer(module)
            if ctx.ok():
                causal_owners[path] = ctx
            else:
                report.leave(join(path, "attn_mask"), "float mask buffer",
                             "not the causal mask: masks run torch's path")
    for path, module in model.named_modules():
        MHA = torch.nn.MultiheadAttention
        if isinstance(module, MHA) and type(module).forward is MHA.forward:
            if not options.attention:
                report.leave(path, "nn.MultiheadAttention", "attention=False")
                continue
            why = _mha_blocker(module) or foreign_forward(module)
            if why:
                report.leave(path, "nn.MultiheadAttention", why)
                continue
            _configure(module, options, report)
            owner = _owner(path, causal_owners, image_towers)
            set_instance_attr(module, "_mmfast_causal", causal_owners.get(owner))
            replace = types.MethodType(_mha_forward, module)
            set_instance_attr(module, "forward", replace)
            report.add(path, "nn.MultiheadAttention", "mmfast flash_attention",
                       "causal buffer verified" if owner is not None else "")
        elif isinstance(module, TextTransformer) and options.attention and hasattr(type(module), "_embeds") and (
                getattr(module, "use_pad_mask", False) or module.cls_emb is not None):
            _configure(module, options, report)
            set_instance_attr(module, "_mmfast_causal", causal_owners.get(path))
            set_instance_attr(module, "_mmfast_pad", _PadMask())
            set_instance_attr(module, "_embeds", types.MethodType(_text_embeds, module))
            report.add(join(path, "_embeds"), "open_clip TextTransformer pad / [CLS] mask",
                       "key_padding_mask for flash_attention", "the additive mask is still built, for anyone else")
        elif isinstance(module, VisionTransformer):
            why = _visual_blocker(module) if options.patch_embed else "patch_embed=False"
            if why:
                report.leave(join(path, "conv1"), "open_clip conv1 + class/positional embedding", why)
                continue
            _configure(module, options, report)
            set_instance_attr(module, "_embeds", types.MethodType(_visual_embeds, module))
            report.add(join(path, "conv1"), "open_clip conv1 + class/positional embedding", "mmfast patch_embed")
        elif isinstance(module, (ClipLoss, SigLipLoss)):
            _swap_loss(path, module, options, report, ClipLoss, SigLipLoss)
        elif isinstance(module, TimmModel):
            timm_swap.swap_modules(module.trunk, join(path, "trunk."), options, report)
        elif type(module).__name__ == "HFTextEncoder":
            report.leave(path, "open_clip HFTextEncoder", "a transformers model: patch it with the transformers "
                         "integration (mmfast.patch(model.text.transformer))")
    towers = [m for m in model.modules() if "_mmfast_pad" in m.__dict__]
    for tower in towers:  # the tower's attention layers read the padding its _embeds recorded
        for m in tower.modules():
            if isinstance(m, torch.nn.MultiheadAttention) and "_mmfast_causal" in m.__dict__:
                set_instance_attr(m, "_mmfast_pad", tower._mmfast_pad)
    if not report.swapped:
        report.message = f"{report.model}: no open_clip module of the swap table ({NAME}.TABLE) was found"


def _under(path, p):
    return p == "" or path.startswith(p + ".")


def _owner(path, owners, image_towers):
    """The deepest module above `path` holding a verified causal buffer, unless an image tower lies between."""
    best = None
    for p in owners:
        if _under(path, p) and (best is None or len(p) > len(best)):
            best = p
    if best is not None and any(_under(path, t) and len(t) > len(best) for t in image_towers):
        return None
    return best


# --- masks -------------------------------------------------------------------------------------------------

class _CausalBuffer:
    """A module's ``attn_mask`` buffer, verified to be the additive causal mask (0 on and below the diagonal,
    −inf above). Re-verified only when the buffer is replaced (``model.to(...)``) or written in place."""

    def __init__(self, owner):
        self.owner = owner  # a plain attribute of a plain object: not registered as a submodule
        self.tensor = None
        self.version = None
        self.causal = False

    def ok(self):
        if torch.compiler.is_compiling():
            return _verified_while_tracing(self)
        return self.check()

    def check(self):
        buf = getattr(self.owner, "attn_mask", None)
        if not isinstance(buf, torch.Tensor):
            return False
        if buf is not self.tensor or buf._version != self.version:
            self.tensor, self.version, self.causal = buf, buf._version, _is_causal_mask(buf)
        return self.causal

    def matches(self, mask, L):
        if not self.ok():
            return False
        buf = getattr(self.owner, "attn_mask")
        if mask is buf:
            return mask.dim() == 2 and tuple(mask.shape) == (L, L)
        if torch.compiler.is_compiling():  # traced tensors have no addresses: the buffer itself only
            return False
        return (mask.dim() == 2 and tuple(mask.shape) == (L, L) and L <= buf.shape[0] and mask.dtype == buf.dtype
                and mask.device == buf.device and mask.data_ptr() == buf.data_ptr() and mask.stride() == buf.stride())


@torch.compiler.assume_constant_result
def _verified_while_tracing(causal_buffer):
    """torch.compile runs the check once, on the real buffer, while tracing, and keeps its result in the graph
    (a buffer rewritten in place after compiling is not noticed; reassigning it retraces)."""
    return causal_buffer.check()


def _is_causal_mask(buf):
    if buf.dim() != 2 or buf.shape[0] != buf.shape[1] or not buf.is_floating_point():
        return False
    expected = torch.full_like(buf, float("-inf")).triu_(1)
    return bool(torch.equal(buf, expected))  # one host sync, once per buffer


class _PadMask:
    """The last additive mask TextTransformer._embeds built, by identity (a weak reference: never kept alive),
    with what it encodes: causal or not, and the padded keys (B, L)."""

    def __init__(self):
        self.mask = _nothing
        self.causal = False
        self.padding = None

    def lookup(self, mask):
        if mask is not None and self.mask() is mask:
            return self.causal, self.padding
        return None


def _nothing():
    return None


def _text_embeds(self, text):
    x, mask = original(self, "_embeds")(text)
    pad = self._mmfast_pad
    pad.mask = _nothing
    if mask is not None and mask is not self.attn_mask and (getattr(self, "use_pad_mask", False)
                                                            or self.cls_emb is not None):
        # what open_clip's _build_additive_mask encodes, read from the same token ids
        valid = text != self.pad_id
        if self.cls_emb is not None:
            ones = valid.new_ones(valid.shape[0], 1)
            valid = torch.cat([valid, ones] if getattr(self, "correct_cls_mask", False) else [ones, valid], 1)
        causal = self.attn_mask is not None
        if causal and (self._mmfast_causal is None or not self._mmfast_causal.ok()):
            return x, mask
        pad.mask, pad.causal, pad.padding = weakref.ref(mask), causal, ~valid
    return x, mask


# --- nn.MultiheadAttention ---------------------------------------------------------------------------------

def _mha_blocker(mha):
    if not mha.batch_first:
        return "batch_first=False"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "bias_k / bias_v / add_zero_attn"
    return None


def _mha_mask(self, query, key, attn_mask, key_padding_mask, is_causal):
    """(causal, padding) the kernel runs, or a string saying why torch's path must run."""
    B, Lq, Lk = query.shape[0], query.shape[1], key.shape[1]
    causal, padding = False, None
    if attn_mask is not None:
        causal_buffer = self.__dict__.get("_mmfast_causal")
        pad = self.__dict__.get("_mmfast_pad")
        known = pad.lookup(attn_mask) if pad is not None else None
        if known is not None and tuple(attn_mask.shape) == (B * self.num_heads, Lq, Lk):
            causal, padding = known
        elif causal_buffer is not None and Lq == Lk and causal_buffer.matches(attn_mask, Lq):
            causal = True
        else:
            return f"attn_mask {attn_mask.dtype} {tuple(attn_mask.shape)} not recognised"
    elif is_causal:
        return "is_causal without attn_mask"
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, Lk):
            return f"key_padding_mask {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        padding = key_padding_mask if padding is None else padding | key_padding_mask
    return causal, padding


def _mha_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                 average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention.forward (batch_first) with the attention on flash_attention; returns (out, None)."""
    from mmfast.kernels import flash_attention

    why = None
    if need_weights:
        why = "need_weights=True"
    elif query.dim() != 3:
        why = "unbatched input"
    elif self.training and self.dropout > 0:
        why = "attention dropout while training"
    mask = why or _mha_mask(self, query, key, attn_mask, key_padding_mask, is_causal)
    if isinstance(mask, str):
        _fallback(self, mask)
        return original(self)(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                              attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
    causal, padding = mask
    B, Lq, E = query.shape
    H, D = self.num_heads, self.head_dim
    bias = self.in_proj_bias
    bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
    if self._qkv_same_embed_dim and query is key and key is value:
        q, k, v = F.linear(query, self.in_proj_weight, bias).view(B, Lq, 3, H, D).unbind(2)
    else:
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        q = F.linear(query, wq, bq).view(B, Lq, H, D)
        k = F.linear(key, wk, bk).view(B, key.shape[1], H, D)
        v = F.linear(value, wv, bv).view(B, value.shape[1], H, D)
    out = flash_attention(q, k, v, causal=causal, key_padding_mask=padding, backend=self._mmfast_backend)
    return F.linear(out.reshape(B, Lq, E), self.out_proj.weight, self.out_proj.bias), None


# --- visual patch embedding --------------------------------------------------------------------------------

def _visual_blocker(vit):
    if not hasattr(type(vit), "_embeds"):
        return "open_clip < 3.0: no VisionTransformer._embeds to swap"
    why = not_plain(vit, {"conv1": torch.nn.Conv2d})
    if why is not None:
        return why
    conv = vit.conv1
    k = tuple(conv.kernel_size)
    if k[0] != k[1] or tuple(conv.stride) != k or tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1) \
            or conv.groups != 1:
        return "conv1 is not a square stride-P convolution"
    if vit.positional_embedding.dim() != 2:
        return "positional_embedding is not a (N + 1, D) table"
    return None


def _conv_dtype(x):
    """The dtype conv1 returns for x: the autocast dtype when autocast is on for x's device."""
    device = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _visual_embeds(self, x):
    from mmfast.kernels import patch_embed

    why = not_plain(self, {"conv1": torch.nn.Conv2d})
    if why is not None:
        _fallback(self, why)
        return original(self, "_embeds")(x)
    P = self.conv1.kernel_size[0]
    if x.dim() != 4 or (x.shape[-2] // P, x.shape[-1] // P) != tuple(self.grid_size) or x.shape[-2] % P \
            or x.shape[-1] % P:
        _fallback(self, "image size is not the model's")  # open_clip's own error (or its own result)
        return original(self, "_embeds")(x)
    dtype = _conv_dtype(x)
    x = patch_embed(x, self.conv1.weight, self.conv1.bias, pos_embed=self.positional_embedding.to(dtype),
                    cls_token=self.class_embedding.to(dtype), pos_grid=tuple(self.grid_size),
                    backend=self._mmfast_backend)
    x = self.patch_dropout(x)
    return self.ln_pre(x)


# --- losses ------------------------------------------------------------------------------------------------

def _swap_loss(path, loss, options, report, ClipLoss, SigLipLoss):
    kind = type(loss).__name__
    if not options.loss:
        return report.leave(path, f"open_clip {kind}", "loss=False")
    if isinstance(loss, ClipLoss):
        if type(loss).forward is not ClipLoss.forward:
            return report.leave(path, f"open_clip {kind}", "overrides ClipLoss.forward")
        if loss.world_size > 1 and (loss.use_horovod or not (loss.local_loss and loss.gather_with_grad)):
            return report.leave(path, f"open_clip {kind}", "distributed only with local_loss=True, "
                                "gather_with_grad=True and torch.distributed (not horovod)")
        forward, now = _clip_loss_forward, "mmfast contrastive_loss"
    else:
        if type(loss).forward is not SigLipLoss.forward:
            return report.leave(path, f"open_clip {kind}", "overrides SigLipLoss.forward")
        forward, now = _siglip_loss_forward, "mmfast siglip_loss"
    _configure(loss, options, report)
    set_instance_attr(loss, "forward", types.MethodType(forward, loss))
    report.add(path, f"open_clip {kind}", now, "logit_scale taken as exp()'d, as open_clip passes it")


def _group(loss):
    """The default process group when the loss is distributed, else None; a string when it cannot run."""
    if loss.world_size <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return "torch.distributed is not initialized"
    if dist.get_world_size() != loss.world_size or dist.get_rank() != loss.rank:
        return "rank / world_size differ from torch.distributed's"
    return dist.group.WORLD


def _clip_loss_forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
    from mmfast.kernels import contrastive_loss

    group = _group(self)
    if isinstance(group, str):
        _fallback(self, group)
        return original(self)(image_features, text_features, logit_scale, logit_bias=logit_bias,
                              output_dict=output_dict)
    # a bias added to every logit cancels in both softmaxes
    loss = contrastive_loss(image_features, text_features, logit_scale, log_scale=False, max_scale=None,
                            group=group, backend=self._mmfast_backend)
    return {"contrastive_loss": loss} if output_dict else loss


def _siglip_loss_forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
    from mmfast.kernels import siglip_loss

    group = _group(self)
    if isinstance(group, str):
        _fallback(self, group)
        return original(self)(image_features, text_features, logit_scale, logit_bias, output_dict=output_dict)
    loss = siglip_loss(image_features, text_features, logit_scale, 0.0 if logit_bias is None else logit_bias,
                       log_scale=False, max_scale=None, group=group, backend=self._mmfast_backend)
    return {"contrastive_loss": loss} if output_dict else loss


# --- inputs for mmfast.verify ------------------------------------------------------------------------------

def example_inputs(model, *, seed=0, batch=2):
    """Inputs for `mmfast.verify`: images at the tower's size and / or token ids (one row padded after its
    middle), or features, scale (and bias) for the losses."""
    from open_clip.loss import ClipLoss, SigLipLoss

    from .timm import _dtype_device

    g = torch.Generator().manual_seed(seed)
    if isinstance(model, (ClipLoss, SigLipLoss)):
        a, b = (F.normalize(torch.randn(2 * batch, 16, generator=g), dim=-1) for _ in range(2))
        if isinstance(model, SigLipLoss):
            return a, b, torch.tensor(10.0), torch.tensor(-10.0)
        return a, b, torch.tensor(1 / 0.07)
    dtype, device = _dtype_device(model)
    visual = getattr(model, "visual", model if hasattr(model, "conv1") or hasattr(model, "trunk") else None)
    text = getattr(model, "text", model)
    length = getattr(model, "context_length", getattr(text, "context_length", None))
    vocab = getattr(model, "vocab_size", getattr(text, "vocab_size", None))
    inputs = []
    if visual is not None:
        size = getattr(visual, "image_size", None)
        size = (size, size) if isinstance(size, int) else tuple(size or ())
        if len(size) != 2:
            raise ValueError(f"mmfast.verify: cannot tell {type(visual).__name__}'s image size; pass inputs=")
        inputs.append(torch.randn(batch, 3, *size, generator=g).to(device, dtype))
    if length is not None and vocab is not None and (visual is None or hasattr(model, "visual")):
        ids = torch.randint(1, vocab, (batch, length), generator=g)
        ids[0, length // 2 + 1:] = getattr(text, "pad_id", 0)
        inputs.append(ids.to(device))
    if not inputs:
        raise ValueError(f"mmfast.verify: cannot generate inputs for {type(model).__name__}; pass inputs=")
    return tuple(inputs)
