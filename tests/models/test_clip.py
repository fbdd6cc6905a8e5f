"""mmfast.models.CLIP: parity with transformers' CLIPModel / SiglipModel and open_clip's CLIP (outputs,
loss and gradients, tiny random configs, padded text, another resolution), EOS pooling rules, zero-shot
with prompt ensembling, one optimiser step, the Triton path through the interpreter."""
import pytest
import torch
from model_helpers import OpenClipOutputs, check_parity
from numerics import generator, randn
from optional_deps import optional_import, requires
from torch import nn
from torch.nn import functional as F

from mmfast.models import CLIP, PRESETS, create_model
from mmfast.models.clip import eos_positions

transformers = optional_import("transformers")
open_clip = optional_import("open_clip")

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
              patch_size=4)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99,
            max_position_embeddings=12)
EOS = 98


def seeded():
    torch.manual_seed(generator().initial_seed())


def text_batch(B=3, L=9, pad_row=1):
    """Token ids in [3, 90) with EOS (the highest id) at position 6; row `pad_row` right-padded after it."""
    ids = torch.randint(3, 90, (B, L), generator=generator())
    ids[:, 6] = EOS
    mask = torch.ones_like(ids)
    ids[pad_row, 7:], mask[pad_row, 7:] = 0, 0
    return ids, mask


def hf_qkv(layer):
    a = layer.self_attn
    return a.q_proj.weight, a.k_proj.weight, a.v_proj.weight


FIELDS = ["loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]


def text_hidden(out):
    return out.text_model_output.last_hidden_state


def vision_hidden(out):
    return out.vision_model_output.last_hidden_state


@requires("transformers")
@pytest.mark.parametrize("eos_token_id,size", [(2, (16, 16)), (EOS, (16, 16)), (2, (20, 24))],
                         ids=["legacy-eos-argmax", "eos-id", "other-resolution"])
def test_hf_clip_parity(eos_token_id, size):
    seeded()
    cfg = transformers.CLIPConfig(vision_config=VISION, text_config=dict(TEXT, eos_token_id=eos_token_id),
                                  projection_dim=24)
    hf = transformers.CLIPModel(cfg).eval()
    ours = CLIP.from_hf(hf, backend="reference")
    ids, mask = text_batch()
    if eos_token_id == EOS:
        ids[0, 8] = EOS  # a second EOS: the first one is read
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=randn(3, 3, *size), return_loss=True,
                  interpolate_pos_encoding=size != (16, 16))
    params = ([lambda m: m.vision_model.encoder.layers[0].attn.qkv.weight,
               lambda m: m.text_model.encoder.layers[1].attn.qkv.weight, lambda m: m.logit_scale],
              [lambda m: hf_qkv(m.vision_model.encoder.layers[0]), lambda m: hf_qkv(m.text_model.encoder.layers[1]),
               lambda m: m.logit_scale])
    check_parity(ours, hf, inputs, FIELDS + [text_hidden, vision_hidden], *params, what=f"CLIP {eos_token_id}")


@requires("transformers")
@pytest.mark.parametrize("size", [(16, 16), (24, 20)], ids=["native", "other-resolution"])
def test_hf_siglip_parity(size):
    seeded()
    cfg = transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)
    hf = transformers.SiglipModel(cfg).eval()
    ours = CLIP.from_hf(hf, backend="reference")
    assert ours.kind == "siglip" and ours.vision_model.attn_pool is not None
    ids, mask = text_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=randn(3, 3, *size), return_loss=True,
                  interpolate_pos_encoding=size != (16, 16))
    params = ([lambda m: m.vision_model.attn_pool.attn.qkv.weight, lambda m: m.logit_bias],
              [lambda m: m.vision_model.head.attention.in_proj_weight, lambda m: m.logit_bias])
    check_parity(ours, hf, inputs, FIELDS + [text_hidden, vision_hidden], *params, what="SigLIP")


@requires("open_clip")
@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick-gelu", "gelu"])
def test_open_clip_parity(quick_gelu):
    seeded()
    oc = open_clip.model.CLIP(24, dict(layers=2, width=32, head_width=16, patch_size=4, image_size=16),
                              dict(context_length=12, vocab_size=99, width=32, heads=2, layers=2),
                              quick_gelu=quick_gelu).eval()
    ours = CLIP.from_open_clip(oc, backend="reference")
    ids = torch.randint(3, 90, (3, 12), generator=generator())
    ids[:, 7] = EOS
    params = ([lambda m: m.text_model.encoder.layers[0].attn.qkv.weight, lambda m: m.visual_projection.weight],
              [lambda m: m.model.transformer.resblocks[0].attn.in_proj_weight, lambda m: m.model.visual.proj.t()])
    check_parity(ours, OpenClipOutputs(oc), dict(input_ids=ids, pixel_values=randn(3, 3, 16, 16), return_loss=True),
                 ["loss", "logits_per_image", "image_embeds", "text_embeds"], params[0][:1], params[1][:1],
                 what="open_clip")


@requires("transformers")
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_to_hf_round_trip(kind):
    seeded()
    if kind == "clip":
        ours = create_model("clip-tiny-test", backend="reference", max_scale=None)
    else:
        hf = transformers.SiglipModel(transformers.SiglipConfig(vision_config=VISION, text_config=TEXT))
        ours = CLIP.from_hf(hf, backend="reference")
    back = ours.to_hf()
    ids, mask = text_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=randn(3, 3, 16, 16), return_loss=True)
    a, b = ours(**inputs), back(**inputs)
    for field in FIELDS:
        torch.testing.assert_close(a[field], b[field], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_hidden(a), text_hidden(b), rtol=1e-5, atol=1e-5)


@requires("open_clip", "transformers")  # to_hf imports transformers before it checks the layout
def test_open_clip_layout_has_no_hf_form():
    oc = open_clip.model.CLIP(24, dict(layers=1, width=32, head_width=16, patch_size=4, image_size=16),
                              dict(context_length=12, vocab_size=99, width=32, heads=2, layers=1))
    with pytest.raises(ValueError, match="layout"):
        CLIP.from_open_clip(oc).to_hf()


def test_eos_positions():
    ids = torch.tensor([[1, 5, 9, 7, 0], [1, 9, 3, 9, 4]])
    assert eos_positions(ids, "eos", 2).tolist() == [2, 1]  # legacy: argmax of the ids (the first maximum)
    assert eos_positions(ids, "eos", 7).tolist() == [3, 0]  # first occurrence (none: position 0, as HF)
    assert eos_positions(ids, "argmax").tolist() == [2, 1]
    assert eos_positions(ids, "last").tolist() == [4, 4]


def tokenize(texts, vocab={}):  # noqa: B006 - a growing word table shared by the calls of one test
    """A toy tokenizer: [1] + word ids + [EOS], right-padded with 0 and an attention mask."""
    rows = [[1] + [vocab.setdefault(w, 3 + len(vocab)) for w in t.split()] + [EOS] for t in texts]
    L = max(map(len, rows))
    ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": (torch.arange(L) < torch.tensor([len(r) for r in rows])[:, None]).long()}


def test_zero_shot_with_prompt_ensembling():
    """The head is the normalised mean of the normalised template embeddings (checked against forward's
    text_embeds); with the image projection solved so that image k embeds onto class k's head row, the
    classifier picks class k."""
    seeded()
    model = create_model("clip-tiny-test", backend="reference").eval()
    classes, templates = ["cat", "dog", "red car"], ["a photo of a {}", "a {} in the wild", lambda c: f"my {c}"]
    head = model.zero_shot_classifier(classes, templates, tokenize)
    assert head.shape == (3, 24)
    images = randn(3, 3, 16, 16)
    for k, name in enumerate(classes):
        enc = tokenize([t(name) if callable(t) else t.format(name) for t in templates])
        embeds = model(pixel_values=images[:1], **enc).text_embeds
        torch.testing.assert_close(head[k], F.normalize(embeds.mean(0), dim=0), rtol=1e-5, atol=1e-6)
    single = model.zero_shot_classifier(classes, templates[:1], tokenize)
    assert (single - head).abs().max() > 1e-3  # ensembling changes the head
    with torch.no_grad():
        pooled = model.vision_model(images).pooler_output  # (3, 32)
        model.visual_projection.weight.copy_(torch.linalg.lstsq(pooled, head).solution.t())
    assert model.zero_shot_logits(images, head).argmax(1).tolist() == [0, 1, 2]
    assert model.zero_shot_logits(images.flip(0), head).argmax(1).tolist() == [2, 1, 0]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_one_step_lowers_loss(loss):
    seeded()
    model = create_model("clip-tiny-test", backend="reference", loss=loss)
    ids, mask = text_batch(B=6)
    images = randn(6, 3, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = model(input_ids=ids, attention_mask=mask, pixel_values=images, return_loss=True).loss
    first.backward()
    opt.step()
    assert model(input_ids=ids, attention_mask=mask, pixel_values=images, return_loss=True).loss.item() < first.item()


@pytest.mark.parametrize("loss", ["clip", pytest.param("siglip", marks=requires("transformers"))])
def test_triton_interpreter_matches_reference(loss):
    """One tiny CLIP per loss through the Triton kernels (patch_embed, causal + padded attention, the
    contrastive / sigmoid loss; SigLIP's attention-pooling cross-attention) against the reference."""
    seeded()
    if loss == "clip":
        args = PRESETS["clip-tiny-test"][1]
        model = create_model("clip-tiny-test", backend="reference", vision=dict(args["vision"], depth=1),
                             text=dict(args["text"], depth=1))
    else:
        one = dict(num_hidden_layers=1)
        hf = transformers.SiglipModel(transformers.SiglipConfig(vision_config=dict(VISION, **one),
                                                                text_config=dict(TEXT, **one)))
        model = CLIP.from_hf(hf, backend="reference")
    ids, mask = text_batch()
    images = randn(3, 3, 16, 16)
    results = []
    for backend in ("reference", "triton"):
        _set_backend(model, backend)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, pixel_values=images, return_loss=True)
        out.loss.backward()
        results.append([out.loss, out.logits_per_image, model.logit_scale.grad,
                        model.vision_model.patch_embed.proj.weight.grad,
                        model.text_model.encoder.layers[0].attn.qkv.weight.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def _set_backend(model, backend):
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend


def test_validation():
    with pytest.raises(ValueError, match="loss"):
        CLIP({}, {}, loss="hinge")
    with pytest.raises(ValueError, match="vision"):
        CLIP("vit", {})
    with pytest.raises(ValueError, match="CLIPModel"):
        CLIP.from_hf(nn.Linear(2, 2))
    model = create_model("clip-tiny-test")
    with pytest.raises(ValueError, match="attention_mask"):
        model.text_model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="class_names"):
        model.zero_shot_classifier([], ["{}"], tokenize)


def text_states(out):
    return torch.stack(out.text_model_output.hidden_states)


def vision_states(out):
    return torch.stack(out.vision_model_output.hidden_states)


@requires("transformers")
def test_hf_flags_hidden_states_tuple_and_attentions():
    """HF's drop-in flags on CLIPModel: each tower's hidden_states (embeddings first) equal HF's,
    return_dict=False gives HF's tuple layout, output_attentions=True is refused with its reason."""
    seeded()
    cfg = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=24)
    hf = transformers.CLIPModel(cfg).eval()
    ours = CLIP.from_hf(hf, backend="reference")
    ids, mask = text_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=randn(3, 3, 16, 16), output_hidden_states=True)
    check_parity(ours, hf, inputs, [text_states, vision_states], what="CLIP hidden_states")
    with torch.no_grad():
        mine = ours(**inputs, return_loss=True, return_dict=False)
        theirs = hf(**inputs, return_loss=True, return_dict=False)
    assert len(mine) == len(theirs) == 7
    for a, b in zip(mine[:5], theirs[:5]):
        assert a.shape == b.shape
    assert len(mine[5][2]) == len(theirs[5][2]) == 3  # nested outputs are tuples too: (last, pooled, hidden_states)
    with pytest.raises(ValueError, match="output_attentions=True is not supported: flash_attention never forms"):
        ours(**inputs, output_attentions=True)
