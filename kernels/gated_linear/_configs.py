"""Launch configs of the tanh_gated_linear kernels, as data, and the compile-gate specs derived from them.

One table for sm_80 and sm_90, keyed by (kernel, operands, aligned), with sm_90's own entries for aligned
16-bit operands (``arch=90``: wgmma keeps its accumulators over 128 threads, so bigger output tiles fit; the
compile gate fails any of them that does not lower to wgmma):

- operands: "16-bit" (fp16 / bf16 on the tensor cores), "tf32" (fp32 operands, TF32 tensor cores:
  ``torch.get_float32_matmul_precision()`` "high" / "medium") or "ieee" (fp32 operands, IEEE fp32 FMA
  dots: "highest", torch's default). See ``_common.matmul_precision``.
- aligned: Triton's JIT specialises a launch on 16-byte aligned pointers, sizes and row strides that are
  multiples of 16 and unit inner strides, and only then can it use 16-byte asynchronous copies and
  pipeline the K loop. The aligned configs are sized for that code (big tiles, 3 stages); anything else
  (K = 77, views at odd offsets) runs the unaligned configs (operands in registers, no pipelining).

backend="gemm" has its own small table, ``PASS_CONFIGS``: one tile per one-pass kernel (memory-bound, no dot).

Every config compiles with 0 spills on Triton 3.6, 3.8 and 3.9 for sm_80 and sm_90
(``python -m mmfast compile-report --specs mmfast.kernels.gated_linear:compile_specs --no-nvcc``).
"""
import functools
from dataclasses import dataclass

import torch

from .._common import DTYPE_NAMES, TL_DTYPES
from .._registry import CompileSpec, derive_signature, step
from ._kernels import (tanh_gated_linear_bwd_da_kernel, tanh_gated_linear_bwd_dw_kernel,
                       tanh_gated_linear_bwd_rows_kernel, tanh_gated_linear_bwd_weight_kernel,
                       tanh_gated_linear_epilogue_kernel, tanh_gated_linear_fwd_kernel)

KERNELS = {"fwd": tanh_gated_linear_fwd_kernel, "da": tanh_gated_linear_bwd_da_kernel,
           "dw": tanh_gated_linear_bwd_dw_kernel}


@dataclass(frozen=True)
class Config:
    kernel: str  # "fwd" | "da" | "dw"
    operands: str  # "16-bit" | "tf32" | "ieee"
    aligned: bool
    tiles: dict
    num_warps: int
    num_stages: int
    why: str
    arch: int = None  # the compute capability this entry is for (None: every other one)


def _tiles(kernel, rows, cols, red, group=8):
    """Tile sizes by role: `rows` x `cols` of the output tile, `red` along the reduction."""
    names = {"fwd": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), "da": ("BLOCK_M", "BLOCK_K", "BLOCK_N", "GROUP_M"),
             "dw": ("BLOCK_N", "BLOCK_K", "BLOCK_M", "GROUP_N")}[kernel]
    return dict(zip(names, (rows, cols, red, group)))


GPU_CONFIGS = (
    # aligned, 16-bit: 128-row tiles over 8 warps, 3 pipelined stages (at most 98 KiB of shared memory)
    Config("fwd", "16-bit", True, _tiles("fwd", 128, 128, 64), 8, 3, "128x128 MMA tile, 64-deep K steps"),
    Config("da", "16-bit", True, _tiles("da", 128, 128, 64), 8, 3, "the forward's tile, reducing over N"),
    Config("dw", "16-bit", True, _tiles("dw", 128, 64, 64), 8, 3,
           "K tile 64: the gate gradient keeps a W tile beside the accumulator"),
    # aligned, 16-bit, sm_90 (wgmma): 128 x 256 spills in the forward (epilogue) and in d_W; d_a's 128 x 256
    # reaches 242 registers
    Config("fwd", "16-bit", True, _tiles("fwd", 128, 128, 64), 8, 4,
           "the sm_80 tile with a 4th stage (128 KiB): Hopper's latency wants deeper prefetch", arch=90),
    Config("da", "16-bit", True, _tiles("da", 128, 128, 64), 8, 4, "as the forward", arch=90),
    Config("dw", "16-bit", True, _tiles("dw", 128, 128, 64), 8, 3,
           "128 x 128 output tile (174 registers): 64 FLOP/B instead of 43, half the gate's partial sums", arch=90),
    # aligned, TF32: an fp32 element is twice the bytes of a 16-bit one, so the tiles are halved
    Config("fwd", "tf32", True, _tiles("fwd", 128, 64, 32), 8, 3, "half the 16-bit columns and K step"),
    Config("da", "tf32", True, _tiles("da", 128, 64, 32), 8, 3, "half the 16-bit columns and N step"),
    Config("dw", "tf32", True, _tiles("dw", 128, 64, 32), 8, 3, "half the 16-bit M step"),
    # unaligned: no asynchronous copies, so no pipelining (2 stages) and 64 x 64 tiles held in registers
    Config("fwd", "16-bit", False, _tiles("fwd", 64, 64, 32), 4, 2, "register-resident 64x64 tile"),
    Config("da", "16-bit", False, _tiles("da", 64, 64, 32), 4, 2, "register-resident 64x64 tile"),
    Config("dw", "16-bit", False, _tiles("dw", 64, 64, 32), 8, 2,
           "8 warps: with 4 it needs 240+ registers on Triton 3.8 / 3.9 and spills on 3.6 (sm_80)"),
    Config("fwd", "tf32", False, _tiles("fwd", 64, 64, 16), 4, 2, "register-resident tile, half the K step"),
    Config("da", "tf32", False, _tiles("da", 64, 64, 16), 4, 2, "register-resident tile, half the N step"),
    Config("dw", "tf32", False, _tiles("dw", 64, 64, 16), 8, 2, "the 16-bit config with half the M step"),
    # IEEE fp32 (FMA dots, no tensor cores): a thread keeps its rows of A and columns of B for the whole
    # reduction step beside its accumulators, so the step is 16 deep (the least tl.dot takes on Triton 3.6)
    Config("fwd", "ieee", True, _tiles("fwd", 128, 64, 16), 8, 2,
           "FMA dot: 32 accumulators a thread; 2 stages: with 3 Triton 3.9 spills 4 B on sm_90"),
    Config("da", "ieee", True, _tiles("da", 128, 64, 16), 8, 3, "the forward's FMA tile, reducing over N"),
    Config("dw", "ieee", True, _tiles("dw", 128, 64, 16), 8, 3, "the forward's FMA tile, reducing over M"),
    Config("fwd", "ieee", False, _tiles("fwd", 64, 64, 16), 8, 2, "64 rows: 128 need 204-255 registers"),
    Config("da", "ieee", False, _tiles("da", 64, 64, 16), 8, 2, "64 rows, as the forward"),
    Config("dw", "ieee", False, _tiles("dw", 64, 32, 16), 4, 2, "32 K columns: 64 x 64 spills on every Triton"),
)
_BY_KEY = {(c.kernel, c.operands, c.aligned, c.arch): c for c in GPU_CONFIGS}

# Under the interpreter: small tiles, so the odd test shapes cross several tile boundaries in every
# dimension (the kernels' logic does not depend on the tile sizes; the GPU tiles are covered by the
# compile gate and the CUDA runs of the same tests).
INTERPRET_TILES = {"fwd": _tiles("fwd", 32, 64, 32, 2), "da": _tiles("da", 32, 64, 32, 2),
                   "dw": _tiles("dw", 64, 32, 64, 2)}


def operands(dtype, precision):
    return "16-bit" if dtype != torch.float32 else precision


def choose(kernel, dtype, precision, tensors, sizes, inner_strides):
    """(tiles, num_warps, num_stages) for a launch: the aligned config when every pointer is 16-byte
    aligned, every size and row stride in `sizes` a multiple of 16 and every inner stride 1 (what the
    JIT specialises on), else the unaligned one."""
    if tensors[0].device.type != "cuda":
        return INTERPRET_TILES[kernel], 4, 1
    aligned = (all(t.data_ptr() % 16 == 0 for t in tensors) and all(i % 16 == 0 for i in sizes)
               and all(st == 1 for st in inner_strides))
    key = (kernel, operands(dtype, precision), aligned)
    config = _BY_KEY.get(key + (_capability(tensors[0].device),)) or _BY_KEY[key + (None,)]
    return config.tiles, config.num_warps, config.num_stages


# ----------------------------------------------------------------------------------------------
# backend="gemm": the one-pass kernels around cuBLAS's GEMMs. Memory-bound, no dot: any alignment runs the
# same code (the JIT's 16-byte specialisation only widens the accesses), so one config each.


@dataclass(frozen=True)
class PassConfig:
    tiles: dict
    num_warps: int
    why: str


PASS_KERNELS = {"epilogue": tanh_gated_linear_epilogue_kernel, "rows": tanh_gated_linear_bwd_rows_kernel,
                "weight": tanh_gated_linear_bwd_weight_kernel}
PASS_CONFIGS = {
    "epilogue": PassConfig(dict(BLOCK_M=32, BLOCK_N=128), 8,
                           "16 elements a thread: 16-byte loads of h when aligned; unaligned (one pointer an "
                           "element) still 102 registers, 16 warps an SM (64 rows: 192, 8 warps)"),
    "rows": PassConfig(dict(BLOCK_M=32, BLOCK_N=128), 8,
                       "as the epilogue; column partials M/32 x N fp32 (4 MB at M=16384, N=2048)"),
    "weight": PassConfig(dict(BLOCK_N=32, BLOCK_K=128), 8, "as the epilogue, over G (N, K); K/128 gate partials"),
}
# under the interpreter: small tiles, so the odd test shapes cross several tiles in each dimension
PASS_INTERPRET_TILES = {"epilogue": dict(BLOCK_M=16, BLOCK_N=32), "rows": dict(BLOCK_M=16, BLOCK_N=32),
                        "weight": dict(BLOCK_N=16, BLOCK_K=32)}


def choose_pass(kernel, device):
    """(tiles, num_warps) of a one-pass kernel of the gemm backend."""
    if device.type != "cuda":
        return PASS_INTERPRET_TILES[kernel], 4
    c = PASS_CONFIGS[kernel]
    return c.tiles, c.num_warps


@functools.lru_cache(maxsize=None)
def _capability(device):
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# ----------------------------------------------------------------------------------------------
# Compile-gate specs

# Triton's JIT specialises integer arguments equal to 1 into constants; with contiguous operands (the
# launchers' common case) these strides are 1, so the gate compiles that specialisation.
_UNIT_STRIDES = {"fwd": ("stride_ak", "stride_wk", "stride_rn"), "da": ("stride_dyn", "stride_wk"),
                 "dw": ("stride_dyn", "stride_ak", "stride_wk")}
# the heaviest flags (bias, vector gate, row mask, all three gradients): the other settings only remove code
_FLAGS = dict(HAS_BIAS=True, SCALAR_GATE=False, HAS_ROW_MASK=True, NEED_DW=True, NEED_DBIAS=True, NEED_DGATE=True,
              CAST_DY=False, EMULATE=False)


def compile_specs():
    """Every kernel x GPU config of the tables (the Triton backend's GEMMs, then the gemm backend's passes)."""
    yield from _gemm_kernel_specs()
    yield from _pass_specs()


def _pass_specs():
    """Each one-pass kernel of the gemm backend for bf16 and fp32 operands, with the JIT's 16-byte
    specialisation (the common case) and without it (odd sizes, views)."""
    types = {"s_ptr": "*fp32", "h_ptr": "*fp32", "g_ptr": "*fp32", "colsum_ptr": "*fp32", "part_ptr": "*fp32",
             "row_mask_ptr": "*i8", "M": "i32", "N": "i32", "K": "i32", "stride_*": "i32"}
    flags = dict(HAS_BIAS=True, SCALAR_GATE=False, HAS_ROW_MASK=True, WRITE_UPDATE=True, WRITE_LIVE=True, COLSUM=True,
                 NEED_DW=True, NEED_DGATE=True, EMULATE=False)
    unit = {"epilogue": "stride_rn", "rows": "stride_dyn", "weight": "stride_wk"}
    for name, c in PASS_CONFIGS.items():
        kernel = PASS_KERNELS[name]
        for dtype, aligned in ((torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)):
            signature = derive_signature(kernel, types, default="*" + DTYPE_NAMES[dtype])
            constexprs = dict(flags, OUT_DTYPE=TL_DTYPES[dtype], IN_DTYPE=TL_DTYPES[dtype], **c.tiles)
            constexprs = {k: v for k, v in constexprs.items() if signature.get(k) == "constexpr"}
            signature[unit[name]] = "constexpr"
            constexprs[unit[name]] = 1
            missing = [k for k, t in signature.items() if t == "constexpr" and k not in constexprs]
            assert not missing, f"{kernel.__name__}: no value for constexprs {missing}"
            divisibility = {k: 16 for k, t in signature.items() if t != "constexpr"} if aligned else {}
            tiles = " ".join(f"{k}={v}" for k, v in c.tiles.items())
            label = (f"gemm-backend {name} {DTYPE_NAMES[dtype]} {'aligned' if aligned else 'unaligned'} {tiles} "
                     f"warps={c.num_warps}")
            yield CompileSpec(kernel=kernel, signature=signature, constexprs=constexprs, num_warps=c.num_warps,
                              num_stages=1, divisibility=divisibility, label=label)


def _gemm_kernel_specs():
    """Every kernel x GPU config of the Triton backend's table. 16-bit configs are compiled for bf16 (fp16
    differs only in the MMA's input type); unit inner strides, as the JIT specialises them; the signature is
    read from the kernel's parameter list (pointers in the operand dtype unless named here)."""
    for c in GPU_CONFIGS:
        dtype = torch.bfloat16 if c.operands == "16-bit" else torch.float32
        precision = "ieee" if c.operands == "16-bit" else c.operands
        kernel = KERNELS[c.kernel]
        types = {"s_ptr": "*fp32", "part_ptr": "*fp32", "row_mask_ptr": "*i8", "M": "i32", "N": "i32", "K": "i32",
                 "stride_*": "i32"}
        signature = derive_signature(kernel, types, default="*" + DTYPE_NAMES[dtype])
        constexprs = {name: value for name, value in _FLAGS.items() if name in signature}
        constexprs.update(PRECISION=precision, OUT_DTYPE=TL_DTYPES[dtype], IN_DTYPE=TL_DTYPES[dtype], **c.tiles)
        constexprs = {name: value for name, value in constexprs.items() if signature.get(name) == "constexpr"}
        for name in _UNIT_STRIDES[c.kernel]:
            signature[name] = "constexpr"
            constexprs[name] = 1
        missing = [name for name, t in signature.items() if t == "constexpr" and name not in constexprs]
        assert not missing, f"{kernel.__name__}: no value for constexprs {missing}"
        # aligned: the JIT also finds every pointer 16-byte aligned and the sizes and strides divisible by 16
        divisibility = {name: 16 for name, t in signature.items() if t != "constexpr"} if c.aligned else {}
        tiles = " ".join(f"{k}={v}" for k, v in c.tiles.items())
        label = (f"{c.kernel} {DTYPE_NAMES[dtype]}{'' if c.operands == '16-bit' else ' ' + c.operands} "
                 f"{'aligned' if c.aligned else 'unaligned'} {tiles} warps={c.num_warps} stages={c.num_stages}")
        # an sm_80 / sm_90 pair: each entry is compiled for the targets that choose it
        sm90 = (c.kernel, c.operands, c.aligned, 90) in _BY_KEY
        targets = (c.arch,) if c.arch else ((80,) if sm90 else ())
        # one reduction step: an (rows x red) by (red x cols) dot over one tile of each operand
        rows, cols, red = (c.tiles[n] for n in list(_tiles(c.kernel, 0, 0, 0))[:3])
        yield CompileSpec(kernel=kernel, signature=signature, constexprs=constexprs, num_warps=c.num_warps,
                          num_stages=c.num_stages, divisibility=divisibility, label=label, targets=targets,
                          needs_wgmma=c.aligned and c.operands == "16-bit",
                          **step(dots=[(rows, cols, red)], loads=[(rows, red, dtype), (red, cols, dtype)]))
