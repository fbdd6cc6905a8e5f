"""Contrastive losses without the N x M logits: CLIP / MoCo / ALBEF / BLIP / BLIP-2 InfoNCE and SigLIP.

Every loss needs, per row and per column of the logits, only a few statistics (max and log of the sum of
exp, the diagonal, the sum for label smoothing, the teacher's max and log-sum and the teacher-weighted mean
for distillation). The forward computes each logits tile once and produces the row statistics online and
the column statistics as partials, one row of them per forward program; the backward recomputes tiles
(deterministically: one kernel for da over row blocks, one for db over column blocks, no atomics).

Extra memory beyond inputs, outputs and gradients (Triton), exactly: row statistics 4·Na fp32 (7·Na with a
teacher) and column statistics 3·Nb (6·Nb), kept for the backward; for the symmetric loss only, the
forward's column partials K·P·Nb fp32, merged by a streaming kernel and freed before the forward returns.
P = the forward programs the GPU runs at once (its SM count; twice that for fp32), each looping over row
blocks and merging its columns' statistics in place; K = 2 (max and sum of exp) +1 with label smoothing +3
with a teacher: O(N) — 33 MiB at N = 32,768 and 66 MiB at N = 65,536 for plain bf16 CLIP on a 132-SM H100
(the max kept apart from the sum doubles the 16.5 MiB of one log-sum-exp plane: the price of accurate
gradients at large logits). normalize=True adds the normalised copies of a and b (as F.normalize does).
backend="chunked" keeps a fixed-size chunk of logits instead (see _chunked.py): O(N) in all.

backend="gemm" (what "auto" runs on CUDA for 2-D features) trades some of that memory for cuBLAS's GEMM
rate: per chunk of rows (at most 2^25 similarities, 128 MiB of fp32), cuBLAS writes the fp32 similarities,
the forward kernel reads them instead of computing them (FROM_MEMORY) and the gradient kernel turns them
into G in the input dtype, on which cuBLAS runs da = s·G·b and db += s·Gᵀ·a. The fused kernels above
reached only ~80 TFLOP/s on an H100 (tiles small enough for the statistics' registers: 0.47x open_clip's
materialising ClipLoss at N = 32k, 2026-11-28); the GEMMs are 3 of ~4 N²D-FLOP passes, at cuBLAS's rate,
and the rest streams 6-10 bytes per similarity.

Layout: _kernels.py (the Triton kernels), _configs.py (launch configs, compile specs), _launch.py
(validation, launchers, custom ops and their autograd), _chunked.py (the chunked PyTorch path),
_distributed.py (collectives); this file holds the public ops.
"""
from .._common import autocast_op
from ._configs import compile_specs
from ._launch import run_contrastive_loss, run_siglip_loss

__all__ = ["contrastive_loss", "siglip_loss", "compile_specs"]


@autocast_op("a", "b", "a_teacher", "b_teacher")
def contrastive_loss(a, b, logit_scale, *, normalize=False, label_smoothing=0.0, symmetric=True, num_pairs=None,
                     a_teacher=None, b_teacher=None, alpha=0.0, log_scale=True, max_scale=100.0, group=None,
                     backend="auto"):
    """InfoNCE / CLIP loss over a·bᵀ without materialising it. Returns a 0-dim tensor: fp32 (fp64 for fp64
    features).

    Shapes: a (Na, D) — or (Na, Q, D) for BLIP-2's query tokens — and b (Nb, D), Nb >= Na, same dtype and
    device, any strides. The first P = num_pairs rows (default Na) are pairs: row i's positive is column i.
    Rows of a past P and rows of b past P are extra negatives (queues).

    Math: s = exp(logit_scale) clamped to max_scale (CLIP: logit_scale is the learned log temperature, init
    log(1/0.07); open_clip clamps the parameter at log(100) after each step, the clamp here has the same
    effect on the forward and a zero gradient past it). log_scale=False takes s = logit_scale directly (e.g.
    1/τ of MoCo / ALBEF). raw_ij = <a_i, b_j> (BLIP-2: max_q <a_iq, b_j>, the gradient going to the arg-max
    query), L_ij = s·raw_ij; with normalize=True the features (and the teachers) are L2-normalised first.
    Targets, per row over the Nb columns:
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
    BLIP label smoothing: label_smoothing = 0.1. A logit bias cancels in every softmax, so this loss takes
    none (see siglip_loss).

    Arguments are validated (ValueError naming the argument): logit_scale a finite number or a one-element
    floating tensor (checked on its device, no host sync: NaN / inf raise there), label_smoothing in [0, 1),
    alpha in [0, 1], max_scale None or > 0, num_pairs in [1, Na], the flags True / False.

    Gradients: a, b, logit_scale (teachers get none; queue rows get theirs only if they require grad), in
    the inputs' dtypes.

    Dtypes and precision: fp16 / bf16 / fp32 features on every backend, fp64 on "reference" and "chunked"
    ("triton" raises ValueError naming the argument). The logits are fp32 dot products of the features (fp32
    accumulation), the statistics and the loss fp32 (fp64 for fp64 features). fp32 dots follow
    ``torch.get_float32_matmul_precision()`` as torch.matmul does: "highest" (the default) exact fp32,
    "high" / "medium" TF32. Under ``torch.autocast`` the op behaves as the chain it replaces,
    ``F.cross_entropy(s * a @ b.T, labels)``: a, b and the teachers are cast to the autocast dtype (as
    the matmul would; fp64 stays), the loss is fp32 (as cross_entropy's under autocast), and the
    gradients come back in the inputs' dtypes.

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

    backend: "auto" (on CUDA "gemm" for 2-D features, "triton" for BLIP-2's (N, Q, D); the reference on
    CPU), "gemm" (cuBLAS writes the fp32 similarities of a chunk of rows, at most 2^25 of them — 128 MiB —
    the Triton kernels take the statistics and G from it, cuBLAS the gradient GEMMs: extra memory
    O(chunk + N·D), the GEMMs at cuBLAS's rate; 2-D features only), "triton" (every tile recomputed in
    one fused kernel: O(N) extra memory; the max over queries), "chunked" (the kernels' algorithm in
    PyTorch with a fixed-size chunk of logits: O(N) extra memory on any device, fp64 included) or
    "reference" (the naive spec ``kernels.reference.contrastive_loss_reference``, which materialises the
    logits; it also supports double backward). "gemm", "triton" and "chunked" are traceable by
    ``torch.compile(fullgraph=True)`` (the custom ops ``mmfast::contrastive_loss_fwd`` / ``_bwd``) and
    differentiable once (double backward raises).
    """
    return run_contrastive_loss(a, b, logit_scale, normalize=normalize, label_smoothing=label_smoothing,
                                symmetric=symmetric, num_pairs=num_pairs, a_teacher=a_teacher, b_teacher=b_teacher,
                                alpha=alpha, log_scale=log_scale, max_scale=max_scale, group=group, backend=backend)


@autocast_op("a", "b")
def siglip_loss(a, b, logit_scale, logit_bias, *, normalize=False, log_scale=True, max_scale=100.0, group=None,
                backend="auto"):
    """SigLIP's pairwise sigmoid loss without the N x M logits. Returns a 0-dim tensor: fp32 (fp64 for fp64
    features).

    a (N, D), b (M, D), M >= N (extra negatives allowed), same dtype and device. With s = exp(logit_scale)
    (clamped to max_scale; log_scale=False: s = logit_scale), L_ij = s·<a_i, b_j> + logit_bias and
    z_ij = 1 if i == j else −1:
        loss = −(1/N) Σ_ij log σ(z_ij · L_ij)
    (big_vision / open_clip SigLipLoss; init logit_scale = log 10, logit_bias = −10). Gradients for a, b,
    logit_scale and logit_bias. logit_scale and logit_bias: finite numbers or one-element floating tensors
    (checked on their device); max_scale None or > 0.

    Dtypes, precision, autocast (the replaced chain: ``s * a @ b.T + bias`` then ``F.logsigmoid``, fp32
    under autocast), distribution (b all-gathered, N the global batch) and backends as contrastive_loss.
    """
    return run_siglip_loss(a, b, logit_scale, logit_bias, normalize=normalize, log_scale=log_scale,
                           max_scale=max_scale, group=group, backend=backend)
