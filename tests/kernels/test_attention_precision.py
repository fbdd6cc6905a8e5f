"""flash_attention's fp32 matmul precision follows torch.get_float32_matmul_precision(), and its error stays
within the suite's rule at large scores (softmax_scale · |q·k| in the hundreds and thousands)."""
import pytest
import torch
from attention_helpers import check_against_reference, qkv, skip_unless_runs
from numerics import SEED, assert_close_by_rule, dtype_id, max_abs_error, randn

from mmfast.kernels import flash_attention
from mmfast.kernels.reference import attention_reference


def _tf32(x):
    """Round fp32 to TF32 (10 mantissa bits, to nearest with ties away, as cvt.rna.tf32.f32), as float64."""
    bits = x.detach().float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32).double()


class _TF32Matmul(torch.autograd.Function):
    """a @ b with both operands rounded to TF32, exact otherwise (float64); the backward's matmuls likewise."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _tf32(a) @ _tf32(b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return _tf32(g) @ _tf32(b).mT, _tf32(a).mT @ _tf32(g)


def _tf32_attention(q, k, v, scale):
    """Causal attention (Lq == Lk) on (B, L, H, D) fp32 leaves, every matmul through TF32: what TF32 PyTorch
    would compute, without fp32 accumulation error."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    s = _TF32Matmul.apply(qh, kh.mT) * scale
    causal = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    return _TF32Matmul.apply(p, vh).transpose(1, 2)


def _errors(fn, q, k, v, dout, exact):
    """Max errors of out, dq, dk, dv of fn against the exact ones."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [max_abs_error(a, e) for a, e in zip([out] + [t.grad for t in leaves], exact)]


def test_fp32_highest_is_ieee(device, matmul_precision):
    """"highest" (torch's default): IEEE fp32 dots, within 2x (3x for gradients) of PyTorch's fp32 error."""
    skip_unless_runs("triton", device)
    matmul_precision("highest")
    q, k, v = qkv(2, 45, 45, 2, 1, 64, torch.float32, device)
    check_against_reference(q, k, v, causal=True)


def test_fp32_high_is_tf32(device, matmul_precision):
    """"high": TF32 dots in the forward and the backward (the interpreter emulates them through _common.dot):
    errors of the size TF32 PyTorch would make, far above the IEEE ones, so the setting reaches the kernels."""
    skip_unless_runs("triton", device)
    b, l, h, d = 2, 45, 2, 64
    q, k, v = qkv(b, l, l, h, h, d, torch.float32, device)
    dout = randn(b, l, h, d, device=device)
    scale = d ** -0.5
    exact_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact_out = attention_reference(*exact_leaves, causal=True)
    exact_out.backward(dout.double())
    exact = [exact_out] + [t.grad for t in exact_leaves]
    ours = lambda *t: flash_attention(*t, causal=True, backend="triton")  # noqa: E731
    matmul_precision("highest")
    ieee = _errors(ours, q, k, v, dout, exact)
    matmul_precision("high")
    tf32 = _errors(ours, q, k, v, dout, exact)
    yardstick = _errors(lambda *t: _tf32_attention(*t, scale), q, k, v, dout, exact)
    for name, e_ieee, e_tf32, e_yard, factor in zip(("out", "dq", "dk", "dv"), ieee, tf32, yardstick, (2, 3, 3, 3)):
        assert e_tf32 > 8 * e_ieee, f"{name}: 'high' error {e_tf32:.2e} is not TF32-sized (IEEE {e_ieee:.2e}); seed {SEED}"
        assert e_tf32 <= factor * e_yard + 1e-6, (
            f"{name}: 'high' error {e_tf32:.2e} > {factor} x TF32 PyTorch's {e_yard:.2e}; seed {SEED}")


def _delta_form_grads(q, k, v, dout, scale):
    """dq, dk of plain attention (B, L, H, D) written as flash backwards write it, in PyTorch in q's dtype:
    dS = P · (dP - Delta) with Delta = rowsum(O · dO) taken from the output, not from P and dP."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, v)
    delta = (out * dout).sum(-1).transpose(1, 2)  # (B, H, Lq)
    ds = p * (dp - delta[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", ds, k) * scale, torch.einsum("bhqk,bqhd->bkhd", ds, q) * scale


LARGE = [pytest.param(dtype, magnitude, draw, id=f"{dtype_id(dtype)}-x{magnitude}-draw{draw}")
         for dtype in (torch.float32, torch.bfloat16) for magnitude in (10, 20, 40) for draw in range(3)]


@pytest.mark.parametrize("dtype, magnitude, draw", LARGE)
def test_large_scores_within_the_rule(device, matmul_precision, dtype, magnitude, draw):
    """q, k ~ magnitude · N(0, 1), D = 64: softmax_scale · |q·k| reaches ~400 (x10), ~1500 (x20) and ~6000 (x40). out and
    lse within 2x of PyTorch's error in the same dtype; dq / dk / dv within 3x.

    What this guards: a backward that recomputes P from one fp32 log-sum-exp (rounded at the scores'
    magnitude) made dV 7x - 30x PyTorch's error at x20 - x40, and a forward that scaled the scores by
    scale · log2(e) (not a power of two, unlike 1/√64) made out 2.8x at x20.
    dq and dk are held to the larger error of two PyTorch computations in the same dtype: eager autograd,
    and the same math written with Delta = rowsum(O · dO) as every flash backward writes it (PyTorch's
    fused attention too). In a row whose softmax is exactly one-hot (every other probability underflows to
    0, common at x40), autograd is exact by luck, dS = 1 · (dP - dP) = 0, where the Delta form subtracts two
    differently rounded dot products: an fp32 rounding of dP on a gradient that is itself ~0."""
    skip_unless_runs("triton", device)
    matmul_precision("highest")
    b, lq, lk, h, d = 1, 45, 53, 2, 64
    q, k, v = qkv(b, lq, lk, h, h, d, dtype, device)
    q, k = ((magnitude * t.float()).to(dtype) for t in (q, k))
    dout = randn(b, lq, h, d, dtype=dtype, device=device)
    results = {}
    for name, fn, dt in (("ours", lambda *t: flash_attention(*t, return_lse=True, backend="triton"), dtype),
                         ("eager", lambda *t: attention_reference(*t, return_lse=True), dtype),
                         ("exact", lambda *t: attention_reference(*t, return_lse=True), torch.float64)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        out.backward(dout.to(dt))
        results[name] = [out, lse] + [t.grad for t in leaves]
    ours, eager, exact = (results[n] for n in ("ours", "eager", "exact"))
    delta_form = _delta_form_grads(q, k, v, dout, d ** -0.5)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    assert_close_by_rule(ours[0], exact[0], eager[0], what="out")
    assert_close_by_rule(ours[1], exact[1], eager[1].float(), floor=1e-5, what="lse")
    for i, name in enumerate(("dq", "dk"), start=2):
        yardstick = max((eager[i], delta_form[i - 2]), key=lambda t: max_abs_error(t, exact[i]))
        assert_close_by_rule(ours[i], exact[i], yardstick, factor=3.0, what=name)
    assert_close_by_rule(ours[4], exact[4], eager[4], factor=3.0, what="dv")


@pytest.mark.parametrize("setting, precision", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_launchers_choose_tiles_for_the_precision(device, matmul_precision, monkeypatch, setting, precision):
    """The fp32 launchers read the setting at launch time and pick the tiles compiled for that precision (IEEE
    FMA loops take more registers than TF32 MMAs: their own table entries)."""
    from mmfast.kernels.attention import _configs as C

    skip_unless_runs("triton", device)
    seen = []
    real = C.launch_config

    def spy(pass_, kernel, args, head_dim, dtype, chosen, interpreter):
        seen.append((pass_, chosen))
        return real(pass_, kernel, args, head_dim, dtype, chosen, interpreter)

    monkeypatch.setattr(C, "launch_config", spy)
    matmul_precision(setting)
    q, k, v = (t.requires_grad_() for t in qkv(1, 9, 11, 2, 1, 64, torch.float32, device))
    flash_attention(q, k, v, causal=True, backend="triton").sum().backward()
    assert seen == [(pass_, precision) for pass_ in ("fwd", "pre", "dkdv", "dq")]
    assert C.get_config("fwd", 64, torch.float32, "ieee") == C._GPU_IEEE_TABLE[("fwd", 64, "ieee")]
    assert C.get_config("fwd", 64, torch.float32, "tf32") == C._GPU_TABLE[("fwd", 64, "tf32")]
    assert C.get_config("fwd", 64, torch.bfloat16, "ieee") == C._GPU_TABLE[("fwd", 64, "16-bit")]
