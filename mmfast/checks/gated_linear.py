"""`python -m mmfast check` cases for tanh_gated_linear (output and every gradient) and the gated
cross-attention block (output) against fp64, within 2x (3x for gradients) of PyTorch's own error in the
same dtype.

float64 mode (``cases(device, torch.float64)``): backend="reference" in float64 against an independent
float64 formulation (the eager ``residual + tanh(gate) * F.linear(a, weight, bias)`` chain with the row
mask applied by ``torch.where``; the block against the dense eager reference of the model), within
1e-10 relative.
"""
import torch

_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_F64_RTOL = 1e-10
_B, _L, _K, _N = 2, 77, 80, 96


def _masters(gate):
    g = torch.Generator().manual_seed(0)
    masters = [torch.randn(_B, _L, _K, generator=g, dtype=torch.float64),
               torch.randn(_N, _K, generator=g, dtype=torch.float64) * _K ** -0.5,
               torch.randn(_N, generator=g, dtype=torch.float64),
               torch.randn(_N if gate == "vector" else 1, generator=g, dtype=torch.float64) * 0.5,
               torch.randn(_B, _L, _N, generator=g, dtype=torch.float64)]
    dy = torch.randn(_B, _L, _N, generator=g, dtype=torch.float64)
    return masters, dy


def _gated_linear_case(device, backend, dtype, gate, row_mask):
    def run():
        from mmfast.kernels import tanh_gated_linear
        from mmfast.kernels.reference import tanh_gated_linear_reference

        masters, dy = _masters(gate)
        mask = (torch.arange(_L) < 20).expand(_B, _L).to(device) if row_mask else None

        def grads(fn, prec, dev):
            leaves = [m.to(device=dev, dtype=prec if i != 3 else torch.float32 if prec != torch.float64 else prec)
                      .requires_grad_() for i, m in enumerate(masters)]
            out = fn(*leaves, row_mask=None if mask is None else mask.to(dev))
            return [out] + list(torch.autograd.grad(out, leaves, dy.to(device=dev, dtype=out.dtype)))

        ours = grads(lambda *t, row_mask: tanh_gated_linear(*t, row_mask=row_mask, backend=backend), dtype, device)
        exact = grads(tanh_gated_linear_reference, torch.float64, "cpu")
        same = grads(tanh_gated_linear_reference, dtype, "cpu")
        err, tol, ok = 0.0, 0.0, True
        for i, (o, e, s) in enumerate(zip(ours, exact, same)):
            factor = 2.0 if i == 0 else 3.0
            o_err = (o.double().cpu() - e).abs().max().item()
            bound = factor * (s.double() - e).abs().max().item() + (1e-6 if dtype == torch.float32 else 1e-4)
            if i == 4:  # the gate's gradient: one sum of B·L·N products; allow a few units of fp32 roundoff of it
                bound += 16 * torch.finfo(torch.float32).eps * e.abs().max().item()
            ok = ok and o_err <= bound
            err, tol = max(err, o_err), max(tol, bound)
        return err, tol, False, ok

    return run


def _gated_linear_f64_case(device, gate, row_mask):
    """backend="reference" in float64 vs the eager chain written out here, output and every gradient."""

    def run():
        import torch.nn.functional as F

        from mmfast.kernels import tanh_gated_linear

        masters, dy = _masters(gate)
        mask = (torch.arange(_L) < 20).expand(_B, _L).to(device) if row_mask else None
        dy = dy.to(device)

        def eager(a, w, b, g, r, row_mask):
            out = r + torch.tanh(g) * F.linear(a, w, b)
            return out if row_mask is None else torch.where(row_mask[..., None], r, out)

        def grads(fn):
            leaves = [m.to(device).requires_grad_() for m in masters]
            out = fn(*leaves, row_mask=mask)
            return [out] + list(torch.autograd.grad(out, leaves, dy))

        ours = grads(lambda *t, row_mask: tanh_gated_linear(*t, row_mask=row_mask, backend="reference"))
        expected = grads(eager)
        err, tol = 0.0, 0.0
        ok = all(o.dtype == torch.float64 for o in ours)
        for o, e in zip(ours, expected):
            o_err = (o - e).abs().max().item()
            bound = _F64_RTOL * max(e.abs().max().item(), 1e-300)
            ok = ok and o_err <= bound
            err, tol = max(err, o_err), max(tol, bound)
        return err, tol, False, ok

    return run


def _block_case(device, backend, variant, dtype=torch.float32):
    def run():
        from mmfast.nn import GatedCrossAttentionBlock
        from mmfast.nn.gated_cross_attention import gated_xattn_dense_reference

        torch.manual_seed(0)
        kv_heads = 2 if variant == "mllama" else None
        blk = GatedCrossAttentionBlock(64, 4, variant=variant, kv_heads=kv_heads, ff_mult=2, backend=backend)
        blk = blk.to(device=device, dtype=dtype)
        with torch.no_grad():
            blk.attn_gate.fill_(0.6)
            blk.ff_gate.fill_(-0.3)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 37, 64, generator=g).to(device=device, dtype=dtype)
        media = torch.randn(2, 3, 5, 64, generator=g).to(device=device, dtype=dtype)
        loc = torch.zeros(2, 37, dtype=torch.bool)
        loc[0, [4, 15, 30]] = True
        loc[1, 9] = True
        loc = loc.to(device)
        p = dict(blk.named_parameters())
        with torch.no_grad():
            out = blk(x, media, loc)
            exact = gated_xattn_dense_reference(x.double(), media.double(), loc, {k: v.double() for k, v in p.items()},
                                                heads=4, kv_heads=kv_heads, variant=variant)
            same = gated_xattn_dense_reference(x, media, loc, p, heads=4, kv_heads=kv_heads, variant=variant)
        err = (out.double() - exact).abs().max().item()
        if dtype == torch.float64:
            tol = _F64_RTOL * exact.abs().max().item()
            return err, tol, False, out.dtype == torch.float64 and err <= tol
        tol = 2 * (same.double() - exact).abs().max().item() + 1e-6
        return err, tol, False, err <= tol

    return run


def cases(device, dtype=None):
    """(op, backend, dtype, shape, run) rows; `dtype` torch.float64: the reference backend in float64 only."""
    shape = "(2, 77, 80) @ (96, 80)ᵀ, {} gate{}, fwd+bwd"
    if dtype == torch.float64:
        for gate, row_mask in (("scalar", False), ("vector", True)):
            label = shape.format(gate, ", row mask" if row_mask else "")
            yield ("tanh_gated_linear", "reference", "fp64", label, _gated_linear_f64_case(device, gate, row_mask))
        for variant in ("flamingo", "mllama"):
            yield ("GatedCrossAttentionBlock", "reference", "fp64",
                   f"{variant}: B=2 L=37 d=64, 3 images x 5 tokens, fwd",
                   _block_case(device, "reference", variant, torch.float64))
        return
    for backend in ("gemm", "triton", "reference"):
        for case_dtype, gate, row_mask in ((torch.float32, "scalar", False), (torch.bfloat16, "vector", True)):
            label = shape.format(gate, ", row mask" if row_mask else "")
            yield ("tanh_gated_linear", backend, _NAMES[case_dtype], label,
                   _gated_linear_case(device, backend, case_dtype, gate, row_mask))
    # on CUDA "auto" runs the block's gated GEMMs on backend="gemm" (on the CPU it is the reference)
    for backend in ("triton", "auto") if device.type == "cuda" else ("triton",):
        for variant in ("flamingo", "mllama"):
            yield ("GatedCrossAttentionBlock", backend, "fp32",
                   f"{variant}: B=2 L=37 d=64, 3 images x 5 tokens, fwd", _block_case(device, backend, variant))
