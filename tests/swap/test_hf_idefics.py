"""Idefics (v1) through mmfast: the Perceiver resampler's attention and the gated cross-attention layers
(image mask as intervals, tokens before any image gated out, float and per-channel gates through
tanh_gated_linear).

Tiny random configs (no downloads): 2 images per sample, 4 latents each, tokens before the first image.
Parity in float64 on backend="reference", with a count of the kernel calls the swapped modules made. The
Triton-interpreter run of these kernels inside a model is test_hf_mllama.py's (one model per path).
"""

import pytest
import torch


pytest.importorskip("transformers", reason="the transformers integration needs transformers")
from transformers import IdeficsConfig, IdeficsForVisionText2Text  # noqa: E402

from mmfast.swap.transformers._idefics import patch_idefics  # noqa: E402
from hf_bypass_helpers import (FP64_TOL, assert_close, assert_grads_close, check_patch_generate_unpatch,  # noqa: E402
                               grads, patch_with, spy_kernels)


def tiny_idefics(alpha_type="vector", seed=0):
    torch.manual_seed(seed)
    cfg = IdeficsConfig(
        vocab_size=100, additional_vocab_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, cross_layer_interval=1, qk_layer_norms=True, alpha_initializer="ones",
        alpha_type=alpha_type, freeze_text_layers=False, freeze_vision_layers=False,
        use_resampler=True, max_position_embeddings=64,
        vision_config=dict(embed_dim=32, image_size=16, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8, qk_layer_norms_perceiver=True))
    model = IdeficsForVisionText2Text(cfg).eval()
    with torch.no_grad():  # random gates of both signs (transformers' "normal" init fails for alpha_type="float")
        for layer in model.model.gated_cross_attn_layers:
            for alpha in (layer.alpha_cross_attn, layer.alpha_dense):
                alpha.normal_(0.0, 0.7)
    return model


def inputs(dtype, text_padding=False):
    g = torch.Generator().manual_seed(1)
    B, L = 2, 8
    iam = torch.zeros(B, L, 2, dtype=torch.long)
    iam[:, 2:5, 0] = 1           # rows 0-1 see no image (gated out)
    iam[:, 5:, 1] = 1
    am = torch.ones(B, L, dtype=torch.long)
    if text_padding:
        am[1, :1] = 0
    return dict(input_ids=torch.randint(3, 97, (B, L), generator=g), attention_mask=am, image_attention_mask=iam,
                pixel_values=torch.randn(B, 2, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype))


def run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    # transformers' Idefics loss views the logits as vocab_size wide, not vocab + additional: our own
    ids = batch["input_ids"]
    torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return out.logits.detach(), grads(model)


@pytest.mark.parametrize("alpha_type,flags", [("vector", {}), ("float", {}), ("float", dict(attention=False)),
                                              ("vector", dict(gated=False))],
                         ids=["vector-gates", "float-gates", "gated-only", "attention-only"])
def test_forward_backward_match_transformers_fp64(alpha_type, flags):
    model = tiny_idefics(alpha_type).double()
    batch = inputs(torch.float64)
    logits, g = run(model, batch)
    report = patch_with(patch_idefics, model, **flags)
    assert len(report.swapped) == (1 if flags.get("attention", True) else 0) + 2, str(report)
    with spy_kernels() as calls:
        logits2, g2 = run(model, batch)
    assert calls["flash_attention"] == (3 if flags.get("attention", True) else 0)  # perceiver + 2 layers
    assert calls["tanh_gated_linear"] == (4 if flags.get("gated", True) else 0)
    assert_close(logits2, logits, FP64_TOL, "logits")
    assert_grads_close(g2, g, FP64_TOL)
    assert not report.fallbacks, report.fallbacks


@pytest.mark.parametrize("qk_norms", [False, True], ids=["plain", "qk-layernorm"])
def test_perceiver_attention_matches_fp64(qk_norms):
    from transformers.models.idefics.perceiver import IdeficsPerceiverAttention

    torch.manual_seed(0)
    attn = IdeficsPerceiverAttention(32, 2, 8, qk_norms).double()
    context = torch.randn(3, 9, 32, dtype=torch.float64, requires_grad=True)
    latents = torch.randn(3, 4, 32, dtype=torch.float64, requires_grad=True)
    want = attn(context, latents)
    want_grads = torch.autograd.grad(want.square().sum(), (context, latents, *attn.parameters()))
    with spy_kernels() as calls:
        patch_with(patch_idefics, attn)
        got = attn(context, latents)
    got_grads = torch.autograd.grad(got.square().sum(), (context, latents, *attn.parameters()))
    assert calls["flash_attention"] == 1
    assert_close(got, want, FP64_TOL, "perceiver output")
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, FP64_TOL, "perceiver gradient")


def test_mmfast_patch_generation_identical_and_unpatch_bitwise():
    report = check_patch_generate_unpatch(tiny_idefics, inputs(torch.float64, text_padding=True), "Idefics")
    assert sum("eager einsum" in r.was or "float image" in r.was for r in report.swapped) == 3, str(report)


def test_gate_inconsistent_with_mask_falls_back_counted():
    model = tiny_idefics().double()
    layer = model.model.gated_cross_attn_layers[0]
    x, img = torch.randn(1, 3, 32, dtype=torch.float64), torch.randn(1, 4, 32, dtype=torch.float64)
    mask = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    mask[:, :, 0] = torch.finfo(torch.float64).min     # row 0 sees no image ...
    gate = torch.ones(1, 3, dtype=torch.float64)        # ... yet its gate lets the (uniform) attention through
    want = layer(x, None, img, image_attention_mask=mask, cross_attention_gate=gate)
    report = patch_with(patch_idefics, model)
    got = layer(x, None, img, image_attention_mask=mask, cross_attention_gate=gate)
    assert torch.equal(got, want)
    assert list(report.fallbacks.values()) == [1] and "gate" in next(iter(report.fallbacks))
