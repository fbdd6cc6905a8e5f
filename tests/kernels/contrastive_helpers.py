"""Shared cases for the contrastive-loss tests: every variant's inputs, the op call and the reference."""
import math

import torch
from numerics import assert_close_by_rule, dtype_id, generator, max_abs_error, randn

from mmfast.kernels.contrastive import contrastive_loss, siglip_loss
from mmfast.kernels.reference import contrastive_loss_reference, siglip_loss_reference

QUEUE = 37  # extra negatives (MoCo / ALBEF queue), odd on purpose

# name -> (options of the op / reference, how inputs are built)
VARIANTS = {
    "clip": dict(kw=dict(normalize=True), log_t=math.log(1 / 0.07)),
    "clip-unnormalized": dict(kw=dict(log_scale=False), log_t=0.3),
    "clip-clamped-scale": dict(kw=dict(normalize=True), log_t=math.log(150.0)),
    "moco-queue-smoothing": dict(kw=dict(normalize=True, symmetric=False, label_smoothing=0.1, log_scale=False),
                                 log_t=1 / 0.07, b_extra=QUEUE),
    "albef-queues-distill": dict(kw=dict(normalize=True, label_smoothing=0.1, alpha=0.4), log_t=math.log(1 / 0.07),
                                 a_extra=QUEUE, b_extra=QUEUE, teacher=True, pairs=True),
    "albef-i2t-queue-distill": dict(kw=dict(normalize=True, symmetric=False, alpha=0.4), log_t=math.log(1 / 0.07),
                                    b_extra=QUEUE, teacher=True),
    "blip2-q5": dict(kw=dict(normalize=True), log_t=math.log(1 / 0.07), queries=5),
    "siglip": dict(kw=dict(normalize=True), log_t=math.log(10.0), siglip=True),
}


def make_inputs(variant, N, D, dtype, device="cpu"):
    """Leaf tensors (dict) for one call: features in `dtype`, logit_scale / logit_bias fp32."""
    v = VARIANTS[variant]
    a_shape = (N + v.get("a_extra", 0),) + ((v["queries"],) if "queries" in v else ()) + (D,)
    inputs = {"a": randn(*a_shape, dtype=dtype, device=device), "b": randn(N + v.get("b_extra", 0), D, dtype=dtype, device=device),
              "logit_scale": torch.tensor(v["log_t"], device=device)}
    if v.get("siglip"):
        inputs["logit_bias"] = torch.tensor(-3.0, device=device)
    if v.get("teacher"):
        # a momentum model's features: close to the student's
        noise = lambda *shape: 0.3 * randn(*shape, dtype=torch.float64, device=device)  # noqa: E731
        inputs["a_teacher"] = (inputs["a"].double() + noise(*a_shape)).to(dtype)
        inputs["b_teacher"] = (inputs["b"].double() + noise(*inputs["b"].shape)).to(dtype)
    return inputs


def _options(variant, N):
    v = VARIANTS[variant]
    kw = dict(v["kw"])
    if v.get("pairs"):
        kw["num_pairs"] = N
    return kw


GRAD_NAMES = ("a", "b", "logit_scale", "logit_bias")


def run(variant, inputs, N, fn=None, **extra):
    """(loss, {name: grad}) of the op (fn=None) or of a reference function on copies of `inputs`."""
    leaves = {k: v.detach().clone().requires_grad_(k in GRAD_NAMES) for k, v in inputs.items()}
    kw = {**_options(variant, N), **extra}
    if VARIANTS[variant].get("siglip"):
        f = fn or siglip_loss
        loss = f(leaves["a"], leaves["b"], leaves["logit_scale"], leaves["logit_bias"], **kw)
    else:
        f = fn or contrastive_loss
        loss = f(leaves["a"], leaves["b"], leaves["logit_scale"], a_teacher=leaves.get("a_teacher"),
                 b_teacher=leaves.get("b_teacher"), **kw)
    loss.backward()
    return loss.detach(), {k: leaves[k].grad for k in GRAD_NAMES if k in leaves}


def reference_fn(variant):
    return siglip_loss_reference if VARIANTS[variant].get("siglip") else contrastive_loss_reference


def check_against_reference(variant, N, D, dtype, backend, device="cpu"):
    inputs = make_inputs(variant, N, D, dtype, device)
    extra = {}
    if dtype != torch.float32 and VARIANTS[variant]["kw"].get("normalize"):
        # normalize=True rounds the unit vectors to the input dtype, as PyTorch does; that rounding would
        # make the fp64 reference (normalising in fp64) differ in its inputs, so low-precision cases feed
        # the dtype-normalised features to all three computations (fp32 cases test the flag itself)
        for k in ("a", "b", "a_teacher", "b_teacher"):
            if k in inputs:
                inputs[k] = torch.nn.functional.normalize(inputs[k], dim=-1)
        extra["normalize"] = False
    loss, grads = run(variant, inputs, N, backend=backend, **extra)
    ref = reference_fn(variant)
    loss64, grads64 = run(variant, {k: v.double() for k, v in inputs.items()}, N, fn=ref, **extra)
    loss_t, grads_t = run(variant, inputs, N, fn=ref, **extra)  # PyTorch in the features' dtype
    # Scalars (the loss, d logit_scale, d logit_bias) are single sums of N*M terms: one PyTorch run's
    # error is one random draw, sometimes far below its typical size. Their yardstick is the worst of
    # a few equally valid PyTorch runs that permute the feature axis (same math, other summation order).
    scalars = {"loss": [loss_t]} | {k: [grads_t[k]] for k in ("logit_scale", "logit_bias") if k in grads_t}
    for _ in range(3):
        perm = torch.randperm(D, generator=generator())
        permuted = {k: (v[..., perm] if k in ("a", "b", "a_teacher", "b_teacher") else v) for k, v in inputs.items()}
        loss_p, grads_p = run(variant, permuted, N, fn=ref, **extra)
        scalars["loss"].append(loss_p)
        for k in scalars.keys() - {"loss"}:
            scalars[k].append(grads_p[k])
    ref64_of = {"loss": loss64, **grads64}
    worst = {k: max(v, key=lambda x, k=k: max_abs_error(x, ref64_of[k])) for k, v in scalars.items()}
    tag = f"{variant} N={N} D={D} {dtype_id(dtype)} {backend}"
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # a scalar's floor also covers its own rounding to fp32 (one ulp of |reference|: ~8e-6 at 100)
    ulp = lambda x: 1e-6 + torch.finfo(torch.float32).eps * abs(float(x))  # noqa: E731
    assert_close_by_rule(loss, loss64, worst["loss"], floor=ulp(loss64), what=f"{tag} loss")
    for name, g in grads.items():
        assert g is not None and g.shape == inputs[name].shape and g.dtype == inputs[name].dtype, name
        floor = ulp(grads64[name]) if name in worst else None
        assert_close_by_rule(g, grads64[name], worst.get(name, grads_t[name]), factor=3.0, floor=floor,
                             what=f"{tag} d{name}")
    return loss, grads
