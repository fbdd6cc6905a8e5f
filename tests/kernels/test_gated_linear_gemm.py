"""tanh_gated_linear, backend="gemm" (kernels/gated_linear/_gemm.py): torch.mm for the GEMMs, three one-pass
Triton kernels around them (run through the interpreter on the CPU), output and every gradient against the
fp64 reference by the 2x / 3x rule, at odd sizes that cross several tiles of each pass; outputs poisoned.
torch.compile and the double-backward guard are tested for both backends in test_gated_linear.py, the
contract (dtypes, autocast, argument checks) in test_gated_linear_contract.py.

The fp32-output GEMM helper itself (``_common.mm_f32``): tests/kernels/test_gemm_helpers.py.
"""
import pytest
import torch
from gated_linear_helpers import NAMES, check, gate_floor, make_inputs, poison_outputs, run_all
from numerics import FLOAT_DTYPES, SEED, assert_bitwise_equal, assert_close_by_rule, dtype_id, randn

from mmfast.kernels import tanh_gated_linear
from mmfast.kernels._dispatch import auto_backend
from mmfast.kernels.reference import tanh_gated_linear_reference

LEAD, K, N = (7, 11), 80, 96  # M = 77 rows of a 3-D input


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_outputs(monkeypatch)


def _row_mask(lead, device):
    """A whole masked row tile (text before the first image) and scattered rows."""
    mask = torch.zeros(lead, dtype=torch.bool, device=device)
    mask.view(-1)[:20] = True
    mask.view(-1)[33::9] = True
    return mask


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "row-mask"])
def test_forward_backward(device, dtype, gate, masked):
    inputs = make_inputs(None, K, N, dtype, device, gate, lead=LEAD)
    row_mask = _row_mask(LEAD, device) if masked else None
    ours, ref, same, dy = run_all(*inputs, row_mask=row_mask, backend="gemm")
    what = f"gemm {dtype_id(dtype)} {gate} {'row mask' if masked else ''}"
    check(ours, ref, same, inputs, dy, row_mask=row_mask, what=what)
    if masked:
        assert_bitwise_equal(ours[0][row_mask], inputs[4][row_mask].to(ours[0].dtype), what="masked rows")
        assert (ours[1][0][row_mask] == 0).all(), "masked rows get no d_a"


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_fp32_residual_stream(device, gate):
    """bf16 GEMMs over an fp32 residual: dy is fp32, so the dy pass writes the live dy in bf16 for G."""
    a, w, b, g, r = make_inputs(None, K, N, torch.bfloat16, device, gate, lead=LEAD)
    r = r.float()
    ours, ref, same, dy = run_all(a, w, b, g, r, backend="gemm")
    assert ours[0].dtype == torch.float32 and ours[1][4].dtype == torch.float32
    check(ours, ref, same, (a, w, b, g, r), dy, what=f"gemm bf16 over fp32 residual {gate}")


def test_strided_inputs_without_bias(device):
    """a with a row stride > K, a transposed weight, a permuted residual, no bias, a row mask."""
    B, L = 3, 29
    a = randn(B, L, 2 * K, dtype=torch.bfloat16, device=device)[..., ::2]
    w = randn(K, N, dtype=torch.bfloat16, device=device, scale=K**-0.5).t()
    g = randn(N, device=device, scale=0.5)
    r = randn(N, B, L, dtype=torch.bfloat16, device=device).permute(1, 2, 0)
    assert not a.is_contiguous() and not w.is_contiguous() and not r.is_contiguous()
    row_mask = _row_mask((B, L), device)
    ours, ref, same, dy = run_all(a, w, None, g, r, row_mask=row_mask, backend="gemm")
    check(ours, ref, same, (a, w, None, g, r), dy, row_mask=row_mask, what="gemm strided")


def test_gate_zero_is_identity(device):
    a, w, b, _, r = make_inputs(None, K, N, torch.bfloat16, device, "scalar", lead=LEAD)
    g = torch.zeros(1, device=device)
    ours, ref, same, dy = run_all(a, w, b, g, r, backend="gemm")
    assert_bitwise_equal(ours[0], r.to(same[0].dtype), what="gate 0: output is the residual")
    check(ours, ref, same, (a, w, b, g, r), dy, what="gemm gate 0")
    assert ours[1][3].abs().max() > 0, "the gate gradient at 0 is not 0 for random inputs"
    for i in (0, 1, 2):
        assert (ours[1][i] == 0).all(), NAMES[i]


@pytest.mark.parametrize("M,K_,N_", [(0, 64, 80), (5, 0, 80), (7, 64, 1)], ids=["no-rows", "K0", "N1"])
def test_degenerate_sizes(device, M, K_, N_):
    inputs = make_inputs(M, K_, N_, torch.float32, device, "scalar")
    ours, ref, same, dy = run_all(*inputs, backend="gemm")
    check(ours, ref, same, inputs, dy, what=f"gemm M{M} K{K_} N{N_}")


@pytest.mark.parametrize("trainable", ["a", "gate", "weight", "bias", "residual"])
def test_gradient_subsets(device, trainable):
    """Each gradient alone: every pass runs with only the outputs that gradient needs (d_a: no G; the gate:
    G and the column sums, no d_W; the weight: G only; the bias: the column sums only; the residual: none)."""
    a, w, b, g, r = make_inputs(None, K, N, torch.bfloat16, device, "vector", lead=LEAD)
    row_mask = _row_mask(LEAD, device)
    named = dict(zip(("a", "weight", "bias", "gate", "residual"), (a, w, b, g, r)))
    ours, same = ({n: t.clone().requires_grad_(n == trainable) for n, t in named.items()} for _ in range(2))
    wide = {n: t.double().requires_grad_(n == trainable) for n, t in named.items()}
    out = tanh_gated_linear(*ours.values(), row_mask=row_mask, backend="gemm")
    dy = randn(*out.shape, dtype=out.dtype, device=device)
    out.backward(dy)
    tanh_gated_linear_reference(*wide.values(), row_mask=row_mask).backward(dy.double())
    tanh_gated_linear_reference(*same.values(), row_mask=row_mask).backward(dy)
    floor = gate_floor(a, w, b, g, dy, row_mask) if trainable == "gate" else None
    assert_close_by_rule(ours[trainable].grad, wide[trainable].grad, same[trainable].grad, factor=3.0, floor=floor,
                         what=f"gemm d_{trainable} alone")
    assert all(t.grad is None for n, t in ours.items() if n != trainable)


def test_expanded_upstream_gradient(device):
    """out.sum() hands backward a zero-stride dy: the dy pass and torch.mm read it through its strides."""
    a, w, b, g, r = make_inputs(33, 64, 80, torch.float32, device, "vector")
    leaves = [t.clone().requires_grad_() for t in (a, w, b, g, r)]
    tanh_gated_linear(*leaves, row_mask=torch.arange(33, device=device) % 4 == 0, backend="gemm").sum().backward()
    wide = [t.double().requires_grad_() for t in (a, w, b, g, r)]
    tanh_gated_linear_reference(*wide, row_mask=torch.arange(33, device=device) % 4 == 0).sum().backward()
    for name, x, y in zip(NAMES, leaves, wide):
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-4, msg=f"{name}; seed {SEED}")


def test_auto_picks_gemm_on_cuda():
    """What auto picks is read from the registry (no GPU needed to ask); float64 stays the reference's."""
    assert auto_backend("tanh_gated_linear", torch.device("cuda")) == "gemm"
    assert auto_backend("tanh_gated_linear", torch.device("cpu")) == "reference"
    a, w, b, g, r = make_inputs(5, 16, 8, torch.float64, "cpu", "scalar")
    with pytest.raises(ValueError, match="float64 runs on backend='reference'"):
        tanh_gated_linear(a, w, b, g, r, backend="gemm")


def test_backward_inside_autocast(device):
    """backward() called inside torch.autocast: the backend's own GEMMs keep their fp32 outputs (G), so the
    gradients equal those of a backward run outside it."""
    a, w, b, g, r = make_inputs(None, K, N, torch.float32, device, "vector", lead=LEAD)
    grads = []
    for inside in (False, True):
        leaves = [t.clone().requires_grad_() for t in (a, w, b, g, r)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = tanh_gated_linear(*leaves, backend="gemm")
            if inside:
                out.backward(torch.ones_like(out))
        if not inside:
            out.backward(torch.ones_like(out))
        grads.append([t.grad for t in leaves])
    for name, x, y in zip(NAMES, *grads):
        assert_bitwise_equal(x, y, what=f"{name} with backward inside autocast")
