"""Triton kernels of the sliced contrastive losses: tiles of logits recomputed, never stored.

Notation (shared with _chunked.py and the public docstrings): a has Na rows (images; each row may be Q
query vectors, BLIP-2), b has Nb rows; raw_ij = max_q <a_iq, b_j> (= <a_i, b_j> when Q = 1), L_ij = s·raw_ij
(+ bias for the sigmoid loss). A tile is BI·QP flattened (image, query) rows of a times BN rows of b; the
max over queries is a reshape (BI, QP, BN) and a max over axis 1.

Every softmax is kept as its max and the log of its sum, apart: the backward forms
p_ij = exp((L_ij − max_i) − log_sum_i), where L − max is exact when p matters, not exp(L − lse) from one
fp32 lse, whose rounding (ulp(|L|): 1e-3 at |L| = 1e4) would shift a whole row of p by that much.

Kernels:
* ``_contrastive_fwd_kernel``: P persistent programs (as many as the GPU runs at once), program p taking
  the blocks of BI rows p, p + P, ... of a, each looping over all column blocks. Per row, online: the max
  and sum of exp of L, and optionally the sum of L (label smoothing), the diagonal, the teacher's max and
  sum of exp, and the teacher-weighted mean of L (distillation). Per column: the same statistics over the
  program's rows, merged into the program's own row of a partial buffer of K x P x Nb fp32, so each logits
  tile is computed once for both directions and the extra memory is O(Nb). MODE 1 (sigmoid) instead sums
  −log σ(z_ij L_ij) per row.
* ``_contrastive_colreduce_kernel``: merges the P partials, streaming (no temporaries).
* ``_contrastive_bwd_da_kernel``: grid (row blocks, D chunks); recomputes tiles along its rows, forms the
  loss gradient G_ij = d loss / d L_ij and accumulates da = s·G·b (arg-max queries only), plus per row
  block the partial sums of G_ij·raw_ij (d scale) and G_ij (d bias).
* ``_contrastive_bwd_db_kernel``: grid (column blocks, D chunks); the same tiles, db = s·Gᵀ·a.
* ``_contrastive_grad_kernel`` (the "gemm" backend): where cuBLAS wrote a chunk's raw similarities (the
  forward kernel reads them instead of computing them, FROM_MEMORY), G of each tile, stored in the input
  dtype for the gradient GEMMs, with the partial sums of G·raw and G.
Deterministic: every output element is written by one program in a fixed order; partial sums are reduced by
torch (the forward's merge order depends on P, so on the GPU model, not on the run).
"""
import triton
import triton.language as tl

from .._common import dot, round_to

MODE_SOFTMAX = 0
MODE_SIGMOID = 1

# params vector (fp32 on the device: nothing syncs, a new scalar value recompiles nothing): s, logit bias, α,
# (1−α)ε/Nb, (1−α)ε/Na, (1−α)(1−ε), the weights of each row's and each column's loss term (times the
# upstream gradient in the backward; rows i < n_row_terms and columns j < n_col_terms have one, the others
# none), and the backward's power-of-two scale of G (G is ~1/N: scaled to ~1 before the cast to the input
# dtype, so fp16 keeps it out of its subnormals)
PARAMS = ("scale", "bias", "alpha", "unif_row", "unif_col", "diag", "coef_row", "coef_col", "gscale")
P_SCALE, P_BIAS, P_ALPHA, P_UNIF_ROW, P_UNIF_COL, P_DIAG, P_COEF_ROW, P_COEF_COL, P_GSCALE = (
    tl.constexpr(i) for i in range(len(PARAMS)))

# row statistics [7, Na] and column statistics [6, Nb]; without a teacher only the first 4 and 3 (MODE 1: the
# row statistic is the loss summed over the row, [1, Na])
ROW_STATS = ("max", "log_sum", "sum", "diag", "t_max", "t_log_sum", "t_mean")
COL_STATS = ("max", "log_sum", "sum", "t_max", "t_log_sum", "t_mean")
R_MAX, R_LOG_SUM, R_SUM, R_DIAG, R_T_MAX, R_T_LOG_SUM, R_T_MEAN = (tl.constexpr(i) for i in range(len(ROW_STATS)))
C_MAX, C_LOG_SUM, C_SUM, C_T_MAX, C_T_LOG_SUM, C_T_MEAN = (tl.constexpr(i) for i in range(len(COL_STATS)))
# the same indices for the PyTorch side (the launchers, the chunked path)
PARAM, ROW, COL = ({name: i for i, name in enumerate(names)} for names in (PARAMS, ROW_STATS, COL_STATS))


@triton.jit
def _raw_tile(a_ptr, b_ptr, img, q, cols, Na, Nb, Q, D,
              stride_an, stride_aq, stride_ad, stride_bn, stride_bd,
              QP: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """raw (BI, BN) = max over queries of <a_iq, b_j> in fp32, and the arg-max query (int32)."""
    row_ok = (img < Na) & (q < Q)
    col_ok = cols < Nb
    acc = tl.zeros((BI * QP, BN), dtype=tl.float32)
    for k in range(0, D, BK):
        d = k + tl.arange(0, BK).to(tl.int64)
        d_ok = d < D
        x = tl.load(a_ptr + img[:, None] * stride_an + q[:, None] * stride_aq + d[None, :] * stride_ad,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(b_ptr + cols[None, :] * stride_bn + d[:, None] * stride_bd,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        acc = dot(x, y, acc, PRECISION, EMULATE)
    if QP == 1:
        return acc, tl.zeros((BI, BN), dtype=tl.int32)
    else:
        qidx = tl.arange(0, QP)
        acc3 = tl.reshape(acc, (BI, QP, BN))
        acc3 = tl.where((qidx < Q)[None, :, None], acc3, float("-inf"))
        return tl.max(acc3, axis=1), tl.argmax(acc3, axis=1, tie_break_left=True).to(tl.int32)


@triton.jit
def _log1p(u):
    """log(1 + u) for u in [0, 1], accurate to a few ulps (Goldberg's trick; tl has no log1p)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _contrastive_fwd_kernel(
    a_ptr, b_ptr, at_ptr, bt_ptr,  # features; at / bt: the teacher's (same shapes) when TEACHER
    params_ptr,  # *fp32 [PARAMS]
    row_ptr,  # *fp32 [ROW_STATS, Na] (without TEACHER the first 4) | MODE 1: [1, Na] the loss summed over each row
    part_ptr,  # *fp32 [K, P, Nb] column partials (COLS), P = the number of programs: max, sum of exp,
    # (SMOOTH: sum of L), (TEACHER: teacher max, teacher sum of exp, teacher-weighted sum of L)
    raw_ptr, traw_ptr,  # FROM_MEMORY: *fp32 [row_end - row0, Nb] raw similarities (and the teacher's) of the rows
    Na, Nb, Q, D, n_row_blocks, diag_off,
    n_part,  # programs (rows) of part_ptr's planes: this launch's own count, or the first chunk's
    row0, row_end,  # the rows this launch covers (FROM_MEMORY: a chunk; else 0, Na)
    split_cols,  # columns per program along grid axis 1 (FROM_MEMORY; else >= Nb: one split)
    stride_an, stride_aq, stride_ad, stride_bn, stride_bd,
    stride_atn, stride_atq, stride_atd, stride_btn, stride_btd,
    MODE: tl.constexpr, COLS: tl.constexpr, SMOOTH: tl.constexpr, TEACHER: tl.constexpr,
    QP: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr, FROM_MEMORY: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    # FROM_MEMORY: axis 1 splits the columns, so a chunk of few row blocks still fills the GPU; each split
    # stores its rows' partial statistics (row_ptr: [ROW_STATS, n_splits, Na], sums of exp not logged), merged
    # by the launcher, and owns its columns' partials
    if FROM_MEMORY:
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        col_lo = split * split_cols
        col_hi = tl.minimum(Nb, col_lo + split_cols)
    else:  # the fused path as it was: its fp32 tile sits at the register limit (128, two programs an SM)
        col_lo = 0
        col_hi = Nb
    s = tl.load(params_ptr + P_SCALE)
    neg_inf = float("-inf")
    if MODE == 1:
        bias = tl.load(params_ptr + P_BIAS)
    plane = (n_part if FROM_MEMORY else n_prog) * Nb
    # this program's row of each column-partial plane
    own_max = part_ptr + pid * Nb
    own_sum = own_max + plane
    own_t = own_sum + plane  # teacher planes: max, sum of exp, weighted sum
    if SMOOTH:
        own_t += plane
    if FROM_MEMORY:
        first_row = row0
        last_row = row_end
    else:  # constants, as in the fused path before chunks existed (its fp32 tile is at the register limit)
        first_row = 0
        last_row = Na
    for rb in range(pid, n_row_blocks, n_prog):
        r = tl.arange(0, BI * QP)
        img_flat = (first_row + rb * BI + r // QP).to(tl.int64)
        q_flat = (r % QP).to(tl.int64)
        img = first_row + rb * BI + tl.arange(0, BI).to(tl.int64)
        row_ok = img < last_row
        # the partials already hold earlier row blocks of this program, or of earlier chunks (blocks, not
        # scalars: Triton 3.9's interpreter cannot load under a block mask combined with a scalar one)
        merge = (tl.zeros((BN,), tl.int32) + rb) >= n_prog
        if FROM_MEMORY:
            merge = merge | ((tl.zeros((BN,), tl.int32) + first_row) > 0)
        if COLS:
            # order this block's read-modify-write of the partials after the previous block's stores,
            # which other threads of the program may have made
            tl.debug_barrier()
        m_i = tl.full((BI,), neg_inf, tl.float32)
        l_i = tl.zeros((BI,), tl.float32)
        sum_i = tl.zeros((BI,), tl.float32)
        diag_i = tl.zeros((BI,), tl.float32)
        tm_i = tl.full((BI,), neg_inf, tl.float32)
        tl_i = tl.zeros((BI,), tl.float32)
        w_i = tl.zeros((BI,), tl.float32)
        loss_i = tl.zeros((BI,), tl.float32)
        for j0 in range(col_lo, col_hi, BN):
            cols = j0 + tl.arange(0, BN).to(tl.int64)
            col_ok = cols < col_hi
            old_ok = col_ok & merge
            if FROM_MEMORY:
                raw = tl.load(raw_ptr + (img - first_row)[:, None] * Nb + cols[None, :],
                              mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            else:
                raw, _ = _raw_tile(a_ptr, b_ptr, img_flat, q_flat, cols, Na, Nb, Q, D, stride_an, stride_aq,
                                   stride_ad, stride_bn, stride_bd, QP, BI, BN, BK, PRECISION, EMULATE)
            logits = s * raw
            valid = row_ok[:, None] & col_ok[None, :]  # after the dot loop: not live across it (registers)
            is_diag = (img + diag_off)[:, None] == cols[None, :]
            if MODE == 0:
                # rows: online max and sum of exp (flash-attention style)
                lr = tl.where(col_ok[None, :], logits, neg_inf)
                m_new = tl.maximum(m_i, tl.max(lr, axis=1))  # finite: every block has a valid column
                l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(lr - m_new[:, None]), axis=1)
                m_i = m_new
                lz = tl.where(valid, logits, 0.0)
                diag_i += tl.sum(tl.where(is_diag, lz, 0.0), axis=1)
                if SMOOTH:
                    sum_i += tl.sum(lz, axis=1)
                if COLS:
                    # columns: this tile's max and sum of exp, merged into the program's partials
                    lc = tl.where(row_ok[:, None], logits, neg_inf)
                    old_m = tl.load(own_max + cols, mask=old_ok, other=neg_inf)
                    new_m = tl.maximum(old_m, tl.max(lc, axis=0))  # finite: every block has a valid row
                    old_l = tl.load(own_sum + cols, mask=old_ok, other=0.0)
                    new_l = old_l * tl.exp(old_m - new_m) + tl.sum(tl.exp(lc - new_m[None, :]), axis=0)
                    tl.store(own_max + cols, new_m, mask=col_ok)
                    tl.store(own_sum + cols, new_l, mask=col_ok)
                    if SMOOTH:
                        old = tl.load(own_sum + plane + cols, mask=old_ok, other=0.0)
                        tl.store(own_sum + plane + cols, old + tl.sum(lz, axis=0), mask=col_ok)
                if TEACHER:
                    if FROM_MEMORY:
                        traw = tl.load(traw_ptr + (img - first_row)[:, None] * Nb + cols[None, :], mask=valid,
                                       other=0.0)
                    else:
                        traw, _ = _raw_tile(at_ptr, bt_ptr, img_flat, q_flat, cols, Na, Nb, Q, D,
                                            stride_atn, stride_atq, stride_atd, stride_btn, stride_btd,
                                            QP, BI, BN, BK, PRECISION, EMULATE)
                    t = s * traw
                    # rows: the teacher's max and sum of exp, and the sum of exp(T - max)·L
                    tr = tl.where(col_ok[None, :], t, neg_inf)
                    tm_new = tl.maximum(tm_i, tl.max(tr, axis=1))
                    rescale = tl.exp(tm_i - tm_new)
                    e = tl.exp(tr - tm_new[:, None])
                    tl_i = tl_i * rescale + tl.sum(e, axis=1)
                    w_i = w_i * rescale + tl.sum(e * lz, axis=1)
                    tm_i = tm_new
                    if COLS:
                        tc = tl.where(row_ok[:, None], t, neg_inf)
                        old_m = tl.load(own_t + cols, mask=old_ok, other=neg_inf)
                        new_m = tl.maximum(old_m, tl.max(tc, axis=0))
                        ec = tl.exp(tc - new_m[None, :])
                        rescale_c = tl.exp(old_m - new_m)
                        old_l = tl.load(own_t + plane + cols, mask=old_ok, other=0.0)
                        tl.store(own_t + plane + cols, old_l * rescale_c + tl.sum(ec, axis=0), mask=col_ok)
                        old_w = tl.load(own_t + 2 * plane + cols, mask=old_ok, other=0.0)
                        tl.store(own_t + 2 * plane + cols, old_w * rescale_c + tl.sum(ec * lz, axis=0), mask=col_ok)
                        tl.store(own_t + cols, new_m, mask=col_ok)
            else:
                x = tl.where(is_diag, logits + bias, -(logits + bias))
                # -log sigmoid(x) = max(-x, 0) + log1p(exp(-|x|))
                nls = tl.maximum(-x, 0.0) + _log1p(tl.exp(-tl.abs(x)))
                loss_i += tl.sum(tl.where(valid, nls, 0.0), axis=1)
        if FROM_MEMORY:
            out = row_ptr + split * Na + img  # + k·n_splits·Na: statistic k of this split
            plane_r = n_splits * Na
            if MODE == 0:
                tl.store(out + R_MAX * plane_r, m_i, mask=row_ok)
                tl.store(out + R_LOG_SUM * plane_r, l_i, mask=row_ok)
                tl.store(out + R_SUM * plane_r, sum_i, mask=row_ok)
                tl.store(out + R_DIAG * plane_r, diag_i, mask=row_ok)
                if TEACHER:
                    tl.store(out + R_T_MAX * plane_r, tm_i, mask=row_ok)
                    tl.store(out + R_T_LOG_SUM * plane_r, tl_i, mask=row_ok)
                    tl.store(out + R_T_MEAN * plane_r, w_i, mask=row_ok)
            else:
                tl.store(out, loss_i, mask=row_ok)
        elif MODE == 0:
            tl.store(row_ptr + R_MAX * Na + img, m_i, mask=row_ok)
            tl.store(row_ptr + R_LOG_SUM * Na + img, tl.log(l_i), mask=row_ok)
            tl.store(row_ptr + R_SUM * Na + img, sum_i, mask=row_ok)
            tl.store(row_ptr + R_DIAG * Na + img, diag_i, mask=row_ok)
            if TEACHER:
                tl.store(row_ptr + R_T_MAX * Na + img, tm_i, mask=row_ok)
                tl.store(row_ptr + R_T_LOG_SUM * Na + img, tl.log(tl_i), mask=row_ok)
                tl.store(row_ptr + R_T_MEAN * Na + img, w_i / tl_i, mask=row_ok)
        else:
            tl.store(row_ptr + img, loss_i, mask=row_ok)


@triton.jit
def _contrastive_colreduce_kernel(
    part_ptr,  # *fp32 [K, n_part, Nb] from the forward
    col_ptr,  # *fp32 [COL_STATS, Nb] (without TEACHER the first 3)
    n_part, Nb,
    SMOOTH: tl.constexpr, TEACHER: tl.constexpr, BLOCK: tl.constexpr,
):
    """Merge the forward programs' column partials, streaming over them (no temporaries)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = cols < Nb
    plane = n_part * Nb
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    e = tl.zeros((BLOCK,), tl.float32)
    total = tl.zeros((BLOCK,), tl.float32)
    tm = tl.full((BLOCK,), float("-inf"), tl.float32)
    te = tl.zeros((BLOCK,), tl.float32)
    w = tl.zeros((BLOCK,), tl.float32)
    t_base = part_ptr + 2 * plane
    if SMOOTH:
        t_base += plane
    for p in range(0, n_part):
        xm = tl.load(part_ptr + p * Nb + cols, mask=ok, other=0.0)
        xl = tl.load(part_ptr + plane + p * Nb + cols, mask=ok, other=0.0)
        m_new = tl.maximum(m, xm)
        e = e * tl.exp(m - m_new) + xl * tl.exp(xm - m_new)
        m = m_new
        if SMOOTH:
            total += tl.load(part_ptr + 2 * plane + p * Nb + cols, mask=ok, other=0.0)
        if TEACHER:
            txm = tl.load(t_base + p * Nb + cols, mask=ok, other=0.0)
            txl = tl.load(t_base + plane + p * Nb + cols, mask=ok, other=0.0)
            txw = tl.load(t_base + 2 * plane + p * Nb + cols, mask=ok, other=0.0)
            tm_new = tl.maximum(tm, txm)
            scale_old = tl.exp(tm - tm_new)
            scale_new = tl.exp(txm - tm_new)
            te = te * scale_old + txl * scale_new
            w = w * scale_old + txw * scale_new
            tm = tm_new
    tl.store(col_ptr + C_MAX * Nb + cols, m, mask=ok)
    tl.store(col_ptr + C_LOG_SUM * Nb + cols, tl.log(e), mask=ok)
    tl.store(col_ptr + C_SUM * Nb + cols, total, mask=ok)
    if TEACHER:
        tl.store(col_ptr + C_T_MAX * Nb + cols, tm, mask=ok)
        tl.store(col_ptr + C_T_LOG_SUM * Nb + cols, tl.log(te), mask=ok)
        tl.store(col_ptr + C_T_MEAN * Nb + cols, w / te, mask=ok)


@triton.jit
def _softmax(x, x_max, x_log_sum):
    """exp(x − lse) as exp((x − max) − log sum): x − max is exact where the result matters."""
    return tl.exp((x - x_max) - x_log_sum)


@triton.jit
def _grad_tile(logits, t, img, cols, row_ok, col_ok, params_ptr, row_ptr, col_ptr, Na, Nb, n_row_terms, n_col_terms,
               diag_off, MODE: tl.constexpr, COLS: tl.constexpr, TEACHER: tl.constexpr):
    """G_ij = d loss / d L_ij on one tile (zero outside the valid rows and columns).

    row_ptr / col_ptr: the forward's row / column statistics. c_i, c_j: the weights of the rows' and the
    columns' loss terms (P_COEF_ROW for i < n_row_terms, P_COEF_COL for j < n_col_terms, else 0).
    MODE 0: G = c_i (p_ij − t_ij) + c_j (p'_ij − t'_ij) with p, p' the row / column softmax and t, t' the
    row / column targets (1−α)((1−ε)δ_ij + ε/M) + α q_ij. MODE 1: G = c_i (−z σ(−z L)).
    """
    is_diag = (img + diag_off)[:, None] == cols[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    cr = tl.where(img < n_row_terms, tl.load(params_ptr + P_COEF_ROW), 0.0)
    if MODE == 0:
        alpha = tl.load(params_ptr + P_ALPHA)
        dcoef = tl.load(params_ptr + P_DIAG)
        m_r = tl.load(row_ptr + R_MAX * Na + img, mask=row_ok, other=0.0)
        ls_r = tl.load(row_ptr + R_LOG_SUM * Na + img, mask=row_ok, other=0.0)
        g = cr[:, None] * (_softmax(logits, m_r[:, None], ls_r[:, None]) - tl.load(params_ptr + P_UNIF_ROW))
        if TEACHER:
            tm_r = tl.load(row_ptr + R_T_MAX * Na + img, mask=row_ok, other=0.0)
            tls_r = tl.load(row_ptr + R_T_LOG_SUM * Na + img, mask=row_ok, other=0.0)
            g -= cr[:, None] * alpha * _softmax(t, tm_r[:, None], tls_r[:, None])
        if COLS:
            cc = tl.where(cols < n_col_terms, tl.load(params_ptr + P_COEF_COL), 0.0)
            m_c = tl.load(col_ptr + C_MAX * Nb + cols, mask=col_ok, other=0.0)
            ls_c = tl.load(col_ptr + C_LOG_SUM * Nb + cols, mask=col_ok, other=0.0)
            g += cc[None, :] * (_softmax(logits, m_c[None, :], ls_c[None, :]) - tl.load(params_ptr + P_UNIF_COL))
            if TEACHER:
                tm_c = tl.load(col_ptr + C_T_MAX * Nb + cols, mask=col_ok, other=0.0)
                tls_c = tl.load(col_ptr + C_T_LOG_SUM * Nb + cols, mask=col_ok, other=0.0)
                g -= cc[None, :] * alpha * _softmax(t, tm_c[None, :], tls_c[None, :])
            g -= tl.where(is_diag, (cr[:, None] + cc[None, :]) * dcoef, 0.0)
        else:
            g -= tl.where(is_diag, cr[:, None] * dcoef, 0.0)
    else:
        x = logits + tl.load(params_ptr + P_BIAS)
        x = tl.where(is_diag, x, -x)
        sig = 1.0 / (1.0 + tl.exp(x))  # σ(-x); exp overflow gives 0, as it should
        g = cr[:, None] * tl.where(is_diag, -sig, sig)
    return tl.where(valid, g, 0.0)


@triton.jit
def _expand_queries(g, arg, QP: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr):
    """(BI, BN) gradient -> (BI·QP, BN) on the flattened (image, query) rows: only the arg-max query."""
    if QP == 1:
        return g
    else:
        qidx = tl.arange(0, QP)
        g3 = tl.where(qidx[None, :, None] == arg[:, None, :], g[:, None, :], 0.0)
        return tl.reshape(g3, (BI * QP, BN))


@triton.jit
def _flat_rows(row0, Na, BI: tl.constexpr, QP: tl.constexpr):
    """The tile's BI images from row0: (image, query) of each of its BI·QP flattened rows, and the images."""
    r = tl.arange(0, BI * QP)
    return (row0 + r // QP).to(tl.int64), (r % QP).to(tl.int64), row0 + tl.arange(0, BI).to(tl.int64)


@triton.jit
def _tile_gradient(a_ptr, b_ptr, at_ptr, bt_ptr, params_ptr, row_ptr, col_ptr, row0, cols, s, Na, Nb, Q, D,
                   n_row_terms, n_col_terms, diag_off, stride_an, stride_aq, stride_ad, stride_bn, stride_bd,
                   stride_atn, stride_atq, stride_atd, stride_btn, stride_btd, MODE: tl.constexpr, COLS: tl.constexpr,
                   TEACHER: tl.constexpr, QP: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """(raw, arg-max query, G) of the tile of images row0.. and columns `cols`: the forward's logits recomputed
    (same K step: the same values, bit for bit), the teacher's with them, then the loss gradient."""
    img_flat, q_flat, img = _flat_rows(row0, Na, BI, QP)
    raw, arg = _raw_tile(a_ptr, b_ptr, img_flat, q_flat, cols, Na, Nb, Q, D,
                         stride_an, stride_aq, stride_ad, stride_bn, stride_bd, QP, BI, BN, BK, PRECISION, EMULATE)
    t = raw
    if TEACHER:
        traw, _ = _raw_tile(at_ptr, bt_ptr, img_flat, q_flat, cols, Na, Nb, Q, D, stride_atn, stride_atq, stride_atd,
                            stride_btn, stride_btd, QP, BI, BN, BK, PRECISION, EMULATE)
        t = s * traw
    g = _grad_tile(s * raw, t, img, cols, img < Na, cols < Nb, params_ptr, row_ptr, col_ptr, Na, Nb, n_row_terms,
                   n_col_terms, diag_off, MODE, COLS, TEACHER)
    return raw, arg, g


@triton.jit
def _contrastive_bwd_da_kernel(
    a_ptr, b_ptr, at_ptr, bt_ptr, params_ptr, row_ptr, col_ptr,
    da_ptr,  # [Na, Q, D] (Q = 1: [Na, D]) contiguous, input dtype
    red_ptr,  # *fp32 [2, n_row_blocks]: partial sums of G·raw (d scale) and of G (d bias; MODE 1, else 0)
    Na, Nb, Q, D, n_row_blocks, n_row_terms, n_col_terms, diag_off,
    stride_an, stride_aq, stride_ad, stride_bn, stride_bd,
    stride_atn, stride_atq, stride_atd, stride_btn, stride_btd,
    MODE: tl.constexpr, COLS: tl.constexpr, TEACHER: tl.constexpr,
    QP: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    img_flat, q_flat, img = _flat_rows(pid * BI, Na, BI, QP)
    s = tl.load(params_ptr + P_SCALE)
    gscale = tl.load(params_ptr + P_GSCALE)
    d = pid_d * BD + tl.arange(0, BD).to(tl.int64)
    d_ok = d < D
    acc = tl.zeros((BI * QP, BD), dtype=tl.float32)
    red_scale = tl.zeros((BI,), tl.float32)
    red_bias = tl.zeros((BI,), tl.float32)
    for j0 in range(0, Nb, BN):
        cols = j0 + tl.arange(0, BN).to(tl.int64)
        col_ok = cols < Nb
        raw, arg, g = _tile_gradient(a_ptr, b_ptr, at_ptr, bt_ptr, params_ptr, row_ptr, col_ptr, pid * BI, cols, s,
                                     Na, Nb, Q, D, n_row_terms, n_col_terms, diag_off, stride_an, stride_aq, stride_ad,
                                     stride_bn, stride_bd, stride_atn, stride_atq, stride_atd, stride_btn, stride_btd,
                                     MODE, COLS, TEACHER, QP, BI, BN, BK, PRECISION, EMULATE)
        if pid_d == 0:
            red_scale += tl.sum(tl.where(g != 0.0, g * raw, 0.0), axis=1)  # raw is -inf nowhere valid
            if MODE == 1:  # the softmax losses take no bias
                red_bias += tl.sum(g, axis=1)
        # G scaled to ~1 and rounded to the input dtype, then the GEMM
        gq = _expand_queries(g * gscale, arg, QP, BI, BN)
        y = tl.load(b_ptr + cols[:, None] * stride_bn + d[None, :] * stride_bd, mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = dot(round_to(gq, y.dtype, EMULATE), y, acc, PRECISION, EMULATE)
    out_ok = (img_flat < Na) & (q_flat < Q)
    tl.store(da_ptr + (img_flat[:, None] * Q + q_flat[:, None]) * D + d[None, :],
             round_to((s / gscale) * acc, da_ptr.dtype.element_ty, EMULATE), mask=out_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        tl.store(red_ptr + pid, tl.sum(red_scale, axis=0))
        tl.store(red_ptr + n_row_blocks + pid, tl.sum(red_bias, axis=0))


@triton.jit
def _contrastive_bwd_db_kernel(
    a_ptr, b_ptr, at_ptr, bt_ptr, params_ptr, row_ptr, col_ptr,
    db_ptr,  # [Nb, D] contiguous, input dtype
    Na, Nb, Q, D, n_row_terms, n_col_terms, diag_off,
    stride_an, stride_aq, stride_ad, stride_bn, stride_bd,
    stride_atn, stride_atq, stride_atd, stride_btn, stride_btd,
    MODE: tl.constexpr, COLS: tl.constexpr, TEACHER: tl.constexpr,
    QP: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid * BN + tl.arange(0, BN).to(tl.int64)
    col_ok = cols < Nb
    s = tl.load(params_ptr + P_SCALE)
    gscale = tl.load(params_ptr + P_GSCALE)
    d = pid_d * BD + tl.arange(0, BD).to(tl.int64)
    d_ok = d < D
    # d_b's tile accumulates transposed, (BD, BN) = xᵀ g: the MMA's M is then the feature chunk (64 - 512),
    # not the BN = 32 columns, which on sm_90 would fall back from wgmma (>= 64 rows) to mma.sync
    acc_t = tl.zeros((BD, BN), dtype=tl.float32)
    for i0 in range(0, Na, BI):
        raw, arg, g = _tile_gradient(a_ptr, b_ptr, at_ptr, bt_ptr, params_ptr, row_ptr, col_ptr, i0, cols, s,
                                     Na, Nb, Q, D, n_row_terms, n_col_terms, diag_off, stride_an, stride_aq, stride_ad,
                                     stride_bn, stride_bd, stride_atn, stride_atq, stride_atd, stride_btn, stride_btd,
                                     MODE, COLS, TEACHER, QP, BI, BN, BK, PRECISION, EMULATE)
        img_flat, q_flat, _ = _flat_rows(i0, Na, BI, QP)
        gq = _expand_queries(g * gscale, arg, QP, BI, BN)
        x = tl.load(a_ptr + img_flat[:, None] * stride_an + q_flat[:, None] * stride_aq + d[None, :] * stride_ad,
                    mask=((img_flat < Na) & (q_flat < Q))[:, None] & d_ok[None, :], other=0.0)
        acc_t = dot(tl.trans(x), round_to(gq, x.dtype, EMULATE), acc_t, PRECISION, EMULATE)
    tl.store(db_ptr + cols[None, :] * D + d[:, None], round_to((s / gscale) * acc_t, db_ptr.dtype.element_ty, EMULATE),
             mask=col_ok[None, :] & d_ok[:, None])


@triton.jit
def _contrastive_grad_kernel(
    raw_ptr, traw_ptr,  # *fp32 [row_end - row0, Nb]: the chunk's raw similarities (and the teacher's, TEACHER)
    params_ptr, row_ptr, col_ptr,
    g_ptr,  # [row_end - row0, Nb] input dtype: G·gscale, the operand of the gradient GEMMs
    red_ptr,  # *fp32 [2, n_prog]: this launch's partial sums of G·raw (d scale) and of G (d bias; MODE 1)
    Na, Nb, row0, row_end, n_row_terms, n_col_terms, diag_off,
    MODE: tl.constexpr, COLS: tl.constexpr, TEACHER: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """The "gemm" backward's elementwise part: G of one (BI, BN) tile of a chunk whose raw similarities a
    GEMM wrote; the gradient GEMMs (da = s·G·b, db = s·Gᵀ·a) then run on G."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    img = row0 + pid_i * BI + tl.arange(0, BI).to(tl.int64)
    cols = pid_j * BN + tl.arange(0, BN).to(tl.int64)
    row_ok = img < row_end
    col_ok = cols < Nb
    valid = row_ok[:, None] & col_ok[None, :]
    offs = (img - row0)[:, None] * Nb + cols[None, :]
    s = tl.load(params_ptr + P_SCALE)
    raw = tl.load(raw_ptr + offs, mask=valid, other=0.0)
    t = raw
    if TEACHER:
        t = s * tl.load(traw_ptr + offs, mask=valid, other=0.0)
    g = _grad_tile(s * raw, t, img, cols, row_ok, col_ok, params_ptr, row_ptr, col_ptr, Na, Nb, n_row_terms,
                   n_col_terms, diag_off, MODE, COLS, TEACHER)
    tl.store(g_ptr + offs, round_to(g * tl.load(params_ptr + P_GSCALE), g_ptr.dtype.element_ty, EMULATE), mask=valid)
    pid = pid_i * tl.num_programs(1) + pid_j
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    tl.store(red_ptr + pid, tl.sum(tl.sum(g * raw, axis=1), axis=0))
    if MODE == 1:  # the softmax losses take no bias
        tl.store(red_ptr + n_prog + pid, tl.sum(tl.sum(g, axis=1), axis=0))
    else:
        tl.store(red_ptr + n_prog + pid, 0.0)
