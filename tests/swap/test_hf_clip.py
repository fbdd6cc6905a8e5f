"""CLIP through mmfast.patch: attention (vision; text causal + padding), patch embedding, contrastive loss."""
import hf_models as hf
import pytest
import torch
from swap_helpers import compile_counting_ops

import mmfast


def _inputs(batch=3, length=9, lengths=(9, 6, 3), size=16):
    return dict(input_ids=hf.ids(batch, length), attention_mask=hf.right_padding(lengths, length),
                pixel_values=hf.pixels(batch, size), return_loss=True)


KEYS = ("loss", "logits_per_text", "text_model_output.last_hidden_state", "vision_model_output.last_hidden_state")


@pytest.mark.parametrize("lengths", [(9, 9, 9), (9, 6, 3)], ids=["unpadded", "padded"])
def test_clip_parity(lengths):
    model = hf.clip()
    report = hf.assert_parity(model, _inputs(lengths=lengths), KEYS)
    rows = {r.now for r in report.swapped}
    assert rows == {"mmfast.kernels.flash_attention", "mmfast.kernels.patch_embed", "mmfast.kernels.contrastive_loss"}
    assert not report.fallbacks


def test_clip_interpolate_pos_encoding():
    model = hf.clip()
    inputs = dict(pixel_values=hf.pixels(2, size=24), interpolate_pos_encoding=True)
    tower = hf.vision_tower(model, hf.transformers.CLIPVisionModel)
    hf.assert_parity(tower, inputs, ("last_hidden_state", "pooler_output"))


def test_clip_triton_interpreter_runs_mmfast_ops():
    """One tiny CLIP through the Triton kernels (interpreter on CPU): attention, patch embedding, loss."""
    with hf.OpCounter() as ops:  # the stock runs inside call no mmfast op
        hf.assert_parity(hf.clip(), _inputs(), KEYS, backend="triton")
    # 2 towers x 1 layer of attention, forward and backward; one patch embedding; one loss
    assert ops.counts["flash_attention_fwd"] == 2 and ops.counts["flash_attention_bwd"] == 2, ops.counts
    assert ops.counts["patch_embed_fwd"] == 1 and ops.counts["patch_embed_bwd"] == 1, ops.counts
    assert ops.counts["contrastive_loss_fwd"] == 1 and ops.counts["contrastive_loss_bwd"] == 1, ops.counts


def test_patched_clip_compiles_fullgraph():
    """torch.compile(fullgraph=True): padded text, vision and loss swaps trace without a graph break into graphs
    holding mmfast's custom ops, and give the eager patched model's loss."""
    if hf.transformers.__version__.startswith("4."):
        pytest.skip("transformers 4.5x hands CLIP's text tower a float mask, whose values the swap reads on the host "
                    "(a graph break there; fullgraph=False compiles)")
    model, inputs = hf.clip(), _inputs()
    mmfast.patch(model, backend="triton")
    eager = model(**inputs).loss
    compiled_model, ops = compile_counting_ops(model)
    compiled = compiled_model(**inputs).loss
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert ops == {"flash_attention_fwd": 2, "patch_embed_fwd": 1, "contrastive_loss_fwd": 1}, ops
