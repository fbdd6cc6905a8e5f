"""flash_attention: validation, the reference and Triton paths, launchers, custom ops with fakes, autograd."""
from typing import List, Optional, Tuple

import torch

from .._common import (cdiv, check_bool, check_scalar, check_tensor, check_triton_dtype, kernel_flags,
                       no_double_backward, register_autograd, remember, saveable)
from .. import _tuned
from . import _configs as C
from ._blockmask import AttentionBlockMask, build_block_mask, check_mask_args
from ._kernels import (_attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel, _attention_bwd_preprocess_kernel,
                       _attention_fwd_kernel)

OP = "flash_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: backend="reference" only

# ----------------------------------------------------------------------------------------------
# Validation


def check_qkv(q, k, v, varlen):
    form = "(total, heads, head_dim) with cu_seqlens" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, dtypes=DTYPES, dim=3 if varlen else 4, form=form)
        if t.dtype != q.dtype:
            raise ValueError(f"{OP}: q, k and v must share one dtype, got q {q.dtype} and {name} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{OP}: q, k and v must be on one device, got q on {q.device} and {name} on {t.device}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(
                f"{OP}: {name} must have a contiguous last dim (stride 1), got strides {t.stride()}; "
                f"other strides are free (views of a fused QKV, (B, H, L, D) permutes), call .contiguous() otherwise"
            )
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"{OP}: q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{OP}: q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= C.MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head_dim must be in [1, {C.MAX_HEAD_DIM}], got {head_dim}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{OP}: the number of query heads ({hq}) must be a multiple of key/value heads ({hkv})")


def check_scale(softmax_scale, head_dim):
    """softmax_scale: None (1/√D), a finite Python number, or a finite 0-d tensor (checked on its device)."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, torch.Tensor) and softmax_scale.numel() != 1:
        raise ValueError(f"{OP}: softmax_scale must be a number or a one-element tensor, got shape "
                         f"{tuple(softmax_scale.shape)}")
    return check_scalar(OP, "softmax_scale", softmax_scale)


def check_block_mask(bm, q, k, varlen, mask_args):
    if not isinstance(bm, AttentionBlockMask):
        raise ValueError(f"{OP}: block_mask must come from build_block_mask, got {type(bm).__name__}")
    if any(a is not None and a is not False for a in mask_args):
        raise ValueError(f"{OP}: with block_mask, leave causal / kv_start / kv_end / key_padding_mask / "
                         "cu_seqlens / max_seqlen at their defaults: the block mask carries them")
    if bm.varlen != varlen:
        raise ValueError(f"{OP}: block_mask was built for " + ("packed (varlen)" if bm.varlen else "(B, L, H, D)")
                         + " inputs")
    if bm.row_lo.device != q.device:
        raise ValueError(f"{OP}: block_mask is on {bm.row_lo.device} but q is on {q.device}")
    if not varlen:
        if (bm.seqlen_q, bm.seqlen_k) != (q.shape[1], k.shape[1]):
            raise ValueError(f"{OP}: block_mask was built for Lq={bm.seqlen_q}, Lk={bm.seqlen_k}, "
                             f"got {q.shape[1]} and {k.shape[1]}")
        if bm.kv_full_num.shape[0] not in (1, q.shape[0]):
            raise ValueError(f"{OP}: block_mask has batch {bm.kv_full_num.shape[0]}, q has {q.shape[0]}")
    elif bm.row_lo.shape[0] != q.shape[0]:
        raise ValueError(f"{OP}: block_mask was built for {bm.row_lo.shape[0]} packed queries, q has {q.shape[0]}")
    elif getattr(bm, "totals", None) is not None and bm.totals != (q.shape[0], k.shape[0]):
        raise ValueError(f"{OP}: block_mask's cu_seqlens pack {bm.totals[0]} queries and {bm.totals[1]} keys, "
                         f"got q with {q.shape[0]} and k with {k.shape[0]}")


def check_args(q, k, v, causal, softmax_scale, kv_start, kv_end, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
               max_seqlen_q, max_seqlen_k, return_lse, block_mask):
    """Every argument of flash_attention but `backend`. Returns (varlen, scale, mask), the mask as a dict of
    the mask arguments (a block mask's own when one is given) plus "block_mask"."""
    varlen = (cu_seqlens_q is not None or cu_seqlens_k is not None
              or (block_mask is not None and getattr(block_mask, "varlen", False)))
    check_qkv(q, k, v, varlen)
    check_bool(OP, "return_lse", return_lse)
    scale = check_scale(softmax_scale, q.shape[-1])
    if block_mask is not None:
        check_bool(OP, "causal", causal)
        check_block_mask(block_mask, q, k, varlen, (causal, kv_start, kv_end, key_padding_mask, cu_seqlens_q,
                                                    cu_seqlens_k, max_seqlen_q, max_seqlen_k))
        bm = block_mask
        mask = dict(causal=bm.causal, kv_start=bm.kv_start, kv_end=bm.kv_end, key_padding_mask=bm.key_padding_mask,
                    cu_seqlens_q=bm.cu_seqlens_q, cu_seqlens_k=bm.cu_seqlens_k, max_seqlen_q=bm.seqlen_q,
                    max_seqlen_k=bm.seqlen_k)
    else:
        mask = dict(causal=causal, kv_start=kv_start, kv_end=kv_end, key_padding_mask=key_padding_mask,
                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                    max_seqlen_k=max_seqlen_k)
        check_mask_args(OP, None if varlen else q.shape[1], None if varlen else k.shape[1],
                        None if varlen else q.shape[0], q.device, **mask,
                        total_q=q.shape[0] if varlen else None, total_k=k.shape[0] if varlen else None)
    mask["block_mask"] = block_mask
    return varlen, scale, mask


# ----------------------------------------------------------------------------------------------
# The reference path


def reference(q, k, v, scale, mask):
    """``kernels.reference.attention_reference`` in the op's dtype rules: 16-bit inputs computed in fp32 and
    rounded back; the log-sum-exp in fp32 (float64 for float64 inputs)."""
    from ..reference import attention_reference

    wide = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else None
    out, lse = attention_reference(
        q, k, v, causal=mask["causal"], softmax_scale=scale, kv_start=mask["kv_start"], kv_end=mask["kv_end"],
        key_padding_mask=mask["key_padding_mask"], cu_seqlens_q=mask["cu_seqlens_q"],
        cu_seqlens_k=mask["cu_seqlens_k"], compute_dtype=wide, return_lse=True,
    )
    out = out.to(q.dtype).contiguous()  # contiguous like the kernel's output (callers .view it)
    if mask["cu_seqlens_q"] is None and lse.shape[0] != q.shape[0]:
        lse = lse.expand(q.shape[0], -1, -1)
    return out, lse.to(torch.promote_types(q.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------
# Launchers


def _bh_strides(t, varlen):
    """(batch, row, head) strides of a (B, L, H, D) or packed (total, H, D) tensor."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _stat_strides(stat, varlen):
    """(batch, head) strides of the per-row statistics, (B, H, Lq) or packed (H, total); rows are contiguous."""
    return (0, stat.stride(0)) if varlen else (stat.stride(0), stat.stride(1))


_PLACEHOLDERS = {}


def _placeholder(device):
    """An int32 stand-in for absent optional pointers (the kernels never read it), one per device."""
    if device not in _PLACEHOLDERS:
        _PLACEHOLDERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _PLACEHOLDERS[device]


class _Mask:
    """The block mask's tensors as kernel arguments, with their strides (a broadcast batch has stride 0)."""

    def __init__(self, q, row_lo, row_hi, kpm, cu_q, cu_k, lists):
        dummy = _placeholder(q.device)
        self.varlen = cu_q is not None
        self.ranges = (row_lo, row_hi)
        self.kpm = kpm.view(torch.uint8) if kpm is not None else dummy
        self.has_kpm = kpm is not None
        self.cu = (cu_q if cu_q is not None else dummy, cu_k if cu_k is not None else dummy)
        self.kv_lists, self.q_lists = lists[:4], lists[4:]
        self.batch = cu_q.numel() - 1 if self.varlen else q.shape[0]
        stride_rangeb = 0 if self.varlen or row_lo.shape[0] == 1 else row_lo.stride(0)
        self.kpm_strides = (kpm.stride(0), kpm.stride(1)) if kpm is not None else (0, 0)
        self._strides = (stride_rangeb, *self.kpm_strides)

    def strides(self, lists):
        """stride_rangeb, stride_kpmb, stride_kpmn, stride_numb, stride_idxb, stride_idxm for one pair of lists."""
        num, idx = lists[0], lists[1]
        broadcast = num.shape[0] == 1
        return (*self._strides, 0 if broadcast else num.stride(0), 0 if broadcast else idx.stride(0), idx.stride(1))


def _empty(shape, dtype, device):
    """The kernels' outputs before they write them (tests poison them to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _fwd_launch(q, k, v, mask, scale, max_q, max_k):
    interp = q.device.type != "cuda"
    varlen, batch = mask.varlen, mask.batch
    head_dim, hq, hkv = q.shape[-1], q.shape[-2], k.shape[-2]
    seqlen_q, seqlen_k = (max_q, max_k) if varlen else (q.shape[1], k.shape[1])
    out = _empty(q.shape, q.dtype, q.device)
    stat_shape = (hq, q.shape[0]) if varlen else (batch, hq, seqlen_q)
    row_max = _empty(stat_shape, torch.float32, q.device)
    row_logsum = _empty(stat_shape, torch.float32, q.device)
    if out.numel() == 0 or batch == 0 or seqlen_q == 0:
        return out, row_max.fill_(float("-inf")), row_logsum.fill_(0.0)
    flags = kernel_flags(q.dtype)
    mask_m, mask_n = C.mask_tile(interp)
    args = (
        q, k, v, out, row_max, row_logsum, *mask.ranges, mask.kpm, *mask.cu, *mask.kv_lists,
        *_bh_strides(q, varlen), *_bh_strides(k, varlen), *_bh_strides(v, varlen), *_bh_strides(out, varlen),
        *_stat_strides(row_max, varlen), *mask.strides(mask.kv_lists),
        seqlen_q, seqlen_k, hq // hkv, scale,
    )
    cfg = _tuned.attention_config("fwd", _attention_fwd_kernel, args, head_dim, q.dtype, flags["PRECISION"], interp)
    block_d, block_d2 = C.block_d_split(head_dim)
    _attention_fwd_kernel[(cdiv(seqlen_q, cfg.block_m), hq, batch)](
        *args, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_D2=block_d2, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        MASK_M=mask_m, MASK_N=mask_n, VARLEN=varlen, HAS_KPM=mask.has_kpm, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, row_max, row_logsum


def _bwd_launch(do, dlogsum, q, k, v, out, row_max, row_logsum, mask, scale, max_q, max_k):
    interp = q.device.type != "cuda"
    varlen, batch = mask.varlen, mask.batch
    head_dim, hq, hkv = q.shape[-1], q.shape[-2], k.shape[-2]
    seqlen_q, seqlen_k = (max_q, max_k) if varlen else (q.shape[1], k.shape[1])
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    if batch == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    flags = kernel_flags(q.dtype)
    mask_m, mask_n = C.mask_tile(interp)
    stat_strides = _stat_strides(row_max, varlen)
    delta = torch.empty_like(row_max)
    has_dlse = dlogsum is not None
    if has_dlse and dlogsum.stride() != row_max.stride():
        dlogsum = dlogsum.contiguous()
    args = (out, do, dlogsum if has_dlse else row_logsum, delta, mask.cu[0], *_bh_strides(out, varlen),
            *_bh_strides(do, varlen), *stat_strides, seqlen_q)
    cfg = _tuned.attention_config("pre", _attention_bwd_preprocess_kernel, args, head_dim, q.dtype, flags["PRECISION"],
                                  interp)
    _attention_bwd_preprocess_kernel[(cdiv(seqlen_q, cfg.block_m), hq, batch)](
        *args, HEAD_DIM=head_dim, BLOCK_D=C.block_d(head_dim), BLOCK_M=cfg.block_m, VARLEN=varlen, HAS_DLSE=has_dlse,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    common = dict(HEAD_DIM=head_dim, MASK_M=mask_m, MASK_N=mask_n, VARLEN=varlen, HAS_KPM=mask.has_kpm, **flags)
    args = (
        q, k, v, do, row_max, row_logsum, delta, dk, dv, *mask.ranges, mask.kpm, *mask.cu, *mask.q_lists,
        *_bh_strides(q, varlen), *_bh_strides(k, varlen), *_bh_strides(v, varlen), *_bh_strides(do, varlen),
        *_bh_strides(dk, varlen), *_bh_strides(dv, varlen), *stat_strides, *mask.strides(mask.q_lists),
        seqlen_q, seqlen_k, hq // hkv, scale,
    )
    cfg = _tuned.attention_config("dkdv", _attention_bwd_dkdv_kernel, args, head_dim, q.dtype, flags["PRECISION"],
                                  interp)
    block_d, block_d2 = C.launch_block_d(_attention_bwd_dkdv_kernel, args, head_dim, q.dtype, flags["PRECISION"],
                                         interp)
    _attention_bwd_dkdv_kernel[(cdiv(seqlen_k, cfg.block_n) * (2 if cfg.split else 1), hkv, batch)](
        *args, BLOCK_D=block_d, BLOCK_D2=block_d2, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=cfg.split, **common,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    args = (
        q, k, v, do, row_max, row_logsum, delta, dq, *mask.ranges, mask.kpm, *mask.cu, *mask.kv_lists,
        *_bh_strides(q, varlen), *_bh_strides(k, varlen), *_bh_strides(v, varlen), *_bh_strides(do, varlen),
        *_bh_strides(dq, varlen), *stat_strides, *mask.strides(mask.kv_lists),
        seqlen_q, seqlen_k, hq // hkv, scale,
    )
    cfg = _tuned.attention_config("dq", _attention_bwd_dq_kernel, args, head_dim, q.dtype, flags["PRECISION"], interp)
    block_d, block_d2 = C.launch_block_d(_attention_bwd_dq_kernel, args, head_dim, q.dtype, flags["PRECISION"], interp)
    _attention_bwd_dq_kernel[(cdiv(seqlen_q, cfg.block_m), hq, batch)](
        *args, BLOCK_D=block_d, BLOCK_D2=block_d2, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees them as opaque calls with fake shapes) and their autograd


# Returns (out, row_max, row_logsum): each row's softmax statistics, kept apart for the backward (see
# _kernels.py); the log-sum-exp is row_max + row_logsum. row_max is a non-differentiable shift: the gradient
# of the log-sum-exp reaches the op through row_logsum.
@torch.library.custom_op("mmfast::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_lo: torch.Tensor, row_hi: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    lists: List[torch.Tensor], softmax_scale: float, max_seqlen_q: int, max_seqlen_k: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = _Mask(q, row_lo, row_hi, key_padding_mask, cu_seqlens_q, cu_seqlens_k, lists)
    return _fwd_launch(q, k, v, mask, softmax_scale, max_seqlen_q, max_seqlen_k)


@_flash_attention_fwd_op.register_fake
def _(q, k, v, row_lo, row_hi, key_padding_mask, cu_seqlens_q, cu_seqlens_k, lists, softmax_scale, max_seqlen_q,
      max_seqlen_k):
    if cu_seqlens_q is not None:
        stat_shape = (q.shape[1], q.shape[0])
    else:
        stat_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(stat_shape, dtype=torch.float32), q.new_empty(stat_shape, dtype=torch.float32)


@torch.library.custom_op("mmfast::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd_op(
    dout: torch.Tensor, dlogsum: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, row_max: torch.Tensor, row_logsum: torch.Tensor, row_lo: torch.Tensor, row_hi: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    lists: List[torch.Tensor], softmax_scale: float, max_seqlen_q: int, max_seqlen_k: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = _Mask(q, row_lo, row_hi, key_padding_mask, cu_seqlens_q, cu_seqlens_k, lists)
    return _bwd_launch(dout, dlogsum, q, k, v, out, row_max, row_logsum, mask, softmax_scale, max_seqlen_q,
                       max_seqlen_k)


@_flash_attention_bwd_op.register_fake
def _(dout, dlogsum, q, k, v, out, row_max, row_logsum, row_lo, row_hi, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
      lists, softmax_scale, max_seqlen_q, max_seqlen_k):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, row_lo, row_hi, kpm, cu_q, cu_k, lists, scale, max_q, max_k = inputs
    out, row_max, row_logsum = output
    ctx.mark_non_differentiable(row_max)
    ctx.set_materialize_grads(False)  # an unused log-sum-exp passes None: the Delta pass then skips its load
    # a mask built under inference_mode (an eval pass, reused for training): saved as a normal copy
    masks = [saveable(t) for t in (row_lo, row_hi, kpm, cu_q, cu_k, *lists)]
    ctx.save_for_backward(q, k, v, out, row_max, row_logsum, *masks)
    ctx.scale, ctx.max_q, ctx.max_k = scale, max_q, max_k


def _backward(ctx, dout, drow_max, dlogsum):
    q, k, v, out, row_max, row_logsum, row_lo, row_hi, kpm, cu_q, cu_k, *lists = ctx.saved_tensors
    lse_only = dout is None  # only the log-sum-exp was used
    if lse_only:
        dout = torch.zeros_like(out)
    dq, dk, dv = _flash_attention_bwd_op(dout, dlogsum, q, k, v, out, row_max, row_logsum, row_lo, row_hi, kpm, cu_q,
                                         cu_k, lists, ctx.scale, ctx.max_q, ctx.max_k)
    if lse_only:  # v does not reach the log-sum-exp: no gradient, as the reference's autograd gives
        dv = None
    # one entry per input: row_lo, row_hi, key_padding_mask, cu_seqlens_q/k, lists, scale, max_seqlen_q/k
    return dq, dk, dv, None, None, None, None, None, [None] * len(lists), None, None, None


_flash_attention_fwd = register_autograd(_flash_attention_fwd_op, _backward, _setup_context)
_flash_attention_bwd_op.register_autograd(no_double_backward(OP))


# ----------------------------------------------------------------------------------------------
# The Triton path

_DEFAULT_MASKS = {}


def _block_mask_for(q, k, varlen, mask):
    """The block mask of the call's mask arguments: built per call, except for masks without tensors (none,
    causal), which are cached per shape."""
    interp = q.device.type != "cuda"
    key = None
    tensors = ("kv_start", "kv_end", "key_padding_mask", "cu_seqlens_q", "cu_seqlens_k")
    if all(mask[name] is None for name in tensors) and not torch.compiler.is_compiling():
        # a mask built under inference_mode holds inference tensors, which autograd may not save: keep
        # those apart, or an evaluation pass would break the training steps that follow it
        key = (q.device, q.shape[1], k.shape[1], mask["causal"], interp, torch.is_inference_mode_enabled())
        cached = _DEFAULT_MASKS.get(key)
        if cached is not None:
            return cached
    bm = build_block_mask(
        None if varlen else q.shape[1], None if varlen else k.shape[1], causal=mask["causal"],
        kv_start=mask["kv_start"], kv_end=mask["kv_end"], key_padding_mask=mask["key_padding_mask"],
        cu_seqlens_q=mask["cu_seqlens_q"], cu_seqlens_k=mask["cu_seqlens_k"], max_seqlen_q=mask["max_seqlen_q"],
        max_seqlen_k=mask["max_seqlen_k"], device=q.device, tile=C.mask_tile(interp), validate=False,
    )
    if key is not None:
        remember(_DEFAULT_MASKS, key, bm)
    return bm


def triton_path(q, k, v, scale, varlen, mask):
    """(out, lse) from the Triton kernels; lse natural-log, fp32."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_triton_dtype(OP, name, t)
    if isinstance(scale, torch.Tensor):
        if scale.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{OP}: softmax_scale requires grad, but the Triton kernels take it as a constant (its "
                             "gradient would be lost); detach it, fold it into q (q * scale with softmax_scale=1.0), "
                             "or use backend='reference'")
        scale = scale.item()  # the kernels take the scale as an argument: a host sync (pass a float to avoid it)
    bm = mask["block_mask"] or _block_mask_for(q, k, varlen, mask)
    tile = C.mask_tile(q.device.type != "cuda")
    if tuple(bm.tile) != tuple(tile):
        raise ValueError(f"{OP}: block_mask has tile {bm.tile}, the kernels use {tile} on {q.device}; "
                         "build it on the inputs' device without `tile`")
    lists = [bm.kv_full_num, bm.kv_full_idx, bm.kv_part_num, bm.kv_part_idx,
             bm.q_full_num, bm.q_full_idx, bm.q_part_num, bm.q_part_idx]
    out, row_max, row_logsum = _flash_attention_fwd(
        q, k, v, bm.row_lo.reshape(1, -1) if varlen else bm.row_lo, bm.row_hi.reshape(1, -1) if varlen else bm.row_hi,
        bm.key_padding_mask, bm.cu_seqlens_q, bm.cu_seqlens_k, lists, float(scale),
        int(bm.seqlen_q or 0) if varlen else 0, int(bm.seqlen_k or 0) if varlen else 0,
    )
    return out, row_max + row_logsum
