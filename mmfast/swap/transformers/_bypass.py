"""What the modules that bypass (or specialise) transformers' attention interface share: turning the
additive masks they receive into ``flash_attention``'s interval / padding form and the checks that send a
call back to the original code (two attention calls merged by their log-sum-exps: ``mmfast.nn.split_attention``).

The masks reach these modules already dense (B, 1, Lq, Lk), built by the model (BLIP's text decoder,
Mllama's vision encoder and cross-attention, Idefics' image mask). Their structure is checked exactly
once per mask tensor (the same tensor is handed to every layer, so `MaskMemo` keys the result on it):
a mask that is not what mmfast can express exactly gives ``None`` and the call runs the original code.
"""
import functools
import inspect
import weakref

import torch
from torch import nn

from mmfast.kernels import flash_attention
from mmfast.nn.gated_cross_attention import gated_linear_residual

from .. import _core
from .._core import _SAVED, replace_forward


class Fallback(Exception):
    """Raised inside a swapped forward: this call runs the original code; the message is the reason."""


try:  # transformers 5.x records attention weights through hooks and a context variable
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # 4.5x passes output_attentions down, or wraps the module's forward for the call
    _active_collector = None


def weights_requested(module=None):
    """Whether the running forward records attention weights (``output_attentions=True``) of `module`: only
    the original eager code has them to give. 4.5x's ``check_model_inputs`` records them by replacing the
    attention module's forward, for the call, with its ``wrapped_forward`` around ours."""
    collected = _active_collector.get() if _active_collector is not None else None
    if bool(collected) and ("attentions" in collected or "cross_attentions" in collected):
        return True
    forward = module.__dict__.get("forward") if module is not None else None
    return getattr(getattr(forward, "__code__", None), "co_name", None) == "wrapped_forward"


def cache_keyword(module):
    """The keyword under which the module's original forward takes the KV cache: ``cache`` in the releases
    that renamed it (5.24 has it; its deprecate_kwarg still maps the old name, with a warning),
    ``past_key_values`` before (5.17). Read from the signature, not compared with a version: under the
    other keyword the cache would land in **kwargs unused and a fallback step would run without it."""
    return _cache_keyword(type(module))


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls):
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_update(cache, key, value, layer_idx, kwargs):
    """``cache.update`` as the installed transformers takes it: 4.5x's positional ``cache_kwargs`` dict
    (the query positions), 5.x's keywords. Read from the signature."""
    if _takes_cache_kwargs(type(cache)):
        return cache.update(key, value, layer_idx, {"cache_position": kwargs.get("cache_position")})
    return cache.update(key, value, layer_idx, kwargs=kwargs)


@functools.lru_cache(maxsize=None)
def _takes_cache_kwargs(cls):
    return "cache_kwargs" in inspect.signature(cls.update).parameters


def interface_for(registry, implementation, eager):
    """The attention function a module of this implementation takes from ``registry`` (its modeling file's
    ALL_ATTENTION_FUNCTIONS): ``get_interface`` where transformers has it (5.x), else 4.5x's rule."""
    if hasattr(registry, "get_interface"):
        return registry.get_interface(implementation, eager)
    return eager if implementation == "eager" else registry[implementation]


def check_common(module, dropout_p, kwargs=None):
    """The reasons common to every swapped attention for handing a call back. ``kwargs``: the call's extra
    keywords, where transformers 4.5x passes ``output_attentions`` / ``head_mask`` down explicitly."""
    kwargs = kwargs or {}
    if weights_requested(module) or kwargs.get("output_attentions"):
        raise Fallback("attention weights requested (output_attentions)")
    if kwargs.get("head_mask") is not None:
        raise Fallback("head_mask")
    if module.training and dropout_p > 0:
        raise Fallback("attention dropout > 0 in training")


class MaskMemo:
    """Remembers the analysis of the last mask tensor seen (same object, unmodified), so that the layers
    of one forward analyse their shared mask once."""

    def __init__(self):
        self._ref, self._version, self._value = None, None, None

    def get(self, mask, analyse):
        try:
            version = mask._version
        except RuntimeError:  # inference tensors keep no version counter: analyse every time
            return analyse(mask)
        if self._ref is not None and self._ref() is mask and self._version == version:
            return self._value
        value = analyse(mask)
        self._ref, self._version, self._value = weakref.ref(mask), version, value
        return value


def memo(state, key):
    """The `MaskMemo` for `key` shared by every swapped module of one patched model (the local and
    global vision layers see the same mask tensor)."""
    return state.__dict__.setdefault("_mask_memos", {}).setdefault(key, MaskMemo())


# what an additive mask hides: finfo.min / -inf (5.x), or BERT's -10000 (4.5x's BLIP text, BLIP-2's Q-Former):
# exp(-10000) is 0 in every float dtype, so a key hidden by it adds exactly nothing unless its score exceeds
# the row's maximum by ~9000
HIDDEN = -10000.0


def visible_keys(mask, batch, seqlen_q, seqlen_k):
    """(B, Lq, Lk) bool, True where the additive float `mask` lets query i see key j; None when the mask
    is not float (a boolean mask added to eager scores would hide nothing), holds values other than 0 and
    a hiding value (<= -10000: finfo.min, -inf, BERT's -10000), has per-head entries, or does not broadcast
    to (B, 1, Lq, Lk)."""
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            return None
        mask = mask[:, 0]
    if mask.dim() != 3:
        return None
    try:
        mask = mask.expand(batch, seqlen_q, seqlen_k)
    except RuntimeError:
        return None
    if not mask.is_floating_point():
        return None
    visible = mask == 0
    hidden = mask <= HIDDEN
    if not bool((visible | hidden).all()):
        return None
    return visible


def row_intervals(visible):
    """Rows of `visible` (..., Lq, Lk) as intervals: (kv_start, kv_end) int32 with ``visible[..., i, j]``
    iff ``kv_start[..., i] <= j < kv_end[..., i]``; None when a row is not one contiguous run."""
    m = visible.to(torch.int32)
    count = m.sum(-1, dtype=torch.int32)
    start = torch.where(count > 0, m.argmax(-1).to(torch.int32), torch.zeros_like(count))
    end = start + count
    j = torch.arange(visible.shape[-1], device=visible.device, dtype=torch.int32)
    if not torch.equal((j >= start[..., None]) & (j < end[..., None]), visible):
        return None
    return start, end


def attend(q, k, v, scale, backend, **mask):
    """flash_attention on (B, L, H, D) views (HF's (B, H, L, D) tensors transposed, no copy)."""
    return flash_attention(q, k, v, softmax_scale=scale, backend=backend, **mask)


def to_blhd(x):
    """HF's (B, H, L, D) → mmfast's (B, L, H, D), a view."""
    return x.transpose(1, 2)


def eager_rows(out, q, k, v, scale, mask, rows, softmax_dtype=None):
    """`out` (B, Lq, H, D) with the rows marked in `rows` (B, Lq) recomputed by the eager formula
    ``softmax(q kᵀ·scale + mask) v``. For rows that see no key: in eager code every score plus finfo.min
    rounds to finfo.min, so the forward is a plain average of the values, while the backward is still
    softmax's (a gradient reaches q and k); only the eager formula itself gives both. They are few (left-padding queries) and gathered per batch element (each row reads its element's
    keys in place, no copy per row), so this costs nothing like a dense pass."""
    mask = mask[:, 0] if mask.dim() == 4 else mask
    mask = mask.expand(rows.shape[0], rows.shape[1], k.shape[1])
    for b in rows.any(-1).nonzero().flatten().tolist():
        i = rows[b].nonzero().flatten()
        s = torch.einsum("nhd,khd->nhk", q[b, i], k[b]) * scale + mask[b, i][:, None, :]
        p = torch.softmax(s, dim=-1, dtype=softmax_dtype).to(v.dtype)
        out = out.index_put((torch.full_like(i, b), i), torch.einsum("nhk,khd->nhd", p, v[b]).to(out.dtype))
    return out


def gated(a, linear, gate, residual, row_mask, fused, backend, report=None):
    """`mmfast.nn.gated_cross_attention.gated_linear_residual`, a projection that is not a plain nn.Linear (a LoRA
    or quantized layer: its own forward runs, then the gate) counted in `report`."""
    def count(layer):
        report.count_fallback(f"tanh_gated_linear: {_core.describe('the projection', layer, nn.Linear)}: "
                              "its own forward runs, then the gate")
    return gated_linear_residual(a, linear, gate, residual, row_mask=row_mask, fused=fused, backend=backend,
                                 on_unfused=None if report is None else count)


def gated_residuals(layer, o, residual, attn_gate, mlp_gate, options, attn_rows=None, mlp_rows=None, report=None):
    """The two gated residuals of a Llama-style cross-attention layer (Mllama's and Idefics' share the
    names): ``x = residual + tanh(attn_gate)·o_proj(o)``; ``x + tanh(mlp_gate)·down(act(gate(h))·up(h))``
    with h = post_attention_layernorm(x); `attn_rows` / `mlp_rows` zero those rows' updates."""
    x = gated(o, layer.cross_attn.o_proj, attn_gate, residual, attn_rows, options.gated, options.backend, report)
    h = layer.post_attention_layernorm(x)
    mlp = layer.mlp
    act = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
    return gated(act, mlp.down_proj, mlp_gate, x, mlp_rows, options.gated, options.backend, report)


def supersede(report, path):
    """Drop the attention-interface rows of modules this file takes over (the module itself, or the
    cross_attn inside a replaced layer): the row added here says what runs there now."""
    report.swapped[:] = [r for r in report.swapped if r.path not in (path, f"{path}.cross_attn")]


def layer_kind(make, options, was, attention_now):
    """`swap_all`'s entry for a cross-attention layer whose forward runs the attention and / or both
    gated residuals through mmfast (each as the options allow)."""
    now = " + ".join(filter(None, [attention_now if options.attention else "",
                                   "tanh_gated_linear (o_proj, down_proj)" if options.gated else ""]))
    return make, options.attention or options.gated, "attention=False and gated=False", was, now


def forward_swapped(module):
    """Whether mmfast already replaced this instance's forward (patch is idempotent). Not any instance
    forward: transformers 4.5x leaves the class's own, bound, on each module it recorded outputs of."""
    return "forward" in module.__dict__.get(_SAVED, {})


def swap_all(model, state, kinds, where=None):
    """Replace the forward of every module of `model` whose class is in `kinds` (and, if given, for which
    ``where(module)`` holds): ``{cls: (make_forward(state), enabled, why_not, was, now)}``; a row in the
    report for each."""
    forwards = {}
    for path, module in model.named_modules():
        kind = kinds.get(type(module))
        if kind is None or (where is not None and not where(module)):
            continue
        make, enabled, why_not, was, now = kind
        if not enabled:
            state.report.leave(path, was, why_not)
            continue
        if forward_swapped(module):
            continue
        why = _core.foreign_forward(module)
        if why is not None:
            state.report.leave(path, was, why)
            continue
        if make not in forwards:
            forwards[make] = make(state)
        replace_forward(module, forwards[make])
        supersede(state.report, path)
        state.report.add(path, was, now)
