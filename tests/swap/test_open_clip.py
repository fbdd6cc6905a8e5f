"""mmfast.patch on open_clip: tiny CLIP towers and text variants (float64, backend="reference") before vs after,
the causal-buffer check, fallbacks, unpatch / isolation, and ClipLoss / SigLipLoss."""
import pytest
import torch
from swap_helpers import assert_bitwise, assert_same, forward_is_swapped, run, run_compiled

pytest.importorskip("open_clip", reason="every test here patches an open_clip model or loss (open_clip_torch is "
                                        "an optional package; pip install -e .[dev])")
from open_clip.loss import ClipLoss, CoCaLoss, SigLipLoss  # noqa: E402
from open_clip.model import CLIP  # noqa: E402
from open_clip.transformer import TextTransformer  # noqa: E402

import mmfast  # noqa: E402

L, VOCAB = 9, 50


def clip(**vision):
    torch.manual_seed(0)
    vision_cfg = dict(image_size=16, patch_size=4, width=32, layers=1, head_width=16, **vision)
    text_cfg = dict(context_length=L, vocab_size=VOCAB, width=32, heads=2, layers=1)
    return CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg).double()


def text_tower(**kw):
    torch.manual_seed(0)
    return TextTransformer(context_length=L, vocab_size=VOCAB, width=32, heads=2, layers=1, output_dim=16,
                           **kw).double()


def inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, L), generator=g)
    ids[0, 5:] = 0  # a padded row
    return torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64), ids


VISION = {"plain": {}, "attention-pool": {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}}


@pytest.mark.parametrize("vision", VISION.values(), ids=VISION.keys())
def test_clip_before_vs_after(vision):
    model = clip(**vision)
    images, ids = inputs()
    before = run(model, images, ids)
    report = mmfast.patch(model, backend="reference")
    rows = {r.path: r for r in report.swapped}
    assert "visual.conv1" in rows and "transformer.resblocks.0.attn" in rows
    assert rows["transformer.resblocks.0.attn"].note == "causal buffer verified"
    assert rows["visual.transformer.resblocks.0.attn"].note == ""
    if vision:
        assert "visual.attn_pool.attn" in rows
    assert_same(run(model, images, ids), before, "CLIP")
    assert not report.fallbacks and not report.left


TEXT = {"pad-mask-bidirectional": {"no_causal_mask": True, "use_pad_mask": True},
        "coca-cls-legacy": {"embed_cls": True}, "coca-cls-correct": {"embed_cls": True, "correct_cls_mask": True}}


@pytest.mark.parametrize("kw", TEXT.values(), ids=TEXT.keys())
def test_padded_text_runs_the_kernel_with_key_padding(kw):
    model = text_tower(**kw)
    _, ids = inputs()
    before = run(model, ids)
    report = mmfast.patch(model, backend="reference")
    assert_same(run(model, ids), before, str(kw))
    assert not report.fallbacks  # the pad mask was recognised, not handed back to torch


@pytest.mark.parametrize("tower", ["clip-causal-buffer", "text-pad-mask"])
def test_torch_compile_fullgraph(tower):
    """The causal buffer is verified once while tracing (its check syncs with the host); the pad mask is recognised
    by identity, which the trace keeps. Before, the buffer's version check stopped fullgraph tracing."""
    model = clip() if tower == "clip-causal-buffer" else text_tower(no_causal_mask=True, use_pad_mask=True)
    images, ids = inputs()
    args = (images, ids) if tower == "clip-causal-buffer" else (ids,)
    before = run(model, *args)
    report = mmfast.patch(model, backend="reference")
    torch._dynamo.reset()
    assert_same(run_compiled(model, *args), before, tower)
    assert not report.fallbacks


def test_causal_buffer_written_after_patch_is_rechecked():
    model = text_tower()
    _, ids = inputs()
    report = mmfast.patch(model, backend="reference")
    with torch.no_grad():
        model.attn_mask[0, 1] = 0.0  # no longer causal: must not run as causal=True
    out = model(ids)
    assert sum(report.fallbacks.values()) == 1 and "not recognised" in next(iter(report.fallbacks))
    mmfast.unpatch(model)
    assert torch.equal(out, model(ids))
    report = mmfast.patch(model, backend="reference")  # checked at patch time too
    assert [r.path for r in report.left] == ["attn_mask"]


def test_causal_buffer_replaced_by_to_is_verified_again():
    model = text_tower()
    _, ids = inputs()
    ref = model(ids)
    report = mmfast.patch(model, backend="reference")
    model.float().double()  # new buffer objects
    assert (model(ids) - ref).abs().max().item() <= 1e-12
    assert not report.fallbacks


def test_need_weights_and_foreign_masks_fall_back():
    model = clip()
    mmfast.patch(model, backend="reference")
    attn = model.transformer.resblocks[0].attn
    x = torch.randn(2, L, 32, dtype=torch.float64)
    _, weights = attn(x, x, x, need_weights=True)
    assert weights is not None
    mask = torch.zeros(L, L, dtype=torch.float64)  # equal in value to no mask, but not the verified buffer
    out, _ = attn(x, x, x, need_weights=False, attn_mask=mask)
    ref, _ = torch.nn.MultiheadAttention.forward(attn, x, x, x, need_weights=False, attn_mask=mask)
    assert torch.equal(out, ref)
    assert sum(mmfast.patch(model, backend="reference").fallbacks.values()) == 2


def test_unpatch_bitwise_repatch_noop_and_later_models_untouched():
    model = clip()
    images, ids = inputs()
    ref = run(model, images, ids)
    report = mmfast.patch(model, backend="reference")
    assert mmfast.patch(model, backend="reference") is report
    other = clip()
    assert not any(forward_is_swapped(m) or "_embeds" in m.__dict__ for m in other.modules())
    mmfast.unpatch(model)
    assert not any(forward_is_swapped(m) or "_embeds" in m.__dict__ for m in model.modules())
    assert_bitwise(run(model, images, ids), ref, "after unpatch")


def _features(n=6, d=16, seed=4):
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
            for _ in range(2))
    return a.requires_grad_(), b.requires_grad_()


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss], ids=["clip", "siglip"])
def test_losses_before_vs_after(loss_cls):
    loss = loss_cls()
    scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)  # open_clip passes logit_scale.exp()
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    extra = (bias,) if loss_cls is SigLipLoss else ()

    def value_and_grads():
        a, b = _features()
        value = loss(a, b, scale, *extra)
        leaves = (a, b, scale) + extra
        return value.detach(), torch.autograd.grad(value, leaves)

    ref_value, ref_grads = value_and_grads()
    report = mmfast.patch(loss, backend="reference")
    assert report.swapped[0].now in ("mmfast contrastive_loss", "mmfast siglip_loss")
    value, grads = value_and_grads()
    assert abs(value.item() - ref_value.item()) <= 1e-12 * abs(ref_value.item())
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max().item() <= 1e-12
    a, b = _features()
    assert set(loss(a, b, scale, *extra, output_dict=True)) == {"contrastive_loss"}


def test_loss_configurations_we_do_not_reproduce_are_left_alone():
    report = mmfast.patch(ClipLoss(world_size=2, rank=0, local_loss=False), backend="reference")
    assert not report.swapped and "local_loss=True" in report.left[0].note
    report = mmfast.patch(CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0), backend="reference")
    assert not report.swapped and "overrides" in report.left[0].note
