"""flash_attention (Triton; the interpreter on CPU): forward and backward vs the fp64 reference.

Odd lengths, head dims 40 / 64 / 80 / 128 / 256, self and cross attention, causal with Lq != Lk, GQA,
random intervals, key padding, fully masked rows, strided views, determinism, return_lse and its
gradient. Varlen, block masks and validation live in test_attention_varlen.py / _blockmask.py.
"""
from dataclasses import replace

import pytest
import torch
from attention_helpers import check_against_reference, qkv, random_intervals, random_padding
from numerics import FLOAT_DTYPES, assert_bitwise_equal, dtype_id, poison_, randn

from mmfast.kernels import _tuned, flash_attention
from mmfast.kernels.attention import _configs as C
from mmfast.kernels.attention import _launch
from mmfast.kernels.reference import attention_reference

# (batch, Lq, Lk, Hq, Hkv, D, mask): one row per case, chosen to cover sizes, head dims and masks
CASES = [
    (1, 77, 77, 2, 2, 64, "none"),
    (2, 77, 77, 2, 1, 64, "causal"),
    (1, 17, 197, 2, 2, 40, "intervals"),
    (2, 197, 17, 4, 2, 80, "intervals+causal"),
    (2, 1, 257, 2, 2, 128, "padding"),
    (1, 257, 1, 2, 1, 64, "causal"),  # Lq > Lk, bottom-right: most rows see nothing
    (1, 33, 77, 3, 1, 80, "causal"),  # Lq < Lk causal, MQA
    (2, 45, 61, 2, 2, 72, "intervals+padding"),
    (1, 17, 17, 1, 1, 256, "intervals"),
    (2, 23, 19, 2, 2, 8, "causal"),  # head dim below the 16-wide tl.dot minimum: padded
]


def _mask(kind, batch, seqlen_q, seqlen_k, device):
    mask = {}
    if "causal" in kind:
        mask["causal"] = True
    if "intervals" in kind:
        mask["kv_start"], mask["kv_end"] = random_intervals(batch, seqlen_q, seqlen_k, device)
    if "padding" in kind:
        mask["key_padding_mask"] = random_padding(batch, seqlen_k, device)
    return mask


def _case_id(case):
    b, lq, lk, hq, hkv, d, kind = case
    return f"B{b}-{lq}x{lk}-H{hq}kv{hkv}-D{d}-{kind}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_backward_match_reference(device, dtype, case):
    b, lq, lk, hq, hkv, d, kind = case
    q, k, v = qkv(b, lq, lk, hq, hkv, d, dtype, device)
    check_against_reference(q, k, v, **_mask(kind, b, lq, lk, device))


class _LaunchSpy:
    """Stands in for a kernel in its launcher's module: records each launch's keyword arguments (constexprs)."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.args = kernel, [], []

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            self.args.append(args)
            return self.kernel[grid](*args, **kwargs)
        return launch


_SPLIT_KERNELS = ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")


def _check_split(device, dtype, head_dim, monkeypatch):
    spies = {name: _LaunchSpy(getattr(_launch, name)) for name in _SPLIT_KERNELS}
    for name, spy in spies.items():
        monkeypatch.setattr(_launch, name, spy)
    monkeypatch.setattr(_launch, "_empty", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype,
                                                                                           device=device)))
    q, k, v = qkv(2, 45, 37, 2, 1, head_dim, dtype, device)
    check_against_reference(q, k, v, causal=True, key_padding_mask=random_padding(2, 37, device))
    split = (64, 16 if head_dim <= 80 else 32)
    for name, spy in spies.items():
        want = split
        if device.type == "cuda" and name != "_attention_fwd_kernel":  # the backward pads on mma.sync
            want = C.launch_block_d(spy.kernel, spy.args[0], head_dim, dtype, spy.launches[0]["PRECISION"], False)
        assert [(kw["BLOCK_D"], kw["BLOCK_D2"]) for kw in spy.launches] == [want], name
    return spies


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("head_dim", (72, 80, 88, 96), ids=lambda d: f"D{d}")
def test_split_head_dims(device, dtype, head_dim, monkeypatch):
    """Head dims in (64, 96]: the forward, dK/dV and dQ kernels run on a 64-column chunk plus a 16- or 32-column
    one (72 and 88 mask 8 of its columns) instead of padding to 128, and match the reference with causal rows
    that see nothing (Lq > Lk) and key padding; NaN-poisoned outputs (out, dq, dk, dv) catch any element the
    two stores miss (on a GPU the backward splits where bwd_block_d says; the interpreter always splits, and
    runs dK/dV as two programs per KV tile, SPLIT, one accumulator each)."""
    spies = _check_split(device, dtype, head_dim, monkeypatch)
    if device.type == "cpu":
        assert [kw["SPLIT"] for kw in spies["_attention_bwd_dkdv_kernel"].launches] == [True]


@pytest.mark.parametrize("head_dim", (80, 88), ids=lambda d: f"D{d}")
def test_split_head_dims_one_dkdv_program(device, head_dim, monkeypatch):
    """The split head dim through the dK/dV kernel's other order (GPU tables: one program per KV tile
    accumulating dK and dV together)."""
    cfg = replace(C.launch_config("dkdv", None, (), head_dim, torch.bfloat16, "ieee", interpreter=True), split=False)
    with _tuned.forcing("attention", {"dkdv": cfg}):
        spies = _check_split(device, torch.bfloat16, head_dim, monkeypatch)
    assert [kw["SPLIT"] for kw in spies["_attention_bwd_dkdv_kernel"].launches] == [False]


@pytest.mark.parametrize("head_dim, split", [(8, (16, 0)), (64, (64, 0)), (65, (64, 16)), (81, (64, 32)),
                                             (97, (128, 0)), (128, (128, 0)), (256, (256, 0))])
def test_block_d_split(head_dim, split):
    """Only (64, 96] splits: above it 64 + 64 would cost what 128 does."""
    assert C.block_d_split(head_dim) == split
    assert C.table_bucket("fwd", head_dim) == max(64, sum(split))
    for pass_ in ("dkdv", "dq"):
        assert C.table_bucket(pass_, head_dim) == max(64, sum(split))
    assert C.table_bucket("pre", head_dim) == max(64, C.block_d(head_dim))  # the Delta pass pads


def test_long_sequence_577(device):
    """The ViT-L/14@336 length once (many blocks; full, partial and hidden tiles all occur)."""
    q, k, v = qkv(1, 577, 577, 1, 1, 64, torch.bfloat16, device)
    start, end = random_intervals(1, 577, 577, device, empty_rows=0.0)
    check_against_reference(q, k, v, kv_start=start[0], kv_end=end[0], causal=True, grads=False)


def test_unbatched_intervals_and_scale(device):
    """(Lq,) intervals broadcast over the batch; an explicit softmax_scale."""
    q, k, v = qkv(2, 40, 50, 2, 2, 64, torch.float32, device)
    start, end = random_intervals(1, 40, 50, device)
    check_against_reference(q, k, v, kv_start=start[0], kv_end=end[0], softmax_scale=0.3)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_fully_masked_rows_are_exact_zeros(device, dtype):
    """Rows that see no key: output exactly 0, LSE -inf, dq 0, no contribution to dk / dv, no NaN."""
    b, lq, lk = 2, 37, 45
    q, k, v = qkv(b, lq, lk, 2, 1, 64, dtype, device)
    start, end = random_intervals(b, lq, lk, device, empty_rows=0.5)
    end[:, :5] = start[:, :5]  # at least a tile's worth of hidden rows
    end[1] = start[1]  # and one whole sample
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attention(*leaves, kv_start=start, kv_end=end, return_lse=True, backend="triton")
    hidden = (end <= start)  # (B, Lq)
    assert torch.all(out[hidden] == 0) and torch.isfinite(out).all()
    assert torch.all(lse.transpose(1, 2)[hidden] == float("-inf"))
    out.sum().backward()
    dq, dk, dv = (t.grad for t in leaves)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.all(dq[hidden] == 0)
    assert torch.all(dk[1] == 0) and torch.all(dv[1] == 0), "a sample whose rows see nothing has zero dk / dv"
    check_against_reference(q, k, v, kv_start=start, kv_end=end)


def test_strided_views_of_fused_qkv(device):
    """q / k / v as slices of a fused (B, L, 3, H, D) projection, and (B, H, L, D) permutes: no copy needed."""
    b, l, h, d = 2, 45, 2, 40
    fused = randn(b, l, 3, h, d, dtype=torch.float16, device=device)
    q, k, v = fused.unbind(2)
    assert not q.is_contiguous() and q.stride(-1) == 1
    out = check_against_reference(q, k, v, causal=True)[0]
    bhld = randn(b, h, l, d, dtype=torch.float16, device=device)
    kv = randn(2, b, h, 61, d, dtype=torch.float16, device=device)
    q2, k2, v2 = bhld.transpose(1, 2), kv[0].transpose(1, 2), kv[1].transpose(1, 2)
    check_against_reference(q2, k2, v2)
    assert out.is_contiguous()


def _odd_layout(x, kind):
    """x (B, L, H, D) re-laid so Triton's JIT cannot prove 16-byte alignment: one element off, a head stride of
    D + 8, or an odd row stride (e.g. a slice of a larger fused buffer)."""
    b, l, h, d = x.shape
    if kind == "offset-by-one":
        y = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape)
    elif kind == "head-stride-D+8":
        y = torch.empty(b, l, h, d + 8, dtype=x.dtype, device=x.device)[..., :d]
    else:  # "odd-row-stride"
        row = h * d + 1
        y = torch.empty(b * l * row, dtype=x.dtype, device=x.device).as_strided(x.shape, (l * row, row, d, 1))
    return y.copy_(x)


def _record_configs(monkeypatch):
    """Spy on the launchers' tile choice: (pass, aligned?, the GPU table entry chosen) per launch. The unaligned
    entries' tiles (32 x 32) divide the interpreter's mask tile, so on the CPU they run as chosen: the odd-stride
    tests below execute the GPU's unaligned tiles; every other launch keeps the interpreter's tiles."""
    seen = []
    real = C.launch_config

    def spy(pass_, kernel, args, head_dim, dtype, precision, interpreter):
        aligned = C.is_aligned(kernel, head_dim, args)
        gpu = C.get_config(pass_, head_dim, dtype, precision, aligned)
        seen.append((pass_, aligned, gpu))
        unaligned_entry = any(gpu is entry for entry in C._GPU_UNALIGNED_TABLE.values())
        return gpu if unaligned_entry else real(pass_, kernel, args, head_dim, dtype, precision, interpreter)

    monkeypatch.setattr(C, "launch_config", spy)
    return seen


@pytest.mark.parametrize("kind, head_dim", [("offset-by-one", 128), ("head-stride-D+8", 128), ("odd-row-stride", 128),
                                            ("head-stride-D+8", 256)])
def test_odd_strides_use_the_unaligned_tiles(device, kind, head_dim, monkeypatch):
    """Inputs without 16-byte alignment (what the JIT specialises on) get the smaller unaligned GPU entries for
    the passes that read them (fwd, dK/dV; dQ has none and keeps its entry; the Delta pass reads only fresh
    tensors), and are still correct with those tiles."""
    seen = _record_configs(monkeypatch)
    q, k, v = qkv(2, 19, 37, 2, 1, head_dim, torch.bfloat16, device)
    start, end = random_intervals(2, 19, 37, device)
    check_against_reference(q, k, v, causal=True, kv_start=start, kv_end=end, relayout=lambda t: _odd_layout(t, kind))
    chosen = {pass_: (aligned, cfg) for pass_, aligned, cfg in seen}
    assert set(chosen) == {"fwd", "pre", "dkdv", "dq"}
    assert chosen["fwd"] == (False, C._GPU_UNALIGNED_TABLE[("fwd", head_dim, "16-bit")])
    assert chosen["dkdv"] == (False, C._GPU_UNALIGNED_TABLE[("dkdv", head_dim, "16-bit")])
    assert chosen["dq"] == (False, C._GPU_TABLE[("dq", head_dim, "16-bit")])
    assert chosen["pre"] == (True, C._GPU_TABLE[("pre", head_dim, "16-bit")])


@pytest.mark.parametrize("head_dim, heads", [(128, 2), (80, 1), (40, 2)])
def test_aligned_inputs_keep_the_aligned_tiles(device, head_dim, heads, monkeypatch):
    """Contiguous inputs, and fused-QKV slices whose offsets and strides are multiples of 16 elements, keep the
    aligned entries; at D = 40 the head stride (40) is odd for every input and the aligned specs do not assume
    it divisible (compile_specs), so it does not count."""
    seen = _record_configs(monkeypatch)
    fused = randn(1, 7, 3, heads, head_dim, dtype=torch.bfloat16, device=device)
    q, k, v = (t.requires_grad_() for t in fused.unbind(2))
    flash_attention(q, k, v, causal=True, backend="triton").sum().backward()
    assert [pass_ for pass_, _, _ in seen] == ["fwd", "pre", "dkdv", "dq"]
    for pass_, aligned, cfg in seen:
        assert aligned and cfg == C.get_config(pass_, head_dim, torch.bfloat16, "ieee"), pass_


def test_backward_is_deterministic(device):
    """No atomics: two backward passes (GQA, masks) are bitwise equal."""
    b, lq, lk = 2, 77, 61
    q, k, v = qkv(b, lq, lk, 4, 2, 64, torch.bfloat16, device)
    start, end = random_intervals(b, lq, lk, device)
    dout = randn(b, lq, 4, 64, dtype=torch.bfloat16, device=device)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        flash_attention(*leaves, kv_start=start, kv_end=end, causal=True, backend="triton").backward(dout)
        grads.append([t.grad for t in leaves])
    for name, a, e in zip(("dq", "dk", "dv"), *grads):
        assert_bitwise_equal(a, e, what=name)


def test_lse_is_differentiable(device):
    """return_lse for callers that merge partial attentions: its gradient flows (dS += P * dLSE)."""
    q, k, v = qkv(2, 33, 47, 2, 2, 64, torch.float32, device)
    start, end = random_intervals(2, 33, 47, device)
    check_against_reference(q, k, v, kv_start=start, kv_end=end, dlse=True)


def test_reference_backend(device):
    """backend="reference" (the CPU default) follows the same spec, in fp32 for low-precision inputs."""
    q, k, v = qkv(2, 17, 23, 2, 1, 40, torch.bfloat16, device)
    start, end = random_intervals(2, 17, 23, device)
    out, lse = flash_attention(q, k, v, kv_start=start, kv_end=end, causal=True, return_lse=True, backend="reference")
    out64, lse64 = attention_reference(q.double(), k.double(), v.double(), kv_start=start, kv_end=end, causal=True,
                                       return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.shape == (2, 2, 17)
    assert out.is_contiguous(), "out is contiguous on every backend (callers .view it to (B, L, H * D))"
    out32 = flash_attention(q.float(), k.float(), v.float(), backend="reference")
    assert out32.is_contiguous(), "fp32: the reference's own (B, H, L, D)-ordered result is made contiguous too"
    assert (out.double() - out64).abs().max() < 2e-2
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64))


@pytest.mark.parametrize("lengths", [(0, 5), (5, 0), (0, 0)], ids=lambda t: f"Lq{t[0]}-Lk{t[1]}")
def test_empty_sequences(device, lengths):
    """No queries: empty outputs; no keys: every row is hidden (zeros, LSE -inf, zero gradients)."""
    lq, lk = lengths
    q, k, v = qkv(2, lq, lk, 2, 1, 16, torch.float32, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attention(*leaves, causal=True, return_lse=True, backend="triton")
    assert out.shape == q.shape and lse.shape == (2, 2, lq)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert all(torch.all(t.grad == 0) for t in leaves)


def test_double_backward_raises_clearly(device):
    """Gradients of gradients (gradient penalties) are not implemented: the second backward names the op."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 5, 7, 2, 1, 16, torch.float32, device))
    (dq,) = torch.autograd.grad(flash_attention(q, k, v, backend="triton").sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="flash_attention: double backward"):
        dq.sum().backward()


def test_training_after_an_inference_mode_pass(device, monkeypatch):
    """An evaluation under torch.inference_mode must not leave inference tensors in the cache of default
    block masks: the training step that follows saves the mask for backward."""
    import mmfast.kernels.attention._launch as launch

    monkeypatch.setattr(launch, "_DEFAULT_MASKS", {})
    q, k, v = qkv(2, 11, 13, 2, 2, 16, torch.float32, device)
    with torch.inference_mode():
        flash_attention(q, k, v, causal=True, backend="triton")
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("scale", [0.0, -0.7], ids=["scale0", "negative-scale"])
def test_zero_and_negative_softmax_scale(device, scale):
    """scale 0: uniform weights over the visible keys; a negative scale flips which key dominates (the
    running max must be taken of the scaled scores)."""
    q, k, v = qkv(1, 19, 23, 2, 1, 40, torch.float32, device)
    check_against_reference(q, k, v, causal=True, softmax_scale=scale, dlse=True)


def test_gradient_of_the_lse_alone(device):
    """A loss on the log-sum-exp only (the output unused): the backward gets no output gradient and must
    still give dq / dk = the softmax-weighted gradients, and no dv (v does not reach the log-sum-exp): None on
    every backend, as autograd gives the reference (the Triton backend gave a zero tensor)."""
    q, k, v = qkv(1, 13, 17, 2, 1, 32, torch.float32, device)
    start, end = random_intervals(1, 13, 17, device, empty_rows=0.0)
    grads = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        _, lse = flash_attention(*leaves, kv_start=start, kv_end=end, return_lse=True, backend=backend)
        torch.where(torch.isinf(lse), 0.0, lse).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(("dq", "dk"), *grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=name)
    assert grads[0][2] is None and grads[1][2] is None
