"""Block-sparse metadata for flash_attention: which KV blocks each query block must visit, and back.

Every mask flash_attention takes (intervals, causal, key padding, varlen sequence bounds) is first
reduced to one visible key range per query row, ``row_lo[i] <= j < row_hi[i]`` (causal and the sequence
length are folded into ``row_hi``), plus an optional per-key padding mask. From those, for a grid of
MASK_M x MASK_N tiles of the (query, key) plane, each tile is

* hidden: no row of the query block sees any key of the KV block — never visited, never read;
* full: every (valid) row sees every key of the complete KV block — visited without any mask work;
* partial: anything else — visited with the per-element mask (row ranges, padding, sequence end).

The forward and the dQ kernel walk, per (batch, query block), the lists of full and partial KV blocks;
the dK/dV kernel walks the transposed lists, per (batch, KV block), of query blocks. Kernel tiles may be
smaller than the mask tiles (they divide them), so one block mask serves every head dim and launch
config: build it once with `build_block_mask` and pass it to every layer that uses the same mask.
"""
import torch

from .._common import check_bool, check_int

# Mask tile (query rows x keys). Kernel tiles divide these; see _configs.py.
MASK_TILE_GPU = (128, 128)
MASK_TILE_INTERPRETER = (32, 32)


def default_mask_tile(device):
    """The mask tile the kernels use on `device`: CUDA, or CPU (Triton's interpreter; small tiles)."""
    return MASK_TILE_GPU if torch.device(device).type == "cuda" else MASK_TILE_INTERPRETER


def _cdiv(a, b):
    return (a + b - 1) // b


class AttentionBlockMask:
    """Precomputed visibility of a flash_attention mask: row ranges and per-block visit lists.

    Build with :func:`build_block_mask`; pass as ``flash_attention(..., block_mask=bm)`` to any number
    of calls and layers whose inputs have the same batch, sequence lengths and mask. Attributes (all
    int32 on the mask's device unless noted):

    - ``row_lo``, ``row_hi``: (B', Lq) — or (total_q,) for varlen — the visible key range of each row;
    - ``key_padding_mask``: (B, Lk) bool, True marks a padded key, or None;
    - ``kv_full_num`` / ``kv_part_num`` (B', M) and ``kv_full_idx`` / ``kv_part_idx`` (B', M, N): per query
      block, how many and which KV blocks are full / partial (ascending, padded with unused entries);
    - ``q_full_num`` / ``q_part_num`` (B', N) and ``q_full_idx`` / ``q_part_idx`` (B', N, M): the same per
      KV block, for the dK/dV backward.

    B' is 1 when nothing in the mask depends on the batch. M, N count mask tiles of ``tile = (MASK_M,
    MASK_N)`` rows x keys.
    """

    def __init__(self, **fields):
        for name, value in fields.items():  # (not __dict__.update: torch.compile traces setattr, not that)
            setattr(self, name, value)

    @property
    def varlen(self):
        return self.cu_seqlens_q is not None

    def visited_blocks(self):
        """(full, partial, total) mask-tile counts summed over the mask's batch B' (total = M·N·B')."""
        full = int(self.kv_full_num.sum())
        part = int(self.kv_part_num.sum())
        return full, part, self.kv_full_idx.numel()

    def visible_pairs(self, batch=None):
        """Number of visible (query, key) pairs, summed over the batch — the work that counts for TFLOP/s
        (forward FLOPs = 4 · pairs · heads · head_dim). `batch` expands a mask built without a batch dim."""
        lo, hi = self.row_lo.long(), self.row_hi.long()
        if self.key_padding_mask is None:
            pairs = int((hi - lo).clamp(min=0).sum())
        else:  # keys in [lo, hi) that are not padded, from a prefix count of the kept keys
            kept = torch.nn.functional.pad((~self.key_padding_mask).long().cumsum(-1), (1, 0))
            lo, hi = lo.expand(kept.shape[0], -1), hi.expand(kept.shape[0], -1)
            pairs = int((kept.gather(1, hi) - kept.gather(1, torch.minimum(lo, hi))).sum())
        if batch is not None and not self.varlen and self.kv_full_num.shape[0] == 1:
            pairs *= batch
        return pairs

    def dense(self):
        """The dense boolean mask (B', Lq, Lk) this block mask encodes (not for varlen): for tests."""
        j = torch.arange(self.seqlen_k, device=self.row_lo.device)
        mask = (j >= self.row_lo[..., None].long()) & (j < self.row_hi[..., None].long())
        if self.key_padding_mask is not None:
            mask = mask & ~self.key_padding_mask[:, None, :]
        return mask

    def __repr__(self):
        full, part, total = self.visited_blocks()
        kind = "varlen" if self.varlen else f"Lq={self.seqlen_q} Lk={self.seqlen_k}"
        return (f"AttentionBlockMask({kind}, causal={self.causal}, tile={self.tile}, "
                f"batch={self.kv_full_num.shape[0]}, full={full}, partial={part}, hidden={total - full - part})")


def _visit_lists(flag):
    """(..., K) bool -> count (..., ) int32 and indices (..., K) int32, the flagged ones first, ascending."""
    num = flag.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~flag).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def _row_ranges(seqlen_q, seqlen_k, causal, kv_start, kv_end, device):
    """Visible key range [lo, hi) per row for one sequence-length pair (tensors or ints broadcast)."""
    rows = torch.arange(seqlen_q, device=device, dtype=torch.int64)
    lo = torch.zeros_like(rows) if kv_start is None else kv_start.to(torch.int64).clamp(min=0)
    hi = torch.full_like(rows, 0) + seqlen_k if kv_end is None else kv_end.to(torch.int64).clamp(max=seqlen_k)
    if causal:
        hi = torch.minimum(hi, rows + (seqlen_k - seqlen_q + 1))
    hi = torch.maximum(hi, lo)  # empty rows as lo == hi
    return lo, hi


def _tile_flags(lo, hi, valid, seqlen_k, key_padding_mask, mask_m, mask_n, n_blocks):
    """lo/hi/valid (B', M·MASK_M); seqlen_k (B', 1) or int -> visible, full flags (B', M, N)."""
    batch, m_blocks = lo.shape[0], lo.shape[1] // mask_m
    lo = lo.reshape(batch, m_blocks, mask_m, 1)
    hi = hi.reshape(batch, m_blocks, mask_m, 1)
    valid = valid.reshape(batch, m_blocks, mask_m, 1)
    n_start = torch.arange(n_blocks, device=lo.device, dtype=torch.int64).view(1, 1, 1, -1) * mask_n
    n_end = n_start + mask_n
    visible = ((lo < hi) & (lo < n_end) & (hi > n_start)).any(dim=2)
    if not isinstance(seqlen_k, int):
        seqlen_k = seqlen_k.view(batch, 1, 1)
    complete = n_end.view(1, 1, -1) <= seqlen_k
    covers = (lo <= n_start) & (hi >= n_end)  # the row's range holds the whole tile
    full = (covers | ~valid).all(dim=2) & complete & visible
    if key_padding_mask is not None:
        pad = torch.ones(key_padding_mask.shape[0], n_blocks * mask_n, dtype=torch.bool, device=lo.device)
        pad[:, : key_padding_mask.shape[1]] = key_padding_mask
        pad = pad.view(-1, n_blocks, mask_n)
        # visible: some row sees a kept key of the tile. A row whose range covers the tile sees one where the
        # tile has any; a row covering it partly (the tile holds one of its range's ends) may see only padded
        # keys there although the tile has kept ones elsewhere: counted exactly (_edge_tiles_seen)
        covering = covers.any(dim=2) & ~pad.all(-1)[:, None, :]
        visible = covering | _edge_tiles_seen(lo, hi, key_padding_mask, mask_n, n_blocks)
        full = full & ~pad.any(-1)[:, None, :]
    return visible, full


def _edge_tiles_seen(lo, hi, key_padding_mask, mask_n, n_blocks):
    """(B, M, N) flags: some row of the block sees a kept key in the tile holding its range's first or last key.
    lo / hi: (B, M, MASK_M, 1) key ranges (empty as lo == hi, at most seqlen_k); kept keys counted by prefix
    sums, so the work is O(rows), not O(rows x tiles)."""
    batch, m_blocks = lo.shape[0], lo.shape[1]
    kept = torch.nn.functional.pad((~key_padding_mask).to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
    lo, hi = lo.reshape(batch, -1), hi.reshape(batch, -1)
    nonempty = lo < hi
    first = torch.div(lo, mask_n, rounding_mode="floor").clamp(max=n_blocks - 1)
    last = torch.div((hi - 1).clamp(min=0), mask_n, rounding_mode="floor").clamp(max=n_blocks - 1)
    count = lambda a, b: kept.gather(1, b) - kept.gather(1, a)  # noqa: E731  kept keys in [a, b)
    seen_first = nonempty & (count(lo, torch.minimum(hi, (first + 1) * mask_n)) > 0)
    seen_last = nonempty & (count(torch.maximum(lo, last * mask_n), hi) > 0)
    flags = torch.zeros(batch * m_blocks, n_blocks, dtype=torch.int32, device=lo.device)
    for tile, seen in ((first, seen_first), (last, seen_last)):
        flags.scatter_add_(1, tile.reshape(batch * m_blocks, -1), seen.to(torch.int32).reshape(batch * m_blocks, -1))
    return (flags > 0).view(batch, m_blocks, n_blocks)


def _check_int_tensor(op, name, t, shapes, device):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be an int32 tensor, got {got}")
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{op}: {name} must have shape {' or '.join(str(s) for s in shapes)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like q, got {t.device}")


def check_mask_args(op, seqlen_q, seqlen_k, batch, device, causal, kv_start, kv_end, key_padding_mask, cu_seqlens_q,
                    cu_seqlens_k, max_seqlen_q, max_seqlen_k, validate=True, total_q=None, total_k=None):
    """The mask arguments of flash_attention / build_block_mask: types and shapes always; values (index
    ranges, cu_seqlens; one device sync) when `validate` and not tracing. Returns the batch (None: unknown)."""
    check_bool(op, "causal", causal)
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError(f"{op}: varlen needs both cu_seqlens_q and cu_seqlens_k")
        if max_seqlen_q is None or max_seqlen_k is None:
            raise ValueError(f"{op}: varlen needs max_seqlen_q and max_seqlen_k (ints) with cu_seqlens")
        check_int(op, "max_seqlen_q", max_seqlen_q, lo=0)
        check_int(op, "max_seqlen_k", max_seqlen_k, lo=0)
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
    elif max_seqlen_q is not None or max_seqlen_k is not None:
        raise ValueError(f"{op}: max_seqlen_q / max_seqlen_k go with cu_seqlens_q / cu_seqlens_k (packed inputs)")
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
    if not validate or torch.compiler.is_compiling():
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


def build_block_mask(seqlen_q=None, seqlen_k=None, *, causal=False, kv_start=None, kv_end=None, key_padding_mask=None,
                     cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, device=None,
                     tile=None, validate=True):
    """Precompute flash_attention's block-sparse metadata for one mask; reuse it across calls and layers.

    Takes the mask arguments of :func:`flash_attention` (same meaning and shapes) plus the sequence
    lengths: ``seqlen_q`` / ``seqlen_k`` for (B, L, H, D) inputs, or ``cu_seqlens_q`` / ``cu_seqlens_k``
    with ``max_seqlen_q`` / ``max_seqlen_k`` for packed ones. `device` defaults to the device of the mask
    tensors (the metadata must live on the attention inputs' device). `tile` overrides the mask tile
    (rows, keys) — only for tests; the default matches every launch config. With `validate`, index
    ranges and cu_seqlens are checked (one device sync); flash_attention then skips those checks.

    Example::

        bm = build_block_mask(577, 577, kv_start=s, kv_end=e, device="cuda")
        for layer in layers:
            x = layer(x, block_mask=bm)   # -> flash_attention(q, k, v, block_mask=bm)
    """
    op = "build_block_mask"
    check_bool(op, "validate", validate)
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if seqlen_q is not None or seqlen_k is not None:
            raise ValueError(f"{op}: give seqlen_q / seqlen_k for (B, L, H, D) inputs or cu_seqlens_q / cu_seqlens_k "
                             f"with max_seqlen_q / max_seqlen_k for packed ones, not both")
    elif seqlen_q is None or seqlen_k is None:
        raise ValueError(f"{op}: give seqlen_q and seqlen_k, or cu_seqlens_q / cu_seqlens_k with max_seqlen_q / max_seqlen_k")
    else:
        check_int(op, "seqlen_q", seqlen_q, lo=0)
        check_int(op, "seqlen_k", seqlen_k, lo=0)
    if tile is not None and not (isinstance(tile, (tuple, list)) and len(tile) == 2):
        raise ValueError(f"{op}: tile must be a pair (query rows, keys) of positive ints, got {tile!r}")
    if tile is not None:
        check_int(op, "tile[0]", tile[0], lo=1)
        check_int(op, "tile[1]", tile[1], lo=1)
    if device is None:
        for t in (kv_start, kv_end, key_padding_mask, cu_seqlens_q, cu_seqlens_k):
            if isinstance(t, torch.Tensor):
                device = t.device
                break
        else:
            device = torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{op}: device must be a torch.device or a device string, got {device!r}") from exc
    if device.type == "cuda" and device.index is None:  # "cuda" means the current device, as tensors report it
        device = torch.device("cuda", torch.cuda.current_device())
    batch = check_mask_args(op, seqlen_q, seqlen_k, None, device, causal, kv_start, kv_end, key_padding_mask,
                            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, validate=validate)
    mask_m, mask_n = tile if tile is not None else default_mask_tile(device)
    if varlen:
        # packed lengths, so flash_attention can check q / k against them without a sync per call
        totals = (int(cu_seqlens_q[-1]), int(cu_seqlens_k[-1])) if validate else None
        bm = _build_varlen(causal, kv_start, kv_end, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             device, mask_m, mask_n)
        bm.totals = totals
        return bm
    m_blocks, n_blocks = _cdiv(seqlen_q, mask_m), _cdiv(seqlen_k, mask_n)
    kv_start = None if kv_start is None else kv_start.to(device)
    kv_end = None if kv_end is None else kv_end.to(device)
    lo, hi = _row_ranges(seqlen_q, seqlen_k, causal, kv_start, kv_end, device)
    rows2d = lambda t: t.reshape(t.shape[0] if t.dim() == 2 else 1, seqlen_q)  # noqa: E731
    lo, hi = torch.broadcast_tensors(rows2d(lo), rows2d(hi))
    row_lo, row_hi = lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
    pad_rows = m_blocks * mask_m - seqlen_q
    valid = torch.ones(1, seqlen_q, dtype=torch.bool, device=device)
    lo_p = torch.nn.functional.pad(lo, (0, pad_rows))
    hi_p = torch.nn.functional.pad(hi, (0, pad_rows))
    valid = torch.nn.functional.pad(valid, (0, pad_rows)).expand(lo_p.shape[0], -1)
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=device, dtype=torch.bool).contiguous()
        if lo_p.shape[0] == 1 and batch > 1:
            lo_p, hi_p, valid = lo_p.expand(batch, -1), hi_p.expand(batch, -1), valid.expand(batch, -1)
    visible, full = _tile_flags(lo_p, hi_p, valid, seqlen_k, kpm, mask_m, mask_n, n_blocks)
    return _finish(visible, full, row_lo=row_lo, row_hi=row_hi, key_padding_mask=kpm, cu_seqlens_q=None,
                   cu_seqlens_k=None, seqlen_q=seqlen_q, seqlen_k=seqlen_k, causal=causal, tile=(mask_m, mask_n),
                   kv_start=kv_start, kv_end=kv_end)


def _build_varlen(causal, kv_start, kv_end, cu_q, cu_k, max_q, max_k, device, mask_m, mask_n):
    cu_q = cu_q.to(device)
    cu_k = cu_k.to(device)
    batch = cu_q.numel() - 1
    total_q = kv_start.shape[0] if kv_start is not None else (kv_end.shape[0] if kv_end is not None else None)
    len_q = (cu_q[1:] - cu_q[:-1]).to(torch.int64)
    len_k = (cu_k[1:] - cu_k[:-1]).to(torch.int64)
    m_blocks, n_blocks = _cdiv(max(max_q, 1), mask_m), _cdiv(max(max_k, 1), mask_n)
    # per packed row: its sequence, position in it, and that sequence's lengths
    seq_of_row = torch.repeat_interleave(torch.arange(batch, device=device), len_q)
    if total_q is None:
        total_q = seq_of_row.numel()
    pos = torch.arange(total_q, device=device, dtype=torch.int64) - cu_q[:-1].to(torch.int64)[seq_of_row]
    lq, lk = len_q[seq_of_row], len_k[seq_of_row]
    lo = torch.zeros_like(pos) if kv_start is None else kv_start.to(device, torch.int64).clamp(min=0)
    hi = lk.clone() if kv_end is None else torch.minimum(kv_end.to(device, torch.int64), lk)
    if causal:
        hi = torch.minimum(hi, pos + lk - lq + 1)
    hi = torch.maximum(hi, lo)
    row_lo, row_hi = lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
    # padded (B, M·MASK_M) view for the tile flags; rows past a sequence's end are invalid and hidden
    r = torch.arange(m_blocks * mask_m, device=device, dtype=torch.int64)
    valid = r[None, :] < len_q[:, None]
    src = (cu_q[:-1].to(torch.int64)[:, None] + r[None, :]).clamp(max=max(total_q - 1, 0))
    lo_p = torch.where(valid, lo[src] if total_q else torch.zeros_like(src), 0)
    hi_p = torch.where(valid, hi[src] if total_q else torch.zeros_like(src), 0)
    visible, full = _tile_flags(lo_p, hi_p, valid, len_k[:, None], None, mask_m, mask_n, n_blocks)
    return _finish(visible, full, row_lo=row_lo, row_hi=row_hi, key_padding_mask=None, cu_seqlens_q=cu_q.contiguous(),
                   cu_seqlens_k=cu_k.contiguous(), seqlen_q=max_q, seqlen_k=max_k, causal=causal,
                   tile=(mask_m, mask_n), kv_start=kv_start, kv_end=kv_end)


def _finish(visible, full, **fields):
    partial = visible & ~full
    kv_full_num, kv_full_idx = _visit_lists(full)
    kv_part_num, kv_part_idx = _visit_lists(partial)
    q_full_num, q_full_idx = _visit_lists(full.transpose(1, 2))
    q_part_num, q_part_idx = _visit_lists(partial.transpose(1, 2))
    return AttentionBlockMask(
        kv_full_num=kv_full_num, kv_full_idx=kv_full_idx, kv_part_num=kv_part_num, kv_part_idx=kv_part_idx,
        q_full_num=q_full_num, q_full_idx=q_full_idx, q_part_num=q_part_num, q_part_idx=q_part_idx, **fields,
    )
