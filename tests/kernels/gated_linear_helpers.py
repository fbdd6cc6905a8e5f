"""Shared by the tanh_gated_linear tests: inputs, one run of a backend against the fp64 reference and PyTorch
in the inputs' dtype (output and every gradient), and the 2x / 3x rule with the gate gradient's floor."""
import torch
from numerics import assert_close_by_rule, poison_, randn

from mmfast.kernels import tanh_gated_linear
from mmfast.kernels.gated_linear import _launch
from mmfast.kernels.reference import tanh_gated_linear_reference

NAMES = ("d_a", "d_weight", "d_bias", "d_gate", "d_residual")


def poison_outputs(monkeypatch):
    """Every buffer the launchers of both backends allocate (``_launch._empty``) comes back NaN-filled."""
    real = _launch._empty
    monkeypatch.setattr(_launch, "_empty", lambda shape, dtype, device: poison_(real(shape, dtype, device)))


def make_inputs(M, K, N, dtype, device, gate, bias=True, lead=None):
    lead = (M,) if lead is None else lead
    a = randn(*lead, K, dtype=dtype, device=device)
    w = randn(N, K, dtype=dtype, device=device, scale=max(K, 1) ** -0.5)
    b = randn(N, dtype=dtype, device=device) if bias else None
    if gate == "scalar":
        g = randn(1, dtype=torch.float32, device=device, scale=0.5).reshape(())  # 0-dim
    elif gate == "vector":
        g = randn(N, dtype=torch.float32, device=device, scale=0.5)
    else:
        g = torch.zeros((), device=device)
    r = randn(*lead, N, dtype=dtype, device=device)
    return a, w, b, g, r


def run_all(a, w, b, g, r, row_mask=None, backend="triton"):
    """(ours, fp64 reference, PyTorch in the inputs' dtype): each (out, grads of the non-None inputs).
    dy comes in the output's dtype (the eager chain's: the residual's, promoted with a vector gate)."""
    out_dtype = tanh_gated_linear_reference(a, w, b, g, r, row_mask=row_mask).dtype
    dy = randn(*r.shape, dtype=out_dtype, device=r.device)
    ours = _with_none(lambda a, w, b, g, r: tanh_gated_linear(a, w, b, g, r, row_mask=row_mask, backend=backend),
                      (a, w, b, g, r), dy)
    wide = [None if t is None else t.double() for t in (a, w, b, g, r)]
    ref = _with_none(lambda a, w, b, g, r: tanh_gated_linear_reference(a, w, b, g, r, row_mask=row_mask),
                     wide, dy.double())
    same = _with_none(lambda a, w, b, g, r: tanh_gated_linear_reference(a, w, b, g, r, row_mask=row_mask),
                      (a, w, b, g, r), dy)
    return ours, ref, same, dy


def _with_none(fn, tensors, dy):
    idx = [i for i, t in enumerate(tensors) if t is not None]
    leaves = [t.detach().clone().requires_grad_() for t in tensors if t is not None]

    def call(*xs):
        full = [None] * len(tensors)
        for i, x in zip(idx, xs):
            full[i] = x
        return fn(*full)

    out = call(*leaves)
    return out, dict(zip(idx, torch.autograd.grad(out, leaves, dy)))



def gate_floor(a, w, b, g, dy, row_mask, dy_rounded_to=None):
    """A floor for the gate gradient: fp32's unit roundoff times Σ|dy ⊙ z| (z = a Wᵀ + b), the size of one
    rounding of the terms it sums. A scalar gate's gradient is one number whose PyTorch error can be
    near 0 by chance, which would make the 3x rule a coin toss.

    dy_rounded_to: the kernel feeds an fp32 dy to its 16-bit GEMMs rounded to this dtype (PyTorch instead
    rounds z): each term then carries a random relative error up to half an ulp, whose sum is a random
    walk of size u·sqrt(Σ (dy ⊙ z)²), independent of (and not bounded by) PyTorch's own draw."""
    z = torch.nn.functional.linear(a.double(), w.double(), None if b is None else b.double())
    terms = (dy.double() * z).abs()
    if row_mask is not None:
        terms = terms.masked_fill(row_mask.reshape(*terms.shape[:-1], 1), 0)
    s = torch.tanh(g.double())
    per = terms.reshape(-1, terms.shape[-1]).sum(0)
    total = per.sum() if g.numel() == 1 else per.max()
    floor = 4 * torch.finfo(torch.float32).eps * total.item()
    if dy_rounded_to is not None:
        squares = terms.pow(2).reshape(-1, terms.shape[-1]).sum(0)
        walk = (squares.sum() if g.numel() == 1 else squares.max()).sqrt().item()
        unit_roundoff = torch.finfo(dy_rounded_to).eps / 2
        floor += 4 * unit_roundoff / 3**0.5 * walk  # 4 sigma: rounding errors uniform in [-u, u] have sigma u/sqrt(3)
    return (1 - s.pow(2)).max().item() * floor + 1e-12


def check(ours, ref, same, inputs, dy, row_mask=None, what=""):
    assert_close_by_rule(ours[0], ref[0], same[0], what=f"{what} out")
    a, w, b, g, _ = inputs
    rounded = a.dtype if dy.dtype != a.dtype else None  # an fp32 residual stream over 16-bit GEMMs
    for i, grad in ours[1].items():
        floor = gate_floor(a, w, b, g, dy, row_mask, dy_rounded_to=rounded) if i == 3 else None
        assert grad.shape == ref[1][i].shape, f"{what} {NAMES[i]} shape"
        assert_close_by_rule(grad, ref[1][i], same[1][i], factor=3.0, floor=floor, what=f"{what} {NAMES[i]}")
