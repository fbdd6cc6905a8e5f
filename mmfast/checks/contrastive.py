"""`python -m mmfast check` cases for the sliced contrastive losses (CLIP, MoCo, ALBEF, BLIP-2, SigLIP).

``cases(device)``: the Triton kernels and the chunked path against the fp64 reference by the numerics rule
(loss 2x, gradients 3x PyTorch's error in the same dtype). ``cases(device, torch.float64)``: the reference
in float64 against an independent float64 formulation (``F.cross_entropy`` with label smoothing or with
probability targets, ``F.logsigmoid``), loss and gradients to 1e-10 relative.
"""
import math

import torch

_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
FLOAT64_RTOL = 1e-10

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
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    rows_a = n + (extra if "num_pairs" in kw else 0)
    def scalar(v):
        return torch.tensor(v, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    x = {"a": rnd(rows_a, q, d) if q > 1 else rnd(rows_a, d), "b": rnd(n + extra, d),
         "t": scalar(1 / 0.07 if not kw.get("log_scale", True) else math.log(1 / 0.07))}
    if "alpha" in kw:
        x["at"], x["bt"] = rnd(*x["a"].shape), rnd(*x["b"].shape)
    if label == "SigLIP":
        x["bias"] = scalar(-5.0)
    if dtype in (torch.bfloat16, torch.float16):  # normalised in the dtype: the fp64 reference sees the same features
        for k in ("a", "b", "at", "bt"):
            if k in x:
                x[k] = torch.nn.functional.normalize(x[k], dim=-1)
    return x


def _call(label, kw, x, fn, **extra):
    """[loss, grads of a, b, t (, bias)] of `fn` (None: the op; "reference": its reference) on fresh leaves."""
    from mmfast.kernels import contrastive_loss, siglip_loss
    from mmfast.kernels.reference import contrastive_loss_reference, siglip_loss_reference

    leaves = {k: v.detach().clone().requires_grad_(k in ("a", "b", "t", "bias")) for k, v in x.items()}
    op, reference = (siglip_loss, siglip_loss_reference) if label == "SigLIP" else (contrastive_loss,
                                                                                    contrastive_loss_reference)
    f = op if fn is None else reference if fn == "reference" else fn
    if label == "SigLIP":
        loss = f(leaves["a"], leaves["b"], leaves["t"], leaves["bias"], **kw, **extra)
    else:
        loss = f(leaves["a"], leaves["b"], leaves["t"], a_teacher=leaves.get("at"), b_teacher=leaves.get("bt"), **kw,
                 **extra)
    loss.backward()
    return [loss.detach()] + [leaves[k].grad for k in ("a", "b", "t", "bias") if k in leaves]


def independent_loss(label, a, b, t, *, at=None, bt=None, bias=None, normalize=False, label_smoothing=0.0,
                     symmetric=True, num_pairs=None, alpha=0.0, log_scale=True, max_scale=100.0):
    """The losses written with torch's own loss functions (not the reference's log_softmax and targets)."""
    F = torch.nn.functional
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        if at is not None:
            at, bt = F.normalize(at, dim=-1), F.normalize(bt, dim=-1)
    s = (t.exp() if log_scale else t).clamp(max=max_scale)

    def logits_of(x, y):
        return s * (torch.einsum("nqd,md->nqm", x, y).amax(dim=1) if x.dim() == 3 else x @ y.T)

    logits = logits_of(a, b)
    if label == "SigLIP":
        z = 2 * torch.eye(*logits.shape, dtype=logits.dtype, device=logits.device) - 1
        return -F.logsigmoid(z * (logits + bias)).sum() / a.shape[0]
    P = a.shape[0] if num_pairs is None else num_pairs
    labels = torch.arange(P, device=a.device)
    teacher = logits_of(at, bt).detach() if alpha > 0 else None

    def cross_entropy(lg, tg):
        if tg is None:
            return F.cross_entropy(lg, labels, label_smoothing=label_smoothing)
        hard = F.one_hot(labels, lg.shape[1]).to(lg.dtype) * (1 - label_smoothing) + label_smoothing / lg.shape[1]
        return F.cross_entropy(lg, (1 - alpha) * hard + alpha * tg.softmax(dim=1))  # probability targets

    rows = cross_entropy(logits[:P], None if teacher is None else teacher[:P])
    if not symmetric:
        return rows
    return (rows + cross_entropy(logits[:, :P].T, None if teacher is None else teacher[:, :P].T)) / 2


def _independent(label, kw, x):
    return _call(label, {}, x, lambda a, b, t, *args, a_teacher=None, b_teacher=None: independent_loss(
        label, a, b, t, at=a_teacher, bt=b_teacher, bias=args[0] if args else None, **kw))


def _shape(label, n, extra, q, d):
    return f"{label}: N={n}" + (f"+{extra}" if extra else "") + (f" Q={q}" if q > 1 else "") + f" D={d}"


def _float64_cases(device, backends=("reference",)):
    for backend in backends:
        for label, kw, n, extra, q, d in _CASES:

            def run(backend=backend, label=label, kw=kw, n=n, extra=extra, q=q, d=d):
                x = _make(label, kw, n, extra, q, d, torch.float64, device, torch.Generator().manual_seed(0))
                got = _call(label, kw, x, None, backend=backend)
                want = _independent(label, kw, x)
                err = max((o - e).abs().max().item() for o, e in zip(got, want))
                tol = FLOAT64_RTOL * max(e.abs().max().item() for e in want)
                return err, tol, False, err <= tol and all(o.dtype == torch.float64 for o in got)

            yield ("siglip_loss" if label == "SigLIP" else "contrastive_loss", backend, "fp64",
                   _shape(label, n, extra, q, d), run)


def cases(device, dtype=None):
    if dtype == torch.float64:
        yield from _float64_cases(device)
        return
    for backend in ("gemm", "triton", "chunked"):
        for label, kw, n, extra, q, d in _CASES:
            if backend == "gemm" and q > 1:
                continue  # 2-D features only: BLIP-2's max over queries runs on "triton"
            # fp32 too for CLIP through Triton; everything else in bf16 (keeps the check to a few seconds)
            dtypes = (torch.float32, torch.bfloat16) if backend == "triton" and label == "CLIP" else (torch.bfloat16,)
            for dt in dtypes:

                def run(backend=backend, label=label, kw=kw, n=n, extra=extra, q=q, d=d, dt=dt):
                    x = _make(label, kw, n, extra, q, d, dt, device, torch.Generator().manual_seed(0))
                    kw2 = dict(kw, normalize=kw.get("normalize") and dt == torch.float32)
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

                yield ("siglip_loss" if label == "SigLIP" else "contrastive_loss", backend, _NAMES[dt],
                       _shape(label, n, extra, q, d), run)
