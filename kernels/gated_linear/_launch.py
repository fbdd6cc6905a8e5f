"""tanh_gated_linear: argument checks, output allocation, kernel launches, the custom ops with their fakes,
and autograd.

The custom ops take s = tanh(gate) in fp32, shape (1,) or (N,); autograd differentiates the tanh (and
the gate's reshape and cast) around them. torch.compile sees opaque calls with fake shapes (the launchers
read data pointers and strides, which fake tensors do not have).
"""
import math
from typing import Optional, Tuple

import torch

from .._common import (TL_DTYPES, TRITON_DTYPES, cdiv, check_scalar, check_tensor, check_triton_dtype, kernel_flags,
                       no_double_backward)
from .._common import register_autograd as _register_autograd
from ._configs import choose
from ._kernels import tanh_gated_linear_bwd_da_kernel, tanh_gated_linear_bwd_dw_kernel, tanh_gated_linear_fwd_kernel

OP = "tanh_gated_linear"
FLOATING = TRITON_DTYPES + (torch.float64,)

# ----------------------------------------------------------------------------------------------
# Argument checks


def check_args(a, weight, bias, gate, residual, row_mask):
    """ValueError naming the argument for anything the op does not take; returns the gate as a tensor
    (a Python number becomes a 0-dim fp32 constant). A tensor gate is checked to be finite on its device
    (``_common.check_scalar``: no host sync)."""
    check_tensor(OP, "a", a, dtypes=FLOATING, form="(..., K)")
    if a.dim() < 1:
        raise ValueError(f"{OP}: a must have shape (..., K), got a 0-dim tensor")
    K = a.shape[-1]
    check_tensor(OP, "weight", weight, dim=2, device=a.device, form=f"(N, K) with K = a.shape[-1] = {K}")
    if weight.shape[1] != K:
        raise ValueError(f"{OP}: weight must have shape (N, K) with K = a.shape[-1] = {K}, got {tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None:
        check_tensor(OP, "bias", bias, dim=1, device=a.device, form=f"(N,) = ({N},) or None")
        if bias.shape[0] != N:
            raise ValueError(f"{OP}: bias must have shape (N,) = ({N},) or be None, got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != a.dtype:
            raise ValueError(f"{OP}: {name} must have a's dtype {a.dtype} (as F.linear requires), got {t.dtype}")
    lead = tuple(a.shape[:-1])
    form = f"a.shape[:-1] + (N,) = {lead + (N,)}"
    check_tensor(OP, "residual", residual, dtypes=FLOATING, device=a.device, form=form)
    if tuple(residual.shape) != lead + (N,):
        raise ValueError(f"{OP}: residual must have shape {form}, got {tuple(residual.shape)}")
    if isinstance(gate, (int, float)) and not isinstance(gate, bool):
        gate = torch.tensor(float(check_scalar(OP, "gate", gate)), dtype=torch.float32, device=a.device)
    if not isinstance(gate, torch.Tensor):
        raise ValueError(f"{OP}: gate must be a tensor (one element, or N = {N} per-channel elements) or a Python "
                         f"number, got {type(gate).__name__}")
    if not gate.is_floating_point():
        raise ValueError(f"{OP}: gate must be a floating tensor, got {gate.dtype}")
    if gate.device != a.device:
        raise ValueError(f"{OP}: gate must be on {a.device} (a's device), got {gate.device}")
    scalar = gate.numel() == 1
    vector = gate.dim() >= 1 and gate.shape[-1] == N and gate.numel() == N
    if not (scalar or vector):
        raise ValueError(f"{OP}: gate must be a scalar (one element, e.g. 0-dim or shape (1,)) or a per-output-channel "
                         f"vector of shape (N,) = ({N},) (leading 1s allowed), got {tuple(gate.shape)}")
    check_scalar(OP, "gate", gate)  # finite: a NaN gate would make every output NaN
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or row_mask.dtype != torch.bool:
            got = row_mask.dtype if isinstance(row_mask, torch.Tensor) else type(row_mask).__name__
            raise ValueError(f"{OP}: row_mask must be a bool tensor (True: the row's update is zeroed) or None, "
                             f"got {got}")
        M = math.prod(lead)
        if tuple(row_mask.shape) != lead and tuple(row_mask.shape) != (M,):
            raise ValueError(f"{OP}: row_mask must have shape a.shape[:-1] = {lead} or (M,) = ({M},), "
                             f"got {tuple(row_mask.shape)}")
        if row_mask.device != a.device:
            raise ValueError(f"{OP}: row_mask must be on {a.device} (a's device), got {row_mask.device}")
    return gate


def output_dtype(update_dtype, gate, residual_dtype):
    """The dtype of ``residual + torch.tanh(gate) * F.linear(a, weight, bias)`` by torch's promotion: a
    0-dim gate takes the update's dtype (a 0-dim tensor does not promote a dimensioned one), a gate with
    dimensions promotes with it; the residual promotes with the product."""
    product = update_dtype if gate.dim() == 0 else torch.promote_types(gate.dtype, update_dtype)
    return torch.promote_types(residual_dtype, product)


# ----------------------------------------------------------------------------------------------
# Launchers


def _empty(shape, dtype, device):
    # every output buffer comes from here (tests poison it with NaN to catch unwritten elements)
    return torch.empty(shape, dtype=dtype, device=device)


def _row_mask_arg(row_mask, fallback):
    # the kernels read the mask as bytes; `fallback` is any tensor on the device when there is none
    return fallback if row_mask is None else row_mask.view(torch.uint8)


def _forward(a, weight, bias, s, residual, row_mask, out_dtype):
    """a (M, K), weight (N, K), bias (N,) | None, s fp32 (1,) | (N,), residual (M, N) -> out (M, N)."""
    M, K = a.shape
    N = weight.shape[0]
    out = _empty((M, N), out_dtype, a.device)
    if M == 0 or N == 0:
        return out
    flags = kernel_flags(a.dtype)
    tiles, warps, stages = choose("fwd", a.dtype, flags["PRECISION"], (a, weight, residual, s),
                                  (M, N, K, a.stride(0), weight.stride(0), residual.stride(0)),
                                  (a.stride(1), weight.stride(1), residual.stride(1)))
    grid = (cdiv(M, tiles["BLOCK_M"]) * cdiv(N, tiles["BLOCK_N"]),)
    tanh_gated_linear_fwd_kernel[grid](
        a, weight, s if bias is None else bias, s, residual, _row_mask_arg(row_mask, s), out,
        M, N, K,
        a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), residual.stride(0), residual.stride(1),
        HAS_BIAS=bias is not None, SCALAR_GATE=s.numel() == 1, HAS_ROW_MASK=row_mask is not None,
        OUT_DTYPE=TL_DTYPES[out_dtype], **flags, num_warps=warps, num_stages=stages, **tiles,
    )
    return out


def _backward_da(dy, weight, s, row_mask, M, K):
    N = weight.shape[0]
    da = _empty((M, K), weight.dtype, weight.device)
    if M == 0 or K == 0:
        return da
    flags = kernel_flags(weight.dtype)
    tiles, warps, stages = choose("da", weight.dtype, flags["PRECISION"], (dy, weight, s),
                                  (M, N, K, dy.stride(0), weight.stride(0)), (dy.stride(1), weight.stride(1)))
    grid = (cdiv(M, tiles["BLOCK_M"]) * cdiv(K, tiles["BLOCK_K"]),)
    tanh_gated_linear_bwd_da_kernel[grid](
        dy, weight, s, _row_mask_arg(row_mask, s), da,
        M, N, K,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
        SCALAR_GATE=s.numel() == 1, HAS_ROW_MASK=row_mask is not None, IN_DTYPE=TL_DTYPES[weight.dtype],
        CAST_DY=dy.dtype != weight.dtype, **flags, num_warps=warps, num_stages=stages, **tiles,
    )
    return da


def _backward_dw(dy, a, weight, bias, s, row_mask, need_dw, need_dbias, need_dgate):
    """(d_W or None, d_bias or None, partial gate sums (K tiles, N) fp32 or None)."""
    M, K = a.shape
    N = weight.shape[0]
    flags = kernel_flags(weight.dtype)
    tiles, warps, stages = choose("dw", weight.dtype, flags["PRECISION"], (dy, a, weight, s),
                                  (M, N, K, dy.stride(0), a.stride(0), weight.stride(0)),
                                  (dy.stride(1), a.stride(1), weight.stride(1)))
    k_tiles = max(1, cdiv(K, tiles["BLOCK_K"]))  # K = 0: one program column still writes d_bias
    dw = _empty((N, K), weight.dtype, weight.device) if need_dw else None
    dbias = _empty((N,), bias.dtype, bias.device) if need_dbias else None
    part = _empty((k_tiles, N), torch.float32, weight.device) if need_dgate else None
    if N == 0:
        return dw, dbias, part
    grid = (cdiv(N, tiles["BLOCK_N"]) * k_tiles,)
    tanh_gated_linear_bwd_dw_kernel[grid](
        dy, a, weight, s if bias is None else bias, s, _row_mask_arg(row_mask, s),
        s if dw is None else dw, s if dbias is None else dbias, s if part is None else part,
        M, N, K,
        dy.stride(0), dy.stride(1), a.stride(0), a.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, SCALAR_GATE=s.numel() == 1, HAS_ROW_MASK=row_mask is not None,
        NEED_DW=need_dw, NEED_DBIAS=need_dbias, NEED_DGATE=need_dgate, IN_DTYPE=TL_DTYPES[weight.dtype],
        CAST_DY=dy.dtype != weight.dtype, **flags, num_warps=warps, num_stages=stages, **tiles,
    )
    return dw, dbias, part


# ----------------------------------------------------------------------------------------------
# Custom ops, fakes, autograd


@torch.library.custom_op("mmfast::tanh_gated_linear_fwd", mutates_args=())
def _tanh_gated_linear_fwd_op(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], s: torch.Tensor,
                              residual: torch.Tensor, row_mask: Optional[torch.Tensor], out_dtype: torch.dtype
                              ) -> torch.Tensor:
    return _forward(a, weight, bias, s, residual, row_mask, out_dtype)


@_tanh_gated_linear_fwd_op.register_fake
def fwd_fake(a, weight, bias, s, residual, row_mask, out_dtype):
    """The forward ops' output for torch.compile's fake tensors (both backends)."""
    return residual.new_empty((a.shape[0], weight.shape[0]), dtype=out_dtype)


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
def bwd_fake(dy, a, weight, bias, s, row_mask, need_da, need_dw, need_dbias, need_ds):
    """The backward ops' outputs for torch.compile's fake tensors (both backends)."""
    return (a.new_empty(a.shape if need_da else 0), weight.new_empty(weight.shape if need_dw else 0),
            a.new_empty(bias.shape if need_dbias else 0), s.new_empty(s.shape if need_ds else 0))


def _setup_context(ctx, inputs, output):
    a, weight, bias, s, residual, row_mask, out_dtype = inputs
    ctx.residual_dtype = residual.dtype
    ctx.save_for_backward(a, weight, bias, s, row_mask)


def register_autograd(fwd_op, bwd_op):
    """The autograd of a backend's forward op (the signature of ``_tanh_gated_linear_fwd_op``) through its
    backward op (that of ``_tanh_gated_linear_bwd_op``): both backends save the same tensors. Returns the
    callable that runs the forward op (``_common.register_autograd``: an autograd.Function in eager mode)."""

    def backward(ctx, dy):
        a, weight, bias, s, row_mask = ctx.saved_tensors
        need_da, need_dw, need_dbias, need_ds, need_dres, _, _ = ctx.needs_input_grad
        need_dbias = need_dbias and bias is not None
        da, dw, dbias, ds = bwd_op(dy, a, weight, bias, s, row_mask, need_da, need_dw, need_dbias, need_ds)
        dres = dy.to(ctx.residual_dtype) if need_dres else None  # d_residual = dy: no copy unless the dtypes differ
        return (da if need_da else None, dw if need_dw else None, dbias if need_dbias else None,
                ds if need_ds else None, dres, None, None)

    bwd_op.register_autograd(no_double_backward(OP))
    return _register_autograd(fwd_op, backward, _setup_context)


_tanh_gated_linear_fwd = register_autograd(_tanh_gated_linear_fwd_op, _tanh_gated_linear_bwd_op)


def launch(fwd_op, a, weight, bias, gate, residual, row_mask):
    """Run a backend's forward op (the callable ``register_autograd`` returns) on checked arguments (``check_args``): dtypes the kernels take, (M, K) /
    (M, N) views, s = tanh(gate) in fp32 (differentiable: d gate = (1 − tanh²)·d s), the output dtype."""
    for name, t in (("a", a), ("weight", weight), ("bias", bias), ("gate", gate), ("residual", residual)):
        if t is not None:
            check_triton_dtype(OP, name, t)
    K, N = a.shape[-1], weight.shape[0]
    M = math.prod(a.shape[:-1])
    a2 = a.reshape(M, K)  # a view unless the leading dims cannot be merged
    res2 = residual.reshape(M, N)
    if bias is not None:
        bias = bias.contiguous()  # the kernels read N consecutive values (a slice or an expanded bias is not)
    mask2 = None if row_mask is None else row_mask.reshape(-1).contiguous()
    s = torch.tanh(gate.to(torch.float32)).reshape(-1)
    out = fwd_op(a2, weight, bias, s, res2, mask2, output_dtype(a.dtype, gate, residual.dtype))
    return out.reshape(residual.shape)


def tanh_gated_linear_triton(a, weight, bias, gate, residual, row_mask):
    """The Triton backend on checked arguments (``check_args``)."""
    return launch(_tanh_gated_linear_fwd, a, weight, bias, gate, residual, row_mask)
