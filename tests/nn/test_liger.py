"""mmfast.nn.liger: Liger-Kernel's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy, where mmfast's
decoder calls them, against the PyTorch code beside each call (the specification) and an fp64 reference,
forward and backward. On the CPU Liger's Triton kernels run through Triton's interpreter (counted, so a
test cannot pass on the PyTorch path); the cuda parameter runs them compiled."""
import copy
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mmfast.nn import liger
from mmfast.nn.decoder import DecoderLM, RMSNorm, SwiGLU
from mmfast.nn.rope import RotaryEmbedding, apply_rotary
from numerics import assert_close_by_rule, dtype_id, generator, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.skipif(not liger.ENABLED or liger.functional() is None,
                                reason="needs liger-kernel (optional; pip install -e .[liger], Python >= 3.10), "
                                       "which does not import here (or MMFAST_LIGER=0)")


def _fill_interpreter_gaps(monkeypatch):
    """Two gaps of Triton's interpreter that Liger's kernels meet, filled for this test only: a Python float
    argument stays a float, where a compiled kernel gets an fp32 scalar (Liger calls ``.to(tl.float32)`` on
    eps and the gate multiplier), and libdevice's ``rsqrt`` returns None (Liger's RMSNorm: ``tl.rsqrt``, the
    same function, instead)."""
    import triton.language as tl
    from liger_kernel.ops import rms_norm
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_implicit_cvt") or not hasattr(rms_norm, "rsqrt"):
        pytest.skip("this Triton's interpreter or this Liger release is laid out otherwise than the gap filling "
                    "here expects (Triton 3.6-3.9, Liger 0.8); the cuda parameter runs the same case")

    # looked up at call time: the interpreter installs its own tl.rsqrt while a kernel runs
    monkeypatch.setattr(rms_norm, "rsqrt", lambda x: tl.rsqrt(x))

    untyped = interpreter._implicit_cvt

    def typed(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return untyped(arg)
    monkeypatch.setattr(interpreter, "_implicit_cvt", typed)


@pytest.fixture
def liger_calls(request, device, monkeypatch):
    """Liger's kernels on `device`'s tensors; returns the number of calls of each of its ops."""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Liger on CPU tensors needs Triton's interpreter, which a CUDA machine's test process does "
                        "not use; the cuda parameter runs the same case")
        if getattr(request.node, "callspec", None) and request.node.callspec.params.get("dtype") == torch.bfloat16:
            pytest.skip("Triton's interpreter does bf16 arithmetic on the raw bits (Liger's kernels have no "
                        "workaround, as mmfast's do); fp16 runs the same 16-bit paths here, bf16 on the cuda parameter")
        _fill_interpreter_gaps(monkeypatch)
    monkeypatch.setattr(liger, "DEVICES", (device.type,))
    calls = {}
    ops = liger.functional()
    for name in ("liger_rms_norm", "liger_rope", "liger_swiglu", "liger_fused_linear_cross_entropy"):
        def counted(*args, _op=getattr(ops, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(ops, name, counted)
    return calls


def _three_ways(fn, inputs, dtype, device, liger_off):
    """fn(*inputs) in fp64 on the PyTorch path (the reference), in `dtype` on the PyTorch path (the yardstick)
    and in `dtype` through Liger: (outputs, gradients) of each, with one random upstream gradient."""
    runs = {}
    for name, run_dtype, use_liger in (("ref", torch.float64, False), ("torch", dtype, False), ("liger", dtype, True)):
        xs = [x.detach().to(device=device, dtype=run_dtype).requires_grad_() for x in inputs]
        with liger_off(not use_liger):
            out = fn(*xs)
        runs[name] = out, xs
    douts = [randn(*o.shape, device=device) for o in _as_tuple(runs["ref"][0])]
    result = {}
    for name, (out, xs) in runs.items():
        outs = _as_tuple(out)
        result[name] = outs, torch.autograd.grad(outs, xs, [d.to(o.dtype) for d, o in zip(douts, outs)])
    return result


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


@pytest.fixture
def liger_off(monkeypatch):
    """A context manager: within it (when its flag is true) Liger serves no device, the PyTorch path runs."""
    from contextlib import contextmanager

    @contextmanager
    def off(flag):
        if not flag:
            yield
            return
        with monkeypatch.context() as m:
            m.setattr(liger, "DEVICES", ())
            yield
    return off


def _assert_runs_match(result, what):
    ref, yard, got = result["ref"], result["torch"], result["liger"]
    for i, (r, y, g) in enumerate(zip(ref[0], yard[0], got[0])):
        assert g.dtype == y.dtype and g.shape == y.shape, f"{what} output {i}: {g.dtype}{tuple(g.shape)}"
        assert_close_by_rule(g, r, y, what=f"{what} output {i}")
    for i, (r, y, g) in enumerate(zip(ref[1], yard[1], got[1])):
        assert_close_by_rule(g, r, y, factor=3.0, what=f"{what} grad {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm(device, dtype, liger_calls, liger_off):
    norm = RMSNorm(48, eps=1e-5)
    weight = randn(48).abs() + 0.5

    def run(x, w):
        return torch.func.functional_call(norm, {"weight": w}, (x,))
    _assert_runs_match(_three_ways(run, [randn(3, 7, 48, scale=2.0), weight], dtype, device, liger_off), "rms_norm")
    assert liger_calls == {"liger_rms_norm": 1}


def test_rms_norm_gradient_shared_with_a_residual(device, liger_calls):
    """x + norm(x): autograd hands the same upstream gradient to both terms. Liger's default in-place backward
    writes dX over it, and x's gradient comes out wrong; mmfast runs it out of place."""
    norm = RMSNorm(32).to(device)
    x = randn(5, 32, device=device).requires_grad_()
    (x + norm(x)).backward(torch.ones(5, 32, device=device))
    x64 = x.detach().double().requires_grad_()
    h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps)
    (x64 + h).backward(torch.ones(5, 32, dtype=torch.float64, device=device))
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    assert liger_calls == {"liger_rms_norm": 1}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["fused_qkv", "contiguous"])
def test_rope(device, dtype, layout, liger_calls, liger_off):
    B, L, H, HKV, D = 2, 9, 4, 2, 16
    positions = torch.stack([torch.arange(L), torch.arange(L) + 3]).to(device)
    cos, sin = RotaryEmbedding(D, theta=1e4).to(device)(positions)

    def run(q, k):
        if layout == "fused_qkv":  # strided views of one projection, as MultiheadAttention's
            qk = torch.cat([q.reshape(B, L, H * D), k.reshape(B, L, HKV * D)], dim=-1)
            q, k = qk[..., :H * D].view(B, L, H, D), qk[..., H * D:].view(B, L, HKV, D)
        before = q.detach().clone(), k.detach().clone()
        rotated = apply_rotary(q, k, cos, sin)
        assert torch.equal(q, before[0]) and torch.equal(k, before[1]), "apply_rotary wrote into its inputs"
        return rotated
    inputs = [randn(B, L, H, D), randn(B, L, HKV, D)]
    _assert_runs_match(_three_ways(run, inputs, dtype, device, liger_off), f"rope {layout}")
    assert liger_calls == {"liger_rope": 1}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_swiglu(device, dtype, liger_calls, liger_off):
    mlp = SwiGLU(24, 40)

    def run(x, gate_up, down):
        return torch.func.functional_call(mlp, {"gate_up.weight": gate_up, "down.weight": down}, (x,))
    inputs = [randn(2, 7, 24), randn(80, 24, scale=0.3), randn(24, 40, scale=0.3)]
    _assert_runs_match(_three_ways(run, inputs, dtype, device, liger_off), "swiglu")
    assert liger_calls == {"liger_swiglu": 1}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("frozen_head", [False, True], ids=["head_trains", "head_frozen"])
def test_decoder_training_loss(device, dtype, frozen_head, liger_calls, liger_off):
    """A tiny Llama-style DecoderLM in training: loss and every gradient through Liger's four ops (the loss by
    its fused linear cross-entropy, no logits) as on the PyTorch path; a left-padded batch, ignored labels."""
    model = DecoderLM(vocab_size=53, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=48,
                      backend="reference").to(device).train()
    model.lm_head.weight.requires_grad_(not frozen_head)
    ids = torch.randint(3, 53, (2, 11), generator=generator(), device="cpu").to(device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    runs = {}
    for name, run_dtype, use_liger in (("ref", torch.float64, False), ("torch", dtype, False), ("liger", dtype, True)):
        m = copy.deepcopy(model).to(run_dtype)
        with liger_off(not use_liger):
            out = m(ids, attention_mask=mask, labels=labels)
            out.loss.backward()
        assert (out.logits is None) == use_liger, "the fused loss materialises no logits"
        runs[name] = out.loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert_close_by_rule(runs["liger"][0], runs["ref"][0], runs["torch"][0], what="loss")
    assert runs["liger"][1].keys() == runs["torch"][1].keys()
    for name in runs["ref"][1]:
        assert_close_by_rule(runs["liger"][1][name], runs["ref"][1][name], runs["torch"][1][name], factor=3.0,
                             what=f"grad {name}")
    assert liger_calls == {"liger_rms_norm": 3, "liger_rope": 1, "liger_swiglu": 1,
                           "liger_fused_linear_cross_entropy": 1}


def test_off_switch_and_other_devices():
    """MMFAST_LIGER=0 at import turns Liger off; by default it serves CUDA tensors only."""
    import subprocess
    import sys

    probe = ("import torch; from mmfast.nn import liger; x = torch.zeros(2); liger.DEVICES = ('cpu',); "
             "print(liger.runs_on(x), liger.runs_on(x, 'rms_norm'))")
    for flag, expected in (("1", "True True"), ("0", "False False")):
        env = {**os.environ, "MMFAST_LIGER": flag}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected.split(), (flag, out.stdout, out.stderr)
    assert liger.DEVICES == ("cuda",) and not liger.runs_on(torch.zeros(2))
