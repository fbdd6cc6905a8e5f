"""Mllama's tile patch embedding through tile_patch_embed (mmfast/swap/transformers/_mllama_tiles.py).

Tiny random MllamaForConditionalGeneration models with 1 to 4 tiles of 2x2 patches (one size with a remainder
the conv drops), one or two images per sample, aspect ratio ids of every kind the config lists and unused
tiles holding random pixels (transformers embeds them, and real vision queries attend to them). float64 on
backend="reference": logits and every gradient equal to transformers' up to float64 rounding; the op ran once
per forward. The Triton-interpreter run of the same swap is in test_hf_mllama.py (whole model, op counts).
"""
import copy

import pytest
import torch

pytest.importorskip("transformers", reason="the transformers integration needs transformers")
from transformers import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402

from mmfast.swap.transformers import _mllama_tiles  # noqa: E402
from mmfast.swap.transformers._mllama import patch_mllama  # noqa: E402
from hf_bypass_helpers import FP64_TOL, assert_close, assert_grads_close, patch_with  # noqa: E402
from test_hf_mllama import run  # noqa: E402   (logits and gradients of the LM loss)
from hf_models import MLLAMA_ROPE  # noqa: E402


RATIOS = {1: [[1, 1]], 2: [[1, 1], [1, 2], [2, 1]], 3: [[1, 1], [1, 2], [2, 1], [1, 3], [3, 1]],
          4: [[1, 1], [1, 2], [2, 1], [2, 2], [1, 4]]}
# tiles, aspect_ratio_ids (B, M), tiles used per image (B, M), tile size; ids index RATIOS[tiles] from 1
CASES = {
    "1-tile": (1, [[1], [1]], [[1], [1]], (16, 16)),
    "3-tiles-2-images-padded": (3, [[2, 4], [5, 1]], [[2, 3], [3, 1]], (16, 16)),
    "4-tiles-padded": (4, [[4], [2], [5]], [[4], [2], [4]], (16, 16)),
    "2-tiles-19x21-remainder-dropped": (2, [[2], [3]], [[2], [2]], (19, 21)),   # the conv ignores the remainder
}


def tiny(tiles, seed=0):
    torch.manual_seed(seed)
    cfg = MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                           intermediate_size=64, vision_output_dim=64, image_size=16, patch_size=8,
                           max_num_tiles=tiles, intermediate_layers_indices=[0], supported_aspect_ratios=RATIOS[tiles]),
        text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, cross_attention_layers=[1],
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, **MLLAMA_ROPE),
        image_token_index=98)
    model = MllamaForConditionalGeneration(cfg).eval().double()
    with torch.no_grad():  # gates start at 0 (tanh = 0): open them so every table counts
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.fill_(0.7)
    return model


def batch(tiles, ar_ids, used, size=(16, 16)):
    ar_ids, used = torch.tensor(ar_ids), torch.tensor(used)
    B, M = ar_ids.shape
    g = torch.Generator().manual_seed(1)
    L = 9
    ids = torch.randint(3, 97, (B, L), generator=g)
    ar_mask = (torch.arange(tiles)[None, None, :] < used[..., None]).long()
    xmask = torch.zeros(B, L, M, tiles, dtype=torch.long)
    for m in range(M):  # image m at position 2 + 3m; text after it sees it (its used tiles)
        ids[:, 2 + 3 * m] = 98
        xmask[:, 2 + 3 * m:, m] = ar_mask[:, None, m]
    return dict(input_ids=ids, attention_mask=torch.ones(B, L, dtype=torch.long),
                pixel_values=torch.randn(B, M, tiles, 3, *size, generator=g, dtype=torch.float64),
                aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask, cross_attention_mask=xmask)


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    op = _mllama_tiles.tile_patch_embed

    def spy(*args, **kwargs):
        calls.append(kwargs.get("tile_mask"))
        return op(*args, **kwargs)

    monkeypatch.setattr(_mllama_tiles, "tile_patch_embed", spy)
    return calls


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_logits_and_grads_match_transformers_fp64(case, op_calls):
    tiles, ar_ids, used, size = case
    model, inputs = tiny(tiles), batch(tiles, ar_ids, used, size)
    want = run(model, inputs)
    report = patch_with(patch_mllama, model)
    assert any("tile_patch_embed" in r.now for r in report.swapped), str(report)
    got = run(model, inputs)
    assert_close(got[0], want[0], FP64_TOL, "logits")
    assert_grads_close(got[1], want[1], FP64_TOL)
    assert op_calls == [None], "one launch per forward, every tile computed (no tile_mask)"
    assert not report.fallbacks, report.fallbacks


def test_copy_stage_modules_and_unpatch():
    model, inputs = tiny(3), batch(3, [[2, 4], [5, 1]], [[2, 3], [3, 1]])
    with torch.no_grad():
        want = model(**inputs).logits
    patch_with(patch_mllama, model, attention=False, gated=False)
    twin = copy.deepcopy(model)   # the copy's stages follow the copy's own run
    with torch.no_grad():
        assert_close(twin(**inputs).logits, want, FP64_TOL, "logits of a deep copy")
        vision = model.model.vision_model   # outside a run every stage is transformers' own
        h = torch.randn(2, 3, 5, 32, dtype=torch.float64)
        ar = torch.tensor([[1], [2]])
        assert torch.equal(vision.gated_positional_embedding(h, ar),
                           type(vision.gated_positional_embedding).forward(vision.gated_positional_embedding, h, ar))
    from hf_bypass_helpers import unpatch
    assert unpatch(model) and "forward" not in model.model.vision_model.patch_embedding.__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)


def test_input_grad_hook_is_reproduced(op_calls):
    """transformers' enable_input_require_grads (called by gradient checkpointing) hooks the vision conv to mark
    its output as requiring grad: the fused embedding runs and marks its own output (frozen weights here, so
    only the mark can make it require grad)."""
    model, inputs = tiny(1), batch(1, [[1], [1]], [[1], [1]])
    model.requires_grad_(False)
    model.enable_input_require_grads()
    vision = model.model.vision_model
    if not vision.patch_embedding._forward_hooks:   # 4.5x hooks the text embeddings only: ask the tower itself
        vision.enable_input_require_grads()
    assert vision.patch_embedding._forward_hooks
    seen = {}
    vision.layernorm_pre.register_forward_hook(lambda m, args, out: seen.update(grad=args[0].requires_grad))
    want = model(**inputs).logits
    assert seen["grad"]
    patch_with(patch_mllama, model, attention=False, gated=False)
    seen.clear()
    assert torch.equal(model(**inputs).logits, want)
    assert seen["grad"] and len(op_calls) == 1


def test_other_hooks_on_the_conv_fall_back_counted(op_calls):
    model, inputs = tiny(1), batch(1, [[1], [1]], [[1], [1]])
    model.model.vision_model.patch_embedding.register_forward_hook(lambda m, args, out: out * 2)
    with torch.no_grad():
        want = model(**inputs).logits
    report = patch_with(patch_mllama, model, attention=False, gated=False)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)
    assert op_calls == [] and list(report.fallbacks.values()) == [1], report.fallbacks
    assert "patch_embedding is a torch.nn.modules.conv.Conv2d with hooks" in next(iter(report.fallbacks))


def test_stage_out_of_order_raises():
    """A transformers release that reordered the embedding stages must fail loudly, not compute otherwise."""
    model = tiny(1)
    vision = model.model.vision_model
    patch_with(patch_mllama, model, attention=False, gated=False)
    run_ = _mllama_tiles._Run(vision, torch.zeros(2, 1, 5, 32, dtype=torch.float64))
    token = _mllama_tiles._RUN.set(run_)
    try:
        with pytest.raises(RuntimeError, match="expected patch_embedding"):
            vision.apply_class_embedding(torch.zeros(2, 4, 32, dtype=torch.float64))
    finally:
        _mllama_tiles._RUN.reset(token)
