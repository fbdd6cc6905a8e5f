"""BLIP-2 through mmfast.patch: vision attention (fused qkv), Q-Former self / cross attention in fp32."""
import pytest
import torch

import hf_models as hf
import mmfast


def test_blip2_retrieval_parity():
    """ITC path: Q-Former queries cross-attend to the image; the text branch self-attends with padding."""
    model = hf.blip2_retrieval()
    inputs = dict(pixel_values=hf.pixels(2), input_ids=hf.ids(2, 7), attention_mask=hf.right_padding([7, 4], 7),
                  use_image_text_matching_head=False)
    report = hf.assert_parity(model, inputs, ("logits_per_image", "text_embeds", "image_embeds"))
    kinds = {r.was.split(" ")[0] for r in report.swapped}
    assert {"Blip2Attention", "Blip2QFormerMultiHeadAttention", "Blip2VisionEmbeddings"} <= kinds, kinds
    assert not report.fallbacks


def test_blip2_qformer_stays_fp32_in_a_half_model():
    """transformers keeps the Q-Former in fp32 (_keep_in_fp32_modules): the attention runs it in fp32."""
    model = hf.blip2_retrieval()
    model.vision_model.to(torch.bfloat16)
    inputs = dict(pixel_values=hf.pixels(2).to(torch.bfloat16), input_ids=hf.ids(2, 7),
                  attention_mask=hf.right_padding([7, 4], 7),
                  use_image_text_matching_head=True)
    with torch.no_grad():
        stock = model(**inputs).logits_per_image
        report = mmfast.patch(model, backend="reference")
        got = model(**inputs).logits_per_image
    assert any(r.path.startswith("qformer.") for r in report.swapped) and not report.fallbacks
    assert all(p.dtype == torch.float32 for p in model.qformer.parameters())
    assert got.dtype == stock.dtype == torch.float32
    torch.testing.assert_close(got, stock, rtol=1e-5, atol=1e-5)


def test_blip2_opt_left_padded_parity_and_generation():
    model = hf.blip2_generation()
    input_ids = torch.nn.functional.pad(torch.cat([torch.full((2, 4), 98), hf.ids(2, 5)], 1), (2, 0))
    input_ids[0, :2] = 5
    inputs = dict(pixel_values=hf.pixels(2), input_ids=input_ids, attention_mask=hf.left_padding([11, 9], 11))
    stock = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    report = hf.assert_parity(model, inputs, ("logits",))
    # 4.5x's OPT builds its own eager-style mask (left-padding rows hide every key): SDPA runs those calls
    expected = {"float attention mask with a row that hides every key"} if hf.MASK_CONTRACT_4X else set()
    assert any(r.path.startswith("language_model.") for r in report.swapped)
    assert set(report.fallbacks) == expected, report.fallbacks
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), stock)


def test_blip2_qformer_image_fully_masked_for_one_sample():
    """A sample whose image mask hides every key: eager's finfo.min row averages all values (4.5x's eager
    Q-Former, reproduced for those rows), and 5.x's interface path gives what its stock model gives."""
    qformer = hf.blip2_retrieval().qformer
    g = torch.Generator().manual_seed(3)
    inputs = dict(query_embeds=torch.randn(2, 4, 32, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                  encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]))
    report = hf.assert_parity(qformer, inputs, ("last_hidden_state",))
    assert any("Blip2QFormerMultiHeadAttention" in r.was for r in report.swapped), report


def test_blip2_qformer_saved_cross_attention_map_is_kept():
    """4.5x's Q-Former keeps its cross-attention map (and its gradient hook) when ``save_attention`` is set
    (LAVIS' Grad-CAM): such a layer runs its own forward, counted."""
    model = hf.blip2_retrieval()
    cross = model.qformer.encoder.layer[0].crossattention.attention
    if not hasattr(cross, "save_attention"):
        pytest.skip("this transformers' Q-Former keeps no attention maps (no save_attention)")
    cross.save_attention = True
    inputs = dict(pixel_values=hf.pixels(2), input_ids=hf.ids(2, 7), attention_mask=hf.right_padding([7, 4], 7),
                  use_image_text_matching_head=True)
    report = mmfast.patch(model, backend="reference")
    model(**inputs)
    vision = model.config.vision_config
    assert cross.get_attention_map().shape[-1] == (vision.image_size // vision.patch_size) ** 2 + 1
    assert list(report.fallbacks) == ["Blip2QFormerMultiHeadAttention: save_attention (the cross-attention map "
                                      "kept for Grad-CAM)"], report.fallbacks
