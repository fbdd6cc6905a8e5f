"""Flash attention forward: online softmax over the visible KV blocks of each query block.

One program per (query tile, batch x query head). It walks the block mask's list of full KV blocks
(no mask work at all) and then its list of partial ones (per-element row-range, padding and
sequence-end masks). Scores live in the log2 domain (softmax scale x log2 e folded into one multiply,
exp2), accumulators are fp32, and a row that sees no key keeps m = -inf, l = 0 and ends with output 0
and LSE -inf instead of NaN. The kernel writes the base-2 LSE, which the backward uses as is.
"""
import triton
import triton.language as tl

from .._common import round_to

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _dot_operand(x, DOT_FP32: tl.constexpr):
    """Under the interpreter, bf16 tl.dot is wrong: feed it the same values as fp32 (exact products)."""
    if DOT_FP32:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    k_ptr, v_ptr, kT_offs, v_offs, stride_kn, stride_vn,
    idx_ptr, num,
    offs_n, offs_d, row_lo, row_hi, kpm_ptr, stride_kpmn, seqlen_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, DOT_FP32: tl.constexpr, EMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # tile-local offsets stay int32 (small); the tile's start goes into the 64-bit scalar pointer
    STEPS: tl.constexpr = MASK_N // BLOCK_N
    d_ok = offs_d < HEAD_DIM
    for t in range(0, num * STEPS):
        n_block = tl.load(idx_ptr + t // STEPS)
        start_n = n_block * MASK_N + (t % STEPS) * BLOCK_N
        kT_ptrs = k_ptr + start_n.to(tl.int64) * stride_kn + (offs_n[None, :] * stride_kn + offs_d[:, None])
        v_ptrs = v_ptr + start_n.to(tl.int64) * stride_vn + (offs_n[:, None] * stride_vn + offs_d[None, :])
        cols = start_n + offs_n
        if MASKED:
            col_ok = cols < seqlen_k
            kT = tl.load(kT_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, _dot_operand(kT, DOT_FP32), input_precision=PRECISION) * qk_scale
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
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        p_low = round_to(p, v.dtype, EMULATE)
        acc = acc * alpha[:, None] + tl.dot(_dot_operand(p_low, DOT_FP32), _dot_operand(v, DOT_FP32),
                                            input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, RowLo, RowHi, KPM, CuQ, CuK,
    FullNum, FullIdx, PartNum, PartIdx,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    stride_rb, stride_kpmb, stride_kpmn,
    stride_nb, stride_ib, stride_im,
    seqlen_q, seqlen_k, num_heads, group, qk_scale,
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
        k_base = k_off * stride_kn
        v_base = k_off * stride_vn
        o_base = q_off * stride_om
        l_base = q_off
        r_base = q_off
    else:
        q_base = b.to(tl.int64) * stride_qb
        k_base = b.to(tl.int64) * stride_kb
        v_base = b.to(tl.int64) * stride_vb
        o_base = b.to(tl.int64) * stride_ob
        l_base = b.to(tl.int64) * stride_lb
        r_base = b.to(tl.int64) * stride_rb
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    m_block = start_m // MASK_M
    offs_mt = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_mt
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    q_ptr = Q + q_base + h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qm
    q = _dot_operand(tl.load(q_ptr + offs_mt[:, None] * stride_qm + offs_d[None, :],
                             mask=row_ok[:, None] & d_ok[None, :], other=0.0), DOT_FP32)
    k_ptr = K + k_base + kv_h.to(tl.int64) * stride_kh
    v_ptr = V + v_base + kv_h.to(tl.int64) * stride_vh
    kT_offs = offs_n[None, :] * stride_kn + offs_d[:, None]
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :]
    kpm_ptr = KPM + b.to(tl.int64) * stride_kpmb
    row_lo = tl.load(RowLo + r_base + offs_m, mask=row_ok, other=0)
    row_hi = tl.load(RowHi + r_base + offs_m, mask=row_ok, other=0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    meta = b.to(tl.int64) * stride_nb + m_block
    idx = b.to(tl.int64) * stride_ib + m_block.to(tl.int64) * stride_im
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_ptr, v_ptr, kT_offs, v_offs, stride_kn, stride_vn, FullIdx + idx, tl.load(FullNum + meta),
        offs_n, offs_d, row_lo, row_hi, kpm_ptr, stride_kpmn, seqlen_k, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, MASK_N, False, HAS_KPM, DOT_FP32, EMULATE, PRECISION,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_ptr, v_ptr, kT_offs, v_offs, stride_kn, stride_vn, PartIdx + idx, tl.load(PartNum + meta),
        offs_n, offs_d, row_lo, row_hi, kpm_ptr, stride_kpmn, seqlen_k, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, MASK_N, True, HAS_KPM, DOT_FP32, EMULATE, PRECISION,
    )
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # base-2 LSE (the backward's unit, saved without a round trip through ln); the op returns lse·ln 2
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = (Out + o_base + h.to(tl.int64) * stride_oh + start_m.to(tl.int64) * stride_om
              + offs_mt[:, None] * stride_om + offs_d[None, :])
    tl.store(o_ptrs, round_to(out, Out.dtype.element_ty, EMULATE), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + l_base + h.to(tl.int64) * stride_lh + offs_m, lse, mask=row_ok)
