"""contrastive_loss / siglip_loss as users call them: argument checks, scalars, torch.autocast, fp32 matmul
precision, float64, double backward, torch.compile and the custom ops."""
import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_bitwise_equal, assert_close_by_rule, max_abs_error, randn

import mmfast.kernels.contrastive._launch as launch
from mmfast.checks.contrastive import cases as check_cases
from mmfast.checks.contrastive import independent_loss
from mmfast.kernels import interpreting
from mmfast.kernels.contrastive import contrastive_loss, siglip_loss
from mmfast.kernels.reference import contrastive_loss_reference

HAS_TRITON = torch.cuda.is_available() or interpreting()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
BACKENDS = ["reference", "chunked"] + (["triton", "gemm"] if HAS_TRITON else [])
SLICED = ["chunked"] + (["triton", "gemm"] if HAS_TRITON else [])  # the custom-op backends
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _op(op):
    """(a, b, scale-like, backend) -> loss with fixed options, for the contrastive or the sigmoid loss."""
    if op == "siglip":
        return lambda a, b, s, backend, **kw: siglip_loss(a, b, s, -10.0, log_scale=False, backend=backend, **kw)
    return lambda a, b, s, backend, **kw: contrastive_loss(a, b, s, log_scale=False, backend=backend, **kw)


class TestArguments:
    """Every argument is validated, naming it (ValueError), on every backend."""

    def test_scale_on_other_device(self):
        with pytest.raises(ValueError, match="logit_scale is on meta but the features are on cpu"):
            contrastive_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(1.0, device="meta"))

    def test_non_2d_b(self):
        with pytest.raises(ValueError, match=r"b must have shape \(N, D\)"):
            contrastive_loss(torch.zeros(3, 4), torch.zeros(3, 2, 4), 1.0)

    def test_a_4d(self):
        with pytest.raises(ValueError, match=r"a must have shape \(N, D\) or \(N, Q, D\)"):
            contrastive_loss(torch.zeros(3, 1, 1, 4), torch.zeros(3, 4), 1.0)

    def test_not_a_tensor(self):
        with pytest.raises(ValueError, match="siglip_loss: b must be a tensor"):
            siglip_loss(torch.zeros(3, 4), [[0.0] * 4] * 3, 1.0, 0.0)

    def test_feature_size_mismatch(self):
        with pytest.raises(ValueError, match="same feature size D"):
            contrastive_loss(torch.zeros(3, 4), torch.zeros(3, 5), 1.0)

    def test_fewer_columns_than_rows(self):
        with pytest.raises(ValueError, match="M >= N"):
            contrastive_loss(torch.zeros(5, 4), torch.zeros(3, 4), 1.0)
        with pytest.raises(ValueError, match="M >= N"):
            siglip_loss(torch.zeros(5, 4), torch.zeros(3, 4), 1.0, 0.0)

    def test_integer_features(self):
        with pytest.raises(ValueError, match="contrastive_loss: a must be one of float32, float16, bfloat16, float64"):
            contrastive_loss(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64), 1.0)

    @needs_triton
    @pytest.mark.parametrize("op", ["clip", "siglip"])
    def test_triton_rejects_float64(self, op):
        a = torch.zeros(3, 4, dtype=torch.float64, device=DEVICE)
        match = "a must be float16, bfloat16 or float32 on this backend, got torch.float64; float64 runs on"
        with pytest.raises(ValueError, match=match):
            _op(op)(a, a, 1.0, "triton")

    def test_mixed_dtypes(self):
        with pytest.raises(ValueError, match="same dtype"):
            contrastive_loss(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bfloat16), 1.0)

    def test_devices(self):
        with pytest.raises(ValueError, match="one device"):
            contrastive_loss(torch.zeros(3, 4), torch.zeros(3, 4, device="meta"), 1.0)

    def test_empty(self):
        with pytest.raises(ValueError, match="non-empty"):
            contrastive_loss(torch.zeros(0, 4), torch.zeros(3, 4), 1.0)

    @pytest.mark.parametrize("scale", [torch.zeros(2), torch.tensor(1), "1.0", None],
                             ids=["two-elements", "int", "str", "none"])
    def test_logit_scale_form(self, scale):
        with pytest.raises(ValueError, match="logit_scale must be a float or a floating tensor with one element"):
            contrastive_loss(torch.zeros(3, 4), torch.zeros(3, 4), scale)

    @pytest.mark.parametrize("kw,match", [
        (dict(num_pairs=4), r"num_pairs must be in \[1, 3\], got 4"),
        (dict(num_pairs=0), r"num_pairs must be in \[1, 3\], got 0"),
        (dict(num_pairs=2.0), "num_pairs must be an int"),
        (dict(num_pairs=True), "num_pairs must be an int"),
        (dict(label_smoothing=1.0), r"label_smoothing must be in \[0.0, 1.0\)"),
        (dict(label_smoothing=-0.1), r"label_smoothing must be in \[0.0, 1.0\)"),
        (dict(label_smoothing=math.nan), "label_smoothing must be finite"),
        (dict(label_smoothing=torch.tensor(0.1)), "label_smoothing must be a Python number"),
        (dict(alpha=0.4), "alpha > 0 needs the teacher"),
        (dict(alpha=1.5), r"alpha must be in \[0.0, 1.0\]"),
        (dict(alpha=math.nan), "alpha must be finite"),
        (dict(max_scale=0.0), r"max_scale must be in \(0.0, inf\]"),
        (dict(max_scale=math.inf), "max_scale must be finite"),
        (dict(max_scale="100"), "max_scale must be a number"),
        (dict(normalize="yes"), "normalize must be True or False"),
        (dict(symmetric=1), "symmetric must be True or False"),
        (dict(log_scale=None), "log_scale must be True or False"),
        (dict(backend="cuda"), r"'cuda' is not implemented; choose from \('auto', 'reference', 'gemm', 'triton', 'chunked'\)"),
        (dict(backend="fast"), "backend must be one of"),
        (dict(a_teacher=torch.zeros(3, 4)), "must be given together"),
        (dict(a_teacher=torch.zeros(2, 4), b_teacher=torch.zeros(3, 4), alpha=0.4), "a_teacher must have the shape"),
    ], ids=["pairs-too-many", "pairs-zero", "pairs-float", "pairs-bool", "smoothing-one", "smoothing-negative",
            "smoothing-nan", "smoothing-tensor", "alpha-no-teacher", "alpha-range", "alpha-nan", "max-scale-zero",
            "max-scale-inf", "max-scale-str", "normalize-str", "symmetric-int", "log-scale-none", "backend-cuda",
            "backend-unknown", "one-teacher", "teacher-shape"])
    def test_options(self, kw, match):
        with pytest.raises(ValueError, match=match):
            contrastive_loss(torch.zeros(3, 4), torch.zeros(3, 4), 1.0, **kw)

    @pytest.mark.parametrize("kw,match", [
        (dict(normalize=0), "siglip_loss: normalize must be True or False"),
        (dict(max_scale=-1.0), r"siglip_loss: max_scale must be in \(0.0, inf\]"),
        (dict(log_scale="no"), "siglip_loss: log_scale must be True or False"),
    ], ids=["normalize-int", "max-scale-negative", "log-scale-str"])
    def test_siglip_options(self, kw, match):
        with pytest.raises(ValueError, match=match):
            siglip_loss(torch.zeros(3, 4), torch.zeros(3, 4), 1.0, 0.0, **kw)

    def test_group_without_init(self):
        import torch.distributed as dist

        if dist.is_initialized():
            pytest.skip("a process group is already initialized in this process")
        with pytest.raises(ValueError, match="torch.distributed is not initialized"):
            contrastive_loss(torch.zeros(3, 4), torch.zeros(3, 4), 1.0, group=object())

    def test_triton_on_cpu_without_interpreter(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            contrastive_loss(torch.zeros(3, 4), torch.zeros(3, 4), 1.0, backend="triton")


class TestScalars:
    """One policy (kernels._common.check_scalar): a non-finite Python number raises ValueError naming the
    argument; a tensor is checked on its device without a host sync (on the CPU: RuntimeError at once).
    Before, a NaN logit_scale or logit_bias returned NaN."""

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
    @pytest.mark.parametrize("name", ["logit_scale", "logit_bias"])
    def test_non_finite_python_scalar(self, name, value, backend):
        args = {"logit_scale": 1.0, "logit_bias": -1.0, name: value}
        with pytest.raises(ValueError, match=f"siglip_loss: {name} must be finite"):
            siglip_loss(randn(3, 4), randn(3, 4), args["logit_scale"], args["logit_bias"], backend=backend)
        if name == "logit_scale":
            with pytest.raises(ValueError, match="contrastive_loss: logit_scale must be finite"):
                contrastive_loss(randn(3, 4), randn(3, 4), value, backend=backend)

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("name", ["logit_scale", "logit_bias"])
    def test_non_finite_tensor_scalar(self, name, backend):
        args = {"logit_scale": torch.tensor(1.0), "logit_bias": torch.tensor(-1.0), name: torch.tensor(math.nan)}
        with pytest.raises(RuntimeError, match=f"siglip_loss: {name} must be finite"):
            siglip_loss(randn(3, 4), randn(3, 4), args["logit_scale"], args["logit_bias"], backend=backend)
        if name == "logit_scale":
            with pytest.raises(RuntimeError, match="contrastive_loss: logit_scale must be finite"):
                contrastive_loss(randn(3, 4), randn(3, 4), torch.tensor([math.inf]), backend=backend)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_finite_tensor_scalars_pass(self, backend):
        t = torch.tensor([2.0], requires_grad=True)  # one element, any shape
        loss = siglip_loss(randn(3, 4), randn(3, 4), t, torch.tensor(-1.0, dtype=torch.float64), backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and t.grad.shape == (1,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["clip", "siglip"])
def test_autocast_matches_the_eager_chain(op, backend):
    """Under torch.autocast(bf16) the op behaves as the chain it replaces: logits = s·(a·bᵀ), a matmul that
    autocast runs on bf16 copies of a and b, then F.cross_entropy / F.logsigmoid (fp32 under autocast).

    The op casts a and b exactly as that matmul does (its result under autocast is bit for bit the result
    on bf16 features, gradients cast back to fp32), returns the chain's dtype (fp32), and its values are as
    close to the exact loss of those bf16 features as the chain's (2x its error for the loss, 3x for the
    gradients; the chain also rounds its logits to bf16)."""
    N, M, D, s, bias = 37, 41, 48, 10.0, -4.0
    a, b = randn(N, D, device=DEVICE, scale=D ** -0.5), randn(M, D, device=DEVICE, scale=D ** -0.5)
    z = 2 * torch.eye(N, M, device=DEVICE) - 1
    labels = torch.arange(N, device=DEVICE)

    def chain(x, y):
        logits = s * (x @ y.T)
        if op == "siglip":
            return -F.logsigmoid(z * (logits + bias)).sum() / N
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :N].T, labels)) / 2

    def ours(x, y):
        if op == "siglip":
            return siglip_loss(x, y, s, bias, log_scale=False, backend=backend)
        return contrastive_loss(x, y, s, log_scale=False, backend=backend)

    def run(fn, dtype, autocast):
        x, y = a.to(dtype, copy=True).requires_grad_(), b.to(dtype, copy=True).requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(x, y)
        loss.backward()
        return loss.detach(), x.grad, y.grad

    a, b = a.bfloat16().float(), b.bfloat16().float()  # values the cast keeps: the same features for every run
    got, eager = run(ours, torch.float32, True), run(chain, torch.float32, True)
    assert got[0].dtype == eager[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    on_bf16 = run(ours, torch.bfloat16, False)
    for name, g, want in zip(("loss", "da", "db"), got, on_bf16):
        assert_bitwise_equal(g, want.to(g.dtype), f"{op} {backend} {name}: autocast vs bf16 features")
    exact = run(chain, torch.float64, False)
    for name, g, e, x, factor in zip(("loss", "da", "db"), got, eager, exact, (2.0, 3.0, 3.0)):
        assert_close_by_rule(g, x, e, factor=factor, what=f"{op} {backend} {name} under autocast")


def _tf32(x):
    """x rounded to TF32 (10 mantissa bits, to nearest, ties away), as the tensor cores read fp32."""
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@needs_triton
def test_fp32_precision_follows_torch(matmul_precision):
    """fp32 dots follow torch.get_float32_matmul_precision(), proving the setting reaches the kernels (the
    interpreter emulates TF32). "highest": the fp32 rule (IEEE dots). "high": TF32 — the loss is the exact
    loss of TF32-rounded features to fp32 accuracy, and the gradients are about a thousand times fp32's
    error (G is rounded to TF32 too), within 3x the error that TF32-rounded features alone cause."""
    a, b = randn(67, 64, device=DEVICE), randn(67, 64, device=DEVICE)

    def run(fn, x, y, scale):
        x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
        loss = fn(x, y, scale, log_scale=False, label_smoothing=0.1)
        loss.backward()
        return loss.detach(), x.grad, y.grad

    f64 = lambda x: torch.tensor(x, dtype=torch.float64, device=DEVICE)  # noqa: E731
    exact = run(contrastive_loss_reference, a.double(), b.double(), f64(0.3))
    torch32 = run(contrastive_loss_reference, a, b, torch.tensor(0.3, device=DEVICE))
    exact_tf32 = run(contrastive_loss_reference, _tf32(a).double(), _tf32(b).double(), f64(0.3))
    torch32_tf32 = run(contrastive_loss_reference, _tf32(a), _tf32(b), torch.tensor(0.3, device=DEVICE))
    got = {}
    for precision in ("highest", "high"):
        matmul_precision(precision)
        got[precision] = run(lambda *args, **kw: contrastive_loss(*args, backend="triton", **kw), a, b, 0.3)
    for name, highest, t32, x in zip(("loss", "da", "db"), got["highest"], torch32, exact):
        assert_close_by_rule(highest, x, t32, factor=2.0 if name == "loss" else 3.0, what=f"highest {name}")
    assert_close_by_rule(got["high"][0], exact_tf32[0], torch32_tf32[0], what="high loss vs TF32-rounded features")
    for name, high, t32, tf, x in zip(("da", "db"), got["high"][1:], torch32[1:], exact_tf32[1:], exact[1:]):
        assert max_abs_error(high, x) > 100 * max_abs_error(t32, x), f"high {name}: not TF32"
        assert_close_by_rule(high, x, tf, factor=3.0, what=f"high {name} vs TF32-rounded features")


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("case", [c[3] for c in check_cases(torch.device("cpu"), torch.float64)])
def test_float64_matches_independent_formulation(case, backend):
    """float64 in, float64 out on the reference and the chunked path: loss and gradients equal the losses
    written with F.cross_entropy / F.logsigmoid in float64 to 1e-10 relative (mmfast check --dtype float64)."""
    (run,) = [c[4] for c in check_cases(torch.device("cpu"), torch.float64) if c[3] == case]
    if backend == "chunked":  # the same case through the chunked path
        import mmfast.checks.contrastive as checks

        run = [c for c in checks._float64_cases(torch.device("cpu"), backends=("chunked",)) if c[3] == case][0][4]
    err, tol, _, ok = run()
    assert ok, f"{case} {backend}: error {err:.2e} > {tol:.2e} (or not float64)"


def test_float64_python_scalars_are_float64():
    """A Python logit_scale meets fp64 features as an fp64 value (not rounded to fp32 on the way)."""
    a, b = randn(5, 8, dtype=torch.float64), randn(5, 8, dtype=torch.float64)
    for backend in ("reference", "chunked"):
        got = contrastive_loss(a, b, math.log(1 / 0.07), backend=backend)
        want = independent_loss("CLIP", a, b, torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
        assert got.dtype == torch.float64 and abs(got.item() - want.item()) <= 1e-12 * abs(want.item())


@pytest.mark.parametrize("backend", SLICED)
def test_double_backward_raises(backend):
    """Gradients of gradients raise on the custom-op backends (the backward's gradients carry no graph of
    their own, so a gradient penalty would silently get nothing); the reference supports them."""
    a = randn(5, 16, device=DEVICE).requires_grad_()
    b = randn(5, 16, device=DEVICE)
    (da,) = torch.autograd.grad(contrastive_loss(a, b, 1.0, backend=backend), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(da.square().sum(), a)
    (da,) = torch.autograd.grad(contrastive_loss(a, b, 1.0, backend="reference"), a, create_graph=True)
    torch.autograd.grad(da.square().sum(), a)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["clip", "siglip"])
def test_torch_compile_fullgraph(op, backend):
    """torch.compile(fullgraph=True) traces the loss (the sliced backends are custom ops with fake shapes):
    loss and gradients equal eager bit for bit."""
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


@pytest.mark.parametrize("backend", SLICED)
def test_custom_ops_opcheck(backend):
    """Schema, fake shapes / strides / dtypes equal to the real outputs (what torch.compile plans with),
    autograd registration."""
    a, b = randn(5, 3, 24, device=DEVICE), randn(7, 24, device=DEVICE)  # BLIP-2 queries, extra negatives
    at, bt = randn(5, 3, 24, device=DEVICE), randn(7, 24, device=DEVICE)
    if backend == "gemm":  # 2-D features only
        a, at = a[:, 0].contiguous(), at[:, 0].contiguous()
    scale = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    bias = torch.zeros((), device=DEVICE)
    a, b = a.requires_grad_(), b.requires_grad_()
    args = (a, b, at, bt, scale, bias, launch.MODE_SOFTMAX, True, 0.1, 0.4, 4, backend, "")
    torch.library.opcheck(launch._contrastive_fwd_op, args)
    _, params, rows, cols = launch._contrastive_fwd_op(*args)
    for need_da, need_db in ((True, True), (False, True), (True, False)):
        bwd_args = (a.detach(), b.detach(), at, bt, params, rows, cols, launch.MODE_SOFTMAX, True, 4, 4, need_da,
                    need_db, 0, backend)
        torch.library.opcheck(launch._contrastive_bwd_op, bwd_args)


@pytest.mark.parametrize("backend", SLICED)
def test_teacher_made_under_inference_mode(backend):
    """ALBEF / BLIP distillation with the momentum encoder run under torch.inference_mode(): the teachers are
    inference tensors. The sliced backends saved them for backward, which autograd refuses ('Inference
    tensors cannot be saved for backward'); the reference (and the eager chain) ran. Now all agree."""
    a, b = randn(5, 16, device=DEVICE), randn(7, 16, device=DEVICE)
    with torch.inference_mode():
        at, bt = randn(5, 16, device=DEVICE), randn(7, 16, device=DEVICE)
    runs = {}
    for name, dtype in ((backend, torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        leaves = [a.to(dtype, copy=True).requires_grad_(), b.to(dtype, copy=True).requires_grad_()]
        loss = contrastive_loss(*leaves, 0.0, a_teacher=at.to(dtype), b_teacher=bt.to(dtype), alpha=0.4, backend=name)
        loss.backward()
        runs[name, dtype] = [loss] + [t.grad for t in leaves]
    got, exact, same = (runs[key] for key in ((backend, torch.float32), ("reference", torch.float64),
                                              ("reference", torch.float32)))
    # what is tested is that it runs: small logits (s = 1), the precision at large ones is
    # test_contrastive_large_logits.py's; the floors are a few fp32 ulps of the largest value
    for g, e, t in zip(got, exact, same):
        ulps = 1e-6 + 4 * torch.finfo(torch.float32).eps * e.abs().max().item()
        assert_close_by_rule(g, e, t, factor=3.0, floor=ulps, what=backend)
