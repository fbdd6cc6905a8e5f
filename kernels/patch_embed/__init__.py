"""Fused patch embedding: conv-as-GEMM with bias, position embedding (resampled per grid), [CLS],
masked-patch pre-training (mask token, random other patch, MAE keep indices) and Llama 3.2 Vision
tiles, forward and backward.

One forward launch reads every pixel once and writes every output token once: the stride-P P x P
convolution is a GEMM whose A operand is gathered from the image through its strides, and bias,
position embedding, [CLS] row, mask token and tile embeddings are added in its epilogue
(kernels/patch_embed/_triton.py). The backward runs two GEMM kernels (d_images: dOut @ W stored
through the image's strides; d_weight and d_bias: dOut^T @ gathered patches, split over rows into fp32
partials summed by the launcher, no atomics); the small parameter gradients (position tables, [CLS],
mask token, tile tables, gates) are reductions of dOut done with PyTorch.

Files: _triton.py (kernels), _launch.py (configs, compile specs, launchers, autograd Function),
_pos.py (position tables and their resampling), this file (validation, public ops, samplers).
"""
import torch

from .._dispatch import resolve_backend
from ..reference import patch_embed_reference, tile_patch_embed_reference
from ._launch import SUPPORTED_DTYPES, Plan, compile_specs, patch_embed_apply
from ._pos import _POS_CACHE, _resolve_pos, resample_pos_embed  # noqa: F401 (_POS_CACHE: tests)

__all__ = ["patch_embed", "tile_patch_embed", "resample_pos_embed", "vit_masked_patch_sampler",
           "mae_keep_indices", "compile_specs", "SUPPORTED_DTYPES"]


# ----------------------------------------------------------------------------------------------
# Validation helpers


def _vec(name, t, D, device):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.numel() != D or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor with D = {D} elements ((D,), (1, D) or (1, 1, D)), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but images are on {device}")
    return t.reshape(D).contiguous()  # the kernels read D consecutive values


def _floating(name, t, device):
    """A parameter table or gate: a floating tensor on the images' device (shape checked by the caller)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got "
                         f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but images are on {device}")
    return t


def _index(name, t, shape, high, device):
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be an int32/int64 tensor of shape {tuple(shape)}, got "
                         f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but images are on {device}")
    if t.numel():
        if t.device.type == "cpu":
            if int(t.min()) < 0 or int(t.max()) >= high:
                raise ValueError(f"{name} values must lie in [0, {high})")
        else:  # a device-side assert: no host sync in the training step, and no out-of-bounds gather
            torch._assert_async((t.min() >= 0) & (t.max() < high), f"{name} values must lie in [0, {high})")
    return t.to(torch.int32).contiguous().view(-1)


def _check_images_weight(images, weight, dims):
    if not isinstance(images, torch.Tensor) or images.dim() != dims:
        shape = "(B, C, H, W)" if dims == 4 else "(B, T, C, H, W)"
        raise ValueError(f"images must be a {dims}-D tensor {shape}, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        raise ValueError(f"images must be float32, float16 or bfloat16 (float64: reference backend), got {images.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (D, C, P, P) as nn.Conv2d stores it, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dtype != images.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match images dtype {images.dtype}")
    if weight.device != images.device:
        raise ValueError(f"weight is on {weight.device} but images are on {images.device}")
    C = images.shape[-3]
    if weight.shape[1] != C:
        raise ValueError(f"weight has {weight.shape[1]} input channels but images have C = {C}")
    return weight.shape[0], C, weight.shape[-1]


def _triton_dtype(op, dtype):
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: the Triton kernels take float32, float16 or bfloat16 images, got {dtype}; "
                         "use backend='reference' for float64")


def _grid(H, W, P, dynamic_pad):
    if dynamic_pad:
        return -(-H // P), -(-W // P)
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size P = {P}; resize/crop it or pass "
                         "dynamic_pad=True (right/bottom zero padding, as timm's dynamic_img_pad)")
    return H // P, W // P


def _bool_mask(name, t, shape, device):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.is_floating_point():
        raise ValueError(f"{name} must be a bool (or integer 0/1) tensor of shape {tuple(shape)}, got "
                         f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but images are on {device}")
    return t.bool()


# ----------------------------------------------------------------------------------------------
# Public ops


def patch_embed(images, weight, bias=None, *, pos_embed=None, cls_token=None, pos_grid=None, interpolation="bicubic",
                pos_resample="timm", token_mask=None, mask_token=None, patch_index=None, keep_indices=None,
                dynamic_pad=False, backend="auto"):
    """Patch embedding of a ViT in one launch: conv(P x P, stride P) + bias + position embedding + [CLS].

    Args:
        images: (B, C, H, W) fp32/fp16/bf16, any strides (NCHW, channels-last, slices); H, W divisible by
            P, else ValueError, unless ``dynamic_pad`` (right/bottom zero padding, timm's dynamic_img_pad).
        weight: (D, C, P, P), exactly ``nn.Conv2d.weight``; same dtype as images. bias: (D,) or None.
        pos_embed: None; a 1D table (L, D) or (1, L, D) with L = N0 (patches) or N0 + 1 ([CLS] position
            row first), N0 = gh0 * gw0 the training grid ``pos_grid`` (default: the current grid when L
            fits it, else a square grid); or a 2D pair (row table (gh0, D1), column table (gw0, D2)),
            D1 + D2 = D: token (i, j) gets cat(row[i], col[j]). A table on another grid than the image's is
            resampled with ``interpolation`` ("bicubic" | "bilinear") the way ``pos_resample`` says:
            "timm" (resample_abs_pos_embed: fp32, antialias), "hf" (ViT interpolate_pos_encoding: size=,
            align_corners=False, no antialias) or "hf_legacy" (transformers < 4.44 / DINO: scale_factor
            = (g + 0.1) / g0); cached per grid unless the table requires grad.
        cls_token: (D,) / (1, 1, D) or None: prepends the row cls_token (+ the table's [CLS] row).
        token_mask, mask_token: (B, N) bool and (D,): masked tokens become mask_token + position (their
            pixels are not read; tiles of masked rows skip the GEMM).
        patch_index: (B, N) int: token j embeds patch patch_index[b, j] (keeps position j): the ViT
            recipe's "random other patch" (see vit_masked_patch_sampler).
        keep_indices: (B, N_keep) int: MAE-style, only these tokens (with their own positions) are
            computed and returned.
        backend: "auto" | "triton" | "reference".

    Returns (B, [1 +] N or N_keep, D) in the images' dtype, N = gh * gw:
        out[b, 1 + j] = sum_{c,y,x} images[b, c, gy*P + y, gx*P + x] * weight[:, c, y, x] + bias + pos[j]
        out[b, 0] = cls_token + pos_cls
    fp32 accumulation (tf32 for fp32 inputs on GPU when torch.backends.cudnn.allow_tf32, as F.conv2d);
    the epilogue adds in fp32 and rounds once. Differentiable in every tensor argument (once: double
    backward raises). Traceable by ``torch.compile(fullgraph=True)`` (the kernels are custom ops
    ``mmfast::patch_embed_fwd`` / ``_bwd`` with fake shapes; ``patch_index`` / ``keep_indices`` on CPU check
    their range on the host, a graph break).
    """
    D, C, P = _check_images_weight(images, weight, 4)
    B, _, H, W = images.shape
    device = images.device
    GH, GW = _grid(H, W, P, dynamic_pad)
    N = GH * GW
    bias = _vec("bias", bias, D, device)
    cls = _vec("cls_token", cls_token, D, device)
    if isinstance(pos_embed, (tuple, list)):  # the 2D (row table, column table) pair
        for i, t in enumerate(pos_embed):
            _floating(f"pos_embed[{i}]", t, device)
    elif pos_embed is not None:
        _floating("pos_embed", pos_embed, device)
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    if pos_resample not in ("timm", "hf", "hf_legacy"):
        raise ValueError(f"pos_resample must be 'timm', 'hf' or 'hf_legacy', got {pos_resample!r}")
    pos, pos_cls = _resolve_pos(pos_embed, (GH, GW), D, cls is not None, pos_grid, interpolation, pos_resample)
    if pos is not None and pos.device != device:
        raise ValueError(f"pos_embed is on {pos.device} but images are on {device}")
    if (token_mask is None) != (mask_token is None):
        raise ValueError("token_mask and mask_token must be given together")
    if keep_indices is not None and (token_mask is not None or patch_index is not None):
        raise ValueError("keep_indices (MAE) cannot be combined with token_mask / patch_index")
    if token_mask is not None:
        token_mask = _bool_mask("token_mask", token_mask, (B, N), device)
        mask_token = _vec("mask_token", mask_token, D, device)
    src = keep = None  # flat int32 copies for the kernels
    if patch_index is not None:
        src = _index("patch_index", patch_index, (B, N), N, device)
    if keep_indices is not None:
        if not isinstance(keep_indices, torch.Tensor) or keep_indices.dim() != 2 or keep_indices.shape[0] != B:
            raise ValueError(f"keep_indices must be (B, N_keep) = ({B}, n), got "
                             f"{tuple(keep_indices.shape) if isinstance(keep_indices, torch.Tensor) else keep_indices}")
        keep = src = _index("keep_indices", keep_indices, tuple(keep_indices.shape), N, device)
    chosen = resolve_backend("patch_embed", backend, device)
    if chosen == "reference":
        return patch_embed_reference(images, weight, bias, pos_embed=pos, pos_cls=pos_cls, cls_token=cls,
                                     token_mask=token_mask, mask_token=mask_token, patch_index=patch_index,
                                     keep_indices=keep_indices, dynamic_pad=dynamic_pad)
    _triton_dtype("patch_embed", images.dtype)
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
    return patch_embed_apply(images, weight, bias, pos, pos_cls, cls, mask_token, None, None, None, plan)


def tile_patch_embed(images, weight, bias=None, *, cls_token, pos_embed, pos_gate, tile_pos_embed, tile_embed,
                     tile_embed_gate, aspect_ratio_ids, tile_mask=None, backend="auto"):
    """Llama 3.2 Vision (Mllama) patch embedding of tiled images in one launch.

    Args:
        images: (B, T, C, H, W) tiles (T = max_num_tiles <= 4, H = W = 560 for Llama 3.2), any strides.
        weight: (D, C, P, P) (P = 14); bias: (D,) or None (Mllama has none).
        cls_token: (D,); pos_embed: (1 + N, D) with its raw gate ``pos_gate`` (1,)
            (MllamaPrecomputedPositionEmbedding.embedding / .gate);
        tile_pos_embed: (R, T * (1 + N) * D) (its tile_embedding.weight) or (R, T, 1 + N, D);
        tile_embed: (R, T * D) or (R, T, D) with its raw gate ``tile_embed_gate`` (1,)
            (MllamaPrecomputedAspectRatioEmbedding, the pre-tile embedding, gated);
        aspect_ratio_ids: (B,) int in [0, R); tile_mask: (B, T) bool/int (aspect_ratio_mask) or None.

    Returns (B, T, 1 + N, D):
        out[b, t, 1 + n] = conv(tile)[n] + bias + tanh(g_t) * tile_embed[ar_b, t]
                           + (1 - tanh(g_p)) * pos_embed[1 + n] + tanh(g_p) * tile_pos_embed[ar_b, t, 1 + n]
        out[b, t, 0]     = cls_token + (1 - tanh(g_p)) * pos_embed[0] + tanh(g_p) * tile_pos_embed[ar_b, t, 0]
    Unused tiles (tile_mask 0) are not computed: their pixels are never read, no GEMM runs for them and
    their rows are written as zeros (Mllama masks them out of attention).
    """
    D, C, P = _check_images_weight(images, weight, 5)
    B, T, _, H, W = images.shape
    device = images.device
    GH, GW = _grid(H, W, P, False)
    N = GH * GW
    bias = _vec("bias", bias, D, device)
    cls = _vec("cls_token", cls_token, D, device)
    if cls is None or pos_embed is None:
        raise ValueError("tile_patch_embed needs cls_token and pos_embed (Mllama's class_embedding and embedding)")
    for name, t in (("pos_embed", pos_embed), ("tile_pos_embed", tile_pos_embed), ("tile_embed", tile_embed),
                    ("pos_gate", pos_gate), ("tile_embed_gate", tile_embed_gate)):
        _floating(name, t, device)
    if tuple(pos_embed.shape[-2:]) != (N + 1, D) or pos_embed.numel() != (N + 1) * D:
        raise ValueError(f"pos_embed must be (1 + N, D) = ({N + 1}, {D}), got {tuple(pos_embed.shape)}")
    pos_embed = pos_embed.reshape(N + 1, D)
    R = tile_pos_embed.shape[0]
    if tile_pos_embed.numel() != R * T * (N + 1) * D:
        raise ValueError(f"tile_pos_embed must be (R, T * (1 + N) * D) = (R, {T * (N + 1) * D}), got "
                         f"{tuple(tile_pos_embed.shape)}")
    if tile_embed.shape[0] != R or tile_embed.numel() != R * T * D:
        raise ValueError(f"tile_embed must be (R, T * D) = ({R}, {T * D}), got {tuple(tile_embed.shape)}")
    for name, g in (("pos_gate", pos_gate), ("tile_embed_gate", tile_embed_gate)):
        if not isinstance(g, torch.Tensor) or g.numel() != 1:
            raise ValueError(f"{name} must be a 1-element tensor (the raw gate parameter)")
    ar = _index("aspect_ratio_ids", aspect_ratio_ids.reshape(-1) if isinstance(aspect_ratio_ids, torch.Tensor)
                else aspect_ratio_ids, (B,), R, device)
    used = None
    if tile_mask is not None:
        used = _bool_mask("tile_mask", tile_mask.reshape(B, -1) if isinstance(tile_mask, torch.Tensor) else tile_mask,
                          (B, T), device)
    chosen = resolve_backend("tile_patch_embed", backend, device)
    if chosen == "reference":
        return tile_patch_embed_reference(images, weight, bias, cls_token=cls, pos_embed=pos_embed, pos_gate=pos_gate,
                                          tile_pos_embed=tile_pos_embed.reshape(R, -1),
                                          tile_embed=tile_embed.reshape(R, -1), tile_embed_gate=tile_embed_gate,
                                          aspect_ratio_ids=ar.long(), tile_mask=used)
    _triton_dtype("tile_patch_embed", images.dtype)
    gp, gt = pos_gate.reshape(()).float().tanh(), tile_embed_gate.reshape(()).float().tanh()
    coef = torch.stack([1 - gp, gp, gt])
    plan = Plan(B=B, T=T, C=C, P=P, GH=GH, GW=GW, H=H, W=W, N=N, M=N, has_cls=True, pad=False,
                cl_order=images.stride(2) == 1 and C > 1, perm=None, src_idx=None, pos_idx=None, tok_mask=None,
                tile_used=used.contiguous().view(-1).view(torch.uint8) if used is not None else None,
                ar_ids=ar, keep=None, tiles=True)
    out = patch_embed_apply(images, weight, bias, pos_embed[1:].contiguous(), pos_embed[0].contiguous(), cls, None,
                              tile_pos_embed.reshape(R, T, N + 1, D).contiguous(),
                              tile_embed.reshape(R, T, D).contiguous(), coef, plan)
    return out.view(B, T, N + 1, D)


# ----------------------------------------------------------------------------------------------
# Masking helpers (pure PyTorch, on the device of their output)


def vit_masked_patch_sampler(batch, num_patches, *, mask_ratio=0.5, p_mask=0.8, p_random=0.1, generator=None,
                             device=None):
    """The ViT paper's masked-patch prediction corruption (BERT's recipe on patches).

    Per image, round(mask_ratio * N) patches are chosen (drawn afresh per call); of those, each
    independently becomes the [MASK] embedding with probability p_mask, another patch's embedding
    (a uniformly drawn *different* patch of the same image, keeping its own position) with probability
    p_random, and stays unchanged otherwise. Returns (token_mask (B, N) bool, patch_index (B, N) int64,
    target_mask (B, N) bool = the chosen patches, whose pixels the model predicts); pass token_mask,
    patch_index to patch_embed.
    """
    if num_patches < 2 and p_random > 0:
        raise ValueError("the random-other-patch replacement needs num_patches >= 2")
    if not (0 <= mask_ratio <= 1 and 0 <= p_mask and 0 <= p_random and p_mask + p_random <= 1):
        raise ValueError("need 0 <= mask_ratio <= 1, p_mask, p_random >= 0 and p_mask + p_random <= 1")
    gen_device = generator.device if generator is not None else (device or "cpu")
    n_pick = int(round(mask_ratio * num_patches))
    noise = torch.rand(batch, num_patches, generator=generator, device=gen_device)
    order = noise.argsort(dim=1)
    target = torch.zeros(batch, num_patches, dtype=torch.bool, device=gen_device)
    target.scatter_(1, order[:, :n_pick], True)
    u = torch.rand(batch, num_patches, generator=generator, device=gen_device)
    token_mask = target & (u < p_mask)
    swap = target & (u >= p_mask) & (u < p_mask + p_random)
    offset = torch.randint(1, max(num_patches, 2), (batch, num_patches), generator=generator, device=gen_device)
    own = torch.arange(num_patches, device=gen_device).expand(batch, num_patches)
    patch_index = torch.where(swap, (own + offset) % num_patches, own)
    out = (token_mask, patch_index, target)
    return tuple(t.to(device) for t in out) if device is not None else out


def mae_keep_indices(batch, num_patches, *, mask_ratio=0.75, generator=None, device=None):
    """MAE's random masking: (keep_indices (B, N_keep), ids_restore (B, N)) from per-image noise, as
    MAE's random_masking does; N_keep = int(N * (1 - mask_ratio))."""
    gen_device = generator.device if generator is not None else (device or "cpu")
    keep = int(num_patches * (1 - mask_ratio))
    ids_shuffle = torch.rand(batch, num_patches, generator=generator, device=gen_device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    out = (ids_shuffle[:, :keep].contiguous(), ids_restore)
    return tuple(t.to(device) for t in out) if device is not None else out
