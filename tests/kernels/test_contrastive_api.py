"""contrastive_loss / siglip_loss as users call them: under torch.autocast, and double backward."""
import pytest
import torch
from numerics import randn

from mmfast.kernels import interpreting
from mmfast.kernels.contrastive import contrastive_loss, siglip_loss

BACKENDS = ["reference"] + (["triton"] if torch.cuda.is_available() or interpreting() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _loss(op, a, b, backend):
    if op == "siglip":
        return siglip_loss(a, b, 2.3, -10.0, backend=backend)
    return contrastive_loss(a, b, 2.3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["clip", "siglip"])
def test_autocast_keeps_fp32_math(op, backend):
    """An enclosing bf16 autocast must not lower the fp32 logits (the chunked path's matmuls): loss and
    gradients equal the ones computed without autocast, bit for bit."""
    a, b = randn(37, 48, device=DEVICE), randn(41, 48, device=DEVICE)
    results = []
    for enabled in (True, False):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=enabled):
            loss = _loss(op, x, y, backend)
            loss.backward()
        results.append((loss, x.grad, y.grad))
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend):
    """create_graph=True raises: the hand-written backward's gradients carry no graph, so a gradient
    penalty on them would otherwise silently contribute nothing."""
    a = randn(5, 16, device=DEVICE).requires_grad_()
    b = randn(5, 16, device=DEVICE)
    loss = contrastive_loss(a, b, 1.0, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, a, create_graph=True)
    torch.autograd.grad(contrastive_loss(a, b, 1.0, backend=backend), a)  # a plain backward still works
