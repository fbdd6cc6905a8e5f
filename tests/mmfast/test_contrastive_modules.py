"""ContrastiveLoss and MoCoQueue modules."""
import math

import pytest
import torch
from numerics import randn

from mmfast.kernels import contrastive_loss, siglip_loss
from mmfast.kernels.reference import contrastive_loss_reference
from mmfast.nn import ContrastiveLoss, MoCoQueue


def test_clip_defaults_and_gradient_to_temperature():
    loss_fn = ContrastiveLoss()
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / 0.07)) and loss_fn.logit_bias is None
    a, b = randn(13, 32).requires_grad_(), randn(13, 32).requires_grad_()
    loss = loss_fn(a, b)
    loss.backward()
    t = loss_fn.logit_scale.detach().clone().requires_grad_()
    want = contrastive_loss_reference(a.detach(), b.detach(), t, normalize=True)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_fn.logit_scale.grad, t.grad, rtol=1e-4, atol=1e-6)


def test_options_forwarded():
    loss_fn = ContrastiveLoss(label_smoothing=0.1, alpha=0.4, normalize=False)
    a, b, at, bt = randn(9, 16), randn(9, 16), randn(9, 16), randn(9, 16)
    got = loss_fn(a, b, at, bt)
    want = contrastive_loss(a, b, loss_fn.logit_scale.detach(), label_smoothing=0.1, alpha=0.4, a_teacher=at, b_teacher=bt)
    torch.testing.assert_close(got.detach(), want)
    # without teachers the distillation weight is not applied
    torch.testing.assert_close(loss_fn(a, b).detach(), contrastive_loss(a, b, loss_fn.logit_scale.detach(), label_smoothing=0.1))


def test_siglip_kind():
    loss_fn = ContrastiveLoss("siglip")
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(10)) and loss_fn.logit_bias.item() == -10
    a, b = randn(7, 16), randn(7, 16)
    loss = loss_fn(a, b)
    loss.backward()
    assert loss_fn.logit_bias.grad is not None
    torch.testing.assert_close(loss.detach(), siglip_loss(a, b, math.log(10), -10.0, normalize=True))


def test_frozen_temperature():
    loss_fn = ContrastiveLoss(learnable=False)
    assert not loss_fn.logit_scale.requires_grad
    assert loss_fn(randn(5, 8), randn(5, 8)).requires_grad is False


def _fifo(queue, keys_list):
    """Plain-Python FIFO: the expected queue after enqueueing each batch in turn."""
    rows, ptr = [r.clone() for r in queue], 0
    for keys in keys_list:
        for k in keys[-len(rows):]:
            rows[ptr] = k.clone()
            ptr = (ptr + 1) % len(rows)
    return torch.stack(rows), ptr


def test_queue_wraps_around_like_a_fifo():
    q = MoCoQueue(6, 10)
    assert torch.allclose(q.queue.norm(dim=1), torch.ones(10))
    start = q.queue.clone()
    batches = [randn(4, 6), randn(4, 6), randn(3, 6), randn(13, 6)]  # wraps, then a batch > size
    for keys in batches:
        q.enqueue(keys)
    want, ptr = _fifo(start, batches)
    torch.testing.assert_close(q.queue, want, rtol=0, atol=0)
    assert q.ptr.item() == ptr


def test_moco_step_with_queue():
    """MoCo: loss of q against cat(k, queue) with rows-only CE, then enqueue k; the queue gets no grad."""
    q = MoCoQueue(16, 21)
    query, keys = randn(5, 16).requires_grad_(), randn(5, 16)
    b = q.with_keys(keys)
    assert b.shape == (26, 16)
    loss = contrastive_loss(query, b, 1 / 0.07, symmetric=False, log_scale=False, normalize=True)
    loss.backward()
    assert query.grad is not None and not q.queue.requires_grad
    want = contrastive_loss_reference(query.detach(), b, torch.tensor(1 / 0.07), symmetric=False, log_scale=False, normalize=True)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    q.enqueue(keys)
    torch.testing.assert_close(q.queue[:5], keys)


def test_queue_state_dict_round_trip():
    q = MoCoQueue(4, 7, dtype=torch.bfloat16)
    q.enqueue(randn(3, 4))
    r = MoCoQueue(4, 7, dtype=torch.bfloat16)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.queue, q.queue) and r.ptr.item() == 3


def test_queue_validation():
    q = MoCoQueue(4, 7)
    with pytest.raises(ValueError, match=r"keys must have shape \(B, 4\)"):
        q.enqueue(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="keys must be a floating tensor"):
        q.enqueue(torch.ones(2, 4, dtype=torch.long))  # would be copied into the queue as feature values
    with pytest.raises(ValueError, match=r"MoCoQueue: dim must be in \[1, inf\], got 0"):
        MoCoQueue(0, 7)
    with pytest.raises(ValueError, match="MoCoQueue: size must be an int"):
        MoCoQueue(4, 7.0)
    with pytest.raises(ValueError, match="MoCoQueue: dtype must be a floating torch dtype"):
        MoCoQueue(4, 7, dtype=torch.int64)


@pytest.mark.parametrize("kw,match", [
    (dict(kind="infonce"), r"kind must be one of \('clip', 'siglip'\)"),
    (dict(init_logit_scale=math.nan), "init_logit_scale must be finite"),
    (dict(kind="siglip", init_logit_bias=math.inf), "init_logit_bias must be finite"),
    (dict(learnable="yes"), "learnable must be True or False"),
    (dict(normalize=1), "normalize must be True or False"),
    (dict(symmetric=None), "symmetric must be True or False"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0.0, 1.0\)"),
    (dict(alpha=-0.1), r"alpha must be in \[0.0, 1.0\]"),
    (dict(max_scale=0), r"max_scale must be in \(0.0, inf\]"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(kind="siglip", alpha=0.4), "kind='siglip' takes no label_smoothing or alpha"),
], ids=["kind", "scale-nan", "bias-inf", "learnable", "normalize", "symmetric", "smoothing", "alpha", "max-scale",
        "backend", "siglip-alpha"])
def test_contrastive_loss_validation(kw, match):
    """The constructor validates every argument, naming it (before, a bad value surfaced at the first call)."""
    with pytest.raises(ValueError, match="ContrastiveLoss: " + match):
        ContrastiveLoss(**kw)
