"""Interval masks: the one mask form `flash_attention` takes, built for the models mmfast assembles.

An interval mask is a pair of int32 tensors ``(kv_start, kv_end)`` of shape (Lq,) or (B, Lq): query row
``i`` sees exactly the keys ``j`` with ``kv_start[i] <= j < kv_end[i]``. A row with
``kv_start >= kv_end`` sees no key (its attention output is 0); the builders write such rows as
``(0, 0)``. One contiguous range per row covers every mask of these models, and it lets the kernel skip
every KV block that lies outside all the ranges of a query block.

Builders (all return an :class:`Intervals` named tuple, which unpacks as ``kv_start, kv_end``):

- :func:`causal` – causal, bottom-right aligned when Lq != Lk (flash-attn >= 2.1);
- :func:`prefix_lm` – bidirectional over a prefix (image tokens, a prompt), causal after it;
- :func:`qformer_masks` – BLIP-2's Q-Former self-attention masks for ITC, ITM and ITG;
- :func:`media_intervals` – Flamingo / Llama 3.2 Vision text→image cross-attention
  ("attend only to the most recent image");
- :func:`document_intervals` – packed documents (block-diagonal, optionally causal);
- :func:`intersect` – the intersection of interval masks (e.g. documents ∩ sliding window);
- :func:`dense_mask` / :func:`intervals_from_dense` – to and from a dense boolean mask (tests, debugging,
  and for feeding the same mask to SDPA or FlexAttention).

Key padding (padded text in a batch, unused image tiles) is not part of the intervals: pass it to
`flash_attention` as ``key_padding_mask``.
"""
from typing import NamedTuple

import torch

from .._common import check_bool, check_choice, check_int

__all__ = [
    "Intervals",
    "QFormerMasks",
    "causal",
    "dense_mask",
    "document_intervals",
    "intersect",
    "intervals_from_dense",
    "media_intervals",
    "prefix_lm",
    "qformer_masks",
]

MEDIA_MODES = ("most_recent", "most_recent_group", "all_previous")


class Intervals(NamedTuple):
    """Row i sees keys ``kv_start[i] <= j < kv_end[i]``; int32, shape (Lq,) or (B, Lq)."""

    kv_start: torch.Tensor
    kv_end: torch.Tensor

    def dense(self, seqlen_k):
        """The equivalent dense boolean mask, (..., Lq, seqlen_k), True where a key is visible."""
        return dense_mask(self.kv_start, self.kv_end, seqlen_k)


class QFormerMasks(NamedTuple):
    """BLIP-2's three Q-Former self-attention masks over ``[queries; text]``."""

    itc: Intervals  # unimodal: queries see queries, text sees text
    itm: Intervals  # bidirectional: all see all
    itg: Intervals  # multimodal causal: queries see queries; text sees all queries + earlier text


def _check_device(op, device):
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{op}: device must be a torch.device or a device string, got {device!r}") from exc


def _is_int_tensor(t):
    return isinstance(t, torch.Tensor) and not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def _describe(t):
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_intervals(op, name, kv_start, kv_end):
    """A (kv_start, kv_end) pair: integer tensors of one shape."""
    for part, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if not _is_int_tensor(t):
            raise ValueError(f"{op}: {name}{part} must be an integer tensor, got {_describe(t)}")
    if kv_start.shape != kv_end.shape:
        raise ValueError(f"{op}: {name}kv_start and {name}kv_end must have the same shape, got {tuple(kv_start.shape)} "
                         f"and {tuple(kv_end.shape)}")


def _finish(start, end):
    """int32, empty rows normalised to (0, 0) so every empty row looks the same to the kernel."""
    empty = start >= end
    start = torch.where(empty, torch.zeros_like(start), start)
    end = torch.where(empty, torch.zeros_like(end), end)
    return Intervals(start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous())


def causal(seqlen_q, seqlen_k=None, *, device=None):
    """Causal mask as intervals, bottom-right aligned (flash-attn >= 2.1, SDPA's ``causal_lower_right``).

    Row i sees keys ``0 <= j <= i + (seqlen_k - seqlen_q)``: the last query row lines up with the last
    key. With seqlen_q > seqlen_k the first ``seqlen_q - seqlen_k`` rows see nothing::

        Lq=2, Lk=5         Lq=5, Lk=2
        1 1 1 1 0          0 0
        1 1 1 1 1          0 0
                           0 0
                           1 0
                           1 1

    Returns (kv_start, kv_end), each int32 of shape (seqlen_q,).
    """
    op = "masks.causal"
    check_int(op, "seqlen_q", seqlen_q, lo=0)
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    check_int(op, "seqlen_k", seqlen_k, lo=0)
    device = _check_device(op, device)
    i = torch.arange(seqlen_q, device=device, dtype=torch.int64)
    end = (i + (seqlen_k - seqlen_q + 1)).clamp(0, seqlen_k)
    return _finish(torch.zeros_like(end), end)


def prefix_lm(n_prefix, seqlen, *, device=None):
    """Prefix-LM mask: the first `n_prefix` tokens see each other (bidirectional), later tokens see the
    whole prefix and causally the tokens up to themselves (row i sees ``j < max(n_prefix, i + 1)``).

    `n_prefix` is an int (one prefix length for the batch) → intervals of shape (seqlen,), or an integer
    tensor of shape (B,) (per-sample prefix lengths, e.g. different numbers of image tokens) → (B, seqlen).
    """
    op = "masks.prefix_lm"
    check_int(op, "seqlen", seqlen, lo=0)
    device = _check_device(op, device)
    if isinstance(n_prefix, torch.Tensor):
        if n_prefix.dim() != 1 or not _is_int_tensor(n_prefix):
            raise ValueError(f"{op}: n_prefix must be an int or an integer tensor of shape (B,), got {_describe(n_prefix)}")
        if device is None:
            device = n_prefix.device
        n = n_prefix.to(device=device, dtype=torch.int64)
        if n.numel() and (n.min() < 0 or n.max() > seqlen):
            raise ValueError(f"{op}: n_prefix must lie in [0, seqlen={seqlen}], got values in "
                             f"[{n.min().item()}, {n.max().item()}]")
        n = n[:, None]
    else:
        check_int(op, "n_prefix", n_prefix, lo=0, hi=seqlen)
        n = torch.tensor(n_prefix, device=device)
    end = torch.maximum(torch.arange(seqlen, device=device, dtype=torch.int64) + 1, n)
    return _finish(torch.zeros_like(end), end)


def qformer_masks(n_query, text_len, *, device=None):
    """BLIP-2 Q-Former self-attention masks over the sequence ``[n_query learned queries; text_len text
    tokens]`` (queries first, as in LAVIS ``Blip2Qformer``), shape (n_query + text_len,) each:

    - ``itc`` (image-text contrastive, unimodal): queries see only queries, text sees only text
      (both bidirectional). LAVIS runs the two as separate forward passes; this is the same attention
      on the concatenated sequence.
    - ``itm`` (image-text matching, bi-directional): every token sees every token.
    - ``itg`` (image-grounded text generation, multimodal causal; LAVIS's "UniLM style" decoder mask):
      queries see only queries, text token t sees all queries and text tokens ``<= t``.

    For Q = 2, T = 3 (rows: q0 q1 t0 t1 t2)::

        ITC          ITM          ITG
        1 1 0 0 0    1 1 1 1 1    1 1 0 0 0
        1 1 0 0 0    1 1 1 1 1    1 1 0 0 0
        0 0 1 1 1    1 1 1 1 1    1 1 1 0 0
        0 0 1 1 1    1 1 1 1 1    1 1 1 1 0
        0 0 1 1 1    1 1 1 1 1    1 1 1 1 1

    Padded text tokens are masked separately, through ``key_padding_mask``.
    """
    op = "masks.qformer_masks"
    check_int(op, "n_query", n_query, lo=0)
    check_int(op, "text_len", text_len, lo=0)
    device = _check_device(op, device)
    n = n_query + text_len
    i = torch.arange(n, device=device, dtype=torch.int64)
    is_query = i < n_query
    zeros = torch.zeros_like(i)
    itc = _finish(torch.where(is_query, zeros, zeros + n_query), torch.where(is_query, zeros + n_query, zeros + n))
    itm = _finish(zeros, zeros + n)
    itg = _finish(zeros, torch.where(is_query, zeros + n_query, i + 1))
    return QFormerMasks(itc, itm, itg)


def media_intervals(token_ids, image_token_id, tokens_per_image, mode="most_recent"):
    """Text → image cross-attention intervals for interleaved image-text sequences (Flamingo, Llama 3.2
    Vision).

    `token_ids` (B, L) or (L,) integer tensor holds one `image_token_id` placeholder per image (``<image>``
    in Flamingo, ``<|image|>`` in Llama 3.2). The keys are the visual tokens of the sample's images laid
    end to end: image n occupies keys ``[n * tokens_per_image, (n + 1) * tokens_per_image)`` (64 resampler
    outputs per image in Flamingo; ``max_tiles * 1601`` per image in Llama 3.2, with unused tiles masked
    through ``key_padding_mask``). Image numbering follows the order of the placeholders, and a
    placeholder counts as preceding itself, so the ``<image>`` token sees its own image. `mode`:

    - ``"most_recent"`` (Flamingo, open_flamingo's ``only_attend_immediate_media``): a token sees only
      the visual tokens of the last image at or before it.
    - ``"most_recent_group"`` (Llama 3.2 Vision, Hugging Face ``get_cross_attention_token_mask``):
      placeholders at consecutive positions form one group; a token sees every image of the last group
      whose placeholder is at or before it. Same as ``"most_recent"`` when no two placeholders touch.
    - ``"all_previous"`` (open_flamingo with ``only_attend_immediate_media=False``): every image at or
      before the token.

    Tokens before the first image see nothing: an empty interval, so their cross-attention output is
    exactly 0 (Flamingo / Llama 3.2 zero those rows too). Example, I = image token, tokens_per_image=2::

        tokens:  a I b c I d      most_recent        all_previous
                               a  -                  -
                               I  [0, 2)             [0, 2)
                               b  [0, 2)             [0, 2)
                               c  [0, 2)             [0, 2)
                               I  [2, 4)             [0, 4)
                               d  [2, 4)             [0, 4)

    Returns intervals of the same shape as `token_ids`, against keys of length at least
    ``max_images * tokens_per_image``.
    """
    op = "masks.media_intervals"
    if not _is_int_tensor(token_ids) or token_ids.dim() not in (1, 2):
        raise ValueError(f"{op}: token_ids must be an integer tensor of shape (B, L) or (L,), got {_describe(token_ids)}")
    check_int(op, "image_token_id", image_token_id)
    check_int(op, "tokens_per_image", tokens_per_image, lo=1)
    check_choice(op, "mode", mode, MEDIA_MODES)
    is_image = (token_ids == image_token_id).to(torch.int64)
    count = is_image.cumsum(-1)  # images at or before each token
    if mode == "most_recent":
        first = (count - 1).clamp(min=0)
    elif mode == "all_previous":
        first = torch.zeros_like(count)
    else:
        prev = torch.nn.functional.pad(is_image, (1, 0))[..., :-1]
        group_start = (is_image == 1) & (prev == 0)
        # the counts grow along the row, so a running max picks the latest group's first image
        first = torch.where(group_start, count - 1, torch.zeros_like(count)).cummax(-1).values
    return _finish(first * tokens_per_image, count * tokens_per_image)


def document_intervals(doc_ids=None, *, cu_seqlens=None, causal=False):
    """Self-attention intervals for packed sequences: a token sees only the tokens of its own document
    (and with ``causal=True`` only those up to itself).

    Give either `doc_ids`, a (B, L) or (L,) integer tensor where each maximal run of equal ids is one
    document (→ intervals of the same shape), or `cu_seqlens`, the (N + 1,) cumulative document lengths
    ``[0, l0, l0 + l1, ...]`` of a packed (total,) sequence (→ intervals of shape (total,)). For varlen
    batches with separate query and key packing use `flash_attention`'s cu_seqlens_q / cu_seqlens_k.
    """
    op = "masks.document_intervals"
    if (doc_ids is None) == (cu_seqlens is None):
        raise ValueError(f"{op}: give exactly one of doc_ids and cu_seqlens")
    check_bool(op, "causal", causal)
    if cu_seqlens is not None:
        if not _is_int_tensor(cu_seqlens) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"{op}: cu_seqlens must be a 1-D integer tensor [0, l0, l0 + l1, ...], got "
                             f"{_describe(cu_seqlens)}")
        cu = cu_seqlens.to(torch.int64)
        if cu[0].item() != 0 or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{op}: cu_seqlens must start at 0 and be non-decreasing, got {cu_seqlens.tolist()}")
        total = int(cu[-1].item())
        i = torch.arange(total, device=cu.device, dtype=torch.int64)
        doc = torch.searchsorted(cu, i, right=True) - 1
        start, end = cu[doc], cu[doc + 1]
    else:
        if not _is_int_tensor(doc_ids) or doc_ids.dim() not in (1, 2):
            raise ValueError(f"{op}: doc_ids must be an integer tensor of shape (B, L) or (L,), got {_describe(doc_ids)}")
        length = doc_ids.shape[-1]
        i = torch.arange(length, device=doc_ids.device, dtype=torch.int64).expand(doc_ids.shape)
        if length == 0:
            return _finish(i, i)
        changes = doc_ids[..., 1:] != doc_ids[..., :-1]
        true = torch.ones(doc_ids.shape[:-1] + (1,), dtype=torch.bool, device=doc_ids.device)
        is_first = torch.cat([true, changes], -1)
        is_last = torch.cat([changes, true], -1)
        start = torch.where(is_first, i, torch.zeros_like(i)).cummax(-1).values
        # a running max from the right: the end of the run, as -min(-...)
        after = torch.where(is_last, i + 1, torch.full_like(i, length + 1))
        end = -((-after).flip(-1).cummax(-1).values.flip(-1))
    if causal:
        end = torch.minimum(end, i + 1)
    return _finish(start, end)


def intersect(*masks):
    """The intersection of interval masks (broadcast to a common shape): row i sees a key only if every
    mask lets it, e.g. ``intersect(document_intervals(ids), causal(L))``."""
    op = "masks.intersect"
    if not masks:
        raise ValueError(f"{op}: needs at least one (kv_start, kv_end) pair")
    for i, mask in enumerate(masks):
        if not isinstance(mask, (tuple, list)) or len(mask) != 2:
            raise ValueError(f"{op}: masks[{i}] must be a (kv_start, kv_end) pair, got {type(mask).__name__}")
        _check_intervals(op, f"masks[{i}].", *mask)
    try:
        torch.broadcast_shapes(*(mask[0].shape for mask in masks))
    except RuntimeError as exc:
        raise ValueError(f"{op}: the masks' shapes do not broadcast: {[tuple(m[0].shape) for m in masks]}") from exc
    start, end = masks[0]
    for s, e in masks[1:]:
        start, end = torch.maximum(start, s), torch.minimum(end, e)
    return _finish(start.to(torch.int64), end.to(torch.int64))


def dense_mask(kv_start, kv_end, seqlen_k):
    """Dense boolean mask (..., Lq, seqlen_k) of an interval mask: True where query i sees key j."""
    op = "masks.dense_mask"
    _check_intervals(op, "", kv_start, kv_end)
    check_int(op, "seqlen_k", seqlen_k, lo=0)
    j = torch.arange(seqlen_k, device=kv_start.device)
    return (j >= kv_start[..., None]) & (j < kv_end[..., None])


def intervals_from_dense(mask):
    """Interval form of a dense boolean mask (..., Lq, Lk) whose rows each hold one contiguous run of
    True (or none); raises ValueError naming the first row that does not."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 2:
        raise ValueError(f"masks.intervals_from_dense: mask must be a boolean tensor of shape (..., Lq, Lk), got "
                         f"{_describe(mask)}")
    m = mask.to(torch.int64)
    count = m.sum(-1)
    start = torch.where(count > 0, m.argmax(-1), torch.zeros_like(count))
    end = start + count
    if not torch.equal(dense_mask(start, end, mask.shape[-1]), mask):
        bad = (dense_mask(start, end, mask.shape[-1]) != mask).any(-1).nonzero()[0].tolist()
        raise ValueError(f"masks.intervals_from_dense: mask row {tuple(bad)} is not one contiguous range of visible keys; "
                         "interval masks need one range per query row")
    return _finish(start, end)
