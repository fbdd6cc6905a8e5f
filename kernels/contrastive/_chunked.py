"""The chunked PyTorch path (CPU, or any device without Triton): the Triton kernels' algorithm with
row chunks instead of tiles.

Same interface as _triton.forward / _triton.backward. A chunk of C rows of a against all Nb rows of b
is materialised at a time (C = _chunk_rows(): CHUNK_ROWS, fewer for wide batches or BLIP-2's Q queries
per row), so the extra memory is O(C * Q * Nb + Na + Nb) floats: linear in the batch. Column statistics are merged across
chunks online (log-sum-exp), the backward recomputes each chunk. Arithmetic is fp32 whatever the input
dtype (features of other dtypes are converted chunk by chunk for a and once for b: an O(Nb * D) copy).
"""
import torch

from ._triton import MODE_SOFTMAX, PARAM_INDEX

P_SCALE, P_BIAS, P_ALPHA, P_UNIF_ROW, P_UNIF_COL, P_DIAG = (PARAM_INDEX[k] for k in
                                                            ("scale", "bias", "alpha", "unif_row", "unif_col", "diag"))

# Rows of a per chunk: at most CHUNK_ROWS, and at most CHUNK_ELEMENTS logits (16 MiB of fp32 per
# temporary), at least one. Small chunks cost per-op overhead (N = 4096: 3x slower at 64 rows than at
# 1024); the cap keeps N = 16k at 256 rows, ~100 MiB of temporaries in all.
CHUNK_ROWS = 1024
CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(Na, Nb, Q):
    return max(1, min(Na, CHUNK_ROWS, CHUNK_ELEMENTS // max(1, Q * Nb)))


def _raw(a_chunk, b32):
    """(C, Nb) raw similarities and the arg-max query (None when a is 2-D)."""
    a32 = a_chunk.float()
    if a32.dim() == 2:
        return a32 @ b32.T, None
    sims = torch.einsum("cqd,md->cqm", a32, b32)
    raw, arg = sims.max(dim=1)
    return raw, arg


def _diag_mask(i0, c, Nb, diag_off, device):
    rows = torch.arange(i0, i0 + c, device=device) + diag_off
    return rows[:, None] == torch.arange(Nb, device=device)[None, :]


def forward(a, b, at, bt, params, *, mode, cols, smooth, diag_off=0):
    Na, Nb = a.shape[0], b.shape[0]
    Q = a.shape[1] if a.dim() == 3 else 1
    dev = a.device
    s = params[P_SCALE]
    b32 = b.float()
    bt32 = bt.float() if at is not None else None
    rows = torch.zeros((5 if mode == MODE_SOFTMAX else 1, Na), device=dev, dtype=torch.float32)
    # running (max, sum of exp) per column: one rounding per chunk on the sum, not on the logarithm
    col_max = torch.full((Nb,), float("-inf"), device=dev)
    col_exp = torch.zeros(Nb, device=dev)
    col_sum = torch.zeros(Nb, device=dev)
    col_tmax = torch.full((Nb,), float("-inf"), device=dev)
    col_texp = torch.zeros(Nb, device=dev)
    col_w = torch.zeros(Nb, device=dev)  # sum of exp(T - col_tmax) * L
    C = _chunk_rows(Na, Nb, Q)
    for i0 in range(0, Na, C):
        c = min(C, Na - i0)
        logits = s * _raw(a[i0 : i0 + c], b32)[0]
        diag = _diag_mask(i0, c, Nb, diag_off, dev)
        if mode != MODE_SOFTMAX:
            x = torch.where(diag, logits + params[P_BIAS], -(logits + params[P_BIAS]))
            rows[0, i0 : i0 + c] = -torch.nn.functional.logsigmoid(x).sum(1)
            continue
        rows[0, i0 : i0 + c] = torch.logsumexp(logits, dim=1)
        rows[1, i0 : i0 + c] = logits.sum(1)
        rows[2, i0 : i0 + c] = torch.where(diag, logits, 0.0).sum(1)
        if cols:
            new_max = torch.maximum(col_max, logits.max(dim=0).values)
            col_exp = col_exp * torch.exp(col_max - new_max) + torch.exp(logits - new_max).sum(0)
            col_max = new_max
            if smooth:
                col_sum += logits.sum(0)
        if at is not None:
            t = s * _raw(at[i0 : i0 + c], bt32)[0]
            tlse = torch.logsumexp(t, dim=1)
            rows[3, i0 : i0 + c] = tlse
            rows[4, i0 : i0 + c] = (torch.softmax(t, dim=1) * logits).sum(1)
            if cols:
                new_max = torch.maximum(col_tmax, t.max(dim=0).values)
                rescale = torch.exp(col_tmax - new_max)
                e = torch.exp(t - new_max)
                col_texp = col_texp * rescale + e.sum(0)
                col_w = col_w * rescale + (e * logits).sum(0)
                col_tmax = new_max
    colstats = None
    if cols and mode == MODE_SOFTMAX:
        colstats = torch.stack([col_max + torch.log(col_exp), col_sum, col_tmax + torch.log(col_texp), col_w / col_texp])
        if at is None:
            colstats[2:] = 0.0  # no teacher: defined values, as the Triton path
    return rows, colstats


def grad_tile(logits, t, i0, rvec, cvec, params, *, mode, cols, diag_off):
    """G = d loss / d L on rows [i0, i0 + c) (see _triton._grad_tile for the formula)."""
    c, Nb = logits.shape
    diag = _diag_mask(i0, c, Nb, diag_off, logits.device)
    cr = rvec[2, i0 : i0 + c, None]
    if mode != MODE_SOFTMAX:
        x = torch.where(diag, logits + params[P_BIAS], -(logits + params[P_BIAS]))
        sig = torch.sigmoid(-x)
        return cr * torch.where(diag, -sig, sig)
    alpha = params[P_ALPHA]
    g = cr * (torch.exp(logits - rvec[0, i0 : i0 + c, None]) - params[P_UNIF_ROW])
    diag_coef = cr
    if t is not None:
        g -= cr * alpha * torch.exp(t - rvec[1, i0 : i0 + c, None])
    if cols:
        cc = cvec[2][None, :]
        g += cc * (torch.exp(logits - cvec[0][None, :]) - params[P_UNIF_COL])
        if t is not None:
            g -= cc * alpha * torch.exp(t - cvec[1][None, :])
        diag_coef = cr + cc
    return g - torch.where(diag, diag_coef * params[P_DIAG], 0.0)


def backward(a, b, at, bt, params, rvec, cvec, *, mode, cols, need_da, need_db, diag_off=0):
    Na, Nb = a.shape[0], b.shape[0]
    Q = a.shape[1] if a.dim() == 3 else 1
    dev = a.device
    s = params[P_SCALE]
    b32 = b.float()
    bt32 = bt.float() if at is not None else None
    da = torch.empty(a.shape, device=dev, dtype=torch.float32) if need_da else None
    db = torch.zeros(b.shape, device=dev, dtype=torch.float32) if need_db else None
    # scalar gradients: sums over all N*M pairs, accumulated across chunks in fp64
    d_scale = torch.zeros((), device=dev, dtype=torch.float64)
    d_bias = torch.zeros((), device=dev, dtype=torch.float64)
    C = _chunk_rows(Na, Nb, Q)
    for i0 in range(0, Na, C):
        c = min(C, Na - i0)
        a_chunk = a[i0 : i0 + c].float()
        raw, arg = _raw(a_chunk, b32)
        t = s * _raw(at[i0 : i0 + c], bt32)[0] if at is not None else None
        g = grad_tile(s * raw, t, i0, rvec, cvec, params, mode=mode, cols=cols, diag_off=diag_off)
        d_scale += (g * raw).sum(dtype=torch.float64)
        d_bias += g.sum(dtype=torch.float64)
        if arg is None:
            if need_da:
                da[i0 : i0 + c] = s * (g @ b32)
            if need_db:
                db += s * (g.T @ a_chunk)
        else:
            # only the arg-max query of each (row, column) pair gets the pair's gradient
            gq = torch.zeros((c, Q, Nb), device=dev, dtype=torch.float32).scatter_(1, arg[:, None, :], g[:, None, :])
            if need_da:
                da[i0 : i0 + c] = s * torch.einsum("cqm,md->cqd", gq, b32)
            if need_db:
                db += s * torch.einsum("cqm,cqd->md", gq, a_chunk)
    da = da.to(a.dtype) if need_da else None
    db = db.to(b.dtype) if need_db else None
    return da, db, d_scale.float(), d_bias.float()
