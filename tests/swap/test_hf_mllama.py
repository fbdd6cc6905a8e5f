"""Mllama (Llama 3.2 Vision) through mmfast: vision attention with transformers' padded-query x padded-key
mask, text cross-attention layers (intervals, unused tiles, text before the image) with both gated
residuals through tanh_gated_linear.

Tiny random configs (no downloads): 2 tiles of 2x2 patches (+ [CLS] = 5, padded to 8 as transformers
does), a batch where the second image uses one of its two tiles, text rows before the image. Parity in
float64 on backend="reference"; one float32 run through the Triton interpreter with the tolerance rule
and a count of the mmfast ops that ran.
"""
import copy

import pytest
import torch


pytest.importorskip("transformers", reason="the transformers integration needs transformers")
from transformers import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402

from mmfast.swap.transformers._mllama import patch_mllama  # noqa: E402
from hf_models import MLLAMA_ROPE, OpCounter  # noqa: E402
from numerics import assert_close_by_rule  # noqa: E402
from hf_bypass_helpers import (FP64_TOL, assert_close, assert_grads_close, grads,  # noqa: E402
                               check_patch_generate_unpatch, patch_with, spy_kernels)

def tiny_mllama(seed=0):
    torch.manual_seed(seed)
    cfg = MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                           intermediate_size=64, vision_output_dim=64, image_size=16, patch_size=8, max_num_tiles=2,
                           intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, cross_attention_layers=[1],
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, **MLLAMA_ROPE),
        image_token_index=98)
    model = MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # gates start at 0 (tanh = 0): open them so the gated branches count
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.fill_(0.7)
    return model


def inputs(dtype, text_padding=False, two_images=False):
    g = torch.Generator().manual_seed(1)
    B, L, M = 2, 8, (2 if two_images else 1)
    ids = torch.randint(3, 97, (B, L), generator=g)
    ids[:, 2] = 98
    am = torch.ones(B, L, dtype=torch.long)
    if text_padding:
        am[1, :1] = 0
    xmask = torch.zeros(B, L, M, 2, dtype=torch.long)
    if two_images:  # rows 5-7 see both images, with image 0's unused tile between them (sample 0)
        ar_ids, ar_mask = torch.tensor([[1, 2], [3, 1]]), torch.tensor([[[1, 0], [1, 1]], [[1, 1], [1, 0]]])
        ids[:, 5] = 98
        xmask[:, 2:, 0] = ar_mask[:, None, 0]
        xmask[:, 5:, 1] = ar_mask[:, None, 1]
    else:
        ar_ids, ar_mask = torch.tensor([[2], [1]]), torch.tensor([[[1, 1]], [[1, 0]]])
        xmask[0, 2:, 0, :2] = 1      # rows 0-1: text before the image
        xmask[1, 2:, 0, :1] = 1      # second sample: one tile of two used
    return dict(input_ids=ids, attention_mask=am,
                pixel_values=torch.randn(B, M, 2, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype),
                aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask, cross_attention_mask=xmask)


def run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return out.logits.detach(), grads(model)


@pytest.mark.parametrize("flags,two_images", [(dict(), False), (dict(attention=False), False),
                                               (dict(gated=False), False), (dict(), True)],
                         ids=["all", "gated-only", "attention-only", "all-two-images"])
def test_forward_backward_match_transformers_fp64(flags, two_images):
    model = tiny_mllama().double()
    batch = inputs(torch.float64, two_images=two_images)
    logits, g = run(model, batch)
    report = patch_with(patch_mllama, model, **flags)
    n_vision = 2 if flags.get("attention", True) else 0
    n_gated_vision = 1 if flags.get("gated", True) else 0    # the global encoder layer's gate_attn / gate_ffn
    assert len(report.swapped) == n_vision + 1 + n_gated_vision + 1, str(report)   # + the tile embedding
    with spy_kernels() as calls:
        logits2, g2 = run(model, batch)
    # vision: 2 layers x (real keys, padded keys); cross layer: visible + padded tiles (text-before-image rows)
    assert calls["flash_attention"] == (6 if flags.get("attention", True) else 0)
    assert calls["tanh_gated_linear"] == 4 * n_gated_vision   # cross layer + global vision layer, 2 each
    assert_close(logits2, logits, FP64_TOL, "logits")
    assert_grads_close(g2, g, FP64_TOL)
    assert not report.fallbacks, report.fallbacks


def test_mmfast_patch_generation_identical_and_unpatch_bitwise():
    report = check_patch_generate_unpatch(tiny_mllama, inputs(torch.float64, text_padding=True), "Mllama")
    # hfcore's interface rows for the text self-attention, this file's for the vision and cross layers
    assert len(report.swapped) == 7 and sum("float" in r.was for r in report.swapped) == 3, str(report)
    assert sum("tile_patch_embed" in r.now for r in report.swapped) == 1, str(report)


def test_unexpressible_vision_mask_falls_back_counted():
    model = tiny_mllama().double()
    attn = model.model.vision_model.transformer.layers[0].self_attn
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    causal = torch.full((8, 8), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1).expand(2, 1, 8, 8)
    want, _ = attn(x, attention_mask=causal)
    report = patch_with(patch_mllama, model)
    got, _ = attn(x, attention_mask=causal)
    assert torch.equal(got, want)
    assert list(report.fallbacks.values()) == [1] and "padded-query" in next(iter(report.fallbacks))


def test_triton_interpreter_runs_mmfast_ops_within_rule():
    model = tiny_mllama()
    batch = inputs(torch.float32)
    eager32, g32 = run(model, batch)
    eager64, g64 = run(copy.deepcopy(model).double(), inputs(torch.float64))
    patch_with(patch_mllama, model, backend="triton")
    with OpCounter() as ops:
        patched, gp = run(model, batch)
    counts = ops.counts
    # vision: 2 layers x (real keys, padded keys); cross layer: visible + padded tiles for the text-before-image rows
    assert counts["flash_attention_fwd"] == 6 and counts["flash_attention_bwd"] == 6, dict(counts)
    assert counts["tanh_gated_linear_fwd"] == 4 and counts["tanh_gated_linear_bwd"] == 4, dict(counts)
    assert counts["patch_embed_fwd"] == 1 and counts["patch_embed_bwd"] == 1, dict(counts)   # the tile embedding
    assert_close_by_rule(patched, eager64, eager32, what="logits")
    for name, ref in g64.items():
        assert_close_by_rule(gp[name], ref, g32[name], factor=3.0, what=f"grad {name}")
