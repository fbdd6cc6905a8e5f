"""SigLIP through mmfast.patch: attention (text padding, bidirectional), patch embedding, sigmoid loss."""
import pytest

import hf_models as hf
import mmfast

KEYS = ("loss", "logits_per_text", "text_model_output.last_hidden_state", "vision_model_output.last_hidden_state")


def _inputs(lengths=(9, 6, 3)):
    return dict(input_ids=hf.ids(3, 9), attention_mask=hf.right_padding(lengths, 9), pixel_values=hf.pixels(3),
                return_loss=True)


def test_siglip_parity():
    report = hf.assert_parity(hf.siglip(), _inputs(), KEYS)
    assert "mmfast.kernels.siglip_loss" in {r.now for r in report.swapped}
    assert not report.fallbacks


@pytest.mark.parametrize("size", [24], ids=["interpolated"])
def test_siglip_interpolate_pos_encoding(size):
    tower = hf.vision_tower(hf.siglip(), hf.transformers.SiglipVisionModel)
    hf.assert_parity(tower, dict(pixel_values=hf.pixels(2, size), interpolate_pos_encoding=True),
                     ("last_hidden_state",))


def test_siglip_triton_interpreter_runs_mmfast_ops():
    with hf.OpCounter() as ops:
        hf.assert_parity(hf.siglip(), _inputs(), KEYS, backend="triton")
    # siglip_loss runs the contrastive family's custom ops (one kernel pair for both losses)
    assert ops.counts["contrastive_loss_fwd"] == 1 and ops.counts["contrastive_loss_bwd"] == 1, ops.counts
    assert ops.counts["flash_attention_fwd"] == 2 and ops.counts["patch_embed_fwd"] == 1, ops.counts


def test_siglip_other_size_without_interpolation_raises():
    """The original fails on the table's shape there; the swap must not resample silently instead."""
    model = hf.vision_tower(hf.siglip(), hf.transformers.SiglipVisionModel)
    mmfast.patch(model, backend="reference")
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(pixel_values=hf.pixels(1, 24))
