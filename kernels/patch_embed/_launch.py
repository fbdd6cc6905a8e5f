"""Launch side of the fused patch embedding: configurations, compile specs, launchers and the
autograd Function (the Triton kernels themselves are in _triton.py)."""
import math
from collections import namedtuple
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._registry import CompileSpec
from .._dispatch import interpreting
from ._triton import _patch_embed_bwd_dw_kernel, _patch_embed_bwd_dx_kernel, _patch_embed_fwd_kernel

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
    fwd_const = ("C", "P", "CL_ORDER", "RUN", "X_RUN", "W_RUN", "ALIGN", "PAD", "HAS_BIAS", "HAS_POS", "HAS_POS_CLS", "HAS_CLS", "HAS_MASK", "HAS_PERM",
                 "HAS_SRC", "HAS_POS_IDX", "TILES", "HAS_TILE_MASK", "OUT_DTYPE", "DOT_FP32", "EMULATE", "ALLOW_TF32",
                 "BLOCK_M", "BLOCK_N", "BLOCK_K")
    fwd_sig.update({n: "constexpr" for n in fwd_const})
    dx_sig = {"dout": "*fp32", "w": "*fp32", "inv": "*i32", "tok_mask": "*u8", "tile_used": "*u8", "dimg": "*fp32"}
    dx_sig.update({n: "i32" for n in ("G", "M", "NP", "T", "GW", "H", "W", "D", "K", "s_ib", "s_it", "s_ic", "s_ih",
                                      "s_iw", "s_wd", "s_wc", "s_wh", "s_ww")})
    dx_sig.update({n: "constexpr" for n in ("C", "P", "CL_ORDER", "RUN", "X_RUN", "W_RUN", "ALIGN", "PAD", "OFF", "HAS_INV", "HAS_MASK", "HAS_TILE_MASK",
                                            "OUT_DTYPE", "DOT_FP32", "EMULATE", "ALLOW_TF32", "BLOCK_M", "BLOCK_N",
                                            "BLOCK_K")})
    dw_sig = {"dout": "*fp32", "img": "*fp32", "perm": "*i32", "src_idx": "*i32", "tok_mask": "*u8",
              "tile_used": "*u8", "dw_part": "*fp32", "db_part": "*fp32"}
    dw_sig.update({n: "i32" for n in ("G", "M", "T", "GW", "H", "W", "D", "K", "ROWS_PER_SPLIT", "s_ib", "s_it", "s_ic",
                                      "s_ih", "s_iw")})
    dw_sig.update({n: "constexpr" for n in ("C", "P", "CL_ORDER", "RUN", "X_RUN", "ALIGN", "PAD", "OFF", "HAS_PERM", "HAS_SRC", "HAS_MASK",
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
        # 224/336/560-pixel images: pixel runs start at multiples of gcd(P [* C], 16 bytes)
        run = triton.cdiv(P * C, 16) * 16 if cl else triton.next_power_of_2(P)
        layout = dict(RUN=run, X_RUN=True, ALIGN=math.gcd(P * C if cl else P, 16 // dtype.itemsize))
        for cfg in fwd_configs:
            sig = typed(fwd_sig, dtype, ("img", "w", "bias", "pos", "pos_cls", "cls", "mask_tok", "tile_pos",
                                         "pre_tile", "out"))
            sig.update(ar_ids="*i32", coef="*fp32", perm="*i32", src_idx="*i32", pos_idx="*i32", tok_mask="*u8",
                       tile_used="*u8")
            yield CompileSpec(
                kernel=_patch_embed_fwd_kernel, signature=sig,
                constexprs=dict(C=C, P=P, CL_ORDER=cl, **layout, W_RUN=True, PAD=False, HAS_BIAS=not tiles, HAS_POS=True,
                                HAS_POS_CLS=has_cls, HAS_CLS=has_cls, HAS_MASK=has_mask, HAS_PERM=has_mask,
                                HAS_SRC=False, HAS_POS_IDX=False, TILES=tiles, HAS_TILE_MASK=tiles,
                                OUT_DTYPE=_TL_DTYPES[dtype], DOT_FP32=False, EMULATE=False, ALLOW_TF32=True,
                                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                label=f"fwd {_SIG[dtype]} {label} P={P} BLOCK={cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps}")
        dx = _DX_FP32 if dtype == torch.float32 else _DX
        yield CompileSpec(
            kernel=_patch_embed_bwd_dx_kernel, signature=typed(dx_sig, dtype, ("dout", "w", "dimg")),
            constexprs=dict(C=C, P=P, CL_ORDER=cl, **layout, W_RUN=True, PAD=False, OFF=1, HAS_INV=False, HAS_MASK=has_mask,
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


def _run(plan):
    """Padded length of one contiguous pixel run (see _k_split): NCHW px in a row, channels-last (px, c)."""
    if plan.cl_order:
        return triton.cdiv(plan.P * plan.C, 16) * 16
    return triton.next_power_of_2(plan.P)


def _k_padded(plan):
    """Length of the kernels' reduction space: runs x padded run length."""
    return (plan.P if plan.cl_order else plan.C * plan.P) * _run(plan)


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
    """The weight with its pixel runs contiguous: a channels-last problem reads (D, P, P, C) rows, so
    its (D, C, P, P) weight is viewed through a permuted copy (D*K elements, made per call)."""
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

    if grid[0] == 0:  # no images
        return out
    weight = _run_weight(weight, plan)

    def ptr(t):
        return dummy if t is None else t

    _patch_embed_fwd_kernel[grid](
        images, weight, ptr(bias), ptr(pos), ptr(pos_cls), ptr(cls), ptr(mask_tok), ptr(tile_pos), ptr(pre_tile),
        ptr(plan.ar_ids), ptr(coef), ptr(plan.perm), ptr(plan.src_idx), ptr(plan.pos_idx), ptr(plan.tok_mask),
        ptr(plan.tile_used), out,
        G, plan.M, plan.T, plan.GW, plan.H, plan.W, D, K, plan.N + 1,
        *_image_strides(images, plan.tiles), *weight.stride(),
        C=plan.C, P=plan.P, CL_ORDER=plan.cl_order, RUN=_run(plan), X_RUN=_dense_run(images, plan), W_RUN=True,
        ALIGN=_align(images, plan), PAD=plan.pad, HAS_BIAS=bias is not None, HAS_POS=pos is not None, HAS_POS_CLS=pos_cls is not None, HAS_CLS=plan.has_cls,
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
        return torch.empty_like(images).copy_(img)  # a fresh tensor laid out as images (the fake op's promise)
    dimg = _empty_like(images)
    NP = plan.GH * plan.GW
    inv = None
    if plan.keep is not None:
        inv = torch.full((G, NP), -1, dtype=torch.int32, device=gout.device)
        inv.scatter_(1, plan.keep.long(), torch.arange(plan.M, dtype=torch.int32, device=gout.device).expand(G, -1))
    cfg = _DX_FP32 if images.dtype == torch.float32 else _DX
    grid = (triton.cdiv(G * NP, cfg.block_m) * triton.cdiv(_k_padded(plan), cfg.block_n),)
    if grid[0] == 0:
        return dimg
    weight = _run_weight(weight, plan)
    _patch_embed_bwd_dx_kernel[grid](
        gout, weight, inv if inv is not None else gout, plan.tok_mask if plan.tok_mask is not None else gout,
        plan.tile_used if plan.tile_used is not None else gout, dimg,
        G, plan.M, NP, plan.T, plan.GW, plan.H, plan.W, D, K,
        *_image_strides(dimg, plan.tiles), *weight.stride(),
        C=plan.C, P=plan.P, CL_ORDER=plan.cl_order, RUN=_run(plan), X_RUN=_dense_run(dimg, plan), W_RUN=True,
        ALIGN=_align(dimg, plan), PAD=plan.pad, OFF=off, HAS_INV=inv is not None,
        HAS_MASK=plan.tok_mask is not None, HAS_TILE_MASK=plan.tile_used is not None,
        OUT_DTYPE=_TL_DTYPES[images.dtype], DOT_FP32=_dot_fp32(images.dtype), EMULATE=interpreting(),
        ALLOW_TF32=_allow_tf32(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
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
    cfg = _DW
    rows = G * plan.M
    if rows == 0:  # no tokens computed (empty batch, or MAE keeping none)
        return _dw_like(weight, plan).zero_(), (torch.zeros(D, device=gout.device) if want_bias else None)
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
        C=plan.C, P=plan.P, CL_ORDER=plan.cl_order, RUN=_run(plan), X_RUN=_dense_run(images, plan),
        ALIGN=_align(images, plan), PAD=plan.pad, OFF=1 if plan.has_cls else 0, HAS_PERM=plan.perm is not None, HAS_SRC=plan.src_idx is not None, HAS_MASK=plan.tok_mask is not None,
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
                        ar_ids: Optional[torch.Tensor], dims: List[int]) -> torch.Tensor:
    plan = _plan_from(dims, (perm, src_idx, pos_idx, tok_mask, tile_used, ar_ids))
    return _fwd(images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, plan)


@_patch_embed_fwd_op.register_fake
def _(images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, perm, src_idx, pos_idx, tok_mask,
      tile_used, ar_ids, dims):
    plan = _plan_from(dims, (perm, src_idx, pos_idx, tok_mask, tile_used, ar_ids))
    return images.new_empty((plan.B * plan.T, (1 if plan.has_cls else 0) + plan.M, weight.shape[0]))


@torch.library.custom_op("mmfast::patch_embed_bwd", mutates_args=())
def _patch_embed_bwd_op(gout: torch.Tensor, images: torch.Tensor, weight: torch.Tensor, perm: Optional[torch.Tensor],
                        src_idx: Optional[torch.Tensor], pos_idx: Optional[torch.Tensor],
                        tok_mask: Optional[torch.Tensor], tile_used: Optional[torch.Tensor],
                        ar_ids: Optional[torch.Tensor], dims: List[int], need_dimg: bool, need_dw: bool,
                        need_db: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_images, d_weight, d_bias fp32), 0-element tensors for those not needed."""
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


def _setup_context(ctx, inputs, output):
    (images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, *index, dims) = inputs
    ctx.save_for_backward(images, weight, bias, pos, pos_cls, tile_pos, pre_tile, coef, *index)
    ctx.dims = dims
    ctx.cls_dtype = cls.dtype if cls is not None else None
    ctx.mask_dtype = mask_tok.dtype if mask_tok is not None else None


def _backward(ctx, gout):
    images, weight, bias, pos, pos_cls, tile_pos, pre_tile, coef, *index = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled() and any(needs[:10]):
        # the Triton gradients carry no graph: a second derivative would silently be zero
        raise RuntimeError("patch_embed / tile_patch_embed do not support double backward (create_graph=True): "
                           "their backward is hand-written")
    plan = _plan_from(ctx.dims, index)
    gout = gout.contiguous()
    G, off, D = plan.B * plan.T, 1 if plan.has_cls else 0, weight.shape[0]
    grads = [None] * 17
    need_db = bias is not None and needs[2]
    if needs[0] or needs[1] or need_db:
        dimg, dw, db = _patch_embed_bwd_op(gout, images, weight, *index, list(ctx.dims), needs[0], needs[1], need_db)
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


_patch_embed_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def patch_embed_apply(images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, plan):
    """out = epilogue(gather(images) @ W^T): see patch_embed / tile_patch_embed for the math."""
    dims, index = _plan_args(plan)
    return _patch_embed_fwd_op(images, weight, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, coef, *index, dims)
