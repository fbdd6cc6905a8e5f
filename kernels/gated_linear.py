"""Tanh-gated linear: ``out = residual + tanh(gate) · (a @ weightᵀ + bias)`` as one GEMM.

The gated residual of Flamingo's GATED XATTN-DENSE layers, Llama 3.2 Vision's cross-attention layers
and Idefics' gated layers. Eager PyTorch writes the projection, reads it back to scale it, writes the
scaled copy, reads it and the residual to add them (three extra passes over an (M, N) tensor), and the
gate's gradient is one more full reduction over ``dy ⊙ (a Wᵀ + b)``. Here:

- forward: one GEMM whose epilogue adds the bias, scales by tanh(gate) (scalar or per output channel),
  adds the residual and zeroes the update of masked rows (Llama 3.2's full-text-row mask), written once;
- backward: ``d_residual = dy`` (no copy); ``d_a = (dy·tanh g) @ W`` as one GEMM (a vector gate scales
  dy in the prologue, a scalar gate scales the fp32 accumulator in the epilogue); ``d_W = tanh(g)·dyᵀ a``
  as one GEMM whose epilogue also produces ``d_bias`` (the column sums of dy, accumulated by the
  programs of the first K tile) and the gate gradient. The gate gradient needs ``Σ_m dy ⊙ (a Wᵀ + b)``,
  which is never re-materialised: per output channel n,
  ``Σ_m dy[m,n] (Σ_k a[m,k] W[n,k] + b[n]) = Σ_k W[n,k] G[n,k] + b[n] Σ_m dy[m,n]`` with
  ``G = dyᵀ a`` the unscaled weight gradient the dW program already holds in registers. Each
  (n-tile, k-tile) program writes its partial sums to a (K tiles, N) fp32 buffer that is summed in a
  fixed order afterwards: deterministic, no atomics, one extra read of a W tile per program.

Rows whose update is masked out skip their GEMM tiles entirely when a whole tile is masked (text before
the first image in Llama 3.2).

Because the epilogue takes any residual and per-channel or scalar gate, the same op is the FFN
down-projection of a gated block: ``y + tanh(β)·(act(h W₁ᵀ) W₂ᵀ)`` is
``tanh_gated_linear(act(h W₁ᵀ), W₂, None, β, y)``. The activation (GELU for Flamingo, SiLU-gated for
Llama 3.2) stays with the up-projection: it is elementwise on the up-projection's output and belongs in
*that* GEMM's epilogue, not here — fusing it into the down-projection's prologue would recompute it once
per N tile (N/BLOCK_N times) and, in the backward, force keeping or recomputing the pre-activation inside
the d_a GEMM. The down-projection's epilogue is where the gate, residual and row mask live.

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1) and "reference" (PyTorch autograd of
``kernels.reference.tanh_gated_linear_reference``).
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._registry import CompileSpec
from ._dispatch import interpreting, resolve_backend
from ._common import round_to

# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """(row tile, column tile) of program `pid`, walking GROUP row tiles per column sweep so that the
    column operand tiles a group reads stay in L2 (the Triton matmul tutorial's swizzle)."""
    in_group = GROUP * num_cols
    group = pid // in_group
    first_row = group * GROUP
    size = tl.minimum(num_rows - first_row, GROUP)
    row = first_row + ((pid % in_group) % size)
    col = (pid % in_group) // size
    return row, col


@triton.jit
def _dot(x, y, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # DOT_FP32 (interpreter only): its bf16 tl.dot is wrong; bf16 products are exact in fp32
    if DOT_FP32:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=PRECISION)


@triton.jit
def _tanh_gated_linear_fwd_kernel(
    a_ptr, w_ptr, bias_ptr, s_ptr, res_ptr, row_mask_ptr, out_ptr,  # s = tanh(gate), fp32, (1,) or (N,)
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr,
    SCALAR_GATE: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    # 64-bit offsets only for the tile's origin; offsets inside a tile stay 32-bit (cheap pointer math)
    m0 = (pid_m * BLOCK_M).to(tl.int64)
    n0 = (pid_n * BLOCK_N).to(tl.int64)
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    lk = tl.arange(0, BLOCK_K)
    mask_m = pid_m * BLOCK_M + lm < M
    mask_n = pid_n * BLOCK_N + ln < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    if HAS_ROW_MASK:
        dead = tl.load(row_mask_ptr + m0 + lm, mask=mask_m, other=1) != 0
        k_tiles = tl.where(tl.min(dead.to(tl.int32), axis=0) == 1, 0, k_tiles)  # the whole tile is masked
    a_ptrs = a_ptr + m0 * stride_am + (lm[:, None] * stride_am + lk[None, :] * stride_ak)
    w_ptrs = w_ptr + n0 * stride_wn + (lk[:, None] * stride_wk + ln[None, :] * stride_wn)  # Wᵀ tile (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, k_tiles):
        k_left = K - kt * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (lk[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(lk[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = _dot(a, w, acc, DOT_FP32, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    # epilogue: bias, gate, residual, row mask; one rounding to the output dtype
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n0 + ln, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SCALAR_GATE:
        upd = acc * tl.load(s_ptr)
    else:
        upd = acc * tl.load(s_ptr + n0 + ln, mask=mask_n, other=0.0)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    res_ptrs = res_ptr + (m0 * stride_rm + n0 * stride_rn) + (lm[:, None] * stride_rm + ln[None, :] * stride_rn)
    res = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    out = res + upd
    if HAS_ROW_MASK:
        out = tl.where(dead[:, None], res, out)
    out_ptrs = out_ptr + (m0 * N + n0) + (lm[:, None] * N + ln[None, :])
    tl.store(out_ptrs, round_to(out, OUT_DTYPE, EMULATE), mask=mask)


@triton.jit
def _tanh_gated_linear_bwd_da_kernel(
    dy_ptr, w_ptr, s_ptr, row_mask_ptr, da_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_wn, stride_wk,
    SCALAR_GATE: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    IN_DTYPE: tl.constexpr,
    CAST_DY: tl.constexpr,  # dy (the residual's dtype, fp32) is wider than the GEMM inputs
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the reduction dimension here
    GROUP_M: tl.constexpr,
):
    """d_a (M, K) = (dy · tanh g) @ W, rows of masked tokens 0."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    rows = offs_m.to(tl.int64)
    ks = offs_k.to(tl.int64)
    n_tiles = tl.cdiv(N, BLOCK_N)
    if HAS_ROW_MASK:
        dead = tl.load(row_mask_ptr + rows, mask=mask_m, other=1) != 0
        n_tiles = tl.where(tl.min(dead.to(tl.int32), axis=0) == 1, 0, n_tiles)
    dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + ks[None, :] * stride_wk  # W tile (BN, BK)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for nt in range(0, n_tiles):
        n_left = N - nt * BLOCK_N
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & (offs_n[None, :] < n_left), other=0.0)
        if not SCALAR_GATE:
            # a per-channel scale cannot move past the reduction over N: scale dy in the prologue and
            # round it to the input dtype, as the MMA wants (PyTorch rounds dy·tanh g the same way)
            s = tl.load(s_ptr + nt * BLOCK_N + offs_n, mask=offs_n < n_left, other=0.0)
            dy = round_to(dy.to(tl.float32) * s[None, :], IN_DTYPE, EMULATE)
        elif CAST_DY:  # an fp32 residual stream over 16-bit GEMM inputs: round dy for the MMA
            dy = round_to(dy.to(tl.float32), IN_DTYPE, EMULATE)
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < n_left) & mask_k[None, :], other=0.0)
        acc = _dot(dy, w, acc, DOT_FP32, PRECISION)
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn
    if SCALAR_GATE:
        acc = acc * tl.load(s_ptr)
    if HAS_ROW_MASK:
        acc = tl.where(dead[:, None], 0.0, acc)
    mask = mask_m[:, None] & mask_k[None, :]
    tl.store(da_ptr + rows[:, None] * K + ks[None, :], round_to(acc, IN_DTYPE, EMULATE), mask=mask)


@triton.jit
def _tanh_gated_linear_bwd_dw_kernel(
    dy_ptr, a_ptr, w_ptr, bias_ptr, s_ptr, row_mask_ptr, dw_ptr, dbias_ptr, part_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_am, stride_ak, stride_wn, stride_wk,
    HAS_BIAS: tl.constexpr,
    SCALAR_GATE: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    NEED_DGATE: tl.constexpr,
    IN_DTYPE: tl.constexpr,
    CAST_DY: tl.constexpr,  # dy (the residual's dtype, fp32) is wider than the GEMM inputs
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # the reduction dimension here
    GROUP_N: tl.constexpr,
):
    """G = dyᵀ a over the live rows; d_W = tanh(g)·G; d_bias = tanh(g)·Σ_m dy (first K tile);
    part[k tile, n] = Σ_k W ⊙ G (+ b·Σ_m dy in the first K tile): the gate gradient's partial sums."""
    # K = 0 still runs one column of programs (d_bias, the bias part of the gate gradient)
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.maximum(tl.cdiv(K, BLOCK_K), 1), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_k = offs_k < K
    cols = offs_n.to(tl.int64)
    ks = offs_k.to(tl.int64)
    first_k = pid_k == 0
    dyt_ptrs = dy_ptr + cols[:, None] * stride_dyn + offs_m[None, :].to(tl.int64) * stride_dym  # dyᵀ (BN, BM)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak  # (BM, BK)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        live = (m0 + offs_m) < M
        if HAS_ROW_MASK:
            live = live & (tl.load(row_mask_ptr + m0 + offs_m, mask=live, other=1) == 0)
        dyt = tl.load(dyt_ptrs, mask=mask_n[:, None] & live[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=live[:, None] & mask_k[None, :], other=0.0)
        if CAST_DY:
            acc = _dot(round_to(dyt.to(tl.float32), IN_DTYPE, EMULATE), a, acc, DOT_FP32, PRECISION)
        else:
            acc = _dot(dyt, a, acc, DOT_FP32, PRECISION)
        if NEED_DBIAS or (NEED_DGATE and HAS_BIAS):
            if first_k:
                colsum += tl.sum(dyt.to(tl.float32), axis=1)
        dyt_ptrs += BLOCK_M * stride_dym
        a_ptrs += BLOCK_M * stride_am
    if SCALAR_GATE:
        s = tl.load(s_ptr)
    else:
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    if NEED_DW:
        if SCALAR_GATE:
            dw = acc * s
        else:
            dw = acc * s[:, None]
        mask = mask_n[:, None] & mask_k[None, :]
        tl.store(dw_ptr + cols[:, None] * K + ks[None, :], round_to(dw, IN_DTYPE, EMULATE), mask=mask)
    if NEED_DBIAS:
        if first_k:
            tl.store(dbias_ptr + offs_n, round_to(colsum * s, IN_DTYPE, EMULATE), mask=mask_n)
    if NEED_DGATE:
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        part = tl.sum(acc * w.to(tl.float32), axis=1)
        if HAS_BIAS:
            if first_k:
                part += colsum * tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(part_ptr + pid_k * N + offs_n, part, mask=mask_n)


# ----------------------------------------------------------------------------------------------
# Launch configuration

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_SIG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)

# One table for sm_80 and sm_90, keyed by (kernel, 16-bit inputs?, aligned?); values: (tiles, num_warps,
# num_stages). Aligned (see _config): 128-row tiles over 8 warps with 3 pipelined stages (at most 98 KiB of
# shared memory; sm_80 allows 163 KiB). fp32 runs as 3xTF32 (fp32-level accuracy on tensor cores), which
# splits every operand in two, so its tiles are halved; the dW kernel keeps a W tile beside its
# accumulator for the gate gradient, so its K tile is 64. Unaligned operands (odd sizes or strides such
# as K = 77, views at odd offsets) cannot use 16-byte asynchronous copies, so the loop is not pipelined
# and the operands stay in registers: 64 x 64 tiles. No config spills (python -m mmfast compile-report) on
# Triton 3.6, 3.8 or 3.9. The 16-bit unaligned dW kernel runs 8 warps: with 4 it sat at 240-243 registers on
# 3.8 / 3.9 and spilled 96 B on 3.6 (sm_80, 255 registers); 8 warps hold 125-150 (sm_80) / 114-127 (sm_90).
_GPU_CONFIGS = {
    ("fwd", True, True): (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), 8, 3),
    ("fwd", False, True): (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), 8, 3),
    ("da", True, True): (dict(BLOCK_M=128, BLOCK_K=128, BLOCK_N=64, GROUP_M=8), 8, 3),
    ("da", False, True): (dict(BLOCK_M=128, BLOCK_K=64, BLOCK_N=32, GROUP_M=8), 8, 3),
    ("dw", True, True): (dict(BLOCK_N=128, BLOCK_K=64, BLOCK_M=64, GROUP_N=8), 8, 3),
    ("dw", False, True): (dict(BLOCK_N=128, BLOCK_K=64, BLOCK_M=32, GROUP_N=8), 8, 3),
    ("fwd", True, False): (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), 4, 2),
    ("fwd", False, False): (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8), 4, 2),
    ("da", True, False): (dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=32, GROUP_M=8), 4, 2),
    ("da", False, False): (dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=16, GROUP_M=8), 4, 2),
    ("dw", True, False): (dict(BLOCK_N=64, BLOCK_K=64, BLOCK_M=32, GROUP_N=8), 8, 2),
    ("dw", False, False): (dict(BLOCK_N=64, BLOCK_K=64, BLOCK_M=16, GROUP_N=8), 8, 2),
}
# Under the interpreter: smaller tiles, so the odd test shapes cross several tile boundaries in every
# dimension (the kernels' logic does not depend on the tile sizes; the GPU tiles are covered by the
# compile gate and the CUDA runs of the same tests).
_INTERPRET_CONFIGS = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=2),
    "da": dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=32, GROUP_M=2),
    "dw": dict(BLOCK_N=64, BLOCK_K=32, BLOCK_M=64, GROUP_N=2),
}


def _config(kernel, dtype, tensors, ints, unit_strides):
    """(tiles, num_warps, num_stages). The aligned configs are the code Triton's JIT generates when every
    pointer is 16-byte aligned, every size and row stride a multiple of 16 and the inner strides 1 (it
    specialises on exactly that; compile_specs() compiles that specialisation): 16-byte asynchronous
    copies, a pipelined loop. Anything else gets the unaligned config."""
    if tensors[0].device.type != "cuda":
        return _INTERPRET_CONFIGS[kernel], 4, 1
    aligned = (all(t.data_ptr() % 16 == 0 for t in tensors) and all(i % 16 == 0 for i in ints)
               and all(st == 1 for st in unit_strides))
    return _GPU_CONFIGS[(kernel, dtype != torch.float32, aligned)]


def _precision(dtype):
    # fp32 operands follow PyTorch's matmul setting: TF32 when allowed, else 3xTF32 (fp32-level accuracy
    # on the tensor cores; "ieee" would fall back to FMA dots that need more registers than there are);
    # for 16-bit operands "tf32" is tl.dot's default and changes nothing
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


_COMMON_SIG = {"M": "i32", "N": "i32", "K": "i32"}
# Triton's JIT specialises integer arguments equal to 1 into constants; with contiguous operands (the
# launchers' common case) these strides are 1, so the gate compiles that specialisation.
_UNIT_STRIDES = {"fwd": ("stride_ak", "stride_wk", "stride_rn"), "da": ("stride_dyn", "stride_wk"),
                 "dw": ("stride_dyn", "stride_ak", "stride_wk")}


def compile_specs():
    """Every kernel x GPU config of the table, with the heaviest flags (bias, vector gate, row mask, all
    three gradients: the other settings only remove code). 16-bit configs are compiled for bf16 (fp16
    differs only in the MMA's input type); unit inner strides, as the JIT specialises them."""
    for (kernel, sixteen, aligned), (tiles, warps, stages) in _GPU_CONFIGS.items():
        for dtype in (torch.bfloat16,) if sixteen else (torch.float32,):
            p = "*" + _SIG[dtype]
            common = dict(DOT_FP32=False, PRECISION=_precision(dtype), EMULATE=False, SCALAR_GATE=False, HAS_ROW_MASK=True,
)
            if kernel == "fwd":
                fn = _tanh_gated_linear_fwd_kernel
                sig = {"a_ptr": p, "w_ptr": p, "bias_ptr": p, "s_ptr": "*fp32", "res_ptr": p, "row_mask_ptr": "*i8",
                       "out_ptr": p, **_COMMON_SIG, **{s: "i32" for s in ("stride_am", "stride_ak", "stride_wn",
                                                                          "stride_wk", "stride_rm", "stride_rn")}}
                consts = dict(common, HAS_BIAS=True, OUT_DTYPE=_TL_DTYPES[dtype], **tiles)
            elif kernel == "da":
                fn = _tanh_gated_linear_bwd_da_kernel
                sig = {"dy_ptr": p, "w_ptr": p, "s_ptr": "*fp32", "row_mask_ptr": "*i8", "da_ptr": p, **_COMMON_SIG,
                       **{s: "i32" for s in ("stride_dym", "stride_dyn", "stride_wn", "stride_wk")}}
                consts = dict(common, IN_DTYPE=_TL_DTYPES[dtype], CAST_DY=False, **tiles)
            else:
                fn = _tanh_gated_linear_bwd_dw_kernel
                sig = {"dy_ptr": p, "a_ptr": p, "w_ptr": p, "bias_ptr": p, "s_ptr": "*fp32", "row_mask_ptr": "*i8",
                       "dw_ptr": p, "dbias_ptr": p, "part_ptr": "*fp32", **_COMMON_SIG,
                       **{s: "i32" for s in ("stride_dym", "stride_dyn", "stride_am", "stride_ak", "stride_wn",
                                             "stride_wk")}}
                consts = dict(common, HAS_BIAS=True, NEED_DW=True, NEED_DBIAS=True, NEED_DGATE=True,
                              IN_DTYPE=_TL_DTYPES[dtype], CAST_DY=False, **tiles)
            consts.update({name: 1 for name in _UNIT_STRIDES[kernel]})
            sig.update({name: "constexpr" for name in consts})
            tile_label = " ".join(f"{k}={v}" for k, v in tiles.items())
            # aligned configs run only on 16-byte aligned bases with row strides of 16 bytes (launcher-checked)
            # "aligned": the common transformer case, where the JIT also finds M, N, K and the strides divisible by 16
            div = {name: 16 for name, t in sig.items() if t != "constexpr"} if aligned else {}
            yield CompileSpec(kernel=fn, signature=sig, constexprs=consts, num_warps=warps, num_stages=stages,
                              divisibility=div,
                              label=f"{kernel} {_SIG[dtype]} {'aligned' if aligned else 'unaligned'} {tile_label}")


# ----------------------------------------------------------------------------------------------
# Launchers


def _empty(shape, dtype, device):
    # every output buffer comes from here (tests poison it with NaN to catch unwritten elements)
    return torch.empty(shape, dtype=dtype, device=device)


def _row_mask_arg(row_mask, fallback):
    # the kernels read the mask as bytes; `fallback` is any tensor on the device when there is none
    return fallback if row_mask is None else row_mask.view(torch.uint8)


def _forward(a, weight, bias, s, residual, row_mask):
    """a (M, K), weight (N, K), bias (N,) | None, s fp32 (1,) | (N,), residual (M, N) -> out (M, N)."""
    M, K = a.shape
    N = weight.shape[0]
    out = _empty((M, N), residual.dtype, a.device)
    if M == 0 or N == 0:
        return out
    tiles, warps, stages = _config("fwd", a.dtype, (a, weight, residual, s),
                                   (M, N, K, a.stride(0), weight.stride(0), residual.stride(0)),
                                   (a.stride(1), weight.stride(1), residual.stride(1)))
    grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"]),)
    _tanh_gated_linear_fwd_kernel[grid](
        a, weight, s if bias is None else bias, s, residual, _row_mask_arg(row_mask, s), out,
        M, N, K,
        a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), residual.stride(0), residual.stride(1),
        HAS_BIAS=bias is not None, SCALAR_GATE=s.numel() == 1,
        HAS_ROW_MASK=row_mask is not None, OUT_DTYPE=_TL_DTYPES[out.dtype],
        DOT_FP32=interpreting() and a.dtype == torch.bfloat16, PRECISION=_precision(a.dtype), EMULATE=interpreting(),
        num_warps=warps, num_stages=stages, **tiles,
    )
    return out


def _backward_da(dy, weight, s, row_mask, M, K):
    N = weight.shape[0]
    da = _empty((M, K), weight.dtype, weight.device)
    if M == 0 or K == 0:
        return da
    tiles, warps, stages = _config("da", weight.dtype, (dy, weight, s),
                                   (M, N, K, dy.stride(0), weight.stride(0)), (dy.stride(1), weight.stride(1)))
    grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(K, tiles["BLOCK_K"]),)
    _tanh_gated_linear_bwd_da_kernel[grid](
        dy, weight, s, _row_mask_arg(row_mask, s), da,
        M, N, K,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
        SCALAR_GATE=s.numel() == 1, HAS_ROW_MASK=row_mask is not None, IN_DTYPE=_TL_DTYPES[weight.dtype],
        CAST_DY=dy.dtype != weight.dtype, DOT_FP32=interpreting() and weight.dtype == torch.bfloat16, PRECISION=_precision(weight.dtype),
        EMULATE=interpreting(), num_warps=warps, num_stages=stages, **tiles,
    )
    return da


def _backward_dw(dy, a, weight, bias, s, row_mask, need_dw, need_dbias, need_dgate):
    """(d_W or None, d_bias or None, partial gate sums (K tiles, N) fp32 or None)."""
    M, K = a.shape
    N = weight.shape[0]
    tiles, warps, stages = _config("dw", weight.dtype, (dy, a, weight, s),
                                   (M, N, K, dy.stride(0), a.stride(0), weight.stride(0)),
                                   (dy.stride(1), a.stride(1), weight.stride(1)))
    k_tiles = max(1, triton.cdiv(K, tiles["BLOCK_K"]))  # K = 0: one program column still writes d_bias
    dw = _empty((N, K), weight.dtype, weight.device) if need_dw else None
    dbias = _empty((N,), bias.dtype, bias.device) if need_dbias else None
    part = _empty((k_tiles, N), torch.float32, weight.device) if need_dgate else None
    if N == 0:
        return dw, dbias, part
    grid = (triton.cdiv(N, tiles["BLOCK_N"]) * k_tiles,)
    _tanh_gated_linear_bwd_dw_kernel[grid](
        dy, a, weight, s if bias is None else bias, s, _row_mask_arg(row_mask, s),
        s if dw is None else dw, s if dbias is None else dbias, s if part is None else part,
        M, N, K,
        dy.stride(0), dy.stride(1), a.stride(0), a.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, SCALAR_GATE=s.numel() == 1, HAS_ROW_MASK=row_mask is not None,
        NEED_DW=need_dw, NEED_DBIAS=need_dbias, NEED_DGATE=need_dgate, IN_DTYPE=_TL_DTYPES[weight.dtype],
        CAST_DY=dy.dtype != weight.dtype, DOT_FP32=interpreting() and weight.dtype == torch.bfloat16, PRECISION=_precision(weight.dtype),
        EMULATE=interpreting(), num_warps=warps, num_stages=stages, **tiles,
    )
    return dw, dbias, part


# Custom ops: torch.compile sees opaque calls with fake shapes (the launchers read data pointers and
# strides, which fake tensors do not have). The ops take s = tanh(gate) in fp32, shape (1,) or (N,);
# autograd differentiates the tanh (and the gate's reshape / cast) around them.


@torch.library.custom_op("mmfast::tanh_gated_linear_fwd", mutates_args=())
def _tanh_gated_linear_fwd_op(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], s: torch.Tensor,
                              residual: torch.Tensor, row_mask: Optional[torch.Tensor]) -> torch.Tensor:
    return _forward(a, weight, bias, s, residual, row_mask)


@_tanh_gated_linear_fwd_op.register_fake
def _(a, weight, bias, s, residual, row_mask):
    return residual.new_empty((a.shape[0], weight.shape[0]))


@torch.library.custom_op("mmfast::tanh_gated_linear_bwd", mutates_args=())
def _tanh_gated_linear_bwd_op(dy: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              s: torch.Tensor, row_mask: Optional[torch.Tensor], need_da: bool, need_dw: bool,
                              need_dbias: bool, need_ds: bool
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_a, d_W, d_bias, d_s) with 0-element tensors for those not needed; d_s = Σ dy ⊙ (a Wᵀ + b) over the
    live rows (and over the channels for a scalar gate), summed in a fixed order."""
    M, K = a.shape

    def none():
        # a fresh placeholder per output: a custom op's outputs must not alias each other
        return a.new_empty(0)

    da = _backward_da(dy, weight, s, row_mask, M, K) if need_da else none()
    dw, dbias, ds = none(), none(), none()
    if need_dw or need_dbias or need_ds:
        w, b, part = _backward_dw(dy, a, weight, bias, s, row_mask, need_dw, need_dbias, need_ds)
        dw = none() if w is None else w
        dbias = none() if b is None else b
        if need_ds:
            ds = part.sum().reshape(1) if s.numel() == 1 else part.sum(0)
    return da, dw, dbias, ds


@_tanh_gated_linear_bwd_op.register_fake
def _(dy, a, weight, bias, s, row_mask, need_da, need_dw, need_dbias, need_ds):
    return (a.new_empty(a.shape if need_da else 0), weight.new_empty(weight.shape if need_dw else 0),
            a.new_empty(bias.shape if need_dbias else 0), s.new_empty(s.shape if need_ds else 0))


def _setup_context(ctx, inputs, output):
    a, weight, bias, s, residual, row_mask = inputs
    ctx.save_for_backward(a, weight, bias, s, row_mask)


def _backward(ctx, dy):
    a, weight, bias, s, row_mask = ctx.saved_tensors
    need_da, need_dw, need_dbias, need_ds, need_dres, _ = ctx.needs_input_grad
    need_dbias = need_dbias and bias is not None
    da, dw, dbias, ds = _tanh_gated_linear_bwd_op(dy, a, weight, bias, s, row_mask, need_da, need_dw, need_dbias,
                                                  need_ds)
    return (da if need_da else None, dw if need_dw else None, dbias if need_dbias else None,
            ds if need_ds else None, dy if need_dres else None, None)


_tanh_gated_linear_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("tanh_gated_linear: double backward (gradients of gradients, e.g. create_graph=True for a "
                       "gradient penalty) is not supported; use backend='reference' for that")


_tanh_gated_linear_bwd_op.register_autograd(_no_double_backward)


# ----------------------------------------------------------------------------------------------
# Public op


def _check_args(a, weight, bias, gate, residual, row_mask):
    for name, t in (("a", a), ("weight", weight), ("gate", gate), ("residual", residual)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tanh_gated_linear: {name} must be a tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError(f"tanh_gated_linear: bias must be a tensor or None, got {type(bias).__name__}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"tanh_gated_linear: a must be float32, float16 or bfloat16, got {a.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != a.dtype:
            raise ValueError(f"tanh_gated_linear: {name} must have a's dtype {a.dtype}, got {t.dtype}")
    if residual.dtype not in (a.dtype, torch.float32):
        raise ValueError(f"tanh_gated_linear: residual must have a's dtype {a.dtype} or be float32 (a mixed-precision "
                         f"residual stream), got {residual.dtype}")
    if not gate.is_floating_point():
        raise ValueError(f"tanh_gated_linear: gate must be a floating tensor, got {gate.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("gate", gate), ("residual", residual), ("row_mask", row_mask)):
        if t is not None and t.device != a.device:
            raise ValueError(f"tanh_gated_linear: {name} is on {t.device} but a is on {a.device}; all must share a device")
    if a.dim() < 1:
        raise ValueError("tanh_gated_linear: a must have shape (..., K), got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[1] != a.shape[-1]:
        raise ValueError(f"tanh_gated_linear: weight must have shape (N, K) with K = a.shape[-1] = {a.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"tanh_gated_linear: bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
    if tuple(residual.shape) != tuple(a.shape[:-1]) + (N,):
        raise ValueError(f"tanh_gated_linear: residual must have shape a.shape[:-1] + (N,) = "
                         f"{tuple(a.shape[:-1]) + (N,)}, got {tuple(residual.shape)}")
    scalar = gate.numel() == 1
    vector = gate.dim() >= 1 and gate.shape[-1] == N and gate.numel() == N
    if not (scalar or vector):
        raise ValueError(f"tanh_gated_linear: gate must be a scalar (one element, e.g. 0-dim or shape (1,)) or a "
                         f"per-output-channel vector of shape (N,) = ({N},) (leading 1s allowed), got {tuple(gate.shape)}")
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or row_mask.dtype != torch.bool:
            raise ValueError("tanh_gated_linear: row_mask must be a bool tensor (True: the row's update is zeroed), got "
                             + (str(row_mask.dtype) if isinstance(row_mask, torch.Tensor) else type(row_mask).__name__))
        lead = tuple(a.shape[:-1])
        M = math.prod(lead)
        if tuple(row_mask.shape) != lead and tuple(row_mask.shape) != (M,):
            raise ValueError(f"tanh_gated_linear: row_mask must have shape a.shape[:-1] = {lead} or (M,) = ({M},), "
                             f"got {tuple(row_mask.shape)}")


def tanh_gated_linear(a, weight, bias, gate, residual, *, row_mask=None, backend="auto"):
    """Gated residual linear layer: ``out = residual + tanh(gate) · (a @ weightᵀ + bias)``.

    Args:
        a: (..., K) input (fp32, fp16 or bf16); any strides (leading dims are flattened to M rows, copied
            only if they cannot be viewed as one dimension).
        weight: (N, K), any strides; bias: (N,) or None; both in a's dtype.
        gate: the gate's pre-activation α: a scalar (one element: 0-dim, (1,) as Flamingo/Mllama store
            it) or a per-output-channel vector of N elements (shape (N,), or (1, 1, N) as Idefics'
            ``alpha_type="vector"``); any floating dtype, or a Python number (a constant). tanh(α) is computed
            in fp32.
        residual: (..., N), the leading shape of a; any strides; a's dtype, or float32 over 16-bit a / weight
            (an fp32 residual stream under autocast: the update is added in fp32 and never rounded to 16
            bits; the backward rounds dy to a's dtype for its GEMMs, as autocast's matmuls would).
        row_mask: optional bool tensor of shape a.shape[:-1] (e.g. (B, L)) or (M,); True marks a row whose
            update is zeroed (its output is exactly the residual, and it contributes nothing to any
            gradient but d_residual): Llama 3.2's full-text-row mask for tokens that see no image.
        backend: "auto" | "triton" | "reference".

    Returns (..., N) in the residual's dtype. At gate = 0 the output is exactly the residual (for finite
    a Wᵀ + b). All products accumulate in fp32 and the output is rounded once.

    Gradients: d_residual = dy; d_a = (dy·tanh g) W; d_W = (dy·tanh g)ᵀ a; d_bias = Σ_rows dy·tanh g;
    d_gate = (1 − tanh² g)·Σ dy ⊙ (a Wᵀ + b) (summed over rows, and over channels for a scalar gate),
    computed from dyᵀ a inside the d_W GEMM (see the module docstring) and summed deterministically.
    No double backward on the Triton backend (raises).
    Traceable by ``torch.compile(fullgraph=True)`` (the kernels are custom ops with fake shapes).
    """
    if isinstance(gate, (int, float)) and not isinstance(gate, bool) and isinstance(a, torch.Tensor):
        gate = torch.tensor(float(gate), dtype=torch.float32, device=a.device)  # a constant gate (no gradient)
    _check_args(a, weight, bias, gate, residual, row_mask)
    chosen = resolve_backend("tanh_gated_linear", backend, a.device)
    if chosen == "reference":
        from .reference import tanh_gated_linear_reference

        return tanh_gated_linear_reference(a, weight, bias, gate, residual, row_mask=row_mask)
    K, N = a.shape[-1], weight.shape[0]
    M = math.prod(a.shape[:-1])
    a2 = a.reshape(M, K)
    res2 = residual.reshape(M, N)
    mask2 = None if row_mask is None else row_mask.reshape(-1).contiguous()
    s = torch.tanh(gate.to(torch.float32)).reshape(-1)  # differentiable: d gate = (1 − tanh²)·d s
    out = _tanh_gated_linear_fwd_op(a2, weight, bias, s, res2, mask2)
    return out.reshape(residual.shape)
