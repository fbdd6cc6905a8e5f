"""The chunked PyTorch path (``backend="chunked"``): the Triton kernels' algorithm with row chunks instead
of tiles, on any device and in any floating dtype (float64 included).

Same interface and statistics as the Triton launchers (``_launch.triton_forward`` / ``triton_backward``).
A chunk of C rows of a against all Nb rows of b is materialised at a time (C = _chunk_rows(): CHUNK_ROWS,
fewer for wide batches or BLIP-2's Q queries per row), so the extra memory is O(C·Q·Nb + Na + Nb) values:
linear in the batch. Column statistics are merged across chunks online (max and sum of exp), the backward
recomputes each chunk. Arithmetic runs in the statistics' dtype (``params.dtype``: fp32, or fp64 for
fp64 features); features of other dtypes are converted chunk by chunk for a and once for b (an O(Nb·D) copy).
"""
import torch

from ._kernels import COL, MODE_SOFTMAX, PARAM, ROW

# Rows of a per chunk: at most CHUNK_ROWS, and at most CHUNK_ELEMENTS logits (16 MiB of fp32 per
# temporary), at least one. Small chunks cost per-op overhead (N = 4096: 3x slower at 64 rows than at
# 1024); the cap keeps N = 16k at 256 rows, ~100 MiB of temporaries in all.
CHUNK_ROWS = 1024
CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(Na, Nb, Q):
    return max(1, min(Na, CHUNK_ROWS, CHUNK_ELEMENTS // max(1, Q * Nb)))


def _raw(a_chunk, b_c):
    """(C, Nb) raw similarities and the arg-max query (None when a is 2-D), in b_c's dtype."""
    a_c = a_chunk.to(b_c.dtype)
    if a_c.dim() == 2:
        return a_c @ b_c.T, None
    sims = torch.einsum("cqd,md->cqm", a_c, b_c)
    raw, arg = sims.max(dim=1)
    return raw, arg


def _diag_mask(i0, c, Nb, diag_off, device):
    rows = torch.arange(i0, i0 + c, device=device) + diag_off
    return rows[:, None] == torch.arange(Nb, device=device)[None, :]


def _softmax(x, x_max, x_log_sum):
    """exp(x − lse) as exp((x − max) − log sum): x − max is exact where the result matters."""
    return torch.exp((x - x_max) - x_log_sum)


def forward(a, b, at, bt, params, *, mode, cols, smooth, diag_off=0):
    """Row statistics [ROW_STATS, Na] (sigmoid: [1, Na]) and column statistics [COL_STATS, Nb] or None."""
    Na, Nb = a.shape[0], b.shape[0]
    Q = a.shape[1] if a.dim() == 3 else 1
    dev, cdt = a.device, params.dtype
    s = params[PARAM["scale"]]
    b_c = b.to(cdt)
    bt_c = bt.to(cdt) if at is not None else None
    n_rows = 1 if mode != MODE_SOFTMAX else len(ROW) if at is not None else ROW["t_max"]  # as the kernels
    rows = torch.empty((n_rows, Na), device=dev, dtype=cdt)
    # running per column: max and sum of exp(L - max); the teacher's, and the sum of exp(T - max)·L
    col_max = torch.full((Nb,), float("-inf"), device=dev, dtype=cdt)
    col_exp = torch.zeros(Nb, device=dev, dtype=cdt)
    col_sum = torch.zeros(Nb, device=dev, dtype=cdt)
    col_tmax = torch.full((Nb,), float("-inf"), device=dev, dtype=cdt)
    col_texp = torch.zeros(Nb, device=dev, dtype=cdt)
    col_w = torch.zeros(Nb, device=dev, dtype=cdt)
    C = _chunk_rows(Na, Nb, Q)
    for i0 in range(0, Na, C):
        c = min(C, Na - i0)
        part = slice(i0, i0 + c)
        logits = s * _raw(a[part], b_c)[0]
        diag = _diag_mask(i0, c, Nb, diag_off, dev)
        if mode != MODE_SOFTMAX:
            x = torch.where(diag, logits + params[PARAM["bias"]], -(logits + params[PARAM["bias"]]))
            rows[0, part] = -torch.nn.functional.logsigmoid(x).sum(1)
            continue
        m = logits.amax(dim=1)
        rows[ROW["max"], part] = m
        rows[ROW["log_sum"], part] = torch.log(torch.exp(logits - m[:, None]).sum(1))
        rows[ROW["sum"], part] = logits.sum(1)
        rows[ROW["diag"], part] = torch.where(diag, logits, 0.0).sum(1)
        if cols:
            new_max = torch.maximum(col_max, logits.amax(dim=0))
            col_exp = col_exp * torch.exp(col_max - new_max) + torch.exp(logits - new_max).sum(0)
            col_max = new_max
            if smooth:
                col_sum += logits.sum(0)
        if at is not None:
            t = s * _raw(at[part], bt_c)[0]
            tm = t.amax(dim=1)
            e = torch.exp(t - tm[:, None])
            e_sum = e.sum(1)
            rows[ROW["t_max"], part] = tm
            rows[ROW["t_log_sum"], part] = torch.log(e_sum)
            rows[ROW["t_mean"], part] = (e * logits).sum(1) / e_sum
            if cols:
                new_max = torch.maximum(col_tmax, t.amax(dim=0))
                rescale = torch.exp(col_tmax - new_max)
                e = torch.exp(t - new_max)
                col_texp = col_texp * rescale + e.sum(0)
                col_w = col_w * rescale + (e * logits).sum(0)
                col_tmax = new_max
    if not (cols and mode == MODE_SOFTMAX):
        return rows, None
    colstats = torch.empty((len(COL) if at is not None else COL["t_max"], Nb), device=dev, dtype=cdt)
    colstats[COL["max"]] = col_max
    colstats[COL["log_sum"]] = torch.log(col_exp)
    colstats[COL["sum"]] = col_sum
    if at is not None:
        colstats[COL["t_max"]] = col_tmax
        colstats[COL["t_log_sum"]] = torch.log(col_texp)
        colstats[COL["t_mean"]] = col_w / col_texp
    return rows, colstats


def _grad_chunk(logits, t, part, rows, colstats, params, *, mode, cols, n_row_terms, n_col_terms, diag_off):
    """G = d loss / d L on the rows `part` (see _kernels._grad_tile for the formula)."""
    c, Nb = logits.shape
    dev = logits.device
    diag = _diag_mask(part.start, c, Nb, diag_off, dev)
    rows_on = torch.arange(part.start, part.stop, device=dev)[:, None] < n_row_terms
    cr = torch.where(rows_on, params[PARAM["coef_row"]], 0.0)
    if mode != MODE_SOFTMAX:
        x = torch.where(diag, logits + params[PARAM["bias"]], -(logits + params[PARAM["bias"]]))
        sig = torch.sigmoid(-x)
        return cr * torch.where(diag, -sig, sig)
    alpha = params[PARAM["alpha"]]
    r = rows[:, part, None]
    g = cr * (_softmax(logits, r[ROW["max"]], r[ROW["log_sum"]]) - params[PARAM["unif_row"]])
    diag_coef = cr
    if t is not None:
        g -= cr * alpha * _softmax(t, r[ROW["t_max"]], r[ROW["t_log_sum"]])
    if cols:
        cc = torch.where(torch.arange(Nb, device=dev)[None, :] < n_col_terms, params[PARAM["coef_col"]], 0.0)
        k = colstats[:, None, :]
        g += cc * (_softmax(logits, k[COL["max"]], k[COL["log_sum"]]) - params[PARAM["unif_col"]])
        if t is not None:
            g -= cc * alpha * _softmax(t, k[COL["t_max"]], k[COL["t_log_sum"]])
        diag_coef = cr + cc
    return g - torch.where(diag, diag_coef * params[PARAM["diag"]], 0.0)


def backward(a, b, at, bt, params, rows, colstats, *, mode, cols, n_row_terms, n_col_terms, need_da, need_db,
             diag_off=0):
    """(da, db, sum of G·raw, sum of G); da / db None when not needed."""
    Na, Nb = a.shape[0], b.shape[0]
    Q = a.shape[1] if a.dim() == 3 else 1
    dev, cdt = a.device, params.dtype
    s = params[PARAM["scale"]]
    b_c = b.to(cdt)
    bt_c = bt.to(cdt) if at is not None else None
    da = torch.empty(a.shape, device=dev, dtype=cdt) if need_da else None
    db = torch.zeros(b.shape, device=dev, dtype=cdt) if need_db else None
    # scalar gradients: sums over all N·M pairs, accumulated across chunks in fp64
    d_scale = torch.zeros((), device=dev, dtype=torch.float64)
    d_bias = torch.zeros((), device=dev, dtype=torch.float64)
    C = _chunk_rows(Na, Nb, Q)
    for i0 in range(0, Na, C):
        part = slice(i0, min(Na, i0 + C))
        a_c = a[part].to(cdt)
        raw, arg = _raw(a_c, b_c)
        t = s * _raw(at[part], bt_c)[0] if at is not None else None
        g = _grad_chunk(s * raw, t, part, rows, colstats, params, mode=mode, cols=cols, n_row_terms=n_row_terms,
                        n_col_terms=n_col_terms, diag_off=diag_off)
        d_scale += (g * raw).sum(dtype=torch.float64)
        d_bias += g.sum(dtype=torch.float64)
        if arg is None:
            if need_da:
                da[part] = s * (g @ b_c)
            if need_db:
                db += s * (g.T @ a_c)
        else:
            # only the arg-max query of each (row, column) pair gets the pair's gradient
            gq = torch.zeros((g.shape[0], Q, Nb), device=dev, dtype=cdt).scatter_(1, arg[:, None, :], g[:, None, :])
            if need_da:
                da[part] = s * torch.einsum("cqm,md->cqd", gq, b_c)
            if need_db:
                db += s * torch.einsum("cqm,cqd->md", gq, a_c)
    da = da.to(a.dtype) if need_da else None
    db = db.to(b.dtype) if need_db else None
    return da, db, d_scale.to(cdt), d_bias.to(cdt)
