"""`python -m mmfast check` cases for tanh_gated_linear and the gated cross-attention block: output and
every gradient against fp64, within 2x (3x for gradients) of PyTorch's own error in the same dtype."""
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


def cases(device):
    backends = ("triton", "reference")
    for backend in backends:
        for dtype, gate, row_mask in ((torch.float32, "scalar", False), (torch.bfloat16, "vector", True)):
            shape = f"(2, 77, 80) @ (96, 80)ᵀ, {gate} gate" + (", row mask" if row_mask else "") + ", fwd+bwd"
            yield ("tanh_gated_linear", backend, _NAMES[dtype], shape,
                   _gated_linear_case(device, backend, dtype, gate, row_mask))
