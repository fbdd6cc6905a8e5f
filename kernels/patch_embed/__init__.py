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
"""
import math
from collections import OrderedDict, namedtuple

import torch
import triton
import triton.language as tl

from .._aot import CompileSpec
from .._dispatch import interpreting, resolve_backend
from ..reference import patch_embed_reference, resample_pos_embed_reference, tile_patch_embed_reference
from ._triton import _patch_embed_bwd_dw_kernel, _patch_embed_bwd_dx_kernel, _patch_embed_fwd_kernel

__all__ = ["patch_embed", "tile_patch_embed", "resample_pos_embed", "vit_masked_patch_sampler",
           "mae_keep_indices", "compile_specs"]

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_SIG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)

# ----------------------------------------------------------------------------------------------
# Launch configuration (sm_80 and sm_90 alike: the op is small and gather-bound, so one tile shape
# per kernel serves both; a smaller one for tiny problems keeps more programs in flight).

Config = namedtuple("Config", "block_m block_n block_k num_warps num_stages")
# Sizes are bounded by registers, not shared memory: the gathered A tile needs per-row 64-bit bases
# and the epilogue loads 2D tiles of position rows, so 128x128 tiles spill (compile-report).
_FWD_LARGE = Config(128, 64, 32, 8, 3)
_FWD_SMALL = Config(64, 64, 32, 4, 2)
_FWD_TILES = Config(64, 64, 32, 8, 3)  # two more epilogue tables (tile position, pre-tile)
_DX = Config(128, 64, 32, 8, 3)  # rows = image patches, n = K, k = D
_DX_FP32 = Config(64, 64, 32, 8, 3)  # fp32 tiles are twice the bytes: 128 rows spill on sm_80
_DW = Config(128, 64, 32, 8, 3)  # m = D, n = K, k = rows


def _fwd_config(rows, d, tiles):
    if tiles:
        return _FWD_TILES
    return _FWD_LARGE if rows >= 4096 and d >= 128 else _FWD_SMALL


def _dw_splits(device, tiles, rows, block_r):
    if device.type != "cuda":
        return min(2, triton.cdiv(rows, block_r))  # exercise the split path cheaply under the interpreter
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(4 * sms, tiles), triton.cdiv(rows, 4 * block_r)))


def compile_specs():
    """Every kernel x config x dtype the launchers choose (main feature combinations)."""
    fwd_sig = {n: "*fp32" for n in ("img", "w", "bias", "pos", "pos_cls", "cls", "mask_tok", "tile_pos", "pre_tile",
                                    "ar_ids", "coef", "perm", "src_idx", "pos_idx", "tok_mask", "tile_used", "out")}
    # int arguments below 2**31 are passed as i32 by Triton's launcher: compile what runs
    fwd_sig.update({n: "i32" for n in ("G", "M", "T", "GW", "H", "W", "D", "K", "R_TP", "s_ib", "s_it", "s_ic", "s_ih",
                                       "s_iw", "s_wd", "s_wc", "s_wh", "s_ww")})
    fwd_const = ("C", "P", "CL_ORDER", "PXP", "ALIGN", "PAD", "HAS_BIAS", "HAS_POS", "HAS_POS_CLS", "HAS_CLS", "HAS_MASK", "HAS_PERM",
                 "HAS_SRC", "HAS_POS_IDX", "TILES", "HAS_TILE_MASK", "OUT_DTYPE", "DOT_FP32", "EMULATE", "ALLOW_TF32",
                 "BLOCK_M", "BLOCK_N", "BLOCK_K")
    fwd_sig.update({n: "constexpr" for n in fwd_const})
    dx_sig = {"dout": "*fp32", "w": "*fp32", "inv": "*i32", "tok_mask": "*u8", "tile_used": "*u8", "dimg": "*fp32"}
    dx_sig.update({n: "i32" for n in ("G", "M", "NP", "T", "GW", "H", "W", "D", "K", "s_ib", "s_it", "s_ic", "s_ih",
                                      "s_iw", "s_wd", "s_wc", "s_wh", "s_ww")})
    dx_sig.update({n: "constexpr" for n in ("C", "P", "CL_ORDER", "PXP", "ALIGN", "PAD", "OFF", "HAS_INV", "HAS_MASK", "HAS_TILE_MASK",
                                            "OUT_DTYPE", "DOT_FP32", "EMULATE", "ALLOW_TF32", "BLOCK_M", "BLOCK_N",
                                            "BLOCK_K")})
    dw_sig = {"dout": "*fp32", "img": "*fp32", "perm": "*i32", "src_idx": "*i32", "tok_mask": "*u8",
              "tile_used": "*u8", "dw_part": "*fp32", "db_part": "*fp32"}
    dw_sig.update({n: "i32" for n in ("G", "M", "T", "GW", "H", "W", "D", "K", "ROWS_PER_SPLIT", "s_ib", "s_it", "s_ic",
                                      "s_ih", "s_iw")})
    dw_sig.update({n: "constexpr" for n in ("C", "P", "CL_ORDER", "PXP", "ALIGN", "PAD", "OFF", "HAS_PERM", "HAS_SRC", "HAS_MASK",
                                            "HAS_TILE_MASK", "HAS_BIAS", "DOT_FP32", "ALLOW_TF32", "BLOCK_D", "BLOCK_K",
                                            "BLOCK_R")})

    def typed(sig, dtype, names):
        s = dict(sig)
        for n in names:
            s[n] = "*" + _SIG[dtype]
        return s

    # (dtype, label, P, C, channels-last order, cls, mask, tiles, forward configs): every config the
    # launchers choose appears; 16-bit dtypes x feature mixes are sampled (the code shape is the same)
    variants = [
        (torch.bfloat16, "vit-b16 cls", 16, 3, False, True, False, False, (_FWD_LARGE, _FWD_SMALL)),
        (torch.bfloat16, "clip-l14 cls nhwc", 14, 3, True, True, False, False, (_FWD_LARGE,)),
        (torch.bfloat16, "vit-b16 masked", 16, 3, False, True, True, False, (_FWD_LARGE,)),
        (torch.bfloat16, "mllama tiles", 14, 3, False, True, False, True, (_FWD_TILES,)),
        (torch.float16, "vit-b16 cls", 16, 3, False, True, False, False, (_FWD_LARGE,)),
        (torch.float32, "vit-b16 cls", 16, 3, False, True, False, False, (_FWD_LARGE,)),
    ]
    for dtype, label, P, C, cl, has_cls, has_mask, tiles, fwd_configs in variants:
        # 224/336/560-pixel NCHW rows: pixel runs start at multiples of gcd(P, 16 bytes)
        layout = dict(PXP=triton.next_power_of_2(P), ALIGN=1 if cl else math.gcd(P, 16 // dtype.itemsize))
        for cfg in fwd_configs:
            sig = typed(fwd_sig, dtype, ("img", "w", "bias", "pos", "pos_cls", "cls", "mask_tok", "tile_pos",
                                         "pre_tile", "out"))
            sig.update(ar_ids="*i32", coef="*fp32", perm="*i32", src_idx="*i32", pos_idx="*i32", tok_mask="*u8",
                       tile_used="*u8")
            yield CompileSpec(
                kernel=_patch_embed_fwd_kernel, signature=sig,
                constexprs=dict(C=C, P=P, CL_ORDER=cl, **layout, PAD=False, HAS_BIAS=not tiles, HAS_POS=True,
                                HAS_POS_CLS=has_cls, HAS_CLS=has_cls, HAS_MASK=has_mask, HAS_PERM=has_mask,
                                HAS_SRC=False, HAS_POS_IDX=False, TILES=tiles, HAS_TILE_MASK=tiles,
                                OUT_DTYPE=_TL_DTYPES[dtype], DOT_FP32=False, EMULATE=False, ALLOW_TF32=True,
                                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                label=f"fwd {_SIG[dtype]} {label} P={P} BLOCK={cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps}")
        dx = _DX_FP32 if dtype == torch.float32 else _DX
        yield CompileSpec(
            kernel=_patch_embed_bwd_dx_kernel, signature=typed(dx_sig, dtype, ("dout", "w", "dimg")),
            constexprs=dict(C=C, P=P, CL_ORDER=cl, **layout, PAD=False, OFF=1, HAS_INV=False, HAS_MASK=has_mask,
                            HAS_TILE_MASK=tiles, OUT_DTYPE=_TL_DTYPES[dtype], DOT_FP32=False, EMULATE=False,
                            ALLOW_TF32=True, BLOCK_M=dx.block_m, BLOCK_N=dx.block_n, BLOCK_K=dx.block_k),
            num_warps=dx.num_warps, num_stages=dx.num_stages,
            label=f"bwd d_images {_SIG[dtype]} {label} P={P} BLOCK={dx.block_m}x{dx.block_n}x{dx.block_k}")
        yield CompileSpec(
            kernel=_patch_embed_bwd_dw_kernel, signature=typed(dw_sig, dtype, ("dout", "img")),
            constexprs=dict(C=C, P=P, CL_ORDER=cl, **layout, PAD=False, OFF=1, HAS_PERM=False, HAS_SRC=False,
                            HAS_MASK=has_mask, HAS_TILE_MASK=tiles, HAS_BIAS=not tiles, DOT_FP32=False,
                            ALLOW_TF32=True, BLOCK_D=_DW.block_m, BLOCK_K=_DW.block_n, BLOCK_R=_DW.block_k),
            num_warps=_DW.num_warps, num_stages=_DW.num_stages,
            label=f"bwd d_weight {_SIG[dtype]} {label} P={P} BLOCK={_DW.block_m}x{_DW.block_n}x{_DW.block_k}")


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


def _dot_fp32(dtype):
    # the interpreter's tl.dot mishandles 16-bit operands; fp32 operands holding the same values are exact
    return interpreting() and dtype != torch.float32


def _allow_tf32():
    return bool(torch.backends.cudnn.allow_tf32)


def _pxp(P):
    return triton.next_power_of_2(P)


def _k_padded(plan):
    """Length of the kernels' reduction space (NCHW: (c, py, px) with px padded to a power of two)."""
    return plan.C * plan.P * (plan.P if plan.cl_order else _pxp(plan.P))


def _align(images, plan):
    """Elements every pixel-run start is a multiple of (for vector loads), 1 when not provable."""
    if plan.cl_order or images.stride(-1) != 1:
        return 1
    a = 16 // images.element_size()
    for v in (plan.P,) + tuple(images.stride()[:-1]):
        a = math.gcd(a, v)
    return a


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


def _fwd(images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, plan):
    _check_int32(images, weight, plan)
    G, D, K = plan.B * plan.T, weight.shape[0], weight[0].numel()
    off = 1 if plan.has_cls else 0
    out = _empty(G, off + plan.M, D, device=images.device, dtype=images.dtype)
    cfg = _fwd_config(G * plan.M, D, plan.tiles)
    dummy = out
    # token tiles, then the [CLS] tiles of the same launch
    m_tiles = triton.cdiv(G * plan.M, cfg.block_m) + (triton.cdiv(G, cfg.block_m) if plan.has_cls else 0)
    grid = (m_tiles * triton.cdiv(D, cfg.block_n),)

    def ptr(t):
        return dummy if t is None else t

    _patch_embed_fwd_kernel[grid](
        images, weight, ptr(bias), ptr(pos), ptr(pos_cls), ptr(cls), ptr(mask_tok), ptr(tile_pos), ptr(pre_tile),
        ptr(plan.ar_ids), ptr(coef), ptr(plan.perm), ptr(plan.src_idx), ptr(plan.pos_idx), ptr(plan.tok_mask),
        ptr(plan.tile_used), out,
        G, plan.M, plan.T, plan.GW, plan.H, plan.W, D, K, plan.N + 1,
        *_image_strides(images, plan.tiles), *weight.stride(),
        C=plan.C, P=plan.P, CL_ORDER=plan.cl_order, PXP=_pxp(plan.P), ALIGN=_align(images, plan), PAD=plan.pad,
        HAS_BIAS=bias is not None, HAS_POS=pos is not None, HAS_POS_CLS=pos_cls is not None, HAS_CLS=plan.has_cls,
        HAS_MASK=plan.tok_mask is not None, HAS_PERM=plan.perm is not None, HAS_SRC=plan.src_idx is not None,
        HAS_POS_IDX=plan.pos_idx is not None, TILES=plan.tiles, HAS_TILE_MASK=plan.tile_used is not None,
        OUT_DTYPE=_TL_DTYPES[images.dtype], DOT_FP32=_dot_fp32(images.dtype), EMULATE=interpreting(),
        ALLOW_TF32=_allow_tf32(),
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
        return img.to(images.dtype)
    dimg = _empty_like(images)
    NP = plan.GH * plan.GW
    inv = None
    if plan.keep is not None:
        inv = torch.full((G, NP), -1, dtype=torch.int32, device=gout.device)
        inv.scatter_(1, plan.keep.long(), torch.arange(plan.M, dtype=torch.int32, device=gout.device).expand(G, -1))
    cfg = _DX_FP32 if images.dtype == torch.float32 else _DX
    grid = (triton.cdiv(G * NP, cfg.block_m) * triton.cdiv(_k_padded(plan), cfg.block_n),)
    _patch_embed_bwd_dx_kernel[grid](
        gout, weight, inv if inv is not None else gout, plan.tok_mask if plan.tok_mask is not None else gout,
        plan.tile_used if plan.tile_used is not None else gout, dimg,
        G, plan.M, NP, plan.T, plan.GW, plan.H, plan.W, D, K,
        *_image_strides(dimg, plan.tiles), *weight.stride(),
        C=plan.C, P=plan.P, CL_ORDER=plan.cl_order, PXP=_pxp(plan.P), ALIGN=_align(dimg, plan), PAD=plan.pad, OFF=off,
        HAS_INV=inv is not None,
        HAS_MASK=plan.tok_mask is not None, HAS_TILE_MASK=plan.tile_used is not None,
        OUT_DTYPE=_TL_DTYPES[images.dtype], DOT_FP32=_dot_fp32(images.dtype), EMULATE=interpreting(),
        ALLOW_TF32=_allow_tf32(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dimg


def _bwd_weight(gout, images, weight, want_bias, plan):
    G, D, K = plan.B * plan.T, weight.shape[0], weight[0].numel()
    cfg = _DW
    rows = G * plan.M
    tiles = triton.cdiv(D, cfg.block_m) * triton.cdiv(_k_padded(plan), cfg.block_n)
    splits = _dw_splits(gout.device, tiles, rows, cfg.block_k)
    per_split = triton.cdiv(triton.cdiv(rows, splits), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(rows, per_split)
    dw_part = _empty(splits, D, K, device=gout.device, dtype=torch.float32)
    db_part = _empty(splits, D, device=gout.device, dtype=torch.float32) if want_bias else dw_part
    _patch_embed_bwd_dw_kernel[(tiles, splits)](
        gout, images, plan.perm if plan.perm is not None else gout, plan.src_idx if plan.src_idx is not None else gout,
        plan.tok_mask if plan.tok_mask is not None else gout, plan.tile_used if plan.tile_used is not None else gout,
        dw_part, db_part,
        G, plan.M, plan.T, plan.GW, plan.H, plan.W, D, K, per_split,
        *_image_strides(images, plan.tiles),
        C=plan.C, P=plan.P, CL_ORDER=plan.cl_order, PXP=_pxp(plan.P), ALIGN=_align(images, plan), PAD=plan.pad,
        OFF=1 if plan.has_cls else 0, HAS_PERM=plan.perm is not None, HAS_SRC=plan.src_idx is not None, HAS_MASK=plan.tok_mask is not None,
        HAS_TILE_MASK=plan.tile_used is not None, HAS_BIAS=want_bias, DOT_FP32=_dot_fp32(images.dtype),
        ALLOW_TF32=_allow_tf32(), BLOCK_D=cfg.block_m, BLOCK_K=cfg.block_n, BLOCK_R=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dw = dw_part.sum(0)
    if plan.cl_order:
        dw = dw.view(D, plan.P, plan.P, plan.C).permute(0, 3, 1, 2)
    dw = dw.reshape(weight.shape).to(weight.dtype)
    db = db_part.sum(0) if want_bias else None
    return dw, db


class _PatchEmbedFn(torch.autograd.Function):
    """out = epilogue(gather(images) @ W^T): see patch_embed / tile_patch_embed for the math."""

    @staticmethod
    def forward(ctx, images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, plan):
        out = _fwd(images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, plan)
        ctx.save_for_backward(images, weight, bias, pos, pos_cls, tile_pos, pre_tile, coef)
        ctx.plan = plan
        ctx.cls_dtype = cls.dtype if cls is not None else None
        ctx.mask_dtype = mask_tok.dtype if mask_tok is not None else None
        return out

    @staticmethod
    def backward(ctx, gout):
        images, weight, bias, pos, pos_cls, tile_pos, pre_tile, coef = ctx.saved_tensors
        plan = ctx.plan
        needs = ctx.needs_input_grad
        gout = gout.contiguous()
        G, off, D = plan.B * plan.T, 1 if plan.has_cls else 0, weight.shape[0]
        grads = [None] * 11
        if needs[0]:
            grads[0] = _bwd_images(gout, images, weight, plan)
        if needs[1] or (bias is not None and needs[2]):
            dw, db = _bwd_weight(gout, images, weight, bias is not None and needs[2], plan)
            grads[1] = dw if needs[1] else None
            grads[2] = db.to(bias.dtype) if db is not None else None
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
            T, R_TP = plan.T, plan.N + 1
            S = torch.zeros(tile_pos.shape, device=go.device, dtype=torch.float32)
            per_image = go.view(plan.B, T, R_TP, D)
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


# ----------------------------------------------------------------------------------------------
# Position tables

_POS_CACHE = OrderedDict()
_POS_CACHE_MAX = 16


def resample_pos_embed(table, new_grid, old_grid, *, interpolation="bicubic", mode="timm"):
    """Patch position rows (N_old, D) on old_grid -> (N_new, D) on new_grid (timm or Hugging Face math,
    see kernels.reference.resample_pos_embed_reference). Cached per (table version, grids, mode) when
    no gradient is recorded; with a table that requires grad it is recomputed, so d_pos_embed flows
    through F.interpolate's backward."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    if torch.is_grad_enabled() and table.requires_grad:
        return resample_pos_embed_reference(table, new_grid, old_grid, interpolation=interpolation, mode=mode)
    key = (table.data_ptr(), table._version, tuple(table.shape), table.stride(), table.dtype, table.device,
           tuple(old_grid), tuple(new_grid), interpolation, mode)
    hit = _POS_CACHE.get(key)
    if hit is not None:
        _POS_CACHE.move_to_end(key)
        return hit
    with torch.no_grad():
        out = resample_pos_embed_reference(table, new_grid, old_grid, interpolation=interpolation, mode=mode)
    _POS_CACHE[key] = out
    if len(_POS_CACHE) > _POS_CACHE_MAX:
        _POS_CACHE.popitem(last=False)
    return out


def _square(n):
    s = math.isqrt(n) if n >= 0 else -1
    return (s, s) if s > 0 and s * s == n else None


def _resolve_pos(pos_embed, grid, D, has_cls, pos_grid, interpolation, mode):
    """-> (patch rows (gh*gw, D) on `grid`, [CLS] position row (D,) or None)."""
    if pos_embed is None:
        return None, None
    if isinstance(pos_embed, (tuple, list)):
        if len(pos_embed) != 2:
            raise ValueError("pos_embed as a sequence must be (row_table (gh0, D/2), col_table (gw0, D/2))")
        rows, cols = (t.reshape(t.shape[-2], t.shape[-1]) if t.dim() == 3 and t.shape[0] == 1 else t for t in pos_embed)
        if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] + cols.shape[1] != D:
            raise ValueError(f"2D pos_embed must be (gh0, D1) and (gw0, D2) tables with D1 + D2 = D = {D}, got "
                             f"{tuple(rows.shape)} and {tuple(cols.shape)}")
        rows = resample_pos_embed(rows, (grid[0], 1), (rows.shape[0], 1), interpolation=interpolation, mode=mode)
        cols = resample_pos_embed(cols, (1, grid[1]), (1, cols.shape[0]), interpolation=interpolation, mode=mode)
        gh, gw = grid
        table = torch.cat([rows[:, None, :].expand(gh, gw, rows.shape[1]), cols[None, :, :].expand(gh, gw, cols.shape[1])],
                          dim=-1)
        return table.reshape(gh * gw, D), None
    if not isinstance(pos_embed, torch.Tensor):
        raise ValueError(f"pos_embed must be a tensor or a (row, col) pair of tensors, got {type(pos_embed).__name__}")
    table = pos_embed[0] if pos_embed.dim() == 3 and pos_embed.shape[0] == 1 else pos_embed
    if table.dim() != 2 or table.shape[1] != D:
        raise ValueError(f"pos_embed must be (L, D) or (1, L, D) with D = {D}, got {tuple(pos_embed.shape)}")
    L, N = table.shape[0], grid[0] * grid[1]
    if pos_grid is not None:
        old = tuple(int(x) for x in pos_grid)
        if L not in (old[0] * old[1], old[0] * old[1] + 1):
            raise ValueError(f"pos_embed has {L} rows but pos_grid={old} needs {old[0] * old[1]} (or one more with a "
                             "[CLS] position row first)")
        has_cls_row = L == old[0] * old[1] + 1
    elif L in (N, N + 1):
        old, has_cls_row = tuple(grid), L == N + 1
    elif _square(L):
        old, has_cls_row = _square(L), False
    elif _square(L - 1):
        old, has_cls_row = _square(L - 1), True
    else:
        raise ValueError(f"pos_embed has {L} rows: not the grid {tuple(grid)} (N = {N}, or N + 1 with a [CLS] row) nor "
                         "a square grid; pass pos_grid=(gh, gw) of the table")
    if has_cls_row and not has_cls:
        raise ValueError(f"pos_embed has a [CLS] position row ({L} = {old[0]}x{old[1]} + 1 rows) but cls_token is None")
    patch_rows = table[1:] if has_cls_row else table
    patch_rows = resample_pos_embed(patch_rows, grid, old, interpolation=interpolation, mode=mode)
    return patch_rows, (table[0] if has_cls_row else None)


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
    return t.reshape(D)


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
    the epilogue adds in fp32 and rounds once. Differentiable in every tensor argument.
    """
    D, C, P = _check_images_weight(images, weight, 4)
    B, _, H, W = images.shape
    device = images.device
    GH, GW = _grid(H, W, P, dynamic_pad)
    N = GH * GW
    bias = _vec("bias", bias, D, device)
    cls = _vec("cls_token", cls_token, D, device)
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
    chosen = resolve_backend("patch_embed", backend, device, supported=("triton",))
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
    return _PatchEmbedFn.apply(images, weight, bias, pos, pos_cls, cls, mask_token, None, None, None, plan)


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
    chosen = resolve_backend("tile_patch_embed", backend, device, supported=("triton",))
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
    out = _PatchEmbedFn.apply(images, weight, bias, pos_embed[1:], pos_embed[0], cls, None,
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
