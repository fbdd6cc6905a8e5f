"""tanh_gated_linear's contract with the rest of PyTorch: output dtypes by type promotion, autocast, fp32
matmul precision, float64, finite gates and argument checks (issue 12).

The op replaces ``residual + torch.tanh(gate) * F.linear(a, weight, bias)``: every test here compares
with that eager chain.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from gated_linear_helpers import gate_floor
from numerics import SEED, assert_bitwise_equal, assert_close_by_rule, dtype_id, randn

from mmfast.kernels import tanh_gated_linear
from mmfast.kernels.reference import tanh_gated_linear_reference

BACKENDS = ["reference", "triton", "gemm"]


def eager_chain(a, weight, bias, gate, residual):
    """What the op replaces, written as the models write it (gate with at most one dimension)."""
    return residual + torch.tanh(gate) * F.linear(a, weight, bias)


def _inputs(M, K, N, device, dtype=torch.float32, gate_shape=(), gate_dtype=torch.float32, residual_dtype=None):
    a = randn(M, K, dtype=dtype, device=device)
    w = randn(N, K, dtype=dtype, device=device, scale=K ** -0.5)
    b = randn(N, dtype=dtype, device=device)
    g = randn(math.prod(gate_shape), dtype=gate_dtype, device=device, scale=0.5).reshape(gate_shape)
    r = randn(M, N, dtype=residual_dtype or dtype, device=device)
    return a, w, b, g, r


GATES = {"0dim": (), "shape1": (1,), "vector": (64,)}


# ----------------------------------------------------------------------------------------------
# Output dtype: the eager chain's, by type promotion


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("dtype,residual_dtype,gate_dtype", [
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float16, torch.bfloat16),
    (torch.float32, torch.float32, torch.float16),
], ids=lambda t: dtype_id(t) if isinstance(t, torch.dtype) else t)
def test_output_dtype_follows_promotion(device, backend, gate, dtype, residual_dtype, gate_dtype):
    """A 0-dim gate does not promote the update, a gate with dimensions does (an fp32 (1,) gate over bf16
    inputs gives fp32, as in eager PyTorch); the residual promotes with the product."""
    a, w, b, g, r = _inputs(9, 16, 64, device, dtype, GATES[gate], gate_dtype, residual_dtype)
    out = tanh_gated_linear(a, w, b, g, r, backend=backend)
    expected = eager_chain(a, w, b, g, r)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    exact = eager_chain(*(t.double() for t in (a, w, b, g, r)))
    same = eager_chain(a, w, b, g, r)
    assert_close_by_rule(out, exact, same, what=f"{backend} {gate}")


# ----------------------------------------------------------------------------------------------
# Autocast: as F.linear under autocast (a, weight, bias cast; gate and residual not)


def _autocast_run(fn, tensors, dy_seed_shape, device):
    leaves = [t.clone().requires_grad_() for t in tensors]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = fn(*leaves)
    dy = randn(*dy_seed_shape, dtype=out.dtype, device=device)
    grads = torch.autograd.grad(out, leaves, dy)
    return out, grads, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_autocast_matches_eager_chain(device, backend, gate, residual_dtype):
    M, K, N = 33, 80, 64
    a, w, b, g, r = _inputs(M, K, N, device, torch.float32, GATES[gate], residual_dtype=residual_dtype)
    tensors = (a, w, b, g, r)
    out, grads, dy = _autocast_run(lambda *t: tanh_gated_linear(*t, backend=backend), tensors, (M, N), device)
    same, same_grads, _ = _autocast_run(eager_chain, tensors, (M, N), device)
    assert out.dtype == same.dtype, f"autocast output {out.dtype}, eager chain {same.dtype}"
    for name, t, grad, ref in zip("a w b g r".split(), tensors, grads, same_grads):
        assert grad.dtype == t.dtype == ref.dtype, f"d_{name}: {grad.dtype} for a {t.dtype} input"
    if backend == "reference":  # the same torch ops on the same casts
        assert_bitwise_equal(out, same, what="reference under autocast")
        return
    # exact: the chain in fp64 on autocast's bf16 casts of a, weight, bias
    wide = [t.to(torch.bfloat16).double().requires_grad_() if i < 3 else t.double().requires_grad_()
            for i, t in enumerate(tensors)]
    exact = eager_chain(*wide)
    exact_grads = torch.autograd.grad(exact, wide, dy.double())
    assert_close_by_rule(out, exact, same, what=f"autocast {gate} out")
    if out.dtype == torch.float32:
        # the kernel ran on autocast's bf16 casts: exact products, fp32 accumulation (without the casts it
        # would be off by their rounding, as large as the eager chain's own error)
        err = (out.double() - exact).abs().max().item()
        assert err <= 1e-5 * exact.abs().max().item(), f"autocast {gate}: {err:.2e} from the chain on the casts"
    for name, grad, ref, s in zip("a w b".split(), grads, exact_grads, same_grads):
        assert_close_by_rule(grad, ref, s, factor=3.0, what=f"autocast {gate} d_{name}")


# ----------------------------------------------------------------------------------------------
# fp32 matmul precision: torch.get_float32_matmul_precision(), read at launch


def _round_tf32(x):
    """fp32 -> TF32 (10 mantissa bits), round to nearest, ties away: what the kernels' TF32 dots do."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def _precision_run(device, precision):
    """(out, d_a) of the op under `precision`, each with the fp64 chain, the fp64 chain on TF32-rounded GEMM
    operands and PyTorch's fp32 chain (always under "highest": the IEEE yardstick)."""
    M, K, N = 61, 1000, 80
    a, w, b, g, r = _inputs(M, K, N, device, torch.float32, (N,))
    dy = randn(M, N, device=device)
    leaves = [t.clone().requires_grad_() for t in (a, w, b, g, r)]
    torch.set_float32_matmul_precision(precision)
    try:
        out = tanh_gated_linear(*leaves, backend="triton")
        (da,) = torch.autograd.grad(out, leaves[:1], dy)
    finally:
        torch.set_float32_matmul_precision("highest")

    def chain(a_, w_):
        wide = [a_.double().requires_grad_(), w_.double(), b.double(), g.double(), r.double()]
        o = eager_chain(*wide)
        return o, torch.autograd.grad(o, wide[:1], dy.double())[0]

    exact, exact_da = chain(a, w)
    tf32, _ = chain(_round_tf32(a), _round_tf32(w))
    # d_a's GEMM takes dy·tanh g (rounded to TF32) and W
    tf32_da = _round_tf32(dy.double() * torch.tanh(g.double())).double() @ _round_tf32(w).double()
    fp32 = eager_chain(a, w, b, g, r)
    leaf = a.clone().requires_grad_()
    fp32_da = torch.autograd.grad(eager_chain(leaf, w, b, g, r), leaf, dy)[0]
    return (out, exact, tf32, fp32), (da, exact_da, tf32_da, fp32_da)


def test_fp32_highest_is_ieee(device, matmul_precision):
    """"highest" (torch's default): IEEE fp32 dots, within 2x (3x: d_a) of PyTorch's fp32 error."""
    (out, exact, _, fp32), (da, exact_da, _, fp32_da) = _precision_run(device, "highest")
    assert_close_by_rule(out, exact, fp32, what="highest out")
    assert_close_by_rule(da, exact_da, fp32_da, factor=3.0, what="highest d_a")


def test_fp32_high_is_tf32(device, matmul_precision):
    """"high": TF32 dots. The error is TF32's (that of the fp64 chain on TF32-rounded operands), far
    above fp32's: the setting reaches the kernels, forward and backward."""
    for what, (ours, exact, tf32, fp32) in zip(("out", "d_a"), _precision_run(device, "high")):
        err = (ours.double() - exact).abs().max().item()
        tf32_err = (tf32 - exact).abs().max().item()
        fp32_err = (fp32.double() - exact).abs().max().item()
        assert tf32_err > 30 * fp32_err, f"{what}: the test's shapes do not separate TF32 from fp32; seed {SEED}"
        assert tf32_err / 4 <= err <= 2 * tf32_err + 1e-6, (
            f"high {what}: error {err:.3e}, TF32's {tf32_err:.3e}, fp32's {fp32_err:.3e}; seed {SEED}")


def test_precision_is_read_at_launch(device, matmul_precision):
    """Changing the setting between calls changes the next call's result (no cached decision)."""
    a, w, b, g, r = _inputs(17, 1000, 64, device, torch.float32, ())
    matmul_precision("high")
    high = tanh_gated_linear(a, w, b, g, r, backend="triton")
    matmul_precision("highest")
    highest = tanh_gated_linear(a, w, b, g, r, backend="triton")
    assert not torch.equal(high, highest)


# ----------------------------------------------------------------------------------------------
# float64: the reference backend's; Triton refuses it naming the argument


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_float64_reference(device, gate):
    """backend="reference" in float64: float64 out and gradients, equal to the eager chain in float64
    (row mask applied with torch.where)."""
    M, K, N = 23, 48, 64
    a, w, b, g, r = _inputs(M, K, N, device, torch.float64, (N,) if gate == "vector" else (1,),
                            gate_dtype=torch.float64)
    row_mask = torch.arange(M, device=device) % 3 == 0
    leaves = [t.clone().requires_grad_() for t in (a, w, b, g, r)]
    out = tanh_gated_linear(*leaves, row_mask=row_mask, backend="reference")
    wide = [t.clone().requires_grad_() for t in (a, w, b, g, r)]
    expected = torch.where(row_mask[:, None], wide[4], eager_chain(*wide))
    dy = randn(M, N, dtype=torch.float64, device=device)
    grads = torch.autograd.grad(out, leaves, dy)
    expected_grads = torch.autograd.grad(expected, wide, dy)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name, x, y in zip("a w b g r".split(), grads, expected_grads):
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=f"d_{name}; seed {SEED}")


@pytest.mark.parametrize("name", ["a", "residual", "gate"])
def test_float64_triton_raises_naming_the_argument(device, name):
    a, w, b, g, r = _inputs(5, 16, 8, device, torch.float32, ())
    args = dict(a=a, weight=w, bias=b, gate=g, residual=r)
    if name == "a":  # F.linear needs a, weight and bias in one dtype
        args.update(a=a.double(), weight=w.double(), bias=b.double())
    else:
        args[name] = args[name].double()
    with pytest.raises(ValueError, match=rf"tanh_gated_linear: {name} must be float16, bfloat16 or float32.*reference"):
        tanh_gated_linear(**args, backend="triton")


# ----------------------------------------------------------------------------------------------
# Scalars: the gate must be finite (Python numbers at once, tensors on their device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_python_gate_raises(backend, value):
    a, w, b, _, r = _inputs(5, 16, 8, "cpu")
    with pytest.raises(ValueError, match="tanh_gated_linear: gate must be finite"):
        tanh_gated_linear(a, w, b, value, r, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["0dim", "shape1", "vector"])
def test_non_finite_tensor_gate_raises(backend, gate):
    """A tensor gate is checked on its device (torch._assert_async; on the CPU it raises at once). On CUDA
    the same check is a device-side assert, which would end the test process, so this runs on the CPU."""
    a, w, b, g, r = _inputs(5, 16, 64, "cpu", torch.float32, GATES[gate])
    g = g.clone()
    g.view(-1)[-1] = math.nan
    with pytest.raises(RuntimeError, match="tanh_gated_linear: gate must be finite"):
        tanh_gated_linear(a, w, b, g, r, backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "gemm"])
def test_finite_gate_check_has_no_host_sync_on_cuda(backend):
    """On CUDA the gate's check is asynchronous: the call does not synchronise with the device."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    a, w, b, g, r = _inputs(64, 64, 64, "cuda", torch.float32, (64,))
    torch.cuda.set_sync_debug_mode("error")
    try:
        tanh_gated_linear(a, w, b, g, r, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------
# Argument checks: ValueError naming the argument and the expected form


def test_validation_errors():
    a, w, b, g, r = _inputs(5, 64, 80, "cpu", torch.float32, ())
    cases = [
        (dict(a=a.tolist()), "a must be a tensor"),
        (dict(a=a.to(torch.int32)), "a must be one of"),
        (dict(a=a[0, 0]), "a must have shape"),
        (dict(weight="w"), "weight must be a tensor"),
        (dict(weight=w[0]), r"weight must have shape \(N, K\)"),
        (dict(weight=w[:, :10]), r"weight must have shape \(N, K\)"),
        (dict(a=a.half()), "weight must have a's dtype"),
        (dict(bias=b.half()), "bias must have a's dtype"),
        (dict(bias=1.0), "bias must be a tensor"),
        (dict(bias=b[:3]), r"bias must have shape \(N,\)"),
        (dict(bias=b[None]), r"bias must have shape \(N,\)"),
        (dict(residual=r[:, :3]), "residual must have shape"),
        (dict(residual=r.long()), "residual must be one of"),
        (dict(residual=None), "residual must be a tensor"),
        (dict(gate=torch.zeros(3)), "gate must be a scalar"),
        (dict(gate=torch.zeros((), dtype=torch.int64)), "gate must be a floating"),
        (dict(gate="0.5"), "gate must be a tensor"),
        (dict(gate=True), "gate must be a tensor"),
        (dict(gate=None), "gate must be a tensor"),
        (dict(row_mask=torch.zeros(5)), "row_mask must be a bool"),
        (dict(row_mask=[True] * 5), "row_mask must be a bool"),
        (dict(row_mask=torch.zeros(4, dtype=torch.bool)), "row_mask must have shape"),
        (dict(backend="cuda"), "backend 'cuda' is not implemented"),
        (dict(backend="fast"), "backend must be one of"),
    ]
    base = dict(a=a, weight=w, bias=b, gate=g, residual=r)
    for backend in BACKENDS:
        for change, message in cases:
            kwargs = dict(dict(base, backend=backend), **change)
            with pytest.raises(ValueError, match=f"tanh_gated_linear: {message}"):
                tanh_gated_linear(**kwargs)


def test_mixed_residual_dtypes_are_accepted(device):
    """Any floating residual (the eager chain promotes it): bf16 GEMM inputs over an fp16 residual give fp32."""
    a, w, b, g, r = _inputs(9, 16, 64, device, torch.bfloat16, (), residual_dtype=torch.float16)
    out = tanh_gated_linear(a, w, b, g, r, backend="triton")
    assert out.dtype == torch.float32
    assert_close_by_rule(out, eager_chain(*(t.double() for t in (a, w, b, g, r))), eager_chain(a, w, b, g, r))
    leaf = r.clone().requires_grad_()
    tanh_gated_linear(a, w, b, g, leaf, backend="triton").sum().backward()
    assert leaf.grad.dtype == torch.float16 and (leaf.grad == 1).all()


def test_reference_matches_eager_chain_bitwise(device):
    """The reference is the eager chain (a (1, 1, N) gate flattened, as the output keeps the residual's shape)."""
    a, w, b, g, r = _inputs(7, 16, 64, device, torch.bfloat16, (64,))
    assert_bitwise_equal(tanh_gated_linear_reference(a, w, b, g.reshape(1, 1, 64), r), eager_chain(a, w, b, g, r),
                         what="reference")


def test_check_float64_mode():
    """`python -m mmfast check --dtype float64`: only backend="reference" cases, in float64, and the
    tanh_gated_linear ones pass against the eager chain at 1e-10 relative."""
    from mmfast.checks.gated_linear import cases

    rows = list(cases(torch.device("cpu"), torch.float64))
    assert rows and all(backend == "reference" and dtype == "fp64" for _, backend, dtype, _, _ in rows)
    ops = [row for row in rows if row[0] == "tanh_gated_linear"]
    assert len(ops) == 2
    for op, _, _, shape, run in ops:
        err, tol, _, ok = run()
        assert ok and err <= tol, f"{op} {shape}: {err:.2e} > {tol:.2e}"


@pytest.mark.parametrize("backend", ["triton", "gemm"])
@pytest.mark.parametrize("layout", ["step2", "expanded"])
def test_strided_bias(device, backend, layout):
    """A bias that is a view with a non-unit stride (a slice of a fused bias, or an expanded constant) is
    read through its strides: the kernels used to read it as contiguous (wrong outputs, NaN gradients)."""
    a, w, _, g, r = _inputs(9, 16, 24, device, torch.float32, ())
    full = randn(48, device=device)
    dy = randn(9, 24, device=device)

    def run(fn, dtype):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (a, w, full, g, r)]
        bias = leaves[2][::2] if layout == "step2" else leaves[2][:1].expand(24)
        out = fn(leaves[0], leaves[1], bias, leaves[3], leaves[4])
        out.backward(dy.to(dtype))
        return [out] + [t.grad for t in leaves]

    got = run(lambda *t: tanh_gated_linear(*t, backend=backend), torch.float32)
    bias = full[::2] if layout == "step2" else full[:1].expand(24)
    # single sums whose one PyTorch draw can be near exact: floors of a few roundings of their terms
    floors = dict(dgate=gate_floor(a, w, bias, g, dy, None),
                  dbias=4 * torch.finfo(torch.float32).eps * dy.abs().sum().item())
    for name, x, exact, same in zip(("out", "da", "dw", "dbias", "dgate", "dresidual"), got,
                                    run(eager_chain, torch.float64), run(eager_chain, torch.float32)):
        assert_close_by_rule(x, exact, same, factor=3.0, floor=floors.get(name), what=f"{backend} {layout} {name}")
