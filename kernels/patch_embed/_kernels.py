"""Triton kernels of the fused patch embedding: the forward GEMM with its epilogue, and the two
backward GEMMs (d_images, d_weight + d_bias).

Stride-P convolution with a P x P kernel is a GEMM over a permutation of the image: row = (sequence g,
token j), column = output channel d, reduction k = (c, py, px) in the weight's (D, C, P, P) order (or
(py, px, c) for channels-last images, so consecutive k hit consecutive addresses). The A operand is
gathered straight from the image through its strides; nothing is copied beforehand.

Row tiles of the forward launch: the first cdiv(G*M, BLOCK_M) cover the token rows [0, G*M) (through
the optional permutation `perm`, which puts rows needing the GEMM first so whole tiles of masked rows
skip the K loop); the [CLS] rows (one per sequence) follow in tiles of their own, in a separate branch
so their registers never overlap the GEMM's. A token row is one of:
- a GEMM row: acc + bias + position terms,
- a masked row (token_mask): mask_token + position terms, no pixel is read,
- a row of an unused tile (tile mask): zeros, nothing read.
"""
import triton
import triton.language as tl

from .._common import dot, round_to


@triton.jit
def _k_split(kp, C: tl.constexpr, P: tl.constexpr, CL_ORDER: tl.constexpr, RUN_LEN: tl.constexpr):
    """Reduction index -> (channel, row in patch, column in patch, index in run, valid).

    The reduction runs over runs of pixels that are contiguous in memory, each padded to RUN_LEN so that the
    compiler sees the contiguity (from kp % RUN_LEN) and vectorizes the gather; padded columns are masked
    off. NCHW: one run per (c, py), px in [0, P), RUN_LEN = next power of two >= P (14/16 of the MMA work
    for P = 14). Channels-last: one run per py over (px, c) interleaved, P*C values, RUN_LEN = P*C rounded
    up to 16 (48 for P = 16, C = 3: no padding; 48 for 42 with P = 14).
    """
    inner = kp % RUN_LEN
    run = kp // RUN_LEN
    if CL_ORDER:
        return inner % C, run, inner // C, inner, (inner < P * C) & (run < P)
    else:
        return run // P, run % P, inner, inner, (inner < P) & (run < C * P)


@triton.jit
def _k_offsets(c, py, px, inner, stride_c, stride_h, stride_w, CL_ORDER: tl.constexpr, DENSE: tl.constexpr,
               ALIGN: tl.constexpr):
    """Element offsets of reduction columns. DENSE (checked by the launcher: NCHW stride_w == 1;
    channels-last stride_c == 1 and stride_w == C) writes them as run base + index in run, which the
    compiler sees as contiguous; ALIGN > 1 also declares the run bases multiples of ALIGN (launcher-checked)."""
    if DENSE:
        if CL_ORDER:
            base = py * stride_h
        else:
            base = c * stride_c + py * stride_h
        if ALIGN > 1:
            base = tl.multiple_of(base, ALIGN)
        return base + inner
    else:
        return c * stride_c + py * stride_h + px * stride_w


@triton.jit
def _decode_token_rows(r, n_tok_rows, M, perm, src_idx, pos_idx, tok_mask, tile_used,
                       HAS_PERM: tl.constexpr, HAS_SRC: tl.constexpr, HAS_POS_IDX: tl.constexpr,
                       HAS_MASK: tl.constexpr, HAS_TILE_MASK: tl.constexpr):
    """Logical rows -> (flat token row g*M + j, g, j, source patch, position row, gemm?, masked?, used?),
    all int32 (the launcher checks that row counts fit); addresses are formed in int64 by the callers."""
    in_tok = r < n_tok_rows
    rr = tl.where(in_tok, r, 0)
    if HAS_PERM:
        rr = tl.load(perm + rr, mask=in_tok, other=0)
    g = rr // M
    j = rr % M
    src = j
    posj = j
    if HAS_SRC:
        src = tl.load(src_idx + rr, mask=in_tok, other=0)
    if HAS_POS_IDX:
        posj = tl.load(pos_idx + rr, mask=in_tok, other=0)
    masked = r < 0
    if HAS_MASK:
        masked = in_tok & (tl.load(tok_mask + rr, mask=in_tok, other=0) != 0)
    used = r >= 0
    if HAS_TILE_MASK:
        used = tl.load(tile_used + g, mask=in_tok, other=0) != 0
    gemm = in_tok & used & (masked == 0)
    return rr, g, j, src, posj, gemm, masked, used


@triton.jit
def _patch_embed_fwd_kernel(
    img, w, bias, pos, pos_cls, cls, mask_tok, tile_pos, pre_tile, ar_ids, coef,
    perm, src_idx, pos_idx, tok_mask, tile_used, out,
    G, M, T, GW, H, W, D, K, tile_pos_rows,
    stride_ib, stride_it, stride_ic, stride_ih, stride_iw,
    stride_wd, stride_wc, stride_wh, stride_ww,
    C: tl.constexpr, P: tl.constexpr, CL_ORDER: tl.constexpr, RUN_LEN: tl.constexpr, IMG_DENSE: tl.constexpr,
    ALIGN: tl.constexpr, PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_POS_CLS: tl.constexpr,
    HAS_CLS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PERM: tl.constexpr, HAS_SRC: tl.constexpr,
    HAS_POS_IDX: tl.constexpr, TILES: tl.constexpr, HAS_TILE_MASK: tl.constexpr,
    OUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    # consecutive programs share an A tile (pixels) across D tiles; the weight stays in L2
    pid_m = pid // num_n
    pid_n = pid % num_n
    # in-tile offsets stay int32 (cheap 2D address math); per-row bases are int64
    d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = d < D
    n_tok = G * M
    n_tok_tiles = tl.cdiv(n_tok, BLOCK_M)
    OFF: tl.constexpr = 1 if HAS_CLS else 0
    c_pos = 1.0
    if TILES:
        c_pos = tl.load(coef + 0)
        c_tile = tl.load(coef + 1)
        c_pre = tl.load(coef + 2)
    if pid_m >= n_tok_tiles:
        # [CLS] tiles (after the token tiles): cls + its position row (+ the tile's), no GEMM
        gc = (pid_m - n_tok_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        is_cls = gc < G
        gc = tl.where(is_cls, gc, 0)
        cm = is_cls[:, None] & d_ok[None, :]
        cv = tl.load(cls + d, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_POS_CLS:
            cv += c_pos * tl.load(pos_cls + d, mask=d_ok, other=0.0).to(tl.float32)
        val = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + cv[None, :]
        if TILES:
            arc = tl.load(ar_ids + gc // T, mask=is_cls, other=0)
            tpc = ((arc * T + gc % T).to(tl.int64) * tile_pos_rows) * D
            tpv = tl.load(tile_pos + tpc[:, None] + d[None, :], mask=cm, other=0.0)
            val += c_tile * tpv.to(tl.float32)
        if HAS_TILE_MASK:
            usedc = tl.load(tile_used + gc, mask=is_cls, other=0) != 0
            val = tl.where(usedc[:, None], val, 0.0)
        tl.store(out + (gc.to(tl.int64) * (M + OFF) * D)[:, None] + d[None, :], round_to(val, OUT_DTYPE, EMULATE),
                 mask=cm)
    else:
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr, g, j, src, posj, gemm, masked, used = _decode_token_rows(
            r, n_tok, M, perm, src_idx, pos_idx, tok_mask, tile_used,
            HAS_PERM, HAS_SRC, HAS_POS_IDX, HAS_MASK, HAS_TILE_MASK)
        gy0 = (src // GW) * P
        gx0 = (src % GW) * P
        row_off = ((g // T).to(tl.int64) * stride_ib + (g % T).to(tl.int64) * stride_it + gy0.to(tl.int64) * stride_ih
                   + gx0.to(tl.int64) * stride_iw)
        if ALIGN > 1:
            row_off = tl.multiple_of(row_off, ALIGN)
        a_rows = img + row_off
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # tiles without a single GEMM row (masked tokens sorted last, unused tiles) skip the loop
        K_PADDED: tl.constexpr = P * RUN_LEN if CL_ORDER else C * P * RUN_LEN
        any_gemm = tl.max(gemm.to(tl.int32), axis=0) > 0
        k_hi = tl.where(any_gemm, K_PADDED, 0)
        for k0 in range(0, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            c, py, px, inner, k_ok = _k_split(k, C, P, CL_ORDER, RUN_LEN)
            a_mask = gemm[:, None] & k_ok[None, :]
            if PAD:  # right/bottom zero padding: pixels past the image read as 0
                a_mask = a_mask & ((gy0[:, None] + py[None, :]) < H) & ((gx0[:, None] + px[None, :]) < W)
            a_cols = _k_offsets(c, py, px, inner, stride_ic, stride_ih, stride_iw, CL_ORDER, IMG_DENSE, ALIGN)
            a = tl.load(a_rows[:, None] + a_cols[None, :], mask=a_mask, other=0.0)
            # the launcher hands the weight over with dense pixel runs (a permuted copy if needed)
            w_off = d[None, :] * stride_wd + _k_offsets(c, py, px, inner, stride_wc, stride_wh, stride_ww, CL_ORDER,
                                                        True, 1)[:, None]
            b = tl.load(w + w_off, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc = dot(a, b, acc, PRECISION, EMULATE)

        # epilogue: bias for GEMM rows, mask token for masked rows, then the position terms; the rows are
        # decoded again (a few cached loads) rather than kept live in registers through the K loop
        rr, g, j, src, posj, gemm, masked, used = _decode_token_rows(
            r, n_tok, M, perm, src_idx, pos_idx, tok_mask, tile_used,
            HAS_PERM, HAS_SRC, HAS_POS_IDX, HAS_MASK, HAS_TILE_MASK)
        in_tok = r < n_tok
        tm = in_tok[:, None] & d_ok[None, :]
        if HAS_BIAS:
            bv = tl.load(bias + d, mask=d_ok, other=0.0).to(tl.float32)
            acc += tl.where(gemm[:, None], bv[None, :], 0.0)
        if HAS_MASK:
            mv = tl.load(mask_tok + d, mask=d_ok, other=0.0).to(tl.float32)
            acc = tl.where(masked[:, None], mv[None, :], acc)
        if TILES:
            tile = tl.load(ar_ids + g // T, mask=in_tok, other=0) * T + g % T
            tp_rows = (tile.to(tl.int64) * tile_pos_rows + 1 + posj) * D
            tp = tl.load(tile_pos + tp_rows[:, None] + d[None, :], mask=tm, other=0.0)
            acc += c_tile * tp.to(tl.float32)
            pt = tl.load(pre_tile + (tile.to(tl.int64) * D)[:, None] + d[None, :], mask=tm, other=0.0)
            acc += c_pre * pt.to(tl.float32)
        if HAS_POS:
            pv = tl.load(pos + (posj.to(tl.int64) * D)[:, None] + d[None, :], mask=tm, other=0.0)
            acc += c_pos * pv.to(tl.float32)
        if HAS_TILE_MASK:
            acc = tl.where(used[:, None], acc, 0.0)
        out_row = (g * (M + OFF) + OFF + j).to(tl.int64)
        tl.store(out + (out_row * D)[:, None] + d[None, :], round_to(acc, OUT_DTYPE, EMULATE), mask=tm)


@triton.jit
def _patch_embed_bwd_dx_kernel(
    dout, w, inv, tok_mask, tile_used, dimg,
    G, M, NP, T, GW, H, W, D, K,
    stride_ib, stride_it, stride_ic, stride_ih, stride_iw,
    stride_wd, stride_wc, stride_wh, stride_ww,
    C: tl.constexpr, P: tl.constexpr, CL_ORDER: tl.constexpr, RUN_LEN: tl.constexpr, IMG_DENSE: tl.constexpr,
    ALIGN: tl.constexpr, PAD: tl.constexpr, OFF: tl.constexpr, HAS_INV: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_TILE_MASK: tl.constexpr, OUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """d_images: rows = every image patch (g, p), columns = k; dA = dOut[token of (g, p)] @ W, stored
    through the image strides. Patches do not overlap and every patch is a row, so every pixel is
    written exactly once (zeros for patches no token read) and no accumulation is needed."""
    pid = tl.program_id(0)
    K_PADDED: tl.constexpr = P * RUN_LEN if CL_ORDER else C * P * RUN_LEN
    num_n = tl.cdiv(K_PADDED, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = r < G * NP
    g = tl.where(row_ok, r // NP, 0)
    p = tl.where(row_ok, r % NP, 0)
    j = p
    live = row_ok
    if HAS_INV:
        j = tl.load(inv + g * NP + p, mask=row_ok, other=-1)
        live = live & (j >= 0)
        j = tl.where(live, j, 0)
    if HAS_MASK:
        live = live & (tl.load(tok_mask + g * M + j, mask=live, other=1) == 0)
    if HAS_TILE_MASK:
        live = live & (tl.load(tile_used + g, mask=row_ok, other=0) != 0)
    d_rows = dout + (g * (M + OFF) + OFF + j).to(tl.int64) * D

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c, py, px, inner, k_ok = _k_split(k, C, P, CL_ORDER, RUN_LEN)
    w_cols = _k_offsets(c, py, px, inner, stride_wc, stride_wh, stride_ww, CL_ORDER, True, 1)  # dense weight runs
    any_live = tl.max(live.to(tl.int32), axis=0) > 0
    d_hi = tl.where(any_live, D, 0)
    for d0 in range(0, d_hi, BLOCK_K):
        dd = d0 + tl.arange(0, BLOCK_K)
        dd_ok = dd < D
        a = tl.load(d_rows[:, None] + dd[None, :], mask=live[:, None] & dd_ok[None, :], other=0.0)
        b = tl.load(w + dd[:, None] * stride_wd + w_cols[None, :], mask=dd_ok[:, None] & k_ok[None, :], other=0.0)
        acc = dot(a, b, acc, PRECISION, EMULATE)

    gy = (p // GW) * P
    gx = (p % GW) * P
    x_off = ((g // T).to(tl.int64) * stride_ib + (g % T).to(tl.int64) * stride_it + gy.to(tl.int64) * stride_ih
             + gx.to(tl.int64) * stride_iw)
    if ALIGN > 1:
        x_off = tl.multiple_of(x_off, ALIGN)
    smask = row_ok[:, None] & k_ok[None, :]
    if PAD:
        smask = smask & ((gy[:, None] + py[None, :]) < H) & ((gx[:, None] + px[None, :]) < W)
    tl.store((dimg + x_off)[:, None]
             + _k_offsets(c, py, px, inner, stride_ic, stride_ih, stride_iw, CL_ORDER, IMG_DENSE, ALIGN)[None, :],
             round_to(acc, OUT_DTYPE, EMULATE), mask=smask)


@triton.jit
def _patch_embed_bwd_dw_kernel(
    dout, img, perm, src_idx, tok_mask, tile_used, dw_part, db_part,
    G, M, T, GW, H, W, D, K, ROWS_PER_SPLIT,
    stride_ib, stride_it, stride_ic, stride_ih, stride_iw,
    C: tl.constexpr, P: tl.constexpr, CL_ORDER: tl.constexpr, RUN_LEN: tl.constexpr, IMG_DENSE: tl.constexpr,
    ALIGN: tl.constexpr, PAD: tl.constexpr, OFF: tl.constexpr, HAS_PERM: tl.constexpr, HAS_SRC: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_TILE_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """d_weight (and d_bias): dW[d, k] = sum over GEMM rows of dOut[row, d] * A[row, k], split over
    row ranges; each split writes its own fp32 partial (summed by the launcher: deterministic)."""
    pid_dk = tl.program_id(0)
    split = tl.program_id(1)
    K_PADDED: tl.constexpr = P * RUN_LEN if CL_ORDER else C * P * RUN_LEN
    num_k = tl.cdiv(K_PADDED, BLOCK_K)
    pid_d = pid_dk // num_k
    pid_k = pid_dk % num_k
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d_ok = d < D
    c, py, px, inner, k_ok = _k_split(k, C, P, CL_ORDER, RUN_LEN)
    kofs = _k_offsets(c, py, px, inner, stride_ic, stride_ih, stride_iw, CL_ORDER, IMG_DENSE, ALIGN)
    n_tok = G * M
    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    r_start = split * ROWS_PER_SPLIT
    r_stop = tl.minimum(r_start + ROWS_PER_SPLIT, n_tok)
    for r0 in range(r_start, r_stop, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r = tl.where(r < r_stop, r, n_tok)  # rows past this split's range read as "not a token"
        rr, g, j, src, posj, gemm, masked, used = _decode_token_rows(
            r, n_tok, M, perm, src_idx, src_idx, tok_mask, tile_used,
            HAS_PERM, HAS_SRC, False, HAS_MASK, HAS_TILE_MASK)
        d_rows = dout + (g * (M + OFF) + OFF + j).to(tl.int64) * D
        go = tl.load(d_rows[None, :] + d[:, None], mask=gemm[None, :] & d_ok[:, None], other=0.0)
        gy0 = (src // GW) * P
        gx0 = (src % GW) * P
        row_off = ((g // T).to(tl.int64) * stride_ib + (g % T).to(tl.int64) * stride_it + gy0.to(tl.int64) * stride_ih
                   + gx0.to(tl.int64) * stride_iw)
        if ALIGN > 1:
            row_off = tl.multiple_of(row_off, ALIGN)
        a_rows = img + row_off
        a_mask = gemm[:, None] & k_ok[None, :]
        if PAD:
            a_mask = a_mask & ((gy0[:, None] + py[None, :]) < H) & ((gx0[:, None] + px[None, :]) < W)
        a = tl.load(a_rows[:, None] + kofs[None, :], mask=a_mask, other=0.0)
        if HAS_BIAS:
            bacc += tl.sum(go.to(tl.float32), axis=1)
        acc = dot(go, a, acc, PRECISION, EMULATE)
    # dense column of the weight gradient: (c, py, px) in the weight's order, or (py, px, c) channels-last
    kd = (py * P + px) * C + c if CL_ORDER else (c * P + py) * P + px
    part = dw_part + split.to(tl.int64) * D * K
    tl.store(part + (d * K)[:, None] + kd[None, :], acc, mask=d_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_part + split.to(tl.int64) * D + d, bacc, mask=d_ok)
