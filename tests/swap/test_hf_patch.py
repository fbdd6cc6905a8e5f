"""mmfast.patch / unpatch on transformers models: per instance, idempotent, undoable, all-or-nothing."""
import pytest
import torch

import hf_models as hf
import mmfast
import transformers


def _clip_inputs():
    return dict(input_ids=hf.ids(2, 7), attention_mask=hf.right_padding([7, 4], 7), pixel_values=hf.pixels(2),
                return_loss=True)


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return [out.loss, out.logits_per_text, out.text_model_output.last_hidden_state,
            out.vision_model_output.last_hidden_state]


def test_unpatch_restores_bit_identical_outputs_and_state():
    model = hf.clip()
    inputs = _clip_inputs()
    before = _outputs(model, inputs)
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    configs = [m.config for m in model.modules() if "config" in m.__dict__]
    mmfast.patch(model, backend="reference")
    assert {n: p for n, p in model.named_parameters()} == params and list(model.state_dict()) == keys
    patched = _outputs(model, inputs)
    assert not all(torch.equal(a, b) for a, b in zip(before, patched))   # something else ran
    assert mmfast.unpatch(model)
    after = _outputs(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert [m.config for m in model.modules() if "config" in m.__dict__] == configs
    assert all(c._attn_implementation == "sdpa" for c in configs)
    assert not any("forward" in m.__dict__ or "_mmfast_ctx" in m.__dict__ for m in model.modules())
    assert not mmfast.unpatch(model)


def test_patch_twice_is_a_no_op():
    model = hf.clip()
    first = mmfast.patch(model, backend="reference")
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    assert mmfast.patch(model, backend="reference") is first
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards


def test_models_built_afterwards_are_untouched():
    model = hf.clip()
    config = model.config
    mmfast.patch(model, backend="reference")
    assert model.config._attn_implementation == "mmfast"
    shared = transformers.CLIPModel(config)  # transformers shares config objects between models
    fresh = hf.clip()
    for other in (shared, fresh):
        assert other.config._attn_implementation == "sdpa"
        assert all(m.config._attn_implementation == "sdpa" for m in other.modules() if "config" in m.__dict__)
        assert not any("forward" in m.__dict__ for m in other.modules())


def test_unknown_model_type_is_left_unchanged_with_a_message():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    model = transformers.BertModel(cfg).eval()
    dicts = [dict(m.__dict__) for m in model.modules()]
    report = mmfast.patch(model)
    assert "'bert'" in report.message and "nothing was changed" in report.message
    assert not report.swapped
    assert [dict(m.__dict__) for m in model.modules()] == dicts
    assert model.config._attn_implementation == "sdpa" and not mmfast.unpatch(model)


def test_options_select_families():
    model = hf.clip()
    report = mmfast.patch(model, attention=False, loss=False, backend="reference")
    assert {r.now for r in report.swapped} == {"mmfast.kernels.patch_embed"}
    assert model.config._attn_implementation == "sdpa"
    report = mmfast.patch(model, patch_embed=False, backend="reference")   # other options: re-patched
    assert "mmfast.kernels.patch_embed" not in {r.now for r in report.swapped}
    assert "forward" not in model.vision_model.embeddings.__dict__


def test_float_bias_mask_falls_back_and_is_counted():
    """A user's 4-D float mask with a real bias reaches the attention as is: SDPA runs it, counted."""
    model = hf.seeded(lambda: transformers.LlamaModel(transformers.LlamaConfig(**hf.LLAMA)).eval())
    bias = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3)).tril()
    inputs = dict(input_ids=hf.ids(2, 6), attention_mask=bias)
    with torch.no_grad():
        stock = model(**inputs).last_hidden_state
        report = mmfast.patch(model, backend="reference")
        got = model(**inputs).last_hidden_state
    assert report.fallbacks == {"float attention mask with a bias (values other than 0 and the dtype's min / -inf)": 2}
    assert torch.equal(got, stock)
    assert "fallback" in str(report)


def test_transformers_outside_the_supported_range_is_refused(monkeypatch):
    from mmfast.swap import transformers as integration

    monkeypatch.setattr(integration, "SUPPORTED", ((9, 0), (10, 0)))
    model = hf.clip()
    report = mmfast.patch(model)
    assert "outside the range" in report.message and not report.swapped
    assert model.config._attn_implementation == "sdpa" and not mmfast.unpatch(model)
