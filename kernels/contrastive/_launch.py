"""Validation, the Triton launchers, the custom ops with their fakes, and their autograd.

Both sliced implementations ("triton": the kernels in _kernels.py; "chunked": _chunked.py) produce the same
row and column statistics; the custom op ``mmfast::contrastive_loss_fwd`` turns them into the loss (in
fp64, O(N)), combining them across ranks first in the distributed case, and returns what the backward
needs. Its autograd (``register_autograd``) calls ``mmfast::contrastive_loss_bwd``, which recomputes the
logits tiles; gradients of gradients raise (``_common.no_double_backward``). torch.compile sees opaque
calls with fake shapes (the launchers read data pointers and strides, which fake tensors do not have).
"""
from typing import Optional, Tuple

import torch

from .._common import (addmm_f32, cdiv, check_bool, check_int, check_scalar, check_tensor, check_triton_dtype,
                       interpreting, kernel_flags, mm_f32, next_power_of_2, no_double_backward, register_autograd,
                       saveable)
from .._dispatch import resolve_backend
from . import _chunked
from ._configs import (COLREDUCE_BLOCK, GEMM, NO_FP_FUSION, block_k, bwd_block_d, config, fwd_block_n,
                       gemm_chunk_rows, gemm_programs, row_block, row_programs)
from ._kernels import (COL, MODE_SIGMOID, MODE_SOFTMAX, PARAM, PARAMS, ROW, _contrastive_bwd_da_kernel,
                       _contrastive_bwd_db_kernel, _contrastive_colreduce_kernel, _contrastive_fwd_kernel,
                       _contrastive_grad_kernel)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _empty(*args, **kwargs):
    """Every output the kernels write is allocated here (tests fill it with NaN to catch gaps)."""
    return torch.empty(*args, **kwargs)


def stats_dtype(dtype):
    """Statistics, loss and scalar arithmetic: fp32, or fp64 for fp64 features (the chunked path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Validation


def check_features(op, name, x, dims):
    form = " or ".join({2: "(N, D)", 3: "(N, Q, D)"}[d] for d in dims)
    check_tensor(op, name, x, dtypes=FLOAT_DTYPES, dim=dims, form=form)
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} must be non-empty, got shape {tuple(x.shape)}")


def check_pair(op, name_a, a, name_b, b):
    if a.device != b.device:
        raise ValueError(f"{op}: {name_a} is on {a.device} but {name_b} is on {b.device}; they must be on one device")
    if a.dtype != b.dtype:
        raise ValueError(f"{op}: {name_a} is {a.dtype} but {name_b} is {b.dtype}; they must have the same dtype")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{op}: {name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same "
                         f"feature size D")


def check_number(op, name, value, **interval):
    """A Python number in the interval (check_scalar's rule); tensors are refused: the value picks kernels."""
    if isinstance(value, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a Python number, got a tensor")
    return float(check_scalar(op, name, value, **interval))


def scalar_tensor(op, name, x, features):
    """`x` (a Python number or a one-element floating tensor, finite) as a 0-dim tensor on the features' device;
    Python numbers become tensors of the statistics' dtype. Tensors are checked on their device (no sync)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or not x.is_floating_point():
            raise ValueError(f"{op}: {name} must be a float or a floating tensor with one element, got a "
                             f"{x.dtype} tensor of shape {tuple(x.shape)}")
        if x.device != features.device:
            raise ValueError(f"{op}: {name} is on {x.device} but the features are on {features.device}")
        return check_scalar(op, name, x).reshape(())
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{op}: {name} must be a float or a floating tensor with one element, got "
                         f"{type(x).__name__} {x!r}")
    check_scalar(op, name, x)
    return torch.tensor(float(x), device=features.device, dtype=stats_dtype(features.dtype))


def check_scale_options(op, log_scale, max_scale):
    check_bool(op, "log_scale", log_scale)
    if max_scale is not None:
        check_scalar(op, "max_scale", max_scale, lo=0.0, lo_open=True)


def multiplier(logit_scale, log_scale, max_scale):
    """s = exp(logit_scale) (log_scale) clamped at max_scale: differentiable w.r.t. logit_scale."""
    s = logit_scale.exp() if log_scale else logit_scale
    return s.clamp(max=max_scale) if max_scale is not None else s


def check_group(op, group, a, b, num_pairs):
    """The distributed losses take each rank's local rows: a and b the same n rows on every rank, no queues."""
    import torch.distributed as dist

    from ._distributed import check_equal_sizes

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: group was given but torch.distributed is not initialized")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"{op}: group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    if a.shape[0] != b.shape[0] or num_pairs not in (None, a.shape[0]):
        raise ValueError(f"{op}: with a process group, a and b must hold the same local batch (no queues, num_pairs "
                         f"None), got {a.shape[0]} and {b.shape[0]} rows, num_pairs={num_pairs!r}")
    check_equal_sizes(a.shape[0], group, op)


def resolve(op, backend, a, tensors):
    """The backend to run; the Triton kernels take fp16 / bf16 / fp32 only (float64: reference, chunked)."""
    chosen = resolve_backend(op, backend, a.device)
    if chosen == "gemm" and a.dim() == 3:
        if backend == "gemm":
            raise ValueError(f"{op}: backend='gemm' takes 2-D features a (N, D); for the max over Q queries of a "
                             f"(N, Q, D) use backend='triton' or 'chunked'")
        chosen = "triton"  # auto (or MMFAST_BACKEND): the Triton kernels take the max over queries
    if chosen in ("triton", "gemm"):
        for name, t in tensors.items():
            if t is not None:
                check_triton_dtype(op, name, t)
    return chosen


def _normalize(x):
    return torch.nn.functional.normalize(x, dim=-1)


def sliced_loss(a, b, scale, bias, at, bt, *, mode, symmetric, label_smoothing, alpha, num_pairs, normalize, group,
                impl):
    """The loss through the custom op, on validated arguments; `scale` is the multiplier s (0-dim tensor)."""
    if normalize:
        a, b = _normalize(a), _normalize(b)
        if at is not None:
            at, bt = _normalize(at), _normalize(bt)
    if at is not None:
        # teachers get no gradient; made under inference_mode (a momentum encoder run in it): normal copies
        at, bt = saveable(at.detach()), saveable(bt.detach())
    group_name = ""
    if group is not None:
        from ._distributed import all_gather_rows

        b = all_gather_rows(b, group, with_grad=True)
        if bt is not None:
            bt = all_gather_rows(bt, group, with_grad=False)
        group_name = group.group_name
    return _contrastive_fwd(a, b, at, bt, scale, bias, mode, symmetric, label_smoothing, alpha, num_pairs, impl,
                            group_name)[0]


# ----------------------------------------------------------------------------------------------
# Triton launchers: the statistics (forward) and the gradients (backward), same interface as _chunked


def _strides3(x):
    # a: (N, D) or (N, Q, D) -> (stride_n, stride_q, stride_d)
    return (x.stride(0), x.stride(1), x.stride(2)) if x.dim() == 3 else (x.stride(0), 0, x.stride(1))


def _feature_strides(a, b, at, bt):
    return (*_strides3(a), b.stride(0), b.stride(1), *_strides3(at), bt.stride(0), bt.stride(1))


def triton_forward(a, b, at, bt, params, *, mode, cols, smooth, diag_off=0):
    """Row statistics [ROW_STATS, Na] (sigmoid: [1, Na]) and column statistics [COL_STATS, Nb] or None."""
    Na, Nb, D = a.shape[0], b.shape[0], a.shape[-1]
    Q = a.shape[1] if a.dim() == 3 else 1
    QP = next_power_of_2(Q)
    fwd = config(a.dtype)["fwd"]
    BI = row_block(fwd["R"], QP)
    n_row_blocks = cdiv(Na, BI)
    teacher = at is not None
    dev = a.device
    n_rows = 1 if mode != MODE_SOFTMAX else len(ROW) if teacher else ROW["t_max"]
    rows = _empty((n_rows, Na), device=dev, dtype=torch.float32)
    n_planes = 2 + int(smooth) + 3 * int(teacher)
    n_prog = row_programs(n_row_blocks, dev, fwd)
    part = _empty((n_planes, n_prog, Nb) if cols else (1,), device=dev, dtype=torch.float32)
    at_, bt_ = (at, bt) if teacher else (a, b)
    _contrastive_fwd_kernel[(n_prog,)](
        a, b, at_, bt_, params, rows, part, params, params, Na, Nb, Q, D, n_row_blocks, diag_off, n_prog, 0, Na, Nb,
        *_feature_strides(a, b, at_, bt_), MODE=mode, COLS=cols, SMOOTH=smooth, TEACHER=teacher, QP=QP, BI=BI,
        BN=fwd_block_n(fwd, teacher), BK=block_k(a.dtype, teacher), **kernel_flags(a.dtype), FROM_MEMORY=False,
        num_warps=fwd["num_warps"], num_stages=fwd["num_stages"], **NO_FP_FUSION,
    )
    return rows, _merge_columns(part, n_prog, Nb, teacher, smooth) if cols else None


def _merge_columns(part, n_prog, Nb, teacher, smooth):
    colstats = _empty((len(COL) if teacher else COL["t_max"], Nb), device=part.device, dtype=torch.float32)
    _contrastive_colreduce_kernel[(cdiv(Nb, COLREDUCE_BLOCK),)](
        part, colstats, n_prog, Nb, SMOOTH=smooth, TEACHER=teacher, BLOCK=COLREDUCE_BLOCK, num_warps=4)
    return colstats


def triton_backward(a, b, at, bt, params, rows, colstats, *, mode, cols, n_row_terms, n_col_terms, need_da, need_db,
                    diag_off=0):
    """(da, db, sum of G·raw, sum of G); da / db None when not needed."""
    Na, Nb, D = a.shape[0], b.shape[0], a.shape[-1]
    Q = a.shape[1] if a.dim() == 3 else 1
    QP = next_power_of_2(Q)
    bwd = config(a.dtype)["bwd"]
    BI = row_block(bwd["R"], QP)
    BD = bwd_block_d(D, bwd, at is not None)
    teacher = at is not None
    at_, bt_ = (at, bt) if teacher else (a, b)
    col_arg = colstats if colstats is not None else rows  # not read without COLS
    common = dict(MODE=mode, COLS=cols, TEACHER=teacher, QP=QP, BI=BI, BN=bwd["BN"], BK=block_k(a.dtype, teacher),
                  BD=BD, **kernel_flags(a.dtype), **NO_FP_FUSION, num_warps=bwd["num_warps"],
                  num_stages=bwd["num_stages"],
                  maxnreg=bwd["maxnreg"])
    strides = _feature_strides(a, b, at_, bt_)
    n_row_blocks = cdiv(Na, BI)
    da = _empty(a.shape, device=a.device, dtype=a.dtype)
    red = _empty((2, n_row_blocks), device=a.device, dtype=torch.float32)
    # the da kernel also produces the scale / bias reductions, so it always runs (one D chunk if da is unused)
    grid_a = (n_row_blocks, cdiv(D, BD) if need_da else 1)
    _contrastive_bwd_da_kernel[grid_a](a, b, at_, bt_, params, rows, col_arg, da, red, Na, Nb, Q, D, n_row_blocks,
                                       n_row_terms, n_col_terms, diag_off, *strides, **common)
    db = None
    if need_db:
        db = _empty(b.shape, device=b.device, dtype=b.dtype)
        grid_b = (cdiv(Nb, bwd["BN"]), cdiv(D, BD))
        _contrastive_bwd_db_kernel[grid_b](a, b, at_, bt_, params, rows, col_arg, db, Na, Nb, Q, D, n_row_terms,
                                           n_col_terms, diag_off, *strides, **common)
    return (da if need_da else None), db, red[0].double().sum().float(), red[1].double().sum().float()


# ----------------------------------------------------------------------------------------------
# The "gemm" backend: cuBLAS for the three GEMMs, the Triton kernels for everything between them


def _chunks(Na, Nb):
    C = gemm_chunk_rows(Na, Nb)
    return [(row0, min(Na, row0 + C)) for row0 in range(0, Na, C)]


def gemm_forward(a, b, at, bt, params, *, mode, cols, smooth, diag_off=0):
    """triton_forward's statistics, the similarities of each chunk of rows from one cuBLAS GEMM.

    A chunk has few row blocks (1024 rows at N = 32k: 32 blocks), so the forward kernel also splits the
    columns over grid axis 1 (programs ~ the GPU's resident count); each split's row statistics are partial
    (max, sum of exp, sums) and merged here, O(splits·N)."""
    Na, Nb, D = a.shape[0], b.shape[0], a.shape[-1]
    cfg = GEMM["fwd"]
    teacher = at is not None
    dev = a.device
    chunks = _chunks(Na, Nb)
    # the first chunk is the largest: its programs own every row of the partials, later chunks merge into them
    n_prog = row_programs(cdiv(chunks[0][1], cfg["R"]), dev, cfg)
    n_splits = max(1, min(cdiv(Nb, cfg["BN"]), cdiv(gemm_programs(dev, cfg), n_prog)))
    split_cols = cdiv(cdiv(Nb, n_splits), cfg["BN"]) * cfg["BN"]
    n_splits = cdiv(Nb, split_cols)
    n_rows = 1 if mode != MODE_SOFTMAX else len(ROW) if teacher else ROW["t_max"]
    row_part = _empty((n_rows, n_splits, Na), device=dev, dtype=torch.float32)
    n_planes = 2 + int(smooth) + 3 * int(teacher)
    part = _empty((n_planes, n_prog, Nb) if cols else (1,), device=dev, dtype=torch.float32)
    at_, bt_ = (at, bt) if teacher else (a, b)
    with torch.autocast(dev.type, enabled=False):
        for row0, row_end in chunks:
            raw = mm_f32(a[row0:row_end], b.T)
            traw = mm_f32(at[row0:row_end], bt.T) if teacher else raw
            n_blocks = cdiv(row_end - row0, cfg["R"])
            _contrastive_fwd_kernel[(min(n_prog, n_blocks), n_splits)](
                a, b, at_, bt_, params, row_part, part, raw, traw, Na, Nb, 1, D, n_blocks, diag_off, n_prog, row0,
                row_end, split_cols, *_feature_strides(a, b, at_, bt_), MODE=mode, COLS=cols, SMOOTH=smooth,
                TEACHER=teacher, QP=1, BI=cfg["R"], BN=cfg["BN"], BK=16, **kernel_flags(a.dtype), FROM_MEMORY=True,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **NO_FP_FUSION)
    colstats = _merge_columns(part, n_prog, Nb, teacher, smooth) if cols else None
    return _merge_row_splits(row_part, mode, teacher), colstats


def _merge_row_splits(row_part, mode, teacher):
    """The row statistics from the column splits' partials [ROW_STATS, splits, Na] (sums of exp not logged,
    the teacher's weighted sum not divided): [ROW_STATS, Na] as triton_forward returns them."""
    if mode != MODE_SOFTMAX:
        return row_part.sum(dim=1)
    rows = torch.empty((row_part.shape[0], row_part.shape[2]), device=row_part.device, dtype=torch.float32)
    m = row_part[ROW["max"]].amax(dim=0)
    rows[ROW["max"]] = m
    rows[ROW["log_sum"]] = torch.log((row_part[ROW["log_sum"]] * torch.exp(row_part[ROW["max"]] - m)).sum(dim=0))
    rows[ROW["sum"]] = row_part[ROW["sum"]].sum(dim=0)
    rows[ROW["diag"]] = row_part[ROW["diag"]].sum(dim=0)
    if teacher:
        tm = row_part[ROW["t_max"]].amax(dim=0)
        rescale = torch.exp(row_part[ROW["t_max"]] - tm)
        t_sum = (row_part[ROW["t_log_sum"]] * rescale).sum(dim=0)
        rows[ROW["t_max"]] = tm
        rows[ROW["t_log_sum"]] = torch.log(t_sum)
        rows[ROW["t_mean"]] = (row_part[ROW["t_mean"]] * rescale).sum(dim=0) / t_sum
    return rows


def gemm_backward(a, b, at, bt, params, rows, colstats, *, mode, cols, n_row_terms, n_col_terms, need_da, need_db,
                  diag_off=0):
    """triton_backward's gradients: per chunk, the similarities by cuBLAS, G by the gradient kernel, then
    da = s·G·b and db += s·Gᵀ·a by cuBLAS (fp32 results; db accumulates across chunks in fp32)."""
    Na, Nb, D = a.shape[0], b.shape[0], a.shape[-1]
    cfg = GEMM["grad"]
    teacher = at is not None
    dev = a.device
    col_arg = colstats if colstats is not None else rows  # not read without COLS
    unscale = params[PARAM["scale"]] / params[PARAM["gscale"]]
    da = _empty(a.shape, device=dev, dtype=a.dtype) if need_da else None
    db_acc = torch.zeros((Nb, D), device=dev, dtype=torch.float32) if need_db else None
    reds = []
    with torch.autocast(dev.type, enabled=False):
        for row0, row_end in _chunks(Na, Nb):
            a_c = a[row0:row_end]
            raw = mm_f32(a_c, b.T)
            traw = mm_f32(at[row0:row_end], bt.T) if teacher else raw
            g = _empty(raw.shape, device=dev, dtype=a.dtype)
            grid = (cdiv(row_end - row0, cfg["BI"]), cdiv(Nb, cfg["BN"]))
            red = _empty((2, grid[0] * grid[1]), device=dev, dtype=torch.float32)
            _contrastive_grad_kernel[grid](raw, traw, params, rows, col_arg, g, red, Na, Nb, row0, row_end,
                                           n_row_terms, n_col_terms, diag_off, MODE=mode, COLS=cols, TEACHER=teacher,
                                           BI=cfg["BI"], BN=cfg["BN"], EMULATE=interpreting(),
                                           num_warps=cfg["num_warps"], **NO_FP_FUSION)
            reds.append(red.double().sum(dim=1))
            if need_da:
                da[row0:row_end] = (unscale * mm_f32(g, b)).to(a.dtype)
            if need_db:
                db_acc = addmm_f32(db_acc, g.T, a_c)
    d_scale, d_bias = torch.stack(reds).sum(dim=0).float()
    db = (unscale * db_acc).to(b.dtype) if need_db else None
    return da, db, d_scale.clone(), d_bias.clone()  # clones: a custom op's outputs may not alias each other


_IMPLS = {"triton": (triton_forward, triton_backward), "gemm": (gemm_forward, gemm_backward),
          "chunked": (_chunked.forward, _chunked.backward)}


# ----------------------------------------------------------------------------------------------
# The loss from the statistics


def _world(group_name):
    """(group, rank, size) of the custom ops' group name ("" = not distributed)."""
    if not group_name:
        return None, 0, 1
    from ._distributed import group_by_name, world

    group = group_by_name(group_name)
    return (group, *world(group))


def _term_weights(mode, symmetric, pairs, Na, size):
    """(weight of a row's loss term, rows with one, weight of a column's term, columns with one).

    Gradients follow DDP's convention: a rank weighs its own terms by 1 / its own count (world_size x its
    share of the global loss, which DDP's averaging undoes); distributed, its rows carry their share of
    every pair column's gradient."""
    if mode == MODE_SIGMOID:
        return 1.0 / Na, Na, 0.0, 0
    if not symmetric:
        return 1.0 / pairs, pairs, 0.0, 0
    return 0.5 / pairs, pairs, 0.5 / pairs, pairs * size


def _loss_sum(rows, colstats, *, mode, symmetric, eps, alpha, pairs, Nb, rank, size):
    """This rank's loss terms summed in fp64 (O(N) values, each an fp32 statistic)."""
    Na = rows.shape[1]
    st = rows.double()
    if mode == MODE_SIGMOID:
        return st[0].sum()
    teacher = rows.shape[0] == len(ROW)
    diag = st[ROW["diag"], :pairs]
    row_terms = (st[ROW["max"], :pairs] + st[ROW["log_sum"], :pairs]
                 - (1 - alpha) * ((1 - eps) * diag + eps / Nb * st[ROW["sum"], :pairs]))
    if teacher:
        row_terms = row_terms - alpha * st[ROW["t_mean"], :pairs]
    if not symmetric:
        return row_terms.sum()
    sc = colstats.double()
    own = slice(rank * Na, rank * Na + pairs)  # the columns whose cross-entropy this rank reports
    col_terms = (sc[COL["max"], own] + sc[COL["log_sum"], own]
                 - (1 - alpha) * ((1 - eps) * diag + eps / (Na * size) * sc[COL["sum"], own]))
    if teacher:
        col_terms = col_terms - alpha * sc[COL["t_mean"], own]
    return 0.5 * (row_terms.sum() + col_terms.sum())


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd


@torch.library.custom_op("mmfast::contrastive_loss_fwd", mutates_args=())
def _contrastive_fwd_op(a: torch.Tensor, b: torch.Tensor, at: Optional[torch.Tensor], bt: Optional[torch.Tensor],
                        scale: torch.Tensor, bias: torch.Tensor, mode: int, symmetric: bool, label_smoothing: float,
                        alpha: float, num_pairs: int, impl: str, group_name: str
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, params, row statistics, column statistics (0 elements unless symmetric softmax)).

    b (and bt) hold every rank's rows when distributed; a this rank's. s = scale, logit bias = bias."""
    group, rank, size = _world(group_name)
    Na, Nb = a.shape[0], b.shape[0]
    cdt = stats_dtype(a.dtype)
    eps = label_smoothing
    cols = symmetric and mode == MODE_SOFTMAX
    coef_row, _, coef_col, _ = _term_weights(mode, symmetric, num_pairs, Na, size)
    consts = [alpha, (1 - alpha) * eps / Nb, (1 - alpha) * eps / (Na * size), (1 - alpha) * (1 - eps), coef_row,
              coef_col, 1.0]
    params = torch.cat([scale.detach().reshape(1).to(cdt), bias.detach().reshape(1).to(cdt),
                        torch.tensor(consts, dtype=cdt, device=a.device)])
    forward, _ = _IMPLS[impl]
    rows, colstats = forward(a, b, at, bt, params, mode=mode, cols=cols, smooth=eps > 0, diag_off=rank * Na)
    if cols and group is not None:
        from ._distributed import combine_column_stats

        colstats = combine_column_stats(colstats, group)
    total = _loss_sum(rows, colstats, mode=mode, symmetric=symmetric, eps=eps, alpha=alpha, pairs=num_pairs, Nb=Nb,
                      rank=rank, size=size)
    if group is not None:
        from ._distributed import all_reduce_sum

        total = all_reduce_sum(total, group)
    denom = Na * size if mode == MODE_SIGMOID else num_pairs * size
    return (total / denom).to(cdt), params, rows, (colstats if cols else rows.new_empty(0))


@_contrastive_fwd_op.register_fake
def _(a, b, at, bt, scale, bias, mode, symmetric, label_smoothing, alpha, num_pairs, impl, group_name):
    cdt = stats_dtype(a.dtype)
    Na, Nb = a.shape[0], b.shape[0]
    teacher = at is not None
    n_rows = 1 if mode != MODE_SOFTMAX else len(ROW) if teacher else ROW["t_max"]
    cols = (len(COL) if teacher else COL["t_max"], Nb) if symmetric and mode == MODE_SOFTMAX else (0,)
    return (a.new_empty((), dtype=cdt), a.new_empty((len(PARAMS),), dtype=cdt), a.new_empty((n_rows, Na), dtype=cdt),
            a.new_empty(cols, dtype=cdt))


@torch.library.custom_op("mmfast::contrastive_loss_bwd", mutates_args=())
def _contrastive_bwd_op(a: torch.Tensor, b: torch.Tensor, at: Optional[torch.Tensor], bt: Optional[torch.Tensor],
                        params: torch.Tensor, rows: torch.Tensor, colstats: torch.Tensor, mode: int, cols: bool,
                        n_row_terms: int, n_col_terms: int, need_da: bool, need_db: bool, diag_off: int, impl: str
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da, db, d scale, d bias), da / db with 0 elements when not needed; params' term weights already hold
    the upstream gradient, and params its power-of-two scale of G."""
    _, backward = _IMPLS[impl]
    da, db, d_scale, d_bias = backward(a, b, at, bt, params, rows, colstats if cols else None, mode=mode, cols=cols,
                                       n_row_terms=n_row_terms, n_col_terms=n_col_terms, need_da=need_da,
                                       need_db=need_db, diag_off=diag_off)
    return (da if da is not None else a.new_empty(0)), (db if db is not None else b.new_empty(0)), d_scale, d_bias


@_contrastive_bwd_op.register_fake
def _(a, b, at, bt, params, rows, colstats, mode, cols, n_row_terms, n_col_terms, need_da, need_db, diag_off, impl):
    return (a.new_empty(a.shape if need_da else 0), b.new_empty(b.shape if need_db else 0), params.new_empty(()),
            params.new_empty(()))


def _setup_context(ctx, inputs, output):
    a, b, at, bt, scale, bias, mode, symmetric, _, _, num_pairs, impl, group_name = inputs
    _, params, rows, colstats = output
    ctx.mark_non_differentiable(params, rows, colstats)
    ctx.save_for_backward(a, b, at, bt, params, rows, colstats)
    _, rank, size = _world(group_name)
    _, ctx.n_row_terms, _, ctx.n_col_terms = _term_weights(mode, symmetric, num_pairs, a.shape[0], size)
    ctx.mode, ctx.cols, ctx.impl, ctx.diag_off = mode, symmetric and mode == MODE_SOFTMAX, impl, rank * a.shape[0]
    ctx.scale_dtype, ctx.bias_dtype = scale.dtype, bias.dtype


def _backward(ctx, grad, *unused):
    a, b, at, bt, params, rows, colstats = ctx.saved_tensors
    need_da, need_db, _, _, need_scale, need_bias = ctx.needs_input_grad[:6]
    params = params.clone()
    weights = params[[PARAM["coef_row"], PARAM["coef_col"]]] * grad.to(params.dtype)
    params[[PARAM["coef_row"], PARAM["coef_col"]]] = weights
    # G is at most ~ the largest weight: the kernels scale it to ~1 by a power of two (exact) before the cast
    # to the input dtype
    largest = weights.abs().max()
    params[PARAM["gscale"]] = torch.where(largest > 0, torch.exp2(-torch.round(torch.log2(largest))), 1.0)
    da, db, d_scale, d_bias = _contrastive_bwd_op(a, b, at, bt, params, rows, colstats, ctx.mode, ctx.cols,
                                                  ctx.n_row_terms, ctx.n_col_terms, need_da, need_db, ctx.diag_off,
                                                  ctx.impl)
    return (da if need_da else None, db if need_db else None, None, None,
            d_scale.to(ctx.scale_dtype) if need_scale else None, d_bias.to(ctx.bias_dtype) if need_bias else None,
            None, None, None, None, None, None, None)


_contrastive_fwd = register_autograd(_contrastive_fwd_op, _backward, _setup_context)
_contrastive_bwd_op.register_autograd(no_double_backward("contrastive_loss / siglip_loss"))


# ----------------------------------------------------------------------------------------------
# The public ops' bodies: validate every argument, then run the backend


def run_contrastive_loss(a, b, logit_scale, *, normalize, label_smoothing, symmetric, num_pairs, a_teacher, b_teacher,
                         alpha, log_scale, max_scale, group, backend):
    op = "contrastive_loss"
    check_features(op, "a", a, (2, 3))
    check_features(op, "b", b, (2,))
    check_pair(op, "a", a, "b", b)
    Na, Nb = a.shape[0], b.shape[0]
    if Nb < Na:
        raise ValueError(f"{op}: b must have at least as many rows as a (M >= N: pairs, then extra negatives), "
                         f"got a {tuple(a.shape)} and b {tuple(b.shape)}")
    pairs = Na if num_pairs is None else check_int(op, "num_pairs", num_pairs, lo=1, hi=Na)
    eps = check_number(op, "label_smoothing", label_smoothing, lo=0.0, hi=1.0, hi_open=True)
    alpha = check_number(op, "alpha", alpha, lo=0.0, hi=1.0)
    check_bool(op, "normalize", normalize)
    check_bool(op, "symmetric", symmetric)
    check_scale_options(op, log_scale, max_scale)
    if (a_teacher is None) != (b_teacher is None):
        raise ValueError(f"{op}: a_teacher and b_teacher must be given together")
    if alpha > 0 and a_teacher is None:
        raise ValueError(f"{op}: alpha > 0 needs the teacher's features a_teacher and b_teacher")
    if a_teacher is not None:
        check_features(op, "a_teacher", a_teacher, (a.dim(),))
        check_features(op, "b_teacher", b_teacher, (2,))
        for name, t, ref in (("a_teacher", a_teacher, a), ("b_teacher", b_teacher, b)):
            check_pair(op, name, t, name[0], ref)
            if t.shape != ref.shape:
                raise ValueError(f"{op}: {name} must have the shape of {name[0]}, {tuple(ref.shape)}, got "
                                 f"{tuple(t.shape)}")
        if alpha == 0:
            a_teacher = b_teacher = None  # no distillation term: skip the teacher's tiles
    logit_scale = scalar_tensor(op, "logit_scale", logit_scale, a)
    if group is not None:
        check_group(op, group, a, b, num_pairs)
    chosen = resolve(op, backend, a, {"a": a, "b": b, "a_teacher": a_teacher, "b_teacher": b_teacher})
    if chosen == "reference":
        from ..reference import contrastive_loss_reference

        return contrastive_loss_reference(a, b, logit_scale, normalize=normalize, label_smoothing=eps,
                                          symmetric=symmetric, num_pairs=pairs, a_teacher=a_teacher,
                                          b_teacher=b_teacher, alpha=alpha, log_scale=log_scale, max_scale=max_scale,
                                          group=group)
    bias = torch.zeros((), device=a.device, dtype=stats_dtype(a.dtype))
    return sliced_loss(a, b, multiplier(logit_scale, log_scale, max_scale), bias, a_teacher, b_teacher,
                       mode=MODE_SOFTMAX, symmetric=symmetric, label_smoothing=eps, alpha=alpha, num_pairs=pairs,
                       normalize=normalize, group=group, impl=chosen)


def run_siglip_loss(a, b, logit_scale, logit_bias, *, normalize, log_scale, max_scale, group, backend):
    op = "siglip_loss"
    check_features(op, "a", a, (2,))
    check_features(op, "b", b, (2,))
    check_pair(op, "a", a, "b", b)
    if b.shape[0] < a.shape[0]:
        raise ValueError(f"{op}: b must have at least as many rows as a (M >= N), got a {tuple(a.shape)} and b "
                         f"{tuple(b.shape)}")
    check_bool(op, "normalize", normalize)
    check_scale_options(op, log_scale, max_scale)
    logit_scale = scalar_tensor(op, "logit_scale", logit_scale, a)
    logit_bias = scalar_tensor(op, "logit_bias", logit_bias, a)
    if group is not None:
        check_group(op, group, a, b, None)
    chosen = resolve(op, backend, a, {"a": a, "b": b})
    if chosen == "reference":
        from ..reference import siglip_loss_reference

        return siglip_loss_reference(a, b, logit_scale, logit_bias, normalize=normalize, log_scale=log_scale,
                                     max_scale=max_scale, group=group)
    return sliced_loss(a, b, multiplier(logit_scale, log_scale, max_scale), logit_bias, None, None, mode=MODE_SIGMOID,
                       symmetric=False, label_smoothing=0.0, alpha=0.0, num_pairs=a.shape[0], normalize=normalize,
                       group=group, impl=chosen)
