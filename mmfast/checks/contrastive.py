"""`python -m mmfast check` cases for the sliced contrastive losses (CLIP, MoCo, ALBEF, BLIP-2, SigLIP)."""
import math

import torch

_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (label, op kwargs, N, extra negatives, Q, D)
_CASES = [
    ("CLIP", dict(normalize=True), 77, 0, 1, 100),
    ("MoCo queue, ε=0.1", dict(normalize=True, symmetric=False, label_smoothing=0.1, log_scale=False), 33, 64, 1, 64),
    ("ALBEF queues + distill", dict(normalize=True, alpha=0.4, num_pairs=33), 33, 32, 1, 64),
    ("BLIP-2 max over 32 queries", dict(normalize=True), 9, 0, 32, 64),
    ("SigLIP", dict(normalize=True), 77, 0, 1, 100),
]


def _make(label, kw, n, extra, q, d, dtype, device, g):
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    rows_a = n + (extra if "num_pairs" in kw else 0)
    x = {"a": rnd(rows_a, q, d) if q > 1 else rnd(rows_a, d), "b": rnd(n + extra, d),
         "t": torch.tensor(1 / 0.07 if not kw.get("log_scale", True) else math.log(1 / 0.07), device=device)}
    if "alpha" in kw:
        x["at"], x["bt"] = rnd(*x["a"].shape), rnd(*x["b"].shape)
    if label == "SigLIP":
        x["bias"] = torch.tensor(-5.0, device=device)
    if dtype != torch.float32:  # normalised in the dtype, so the fp64 reference sees the same features
        for k in ("a", "b", "at", "bt"):
            if k in x:
                x[k] = torch.nn.functional.normalize(x[k], dim=-1)
    return x


def _call(label, kw, x, fn, **extra):
    from mmfast.kernels import siglip_loss
    from mmfast.kernels.reference import contrastive_loss_reference, siglip_loss_reference

    leaves = {k: v.detach().clone().requires_grad_(k in ("a", "b", "t", "bias")) for k, v in x.items()}
    if label == "SigLIP":
        f = siglip_loss if fn is None else siglip_loss_reference
        loss = f(leaves["a"], leaves["b"], leaves["t"], leaves["bias"], **kw, **extra)
    else:
        from mmfast.kernels import contrastive_loss

        f = contrastive_loss if fn is None else contrastive_loss_reference
        loss = f(leaves["a"], leaves["b"], leaves["t"], a_teacher=leaves.get("at"), b_teacher=leaves.get("bt"), **kw, **extra)
    loss.backward()
    return [loss.detach()] + [leaves[k].grad for k in ("a", "b", "t", "bias") if k in leaves]


def cases(device):
    backends = ("triton", "reference")
    for backend in backends:
        for label, kw, n, extra, q, d in _CASES:
            # fp32 too for CLIP through Triton; everything else in bf16 (keeps the check to a few seconds)
            for dtype in ((torch.float32, torch.bfloat16) if backend == "triton" and label == "CLIP" else (torch.bfloat16,)):

                def run(backend=backend, label=label, kw=kw, n=n, extra=extra, q=q, d=d, dtype=dtype):
                    g = torch.Generator().manual_seed(0)
                    x = _make(label, kw, n, extra, q, d, dtype, device, g)
                    kw2 = dict(kw, normalize=kw.get("normalize") and dtype == torch.float32)
                    got = _call(label, kw2, x, None, backend=backend)
                    exact = _call(label, kw2, {k: v.double() for k, v in x.items()}, "reference")
                    same = _call(label, kw2, x, "reference")
                    worst = (0.0, 0.0, True)  # (error, tolerance, ok) of the output closest to failing
                    ok_all = True
                    for i, (o, e, s) in enumerate(zip(got, exact, same)):
                        err = (o.double() - e).abs().max().item()
                        factor = 2.0 if i == 0 else 3.0  # loss 2x, gradients 3x PyTorch's error
                        floor = 1e-6 + 2 * torch.finfo(torch.float32).eps * e.abs().max().item()
                        tol = factor * (s.double() - e).abs().max().item() + floor
                        ok_all &= err <= tol
                        if err / tol >= worst[0] / max(worst[1], 1e-30):
                            worst = (err, tol, err <= tol)
                    return worst[0], worst[1], False, ok_all

                shape = f"{label}: N={n}" + (f"+{extra}" if extra else "") + (f" Q={q}" if q > 1 else "") + f" D={d}"
                yield ("siglip_loss" if label == "SigLIP" else "contrastive_loss", backend, _NAMES[dtype], shape, run)
