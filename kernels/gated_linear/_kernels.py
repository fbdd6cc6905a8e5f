"""The Triton kernels of tanh_gated_linear. backend="triton": the forward GEMM with the gated-residual
epilogue and the two backward GEMMs (d_a; d_W with d_bias and the gate's gradient in its epilogue), launched
by _launch.py. backend="gemm": the elementwise / reduction passes around cuBLAS's GEMMs (the forward's
epilogue, the backward's pass over dy, the pass over dyᵀ a), launched by _gemm.py. Tiles from _configs.py;
the math is in the package docstring (kernels/gated_linear/__init__.py).

Every dot goes through ``_common.dot`` (PRECISION: IEEE or TF32 fp32 dots by torch's matmul setting;
EMULATE: the interpreter's workarounds) and every rounding of an fp32 value to a 16-bit dtype through
``_common.round_to`` (round to nearest even, also under the interpreter).
"""
import triton
import triton.language as tl

from .._common import dot, round_to


@triton.jit
def _grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """(row tile, column tile) of program `pid`, walking GROUP row tiles per column sweep so that the
    column operand tiles a group reads stay in L2 (the Triton matmul tutorial's swizzle)."""
    in_group = GROUP * num_cols
    group = pid // in_group
    first_row = group * GROUP
    size = tl.minimum(num_rows - first_row, GROUP)
    row = first_row + ((pid % in_group) % size)
    col = (pid % in_group) // size
    return row, col


@triton.jit
def tanh_gated_linear_fwd_kernel(
    a_ptr, w_ptr, bias_ptr, s_ptr, res_ptr, row_mask_ptr, out_ptr,  # s = tanh(gate), fp32, (1,) or (N,)
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr,
    SCALAR_GATE: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M, N) = residual + s · (a Wᵀ + bias), rows of the row mask = residual."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    # 64-bit offsets only for the tile's origin; offsets inside a tile stay 32-bit (cheap pointer math)
    m0 = (pid_m * BLOCK_M).to(tl.int64)
    n0 = (pid_n * BLOCK_N).to(tl.int64)
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    lk = tl.arange(0, BLOCK_K)
    mask_m = pid_m * BLOCK_M + lm < M
    mask_n = pid_n * BLOCK_N + ln < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    if HAS_ROW_MASK:
        # a tile whose rows are all masked (text before the first image) skips its GEMM
        dead = tl.load(row_mask_ptr + m0 + lm, mask=mask_m, other=1) != 0
        k_tiles = tl.where(tl.min(dead.to(tl.int32), axis=0) == 1, 0, k_tiles)
    a_ptrs = a_ptr + m0 * stride_am + (lm[:, None] * stride_am + lk[None, :] * stride_ak)
    w_ptrs = w_ptr + n0 * stride_wn + (lk[:, None] * stride_wk + ln[None, :] * stride_wn)  # Wᵀ tile (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, k_tiles):
        k_left = K - kt * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (lk[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(lk[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = dot(a, w, acc, PRECISION, EMULATE)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    # epilogue: bias, gate, residual, row mask in fp32; one rounding to the output dtype
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n0 + ln, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SCALAR_GATE:
        upd = acc * tl.load(s_ptr)
    else:
        upd = acc * tl.load(s_ptr + n0 + ln, mask=mask_n, other=0.0)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    res_ptrs = res_ptr + (m0 * stride_rm + n0 * stride_rn) + (lm[:, None] * stride_rm + ln[None, :] * stride_rn)
    res = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    out = res + upd
    if HAS_ROW_MASK:
        out = tl.where(dead[:, None], res, out)  # exactly the residual, even where the update is not finite
    out_ptrs = out_ptr + (m0 * N + n0) + (lm[:, None] * N + ln[None, :])  # out is allocated contiguous
    tl.store(out_ptrs, round_to(out, OUT_DTYPE, EMULATE), mask=mask)


@triton.jit
def tanh_gated_linear_bwd_da_kernel(
    dy_ptr, w_ptr, s_ptr, row_mask_ptr, da_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_wn, stride_wk,
    SCALAR_GATE: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    IN_DTYPE: tl.constexpr,
    CAST_DY: tl.constexpr,  # dy (the output's dtype, fp32) is wider than the GEMM inputs
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the reduction dimension here
    GROUP_M: tl.constexpr,
):
    """d_a (M, K) = (dy · s) @ W, rows of masked tokens 0."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    rows = offs_m.to(tl.int64)
    ks = offs_k.to(tl.int64)
    n_tiles = tl.cdiv(N, BLOCK_N)
    if HAS_ROW_MASK:
        dead = tl.load(row_mask_ptr + rows, mask=mask_m, other=1) != 0
        n_tiles = tl.where(tl.min(dead.to(tl.int32), axis=0) == 1, 0, n_tiles)  # a whole masked tile: no GEMM
    dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + ks[None, :] * stride_wk  # W tile (BN, BK)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for nt in range(0, n_tiles):
        n_left = N - nt * BLOCK_N
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & (offs_n[None, :] < n_left), other=0.0)
        if not SCALAR_GATE:
            # a per-channel scale cannot move past the reduction over N: scale dy in the prologue and
            # round it to the input dtype, as the MMA wants (PyTorch rounds dy·tanh g the same way)
            s = tl.load(s_ptr + nt * BLOCK_N + offs_n, mask=offs_n < n_left, other=0.0)
            dy = round_to(dy.to(tl.float32) * s[None, :], IN_DTYPE, EMULATE)
        elif CAST_DY:  # an fp32 output over 16-bit GEMM inputs: round dy for the MMA
            dy = round_to(dy.to(tl.float32), IN_DTYPE, EMULATE)
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < n_left) & mask_k[None, :], other=0.0)
        acc = dot(dy, w, acc, PRECISION, EMULATE)
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn
    if SCALAR_GATE:  # a scalar gate moves past the reduction: one multiply of the fp32 accumulator
        acc = acc * tl.load(s_ptr)
    if HAS_ROW_MASK:
        acc = tl.where(dead[:, None], 0.0, acc)
    mask = mask_m[:, None] & mask_k[None, :]
    tl.store(da_ptr + rows[:, None] * K + ks[None, :], round_to(acc, IN_DTYPE, EMULATE), mask=mask)


@triton.jit
def tanh_gated_linear_bwd_dw_kernel(
    dy_ptr, a_ptr, w_ptr, bias_ptr, s_ptr, row_mask_ptr, dw_ptr, dbias_ptr, part_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_am, stride_ak, stride_wn, stride_wk,
    HAS_BIAS: tl.constexpr,
    SCALAR_GATE: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    NEED_DGATE: tl.constexpr,
    IN_DTYPE: tl.constexpr,
    CAST_DY: tl.constexpr,  # dy (the output's dtype, fp32) is wider than the GEMM inputs
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # the reduction dimension here
    GROUP_N: tl.constexpr,
):
    """G = dyᵀ a over the live rows; d_W = s·G; d_bias = s·Σ_m dy (first K tile);
    part[k tile, n] = Σ_k W ⊙ G (+ b·Σ_m dy in the first K tile): the gate gradient's partial sums."""
    # K = 0 still runs one column of programs (d_bias, the bias part of the gate gradient)
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.maximum(tl.cdiv(K, BLOCK_K), 1), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_k = offs_k < K
    cols = offs_n.to(tl.int64)
    ks = offs_k.to(tl.int64)
    first_k = pid_k == 0
    dyt_ptrs = dy_ptr + cols[:, None] * stride_dyn + offs_m[None, :].to(tl.int64) * stride_dym  # dyᵀ (BN, BM)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak  # (BM, BK)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        live = (m0 + offs_m) < M
        if HAS_ROW_MASK:  # masked rows contribute to no gradient: load them as 0
            live = live & (tl.load(row_mask_ptr + m0 + offs_m, mask=live, other=1) == 0)
        dyt = tl.load(dyt_ptrs, mask=mask_n[:, None] & live[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=live[:, None] & mask_k[None, :], other=0.0)
        if CAST_DY:
            acc = dot(round_to(dyt.to(tl.float32), IN_DTYPE, EMULATE), a, acc, PRECISION, EMULATE)
        else:
            acc = dot(dyt, a, acc, PRECISION, EMULATE)
        if NEED_DBIAS or (NEED_DGATE and HAS_BIAS):
            if first_k:  # one column of programs sums dy over the rows
                colsum += tl.sum(dyt.to(tl.float32), axis=1)
        dyt_ptrs += BLOCK_M * stride_dym
        a_ptrs += BLOCK_M * stride_am
    if SCALAR_GATE:
        s = tl.load(s_ptr)
    else:
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    if NEED_DW:
        if SCALAR_GATE:
            dw = acc * s
        else:
            dw = acc * s[:, None]
        mask = mask_n[:, None] & mask_k[None, :]
        tl.store(dw_ptr + cols[:, None] * K + ks[None, :], round_to(dw, IN_DTYPE, EMULATE), mask=mask)
    if NEED_DBIAS:
        if first_k:
            tl.store(dbias_ptr + offs_n, round_to(colsum * s, IN_DTYPE, EMULATE), mask=mask_n)
    if NEED_DGATE:
        # Σ_m dy ⊙ (a Wᵀ + b) per channel, from G already in registers: Σ_k W ⊙ G (+ b · Σ_m dy)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        part = tl.sum(acc * w.to(tl.float32), axis=1)
        if HAS_BIAS:
            if first_k:
                part += colsum * tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(part_ptr + pid_k * N + offs_n, part, mask=mask_n)


# ----------------------------------------------------------------------------------------------
# The "gemm" backend (_gemm.py): cuBLAS runs the GEMMs, these kernels the parts around them. Each is one
# pass over its tensors; none has a dot.


@triton.jit
def tanh_gated_linear_epilogue_kernel(
    h_ptr, bias_ptr, s_ptr, res_ptr, row_mask_ptr, out_ptr,  # h = a Wᵀ, fp32, (M, N) contiguous
    M, N,
    stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr,
    SCALAR_GATE: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out (M, N) = residual + s · (h + bias), rows of the row mask = residual: the forward kernel's epilogue
    on cuBLAS's fp32 product."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)
    upd = tl.load(h_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        upd += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SCALAR_GATE:
        upd = upd * tl.load(s_ptr)
    else:
        upd = upd * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    res = tl.load(res_ptr + rows[:, None] * stride_rm + offs_n[None, :].to(tl.int64) * stride_rn, mask=mask,
                  other=0.0).to(tl.float32)
    out = res + upd
    if HAS_ROW_MASK:
        dead = tl.load(row_mask_ptr + rows, mask=mask_m, other=0) != 0
        out = tl.where(dead[:, None], res, out)  # exactly the residual, even where the update is not finite
    tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], round_to(out, OUT_DTYPE, EMULATE), mask=mask)


@triton.jit
def tanh_gated_linear_bwd_rows_kernel(
    dy_ptr, s_ptr, row_mask_ptr, dupd_ptr, dlive_ptr, colsum_ptr,
    M, N,
    stride_dym, stride_dyn,
    SCALAR_GATE: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    WRITE_UPDATE: tl.constexpr,  # d_update = dy·s over the live rows, in IN_DTYPE (d_a's GEMM operand)
    WRITE_LIVE: tl.constexpr,  # dy over the live rows, in IN_DTYPE (the operand of G = dyᵀ a)
    COLSUM: tl.constexpr,  # colsum[m tile, n] = Σ_m dy over the tile's live rows, fp32
    IN_DTYPE: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One pass over dy (M, N): the GEMM operands of the backward and the column partial sums for d_bias and
    the gate's gradient. Masked rows read as 0 (they contribute to no gradient, even a non-finite dy)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    live = offs_m < M
    rows = offs_m.to(tl.int64)
    if HAS_ROW_MASK:
        live = live & (tl.load(row_mask_ptr + rows, mask=live, other=1) == 0)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn,
                 mask=live[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if WRITE_UPDATE:
        # dy·s rounded once to the input dtype, as PyTorch rounds the gradient of tanh(g)·(a Wᵀ + b)
        if SCALAR_GATE:
            upd = dy * tl.load(s_ptr)
        else:
            upd = dy * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        tl.store(dupd_ptr + rows[:, None] * N + offs_n[None, :], round_to(upd, IN_DTYPE, EMULATE), mask=mask)
    if WRITE_LIVE:
        tl.store(dlive_ptr + rows[:, None] * N + offs_n[None, :], round_to(dy, IN_DTYPE, EMULATE), mask=mask)
    if COLSUM:
        tl.store(colsum_ptr + pid_m * N + offs_n, tl.sum(dy, axis=0), mask=mask_n)


@triton.jit
def tanh_gated_linear_bwd_weight_kernel(
    g_ptr, w_ptr, s_ptr, dw_ptr, part_ptr,  # g = dyᵀ a over the live rows, fp32, (N, K) contiguous
    N, K,
    stride_wn, stride_wk,
    SCALAR_GATE: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DGATE: tl.constexpr,
    IN_DTYPE: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """d_W = s·G rounded once; part[k tile, n] = Σ_k W ⊙ G over the tile: the gate gradient's partial sums
    (Σ_m dy ⊙ a Wᵀ = Σ_k W ⊙ dyᵀ a, see the package docstring)."""
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    cols = offs_n.to(tl.int64)
    g = tl.load(g_ptr + cols[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
    if NEED_DW:
        if SCALAR_GATE:
            dw = g * tl.load(s_ptr)
        else:
            dw = g * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        tl.store(dw_ptr + cols[:, None] * K + offs_k[None, :], round_to(dw, IN_DTYPE, EMULATE), mask=mask)
    if NEED_DGATE:
        w = tl.load(w_ptr + cols[:, None] * stride_wn + offs_k[None, :].to(tl.int64) * stride_wk, mask=mask,
                    other=0.0)
        tl.store(part_ptr + pid_k * N + offs_n, tl.sum(g * w.to(tl.float32), axis=1), mask=mask_n)
