"""LLaVA / LLaVA-NeXT on the language models of their released checkpoints other than Llama (Mistral, Qwen2,
Qwen3, Gemma, Phi-3; Gemma 2 for its logit softcap) through mmfast.patch, left-padded batches.

Sliding windows (Mistral's, Qwen2's upper layers) are short enough here (8 < 21 tokens) to change the logits:
they reach flash_attention as per-row key intervals. Gemma 2's softcap is not in the kernel: every call of its
attention falls back to the eager math, counted. float64 on backend="reference": logits equal to
transformers' and greedy generation identical; float32 outputs and gradients within the tolerance rule for
Mistral and Qwen2, and one Triton-interpreter run of the sliding-window path.
"""
import pytest
import torch

import hf_models as hf
import mmfast
from hf_bypass_helpers import FP64_TOL, assert_close
from test_hf_llava import _batch

transformers = hf.transformers

LM = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
          num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LMS = {
    "mistral": dict(sliding_window=8),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),   # layer 1 slides, 0 not
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "phi3": dict(),
    "gemma2": dict(head_dim=16, sliding_window=8),
}
VISION = dict(hf.VISION, model_type="clip_vision_model", projection_dim=16)


def llava(lm, next_=False):
    text = dict(LM, model_type=lm, **LMS[lm])
    if next_:
        cfg = transformers.LlavaNextConfig(vision_config=VISION, text_config=text, image_token_index=hf.IMAGE_TOKEN,
                                           image_grid_pinpoints=[[16, 16]])
        return hf.seeded(lambda: transformers.LlavaNextForConditionalGeneration(cfg).eval())
    cfg = transformers.LlavaConfig(vision_config=VISION, text_config=text, image_token_index=hf.IMAGE_TOKEN)
    return hf.seeded(lambda: transformers.LlavaForConditionalGeneration(cfg).eval())


def inputs(next_=False, dtype=torch.float32):
    if next_:
        return dict(_batch(36), image_sizes=torch.tensor([[16, 16], [16, 16]]),
                    pixel_values=torch.randn(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(6), dtype=dtype))
    return dict(_batch(16), pixel_values=hf.pixels(2).to(dtype))


def _fallbacks(lm, report):
    if lm == "gemma2":   # 2 layers x (prefill + 6 decoding steps) + the forward
        assert set(report.fallbacks) == {"attention logit softcap"} and report.fallbacks["attention logit softcap"] > 0
    else:
        assert not report.fallbacks, report.fallbacks


CASES = [(lm, False) for lm in LMS] + [("mistral", True)]


@pytest.mark.filterwarnings("ignore:mmfast attention")
@pytest.mark.parametrize("lm,next_", CASES, ids=[("llava_next-" if n else "llava-") + lm for lm, n in CASES])
def test_logits_and_greedy_generation(lm, next_):
    """float64, except Gemma 2: its eager softmax is taken in float32, where the all-finfo(float64).min scores of
    left-padding rows give NaN that reaches every token of the row (0 · NaN) in some transformers releases
    (5.24) and not in others (5.17, another mask form). In float32 it runs the same eager math either way."""
    dtype, tol = (torch.float32, 1e-5) if lm == "gemma2" else (torch.float64, FP64_TOL)
    model, batch = llava(lm, next_).to(dtype), inputs(next_, dtype)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    # Gemma 2: the logits of the padding tokens (no one's output) come from rows that see no key, where the eager
    # math's answer depends on the mask form; elsewhere every position is compared
    real = batch["attention_mask"].bool()
    if lm != "gemma2":
        real = torch.ones_like(real)
    with torch.no_grad():
        want = model(**batch).logits
    stock = model.generate(**batch, **kwargs)
    report = mmfast.patch(model, backend="reference")
    assert not report.message and "model.language_model.layers.1.self_attn" in {r.path for r in report.swapped}
    with torch.no_grad():
        got = model(**batch).logits
    assert_close(got[real], want[real], tol, "logits")
    assert torch.equal(model.generate(**batch, **kwargs), stock)
    _fallbacks(lm, report)


@pytest.mark.parametrize("lm", ["mistral", "qwen2"])
def test_outputs_and_gradients_fp32_within_rule(lm):
    report = hf.assert_parity(llava(lm), inputs(), ("logits",))
    assert not report.fallbacks


def test_sliding_window_changes_the_logits():
    """The windows of these configs are short enough to matter (else the tests above could not see them)."""
    batch = inputs(dtype=torch.float64)
    with torch.no_grad():
        slide = llava("mistral").double()(**batch).logits
        LMS["mistral"] = dict(sliding_window=None)
        try:
            full = llava("mistral").double()(**batch).logits
        finally:
            LMS["mistral"] = dict(sliding_window=8)
    assert (slide - full).abs().max() > 1e-3


def test_triton_interpreter_sliding_window():
    model = llava("mistral")
    with hf.OpCounter() as ops:
        report = hf.assert_parity(model, inputs(), ("logits",), backend="triton", grads=False)
    assert not report.fallbacks
    assert ops.counts["flash_attention_fwd"] == 1 + 2, dict(ops.counts)   # vision layer + 2 sliding LM layers
