"""Launch side of the fused patch embedding: argument validation, allocation, the three kernel launches
(forward, d_images, d_weight + d_bias), the custom ops with their fake implementations, and the autograd
formula (the small parameter gradients are reductions of dOut done with PyTorch)."""
import functools
import math
from collections import namedtuple
from typing import List, Optional, Tuple

import torch

from .._common import (TL_DTYPES, cdiv, check_triton_dtype, kernel_flags, no_double_backward, register_autograd,
                       saveable)
from ._configs import dw_config, dw_splits, dx_config, fwd_config, run_len
from ._kernels import _patch_embed_bwd_dw_kernel, _patch_embed_bwd_dx_kernel, _patch_embed_fwd_kernel

# ----------------------------------------------------------------------------------------------
# Validation (every message names the op and the argument)


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_images_weight(op, images, weight, dims):
    """images (B, C, H, W) or (B, T, C, H, W), weight (D, C, P, P) of the same dtype: -> (D, C, P)."""
    if not isinstance(images, torch.Tensor) or images.dim() != dims:
        shape = "(B, C, H, W)" if dims == 4 else "(B, T, C, H, W)"
        raise ValueError(f"{op}: images must be a {dims}-D tensor {shape}, got {_shape(images)}")
    if not images.is_floating_point():
        raise ValueError(f"{op}: images must be a floating tensor, got {images.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{op}: weight must be (D, C, P, P) as nn.Conv2d stores it, got {_shape(weight)}")
    if weight.dtype != images.dtype:
        raise ValueError(f"{op}: weight dtype {weight.dtype} must match images dtype {images.dtype} (as F.conv2d)")
    if weight.device != images.device:
        raise ValueError(f"{op}: weight is on {weight.device} but images are on {images.device}")
    C = images.shape[-3]
    if C == 0 or images.shape[-2] == 0 or images.shape[-1] == 0:
        raise ValueError(f"{op}: images must have C, H and W >= 1 (as F.conv2d), got {tuple(images.shape)}")
    if weight.shape[1] != C:
        raise ValueError(f"{op}: weight has {weight.shape[1]} input channels but images have C = {C}")
    if weight.shape[-1] == 0 or weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must have D >= 1 and P >= 1, got {tuple(weight.shape)}")
    return weight.shape[0], C, weight.shape[-1]


def vector(op, name, t, D, device, dtype=None):
    """None, or a floating (D,) / (1, D) / (1, 1, D) tensor -> a contiguous (D,) view."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.numel() != D or not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating tensor with D = {D} elements ((D,), (1, D) or (1, 1, D)), "
                         f"got {(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but images are on {device}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{op}: {name} dtype {t.dtype} must match images dtype {dtype} (as F.conv2d)")
    return t.reshape(D).contiguous()  # the kernels read D consecutive values


def floating(op, name, t, device):
    """A parameter table or gate: a floating tensor on the images' device (shape checked by the caller)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating tensor, got "
                         f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but images are on {device}")
    return t


def index(op, name, t, shape, high, device):
    """An int32 / int64 tensor of `shape` with values in [0, high) -> a flat contiguous int32 copy.

    CPU tensors are checked on the host; CUDA tensors by a device-side assert (no host sync in the
    training step, and no out-of-bounds gather)."""
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must be an int32/int64 tensor of shape {tuple(shape)}, got "
                         f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but images are on {device}")
    if t.numel():
        if t.device.type == "cpu":
            if int(t.min()) < 0 or int(t.max()) >= high:
                raise ValueError(f"{op}: {name} values must lie in [0, {high})")
        else:
            torch._assert_async((t.min() >= 0) & (t.max() < high), f"{op}: {name} values must lie in [0, {high})")
    return t.to(torch.int32).contiguous().view(-1)


def check_distinct(op, name, t):
    """Each row of an index tensor (B, n) names distinct values: on the host for CPU tensors, by a
    device-side assert on CUDA (no host sync)."""
    if t.numel() == 0 or t.shape[-1] < 2:
        return
    ordered = t.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any()
    message = f"{op}: {name} values must be distinct within each row (each patch kept at most once)"
    if t.device.type == "cpu":
        if bool(repeated):
            raise ValueError(message)
    else:
        torch._assert_async(~repeated, message)


def bool_mask(op, name, t, shape, device):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{op}: {name} must be a bool (or integer 0/1) tensor of shape {tuple(shape)}, got "
                         f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but images are on {device}")
    return t.bool()


def patch_grid(op, H, W, P, dynamic_pad):
    """(gh, gw) of an H x W image in P x P patches (ceil with dynamic_pad: right/bottom zero padding)."""
    if dynamic_pad:
        return -(-H // P), -(-W // P)
    if H % P or W % P:
        raise ValueError(f"{op}: image size {H}x{W} is not divisible by the patch size P = {P}; resize/crop it or pass "
                         "dynamic_pad=True (right/bottom zero padding, as timm's dynamic_img_pad)")
    return H // P, W // P


def output_dtype(images_dtype, *tables):
    """The dtype the replaced eager chain returns: the convolution's (the images') dtype promoted with the
    dtypes of the tables, tokens and gates it adds or concatenates (timm's and Hugging Face's chains
    promote, so under autocast bf16 patches plus fp32 tables give fp32 tokens)."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tables if t is not None], images_dtype)


def check_triton_tensors(op, **tensors):
    """The Triton kernels take fp16 / bf16 / fp32 tensors: a float64 one raises ValueError naming it."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            check_triton_dtype(op, name, t)


# ----------------------------------------------------------------------------------------------
# Launchers

# Non-tensor description of one call, plus its index tensors (flattened, int32, contiguous).
Plan = namedtuple("Plan", "B T C P GH GW H W N M has_cls pad cl_order perm src_idx pos_idx tok_mask tile_used "
                          "ar_ids keep tiles")


def _empty(*shape, device, dtype):
    # one place that allocates kernel outputs: the tests poison it (NaN) to catch unwritten elements
    return torch.empty(*shape, device=device, dtype=dtype)


def _empty_like(t):
    return torch.empty_like(t)


def _run_len(plan):
    return run_len(plan.P, plan.C, plan.cl_order)


def _k_padded(plan):
    """Length of the kernels' reduction space: runs x padded run length."""
    return (plan.P if plan.cl_order else plan.C * plan.P) * _run_len(plan)


def _dense_run(t, plan):
    """Whether t's pixel runs are contiguous: NCHW rows (last stride 1), channels-last (px, c) rows."""
    s = t.stride()
    if plan.cl_order:
        return s[-3] == 1 and s[-1] == plan.C
    return s[-1] == 1


def _align(t, plan):
    """Elements every pixel-run start in t is a multiple of (vector loads / stores), 1 when not provable."""
    if not _dense_run(t, plan):
        return 1
    a = 16 // t.element_size()
    s = t.stride()
    # a run starts at b*s_b [+ t*s_t] + (gy*P + py)*s_h + gx*P*s_w [+ c*s_c]
    for v in (plan.P * s[-1],) + tuple(s[:-3]) + (s[-2],) + (() if plan.cl_order else (s[-3],)):
        a = math.gcd(a, v)
    return a


def _run_weight(weight, plan):
    """The weight with its pixel runs contiguous (the kernels assume it): a channels-last problem reads
    (D, P, P, C) rows, so its (D, C, P, P) weight is viewed through a permuted copy (D*K elements, made
    per call)."""
    if _dense_run(weight, plan):
        return weight
    if plan.cl_order:
        return weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return weight.contiguous()


def _image_strides(images, tiles):
    if tiles:
        return images.stride()
    sb, sc, sh, sw = images.stride()
    return sb, 0, sc, sh, sw


def _check_int32(images, weight, plan):
    """Row indices and in-patch / in-weight offsets are int32 in the kernels (row bases are int64)."""
    strides = images.stride()[-3:]
    limits = {"tokens (B*T*(1+N))": plan.B * plan.T * (plan.M + 1), "patches (B*T*N)": plan.B * plan.T * plan.GH * plan.GW,
              "in-patch offset": plan.C * strides[0] + plan.P * (strides[1] + strides[2]),
              "weight offset": weight.shape[0] * max(weight.stride())}
    for what, value in limits.items():
        if value >= 2**31:
            raise ValueError(f"patch_embed: {what} = {value} does not fit the kernels' int32 indexing")


def _fwd(images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, plan, out_dtype):
    _check_int32(images, weight, plan)
    G, D, K = plan.B * plan.T, weight.shape[0], weight[0].numel()
    off = 1 if plan.has_cls else 0
    out = _empty(G, off + plan.M, D, device=images.device, dtype=out_dtype)
    flags = kernel_flags(images.dtype)  # read at launch: torch.get_float32_matmul_precision() now
    cfg = fwd_config(G * plan.M, D, plan.tiles, images.dtype, flags["PRECISION"])
    # token tiles, then the [CLS] tiles of the same launch
    m_tiles = cdiv(G * plan.M, cfg.block_m) + (cdiv(G, cfg.block_m) if plan.has_cls else 0)
    grid = (m_tiles * cdiv(D, cfg.block_n),)
    if grid[0] == 0:  # no images
        return out
    weight = _run_weight(weight, plan)

    def ptr(t):  # absent tensors: any valid pointer, never read (their HAS_* flag is off)
        return out if t is None else t

    _patch_embed_fwd_kernel[grid](
        images, weight, ptr(bias), ptr(pos), ptr(pos_cls), ptr(cls), ptr(mask_tok), ptr(tile_pos), ptr(pre_tile),
        ptr(plan.ar_ids), ptr(coef), ptr(plan.perm), ptr(plan.src_idx), ptr(plan.pos_idx), ptr(plan.tok_mask),
        ptr(plan.tile_used), out,
        G, plan.M, plan.T, plan.GW, plan.H, plan.W, D, K, plan.N + 1,
        *_image_strides(images, plan.tiles), *weight.stride(),
        C=plan.C, P=plan.P, CL_ORDER=plan.cl_order, RUN_LEN=_run_len(plan), IMG_DENSE=_dense_run(images, plan),
        ALIGN=_align(images, plan), PAD=plan.pad, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        HAS_POS_CLS=pos_cls is not None, HAS_CLS=plan.has_cls, HAS_MASK=plan.tok_mask is not None,
        HAS_PERM=plan.perm is not None, HAS_SRC=plan.src_idx is not None, HAS_POS_IDX=plan.pos_idx is not None,
        TILES=plan.tiles, HAS_TILE_MASK=plan.tile_used is not None, OUT_DTYPE=TL_DTYPES[out_dtype], **flags,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _bwd_images(gout, images, weight, plan):
    G, D, K = plan.B * plan.T, weight.shape[0], weight[0].numel()
    off = 1 if plan.has_cls else 0
    if plan.src_idx is not None and plan.keep is None:
        # "random other patch" tokens: a patch may feed several tokens, so accumulate in PyTorch
        tok = gout[:, off:].float()
        if plan.tok_mask is not None:
            tok = tok * (plan.tok_mask.view(G, plan.M, 1) == 0)
        rows = tok @ weight.reshape(D, K).float()
        patches = torch.zeros(G, plan.GH * plan.GW, K, device=gout.device, dtype=torch.float32)
        patches.scatter_add_(1, plan.src_idx.view(G, plan.M, 1).long().expand(G, plan.M, K), rows)
        img = patches.view(plan.B, plan.GH, plan.GW, plan.C, plan.P, plan.P).permute(0, 3, 1, 4, 2, 5)
        img = img.reshape(plan.B, plan.C, plan.GH * plan.P, plan.GW * plan.P)[:, :, : plan.H, : plan.W]
        return torch.empty_like(images).copy_(img)  # a fresh tensor laid out as images (the fake op's promise)
    dimg = _empty_like(images)
    NP = plan.GH * plan.GW
    inv = None
    if plan.keep is not None:
        inv = torch.full((G, NP), -1, dtype=torch.int32, device=gout.device)
        inv.scatter_(1, plan.keep.long(), torch.arange(plan.M, dtype=torch.int32, device=gout.device).expand(G, -1))
    flags = kernel_flags(images.dtype)
    cfg = dx_config(images.dtype, flags["PRECISION"])
    grid = (cdiv(G * NP, cfg.block_m) * cdiv(_k_padded(plan), cfg.block_n),)
    if grid[0] == 0:
        return dimg
    weight = _run_weight(weight, plan)
    _patch_embed_bwd_dx_kernel[grid](
        gout, weight, inv if inv is not None else gout, plan.tok_mask if plan.tok_mask is not None else gout,
        plan.tile_used if plan.tile_used is not None else gout, dimg,
        G, plan.M, NP, plan.T, plan.GW, plan.H, plan.W, D, K,
        *_image_strides(dimg, plan.tiles), *weight.stride(),
        C=plan.C, P=plan.P, CL_ORDER=plan.cl_order, RUN_LEN=_run_len(plan), IMG_DENSE=_dense_run(dimg, plan),
        ALIGN=_align(dimg, plan), PAD=plan.pad, OFF=off, HAS_INV=inv is not None,
        HAS_MASK=plan.tok_mask is not None, HAS_TILE_MASK=plan.tile_used is not None,
        OUT_DTYPE=TL_DTYPES[images.dtype], **flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dimg


def _dw_like(weight, plan):
    """An empty d_weight laid out as _bwd_weight returns it (channels-last problems: (D, P, P, C) memory)."""
    D, C, P = weight.shape[0], plan.C, plan.P
    if plan.cl_order:
        return weight.new_empty((D, P, P, C)).permute(0, 3, 1, 2)
    return weight.new_empty(weight.shape)


def _bwd_weight(gout, images, weight, want_bias, plan):
    G, D, K = plan.B * plan.T, weight.shape[0], weight[0].numel()
    flags = kernel_flags(images.dtype)
    cfg = dw_config(images.dtype, flags["PRECISION"])
    rows = G * plan.M
    if rows == 0:  # no tokens computed (empty batch, or MAE keeping none)
        return _dw_like(weight, plan).zero_(), (torch.zeros(D, device=gout.device) if want_bias else None)
    tiles = cdiv(D, cfg.block_m) * cdiv(_k_padded(plan), cfg.block_n)
    splits = dw_splits(gout.device, tiles, rows, cfg.block_k)
    per_split = cdiv(cdiv(rows, splits), cfg.block_k) * cfg.block_k
    splits = cdiv(rows, per_split)
    dw_part = _empty(splits, D, K, device=gout.device, dtype=torch.float32)
    db_part = _empty(splits, D, device=gout.device, dtype=torch.float32) if want_bias else dw_part
    _patch_embed_bwd_dw_kernel[(tiles, splits)](
        gout, images, plan.perm if plan.perm is not None else gout, plan.src_idx if plan.src_idx is not None else gout,
        plan.tok_mask if plan.tok_mask is not None else gout, plan.tile_used if plan.tile_used is not None else gout,
        dw_part, db_part,
        G, plan.M, plan.T, plan.GW, plan.H, plan.W, D, K, per_split,
        *_image_strides(images, plan.tiles),
        C=plan.C, P=plan.P, CL_ORDER=plan.cl_order, RUN_LEN=_run_len(plan), IMG_DENSE=_dense_run(images, plan),
        ALIGN=_align(images, plan), PAD=plan.pad, OFF=1 if plan.has_cls else 0, HAS_PERM=plan.perm is not None,
        HAS_SRC=plan.src_idx is not None, HAS_MASK=plan.tok_mask is not None,
        HAS_TILE_MASK=plan.tile_used is not None, HAS_BIAS=want_bias, **flags,
        BLOCK_D=cfg.block_m, BLOCK_K=cfg.block_n, BLOCK_R=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dw = dw_part.sum(0)
    if plan.cl_order:
        dw = dw.view(D, plan.P, plan.P, plan.C).permute(0, 3, 1, 2)
    dw = dw.reshape(weight.shape).to(weight.dtype)
    db = db_part.sum(0) if want_bias else None
    return dw, db


# ----------------------------------------------------------------------------------------------
# Custom ops: torch.compile sees opaque calls with fake shapes (the launchers read data pointers and
# strides, which fake tensors do not have). A Plan crosses the op boundary as its ints and its index
# tensors; the small parameter gradients (reductions of dOut) stay plain PyTorch in the autograd formula.

_PLAN_INTS = ("B", "T", "C", "P", "GH", "GW", "H", "W", "N", "M", "has_cls", "pad", "cl_order", "tiles")
_PLAN_TENSORS = ("perm", "src_idx", "pos_idx", "tok_mask", "tile_used", "ar_ids")


def _plan_args(plan):
    return [int(getattr(plan, k)) for k in _PLAN_INTS], [getattr(plan, k) for k in _PLAN_TENSORS]


def _plan_from(dims, index):
    d = dict(zip(_PLAN_INTS, dims))
    d.update(zip(_PLAN_TENSORS, index))
    for k in ("has_cls", "pad", "cl_order", "tiles"):
        d[k] = bool(d[k])
    # MAE keep indices are the position indices (patch_embed passes the same tensor for both)
    d["keep"] = d["pos_idx"].view(d["B"], d["M"]) if d["pos_idx"] is not None else None
    return Plan(**d)


@torch.library.custom_op("mmfast::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd_op(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        pos: Optional[torch.Tensor], pos_cls: Optional[torch.Tensor], cls: Optional[torch.Tensor],
                        mask_tok: Optional[torch.Tensor], tile_pos: Optional[torch.Tensor],
                        pre_tile: Optional[torch.Tensor], coef: Optional[torch.Tensor], perm: Optional[torch.Tensor],
                        src_idx: Optional[torch.Tensor], pos_idx: Optional[torch.Tensor],
                        tok_mask: Optional[torch.Tensor], tile_used: Optional[torch.Tensor],
                        ar_ids: Optional[torch.Tensor], dims: List[int], out_dtype: torch.dtype) -> torch.Tensor:
    plan = _plan_from(dims, (perm, src_idx, pos_idx, tok_mask, tile_used, ar_ids))
    return _fwd(images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, plan, out_dtype)


@_patch_embed_fwd_op.register_fake
def _(images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, perm, src_idx, pos_idx, tok_mask,
      tile_used, ar_ids, dims, out_dtype):
    plan = _plan_from(dims, (perm, src_idx, pos_idx, tok_mask, tile_used, ar_ids))
    return images.new_empty((plan.B * plan.T, (1 if plan.has_cls else 0) + plan.M, weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("mmfast::patch_embed_bwd", mutates_args=())
def _patch_embed_bwd_op(gout: torch.Tensor, images: torch.Tensor, weight: torch.Tensor, perm: Optional[torch.Tensor],
                        src_idx: Optional[torch.Tensor], pos_idx: Optional[torch.Tensor],
                        tok_mask: Optional[torch.Tensor], tile_used: Optional[torch.Tensor],
                        ar_ids: Optional[torch.Tensor], dims: List[int], need_dimg: bool, need_dw: bool,
                        need_db: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_images, d_weight, d_bias fp32), 0-element tensors for those not needed; gout in the images' dtype."""
    plan = _plan_from(dims, (perm, src_idx, pos_idx, tok_mask, tile_used, ar_ids))
    dimg = _bwd_images(gout, images, weight, plan) if need_dimg else gout.new_empty(0)
    dw, db = gout.new_empty(0), gout.new_empty(0)  # distinct tensors: a custom op's outputs may not alias
    if need_dw or need_db:
        w, b = _bwd_weight(gout, images, weight, need_db, plan)
        dw = w if need_dw else dw
        db = b if need_db else db
    return dimg, dw, db


@_patch_embed_bwd_op.register_fake
def _(gout, images, weight, perm, src_idx, pos_idx, tok_mask, tile_used, ar_ids, dims, need_dimg, need_dw, need_db):
    plan = _plan_from(dims, (perm, src_idx, pos_idx, tok_mask, tile_used, ar_ids))
    return (torch.empty_like(images) if need_dimg else gout.new_empty(0),
            _dw_like(weight, plan) if need_dw else gout.new_empty(0),
            gout.new_empty((weight.shape[0],), dtype=torch.float32) if need_db else gout.new_empty(0))


# the backward's GEMM gradients carry no graph: gradients of gradients through them raise
_patch_embed_bwd_op.register_autograd(no_double_backward("patch_embed / tile_patch_embed"))


def _setup_context(ctx, inputs, output):
    (images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, *index, dims, out_dtype) = inputs
    # frozen tables made under inference_mode (the eager chain only adds them, saving nothing): normal copies
    ctx.save_for_backward(images, weight, bias, *map(saveable, (pos, pos_cls, tile_pos, pre_tile, coef, *index)))
    ctx.dims = dims
    ctx.cls_dtype = cls.dtype if cls is not None else None
    ctx.mask_dtype = mask_tok.dtype if mask_tok is not None else None


def _backward(ctx, gout):
    images, weight, bias, pos, pos_cls, tile_pos, pre_tile, coef, *index = ctx.saved_tensors
    needs = ctx.needs_input_grad
    plan = _plan_from(ctx.dims, index)
    gout = gout.contiguous()
    G, off, D = plan.B * plan.T, 1 if plan.has_cls else 0, weight.shape[0]
    grads = [None] * 18
    need_db = bias is not None and needs[2]
    if needs[0] or needs[1] or need_db:
        # the convolution's output gradient in its own dtype, as conv2d's backward sees it in the eager
        # chain (where fp32 tables promoted the sum: the promotion's backward rounds dOut to the images' dtype)
        dimg, dw, db = _patch_embed_bwd_op(gout.to(images.dtype), images, weight, *index, list(ctx.dims), needs[0],
                                           needs[1], need_db)
        grads[0] = dimg if needs[0] else None
        grads[1] = dw if needs[1] else None
        grads[2] = db.to(bias.dtype) if need_db else None
    if not any(needs[3:10]):
        return tuple(grads)
    # reductions of dOut accumulate in fp32 without materializing an fp32 copy of it
    go = gout
    if plan.tile_used is not None:  # rows of unused tiles are constant zeros: no gradient flows
        go = go * (plan.tile_used.view(G, 1, 1) != 0).to(go.dtype)
    tok = go[:, off:]
    c_pos = coef[0].float() if coef is not None else 1.0
    tok_sum = None
    if pos is not None and (needs[3] or needs[9]):
        if plan.pos_idx is not None:
            tok_sum = torch.zeros(pos.shape, device=go.device, dtype=torch.float32)
            tok_sum.index_add_(0, plan.pos_idx.long(), tok.reshape(-1, D).float())
        else:
            tok_sum = tok.sum(0, dtype=torch.float32)
        grads[3] = (c_pos * tok_sum).to(pos.dtype) if needs[3] else None
    cls_sum = go[:, 0].sum(0, dtype=torch.float32) if plan.has_cls else None
    if pos_cls is not None and needs[4]:
        grads[4] = (c_pos * cls_sum).to(pos_cls.dtype)
    if needs[5]:
        grads[5] = cls_sum.to(ctx.cls_dtype)
    if needs[6]:
        masked = (plan.tok_mask.view(G, plan.M, 1) != 0).to(tok.dtype)
        grads[6] = (tok * masked).sum((0, 1), dtype=torch.float32).to(ctx.mask_dtype)
    if plan.tiles and (needs[7] or needs[8] or needs[9]):
        T, rows_per_tile = plan.T, plan.N + 1
        S = torch.zeros(tile_pos.shape, device=go.device, dtype=torch.float32)
        per_image = go.view(plan.B, T, rows_per_tile, D)
        for b0 in range(0, plan.B, 4):  # fp32 copies of a few images at a time, not of all of dOut
            S.index_add_(0, plan.ar_ids[b0:b0 + 4].long(), per_image[b0:b0 + 4].float())
        Q = S[:, :, 1:].sum(2)
        if needs[7]:
            grads[7] = (coef[1] * S).to(tile_pos.dtype)
        if needs[8]:
            grads[8] = (coef[2] * Q).to(pre_tile.dtype)
        if needs[9]:
            d_pos_coef = (pos.float() * tok_sum).sum() + (pos_cls.float() * cls_sum).sum()
            grads[9] = torch.stack([d_pos_coef, (tile_pos.float() * S).sum(), (pre_tile.float() * Q).sum()])
    return tuple(grads)


_patch_embed_fwd = register_autograd(_patch_embed_fwd_op, _backward, _setup_context)


def patch_embed_apply(images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, plan, out_dtype):
    """out = epilogue(gather(images) @ W^T) in out_dtype: see patch_embed / tile_patch_embed for the math."""
    dims, index = _plan_args(plan)
    return _patch_embed_fwd(images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, *index,
                            dims, out_dtype)
