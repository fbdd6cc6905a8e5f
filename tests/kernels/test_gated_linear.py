"""tanh_gated_linear: forward and every gradient against the fp64 reference (the 2x / 3x rule).

On the CPU the Triton kernels run through the interpreter (16-bit dots widened to fp32 by
kernels._common.dot); every output buffer the launchers allocate is poisoned with NaN first.
The contract (autocast, fp32 precision, float64, scalars, argument checks) is in test_gated_linear_contract.py.
"""
import pytest
import torch
from gated_linear_helpers import NAMES, check, make_inputs, poison_outputs, run_all
from numerics import FLOAT_DTYPES, SEED, assert_bitwise_equal, dtype_id, randn

from mmfast.kernels import tanh_gated_linear
from mmfast.kernels.reference import tanh_gated_linear_reference

# (M, K, N): every size of M ∈ {1, 77, 333} and K, N ∈ {64, 80, 1000} appears, not the full product
SHAPES = [(1, 1000, 80), (77, 80, 64), (77, 64, 1000), (333, 1000, 80), (333, 80, 64)]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_outputs(monkeypatch)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in SHAPES])
def test_forward_backward(device, dtype, gate, M, K, N):
    inputs = make_inputs(M, K, N, dtype, device, gate)
    ours, ref, same, dy = run_all(*inputs)
    check(ours, ref, same, inputs, dy, what=f"{dtype_id(dtype)} {gate} M{M} K{K} N{N}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_row_mask_and_no_bias(device, dtype):
    """(B, L) row mask with a whole masked tile (text before the first image) and scattered rows."""
    B, L, K, N = 2, 77, 80, 64
    inputs = make_inputs(B * L, K, N, dtype, device, "vector", bias=False, lead=(B, L))
    row_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    row_mask[0, :40] = True
    row_mask[1, 5::7] = True
    ours, ref, same, dy = run_all(*inputs, row_mask=row_mask)
    check(ours, ref, same, inputs, dy, row_mask=row_mask, what=f"{dtype_id(dtype)} row mask")
    assert_bitwise_equal(ours[0][row_mask], inputs[4][row_mask].to(ours[0].dtype), what="masked rows are the residual")
    assert (ours[1][0][row_mask] == 0).all(), "masked rows get no d_a"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gate_shape", [(), (1,), (64,), (1, 1, 64)], ids=["0dim", "shape1", "vector", "idefics-1x1xN"])
def test_gate_zero_is_identity_with_correct_gradient(device, dtype, gate_shape):
    M, K, N = 77, 80, 64
    a, w, b, _, r = make_inputs(M, K, N, dtype, device, "scalar")
    g = torch.zeros(gate_shape, device=device)
    ours, ref, same, dy = run_all(a, w, b, g, r)
    # a gate with dimensions promotes: fp32 output over 16-bit inputs, as in eager PyTorch
    assert_bitwise_equal(ours[0], r.to(same[0].dtype), what="gate 0: output is the residual")
    assert ours[1][3].shape == g.shape
    check(ours, ref, same, (a, w, b, g, r), dy, what=f"{dtype_id(dtype)} gate 0 {gate_shape}")
    assert ours[1][3].abs().max() > 0, "the gate gradient at 0 is not 0 for random inputs"
    for i in (0, 1, 2):  # tanh(0) = 0 scales d_a, d_W, d_bias to 0
        assert (ours[1][i] == 0).all(), NAMES[i]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_fp32_residual_stream(device, dtype, gate):
    """16-bit GEMM inputs over an fp32 residual (autocast training): output and d_residual in fp32."""
    a, w, b, g, r = make_inputs(77, 80, 1000, dtype, device, gate)
    r = r.float()
    row_mask = torch.zeros(77, dtype=torch.bool, device=device)
    row_mask[3::5] = True
    ours, ref, same, dy = run_all(a, w, b, g, r, row_mask=row_mask)
    assert ours[0].dtype == torch.float32 and ours[1][4].dtype == torch.float32
    check(ours, ref, same, (a, w, b, g, r), dy, row_mask=row_mask, what=f"{dtype_id(dtype)} over fp32 residual")


def test_strided_inputs(device):
    """Rows of a with a stride larger than K, a transposed weight, a non-contiguous residual, 3-D input."""
    dtype = torch.float32
    B, L, K, N = 3, 29, 80, 64
    a = randn(B, L, 2 * K, dtype=dtype, device=device)[..., ::2]
    w = randn(K, N, dtype=dtype, device=device, scale=K**-0.5).t()
    b = randn(N, dtype=dtype, device=device)
    g = randn(N, device=device)
    r = randn(N, B, L, dtype=dtype, device=device).permute(1, 2, 0)
    assert not a.is_contiguous() and not w.is_contiguous() and not r.is_contiguous()
    ours, ref, same, dy = run_all(a, w, b, g, r)
    check(ours, ref, same, (a, w, b, g, r), dy, what="strided")
    assert ours[0].shape == (B, L, N)


def test_expanded_upstream_gradient(device):
    """out.sum() hands backward a zero-stride dy; the kernels read it through its strides."""
    a, w, b, g, r = make_inputs(33, 64, 80, torch.float32, device, "scalar")
    leaves = [t.clone().requires_grad_() for t in (a, w, b, g, r)]
    tanh_gated_linear(*leaves, backend="triton").sum().backward()
    wide = [t.double().requires_grad_() for t in (a, w, b, g, r)]
    tanh_gated_linear_reference(*wide).sum().backward()
    for name, x, y in zip(NAMES, leaves, wide):
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-4, msg=f"{name}; seed {SEED}")


def test_reference_backend_matches(device):
    a, w, b, g, r = make_inputs(17, 64, 80, torch.float32, device, "vector")
    out = tanh_gated_linear(a, w, b, g, r, backend="reference")
    torch.testing.assert_close(out, tanh_gated_linear_reference(a, w, b, g, r))


@pytest.mark.parametrize("M,K,N", [(0, 64, 80), (5, 0, 80), (7, 64, 1)], ids=["no-rows", "K0", "N1"])
def test_degenerate_sizes(device, M, K, N):
    """No rows; K = 0 (the update is the bias: d_bias and the gate's gradient still flow); one channel."""
    inputs = make_inputs(M, K, N, torch.float32, device, "scalar")
    ours, ref, same, dy = run_all(*inputs)
    check(ours, ref, same, inputs, dy, what=f"M{M} K{K} N{N}")


@pytest.mark.parametrize("backend", ["triton", "gemm"])
def test_torch_compile_fullgraph(device, backend):
    """torch.compile(fullgraph=True) traces the op (custom ops with fake shapes), forward and backward."""
    a, w, b, g, r = make_inputs(33, 64, 80, torch.float32, device, "vector")
    row_mask = torch.arange(33, device=device) < 7

    def fn(a, w, b, g, r):
        return tanh_gated_linear(a, w, b, g, r, row_mask=row_mask, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (a, w, b, g, r)]
    eager = [t.clone().requires_grad_() for t in (a, w, b, g, r)]
    out = compiled(*leaves)
    ref = fn(*eager)
    dy = randn(*out.shape, device=device)
    out.backward(dy)
    ref.backward(dy)
    assert_bitwise_equal(out, ref, what="compiled forward")
    for name, x, y in zip(NAMES, leaves, eager):
        assert_bitwise_equal(x.grad, y.grad, what=f"compiled {name}")


@pytest.mark.parametrize("trainable", ["a", "gate", "residual", "a+weight"], ids=str)
def test_gradient_subsets(device, trainable):
    """Only some inputs require grad (frozen weights and gates, a trainable gate alone): the backward op
    returns several unneeded gradients, which must not alias one another (a custom op may not)."""
    a, w, b, g, r = make_inputs(9, 64, 80, torch.float32, device, "scalar")
    wanted = trainable.replace("gate", "g").replace("weight", "w").replace("residual", "r").split("+")
    ours = {n: t.clone().requires_grad_(n in wanted) for n, t in zip("awbgr", (a, w, b, g, r))}
    wide = {n: t.double().requires_grad_(n in wanted) for n, t in zip("awbgr", (a, w, b, g, r))}
    dy = randn(9, 80, device=device)
    tanh_gated_linear(*ours.values(), backend="triton").backward(dy)
    tanh_gated_linear_reference(*wide.values()).backward(dy.double())
    for n in "awbgr":
        if n in wanted:
            torch.testing.assert_close(ours[n].grad.double(), wide[n].grad, rtol=1e-4, atol=1e-4, msg=f"{n}; seed {SEED}")
        else:
            assert ours[n].grad is None


@pytest.mark.parametrize("backend", ["triton", "gemm"])
def test_double_backward_raises_clearly(device, backend):
    a, w, b, g, r = (t.requires_grad_() for t in make_inputs(5, 16, 8, torch.float32, device, "scalar"))
    (da,) = torch.autograd.grad(tanh_gated_linear(a, w, b, g, r, backend=backend).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="tanh_gated_linear: double backward"):
        da.sum().backward()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_python_number_gate(device, backend):
    """A constant gate given as a Python number equals the same 0-dim tensor gate."""
    a, w, b, _, r = make_inputs(7, 16, 9, torch.float32, device, "scalar")
    out = tanh_gated_linear(a, w, b, 0.75, r, backend=backend)
    assert_bitwise_equal(out, tanh_gated_linear(a, w, b, torch.tensor(0.75, device=device), r, backend=backend),
                         what="float gate")
    with pytest.raises(ValueError, match="gate must be a tensor"):
        tanh_gated_linear(a, w, b, "0.75", r, backend=backend)
