"""Attention over key sets that one ``flash_attention`` call cannot mask: two calls over disjoint key sets,
merged exactly by their log-sum-exps. Llama 3.2 Vision (Hugging Face's Mllama) needs two of them:

- the vision encoder's mask ``m mᵀ · finfo.min`` (m: padded patches and unused tiles) hides only a padded
  query × a padded key: real queries see every key, padded ones only the real keys
  (:func:`padded_self_attention`);
- the text cross-attention: a row sees one run of image tokens minus the unused tiles (an interval plus a
  key padding mask, :func:`cross_key_intervals`), and rows that see no image either attend to every key,
  padded tiles included (Hugging Face) or get output 0 (Meta's reference) (:func:`cross_attention`).

Shared by ``mmfast.models.Mllama`` and the transformers swap (``mmfast.swap.transformers._mllama``).
"""
import torch

from mmfast.kernels import flash_attention
from mmfast.kernels._common import check_choice

EMPTY_ROWS = ("zero", "all_keys")


def merge_attention(o1, lse1, o2, lse2):
    """Exact attention over the union of two disjoint key sets from the two partial results: each output
    (B, L, H, D) weighted by exp(lse − lse_total), lse (B, H, L). Differentiable through the lses."""
    total = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - total).transpose(1, 2).unsqueeze(-1)
    w2 = torch.exp(lse2 - total).transpose(1, 2).unsqueeze(-1)
    return (o1.to(w1.dtype) * w1 + o2.to(w2.dtype) * w2).to(o1.dtype)


def padded_self_attention(q, k, v, pad, *, softmax_scale=None, backend="auto"):
    """Self-attention (B, L, H, D) under Hugging Face Mllama's vision mask: `pad` (B, L) bool marks padded
    tokens; a padded query sees the real keys only, a real query every key. None: no padding."""
    if pad is None:
        return flash_attention(q, k, v, softmax_scale=softmax_scale, backend=backend)
    kw = dict(softmax_scale=softmax_scale, backend=backend, return_lse=True)
    o_real, lse_real = flash_attention(q, k, v, key_padding_mask=pad, **kw)
    o_pad, lse_pad = flash_attention(q, k, v, key_padding_mask=~pad, **kw)
    return torch.where(pad[:, :, None, None], o_real, merge_attention(o_real, lse_real, o_pad, lse_pad))


def cross_key_intervals(visible):
    """`visible` (B, L, K) bool → (kv_start, kv_end) int32 (B, L) and the padded keys (B, K) bool or None,
    such that row i sees ``kv_start <= j < kv_end`` minus the padded keys (those no row of the sample
    sees). Rows that see no key get the empty interval [0, 0). None when a row is not one run of keys
    minus padded ones (a mask no single interval call expresses)."""
    B, L, K = visible.shape
    live = visible.any(-1)
    pad = ~visible.any(1) & live.any(-1, keepdim=True)
    m = visible.to(torch.int32)
    zero = torch.zeros((), dtype=torch.int32, device=visible.device)
    start = torch.where(live, m.argmax(-1).to(torch.int32), zero)
    end = torch.where(live, K - m.flip(-1).argmax(-1).to(torch.int32), zero)
    j = torch.arange(K, device=visible.device, dtype=torch.int32)
    expect = (j >= start[..., None]) & (j < end[..., None]) & ~pad[:, None, :]
    if not torch.equal(expect, visible):
        return None
    return start, end, (pad if bool(pad.any()) else None)


def cross_attention(q, k, v, kv_start, kv_end, pad=None, *, empty_rows="zero", softmax_scale=None, backend="auto"):
    """Cross-attention (q (B, L, H, D), k / v (B, K, Hkv, D)) where row i sees keys in [kv_start, kv_end)
    minus the padded keys `pad` (B, K). Rows with an empty interval: output 0 (``empty_rows="zero"``,
    Meta's reference) or attention over every key, padded ones included (``"all_keys"``, Hugging Face's
    all-zero additive mask): with padding, that is attention(visible) merged with attention(padded)."""
    check_choice("cross_attention", "empty_rows", empty_rows, EMPTY_ROWS)
    kw = dict(softmax_scale=softmax_scale, backend=backend)
    if empty_rows == "zero":
        return flash_attention(q, k, v, kv_start=kv_start, kv_end=kv_end, key_padding_mask=pad, **kw)
    empty = kv_end <= kv_start
    K, zero = k.shape[1], torch.zeros_like(kv_start)
    start = torch.where(empty, zero, kv_start)
    end = torch.where(empty, torch.full_like(kv_end, K), kv_end)
    if pad is None:
        return flash_attention(q, k, v, kv_start=start, kv_end=end, **kw)
    o_vis, lse_vis = flash_attention(q, k, v, kv_start=start, kv_end=end, key_padding_mask=pad, return_lse=True, **kw)
    o_pad, lse_pad = flash_attention(q, k, v, kv_start=zero, kv_end=torch.where(empty, end, zero),
                                     key_padding_mask=~pad, return_lse=True, **kw)
    return torch.where(empty[:, :, None, None], merge_attention(o_vis, lse_vis, o_pad, lse_pad), o_vis)
