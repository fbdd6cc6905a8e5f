"""ViT on mmfast's kernels: fused patch embedding (positions resampled in the kernel's epilogue, masked
patches) + pre-norm encoder layers over flash_attention. Converts from / to Hugging Face ``ViTModel`` and
from timm's ``VisionTransformer``."""
import torch
from torch import nn
from torch.nn import functional as F

from mmfast.hf_compat import hf_tower, hf_vit_layers
from mmfast.kernels import patch_embed
from mmfast.kernels._common import check_bool, check_choice, check_int, check_scalar
from mmfast.kernels.patch_embed import INTERPOLATIONS, POS_RESAMPLE_MODES, vit_masked_patch_sampler
from mmfast.nn.patch_embed import PatchEmbed
from mmfast.nn.transformer import ACTIVATIONS, AttentionPool, TransformerEncoder

from ._common import (BaseModelOutputWithPooling, MaskedPatchOutput, check_output_attentions, copy_weights, hf_return,
                      layer_pairs, module_pairs)

_OP = "ViT"
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu",
                  "relu": "relu"}


def hf_activation(name, owner):
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"{owner}: hidden_act {name!r} is not supported (one of {sorted(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[name]


def mean_colour_bins(pixel_values, patch_size, *, bits=3, value_range=(0.0, 1.0)):
    """The ViT paper's masked-patch target: each patch's mean colour, each channel quantised to `bits`
    bits over `value_range` -> one class id in [0, 2^(bits*C)) per patch, (B, N) int64."""
    check_int("mean_colour_bins", "patch_size", patch_size, lo=1)
    check_int("mean_colour_bins", "bits", bits, lo=1, hi=8)
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"mean_colour_bins: value_range must be (lo, hi) with hi > lo, got {value_range}")
    levels = 2 ** bits
    mean = F.avg_pool2d(pixel_values.detach().float(), patch_size)  # (B, C, gh, gw)
    q = ((mean - lo) / (hi - lo) * levels).floor().clamp_(0, levels - 1).long()
    weights = levels ** torch.arange(q.shape[1] - 1, -1, -1, device=q.device)  # first channel most significant
    return (q * weights[None, :, None, None]).sum(1).flatten(1)


class ViT(nn.Module):
    """Vision Transformer: patch embedding (+ [CLS], 1D or 2D learned positions), pre-norm encoder, readout.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads: the usual sizes.
        mlp_dim: MLP hidden width (default 4 * embed_dim); act: one of ``ACTIVATIONS``.
        qkv_bias, patch_bias: biases of the qkv projection and the patch convolution (CLIP has none).
        norm_eps: every LayerNorm's epsilon.
        class_token: prepend [CLS]. global_pool: "token" ([CLS]), "avg" (mean of the patch tokens),
            "map" (attention pooling, SigLIP) or "none".
        pos_embed: "learn" (1D table of N [+ 1] rows), "learn_2d" (row and column tables of D/2 each,
            concatenated; [CLS] gets none) or "none". no_embed_class: the 1D table covers only patches.
        reg_tokens: register tokens (Darcet et al.; timm's ``reg_tokens``): learned tokens placed after [CLS]
            and before the patches, as timm's ``_pos_embed``. With a 1D table and not no_embed_class they
            have position rows too (``reg_pos_embed``, kept apart from the patch table so the kernel
            resamples only the patch rows; timm's table is [CLS row, register rows, patch rows]).
        init_values: LayerScale on both residual branches of every layer, gamma initialised to it (timm's
            ``init_values``); None: no layer scale.
        qk_norm: LayerNorm q and k per head (eps `norm_eps`, as timm's Block).
        pre_norm: LayerNorm before the encoder (CLIP's ``pre_layrnorm``).
        final_norm: "all" (norm every token: HF ViT, timm), "pooled" (norm only the readout: CLIP's
            ``post_layernorm``, timm's ``fc_norm``) or "none".
        pooler: None or "tanh" (HF ViTPooler: dense + tanh on the readout).
        num_classes: a linear head on the readout giving ``logits`` (0: none).
        mask_token: hold a [MASK] token (``bool_masked_pos``); mpp_bits: add the masked-patch prediction
            head over 2^(3*bits) mean-colour classes (ViT paper: 3), see `masked_patch_prediction`.
        backbone, backbone_channels, backbone_stride: hybrid ViT: `backbone` maps images to a
            (B, backbone_channels, H/stride, W/stride) feature map whose cells (patch_size 1 by default)
            are the tokens.
        dynamic_img_size: resample the position table for any input size (timm); otherwise only with
            ``interpolate_pos_encoding=True`` (Hugging Face).
        pos_resample, interpolation: how the table is resampled ("timm" / "hf" / "hf_legacy").
        backend: forwarded to patch_embed and flash_attention ("auto" | "triton" | "reference").
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, *,
                 mlp_dim=None, act="gelu", qkv_bias=True, patch_bias=True, norm_eps=1e-6, class_token=True,
                 global_pool="token", pos_embed="learn", no_embed_class=False, pre_norm=False, final_norm="all",
                 pooler=None, num_classes=0, mask_token=False, mpp_bits=None, backbone=None, backbone_channels=None,
                 backbone_stride=None, dynamic_img_size=False, pos_resample="timm", interpolation="bicubic",
                 reg_tokens=0, init_values=None, qk_norm=False, backend="auto"):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("in_chans", in_chans)):
            check_int(_OP, name, value, lo=1)
        check_int(_OP, "depth", depth, lo=0)
        check_int(_OP, "num_classes", num_classes, lo=0)
        check_int(_OP, "reg_tokens", reg_tokens, lo=0)
        if init_values is not None:
            check_scalar(_OP, "init_values", init_values)
        check_choice(_OP, "act", act, ACTIVATIONS)
        check_choice(_OP, "global_pool", global_pool, ("token", "avg", "map", "none"))
        check_choice(_OP, "pos_embed", pos_embed, ("learn", "learn_2d", "none"))
        check_choice(_OP, "final_norm", final_norm, ("all", "pooled", "none"))
        check_choice(_OP, "pooler", pooler, (None, "tanh"))
        check_choice(_OP, "pos_resample", pos_resample, POS_RESAMPLE_MODES)
        check_choice(_OP, "interpolation", interpolation, INTERPOLATIONS)
        check_choice(_OP, "backend", backend, ("auto", "triton", "reference"))
        check_scalar(_OP, "norm_eps", norm_eps, lo=0.0, lo_open=True)
        for name, value in (("qkv_bias", qkv_bias), ("patch_bias", patch_bias), ("class_token", class_token),
                            ("no_embed_class", no_embed_class), ("pre_norm", pre_norm), ("mask_token", mask_token),
                            ("dynamic_img_size", dynamic_img_size), ("qk_norm", qk_norm)):
            check_bool(_OP, name, value)
        if global_pool == "token" and not class_token:
            raise ValueError(f"{_OP}: global_pool='token' needs class_token=True")
        if mpp_bits is not None:
            check_int(_OP, "mpp_bits", mpp_bits, lo=1, hi=4)
            if backbone is not None:
                raise ValueError(f"{_OP}: the masked-patch head predicts pixel colours; it has no hybrid form")
            mask_token = True
        if backbone is not None:
            if not isinstance(backbone, nn.Module):
                raise ValueError(f"{_OP}: backbone must be an nn.Module, got {type(backbone).__name__}")
            check_int(_OP, "backbone_channels", backbone_channels, lo=1)
            check_int(_OP, "backbone_stride", backbone_stride, lo=1)
            if img_size % backbone_stride:
                raise ValueError(f"{_OP}: img_size {img_size} must be a multiple of backbone_stride {backbone_stride}")
        self.backbone = backbone
        self.backbone_stride = backbone_stride
        grid_img = img_size // backbone_stride if backbone is not None else img_size
        self.patch_embed = PatchEmbed(grid_img, patch_size, backbone_channels if backbone is not None else in_chans,
                                      embed_dim, bias=patch_bias, class_token=class_token,
                                      pos_embed="learn" if pos_embed == "learn" else "none",
                                      no_embed_class=no_embed_class, mask_token=mask_token, dynamic_img_size=True,
                                      interpolation=interpolation, pos_resample=pos_resample, backend=backend)
        gh, gw = self.patch_embed.grid_size
        self.reg_token = nn.Parameter(torch.randn(1, reg_tokens, embed_dim) * 1e-6) if reg_tokens else None
        self.reg_pos_embed = (nn.Parameter(torch.randn(1, reg_tokens, embed_dim) * 0.02)
                              if reg_tokens and pos_embed == "learn" and not no_embed_class else None)
        if pos_embed == "learn_2d":
            self.pos_embed_row = nn.Parameter(torch.randn(gh, embed_dim // 2) * 0.02)
            self.pos_embed_col = nn.Parameter(torch.randn(gw, embed_dim - embed_dim // 2) * 0.02)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else None
        self.encoder = TransformerEncoder(embed_dim, depth, num_heads, mlp_dim=mlp_dim, act=act, qkv_bias=qkv_bias,
                                          norm_eps=norm_eps, init_values=init_values, qk_norm=qk_norm,
                                          backend=backend)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm != "none" else None
        self.attn_pool = (AttentionPool(embed_dim, num_heads, mlp_dim=mlp_dim, act=act, norm_eps=norm_eps,
                                        backend=backend) if global_pool == "map" else None)
        self.pooler = nn.Linear(embed_dim, embed_dim) if pooler else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else None
        self.mpp_head = nn.Linear(embed_dim, 2 ** (3 * mpp_bits)) if mpp_bits else None
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.num_heads, self.depth = num_heads, depth
        self.pos_embed_kind, self.global_pool, self.final_norm = pos_embed, global_pool, final_norm
        self.dynamic_img_size, self.mpp_bits, self.backend = dynamic_img_size, mpp_bits, backend

    @property
    def num_prefix_tokens(self):
        return self.patch_embed.num_prefix_tokens + (0 if self.reg_token is None else self.reg_token.shape[1])

    def embed(self, pixel_values, *, bool_masked_pos=None, patch_index=None, interpolate_pos_encoding=None):
        """Tokens (B, [1 +] [R +] N, D): one patch_embed launch (conv + bias + positions + [CLS] + [MASK]),
        then the R register tokens inserted after [CLS] (a copy of the sequence; models without registers
        skip it)."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"{_OP}: pixel_values must be a (B, C, H, W) tensor")
        size = tuple(pixel_values.shape[-2:])
        if not (interpolate_pos_encoding or self.dynamic_img_size) and size != (self.img_size, self.img_size):
            raise ValueError(f"{_OP}: input image size {size} doesn't match the model's ({self.img_size}, "
                             f"{self.img_size}); pass interpolate_pos_encoding=True to resample the positions")
        x = pixel_values.to(self.patch_embed.proj.weight.dtype)
        if self.backbone is not None:
            x = self.backbone(x)
            x = x[-1] if isinstance(x, (list, tuple)) else x  # timm's HybridEmbed: the last feature map
        pe = self.patch_embed
        if self.pos_embed_kind == "learn_2d":
            pos, pos_grid = (self.pos_embed_row, self.pos_embed_col), None
        else:
            pos, pos_grid = pe.pos_embed, pe.grid_size if pe.pos_embed is not None else None
        mask_token = None
        if bool_masked_pos is not None:
            if pe.mask_token is None:
                raise ValueError(f"{_OP}: bool_masked_pos needs a mask token (construct with mask_token=True)")
            mask_token = pe.mask_token
        x = patch_embed(x, pe.proj.weight, pe.proj.bias, pos_embed=pos, cls_token=pe.cls_token, pos_grid=pos_grid,
                        interpolation=pe.interpolation, pos_resample=pe.pos_resample, token_mask=bool_masked_pos,
                        mask_token=mask_token, patch_index=patch_index, backend=self.backend)
        if self.reg_token is None:
            return x
        reg = self.reg_token if self.reg_pos_embed is None else self.reg_token + self.reg_pos_embed
        c = pe.num_prefix_tokens
        return torch.cat([x[:, :c], reg.to(x.dtype).expand(x.shape[0], -1, -1), x[:, c:]], dim=1)

    def pool(self, x):
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(1)
        if self.global_pool == "map":
            return self.attn_pool(x)
        return None

    def forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None, attention_mask=None, *,
                patch_index=None, output_hidden_states=None, output_attentions=None, return_dict=None):
        """HF ViTModel's inputs. Returns ``last_hidden_state`` (after the final norm when final_norm="all"),
        ``pooler_output`` (the readout: normed when final_norm="pooled", through the tanh pooler when there
        is one; HF's ViTModel without a pooler returns None there, we return the readout),
        ``hidden_states`` when asked (HF's tuple: the encoder's input first — after norm_pre — then each
        layer's output, before the final norm), and ``logits`` of the head when it exists.
        ``attention_mask`` (B, tokens), 1 = attend, 0 = masked key (HF ViTModel's, over [CLS] + patches).
        ``return_dict=False``: the tuple of the set fields, as HF. ``output_attentions=True`` raises
        ValueError (flash_attention forms no probabilities; see check_output_attentions)."""
        check_output_attentions(_OP, output_attentions)
        x = self.embed(pixel_values, bool_masked_pos=bool_masked_pos, patch_index=patch_index,
                       interpolate_pos_encoding=interpolate_pos_encoding)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        pad = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"{_OP}: attention_mask must be (batch, tokens) = {tuple(x.shape[:2])}, got "
                                 f"{tuple(attention_mask.shape)}")
            pad = attention_mask == 0
        x = self.encoder(x, key_padding_mask=pad, output_hidden_states=output_hidden_states)
        states = None
        if output_hidden_states:
            x, states = x
            states = tuple(states)
        if self.final_norm == "all":
            x = self.norm(x)
        pooled = self.pool(x)
        if pooled is not None and self.final_norm == "pooled":
            pooled = self.norm(pooled)
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(pooled))
        logits = self.head(pooled) if self.head is not None else None
        out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=states, logits=logits)
        return hf_return(out, return_dict)

    def masked_patch_prediction(self, pixel_values, *, generator=None, mask_ratio=0.5, value_range=(0.0, 1.0)):
        """The ViT paper's self-supervised objective: corrupt mask_ratio of the patches (80% [MASK], 10%
        another patch of the image, 10% unchanged; drawn afresh per call, see vit_masked_patch_sampler)
        through patch_embed's masking, and predict each chosen patch's 3-bit mean colour (512 classes for
        3 channels) with cross-entropy. `value_range`: the pixel range the bins cover."""
        if self.mpp_head is None:
            raise ValueError(f"{_OP}: construct with mpp_bits=3 to add the masked-patch prediction head")
        if pixel_values.shape[1] != 3:
            raise ValueError(f"{_OP}: masked-patch prediction bins RGB colours; got {pixel_values.shape[1]} channels")
        B, _, H, W = pixel_values.shape
        P = self.patch_size
        token_mask, patch_index, target_mask = vit_masked_patch_sampler(
            B, (H // P) * (W // P), mask_ratio=mask_ratio, generator=generator, device=pixel_values.device)
        hidden = self(pixel_values, bool_masked_pos=token_mask, patch_index=patch_index,
                      interpolate_pos_encoding=True).last_hidden_state
        logits = self.mpp_head(hidden[:, self.num_prefix_tokens:])
        target = mean_colour_bins(pixel_values, P, bits=self.mpp_bits, value_range=value_range)
        loss = F.cross_entropy(logits[target_mask].float(), target[target_mask])
        return MaskedPatchOutput(loss=loss, logits=logits, target=target, target_mask=target_mask)

    # ---- conversion -------------------------------------------------------------------------------------
    def _hf_pairs(self, vit, classifier):
        e = vit.embeddings
        pe = self.patch_embed
        pairs = [("cls_token", pe.cls_token, e.cls_token), ("position_embeddings", pe.pos_embed, e.position_embeddings),
                 ("projection.weight", pe.proj.weight, e.patch_embeddings.projection.weight),
                 ("projection.bias", pe.proj.bias, e.patch_embeddings.projection.bias),
                 ("mask_token", pe.mask_token, e.mask_token),
                 ("layernorm.weight", self.norm.weight, vit.layernorm.weight),
                 ("layernorm.bias", self.norm.bias, vit.layernorm.bias)]
        if vit.pooler is not None:
            pairs += [("pooler.weight", self.pooler.weight, vit.pooler.dense.weight),
                      ("pooler.bias", self.pooler.bias, vit.pooler.dense.bias)]
        if classifier is not None:
            pairs += [("classifier.weight", self.head.weight, classifier.weight),
                      ("classifier.bias", self.head.bias, classifier.bias)]
        return pairs + layer_pairs(self.encoder, *hf_vit_layers(vit))

    @classmethod
    def from_hf(cls, hf_model, *, backend="auto"):
        """From a transformers ``ViTModel`` or ``ViTForImageClassification`` (weights copied; no download), or
        a ``CLIPVisionModel`` / ``SiglipVisionModel`` (see clip.vision_from_hf).
        Positions are resampled with HF's math (``pos_resample="hf"``) under ``interpolate_pos_encoding``."""
        hf_model = hf_tower(hf_model, "vision_model")
        if hasattr(hf_model, "post_layernorm"):  # CLIPVisionModel / SiglipVisionModel: CLIP's tower layout
            from .clip import vision_from_hf

            model, pairs = vision_from_hf(hf_model, backend)
            copy_weights(pairs, "ViT.from_hf")
            return model
        vit, classifier = (hf_model.vit, hf_model.classifier) if hasattr(hf_model, "vit") else (hf_model, None)
        if not hasattr(vit, "embeddings") or hf_vit_layers(vit) is None:
            raise ValueError(f"ViT.from_hf expects a transformers ViTModel / ViTForImageClassification, got "
                             f"{type(hf_model).__name__}")
        c = vit.config
        if isinstance(classifier, nn.Identity):
            classifier = None
        model = cls(c.image_size, c.patch_size, c.num_channels, c.hidden_size, c.num_hidden_layers,
                    c.num_attention_heads, mlp_dim=c.intermediate_size, act=hf_activation(c.hidden_act, "ViT.from_hf"),
                    qkv_bias=c.qkv_bias, norm_eps=c.layer_norm_eps, pooler="tanh" if vit.pooler is not None else None,
                    num_classes=classifier.out_features if classifier is not None else 0,
                    mask_token=vit.embeddings.mask_token is not None, pos_resample="hf", backend=backend)
        if vit.pooler is not None and getattr(c, "pooler_act", "tanh") != "tanh":
            raise ValueError(f"ViT.from_hf: pooler_act {c.pooler_act!r} is not supported (tanh)")
        model = model.to(dtype=vit.embeddings.cls_token.dtype, device=vit.embeddings.cls_token.device)
        copy_weights(model._hf_pairs(vit, classifier), "ViT.from_hf")
        return model

    def to_hf(self):
        """A transformers ``ViTModel`` with these weights (the HF layout: [CLS], 1D table, final norm on
        every token, biased patch conv; the tanh pooler when this model has one)."""
        from transformers import ViTConfig, ViTModel

        if (self.pos_embed_kind != "learn" or self.patch_embed.cls_token is None or self.final_norm != "all"
                or self.norm_pre is not None or self.backbone is not None or self.patch_embed.proj.bias is None
                or self.patch_embed.no_embed_class or self.global_pool != "token" or self.reg_token is not None
                or (self.depth and (self.encoder.layers[0].ls1 is not None
                                    or self.encoder.layers[0].attn.q_norm is not None))):
            raise ValueError("ViT.to_hf: only the HF layout converts ([CLS] readout, 1D table with a [CLS] row, final "
                             "norm on every token, no pre-norm, no backbone, biased patch conv, no registers / "
                             "layer scale / qk_norm)")
        act = {v: k for k, v in HF_ACTIVATIONS.items() if k != "gelu_new"}[self.encoder.layers[0].mlp.act] \
            if self.depth else "gelu"
        layer = self.encoder.layers[0] if self.depth else None
        config = ViTConfig(hidden_size=self.embed_dim, num_hidden_layers=self.depth, num_attention_heads=self.num_heads,
                           intermediate_size=layer.mlp.fc1.out_features if layer else 4 * self.embed_dim,
                           hidden_act=act, layer_norm_eps=self.norm.eps, image_size=self.img_size,
                           patch_size=self.patch_size, num_channels=self.patch_embed.proj.in_channels,
                           qkv_bias=layer.attn.qkv.bias is not None if layer else True)
        hf = ViTModel(config, add_pooling_layer=self.pooler is not None,
                      use_mask_token=self.patch_embed.mask_token is not None)
        hf = hf.to(dtype=self.patch_embed.proj.weight.dtype, device=self.patch_embed.proj.weight.device)
        copy_weights([(n, theirs, ours) for n, ours, theirs in self._hf_pairs(hf, None)], "ViT.to_hf")
        return hf.eval()

    _TIMM_LAYER = {"qkv": "attn.qkv", "out": "attn.proj", "norm1": "norm1", "norm2": "norm2", "fc1": "mlp.fc1",
                   "fc2": "mlp.fc2"}

    @classmethod
    def from_timm(cls, vt, *, backend="auto"):
        """From a timm ``VisionTransformer`` (weights copied; hybrid models share the backbone module).
        Supported: [CLS] or not, register tokens, token / avg pooling, norm / fc_norm, norm_pre,
        no_embed_class, dynamic_img_size, layer scale (init_values), qk_norm (LayerNorm), any head. Not
        supported (ValueError): attention-pool heads, scale_attn_norm / scale_mlp_norm, other norm layers;
        patch dropout at train time is ignored."""
        import timm.layers

        owner = "ViT.from_timm"
        if not hasattr(vt, "blocks") or not hasattr(vt, "patch_embed"):
            raise ValueError(f"{owner} expects a timm VisionTransformer, got {type(vt).__name__}")
        if vt.global_pool not in ("token", "avg", ""):
            raise ValueError(f"{owner}: global_pool {vt.global_pool!r} is not supported (token, avg)")
        blk = vt.blocks[0] if len(vt.blocks) else None
        init_values, qk_norm = None, False
        if blk is not None:
            init_values, qk_norm = cls._timm_block_options(blk, owner)
        act = "gelu"
        if blk is not None:
            a = blk.mlp.act
            if isinstance(a, timm.layers.QuickGELU):
                act = "quick_gelu"
            elif isinstance(a, nn.GELU):
                act = "gelu_tanh" if a.approximate == "tanh" else "gelu"
            else:
                raise ValueError(f"{owner}: MLP activation {type(a).__name__} is not supported")
        pe = vt.patch_embed
        backbone = getattr(pe, "backbone", None)
        proj = pe.proj
        P = proj.kernel_size[0]
        img = pe.img_size[0]
        stride = pe.feature_ratio[0] if backbone is not None else None
        norm = vt.norm if isinstance(vt.norm, nn.LayerNorm) else None
        fc_norm = vt.fc_norm if isinstance(vt.fc_norm, nn.LayerNorm) else None
        final_norm = "all" if norm is not None else "pooled" if fc_norm is not None else "none"
        eps = (norm or fc_norm or (blk.norm1 if blk is not None else None))
        head = vt.head if isinstance(vt.head, nn.Linear) else None
        model = cls(img, P, pe.proj.in_channels if backbone is None else pe.in_chans, vt.embed_dim, len(vt.blocks),
                    blk.attn.num_heads if blk is not None else 1,
                    mlp_dim=blk.mlp.fc1.out_features if blk is not None else None, act=act,
                    qkv_bias=blk is None or blk.attn.qkv.bias is not None, patch_bias=proj.bias is not None,
                    norm_eps=eps.eps if eps is not None else 1e-6, class_token=vt.cls_token is not None,
                    global_pool=vt.global_pool or "none", pos_embed="learn" if vt.pos_embed is not None else "none",
                    no_embed_class=vt.no_embed_class, pre_norm=isinstance(vt.norm_pre, nn.LayerNorm),
                    final_norm=final_norm, num_classes=head.out_features if head is not None else 0,
                    backbone=backbone, backbone_channels=proj.in_channels if backbone is not None else None,
                    backbone_stride=stride, dynamic_img_size=bool(getattr(vt, "dynamic_img_size", False)),
                    pos_resample="timm", reg_tokens=getattr(vt, "num_reg_tokens", 0), init_values=init_values,
                    qk_norm=qk_norm, backend=backend)
        ref = proj.weight
        model = model.to(dtype=ref.dtype, device=ref.device)
        ours = model.patch_embed
        pos, reg_pos = vt.pos_embed, None
        if model.reg_pos_embed is not None:  # timm's rows [CLS, registers, patches]: registers' rows apart
            c, r = ours.num_prefix_tokens, model.reg_token.shape[1]
            pos, reg_pos = torch.cat([pos[:, :c], pos[:, c + r:]], 1), pos[:, c:c + r]
        pairs = [("cls_token", ours.cls_token, vt.cls_token), ("pos_embed", ours.pos_embed, pos),
                 ("reg_token", model.reg_token, getattr(vt, "reg_token", None)),
                 ("reg_pos_embed", model.reg_pos_embed, reg_pos),
                 ("proj.weight", ours.proj.weight, proj.weight), ("proj.bias", ours.proj.bias, proj.bias)]
        for i, (mine, theirs) in enumerate(zip(model.encoder.layers, vt.blocks)):
            if init_values is not None:
                pairs += [(f"blocks.{i}.ls1.gamma", mine.ls1.gamma, theirs.ls1.gamma),
                          (f"blocks.{i}.ls2.gamma", mine.ls2.gamma, theirs.ls2.gamma)]
            if qk_norm:
                pairs += (module_pairs(f"blocks.{i}.attn.q_norm", mine.attn.q_norm, theirs.attn.q_norm)
                          + module_pairs(f"blocks.{i}.attn.k_norm", mine.attn.k_norm, theirs.attn.k_norm))
        for name, mine, theirs in (("norm_pre", model.norm_pre, vt.norm_pre), ("norm", model.norm, norm or fc_norm),
                                   ("head", model.head, head)):
            if mine is not None:
                pairs += [(f"{name}.weight", mine.weight, theirs.weight), (f"{name}.bias", mine.bias, theirs.bias)]
        copy_weights(pairs + layer_pairs(model.encoder, vt.blocks, cls._TIMM_LAYER), owner)
        return model

    @staticmethod
    def _timm_block_options(blk, owner):
        """(init_values, qk_norm) of a timm Block, refusing the parts our TransformerLayer lacks. The gammas
        are copied afterwards, so any non-None init_values builds the LayerScales."""
        if not (hasattr(blk, "ls1") and hasattr(blk, "attn") and hasattr(blk.attn, "qkv")):
            raise ValueError(f"{owner}: block {type(blk).__name__} is not timm's Block (pre-norm, fused qkv)")
        scales = [isinstance(ls, nn.Identity) for ls in (blk.ls1, blk.ls2)]
        if scales[0] != scales[1]:
            raise ValueError(f"{owner}: layer scale on only one residual branch is not supported")
        init_values = None if scales[0] else 1.0
        q_norm = getattr(blk.attn, "q_norm", None)
        qk_norm = q_norm is not None and not isinstance(q_norm, nn.Identity)
        if qk_norm and not (isinstance(q_norm, nn.LayerNorm) and q_norm.elementwise_affine):
            raise ValueError(f"{owner}: qk_norm with {type(q_norm).__name__} is not supported (affine LayerNorm)")
        if qk_norm and abs(q_norm.eps - blk.norm1.eps) > 0:
            raise ValueError(f"{owner}: qk_norm eps {q_norm.eps} differs from the block norm's {blk.norm1.eps}")
        if not isinstance(getattr(blk.attn, "norm", nn.Identity()), nn.Identity):  # timm's scale_attn_norm
            raise ValueError(f"{owner}: scale_attn_norm (attn.norm) is not supported")
        if not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity):
            raise ValueError(f"{owner}: scale_mlp_norm (mlp.norm) is not supported")
        return init_values, qk_norm
