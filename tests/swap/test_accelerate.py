"""mmfast.patch on a model dispatched by accelerate (its hooks replace the forward of every module holding
weights, to move them in from an offload device before the call): a module whose forward accelerate already
wraps is left alone with the reason (mmfast's forward would bypass the hook and read offloaded, meta-device
weights); the attention, reached through transformers' AttentionInterface inside the hooked modules, still
runs mmfast's kernel. Outputs equal the dispatched model's own."""
import pytest
import torch

pytest.importorskip("accelerate", reason="accelerate is optional (it comes with peft: pip install -e .[dev])")
pytest.importorskip("transformers", reason="the transformers integration needs transformers")

import hf_models as hf  # noqa: E402
import mmfast  # noqa: E402
from hf_bypass_helpers import spy_kernels  # noqa: E402


def test_offloaded_clip_keeps_accelerate_hooks():
    from accelerate import cpu_offload

    batch = dict(input_ids=hf.ids(2, 7), attention_mask=hf.right_padding([7, 4], 7), pixel_values=hf.pixels(2))
    want = hf.clip()(**batch).image_embeds
    model = hf.clip()
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.vision_model.embeddings.patch_embedding.weight.device.type == "meta"
    report = mmfast.patch(model, backend="reference")
    left = {row.path: row.note for row in report.left}
    assert "accelerate" in left.get("vision_model.embeddings", ""), str(report)
    assert any(row.path.endswith("self_attn") for row in report.swapped), str(report)
    got = model(**batch).image_embeds
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert mmfast.unpatch(model)
    torch.testing.assert_close(model(**batch).image_embeds, want, rtol=0, atol=0)


def test_offloaded_blip_runs_the_kernels_under_the_hooks():
    """BLIP's attention modules bypass AttentionInterface and mmfast replaces their forward; accelerate hooks
    their projections (called as modules, so the hooks run) but not them: they are swapped and run the kernel.
    The embeddings hold weights of their own and carry a hook: left alone."""
    from accelerate import cpu_offload
    from test_hf_blip import inputs, tiny_blip

    batch = {k: v for k, v in inputs(torch.float32, "right").items() if k != "labels"}
    want = tiny_blip()(**batch).logits
    model = tiny_blip()
    cpu_offload(model, execution_device=torch.device("cpu"))
    report = mmfast.patch(model, backend="reference")
    assert [row.path for row in report.left if "accelerate" in row.note] == ["vision_model.embeddings"], str(report)
    with spy_kernels() as calls:
        got = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert calls["flash_attention"] > 0


def test_offloaded_idefics_leaves_the_hooked_gated_layers_alone():
    """Idefics' gated cross-attention layers hold their gates themselves, so accelerate hooks them: replacing
    their forward would read meta-device gates (it raised "Tensor on device cpu is not on the expected device
    meta"). They are left alone with the reason; the outputs equal the offloaded model's."""
    from accelerate import cpu_offload
    from test_hf_idefics import inputs, tiny_idefics

    batch = inputs(torch.float32)
    want = tiny_idefics()(**batch).logits
    model = tiny_idefics()
    cpu_offload(model, execution_device=torch.device("cpu"))
    report = mmfast.patch(model, backend="reference")
    hooked = [row.path for row in report.left if "accelerate" in row.note]
    assert hooked and all("gated_cross_attn_layers" in path for path in hooked), str(report)
    torch.testing.assert_close(model(**batch).logits, want, rtol=1e-5, atol=1e-6)
