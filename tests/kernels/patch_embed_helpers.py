"""Shared helpers of the patch embedding tests: run an op on every path and compare by the rule."""
import importlib

import pytest
import torch
from numerics import assert_close_by_rule, poison_, randn

# the launchers' module (the attribute mmfast.kernels.patch_embed is the function, hence importlib)
pe_launch = importlib.import_module("mmfast.kernels.patch_embed._launch")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element a kernel forgets to write fails."""
    monkeypatch.setattr(pe_launch, "_empty", lambda *s, device, dtype: poison_(torch.empty(*s, device=device, dtype=dtype)))
    monkeypatch.setattr(pe_launch, "_empty_like", lambda t: poison_(torch.empty_like(t)))


def leaves(tensors, dtype, device):
    """Copies of the fp64 masters in `dtype` as fresh leaves (tensors, or tuples of them, or None)."""
    out = {}
    for name, t in tensors.items():
        if t is None or not t.is_floating_point():
            out[name] = t.to(device) if t is not None else None
            continue
        if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
            c = t.to(device=device, dtype=dtype, copy=True)  # keeps channels-last
        else:  # a strided view: convert its whole storage and view it with the same strides
            flat = torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
            c = flat.to(device=device, dtype=dtype, copy=True).as_strided(t.shape, t.stride(), t.storage_offset())
        c = c.detach()
        out[name] = c.requires_grad_(True)
    return out


def run(op, tensors, dtype, device, backend, grad_seed, grad_dtype=None, backward=True, **kwargs):
    """(output, {name: grad}) of op(**tensors in dtype, **kwargs) with a fixed random upstream grad
    (rounded through grad_dtype first, so every run sees the same values)."""
    ts = leaves(tensors, dtype, device)
    out = op(**ts, **kwargs, backend=backend)
    if not backward:
        return out, {}
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(grad_dtype or out.dtype).to(device=device, dtype=out.dtype))
    grads = {n: t.grad for n, t in ts.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    return out, grads


def check_against_reference(op, tensors, dtype, device, grads=True, **kwargs):
    """Triton in `dtype` vs the fp64 reference, with PyTorch in `dtype` as the yardstick (2x, grads 3x)."""
    seed = int(torch.randint(0, 2**31, (1,)).item())
    got, got_g = run(op, tensors, dtype, device, "triton", seed, backward=grads, **kwargs)
    # the fp64 reference sees the same (rounded) input values, so errors measure the computation only
    quantized = {k: (v.to(dtype).to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                 for k, v in tensors.items()}
    exact, exact_g = run(op, quantized, torch.float64, "cpu" if device.type == "cpu" else device, "reference", seed, dtype, backward=grads, **kwargs)
    same, same_g = run(op, tensors, dtype, device, "reference", seed, backward=grads, **kwargs)
    assert got.dtype == dtype and got.shape == exact.shape, (got.dtype, got.shape, exact.shape)
    assert_close_by_rule(got, exact, same, what="output")
    if grads:
        for name in exact_g:
            if exact_g[name] is None:
                continue
            assert got_g[name] is not None, f"no gradient for {name}"
            assert got_g[name].dtype == (tensors[name].to(dtype).dtype), name
            floor = None
            if exact_g[name].numel() == 1:
                # a scalar (a gate) summed over every output element in fp32: PyTorch's error is one lucky or
                # unlucky draw of one reduction order, so allow the noise of another order: 32 fp32 ulps of
                # its size (thousands of terms with cancellation), or 4 ulps of the dtype it is stored in
                ulps = max(4 * torch.finfo(dtype).eps, 32 * torch.finfo(torch.float32).eps)
                floor = ulps * exact_g[name].abs().item() + 1e-6
            assert_close_by_rule(got_g[name], exact_g[name], same_g[name], factor=3.0, floor=floor, what=f"d_{name}")
    return got, exact


__all__ = ["check_against_reference", "poisoned_outputs", "randn", "run"]
