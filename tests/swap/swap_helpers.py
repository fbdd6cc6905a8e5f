"""Shared by the swap tests: run a model forward and backward, compare two runs."""
import torch


def run(model, *args, method="__call__", **kwargs):
    """Outputs (a list) and the parameter gradients of Σ output·w for fixed w: the backward touches every output."""
    model.zero_grad(set_to_none=True)
    out = getattr(model, method)(*args, **kwargs)
    outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
    g = torch.Generator().manual_seed(1)
    sum(((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs if o.requires_grad),
        torch.zeros((), dtype=outs[0].dtype)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach().clone() for o in outs], grads


def run_compiled(model, *args, **kwargs):
    """`run` through torch.compile(fullgraph=True): a graph break in a swapped forward is an error here. The
    aot_eager backend traces what inductor would get (custom ops with their fake kernels) without a compiler."""
    outs, grads = run(torch.compile(model, fullgraph=True, backend="aot_eager"), *args, **kwargs)
    return outs, {name.removeprefix("_orig_mod."): g for name, g in grads.items()}


def compile_counting_ops(model, fullgraph=True):
    """(torch.compile(model), Counter): a backend that runs the traced graphs unchanged and counts the mmfast
    custom ops in them (the graphs hold the kernels, not a fallback)."""
    import collections

    ops = collections.Counter()

    def record(graph_module, example_inputs):
        ops.update(str(node.target).split(".")[1] for node in graph_module.graph.nodes
                   if str(node.target).startswith("mmfast."))
        return graph_module.forward
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=fullgraph, backend=record), ops


def assert_same(a, b, what, tol=1e-12):
    """Two float64 runs of the same math: equal up to float64 rounding."""
    outs_a, grads_a = a
    outs_b, grads_b = b
    assert len(outs_a) == len(outs_b), what
    for i, (x, y) in enumerate(zip(outs_a, outs_b)):
        assert x.shape == y.shape and (x - y).abs().max().item() <= tol, f"{what}: output {i}"
    assert grads_a.keys() == grads_b.keys(), f"{what}: gradients of {sorted(grads_a.keys() ^ grads_b.keys())}"
    for name in grads_a:
        err = (grads_a[name] - grads_b[name]).abs().max().item()
        assert err <= tol, f"{what}: gradient of {name} differs by {err:.2e}"


def assert_bitwise(a, b, what):
    outs_a, grads_a = a
    outs_b, grads_b = b
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b)), f"{what}: outputs"
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a), \
        f"{what}: gradients"


def forward_is_swapped(module):
    return "forward" in module.__dict__
