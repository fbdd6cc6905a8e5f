"""BLIP (v1) patch embedding (BlipVisionEmbeddings) through patch_embed: mmfast/swap/transformers/_embeddings.py.

float64 on backend="reference" against transformers' own module: the three BLIP heads end to end (the
embedding swapped by `mmfast.patch`, attention and all), then the embedding alone at the sizes its forward
treats differently: interpolate_pos_encoding (square, non-square, the table's own grid), a smaller image
without it (transformers adds the table's first rows), a size not divisible by the patch (the conv drops the
remainder). One float32 run through the Triton interpreter within the tolerance rule.
"""
import copy

import pytest
import torch

import mmfast

pytest.importorskip("transformers", reason="the transformers integration needs transformers")
import transformers  # noqa: E402

from mmfast.swap.transformers import _embeddings  # noqa: E402
from hf_bypass_helpers import FP64_TOL, assert_close, assert_grads_close, grads  # noqa: E402
from numerics import assert_close_by_rule  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config():
    return transformers.BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, encoder_hidden_size=32,
                         bos_token_id=1, sep_token_id=98, pad_token_id=0),
        projection_dim=32, image_text_hidden_size=32)


def batch(size=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 98, (2, 6), generator=g)
    return dict(pixel_values=torch.randn(2, 3, size, size, generator=g, dtype=torch.float64), input_ids=ids,
                attention_mask=torch.ones(2, 6, dtype=torch.long))


HEADS = {
    "captioning": (transformers.BlipForConditionalGeneration, "logits", dict(interpolate_pos_encoding=True)),
    "retrieval": (transformers.BlipForImageTextRetrieval, "itm_score", {}),
    "vqa": (transformers.BlipForQuestionAnswering, "loss", {}),
}


@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
def test_blip_heads_match_transformers_fp64(head, monkeypatch):
    cls, key, extra = head
    torch.manual_seed(0)
    model = cls(config()).double().eval()
    inputs = dict(batch(24 if extra else 16), **extra)
    if cls is transformers.BlipForQuestionAnswering:
        inputs["labels"] = inputs["input_ids"]

    def run():
        model.zero_grad(set_to_none=True)
        out = getattr(model(**inputs), key)
        out.double().pow(2).sum().backward()
        return out.detach(), grads(model)

    want = run()
    calls = []
    op = _embeddings.patch_embed
    monkeypatch.setattr(_embeddings, "patch_embed", lambda *a, **k: calls.append(1) or op(*a, **k))
    report = mmfast.patch(model, backend="reference")
    assert [r.now for r in report.swapped if r.path.endswith("embeddings")] == ["mmfast.kernels.patch_embed"]
    got = run()
    assert calls == [1]
    assert_close(got[0], want[0], FP64_TOL, key)
    assert_grads_close(got[1], want[1], FP64_TOL)
    assert mmfast.unpatch(model)


SIZES = {  # (height, width, interpolate_pos_encoding)
    "table-grid": (16, 16, False),
    "interpolate-square": (24, 24, True),
    "interpolate-non-square": (16, 28, True),
    "interpolate-own-grid": (16, 16, True),
    "smaller-no-interpolation": (12, 12, False),
    "not-divisible": (18, 19, False),
}


def embeddings():
    torch.manual_seed(0)
    return transformers.BlipVisionModel(config().vision_config).embeddings.double()


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_embedding_sizes_match_transformers_fp64(size):
    H, W, interpolate = size
    module = embeddings()
    x = torch.randn(2, 3, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def run():
        module.zero_grad(set_to_none=True)
        out = module(x, interpolate_pos_encoding=interpolate)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        return out.detach(), grads(module)

    want = run()
    module.forward = _embeddings.blip_forward("reference").__get__(module)
    got = run()
    assert_close(got[0], want[0], FP64_TOL, "embeddings")
    assert_grads_close(got[1], want[1], FP64_TOL)


def test_larger_image_without_interpolation_raises_as_transformers():
    module = embeddings()
    module.forward = _embeddings.blip_forward("reference").__get__(module)
    with pytest.raises(RuntimeError):
        module(torch.randn(1, 3, 24, 24, dtype=torch.float64))


def test_triton_interpreter_within_rule():
    module = embeddings().float()
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    ref = copy.deepcopy(module).double()(x.double(), interpolate_pos_encoding=True)
    stock = module(x, interpolate_pos_encoding=True)
    module.forward = _embeddings.blip_forward("triton").__get__(module)
    assert_close_by_rule(module(x, interpolate_pos_encoding=True), ref, stock, what="embeddings")
