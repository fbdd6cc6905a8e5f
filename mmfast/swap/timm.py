"""timm: ViT attention, patch embedding (+ position / [CLS] / register tokens) and ModelEmaV3 on mmfast kernels.

Every swap is per instance (``_core.set_instance_attr``); the state a swapped method needs (backend, report,
the fusion switch) lives in attributes of the instance too, so ``copy.deepcopy`` of a patched model (as
``ModelEmaV3`` does) gives a copy whose swaps point at the copy.
"""
import types

import torch

from ._core import _SET, foreign_forward, global_forward_hooks, not_plain, original, set_instance_attr

NAME = "timm"

# (timm module, what runs now, when the original runs instead)
TABLE = (
    ("timm.layers.Attention (VisionTransformer blocks)", "mmfast.kernels.flash_attention",
     "fused qkv read in place, q/k norm, gate, scale_norm kept; attn_mask None, is_causal, or a bool key-padding "
     "mask (B, 1, 1, N) run the kernel (a query row whose keys are all masked gets 0 where SDPA gives NaN); "
     "other masks, attention dropout while training, and (fused_attn off) an attn_drop with hooks or of another "
     "class, or a global module forward hook, any of which would see the attention weights timm's manual path "
     "hands attn_drop, call timm's forward (counted as a fallback)"),
    ("timm.layers.PatchEmbed + VisionTransformer._pos_embed", "mmfast.kernels.patch_embed",
     "inside forward_features / forward_intermediates: conv + bias + position table (resampled for "
     "dynamic_img_size, dynamic_img_pad) + [CLS] in one launch, register tokens and no_embed_class handled; "
     "a call where patch_embed has forward hooks (its own or global ones; mmfast.verify's counting hooks "
     "excepted), or the fusion conditions (square stride-P proj, no embed norm, "
     "no instance _pos_embed) fail after patching, runs the conv alone (or timm's) and timm's _pos_embed (counted "
     "as a fallback); PatchEmbed called on its own: conv + bias through the kernel, then timm's norm and output "
     "format"),
    ("timm.utils.ModelEmaV3.apply_update_ / apply_update_no_buffers_", "mmfast.kernels.ema_update_",
     "same-dtype pairs bit-identical to timm's _foreach_lerp_; bf16 EMA tensors with stochastic_rounding stay "
     "on timm's stochastic rounding; foreach off (foreach=False, or an EMA on another device) runs timm's loop, "
     "and a state_dict holding a tensor twice (tied weights, which timm updates once per name) timm's update; "
     "mixed-dtype pairs (dtype=) round once where timm's mul_ + add_ round twice: not bit-identical, no less "
     "accurate"),
)


def _timm_classes():
    from timm.layers import PatchEmbed
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import VisionTransformer
    from timm.utils import ModelEmaV3

    return Attention, PatchEmbed, VisionTransformer, ModelEmaV3


def join(path, name):
    return f"{path}.{name}" if path else name


def _library(obj):
    return type(obj).__module__.split(".")[0]


def claims(model):
    """A timm model or ModelEmaV3, or a user's module holding timm modules (not a transformers / open_clip model:
    those integrations patch their timm parts themselves)."""
    root = _library(model)
    if root == "timm":
        return True
    if root in ("transformers", "open_clip"):
        return False
    libraries = {_library(m) for m in model.modules()}
    return "timm" in libraries and "open_clip" not in libraries  # open_clip's integration handles its timm towers


def patch(model, options, state):
    _, _, _, ModelEmaV3 = _timm_classes()
    if isinstance(model, ModelEmaV3):
        if options.ema:
            _swap_ema(model, options, state.report)
        else:
            state.report.leave("", "timm ModelEmaV3", "ema=False")
        swap_modules(model.module, "module.", options, state.report)
    else:
        swap_modules(model, "", options, state.report)
    if not state.report.swapped:
        state.report.message = f"{state.report.model}: no timm module of the swap table ({NAME}.TABLE) was found"


def swap_modules(root, prefix, options, report):
    """Swap every timm Attention / PatchEmbed / VisionTransformer embedding under `root` (paths get `prefix`)."""
    Attention, PatchEmbed, VisionTransformer, _ = _timm_classes()
    fused_embeds = set()
    for path, module in root.named_modules():
        if isinstance(module, VisionTransformer) and options.patch_embed:
            why = _embed_fusion_blocker(module, PatchEmbed, VisionTransformer)
            if why is None:
                _swap_vit_embed(module, options, report)
                fused_embeds.add(id(module.patch_embed))
                report.add(prefix + join(path, "patch_embed"), "timm PatchEmbed + _pos_embed",
                           "mmfast patch_embed", "conv, positions, prefix tokens in one launch")
            else:
                report.leave(prefix + join(path, "_pos_embed"), "timm _pos_embed", why)
    for path, module in root.named_modules():
        full = prefix + path
        if isinstance(module, Attention) and type(module).forward is Attention.forward:
            unknown = set(module._modules) - _ATTENTION_PARTS
            if unknown:  # a timm release that added a feature this swap does not reproduce
                report.leave(full, "timm Attention", f"unknown parts {sorted(unknown)}")
            elif foreign_forward(module):
                report.leave(full, "timm Attention", foreign_forward(module))
            elif options.attention:
                _configure(module, options, report)
                set_instance_attr(module, "forward", types.MethodType(_attention_forward, module))
                report.add(full, "timm Attention (SDPA)", "mmfast flash_attention")
            else:
                report.leave(full, "timm Attention", "attention=False")
        elif isinstance(module, PatchEmbed):
            why = _patch_embed_blocker(module, PatchEmbed) if options.patch_embed else "patch_embed=False"
            why = why or foreign_forward(module)
            if why is None:
                _configure(module, options, report)
                set_instance_attr(module, "forward", types.MethodType(_patch_embed_forward, module))
                if id(module) not in fused_embeds:
                    report.add(full, "timm PatchEmbed (conv)", "mmfast patch_embed")
            else:
                report.leave(full, f"timm {type(module).__name__}", why)
        elif _library(module) == "timm" and "Attention" in type(module).__name__:
            report.leave(full, f"timm {type(module).__name__}", "not in the swap table (its own attention code)")


_ATTENTION_PARTS = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"}


def _configure(module, options, report):
    set_instance_attr(module, "_mmfast_backend", options.backend)
    set_instance_attr(module, "_mmfast_report", report)


def _fallback(module, reason):
    module._mmfast_report.count_fallback(f"{type(module).__name__}: {reason}")


# --- attention ---------------------------------------------------------------------------------------------

def _attention_blocker(module, x, attn_mask, is_causal):
    if x.dim() != 3:
        return "input is not (B, N, C)"
    if not getattr(module, "fused_attn", True):  # timm's manual path hands the attention weights to attn_drop
        why = not_plain(module, {"attn_drop": torch.nn.Dropout})
        if why is not None:  # a hook capturing attention maps, or a module editing them
            return f"fused_attn off and {why}"
        if global_forward_hooks():  # one would see attn_drop's input, the attention weights, on timm's path
            return "fused_attn off and a global module forward hook"
    if module.training and module.attn_drop.p > 0:
        return "attention dropout while training"
    if attn_mask is None:
        return None
    if is_causal:
        return "attn_mask together with is_causal"
    B, N = x.shape[0], x.shape[1]
    # only (B, 1, 1, N) broadcasts over heads and queries as a key mask (SDPA aligns shapes from the right)
    if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (B, 1, 1, N):
        return f"attn_mask {attn_mask.dtype} {tuple(attn_mask.shape)} is not a bool key-padding mask (B, 1, 1, N)"
    return None


def _attention_forward(self, x, attn_mask=None, is_causal=False):
    """timm Attention.forward with SDPA replaced by flash_attention on (B, N, H, D) views of the fused qkv."""
    from mmfast.kernels import flash_attention

    why = _attention_blocker(self, x, attn_mask, is_causal)
    if why is not None:
        _fallback(self, why)
        return original(self)(x, attn_mask=attn_mask, is_causal=is_causal)
    B, N, _ = x.shape
    gate = getattr(self, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
    q, k = self.q_norm(q), self.k_norm(k)  # both norms act on the head dim, the last in either layout
    # timm / SDPA: True = may attend; flash_attention: True = padded key
    padding = None if attn_mask is None else ~attn_mask.reshape(B, N)
    # SDPA (fused_attn) takes its default 1/sqrt(head_dim) and ignores self.scale; timm's manual path uses it
    scale = self.head_dim ** -0.5 if getattr(self, "fused_attn", False) else self.scale
    x = flash_attention(q, k, v, causal=bool(is_causal), softmax_scale=scale, key_padding_mask=padding,
                        backend=self._mmfast_backend)
    x = x.reshape(B, N, self.num_heads * self.head_dim)
    x = getattr(self, "norm", torch.nn.Identity())(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


# --- patch embedding ---------------------------------------------------------------------------------------

def _patch_embed_blocker(module, PatchEmbed):
    if type(module).forward is not PatchEmbed.forward:
        return f"{type(module).__name__} overrides forward"
    return _conv_blocker(module)


def _conv_blocker(pe):
    """At patch time and at every call: proj may be replaced or set_input_size called after the swap."""
    why = not_plain(pe, {"proj": torch.nn.Conv2d})
    if why is not None:
        return why
    proj = pe.proj
    k = tuple(proj.kernel_size)
    if k[0] != k[1] or tuple(proj.stride) != k or tuple(proj.padding) != (0, 0) or tuple(proj.dilation) != (1, 1) \
            or proj.groups != 1 or k != tuple(pe.patch_size):
        return (f"proj is not a square stride-P conv of the patch size {tuple(pe.patch_size)} (kernel {k}, "
                f"stride {tuple(proj.stride)}, padding {tuple(proj.padding)})")
    return None


def _embed_fusion_blocker(vit, PatchEmbed, VisionTransformer):
    cls = type(vit)
    ours = vit.__dict__.get(_SET, {})
    for name in ("_pos_embed", "forward_features", "forward_intermediates"):
        if getattr(cls, name) is not getattr(VisionTransformer, name):
            return f"{cls.__name__} overrides {name}"
        if name in vit.__dict__ and vit.__dict__[name] is not ours.get(name):
            return f"{name} is replaced on the instance"
    pe = vit.patch_embed
    if not isinstance(pe, PatchEmbed):
        return f"patch_embed is {type(pe).__name__}"
    why = _patch_embed_blocker(pe, PatchEmbed)
    if why is not None:
        return why
    if not isinstance(pe.norm, torch.nn.Identity):
        return "PatchEmbed has a norm before the position embedding"
    if vit.dynamic_img_size != (pe.output_fmt.value == "NHWC" and not pe.flatten):
        return "unexpected PatchEmbed output format"
    if not vit.dynamic_img_size and not pe.flatten:
        return "PatchEmbed does not flatten"
    return None


def _swap_vit_embed(vit, options, report):
    switch = _Fusion()
    _configure(vit, options, report)
    set_instance_attr(vit, "_mmfast_fusion", switch)
    set_instance_attr(vit.patch_embed, "_mmfast_fusion", switch)
    set_instance_attr(vit.patch_embed, "_mmfast_vit", vit)  # not registered: no module cycle
    for name in ("forward_features", "forward_intermediates"):
        set_instance_attr(vit, name, types.MethodType(_fusing(name), vit))
    set_instance_attr(vit, "_pos_embed", types.MethodType(_pos_embed, vit))


class _Fusion:
    """While a ViT's forward_features runs, its patch_embed returns the finished tokens and _pos_embed only
    applies pos_drop. Outside (patch_embed called on its own) both keep timm's meaning."""

    def __init__(self):
        self.depth = 0
        self.tokens = None


def _fusing(name):
    def run(self, *args, **kwargs):
        switch = self._mmfast_fusion
        switch.depth += 1
        try:
            return original(self, name)(*args, **kwargs)
        finally:
            switch.depth -= 1
            switch.tokens = None
    run.__name__ = name
    return run


def _pos_embed(self, x):
    switch = self._mmfast_fusion
    if switch.tokens is not None and x is switch.tokens:
        switch.tokens = None
        return x if self.pos_embed is None else self.pos_drop(x)  # timm skips pos_drop without a table
    return original(self, "_pos_embed")(x)


def _grid(pe, H, W):
    P = pe.patch_size[0]
    if pe.dynamic_img_pad:
        return -(-H // P), -(-W // P)
    return H // P, W // P


def _patch_embed_blocker_at(pe, images):
    if images.dim() != 4:
        return "images are not (B, C, H, W)"
    why = _conv_blocker(pe)
    if why is not None:
        return why
    H, W = images.shape[-2:]
    P = pe.patch_size[0]
    if pe.img_size is not None and pe.strict_img_size and (H, W) != tuple(pe.img_size):
        return "image size differs from img_size with strict_img_size"  # timm's forward raises the error
    if not pe.dynamic_img_pad and (H % P or W % P):
        return "image size not divisible by the patch size"
    return None


def _output_hooks(pe):
    """Why the fused tokens must not be patch_embed's output for this call, or None: a forward hook there would see
    (or replace) [prefix; patches + positions] where timm gives it the bare patches."""
    if pe._forward_hooks or global_forward_hooks():
        return "forward hooks on patch_embed (position embedding not fused for this call)"
    return None


def _patch_embed_forward(self, x):
    from mmfast.kernels import patch_embed

    why = _patch_embed_blocker_at(self, x)
    if why is not None:
        _fallback(self, why)
        return original(self)(x)
    switch = self.__dict__.get("_mmfast_fusion")
    if switch is not None and switch.depth:
        hooked = _output_hooks(self) or _embed_fusion_blocker(self._mmfast_vit, *_timm_classes()[1:3])
        if hooked is None:
            switch.tokens = _vit_tokens(self._mmfast_vit, x)
            return switch.tokens
        _fallback(self, hooked)  # the conv below still runs the kernel; timm's _pos_embed adds the rest
    B = x.shape[0]
    gh, gw = _grid(self, *x.shape[-2:])
    tokens = patch_embed(x, self.proj.weight, self.proj.bias, dynamic_pad=self.dynamic_img_pad,
                         backend=self._mmfast_backend)
    if self.flatten:
        out = tokens
    elif self.output_fmt.value == "NHWC":
        out = tokens.view(B, gh, gw, -1)
    elif self.output_fmt.value == "NCHW":
        out = tokens.transpose(1, 2).reshape(B, -1, gh, gw)
    else:
        from timm.layers.format import nchw_to

        out = nchw_to(tokens.transpose(1, 2).reshape(B, -1, gh, gw), self.output_fmt)
    return self.norm(out)


def _vit_tokens(vit, images):
    """What timm's patch_embed then _pos_embed produce: [prefix tokens; patches] with positions."""
    from mmfast.kernels import patch_embed

    pe = vit.patch_embed
    prefix = vit.num_prefix_tokens
    table = vit.pos_embed
    kw = {}
    prefix_pos = None
    if table is not None:
        rows = table[0]
        kw["pos_grid"] = tuple(pe.grid_size)
        kw["pos_resample"] = "timm"
        if not vit.no_embed_class:
            prefix_pos, rows = rows[:prefix], rows[prefix:]
        kw["pos_embed"] = rows
    single_cls = vit.cls_token is not None and vit.reg_token is None
    if single_cls:
        kw["cls_token"] = vit.cls_token.reshape(-1)
        if prefix_pos is not None:
            kw["pos_embed"] = table[0]  # the kernel adds the [CLS] row of the table to the [CLS] token
            prefix_pos = None
    tokens = patch_embed(images, pe.proj.weight, pe.proj.bias, dynamic_pad=pe.dynamic_img_pad,
                         backend=vit._mmfast_backend, **kw)
    if single_cls or prefix == 0:
        return tokens
    extra = [t for t in (vit.cls_token, vit.reg_token) if t is not None]
    head = torch.cat(extra, dim=1)
    if prefix_pos is not None:
        head = head + prefix_pos
    dtype = torch.promote_types(head.dtype, tokens.dtype)  # torch.cat's promotion, as timm's _pos_embed
    return torch.cat([head.expand(images.shape[0], -1, -1).to(dtype), tokens.to(dtype)], dim=1)


# --- ModelEmaV3 --------------------------------------------------------------------------------------------

def _swap_ema(ema, options, report):
    _configure(ema, options, report)
    set_instance_attr(ema, "apply_update_", types.MethodType(_ema_apply_update_, ema))
    set_instance_attr(ema, "apply_update_no_buffers_", types.MethodType(_ema_apply_update_no_buffers_, ema))
    report.add("", "timm ModelEmaV3 foreach lerp", "mmfast ema_update_")


def _ema_lerp(ema, ema_values, model_values, decay):
    from mmfast.kernels import ema_update_

    stochastic = getattr(ema, "stochastic_rounding", False)  # timm >= 1.0.2x
    rounded = [i for i, e in enumerate(ema_values) if stochastic and e.dtype == torch.bfloat16]
    if rounded:  # timm's stochastic rounding has no mmfast counterpart; it keeps its own RNG stream
        ema._foreach_lerp_([ema_values[i] for i in rounded], [model_values[i] for i in rounded], weight=1. - decay)
        keep = sorted(set(range(len(ema_values))) - set(rounded))
        ema_values, model_values = [ema_values[i] for i in keep], [model_values[i] for i in keep]
    if ema_values:
        ema_update_(ema_values, model_values, float(decay), backend=ema._mmfast_backend)


_FOREACH_OFF = "foreach off (foreach=False, or the EMA on another device than the model)"


@torch.no_grad()
def _ema_apply_update_(self, model, decay):
    if not self.foreach:
        _fallback(self, _FOREACH_OFF)
        return original(self, "apply_update_")(model, decay)
    ema_state = self.module.state_dict()
    addresses = [v.data_ptr() for v in ema_state.values() if v.numel()]
    if len(set(addresses)) != len(addresses):
        # tied weights appear once per name; timm's foreach lerp updates them once per name, ema_update_ refuses
        _fallback(self, "a tensor listed twice in the EMA's state_dict (tied weights)")
        return original(self, "apply_update_")(model, decay)
    emas, sources = [], []
    for ema_v, model_v in zip(ema_state.values(), model.state_dict().values()):
        if ema_v.is_floating_point():
            emas.append(ema_v)
            sources.append(model_v)
        else:
            ema_v.copy_(model_v)
    _ema_lerp(self, emas, sources, decay)


@torch.no_grad()
def _ema_apply_update_no_buffers_(self, model, decay):
    if not self.foreach:
        _fallback(self, _FOREACH_OFF)
        return original(self, "apply_update_no_buffers_")(model, decay)
    _ema_lerp(self, list(self.module.parameters()), list(model.parameters()), decay)
    for ema_b, model_b in zip(self.module.buffers(), model.buffers()):
        ema_b.copy_(model_b.to(device=self.device))


# --- inputs for mmfast.verify ------------------------------------------------------------------------------

def _dtype_device(model):
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))


def example_inputs(model, *, seed=0, batch=2):
    """(images,) at the model's input size, in its dtype and on its device, for `mmfast.verify`."""
    _, PatchEmbed, _, ModelEmaV3 = _timm_classes()
    net = model.module if isinstance(model, ModelEmaV3) else model
    embed = next((m for m in net.modules() if isinstance(m, PatchEmbed)), None)
    if embed is not None and embed.img_size is not None:
        shape = (embed.proj.in_channels, *embed.img_size)
    else:
        shape = tuple((getattr(net, "pretrained_cfg", None) or {}).get("input_size", ()))
    if len(shape) != 3:
        raise ValueError(f"mmfast.verify: cannot tell {type(net).__name__}'s input size; pass inputs=")
    dtype, device = _dtype_device(net)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *shape, generator=g).to(device, dtype),)
