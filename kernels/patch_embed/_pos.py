"""Position tables of the fused patch embedding: resolving a 1D / 2D table for an image grid and
resampling it (timm / Hugging Face math), cached per grid."""
import math
from collections import OrderedDict

import torch

from ..reference import resample_pos_embed_reference

_POS_CACHE = OrderedDict()
_POS_CACHE_MAX = 16


def resample_pos_embed(table, new_grid, old_grid, *, interpolation="bicubic", mode="timm"):
    """Patch position rows (N_old, D) on old_grid -> (N_new, D) on new_grid (timm or Hugging Face math,
    see kernels.reference.resample_pos_embed_reference). Cached per (table version, grids, mode) when
    no gradient is recorded; with a table that requires grad it is recomputed, so d_pos_embed flows
    through F.interpolate's backward."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    if torch.is_grad_enabled() and table.requires_grad:
        return resample_pos_embed_reference(table, new_grid, old_grid, interpolation=interpolation, mode=mode)
    key = (table.data_ptr(), table._version, tuple(table.shape), table.stride(), table.dtype, table.device,
           tuple(old_grid), tuple(new_grid), interpolation, mode,
           # an entry made under inference_mode is an inference tensor, which autograd may not save
           # (a frozen table, then training after an inference_mode eval): one entry per mode
           torch.is_inference_mode_enabled())
    hit = _POS_CACHE.get(key)
    if hit is not None:
        _POS_CACHE.move_to_end(key)
        return hit[1]
    with torch.no_grad():
        out = resample_pos_embed_reference(table, new_grid, old_grid, interpolation=interpolation, mode=mode)
    # the entry holds the source table too: while it lives, no other table can be allocated at its
    # address (a freed table's block is reused at once, e.g. by the next checkpoint of an eval sweep, and
    # would hit this entry with the old table's values)
    _POS_CACHE[key] = (table, out)
    if len(_POS_CACHE) > _POS_CACHE_MAX:
        _POS_CACHE.popitem(last=False)
    return out


def _square(n):
    s = math.isqrt(n) if n >= 0 else -1
    return (s, s) if s > 0 and s * s == n else None


def _resolve_pos(pos_embed, grid, D, has_cls, pos_grid, interpolation, mode):
    """-> (patch rows (gh*gw, D) on `grid`, [CLS] position row (D,) or None)."""
    if pos_embed is None:
        return None, None
    if isinstance(pos_embed, (tuple, list)):
        if len(pos_embed) != 2:
            raise ValueError("pos_embed as a sequence must be (row_table (gh0, D/2), col_table (gw0, D/2))")
        rows, cols = (t.reshape(t.shape[-2], t.shape[-1]) if t.dim() == 3 and t.shape[0] == 1 else t for t in pos_embed)
        if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] + cols.shape[1] != D:
            raise ValueError(f"2D pos_embed must be (gh0, D1) and (gw0, D2) tables with D1 + D2 = D = {D}, got "
                             f"{tuple(rows.shape)} and {tuple(cols.shape)}")
        rows = resample_pos_embed(rows, (grid[0], 1), (rows.shape[0], 1), interpolation=interpolation, mode=mode)
        cols = resample_pos_embed(cols, (1, grid[1]), (1, cols.shape[0]), interpolation=interpolation, mode=mode)
        gh, gw = grid
        table = torch.cat([rows[:, None, :].expand(gh, gw, rows.shape[1]), cols[None, :, :].expand(gh, gw, cols.shape[1])],
                          dim=-1)
        return table.reshape(gh * gw, D), None
    if not isinstance(pos_embed, torch.Tensor):
        raise ValueError(f"pos_embed must be a tensor or a (row, col) pair of tensors, got {type(pos_embed).__name__}")
    table = pos_embed[0] if pos_embed.dim() == 3 and pos_embed.shape[0] == 1 else pos_embed
    if table.dim() != 2 or table.shape[1] != D:
        raise ValueError(f"pos_embed must be (L, D) or (1, L, D) with D = {D}, got {tuple(pos_embed.shape)}")
    L, N = table.shape[0], grid[0] * grid[1]
    if pos_grid is not None:
        old = tuple(int(x) for x in pos_grid)
        if L not in (old[0] * old[1], old[0] * old[1] + 1):
            raise ValueError(f"pos_embed has {L} rows but pos_grid={old} needs {old[0] * old[1]} (or one more with a "
                             "[CLS] position row first)")
        has_cls_row = L == old[0] * old[1] + 1
    elif L in (N, N + 1):
        old, has_cls_row = tuple(grid), L == N + 1
    elif _square(L):
        old, has_cls_row = _square(L), False
    elif _square(L - 1):
        old, has_cls_row = _square(L - 1), True
    else:
        raise ValueError(f"pos_embed has {L} rows: not the grid {tuple(grid)} (N = {N}, or N + 1 with a [CLS] row) nor "
                         "a square grid; pass pos_grid=(gh, gw) of the table")
    if has_cls_row and not has_cls:
        raise ValueError(f"pos_embed has a [CLS] position row ({L} = {old[0]}x{old[1]} + 1 rows) but cls_token is None")
    patch_rows = table[1:] if has_cls_row else table
    patch_rows = resample_pos_embed(patch_rows, grid, old, interpolation=interpolation, mode=mode)
    return patch_rows, (table[0] if has_cls_row else None)
