"""backend="gemm": tanh_gated_linear as cuBLAS GEMMs (``torch.mm``) plus one Triton pass for each part around
them. Its speed is cuBLAS's plus a few memory-bound passes, so it can be predicted without a GPU.

Forward: ``h = a Wᵀ`` by cuBLAS in fp32 (a 16-bit GEMM writing its fp32 accumulator), then
``tanh_gated_linear_epilogue_kernel``: ``out = residual + s·(h + b)``, masked rows = residual, rounded once.
The bias is added in the epilogue (fp32, as the Triton backend adds it to its accumulator), not by addmm.
Saved for backward: a, W, b, s, row_mask, as the Triton backend saves; h is neither saved (an M x N fp32
tensor) nor recomputed: the gate's gradient comes from G below.

Backward (dy (M, N); s = tanh(gate); "live" rows: not masked):

1. ``tanh_gated_linear_bwd_rows_kernel``, one pass over dy: ``d_update = dy·s`` over the live rows rounded
   once to the input dtype (what PyTorch rounds; d_a's operand), the live ``dy`` in the input dtype when it is
   not dy itself (a row mask, or an fp32 dy over 16-bit GEMMs), and per-row-tile column sums of dy (fp32,
   M/32 x N).
2. cuBLAS: ``d_a = d_update @ W`` (input dtype); ``G = dy_liveᵀ a`` in fp32 (N, K).
3. ``tanh_gated_linear_bwd_weight_kernel``, one pass over G: ``d_W = s·G`` rounded once, and per-K-tile
   partial sums of ``W ⊙ G``.
4. torch, in a fixed order (deterministic, no atomics): ``colsum`` = Σ of the row-tile partials;
   ``d_bias = s·colsum``; ``d_s = Σ_k-tiles (W ⊙ G) + b·colsum`` (summed over channels for a scalar gate).

Why G and not a recomputed h for the gate's gradient, with M = 16384, K = N = 2048, bf16 (H100: ~750 TFLOP/s
measured for this GEMM, ~3 TB/s): ``Σ_m dy ⊙ h = Σ_k W ⊙ (dyᵀ a) + b·Σ_m dy`` per channel. Recomputing h is a
fourth GEMM (2MNK = 137 GFLOP, ~0.18 ms) plus writing and reading it in fp32 (2·4MN = 268 MB, ~0.09 ms) and a
read of it in pass 1. G costs what the d_W GEMM costs anyway, plus 4NK bytes written instead of 2NK (16 vs
8 MB) and pass 3 (G 16 MB + W 8 MB read, d_W 8 MB written: ~0.01 ms). The price is that G's left operand is
the unscaled live dy rather than d_update (G cannot be had from d_update: s may be 0, Flamingo's
initial gate), so a row mask or an fp32 dy costs one more 16-bit M x N write in pass 1 (67 MB, ~0.02 ms);
with neither, G reads dy itself. d_W = s·G from the fp32 G is rounded once (PyTorch rounds d_update, then
d_W).

Expected at that shape on an H100 (bf16, scalar gate, no mask; from the measured bf16 GEMM, 0.184 ms, and
~3 TB/s): forward = GEMM with fp32 output (~0.19 ms) + epilogue (h 134 MB + residual 67 MB read, out 67 MB
written: ~0.09 ms) ≈ 0.28-0.30 ms; backward = pass 1 (dy read, d_update written: 134 MB, ~0.045 ms) + two
GEMMs (~0.37 ms) + pass 3 (~0.01 ms) + small torch ops ≈ 0.43-0.45 ms. The one lever left in the forward
is h itself: a bf16 h (F.linear's own output) would save 134 MB (~0.045 ms) at the price of the rounding
the eager chain also makes; this backend keeps the fp32 product, as the Triton backend does.
"""
from typing import Optional, Tuple

import torch

from .._common import TL_DTYPES, cdiv, interpreting, mm_f32
from . import _launch
from ._configs import PASS_KERNELS, choose_pass
from ._launch import _row_mask_arg

def _launch_pass(name, rows, cols, device, *args, **constexprs):
    """Launch one-pass kernel `name` over a (rows, cols) tensor: one program per (row tile, column tile)."""
    tiles, warps = choose_pass(name, device)
    block_rows, block_cols = tiles.values()  # (BLOCK_M, BLOCK_N) or (BLOCK_N, BLOCK_K): rows, then columns
    grid = (cdiv(rows, block_rows), cdiv(cols, block_cols))
    if grid[0] and grid[1]:
        PASS_KERNELS[name][grid](*args, EMULATE=interpreting(), num_warps=warps, **tiles, **constexprs)
    return grid


def _forward(a, weight, bias, s, residual, row_mask, out_dtype):
    """a (M, K), weight (N, K), bias (N,) | None, s fp32 (1,) | (N,), residual (M, N) -> out (M, N)."""
    M, N = a.shape[0], weight.shape[0]
    out = _launch._empty((M, N), out_dtype, a.device)
    if M == 0 or N == 0:
        return out
    h = mm_f32(a, weight.t()).contiguous()  # already contiguous: torch.mm's output
    _launch_pass("epilogue", M, N, a.device,
                 h, s if bias is None else bias, s, residual, _row_mask_arg(row_mask, s), out,
                 M, N, residual.stride(0), residual.stride(1),
                 HAS_BIAS=bias is not None, SCALAR_GATE=s.numel() == 1, HAS_ROW_MASK=row_mask is not None,
                 OUT_DTYPE=TL_DTYPES[out_dtype])
    return out


def _backward(dy, a, weight, bias, s, row_mask, need_da, need_dw, need_dbias, need_ds):
    M, K = a.shape
    N = weight.shape[0]
    dtype, device = weight.dtype, weight.device
    need_g = need_dw or need_ds
    need_colsum = need_dbias or (need_ds and bias is not None)
    write_live = need_g and (row_mask is not None or dy.dtype != dtype)
    tiles, _ = choose_pass("rows", device)
    row_tiles = cdiv(M, tiles["BLOCK_M"])
    dupd = _launch._empty((M, N), dtype, device) if need_da else None
    dlive = _launch._empty((M, N), dtype, device) if write_live else None
    colpart = _launch._empty((row_tiles, N), torch.float32, device) if need_colsum else None
    if need_da or write_live or need_colsum:
        _launch_pass("rows", M, N, device,
                     dy, s, _row_mask_arg(row_mask, s), dupd if need_da else s, dlive if write_live else s,
                     colpart if need_colsum else s, M, N, dy.stride(0), dy.stride(1),
                     SCALAR_GATE=s.numel() == 1, HAS_ROW_MASK=row_mask is not None, WRITE_UPDATE=need_da,
                     WRITE_LIVE=write_live, COLSUM=need_colsum, IN_DTYPE=TL_DTYPES[dtype])
    da = torch.mm(dupd, weight) if need_da else None
    dw = part = None
    if need_g:
        g = mm_f32((dy if dlive is None else dlive).t(), a).contiguous()  # (N, K); contiguous already
        tiles, _ = choose_pass("weight", device)
        dw = _launch._empty((N, K), dtype, device) if need_dw else None
        part = _launch._empty((cdiv(K, tiles["BLOCK_K"]), N), torch.float32, device) if need_ds else None
        _launch_pass("weight", N, K, device,
                     g, weight, s, dw if need_dw else s, part if need_ds else s, N, K, weight.stride(0),
                     weight.stride(1), SCALAR_GATE=s.numel() == 1, NEED_DW=need_dw, NEED_DGATE=need_ds,
                     IN_DTYPE=TL_DTYPES[dtype])
    colsum = colpart.sum(0) if need_colsum else None
    dbias = (colsum * s).to(bias.dtype) if need_dbias else None
    ds = None
    if need_ds:
        per_channel = part.sum(0)
        if bias is not None:
            per_channel = per_channel + bias.float() * colsum
        ds = per_channel.sum().reshape(1) if s.numel() == 1 else per_channel
    return da, dw, dbias, ds


@torch.library.custom_op("mmfast::tanh_gated_linear_gemm_fwd", mutates_args=())
def _gemm_fwd_op(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], s: torch.Tensor,
                 residual: torch.Tensor, row_mask: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    # the GEMMs here choose their dtypes: an enclosing autocast (the backward run inside torch.autocast) would
    # cast h or G to 16 bits under the kernels that read them as fp32
    with torch.autocast(a.device.type, enabled=False):
        return _forward(a, weight, bias, s, residual, row_mask, out_dtype)


_gemm_fwd_op.register_fake(_launch.fwd_fake)


@torch.library.custom_op("mmfast::tanh_gated_linear_gemm_bwd", mutates_args=())
def _gemm_bwd_op(dy: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 s: torch.Tensor, row_mask: Optional[torch.Tensor], need_da: bool, need_dw: bool, need_dbias: bool,
                 need_ds: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_a, d_W, d_bias, d_s) with fresh 0-element tensors for those not needed (outputs must not alias)."""
    with torch.autocast(a.device.type, enabled=False):  # as in the forward op
        grads = _backward(dy, a, weight, bias, s, row_mask, need_da, need_dw, need_dbias, need_ds)
    return tuple(a.new_empty(0) if g is None else g for g in grads)


_gemm_bwd_op.register_fake(_launch.bwd_fake)
_gemm_fwd = _launch.register_autograd(_gemm_fwd_op, _gemm_bwd_op)


def tanh_gated_linear_gemm(a, weight, bias, gate, residual, row_mask):
    """The gemm backend on checked arguments (``_launch.check_args``)."""
    return _launch.launch(_gemm_fwd, a, weight, bias, gate, residual, row_mask)
