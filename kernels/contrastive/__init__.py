"""Sliced contrastive losses: CLIP / MoCo / ALBEF / BLIP / BLIP-2 InfoNCE and SigLIP without the N x M
logits matrix.

Every loss needs, per row and per column of the logits, only a few statistics (log-sum-exp, the
diagonal, sums for label smoothing, the teacher's log-sum-exp and teacher-weighted mean for
distillation). The forward computes each logits tile once and produces the row statistics online and
the column statistics as partials, one row of them per forward program; the backward recomputes tiles
(deterministically: one kernel for da over row blocks, one for db over column blocks, no atomics).

Extra memory beyond inputs, outputs and gradients (Triton), exactly: row statistics 5·Na and column
statistics 4·Nb fp32 (3·Na + 3·Nb of them kept for the backward), and, for the symmetric loss only, the
forward's column partials K·P·Nb fp32, merged by a streaming kernel (no temporaries) and freed before the
forward returns. P = the forward programs the GPU runs at once (its SM count; twice that for fp32), each
looping over row blocks and merging its columns' statistics in place; K = 1 (+1 with label smoothing, +2
with a teacher): O(N) — 16.5 MiB at N = 32,768 and 33 MiB at N = 65,536 for plain bf16 CLIP on a
132-SM H100. normalize=True adds the normalised copies of a and b (as F.normalize does).
The CPU path keeps a fixed-size chunk of logits instead (see _chunked.py): O(N) in all.

Layout: _triton.py (kernels, launchers, compile specs), _chunked.py (the CPU / PyTorch path),
_distributed.py (collectives); this file holds validation, the autograd Function and the public ops.
"""
from dataclasses import dataclass

import torch

from .._dispatch import resolve_backend
from . import _chunked, _triton
from ._triton import MODE_SIGMOID, MODE_SOFTMAX, compile_specs  # noqa: F401

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["contrastive_loss", "siglip_loss", "compile_specs"]


@dataclass(frozen=True)
class _Config:
    mode: int
    symmetric: bool
    eps: float
    alpha: float
    pairs: int  # rows of a (from the first) whose positive is column i + diag_off
    impl: object  # _triton or _chunked
    group: object = None
    diag_off: int = 0
    rows_total: int = 0  # rows of the global logits matrix (distributed: all ranks)
    pairs_total: int = 0


def _no_autocast(device):
    # the chunked path's matmuls are fp32 by design: an enclosing torch.autocast must not run them in bf16
    return torch.autocast(device.type, enabled=False)


class _SlicedContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, bias, at, bt, cfg):
        dev = a.device
        Na, Nb = a.shape[0], b.shape[0]
        softmax = cfg.mode == MODE_SOFTMAX
        eps, alpha = cfg.eps, cfg.alpha
        consts = torch.tensor([alpha, (1 - alpha) * eps / Nb, (1 - alpha) * eps / cfg.rows_total,
                               (1 - alpha) * (1 - eps), 1.0], dtype=torch.float32, device=dev)
        params = torch.cat([scale.detach().reshape(1).float(), bias.detach().reshape(1).float(), consts])
        with _no_autocast(dev):
            rows, colstats = cfg.impl.forward(a, b, at, bt, params, mode=cfg.mode, cols=cfg.symmetric and softmax,
                                              smooth=eps > 0, diag_off=cfg.diag_off)
        P = cfg.pairs
        zeros_a = torch.zeros(Na, device=dev)
        # the O(N) assembly of the loss from the fp32 statistics runs in fp64: it sums N*M terms' worth
        st_rows = rows.double()
        st_cols = colstats.double() if colstats is not None else None
        if not softmax:
            total = st_rows[0].sum()
            coef_r = torch.full((Na,), 1.0 / Na, device=dev)
            rvec = torch.stack([zeros_a, zeros_a, coef_r])
            cvec = torch.zeros((3, 1), device=dev)
            denom = cfg.rows_total
        else:
            w_rows = 0.5 if cfg.symmetric else 1.0
            diag = st_rows[2, :P]
            row_terms = st_rows[0, :P] - (1 - alpha) * ((1 - eps) * diag + eps / Nb * st_rows[1, :P])
            if at is not None:
                row_terms = row_terms - alpha * st_rows[4, :P]
            total = w_rows * row_terms.sum()
            coef_r = torch.zeros(Na, device=dev)
            coef_r[:P] = w_rows / P
            rvec = torch.stack([rows[0], rows[3] if at is not None else zeros_a, coef_r])
            cvec = torch.zeros((3, 1), device=dev)
            if cfg.symmetric:
                if cfg.group is not None:
                    from ._distributed import combine_column_stats

                    colstats = combine_column_stats(colstats, cfg.group)
                    st_cols = colstats.double()
                own = slice(cfg.diag_off, cfg.diag_off + P)  # columns whose CE this rank reports
                col_terms = st_cols[0, own] - (1 - alpha) * ((1 - eps) * diag + eps / cfg.rows_total * st_cols[1, own])
                if at is not None:
                    col_terms = col_terms - alpha * st_cols[3, own]
                total = total + 0.5 * col_terms.sum()
                coef_c = torch.zeros(Nb, device=dev)
                # distributed: this rank's rows carry their share of every column's gradient
                coef_c[: cfg.pairs_total if cfg.group is not None else P] = 0.5 / P
                cvec = torch.stack([colstats[0], colstats[2], coef_c])
            denom = cfg.pairs_total
        if cfg.group is not None:
            from ._distributed import all_reduce_sum

            total = all_reduce_sum(total, cfg.group)
        ctx.save_for_backward(a, b, at, bt, params, rvec, cvec)
        ctx.cfg = cfg
        return (total / denom).float()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled() and any(ctx.needs_input_grad):
            # once_differentiable would hand back graph-less gradients when `grad` needs none (a scalar
            # loss's ones): a gradient penalty on them would silently be zero
            raise RuntimeError("contrastive_loss / siglip_loss do not support double backward (create_graph=True): "
                               "their backward is hand-written")
        a, b, at, bt, params, rvec, cvec = ctx.saved_tensors
        cfg = ctx.cfg
        rvec, cvec = rvec.clone(), cvec.clone()
        g = grad.float()
        rvec[2] *= g
        cvec[2] *= g
        # G is at most ~ the largest coefficient: scale it to ~1 by a power of two (exact) for the cast
        coef = torch.maximum(rvec[2].abs().max(), cvec[2].abs().max())
        params = params.clone()
        params[_triton.PARAM_INDEX["gscale"]] = torch.where(coef > 0, torch.exp2(-torch.round(torch.log2(coef))), 1.0)
        with _no_autocast(a.device):
            da, db, d_scale, d_bias = cfg.impl.backward(
                a, b, at, bt, params, rvec, cvec, mode=cfg.mode, cols=cfg.symmetric and cfg.mode == MODE_SOFTMAX,
                need_da=ctx.needs_input_grad[0], need_db=ctx.needs_input_grad[1], diag_off=cfg.diag_off)
        return (da, db, d_scale.to(params.dtype) if ctx.needs_input_grad[2] else None,
                d_bias if ctx.needs_input_grad[3] else None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Validation


def _check_features(name, x, dims):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() not in dims:
        forms = " or ".join({2: "(N, D)", 3: "(N, Q, D)"}[d] for d in dims)
        raise ValueError(f"{name} must have shape {forms}, got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[-1] == 0 or (x.dim() == 3 and x.shape[1] == 0):
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")


def _check_pair(name_a, a, name_b, b):
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; they must be on one device")
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; they must have the same dtype")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same feature size D")


def _scale_tensor(name, x, device, log_scale, max_scale):
    """The multiplier s (a 0-dim tensor, differentiable w.r.t. `x` when it is a tensor)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or not x.is_floating_point():
            raise ValueError(f"{name} must be a float or a floating tensor with one element, got {x.dtype} {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the features are on {device}")
        t = x.reshape(())
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        t = torch.tensor(float(x), device=device)
    else:
        raise ValueError(f"{name} must be a float or a floating tensor with one element, got {type(x).__name__}")
    if name == "logit_bias":
        return t
    s = t.exp() if log_scale else t
    if max_scale is not None:
        s = s.clamp(max=max_scale)
    return s


def _impl(op, backend, device):
    chosen = resolve_backend(op, backend, device)
    return _triton if chosen == "triton" else _chunked


def _normalize(x):
    return torch.nn.functional.normalize(x, dim=-1)


def _distributed_setup(op, group, a, b):
    import torch.distributed as dist

    from ._distributed import check_equal_sizes, world

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: group was given but torch.distributed is not initialized")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{op}: with a process group, a and b must hold the same local batch (no queues), "
                         f"got {a.shape[0]} and {b.shape[0]} rows")
    check_equal_sizes(a.shape[0], group, op)
    return world(group)


# ----------------------------------------------------------------------------------------------
# Public ops


def contrastive_loss(a, b, logit_scale, *, normalize=False, label_smoothing=0.0, symmetric=True,
                     num_pairs=None, a_teacher=None, b_teacher=None, alpha=0.0, log_scale=True,
                     max_scale=100.0, group=None, backend="auto"):
    """InfoNCE / CLIP loss over a x b^T without materialising it. Returns a 0-dim fp32 tensor.

    Shapes: a (Na, D) — or (Na, Q, D) for BLIP-2's query tokens — and b (Nb, D), Nb >= Na, same dtype
    (fp32, fp16, bf16) and device, any strides. The first P = num_pairs rows (default Na) are pairs: row
    i's positive is column i. Rows of a past P and rows of b past P are extra negatives (queues).

    Math (fp32 throughout): s = exp(logit_scale) clamped to max_scale (CLIP: logit_scale is the learned
    log temperature, init log(1/0.07); open_clip clamps the parameter at log(100) after each step, the
    clamp here has the same effect on the forward and a zero gradient past it). log_scale=False takes s
    = logit_scale directly (e.g. 1/τ of MoCo / ALBEF). raw_ij = <a_i, b_j> (BLIP-2: max_q <a_iq, b_j>,
    the gradient going to the arg-max query), L_ij = s·raw_ij; with normalize=True the features (and
    the teachers) are L2-normalised first. Targets, per row over the Nb columns:
        t_ij = (1 − α)·((1 − ε)·δ_ij + ε/Nb) + α·softmax_j(T_i·),   T = s·a_teacher·b_teacherᵀ (no grad)
    and per column j < P over the Na rows likewise (ε/Na, softmax over i). Then
        L_row = mean_{i<P} [ logsumexp_j L_ij − Σ_j t_ij L_ij ],   L_col likewise over columns j < P,
        loss = (L_row + L_col) / 2 if symmetric else L_row.
    CLIP: defaults. MoCo: a = q (N, D), b = cat(k, queue), symmetric=False, log_scale=False,
    logit_scale = 1/τ. ALBEF / BLIP ITC exactly as their code (positives are the momentum model's
    features, each direction its own matrix), averaged over two calls with symmetric=False, alpha=0.4:
    i2t = contrastive_loss(img, cat(txt_m, txt_queue), a_teacher=img_m, b_teacher=cat(txt_m, txt_queue))
    and t2i likewise with the roles swapped. One symmetric call with queues for both modalities:
    a = cat(img, img_queue), b = cat(txt, txt_queue), num_pairs = N (student features as positives).
    BLIP label smoothing: label_smoothing = 0.1.
    A logit bias cancels in every softmax, so this loss takes none (see siglip_loss).

    Gradients: a, b, logit_scale (teachers get none; queue rows get theirs only if they require grad).

    Distributed (group = a torch.distributed process group; NCCL or gloo): each rank passes its local
    (n, D) features (no queues, the same n on every rank); the returned value is the loss of the global
    batch. b is all-gathered with gradient and each rank computes its n rows against all N columns —
    every global tile once, one GEMM's worth of work per rank like a single GPU — and the O(N) column
    statistics are all-reduced. Gradients follow DDP's convention (as open_clip's local loss with
    gathered features): DDP averages them over ranks, after which they equal the single-process
    gradients of the global loss (so each rank's own gradients are world_size x its share). Inf-CL's ring
    instead passes b blocks around and overlaps that with compute, saving the N x D gathered copy
    (32 MiB at N = 32k, D = 512, bf16), which is small next to the activations; the gather is one
    collective that NCCL runs at full bandwidth, and it keeps the kernels single-GPU.

    backend: "auto" (Triton on CUDA, the chunked PyTorch path on CPU), "triton", "reference" (the
    chunked PyTorch path; the naive materialising spec is kernels.reference.contrastive_loss_reference).
    Traceable by ``torch.compile(fullgraph=True)`` (the Triton launchers are the custom ops
    ``mmfast::contrastive_fwd`` / ``_bwd``); differentiable once (double backward raises).
    """
    _check_features("a", a, (2, 3))
    _check_features("b", b, (2,))
    _check_pair("a", a, "b", b)
    Na, Nb = a.shape[0], b.shape[0]
    if Nb < Na:
        raise ValueError(f"b must have at least as many rows as a (M >= N: pairs, then extra negatives), "
                         f"got a {tuple(a.shape)} and b {tuple(b.shape)}")
    P = Na if num_pairs is None else num_pairs
    if not isinstance(P, int) or isinstance(P, bool) or not 1 <= P <= Na:
        raise ValueError(f"num_pairs must be an int in [1, {Na}] (rows of a), got {num_pairs!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    if (a_teacher is None) != (b_teacher is None):
        raise ValueError("a_teacher and b_teacher must be given together")
    if alpha > 0 and a_teacher is None:
        raise ValueError("alpha > 0 needs the teacher's features a_teacher and b_teacher")
    if a_teacher is not None:
        _check_features("a_teacher", a_teacher, (a.dim(),))
        _check_features("b_teacher", b_teacher, (2,))
        for name, t, ref in (("a_teacher", a_teacher, a), ("b_teacher", b_teacher, b)):
            _check_pair(name, t, name[0], ref)
            if t.shape != ref.shape:
                raise ValueError(f"{name} must have the shape of {name[0]}, {tuple(ref.shape)}, got {tuple(t.shape)}")
        if alpha == 0:
            a_teacher = b_teacher = None  # no distillation term: skip the teacher's tiles
    scale = _scale_tensor("logit_scale", logit_scale, a.device, log_scale, max_scale)
    impl = _impl("contrastive_loss", backend, a.device)
    if normalize:
        a, b = _normalize(a), _normalize(b)
        if a_teacher is not None:
            a_teacher, b_teacher = _normalize(a_teacher), _normalize(b_teacher)
    if a_teacher is not None:
        a_teacher, b_teacher = a_teacher.detach(), b_teacher.detach()
    bias = torch.zeros((), device=a.device)
    cfg = dict(mode=MODE_SOFTMAX, symmetric=bool(symmetric), eps=float(label_smoothing), alpha=float(alpha),
               pairs=P, impl=impl, rows_total=Na, pairs_total=P)
    if group is not None:
        from ._distributed import all_gather_rows

        rank, size = _distributed_setup("contrastive_loss", group, a, b)
        b = all_gather_rows(b, group, with_grad=True)
        if b_teacher is not None:
            b_teacher = all_gather_rows(b_teacher, group, with_grad=False)
        cfg.update(group=group, diag_off=rank * Na, rows_total=Na * size, pairs_total=Na * size)
    return _SlicedContrastive.apply(a, b, scale, bias, a_teacher, b_teacher, _Config(**cfg))


def siglip_loss(a, b, logit_scale, logit_bias, *, normalize=False, log_scale=True, max_scale=100.0,
                group=None, backend="auto"):
    """SigLIP's pairwise sigmoid loss without the N x M logits. Returns a 0-dim fp32 tensor.

    a (N, D), b (M, D), M >= N (extra negatives allowed), same dtype and device. With
    s = exp(logit_scale) (clamped to max_scale; log_scale=False: s = logit_scale), L_ij = s·<a_i, b_j> +
    logit_bias and z_ij = 1 if i == j else −1:
        loss = −(1/N) Σ_ij log σ(z_ij · L_ij)
    (big_vision / open_clip SigLipLoss; init logit_scale = log 10, logit_bias = −10). Gradients for a, b,
    logit_scale and logit_bias. Distributed as contrastive_loss (b all-gathered, N the global batch).
    """
    _check_features("a", a, (2,))
    _check_features("b", b, (2,))
    _check_pair("a", a, "b", b)
    if b.shape[0] < a.shape[0]:
        raise ValueError(f"b must have at least as many rows as a (M >= N), got a {tuple(a.shape)} and b {tuple(b.shape)}")
    scale = _scale_tensor("logit_scale", logit_scale, a.device, log_scale, max_scale)
    bias = _scale_tensor("logit_bias", logit_bias, a.device, False, None)
    impl = _impl("siglip_loss", backend, a.device)
    if normalize:
        a, b = _normalize(a), _normalize(b)
    Na = a.shape[0]
    cfg = dict(mode=MODE_SIGMOID, symmetric=False, eps=0.0, alpha=0.0, pairs=Na, impl=impl, rows_total=Na,
               pairs_total=Na)
    if group is not None:
        from ._distributed import all_gather_rows

        rank, size = _distributed_setup("siglip_loss", group, a, b)
        b = all_gather_rows(b, group, with_grad=True)
        cfg.update(group=group, diag_off=rank * Na, rows_total=Na * size, pairs_total=Na * size)
    return _SlicedContrastive.apply(a, b, scale, bias, None, None, _Config(**cfg))

