"""Launch configs of the attention kernels (as data) and their compile-gate specs.

No runtime autotuning: a fixed table keyed by (pass, head-dim bucket, operands) keeps runs deterministic and first
calls cheap, and lets the compile gate check every entry for sm_80 and sm_90. One table serves both (sm_80's
registers are the binding limit), except for aligned 16-bit inputs on sm_90 (``_SM90_TABLE``): there Hopper's
``wgmma`` (64 rows per warpgroup, accumulators spread over 128 threads) fits tiles that spill with ``mma.sync``,
and the gate fails any such entry that does not lower to ``wgmma``. Head dims are padded to the next power of two;
16 and 32 use the 64 entry. The forward covers 65 - 96 as 64 + 16 or 64 + 32 columns instead (``block_d_split``),
and so do dK/dV and dQ where their dots do not run on mma.sync (``bwd_block_d``), with the 128 entries except on
sm_90 at head dims that are no multiple of 16 (``_SM90_SPLIT_ODD_TABLE``) and in a few IEEE cases
(``_GPU_SPLIT_TABLE``). Operands: "16-bit" (fp16 / bf16 on tensor cores), "tf32" (fp32 on TF32 tensor cores)
and "ieee" (fp32 dots as FMA loops, ``torch.set_float32_matmul_precision("highest")``, the default), see
``_common.matmul_precision``. Kernel tiles divide the block-mask tile (``MASK_TILE_GPU`` = 128 query rows x 128
keys), so one block mask serves every entry. Under TRITON_INTERPRET=1 small tiles keep the CPU tests fast while
still stepping through the sub-tile loops.
"""
import functools
from dataclasses import dataclass, replace

import torch

from .._common import DTYPE_NAMES, next_power_of_2
from .._registry import CompileSpec, derive_signature, step
from ._blockmask import MASK_TILE_GPU, MASK_TILE_INTERPRETER
from ._kernels import (_attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel, _attention_bwd_preprocess_kernel,
                       _attention_fwd_kernel)

MAX_HEAD_DIM = 256
KERNELS = {"fwd": _attention_fwd_kernel, "pre": _attention_bwd_preprocess_kernel, "dkdv": _attention_bwd_dkdv_kernel,
           "dq": _attention_bwd_dq_kernel}


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile (0: the Delta pass has none)
    num_warps: int
    num_stages: int
    split: bool = False  # dK/dV only: one accumulator per program (the kernel's SPLIT)


# Bigger tiles mean fewer K/V (fwd, dQ) or Q/dO (dK/dV) re-reads and fuller MMAs; each entry is the largest
# tile that compiles without spills on Triton 3.6 - 3.9 for sm_80 and sm_90 (the compile gate checks them all).
_GPU_TABLE = {
    ("fwd", 64, "16-bit"): TileConfig(128, 64, 8, 3),  # the whole mask tile
    ("fwd", 128, "16-bit"): TileConfig(128, 32, 8, 3),  # 128 x 64 spills on sm_80
    ("fwd", 256, "16-bit"): TileConfig(64, 16, 8, 2),  # 64 x 32 reaches 235-243 registers
    ("fwd", 64, "tf32"): TileConfig(64, 32, 4, 2),  # fp32 operands: twice the registers of 16-bit ones
    ("fwd", 128, "tf32"): TileConfig(32, 16, 4, 2),  # a quarter of the 16-bit tile, for the same reason
    ("fwd", 256, "tf32"): TileConfig(16, 16, 8, 1),  # the smallest MMA tile; one stage keeps 48 KB of shared memory
    ("dkdv", 64, "16-bit"): TileConfig(16, 64, 4, 2),  # 32 x 64 and 64 x 64 spill; BLOCK_N 64 is the mask tile's
    ("dkdv", 128, "16-bit"): TileConfig(32, 64, 8, 2),  # 64 x 64 spills
    ("dkdv", 256, "16-bit"): TileConfig(32, 32, 8, 2),  # 16 x 64 spills
    ("dkdv", 64, "tf32"): TileConfig(32, 32, 4, 2),  # dK and dV accumulators of 32 keys in fp32
    ("dkdv", 128, "tf32"): TileConfig(16, 32, 4, 2),  # ~210 registers already
    ("dkdv", 256, "tf32"): TileConfig(16, 32, 8, 1),  # ~235 registers and 112 KB of shared memory
    ("dq", 64, "16-bit"): TileConfig(128, 32, 8, 2),  # the tutorial's dQ tile, grown to the mask tile's rows
    ("dq", 128, "16-bit"): TileConfig(32, 64, 8, 3),  # every BLOCK_M = 64 tile spills with odd strides on sm_80
    ("dq", 256, "16-bit"): TileConfig(32, 32, 8, 2),  # 64 x 16 reaches 245 registers
    ("dq", 64, "tf32"): TileConfig(64, 32, 4, 2),  # at 255 registers on sm_80 without spilling
    ("dq", 128, "tf32"): TileConfig(32, 32, 4, 2),  # ~170 registers, 72 KB
    ("dq", 256, "tf32"): TileConfig(16, 32, 8, 1),  # ~250 registers
    ("pre", 64, "16-bit"): TileConfig(128, 0, 4, 1),  # a row reduction: 8192 elements per tile
    ("pre", 128, "16-bit"): TileConfig(64, 0, 4, 1),  # the same 8192 elements
    ("pre", 256, "16-bit"): TileConfig(32, 0, 4, 1),  # the same 8192 elements
    ("pre", 64, "fp32"): TileConfig(32, 0, 4, 1),  # 2048 elements: ~40 registers
    ("pre", 128, "fp32"): TileConfig(16, 0, 4, 1),  # 2048 elements
    ("pre", 256, "fp32"): TileConfig(16, 0, 4, 1),  # 4096 elements: ~60 registers
}
# IEEE fp32 dots are FMA loops whose operands and products live in registers: where the TF32 tile spills, one
# that does not (on Triton 3.6, 3.8 and 3.9; at most ~200 registers). Keys not listed use the TF32 entry.
_GPU_IEEE_TABLE = {
    ("fwd", 64, "ieee"): TileConfig(64, 32, 8, 2),  # the TF32 tile with 8 warps: 4 spill
    ("fwd", 128, "ieee"): TileConfig(16, 16, 4, 2),  # 32 x 16 spills on 3.6 (8 warps) or on sm_90 (4 warps)
    ("fwd", 256, "ieee"): TileConfig(16, 16, 4, 1),  # the TF32 tile (8 warps) spills on 3.6 sm_90
    ("dkdv", 64, "ieee"): TileConfig(16, 32, 4, 2),  # 32 x 32 spills with 4 and 8 warps
    ("dkdv", 256, "ieee"): TileConfig(16, 16, 8, 1),  # 16 x 32 spills on sm_90
    ("dq", 64, "ieee"): TileConfig(32, 16, 4, 2),  # 64 x 32 spills with 4 warps, reaches 244 registers with 8
    ("dq", 128, "ieee"): TileConfig(16, 64, 8, 2),  # 32 x 32 spills; 16 x 32 (4 or 8 warps) spills 8 B on 3.6 or 3.9
}

# Inputs the JIT cannot prove 16-byte aligned (views at odd offsets, odd row / batch strides, head strides
# that are no multiple of 16 at D % 16 == 0) load element by element, with a 64-bit pointer per element in
# registers: where the aligned tile spills on such inputs, a smaller one. Keys not listed keep theirs.
_GPU_UNALIGNED_TABLE = {
    ("fwd", 128, "16-bit"): TileConfig(32, 32, 8, 2),  # 64 x 32, 64 x 16 and 128 x 16 still spill on 3.6 sm_80
    ("fwd", 256, "16-bit"): TileConfig(16, 16, 8, 2),  # 32 x 16 sits at 255 registers on sm_80
    ("dkdv", 128, "16-bit"): TileConfig(32, 32, 8, 2),  # 16 x 64 spills on 3.9 sm_90
    ("dkdv", 256, "16-bit"): TileConfig(16, 32, 8, 2),  # 32 x 32 spills
    ("fwd", 256, "ieee"): TileConfig(16, 16, 8, 2),  # the aligned tile (4 warps) sits at 252 - 255 registers
    ("dkdv", 128, "ieee"): TileConfig(16, 32, 8, 2),  # the aligned tile (4 warps) sits at 255 registers
    ("dkdv", 256, "ieee"): TileConfig(16, 16, 8, 2),  # stage 1 spills on sm_80
}

# Aligned 16-bit inputs on sm_90 (wgmma): the largest tile of the tutorial's orientation (forward and dQ: 128
# query rows against a KV tile; dK/dV: 128 keys against a query tile) that compiles without spills on Triton
# 3.6, 3.8 and 3.9 at the bucket's worst case (non-power-of-two D, varlen with key padding). Intensity
# (FLOPs per byte loaded per step) grows with the resident side: fwd BLOCK_M, dQ 1.5·BLOCK_M, dK/dV 2·BLOCK_N.
_SM90_TABLE = {
    ("fwd", 64, "16-bit"): TileConfig(128, 64, 8, 3),  # 128 x 128 spills at D = 40 (255 registers)
    ("fwd", 128, "16-bit"): TileConfig(128, 64, 8, 2),  # 128 x 32 before; 3 stages reach 252 registers with kpm
    ("fwd", 256, "16-bit"): TileConfig(128, 16, 8, 2),  # 128 rows; 128 x 32 spills with varlen + key padding
    ("dkdv", 64, "16-bit"): TileConfig(32, 128, 8, 3),  # the tutorial's 32 x 128; with 4 warps it spills
    ("dkdv", 128, "16-bit"): TileConfig(16, 128, 8, 2),  # 128 keys; 32 queries reach 254 registers at D = 80
    ("dkdv", 256, "16-bit"): TileConfig(16, 64, 8, 2, split=True),  # both 64 x 256 accumulators spill on 3.9
    ("dq", 64, "16-bit"): TileConfig(128, 64, 8, 2),  # 128 rows, twice the tutorial's keys: 172-213 registers
    ("dq", 128, "16-bit"): TileConfig(128, 32, 8, 2),  # the tutorial's 128 x 32 (32 x 64 on mma.sync before)
    ("dq", 256, "16-bit"): TileConfig(128, 16, 8, 2),  # 128 rows (32 x 32 before); 128 x 32 reaches 248
}

# The split passes (block_d_split) on sm_90 at head dims that are no multiple of 16 (72, 88): their head
# strides carry no divisibility hint, so loads are narrower and hold more registers; keyed by table_bucket.
_SM90_SPLIT_ODD_TABLE = {
    ("fwd", 96, "16-bit"): TileConfig(128, 32, 8, 2),  # 128 x 64 spills at D = 88 (so did the padded kernel)
    ("dkdv", 80, "16-bit"): TileConfig(16, 64, 8, 2),  # 16 x 128 spills at D = 72 (so did the padded kernel)
    ("dkdv", 96, "16-bit"): TileConfig(16, 64, 8, 2),  # and at D = 88
    ("dq", 96, "16-bit"): TileConfig(64, 16, 8, 2),  # 128 x 32 / 16, 64 x 32 spill at D = 88 (so did the padded)
}

# The split dK/dV and dQ (bwd_block_d) off sm_90's wgmma, keyed by table_bucket: IEEE fp32 where the 128 bucket's
# tile spills on the split kernel; keys not listed keep the 128 bucket's entries.
_GPU_SPLIT_TABLE = {
    ("dkdv", 96, "ieee"): TileConfig(16, 16, 4, 2),  # 16 x 32 spills at D = 96 (4 warps: sm_80; 8: 3.6 sm_90)
}
_GPU_SPLIT_UNALIGNED_TABLE = {
    ("dkdv", 96, "ieee"): TileConfig(16, 16, 8, 2),  # 16 x 32 spills on sm_80 at D = 96
}

_INTERPRETER_TABLE = {
    "fwd": TileConfig(32, 32, 4, 1),
    "dkdv": TileConfig(16, 32, 4, 1),  # steps through a mask tile's query rows in two sub-tiles
    "dq": TileConfig(32, 16, 4, 1),  # and through its keys
    "pre": TileConfig(32, 0, 4, 1),
}


def block_d(head_dim):
    return max(16, next_power_of_2(head_dim))


def block_d_split(head_dim):
    """(BLOCK_D, BLOCK_D2) of the forward kernel (and of dK/dV and dQ where bwd_block_d splits): head dims in
    (64, 96] as a 64-column chunk and a 16- or 32-column one (80 = 64 + 16 and 96 = 64 + 32 exactly; 72 and 88
    mask 8 columns) instead of padding to 128, which multiplies 60% (D = 80) or 33% (D = 96) padding on the
    tensor cores. Others: (block_d, 0), unsplit (above 96, 64 + 64 would cost what 128 does). The Delta pass
    (a row reduction, no dot) pads."""
    if 64 < head_dim <= 96:
        return 64, 16 if head_dim <= 80 else 32
    return block_d(head_dim), 0


def bwd_block_d(head_dim, dtype, precision, aligned, cc):
    """(BLOCK_D, BLOCK_D2) of the dK/dV and dQ kernels: block_d_split's chunks where their dots run on wgmma
    (aligned 16-bit inputs on sm_90) or as FMA loops (IEEE fp32), padded to block_d where they run on mma.sync
    (16-bit on sm_80 or unaligned, TF32): there the 16- and 32-column chunks' operand and accumulator layouts
    take more registers than the padding saves (bf16 dK/dV at D = 96 on sm_80: 207 registers padded, spills
    split; on sm_90: 227 padded, 187 split)."""
    wgmma = dtype != torch.float32 and aligned and cc == 90
    if wgmma or (dtype == torch.float32 and precision == "ieee"):
        return block_d_split(head_dim)
    return block_d(head_dim), 0


def table_bucket(pass_, head_dim):
    """The head-dim bucket of the tuned tables' keys (kernels/_tuned.py): the padded width the kernel computes
    on (64 + 16 = 80 and 64 + 32 = 96 for the split kernels, whose tiles differ from the 128 kernel's; dK/dV and
    dQ keep 80 / 96 where bwd_block_d pads them, so that each launch has one key)."""
    if pass_ != "pre" and block_d_split(head_dim)[1]:
        return sum(block_d_split(head_dim))
    return max(64, block_d(head_dim))


def operands(pass_, dtype, precision):
    """The table's operand key: "16-bit", or for fp32 the dot precision ("tf32" / "ieee"); the Delta pass
    has no dot, so only its element size counts ("fp32")."""
    if dtype != torch.float32:
        return "16-bit"
    return "fp32" if pass_ == "pre" else precision


def get_config(pass_, head_dim, dtype, precision, aligned=True, cc=80):
    """The GPU table entry for a pass on inputs of `dtype` whose fp32 dots run at `precision`, on a device
    of compute capability `cc` (80 for 8.0). The split kernels (65 - 96; the dK/dV and dQ ones where
    bwd_block_d splits) take the 128 bucket's entries (they need fewer registers than the padded kernels
    they were sized for), except those of _SM90_SPLIT_ODD_TABLE and _GPU_SPLIT(_UNALIGNED)_TABLE."""
    kind = operands(pass_, dtype, precision)
    key = (pass_, max(64, block_d(head_dim)), kind)
    split_key = (pass_, table_bucket(pass_, head_dim), kind)
    if not aligned and split_key in _GPU_SPLIT_UNALIGNED_TABLE:
        return _GPU_SPLIT_UNALIGNED_TABLE[split_key]
    if not aligned and key in _GPU_UNALIGNED_TABLE:
        return _GPU_UNALIGNED_TABLE[key]
    if aligned and cc == 90 and head_dim % 16 and split_key in _SM90_SPLIT_ODD_TABLE:
        return _SM90_SPLIT_ODD_TABLE[split_key]
    if aligned and cc == 90 and key in _SM90_TABLE:
        return _SM90_TABLE[key]
    if aligned and split_key in _GPU_SPLIT_TABLE:
        return _GPU_SPLIT_TABLE[split_key]
    if kind == "ieee":
        return _GPU_IEEE_TABLE.get(key) or _GPU_TABLE[(pass_, key[1], "tf32")]
    return _GPU_TABLE[key]


def mask_tile(interpreter):
    return MASK_TILE_INTERPRETER if interpreter else MASK_TILE_GPU


# ----------------------------------------------------------------------------------------------
# Alignment: which arguments Triton's JIT specialises on (16-byte aligned pointers, integers divisible by 16)

_TENSORS = ("q", "k", "v", "o", "do", "dq", "dk", "dv")  # the (B, L, H, D) tensors, by their stride names


@functools.lru_cache(maxsize=None)
def _aligned_args(kernel, head_stride_divisible):
    signature = _signature(kernel, torch.float16)
    names = {name for name, kind in signature.items() if kind.startswith("*")}
    dims = "bmnh" if head_stride_divisible else "bmn"
    names.update(name for name in signature if name.startswith("stride_") and name[7:-1] in _TENSORS
                 and name[-1] in dims)
    return frozenset(names)


def aligned_args(kernel, head_dim):
    """The arguments the aligned compile specs take as divisible by 16: every pointer, the row and batch strides
    of the (B, L, H, D) tensors, and their head strides when D is a multiple of 16 (contiguous, they equal D)."""
    return _aligned_args(kernel, head_dim % 16 == 0)


def is_aligned(kernel, head_dim, args):
    """Whether a launch with these positional arguments gets (at least) the aligned specs' specialisation."""
    names = aligned_args(kernel, head_dim)
    for name, arg in zip(kernel.arg_names, args):
        if name in names and (arg.data_ptr() if isinstance(arg, torch.Tensor) else arg) % 16:
            return False
    return True


@functools.lru_cache(maxsize=None)
def capability(device):
    """Compute capability of a CUDA device as one number (90 for 9.0)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def launch_config(pass_, kernel, args, head_dim, dtype, precision, interpreter):
    """The tiles for a launch of `kernel` with these positional arguments (the first a tensor on the launch's
    device): unaligned inputs may get a smaller entry (the compile gate checks both, with and without the
    divisibility hints), sm_90 its own. Under the interpreter dK/dV runs SPLIT at D >= 64, so that the CPU
    tests step through both of its orders."""
    if interpreter:
        cfg = _INTERPRETER_TABLE[pass_]
        return replace(cfg, split=True) if pass_ == "dkdv" and head_dim >= 64 else cfg
    return get_config(pass_, head_dim, dtype, precision, is_aligned(kernel, head_dim, args),
                      capability(args[0].device))


def launch_block_d(kernel, args, head_dim, dtype, precision, interpreter):
    """(BLOCK_D, BLOCK_D2) of a dK/dV or dQ launch (bwd_block_d); the interpreter splits wherever
    block_d_split does, so that the CPU tests run the split kernels."""
    if interpreter:
        return block_d_split(head_dim)
    return bwd_block_d(head_dim, dtype, precision, is_aligned(kernel, head_dim, args), capability(args[0].device))


# ----------------------------------------------------------------------------------------------
# Compile specs


def _signature(kernel, dtype):
    t = DTYPE_NAMES[dtype]
    types = {name: f"*{t}" for name in ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV")}
    types.update({name: "*fp32" for name in ("RowMax", "RowLogSum", "DLogSum", "Delta")})
    types.update({name: "*i32" for name in ("RowLo", "RowHi", "CuQ", "CuK", "FullNum", "FullIdx", "PartNum", "PartIdx")})
    types.update({"KPM": "*u8", "sm_scale": "fp32", "group": "i32", "seqlen_*": "i32",
                  "stride_*": "i32"})
    return derive_signature(kernel, types)


def _step(pass_, cfg, head_dim, dtype):
    """One main-loop step's dots and global loads, for the gate's arithmetic intensity (useful work: the head
    dim, not its power-of-two padding)."""
    m, n, d, e = cfg.block_m, cfg.block_n, head_dim, dtype.itemsize
    if pass_ == "fwd":  # S = Q Kᵀ, O += P V; K and V tiles read
        return step(dots=[(m, n, d), (m, d, n)], loads=[(n, head_dim, e), (n, head_dim, e)])
    if pass_ == "dq":  # S = Q Kᵀ, dP = dO Vᵀ, dQ += dS K; K and V tiles read
        return step(dots=[(m, n, d), (m, n, d), (m, d, n)], loads=[(n, head_dim, e), (n, head_dim, e)])
    if pass_ == "dkdv":  # Sᵀ = K Qᵀ, dV += Pᵀ dO, dPᵀ = V dOᵀ, dK += dSᵀ Q; Q, dO and 3 row statistics read
        loads = [(m, head_dim, e), (m, head_dim, e), (m, 3, 4)]
        dots = [(n, m, d), (n, d, m), (n, m, d), (n, d, m)]
        if cfg.split:  # both programs of a KV tile: the dK one recomputes Sᵀ and reads Q, dO and the stats again
            return step(dots=dots + [(n, m, d)], loads=loads * 2)
        return step(dots=dots, loads=loads)
    return {}  # the Delta pass: no dot


def _spec(pass_, dtype, head_dim, precision, varlen=False, flag=False, aligned=True, cfg=None, targets=()):
    """One compile spec; `flag` is the pass's optional extra load (key padding; the Delta pass: dLSE)."""
    kernel = KERNELS[pass_]
    cfg = cfg or get_config(pass_, head_dim, dtype, precision, aligned=aligned)
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "BLOCK_M": cfg.block_m, "VARLEN": varlen}
    split_d = ""
    if pass_ == "fwd":
        constexprs["BLOCK_D"], constexprs["BLOCK_D2"] = block_d_split(head_dim)
    elif pass_ != "pre":  # a spec shared by both targets has the same block dims on both (_specs)
        constexprs["BLOCK_D"], constexprs["BLOCK_D2"] = bwd_block_d(head_dim, dtype, precision, aligned,
                                                                   targets[0] if targets else 80)
    if constexprs.get("BLOCK_D2"):
        split_d = f" as {constexprs['BLOCK_D']}+{constexprs['BLOCK_D2']}"
    if pass_ == "pre":
        constexprs["HAS_DLSE"] = flag
    else:
        constexprs.update({"BLOCK_N": cfg.block_n, "MASK_M": MASK_TILE_GPU[0], "MASK_N": MASK_TILE_GPU[1],
                           "HAS_KPM": flag, "PRECISION": precision, "EMULATE": False})
    if pass_ == "dkdv":
        constexprs["SPLIT"] = cfg.split
    kind = operands(pass_, dtype, precision)
    label = (f"{pass_} {DTYPE_NAMES[dtype]}{'' if kind in ('16-bit', 'fp32') else ' ' + kind} D={head_dim}{split_d} "
             f"BLOCK_M={cfg.block_m}" + (f" BLOCK_N={cfg.block_n}" if cfg.block_n else "")
             + f" warps={cfg.num_warps} stages={cfg.num_stages}" + (" split" if cfg.split else "")
             + (" varlen" if varlen else "")
             + ((" dlse" if pass_ == "pre" else " kpm") if flag else "") + ("" if aligned else " unaligned"))
    # What the JIT sees on typical inputs: 16-byte aligned tensors, row / batch strides (H·D, L·H·D) that are
    # multiples of 16, and head strides (D) too when D is. Specialised code is what runs (vector loads,
    # cp.async pipelining), so that is what the gate judges; the launcher picks the aligned entry only when
    # all of these hold (is_aligned), else the unaligned one, compiled here without any hint.
    div = {name: 16 for name in aligned_args(kernel, head_dim)} if aligned else {}
    # the launchers' choice for aligned 16-bit dots on sm_90 must run on wgmma (the gate checks it there)
    needs_wgmma = aligned and kind == "16-bit" and pass_ != "pre" and (not targets or 90 in targets)
    return CompileSpec(kernel=kernel, signature=_signature(kernel, dtype), constexprs=constexprs,
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages, label=label, divisibility=div,
                       targets=targets, needs_wgmma=needs_wgmma, **_step(pass_, cfg, head_dim, dtype))


def _specs(pass_, dtype, head_dim, precision, varlen=False, flag=False, aligned=True):
    """The specs of one launch case: one for both targets, or one per target where sm_90 has its own entry."""
    per_cc = {cc: get_config(pass_, head_dim, dtype, precision, aligned, cc) for cc in (80, 90)}
    same_d = pass_ not in ("dkdv", "dq") or len({bwd_block_d(head_dim, dtype, precision, aligned, cc)
                                                  for cc in per_cc}) == 1
    if per_cc[80] == per_cc[90] and same_d:
        return [_spec(pass_, dtype, head_dim, precision, varlen, flag, aligned)]
    return [_spec(pass_, dtype, head_dim, precision, varlen, flag, aligned, cfg=cfg, targets=(cc,))
            for cc, cfg in per_cc.items()]


def compile_specs():
    """Every table entry the launchers can pick: per pass, bf16 (fp16 shares its entries) at each bucket's
    largest head dim and, for the tl.dot passes, at a non-power-of-two one (40, 80); fp32 with TF32 and with
    IEEE dots; the optional features (varlen + key padding, dLSE) twice per pass; and the heaviest entries
    without the alignment specialisation (views with odd strides), the unaligned table's among them: bf16 at
    D = 128 and 256, fp32 TF32 at 256, fp32 IEEE at every bucket.
    Head dims <= 32 use the 64 entry with a narrower BLOCK_D: smaller than what is checked here.
    The split head dims (block_d_split: 64 + 16, 64 + 32) at 80, 96, and 72, 88 (no 16-divisible head
    stride): bf16, fp32 TF32 and IEEE, varlen + key padding, and unaligned, for the forward, dK/dV and dQ (the
    last two with the chunks bwd_block_d gives each target: split on sm_90's wgmma and in IEEE, else padded).
    Where sm_90 has its own entry (aligned 16-bit), the case compiles twice: the shared entry for sm_80 and
    sm_90's for sm_90, marked needs_wgmma (the gate fails it unless every dot lowers to wgmma)."""
    specs = []
    for pass_ in KERNELS:
        fp32_precisions = ("tf32",) if pass_ == "pre" else ("tf32", "ieee")  # no dot in the Delta pass
        for head_dim in (64, 40, 128, 80, 256):
            if pass_ == "pre" and head_dim in (40, 80):
                continue  # a row reduction without tl.dot: far from any register limit
            specs.extend(_specs(pass_, torch.bfloat16, head_dim, "ieee"))
        for precision in fp32_precisions:
            for head_dim in (64, 128, 256):
                specs.extend(_specs(pass_, torch.float32, head_dim, precision))
        specs.extend(_specs(pass_, torch.bfloat16, 256, "ieee", varlen=True, flag=True))
        specs.extend(_specs(pass_, torch.float16, 128, "ieee", varlen=True, flag=True))
        if pass_ != "pre":
            specs.extend(_specs(pass_, torch.bfloat16, 128, "ieee", aligned=False))
            specs.extend(_specs(pass_, torch.bfloat16, 256, "ieee", aligned=False))
            specs.extend(_specs(pass_, torch.float32, 256, "tf32", aligned=False))
            for head_dim in (64, 128, 256):  # IEEE FMA loops: the heaviest register users at every head dim
                specs.extend(_specs(pass_, torch.float32, head_dim, "ieee", aligned=False))
        if pass_ != "pre":  # the split head dims (80 bf16 is above)
            for head_dim in (72, 88, 96):
                specs.extend(_specs(pass_, torch.bfloat16, head_dim, "ieee"))
            for precision in fp32_precisions:
                for head_dim in (80, 96):
                    specs.extend(_specs(pass_, torch.float32, head_dim, precision))
            specs.extend(_specs(pass_, torch.bfloat16, 96, "ieee", varlen=True, flag=True))
            specs.extend(_specs(pass_, torch.float32, 96, "ieee", varlen=True, flag=True))
            specs.extend(_specs(pass_, torch.bfloat16, 96, "ieee", aligned=False))
            specs.extend(_specs(pass_, torch.float32, 96, "ieee", aligned=False))
        if pass_ in ("dkdv", "dq"):  # the split IEEE kernels' unaligned 80 bucket, at its odd head dim
            specs.extend(_specs(pass_, torch.float32, 72, "ieee", aligned=False))
    return specs
