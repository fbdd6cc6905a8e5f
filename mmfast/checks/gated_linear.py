"""`python -m mmfast check` cases for tanh_gated_linear (output and every gradient) and the gated
cross-attention block (output) against fp64, within 2x (3x for gradients) of PyTorch's own error in the
same dtype."""
import torch

_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _gated_linear_case(device, backend, dtype, gate, row_mask):
    def run():
        from mmfast.kernels import tanh_gated_linear
        from mmfast.kernels.reference import tanh_gated_linear_reference

        g = torch.Generator().manual_seed(0)
        B, L, K, N = 2, 77, 80, 96
        masters = [torch.randn(B, L, K, generator=g, dtype=torch.float64),
                   torch.randn(N, K, generator=g, dtype=torch.float64) * K ** -0.5,
                   torch.randn(N, generator=g, dtype=torch.float64),
                   torch.randn(N if gate == "vector" else 1, generator=g, dtype=torch.float64) * 0.5,
                   torch.randn(B, L, N, generator=g, dtype=torch.float64)]
        dy = torch.randn(B, L, N, generator=g, dtype=torch.float64)
        mask = (torch.arange(L) < 20).expand(B, L).to(device) if row_mask else None

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


def _block_case(device, backend, variant):
    def run():
        from mmfast.kernels.reference import gated_xattn_dense_reference
        from mmfast.nn import GatedCrossAttentionBlock

        torch.manual_seed(0)
        kv_heads = 2 if variant == "mllama" else None
        blk = GatedCrossAttentionBlock(64, 4, variant=variant, kv_heads=kv_heads, ff_mult=2, backend=backend).to(device)
        with torch.no_grad():
            blk.attn_gate.fill_(0.6)
            blk.ff_gate.fill_(-0.3)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 37, 64, generator=g).to(device)
        media = torch.randn(2, 3, 5, 64, generator=g).to(device)
        loc = torch.zeros(2, 37, dtype=torch.bool)
        loc[0, [4, 15, 30]] = True
        loc[1, 9] = True
        loc = loc.to(device)
        p = dict(blk.named_parameters())
        out = blk(x, media, loc)
        exact = gated_xattn_dense_reference(x.double(), media.double(), loc, {k: v.double() for k, v in p.items()},
                                            heads=4, kv_heads=kv_heads, variant=variant)
        same = gated_xattn_dense_reference(x, media, loc, p, heads=4, kv_heads=kv_heads, variant=variant)
        err = (out.double() - exact).abs().max().item()
        tol = 2 * (same.double() - exact).abs().max().item() + 1e-6
        return err, tol, False, err <= tol

    return run


def cases(device):
    backends = ("triton", "reference")
    for backend in backends:
        for dtype, gate, row_mask in ((torch.float32, "scalar", False), (torch.bfloat16, "vector", True)):
            shape = f"(2, 77, 80) @ (96, 80)ᵀ, {gate} gate" + (", row mask" if row_mask else "") + ", fwd+bwd"
            yield ("tanh_gated_linear", backend, _NAMES[dtype], shape,
                   _gated_linear_case(device, backend, dtype, gate, row_mask))
    for variant in ("flamingo", "mllama"):
        yield ("GatedCrossAttentionBlock", "triton", "fp32",
               f"{variant}: B=2 L=37 d=64, 3 images x 5 tokens, fwd", _block_case(device, "triton", variant))
