"""Readable PyTorch references: the spec every test and benchmark imports.

Each reference states the math of one op in plain PyTorch. Kernels must match these within the
numerics rule in tests/numerics.py (or bit-for-bit where the op says so).
"""
from collections import defaultdict

import torch


def ema_update_reference(ema_tensors, tensors, momentum, *, ema_buffers=(), buffers=()):
    """θ_ema ← m·θ_ema + (1−m)·θ for every pair, in place; buffers are copied.

    Written as ``torch._foreach_lerp_(ema, θ, 1 − m)``, which is what the kernels reproduce bit for
    bit: with w = 1 − m rounded to fp32 and arithmetic in fp32 (the "opmath" of fp16/bf16),
    ``ema + w·(θ − ema)`` when |w| < 0.5 and ``θ − (θ − ema)·(1 − w)`` otherwise, each a single fused
    multiply-add, rounded once to the EMA's dtype. Pairs of different dtypes are computed in fp32.
    float64 (on either side of a pair) is computed in float64, with w = 1 − m in float64.
    `momentum` is a Python float or a 0-dim tensor.
    """
    groups = defaultdict(lambda: ([], []))
    for e, t in zip(ema_tensors, tensors):
        groups[(e.dtype, t.dtype)][0].append(e)
        groups[(e.dtype, t.dtype)][1].append(t)
    for (ema_dtype, src_dtype), (ema_group, src_group) in groups.items():
        opmath = torch.float64 if torch.float64 in (ema_dtype, src_dtype) else torch.float32
        weight = 1.0 - momentum.to(opmath) if isinstance(momentum, torch.Tensor) else 1.0 - momentum
        if ema_dtype == src_dtype:
            torch._foreach_lerp_(ema_group, src_group, weight)
        else:
            wide = [e.to(opmath) for e in ema_group]
            torch._foreach_lerp_(wide, [t.to(opmath) for t in src_group], weight)
            torch._foreach_copy_(ema_group, wide)
    if len(ema_buffers):
        torch._foreach_copy_(list(ema_buffers), list(buffers))


def attention_dense_mask(seqlen_q, seqlen_k, *, causal=False, kv_start=None, kv_end=None, key_padding_mask=None, device=None):
    """Boolean visibility mask (B', seqlen_q, seqlen_k), True where query i may attend to key j.

    B' is the batch of kv_start / kv_end / key_padding_mask (1 when none is batched). The conditions
    intersect: ``kv_start[i] <= j < kv_end[i]`` (each bound optional), ``j <= i + seqlen_k - seqlen_q``
    when `causal` (bottom-right aligned, flash-attn >= 2.1), and ``not key_padding_mask[b, j]``
    (True marks a padded key, as in torch.nn.MultiheadAttention).
    """
    if device is None:
        for t in (kv_start, kv_end, key_padding_mask):
            if t is not None:
                device = t.device
                break
    i = torch.arange(seqlen_q, device=device).view(1, seqlen_q, 1)
    j = torch.arange(seqlen_k, device=device).view(1, 1, seqlen_k)
    mask = torch.ones(1, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:
        mask = mask & (j <= i + (seqlen_k - seqlen_q))
    if kv_start is not None:
        mask = mask & (j >= _per_row(kv_start, seqlen_q).to(device=device, dtype=torch.int64))
    if kv_end is not None:
        mask = mask & (j < _per_row(kv_end, seqlen_q).to(device=device, dtype=torch.int64))
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask.reshape(key_padding_mask.shape[0], 1, seqlen_k).to(device=device, dtype=torch.bool)
    return mask


def _per_row(t, seqlen_q):
    """(Lq,) or (B, Lq) -> (1 or B, Lq, 1)."""
    return t.reshape(1 if t.dim() == 1 else t.shape[0], seqlen_q, 1)


def _attention_dense(q, k, v, mask, scale):
    """softmax(scale·q kᵀ + mask) v on (B, L, H, D) tensors in their own dtype; fully hidden rows give 0."""
    group = q.shape[2] // k.shape[2]
    if group != 1:  # GQA / MQA: query head h reads kv head h // group
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = mask.unsqueeze(1)  # (B', 1, Lq, Lk)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)  # -inf on hidden rows
    # a row that sees no key would softmax to NaN: give it finite scores, then zero its weights
    row_visible = mask.any(dim=-1, keepdim=True)
    probs = torch.softmax(torch.where(row_visible, scores, torch.zeros_like(scores)), dim=-1)
    probs = torch.where(mask, probs, torch.zeros_like(probs))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, kv_start=None, kv_end=None, key_padding_mask=None,
                        cu_seqlens_q=None, cu_seqlens_k=None, compute_dtype=None, return_lse=False):
    """Attention with interval / causal / padding masks, as dense einsums: the spec of flash_attention.

    ``out[b, i, h] = Σ_j softmax_j(scale · q[b, i, h] · k[b, j, h // g]) v[b, j, h // g]`` over the keys j
    that row i sees (see `attention_dense_mask`), with g = Hq / Hkv (GQA) and scale = 1/√D by default.
    Rows that see no key give out = 0 and lse = -inf.

    q (B, Lq, Hq, D), k / v (B, Lk, Hkv, D); or packed (total, H, D) with cu_seqlens_q / cu_seqlens_k
    (int32, B + 1 offsets), when kv_start / kv_end are (total_q,) and relative to each sequence's start.
    kv_start / kv_end: (B, Lq) or (Lq,) ints. key_padding_mask: (B, Lk) bool, True marks a padded key.

    compute_dtype: None computes in the inputs' dtype (the "same computation in PyTorch" yardstick);
    torch.float64 gives the exact reference. The output has the compute dtype. Differentiable.
    Returns out, or (out, lse) with lse (B, Hq, Lq) — (Hq, total_q) when packed — in fp32 or wider.
    """
    if compute_dtype is not None:
        q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if cu_seqlens_q is None:
        mask = attention_dense_mask(q.shape[1], k.shape[1], causal=causal, kv_start=kv_start, kv_end=kv_end,
                                    key_padding_mask=key_padding_mask, device=q.device)
        out, lse = _attention_dense(q, k, v, mask, scale)
        return (out, lse) if return_lse else out
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        mask = attention_dense_mask(
            q1 - q0, k1 - k0, causal=causal,
            kv_start=None if kv_start is None else kv_start[q0:q1],
            kv_end=None if kv_end is None else kv_end[q0:q1],
            device=q.device,
        )
        out, lse = _attention_dense(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], mask, scale)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape[:-1] + v.shape[-1:])
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    lse = torch.cat(lses, dim=-1) if lses else q.new_zeros(q.shape[1], 0, dtype=lse_dtype)
    return (out, lse) if return_lse else out


# ==== patch_embed references: begin ====
def resample_pos_embed_reference(table, new_grid, old_grid, *, interpolation="bicubic", mode="timm"):
    """Resample a patch position table (N_old, D) laid out row-major on `old_grid` to `new_grid`.

    mode="timm": timm's ``resample_abs_pos_embed``: computed in fp32, ``F.interpolate(size=new_grid,
    mode=interpolation, antialias=True)``, cast back to the table's dtype. (With antialias PyTorch's
    bicubic kernel uses a = -0.5 instead of -0.75, so it differs from "hf" even when upsampling.)
    mode="hf": Hugging Face ViT's ``interpolate_pos_encoding`` (transformers >= 4.44): in the table's
    dtype, ``F.interpolate(size=new_grid, mode="bicubic", align_corners=False)``, no antialias.
    mode="hf_legacy": the older form (transformers < 4.44, DINO): ``scale_factor=((gh + 0.1) / gh0,
    (gw + 0.1) / gw0)``; PyTorch then maps coordinates with that factor rather than the size ratio, so
    the values differ slightly from "hf". A bf16 table is resampled in fp32 and rounded back, as
    Hugging Face's Idefics does (the one model here that uses this form).
    Returns (N_new, D). Same grid: the table itself (both libraries return it unchanged).
    """
    import torch.nn.functional as F

    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return table
    dim = table.shape[-1]
    x = table.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    if mode == "timm":
        x = F.interpolate(x.float(), size=new_grid, mode=interpolation, antialias=True).to(table.dtype)
    elif mode == "hf":
        x = F.interpolate(x, size=new_grid, mode=interpolation, align_corners=False)
    elif mode == "hf_legacy":
        scale = ((new_grid[0] + 0.1) / old_grid[0], (new_grid[1] + 0.1) / old_grid[1])
        upcast = x.dtype == torch.bfloat16
        x = F.interpolate(x.float() if upcast else x, scale_factor=scale, mode=interpolation, align_corners=False)
        x = x.to(table.dtype) if upcast else x
        assert tuple(x.shape[-2:]) == new_grid, (tuple(x.shape[-2:]), new_grid)
    else:
        raise ValueError(f"pos_resample must be 'timm', 'hf' or 'hf_legacy', got {mode!r}")
    return x.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], dim)


def patch_embed_reference(images, weight, bias=None, *, pos_embed=None, pos_cls=None, cls_token=None,
                          token_mask=None, mask_token=None, patch_index=None, keep_indices=None,
                          dynamic_pad=False):
    """The eager chain the fused patch embedding replaces (pos_embed already on the image's grid).

    images (B, C, H, W); weight (D, C, P, P); bias (D,); pos_embed (N, D) patch rows for the grid
    (gh, gw) = (H/P, W/P) (ceil with dynamic_pad: right/bottom zero padding); pos_cls (D,) the [CLS]
    position row; cls_token (D,); token_mask (B, N) bool with mask_token (D,); patch_index (B, N) the
    source patch of every token (the ViT recipe's "random other patch"); keep_indices (B, N_keep) the
    MAE kept tokens. Returns (B, [1 +] N or N_keep, D):
      x = conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2)
      x = x.gather(patch_index); x = where(token_mask, mask_token, x); x = x + pos_embed
      x = x.gather(keep_indices); x = cat([cls_token + pos_cls, x])
    Dtypes promote as in timm's / Hugging Face's chains: bf16 patches (conv2d under autocast) plus fp32
    tables give fp32 tokens.
    """
    import torch.nn.functional as F

    P = weight.shape[-1]
    if dynamic_pad:
        H, W = images.shape[-2:]
        images = F.pad(images, (0, (P - W % P) % P, 0, (P - H % P) % P))
    x = F.conv2d(images, weight, bias, stride=P)
    x = x.flatten(2).transpose(1, 2)
    B, N, D = x.shape
    if patch_index is not None:
        x = torch.gather(x, 1, patch_index.long()[..., None].expand(B, N, D))
    if token_mask is not None:
        x = torch.where(token_mask[..., None], mask_token.view(1, 1, D), x)
    if pos_embed is not None:
        x = x + pos_embed.view(1, N, D)
    if keep_indices is not None:
        x = torch.gather(x, 1, keep_indices.long()[..., None].expand(-1, -1, D))
    if cls_token is not None:
        c = cls_token.view(1, 1, D)
        if pos_cls is not None:
            c = c + pos_cls.view(1, 1, D)
        x = torch.cat([c.expand(B, 1, D), x], dim=1)
    return x


def tile_patch_embed_reference(images, weight, bias=None, *, cls_token, pos_embed, pos_gate, tile_pos_embed,
                               tile_embed, tile_embed_gate, aspect_ratio_ids, tile_mask=None):
    """Llama 3.2 Vision (Mllama) embedding of tiled images, as transformers' MllamaVisionModel does it.

    images (B, T, C, H, W); pos_embed (1 + N, D); pos_gate, tile_embed_gate (1,) raw gates;
    tile_pos_embed (R, T * (1 + N) * D) (nn.Embedding weight of MllamaPrecomputedPositionEmbedding);
    tile_embed (R, T * D) (MllamaPrecomputedAspectRatioEmbedding, gated); aspect_ratio_ids (B,).
      x = conv2d(tiles).flatten(2).transpose(1, 2) + tanh(tile_embed_gate) * tile_embed[ar, t]
      x = cat([cls_token, x]) + (1 - tanh(pos_gate)) * pos_embed + tanh(pos_gate) * tile_pos_embed[ar, t]
    Rows of tiles with tile_mask[b, t] == 0 are zeros (mmfast does not compute them). Returns (B, T, 1 + N, D)
    in the dtype the Mllama chain promotes to (bf16 patches plus fp32 tables: fp32).
    """
    import torch.nn.functional as F

    B, T, C, H, W = images.shape
    P = weight.shape[-1]
    x = F.conv2d(images.reshape(B * T, C, H, W), weight, bias, stride=P).flatten(2).transpose(1, 2)
    N, D = x.shape[1], x.shape[2]
    x = x.reshape(B, T, N, D)
    pre = tile_embed[aspect_ratio_ids.long()].reshape(B, T, 1, D)
    x = x + pre * tile_embed_gate.tanh()
    x = torch.cat([cls_token.view(1, 1, 1, D).expand(B, T, 1, D), x], dim=2)
    x = x + ((1 - pos_gate.tanh()) * pos_embed).view(1, 1, N + 1, D)
    tile_pos = tile_pos_embed[aspect_ratio_ids.long()].reshape(B, T, N + 1, D)
    x = x + pos_gate.tanh() * tile_pos
    if tile_mask is not None:
        x = x * tile_mask.to(x.dtype).view(B, T, 1, 1)
    return x
# ==== patch_embed references: end ====


# ----------------------------------------------------------------------------------------------
# Contrastive losses: the naive forms that materialise the logits (what the kernels must equal)


def _contrastive_scalar(x, like):
    """A Python number as a 0-dim tensor on `like`'s device, in fp32 (fp64 for fp64 features); tensors pass."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(float(x), device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))


def _contrastive_scale(logit_scale, log_scale, max_scale):
    s = logit_scale.exp() if log_scale else logit_scale
    return s.clamp(max=max_scale) if max_scale is not None else s


def _similarity(a, b):
    """a (N, D) @ b^T, or for BLIP-2's (N, Q, D) queries the max over q of <a_iq, b_j>."""
    if a.dim() == 3:
        return torch.einsum("nqd,md->nqm", a, b).max(dim=1).values
    return a @ b.T


def _gather_global_batch(group, *tensors):
    """Distributed: every rank's rows, concatenated (with gradient for those that require it; DDP's gradient
    convention: each rank computes the same global loss and the gather's backward sums over ranks)."""
    from .contrastive._distributed import all_gather_rows

    return [None if t is None else all_gather_rows(t, group, with_grad=True) for t in tensors]


def contrastive_loss_reference(a, b, logit_scale, *, normalize=False, label_smoothing=0.0, symmetric=True,
                               num_pairs=None, a_teacher=None, b_teacher=None, alpha=0.0, log_scale=True,
                               max_scale=100.0, group=None):
    """CLIP / MoCo / ALBEF / BLIP / BLIP-2 contrastive loss, materialising the logits.

    logits = s · sim(a, b) with s = exp(logit_scale) clamped to max_scale (log_scale=False: s =
    logit_scale). Row i < P (P = num_pairs, default a's rows) has target distribution
    (1 − α)·((1 − ε)·onehot(i) + ε/M) + α·softmax(teacher logits row i), teacher logits =
    s · sim(a_teacher, b_teacher) without gradient; the loss per row is −Σ_j target_ij·log_softmax_ij.
    Columns j < P likewise over all rows. loss = (mean rows + mean columns)/2, or mean rows when not
    symmetric. As open_clip's ClipLoss (+ label smoothing, queues, ALBEF's soft targets, BLIP-2's max).

    Dtypes as the chain it specifies, ``F.cross_entropy(s * a @ b.T, labels)`` under autocast: the logits in
    the features' dtype (the matmul's), the softmax and the loss in fp32 (fp64 for fp64 features).
    group: a process group; each rank passes its rows, the loss of the global batch (all ranks' rows,
    gathered) is returned on every rank.
    """
    nf = torch.nn.functional
    if group is not None:
        a, b, a_teacher, b_teacher = _gather_global_batch(group, a, b, a_teacher, b_teacher)
        num_pairs = None
    if normalize:
        a, b = nf.normalize(a, dim=-1), nf.normalize(b, dim=-1)
    cdt = torch.promote_types(a.dtype, torch.float32)
    s = _contrastive_scale(_contrastive_scalar(logit_scale, a), log_scale, max_scale)
    logits = (s.to(a.dtype) * _similarity(a, b)).to(cdt)
    P = a.shape[0] if num_pairs is None else num_pairs
    teacher = None
    if alpha > 0:
        with torch.no_grad():
            at, bt = a_teacher, b_teacher
            if normalize:
                at, bt = nf.normalize(at, dim=-1), nf.normalize(bt, dim=-1)
            teacher = (s.detach().to(a.dtype) * _similarity(at, bt)).to(cdt)

    def direction(lg, tg):
        n, m = lg.shape
        hard = (1 - label_smoothing) * torch.eye(n, m, dtype=lg.dtype, device=lg.device) + label_smoothing / m
        targets = (1 - alpha) * hard + (alpha * torch.softmax(tg, dim=1) if tg is not None else 0.0)
        return -(targets * torch.log_softmax(lg, dim=1)).sum(1).mean()

    rows = direction(logits[:P], teacher[:P] if teacher is not None else None)
    if not symmetric:
        return rows
    cols = direction(logits[:, :P].T, teacher[:, :P].T if teacher is not None else None)
    return (rows + cols) / 2


def siglip_loss_reference(a, b, logit_scale, logit_bias, *, normalize=False, log_scale=True, max_scale=100.0,
                          group=None):
    """SigLIP: −(1/N) Σ_ij log σ(z_ij (s·<a_i, b_j> + bias)), z = +1 on the diagonal, −1 elsewhere.

    The logits in the features' dtype, log σ and the loss in fp32 (fp64 for fp64 features); group: as
    contrastive_loss_reference (N the global batch)."""
    nf = torch.nn.functional
    if group is not None:
        a, b = _gather_global_batch(group, a, b)
    if normalize:
        a, b = nf.normalize(a, dim=-1), nf.normalize(b, dim=-1)
    cdt = torch.promote_types(a.dtype, torch.float32)
    s = _contrastive_scale(_contrastive_scalar(logit_scale, a), log_scale, max_scale)
    logits = (s.to(a.dtype) * (a @ b.T) + _contrastive_scalar(logit_bias, a).to(a.dtype)).to(cdt)
    z = 2 * torch.eye(a.shape[0], b.shape[0], dtype=cdt, device=a.device) - 1
    return -nf.logsigmoid(z * logits).sum() / a.shape[0]


# ----------------------------------------------------------------------------------------------
# Tanh-gated linear (the gated residuals of Flamingo, Llama 3.2 Vision, Idefics)


def tanh_gated_linear_reference(a, weight, bias, gate, residual, *, row_mask=None):
    """``residual + torch.tanh(gate) * F.linear(a, weight, bias)``, as Flamingo, Hugging Face Mllama and
    Idefics write the gated residual (``x + self.attn_gate.tanh() * self.o_proj(h)``): the same ops, so
    the same dtypes under type promotion and autocast.

    `gate` is a scalar (one element) or a per-output-channel vector (N elements, Idefics'
    ``alpha_type="vector"``, (N,) or (1, 1, N): flattened to (N,) so that the output keeps the residual's
    shape; a gate with dimensions keeps them, as they decide the promotion). `row_mask` (bool,
    a.shape[:-1] or (M,)): True zeroes that row's update (Llama 3.2's full-text-row mask), so the row's
    output is the residual.
    """
    update = torch.nn.functional.linear(a, weight, bias)
    gate = gate if gate.dim() <= 1 else gate.reshape(-1)
    update = torch.tanh(gate) * update
    if row_mask is not None:
        update = update.masked_fill(row_mask.reshape(*a.shape[:-1], 1), 0.0)
    return residual + update
