"""`python -m mmfast check` cases for the momentum EMA update."""
import torch


def _vit_param_shapes(depth, dim, mlp_ratio=4, patch=16, tokens=197):
    """Parameter shapes of a small ViT: a realistic mix of big matrices and tiny vectors."""
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    hidden = dim * mlp_ratio
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,)]
        shapes += [(dim,), (dim,), (hidden, dim), (hidden,), (dim, hidden), (dim,)]
    return shapes + [(dim,), (dim,)]


def cases(device, dtype=None):
    """Every backend against the reference, bit for bit, and within the numerics rule of fp64 math.

    dtype=torch.float64: only backend="reference", in float64, against the float64 formula
    ``m·ema + (1−m)·θ`` at 1e-10 relative (to m·|ema| + (1−m)·|θ|, so no cancellation can hide).
    """
    from mmfast.kernels import ema_update_
    from mmfast.kernels.reference import ema_update_reference

    shapes = _vit_param_shapes(depth=2, dim=96)
    numel = sum(torch.Size(s).numel() for s in shapes)
    if dtype == torch.float64:
        yield from _float64_cases(device, shapes, numel, ema_update_)
        return
    if dtype is not None:
        raise ValueError(f"ema checks: dtype must be None or torch.float64, got {dtype}")
    backends = ("triton", "cuda", "reference") if device.type == "cuda" else ("triton", "cpp", "reference")
    dtype_pairs = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    momentum = 0.996
    for backend in backends:
        for ema_dtype, src_dtype in dtype_pairs:

            def run(backend=backend, ema_dtype=ema_dtype, src_dtype=src_dtype):
                g = torch.Generator().manual_seed(0)
                ema = [torch.randn(s, generator=g).to(device, ema_dtype) for s in shapes]
                src = [torch.randn(s, generator=g).to(device, src_dtype) for s in shapes]
                exact = [(e.double() * momentum + s.double() * (1 - momentum)) for e, s in zip(ema, src)]
                expected = [e.clone() for e in ema]
                ema_update_reference(expected, src, momentum)
                ema_update_(ema, src, momentum, backend=backend)
                err = max((e.double() - x).abs().max().item() for e, x in zip(ema, exact))
                ref_err = max((e.double() - x).abs().max().item() for e, x in zip(expected, exact))
                bitwise = all(torch.equal(a, b) for a, b in zip(ema, expected))
                tol = 2 * ref_err + 1e-7
                return err, tol, bitwise, err <= tol and bitwise

            yield ("ema_update_", backend, f"{names[ema_dtype]}<-{names[src_dtype]}",
                   f"ViT-2x96 list ({len(shapes)} tensors, {numel:,} el)", run)


def _float64_cases(device, shapes, numel, ema_update_):
    for momentum in (0.996, "tensor"):

        def run(momentum=momentum):
            g = torch.Generator().manual_seed(0)
            ema = [torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in shapes]
            src = [torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in shapes]
            m = torch.tensor(0.9931, dtype=torch.float64, device=device) if momentum == "tensor" else momentum
            m64 = float(m)
            exact = [e * m64 + s * (1 - m64) for e, s in zip(ema, src)]
            size = [e.abs() * m64 + s.abs() * (1 - m64) for e, s in zip(ema, src)]
            ema_update_(ema, src, m, backend="reference")
            if any(e.dtype != torch.float64 for e in ema):
                return float("nan"), 1e-10, False, False
            err = max(((e - x).abs() / z.clamp_min(1e-300)).max().item() for e, x, z in zip(ema, exact, size))
            return err, 1e-10, False, err <= 1e-10

        form = "tensor momentum" if momentum == "tensor" else f"m={momentum}"
        yield ("ema_update_", "reference", "fp64<-fp64", f"ViT-2x96 list ({len(shapes)} tensors, {numel:,} el), "
               f"{form}, relative error", run)
