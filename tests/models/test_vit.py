"""mmfast.models.ViT: parity with transformers' ViTModel and timm's VisionTransformer (outputs and
gradients, tiny random configs), other resolutions, 2D positions, hybrid input, the masked-patch
objective, one optimiser step, the Triton path through the interpreter."""
import functools
import inspect
import operator

import pytest
import torch
from model_helpers import check_parity
from numerics import generator, randn
from optional_deps import optional_import, requires
from torch import nn
from torch.nn import functional as F

from mmfast.models import ViT
from mmfast.hf_compat import hf_vit_layers
from mmfast.models.vit import mean_colour_bins

transformers = optional_import("transformers")
timm = optional_import("timm")


def hf_vit(**overrides):
    torch.manual_seed(generator().initial_seed())
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=4, **overrides)
    return transformers.ViTModel(cfg).eval()


def hf_qkv_weight(model):
    layers, names = hf_vit_layers(model)
    return tuple(operator.attrgetter(names[k])(layers[0]).weight for k in "qkv")


HF_PARAMS = ([lambda m: m.patch_embed.proj.weight, lambda m: m.encoder.layers[0].attn.qkv.weight],
             [lambda m: m.embeddings.patch_embeddings.projection.weight, hf_qkv_weight])


@requires("transformers")
@pytest.mark.parametrize("size", [(16, 16), (24, 20)], ids=["native", "resampled"])
def test_hf_parity(size):
    hf = hf_vit()
    ours = ViT.from_hf(hf, backend="reference")
    inputs = dict(pixel_values=randn(2, 3, *size), interpolate_pos_encoding=size != (16, 16))
    check_parity(ours, hf, inputs, ["last_hidden_state", "pooler_output"], *HF_PARAMS, what=f"ViT {size}")


@requires("transformers")
def test_hf_parity_masked_and_no_qkv_bias():
    hf = hf_vit(qkv_bias=False)
    hf = transformers.ViTModel(hf.config, use_mask_token=True).eval()
    with torch.no_grad():
        hf.embeddings.mask_token.normal_()
    ours = ViT.from_hf(hf, backend="reference")
    mask = torch.rand(2, 16, generator=generator()) < 0.5
    check_parity(ours, hf, dict(pixel_values=randn(2, 3, 16, 16), bool_masked_pos=mask), ["last_hidden_state"],
                 *HF_PARAMS, what="ViT masked")


def penultimate(out):
    return out.hidden_states[-2]


@requires("transformers")
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_clip_vision_tower(kind):
    """CLIPVisionModel / SiglipVisionModel (LLaVA's tower reads hidden_states[-2]) as a ViT."""
    torch.manual_seed(generator().initial_seed())
    args = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                patch_size=4)
    if kind == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**args)).eval()
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**args)).eval()
    ours = ViT.from_hf(hf, backend="reference")
    inputs = dict(pixel_values=randn(2, 3, 16, 16), output_hidden_states=True)
    check_parity(ours, hf, inputs, ["last_hidden_state", "pooler_output", penultimate], what=f"{kind} vision")


@requires("transformers")
def test_to_hf_round_trip():
    ours = ViT(16, 4, 3, 32, 2, 2, qkv_bias=False, norm_eps=1e-12, pooler="tanh", backend="reference").eval()
    hf = ours.to_hf()
    x = randn(2, 3, 16, 16)
    a, b = ours(x), hf(pixel_values=x)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="HF layout"):
        ViT(16, 4, 3, 32, 1, 2, global_pool="avg").to_hf()


def timm_vit(**kwargs):
    torch.manual_seed(generator().initial_seed())
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return timm.models.vision_transformer.VisionTransformer(**{**args, **kwargs}).eval()


@requires("timm")
@pytest.mark.parametrize("kwargs,size", [
    (dict(), (16, 16)),
    (dict(global_pool="avg", class_token=False), (16, 16)),
    (dict(dynamic_img_size=True, no_embed_class=True), (20, 12)),
    (dict(pre_norm=True, act_layer="quick_gelu"), (16, 16)),  # timm builds its QuickGELU from the name
    (dict(init_values=1e-5), (16, 16)),
    (dict(qk_norm=True), (16, 16)),
    (dict(reg_tokens=4), (16, 16)),  # position rows [CLS, 4 registers, patches]
    (dict(reg_tokens=4, dynamic_img_size=True), (20, 12)),  # only the patch rows resampled
    (dict(reg_tokens=4, no_embed_class=True, dynamic_img_size=True), (20, 12)),  # DINOv2-reg: no rows for prefixes
    (dict(reg_tokens=2, class_token=False, global_pool="avg"), (16, 16)),
    (dict(reg_tokens=2, pos_embed="none", init_values=0.1, qk_norm=True), (16, 16)),
], ids=["token", "avg-no-cls", "dynamic-size-no-embed-class", "pre-norm-quick-gelu", "layer-scale", "qk-norm",
        "registers", "registers-dynamic-size", "registers-no-embed-class", "registers-no-cls-avg",
        "registers-no-pos-layer-scale-qk-norm"])
def test_timm_parity(kwargs, size):
    vt = _randomize_timm_extras(timm_vit(**kwargs))
    ours = ViT.from_timm(vt, backend="reference")
    _check_timm(vt, ours, randn(2, 3, *size), kwargs)


def _randomize_timm_extras(vt):
    """timm initialises layer scale to init_values, registers to ~1e-6 and the qk norms to the identity:
    a conversion that dropped any of them would still pass. Random values make each one count."""
    with torch.no_grad():
        for name, p in vt.named_parameters():
            if name.endswith("gamma") or "reg_token" in name or "q_norm" in name or "k_norm" in name:
                p.copy_(torch.randn(p.shape, generator=generator()) * 0.5 + (1.0 if "norm.weight" in name else 0.0))
    return vt


class _TimmAsOutput(nn.Module):
    """timm's forward_features / forward_head as an output with our field names, for check_parity."""

    def __init__(self, vt):
        super().__init__()
        self.vt = vt

    def forward(self, pixel_values):
        feats = self.vt.forward_features(pixel_values)
        return {"last_hidden_state": feats, "logits": self.vt.forward_head(feats)}


def _check_timm(vt, ours, x, what):
    wrapped = _TimmAsOutput(vt)
    params = ([lambda m: m.patch_embed.proj.weight, lambda m: m.encoder.layers[0].attn.qkv.weight],
              [lambda m: m.vt.patch_embed.proj.weight, lambda m: m.vt.blocks[0].attn.qkv.weight])
    check_parity(ours, wrapped, dict(pixel_values=x), ["last_hidden_state", "logits"], *params, what=f"timm {what}")


@requires("timm")
def test_timm_hybrid():
    torch.manual_seed(generator().initial_seed())
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(8, 12, 3, stride=2, padding=1))
    vt = timm_vit(img_size=32, patch_size=1, embed_layer=functools.partial(timm.layers.HybridEmbed, backbone=backbone))
    ours = ViT.from_timm(vt, backend="reference")
    assert ours.backbone is backbone and ours.patch_embed.grid_size == (8, 8)
    _check_timm(vt, ours, randn(2, 3, 32, 32), "hybrid")


@requires("timm")
def test_timm_rejects_what_it_lacks():
    vt = timm_vit(init_values=0.1)
    vt.blocks[0].ls2 = nn.Identity()
    with pytest.raises(ValueError, match="layer scale on only one"):
        ViT.from_timm(vt)
    with pytest.raises(ValueError, match="scale_attn_norm"):
        ViT.from_timm(timm_vit(scale_attn_norm=True))
    with pytest.raises(ValueError, match="registers"):
        ViT(16, 4, 3, 32, 1, 2, reg_tokens=1).to_hf()


def test_2d_positions():
    """Token (i, j) gets conv(patch) + bias + cat(row[i], col[j]); other grids resample each table."""
    m = ViT(16, 4, 3, 32, 0, 2, pos_embed="learn_2d", final_norm="none", backend="reference")
    x = randn(2, 3, 16, 12)
    tokens = m.embed(x, interpolate_pos_encoding=True)
    conv = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=4).flatten(2).transpose(1, 2)
    rows = F.interpolate(m.pos_embed_row.detach().t()[None, :, :, None], size=(4, 1), mode="bicubic",
                         align_corners=False, antialias=True)[0, :, :, 0].t()
    cols = F.interpolate(m.pos_embed_col.detach().t()[None, :, None, :], size=(1, 3), mode="bicubic",
                         align_corners=False, antialias=True)[0, :, 0, :].t()
    pos = torch.cat([rows[:, None].expand(4, 3, 16), cols[None].expand(4, 3, 16)], -1).reshape(12, 32)
    torch.testing.assert_close(tokens[:, 1:], conv + pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 0], m.patch_embed.cls_token[0].expand(2, 32), rtol=0, atol=0)


def test_other_size_needs_interpolate():
    m = ViT(16, 4, 3, 32, 1, 2, backend="reference")
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        m(randn(1, 3, 20, 20))
    assert m(randn(1, 3, 20, 20), interpolate_pos_encoding=True).last_hidden_state.shape == (1, 26, 32)


def test_mean_colour_bins():
    x = torch.zeros(1, 3, 8, 8)
    x[:, 0, :4, :4] = 1.0            # patch 0: red saturated -> r bin 7
    x[:, 2, 4:, 4:] = 0.3            # patch 3: blue 0.3 -> bin floor(2.4) = 2
    x[:, 1, :4, 4:8] = 0.5           # patch 1: green 0.5 -> bin 4
    torch.testing.assert_close(mean_colour_bins(x, 4), torch.tensor([[7 * 64, 4 * 8, 0, 2]]))


def test_masked_patch_prediction_and_one_step():
    torch.manual_seed(generator().initial_seed())
    m = ViT(16, 4, 3, 32, 2, 2, mpp_bits=3, backend="reference")
    x = torch.rand(4, 3, 16, 16, generator=generator())
    out = m.masked_patch_prediction(x, generator=generator())
    assert out.logits.shape == (4, 16, 512) and (out.target_mask.sum(1) == 8).all()
    losses = []
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(2):
        g = torch.Generator().manual_seed(0)  # the same corruption both times: a fixed batch
        loss = m.masked_patch_prediction(x, generator=g).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[1] < losses[0]


def test_classifier_one_step_lowers_loss():
    torch.manual_seed(generator().initial_seed())
    m = ViT(16, 4, 3, 32, 2, 2, num_classes=5, backend="reference")
    x, y = randn(8, 3, 16, 16), torch.arange(8) % 5
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    before = F.cross_entropy(m(x).logits, y)
    before.backward()
    opt.step()
    assert F.cross_entropy(m(x).logits, y).item() < before.item()


def test_triton_interpreter_matches_reference():
    """One tiny ViT through the Triton kernels (patch_embed with and without the masked-patch corruption,
    flash_attention) against the reference: outputs and gradients."""
    torch.manual_seed(generator().initial_seed())
    # registers, layer scale and qk_norm ride along: the qk norms feed the attention kernel
    opts = dict(num_classes=3, mpp_bits=3, reg_tokens=2, init_values=0.5, qk_norm=True)
    ref = ViT(16, 4, 3, 32, 1, 2, backend="reference", **opts)
    tri = ViT(16, 4, 3, 32, 1, 2, backend="triton", **opts)
    with torch.no_grad():
        ref.encoder.layers[0].attn.q_norm.weight.normal_(generator=generator())
    tri.load_state_dict(ref.state_dict())
    x = torch.rand(2, 3, 16, 16, generator=generator())
    seed = generator().initial_seed()
    outs = []
    for m in (ref, tri):
        xi = x.clone().requires_grad_()
        out = m(xi)
        mpp = m.masked_patch_prediction(xi, generator=torch.Generator().manual_seed(seed))
        (out.logits.square().sum() + mpp.loss).backward()
        outs.append((out.last_hidden_state, mpp.loss, xi.grad, m.encoder.layers[0].attn.qkv.weight.grad,
                     m.patch_embed.mask_token.grad, m.reg_token.grad, m.encoder.layers[0].attn.q_norm.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_validation():
    with pytest.raises(ValueError, match="global_pool"):
        ViT(global_pool="max")
    with pytest.raises(ValueError, match="class_token"):
        ViT(class_token=False, global_pool="token")
    with pytest.raises(ValueError, match="backbone_channels"):
        ViT(backbone=nn.Identity())
    with pytest.raises(ValueError, match="ViTModel"):
        ViT.from_hf(nn.Linear(2, 2))


def all_hidden_states(out):
    return torch.stack(out.hidden_states)


@requires("transformers")
def test_hf_flags_hidden_states_attention_mask_tuple():
    """HF's drop-in flags: output_hidden_states (embeddings first, each layer before the final norm),
    attention_mask over [CLS] + patches (where HF's ViTModel takes one: 5.x, not 4.5x), return_dict=False;
    output_attentions=True refused."""
    hf = hf_vit()
    ours = ViT.from_hf(hf, backend="reference")
    inputs = dict(pixel_values=randn(2, 3, 16, 16), output_hidden_states=True)
    if "attention_mask" in inspect.signature(hf.forward).parameters:
        inputs["attention_mask"] = torch.ones(2, 17, dtype=torch.long)
        inputs["attention_mask"][1, 3:11] = 0
    check_parity(ours, hf, inputs, ["last_hidden_state", all_hidden_states], *HF_PARAMS, what="ViT flags")
    x = randn(2, 3, 16, 16)
    with torch.no_grad():
        mine, theirs = ours(x, output_hidden_states=True, return_dict=False), hf(x, output_hidden_states=True,
                                                                                  return_dict=False)
    assert isinstance(mine, tuple) and len(mine) == len(theirs) == 3  # last_hidden_state, pooler_output, hidden_states
    assert len(mine[2]) == len(theirs[2]) == 3
    with pytest.raises(ValueError, match="output_attentions"):
        ours(x, output_attentions=True)
