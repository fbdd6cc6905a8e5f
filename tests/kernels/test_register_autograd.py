"""kernels/_common.register_autograd: in eager mode with gradients, a custom op runs through a
torch.autograd.Function built from its own setup_context / backward (the custom op's autograd wrapper costs
~200 µs of host time per call); the registered autograd still serves direct calls and torch.compile. Both
give the same values and gradients; a list argument (index tensors) gets no gradient."""
from typing import List

import torch

from mmfast.kernels._common import register_autograd


@torch.library.custom_op("mmfast_test::scaled_gather", mutates_args=())
def _scaled_gather(x: torch.Tensor, w: torch.Tensor, index: List[torch.Tensor], scale: float) -> torch.Tensor:
    return x[index[0]] * w * scale


@_scaled_gather.register_fake
def _(x, w, index, scale):
    return x.new_empty((index[0].shape[0], *x.shape[1:]))


CALLS = {"setup": 0, "backward": 0}


def _setup_context(ctx, inputs, output):
    x, w, index, scale = inputs
    CALLS["setup"] += 1
    ctx.save_for_backward(x, w, *index)
    ctx.scale = scale


def _backward(ctx, grad):
    x, w, index = ctx.saved_tensors
    CALLS["backward"] += 1
    dx = torch.zeros_like(x).index_add_(0, index, grad * w * ctx.scale)
    dw = (grad * x[index] * ctx.scale).sum(0)
    return dx, dw, [None], None


scaled_gather = register_autograd(_scaled_gather, _backward, _setup_context)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    return x, w, [torch.tensor([4, 0, 4, 2])]


def test_eager_function_equals_the_registered_autograd():
    x, w, index = _inputs()
    grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = scaled_gather(x, w, index, 0.5)
    assert out.grad_fn is not None and "_Eager" in type(out.grad_fn).__name__  # our Function, not the op's
    eager = (out, *torch.autograd.grad(out, (x, w), grad))
    out = _scaled_gather(x, w, index, 0.5)  # the op itself: its registered autograd
    registered = (out, *torch.autograd.grad(out, (x, w), grad))
    for a, b in zip(eager, registered):
        assert torch.equal(a, b)
    assert torch.autograd.gradcheck(lambda x, w: scaled_gather(x, w, index, 0.5), (x, w))


def test_without_gradients_the_op_runs_directly():
    x, w, index = _inputs()
    before = dict(CALLS)
    with torch.no_grad():
        out = scaled_gather(x, w, index, 2.0)
    assert out.grad_fn is None and CALLS == before  # no context saved
    torch.testing.assert_close(out, x.detach()[index[0]] * w.detach() * 2.0)


def test_compiled_call_takes_the_registered_autograd():
    x, w, index = _inputs()
    fn = torch.compile(lambda x, w: scaled_gather(x, w, index, 0.5), backend="aot_eager", fullgraph=True)
    out = fn(x, w)
    grads = torch.autograd.grad(out.sum(), (x, w))
    want = torch.autograd.grad(_scaled_gather(x, w, index, 0.5).sum(), (x, w))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)
