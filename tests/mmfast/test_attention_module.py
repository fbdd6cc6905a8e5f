"""mmfast.nn.MultiheadAttention against torch.nn.MultiheadAttention (weights copied) and a hand-written
fp64 reference (qk-norm, GQA), forward and backward, through the reference backend and the Triton
kernel (the interpreter on the CPU)."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from numerics import assert_close_by_rule, dtype_id, randn
from mmfast.kernels.attention import masks
from mmfast.nn import MultiheadAttention

BACKENDS = ("reference", "triton")


def _torch_mha(E, H, dtype, **kw):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64, **kw)
    with torch.no_grad():  # torch zero-initialises the biases: make them count
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha, copy.deepcopy(mha).to(dtype)


def _run(module, *args, grad_out, inputs, **kw):
    out = module(*args, **kw)
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(out, inputs + [p for p in module.parameters()], grad_out.to(out.dtype))
    return out, grads


def _compare(ours, exact, same, names):
    (o, go), (r, gr), (s, gs) = ours, exact, same
    assert_close_by_rule(o, r, s, what="output")
    for name, a, b, c in zip(names, go, gr, gs):
        assert_close_by_rule(a, b, c, factor=3.0, what=f"grad {name}")


def _torch_grad_order(mha_grads, E, cross):
    """torch MHA parameter grads reordered into mmfast's parameter order."""
    g = dict(mha_grads)
    if cross:
        return [g["q_proj_weight"], g["in_proj_bias"][:E], torch.cat([g["k_proj_weight"], g["v_proj_weight"]]),
                g["in_proj_bias"][E:], g["out_proj.weight"], g["out_proj.bias"]]
    return [g["in_proj_weight"], g["in_proj_bias"], g["out_proj.weight"], g["out_proj.bias"]]


MASKS = ["none", "causal", "prefix_lm", "key_padding"]


# bf16 through the interpreter is slow: one mask there (the kernel's own tests cover bf16 masks)
SELF_CASES = [pytest.param(b, m, d, id=f"{dtype_id(d)}-{m}-{b}") for d in (torch.float32, torch.bfloat16)
              for m in MASKS for b in BACKENDS if not (d == torch.bfloat16 and b == "triton" and m != "causal")]


@pytest.mark.parametrize("backend, mask, dtype", SELF_CASES)
def test_self_attention_matches_torch(backend, mask, dtype):
    B, L, E, H = 2, 19, 80, 2  # head dim 40
    mha64, mha = _torch_mha(E, H, dtype)
    ours = MultiheadAttention.from_torch(mha, backend=backend)
    x = randn(B, L, E, dtype=dtype)
    g = randn(B, L, E)
    kw_ours, kw_torch = {}, {}
    if mask == "causal":
        kw_ours["causal"] = True
        kw_torch["attn_mask"] = ~masks.causal(L).dense(L)  # torch: True = not allowed
    elif mask == "prefix_lm":
        s, e = masks.prefix_lm(5, L)
        kw_ours.update(kv_start=s, kv_end=e)
        kw_torch["attn_mask"] = ~masks.dense_mask(s, e, L)
    elif mask == "key_padding":
        pad = torch.zeros(B, L, dtype=torch.bool)
        pad[0, -4:] = True
        pad[1, 3] = True
        kw_ours["key_padding_mask"] = kw_torch["key_padding_mask"] = pad
    xs = [x.detach().requires_grad_() for _ in range(3)]
    x64 = xs[1].double().detach().requires_grad_()
    got = _run(ours, xs[0], grad_out=g, inputs=[xs[0]], **kw_ours)
    exact = _run(mha64, x64, x64, x64, grad_out=g, inputs=[x64], need_weights=False, **kw_torch)
    same = _run(mha, xs[2], xs[2], xs[2], grad_out=g, inputs=[xs[2]], need_weights=False, **kw_torch)
    names = ["x", "qkv.weight", "qkv.bias", "out.weight", "out.bias"]
    reorder = lambda r, m: (r[0], [r[1][0]] + _torch_grad_order(zip([n for n, _ in m.named_parameters()], r[1][1:]), E, False))  # noqa: E731
    _compare(got, reorder(exact, mha64), reorder(same, mha), names)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_matches_torch(backend):
    B, Lq, Lk, E, Ekv, H = 2, 17, 23, 64, 48, 2
    mha64, mha = _torch_mha(E, H, torch.float32, kdim=Ekv, vdim=Ekv)
    ours = MultiheadAttention.from_torch(mha, backend=backend)
    assert ours.kv_dim == Ekv
    x, ctx, g = randn(B, Lq, E), randn(B, Lk, Ekv), randn(B, Lq, E)
    pad = torch.zeros(B, Lk, dtype=torch.bool)
    pad[1, -6:] = True  # a shorter image/text in the batch
    leaves = [[x.clone().requires_grad_(), ctx.clone().requires_grad_()] for _ in range(2)]
    x64, c64 = x.double().requires_grad_(), ctx.double().requires_grad_()
    got = _run(ours, *leaves[0], grad_out=g, inputs=leaves[0], key_padding_mask=pad)
    exact = _run(mha64, x64, c64, c64, grad_out=g, inputs=[x64, c64], key_padding_mask=pad, need_weights=False)
    same = _run(mha, leaves[1][0], leaves[1][1], leaves[1][1], grad_out=g, inputs=leaves[1], key_padding_mask=pad,
                need_weights=False)

    def reorder(r, m):
        return r[0], list(r[1][:2]) + _torch_grad_order(zip([n for n, _ in m.named_parameters()], r[1][2:]), E, True)

    names = ["x", "context", "q.weight", "q.bias", "kv.weight", "kv.bias", "out.weight", "out.bias"]
    _compare(got, reorder(exact, mha64), reorder(same, mha), names)


def test_self_attention_module_with_context_matches_torch():
    # Perceiver resampler style: a self-attention module's latents attend to [features; latents]
    mha64, mha = _torch_mha(64, 4, torch.float32)
    ours = MultiheadAttention.from_torch(mha, backend="reference")
    x, ctx = randn(2, 8, 64), randn(2, 29, 64)
    with torch.no_grad():
        got = ours(x, ctx)
        exact = mha64(x.double(), ctx.double(), ctx.double(), need_weights=False)[0]
        same = mha(x, ctx, ctx, need_weights=False)[0]
    assert_close_by_rule(got, exact, same, what="output")


def _handwritten(module, x, context, mask, dtype):
    """The module's math, written out: projections, per-head qk-norm, GQA by repeating kv heads, masked
    softmax attention with empty rows giving 0, output projection. In `dtype`."""
    p = {n: t.detach().to(dtype) for n, t in module.state_dict().items()}
    H, Hkv, D = module.num_heads, module.num_kv_heads, module.head_dim
    x = x.to(dtype)
    if context is None:
        qkv = F.linear(x, p["qkv.weight"], p["qkv.bias"])
        q, kv = qkv[..., :H * D], qkv[..., H * D:]
    else:
        q, kv = F.linear(x, p["q.weight"], p["q.bias"]), F.linear(context.to(dtype), p["kv.weight"], p["kv.bias"])
    q = q.unflatten(-1, (H, D))
    k, v = kv.unflatten(-1, (2 * Hkv, D)).split(Hkv, dim=-2)

    def norm(t, prefix):
        if module.qk_norm == "rmsnorm":
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * p[prefix + ".weight"]
        return F.layer_norm(t, (D,), p[prefix + ".weight"], p[prefix + ".bias"], 1e-6)

    if module.qk_norm:
        q, k = norm(q, "q_norm"), norm(k, "k_norm")
    k, v = k.repeat_interleave(H // Hkv, -2), v.repeat_interleave(H // Hkv, -2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
    probs = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    o = torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(-2)
    return F.linear(o, p["out.weight"], p["out.bias"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qk_norm", ["layernorm", "rmsnorm"])
def test_qk_norm_gqa_cross_attention_vs_handwritten(backend, qk_norm):
    # Llama 3.2 Vision's cross-attention: GQA, RMSNorm on q and k, media intervals with empty rows
    B, Lq, E, Ekv, H, Hkv, tpi = 2, 21, 96, 40, 4, 2, 5
    torch.manual_seed(1)
    ours = MultiheadAttention(E, H, kv_dim=Ekv, num_kv_heads=Hkv, qk_norm=qk_norm, backend=backend)
    with torch.no_grad():
        for prm in ours.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    ids = torch.arange(Lq).repeat(B, 1)
    ids[0, [3, 9]] = -1
    ids[1, [0, 12]] = -1
    s, e = masks.media_intervals(ids, -1, tpi)
    x, ctx = randn(B, Lq, E), randn(B, 2 * tpi, Ekv)
    with torch.no_grad():
        got = ours(x, ctx, kv_start=s, kv_end=e)
    mask = masks.dense_mask(s, e, 2 * tpi)[:, None]
    exact = _handwritten(ours, x, ctx, mask, torch.float64)
    same = _handwritten(ours, x, ctx, mask, torch.float32)
    assert_close_by_rule(got, exact, same, what="output")
    # rows before the first image attend to nothing: the output is exactly the out-projection's bias
    assert torch.equal(got[0, :3], ours.out.bias.detach().expand(3, E))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_flow_and_empty_rows_stay_finite(backend):
    m = MultiheadAttention(64, 2, kv_dim=32, qk_norm=True, backend=backend)
    ids = torch.tensor([[5, 6, -1, 7, 8, -1, 9]])
    s, e = masks.media_intervals(ids, -1, 3)
    x, ctx = randn(1, 7, 64).requires_grad_(), randn(1, 6, 32).requires_grad_()
    m(x, ctx, kv_start=s, kv_end=e).square().sum().backward()
    for name, t in [("x", x), ("context", ctx)] + list(m.named_parameters()):
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, f"{name}: no gradient reached it"
    # the first two tokens precede every image: they see no key, so no gradient reaches them
    assert torch.equal(x.grad[0, :2], torch.zeros_like(x.grad[0, :2]))


def test_self_attention_passes_strided_views_of_the_fused_projection(monkeypatch):
    import mmfast.kernels

    seen = {}
    real = mmfast.kernels.flash_attention

    def spy(q, k, v, **kw):
        seen.update(q=q, k=k, v=v)
        return real(q, k, v, **kw)

    monkeypatch.setattr(mmfast.kernels, "flash_attention", spy)
    m = MultiheadAttention(48, 3, num_kv_heads=1, backend="reference")
    m(randn(2, 5, 48))
    q, k, v = seen["q"], seen["k"], seen["v"]
    assert q.shape == (2, 5, 3, 16) and k.shape == v.shape == (2, 5, 1, 16)
    storage = q.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == storage and v.untyped_storage().data_ptr() == storage  # no copies
    assert q.stride() == k.stride() == v.stride() == (5 * 5 * 16, 5 * 16, 16, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_packed_equals_padded_batch(backend):
    m = MultiheadAttention(32, 2, backend=backend)
    lengths = [5, 11, 1]
    seqs = [randn(n, 32) for n in lengths]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    with torch.no_grad():
        packed = m(torch.cat(seqs), causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths),
                   max_seqlen_k=max(lengths))
        each = torch.cat([m(x[None], causal=True)[0] for x in seqs])
    torch.testing.assert_close(packed, each, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: MultiheadAttention(50, 3), "embed_dim=50 must be divisible by num_heads=3"),
    (lambda: MultiheadAttention(48, 4, num_kv_heads=3), "multiple of num_kv_heads=3"),
    (lambda: MultiheadAttention(48, 4, qk_norm="batchnorm"), "qk_norm must be one of"),
    (lambda: MultiheadAttention(48, 4, kv_dim=16)(randn(1, 3, 48)), "needs `context`"),
    (lambda: MultiheadAttention(48, 4, kv_dim=16)(randn(1, 3, 48), randn(1, 4, 20)), "context width must be kv_dim=16"),
    (lambda: MultiheadAttention(48, 4)(randn(1, 3, 40)), r"x must be \(B, L, 48\)"),
    (lambda: MultiheadAttention(48, 4)(randn(3, 48)), "needs cu_seqlens_q"),
    (lambda: MultiheadAttention.from_torch(nn.MultiheadAttention(48, 4, dropout=0.1)), "dropout"),
    (lambda: MultiheadAttention.from_torch(nn.MultiheadAttention(48, 4, add_bias_kv=True)), "add_bias_kv"),
    (lambda: MultiheadAttention(0, 4), r"embed_dim must be in \[1, inf\], got 0"),
    (lambda: MultiheadAttention(48.0, 4), "embed_dim must be an int"),
    (lambda: MultiheadAttention(48, True), "num_heads must be an int"),
    (lambda: MultiheadAttention(48, 4, num_kv_heads=-2), "num_kv_heads must be in"),
    (lambda: MultiheadAttention(48, 4, kv_dim=0), "kv_dim must be in"),
    (lambda: MultiheadAttention(1028, 2), "head dim embed_dim / num_heads = 514 must be at most 256"),
    (lambda: MultiheadAttention(48, 4, bias="yes"), "bias must be True or False"),
    (lambda: MultiheadAttention(48, 4, qk_norm=1), "qk_norm must be one of"),
    (lambda: MultiheadAttention(48, 4, qk_norm_eps=0.0), r"qk_norm_eps must be in \(0.0, inf\]"),
    (lambda: MultiheadAttention(48, 4, qk_norm_eps=float("nan")), "qk_norm_eps must be finite"),
    (lambda: MultiheadAttention(48, 4, softmax_scale=float("inf")), "softmax_scale must be finite"),
    (lambda: MultiheadAttention(48, 4, backend="cuda"), r"backend must be one of \('auto', 'reference', 'triton'\)"),
], ids=["heads-divide", "gqa-multiple", "qk-norm-name", "cross-needs-context", "context-width", "x-width",
        "packed-needs-cu-seqlens", "torch-dropout", "torch-bias-kv", "embed-dim-zero", "embed-dim-float",
        "heads-bool", "kv-heads-negative", "kv-dim-zero", "head-dim-too-large", "bias-str", "qk-norm-int",
        "eps-zero", "eps-nan", "scale-inf", "backend-cuda"])
def test_bad_input_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_torch_compile_traces_the_module_without_graph_breaks():
    m = MultiheadAttention(64, 4, kv_dim=32, qk_norm=True, backend="reference")
    x, ctx = randn(2, 7, 64), randn(2, 6, 32)
    s, e = masks.media_intervals(torch.tensor([[5, 6, -1, 7, 8, -1, 9]] * 2), -1, 3)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    got = compiled(x, ctx, kv_start=s, kv_end=e)
    torch.testing.assert_close(got, m(x, ctx, kv_start=s, kv_end=e), rtol=0, atol=0)
    got.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_mask_reused_across_layers_equals_intervals(backend):
    from mmfast.kernels import build_block_mask

    layers = [MultiheadAttention(64, 4, kv_dim=48, num_kv_heads=2, backend=backend) for _ in range(2)]
    ids = torch.tensor([[1, 2, 9, 3, 4, 9, 9, 5], [9, 1, 2, 3, 4, 5, 6, 7]])
    s, e = masks.media_intervals(ids, 9, 3, mode="most_recent_group")
    bm = build_block_mask(8, 9, kv_start=s, kv_end=e)  # once, for every layer
    x, vision = randn(2, 8, 64), randn(2, 9, 48)
    with torch.no_grad():
        for layer in layers:
            torch.testing.assert_close(layer(x, vision, block_mask=bm), layer(x, vision, kv_start=s, kv_end=e),
                                       rtol=0, atol=0)


@pytest.mark.parametrize("qk_norm", ["layernorm", "rmsnorm"])
def test_qk_norm_in_fp32_under_autocast(qk_norm):
    """CUDA autocast runs layer_norm in fp32, so the normed q / k come out fp32 while v stays bf16 (CPU
    autocast keeps bf16, so the fp32 norm output is emulated here): attention runs in v's dtype."""
    m = MultiheadAttention(32, 2, qk_norm=qk_norm, backend="reference").to(torch.bfloat16)
    x = randn(2, 7, 32, dtype=torch.bfloat16)
    plain = m(x, causal=True)
    for norm in (m.q_norm, m.k_norm):
        norm.register_forward_hook(lambda mod, args, out: out.float())
    out = m(x, causal=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, plain)
