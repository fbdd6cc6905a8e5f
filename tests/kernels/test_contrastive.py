"""contrastive_loss / siglip_loss: Triton kernels (through the interpreter on CPU) and the chunked
PyTorch path, every variant, forward and gradients (a, b, logit_scale, logit_bias) vs the fp64 naive
reference by the numerics rule; backend dispatch. Arguments, autocast, precision and float64:
test_contrastive_api.py."""
import pytest
import torch
from contrastive_helpers import VARIANTS, check_against_reference, make_inputs, run
from numerics import assert_bitwise_equal, assert_close_by_rule, dtype_id, poison_, randn

import mmfast.kernels.contrastive._chunked as chunked
import mmfast.kernels.contrastive._configs as configs
import mmfast.kernels.contrastive._launch as launch
import mmfast.kernels.reference as reference
from mmfast.kernels import interpreting
from mmfast.kernels.contrastive import contrastive_loss, siglip_loss
from mmfast.kernels.reference import contrastive_loss_reference, siglip_loss_reference

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
                                  reason="needs CUDA or TRITON_INTERPRET=1 (the chunked path is tested regardless)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_BACKENDS = ["reference", "chunked"] + (["triton", "gemm"] if torch.cuda.is_available() or interpreting() else [])


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(launch, "_empty", lambda *a, **k: poison_(torch.empty(*a, **k)))


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the chunked path through many (odd-sized) chunks at test sizes."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 97)


@pytest.fixture
def small_gemm_chunks(monkeypatch):
    """The "gemm" backend through chunks of 64 rows (one forward row block), the last one partial."""
    monkeypatch.setitem(configs.GEMM, "CHUNK_ELEMENTS", 64 * 100)


SHAPES = [(1, 64), (3, 100), (129, 100)]
# the interpreter is slow: N = 129 (two row blocks, three column blocks) in fp32 and bf16 only, and for
# BLIP-2 (Q x the work) N = 33 in fp32 only (still 3 forward / 5 backward row blocks of 16 / 8 images);
# fp16 shares every code path with bf16 but the output rounding
TRITON_CASES = [(v, n if not (v.startswith("blip2") and n == 129) else 33, d, dt) for v in VARIANTS for (n, d) in SHAPES
                for dt in (torch.float32, torch.bfloat16, torch.float16)
                if n < 129 or dt == torch.float32 or (dt == torch.bfloat16 and not v.startswith("blip2"))]


@needs_triton
@pytest.mark.parametrize("variant,N,D,dtype", TRITON_CASES,
                         ids=[f"{v}-N{n}-D{d}-{dtype_id(dt)}" for v, n, d, dt in TRITON_CASES])
def test_triton_matches_reference(variant, N, D, dtype):
    check_against_reference(variant, N, D, dtype, "triton", DEVICE)


# the "gemm" backend (cuBLAS GEMMs, Triton for the rest): 2-D features only, so no BLIP-2; N = 129 rows
# (+ the queues) in chunks of 64: three chunks, the last partial; fp16 at one shape (its own G rounding)
GEMM_CASES = [(v, n, d, dt) for v in VARIANTS if not v.startswith("blip2") for (n, d) in ((3, 100), (129, 100))
              for dt in (torch.float32, torch.bfloat16)] + [("clip", 129, 100, torch.float16), ("clip", 33, 512, torch.bfloat16)]


@needs_triton
@pytest.mark.parametrize("variant,N,D,dtype", GEMM_CASES,
                         ids=[f"{v}-N{n}-D{d}-{dtype_id(dt)}" for v, n, d, dt in GEMM_CASES])
def test_gemm_matches_reference(variant, N, D, dtype, small_gemm_chunks):
    check_against_reference(variant, N, D, dtype, "gemm", DEVICE)


@needs_triton
def test_gemm_default_chunks_and_strided_inputs():
    """The default chunk size (one chunk at test sizes), and transposed / sliced features read correctly."""
    inputs = make_inputs("clip", 45, 70, torch.float32, DEVICE)
    strided = dict(inputs, a=inputs["a"].T.contiguous().T)
    wide = randn(45, 90, device=DEVICE)
    wide[:, 10:80] = inputs["b"]
    strided["b"] = wide[:, 10:80]
    want_loss, want = run("clip", inputs, 45, backend="reference")
    got_loss, got = run("clip", strided, 45, backend="gemm")
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


@needs_triton
def test_gemm_takes_2d_features_only():
    """backend="gemm" refuses BLIP-2's (N, Q, D) features by name; "auto" sends them to the Triton kernels."""
    a, b = randn(5, 3, 16, device=DEVICE), randn(5, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"backend='gemm' takes 2-D features a \(N, D\)"):
        contrastive_loss(a, b, 1.0, backend="gemm")
    assert launch.resolve("contrastive_loss", "auto", a, {"a": a}) in ("triton", "reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("N,D", SHAPES, ids=[f"N{n}-D{d}" for n, d in SHAPES])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_matches_reference(variant, N, D, dtype, small_chunks):
    check_against_reference(variant, N, D, dtype, "chunked")


@needs_triton
@pytest.mark.parametrize("variant,N,D", [("clip", 33, 512), ("clip", 77, 600), ("blip2-q5", 9, 600)],
                         ids=["clip-D512", "clip-D600", "blip2-D600"])
def test_triton_wide_features(variant, N, D):
    """D = 512: one full backward D chunk; D = 600: several K steps in the logits tile and two D chunks
    (the second partly masked) in the backward, whose chunk is at most 512."""
    check_against_reference(variant, N, D, torch.bfloat16, "triton", DEVICE)


@pytest.mark.parametrize("variant,D", [("clip", 512), ("albef-queues-distill", 64), ("blip2-q5", 64), ("siglip", 64)])
def test_chunked_large_batch(variant, D):
    """N = 1000 with the default chunk size (several chunks of whole rows)."""
    check_against_reference(variant, 1000, D, torch.float32, "chunked")


@needs_triton
def test_triton_query_count_beyond_block():
    """Q = 32 (BLIP-2) pads nothing and fills the row tile with two images' queries; Q = 33 pads to 64."""
    for q in (32, 33):
        VARIANTS[f"blip2-q{q}"] = dict(VARIANTS["blip2-q5"], queries=q)
        try:
            check_against_reference(f"blip2-q{q}", 5, 64, torch.float32, "triton", DEVICE)
        finally:
            del VARIANTS[f"blip2-q{q}"]


@needs_triton
@pytest.mark.parametrize("variant", ["clip", "siglip"])
def test_triton_strided_inputs(variant):
    """Transposed and column-sliced features are read through their strides, never copied wrongly."""
    inputs = make_inputs(variant, 45, 70, torch.float32, DEVICE)
    strided = dict(inputs)
    strided["a"] = inputs["a"].T.contiguous().T  # strides (1, N)
    wide = randn(inputs["b"].shape[0], 90, device=DEVICE)
    wide[:, 10:80] = inputs["b"]
    strided["b"] = wide[:, 10:80]
    assert not strided["a"].is_contiguous() and not strided["b"].is_contiguous()
    want_loss, want = run(variant, inputs, 45, backend="triton")
    got_loss, got = run(variant, strided, 45, backend="triton")
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


@needs_triton
def test_triton_deterministic():
    """No atomics: two backward passes give bit-identical gradients."""
    inputs = make_inputs("albef-queues-distill", 70, 64, torch.bfloat16, DEVICE)
    first, second = run("albef-queues-distill", inputs, 70, backend="triton"), run("albef-queues-distill", inputs, 70, backend="triton")
    assert_bitwise_equal(first[0], second[0], "loss")
    for k in first[1]:
        assert_bitwise_equal(first[1][k], second[1][k], f"d{k}")


@pytest.mark.parametrize("backend", ["chunked"] + (["triton", "gemm"] if torch.cuda.is_available() or interpreting() else []))
@pytest.mark.parametrize("op", ["contrastive", "siglip"])
def test_saturated_logits_stay_finite(op, backend):
    """Logits of ±several thousand (unnormalised features, scale 100): softmax / sigmoid saturate, the
    loss and gradients stay finite and match fp64 as closely as the naive fp32 computation does.

    The yardstick matters here: an fp32 logit of ~1e4 is only known to ~1e-3, and where two logits of a
    row (or a logit and the sigmoid's bias) nearly tie, the gradient moves by that much times s·|b| ~ 1e3,
    so one sample of PyTorch's fp32 error is no bound (it failed a few seeds in a hundred, for the chunked
    path and the kernels alike). Over 80 seeds the worst error relative to the largest gradient was
    1.4e-5 for the naive fp32 loss, 1.4e-5 (chunked) and 8.8e-5 (Triton) for ours: the floor is 5e-4 of
    the largest reference value, still far below what a wrong gradient (off by O(1)) would give."""
    a, b = randn(19, 40, device=DEVICE, scale=10.0), randn(23, 40, device=DEVICE, scale=10.0)
    t = torch.tensor(100.0, device=DEVICE)
    bias = torch.tensor(-10.0, device=DEVICE)

    def loss_and_grads(fn, dtype, **kw):
        leaves = [x.detach().to(dtype).clone().requires_grad_() for x in (a, b, t)]
        if op == "siglip":
            loss = fn(*leaves, bias.to(dtype), log_scale=False, **kw)
        else:
            loss = fn(*leaves, label_smoothing=0.1, log_scale=False, **kw)
        loss.backward()
        return [loss.detach()] + [x.grad for x in leaves]

    ours_fn, naive_fn = (siglip_loss, siglip_loss_reference) if op == "siglip" else (contrastive_loss,
                                                                                     contrastive_loss_reference)
    ours = loss_and_grads(ours_fn, torch.float32, backend=backend)
    naive32 = loss_and_grads(naive_fn, torch.float32)
    want = loss_and_grads(naive_fn, torch.float64)
    assert all(torch.isfinite(x).all() for x in ours)
    for name, got, torch32, ref in zip(("loss", "da", "db", "dscale"), ours, naive32, want):
        assert_close_by_rule(got, ref, torch32, factor=3.0, floor=5e-4 * ref.abs().max().item() + 1e-6,
                             what=f"{op} {backend} {name}")


@needs_triton
def test_fp16_tiny_upstream_gradient():
    """G = dloss/dlogits is ~ g/N: with g = 1e-4 it sits deep in fp16's subnormals unless the kernels
    scale it (by a power of two) before the fp16 cast of the dot operands. Compared with the chunked
    path, which computes G in fp32 and rounds only the outputs."""
    a = torch.nn.functional.normalize(randn(129, 32, device=DEVICE), dim=-1).half()
    b = torch.nn.functional.normalize(randn(129, 32, device=DEVICE), dim=-1).half()
    t = torch.tensor(2.5, device=DEVICE)
    grads = {}
    for backend in ("triton", "chunked", "fp64"):
        x, y = (a.double(), b.double()) if backend == "fp64" else (a.clone(), b.clone())
        x.requires_grad_(), y.requires_grad_()
        loss = (contrastive_loss_reference(x, y, t.double()) if backend == "fp64"
                else contrastive_loss(x, y, t, backend=backend))
        (loss * 1e-4).backward()
        grads[backend] = (x.grad, y.grad)
    for i, name in enumerate("ab"):
        exact = grads["fp64"][i]
        err = (grads["triton"][i].double() - exact).abs().max().item()
        err_fp32_g = (grads["chunked"][i].double() - exact).abs().max().item()
        assert err <= 3 * err_fp32_g + 1e-9, f"d{name}: {err:.3e} vs chunked {err_fp32_g:.3e}"


def test_backends_agree_without_grad_on_b(small_chunks):
    """MoCo: keys and queue carry no gradient; only a and logit_scale get one."""
    a = randn(9, 33).requires_grad_()
    b = randn(9 + 20, 33)
    t = torch.tensor(14.0, requires_grad=True)
    loss = contrastive_loss(a, b, t, symmetric=False, log_scale=False, normalize=True, backend="chunked")
    loss.backward()
    assert b.grad is None and a.grad is not None and t.grad is not None


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_label_smoothing_matches_cross_entropy(backend):
    """ε-smoothing equals torch's cross_entropy(label_smoothing=ε), the BLIP convention."""
    a, b = randn(20, 16, dtype=torch.float64).float(), randn(20, 16, dtype=torch.float64).float()
    t = torch.tensor(1.5)
    logits = t.exp() * a @ b.T
    labels = torch.arange(20)
    ce = torch.nn.functional.cross_entropy
    want = (ce(logits, labels, label_smoothing=0.1) + ce(logits.T, labels, label_smoothing=0.1)) / 2
    got = contrastive_loss(a, b, t, label_smoothing=0.1, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_open_clip_cliploss(backend):
    """open_clip's ClipLoss where installed (the naive reference above encodes the same math)."""
    open_clip_loss = pytest.importorskip("open_clip.loss", reason="open_clip is not installed; "
                                         "contrastive_loss_reference (its math) is the yardstick elsewhere")
    a = torch.nn.functional.normalize(randn(37, 64, device=DEVICE), dim=-1)
    b = torch.nn.functional.normalize(randn(37, 64, device=DEVICE), dim=-1)
    t = torch.tensor(2.5, device=DEVICE)
    want = open_clip_loss.ClipLoss()(a, b, t.exp())
    got = contrastive_loss(a, b, t, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class TestDispatch:
    def _spy(self, monkeypatch):
        chosen = []
        for name in ("triton", "gemm", "chunked"):
            forward, backward = launch._IMPLS[name]
            spy = lambda *a, _n=name, _f=forward, **k: (chosen.append(_n), _f(*a, **k))[1]  # noqa: E731
            monkeypatch.setitem(launch._IMPLS, name, (spy, backward))
        for name in ("contrastive_loss_reference", "siglip_loss_reference"):
            real = getattr(reference, name)
            monkeypatch.setattr(reference, name, lambda *a, _r=real, **k: (chosen.append("reference"), _r(*a, **k))[1])
        return chosen

    @pytest.mark.parametrize("op", ["contrastive", "siglip"])
    def test_auto_on_cpu_is_the_reference(self, monkeypatch, op):
        monkeypatch.delenv("MMFAST_BACKEND", raising=False)
        chosen = self._spy(monkeypatch)
        a, b = randn(4, 8), randn(4, 8)
        contrastive_loss(a, b, 1.0) if op == "contrastive" else siglip_loss(a, b, 1.0, -1.0)
        assert chosen == ["reference"]

    @pytest.mark.parametrize("backend", ALL_BACKENDS)
    def test_backend_runs_what_it_names(self, monkeypatch, backend):
        chosen = self._spy(monkeypatch)
        contrastive_loss(randn(4, 8, device=DEVICE), randn(4, 8, device=DEVICE), 1.0, backend=backend)
        assert chosen == [backend]

    @needs_triton
    def test_env_selects_triton(self, monkeypatch):
        monkeypatch.setenv("MMFAST_BACKEND", "triton")
        chosen = self._spy(monkeypatch)
        siglip_loss(randn(4, 8, device=DEVICE), randn(4, 8, device=DEVICE), 1.0, -1.0)
        assert chosen == ["triton"]

    @pytest.mark.parametrize("op", ["contrastive", "siglip"])
    def test_reference_backend_is_the_naive_spec(self, op):
        """backend="reference" returns what kernels.reference computes, bit for bit (options passed through)."""
        a, b, at, bt = randn(6, 8), randn(9, 8), randn(6, 8), randn(9, 8)
        if op == "siglip":
            got = siglip_loss(a, b, 1.5, -2.0, normalize=True, backend="reference")
            want = reference.siglip_loss_reference(a, b, torch.tensor(1.5), torch.tensor(-2.0), normalize=True)
        else:
            kw = dict(normalize=True, label_smoothing=0.1, alpha=0.4, num_pairs=5, log_scale=False, max_scale=12.0)
            got = contrastive_loss(a, b, 14.0, a_teacher=at, b_teacher=bt, backend="reference", **kw)
            want = reference.contrastive_loss_reference(a, b, torch.tensor(14.0), a_teacher=at, b_teacher=bt, **kw)
        assert_bitwise_equal(got, want, "loss")
