"""ViT through mmfast.patch: attention and ViTEmbeddings (interpolation, masked patches)."""
import pytest
import torch

import hf_models as hf
import transformers


@pytest.mark.parametrize("size,interpolate", [(16, False), (24, True)], ids=["native", "interpolated"])
def test_vit_parity(size, interpolate):
    model = hf.vit()
    inputs = dict(pixel_values=hf.pixels(2, size), interpolate_pos_encoding=interpolate)
    report = hf.assert_parity(model, inputs, ("last_hidden_state", "pooler_output"))
    assert {r.now for r in report.swapped} == {"mmfast.kernels.flash_attention", "mmfast.kernels.patch_embed"}


def test_vit_masked_patches():
    cfg = transformers.ViTConfig(**hf.VISION, encoder_stride=4)
    model = hf.seeded(lambda: transformers.ViTForMaskedImageModeling(cfg).eval())
    masked = torch.rand(2, 16, generator=torch.Generator().manual_seed(4)) < 0.5
    hf.assert_parity(model, dict(pixel_values=hf.pixels(2), bool_masked_pos=masked), ("reconstruction",))
