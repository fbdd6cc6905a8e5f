"""Flash attention kernels: the forward, and the backward in three passes (Delta, dK/dV, dQ).

Every kernel runs one program per tile of one head of one batch entry: grid axis 0 the tiles, axis 1 the
heads, axis 2 the batch (each axis may reach 65535; B·H alone could exceed it). Which KV blocks a query
tile visits (and back) comes from the block mask (``_blockmask.py``): first its list of full blocks, read
without any mask work, then its partial ones, masked per element (row ranges, key padding, sequence end).

Scores ``s = scale · q·k`` are rounded as PyTorch rounds them; everything that follows works at the
magnitude of ``s - m`` (``m`` the row max), never at the magnitude of ``s`` (hundreds or thousands for
unnormalised features, where an fp32 ulp is 1e-4 - 1e-3 and would come back in every probability):
``p = exp2((s - m) · log2 e)``, and the forward saves each row's statistics apart, ``m`` and ``ln l``
(``l`` the sum of the ``p``), so that the backward recomputes ``p = exp2((s - m - ln l) · log2 e)`` without
ever forming the log-sum-exp ``m + ln l``. Accumulators are fp32. A row that sees no key keeps
``m = -inf``, ``l = 0``: output 0, log-sum-exp -inf, zero gradients, never NaN.

The backward is deterministic (no atomics): each dK/dV program owns one KV tile of one KV head and loops
over the query heads of its GQA group and the query blocks that see it (the block mask's transposed
lists); each dQ program owns one query tile and loops over its visible KV blocks. Both take the forward's
head-dim chunks (BLOCK_D2 > 0) where the launcher splits them (``_configs.bwd_block_d``); the Delta pass pads.
"""
import triton
import triton.language as tl

from .._common import LOG2E as _LOG2E
from .._common import dot, round_to

LOG2E = tl.constexpr(_LOG2E)


@triton.jit
def _sequence(b, cu_seqlens, seqlen, VARLEN: tl.constexpr):
    """Batch entry `b` on one side (queries or keys): (batch index, first row, number of rows).

    (B, L, H, D) tensors: batch `b`, rows from 0, `seqlen` rows. Packed (total, H, D) tensors: the batch
    index is 0 (the launcher passes batch strides 0 too) and the rows are cu_seqlens[b] .. cu_seqlens[b + 1].
    A tensor's offset is then ``batch * stride_xb + first * stride_xm``.
    """
    if VARLEN:
        first = tl.load(cu_seqlens + b).to(tl.int64)
        seqlen = (tl.load(cu_seqlens + b + 1) - first).to(tl.int32)
        batch = 0
    else:
        first = 0
        batch = b.to(tl.int64)
    return batch, first, seqlen


@triton.jit
def _row_stats(max_ptrs, logsum_ptrs, mask):
    """A row's softmax max and log-sum, for p = exp(s - max - logsum). A row that saw no key (max -inf) and
    a row past the sequence's end read max = +inf, so that their probabilities are 0, not exp(+inf)."""
    row_max = tl.load(max_ptrs, mask=mask, other=float("inf"))
    row_max = tl.where(row_max == float("-inf"), float("inf"), row_max)
    return row_max, tl.load(logsum_ptrs, mask=mask, other=0.0)


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(
    acc, acc2, l_i, m_i, q, q2, k_ptr, v_ptr, stride_kn, stride_vn, blocks, num_blocks,
    offs_n, offs_d, offs_d2, row_lo, row_hi, kpm_ptr, stride_kpmn, seqlen_k, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Online softmax over the KV blocks listed at `blocks` (MASKED: the partial ones, masked per element).
    BLOCK_D2 > 0: the head dim in two chunks, columns [0, BLOCK_D) (all inside HEAD_DIM) in q / acc and
    [BLOCK_D, BLOCK_D + BLOCK_D2) (masked at HEAD_DIM) in q2 / acc2; BLOCK_D2 = 0: q2 and acc2 are unused."""
    STEPS: tl.constexpr = MASK_N // BLOCK_N  # kernel tiles per mask tile
    HEAD_FULL: tl.constexpr = HEAD_DIM == BLOCK_D or BLOCK_D2 > 0  # no column of the first chunk is masked
    d_ok = offs_d < HEAD_DIM
    if BLOCK_D2 > 0:
        d2_ok = offs_d2 < HEAD_DIM
    for t in range(0, num_blocks * STEPS):
        start_n = tl.load(blocks + t // STEPS) * MASK_N + (t % STEPS) * BLOCK_N
        # the tile's start goes into the 64-bit scalar pointer; tile-local offsets stay int32
        kT_ptrs = k_ptr + start_n.to(tl.int64) * stride_kn + (offs_n[None, :] * stride_kn + offs_d[:, None])
        v_ptrs = v_ptr + start_n.to(tl.int64) * stride_vn + (offs_n[:, None] * stride_vn + offs_d[None, :])
        cols = start_n + offs_n
        if MASKED:
            col_ok = cols < seqlen_k
            if BLOCK_D2 > 0:
                kT = tl.load(kT_ptrs, mask=col_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
            else:
                kT = tl.load(kT_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_FULL:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if BLOCK_D2 > 0:
            kT2_ptrs = k_ptr + start_n.to(tl.int64) * stride_kn + (offs_n[None, :] * stride_kn + offs_d2[:, None])
            v2_ptrs = v_ptr + start_n.to(tl.int64) * stride_vn + (offs_n[:, None] * stride_vn + offs_d2[None, :])
            if MASKED:
                kT2 = tl.load(kT2_ptrs, mask=col_ok[None, :] & d2_ok[:, None], other=0.0)
                v2 = tl.load(v2_ptrs, mask=col_ok[:, None] & d2_ok[None, :], other=0.0)
            elif HEAD_DIM == BLOCK_D + BLOCK_D2:
                kT2 = tl.load(kT2_ptrs)
                v2 = tl.load(v2_ptrs)
            else:
                kT2 = tl.load(kT2_ptrs, mask=d2_ok[:, None], other=0.0)
                v2 = tl.load(v2_ptrs, mask=d2_ok[None, :], other=0.0)
            # both chunks' products summed in fp32 before the scale: one score, as one dot over D would give
            qk = dot(q2, kT2, dot(q, kT, None, PRECISION, EMULATE), PRECISION, EMULATE) * sm_scale
        else:
            qk = dot(q, kT, None, PRECISION, EMULATE) * sm_scale
        if MASKED:
            visible = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
            if HAS_KPM:
                padded = tl.load(kpm_ptr + cols * stride_kpmn, mask=col_ok, other=1)
                visible = visible & (padded == 0)[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # rows with nothing visible yet: subtract 0 instead of -inf so exp2 gives 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2((qk - m_use[:, None]) * LOG2E)
        alpha = tl.math.exp2((m_i - m_use) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if BLOCK_D2 > 0:
            p_in = round_to(p, v.dtype, EMULATE)
            acc = acc * alpha[:, None] + dot(p_in, v, None, PRECISION, EMULATE)
            acc2 = acc2 * alpha[:, None] + dot(p_in, v2, None, PRECISION, EMULATE)
        else:
            acc = acc * alpha[:, None] + dot(round_to(p, v.dtype, EMULATE), v, None, PRECISION, EMULATE)
        m_i = m_new
    return acc, acc2, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, RowMax, RowLogSum, RowLo, RowHi, KPM, CuQ, CuK, FullNum, FullIdx, PartNum, PartIdx,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_statb, stride_stath, stride_rangeb, stride_kpmb, stride_kpmn, stride_numb, stride_idxb, stride_idxm,
    seqlen_q, seqlen_k, group, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    """Out = softmax(scale · Q Kᵀ) V over the visible keys; RowMax / RowLogSum: each row's m and ln l.

    BLOCK_D2 = 0: the head dim padded to BLOCK_D. BLOCK_D2 > 0: it is covered by a first chunk of BLOCK_D
    columns and a second of BLOCK_D2 (80 = 64 + 16, 96 = 64 + 32; see ``_configs.block_d_split``), so that the
    tensor cores do not multiply padding up to the next power of two; the statistics do not change."""
    tl.static_assert(MASK_M % BLOCK_M == 0)
    tl.static_assert(MASK_N % BLOCK_N == 0)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    batch, q_first, seqlen_q = _sequence(b, CuQ, seqlen_q, VARLEN)
    _, k_first, seqlen_k = _sequence(b, CuK, seqlen_k, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    kv_h = h // group
    offs_mt = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_mt
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    q_ptr = Q + batch * stride_qb + q_first * stride_qm + h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qm
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q = tl.load(q_ptr + offs_mt[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        q2 = tl.load(q_ptr + offs_mt[:, None] * stride_qm + offs_d2[None, :],
                     mask=row_ok[:, None] & (offs_d2 < HEAD_DIM)[None, :], other=0.0)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    else:
        q = tl.load(q_ptr + offs_mt[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
        offs_d2, q2, acc2 = offs_d, q, 0.0  # unused
    k_ptr = K + batch * stride_kb + k_first * stride_kn + kv_h.to(tl.int64) * stride_kh
    v_ptr = V + batch * stride_vb + k_first * stride_vn + kv_h.to(tl.int64) * stride_vh
    kpm_ptr = KPM + b.to(tl.int64) * stride_kpmb
    range_off = batch * stride_rangeb + q_first
    row_lo = tl.load(RowLo + range_off + offs_m, mask=row_ok, other=0)
    row_hi = tl.load(RowHi + range_off + offs_m, mask=row_ok, other=0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m_block = start_m // MASK_M
    num = b.to(tl.int64) * stride_numb + m_block
    idx = b.to(tl.int64) * stride_idxb + m_block.to(tl.int64) * stride_idxm
    acc, acc2, l_i, m_i = _fwd_inner(
        acc, acc2, l_i, m_i, q, q2, k_ptr, v_ptr, stride_kn, stride_vn, FullIdx + idx, tl.load(FullNum + num),
        offs_n, offs_d, offs_d2, row_lo, row_hi, kpm_ptr, stride_kpmn, seqlen_k, sm_scale,
        HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_N, MASK_N, False, HAS_KPM, PRECISION, EMULATE,
    )
    acc, acc2, l_i, m_i = _fwd_inner(
        acc, acc2, l_i, m_i, q, q2, k_ptr, v_ptr, stride_kn, stride_vn, PartIdx + idx, tl.load(PartNum + num),
        offs_n, offs_d, offs_d2, row_lo, row_hi, kpm_ptr, stride_kpmn, seqlen_k, sm_scale,
        HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_N, MASK_N, True, HAS_KPM, PRECISION, EMULATE,
    )
    empty = l_i == 0.0
    if BLOCK_D2 > 0:
        l_safe = tl.where(empty, 1.0, l_i)[:, None]
        o_ptrs = (Out + batch * stride_ob + q_first * stride_om + h.to(tl.int64) * stride_oh
                  + start_m.to(tl.int64) * stride_om + offs_mt[:, None] * stride_om)
        tl.store(o_ptrs + offs_d[None, :], round_to(acc / l_safe, Out.dtype.element_ty, EMULATE), mask=row_ok[:, None])
        tl.store(o_ptrs + offs_d2[None, :], round_to(acc2 / l_safe, Out.dtype.element_ty, EMULATE),
                 mask=row_ok[:, None] & (offs_d2 < HEAD_DIM)[None, :])
    else:
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        o_ptrs = (Out + batch * stride_ob + q_first * stride_om + h.to(tl.int64) * stride_oh
                  + start_m.to(tl.int64) * stride_om + offs_mt[:, None] * stride_om + offs_d[None, :])
        tl.store(o_ptrs, round_to(out, Out.dtype.element_ty, EMULATE), mask=row_ok[:, None] & d_ok[None, :])
    stat_off = batch * stride_statb + q_first + h.to(tl.int64) * stride_stath + offs_m
    tl.store(RowMax + stat_off, m_i, mask=row_ok)  # -inf on rows that saw nothing
    tl.store(RowLogSum + stat_off, tl.log(tl.where(empty, 1.0, l_i)), mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DOut, DLogSum, Delta, CuQ,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    stride_statb, stride_stath,
    seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """Delta = rowsum(O·dO) − dLSE, dLSE the gradient reaching the op's log-sum-exp (HAS_DLSE)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    batch, q_first, seqlen_q = _sequence(b, CuQ, seqlen_q, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + batch * stride_ob + q_first * stride_om + h.to(tl.int64) * stride_oh + rows * stride_om
                + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DOut + batch * stride_dob + q_first * stride_dom + h.to(tl.int64) * stride_doh + rows * stride_dom
                 + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stat_off = batch * stride_statb + q_first + h.to(tl.int64) * stride_stath + offs_m
    if HAS_DLSE:
        # DLogSum is the gradient of ln l, the log-sum-exp less the (constant) row max: dS_ij += P_ij · dlogsum
        delta -= tl.load(DLogSum + stat_off, mask=offs_m < seqlen_q, other=0.0)
    tl.store(Delta + stat_off, delta, mask=offs_m < seqlen_q)


@triton.jit
def _d_masks(ok, d_ok, d2_ok, BLOCK_D2: tl.constexpr, MASKED: tl.constexpr):
    """The masks of a tile over the head dim and of its second chunk, broadcast to the tile's orientation: `ok`
    (rows or keys) where MASKED, and the columns inside HEAD_DIM (all of them in a split tile's first chunk).
    Computed before the pointers, as the padded kernels always did: that order is part of their register count."""
    if BLOCK_D2 > 0:
        mask = ok
        mask2 = ok & d2_ok if MASKED else d2_ok
    else:
        mask = ok & d_ok if MASKED else d_ok
        mask2 = mask
    return mask, mask2


@triton.jit
def _load_d(ptrs, ptrs2, mask, mask2, BLOCK_D2: tl.constexpr, MASKED: tl.constexpr):
    """A tile over the head dim with _d_masks' masks: padded (BLOCK_D2 = 0, returned twice) or its two chunks
    (a split tile's first chunk is unmasked unless MASKED)."""
    if BLOCK_D2 > 0:
        if MASKED:
            x = tl.load(ptrs, mask=mask, other=0.0)
        else:
            x = tl.load(ptrs)
        x2 = tl.load(ptrs2, mask=mask2, other=0.0)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0)
        x2 = x
    return x, x2


@triton.jit
def _store_d(ptrs, ptrs2, x, x2, mask, mask2, BLOCK_D2: tl.constexpr, EMULATE: tl.constexpr):
    """Stores a tile over the head dim as _load_d reads it, rounded to the pointers' element type."""
    tl.store(ptrs, round_to(x, ptrs.dtype.element_ty, EMULATE), mask=mask)
    if BLOCK_D2 > 0:
        tl.store(ptrs2, round_to(x2, ptrs2.dtype.element_ty, EMULATE), mask=mask2)


@triton.jit
def _dot_d(a, b, a2, b2, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """a · b contracted over the head dim; split (BLOCK_D2 > 0), the second chunks' product accumulates onto the
    first's in fp32, as one dot over the whole head dim would."""
    if BLOCK_D2 > 0:
        return dot(a2, b2, dot(a, b, None, PRECISION, EMULATE), PRECISION, EMULATE)
    else:
        return dot(a, b, None, PRECISION, EMULATE)


@triton.jit
def _dkdv_inner(
    dk, dk2, dv, dv2, k, k2, v, v2, q_ptrs0, q2_ptrs0, do_ptrs0, do2_ptrs0, stride_qm, stride_dom, max_ptr,
    logsum_ptr, delta_ptr, row_lo_ptr, row_hi_ptr, blocks, num_blocks, offs_n, offs_m0, offs_d, offs_d2, seqlen_q,
    kpm_keep, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr, MASK_M: tl.constexpr,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
):
    """dK and / or dV (NEED_DK, NEED_DV) of one KV tile from the query blocks listed at `blocks` (transposed:
    the tile's keys are rows). BLOCK_D2 > 0: the head dim's second chunk in k2, v2, dk2, dv2 (see the forward)."""
    STEPS: tl.constexpr = MASK_M // BLOCK_M  # kernel tiles per mask tile
    d_ok = offs_d < HEAD_DIM
    d2_ok = offs_d2 < HEAD_DIM
    for t in range(0, num_blocks * STEPS):
        start_m = tl.load(blocks + t // STEPS) * MASK_M + (t % STEPS) * BLOCK_M
        rows = start_m + offs_m0
        row_ok = rows < seqlen_q
        rows64 = rows.to(tl.int64)
        q_mask, q_mask2 = _d_masks(row_ok[None, :], d_ok[:, None], d2_ok[:, None], BLOCK_D2, True)
        qT, qT2 = _load_d(q_ptrs0 + rows64[None, :] * stride_qm, q2_ptrs0 + rows64[None, :] * stride_qm, q_mask,
                          q_mask2, BLOCK_D2, True)
        do_mask, do_mask2 = _d_masks(row_ok[:, None], d_ok[None, :], d2_ok[None, :], BLOCK_D2, True)
        do, do2 = _load_d(do_ptrs0 + rows64[:, None] * stride_dom, do2_ptrs0 + rows64[:, None] * stride_dom,
                          do_mask, do_mask2, BLOCK_D2, True)
        row_max, row_logsum = _row_stats(max_ptr + rows, logsum_ptr + rows, row_ok)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        qkT = _dot_d(k, qT, k2, qT2, BLOCK_D2, PRECISION, EMULATE)
        pT = tl.math.exp2((qkT * sm_scale - row_max[None, :] - row_logsum[None, :]) * LOG2E)
        if MASKED:
            lo = tl.load(row_lo_ptr + rows, mask=row_ok, other=0)
            hi = tl.load(row_hi_ptr + rows, mask=row_ok, other=0)
            visible = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] < hi[None, :])
            if HAS_KPM:
                visible = visible & kpm_keep[:, None]
            pT = tl.where(visible, pT, 0.0)
        if NEED_DV:
            pT_in = round_to(pT, do.dtype, EMULATE)
            dv += dot(pT_in, do, None, PRECISION, EMULATE)
            if BLOCK_D2 > 0:
                dv2 += dot(pT_in, do2, None, PRECISION, EMULATE)
        if NEED_DK:
            dpT = _dot_d(v, tl.trans(do), v2, tl.trans(do2), BLOCK_D2, PRECISION, EMULATE)
            dsT = pT * (dpT - delta[None, :])
            dsT_in = round_to(dsT, qT.dtype, EMULATE)
            dk += dot(dsT_in, tl.trans(qT), None, PRECISION, EMULATE)
            if BLOCK_D2 > 0:
                dk2 += dot(dsT_in, tl.trans(qT2), None, PRECISION, EMULATE)
    return dk, dk2, dv, dv2


@triton.jit
def _dkdv_heads(
    dk, dk2, dv, dv2, k, k2, v, v2, Q, DOut, RowMax, RowLogSum, Delta, RowLo, RowHi, FullIdx, PartIdx, full_num,
    part_num, batch, q_first, kv_h, group, range_off, stride_qb, stride_qm, stride_qh, stride_dob, stride_dom,
    stride_doh, stride_statb, stride_stath, offs_n, offs_m0, offs_d, offs_d2, seqlen_q, kpm_keep, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr, MASK_M: tl.constexpr,
    HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr, NEED_DK: tl.constexpr,
    NEED_DV: tl.constexpr,
):
    """dK and / or dV of one KV tile over the query heads of its GQA group: full query blocks, then partial."""
    for g in range(0, group):
        h = (kv_h * group + g).to(tl.int64)
        q_head = Q + batch * stride_qb + q_first * stride_qm + h * stride_qh
        q_ptrs0, q2_ptrs0 = q_head + offs_d[:, None], q_head + offs_d2[:, None]
        do_head = DOut + batch * stride_dob + q_first * stride_dom + h * stride_doh
        do_ptrs0, do2_ptrs0 = do_head + offs_d[None, :], do_head + offs_d2[None, :]
        stat_off = batch * stride_statb + q_first + h * stride_stath
        dk, dk2, dv, dv2 = _dkdv_inner(
            dk, dk2, dv, dv2, k, k2, v, v2, q_ptrs0, q2_ptrs0, do_ptrs0, do2_ptrs0, stride_qm, stride_dom,
            RowMax + stat_off, RowLogSum + stat_off, Delta + stat_off, RowLo + range_off, RowHi + range_off,
            FullIdx, full_num, offs_n, offs_m0, offs_d, offs_d2, seqlen_q, kpm_keep, sm_scale,
            HEAD_DIM, BLOCK_D2, BLOCK_M, MASK_M, False, HAS_KPM, PRECISION, EMULATE, NEED_DK, NEED_DV,
        )
        dk, dk2, dv, dv2 = _dkdv_inner(
            dk, dk2, dv, dv2, k, k2, v, v2, q_ptrs0, q2_ptrs0, do_ptrs0, do2_ptrs0, stride_qm, stride_dom,
            RowMax + stat_off, RowLogSum + stat_off, Delta + stat_off, RowLo + range_off, RowHi + range_off,
            PartIdx, part_num, offs_n, offs_m0, offs_d, offs_d2, seqlen_q, kpm_keep, sm_scale,
            HEAD_DIM, BLOCK_D2, BLOCK_M, MASK_M, True, HAS_KPM, PRECISION, EMULATE, NEED_DK, NEED_DV,
        )
    return dk, dk2, dv, dv2


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DOut, RowMax, RowLogSum, Delta, DK, DV, RowLo, RowHi, KPM, CuQ, CuK, FullNum, FullIdx, PartNum, PartIdx,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_statb, stride_stath, stride_rangeb, stride_kpmb, stride_kpmn, stride_numb, stride_idxb, stride_idxm,
    seqlen_q, seqlen_k, group, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr, SPLIT: tl.constexpr,
):
    """dK = scale · Σ dSᵀ Q and dV = Σ Pᵀ dO for one KV tile of one KV head, over its query heads and blocks.

    BLOCK_D2: the head dim padded to BLOCK_D (0) or in two chunks, as in the forward: Sᵀ and dPᵀ as sums of
    two dots, dK and dV as two accumulators each.
    SPLIT: two programs per KV tile, one accumulator each (even: dV, odd: dK; the grid's axis 0 doubles):
    half the live accumulator registers, where both would spill (D = 256 with wgmma), for one more dot
    (the dK program recomputes Qᵀ K) and a second read of Q and dO.
    """
    tl.static_assert(MASK_M % BLOCK_M == 0)
    tl.static_assert(MASK_N % BLOCK_N == 0)
    if SPLIT:
        pid_n = tl.program_id(0) // 2
        role = tl.program_id(0) % 2
    else:
        pid_n = tl.program_id(0)
    kv_h = tl.program_id(1)
    b = tl.program_id(2)
    batch, q_first, seqlen_q = _sequence(b, CuQ, seqlen_q, VARLEN)
    _, k_first, seqlen_k = _sequence(b, CuK, seqlen_k, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    else:
        offs_d2 = offs_d  # unused
    col_ok = offs_n < seqlen_k
    d_ok = offs_d < HEAD_DIM
    d2_ok = offs_d2 < HEAD_DIM
    cols = offs_n[:, None].to(tl.int64)
    kv_mask, kv_mask2 = _d_masks(col_ok[:, None], d_ok[None, :], d2_ok[None, :], BLOCK_D2, True)
    k_rows = K + batch * stride_kb + k_first * stride_kn + kv_h.to(tl.int64) * stride_kh + cols * stride_kn
    k, k2 = _load_d(k_rows + offs_d[None, :], k_rows + offs_d2[None, :], kv_mask, kv_mask2, BLOCK_D2, True)
    v_rows = V + batch * stride_vb + k_first * stride_vn + kv_h.to(tl.int64) * stride_vh + cols * stride_vn
    v, v2 = _load_d(v_rows + offs_d[None, :], v_rows + offs_d2[None, :], kv_mask, kv_mask2, BLOCK_D2, True)
    if HAS_KPM:
        kpm_keep = tl.load(KPM + b.to(tl.int64) * stride_kpmb + offs_n * stride_kpmn, mask=col_ok, other=1) == 0
    else:
        kpm_keep = col_ok
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    else:
        dk2, dv2 = dk, dv  # unused
    n_block = start_n // MASK_N
    num = b.to(tl.int64) * stride_numb + n_block
    idx = b.to(tl.int64) * stride_idxb + n_block.to(tl.int64) * stride_idxm
    full_num = tl.load(FullNum + num)
    part_num = tl.load(PartNum + num)
    range_off = batch * stride_rangeb + q_first
    if SPLIT:
        if role == 0:
            dk, dk2, dv, dv2 = _dkdv_heads(
                dk, dk2, dv, dv2, k, k2, v, v2, Q, DOut, RowMax, RowLogSum, Delta, RowLo, RowHi, FullIdx + idx,
                PartIdx + idx, full_num, part_num, batch, q_first, kv_h, group, range_off, stride_qb, stride_qm,
                stride_qh, stride_dob, stride_dom, stride_doh, stride_statb, stride_stath, offs_n, offs_m0, offs_d,
                offs_d2, seqlen_q, kpm_keep, sm_scale, HEAD_DIM, BLOCK_D2, BLOCK_M, MASK_M, HAS_KPM, PRECISION,
                EMULATE, False, True,
            )
            dv_rows = (DV + batch * stride_dvb + k_first * stride_dvn + kv_h.to(tl.int64) * stride_dvh
                       + cols * stride_dvn)
            _store_d(dv_rows + offs_d[None, :], dv_rows + offs_d2[None, :], dv, dv2, kv_mask, kv_mask2, BLOCK_D2,
                     EMULATE)
        else:
            dk, dk2, dv, dv2 = _dkdv_heads(
                dk, dk2, dv, dv2, k, k2, v, v2, Q, DOut, RowMax, RowLogSum, Delta, RowLo, RowHi, FullIdx + idx,
                PartIdx + idx, full_num, part_num, batch, q_first, kv_h, group, range_off, stride_qb, stride_qm,
                stride_qh, stride_dob, stride_dom, stride_doh, stride_statb, stride_stath, offs_n, offs_m0, offs_d,
                offs_d2, seqlen_q, kpm_keep, sm_scale, HEAD_DIM, BLOCK_D2, BLOCK_M, MASK_M, HAS_KPM, PRECISION,
                EMULATE, True, False,
            )
            dk_rows = (DK + batch * stride_dkb + k_first * stride_dkn + kv_h.to(tl.int64) * stride_dkh
                       + cols * stride_dkn)
            _store_d(dk_rows + offs_d[None, :], dk_rows + offs_d2[None, :], dk * sm_scale, dk2 * sm_scale,
                     kv_mask, kv_mask2, BLOCK_D2, EMULATE)
    else:
        dk, dk2, dv, dv2 = _dkdv_heads(
            dk, dk2, dv, dv2, k, k2, v, v2, Q, DOut, RowMax, RowLogSum, Delta, RowLo, RowHi, FullIdx + idx,
            PartIdx + idx, full_num, part_num, batch, q_first, kv_h, group, range_off, stride_qb, stride_qm,
            stride_qh, stride_dob, stride_dom, stride_doh, stride_statb, stride_stath, offs_n, offs_m0, offs_d,
            offs_d2, seqlen_q, kpm_keep, sm_scale, HEAD_DIM, BLOCK_D2, BLOCK_M, MASK_M, HAS_KPM, PRECISION,
            EMULATE, True, True,
        )
        dk_rows = DK + batch * stride_dkb + k_first * stride_dkn + kv_h.to(tl.int64) * stride_dkh + cols * stride_dkn
        _store_d(dk_rows + offs_d[None, :], dk_rows + offs_d2[None, :], dk * sm_scale, dk2 * sm_scale,
                 kv_mask, kv_mask2, BLOCK_D2, EMULATE)
        dv_rows = DV + batch * stride_dvb + k_first * stride_dvn + kv_h.to(tl.int64) * stride_dvh + cols * stride_dvn
        _store_d(dv_rows + offs_d[None, :], dv_rows + offs_d2[None, :], dv, dv2, kv_mask, kv_mask2, BLOCK_D2, EMULATE)


@triton.jit
def _dq_inner(
    dq, dq2, q, q2, do, do2, row_max, row_logsum, delta, row_lo, row_hi, k_ptrs0, k2_ptrs0, v_ptrs0, v2_ptrs0,
    stride_kn, stride_vn, kpm_ptr, stride_kpmn, blocks, num_blocks, offs_n, offs_d, offs_d2, seqlen_k, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    """dQ of one query tile from the KV blocks listed at `blocks` (BLOCK_D2 > 0: q2, do2, dq2 the second chunk)."""
    STEPS: tl.constexpr = MASK_N // BLOCK_N  # kernel tiles per mask tile
    d_ok = offs_d < HEAD_DIM
    d2_ok = offs_d2 < HEAD_DIM
    for t in range(0, num_blocks * STEPS):
        start_n = tl.load(blocks + t // STEPS).to(tl.int64) * MASK_N + (t % STEPS) * BLOCK_N
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        if BLOCK_D2 > 0:
            ld_mask, ld_mask2 = _d_masks(col_ok[None, :], d_ok[:, None], d2_ok[:, None], BLOCK_D2, MASKED)
            kT, kT2 = _load_d(k_ptrs0 + cols[None, :] * stride_kn, k2_ptrs0 + cols[None, :] * stride_kn, ld_mask,
                              ld_mask2, BLOCK_D2, MASKED)
            vT, vT2 = _load_d(v_ptrs0 + cols[None, :] * stride_vn, v2_ptrs0 + cols[None, :] * stride_vn, ld_mask,
                              ld_mask2, BLOCK_D2, MASKED)
        else:  # the padded kernel's own lines: through _load_d, ptxas sees other line info (+1 register on sm_80)
            ld_mask = col_ok[None, :] & d_ok[:, None] if MASKED else d_ok[:, None]
            kT = tl.load(k_ptrs0 + cols[None, :] * stride_kn, mask=ld_mask, other=0.0)
            vT = tl.load(v_ptrs0 + cols[None, :] * stride_vn, mask=ld_mask, other=0.0)
            kT2, vT2 = kT, vT  # unused
        qk = _dot_d(q, kT, q2, kT2, BLOCK_D2, PRECISION, EMULATE)
        p = tl.math.exp2((qk * sm_scale - row_max[:, None] - row_logsum[:, None]) * LOG2E)
        if MASKED:
            visible = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
            if HAS_KPM:
                padded = tl.load(kpm_ptr + cols * stride_kpmn, mask=col_ok, other=1)
                visible = visible & (padded == 0)[None, :]
            p = tl.where(visible, p, 0.0)
        dp = _dot_d(do, vT, do2, vT2, BLOCK_D2, PRECISION, EMULATE)
        ds = p * (dp - delta[:, None])
        ds_in = round_to(ds, kT.dtype, EMULATE)
        dq += dot(ds_in, tl.trans(kT), None, PRECISION, EMULATE)
        if BLOCK_D2 > 0:
            dq2 += dot(ds_in, tl.trans(kT2), None, PRECISION, EMULATE)
    return dq, dq2


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DOut, RowMax, RowLogSum, Delta, DQ, RowLo, RowHi, KPM, CuQ, CuK, FullNum, FullIdx, PartNum, PartIdx,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_statb, stride_stath, stride_rangeb, stride_kpmb, stride_kpmn, stride_numb, stride_idxb, stride_idxm,
    seqlen_q, seqlen_k, group, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    """dQ = scale · Σ dS K for one query tile of one head, over its visible KV blocks (BLOCK_D2: as dK/dV)."""
    tl.static_assert(MASK_M % BLOCK_M == 0)
    tl.static_assert(MASK_N % BLOCK_N == 0)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    batch, q_first, seqlen_q = _sequence(b, CuQ, seqlen_q, VARLEN)
    _, k_first, seqlen_k = _sequence(b, CuK, seqlen_k, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    kv_h = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    else:
        offs_d2 = offs_d  # unused
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    d2_ok = offs_d2 < HEAD_DIM
    rows = offs_m[:, None].to(tl.int64)
    ld, ld2 = _d_masks(row_ok[:, None], d_ok[None, :], d2_ok[None, :], BLOCK_D2, True)
    h64 = h.to(tl.int64)
    q_rows = Q + batch * stride_qb + q_first * stride_qm + h64 * stride_qh + rows * stride_qm
    q, q2 = _load_d(q_rows + offs_d[None, :], q_rows + offs_d2[None, :], ld, ld2, BLOCK_D2, True)
    do_rows = DOut + batch * stride_dob + q_first * stride_dom + h64 * stride_doh + rows * stride_dom
    do, do2 = _load_d(do_rows + offs_d[None, :], do_rows + offs_d2[None, :], ld, ld2, BLOCK_D2, True)
    stat_off = batch * stride_statb + q_first + h64 * stride_stath + offs_m
    row_max, row_logsum = _row_stats(RowMax + stat_off, RowLogSum + stat_off, row_ok)
    delta = tl.load(Delta + stat_off, mask=row_ok, other=0.0)
    range_off = batch * stride_rangeb + q_first
    row_lo = tl.load(RowLo + range_off + offs_m, mask=row_ok, other=0)
    row_hi = tl.load(RowHi + range_off + offs_m, mask=row_ok, other=0)
    k_head = K + batch * stride_kb + k_first * stride_kn + kv_h.to(tl.int64) * stride_kh
    k_ptrs0, k2_ptrs0 = k_head + offs_d[:, None], k_head + offs_d2[:, None]
    v_head = V + batch * stride_vb + k_first * stride_vn + kv_h.to(tl.int64) * stride_vh
    v_ptrs0, v2_ptrs0 = v_head + offs_d[:, None], v_head + offs_d2[:, None]
    kpm_ptr = KPM + b.to(tl.int64) * stride_kpmb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    else:
        dq2 = dq  # unused
    m_block = start_m // MASK_M
    num = b.to(tl.int64) * stride_numb + m_block
    idx = b.to(tl.int64) * stride_idxb + m_block.to(tl.int64) * stride_idxm
    dq, dq2 = _dq_inner(
        dq, dq2, q, q2, do, do2, row_max, row_logsum, delta, row_lo, row_hi, k_ptrs0, k2_ptrs0, v_ptrs0, v2_ptrs0,
        stride_kn, stride_vn, kpm_ptr, stride_kpmn, FullIdx + idx, tl.load(FullNum + num), offs_n, offs_d, offs_d2,
        seqlen_k, sm_scale, HEAD_DIM, BLOCK_D2, BLOCK_N, MASK_N, False, HAS_KPM, PRECISION, EMULATE,
    )
    dq, dq2 = _dq_inner(
        dq, dq2, q, q2, do, do2, row_max, row_logsum, delta, row_lo, row_hi, k_ptrs0, k2_ptrs0, v_ptrs0, v2_ptrs0,
        stride_kn, stride_vn, kpm_ptr, stride_kpmn, PartIdx + idx, tl.load(PartNum + num), offs_n, offs_d, offs_d2,
        seqlen_k, sm_scale, HEAD_DIM, BLOCK_D2, BLOCK_N, MASK_N, True, HAS_KPM, PRECISION, EMULATE,
    )
    dq *= sm_scale
    dq2 *= sm_scale
    dq_rows = DQ + batch * stride_dqb + q_first * stride_dqm + h64 * stride_dqh + rows * stride_dqm
    _store_d(dq_rows + offs_d[None, :], dq_rows + offs_d2[None, :], dq, dq2, ld, ld2, BLOCK_D2, EMULATE)
