"""contrastive_loss gradients at large logits (unnormalised features, scale 100, as MoCo-style callers do).

The audit (issue 12, item 7) found the gradients of a and b losing accuracy as |logits| grew — 4.6x
PyTorch's fp32 error at max |logit| ≈ 180, 17x at ≈ 2,000, 25x at ≈ 18,000 — because the backward
formed exp(L − lse) from an fp32 log-sum-exp: lse ≈ max |L| carries an absolute rounding error of
ulp(|L|), which shifts a whole softmax row by that much, where PyTorch's softmax works from L − max
(exact when it matters) and a sum near 1. The kernels and the chunked path now keep the max and the log
of the sum apart (rows, columns and the teacher's), so the error stays within the suite's rule at any
magnitude.

The yardstick: one fp32 PyTorch run is one random draw, dominated by the closest tie of two logits in
a row (its error is ulp(|L|) times the tie's sensitivity), so it can be far below what fp32 allows.
PyTorch computes s·a·bᵀ equally validly as (s·a)·bᵀ, s·(a·bᵀ), a·(s·b)ᵀ or (√s·a)·(√s·b)ᵀ, and with the
D-sum in any order; each rounds the tie differently. The yardstick is the worst of the four placements of
s, each in four orders of the feature axis. Measured with the naive formulas over 9,000 draws (the logits
summed in blocks of 16, as the kernels do): the split statistics stay at ≤ 2.3x that yardstick at every
magnitude (≤ 64x with the four placements alone, which share one order); the fp32 lse reaches 600x,
failing about one draw in three from |L| ≈ 2,000 up (the four draws per case below catch it).
"""
import math

import pytest
import torch
from numerics import assert_close_by_rule, generator, max_abs_error, randn

from mmfast.kernels import interpreting
from mmfast.kernels.contrastive import contrastive_loss
from mmfast.kernels.reference import contrastive_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["chunked"] + (["triton"] if torch.cuda.is_available() or interpreting() else [])
N, D, SCALE, DRAWS = 61, 32, 100.0, 4
# feature std -> max |logit| at N = 61, D = 32, scale 100: about 200, 2,000, 20,000, 200,000
FEATURE_SCALES = {"max-logit-2e2": 0.3, "max-logit-2e3": 1.0, "max-logit-2e4": 3.0, "max-logit-2e5": 10.0}
VARIANTS = {
    "clip": dict(),
    "smoothing-distill": dict(label_smoothing=0.1, alpha=0.4),  # the teacher's softmax at large logits too
}


def _placements(s):
    """(a multiplier, b multiplier, logit multiplier) of the four ways to compute s·a·bᵀ."""
    r = math.sqrt(s)
    return [(s, 1.0, 1.0), (1.0, 1.0, s), (1.0, s, 1.0), (r, r, 1.0)]


ORDERS = 4  # orders of the feature axis (the identity, then random permutations)


def _grads(fn, x, kw, **extra):
    a, b = (x[k].detach().clone().requires_grad_() for k in ("a", "b"))
    fn(a, b, a_teacher=x.get("at"), b_teacher=x.get("bt"), **kw, **extra).backward()
    return {"a": a.grad, "b": b.grad}


def _reference(x, kw, placement, dtype, order=None):
    ma, mb, s = placement
    x = {k: (v if order is None else v[:, order]).to(dtype) for k, v in x.items()}

    def fn(a, b, a_teacher=None, b_teacher=None, **kw):
        if a_teacher is not None:
            a_teacher, b_teacher = a_teacher * ma, b_teacher * mb
        return contrastive_loss_reference(a * ma, b * mb, torch.tensor(s, dtype=dtype), a_teacher=a_teacher,
                                          b_teacher=b_teacher, log_scale=False, max_scale=None, **kw)

    grads = _grads(fn, x, kw)
    if order is not None:  # back to the original feature order
        grads = {k: g[:, torch.argsort(order)] for k, g in grads.items()}
    return grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", list(FEATURE_SCALES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_at_large_logits(variant, magnitude, backend):
    kw = VARIANTS[variant]
    std = FEATURE_SCALES[magnitude]
    for draw in range(DRAWS):
        x = {"a": randn(N, D, scale=std, dtype=torch.float64), "b": randn(N, D, scale=std, dtype=torch.float64)}
        if "alpha" in kw:
            x["at"] = x["a"] + randn(N, D, scale=0.3 * std, dtype=torch.float64)
            x["bt"] = x["b"] + randn(N, D, scale=0.3 * std, dtype=torch.float64)
        x = {k: v.float() for k, v in x.items()}  # the fp32 inputs every computation sees
        got = _grads(contrastive_loss, {k: v.to(DEVICE) for k, v in x.items()}, kw,
                     logit_scale=SCALE, log_scale=False, normalize=False, backend=backend)
        want = _reference(x, kw, (1.0, 1.0, SCALE), torch.float64)
        orders = [None] + [torch.randperm(D, generator=generator()) for _ in range(ORDERS - 1)]
        torch_runs = [_reference(x, kw, p, torch.float32, order) for p in _placements(SCALE) for order in orders]
        max_logit = (SCALE * x["a"] @ x["b"].T).abs().max().item()
        for name in ("a", "b"):
            worst = max((r[name] for r in torch_runs), key=lambda g: max_abs_error(g, want[name]))
            assert_close_by_rule(got[name], want[name], worst, factor=3.0,
                                 what=f"{variant} {backend} d{name}, max |logit| {max_logit:.0f}, draw {draw}")
