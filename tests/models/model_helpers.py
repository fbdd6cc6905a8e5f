"""Parity harness for the model tests: our model (fp32) against the library's own model in fp64 (the
reference) with the library's fp32 run as the yardstick (tests/numerics.py's rule), outputs and
gradients."""
import copy

import torch
from torch import nn

from numerics import assert_close_by_rule, generator, max_abs_error


def _run(model, inputs, fields, params, dtype, seed):
    inputs = {k: v.to(dtype).requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # transformers 4.5x's CLIP builds its text mask in the default dtype (see
    try:                            # tests/swap/hf_models.float64_default): a float64 run overflowed it
        out = model(**inputs)
    finally:
        torch.set_default_dtype(default)
    values = [out[f] if isinstance(f, str) else f(out) for f in fields]
    g = torch.Generator().manual_seed(seed)
    loss = sum((v.double() * torch.randn(v.shape, generator=g, dtype=torch.float64)).sum() for v in values)
    tensors = [t for t in inputs.values() if torch.is_tensor(t) and t.requires_grad]
    groups = [p(model) for p in params]
    groups = [tuple(g) if isinstance(g, (tuple, list)) else (g,) for g in groups]
    flat = torch.autograd.grad(loss, tensors + [t for g in groups for t in g])
    grads, i = list(flat[:len(tensors)]), len(tensors)
    for g in groups:  # a tuple of their tensors stacks into our fused one
        grads.append(torch.cat([t.reshape(-1) for t in flat[i:i + len(g)]]))
        i += len(g)
    return values, grads


def check_parity(ours, theirs, inputs, fields, our_params=(), their_params=(), what=""):
    """Compare `fields` (output names or callables on the output) and the gradients of a random linear
    function of them w.r.t. the float inputs and the paired parameters (callables model -> tensor; their
    side may return a tuple, concatenated: q / k / v against our fused qkv)."""
    theirs64 = copy.deepcopy(theirs).double()
    seed = generator().initial_seed()
    got, got_g = _run(ours, inputs, fields, our_params, torch.float32, seed)
    ref, ref_g = _run(theirs64, inputs, fields, their_params, torch.float64, seed)
    yard, yard_g = _run(theirs, inputs, fields, their_params, torch.float32, seed)
    names = [f if isinstance(f, str) else getattr(f, "__name__", "field") for f in fields]
    for name, a, r, y in zip(names, got, ref, yard):
        assert a.shape == r.shape, f"{what} {name}: shape {tuple(a.shape)} vs {tuple(r.shape)}"
        assert_close_by_rule(a, r, y, floor=_floor(r), what=f"{what} {name}")
    for i, (a, r, y) in enumerate(zip(got_g, ref_g, yard_g)):
        assert_close_by_rule(a, r, y, factor=3.0, floor=_floor(r), what=f"{what} grad {i}")


def _floor(ref):
    """1e-6 of the reference's largest magnitude (about 8 fp32 ulps), at least 1e-6; 1e-5 for a few values.
    The yardstick of a tensor is the worst of many roundings, that of a single scalar (a loss, logit_scale's
    gradient: sums over the batch with cancellation) one lucky or unlucky draw, so a tolerance made only of it
    fails at random: CI failed CLIP's logit_scale gradient at 20 ulps of it, and 8 seeds of that test reached
    0.9 of an 8-ulp bound. 1e-5 (about 80 ulps) still catches any wrong formula by orders of magnitude."""
    relative = 1e-6 if ref.numel() > _FEW else 1e-5
    return relative * max(1.0, ref.detach().abs().max().item())


_FEW = 4  # values: logit_scale's gradient, a loss, a per-sample score


class OpenClipOutputs(nn.Module):
    """open_clip's encode_image / encode_text / logits / ClipLoss under our field names."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values, return_loss=True):
        import open_clip

        img = self.model.encode_image(pixel_values, normalize=True)
        txt = self.model.encode_text(input_ids, normalize=True)
        scale = self.model.logit_scale.exp()
        return {"image_embeds": img, "text_embeds": txt, "logits_per_image": scale * img @ txt.t(),
                "loss": open_clip.loss.ClipLoss()(img, txt, scale)}


def lavis_heads_and_queues(sd, embed_dim, width, queue_size, ptr, momentum_shift=0.0):
    """Completes a LAVIS ALBEF / BLIP checkpoint `sd` that holds the towers: random ITC projections and ITM
    head, the ``_m`` momentum copies (shifted by `momentum_shift`), temp 0.05 and unit-norm queues stored
    (embed_dim, queue_size) with `ptr` as ``queue_ptr``, as LAVIS saves them."""
    from torch.nn import functional as F

    g = generator()
    for name, shape in (("vision_proj", (embed_dim, width)), ("text_proj", (embed_dim, width)), ("itm_head", (2, width))):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.randn(shape, generator=g), torch.randn(shape[0], generator=g)
    for key in list(sd):
        head = key.split(".")[0]
        if head in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
            sd[key.replace(head, head + "_m", 1)] = sd[key].clone() + momentum_shift
    sd["temp"] = torch.tensor(0.05)
    sd["image_queue"] = F.normalize(torch.randn(embed_dim, queue_size, generator=g), dim=0)
    sd["text_queue"] = F.normalize(torch.randn(embed_dim, queue_size, generator=g), dim=0)
    sd["queue_ptr"] = torch.tensor([ptr])
    return sd


def assert_one_step_trains_only(model, loss, prefixes):
    """The parameters that require grad are exactly those whose names start with one of `prefixes`; after one
    AdamW step on `loss()` (no weight decay: a parameter changes only through its gradient) every one of them
    has a non-zero gradient and changed, and every other one has no gradient and is bit-identical."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if n.startswith(tuple(prefixes))}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss().backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.any() and not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert p.grad is None and torch.equal(p, before[n]), f"frozen {n} changed"
    return trainable


def assert_triton_matches_reference(triton_model, reference_model, run, mask):
    """`run(model, dtype)` -> the model's output (with .logits, .loss) after ``.loss.backward()``: the logits
    at `mask`, the loss and every trainable gradient of the Triton-backend model (fp32) against the
    reference-backend model's fp64 run, its fp32 run the yardstick (tests/numerics.py's rule; gradients get 3x:
    they pass through more kernels)."""
    def values(model, dtype):
        out = run(model, dtype)
        grads = [p.grad for _, p in sorted(model.named_parameters()) if p.requires_grad]
        return [out.logits[mask], out.loss] + grads

    got = values(triton_model, torch.float32)
    want = values(copy.deepcopy(reference_model).double(), torch.float64)
    yard = values(reference_model, torch.float32)
    assert len(got) > 2 + 10  # the bridge's parameters all have gradients
    for i, (a, r, y) in enumerate(zip(got, want, yard)):
        assert_close_by_rule(a, r, y, factor=2.0 if i < 2 else 3.0, floor=1e-6 * max(1.0, r.abs().max().item()),
                             what=f"output {i}")


def hf_loaded_in(hf, dtype):
    """`hf` as ``type(hf).from_pretrained(path, dtype=dtype)`` loads it (saved and loaded again): the
    ``_keep_in_fp32_modules`` in fp32 (transformers 5.x: in fp16 only; ``_keep_in_fp32_modules_strict`` in bf16
    too), the rotary ``inv_freq`` buffers in fp32 (``.to(dtype)`` would round them, which a checkpoint loaded
    in bf16 never does)."""
    import tempfile

    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        return type(hf).from_pretrained(path, dtype=dtype).eval()


def assert_bf16_matches_hf(ours, hf, hf_bf16, run, keep, labels, *, hf_loss=True):
    """`run(model, dtype)` -> the output (.logits, .loss) on `labels`: ours (converted from `hf_bf16`) in bf16
    against `hf`'s fp64 copy, `hf_bf16`'s own run the yardstick. The logits at `keep`: the rule (factor 2),
    their dtype HF's. The loss: finite, the mean cross-entropy of the model's own logits (HF's too, unless
    `hf_loss` is False: it has none), and as close to the fp64 loss as logits within the rule can make it
    (below), not the rule on the scalar itself: a loss is one draw of the sum of its logits' bf16 roundings,
    which are as large as HF's (Llava: the logits' RMS error within 2% of HF's) but land elsewhere (half
    the logits differ from HF's), so its error against HF's swings both ways (Llava: ratios 0.3 to 12 over 8
    seeds; per token, the max over ~45 tokens, up to 2.1 over 25 seeds)."""
    from torch.nn import functional as F

    ref, yard, got = (run(copy.deepcopy(hf).double(), torch.float64), run(hf_bf16, torch.bfloat16),
                      run(ours, torch.bfloat16))
    assert got.logits.dtype == yard.logits.dtype, f"logits {got.logits.dtype}, HF's {yard.logits.dtype}"
    assert_close_by_rule(got.logits[keep], ref.logits[keep], yard.logits[keep], factor=2.0, what="bf16 logits")
    scored = labels[:, 1:] != -100  # the shifted next-token loss: logits at t, label t + 1

    def loss_from_logits(out):  # fp32 or wider: HF's loss takes logits.float() (its fp64 model's loss is fp32)
        z = out.logits[:, :-1][scored]
        return F.cross_entropy(z.to(torch.promote_types(z.dtype, torch.float32)), labels[:, 1:][scored])

    assert torch.isfinite(got.loss), f"loss {got.loss}"
    for out in (got, ref, yard) if hf_loss else (got,):
        torch.testing.assert_close(out.loss, loss_from_logits(out), rtol=1e-5, atol=1e-6, check_dtype=False)
    # per token, CE(z + d) - CE(z) = (p - y).d + d.H.d / 2 with |d.H.d| <= max|d|^2 (H: a softmax's
    # covariance): logits off by at most m = 2x HF's error move the loss by mean ||p - y||_1 m + m^2 / 2
    z = ref.logits[:, :-1][scored]
    m = 2.0 * max_abs_error(yard.logits[:, :-1][scored], z)
    l1 = (z.softmax(-1) - F.one_hot(labels[:, 1:][scored], z.shape[-1])).abs().sum(-1).mean().item()
    ref_loss = loss_from_logits(ref).item()
    bound = l1 * m + m * m / 2 + 1e-6 * abs(ref_loss)
    err = abs(got.loss.item() - ref_loss)
    assert err <= bound, f"bf16 loss: error {err:.3e} > {bound:.3e} (logits within 2x HF's error {m / 2:.3e})"
