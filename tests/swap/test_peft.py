"""mmfast.patch with PEFT's LoRA (the real library). A fused kernel that reads a layer's weight (the gated
residuals' o_proj / down_proj / fc2 of Mllama, the patch embeddings' convolutions) would silently drop an
adapter on that layer: such calls run the layer's own forward instead (counted as fallbacks), the rest keeps
mmfast's kernels. Both orders (LoRA then patch, patch then LoRA); a PeftModel is patched through the model it
wraps. Parity in float64 against the same LoRA model unpatched; the adapters are random (not zero), and the
test checks that they change the outputs."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft", reason="the LoRA tests need peft (optional; pip install -e .[dev])")
pytest.importorskip("transformers", reason="the transformers integration needs transformers")

import mmfast  # noqa: E402
from hf_bypass_helpers import FP64_TOL, assert_close, assert_grads_close, grads  # noqa: E402
from test_hf_mllama import inputs as mllama_inputs  # noqa: E402
from test_hf_mllama import tiny_mllama  # noqa: E402
import hf_models  # noqa: E402

MLLAMA_TARGETS = ["o_proj", "down_proj", "fc2", "q_proj"]  # the gated layers' linears, and one the kernels call


def _with_lora(model, targets, seed=3):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _run_mllama(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return out.logits.detach(), grads(model)


def _assert_adapters_matter(lora_model, outputs, expected):
    with lora_model.disable_adapter(), torch.no_grad():
        without = outputs(lora_model)
    assert (without - expected).abs().max() > 1e3 * FP64_TOL, "the adapters do not change the logits: vacuous test"


@pytest.mark.parametrize("order", ["lora_then_patch", "patch_then_lora"])
def test_mllama_lora_on_gated_layers_is_kept(order):
    batch = mllama_inputs(torch.float64)
    run = lambda m: _run_mllama(m, batch)  # noqa: E731
    stock = _with_lora(tiny_mllama().double(), MLLAMA_TARGETS)
    expected, expected_grads = run(stock)
    _assert_adapters_matter(stock, lambda m: m(**batch).logits, expected)
    if order == "lora_then_patch":
        model = _with_lora(tiny_mllama().double(), MLLAMA_TARGETS)
        report = mmfast.patch(model, backend="reference")   # the PeftModel: its base model is patched
    else:
        base = tiny_mllama().double()
        report = mmfast.patch(base, backend="reference")
        model = _with_lora(base, MLLAMA_TARGETS)
    assert report.swapped and report.integration == "transformers", str(report)
    logits, g = run(model)
    assert_close(logits, expected, FP64_TOL, "logits")
    assert_grads_close(g, expected_grads, FP64_TOL)
    assert any(name.endswith("lora_B.default.weight") for name in g), sorted(g)
    gated = [why for why in report.fallbacks if why.startswith("tanh_gated_linear")]
    assert gated and all("peft" in why for why in gated), report.fallbacks
    assert sum(report.fallbacks[why] for why in gated) == 4  # the cross layer's and the global vision layer's two
    assert mmfast.unpatch(model)
    assert_close(run(model)[0], expected, 0.0, "logits after unpatch")


def test_clip_lora_on_patch_embedding_runs_the_conv():
    """A LoRA on CLIP's patch_embedding (peft's Conv2d adapter): the embeddings run transformers' own forward,
    the attention stays mmfast's."""
    targets = ["patch_embedding", "q_proj"]
    batch = dict(input_ids=hf_models.ids(2, 7), pixel_values=hf_models.pixels(2).double(), return_loss=True)
    run = lambda m: _run_clip(m, batch)  # noqa: E731
    stock = _with_lora(hf_models.clip().double(), targets)
    expected, expected_grads = run(stock)
    with hf_models.float64_default():
        _assert_adapters_matter(stock, lambda m: m(**batch).image_embeds, expected)
    model = _with_lora(hf_models.clip().double(), targets)
    report = mmfast.patch(model, backend="reference")
    got, g = run(model)
    assert_close(got, expected, FP64_TOL, "image embeddings")
    assert_grads_close(g, expected_grads, FP64_TOL)
    assert [why for why in report.fallbacks if why.startswith("CLIPVisionEmbeddings: patch_embedding is a peft")], \
        report.fallbacks
    assert any("attention" in row.now or "flash" in row.now for row in report.swapped), str(report)


def _run_clip(model, batch):
    model.zero_grad(set_to_none=True)
    with hf_models.float64_default():  # 4.5x's CLIP builds its causal mask in the default dtype
        out = model(**batch)
    (out.loss + out.image_embeds.sum()).backward()
    return out.image_embeds.detach(), grads(model)


def _timm_vit():
    timm = pytest.importorskip("timm", reason="timm is an optional package (pip install -e .[dev])")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=1, num_heads=2, num_classes=5).double()
    # PatchEmbed.proj (Conv2d) and Attention.proj (Linear)
    return vit, ["proj"], torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def _open_clip_visual():
    pytest.importorskip("open_clip", reason="open_clip_torch is an optional package (pip install -e .[dev])")
    from test_open_clip import clip, inputs

    return clip().visual, ["conv1"], inputs()[0]


@pytest.mark.parametrize("order", ["lora_then_patch", "patch_then_lora"])
@pytest.mark.parametrize("make", [_timm_vit, _open_clip_visual], ids=["timm", "open_clip"])
def test_lora_on_the_patch_convolution_runs_the_conv(make, order):
    """LoRA on timm's PatchEmbed.proj / open_clip's conv1 (peft's Conv2d adapter): the patch embedding is left
    alone when the adapter is there at patch time, runs its original forward at call time when it comes after."""
    vision, targets, images = make()
    stock = _with_lora(copy.deepcopy(vision), targets)
    expected = stock(images).detach()
    _assert_adapters_matter(stock, lambda m: m(images), expected)
    if order == "lora_then_patch":
        model = _with_lora(copy.deepcopy(vision), targets)
        report = mmfast.patch(model, backend="reference")
    else:
        base = copy.deepcopy(vision)
        report = mmfast.patch(base, backend="reference")
        model = _with_lora(base, targets)
    assert report.swapped, str(report)
    assert_close(model(images).detach(), expected, FP64_TOL, "outputs")
    if order == "lora_then_patch":
        assert any(f"{targets[0]} is a peft" in row.note for row in report.left), str(report)
    else:
        assert [why for why in report.fallbacks if f"{targets[0]} is a peft" in why], report.fallbacks


def test_verify_a_peft_model():
    model = _with_lora(hf_models.clip(), ["q_proj", "v_proj"])
    result = mmfast.verify(model, backend="reference", quiet=True)
    assert result.report.integration == "transformers" and result.passed, str(result)
    # peft froze the base weights: the gradient groups compared are the adapters'
    assert any(row.kind == "grad" and "encoder.layers" in row.name for row in result.rows), str(result)
