"""Llava against transformers' LlavaForConditionalGeneration (tiny random CLIP tower + Llama): logits and
loss on a left-padded batch, greedy generation, one forward through the Triton interpreter; the training
stages' freezing; LlavaNext's AnyRes grid choice and tiles against HF's image processor, its logits and
generation. (The presets' sizes: tests/models/test_presets.py.)"""
import copy

import pytest
import torch
from optional_deps import optional_import, requires

from mmfast.models import Llava, LlavaNext
from mmfast.models.llava import anyres_tiles, select_best_resolution
from model_helpers import assert_bf16_matches_hf, assert_one_step_trains_only, hf_loaded_in
from numerics import assert_close_by_rule, assert_same_greedy_tokens, generator, randomise_norms_

transformers = optional_import("transformers")
V, IMAGE, PATCHES, TEXT = 100, 99, 25, 6  # 3 text tokens either side of the image
L = PATCHES + TEXT


def _hf(**config_kw):
    torch.manual_seed(generator().initial_seed() % 2**31)
    vision = transformers.CLIPVisionConfig(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64)
    text = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                      projector_hidden_act="gelu", **config_kw)
    return randomise_norms_(transformers.LlavaForConditionalGeneration(config).eval())


@torch.no_grad()
def _batch():
    """Two prompts [3 text, 25 image placeholders, 3 text]; row 1 shifted right behind 3 pads."""
    g = generator()
    ids = torch.randint(3, IMAGE, (2, L), generator=g)
    ids[:, 3:3 + PATCHES] = IMAGE
    ids[1] = torch.cat([torch.zeros(3, dtype=torch.long), ids[1, :-3]])
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, :3] = 0
    pixels = torch.randn(2, 3, 30, 30, generator=g)
    return ids, mask, pixels


@pytest.mark.parametrize("variant", ["default", "full-two-layers"])
@requires("transformers")
def test_logits_and_loss_match_hf_left_padded(variant):
    kw = {} if variant == "default" else dict(vision_feature_select_strategy="full", vision_feature_layer=[-2, -1])
    hf = _hf(**kw)
    ours = Llava.from_hf(hf, backend="reference")
    ids, mask, pixels = _batch()
    if variant != "default":  # one more placeholder per image: [CLS] is kept
        ids = torch.cat([ids[:, :3], torch.full((2, 1), IMAGE), ids[:, 3:]], 1)
        mask = torch.cat([mask[:, :1], mask], 1)
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
    keep = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what HF's generate passes for left-padded rows

    def run(model, px, **kw):
        out = model(input_ids=ids, pixel_values=px, attention_mask=mask, labels=labels, **kw)
        return out.logits[keep], out.loss

    got = run(ours, pixels)
    ref = run(copy.deepcopy(hf).double(), pixels.double(), position_ids=positions)
    yard = run(hf, pixels, position_ids=positions)
    for name, a, r, y in zip(("logits", "loss"), got, ref, yard):
        assert_close_by_rule(a, r, y, floor=1e-6 * max(1.0, r.abs().max().item()), what=name)


@requires("transformers")
def test_bf16_checkpoint_matches_hf_left_padded():
    """HF's model as from_pretrained(dtype=torch.bfloat16) loads it (no _keep_in_fp32_modules: every weight
    bf16); from_hf keeps the dtypes, the rotary inv_freq fp32 and equal to HF's; logits (bf16, as HF's) and
    loss within the rule of HF's own bf16 run against fp64."""
    hf = _hf()
    hf_bf16 = hf_loaded_in(hf, torch.bfloat16)
    ours = Llava.from_hf(hf_bf16, backend="reference")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    inv_freq = hf_bf16.model.language_model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32 and torch.equal(ours.language_model.rotary.inv_freq, inv_freq)
    ids, mask, pixels = _batch()
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)

    @torch.no_grad()
    def run(model, dtype):
        kw = {} if model is ours else dict(position_ids=positions)
        return model(input_ids=ids, pixel_values=pixels.to(dtype), attention_mask=mask, labels=labels, **kw)

    assert_bf16_matches_hf(ours, hf, hf_bf16, run, mask.bool(), labels)


@requires("transformers")
def test_greedy_generation_equals_hf():
    hf = _hf()
    ours = Llava.from_hf(hf, backend="reference")
    ids, mask, pixels = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=2, pad_token_id=0)
    expected = hf.generate(input_ids=ids, pixel_values=pixels, **kw)
    got = ours.generate(ids, pixels, **kw)
    assert got.shape == (2, L + 5)

    def next_logits(prefix):
        with torch.no_grad():
            return hf(input_ids=prefix, pixel_values=pixels,
                      attention_mask=torch.cat([mask, torch.ones_like(prefix[:, L:])], 1)).logits[:, -1]
    assert_same_greedy_tokens(got, expected, next_logits)


@requires("transformers")
def test_generation_stops_on_the_hf_configs_eos_list():
    """A Llama 3 style list of EOS ids in the HF model's generation config: from_hf keeps it and generate
    (its default) ends rows on any of them, as HF's (the later ids: what each row emits at step 1)."""
    hf = _hf().double()  # float64: no near-ties between the two implementations' greedy picks
    ids, mask, pixels = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    probe = Llava.from_hf(hf, backend="reference").generate(ids, pixels, eos_token_id=-1, **kw)
    eos = [2] + sorted(set(probe[:, L + 1].tolist()) - {2})
    hf.generation_config.eos_token_id = eos
    ours = Llava.from_hf(hf, backend="reference")
    assert ours.language_model.eos_token_id == eos
    expected = hf.generate(input_ids=ids, pixel_values=pixels, **kw)
    assert torch.equal(ours.generate(ids, pixels, **kw), expected)
    assert expected.shape[1] <= L + 2  # every row ended by step 1


@requires("transformers")
def test_triton_interpreter_matches_reference():
    """Patch embedding, the vision tower's attention and the decoder's causal, left-padded GQA attention
    through the Triton kernels (interpreter on CPU)."""
    hf = _hf()
    ref, tri = Llava.from_hf(hf, backend="reference"), Llava.from_hf(hf, backend="triton")
    ids, mask, pixels = _batch()
    keep = mask.bool()
    with torch.no_grad():
        a = tri(ids, pixels, mask).logits[keep]
        b = ref(ids, pixels, mask).logits[keep]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _tiny(**kw):
    vision = dict(img_size=30, patch_size=6, embed_dim=32, depth=2, num_heads=2, act="quick_gelu", patch_bias=False,
                  pre_norm=True, final_norm="pooled", backend="reference")
    lm = dict(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
              backend="reference")
    return Llava(vision, kw.pop("projector", "mlp"), lm, IMAGE, **kw)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("kind", ["llava", "next"])
def test_stage_freezing_after_one_step(kind, stage):
    if kind == "llava":
        model, (ids, mask, pixels), extra = _tiny(), _batch(), {}
    else:
        model = _tiny_next()
        ids, mask, pixels, sizes = _next_batch(model)
        extra = {"image_sizes": sizes}
    model.requires_grad_(False).set_stage(stage)  # set_stage decides every parameter, whatever came before
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
    expect = ("projector.", "image_newline") + (("language_model.",) if stage == 2 else ())
    trainable = assert_one_step_trains_only(
        model, lambda: model(ids, pixels, attention_mask=mask, labels=labels, **extra).loss, expect)
    assert ("image_newline" in trainable) == (kind == "next")


def test_feature_layer_runs_only_the_layers_it_needs():
    """Layer −2 of a 2-layer tower is the first layer's output: the last layer's weights cannot matter."""
    model = _tiny()
    ids, mask, pixels = _batch()
    with torch.no_grad():
        feats = model.get_image_features(pixels)
        model.vision.encoder.layers[-1].mlp.fc2.weight.add_(1.0)
        assert torch.equal(model.get_image_features(pixels), feats)
        full = _tiny(vision_feature_select_strategy="full", vision_feature_layer=[-2, -1])
        assert full.get_image_features(pixels).shape == (2, PATCHES + 1, 64)


def test_linear_projector_and_text_only_prompt():
    model = _tiny(projector="linear")
    assert isinstance(model.projector, torch.nn.Linear) and model.projector.in_features == 32
    ids = torch.randint(3, IMAGE, (2, 7), generator=generator())
    torch.testing.assert_close(model(ids).logits, model.language_model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("make,match", [
    (lambda: _tiny(vision_feature_select_strategy="cls"), "vision_feature_select_strategy"),
    (lambda: _tiny(vision_feature_layer=3), "vision_feature_layer"),
    (lambda: _tiny(projector="conv"), "projector"),
    (lambda: Llava(torch.nn.Linear(2, 2), "mlp", {}, 1), "vision"),
    (lambda: _tiny().set_stage(3), "stage"),
], ids=["strategy", "layer", "projector", "vision-type", "stage"])
def test_invalid_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_placeholder_count_must_match_features():
    model = _tiny()
    ids, mask, pixels = _batch()
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixels[:1], mask)


# ---- LLaVA-NeXT (AnyRes) ---------------------------------------------------------------------------------
TILE = 12  # tiles of 12x12 pixels, 2x2 patches of 6
PINPOINTS = [[12, 24], [24, 12], [24, 24], [12, 36], [36, 12]]
# on a 1x3 canvas (padding columns cut), a 3x1 canvas (rows cut), an exact 1x2 fit, a 2x2 canvas
SIZES = [(40, 90), (90, 40), (12, 24), (40, 44)]


def _hf_next():
    torch.manual_seed(generator().initial_seed() % 2**31)
    vision = transformers.CLIPVisionConfig(image_size=TILE, patch_size=6, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64)
    text = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                          projector_hidden_act="gelu", image_grid_pinpoints=PINPOINTS)
    return randomise_norms_(transformers.LlavaNextForConditionalGeneration(config).eval())


def _next_batch(model):
    """One image per row (rows 0, 1: SIZES[0], SIZES[1]), each prompt [2 text, image placeholders, 2 text],
    left-padded to the longest; pixel_values (2, max tiles, 3, 12, 12) as the processor pads them."""
    g = generator()
    sizes = torch.tensor(SIZES[:2])
    counts = [model.num_image_tokens(s) for s in SIZES[:2]]
    length = max(counts) + 4
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for row, n in enumerate(counts):
        text = torch.randint(3, IMAGE, (4,), generator=g)
        ids[row, length - n - 4:] = torch.cat([text[:2], torch.full((n,), IMAGE), text[2:]])
        mask[row, length - n - 4:] = 1
    tiles = max(1 + r * c for r, c in map(model.grid, SIZES[:2]))
    pixels = torch.randn(2, tiles, 3, TILE, TILE, generator=g)
    return ids, mask, pixels, sizes


@requires("transformers")
def test_anyres_grid_and_tiles_equal_hf_processor():
    from transformers.image_processing_utils import select_best_resolution as hf_select

    g = generator()
    sizes = [tuple(s) for s in torch.randint(4, 80, (200, 2), generator=g).tolist()] + SIZES
    assert all(select_best_resolution(s, PINPOINTS) == tuple(hf_select(s, PINPOINTS)) for s in sizes)
    kw = dict(image_grid_pinpoints=PINPOINTS, size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})
    processor = transformers.LlavaNextImageProcessor(**kw)
    if getattr(processor, "backend", None) != "torchvision":  # 4.5x: that one resizes through PIL; the torch one
        processor = transformers.LlavaNextImageProcessorFast(**kw)  # anyres_tiles follows is the *Fast processor
    model = _tiny_next()
    for h, w in SIZES + [(7, 50), (33, 17)]:  # + fits that leave odd padding (the extra pixel goes right / below)
        image = torch.rand(3, h, w, generator=g)
        expected = processor(images=[image], return_tensors="pt", do_rescale=False)["pixel_values"][0]
        got = anyres_tiles(image, PINPOINTS, TILE, mean=processor.image_mean, std=processor.image_std)
        rows, cols = model.grid((h, w))
        assert got.shape[0] == 1 + rows * cols
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=f"{(h, w)}")
    uncut = [4 + 2 * rows * (2 * cols + 1) for rows, cols in map(model.grid, SIZES)]
    got = [model.num_image_tokens(s) for s in SIZES]
    assert [a < b for a, b in zip(got, uncut)] == [True, True, False, False]  # the unpadding cases are covered


@requires("transformers")
def test_next_logits_and_generation_match_hf():
    hf = _hf_next()
    ours = LlavaNext.from_hf(hf, backend="reference")
    with torch.no_grad():  # the exact-fit size too: HF's feature count per image equals ours
        px = torch.randn(len(SIZES), 7, 3, TILE, TILE, generator=generator())
        theirs = hf.model.get_image_features(px, torch.tensor(SIZES))
        theirs = getattr(theirs, "pooler_output", theirs)  # 4.5x returns the per-image feature list itself
        assert [f.shape[0] for f in theirs] == [ours.num_image_tokens(s) for s in SIZES]
        torch.testing.assert_close(ours._image_tokens(px, torch.tensor(SIZES)), torch.cat(theirs),
                                   rtol=1e-5, atol=1e-5)
    ids, mask, pixels, sizes = _next_batch(ours)
    keep = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)

    def run(model, px, **kw):
        return model(input_ids=ids, pixel_values=px, attention_mask=mask, image_sizes=sizes, **kw).logits[keep]

    with torch.no_grad():
        got = run(ours, pixels)
        ref = run(copy.deepcopy(hf).double(), pixels.double(), position_ids=positions)
        yard = run(hf, pixels, position_ids=positions)
    assert_close_by_rule(got, ref, yard, floor=1e-6 * max(1.0, ref.abs().max().item()), what="logits")
    kw = dict(attention_mask=mask, image_sizes=sizes, max_new_tokens=5, do_sample=False, eos_token_id=2,
              pad_token_id=0)
    assert torch.equal(ours.generate(ids, pixels, **kw), hf.generate(input_ids=ids, pixel_values=pixels, **kw))


@pytest.mark.parametrize("make,match", [
    (lambda: _tiny_next(image_grid_pinpoints=[[12, 20]]), "image_grid_pinpoints"),
    (lambda: _tiny_next(image_grid_pinpoints=[]), "image_grid_pinpoints"),
    (lambda: _tiny_next(vision_feature_select_strategy="full"), "full"),
    (lambda: anyres_tiles(torch.rand(3, 9, 9), [[12, 20]], TILE), "multiples"),
    (lambda: anyres_tiles(torch.zeros(3, 9, 9, dtype=torch.uint8), PINPOINTS, TILE), "float"),
], ids=["not-tile-multiple", "empty", "full-with-cls", "tiles-pinpoints", "tiles-dtype"])
def test_next_invalid_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _tiny_next(**kw):
    vision = dict(img_size=TILE, patch_size=6, embed_dim=32, depth=2, num_heads=2, patch_bias=False, pre_norm=True,
                  final_norm="pooled", backend="reference")
    lm = dict(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, backend="reference")
    return LlavaNext(vision, "mlp", lm, IMAGE, **{"image_grid_pinpoints": PINPOINTS, **kw})


def test_next_tile_count_must_match_image_sizes():
    model = _tiny_next()
    ids, mask, pixels, sizes = _next_batch(model)
    with pytest.raises(ValueError, match="tiles"):
        model(ids, pixels.flatten(0, 1)[:-1], sizes, mask)  # HF's positional order: image_sizes third
    for bad in (None, sizes[:, :1], sizes - 100):
        with pytest.raises(ValueError, match="image_sizes"):
            model(ids, pixels, bad, mask)
