"""Helpers for the tests of the transformers modules mmfast patches per instance (BLIP, Mllama, Idefics)."""
import contextlib
import collections

import mmfast.swap as swap
from mmfast.swap._core import SwapOptions, SwapReport, begin, model_name

FP64_TOL = 1e-9  # patched vs eager, both in float64 on backend="reference": the same math, rounding apart


def patch_with(patch_fn, model, backend="reference", **flags):
    """Run one integration's patch function on `model` the way ``mmfast.patch`` does (state, report, undo)."""
    report = SwapReport(model_name(model), integration="transformers")
    state = begin(model, report, SwapOptions(backend=backend, **flags))
    patch_fn(model, state.options, state)
    return report


def unpatch(model):
    return swap.unpatch(model)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = (actual.detach().double() - expected.detach().double()).abs().max().item() if actual.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.0e}"


def assert_grads_close(got, expected, tol, what=""):
    assert got.keys() == expected.keys(), f"{what}: gradient sets differ: {sorted(got.keys() ^ expected.keys())}"
    for name in expected:
        scale = max(1.0, expected[name].abs().max().item())
        assert_close(got[name], expected[name], tol * scale, f"{what} grad {name}")


@contextlib.contextmanager
def spy_kernels():
    """Counts the calls the swapped forwards make to flash_attention / tanh_gated_linear (any backend):
    proof, on backend="reference" where no custom op runs, that the parity compared mmfast's path."""
    from mmfast.nn import gated_cross_attention, split_attention
    from mmfast.swap.transformers import _bypass

    counts = collections.Counter()
    # the swaps call the kernels through _bypass, split_attention (Mllama's two-call attentions) or
    # gated_cross_attention.gated_linear_residual (the gated residuals)
    saved = {(module, name): getattr(module, name) for module, names in
             ((_bypass, ("flash_attention",)), (split_attention, ("flash_attention",)),
              (gated_cross_attention, ("tanh_gated_linear",)))
             for name in names}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    for (module, name), fn in saved.items():
        setattr(module, name, spy(name, fn))
    try:
        yield counts
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


def check_patch_generate_unpatch(make_model, batch, owned, max_new_tokens=4):
    """Through `mmfast.patch` on a float64 model (backend "reference"): same logits, same greedy
    generation, patching twice returns the same report, a model built afterwards is untouched, unpatch
    restores the logits bit for bit, and none of `owned`'s modules fell back. Returns the report."""
    import copy

    import torch

    import mmfast

    model = make_model().double()
    with torch.no_grad():
        before = model(**batch).logits
    want = model.generate(**copy.deepcopy(batch), max_new_tokens=max_new_tokens, do_sample=False)
    report = mmfast.patch(model, backend="reference")
    assert mmfast.patch(model, backend="reference") is report
    with torch.no_grad():
        assert_close(model(**batch).logits, before, FP64_TOL, "logits through mmfast.patch")
    got = model.generate(**copy.deepcopy(batch), max_new_tokens=max_new_tokens, do_sample=False)
    assert torch.equal(got, want)
    assert not any(owned in reason for reason in report.fallbacks), report.fallbacks
    assert all("forward" not in m.__dict__ for m in make_model().modules())
    assert mmfast.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    return report
