"""PatchEmbed: a ViT's patch embedding, [CLS] token and position embedding in one fused launch."""
import torch
from torch import nn

from mmfast.kernels import patch_embed
from mmfast.kernels._common import check_bool, check_choice, check_int
from mmfast.kernels.patch_embed import INTERPOLATIONS, POS_RESAMPLE_MODES

from .plain import require_plain


_OP = "PatchEmbed"


def _pair(name, x):
    """An int or a pair of ints, each >= 1 -> (a, b)."""
    if not isinstance(x, (tuple, list)):
        check_int(_OP, name, x, lo=1)
        return x, x
    if len(x) != 2:
        raise ValueError(f"{_OP}: {name} must be an int or a pair of ints, got {x!r}")
    for i, v in enumerate(x):
        check_int(_OP, f"{name}[{i}]", v, lo=1)
    return tuple(x)


class PatchEmbed(nn.Module):
    """Drop-in for timm's ``PatchEmbed`` together with the ViT's ``cls_token`` / ``pos_embed`` handling.

    Parameters use timm's names and shapes, so a timm VisionTransformer's ``patch_embed.proj.*``,
    ``cls_token`` and ``pos_embed`` load directly: ``proj`` (nn.Conv2d, D x C x P x P, stride P),
    ``cls_token`` (1, 1, D), ``pos_embed`` (1, [1 +] N, D) (the [CLS] row first unless
    ``no_embed_class``, as timm), optional ``mask_token`` (1, 1, D) for masked-patch pre-training.
    ``forward(x)`` returns (B, [1 +] N, D) = timm's ``_pos_embed(patch_embed(x))``; images of another
    size than ``img_size`` get the table resampled (``dynamic_img_size``, timm's default math; cached per
    grid at inference) and sizes not divisible by P are padded when ``dynamic_img_pad``.

    Args:
        img_size, patch_size, in_chans, embed_dim, bias: as timm's PatchEmbed.
        class_token: prepend a learnable [CLS] token. pos_embed: "learn" (timm's default) or "none".
        no_embed_class: the table covers only the patches; [CLS] gets no position (timm's flag).
        mask_token: hold a learnable [MASK] token (used when forward gets token_mask).
        dynamic_img_size: accept other image sizes (table resampled); else the size must be img_size.
        dynamic_img_pad: right/bottom zero padding to a multiple of P.
        interpolation, pos_resample: "bicubic"/"bilinear" and "timm"/"hf"/"hf_legacy" (see patch_embed).
        backend: forwarded to mmfast.kernels.patch_embed.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, *, bias=True, class_token=True,
                 pos_embed="learn", no_embed_class=False, mask_token=False, dynamic_img_size=False,
                 dynamic_img_pad=False, interpolation="bicubic", pos_resample="timm", backend="auto", proj=None):
        super().__init__()
        self.patch_size = _pair("patch_size", patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"{_OP}: patch_size must be square, got {self.patch_size}")
        self.img_size = _pair("img_size", img_size)
        for name, value in (("bias", bias), ("class_token", class_token), ("no_embed_class", no_embed_class),
                            ("mask_token", mask_token), ("dynamic_img_size", dynamic_img_size),
                            ("dynamic_img_pad", dynamic_img_pad)):
            check_bool(_OP, name, value)
        check_choice(_OP, "pos_embed", pos_embed, ("learn", "none"))
        check_choice(_OP, "interpolation", interpolation, INTERPOLATIONS)
        check_choice(_OP, "pos_resample", pos_resample, POS_RESAMPLE_MODES)
        check_choice(_OP, "backend", backend, ("auto", "triton", "reference"))
        P = self.patch_size[0]
        if not dynamic_img_pad and any(s % P for s in self.img_size):
            raise ValueError(f"{_OP}: img_size {self.img_size} must be a multiple of patch_size {P} (or pass "
                             "dynamic_img_pad=True: right/bottom zero padding)")
        self.grid_size = tuple(-(-s // P) if dynamic_img_pad else s // P for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if proj is None:
            check_int(_OP, "in_chans", in_chans, lo=1)
            check_int(_OP, "embed_dim", embed_dim, lo=1)
            proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.patch_size, bias=bias)
        elif not isinstance(proj, nn.Conv2d) or tuple(proj.kernel_size) != self.patch_size:
            raise ValueError(f"{_OP}: proj must be None or an nn.Conv2d with kernel patch_size {self.patch_size} (see "
                             f"from_conv), got {proj!r}")
        self.proj = proj
        embed_dim = self.proj.out_channels
        self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.no_embed_class = no_embed_class
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        rows = self.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, rows, embed_dim) * 0.02) if pos_embed == "learn" else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        self.dynamic_img_size = dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.interpolation = interpolation
        self.pos_resample = pos_resample
        self.backend = backend

    @classmethod
    def from_conv(cls, conv, img_size=224, **kwargs):
        """Wrap an existing ``nn.Conv2d`` (its parameters are shared, not copied): kernel P x P, stride P,
        no padding, dilation 1, groups 1."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{_OP}.from_conv: conv must be an nn.Conv2d, got {type(conv).__name__}")
        k = tuple(conv.kernel_size)
        if (k[0] != k[1] or tuple(conv.stride) != k or tuple(conv.dilation) != (1, 1) or conv.groups != 1
                or conv.padding not in ((0, 0), 0) or conv.padding_mode != "zeros"):
            raise ValueError(f"{_OP}.from_conv: conv must be a P x P, stride-P convolution without padding, dilation "
                             "or groups, got "
                             f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, "
                             f"dilation {conv.dilation}, groups {conv.groups}")
        return cls(img_size, k[0], conv.in_channels, conv.out_channels, proj=conv, **kwargs)

    def forward(self, x, *, token_mask=None, patch_index=None, keep_indices=None):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{_OP}: x must be a (B, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not self.dynamic_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"{_OP}: input size {tuple(x.shape[-2:])} does not match img_size {self.img_size}; "
                             "construct with dynamic_img_size=True to resample the position table")
        require_plain(_OP, "proj", self.proj, nn.Conv2d)
        mask_token = None
        if token_mask is not None:
            if self.mask_token is None:
                raise ValueError("token_mask needs a mask token: construct PatchEmbed with mask_token=True")
            mask_token = self.mask_token
        return patch_embed(x, self.proj.weight, self.proj.bias, pos_embed=self.pos_embed, cls_token=self.cls_token,
                           pos_grid=self.grid_size if self.pos_embed is not None else None,
                           interpolation=self.interpolation, pos_resample=self.pos_resample, token_mask=token_mask,
                           mask_token=mask_token, patch_index=patch_index, keep_indices=keep_indices,
                           dynamic_pad=self.dynamic_img_pad, backend=self.backend)

    def extra_repr(self):
        return (f"img_size={self.img_size}, patch_size={self.patch_size}, embed_dim={self.embed_dim}, "
                f"class_token={self.cls_token is not None}, pos_embed={self.pos_embed is not None}, "
                f"dynamic_img_size={self.dynamic_img_size}")
