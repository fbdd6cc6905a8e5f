"""`python -m mmfast check` cases for flash attention: one small case per kind of attention the seed
models run, forward and backward, against the fp64 reference with the 2x rule (3x for gradients).
With ``dtype=torch.float64``: the reference backend in float64 against F.scaled_dot_product_attention in
float64 (an independent formulation), to 1e-10 relative."""
import torch

# name, (B, Lq, Lk, H, D), mask: small versions of ViT / CLIP text / Q-Former ITG / Flamingo cross-attention.
# The ViT case's backward is left to the CUDA run: through the interpreter it alone would take ~6 s.
SHAPES = (
    ("ViT non-causal", (1, 197, 197, 1, 64), "none"),
    ("CLIP text causal", (1, 77, 77, 1, 64), "causal"),
    ("Q-Former ITG intervals", (1, 32 + 17, 32 + 17, 1, 64), "itg"),
    ("Flamingo media x-attn (empty rows)", (2, 45, 3 * 8, 1, 80), "media"),
)


def _mask_kwargs(mask, B, Lq, device):
    from mmfast.kernels.attention import masks

    if mask == "causal":
        return {"causal": True}
    if mask == "itg":
        s, e = masks.qformer_masks(32, Lq - 32, device=device).itg
        return {"kv_start": s, "kv_end": e}
    if mask == "media":
        ids = torch.arange(Lq).repeat(B, 1)
        ids[0, [4, 20, 33]] = -1  # text before the first image: rows that see nothing
        ids[1, [0, 1, 30]] = -1
        s, e = masks.media_intervals(ids, -1, 8)
        return {"kv_start": s.to(device), "kv_end": e.to(device)}
    return {}


def _inputs(shape, dtype, device, seed):
    B, Lq, Lk, H, D = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, H, D, generator=g, dtype=torch.float64) for n in (Lq, Lk, Lk))
    do = torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64)
    return [t.to(device, dtype) for t in (q, k, v, do)]


def _grads(fn, q, k, v, do, dtype=None):
    """dq, dk, dv of fn at (q, k, v), as leaves of `dtype` (fp64 leaves keep the exact gradients unrounded)."""
    q, k, v = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(fn(q, k, v), (q, k, v), do.to(q.dtype))


def _worst(errors):
    """(err, tol) of the output furthest from passing, as err / tol."""
    return max(errors, key=lambda et: et[0] / et[1])


def _dense_mask(kw, B, Lq, Lk, device):
    """The boolean (B, 1, Lq, Lk) mask of the mask arguments, for F.scaled_dot_product_attention."""
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)
    mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    if kw.get("causal"):
        mask = mask & (j <= i + Lk - Lq)
    if "kv_start" in kw:
        start, end = (t.reshape(-1, 1, Lq, 1).long() for t in (kw["kv_start"], kw["kv_end"]))
        mask = mask & (j >= start) & (j < end)
    return mask


def _float64_cases(device):
    import torch.nn.functional as F

    from mmfast.kernels import flash_attention

    for seed, (name, shape, mask) in enumerate(SHAPES):
        B, Lq, Lk, H, D = shape
        label = f"{name} B={B} L={Lq}" + (f"x{Lk}" if Lk != Lq else "") + f" H={H} D={D}"
        for backward in (False, True):

            def run(backward=backward, shape=shape, mask=mask, seed=seed):
                q, k, v, do = _inputs(shape, torch.float64, device, seed)
                kw = _mask_kwargs(mask, shape[0], shape[1], device)
                dense = _dense_mask(kw, shape[0], shape[1], shape[2], device)
                ours = lambda q, k, v: flash_attention(q, k, v, backend="reference", **kw)  # noqa: E731
                sdpa = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
                    *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=dense).transpose(1, 2)
                if backward:
                    got, ref = _grads(ours, q, k, v, do), _grads(sdpa, q, k, v, do)
                else:
                    with torch.no_grad():
                        got, ref = (ours(q, k, v),), (sdpa(q, k, v),)
                if any(a.dtype != torch.float64 for a in got):
                    return float("nan"), 0.0, False, False
                err = max((a - r).abs().max().item() for a, r in zip(got, ref))
                tol = 1e-10 * max(r.abs().max().item() for r in ref)
                return err, tol, False, err <= tol

            op = "flash_attention" + (".backward (dq, dk, dv)" if backward else "")
            yield (op, "reference", "fp64", label + " vs SDPA fp64", run)


def cases(device, dtype=None):
    """dtype None: bf16 on the Triton and reference backends vs the fp64 reference; torch.float64: the
    reference backend in float64 vs F.scaled_dot_product_attention."""
    if dtype == torch.float64:
        yield from _float64_cases(device)
        return
    if dtype is not None:
        raise ValueError(f"attention checks: dtype must be None or torch.float64, got {dtype}")
    from mmfast.kernels import flash_attention
    from mmfast.kernels.reference import attention_reference

    dtype = torch.bfloat16
    for seed, (name, shape, mask) in enumerate(SHAPES):
        B, Lq, Lk, H, D = shape
        label = f"{name} B={B} L={Lq}" + (f"x{Lk}" if Lk != Lq else "") + f" H={H} D={D}"
        for backend in ("triton", "reference"):
            for backward in (False, True):
                if backward and backend == "triton" and device.type != "cuda" and Lq * Lk > 100 * 100:
                    continue

                def run(backend=backend, backward=backward, shape=shape, mask=mask, seed=seed):
                    q, k, v, do = _inputs(shape, dtype, device, seed)
                    kw = _mask_kwargs(mask, shape[0], shape[1], device)
                    ours = lambda q, k, v: flash_attention(q, k, v, backend=backend, **kw)  # noqa: E731
                    same = lambda q, k, v: attention_reference(q, k, v, **kw)  # noqa: E731
                    exact = lambda q, k, v: attention_reference(q, k, v, compute_dtype=torch.float64, **kw)  # noqa: E731
                    if backward:
                        got, yard, factor = _grads(ours, q, k, v, do), _grads(same, q, k, v, do), 3
                        ref = _grads(exact, q, k, v, do, torch.float64)
                    else:
                        with torch.no_grad():
                            got, ref, yard, factor = (ours(q, k, v),), (exact(q, k, v),), (same(q, k, v),), 2
                    errors = []
                    for a, r, y in zip(got, ref, yard):
                        if torch.isnan(a).any():
                            return float("nan"), 0.0, False, False
                        err = (a.double() - r).abs().max().item()
                        errors.append((err, factor * (y.double() - r).abs().max().item() + 1e-4))
                    err, tol = _worst(errors)
                    return err, tol, False, err <= tol

                op = "flash_attention" + (".backward (dq, dk, dv)" if backward else "")
                yield (op, backend, "bf16", label, run)
