"""Fused patch embedding: conv-as-GEMM with bias, position embedding (resampled per grid), [CLS],
masked-patch pre-training (mask token, random other patch, MAE keep indices) and Llama 3.2 Vision
tiles, forward and backward.

One forward launch reads every pixel once and writes every output token once: the stride-P P x P
convolution is a GEMM whose A operand is gathered from the image through its strides, and bias,
position embedding, [CLS] row, mask token and tile embeddings are added in its epilogue. The backward
runs two GEMM kernels (d_images: dOut @ W stored through the image's strides; d_weight and d_bias:
dOut^T @ gathered patches, split over rows into fp32 partials summed by the launcher, no atomics); the
small parameter gradients (position tables, [CLS], mask token, tile tables, gates) are reductions of dOut
done with PyTorch.

Files: _kernels.py (the Triton kernels), _configs.py (launch configs, compile-gate specs), _launch.py
(validation, launchers, custom ops, autograd), _pos.py (position tables and their resampling),
_masking.py (masked pre-training samplers), this file (the public ops).
"""
import torch

from .._common import autocast_op, check_bool, check_choice, check_scalar
from .._dispatch import resolve_backend
from ..reference import patch_embed_reference, tile_patch_embed_reference
from ._configs import compile_specs
from ._launch import (Plan, bool_mask, check_distinct, check_images_weight, check_triton_tensors, floating, index,
                      output_dtype, patch_embed_apply, patch_grid, vector)
from ._masking import mae_keep_indices, vit_masked_patch_sampler
from ._pos import _POS_CACHE, INTERPOLATIONS, POS_RESAMPLE_MODES, _resolve_pos, resample_pos_embed  # noqa: F401

__all__ = ["patch_embed", "tile_patch_embed", "resample_pos_embed", "vit_masked_patch_sampler", "mae_keep_indices",
           "compile_specs"]


@autocast_op("images", "weight", "bias")
def patch_embed(images, weight, bias=None, *, pos_embed=None, cls_token=None, pos_grid=None, interpolation="bicubic",
                pos_resample="timm", token_mask=None, mask_token=None, patch_index=None, keep_indices=None,
                dynamic_pad=False, backend="auto"):
    """Patch embedding of a ViT in one launch: conv(P x P, stride P) + bias + position embedding + [CLS].

    Args:
        images: (B, C, H, W) with C, H, W >= 1 (B may be 0), any strides (NCHW, channels-last, slices); H, W divisible by P, else
            ValueError, unless ``dynamic_pad`` (right/bottom zero padding, timm's dynamic_img_pad).
        weight: (D, C, P, P), exactly ``nn.Conv2d.weight``; same dtype as images. bias: (D,) or None,
            same dtype (as ``F.conv2d``).
        pos_embed: None; a 1D table (L, D) or (1, L, D) with L = N0 (patches) or N0 + 1 ([CLS] position
            row first) on the table's grid gh0 x gw0 = ``pos_grid``. Without ``pos_grid`` the table's grid
            must follow from its size, as timm and Hugging Face assume: square (L = s*s or s*s + 1); a
            table with as many rows as a non-square image grid's N or N + 1 tokens raises (its grid could be
            another, e.g. 4x4 on a 2x8 image, which timm would resample). Or a 2D pair (row table (gh0, D1),
            column table (gw0, D2)), D1 + D2 = D: token (i, j) gets cat(row[i], col[j]). A table on another
            grid than the image's is resampled with ``interpolation`` ("bicubic" | "bilinear") the way
            ``pos_resample`` says: "timm" (resample_abs_pos_embed: fp32, antialias), "hf" (ViT
            interpolate_pos_encoding: size=, align_corners=False, no antialias) or "hf_legacy"
            (transformers < 4.44 / DINO: scale_factor = (g + 0.1) / g0); cached per grid unless the table
            requires grad.
        cls_token: (D,) / (1, 1, D) or None: prepends the row cls_token (+ the table's [CLS] row).
        token_mask, mask_token: (B, N) bool and (D,): masked tokens become mask_token + position (their
            pixels are not read; tiles of masked rows skip the GEMM).
        patch_index: (B, N) int: token j embeds patch patch_index[b, j] (keeps position j): the ViT
            recipe's "random other patch" (see vit_masked_patch_sampler).
        keep_indices: (B, N_keep) int, distinct within each row: MAE-style, only these tokens (with their
            own positions) are computed and returned.
        backend: "auto" | "triton" | "reference".

    Returns (B, [1 +] N or N_keep, D), N = gh * gw:
        out[b, 1 + j] = sum_{c,y,x} images[b, c, gy*P + y, gx*P + x] * weight[:, c, y, x] + bias + pos[j]
        out[b, 0] = cls_token + pos_cls

    Dtypes: the eager chain's (F.conv2d, then adding / concatenating the tables): the images' dtype
    promoted with those of pos_embed, cls_token and mask_token (bf16 images with fp32 tables -> fp32).
    Under ``torch.autocast`` images, weight and bias are cast to the autocast dtype as F.conv2d's
    autocast does (float64 is left alone), the tables are not; gradients come back in each input's
    dtype. float64 runs on backend="reference" only (Triton raises ValueError naming the argument).

    Precision: fp32 accumulation; the epilogue adds in fp32 and rounds once. fp32 inputs follow
    ``torch.get_float32_matmul_precision()`` as torch.matmul does ("highest", the default: IEEE fp32;
    "high" / "medium": TF32), read at every call.

    Differentiable in every tensor argument; a gradient of a gradient through the convolution raises
    (its backward kernels carry no graph). Traceable by ``torch.compile(fullgraph=True)`` (the kernels
    are custom ops ``mmfast::patch_embed_fwd`` / ``_bwd`` with fake shapes; ``patch_index`` /
    ``keep_indices`` on CPU check their range on the host, a graph break).
    """
    op = "patch_embed"
    D, C, P = check_images_weight(op, images, weight, 4)
    check_bool(op, "dynamic_pad", dynamic_pad)
    check_choice(op, "interpolation", interpolation, INTERPOLATIONS)
    check_choice(op, "pos_resample", pos_resample, POS_RESAMPLE_MODES)
    B, _, H, W = images.shape
    device = images.device
    GH, GW = patch_grid(op, H, W, P, dynamic_pad)
    N = GH * GW
    bias = vector(op, "bias", bias, D, device, dtype=images.dtype)
    cls = vector(op, "cls_token", cls_token, D, device)
    if isinstance(pos_embed, (tuple, list)):  # the 2D (row table, column table) pair
        tables = {f"pos_embed[{i}]": floating(op, f"pos_embed[{i}]", t, device) for i, t in enumerate(pos_embed)}
    elif pos_embed is not None:
        tables = {"pos_embed": floating(op, "pos_embed", pos_embed, device)}
    else:
        tables = {}
    pos, pos_cls = _resolve_pos(pos_embed, (GH, GW), D, cls is not None, pos_grid, interpolation, pos_resample)
    if (token_mask is None) != (mask_token is None):
        raise ValueError(f"{op}: token_mask and mask_token must be given together")
    if keep_indices is not None and (token_mask is not None or patch_index is not None):
        raise ValueError(f"{op}: keep_indices (MAE) cannot be combined with token_mask / patch_index")
    if token_mask is not None:
        token_mask = bool_mask(op, "token_mask", token_mask, (B, N), device)
        mask_token = vector(op, "mask_token", mask_token, D, device)
    src = keep = None  # flat int32 copies for the kernels
    if patch_index is not None:
        src = index(op, "patch_index", patch_index, (B, N), N, device)
    if keep_indices is not None:
        if not isinstance(keep_indices, torch.Tensor) or keep_indices.dim() != 2 or keep_indices.shape[0] != B:
            raise ValueError(f"{op}: keep_indices must be (B, N_keep) = ({B}, n), got "
                             f"{tuple(keep_indices.shape) if isinstance(keep_indices, torch.Tensor) else keep_indices}")
        keep = src = index(op, "keep_indices", keep_indices, tuple(keep_indices.shape), N, device)
        # the d_images kernel maps each patch to at most one kept token (a repeat's gradient would be lost)
        check_distinct(op, "keep_indices", keep_indices)
    chosen = resolve_backend(op, backend, device)
    if chosen == "reference":
        return patch_embed_reference(images, weight, bias, pos_embed=pos, pos_cls=pos_cls, cls_token=cls,
                                     token_mask=token_mask, mask_token=mask_token, patch_index=patch_index,
                                     keep_indices=keep_indices, dynamic_pad=dynamic_pad)
    check_triton_tensors(op, images=images, weight=weight, bias=bias, **tables, cls_token=cls, mask_token=mask_token)
    out_dtype = output_dtype(images.dtype, *tables.values(), cls, mask_token)
    M = keep_indices.shape[1] if keep_indices is not None else N
    perm = tok = None
    if token_mask is not None:
        tok = token_mask.contiguous().view(-1).view(torch.uint8)
        # rows needing the GEMM first, so whole tiles of masked rows skip the K loop (no host sync)
        perm = torch.argsort(tok, stable=True).to(torch.int32)
    plan = Plan(B=B, T=1, C=C, P=P, GH=GH, GW=GW, H=H, W=W, N=N, M=M, has_cls=cls is not None, pad=dynamic_pad,
                cl_order=images.stride(1) == 1 and C > 1, perm=perm, src_idx=src, pos_idx=keep, tok_mask=tok,
                tile_used=None, ar_ids=None, keep=keep.view(B, M) if keep is not None else None, tiles=False)
    pos = pos.contiguous() if pos is not None else None
    pos_cls = pos_cls.contiguous() if pos_cls is not None else None
    return patch_embed_apply(images, weight, bias, pos, pos_cls, cls, mask_token, None, None, None, plan, out_dtype)


@autocast_op("images", "weight", "bias")
def tile_patch_embed(images, weight, bias=None, *, cls_token, pos_embed, pos_gate, tile_pos_embed, tile_embed,
                     tile_embed_gate, aspect_ratio_ids, tile_mask=None, backend="auto"):
    """Llama 3.2 Vision (Mllama) patch embedding of tiled images in one launch.

    Args:
        images: (B, T, C, H, W) tiles (T = max_num_tiles <= 4, H = W = 560 for Llama 3.2), any strides.
        weight: (D, C, P, P) (P = 14); bias: (D,) or None (Mllama has none); the images' dtype.
        cls_token: (D,); pos_embed: (1 + N, D) with its raw gate ``pos_gate`` (1,)
            (MllamaPrecomputedPositionEmbedding.embedding / .gate);
        tile_pos_embed: (R, T * (1 + N) * D) (its tile_embedding.weight) or (R, T, 1 + N, D);
        tile_embed: (R, T * D) or (R, T, D) with its raw gate ``tile_embed_gate`` (1,)
            (MllamaPrecomputedAspectRatioEmbedding, the pre-tile embedding, gated);
        aspect_ratio_ids: (B,) int in [0, R); tile_mask: (B, T) bool/int (aspect_ratio_mask) or None.
        The gates are tensors: a non-finite gate fails a device-side check (no host sync).

    Returns (B, T, 1 + N, D):
        out[b, t, 1 + n] = conv(tile)[n] + bias + tanh(g_t) * tile_embed[ar_b, t]
                           + (1 - tanh(g_p)) * pos_embed[1 + n] + tanh(g_p) * tile_pos_embed[ar_b, t, 1 + n]
        out[b, t, 0]     = cls_token + (1 - tanh(g_p)) * pos_embed[0] + tanh(g_p) * tile_pos_embed[ar_b, t, 0]
    Unused tiles (tile_mask 0) are not computed: their pixels are never read, no GEMM runs for them and
    their rows are written as zeros (Mllama masks them out of attention).

    Dtypes, autocast, precision, float64 and backends as ``patch_embed``: the output dtype is the
    Mllama chain's, the images' dtype promoted with those of the tables, [CLS] and gates.
    """
    op = "tile_patch_embed"
    D, C, P = check_images_weight(op, images, weight, 5)
    B, T, _, H, W = images.shape
    device = images.device
    GH, GW = patch_grid(op, H, W, P, False)
    N = GH * GW
    bias = vector(op, "bias", bias, D, device, dtype=images.dtype)
    cls = vector(op, "cls_token", cls_token, D, device)
    if cls is None or pos_embed is None:
        raise ValueError(f"{op}: needs cls_token and pos_embed (Mllama's class_embedding and embedding)")
    tables = dict(pos_embed=pos_embed, tile_pos_embed=tile_pos_embed, tile_embed=tile_embed, pos_gate=pos_gate,
                  tile_embed_gate=tile_embed_gate)
    for name, t in tables.items():
        floating(op, name, t, device)
    if tuple(pos_embed.shape[-2:]) != (N + 1, D) or pos_embed.numel() != (N + 1) * D:
        raise ValueError(f"{op}: pos_embed must be (1 + N, D) = ({N + 1}, {D}), got {tuple(pos_embed.shape)}")
    pos_embed = pos_embed.reshape(N + 1, D)
    R = tile_pos_embed.shape[0] if tile_pos_embed.dim() else 0
    if R < 1 or tile_pos_embed.numel() != R * T * (N + 1) * D:
        raise ValueError(f"{op}: tile_pos_embed must be (R, T * (1 + N) * D) = (R, {T * (N + 1) * D}), got "
                         f"{tuple(tile_pos_embed.shape)}")
    if tile_embed.dim() == 0 or tile_embed.shape[0] != R or tile_embed.numel() != R * T * D:
        raise ValueError(f"{op}: tile_embed must be (R, T * D) = ({R}, {T * D}), got {tuple(tile_embed.shape)}")
    for name, g in (("pos_gate", pos_gate), ("tile_embed_gate", tile_embed_gate)):
        if g.numel() != 1:
            raise ValueError(f"{op}: {name} must be a 1-element tensor (the raw gate parameter), got {tuple(g.shape)}")
        check_scalar(op, name, g)
    ar = index(op, "aspect_ratio_ids", aspect_ratio_ids.reshape(-1) if isinstance(aspect_ratio_ids, torch.Tensor)
               else aspect_ratio_ids, (B,), R, device)
    used = None
    if tile_mask is not None:
        used = bool_mask(op, "tile_mask", tile_mask.reshape(B, -1) if isinstance(tile_mask, torch.Tensor) and B
                         else tile_mask, (B, T), device)
    chosen = resolve_backend(op, backend, device)
    if chosen == "reference":
        return tile_patch_embed_reference(images, weight, bias, cls_token=cls, pos_embed=pos_embed, pos_gate=pos_gate,
                                          tile_pos_embed=tile_pos_embed.reshape(R, -1),
                                          tile_embed=tile_embed.reshape(R, -1), tile_embed_gate=tile_embed_gate,
                                          aspect_ratio_ids=ar.long(), tile_mask=used)
    check_triton_tensors(op, images=images, weight=weight, bias=bias, cls_token=cls, **tables)
    out_dtype = output_dtype(images.dtype, cls, *tables.values())
    gp, gt = pos_gate.reshape(()).float().tanh(), tile_embed_gate.reshape(()).float().tanh()
    coef = torch.stack([1 - gp, gp, gt])
    plan = Plan(B=B, T=T, C=C, P=P, GH=GH, GW=GW, H=H, W=W, N=N, M=N, has_cls=True, pad=False,
                cl_order=images.stride(2) == 1 and C > 1, perm=None, src_idx=None, pos_idx=None, tok_mask=None,
                tile_used=used.contiguous().view(-1).view(torch.uint8) if used is not None else None,
                ar_ids=ar, keep=None, tiles=True)
    out = patch_embed_apply(images, weight, bias, pos_embed[1:].contiguous(), pos_embed[0].contiguous(), cls, None,
                            tile_pos_embed.reshape(R, T, N + 1, D).contiguous(),
                            tile_embed.reshape(R, T, D).contiguous(), coef, plan, out_dtype)
    return out.view(B, T, N + 1, D)
