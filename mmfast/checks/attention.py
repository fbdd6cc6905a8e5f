"""`python -m mmfast check` cases for flash attention: one small case per kind of attention the seed
models run, forward and backward, against the fp64 reference with the 2x rule (3x for gradients)."""
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


def cases(device):
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
