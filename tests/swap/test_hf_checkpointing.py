"""mmfast.patch under transformers' gradient checkpointing, as PEFT fine-tuning runs: the checkpointed layers'
forwards run again in the backward (reentrant or not) and must take mmfast's path again, and the fused patch
embeddings must reproduce transformers' input-grad hook. Loss, logits and every gradient as the unpatched
model's with the same checkpointing (float64, backend="reference"), for LLaVA (attention through
AttentionInterface, a left-padded batch) and Mllama (cross-attention layers and gated residuals that bypass
it, the tile embedding). Runs on transformers 4.5x too (test_hf_transformers4.py), where the input-grad hooks
are placed as 5.x places them (see _hook_every_input_embedding)."""
import collections

import pytest
import torch

import hf_models as hf
import mmfast
from hf_bypass_helpers import FP64_TOL, assert_close, assert_grads_close, grads
from test_hf_llava import _llava_inputs
from test_hf_mllama import inputs as mllama_inputs
from test_hf_mllama import tiny_mllama

def _llava():
    """hf_models.llava with two vision layers: the features (layer -2) then come out of a checkpointed layer."""
    vision = dict(hf.VISION, num_hidden_layers=2, model_type="clip_vision_model", projection_dim=16)
    config = hf.transformers.LlavaConfig(vision_config=vision, text_config=dict(hf.LLAMA, model_type="llama"),
                                         image_token_index=hf.IMAGE_TOKEN)
    return hf.seeded(lambda: hf.transformers.LlavaForConditionalGeneration(config)).double()


CASES = {
    "llava": (_llava, lambda: {k: v.double() if v.is_floating_point() else v for k, v in _llava_inputs().items()}),
    "mllama": (lambda: tiny_mllama().double(), lambda: mllama_inputs(torch.float64)),
}


def _train_step(model, batch, calls):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"])
    forward_calls = sum(calls.values())
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), grads(model), forward_calls


@pytest.fixture
def kernel_calls(monkeypatch):
    """Calls of flash_attention / tanh_gated_linear from the swapped code (any backend)."""
    from mmfast.nn import gated_cross_attention, split_attention
    from mmfast.swap.transformers import _attention, _bypass

    calls = collections.Counter()
    for module, name in ((_attention, "flash_attention"), (_bypass, "flash_attention"),
                         (gated_cross_attention, "tanh_gated_linear"), (split_attention, "flash_attention")):
        def counted(*args, _fn=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


def _hook_every_input_embedding(model):
    """transformers' input-grad hook on every sub-model's input embeddings, the vision patch convolutions included,
    as transformers 5.x's gradient_checkpointing_enable sets it (enable_input_require_grads on each sub-model).
    4.5x calls it only under PEFT and hooks only the top model's (the text embeddings): there the sub-models whose
    embeddings are not hooked yet hook their own, through the same transformers method."""
    for module in model.modules():
        if isinstance(module, hf.transformers.PreTrainedModel):
            embeddings = module.get_input_embeddings()
            if not embeddings._forward_hooks:
                module.enable_input_require_grads()
    return model


def _record_vision_input_grad(model):
    """Whether the hidden states entering the first vision layer required grad, per call. Only the input-grad mark
    makes them (the embeddings are frozen): seen directly, also where the vision layers are not checkpointed
    (4.5x's Mllama), where a lost mark would not change any gradient."""
    name, layer = next((n, m) for n, m in model.named_modules() if "vision" in n and n.endswith(".layers.0"))
    seen = []

    def record(module, args, kwargs):
        hidden = next(v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.is_floating_point())
        seen.append(hidden.requires_grad)

    layer.register_forward_pre_hook(record, with_kwargs=True)
    return seen


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("name", list(CASES))
def test_gradient_checkpointing_matches_and_recomputes_on_mmfast(name, reentrant, kernel_calls):
    build, inputs = CASES[name]
    batch = inputs()
    stock, patched = build().train(), build().train()
    for model in (stock, patched):
        # only the layers train, as with adapters: with reentrant checkpointing their parameters get gradients
        # only because transformers' input-grad hook marks the embeddings' outputs (the patch embeddings' too,
        # which mmfast's fused kernels replace and must mark themselves)
        for param_name, param in model.named_parameters():
            param.requires_grad_(".layers." in param_name)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        _hook_every_input_embedding(model)
    marked = [_record_vision_input_grad(model) for model in (stock, patched)]
    loss, logits, expected_grads, _ = _train_step(stock, batch, kernel_calls)
    report = mmfast.patch(patched, backend="reference")
    kernel_calls.clear()
    got_loss, got_logits, got_grads, forward_calls = _train_step(patched, batch, kernel_calls)
    assert_close(got_loss, loss, FP64_TOL, "loss")
    assert_close(got_logits, logits, FP64_TOL, "logits")
    assert_grads_close(got_grads, expected_grads, FP64_TOL)
    assert any(".encoder.layers.0." in n or "vision_model.transformer.layers.0." in n for n in got_grads), \
        sorted(got_grads)  # the vision layers train: the input-grad mark reached them
    assert marked[0] and all(marked[0]) and marked[1] and all(marked[1]), marked
    assert not report.fallbacks, report.fallbacks
    # the backward recomputed the checkpointed layers through the kernels again
    assert forward_calls > 0 and sum(kernel_calls.values()) > forward_calls, (forward_calls, kernel_calls)
