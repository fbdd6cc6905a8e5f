"""Flash attention backward: Delta preprocess, dK/dV with the KV tile resident, dQ with the Q tile resident.

Deterministic, no atomics: each dK/dV program owns one KV tile of one KV head and loops over the query
heads of its GQA group and over the query blocks that see it (the block mask's transposed lists); each
dQ program owns one query tile and loops over its visible KV blocks. Probabilities are recomputed from
the saved base-2 LSE as exp2(s·log2e − lse₂); a row that saw nothing has LSE −inf, which is turned into
+inf here so its probabilities, dS and dQ are exactly 0.
"""
import triton
import triton.language as tl

from .._common import round_to
from ._fwd import _dot_operand


@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DOut, DLse, Delta,
    stride_ob, stride_om, stride_oh,
    stride_db, stride_dm, stride_dh,
    stride_lb, stride_lh,
    seqlen_q, num_heads, CuQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """Delta = rowsum(O·dO) − dLSE (dLSE: the gradient reaching the returned log-sum-exp, if any)."""
    pid_m = tl.program_id(0)
    # heads on grid axis 1 and batch on axis 2: each may reach 65535 (B·H alone could exceed it)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if VARLEN:
        q_off = tl.load(CuQ + b).to(tl.int64)
        seqlen_q = (tl.load(CuQ + b + 1) - q_off).to(tl.int32)
        o_base = q_off * stride_om
        d_base = q_off * stride_dm
        l_base = q_off
    else:
        o_base = b.to(tl.int64) * stride_ob
        d_base = b.to(tl.int64) * stride_db
        l_base = b.to(tl.int64) * stride_lb
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + o_base + h.to(tl.int64) * stride_oh + rows * stride_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DOut + d_base + h.to(tl.int64) * stride_dh + rows * stride_dm + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    l_ptrs = l_base + h.to(tl.int64) * stride_lh + offs_m
    if HAS_DLSE:
        # DLse is the gradient of the base-2 LSE: dS_ij += P_ij · dlse_natural = P_ij · dlse2 · log2(e)
        delta -= tl.load(DLse + l_ptrs, mask=offs_m < seqlen_q, other=0.0) * 1.4426950408889634
    tl.store(Delta + l_ptrs, delta, mask=offs_m < seqlen_q)


@triton.jit
def _lse_log2(lse):
    # lse is base 2 already; -inf (row saw nothing) -> +inf so that exp2(s - lse) is 0, not exp2(+inf)
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v,
    q_ptrs0, do_ptrs0, lse_ptr0, delta_ptr0, row_lo_ptr, row_hi_ptr, stride_qm, stride_dom,
    idx_ptr, num, offs_n, offs_m0, offs_d, seqlen_q, kpm_keep, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK_M: tl.constexpr,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, DOT_FP32: tl.constexpr, EMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    STEPS: tl.constexpr = MASK_M // BLOCK_M
    d_ok = offs_d < HEAD_DIM
    for t in range(0, num * STEPS):
        m_block = tl.load(idx_ptr + t // STEPS)
        start_m = m_block * MASK_M + (t % STEPS) * BLOCK_M
        rows = start_m + offs_m0
        row_ok = rows < seqlen_q
        rows64 = rows.to(tl.int64)
        qT = tl.load(q_ptrs0 + rows64[None, :] * stride_qm, mask=row_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(do_ptrs0 + rows64[:, None] * stride_dom, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse2 = _lse_log2(tl.load(lse_ptr0 + rows, mask=row_ok, other=float("inf")))
        delta = tl.load(delta_ptr0 + rows, mask=row_ok, other=0.0)
        qkT = tl.dot(k, _dot_operand(qT, DOT_FP32), input_precision=PRECISION)
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            lo = tl.load(row_lo_ptr + rows, mask=row_ok, other=0)
            hi = tl.load(row_hi_ptr + rows, mask=row_ok, other=0)
            visible = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] < hi[None, :])
            if HAS_KPM:
                visible = visible & kpm_keep[:, None]
            pT = tl.where(visible, pT, 0.0)
        do_op = _dot_operand(do, DOT_FP32)
        dv += tl.dot(_dot_operand(round_to(pT, do.dtype, EMULATE), DOT_FP32), do_op, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do_op), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(_dot_operand(round_to(dsT, qT.dtype, EMULATE), DOT_FP32), tl.trans(_dot_operand(qT, DOT_FP32)),
                     input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, RowLo, RowHi, KPM, CuQ, CuK,
    FullNum, FullIdx, PartNum, PartIdx,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    stride_rb, stride_kpmb, stride_kpmn,
    stride_nb, stride_ib, stride_im,
    seqlen_q, seqlen_k, num_kv_heads, group, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_FP32: tl.constexpr, EMULATE: tl.constexpr, PRECISION: tl.constexpr,
):
    tl.static_assert(MASK_M % BLOCK_M == 0)
    tl.static_assert(MASK_N % BLOCK_N == 0)
    pid_n = tl.program_id(0)
    kv_h = tl.program_id(1)
    b = tl.program_id(2)
    if VARLEN:
        q_off = tl.load(CuQ + b).to(tl.int64)
        seqlen_q = (tl.load(CuQ + b + 1) - q_off).to(tl.int32)
        k_off = tl.load(CuK + b).to(tl.int64)
        seqlen_k = (tl.load(CuK + b + 1) - k_off).to(tl.int32)
        q_base = q_off * stride_qm
        do_base = q_off * stride_dom
        k_base = k_off * stride_kn
        v_base = k_off * stride_vn
        dk_base = k_off * stride_dkn
        dv_base = k_off * stride_dvn
        l_base = q_off
        r_base = q_off
    else:
        q_base = b.to(tl.int64) * stride_qb
        do_base = b.to(tl.int64) * stride_dob
        k_base = b.to(tl.int64) * stride_kb
        v_base = b.to(tl.int64) * stride_vb
        dk_base = b.to(tl.int64) * stride_dkb
        dv_base = b.to(tl.int64) * stride_dvb
        l_base = b.to(tl.int64) * stride_lb
        r_base = b.to(tl.int64) * stride_rb
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    n_block = start_n // MASK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seqlen_k
    d_ok = offs_d < HEAD_DIM
    cols = offs_n[:, None].to(tl.int64)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + k_base + kv_h.to(tl.int64) * stride_kh + cols * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + v_base + kv_h.to(tl.int64) * stride_vh + cols * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    k = _dot_operand(k, DOT_FP32)
    v = _dot_operand(v, DOT_FP32)
    if HAS_KPM:
        kpm_keep = tl.load(KPM + b.to(tl.int64) * stride_kpmb + offs_n * stride_kpmn, mask=col_ok, other=1) == 0
    else:
        kpm_keep = col_ok
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    meta = b.to(tl.int64) * stride_nb + n_block
    idx = b.to(tl.int64) * stride_ib + n_block.to(tl.int64) * stride_im
    full_num = tl.load(FullNum + meta)
    part_num = tl.load(PartNum + meta)
    for g in range(0, group):
        h = (kv_h * group + g).to(tl.int64)
        q_ptrs0 = Q + q_base + h * stride_qh + offs_d[:, None]
        do_ptrs0 = DOut + do_base + h * stride_doh + offs_d[None, :]
        lse_ptr0 = Lse + l_base + h * stride_lh
        delta_ptr0 = Delta + l_base + h * stride_lh
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_ptrs0, do_ptrs0, lse_ptr0, delta_ptr0, RowLo + r_base, RowHi + r_base,
            stride_qm, stride_dom, FullIdx + idx, full_num, offs_n, offs_m0, offs_d, seqlen_q, kpm_keep, qk_scale,
            HEAD_DIM, BLOCK_M, MASK_M, False, HAS_KPM, DOT_FP32, EMULATE, PRECISION,
        )
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_ptrs0, do_ptrs0, lse_ptr0, delta_ptr0, RowLo + r_base, RowHi + r_base,
            stride_qm, stride_dom, PartIdx + idx, part_num, offs_n, offs_m0, offs_d, seqlen_q, kpm_keep, qk_scale,
            HEAD_DIM, BLOCK_M, MASK_M, True, HAS_KPM, DOT_FP32, EMULATE, PRECISION,
        )
    dk *= sm_scale
    tl.store(DK + dk_base + kv_h.to(tl.int64) * stride_dkh + cols * stride_dkn + offs_d[None, :],
             round_to(dk, DK.dtype.element_ty, EMULATE), mask=kv_mask)
    tl.store(DV + dv_base + kv_h.to(tl.int64) * stride_dvh + cols * stride_dvn + offs_d[None, :],
             round_to(dv, DV.dtype.element_ty, EMULATE), mask=kv_mask)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, row_lo, row_hi,
    k_ptrs0, v_ptrs0, stride_kn, stride_vn, kpm_ptr, stride_kpmn,
    idx_ptr, num, offs_n, offs_d, seqlen_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, DOT_FP32: tl.constexpr, EMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    STEPS: tl.constexpr = MASK_N // BLOCK_N
    d_ok = offs_d < HEAD_DIM
    for t in range(0, num * STEPS):
        n_block = tl.load(idx_ptr + t // STEPS)
        start_n = n_block.to(tl.int64) * MASK_N + (t % STEPS) * BLOCK_N
        cols = start_n + offs_n
        if MASKED:
            col_ok = cols < seqlen_k
            ld_mask = col_ok[None, :] & d_ok[:, None]
        else:
            ld_mask = d_ok[:, None]
        kT = tl.load(k_ptrs0 + cols[None, :] * stride_kn, mask=ld_mask, other=0.0)
        vT = tl.load(v_ptrs0 + cols[None, :] * stride_vn, mask=ld_mask, other=0.0)
        kT_op = _dot_operand(kT, DOT_FP32)
        qk = tl.dot(q, kT_op, input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            visible = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
            if HAS_KPM:
                padded = tl.load(kpm_ptr + cols * stride_kpmn, mask=col_ok, other=1)
                visible = visible & (padded == 0)[None, :]
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, _dot_operand(vT, DOT_FP32), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(_dot_operand(round_to(ds, kT.dtype, EMULATE), DOT_FP32), tl.trans(kT_op), input_precision=PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, RowLo, RowHi, KPM, CuQ, CuK,
    FullNum, FullIdx, PartNum, PartIdx,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    stride_rb, stride_kpmb, stride_kpmn,
    stride_nb, stride_ib, stride_im,
    seqlen_q, seqlen_k, num_heads, group, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_FP32: tl.constexpr, EMULATE: tl.constexpr, PRECISION: tl.constexpr,
):
    tl.static_assert(MASK_M % BLOCK_M == 0)
    tl.static_assert(MASK_N % BLOCK_N == 0)
    pid_m = tl.program_id(0)
    # heads on grid axis 1 and batch on axis 2: each may reach 65535 (B·H alone could exceed it)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kv_h = h // group
    if VARLEN:
        q_off = tl.load(CuQ + b).to(tl.int64)
        seqlen_q = (tl.load(CuQ + b + 1) - q_off).to(tl.int32)
        k_off = tl.load(CuK + b).to(tl.int64)
        seqlen_k = (tl.load(CuK + b + 1) - k_off).to(tl.int32)
        q_base = q_off * stride_qm
        do_base = q_off * stride_dom
        dq_base = q_off * stride_dqm
        k_base = k_off * stride_kn
        v_base = k_off * stride_vn
        l_base = q_off
        r_base = q_off
    else:
        q_base = b.to(tl.int64) * stride_qb
        do_base = b.to(tl.int64) * stride_dob
        dq_base = b.to(tl.int64) * stride_dqb
        k_base = b.to(tl.int64) * stride_kb
        v_base = b.to(tl.int64) * stride_vb
        l_base = b.to(tl.int64) * stride_lb
        r_base = b.to(tl.int64) * stride_rb
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    m_block = start_m // MASK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    rows = offs_m[:, None].to(tl.int64)
    ld = row_ok[:, None] & d_ok[None, :]
    h64 = h.to(tl.int64)
    q = _dot_operand(tl.load(Q + q_base + h64 * stride_qh + rows * stride_qm + offs_d[None, :], mask=ld, other=0.0), DOT_FP32)
    do = _dot_operand(tl.load(DOut + do_base + h64 * stride_doh + rows * stride_dom + offs_d[None, :], mask=ld, other=0.0),
                      DOT_FP32)
    lse2 = _lse_log2(tl.load(Lse + l_base + h64 * stride_lh + offs_m, mask=row_ok, other=float("inf")))
    delta = tl.load(Delta + l_base + h64 * stride_lh + offs_m, mask=row_ok, other=0.0)
    row_lo = tl.load(RowLo + r_base + offs_m, mask=row_ok, other=0)
    row_hi = tl.load(RowHi + r_base + offs_m, mask=row_ok, other=0)
    k_ptrs0 = K + k_base + kv_h.to(tl.int64) * stride_kh + offs_d[:, None]
    v_ptrs0 = V + v_base + kv_h.to(tl.int64) * stride_vh + offs_d[:, None]
    kpm_ptr = KPM + b.to(tl.int64) * stride_kpmb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    meta = b.to(tl.int64) * stride_nb + m_block
    idx = b.to(tl.int64) * stride_ib + m_block.to(tl.int64) * stride_im
    dq = _dq_inner(
        dq, q, do, lse2, delta, row_lo, row_hi, k_ptrs0, v_ptrs0, stride_kn, stride_vn, kpm_ptr, stride_kpmn,
        FullIdx + idx, tl.load(FullNum + meta), offs_n, offs_d, seqlen_k, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, MASK_N, False, HAS_KPM, DOT_FP32, EMULATE, PRECISION,
    )
    dq = _dq_inner(
        dq, q, do, lse2, delta, row_lo, row_hi, k_ptrs0, v_ptrs0, stride_kn, stride_vn, kpm_ptr, stride_kpmn,
        PartIdx + idx, tl.load(PartNum + meta), offs_n, offs_d, seqlen_k, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, MASK_N, True, HAS_KPM, DOT_FP32, EMULATE, PRECISION,
    )
    dq *= sm_scale
    tl.store(DQ + dq_base + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :], round_to(dq, DQ.dtype.element_ty, EMULATE),
             mask=ld)
