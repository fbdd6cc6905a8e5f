"""BLIP (v1) through mmfast: its eager vision / text attention swapped per instance for flash_attention.

Tiny random configs (no downloads). Parity in float64 on backend="reference" (the same math as the eager
code, so any mask semantics difference shows), with a count of the kernel calls the swapped modules made.
The Triton-interpreter run of these kernels inside a model is test_hf_mllama.py's (one model per path).
"""
import copy

import pytest
import torch

import mmfast

pytest.importorskip("transformers", reason="the transformers integration needs transformers")
from transformers import BlipConfig, BlipForConditionalGeneration  # noqa: E402

from mmfast.swap.transformers._blip import patch_blip  # noqa: E402
from mmfast.swap.transformers._bypass import visible_keys  # noqa: E402
from swap_helpers import compile_counting_ops  # noqa: E402
from hf_bypass_helpers import (FP64_TOL, assert_close, assert_grads_close, grads, patch_with,  # noqa: E402
                               spy_kernels, unpatch)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_blip(seed=0):
    torch.manual_seed(seed)
    cfg = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, encoder_hidden_size=32,
                         bos_token_id=1, sep_token_id=98, pad_token_id=0),
        projection_dim=32)
    return BlipForConditionalGeneration(cfg).eval()


def inputs(dtype, padding):
    g = torch.Generator().manual_seed(1)
    px = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.randint(5, 98, (2, 7), generator=g)
    am = torch.ones(2, 7, dtype=torch.long)
    if padding == "left":
        am[1, :3] = 0
        ids[1, :3] = 0
    elif padding == "right":
        am[1, 4:] = 0
        ids[1, 4:] = 0
    labels = ids.masked_fill(am == 0, -100)
    return dict(pixel_values=px, input_ids=ids, attention_mask=am, labels=labels)


def run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), grads(model)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_forward_backward_match_eager_fp64(padding):
    model = tiny_blip().double()
    batch = inputs(torch.float64, padding)
    logits, g = run(model, batch)
    report = patch_with(patch_blip, model)
    assert len(report.swapped) == 1 + 2 * 2  # vision layer + (self, cross) per text layer
    with spy_kernels() as calls:
        logits2, g2 = run(model, batch)
    assert calls["flash_attention"] == 5
    assert_close(logits2, logits, FP64_TOL, "logits")
    assert_grads_close(g2, g, FP64_TOL)
    assert not report.fallbacks


def test_greedy_generation_identical_left_padded():
    model = tiny_blip().double()
    batch = inputs(torch.float64, "left")
    prompt = dict(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"][:, :5],
                  attention_mask=batch["attention_mask"][:, :5])
    want = model.generate(**copy.deepcopy(prompt), max_new_tokens=6, do_sample=False)
    report = patch_with(patch_blip, model)
    got = model.generate(**copy.deepcopy(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert not report.fallbacks


def test_generation_whose_attention_falls_back_keeps_the_cache():
    """Every decoding step falls back (attention weights requested) and hands the KV cache to transformers'
    own forward, under the keyword that release names it (past_key_values before the cache= rename)."""
    model = tiny_blip().double()
    batch = inputs(torch.float64, "left")
    prompt = dict(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"][:, :5],
                  attention_mask=batch["attention_mask"][:, :5], max_new_tokens=6, do_sample=False,
                  output_attentions=True, output_logits=True, return_dict_in_generate=True)
    want = model.generate(**copy.deepcopy(prompt))
    report = patch_with(patch_blip, model)
    got = model.generate(**copy.deepcopy(prompt))
    assert torch.equal(got.sequences, want.sequences)
    # the logits too: a tiny model's greedy tokens can survive a lost cache, its logits do not
    assert torch.equal(torch.stack(got.logits), torch.stack(want.logits))
    assert sum(report.fallbacks.values()) > 0 and all("output_attentions" in r for r in report.fallbacks)


def test_unpatch_restores_bitwise_and_other_models_untouched():
    model = tiny_blip()
    other = tiny_blip()
    batch = inputs(torch.float32, "left")
    with torch.no_grad():
        before = model(**batch).logits
    patch_with(patch_blip, model)
    assert all("forward" not in m.__dict__ for m in other.modules())
    assert unpatch(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_mmfast_patch_twice_is_a_noop_and_attention_false_leaves_all():
    model = tiny_blip()
    report = mmfast.patch(model, backend="reference")
    assert report.integration == "transformers" and len(report.swapped) == 6, str(report)  # + the patch embedding
    forwards = {n: m.__dict__["forward"] for n, m in model.named_modules() if "forward" in m.__dict__}
    assert mmfast.patch(model, backend="reference") is report
    assert {n: m.__dict__["forward"] for n, m in model.named_modules() if "forward" in m.__dict__} == forwards
    assert model.text_decoder.config._attn_implementation == "eager"  # BLIP keeps its eager masks
    fresh = tiny_blip()
    off = patch_with(patch_blip, fresh, attention=False)
    assert not off.swapped and len(off.left) == 5
    assert all("forward" not in m.__dict__ for m in fresh.modules())


def test_attention_weights_requested_fall_back_counted():
    model = tiny_blip().double()
    batch = inputs(torch.float64, "left")
    with torch.no_grad():
        want = model(**batch, output_attentions=True)
    report = patch_with(patch_blip, model)
    with torch.no_grad():
        got = model(**batch, output_attentions=True)
    assert torch.equal(got.logits, want.logits)
    assert sum(report.fallbacks.values()) == 5 and all("output_attentions" in r for r in report.fallbacks)


def test_attention_dropout_in_training_falls_back_counted():
    model = tiny_blip().double().train()
    for m in model.modules():
        if type(m).__name__ == "BlipTextSelfAttention":
            m.dropout.p = 0.1
    report = patch_with(patch_blip, model)
    model(**inputs(torch.float64, "none"))
    assert report.fallbacks == {"BlipTextSelfAttention: attention dropout > 0 in training": 4}, report.fallbacks


def test_class_forward_left_on_the_instance_is_not_taken_for_a_swap():
    """transformers 4.5x leaves the class's forward, bound, on every module it recorded outputs of
    (output_attentions=True): patching afterwards must still swap them."""
    model = tiny_blip().double()
    for m in model.modules():
        if type(m).__name__ in ("BlipAttention", "BlipTextSelfAttention"):
            m.forward = m.forward
    report = patch_with(patch_blip, model)
    assert len(report.swapped) == 5, report
    with spy_kernels() as calls:
        run(model, inputs(torch.float64, "right"))
    assert calls["flash_attention"] == 5


def test_bert_additive_mask_hides_keys():
    """4.5x's BLIP text adds (1 - m) * -10000: exp(-10000) is 0 in every float dtype, so those keys are hidden."""
    row = torch.tensor([0.0, -10000.0, torch.finfo(torch.float32).min, float("-inf")])
    assert visible_keys(row.expand(1, 1, 2, 4), 1, 2, 4).tolist() == [[[True, False, False, False]] * 2]
    assert visible_keys(torch.tensor([0.0, -9000.0]).expand(1, 1, 1, 2), 1, 1, 2) is None   # a bias, not hiding


def test_patched_model_compiles_with_graph_breaks_at_the_mask_checks():
    """A module that bypasses the attention interface reads its float mask's values on the host (whether the
    kernel can express it), so torch.compile breaks the graph there: fullgraph=True is refused, the default
    compiles, runs the kernels in its graphs and returns the eager patched model's logits."""
    model, batch = tiny_blip(), inputs(torch.float32, "left")
    mmfast.patch(model, backend="triton")  # custom ops in the graph (the reference backend is inlined torch code)
    eager = model(**batch).logits
    compiled_model, ops = compile_counting_ops(model, fullgraph=False)
    compiled = compiled_model(**batch).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert ops["patch_embed_fwd"] == 1 and ops["flash_attention_fwd"] >= 3, ops
