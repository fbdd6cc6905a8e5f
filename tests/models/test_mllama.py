"""Mllama (Llama 3.2 Vision) against transformers' MllamaForConditionalGeneration (tiny random config, no
downloads): logits and loss of a left-padded batch with two images of different tile counts per sample and
text before the first image, greedy generation, Meta's variant (differs only on rows before any image), one
forward + backward through the Triton interpreter, the tiling grid choice against HF's processor, the
bridge stage's freezing. (The paper preset's size: tests/models/test_presets.py.)"""
import copy

import pytest
import torch
from optional_deps import optional_import, requires

from mmfast.models import Mllama
from mmfast.nn import GatedCrossAttentionBlock
from mmfast.models.mllama import cross_attention_mask, optimal_tiled_canvas, supported_aspect_ratios, tile_image
from hf_configs import hf_rope_kwargs
from model_helpers import assert_bf16_matches_hf, assert_one_step_trains_only, hf_loaded_in
from numerics import assert_close_by_rule, assert_same_greedy_tokens, generator, randomise_norms_

transformers = optional_import("transformers")
V, IMAGE, L = 100, 98, 10


def _hf():
    torch.manual_seed(generator().initial_seed() % 2**31)
    config = transformers.MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                           intermediate_size=64, vision_output_dim=64, image_size=16, patch_size=8, max_num_tiles=2,
                           intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, cross_attention_layers=[1],
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         **hf_rope_kwargs(transformers.models.mllama.configuration_mllama.MllamaTextConfig,
                                          {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8})),
        image_token_index=IMAGE)
    model = randomise_norms_(transformers.MllamaForConditionalGeneration(config).eval())
    with torch.no_grad():  # gates start at 0 (tanh 0 hides a branch): random, non-zero, either sign
        g = generator()
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.copy_((torch.rand(1, generator=g) * 0.8 + 0.3) * (1 - 2 * torch.randint(2, (1,), generator=g)))
    return model


def _batch():
    """Two samples, two images each (2 tiles max): sample 0 = [text, text, <img>, 3 text, <img>, 3 text]
    (rows 0-1 before any image, image 0 uses 2 tiles, image 1 one tile, rows from the second image see it
    only); sample 1 left-padded by 2 = [pad, pad, text, <img>, <img>, 5 text] (image 0 one tile, image 1 two;
    rows from the images see both)."""
    g = generator()
    ids = torch.randint(3, IMAGE, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    ids[0, [2, 6]] = IMAGE
    ids[1, :2], mask[1, :2] = 0, 0
    ids[1, [3, 4]] = IMAGE
    ar_mask = torch.tensor([[[1, 1], [1, 0]], [[1, 0], [1, 1]]])
    ar_ids = torch.tensor([[2, 1], [1, 2]])
    xmask = torch.zeros(2, L, 2, 2, dtype=torch.long)
    xmask[0, 2:6, 0] = ar_mask[0, 0]
    xmask[0, 6:, 1] = ar_mask[0, 1]
    xmask[1, 3:] = ar_mask[1]
    pixels = torch.randn(2, 2, 2, 3, 16, 16, generator=g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, aspect_ratio_ids=ar_ids,
                aspect_ratio_mask=ar_mask, cross_attention_mask=xmask)


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)  # what HF's generate passes for left-padded rows


@requires("transformers")
def test_logits_and_loss_match_hf_left_padded_two_images():
    hf = _hf()
    ours = Mllama.from_hf(hf, backend="reference")
    batch = _batch()
    keep = batch["attention_mask"].bool()
    labels = batch["input_ids"].masked_fill(~keep | (batch["input_ids"] == IMAGE), -100)
    if hasattr(hf.model.language_model, "_update_causal_mask"):
        # 4.5x builds its own float mask and, on CPU, leaves a row that hides every key at finfo.min throughout
        # (values averaged over all keys; ours and 5.x's differ: see mmfast/models/mllama.py). Left-padding rows
        # are such rows, and HF's shifted loss reads one for the first real token after the padding: that label
        # is left out there (the logits compared are the kept rows' either way)
        after_pad = torch.cat([torch.zeros_like(keep[:, :1]), ~keep[:, :-1]], 1)
        labels = labels.masked_fill(after_pad, -100)

    def run(model, dtype, **kw):
        b = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in batch.items()}
        out = model(**b, labels=labels, **kw)
        return out.logits[keep], out.loss

    got = run(ours, torch.float32)
    ref = run(copy.deepcopy(hf).double(), torch.float64, position_ids=_positions(batch["attention_mask"]))
    yard = run(hf, torch.float32, position_ids=_positions(batch["attention_mask"]))
    for name, a, r, y in zip(("logits", "loss"), got, ref, yard):
        assert_close_by_rule(a, r, y, floor=1e-6 * max(1.0, r.abs().max().item()), what=name)


@requires("transformers")
def test_bf16_checkpoint_matches_hf_left_padded_two_images():
    """HF's model as from_pretrained(dtype=torch.bfloat16) loads it (no _keep_in_fp32_modules: the gates and
    norms bf16 too); from_hf keeps the dtypes, the rotary inv_freq fp32 and equal to HF's (rounded to bf16 it
    turns the angles by distance x 2^-9 x inv_freq: invisible at these 10 tokens, not at thousands); logits
    and loss within the rule of HF's own bf16 run against fp64."""
    hf = _hf()
    hf_bf16 = hf_loaded_in(hf, torch.bfloat16)
    ours = Mllama.from_hf(hf_bf16, backend="reference")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    block = ours.language_model.layers[hf.config.text_config.cross_attention_layers[0]]
    assert block.attn_gate.dtype == block.ff_gate.dtype == torch.bfloat16
    inv_freq = hf_bf16.model.language_model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32 and torch.equal(ours.language_model.rotary.inv_freq, inv_freq)
    batch = _batch()
    keep = batch["attention_mask"].bool()
    labels = batch["input_ids"].masked_fill(~keep | (batch["input_ids"] == IMAGE), -100)

    @torch.no_grad()
    def run(model, dtype):
        kw = {} if model is ours else dict(position_ids=_positions(batch["attention_mask"]))
        b = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in batch.items()}
        return model(**b, labels=labels, **kw)

    assert_bf16_matches_hf(ours, hf, hf_bf16, run, keep, labels)


@requires("transformers")
def test_text_only_matches_hf():
    """No image: the cross-attention layers are skipped, as transformers skips them."""
    hf = _hf()
    batch = _batch()
    ids, mask = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE, 5), batch["attention_mask"]
    positions = _positions(mask)
    with torch.no_grad():
        got = Mllama.from_hf(hf, backend="reference")(ids, attention_mask=mask).logits
        ref = copy.deepcopy(hf).double()(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        yard = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    keep = mask.bool()
    assert_close_by_rule(got[keep], ref[keep], yard[keep], floor=1e-6, what="text-only logits")


@requires("transformers")
def test_meta_variant_differs_only_before_the_first_image():
    """The cross-attention layer's output: equal on rows that see an image, different on the others (Meta's
    keep their input exactly; later self-attention layers then carry the difference to every row)."""
    hf = _hf()
    batch = _batch()
    layer = hf.config.text_config.cross_attention_layers[0]
    with torch.no_grad():
        hf_rows, meta_rows = (Mllama.from_hf(hf, text_before_image=v, backend="reference")(
            **batch, output_hidden_states=True).hidden_states for v in ("hf", "meta"))
    a, b, x = hf_rows[layer + 1], meta_rows[layer + 1], meta_rows[layer]
    before = torch.zeros(2, L, dtype=torch.bool)
    before[0, :2], before[1, :3] = True, True  # rows that see no image (sample 1: 2 pads and a text token)
    torch.testing.assert_close(a[~before], b[~before], rtol=0, atol=0)
    assert torch.equal(b[before], x[before]), "Meta's rows before any image must keep their input"
    assert (a[before] - b[before]).abs().amax(-1).min() > 1e-4, "the gated attention over every key did not count"


@requires("transformers")
@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beam3"])
def test_generation_equals_hf(beams):
    hf = _hf()
    ours = Mllama.from_hf(hf, backend="reference")
    batch = _batch()
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=beams, eos_token_id=2, pad_token_id=0)
    expected = hf.generate(**batch, **kw)
    got = ours.generate(**batch, **kw)
    if beams > 1:  # the image keys / values repeated per beam; beams of one prompt share them
        assert torch.equal(got, expected), f"{got}\n{expected}"
        return
    assert got.shape == expected.shape == (2, L + 5)

    def next_logits(prefix):
        extra = prefix.shape[1] - L
        b = dict(batch, input_ids=prefix,
                 attention_mask=torch.cat([batch["attention_mask"], torch.ones(2, extra, dtype=torch.long)], 1),
                 cross_attention_mask=torch.cat([batch["cross_attention_mask"],
                                                 batch["cross_attention_mask"][:, -1:].expand(-1, extra, -1, -1)], 1))
        with torch.no_grad():
            return hf(**b, position_ids=_positions(b["attention_mask"])).logits[:, -1]
    assert_same_greedy_tokens(got, expected, next_logits)


@requires("transformers")
def test_generation_stops_on_the_hf_configs_eos_list():
    """Llama 3.2's list of EOS ids in the HF model's generation config: from_hf keeps it and generate (its
    default) ends rows on any of them, as HF's (the later ids: what each row emits at step 1)."""
    hf = _hf().double()  # float64: no near-ties between the two implementations' greedy picks
    batch = {k: t.double() if t.is_floating_point() else t for k, t in _batch().items()}
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    probe = Mllama.from_hf(hf, backend="reference").generate(**batch, eos_token_id=-1, **kw)
    eos = [2] + sorted(set(probe[:, L + 1].tolist()) - {2})
    hf.generation_config.eos_token_id = eos
    ours = Mllama.from_hf(hf, backend="reference")
    assert ours.language_model.eos_token_id == eos
    expected = hf.generate(**batch, **kw)
    assert torch.equal(ours.generate(**batch, **kw), expected)
    assert expected.shape[1] <= L + 2  # every row ended by step 1


@requires("transformers")
def test_cached_decoding_matches_hf_full_forward():
    """Prefill with a cache, then one token per call (the image's keys / values kept in the cache, the
    cross-attention mask given in full and sliced by the cache length, as HF's forward does): each step's
    logits equal HF's uncached forward over the whole sequence."""
    hf = _hf()
    ours = Mllama.from_hf(hf, backend="reference")
    batch, steps = _batch(), 3
    new = torch.randint(3, IMAGE, (2, steps), generator=generator())
    ids = torch.cat([batch["input_ids"], new], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, steps, dtype=torch.long)], 1)
    xmask = torch.cat([batch["cross_attention_mask"], batch["cross_attention_mask"][:, -1:].expand(-1, steps, -1, -1)], 1)
    with torch.no_grad():
        out = ours(**batch, use_cache=True)
        got = []
        for t in range(steps):
            n = L + t + 1
            got.append(ours(ids[:, n - 1:n], attention_mask=mask[:, :n], cross_attention_mask=xmask[:, :n],
                            cache=out.cache).logits[:, -1])
        got = torch.stack(got, 1)
        full = dict(batch, input_ids=ids, attention_mask=mask, cross_attention_mask=xmask, position_ids=_positions(mask))
        ref = copy.deepcopy(hf).double()(**{k: (t.double() if t.is_floating_point() else t) for k, t in full.items()})
        yard = hf(**full)
    sl = slice(L, L + steps)
    assert_close_by_rule(got, ref.logits[:, sl], yard.logits[:, sl], floor=1e-6, what="cached decoding logits")


@requires("transformers")
def test_triton_interpreter_forward_backward_matches_reference():
    """Tile patch embedding, the vision encoder's split attention, the gated global layers, the
    cross-attention intervals with tile padding (and the all-keys merge of rows before an image), the
    decoder's causal left-padded GQA: one forward + backward on backend="triton" (interpreter on CPU)."""
    hf = _hf()
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    results = []
    for backend in ("reference", "triton"):
        model = Mllama.from_hf(hf, backend=backend)
        out = model(**batch, labels=labels)
        out.loss.backward()
        results.append((out.logits[batch["attention_mask"].bool()].detach(),
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (tri, tri_grads) = results
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-5)
    assert set(tri_grads) == set(ref_grads)
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(tri_grads[name], ref_grads[name], rtol=1e-3, atol=1e-4 * max(scale, 1e-3),
                                   msg=lambda m: f"{name}: {m}")


@requires("transformers")
def test_tiling_grid_choice_matches_hf_processor():
    from transformers.models.mllama.image_processing_mllama import (get_all_supported_aspect_ratios,
                                                                    get_optimal_tiled_canvas)
    g = generator()
    sizes = torch.randint(1, 2500, (400, 2), generator=g).tolist() + [[560, 560], [560, 1120], [1120, 560],
                                                                      [280, 1680], [1, 1], [2240, 2240]]
    for max_tiles in (1, 2, 4, 6):
        assert supported_aspect_ratios(max_tiles) == [tuple(r) for r in get_all_supported_aspect_ratios(max_tiles)]
        for h, w in sizes:
            expected = tuple(int(v) for v in get_optimal_tiled_canvas(h, w, max_tiles, 560))
            assert optimal_tiled_canvas(h, w, max_tiles, 560) == expected, (h, w, max_tiles)


@requires("transformers")
@pytest.mark.parametrize("size", [(30, 70), (28, 28), (10, 100), (90, 50), (57, 57), (13, 29)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_tile_image_matches_hf_processor(size):
    """Resize to the canvas, zero padding, normalisation, tile order, aspect ratio id and tile mask, against
    MllamaImageProcessor on a float image (28px tiles, up to 4)."""
    processor = transformers.MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=4)
    if getattr(processor, "backend", None) != "torchvision":
        pytest.skip("tile_image follows transformers >= 5's torchvision MllamaImageProcessor; 4.5x's resizes "
                    "through PIL / NumPy (a float image quantised to uint8), so no float image matches it")
    image = torch.rand(3, *size, generator=generator())
    expected = processor(images=[[image]], do_rescale=False, return_tensors="pt")
    tiles, ar_id, mask = tile_image(image, 4, 28, mean=processor.image_mean, std=processor.image_std)
    torch.testing.assert_close(tiles, expected["pixel_values"][0, 0])
    assert ar_id == int(expected["aspect_ratio_ids"][0, 0])
    assert mask.tolist() == expected["aspect_ratio_mask"][0, 0].tolist()


@requires("transformers")
def test_cross_attention_mask_matches_hf_processor():
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)
    g = generator()
    for _ in range(50):
        ids = torch.randint(0, 4, (3, 12), generator=g)  # token 3 is the image token: runs and gaps of images
        tiles = [[int(t) for t in torch.randint(1, 5, (int((row == 3).sum()),), generator=g)] for row in ids]
        if not any(tiles):
            continue
        sparse = [get_cross_attention_token_mask(row.tolist(), 3) for row in ids]
        expected = convert_sparse_cross_attention_mask_to_dense(sparse, tiles, 4, 12)
        assert cross_attention_mask(ids, 3, tiles, 4).tolist() == expected.tolist(), (ids, tiles)


@pytest.mark.parametrize("stage", ["bridge", "full"])
def test_stage_freezing_after_one_step(stage):
    model = Mllama.from_preset("tiny", backend="reference")
    model.requires_grad_(False).set_stage(stage)  # set_stage decides every parameter, whatever came before
    with torch.no_grad():  # open the gates so that every trainable parameter gets a gradient
        for block in model.cross_layers():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    batch = model.synthetic_batch(2, 8, generator=generator())
    cross = tuple(f"language_model.layers.{i}." for i in model.cross_attention_layers)
    expect = ("projector.",) + cross + (("language_model.",) if stage == "full" else ())
    assert_one_step_trains_only(model, lambda: model(**batch).loss, expect)


def test_inputs_are_validated():
    model = Mllama.from_preset("tiny", backend="reference")
    batch = model.synthetic_batch(1, 6, generator=generator())
    with pytest.raises(ValueError, match="cross_attention_mask"):
        model(**dict(batch, cross_attention_mask=batch["cross_attention_mask"][:, :3]))
    two = dict(batch, pixel_values=batch["pixel_values"].repeat(1, 2, 1, 1, 1, 1),
               aspect_ratio_ids=torch.tensor([[2, 2]]), aspect_ratio_mask=torch.ones(1, 2, 2, dtype=torch.long))
    bad = torch.zeros(1, 6, 2, 2, dtype=torch.long)
    bad[0, 4, 0, 1] = 1
    bad[0, 5, :, 0] = 1  # tiles 0 and 2 but not tile 1, which another row sees: no interval + padding form
    with pytest.raises(ValueError, match="one run"):
        model(**dict(two, cross_attention_mask=bad))
    with pytest.raises(ValueError, match="text_before_image"):
        Mllama.from_preset("tiny", text_before_image="openai")
    with pytest.raises(ValueError, match="empty_rows"):
        GatedCrossAttentionBlock(32, 4, variant="flamingo", empty_rows="all_keys")
    out = model(**batch, use_cache=True)
    with pytest.raises(ValueError, match="pixel_values"):
        model(batch["input_ids"][:, -1:], batch["pixel_values"], batch["aspect_ratio_mask"], batch["aspect_ratio_ids"],
              cache=out.cache)
