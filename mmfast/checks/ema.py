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


def cases(device):
    from mmfast.kernels import ema_update_
    from mmfast.kernels.reference import ema_update_reference

    shapes = _vit_param_shapes(depth=2, dim=96)
    numel = sum(torch.Size(s).numel() for s in shapes)
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
