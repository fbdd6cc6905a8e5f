"""Position tables of the fused patch embedding: resolving a 1D / 2D table for an image grid and
resampling it (timm / Hugging Face math), cached per grid."""
import math
from collections import OrderedDict

import torch

from .._common import check_choice, check_int
from ..reference import resample_pos_embed_reference

INTERPOLATIONS = ("bicubic", "bilinear")
POS_RESAMPLE_MODES = ("timm", "hf", "hf_legacy")

_POS_CACHE = OrderedDict()
_POS_CACHE_MAX = 16


def resample_pos_embed(table, new_grid, old_grid, *, interpolation="bicubic", mode="timm"):
    """Patch position rows (N_old, D) on old_grid -> (N_new, D) on new_grid (timm or Hugging Face math,
    see kernels.reference.resample_pos_embed_reference). Cached per (table version, grids, mode) when
    no gradient is recorded; with a table that requires grad it is recomputed, so d_pos_embed flows
    through F.interpolate's backward. A table made under inference_mode (no version counter to key on)
    is recomputed too."""
    op = "resample_pos_embed"
    old_grid, new_grid = _grid_pair(op, "old_grid", old_grid), _grid_pair(op, "new_grid", new_grid)
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or not table.is_floating_point():
        got = (table.dtype, tuple(table.shape)) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"{op}: table must be a floating (N_old, D) tensor, got {got}")
    if table.shape[0] != old_grid[0] * old_grid[1]:
        raise ValueError(f"{op}: table has {table.shape[0]} rows but old_grid={old_grid} has "
                         f"{old_grid[0] * old_grid[1]}")
    check_choice(op, "interpolation", interpolation, INTERPOLATIONS)
    check_choice(op, "mode", mode, POS_RESAMPLE_MODES)
    if old_grid == new_grid:
        return table
    if (torch.is_grad_enabled() and table.requires_grad) or table.is_inference():
        # an inference tensor has no version counter: an in-place change could not be told from the cache
        return resample_pos_embed_reference(table, new_grid, old_grid, interpolation=interpolation, mode=mode)
    key = (table.data_ptr(), table._version, tuple(table.shape), table.stride(), table.dtype, table.device,
           old_grid, new_grid, interpolation, mode,
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


def _grid_pair(op, name, value):
    """A grid (gh, gw): a pair of positive ints."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{op}: {name} must be a pair (gh, gw) of positive ints, got {value!r}")
    for i, v in enumerate(value):
        check_int(op, f"{name}[{i}]", v, lo=1)
    return tuple(value)


def _table_grid(L, grid, pos_grid):
    """(grid of the table's patch rows, whether a [CLS] position row comes first) for a table of L rows.

    With pos_grid the table's grid is known. Without it the grid must follow from the size: a square
    grid (L = s*s, or s*s + 1 with a [CLS] row), as timm and Hugging Face assume. A table with the
    image's N or N + 1 rows on a non-square image grid is not used as-is: its grid may differ (a 4x4
    table on a 2x8 grid, which timm resamples), so it needs pos_grid.
    """
    N = grid[0] * grid[1]
    if pos_grid is not None:
        old = _grid_pair("patch_embed", "pos_grid", pos_grid)
        if L not in (old[0] * old[1], old[0] * old[1] + 1):
            raise ValueError(f"patch_embed: pos_embed has {L} rows but pos_grid={old} needs {old[0] * old[1]} (or one "
                             "more with a [CLS] position row first)")
        return old, L == old[0] * old[1] + 1
    square, square_cls = _square(L), _square(L - 1)
    if grid[0] != grid[1] and L in (N, N + 1):
        alt = f"a {square[0]}x{square[1]} grid, " if square else f"a {square_cls[0]}x{square_cls[1]} grid + [CLS], " \
            if square_cls else ""
        raise ValueError(f"patch_embed: pos_embed has {L} rows, as many as the {grid[0]}x{grid[1]} image grid's "
                         f"{'N' if L == N else 'N + 1'} tokens, but its own grid cannot be told from its size ({alt}"
                         f"or any other with {L if L == N else L - 1} patches); pass pos_grid=(gh, gw) of the table")
    if square:
        return square, False
    if square_cls:
        return square_cls, True
    raise ValueError(f"patch_embed: pos_embed has {L} rows, not a square grid (s*s, or s*s + 1 with a [CLS] row "
                     f"first), so its grid cannot be told from its size; pass pos_grid=(gh, gw) of the table")


def _resolve_pos(pos_embed, grid, D, has_cls, pos_grid, interpolation, mode):
    """-> (patch rows (gh*gw, D) on `grid`, [CLS] position row (D,) or None)."""
    if pos_embed is None:
        if pos_grid is not None:
            _grid_pair("patch_embed", "pos_grid", pos_grid)
        return None, None
    if isinstance(pos_embed, (tuple, list)):
        if len(pos_embed) != 2:
            raise ValueError("patch_embed: pos_embed as a sequence must be (row_table (gh0, D1), col_table (gw0, D2))")
        if pos_grid is not None:
            raise ValueError("patch_embed: pos_grid is for a 1D table; a (row, column) pair has the grid of its sizes")
        rows, cols = (t.reshape(t.shape[-2], t.shape[-1]) if t.dim() == 3 and t.shape[0] == 1 else t for t in pos_embed)
        if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] + cols.shape[1] != D or not rows.shape[0] \
                or not cols.shape[0]:
            raise ValueError(f"patch_embed: 2D pos_embed must be (gh0, D1) and (gw0, D2) tables with D1 + D2 = D = {D}, "
                             f"got {tuple(rows.shape)} and {tuple(cols.shape)}")
        rows = resample_pos_embed(rows, (grid[0], 1), (rows.shape[0], 1), interpolation=interpolation, mode=mode)
        cols = resample_pos_embed(cols, (1, grid[1]), (1, cols.shape[0]), interpolation=interpolation, mode=mode)
        gh, gw = grid
        table = torch.cat([rows[:, None, :].expand(gh, gw, rows.shape[1]), cols[None, :, :].expand(gh, gw, cols.shape[1])],
                          dim=-1)
        return table.reshape(gh * gw, D), None
    table = pos_embed[0] if pos_embed.dim() == 3 and pos_embed.shape[0] == 1 else pos_embed
    if table.dim() != 2 or table.shape[1] != D:
        raise ValueError(f"patch_embed: pos_embed must be (L, D) or (1, L, D) with D = {D}, got "
                         f"{tuple(pos_embed.shape)}")
    L = table.shape[0]
    old, has_cls_row = _table_grid(L, grid, pos_grid)
    if has_cls_row and not has_cls:
        raise ValueError(f"patch_embed: pos_embed has a [CLS] position row ({L} = {old[0]}x{old[1]} + 1 rows) but "
                         "cls_token is None")
    patch_rows = table[1:] if has_cls_row else table
    patch_rows = resample_pos_embed(patch_rows, grid, old, interpolation=interpolation, mode=mode)
    return patch_rows, (table[0] if has_cls_row else None)
