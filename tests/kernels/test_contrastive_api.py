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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["clip", "siglip"])
def test_torch_compile_fullgraph(op, backend):
    """torch.compile(fullgraph=True) traces the loss (the Triton launchers are custom ops with fake
    shapes; the interpreter crashed Dynamo before): loss and gradients equal eager bit for bit."""
    a, b = randn(6, 40, device=DEVICE), randn(9, 40, device=DEVICE)
    scale = torch.tensor(2.3, device=DEVICE)

    def fn(x, y, s):
        if op == "siglip":
            return siglip_loss(x, y, s, -10.0, normalize=True, backend=backend)
        return contrastive_loss(x, y, s, normalize=True, label_smoothing=0.1, backend=backend)

    results = []
    for f in (torch.compile(fn, fullgraph=True, backend="aot_eager"), fn):
        leaves = [t.clone().requires_grad_() for t in (a, b, scale)]
        loss = f(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the ops run the Triton kernels: CUDA or TRITON_INTERPRET=1")
def test_custom_ops_opcheck():
    """Schema, fake shapes / strides equal to the real outputs (what torch.compile plans with)."""
    import mmfast.kernels.contrastive._triton as impl

    a, b = randn(5, 3, 24, device=DEVICE), randn(7, 24, device=DEVICE)  # BLIP-2 queries, extra negatives
    params = torch.tensor([2.0, 0.0, 0.4, 0.01, 0.01, 0.9, 1.0], device=DEVICE)
    rows, cols = impl._contrastive_fwd_op(a, b, a, b, params, impl.MODE_SOFTMAX, True, True, 0)
    torch.library.opcheck(impl._contrastive_fwd_op, (a, b, a, b, params, impl.MODE_SOFTMAX, True, True, 0))
    rvec = torch.stack([rows[0], rows[3], torch.full_like(rows[0], 0.1)])
    cvec = torch.stack([cols[0], cols[2], torch.full_like(cols[0], 0.1)])
    for need_da, need_db in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(impl._contrastive_bwd_op,
                              (a, b, a, b, params, rvec, cvec, impl.MODE_SOFTMAX, True, need_da, need_db, 0))
