"""Launch configs of the attention kernels, and their ahead-of-time compile specs.

No runtime autotuning: a small fixed table keyed by (pass, head-dim bucket, element size), with smaller
entries for inputs the JIT cannot prove 16-byte aligned, keeps runs deterministic and first calls cheap, and
lets the compile gate check every entry for sm_80 and sm_90.
Kernel tiles divide the block-mask tile (MASK_TILE_GPU = 128 query rows x 64 keys), so one block mask
serves every entry. The same table is used on sm_80 and sm_90 (checked on both by the gate): the gate compiles
every spec for both targets, so an sm_90-only entry could not be checked, and the sm_80-safe choices below
were nowhere limited by sm_80's smaller shared memory (all <= 80 KB), only by its registers.
Under TRITON_INTERPRET=1 small tiles keep the CPU tests fast while still exercising the sub-tile loops
(the dK/dV kernel steps through a mask tile's query rows, the dQ kernel through its keys).
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._registry import CompileSpec
from ._blockmask import MASK_TILE_GPU, MASK_TILE_INTERPRETER
from ._bwd import _attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel, _attention_bwd_preprocess_kernel
from ._fwd import _attention_fwd_kernel

MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# (pass, BLOCK_D bucket, bytes per element) -> config. Buckets: head dims padded to the next power of 2;
# 16 and 32 use the 64 entry (smaller tiles of the same shape). fp32 operands take twice the registers /
# shared memory of fp16/bf16, hence their own, smaller entries.
#
# 16-bit entries: the largest tiles (by compile-gate search, Triton 3.8, sm_80 and sm_90) that compile without
# spills and keep <= 232 registers on the aligned specs (pow-2 and non-pow-2 head dims, varlen + key padding),
# a margin for the GPU image's Triton 3.6. Bigger tiles mean fewer K/V (fwd, dQ) or Q/dO (dK/dV) re-reads and
# fuller MMAs. Hard limits: MASK_TILE_GPU = 128 x 64 caps BLOCK_M at 128 and BLOCK_N at 64 (the tutorial's
# dK/dV BLOCK_N1 = 128 cannot be used), and the kernels hold 2-D pointer tensors and (sm_80, mma.sync) dot
# operands in registers, so sm_80 registers decide. Odd strides ("unaligned" gate rows) and head dims that
# are no multiple of 16 (D=40) load without 16-byte vectors and sit at the 255 cap without spilling.
# Comments: registers sm_80/sm_90 (pow-2 D; non-pow-2 D; varlen+kpm; unaligned) and shared memory sm_80/sm_90,
# measured on Triton 3.8 unless a version is named; every entry compiles without spills on 3.6, 3.8 and 3.9.
_GPU_TABLE = {
    # fwd D<=64: already the largest tile the mask allows; 165/120; D=40 255/225; vk 179/167; 48/64 KB
    ("fwd", 64, 2): TileConfig(128, 64, 8, 3),
    # fwd D<=128: 128x64 spills on sm_80 (w8 and w4); 202/161; D=80 200/161; vk 204/177; 64/80 KB. Odd strides
    # use _GPU_UNALIGNED_TABLE (this entry spilled there: 184/52 B on 3.6 sm_80/sm_90, 48 B on 3.9 sm_90)
    ("fwd", 128, 2): TileConfig(128, 32, 8, 3),
    # fwd D=256 (was 32x16 w8 s1): 182/144; D=192 174/143; vk 184/153; 50/64 KB. 64x32 reaches 235-243. Odd
    # strides use _GPU_UNALIGNED_TABLE (this entry spilled there on every version: 1.6-1.8 KB on sm_80)
    ("fwd", 256, 2): TileConfig(64, 16, 8, 2),
    ("fwd", 64, 4): TileConfig(64, 32, 4, 2),
    ("fwd", 128, 4): TileConfig(32, 16, 4, 2),
    ("fwd", 256, 4): TileConfig(16, 16, 8, 1),
    # dK/dV D<=64 (was 32x64 w8 s2: 246-255 registers; then s3, which spilled 8 B on 3.6 sm_80 at 168
    # registers): 166/138; D=40 255/210; 3.6: 168/133, D=40 255/240; 22/24 KB. 32x64 w4 and 64x64 spill;
    # 32x32 w8 stays lower (<= 188) but re-reads Q/dO twice as often
    ("dkdv", 64, 2): TileConfig(16, 64, 4, 2),
    # dK/dV D<=128 (was 16x64): 204/191; D=80 207/210; vk 214/193; 52/64 KB. 64x64 spills. Odd strides use
    # _GPU_UNALIGNED_TABLE (this entry spilled there on sm_90: 8 B on 3.6, 36 B on 3.9)
    ("dkdv", 128, 2): TileConfig(32, 64, 8, 2),
    # dK/dV D=256 (was 16x32 s1): 195/191; D=192 198/194; vk 206/202; 68-72 KB. 16x64 spills. Odd strides use
    # _GPU_UNALIGNED_TABLE (this entry spilled there: 32 B on 3.6 sm_80)
    ("dkdv", 256, 2): TileConfig(32, 32, 8, 2),
    ("dkdv", 64, 4): TileConfig(32, 32, 4, 2),
    ("dkdv", 128, 4): TileConfig(16, 32, 4, 2),
    ("dkdv", 256, 4): TileConfig(16, 32, 8, 1),
    # dQ D<=64 (was 32x64 w4; the tutorial's BLOCK_M2 x BLOCK_N2): 216/112; D=40 255/200; vk 222/127; 44/48 KB
    ("dq", 64, 2): TileConfig(128, 32, 8, 2),
    # dQ D<=128 (was s2): 164/163; D=80 166/165; vk 170/172; unal 255/253 (3.6 254/251, 3.9 255/254); 68 KB.
    # Every BLOCK_M=64 tile (64x16, 64x32, 64x64; w4/w8; s1-s3) spills on sm_80 with odd strides, 128x32 /
    # 128x16 too
    ("dq", 128, 2): TileConfig(32, 64, 8, 3),
    # dQ D=256 (was 16x32 s1): 158/158; D=192 160/128; vk 162/160; unal 255/255 (3.6-3.9, no spills);
    # 68-72 KB. 64x16 reaches 245
    ("dq", 256, 2): TileConfig(32, 32, 8, 2),
    ("dq", 64, 4): TileConfig(64, 32, 4, 2),
    ("dq", 128, 4): TileConfig(32, 32, 4, 2),
    ("dq", 256, 4): TileConfig(16, 32, 8, 1),
    # Delta preprocess: a row reduction, 8192 elements per tile; <= 46 registers aligned, <= 168 unaligned
    ("pre", 64, 2): TileConfig(128, 0, 4, 1),
    ("pre", 128, 2): TileConfig(64, 0, 4, 1),
    ("pre", 256, 2): TileConfig(32, 0, 4, 1),
    ("pre", 64, 4): TileConfig(32, 0, 4, 1),
    ("pre", 128, 4): TileConfig(16, 0, 4, 1),
    ("pre", 256, 4): TileConfig(16, 0, 4, 1),
}

# Inputs the JIT cannot prove 16-byte aligned (see is_aligned: views at odd offsets, odd row / batch strides,
# head strides that are no multiple of 16 at D % 16 == 0) load element by element, with a 64-bit pointer per
# element in registers, so the aligned tiles above spill where they are largest. These entries replace them
# for such inputs; keys not listed keep the aligned entry (its "unal" figures above). Registers sm_80/sm_90:
_GPU_UNALIGNED_TABLE = {
    # 3.6: 255/230, 3.8 and 3.9: 240/208; D=80 3.6 254/237, 3.8 232/215; vk 3.6 250/224, 3.8 240/230; 24 KB.
    # 64x32 w8, 64x16 w8 and 128x16 w8 still spill on 3.6 sm_80, every w4 tile but 32x16 spills
    ("fwd", 128, 2): TileConfig(32, 32, 8, 2),
    # 3.6: 219/186, 3.8: 212/186, 3.9: 212/195; D=80 3.6 221/206, 3.8 215/188; vk 3.6 234/216, 3.8 220/205;
    # 41 KB. 16x64 w8 spills on 3.9 sm_90, 32x64 w8 s1 too
    ("dkdv", 128, 2): TileConfig(32, 32, 8, 2),
    # 3.6: 204/216, 3.8 and 3.9: 198/198; 24 KB. 32x16 w8 s1 and 16x32 w8 sit at 255 on sm_80, 32x16 w8 s2
    # spills on 3.6, 16x16 w4 is at 255 everywhere
    ("fwd", 256, 2): TileConfig(16, 16, 8, 2),
    # 255/248 on 3.6-3.9 (at the cap without spilling, as the fp32 D=256 entries); 56 KB. 32x32 s1 spills
    ("dkdv", 256, 2): TileConfig(16, 32, 8, 2),
}

_INTERPRETER_TABLE = {
    "fwd": TileConfig(32, 32, 4, 1),
    "dkdv": TileConfig(16, 32, 4, 1),
    "dq": TileConfig(32, 16, 4, 1),
    "pre": TileConfig(32, 0, 4, 1),
}

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SIG_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def get_config(pass_, head_dim, dtype, interpreter, aligned=True):
    if interpreter:
        return _INTERPRETER_TABLE[pass_]
    key = (pass_, max(64, block_d(head_dim)), 4 if dtype == torch.float32 else 2)
    if not aligned and key in _GPU_UNALIGNED_TABLE:
        return _GPU_UNALIGNED_TABLE[key]
    return _GPU_TABLE[key]


@functools.lru_cache(maxsize=None)
def _aligned_args(kernel, head_stride_divisible):
    names = {n for n in kernel.arg_names[:kernel.arg_names.index("HEAD_DIM")] if not n.startswith("stride_")
             and n not in ("seqlen_q", "seqlen_k", "num_heads", "num_kv_heads", "group", "qk_scale", "sm_scale")}
    names.update(n for n in kernel.arg_names if n.startswith("stride_") and n[-1] in "bmn" and "kpm" not in n
                 and n not in ("stride_nb", "stride_ib", "stride_im", "stride_rb", "stride_lb"))
    if head_stride_divisible:
        names.update(n for n in kernel.arg_names if n.startswith("stride_") and n.endswith("h") and n != "stride_lh")
    return frozenset(names)


def aligned_args(kernel, head_dim):
    """The arguments the aligned compile specs take as divisible by 16 (Triton's JIT specialises pointers on
    16-byte alignment and integers on divisibility by 16): every pointer, the row and batch strides of the
    (B, L, H, D) tensors, and their head strides when D is a multiple of 16 (contiguous, they equal D)."""
    return _aligned_args(kernel, head_dim % 16 == 0)


def is_aligned(kernel, head_dim, args):
    """Whether a launch with these positional arguments gets (at least) the aligned specs' specialisation."""
    names = aligned_args(kernel, head_dim)
    for name, arg in zip(kernel.arg_names, args):
        if name in names and (arg.data_ptr() if isinstance(arg, torch.Tensor) else arg) % 16:
            return False
    return True


def launch_config(pass_, kernel, args, head_dim, dtype, interpreter):
    """The table entry for a launch of kernel with these positional arguments: unaligned inputs may get a
    smaller one (the compile gate checks both, with and without the divisibility hints)."""
    if interpreter:
        return _INTERPRETER_TABLE[pass_]
    return get_config(pass_, head_dim, dtype, False, is_aligned(kernel, head_dim, args))


def mask_tile(interpreter):
    return MASK_TILE_INTERPRETER if interpreter else MASK_TILE_GPU


def precision(dtype, interpreter):
    """fp32 inputs use TF32 tensor cores on the GPU (as torch does with allow_tf32); exact under the interpreter."""
    return "tf32" if dtype == torch.float32 and not interpreter else "ieee"


# ----------------------------------------------------------------------------------------------
# Compile specs

_COMMON_STRIDES = ("stride_lb", "stride_lh", "stride_rb", "stride_kpmb", "stride_kpmn", "stride_nb", "stride_ib",
                   "stride_im")


def _signature(kernel, ptr_types, scalars):
    sig = {}
    for name in kernel.arg_names:
        if name in ptr_types:
            sig[name] = ptr_types[name]
        elif name in scalars:
            sig[name] = scalars[name]
        elif name.startswith("stride_") or name in ("seqlen_q", "seqlen_k", "num_heads", "num_kv_heads", "group"):
            sig[name] = "i32"
        else:
            sig[name] = "constexpr"
    return sig


def _attention_specs(pass_, kernel, dtype, head_dim, varlen, kpm, aligned=True):
    t = SIG_DTYPES[dtype]
    cfg = get_config(pass_, head_dim, dtype, interpreter=False, aligned=aligned)
    mm, mn = MASK_TILE_GPU
    ptrs = {n: f"*{t}" for n in ("Q", "K", "V", "Out", "DOut", "DK", "DV", "DQ")}
    ptrs.update({n: "*i32" for n in ("RowLo", "RowHi", "CuQ", "CuK", "FullNum", "FullIdx", "PartNum", "PartIdx")})
    ptrs.update({"Lse": "*fp32", "Delta": "*fp32", "DLse": "*fp32", "KPM": "*u8"})
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "BLOCK_M": cfg.block_m, "VARLEN": varlen}
    if pass_ == "pre":
        constexprs["HAS_DLSE"] = kpm  # reuse the flag: the variant with the extra load
    else:
        constexprs.update({"BLOCK_N": cfg.block_n, "MASK_M": mm, "MASK_N": mn, "HAS_KPM": kpm, "DOT_FP32": False,
                           "EMULATE": False, "PRECISION": precision(dtype, False)})
    scalars = {"qk_scale": "fp32", "sm_scale": "fp32"}
    label = (f"{pass_} {t} D={head_dim} BLOCK_M={cfg.block_m}" + (f" BLOCK_N={cfg.block_n}" if cfg.block_n else "")
             + f" warps={cfg.num_warps} stages={cfg.num_stages}" + (" varlen" if varlen else "")
             + ((" dlse" if pass_ == "pre" else " kpm") if kpm else "") + ("" if aligned else " unaligned"))
    sig = _signature(kernel, ptrs, scalars)
    # What the JIT sees on typical inputs: 16-byte aligned tensors, row / batch strides (H·D, L·H·D) that are
    # multiples of 16, and head strides (D) too when D is. Specialised code is what runs (vector loads,
    # cp.async pipelining), so that is what the gate judges; the launcher picks the aligned entry only when
    # all of these hold (is_aligned), else the unaligned one, compiled here without any hint.
    div = {n: 16 for n in aligned_args(kernel, head_dim)} if aligned else {}
    return CompileSpec(kernel=kernel, signature=sig, constexprs=constexprs, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, label=label, divisibility=div)


def compile_specs():
    """Every table entry (fp16 shares bf16's), at the bucket's largest head dim and, for the tl.dot kernels,
    at a non-power-of-two one (40, 80; bf16); feature flags (varlen, key padding, dLSE) twice per pass;
    the heaviest entries also without the alignment specialisation (views with odd strides).
    Head dims <= 32 use the 64 entry with a narrower BLOCK_D: smaller than what is checked here."""
    kernels = {"fwd": _attention_fwd_kernel, "pre": _attention_bwd_preprocess_kernel,
               "dkdv": _attention_bwd_dkdv_kernel, "dq": _attention_bwd_dq_kernel}
    specs = []
    for pass_, kernel in kernels.items():
        for dtype in (torch.bfloat16, torch.float32):
            for head_dim in (64, 40, 128, 80, 256):
                if dtype == torch.float32 and head_dim in (40, 80):
                    continue
                if pass_ == "pre" and head_dim in (40, 80):
                    continue  # a row reduction without tl.dot: far from any register limit
                specs.append(_attention_specs(pass_, kernel, dtype, head_dim, False, False))
        specs.append(_attention_specs(pass_, kernel, torch.bfloat16, 256, True, True))
        specs.append(_attention_specs(pass_, kernel, torch.float16, 128, True, True))
        if pass_ != "pre":  # odd strides (no 16-divisibility) compile differently: the heaviest entries once more,
            # the entries of _GPU_UNALIGNED_TABLE among them (bf16 D=128, 256)
            for dtype, head_dim in ((torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 256)):
                specs.append(_attention_specs(pass_, kernel, dtype, head_dim, False, False, aligned=False))
    return specs
