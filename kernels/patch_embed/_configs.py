"""Launch configurations of the fused patch embedding, and the compile-gate specs derived from them.

One tile shape per kernel serves sm_80 and sm_90: the op is small and gather-bound. Sizes are bounded by
registers, not shared memory: the gathered A tile needs per-row 64-bit bases and the epilogue loads 2D
tiles of position rows (``python -m mmfast compile-report`` shows 128 x 128 tiles spill).
"""
import math
from collections import namedtuple

import torch

from .._common import DTYPE_NAMES, TL_DTYPES, cdiv, next_power_of_2
from .._registry import CompileSpec, derive_signature, step
from ._kernels import _patch_embed_bwd_dw_kernel, _patch_embed_bwd_dx_kernel, _patch_embed_fwd_kernel

Config = namedtuple("Config", "block_m block_n block_k num_warps num_stages")

# forward: rows = tokens, n = D, k = C*P*P
FWD_LARGE = Config(128, 64, 32, 8, 3)  # ViT-sized problems (>= 4096 rows, D >= 128)
FWD_SMALL = Config(64, 64, 32, 4, 2)  # tiny problems: more programs in flight
FWD_TILES = Config(64, 64, 32, 8, 3)  # Mllama tiles: two more epilogue tables (tile position, pre-tile)
# d_images: rows = image patches, n = K, k = D
DX = Config(128, 64, 32, 8, 3)
DX_FP32 = Config(64, 64, 32, 8, 3)  # fp32 tiles are twice the bytes: 128 rows spill on sm_80
# d_weight: m = D, n = K, k = token rows (split over programs, fp32 partials)
DW = Config(128, 64, 32, 8, 3)

# fp32 at torch.get_float32_matmul_precision() == "highest": IEEE dots are FMA loops whose operands live
# in registers, not tensor-core fragments; the tiles above spill there, these do not (compile-report)
FWD_LARGE_IEEE = Config(64, 64, 16, 8, 3)  # half the rows and K step of FWD_LARGE
FWD_SMALL_IEEE = Config(32, 64, 32, 4, 2)  # half the rows of FWD_SMALL
FWD_TILES_IEEE = Config(64, 32, 32, 8, 3)  # half the columns of FWD_TILES (its two extra tables)
DX_IEEE = Config(64, 64, 16, 8, 3)  # DX_FP32 with half the K step: DX_FP32 spills on Triton 3.6 (sm_90)
DW_IEEE = Config(128, 64, 16, 8, 3)  # DW with half the rows per step: DW sits at the 255-register cap


def _ieee_fp32(dtype, precision):
    return dtype == torch.float32 and precision == "ieee"


def fwd_config(rows, d, tiles, dtype, precision):
    ieee = _ieee_fp32(dtype, precision)
    if tiles:
        return FWD_TILES_IEEE if ieee else FWD_TILES
    if rows >= 4096 and d >= 128:
        return FWD_LARGE_IEEE if ieee else FWD_LARGE
    return FWD_SMALL_IEEE if ieee else FWD_SMALL


def dx_config(dtype, precision):
    if _ieee_fp32(dtype, precision):
        return DX_IEEE
    return DX_FP32 if dtype == torch.float32 else DX


def dw_config(dtype, precision):
    return DW_IEEE if _ieee_fp32(dtype, precision) else DW


def dw_splits(device, tiles, rows, block_r):
    """Row splits of the d_weight GEMM: enough programs for 4 per SM, each with >= 4 row blocks."""
    if device.type != "cuda":
        return min(2, cdiv(rows, block_r))  # exercise the split path cheaply under the interpreter
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cdiv(4 * sms, tiles), cdiv(rows, 4 * block_r)))


def run_len(P, C, cl_order):
    """Padded length of one contiguous pixel run (see _kernels._k_split): NCHW px in a row (next power of
    two), channels-last (px, c) interleaved (a multiple of 16)."""
    return cdiv(P * C, 16) * 16 if cl_order else next_power_of_2(P)


# ----------------------------------------------------------------------------------------------
# Compile-gate specs: every kernel x config the launchers choose, signatures read from the kernels


def _ptr(dtype):
    return "*" + DTYPE_NAMES[dtype]


def _fwd_signature(img, table, out):
    # every argument not named here is an int the launcher passes below 2**31 (Triton's launcher then
    # passes i32): compile what runs
    return derive_signature(_patch_embed_fwd_kernel, dict(
        img=_ptr(img), w=_ptr(img), bias=_ptr(img), pos=_ptr(table), pos_cls=_ptr(table), cls=_ptr(table),
        mask_tok=_ptr(table), tile_pos=_ptr(table), pre_tile=_ptr(table), ar_ids="*i32", coef="*fp32",
        perm="*i32", src_idx="*i32", pos_idx="*i32", tok_mask="*u8", tile_used="*u8", out=_ptr(out)), default="i32")


def _dx_signature(dtype):
    return derive_signature(_patch_embed_bwd_dx_kernel, dict(
        dout=_ptr(dtype), w=_ptr(dtype), inv="*i32", tok_mask="*u8", tile_used="*u8", dimg=_ptr(dtype)),
        default="i32")


def _dw_signature(dtype):
    return derive_signature(_patch_embed_bwd_dw_kernel, dict(
        dout=_ptr(dtype), img=_ptr(dtype), perm="*i32", src_idx="*i32", tok_mask="*u8", tile_used="*u8",
        dw_part="*fp32", db_part="*fp32"), default="i32")


# (images dtype, tables / output dtype, PRECISION, label, P, C, channels-last, mask, tiles, forward configs,
# with backward rows): every config the launchers choose appears; 16-bit dtypes x feature mixes are
# sampled (the code shape is the same). Under autocast the images are 16-bit and fp32 tables make the
# output fp32 (the eager chain's type promotion); the backward then runs on 16-bit dOut (as conv2d's).
_VARIANTS = [
    (torch.bfloat16, torch.bfloat16, "ieee", "vit-b16 cls", 16, 3, False, False, False, (FWD_LARGE, FWD_SMALL), True),
    (torch.bfloat16, torch.bfloat16, "ieee", "clip-l14 cls nhwc", 14, 3, True, False, False, (FWD_LARGE,), True),
    (torch.bfloat16, torch.bfloat16, "ieee", "vit-b16 masked", 16, 3, False, True, False, (FWD_LARGE,), True),
    (torch.bfloat16, torch.bfloat16, "ieee", "mllama tiles", 14, 3, False, False, True, (FWD_TILES,), True),
    (torch.bfloat16, torch.float32, "ieee", "autocast vit-b16 cls", 16, 3, False, False, False, (FWD_LARGE,), False),
    (torch.bfloat16, torch.float32, "ieee", "autocast mllama tiles", 14, 3, False, False, True, (FWD_TILES,), False),
    (torch.float16, torch.float16, "ieee", "vit-b16 cls", 16, 3, False, False, False, (FWD_LARGE,), True),
    (torch.float32, torch.float32, "tf32", "vit-b16 cls", 16, 3, False, False, False, (FWD_LARGE,), True),
    (torch.float32, torch.float32, "ieee", "vit-b16 cls", 16, 3, False, False, False,
     (FWD_LARGE_IEEE, FWD_SMALL_IEEE), True),
    (torch.float32, torch.float32, "ieee", "mllama tiles", 14, 3, False, False, True, (FWD_TILES_IEEE,), False),
]


def compile_specs():
    """Every kernel x config x dtype x precision the launchers choose (main feature combinations)."""
    for dtype, table, precision, label, P, C, cl, mask, tiles, fwd_configs, backward in _VARIANTS:
        # 224/336/560-pixel images: pixel runs start at multiples of gcd(P [* C], 16 bytes)
        layout = dict(C=C, P=P, CL_ORDER=cl, RUN_LEN=run_len(P, C, cl), IMG_DENSE=True, PAD=False,
                      ALIGN=math.gcd(P * C if cl else P, 16 // dtype.itemsize))
        name = f"{DTYPE_NAMES[dtype]}{'' if table == dtype else '>' + DTYPE_NAMES[table]}"
        name += f" {precision}" if dtype == torch.float32 else ""
        flags = dict(PRECISION=precision, EMULATE=False)
        for cfg in fwd_configs:
            yield CompileSpec(
                kernel=_patch_embed_fwd_kernel, signature=_fwd_signature(dtype, table, table),
                constexprs=dict(**layout, HAS_BIAS=not tiles, HAS_POS=True, HAS_POS_CLS=True, HAS_CLS=True,
                                HAS_MASK=mask, HAS_PERM=mask, HAS_SRC=False, HAS_POS_IDX=False, TILES=tiles,
                                HAS_TILE_MASK=tiles, OUT_DTYPE=TL_DTYPES[table], **flags,
                                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, needs_wgmma=dtype != torch.float32,
                **step(dots=[(cfg.block_m, cfg.block_n, cfg.block_k)],
                       loads=[(cfg.block_m, cfg.block_k, dtype), (cfg.block_k, cfg.block_n, dtype)]),
                label=f"fwd {name} {label} P={P} BLOCK={cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps}")
        if not backward:
            continue
        dx = dx_config(dtype, precision)
        yield CompileSpec(
            kernel=_patch_embed_bwd_dx_kernel, signature=_dx_signature(dtype),
            constexprs=dict(**layout, OFF=1, HAS_INV=False, HAS_MASK=mask, HAS_TILE_MASK=tiles,
                            OUT_DTYPE=TL_DTYPES[dtype], **flags,
                            BLOCK_M=dx.block_m, BLOCK_N=dx.block_n, BLOCK_K=dx.block_k),
            num_warps=dx.num_warps, num_stages=dx.num_stages, needs_wgmma=dtype != torch.float32,
            **step(dots=[(dx.block_m, dx.block_n, dx.block_k)],
                   loads=[(dx.block_m, dx.block_k, dtype), (dx.block_k, dx.block_n, dtype)]),
            label=f"bwd d_images {name} {label} P={P} BLOCK={dx.block_m}x{dx.block_n}x{dx.block_k}")
        dw = dw_config(dtype, precision)
        yield CompileSpec(
            kernel=_patch_embed_bwd_dw_kernel, signature=_dw_signature(dtype),
            constexprs=dict(**layout, OFF=1, HAS_PERM=False, HAS_SRC=False, HAS_MASK=mask, HAS_TILE_MASK=tiles,
                            HAS_BIAS=not tiles, **flags, BLOCK_D=dw.block_m, BLOCK_K=dw.block_n, BLOCK_R=dw.block_k),
            num_warps=dw.num_warps, num_stages=dw.num_stages, needs_wgmma=dtype != torch.float32,
            **step(dots=[(dw.block_m, dw.block_n, dw.block_k)],
                   loads=[(dw.block_k, dw.block_m, dtype), (dw.block_k, dw.block_n, dtype)]),
            label=f"bwd d_weight {name} {label} P={P} BLOCK={dw.block_m}x{dw.block_n}x{dw.block_k}")
