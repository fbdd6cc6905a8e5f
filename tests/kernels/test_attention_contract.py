"""flash_attention's contract with its callers: autocast like F.scaled_dot_product_attention, float64 on the
reference backend, the scalar policy, and argument checks of build_block_mask (the op's own checks:
test_attention_blockmask.py; the mask builders': test_attention_masks.py)."""
import re

import pytest
import torch
import torch.nn.functional as F
from attention_helpers import skip_unless_runs
from numerics import assert_close_by_rule, generator, randn

from mmfast.kernels import build_block_mask, flash_attention

BACKENDS = ("reference", "triton")


def _sdpa(q, k, v, **kw):
    """F.scaled_dot_product_attention on (B, L, H, D) tensors."""
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), **kw).transpose(1, 2)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_behaves_like_sdpa(device, backend):
    """Under autocast (bf16), fp32 q / k / v run in bf16 as F.scaled_dot_product_attention does: output
    dtype bf16, values within 2x of SDPA's error against float64 (of the bf16-rounded inputs), gradients
    back in fp32 within 3x of SDPA's."""
    skip_unless_runs(backend, device)
    b, l, h, d = 2, 33, 2, 40
    q, k, v, dout = (randn(b, l, h, d, device=device) for _ in range(4))
    ours, theirs = _leaves(q, k, v), _leaves(q, k, v)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = flash_attention(*ours, causal=True, backend=backend)
        ref = _sdpa(*theirs, is_causal=True)
    assert out.dtype == ref.dtype == torch.bfloat16
    out.backward(dout.to(out.dtype))
    ref.backward(dout.to(ref.dtype))
    exact = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in (q, k, v)]
    out64 = _sdpa(*exact, is_causal=True)
    out64.backward(dout.to(torch.bfloat16).double())
    assert_close_by_rule(out, out64, ref, what="out")
    for name, a, e, t in zip(("dq", "dk", "dv"), ours, exact, theirs):
        assert a.grad.dtype == torch.float32 == t.grad.dtype, name
        assert_close_by_rule(a.grad, e.grad, t.grad, factor=3.0, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_leaves_float64_alone(device, backend):
    """Autocast casts only fp32 / fp16 inputs (torch leaves float64 alone); the log-sum-exp stays fp32."""
    skip_unless_runs(backend, device)
    q, k, v = (randn(1, 9, 2, 16, device=device) for _ in range(3))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, lse = flash_attention(q, k, v, return_lse=True, backend=backend)
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
        if backend == "reference":
            out64 = flash_attention(q.double(), k.double(), v.double(), backend=backend)
            assert out64.dtype == torch.float64
        else:
            with pytest.raises(ValueError, match="q must be float16, bfloat16 or float32"):
                flash_attention(q.double(), k.double(), v.double(), backend=backend)


def _nonempty_intervals(batch, seqlen, device):
    """Causal-like (B, L) intervals [start, i + 1) with random starts: every row sees at least itself."""
    i = torch.arange(seqlen)
    start = (torch.rand(batch, seqlen, generator=generator()) * (i + 1)).long()
    return start.to(device, torch.int32), (i + 1).expand(batch, -1).to(device, torch.int32).contiguous()


@pytest.mark.parametrize("kind", ["plain", "gqa-intervals", "cross-padding"])
def test_reference_runs_float64(device, kind):
    """backend="reference" takes float64 and returns float64 (out and lse), matching
    F.scaled_dot_product_attention in float64 to 1e-12, gradients included."""
    b, lq, lk, hq, hkv, d = 2, 19, 19 if kind != "cross-padding" else 26, 4, 2 if kind == "gqa-intervals" else 4, 24
    q = randn(b, lq, hq, d, dtype=torch.float64, device=device)
    k, v = (randn(b, lk, hkv, d, dtype=torch.float64, device=device) for _ in range(2))
    dout = randn(b, lq, hq, d, dtype=torch.float64, device=device)
    kw, dense = {}, torch.ones(b, 1, lq, lk, dtype=torch.bool, device=device)
    if kind == "gqa-intervals":
        kw["kv_start"], kw["kv_end"] = _nonempty_intervals(b, lq, device)
        j = torch.arange(lk, device=device)
        dense = ((j >= kw["kv_start"][..., None]) & (j < kw["kv_end"][..., None]))[:, None]
    if kind == "cross-padding":
        kw["key_padding_mask"] = torch.zeros(b, lk, dtype=torch.bool, device=device)
        kw["key_padding_mask"][0, 20:] = True
        kw["key_padding_mask"][1, ::3] = True
        dense = ~kw["key_padding_mask"][:, None, None, :]
    ours, theirs = _leaves(q, k, v), _leaves(q, k, v)
    out, lse = flash_attention(*ours, return_lse=True, backend="reference", **kw)
    ref = _sdpa(*theirs, attn_mask=dense, enable_gqa=hq != hkv)
    assert out.dtype == lse.dtype == torch.float64
    out.backward(dout)
    ref.backward(dout)
    for name, a, e in [("out", out, ref)] + [(n, a.grad, t.grad) for n, a, t in zip(("dq", "dk", "dv"), ours, theirs)]:
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_softmax_scale(backend):
    """A one-element tensor scale gives the float scale's result; a non-finite one fails on its device
    (on the CPU at once: torch._assert_async)."""
    skip_unless_runs(backend, torch.device("cpu"))
    q, k, v = (randn(1, 7, 2, 16) for _ in range(3))
    want = flash_attention(q, k, v, softmax_scale=0.3, backend=backend)
    got = flash_attention(q, k, v, softmax_scale=torch.tensor(0.3), backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="softmax_scale must be finite"):
        flash_attention(q, k, v, softmax_scale=torch.tensor(float("nan")), backend=backend)


def test_backend_error_lists_every_choice():
    """The accelerated backends come from the family registry: the error names all of them and reference."""
    q = randn(1, 3, 1, 8)
    with pytest.raises(ValueError, match=re.escape("choose from ('auto', 'reference', 'triton')")):
        flash_attention(q, q, q, backend="cuda")


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


BLOCK_MASK_ERRORS = {
    "seqlen_q-negative": ((-1, 10), {}, "build_block_mask: seqlen_q must be in [0, inf], got -1"),
    "seqlen_k-float": ((10, 2.5), {}, "seqlen_k must be an int"),
    "seqlen-missing": ((None, 10), {}, "give seqlen_q and seqlen_k"),
    "causal-str": ((4, 4), {"causal": "yes"}, "causal must be True or False"),
    "tile-zero": ((4, 4), {"tile": (0, 32)}, "tile[0] must be in [1, inf]"),
    "tile-int": ((4, 4), {"tile": 32}, "tile must be a pair"),
    "device-unknown": ((4, 4), {"device": "gpu:x"}, "device must be a torch.device"),
    "validate-int": ((4, 4), {"validate": 1}, "validate must be True or False"),
    "kv_start-float": ((4, 4), {"kv_start": torch.zeros(4)}, "kv_start must be an int32 tensor"),
    "kv_end-out-of-range": ((2, 4), {"kv_end": _i32(5, 1)}, "kv_end must lie in [0, Lk]"),
    "max_seqlen-without-cu_seqlens": ((4, 4), {"max_seqlen_q": 4}, "go with cu_seqlens"),
    "seqlen-and-cu_seqlens": ((4, 4), {"cu_seqlens_q": _i32(0, 4), "cu_seqlens_k": _i32(0, 4), "max_seqlen_q": 4,
                                       "max_seqlen_k": 4}, "not both"),
    "max_seqlen-negative": ((), {"cu_seqlens_q": _i32(0, 4), "cu_seqlens_k": _i32(0, 4), "max_seqlen_q": -1,
                                 "max_seqlen_k": 4}, "max_seqlen_q must be in [0, inf]"),
}


@pytest.mark.parametrize("name", list(BLOCK_MASK_ERRORS))
def test_build_block_mask_validates_its_arguments(name):
    args, kwargs, match = BLOCK_MASK_ERRORS[name]
    with pytest.raises(ValueError, match=re.escape(match)):
        build_block_mask(*args, **kwargs)


def test_trainable_tensor_scale_on_triton_raises():
    """The Triton kernels take the scale as a constant (read with .item()): a softmax_scale that requires grad
    silently got no gradient there, while the reference differentiates it. It raises, naming it; without
    grad mode, or detached, it runs."""
    skip_unless_runs("triton", torch.device("cpu"))
    q, k, v = (randn(1, 7, 2, 16) for _ in range(3))
    scale = torch.tensor(0.3, requires_grad=True)
    with pytest.raises(ValueError, match="softmax_scale requires grad"):
        flash_attention(q, k, v, softmax_scale=scale, backend="triton")
    want = flash_attention(q, k, v, softmax_scale=0.3, backend="triton")
    with torch.no_grad():
        torch.testing.assert_close(flash_attention(q, k, v, softmax_scale=scale, backend="triton"), want)
    torch.testing.assert_close(flash_attention(q, k, v, softmax_scale=scale.detach(), backend="triton"), want)
    flash_attention(q, k, v, softmax_scale=scale, backend="reference").sum().backward()
    assert scale.grad is not None  # the reference differentiates it
