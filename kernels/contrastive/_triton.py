"""Triton kernels of the sliced contrastive loss: tiles of logits recomputed, never stored.

Notation (shared with _chunked.py and the public docstrings): a has Na rows (images; each row may be
Q query vectors, BLIP-2), b has Nb rows; raw_ij = max_q <a_iq, b_j> (= <a_i, b_j> when Q = 1),
L_ij = s * raw_ij (+ bias for the sigmoid loss). A "tile" is R = BI*QP flattened (image, query) rows of
a times BN rows of b; the max over queries is a reshape (BI, QP, BN) and a max over axis 1.

Kernels:
* ``_contrastive_fwd_kernel``: P persistent programs (P = as many as the GPU runs at once: one per SM,
  two for fp32), program p taking the blocks of BI rows p, p + P, ... of a, each looping over all
  column blocks. Per row, online (flash-attention style): log-sum-exp of L, and optionally the sum of L
  (label smoothing), the diagonal, the teacher's log-sum-exp and the teacher-weighted mean of L
  (distillation). Per column: the same statistics over the program's rows, merged into the program's
  own row of a partial buffer of ``K x P x Nb`` fp32 (K = 1 plain, +1 with smoothing, +2 with a
  teacher), so each logits tile is computed once for both directions and the extra memory is O(Nb)
  (16.5 MiB per statistic at Nb = 32k on a 132-SM H100) instead of growing with Na / BI. MODE 1
  (sigmoid) instead sums -log sigmoid(z_ij L_ij) per row.
* ``_contrastive_colreduce_kernel``: merges the P partials, streaming (no temporaries).
* ``_contrastive_bwd_da_kernel``: grid (row blocks, D chunks); recomputes tiles along its rows, forms
  the loss gradient G_ij w.r.t. L_ij and accumulates da = s * G @ b (arg-max queries only), plus the
  per-row-block partial sums of G_ij * raw_ij (d scale) and G_ij (d bias).
* ``_contrastive_bwd_db_kernel``: grid (column blocks, D chunks); the same tiles, db = s * G^T @ a.
Deterministic: every output element is written by one program in a fixed order, partial sums are reduced
by torch (the forward's merge order depends on P, so on the GPU model, not on the run).
Work: forward 1 GEMM-equivalent (N·M·D), backward 4 (each kernel recomputes the logits, then its own
GEMM; D > 512 recomputes once more per extra D chunk): 5 against the 3 of an unfused, materialising loss.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._registry import CompileSpec
from .._common import round_to

MODE_SOFTMAX = 0
MODE_SIGMOID = 1

# params vector layout (fp32 on the device, so nothing syncs and scalars never recompile anything):
# s, logit bias, α, (1-α)ε/Nb, (1-α)ε/Na, (1-α)(1-ε), and the backward's power-of-two scale of G (G is
# ~1/N: scaled to ~1 before the cast to the input dtype, so fp16 keeps it out of its subnormals).
# Kernels read the tl.constexpr copies.
PARAM_INDEX = dict(scale=0, bias=1, alpha=2, unif_row=3, unif_col=4, diag=5, gscale=6)
P_SCALE, P_BIAS, P_ALPHA, P_UNIF_ROW, P_UNIF_COL, P_DIAG, P_GSCALE = (tl.constexpr(i) for i in range(7))


@triton.jit
def _raw_tile(a_ptr, b_ptr, img, q, cols, Na, Nb, Q, D,
              s_an, s_aq, s_ad, s_bn, s_bd,
              QP: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """raw (BI, BN) = max over queries of <a_iq, b_j> in fp32, and the arg-max query (int32)."""
    row_ok = (img < Na) & (q < Q)
    col_ok = cols < Nb
    acc = tl.zeros((BI * QP, BN), dtype=tl.float32)
    for k in range(0, D, BK):
        d = k + tl.arange(0, BK).to(tl.int64)
        d_ok = d < D
        x = tl.load(a_ptr + img[:, None] * s_an + q[:, None] * s_aq + d[None, :] * s_ad,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(b_ptr + cols[None, :] * s_bn + d[:, None] * s_bd,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_FP32:  # the interpreter's bf16 tl.dot is wrong; bf16 products are exact in fp32
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        if IEEE:  # fp32 inputs: no TF32 (it would cost 3 decimal digits against PyTorch's fp32 matmul)
            acc = tl.dot(x, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc)
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
def _logaddexp(x, y):
    """log(exp(x) + exp(y)) for x = -inf (an empty partial) or finite, y finite."""
    m = tl.maximum(x, y)
    return m + tl.log(tl.exp(x - m) + tl.exp(y - m))


@triton.jit
def _contrastive_fwd_kernel(
    a_ptr, b_ptr, at_ptr, bt_ptr,  # features; at/bt: teacher features (same shapes) when TEACHER
    params_ptr,  # *fp32 [N_PARAMS]
    row_ptr,  # *fp32 [5, Na]: lse, sum, diag, teacher lse, teacher-weighted mean | MODE 1: [1, Na] loss sums
    part_ptr,  # *fp32 [K, P, Nb] column partials, P = the number of programs (COLS only)
    Na, Nb, Q, D, n_rb, diag_off,
    s_an, s_aq, s_ad, s_bn, s_bd, s_tan, s_taq, s_tad, s_tbn, s_tbd,
    MODE: tl.constexpr, COLS: tl.constexpr, SMOOTH: tl.constexpr, TEACHER: tl.constexpr,
    QP: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    s = tl.load(params_ptr + P_SCALE)
    neg_inf = float("-inf")
    if MODE == 1:
        bias = tl.load(params_ptr + P_BIAS)
    plane = n_prog * Nb
    # this program's row of each column-partial plane: [lse, (sum), (teacher lse, teacher-weighted mean)]
    own = part_ptr + pid * Nb
    t_own = own + plane
    if SMOOTH:
        t_own += plane
    for rb in range(pid, n_rb, n_prog):
        r = tl.arange(0, BI * QP)
        img_flat = (rb * BI + r // QP).to(tl.int64)
        q_flat = (r % QP).to(tl.int64)
        img = rb * BI + tl.arange(0, BI).to(tl.int64)
        row_ok = img < Na
        # the partials already hold earlier row blocks of this program (a block, not a scalar: Triton 3.9's
        # interpreter cannot load under a block mask combined with a scalar one)
        merge = (tl.zeros((BN,), tl.int32) + rb) >= n_prog
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
        for j0 in range(0, Nb, BN):
            cols = j0 + tl.arange(0, BN).to(tl.int64)
            col_ok = cols < Nb
            old_ok = col_ok & merge
            raw, _ = _raw_tile(a_ptr, b_ptr, img_flat, q_flat, cols, Na, Nb, Q, D, s_an, s_aq, s_ad, s_bn, s_bd,
                               QP, BI, BN, BK, DOT_FP32, IEEE)
            logits = s * raw
            valid = row_ok[:, None] & col_ok[None, :]
            is_diag = (img + diag_off)[:, None] == cols[None, :]
            if MODE == 0:
                lr = tl.where(col_ok[None, :], logits, neg_inf)
                m_new = tl.maximum(m_i, tl.max(lr, axis=1))  # finite: every block has a valid column
                l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(lr - m_new[:, None]), axis=1)
                m_i = m_new
                lz = tl.where(valid, logits, 0.0)
                diag_i += tl.sum(tl.where(is_diag, lz, 0.0), axis=1)
                if SMOOTH:
                    sum_i += tl.sum(lz, axis=1)
                if COLS:
                    lc = tl.where(row_ok[:, None], logits, neg_inf)
                    cm = tl.max(lc, axis=0)
                    cpart = cm + tl.log(tl.sum(tl.exp(lc - cm[None, :]), axis=0))
                    old = tl.load(own + cols, mask=old_ok, other=neg_inf)
                    tl.store(own + cols, _logaddexp(old, cpart), mask=col_ok)
                    if SMOOTH:
                        old = tl.load(own + plane + cols, mask=old_ok, other=0.0)
                        tl.store(own + plane + cols, old + tl.sum(lz, axis=0), mask=col_ok)
                if TEACHER:
                    traw, _ = _raw_tile(at_ptr, bt_ptr, img_flat, q_flat, cols, Na, Nb, Q, D,
                                        s_tan, s_taq, s_tad, s_tbn, s_tbd, QP, BI, BN, BK, DOT_FP32, IEEE)
                    t = s * traw
                    tr = tl.where(col_ok[None, :], t, neg_inf)
                    tm_new = tl.maximum(tm_i, tl.max(tr, axis=1))
                    alpha_ = tl.exp(tm_i - tm_new)
                    e = tl.exp(tr - tm_new[:, None])
                    tl_i = tl_i * alpha_ + tl.sum(e, axis=1)
                    w_i = w_i * alpha_ + tl.sum(e * lz, axis=1)
                    tm_i = tm_new
                    if COLS:
                        tc = tl.where(row_ok[:, None], t, neg_inf)
                        tcm = tl.max(tc, axis=0)
                        ec = tl.exp(tc - tcm[None, :])
                        tsum = tl.sum(ec, axis=0)
                        tlse = tcm + tl.log(tsum)
                        w_x = tl.sum(ec * lz, axis=0) / tsum
                        # merge (teacher lse, teacher-weighted mean) pairs: weights exp(lse - merged lse)
                        old_lse = tl.load(t_own + cols, mask=old_ok, other=neg_inf)
                        new_lse = _logaddexp(old_lse, tlse)
                        tl.store(t_own + cols, new_lse, mask=col_ok)
                        old_w = tl.load(t_own + plane + cols, mask=old_ok, other=0.0)
                        w_new = old_w * tl.exp(old_lse - new_lse) + w_x * tl.exp(tlse - new_lse)
                        tl.store(t_own + plane + cols, w_new, mask=col_ok)
            else:
                x = tl.where(is_diag, logits + bias, -(logits + bias))
                # -log sigmoid(x) = max(-x, 0) + log1p(exp(-|x|))
                nls = tl.maximum(-x, 0.0) + _log1p(tl.exp(-tl.abs(x)))
                loss_i += tl.sum(tl.where(valid, nls, 0.0), axis=1)
        if MODE == 0:
            tl.store(row_ptr + img, m_i + tl.log(l_i), mask=row_ok)
            tl.store(row_ptr + Na + img, sum_i, mask=row_ok)
            tl.store(row_ptr + 2 * Na + img, diag_i, mask=row_ok)
            if TEACHER:
                tl.store(row_ptr + 3 * Na + img, tm_i + tl.log(tl_i), mask=row_ok)
                tl.store(row_ptr + 4 * Na + img, w_i / tl_i, mask=row_ok)
        else:
            tl.store(row_ptr + img, loss_i, mask=row_ok)


@triton.jit
def _contrastive_colreduce_kernel(
    part_ptr,  # *fp32 [K, n_part, Nb] from the forward
    col_ptr,  # *fp32 [4, Nb]: lse, sum, teacher lse, teacher-weighted mean
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
    tbase = part_ptr + plane
    if SMOOTH:
        tbase += plane
    for p in range(0, n_part):
        x = tl.load(part_ptr + p * Nb + cols, mask=ok, other=0.0)
        m_new = tl.maximum(m, x)
        e = e * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        if SMOOTH:
            total += tl.load(part_ptr + plane + p * Nb + cols, mask=ok, other=0.0)
        if TEACHER:
            tx = tl.load(tbase + p * Nb + cols, mask=ok, other=0.0)
            wx = tl.load(tbase + plane + p * Nb + cols, mask=ok, other=0.0)
            tm_new = tl.maximum(tm, tx)
            scale_old = tl.exp(tm - tm_new)
            scale_new = tl.exp(tx - tm_new)
            te = te * scale_old + scale_new
            w = w * scale_old + scale_new * wx
            tm = tm_new
    tl.store(col_ptr + cols, m + tl.log(e), mask=ok)
    tl.store(col_ptr + Nb + cols, total, mask=ok)
    if TEACHER:
        tl.store(col_ptr + 2 * Nb + cols, tm + tl.log(te), mask=ok)
        tl.store(col_ptr + 3 * Nb + cols, w / te, mask=ok)
    else:  # defined values (zeros) for the statistics this variant does not have
        tl.store(col_ptr + 2 * Nb + cols, total * 0.0, mask=ok)
        tl.store(col_ptr + 3 * Nb + cols, total * 0.0, mask=ok)


@triton.jit
def _grad_tile(logits, t, img, cols, row_ok, col_ok, params_ptr, rvec_ptr, cvec_ptr, Na, Nb, diag_off,
               MODE: tl.constexpr, COLS: tl.constexpr, TEACHER: tl.constexpr):
    """G_ij = d loss / d L_ij on one tile (zero outside the valid rows and columns).

    rvec: [3, Na] (lse, teacher lse, coefficient) per row; cvec: the same per column (COLS).
    MODE 0: G = c_i (p_ij - t_ij) + c_j (p'_ij - t'_ij) with p, p' the row / column softmax and t, t'
    the row / column targets (1-α)((1-ε)δ_ij + ε/M) + α q_ij. MODE 1: G = c_i (-z σ(-z L)).
    """
    is_diag = (img + diag_off)[:, None] == cols[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    cr = tl.load(rvec_ptr + 2 * Na + img, mask=row_ok, other=0.0)
    if MODE == 0:
        alpha = tl.load(params_ptr + P_ALPHA)
        dcoef = tl.load(params_ptr + P_DIAG)
        lse_r = tl.load(rvec_ptr + img, mask=row_ok, other=0.0)
        g = cr[:, None] * (tl.exp(logits - lse_r[:, None]) - tl.load(params_ptr + P_UNIF_ROW))
        diag_c = cr
        if TEACHER:
            tlse_r = tl.load(rvec_ptr + Na + img, mask=row_ok, other=0.0)
            g -= cr[:, None] * alpha * tl.exp(t - tlse_r[:, None])
        if COLS:
            cc = tl.load(cvec_ptr + 2 * Nb + cols, mask=col_ok, other=0.0)
            lse_c = tl.load(cvec_ptr + cols, mask=col_ok, other=0.0)
            g += cc[None, :] * (tl.exp(logits - lse_c[None, :]) - tl.load(params_ptr + P_UNIF_COL))
            if TEACHER:
                tlse_c = tl.load(cvec_ptr + Nb + cols, mask=col_ok, other=0.0)
                g -= cc[None, :] * alpha * tl.exp(t - tlse_c[None, :])
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
    """(BI, BN) gradient -> (BI*QP, BN) on the flattened (image, query) rows: only the arg-max query."""
    if QP == 1:
        return g
    else:
        qidx = tl.arange(0, QP)
        g3 = tl.where(qidx[None, :, None] == arg[:, None, :], g[:, None, :], 0.0)
        return tl.reshape(g3, (BI * QP, BN))


@triton.jit
def _contrastive_bwd_da_kernel(
    a_ptr, b_ptr, at_ptr, bt_ptr, params_ptr, rvec_ptr, cvec_ptr,
    da_ptr,  # [Na, Q, D] (Q = 1: [Na, D]) contiguous, input dtype
    red_ptr,  # *fp32 [2, n_row_blocks]: partial sums of G * raw (d scale) and of G (d bias)
    Na, Nb, Q, D, n_rb, diag_off,
    s_an, s_aq, s_ad, s_bn, s_bd, s_tan, s_taq, s_tad, s_tbn, s_tbd,
    MODE: tl.constexpr, COLS: tl.constexpr, TEACHER: tl.constexpr,
    QP: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, EMULATE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = tl.arange(0, BI * QP)
    img_flat = (pid * BI + r // QP).to(tl.int64)
    q_flat = (r % QP).to(tl.int64)
    img = pid * BI + tl.arange(0, BI).to(tl.int64)
    row_ok = img < Na
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
        raw, arg = _raw_tile(a_ptr, b_ptr, img_flat, q_flat, cols, Na, Nb, Q, D, s_an, s_aq, s_ad, s_bn, s_bd,
                             QP, BI, BN, BK, DOT_FP32, IEEE)
        t = raw
        if TEACHER:
            traw, _ = _raw_tile(at_ptr, bt_ptr, img_flat, q_flat, cols, Na, Nb, Q, D,
                                s_tan, s_taq, s_tad, s_tbn, s_tbd, QP, BI, BN, BK, DOT_FP32, IEEE)
            t = s * traw
        g = _grad_tile(s * raw, t, img, cols, row_ok, col_ok, params_ptr, rvec_ptr, cvec_ptr, Na, Nb,
                       diag_off, MODE, COLS, TEACHER)
        if pid_d == 0:
            red_scale += tl.sum(tl.where(g != 0.0, g * raw, 0.0), axis=1)  # raw is -inf nowhere valid
            red_bias += tl.sum(g, axis=1)
        gq = _expand_queries(g * gscale, arg, QP, BI, BN)
        y = tl.load(b_ptr + cols[:, None] * s_bn + d[None, :] * s_bd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            gq = round_to(gq, y.dtype, EMULATE).to(tl.float32)
            y = y.to(tl.float32)
        else:
            gq = gq.to(y.dtype)
        if IEEE:
            acc = tl.dot(gq, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(gq, y, acc)
    out_ok = (img_flat < Na) & (q_flat < Q)
    tl.store(da_ptr + (img_flat[:, None] * Q + q_flat[:, None]) * D + d[None, :],
             round_to((s / gscale) * acc, da_ptr.dtype.element_ty, EMULATE), mask=out_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        tl.store(red_ptr + pid, tl.sum(red_scale, axis=0))
        tl.store(red_ptr + n_rb + pid, tl.sum(red_bias, axis=0))


@triton.jit
def _contrastive_bwd_db_kernel(
    a_ptr, b_ptr, at_ptr, bt_ptr, params_ptr, rvec_ptr, cvec_ptr,
    db_ptr,  # [Nb, D] contiguous, input dtype
    Na, Nb, Q, D, diag_off,
    s_an, s_aq, s_ad, s_bn, s_bd, s_tan, s_taq, s_tad, s_tbn, s_tbd,
    MODE: tl.constexpr, COLS: tl.constexpr, TEACHER: tl.constexpr,
    QP: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, EMULATE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid * BN + tl.arange(0, BN).to(tl.int64)
    col_ok = cols < Nb
    s = tl.load(params_ptr + P_SCALE)
    gscale = tl.load(params_ptr + P_GSCALE)
    d = pid_d * BD + tl.arange(0, BD).to(tl.int64)
    d_ok = d < D
    acc = tl.zeros((BN, BD), dtype=tl.float32)
    r = tl.arange(0, BI * QP)
    for i0 in range(0, Na, BI):
        img_flat = (i0 + r // QP).to(tl.int64)
        q_flat = (r % QP).to(tl.int64)
        img = i0 + tl.arange(0, BI).to(tl.int64)
        row_ok = img < Na
        raw, arg = _raw_tile(a_ptr, b_ptr, img_flat, q_flat, cols, Na, Nb, Q, D, s_an, s_aq, s_ad, s_bn, s_bd,
                             QP, BI, BN, BK, DOT_FP32, IEEE)
        t = raw
        if TEACHER:
            traw, _ = _raw_tile(at_ptr, bt_ptr, img_flat, q_flat, cols, Na, Nb, Q, D,
                                s_tan, s_taq, s_tad, s_tbn, s_tbd, QP, BI, BN, BK, DOT_FP32, IEEE)
            t = s * traw
        g = _grad_tile(s * raw, t, img, cols, row_ok, col_ok, params_ptr, rvec_ptr, cvec_ptr, Na, Nb,
                       diag_off, MODE, COLS, TEACHER)
        gq = _expand_queries(g * gscale, arg, QP, BI, BN)
        x = tl.load(a_ptr + img_flat[:, None] * s_an + q_flat[:, None] * s_aq + d[None, :] * s_ad,
                    mask=((img_flat < Na) & (q_flat < Q))[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            gq = round_to(gq, x.dtype, EMULATE).to(tl.float32)
            x = x.to(tl.float32)
        else:
            gq = gq.to(x.dtype)
        if IEEE:
            acc = tl.dot(tl.trans(gq), x, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(gq), x, acc)
    tl.store(db_ptr + cols[:, None] * D + d[None, :], round_to((s / gscale) * acc, db_ptr.dtype.element_ty, EMULATE),
             mask=col_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration
#
# Forward: R = 128 flattened rows x BN = 64 columns per tile, K loop of 64 over D, 8 warps: the tile and its
# fp32 temporaries (logits, exp, teacher) stay in registers (checked by the compile gate): 150-250 registers
# a thread, so one program fills an SM, and the forward launches one program per SM (PER_SM), each looping
# over row blocks (P = SM count rows of column partials: O(Nb) memory; the same throughput as one program
# per row block, which would run in waves of one per SM). With a teacher (two logits tiles and the teacher's
# column merge) 64 columns spill on sm_90: 32.
#
# Backward: 64 x 32 tiles and a D chunk of at most 512 in the accumulator (64 x 512 fp32 over 8 warps: 128
# registers a thread), so CLIP's D = 512 needs one pass; D > 512 recomputes the logits tile once per chunk
# (D = 768: twice). With a teacher the K step is 32 (64 spills on sm_80 with Triton 3.6), in the forward too
# (see block_k). The backward kernels are built for one program per SM and pass maxnreg=255: Triton 3.6's
# ptxas otherwise caps some of them (db with a 256 chunk) at 128 registers for a second program per SM, and
# spills. The fp32 backward (4 warps) goes without it: with it, ptxas took 255 registers and spilled.
#
# fp32 inputs (exact "ieee" dots, twice the operand bytes) use half-size tiles (forward: 128 registers, two
# programs per SM; K step 16: 32 spills on 3.6).
#
# Every entry compiles without spills for sm_80 and sm_90 on Triton 3.6, 3.8 and 3.9 (the compile gate).

_CONFIGS = {
    "16bit": dict(BK=64, BK_TEACHER=32,
                  fwd=dict(R=128, BN=64, BN_TEACHER=32, num_warps=8, num_stages=2, PER_SM=1),
                  bwd=dict(R=64, BN=32, BD_MAX=512, num_warps=8, num_stages=2, maxnreg=255)),
    "fp32": dict(BK=16, BK_TEACHER=16,
                 fwd=dict(R=64, BN=32, BN_TEACHER=32, num_warps=8, num_stages=2, PER_SM=2),
                 bwd=dict(R=32, BN=32, BD_MAX=128, num_warps=4, num_stages=2, maxnreg=None)),
}


def _config(dtype):
    return _CONFIGS["fp32" if dtype == torch.float32 else "16bit"]


_COLREDUCE_BLOCK = 512  # columns per program of the partial-merging kernel (a stream, 4 warps)
# Under the interpreter (tests), two forward programs: a test-sized batch already makes a program loop
# over several row blocks and merge its column partials.
_INTERPRETER_ROW_PROGRAMS = 2

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_SIG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _empty(*args, **kwargs):
    """Every output the kernels write is allocated here (tests fill it with NaN to catch gaps)."""
    return torch.empty(*args, **kwargs)


def _next_pow2(x):
    return 1 << max(0, (int(x) - 1).bit_length())


def row_programs(n_rb, device, cfg):
    """Forward programs: as many as fit on the GPU at once (capped by the row blocks there are)."""
    if device.type != "cuda":
        return min(n_rb, _INTERPRETER_ROW_PROGRAMS)
    return min(n_rb, cfg["PER_SM"] * torch.cuda.get_device_properties(device).multi_processor_count)


def fwd_block_n(cfg, teacher):
    return cfg["BN_TEACHER"] if teacher else cfg["BN"]


def block_k(dtype, teacher):
    """The K step of the logits tile: one per dtype (and teacher) for the forward and the backward, so the
    backward's recomputed logits are the forward's, summed in the same order, bit for bit."""
    cfg = _config(dtype)
    return cfg["BK_TEACHER"] if teacher else cfg["BK"]


def row_block(R, QP):
    """Images per block: R flattened rows, at least one image (QP > R: one image of QP rows)."""
    return max(1, R // QP)


def bwd_block_d(D, cfg):
    return max(16, min(cfg["BD_MAX"], _next_pow2(D)))


def _strides3(x):
    # a: (N, D) or (N, Q, D) -> (s_n, s_q, s_d)
    return (x.stride(0), x.stride(1), x.stride(2)) if x.dim() == 3 else (x.stride(0), 0, x.stride(1))


def _interp():
    from .._dispatch import interpreting

    return interpreting()


def _forward_launch(a, b, at, bt, params, mode, cols, smooth, diag_off):
    """Row statistics [5, Na] (MODE 1: [1, Na]) and column statistics [4, Nb] (reduced partials)."""
    Na, Nb, D = a.shape[0], b.shape[0], a.shape[-1]
    Q = a.shape[1] if a.dim() == 3 else 1
    QP = _next_pow2(Q)
    cfg = _config(a.dtype)["fwd"]
    BI = row_block(cfg["R"], QP)
    n_rb = triton.cdiv(Na, BI)
    teacher = at is not None
    dev = a.device
    rows = _empty((5 if mode == MODE_SOFTMAX else 1, Na), device=dev, dtype=torch.float32)
    k = 1 + int(smooth) + 2 * int(teacher)
    n_prog = row_programs(n_rb, dev, cfg)
    part = _empty((k, n_prog, Nb) if cols else (1,), device=dev, dtype=torch.float32)
    at_, bt_ = (at, bt) if teacher else (a, b)
    _contrastive_fwd_kernel[(n_prog,)](
        a, b, at_, bt_, params, rows, part, Na, Nb, Q, D, n_rb, diag_off,
        *_strides3(a), b.stride(0), b.stride(1), *_strides3(at_), bt_.stride(0), bt_.stride(1),
        MODE=mode, COLS=cols, SMOOTH=smooth, TEACHER=teacher, QP=QP, BI=BI, BN=fwd_block_n(cfg, teacher),
        BK=block_k(a.dtype, teacher),
        DOT_FP32=_interp(), IEEE=a.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    colstats = None
    if cols:
        colstats = _empty((4, Nb), device=dev, dtype=torch.float32)
        _contrastive_colreduce_kernel[(triton.cdiv(Nb, _COLREDUCE_BLOCK),)](
            part, colstats, n_prog, Nb, SMOOTH=smooth, TEACHER=teacher, BLOCK=_COLREDUCE_BLOCK, num_warps=4)
    return rows, colstats


def _backward_launch(a, b, at, bt, params, rvec, cvec, mode, cols, need_da, need_db, diag_off):
    """(da, db, sum of G*raw, sum of G); da / db None when not needed."""
    Na, Nb, D = a.shape[0], b.shape[0], a.shape[-1]
    Q = a.shape[1] if a.dim() == 3 else 1
    QP = _next_pow2(Q)
    cfg = _config(a.dtype)["bwd"]
    BI = row_block(cfg["R"], QP)
    BD = bwd_block_d(D, cfg)
    teacher = at is not None
    at_, bt_ = (at, bt) if teacher else (a, b)
    common = dict(MODE=mode, COLS=cols, TEACHER=teacher, QP=QP, BI=BI, BN=cfg["BN"], BK=block_k(a.dtype, teacher),
                  BD=BD,
                  DOT_FP32=_interp(), IEEE=a.dtype == torch.float32, EMULATE=_interp(),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=cfg["maxnreg"])
    strides = (*_strides3(a), b.stride(0), b.stride(1), *_strides3(at_), bt_.stride(0), bt_.stride(1))
    n_rb = triton.cdiv(Na, BI)
    da = _empty(a.shape, device=a.device, dtype=a.dtype)
    red = _empty((2, n_rb), device=a.device, dtype=torch.float32)
    # the da kernel also produces the scale / bias reductions, so it always runs (one D chunk if unused)
    grid_a = (n_rb, triton.cdiv(D, BD) if need_da else 1)
    _contrastive_bwd_da_kernel[grid_a](a, b, at_, bt_, params, rvec, cvec, da, red, Na, Nb, Q, D, n_rb, diag_off,
                                       *strides, **common)
    db = None
    if need_db:
        db = _empty(b.shape, device=b.device, dtype=b.dtype)
        grid_b = (triton.cdiv(Nb, cfg["BN"]), triton.cdiv(D, BD))
        _contrastive_bwd_db_kernel[grid_b](a, b, at_, bt_, params, rvec, cvec, db, Na, Nb, Q, D, diag_off, *strides, **common)
    return (da if need_da else None), db, red[0].double().sum().float(), red[1].double().sum().float()


# ----------------------------------------------------------------------------------------------
# Custom ops: torch.compile sees opaque calls with fake shapes (the launchers read data pointers and
# strides, which fake tensors do not have); the autograd Function around them (in __init__.py) is
# plain PyTorch. Absent outputs are 0-element tensors (custom ops return no None).


@torch.library.custom_op("mmfast::contrastive_fwd", mutates_args=())
def _contrastive_fwd_op(a: torch.Tensor, b: torch.Tensor, at: Optional[torch.Tensor], bt: Optional[torch.Tensor],
                        params: torch.Tensor, mode: int, cols: bool, smooth: bool,
                        diag_off: int) -> Tuple[torch.Tensor, torch.Tensor]:
    rows, colstats = _forward_launch(a, b, at, bt, params, mode, cols, smooth, diag_off)
    return rows, (colstats if colstats is not None else rows.new_empty(0))


@_contrastive_fwd_op.register_fake
def _(a, b, at, bt, params, mode, cols, smooth, diag_off):
    rows = a.new_empty((5 if mode == MODE_SOFTMAX else 1, a.shape[0]), dtype=torch.float32)
    return rows, (rows.new_empty((4, b.shape[0])) if cols else rows.new_empty(0))


@torch.library.custom_op("mmfast::contrastive_bwd", mutates_args=())
def _contrastive_bwd_op(a: torch.Tensor, b: torch.Tensor, at: Optional[torch.Tensor], bt: Optional[torch.Tensor],
                        params: torch.Tensor, rvec: torch.Tensor, cvec: torch.Tensor, mode: int, cols: bool,
                        need_da: bool, need_db: bool, diag_off: int
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    da, db, d_scale, d_bias = _backward_launch(a, b, at, bt, params, rvec, cvec, mode, cols, need_da, need_db, diag_off)
    return (da if da is not None else a.new_empty(0)), (db if db is not None else b.new_empty(0)), d_scale, d_bias


@_contrastive_bwd_op.register_fake
def _(a, b, at, bt, params, rvec, cvec, mode, cols, need_da, need_db, diag_off):
    scalar = params.new_empty(())
    return (a.new_empty(a.shape) if need_da else a.new_empty(0), b.new_empty(b.shape) if need_db else b.new_empty(0),
            scalar, params.new_empty(()))


def forward(a, b, at, bt, params, *, mode, cols, smooth, diag_off=0):
    """Row statistics [5, Na] (MODE 1: [1, Na]) and column statistics [4, Nb] or None."""
    rows, colstats = _contrastive_fwd_op(a, b, at, bt, params, mode, cols, smooth, diag_off)
    return rows, (colstats if cols else None)


def backward(a, b, at, bt, params, rvec, cvec, *, mode, cols, need_da, need_db, diag_off=0):
    """(da, db, sum of G*raw, sum of G); da / db None when not needed."""
    da, db, d_scale, d_bias = _contrastive_bwd_op(a, b, at, bt, params, rvec, cvec, mode, cols, need_da, need_db,
                                                  diag_off)
    return (da if need_da else None), (db if need_db else None), d_scale, d_bias


# ----------------------------------------------------------------------------------------------
# AOT compile specs


def _signature(names_ptr, names_int, constexprs, dtype):
    sig = {}
    for n in names_ptr:
        sig[n] = "*" + ("fp32" if n in ("params_ptr", "row_ptr", "part_ptr", "red_ptr", "rvec_ptr", "cvec_ptr") else _SIG[dtype])
    for n in names_int:
        sig[n] = "i64"
    for n in constexprs:
        sig[n] = "constexpr"
    return sig


_STRIDES = ("s_an", "s_aq", "s_ad", "s_bn", "s_bd", "s_tan", "s_taq", "s_tad", "s_tbn", "s_tbd")

# (label, mode, cols, smooth, teacher, Q): CLIP, MoCo (rows only), the heaviest softmax variant
# (smoothing + teacher), BLIP-2 (Q = 32) and SigLIP. Other flag combinations only remove work.
VARIANTS = (
    ("clip", MODE_SOFTMAX, True, False, False, 1),
    ("moco", MODE_SOFTMAX, False, False, False, 1),
    ("smooth+teacher", MODE_SOFTMAX, True, True, True, 1),
    ("blip2-q32", MODE_SOFTMAX, True, False, False, 32),
    ("siglip", MODE_SIGMOID, False, False, False, 1),
)


# What Triton's JIT specialises for contiguous features with D a multiple of 16 (the shapes that matter:
# 512, 768, 1024): unit feature strides become constexpr 1, pointers and the other strides are 16-aligned.
_UNIT_STRIDES = dict(s_ad=1, s_bd=1, s_tad=1, s_tbd=1)
_DIVISIBLE = ("a_ptr", "b_ptr", "at_ptr", "bt_ptr", "params_ptr", "row_ptr", "part_ptr", "rvec_ptr", "cvec_ptr",
              "da_ptr", "db_ptr", "red_ptr", "s_an", "s_aq", "s_bn", "s_tan", "s_taq", "s_tbn", "D")


def _spec(kernel, ptrs, ints, constexprs, dtype, **kw):
    constexprs = {**constexprs, **_UNIT_STRIDES}
    ints = tuple(n for n in ints if n not in _UNIT_STRIDES)
    return CompileSpec(kernel=kernel, signature=_signature(ptrs, ints, constexprs, dtype), constexprs=constexprs,
                       divisibility={n: 16 for n in _DIVISIBLE if n in ptrs + ints}, **kw)


def compile_specs():
    """Forward, da and db kernels for every variant above, bf16 (plus fp16 / fp32 for CLIP), at the
    launch configs the launchers use (the largest D chunk the backward picks), and the column merge."""
    for smooth, teacher in ((False, False), (True, True)):
        c = dict(SMOOTH=smooth, TEACHER=teacher, BLOCK=_COLREDUCE_BLOCK)
        yield CompileSpec(kernel=_contrastive_colreduce_kernel,
                          signature={"part_ptr": "*fp32", "col_ptr": "*fp32", "n_part": "i64", "Nb": "i64",
                                     "SMOOTH": "constexpr", "TEACHER": "constexpr", "BLOCK": "constexpr"},
                          constexprs=c, num_warps=4, divisibility={"part_ptr": 16, "col_ptr": 16},
                          label=f"smooth={smooth} teacher={teacher} BLOCK={_COLREDUCE_BLOCK}")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        cfg = _config(dtype)
        fwd, bwd = cfg["fwd"], cfg["bwd"]
        for label, mode, cols, smooth, teacher, Q in VARIANTS:
            if dtype != torch.bfloat16 and label != "clip":
                continue
            QP = _next_pow2(Q)
            ieee = dtype == torch.float32
            tag = f"{label} {_SIG[dtype]}"
            fwd_c = dict(MODE=mode, COLS=cols, SMOOTH=smooth, TEACHER=teacher, QP=QP, BI=row_block(fwd["R"], QP),
                         BN=fwd_block_n(fwd, teacher), BK=block_k(dtype, teacher), DOT_FP32=False, IEEE=ieee)
            yield _spec(
                _contrastive_fwd_kernel, ("a_ptr", "b_ptr", "at_ptr", "bt_ptr", "params_ptr", "row_ptr", "part_ptr"),
                ("Na", "Nb", "Q", "D", "n_rb", "diag_off") + _STRIDES, fwd_c, dtype,
                num_warps=fwd["num_warps"], num_stages=fwd["num_stages"],
                label=f"{tag} R={fwd['R']} BN={fwd_c['BN']} BK={fwd_c['BK']}")
            bwd_c = dict(MODE=mode, COLS=cols, TEACHER=teacher, QP=QP, BI=row_block(bwd["R"], QP), BN=bwd["BN"],
                         BK=block_k(dtype, teacher), BD=bwd["BD_MAX"], DOT_FP32=False, IEEE=ieee, EMULATE=False)
            common = dict(num_warps=bwd["num_warps"], num_stages=bwd["num_stages"],
                          options={"maxnreg": bwd["maxnreg"]} if bwd["maxnreg"] else None,
                          label="")
            # the largest D chunk everywhere; the smaller chunks small D picks, for plain bf16 CLIP
            chunks = (bwd["BD_MAX"], 64, 128, 256) if (label, dtype) == ("clip", torch.bfloat16) else (bwd["BD_MAX"],)
            for bd in chunks:
                c = dict(bwd_c, BD=bd)
                common["label"] = f"{tag} R={bwd['R']} BN={bwd['BN']} BK={c['BK']} BD={bd}"
                yield _spec(_contrastive_bwd_da_kernel, ("a_ptr", "b_ptr", "at_ptr", "bt_ptr", "params_ptr",
                                                         "rvec_ptr", "cvec_ptr", "da_ptr", "red_ptr"),
                            ("Na", "Nb", "Q", "D", "n_rb", "diag_off") + _STRIDES, c, dtype, **common)
                yield _spec(_contrastive_bwd_db_kernel, ("a_ptr", "b_ptr", "at_ptr", "bt_ptr", "params_ptr",
                                                         "rvec_ptr", "cvec_ptr", "db_ptr"),
                            ("Na", "Nb", "Q", "D", "diag_off") + _STRIDES, c, dtype, **common)
