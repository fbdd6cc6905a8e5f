"""flash_attention: validation, launchers, torch custom ops (torch.compile), autograd, the public function."""
import math
from typing import List, Optional, Tuple

import torch
import triton

from .._dispatch import interpreting, resolve_backend
from . import _configs as C
from ._blockmask import AttentionBlockMask, build_block_mask
from ._bwd import _attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel, _attention_bwd_preprocess_kernel
from ._fwd import _attention_fwd_kernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LN2 = math.log(2.0)

# ----------------------------------------------------------------------------------------------
# Validation


def _compiling():
    return torch.compiler.is_compiling()


def _check_qkv(q, k, v, varlen):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"flash_attention: {name} must be a tensor, got {type(t).__name__}")
        want = 3 if varlen else 4
        if t.dim() != want:
            form = "(total, heads, head_dim) with cu_seqlens" if varlen else "(batch, seqlen, heads, head_dim)"
            raise ValueError(f"flash_attention: {name} must have shape {form}, got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"flash_attention: {name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"flash_attention: q, k and v must share one dtype, got q {q.dtype} and {name} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"flash_attention: q, k and v must be on one device, got q on {q.device} and {name} on {t.device}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(
                f"flash_attention: {name} must have a contiguous last dim (stride 1), got strides {t.stride()}; "
                f"other strides are free (views of a fused QKV, (B, H, L, D) permutes), call .contiguous() otherwise"
            )
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"flash_attention: q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attention: q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= C.MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim must be in [1, {C.MAX_HEAD_DIM}], got {head_dim}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"flash_attention: the number of query heads ({hq}) must be a multiple of key/value heads ({hkv})")


def _check_int_tensor(op, name, t, shapes, device):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be an int32 tensor, got {got}")
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{op}: {name} must have shape {' or '.join(str(s) for s in shapes)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like q, got {t.device}")


def _check_mask_args(op, seqlen_q, seqlen_k, batch, device, kv_start, kv_end, key_padding_mask, cu_seqlens_q,
                     cu_seqlens_k, max_seqlen_q, max_seqlen_k, validate=True, total_q=None, total_k=None):
    """Shape / dtype checks always; value checks (one sync) when `validate` and not tracing. Returns the batch."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError(f"{op}: varlen needs both cu_seqlens_q and cu_seqlens_k")
        if max_seqlen_q is None or max_seqlen_k is None:
            raise ValueError(f"{op}: varlen needs max_seqlen_q and max_seqlen_k (ints) with cu_seqlens")
        for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1 or t.numel() < 2:
                raise ValueError(f"{op}: {name} must be a 1-D int32 tensor of batch + 1 offsets, got "
                                 f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
            if device is not None and t.device != device:
                raise ValueError(f"{op}: {name} must be on {device} like q, got {t.device}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                             f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
        if key_padding_mask is not None:
            raise ValueError(f"{op}: key_padding_mask is for (B, L, H, D) inputs; with cu_seqlens, pack only the valid keys")
        batch = cu_seqlens_q.numel() - 1
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t is None:
            continue
        if varlen:
            if total_q is None:  # build_block_mask: the packed length comes from the intervals themselves
                total_q = t.shape[0] if isinstance(t, torch.Tensor) and t.dim() == 1 else -1
            shapes = [(total_q,)]
        elif batch is not None:
            shapes = [(seqlen_q,), (batch, seqlen_q)]
        else:
            shapes = [(seqlen_q,)] + ([(t.shape[0], seqlen_q)] if isinstance(t, torch.Tensor) and t.dim() == 2 else [])
        _check_int_tensor(op, name, t, shapes, device)
        if batch is None and t.dim() == 2:
            batch = t.shape[0]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"{op}: key_padding_mask must be a bool tensor (True marks a padded key)")
        if batch is None:
            batch = key_padding_mask.shape[0]
        if tuple(key_padding_mask.shape) != (batch, seqlen_k):
            raise ValueError(f"{op}: key_padding_mask must have shape {(batch, seqlen_k)}, got {tuple(key_padding_mask.shape)}")
        if device is not None and key_padding_mask.device != device:
            raise ValueError(f"{op}: key_padding_mask must be on {device} like q, got {key_padding_mask.device}")
    if not validate or _compiling():
        return batch
    if varlen:
        for name, t, total, longest in (("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q),
                                        ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k)):
            lengths = t[1:] - t[:-1]
            first, last, shortest, most = torch.stack([t[0], t[-1], lengths.min(), lengths.max()]).tolist()
            if first != 0 or shortest < 0:
                raise ValueError(f"{op}: {name} must start at 0 and be non-decreasing, got {t.tolist()}")
            if total is not None and last != total:
                raise ValueError(f"{op}: {name}[-1] must equal the packed length {total}, got {last}")
            if most > longest:
                raise ValueError(f"{op}: max_seqlen_{name[-1]}={longest} is smaller than the longest sequence ({most})")
    bounds = [(name, t) for name, t in (("kv_start", kv_start), ("kv_end", kv_end)) if t is not None and t.numel()]
    if bounds:
        if varlen:
            seq = torch.repeat_interleave(torch.arange(batch, device=bounds[0][1].device),
                                          (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long())
            limit = (cu_seqlens_k[1:] - cu_seqlens_k[:-1])[seq]
        else:
            limit = seqlen_k
        bad = [(t < 0) | (t > limit) for _, t in bounds]
        if torch.stack([m.any() for m in bad]).any().item():  # one sync when all is well
            for (name, t), m in zip(bounds, bad):
                where = m.nonzero()
                if where.numel():
                    where = tuple(where[0].tolist())
                    lk = seqlen_k if not varlen else "the key length of its sequence"
                    raise ValueError(f"{op}: {name} must lie in [0, Lk] (Lk = {lk}), got {int(t[where])} at index {where}")
    return batch


def _check_block_mask(bm, q, k, varlen, mask_args):
    if not isinstance(bm, AttentionBlockMask):
        raise ValueError(f"flash_attention: block_mask must come from build_block_mask, got {type(bm).__name__}")
    if any(a is not None and a is not False for a in mask_args):
        raise ValueError("flash_attention: with block_mask, leave causal / kv_start / kv_end / key_padding_mask / "
                         "cu_seqlens at their defaults: the block mask carries them")
    if bm.varlen != varlen:
        raise ValueError("flash_attention: block_mask was built for " + ("packed (varlen)" if bm.varlen else "(B, L, H, D)")
                         + " inputs")
    if bm.row_lo.device != q.device:
        raise ValueError(f"flash_attention: block_mask is on {bm.row_lo.device} but q is on {q.device}")
    if not varlen:
        if (bm.seqlen_q, bm.seqlen_k) != (q.shape[1], k.shape[1]):
            raise ValueError(f"flash_attention: block_mask was built for Lq={bm.seqlen_q}, Lk={bm.seqlen_k}, "
                             f"got {q.shape[1]} and {k.shape[1]}")
        if bm.kv_full_num.shape[0] not in (1, q.shape[0]):
            raise ValueError(f"flash_attention: block_mask has batch {bm.kv_full_num.shape[0]}, q has {q.shape[0]}")
    elif bm.row_lo.shape[0] != q.shape[0]:
        raise ValueError(f"flash_attention: block_mask was built for {bm.row_lo.shape[0]} packed queries, q has {q.shape[0]}")
    elif getattr(bm, "totals", None) is not None and bm.totals != (q.shape[0], k.shape[0]):
        raise ValueError(f"flash_attention: block_mask's cu_seqlens pack {bm.totals[0]} queries and {bm.totals[1]} keys, "
                         f"got q with {q.shape[0]} and k with {k.shape[0]}")


# ----------------------------------------------------------------------------------------------
# Launchers


def _bh_strides(t, varlen):
    """(batch, row, head) strides of a (B, L, H, D) or packed (total, H, D) tensor."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse, varlen):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


_PLACEHOLDERS = {}


def _placeholder(device):
    """An int32 stand-in for absent optional pointers (the kernels never read it), one per device."""
    if device not in _PLACEHOLDERS:
        _PLACEHOLDERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _PLACEHOLDERS[device]


class _Meta:
    """The block mask's tensors, as kernel arguments (broadcast batch -> stride 0)."""

    def __init__(self, row_lo, row_hi, kpm, cu_q, cu_k, lists, varlen, device):
        self.row_lo, self.row_hi = row_lo, row_hi
        self.stride_rb = 0 if varlen or row_lo.shape[0] == 1 else row_lo.stride(0)
        dummy = _placeholder(device)
        self.kpm = kpm.view(torch.uint8) if kpm is not None else dummy
        self.kpm_strides = (kpm.stride(0), kpm.stride(1)) if kpm is not None else (0, 0)
        self.cu_q = cu_q if cu_q is not None else dummy
        self.cu_k = cu_k if cu_k is not None else dummy
        self.lists = lists

    def strides(self, num, idx):
        broadcast = num.shape[0] == 1
        return (0 if broadcast else num.stride(0)), (0 if broadcast else idx.stride(0)), idx.stride(1)


def _dims(q, k, varlen, max_q, max_k):
    if varlen:
        return max_q, max_k, q.shape[0], 0  # seqlen args are unused (read from cu_seqlens)
    return q.shape[1], k.shape[1], q.shape[0], 0


def _flags(q, interp):
    return dict(DOT_FP32=interp and q.dtype == torch.bfloat16, EMULATE=interp, PRECISION=C.precision(q.dtype, interp))


def _fwd_launch(q, k, v, meta, scale, varlen, max_q, max_k):
    interp = q.device.type != "cuda"
    head_dim = q.shape[-1]
    hq, hkv = q.shape[-2], k.shape[-2]
    seqlen_q, seqlen_k = (max_q, max_k) if varlen else (q.shape[1], k.shape[1])
    batch = meta.cu_q.numel() - 1 if varlen else q.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, q.shape[0]) if varlen else (batch, hq, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or batch == 0 or seqlen_q == 0:
        return out, lse.fill_(float("-inf"))
    mask_m, mask_n = C.mask_tile(interp)
    full_num, full_idx, part_num, part_idx = meta.lists[:4]
    stride_nb, stride_ib, stride_im = meta.strides(full_num, full_idx)
    args = (
        q, k, v, out, lse, meta.row_lo, meta.row_hi, meta.kpm, meta.cu_q, meta.cu_k,
        full_num, full_idx, part_num, part_idx,
        *_bh_strides(q, varlen), *_bh_strides(k, varlen), *_bh_strides(v, varlen), *_bh_strides(out, varlen),
        *_lse_strides(lse, varlen), meta.stride_rb, *meta.kpm_strides, stride_nb, stride_ib, stride_im,
        seqlen_q, seqlen_k, hq, hq // hkv, scale * 1.4426950408889634,
    )
    cfg = C.launch_config("fwd", _attention_fwd_kernel, args, head_dim, q.dtype, interp)
    _attention_fwd_kernel[(triton.cdiv(seqlen_q, cfg.block_m), hq, batch)](
        *args, HEAD_DIM=head_dim, BLOCK_D=C.block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        MASK_M=mask_m, MASK_N=mask_n, VARLEN=varlen, HAS_KPM=meta.kpm.dtype == torch.uint8, **_flags(q, interp),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _bwd_launch(do, q, k, v, out, lse, dlse, meta, scale, varlen, max_q, max_k):
    interp = q.device.type != "cuda"
    head_dim = q.shape[-1]
    hq, hkv = q.shape[-2], k.shape[-2]
    seqlen_q, seqlen_k = (max_q, max_k) if varlen else (q.shape[1], k.shape[1])
    batch = meta.cu_q.numel() - 1 if varlen else q.shape[0]
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if batch == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    mask_m, mask_n = C.mask_tile(interp)
    flags = _flags(q, interp)
    delta = torch.empty_like(lse)
    has_dlse = dlse is not None
    if has_dlse and dlse.stride() != lse.stride():
        dlse = dlse.contiguous()
    args = (out, do, dlse if has_dlse else lse, delta, *_bh_strides(out, varlen), *_bh_strides(do, varlen),
            *_lse_strides(lse, varlen), seqlen_q, hq, meta.cu_q)
    cfg = C.launch_config("pre", _attention_bwd_preprocess_kernel, args, head_dim, q.dtype, interp)
    _attention_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, cfg.block_m), hq, batch)](
        *args, HEAD_DIM=head_dim, BLOCK_D=C.block_d(head_dim), BLOCK_M=cfg.block_m, VARLEN=varlen, HAS_DLSE=has_dlse,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    common = dict(HEAD_DIM=head_dim, BLOCK_D=C.block_d(head_dim), MASK_M=mask_m, MASK_N=mask_n, VARLEN=varlen,
                  HAS_KPM=meta.kpm.dtype == torch.uint8, **flags)
    q_full_num, q_full_idx, q_part_num, q_part_idx = meta.lists[4:]
    args = (
        q, k, v, do, lse, delta, dk, dv, meta.row_lo, meta.row_hi, meta.kpm, meta.cu_q, meta.cu_k,
        q_full_num, q_full_idx, q_part_num, q_part_idx,
        *_bh_strides(q, varlen), *_bh_strides(k, varlen), *_bh_strides(v, varlen), *_bh_strides(do, varlen),
        *_bh_strides(dk, varlen), *_bh_strides(dv, varlen), *_lse_strides(lse, varlen),
        meta.stride_rb, *meta.kpm_strides, *meta.strides(q_full_num, q_full_idx),
        seqlen_q, seqlen_k, hkv, hq // hkv, scale * 1.4426950408889634, scale,
    )
    cfg = C.launch_config("dkdv", _attention_bwd_dkdv_kernel, args, head_dim, q.dtype, interp)
    _attention_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, cfg.block_n), hkv, batch)](
        *args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    full_num, full_idx, part_num, part_idx = meta.lists[:4]
    args = (
        q, k, v, do, lse, delta, dq, meta.row_lo, meta.row_hi, meta.kpm, meta.cu_q, meta.cu_k,
        full_num, full_idx, part_num, part_idx,
        *_bh_strides(q, varlen), *_bh_strides(k, varlen), *_bh_strides(v, varlen), *_bh_strides(do, varlen),
        *_bh_strides(dq, varlen), *_lse_strides(lse, varlen),
        meta.stride_rb, *meta.kpm_strides, *meta.strides(full_num, full_idx),
        seqlen_q, seqlen_k, hq, hq // hkv, scale * 1.4426950408889634, scale,
    )
    cfg = C.launch_config("dq", _attention_bwd_dq_kernel, args, head_dim, q.dtype, interp)
    _attention_bwd_dq_kernel[(triton.cdiv(seqlen_q, cfg.block_m), hq, batch)](
        *args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees them as opaque calls with fake shapes) and their autograd


def _meta_of(q, row_lo, row_hi, kpm, cu_q, cu_k, lists):
    return _Meta(row_lo, row_hi, kpm, cu_q, cu_k, lists, cu_q is not None, q.device)


# Returns (out, lse2) with the base-2 log-sum-exp lse2 = lse / ln 2 (what the backward needs, unrounded).
@torch.library.custom_op("mmfast::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_lo: torch.Tensor, row_hi: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    lists: List[torch.Tensor], softmax_scale: float, max_seqlen_q: int, max_seqlen_k: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    meta = _meta_of(q, row_lo, row_hi, key_padding_mask, cu_seqlens_q, cu_seqlens_k, lists)
    return _fwd_launch(q, k, v, meta, softmax_scale, cu_seqlens_q is not None, max_seqlen_q, max_seqlen_k)


@_flash_attention_fwd_op.register_fake
def _(q, k, v, row_lo, row_hi, key_padding_mask, cu_seqlens_q, cu_seqlens_k, lists, softmax_scale, max_seqlen_q,
      max_seqlen_k):
    out = q.new_empty(q.shape)
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("mmfast::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd_op(
    dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, row_lo: torch.Tensor, row_hi: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    lists: List[torch.Tensor], softmax_scale: float, max_seqlen_q: int, max_seqlen_k: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = _meta_of(q, row_lo, row_hi, key_padding_mask, cu_seqlens_q, cu_seqlens_k, lists)
    return _bwd_launch(dout, q, k, v, out, lse, dlse, meta, softmax_scale, cu_seqlens_q is not None, max_seqlen_q,
                       max_seqlen_k)


@_flash_attention_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, row_lo, row_hi, key_padding_mask, cu_seqlens_q, cu_seqlens_k, lists,
      softmax_scale, max_seqlen_q, max_seqlen_k):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, row_lo, row_hi, kpm, cu_q, cu_k, lists, scale, max_q, max_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, row_lo, row_hi, kpm, cu_q, cu_k, *lists)
    ctx.scale, ctx.max_q, ctx.max_k = scale, max_q, max_k


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, row_lo, row_hi, kpm, cu_q, cu_k, *lists = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd_op(dout, dlse, q, k, v, out, lse, row_lo, row_hi, kpm, cu_q, cu_k, lists,
                                         ctx.scale, ctx.max_q, ctx.max_k)
    # one entry per input: row_lo, row_hi, key_padding_mask, cu_seqlens_q/k, lists, scale, max_seqlen_q/k
    return dq, dk, dv, None, None, None, None, None, [None] * len(lists), None, None, None


_flash_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("flash_attention: double backward (gradients of gradients, e.g. create_graph=True for a "
                       "gradient penalty) is not supported; use backend='reference' for that")


_flash_attention_bwd_op.register_autograd(_no_double_backward)


# ----------------------------------------------------------------------------------------------
# Public function

_DEFAULT_MASKS = {}


def _block_mask_for(q, k, varlen, causal, kv_start, kv_end, key_padding_mask, cu_q, cu_k, max_q, max_k):
    interp = q.device.type != "cuda"
    tensors = (kv_start, kv_end, key_padding_mask, cu_q, cu_k)
    key = None
    if all(t is None for t in tensors) and not _compiling():
        # a mask built under inference_mode holds inference tensors, which autograd may not save: keep
        # those apart, or an evaluation pass would break the training steps that follow it
        key = (q.device, q.shape[1], k.shape[1], causal, interp, torch.is_inference_mode_enabled())
        cached = _DEFAULT_MASKS.get(key)
        if cached is not None:
            return cached
    bm = build_block_mask(
        None if varlen else q.shape[1], None if varlen else k.shape[1], causal=causal, kv_start=kv_start, kv_end=kv_end,
        key_padding_mask=key_padding_mask, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
        max_seqlen_k=max_k, device=q.device, tile=C.mask_tile(interp), validate=False,
    )
    if key is not None:
        if len(_DEFAULT_MASKS) >= 64:
            _DEFAULT_MASKS.pop(next(iter(_DEFAULT_MASKS)))
        _DEFAULT_MASKS[key] = bm
    return bm


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, kv_start=None, kv_end=None, key_padding_mask=None,
                    cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, return_lse=False,
                    backend="auto", block_mask=None):
    """Exact softmax attention with interval, causal and padding masks; skips the KV blocks a mask hides.

    ``out[b, i, h] = Σ_j p_ij v[b, j, h // g]``, ``p_ij = softmax_j(scale · q[b, i, h] · k[b, j, h // g])``
    over the keys j that query row i sees, g = Hq / Hkv (GQA / MQA), scale = `softmax_scale` or 1/√D.

    Shapes:
        q (B, Lq, Hq, D), k and v (B, Lk, Hkv, D) — Lq ≠ Lk allowed (cross-attention); or packed varlen
        q (total_q, Hq, D), k / v (total_k, Hkv, D) with `cu_seqlens_q` / `cu_seqlens_k` (int32, B + 1
        offsets starting at 0; separate, so varlen cross-attention works) and `max_seqlen_q` / `max_seqlen_k`.
        Any strides with a contiguous last dim (views of a fused QKV projection, (B, H, L, D) permuted to
        (B, L, H, D)) are read in place. D ≤ 256, any value (40, 72, 80, 96 ...): padded internally.
        dtypes float16, bfloat16, float32 (all three alike). float32 matmuls run on TF32 tensor cores on the
        GPU (like torch with allow_tf32); accumulation is fp32 always.

    Masks (intersected; a key is visible only if every given condition allows it):
        kv_start / kv_end: int32 (B, Lq) or (Lq,) — (total_q,) for varlen, relative to each sequence's
            start: row i sees keys ``kv_start[i] <= j < kv_end[i]`` (values in [0, Lk]; start ≥ end: none).
            Builders for every model mask live in ``mmfast.kernels.attention.masks``.
        causal: row i sees ``j <= i + Lk - Lq`` — bottom-right aligned, as flash-attn ≥ 2.1::

                Lq = 2, Lk = 5:   1 1 1 1 0        Lq = 5, Lk = 2:   0 0
                                  1 1 1 1 1                          0 0
                                                                     0 0
                                                                     1 0
                                                                     1 1

        key_padding_mask: bool (B, Lk), True marks a padded key (torch.nn.MultiheadAttention's convention).
            Not with varlen (pack only the valid keys instead).
        block_mask: an AttentionBlockMask from ``build_block_mask(...)`` built from the same mask arguments;
            pass it instead of them to reuse the precomputed block lists across calls and layers.

    Rows that see no key at all get output exactly 0, LSE −inf and zero gradients (never NaN).

    Returns out (shape and dtype of q, contiguous), and with `return_lse` also lse (B, Hq, Lq) float32 —
    (Hq, total_q) for varlen — the natural-log log-sum-exp of the scaled scores (differentiable).

    backend: "auto" (Triton on CUDA, the PyTorch reference on CPU), "triton" (CUDA, or CPU with
    TRITON_INTERPRET=1), "reference" (``kernels.reference.attention_reference``). Backward: dq, dk, dv in
    the input dtype, deterministic (no atomics); no double backward (raises). Traceable by ``torch.compile(fullgraph=True)``: the
    kernels are the custom ops ``mmfast::flash_attention_fwd`` / ``mmfast::flash_attention_bwd``.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None or (block_mask is not None and getattr(block_mask, "varlen", False))
    _check_qkv(q, k, v, varlen)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale):  # inf / nan would turn every row into NaN
        raise ValueError(f"flash_attention: softmax_scale must be finite, got {softmax_scale}")
    chosen = resolve_backend("flash_attention", backend, q.device)
    if block_mask is not None:
        _check_block_mask(block_mask, q, k, varlen, (causal, kv_start, kv_end, key_padding_mask, cu_seqlens_q,
                                                     cu_seqlens_k, max_seqlen_q, max_seqlen_k))
        bm = block_mask
        causal, kv_start, kv_end, key_padding_mask = bm.causal, bm.kv_start, bm.kv_end, bm.key_padding_mask
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = bm.cu_seqlens_q, bm.cu_seqlens_k, bm.seqlen_q, bm.seqlen_k
    else:
        bm = None
        _check_mask_args(
            "flash_attention", None if varlen else q.shape[1], None if varlen else k.shape[1],
            None if varlen else q.shape[0], q.device, kv_start, kv_end, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, total_q=q.shape[0] if varlen else None, total_k=k.shape[0] if varlen else None,
        )
    if chosen == "reference":
        from ..reference import attention_reference

        wide = torch.float32 if q.dtype != torch.float32 else None
        out, lse = attention_reference(
            q, k, v, causal=causal, softmax_scale=softmax_scale, kv_start=kv_start, kv_end=kv_end,
            key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, compute_dtype=wide,
            return_lse=True,
        )
        out = out.to(q.dtype).contiguous()  # contiguous like the kernel's output (callers .view it)
        if not varlen and lse.shape[0] != q.shape[0]:
            lse = lse.expand(q.shape[0], -1, -1)
        return (out, lse.float()) if return_lse else out
    if bm is None:
        bm = _block_mask_for(q, k, varlen, causal, kv_start, kv_end, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k)
    tile = C.mask_tile(q.device.type != "cuda")
    if tuple(bm.tile) != tuple(tile):
        raise ValueError(f"flash_attention: block_mask has tile {bm.tile}, the kernels use {tile} on {q.device}; "
                         "build it on the inputs' device without `tile`")
    lists = [bm.kv_full_num, bm.kv_full_idx, bm.kv_part_num, bm.kv_part_idx,
             bm.q_full_num, bm.q_full_idx, bm.q_part_num, bm.q_part_idx]
    out, lse2 = _flash_attention_fwd_op(
        q, k, v, bm.row_lo.reshape(1, -1) if varlen else bm.row_lo, bm.row_hi.reshape(1, -1) if varlen else bm.row_hi,
        bm.key_padding_mask, bm.cu_seqlens_q, bm.cu_seqlens_k, lists, softmax_scale,
        int(max_seqlen_q or 0), int(max_seqlen_k or 0),
    )
    # the op keeps the base-2 LSE for its backward; callers get the natural one
    return (out, lse2 * _LN2) if return_lse else out
