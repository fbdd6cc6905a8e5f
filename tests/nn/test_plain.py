"""mmfast.nn.plain: where a fused kernel may read a layer's weights instead of calling it, and mmfast's own
modules with a LoRA adapter (PEFT, the real library) on such a layer: the adapter's forward runs (gated
residuals, a self-attention module given a context) or a ValueError says why not (the patch embeddings). Each
LoRA case equals the same module with the adapter merged into the weights (float64)."""
import copy

import pytest
import torch
from torch import nn

from mmfast.models.mllama import MllamaVisionLayer
from mmfast.nn import MultiheadAttention, PatchEmbed
from mmfast.nn.plain import plain
from optional_deps import optional_import, requires

peft = optional_import("peft")
TOL = 1e-12


def test_plain():
    linear = nn.Linear(4, 4)
    assert plain(linear, nn.Linear)
    assert plain(nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4), nn.Linear)  # no forward of its own
    assert not plain(nn.Conv2d(3, 4, 2), nn.Linear)

    class OwnForward(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2
    assert not plain(OwnForward(4, 4), nn.Linear)
    hooked = nn.Linear(4, 4)
    handle = hooked.register_forward_hook(lambda m, args, out: out)
    assert not plain(hooked, nn.Linear) and plain(hooked, nn.Linear, hooks_ok=lambda m: True)
    handle.remove()
    hooked.register_forward_pre_hook(lambda m, args: None)
    assert not plain(hooked, nn.Linear, hooks_ok=lambda m: True)
    replaced = nn.Linear(4, 4)
    replaced.forward = forward = lambda x: x
    assert not plain(replaced, nn.Linear) and plain(replaced, nn.Linear, own_forward=forward)


def _lora(module, targets):
    torch.manual_seed(7)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    return peft.inject_adapter_in_model(config, module)


def _merged(module):
    """A copy with every LoRA layer merged into its base weights and unwrapped: plain layers again."""
    merged = copy.deepcopy(module)
    for name, child in list(merged.named_modules()):
        if isinstance(child, peft.tuners.lora.LoraLayer):
            child.merge()
            parent, _, attr = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, attr, child.get_base_layer())
    return merged


def _assert_matches_merged(module, *args):
    merged = _merged(module)
    assert all(plain(m, nn.Linear) for m in merged.modules() if isinstance(m, nn.Linear))
    got, want = module(*args), merged(*args)
    assert (got - want).abs().max().item() <= TOL
    with torch.no_grad():  # and the adapter matters
        for child in module.modules():
            if isinstance(child, peft.tuners.lora.LoraLayer):
                child.lora_B["default"].weight.zero_()
    assert (module(*args) - want).abs().max().item() > 1e3 * TOL


@requires("peft")
def test_gated_vision_layer_runs_the_adapters():
    torch.manual_seed(0)
    layer = _lora(MllamaVisionLayer(16, 2, 32, gated=True, backend="reference").double(), ["out", "fc2"])
    assert not plain(layer.attn.out, nn.Linear)
    _assert_matches_merged(layer, torch.randn(2, 5, 16, dtype=torch.float64))


@requires("peft")
def test_self_attention_with_a_context_runs_the_qkv_adapter():
    torch.manual_seed(0)
    attn = _lora(MultiheadAttention(16, 2, backend="reference").double(), ["qkv"])
    x, context = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    _assert_matches_merged(attn, x, context)


@requires("peft")
def test_patch_embed_refuses_an_adapter_on_proj():
    embed = _lora(PatchEmbed(16, 4, 3, 8, backend="reference"), ["proj"])
    with pytest.raises(ValueError, match="proj is a peft.*not a plain nn.Conv2d.*merge it first"):
        embed(torch.randn(1, 3, 16, 16))
