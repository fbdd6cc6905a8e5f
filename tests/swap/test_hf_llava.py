"""LLaVA and LLaVA-NeXT (CLIP vision tower + Llama with GQA) through mmfast.patch: left-padded batches,
outputs and gradients, greedy generation."""

import pytest
import torch

import hf_models as hf
from swap_helpers import compile_counting_ops

import mmfast


def _batch(image_tokens, text=5, pad=3):
    """Row 0 unpadded, row 1 left-padded by `pad` (as generation batches are)."""
    length = image_tokens + text
    rows = []
    for skip in (0, pad):
        rows.append(torch.cat([torch.full((image_tokens,), hf.IMAGE_TOKEN), hf.ids(1, text - skip, seed=5 + skip)[0]]))
    input_ids = torch.stack([torch.nn.functional.pad(r, (length - len(r), 0), value=0) for r in rows])
    return dict(input_ids=input_ids, attention_mask=hf.left_padding([length, length - pad], length))


def _llava_inputs():
    return dict(_batch(16), pixel_values=hf.pixels(2))


def _llava_next_inputs():
    return dict(_batch(36), pixel_values=torch.randn(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(6)),
                image_sizes=torch.tensor([[16, 16], [16, 16]]))


CASES = {"llava": (hf.llava, _llava_inputs), "llava_next": (hf.llava_next, _llava_next_inputs)}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_left_padded(name):
    build, inputs = CASES[name]
    report = hf.assert_parity(build(), inputs(), ("logits",))
    paths = {r.path for r in report.swapped}
    assert "model.language_model.layers.0.self_attn" in paths
    # the CLIP tower's embeddings: "model.vision_tower.embeddings" (5.x), ".vision_model.embeddings" under it (4.5x)
    assert paths & {"model.vision_tower.embeddings", "model.vision_tower.vision_model.embeddings"}, paths
    assert not report.fallbacks


@pytest.mark.parametrize("cache", [None, "static", "sliding_window"], ids=["dynamic", "static", "sliding"])
def test_llava_greedy_generation_identical(cache):
    """Greedy generation on a left-padded batch; the static and sliding-window caches have generate prepare the
    4-D mask before the forward, which then hands the prepared mask to the mask interface again."""
    model = hf.llava()
    inputs = _llava_inputs()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    if cache is not None:
        kwargs["cache_implementation"] = cache
    stock = model.generate(**inputs, **kwargs)
    report = mmfast.patch(model, backend="reference")
    patched = model.generate(**inputs, **kwargs)
    assert torch.equal(patched, stock)
    assert not report.fallbacks
    mmfast.unpatch(model)
    assert torch.equal(model.generate(**inputs, **kwargs), stock)


def test_patched_model_compiles_fullgraph():
    """torch.compile(fullgraph=True) of a patched model: the swaps (mask interface, attention, patch embedding)
    trace without a graph break into a graph that holds mmfast's custom ops, and it returns the eager patched
    model's logits."""
    if hf.transformers.__version__.startswith("4."):
        pytest.skip("transformers 4.5x's own LLaVA does not compile with fullgraph=True (a data-dependent guard)")
    model, batch = hf.llava(), _llava_inputs()
    mmfast.patch(model, backend="triton")
    eager = model(**batch).logits
    compiled_model, ops = compile_counting_ops(model)
    compiled = compiled_model(**batch).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert ops["patch_embed_fwd"] == 1 and ops["flash_attention_fwd"] >= 3, ops
