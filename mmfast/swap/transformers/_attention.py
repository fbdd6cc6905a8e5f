"""The "mmfast" entry of transformers' ``AttentionInterface``: HF's attention call on flash_attention.

`mmfast_attention` has ``sdpa_attention_forward``'s signature and meaning: q / k / v (B, H, L, D) views in,
``(out (B, L, H, D), None)`` out, ``scaling`` (None: 1/sqrt(D)), GQA (fewer key/value heads, as
``module.num_key_value_groups`` says; the kernel reads them without repeating), the SDPA integration's
causality rule, packed sequences (``cu_seq_lens_q/k``) through the varlen path. Calls it cannot run
exactly (dropout, softcap, attention sinks, position bias, a float bias mask, a mask that is not causal /
interval / padding, float64 on Triton, head dim > 256) go to `fallback_sdpa` and are counted.
"""
import dataclasses
import functools

import torch
import torch.nn.functional as F

from mmfast.kernels import flash_attention
from mmfast.kernels._common import warn_once
from mmfast.kernels._dispatch import resolve_backend

from ._masks import PaddedMask, _causal_kwargs, kernel_mask

NAME = "mmfast"
CTX = "_mmfast_ctx"   # on a patched attention module: its AttentionContext
FALLBACKS = {}        # fallbacks of modules no patch() looked at (attn_implementation="mmfast" set by hand)


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What `mmfast.patch` attaches to each attention module: the backend to run and where to count."""
    backend: str = "auto"
    report: object = None


def _count(module, reason):
    ctx = module.__dict__.get(CTX)
    if ctx is not None and ctx.report is not None:
        ctx.report.count_fallback(reason)
    else:
        FALLBACKS[reason] = FALLBACKS.get(reason, 0) + 1
    warn_once(("hf-attention-fallback", reason),
              f"mmfast attention: {reason}; this call runs PyTorch (SDPA, or the eager math for what SDPA lacks)")


def _dense(mask):
    return mask.dense() if isinstance(mask, PaddedMask) else mask


def _math_attention(query, key, value, mask, scaling, causal, dropout, training, softcap=None, s_aux=None):
    """The eager computation, for what SDPA cannot take (softcap, attention sinks)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    lq, lk = scores.shape[-2:]
    if causal:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        min_value = torch.finfo(scores.dtype).min
        scores = scores.masked_fill(~mask, min_value) if mask.dtype == torch.bool else scores + mask
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, lq, 1).to(scores.dtype)
        probs = torch.cat([scores, sinks], dim=-1).softmax(-1, dtype=scores.dtype)[..., :-1]
    else:
        probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()


def fallback_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' own SDPA attention for this call (a `PaddedMask` densified first); softcap and
    attention sinks, which SDPA lacks, through the eager computation. Same signature and return."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = _dense(attention_mask)
    softcap, s_aux = kwargs.pop("softcap", None), kwargs.pop("s_aux", None)
    if softcap is None and s_aux is None:
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and mask is None and causal
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return _math_attention(query, key, value, mask, scaling, causal, dropout, module.training, softcap, s_aux), None


@functools.lru_cache(maxsize=None)
def _explicit_causal_for_one_query():
    """Whether transformers' SDPA function keeps an explicit ``is_causal=True`` for a single query (4.5x:
    SDPA's top-left causal then shows it the first key only) rather than dropping it (5.x). Asked of the
    function itself, once: one query of zeros over values 0 and 1 gives 0 or their mean."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 2, 1)
    v = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1)
    out, _ = sdpa_attention_forward(torch.nn.Module(), q, k, v, None, is_causal=True)
    return float(out.flatten()[0]) == 0.0


def _unsupported(query, key, value, dropout, backend, kwargs):
    """Why this call cannot run on flash_attention (None: it can)."""
    if dropout:
        return "attention dropout > 0 (training)"
    if kwargs.get("softcap") is not None:
        return "attention logit softcap"
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)"
    if kwargs.get("position_bias") is not None:
        return "additive position bias"
    if key.shape[-1] != value.shape[-1] or query.shape[-1] > 256:
        return f"head dims q/k {key.shape[-1]}, v {value.shape[-1]} (flash_attention: equal and <= 256)"
    if query.dtype == torch.float64 and resolve_backend("flash_attention", backend, query.device) != "reference":
        return "float64 inputs on the Triton backend"
    return None


def _varlen(query, key, value, scaling, causal, backend, kwargs):
    """Packed sequences (batch 1, ``cu_seq_lens_q/k``), as transformers' flash-attention path runs them."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    cu_q, cu_k = (kwargs[n].to(device=q.device, dtype=torch.int32) for n in ("cu_seq_lens_q", "cu_seq_lens_k"))
    max_q, max_k = (int(kwargs[n]) if kwargs.get(n) is not None else int((c[1:] - c[:-1]).max())
                    for n, c in (("max_length_q", cu_q), ("max_length_k", cu_k)))
    out = flash_attention(q, k, v, causal=causal, softmax_scale=scaling, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=max_q, max_seqlen_k=max_k, backend=backend)
    return out.unsqueeze(0)


def mmfast_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention function (``sdpa_attention_forward``'s contract) running mmfast's flash_attention.

    query (B, Hq, Lq, D), key / value (B, Hkv, Lk, D), Hq a multiple of Hkv; any strides. Returns
    ``(out, None)``, out (B, Lq, Hq, D). Masks: None, a `PaddedMask` from the "mmfast" mask builder, a bool
    (B|1, 1|H, Lq|1, Lk) mask whose rows are intervals of the unpadded keys, or a float mask of only 0 and
    masked values; anything else falls back to SDPA for the call (counted in the patch report).
    """
    ctx = module.__dict__.get(CTX) if isinstance(module, torch.nn.Module) else None
    backend = ctx.backend if ctx is not None else "auto"
    reason = _unsupported(query, key, value, dropout, backend, kwargs)
    batch, _, lq, _ = query.shape
    lk = key.shape[2]
    # the SDPA integration's causality rule
    causal_rule = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if reason is None and kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
        if batch == 1 and (attention_mask is None or (isinstance(attention_mask, PaddedMask)
                                                      and attention_mask.padding is None)):
            return _varlen(query, key, value, scaling, bool(causal_rule), backend, kwargs), None
    if reason is None:
        if attention_mask is None:
            mask_kwargs = {}
            if causal_rule and (lq > 1 or (is_causal is not None and _explicit_causal_for_one_query())):
                if lk > lq:  # SDPA's causal is top-left aligned: HF drops the (empty) keys past Lq
                    key, value, lk = key[:, :, :lq], value[:, :, :lq], lq
                mask_kwargs = _causal_kwargs(lq, lk, 0, query.device)
        else:
            mask_kwargs, reason = kernel_mask(attention_mask, batch, lq, lk, query.device)
    if reason is not None:
        _count(module, reason)
        return fallback_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             is_causal=is_causal, **kwargs)
    out = flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling,
                          backend=backend, **mask_kwargs)
    return out, None
