"""GatedCrossAttentionBlock and PerceiverResampler against their references (the eager models, at the bottom of
mmfast/nn/gated_cross_attention.py) with the same weights: outputs and every gradient (both gates included) by the 2x / 3x rule against fp64.

Both modules run their Triton backends (flash_attention, tanh_gated_linear; the interpreter on CPU).
"""
import pytest
import torch
from numerics import assert_bitwise_equal, assert_close_by_rule, dtype_id, generator, randn

from mmfast.nn import GatedCrossAttentionBlock, PerceiverResampler
from mmfast.nn.gated_cross_attention import gated_xattn_dense_reference, perceiver_resampler_reference

D, HEADS = 64, 4
KV_HEADS = {"flamingo": None, "mllama": 2, "idefics": None}
QK_NORM = {"idefics": True}  # Idefics' optional qk_layer_norms, on where tested


def _block(variant, device, gate="scalar", alpha=0.7, beta=-0.4):
    torch.manual_seed(generator().initial_seed() % 2**31)
    blk = GatedCrossAttentionBlock(D, HEADS, variant=variant, kv_heads=KV_HEADS[variant], gate=gate, ff_mult=2,
                                   qk_norm=QK_NORM.get(variant), backend="triton").to(device)
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if "norm" in name:  # non-trivial norm affines, so their gradients are checked
                p.copy_(1 + 0.1 * randn(*p.shape, device=device) if name.endswith("weight") else 0.1 * randn(*p.shape, device=device))
        blk.attn_gate.copy_(alpha + 0.1 * randn(*blk.attn_gate.shape, device=device))
        blk.ff_gate.copy_(beta + 0.1 * randn(*blk.ff_gate.shape, device=device))
    return blk


def _locations(B, L, images_per_row, device):
    """Placeholder positions: row b holds images_per_row[b] image tokens at random, non-adjacent spots."""
    loc = torch.zeros(B, L, dtype=torch.bool)
    g = generator()
    for b, count in enumerate(images_per_row):
        slots = torch.randperm(L // 2, generator=g)[:count] * 2 + 1  # odd positions: never adjacent
        loc[b, slots] = True
    return loc.to(device)


def _run(blk, x, media, loc, dtype):
    """Block output and gradients of (x, media, all parameters) in `dtype`, for one upstream gradient."""
    b = blk.to(dtype)
    xs = x.to(dtype).requires_grad_()
    ms = media.to(dtype).requires_grad_()
    out = b(xs, ms, loc)
    return out, xs, ms, b


def _compare_block(variant, device, dtype, images_per_row, gate="scalar", L=37, T=5, n=6, pad=None):
    blk = _block(variant, device, gate)
    B = len(images_per_row)
    x = randn(B, L, D, device=device)
    media = randn(B, T, n, D, device=device)
    loc = _locations(B, L, images_per_row, device)
    dy = randn(B, L, D, device=device)
    names = [name for name, _ in blk.named_parameters()]

    def reference(prec):
        p = {k: v.detach().to(prec).requires_grad_() for k, v in blk.named_parameters()}
        xs, ms = x.to(prec).requires_grad_(), media.to(prec).requires_grad_()
        out = gated_xattn_dense_reference(xs, ms, loc, p, heads=HEADS, kv_heads=KV_HEADS[variant], variant=variant,
                                          media_padding_mask=pad)
        grads = torch.autograd.grad(out, [xs, ms] + [p[k] for k in names], dy.to(prec))
        return out, grads

    ref_out, ref_grads = reference(torch.float64)
    same_out, same_grads = reference(dtype)
    ours = blk.to(dtype)
    xs, ms = x.to(dtype).requires_grad_(), media.to(dtype).requires_grad_()
    out = ours(xs, ms, loc, media_padding_mask=pad)
    grads = torch.autograd.grad(out, [xs, ms] + list(ours.parameters()), dy.to(dtype))
    what = f"{variant} {dtype_id(dtype)} images {images_per_row}"
    assert_close_by_rule(out, ref_out, same_out, what=f"{what} out")
    for name, g, r, s in zip(["x", "media"] + names, grads, ref_grads, same_grads):
        assert g.shape == r.shape, name
        floor = _gate_floors(blk, x, media, loc, dy, variant, dtype).get(name)
        assert_close_by_rule(g, r, s, factor=3.0, floor=floor, what=f"{what} d_{name}")
    return out, x, loc, grads


def _gate_floors(blk, x, media, loc, dy, variant, dtype):
    """Floors for the gates' gradients: 16 units of roundoff of `dtype` times sqrt(Σ (dy ⊙ z)²), z the gated
    update (recovered from the fp64 reference with β = 0 and with both gates). A gate gradient sums
    B·L·D products (per channel: B·L) of values that took different roundings upstream (flash attention
    vs eager softmax), so its error is a random walk of that size; PyTorch's own error on one number can
    be near 0 by chance. tanh_gated_linear's gate gradient itself is pinned in test_gated_linear.py."""
    p = {k: v.detach().double() for k, v in blk.named_parameters()}
    run = lambda q: gated_xattn_dense_reference(x.double(), media.double(), loc, q, heads=HEADS,  # noqa: E731
                                                kv_heads=KV_HEADS[variant], variant=variant)
    h1 = run(dict(p, ff_gate=torch.zeros_like(p["ff_gate"])))
    full = run(p)
    floors = {}
    for name, z in (("attn_gate", (h1 - x.double()) / torch.tanh(p["attn_gate"])),
                    ("ff_gate", (full - h1) / torch.tanh(p["ff_gate"]))):
        sq = (dy.double() * z).pow(2).reshape(-1, z.shape[-1]).sum(0)
        size = sq.sum().sqrt() if p[name].numel() == 1 else sq.sqrt().max()
        unit = torch.finfo(dtype).eps / 2
        floors[name] = 16 * unit * (1 - torch.tanh(p[name]).pow(2)).max().item() * size.item()
    return floors


@pytest.mark.parametrize("variant", ["flamingo", "mllama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_block_matches_reference(device, variant, dtype):
    _, _, _, grads = _compare_block(variant, device, dtype, images_per_row=(2, 1))
    names = [name for name, _ in GatedCrossAttentionBlock(D, HEADS, variant=variant, kv_heads=KV_HEADS[variant]).named_parameters()]
    gate_grads = {n: g for n, g in zip(["x", "media"] + names, grads) if n.endswith("gate")}
    assert set(gate_grads) == {"attn_gate", "ff_gate"} and all(g.abs().max() > 0 for g in gate_grads.values())


@pytest.mark.parametrize("images", [0, 1, 5], ids=lambda c: f"{c}-images")
@pytest.mark.parametrize("variant", ["flamingo", "mllama"])
def test_interleaved_sequences(device, variant, images):
    """Rows with 0, 1 and 5 images (and a second row with another count), vs the reference incl. grads."""
    out, x, loc, _ = _compare_block(variant, device, torch.float32, images_per_row=(images, min(images + 1, 5)))
    if images == 0 and variant == "mllama":  # no image: the whole first row is left as it was
        assert_bitwise_equal(out[0], x[0], what="mllama, no image")


def test_padded_visual_tokens(device):
    """Llama 3.2 pads unused tiles: padded visual tokens (media_padding_mask) are never attended to."""
    T, n = 3, 6
    pad = torch.zeros(2, T * n, dtype=torch.bool, device=device)
    pad[0, n - 2 : n] = True  # the tail of image 1 in row 0
    pad[1, 2 * n + 1 :] = True  # most of image 3 in row 1
    _compare_block("mllama", device, torch.float32, images_per_row=(2, 3), T=T, n=n, pad=pad)


def test_vector_gates(device):
    """Per-channel gates (Idefics' alpha_type="vector")."""
    _compare_block("flamingo", device, torch.float32, images_per_row=(3,), gate="vector")


def test_idefics_block(device):
    """Hugging Face Idefics' layer (RMSNorm, qk RMSNorm, SwiGLU, vector gates): a row that sees no image
    gets no attention update but its MLP update (Idefics gates only the attention by cross_attention_gate)."""
    out, x, _, _ = _compare_block("idefics", device, torch.float32, images_per_row=(0, 2), gate="vector")
    assert (out[0] - x[0]).abs().min() > 0


@pytest.mark.parametrize("variant", ["flamingo", "mllama"])
def test_identity_at_init(device, variant):
    blk = GatedCrossAttentionBlock(D, HEADS, variant=variant, kv_heads=KV_HEADS[variant], backend="triton").to(device)
    assert blk.attn_gate.abs().max() == 0 and blk.ff_gate.abs().max() == 0
    x = randn(2, 29, D, device=device)
    out = blk(x, randn(2, 3, 4, D, device=device), _locations(2, 29, (3, 1), device))
    assert_bitwise_equal(out, x, what="gates 0: the block is the identity")


@pytest.mark.parametrize("variant", ["flamingo", "mllama"])
def test_text_before_first_image(device, variant):
    """Tokens before the first image: independent of the media (Flamingo: only the FFN touches them);
    Llama 3.2 (full-text-row mask): exactly unchanged."""
    blk = _block(variant, device)
    L = 31
    x = randn(1, L, D, device=device)
    loc = torch.zeros(1, L, dtype=torch.bool, device=device)
    loc[0, [12, 20]] = True
    out1 = blk(x, randn(1, 2, 5, D, device=device), loc)
    out2 = blk(x, randn(1, 2, 5, D, device=device), loc)
    assert_bitwise_equal(out1[0, :12], out2[0, :12], what="rows before the first image ignore the media")
    assert not torch.equal(out1[0, 12:], out2[0, 12:])
    if variant == "mllama":
        assert_bitwise_equal(out1[0, :12], x[0, :12], what="mllama: rows before the first image unchanged")


def _resampler_check(device, x, num_time_embeds, act="gelu", qk_norm=False):
    torch.manual_seed(generator().initial_seed() % 2**31)
    rs = PerceiverResampler(32, depth=2, heads=2, dim_head=16, num_latents=8, num_time_embeds=num_time_embeds,
                            ff_mult=2, act=act, qk_norm=qk_norm, backend="triton").to(device)
    with torch.no_grad():
        for name, p in rs.named_parameters():
            if "norm" in name:  # non-trivial norm affines, the qk norms' included
                p.add_(0.2 * randn(*p.shape, device=device))
    names = [name for name, _ in rs.named_parameters()]
    out = rs(x.requires_grad_())
    dy = randn(*out.shape, device=device)
    grads = torch.autograd.grad(out, [x] + list(rs.parameters()), dy)

    def reference(prec):
        p = {k: v.detach().to(prec).requires_grad_() for k, v in rs.named_parameters()}
        xs = x.detach().to(prec).requires_grad_()
        o = perceiver_resampler_reference(xs, p, depth=2, heads=2, act=act)
        return o, torch.autograd.grad(o, [xs] + [p[k] for k in names], dy.to(prec))

    (ref, ref_g), (same, same_g) = reference(torch.float64), reference(torch.float32)
    assert out.shape == ref.shape
    assert_close_by_rule(out, ref, same, what="resampler out")
    for name, g, r, s in zip(["x"] + names, grads, ref_g, same_g):
        assert_close_by_rule(g, r, s, factor=3.0, what=f"resampler d_{name}")


def test_resampler_images(device):
    _resampler_check(device, randn(2, 13, 32, device=device), None)


def test_resampler_idefics(device):
    """Hugging Face IdeficsPerceiverResampler's variant: ReLU FFN, LayerNorm of q and k per head."""
    _resampler_check(device, randn(2, 13, 32, device=device), None, act="relu", qk_norm=True)


def test_resampler_video_frames(device):
    """Video: 3 frames with learned time embeddings, each resampled on its own."""
    _resampler_check(device, randn(2, 3, 11, 32, device=device), 4)


def _arg_id(change):
    return "-".join(f"{k}={v}" for k, v in change.items())


BLOCK_BAD_ARGS = [
    (dict(dim=0), "dim must be in"),
    (dict(dim=64.0), "dim must be an int"),
    (dict(heads=0), "heads must be in"),
    (dict(heads=None), "heads must be an int"),
    (dict(dim=3, heads=4), "dim .3. must be at least heads"),
    (dict(dim_head=0), "dim_head must be in"),
    (dict(dim_media=-1), "dim_media must be in"),
    (dict(kv_heads=0), "kv_heads must be in"),
    (dict(kv_heads=3), "heads .4. must be a multiple of kv_heads"),
    (dict(ff_mult=0), "ff_mult must be in"),
    (dict(ff_mult=float("nan")), "ff_mult must be finite"),
    (dict(ff_mult=0.001), "ff_mult .0.001. gives an FFN"),
    (dict(hidden=0), "hidden must be in"),
    (dict(variant="idefics3"), "variant must be one of"),
    (dict(gate="matrix"), "gate must be one of"),
    (dict(media_mode="nearest"), "media_mode must be one of"),
    (dict(qk_norm=True), "qk_norm=True with variant='flamingo'"),
    (dict(variant="idefics", qk_norm=1), "qk_norm must be True or False"),
    (dict(eps=0.0), "eps must be in"),
    (dict(eps=-1e-5), "eps must be in"),
    (dict(backend="cuda"), "backend must be one of"),
]


@pytest.mark.parametrize("change,message", BLOCK_BAD_ARGS, ids=[_arg_id(c) for c, _ in BLOCK_BAD_ARGS])
def test_block_constructor_validation(change, message):
    kwargs = dict(dict(dim=D, heads=HEADS), **change)
    dim, heads = kwargs.pop("dim"), kwargs.pop("heads")
    with pytest.raises(ValueError, match=f"GatedCrossAttentionBlock: {message}"):
        GatedCrossAttentionBlock(dim, heads, **kwargs)


RESAMPLER_BAD_ARGS = [
    (dict(dim=0), "dim must be in"),
    (dict(depth=0), "depth must be in"),
    (dict(depth=2.0), "depth must be an int"),
    (dict(heads=0), "heads must be in"),
    (dict(dim_head=-16), "dim_head must be in"),
    (dict(num_latents=0), "num_latents must be in"),
    (dict(num_time_embeds=0), "num_time_embeds must be in"),
    (dict(ff_mult=-1), "ff_mult must be in"),
    (dict(ff_mult=float("inf")), "ff_mult must be finite"),
    (dict(act="silu"), "act must be one of"),
    (dict(qk_norm="yes"), "qk_norm must be True or False"),
    (dict(backend="chunked"), "backend must be one of"),
]


@pytest.mark.parametrize("change,message", RESAMPLER_BAD_ARGS, ids=[_arg_id(c) for c, _ in RESAMPLER_BAD_ARGS])
def test_resampler_constructor_validation(change, message):
    kwargs = dict(dict(dim=32, depth=1, heads=2, dim_head=16), **change)
    with pytest.raises(ValueError, match=f"PerceiverResampler: {message}"):
        PerceiverResampler(**kwargs)


def test_forward_validation_errors():
    blk = GatedCrossAttentionBlock(D, HEADS)
    x, media = torch.randn(1, 5, D), torch.randn(1, 1, 2, D)
    with pytest.raises(ValueError, match="media_locations"):
        blk(x, media)
    with pytest.raises(ValueError, match="media must have shape"):
        blk(x, media[0], torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="time embeddings"):
        PerceiverResampler(32, 1, heads=2, dim_head=16, num_time_embeds=2)(torch.randn(1, 3, 4, 32))


@pytest.mark.parametrize("variant", ["flamingo", "mllama"])
@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_block_under_autocast(device, variant, gate):
    """fp32 parameters and residual stream under bf16 autocast: the block gives the dtype the eager reference
    gives under the same autocast (fp32: the residual stream), values by the rule, and every gradient in
    its parameter's dtype."""
    blk = _block(variant, device, gate)
    x = randn(2, 29, D, device=device)
    media = randn(2, 3, 4, D, device=device)
    loc = _locations(2, 29, (2, 1), device)
    p = dict(blk.named_parameters())
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = blk(x, media, loc)
        same = gated_xattn_dense_reference(x, media, loc, p, heads=HEADS, kv_heads=KV_HEADS[variant], variant=variant)
    exact = gated_xattn_dense_reference(x.double(), media.double(), loc, {k: v.double() for k, v in p.items()},
                                        heads=HEADS, kv_heads=KV_HEADS[variant], variant=variant)
    assert out.dtype == same.dtype == torch.float32
    assert_close_by_rule(out, exact, same, what=f"{variant} autocast")
    out.sum().backward()
    for name, q in blk.named_parameters():
        assert q.grad is not None and q.grad.dtype == q.dtype and torch.isfinite(q.grad).all(), name


@pytest.mark.parametrize("model", ["bf16", "fp32-autocast"])
def test_resampler_dtypes(device, model):
    """The resampler returns what its eager reference returns: bf16 for a bf16 model, fp32 under bf16
    autocast (the final LayerNorm runs in fp32 there), values by the rule; gradients in the parameters'
    dtypes."""
    torch.manual_seed(generator().initial_seed() % 2**31)
    rs = PerceiverResampler(32, depth=2, heads=2, dim_head=16, num_latents=8, ff_mult=2, backend="triton").to(device)
    x = randn(2, 13, 32, device=device)
    if model == "bf16":
        rs, x = rs.to(torch.bfloat16), x.to(torch.bfloat16)
    p = dict(rs.named_parameters())
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=model != "bf16"):
        out = rs(x)
        same = perceiver_resampler_reference(x, p, depth=2, heads=2)
    exact = perceiver_resampler_reference(x.double(), {k: v.double() for k, v in p.items()}, depth=2, heads=2)
    assert out.dtype == same.dtype == (torch.bfloat16 if model == "bf16" else torch.float32)
    assert_close_by_rule(out, exact, same, what=f"resampler {model}")
    out.float().sum().backward()
    for name, q in rs.named_parameters():
        assert q.grad is not None and q.grad.dtype == q.dtype and torch.isfinite(q.grad).all(), name


def test_block_torch_compile_fullgraph(device):
    """The whole block traces with torch.compile(fullgraph=True) (flash_attention and tanh_gated_linear are
    custom ops) and gives the eager block's output and gradients."""
    blk = _block("mllama", device)
    x = randn(2, 17, D, device=device)
    media = randn(2, 2, 3, D, device=device)
    loc = _locations(2, 17, (2, 1), device)
    compiled = torch.compile(blk, fullgraph=True, backend="aot_eager")
    out = compiled(x, media, loc)
    grads = torch.autograd.grad(out.sum(), list(blk.parameters()))
    ref = blk(x, media, loc)
    ref_grads = torch.autograd.grad(ref.sum(), list(blk.parameters()))
    assert_bitwise_equal(out, ref, what="compiled block")
    for (name, _), g, r in zip(blk.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_block_backward(device):
    """A frozen block inside a trained model (adapter / LoRA elsewhere): only x and media need gradients,
    which must match the block with trainable weights."""
    blk = _block("mllama", device)
    x, media = randn(2, 11, D, device=device), randn(2, 2, 3, D, device=device)
    loc = _locations(2, 11, [1, 2], device)
    grads = []
    for frozen in (True, False):
        for p in blk.parameters():
            p.requires_grad_(not frozen)
        xs, ms = x.clone().requires_grad_(), media.clone().requires_grad_()
        blk(xs, ms, loc).backward(x.flip(1))
        grads.append((xs.grad, ms.grad))
    for (a, b), name in zip(zip(*grads), ("x", "media")):
        assert_bitwise_equal(a, b, what=f"frozen-block d_{name}")


@pytest.mark.parametrize("variant", ["flamingo", "mllama"])
def test_text_only_batch(device, variant):
    """media with T = 0 images (a text-only batch): the same as images that no token sees."""
    blk = _block(variant, device)
    x = randn(2, 9, D, device=device)
    no_loc = torch.zeros(2, 9, dtype=torch.bool, device=device)
    none = blk(x, randn(2, 0, 3, D, device=device), no_loc)
    unseen = blk(x, randn(2, 1, 3, D, device=device), no_loc)
    assert_bitwise_equal(none, unseen, what=f"{variant} text-only batch")
