"""Flamingo.from_hf against transformers' IdeficsForVisionText2Text (Idefics v1, tiny random config, no
downloads; norms, gates and the additional vocabulary rows random): logits and loss on a left-padded batch of
two images with text before the first, with HF's image_attention_mask followed as given; greedy generation;
one forward + backward through the Triton interpreter. Both alpha types, qk layer norms on and off, with and
without the perceiver (use_resampler=False, transformers' default); HF's other image inputs
(image_encoder_embeddings, perceiver_embeddings, pixel_values of another size with interpolate_pos_encoding)."""
import copy
import inspect

import pytest
import torch
from optional_deps import optional_import, requires
from torch import nn

from mmfast.models import Flamingo
from model_helpers import assert_bf16_matches_hf, assert_triton_matches_reference, hf_loaded_in
from numerics import assert_close_by_rule, assert_same_greedy_tokens, generator, randomise_norms_

transformers = optional_import("transformers")
V, PAD, EOS = 50, 0, 2
L, IMAGES = 10, 2
CASES = {  # alpha_type, cross_layer_interval, additional_vocab_size, qk layer norms (perceiver and gated), resampler
    "float-every-layer": ("float", 1, 0, False, True),
    "vector-every-2nd-extra-vocab-qk-norms": ("vector", 2, 2, True, True),
    "no-resampler-vector-extra-vocab": ("vector", 1, 2, True, False),
}
IMAGE = {0: V - 1, 2: V + 1}  # the <image> id: an additional row when there are some (idefics-9b: 32001)


def _hf(alpha_type, interval, extra, qk_norms, resampler):
    torch.manual_seed(generator().initial_seed() % 2**31)
    config = transformers.IdeficsConfig(
        vocab_size=V, additional_vocab_size=extra, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, cross_layer_interval=interval, alpha_type=alpha_type, qk_layer_norms=qk_norms,
        use_resampler=resampler, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, max_position_embeddings=64,
        vision_config=dict(embed_dim=16, image_size=8, patch_size=4, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        perceiver_config=dict(use_resampler=resampler, resampler_n_latents=3, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=8, qk_layer_norms_perceiver=qk_norms))
    hf = transformers.IdeficsForVisionText2Text(config).eval()
    randomise_norms_(hf)
    with torch.no_grad():
        for m in hf.modules():  # LayerNorms whose names lack "norm" (pre_layrnorm, the perceiver MLP's ln)
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        for name, p in hf.named_parameters():
            if name.endswith(("alpha_cross_attn", "alpha_dense")):  # 0 at init: the bridge would not matter
                p.uniform_(0.3, 1.0)
        # std 0.02 at init: beside its randn latents the perceiver's output would hardly depend on the images
        for m in hf.model.perceiver_resampler.modules() if resampler else ():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5)
    return hf


@torch.no_grad()
def _batch(image):
    """Row 0: [2 text, <image>, 3 text, <image>, 3 text]; row 1: the same shifted right behind 2 pads. The
    image mask is the processor's (a token sees its most recent image, none before the first or at padding),
    except row 0's last token, which sees both images (HF follows the mask it is given)."""
    g = generator()
    ids = torch.randint(3, V - 1, (2, L), generator=g)
    ids[:, 2] = ids[:, 6] = image
    ids[1] = torch.cat([torch.full((2,), PAD), ids[1, :-2]])
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, :2] = 0
    recent = (ids == image).cumsum(-1) - 1
    iam = (recent[..., None] == torch.arange(IMAGES)) & mask.bool()[..., None]
    iam[0, -1] = True
    return ids, mask, torch.randn(2, IMAGES, 3, 8, 8, generator=g), iam.long()


@pytest.mark.parametrize("case", list(CASES))
@requires("transformers")
def test_logits_and_loss_match_hf_left_padded(case):
    alpha_type, interval, extra, qk_norms, resampler = CASES[case]
    hf = _hf(*CASES[case])
    ours = Flamingo.from_hf(hf, media_token_id=IMAGE[extra], backend="reference")
    assert sorted(ours.gated_cross_attn_layers) == [str(i) for i in range(2) if i % interval == 0]
    assert (ours.perceiver is not None) == resampler
    ids, mask, pixels, iam = _batch(IMAGE[extra])
    keep = mask.bool()
    # none where a pad position would predict (padded rows' logits are arbitrary)
    after_pad = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~keep[:, :-1]], 1)
    labels = ids.masked_fill(~keep | after_pad, -100)
    labels[0, 3] = V + extra - 1  # a target in the last column (an additional row when there are some)

    def run(model, px):
        with torch.no_grad():
            # HF's own loss reshapes the logits to vocab_size columns: wrong (it raises) with additional rows
            out = model(input_ids=ids, pixel_values=px, image_attention_mask=iam, attention_mask=mask,
                        labels=labels if extra == 0 or model is ours else None)
        loss = out.loss if out.loss is not None else nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1))
        return out.logits[keep], loss

    got = run(ours, pixels)
    ref = run(copy.deepcopy(hf).double(), pixels.double())
    yard = run(hf, pixels)
    assert got[0].shape == (int(keep.sum()), V + extra)
    for name, a, r, y in zip(("logits", "loss"), got, ref, yard):
        assert_close_by_rule(a, r, y, floor=1e-6 * max(1.0, r.abs().max().item()), what=name)


@pytest.mark.parametrize("case", list(CASES))
@requires("transformers")
def test_bf16_checkpoint_matches_hf_left_padded(case):
    """HF's model as from_pretrained(dtype=torch.bfloat16) loads it (no _keep_in_fp32_modules: the alphas,
    latents and norms bf16 too); from_hf keeps the dtypes, the rotary inv_freq fp32 and equal to HF's; logits
    and loss within the rule of HF's own bf16 run against fp64 (with additional vocab rows HF's loss fails,
    as above: theirs from the logits)."""
    extra = CASES[case][2]
    hf = _hf(*CASES[case])
    hf_bf16 = hf_loaded_in(hf, torch.bfloat16)
    ours = Flamingo.from_hf(hf_bf16, media_token_id=IMAGE[extra], backend="reference")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.gated_cross_attn_layers["0"].attn_gate.dtype == torch.bfloat16
    inv_freq = hf_bf16.model.layers[0].self_attn.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32 and torch.equal(ours.language_model.rotary.inv_freq, inv_freq)
    ids, mask, pixels, iam = _batch(IMAGE[extra])
    keep = mask.bool()
    after_pad = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~keep[:, :-1]], 1)
    labels = ids.masked_fill(~keep | after_pad, -100)
    labels[0, 3] = V + extra - 1

    @torch.no_grad()
    def run(model, dtype):
        return model(input_ids=ids, pixel_values=pixels.to(dtype), image_attention_mask=iam, attention_mask=mask,
                     labels=labels if extra == 0 or model is ours else None)

    assert_bf16_matches_hf(ours, hf, hf_bf16, run, keep, labels, hf_loss=extra == 0)


def _hf_unpacks_4d(hf):
    """Whether HF's IdeficsModel takes image / perceiver embeddings only as (B, T_img, S, D): 4.5x unpacks their
    four sizes; 5.x takes them flattened to (B·T_img, S, D) (and fails on 4D perceiver embeddings)."""
    return "num_images, image_seq_len, image_hidden_size = " in inspect.getsource(type(hf.model).forward)


def _image_inputs(hf, pixels, kind, ours=False):
    """HF's image keywords of `kind`, computed by the HF model `hf` (in its dtype) from `pixels`; a "-4d" kind gives
    ours the (B, T_img, S, D) layout, HF its own (see _hf_unpacks_4d)."""
    pixels = pixels.to(hf.dtype)
    if kind.startswith("pixel_values"):
        return dict(pixel_values=pixels, interpolate_pos_encoding=kind.endswith("interpolated"))
    with torch.no_grad():
        x, name = hf.model.vision_model(pixels.flatten(0, 1)).last_hidden_state, "image_encoder_embeddings"
        if kind.startswith("perceiver"):
            x, name = hf.model.perceiver_resampler(x), "perceiver_embeddings"
    four_d = kind.endswith("-4d") if ours else _hf_unpacks_4d(hf)
    return {name: x.unflatten(0, pixels.shape[:2]) if four_d else x}


def _pixels(kind):
    """The batch's images, at 16x12 (a 4x3 patch grid, the config's is 2x2) for interpolate_pos_encoding."""
    size = (16, 12) if kind.endswith("interpolated") else (8, 8)
    return torch.randn(2, IMAGES, 3, *size, generator=generator())


RESAMPLED, DIRECT = "vector-every-2nd-extra-vocab-qk-norms", "no-resampler-vector-extra-vocab"


def _ids(resampled, direct):
    """{test id: (case, kind)} for the kinds run with and without the perceiver."""
    return {**{kind: (RESAMPLED, kind) for kind in resampled},
            **{f"no-resampler-{kind}": (DIRECT, kind) for kind in direct}}


IMAGE_INPUTS = _ids(("pixel_values-interpolated", "image_encoder_embeddings", "image_encoder_embeddings-4d",
                     "perceiver_embeddings", "perceiver_embeddings-4d"),
                    ("pixel_values-interpolated", "image_encoder_embeddings-4d"))


@pytest.mark.parametrize("name", list(IMAGE_INPUTS))
@requires("transformers")
def test_image_inputs_match_hf(name):
    """HF's other image inputs: the logits of the same keywords (the embeddings computed by each side's HF
    model: the fp64 reference's by its fp64 copy)."""
    case, kind = IMAGE_INPUTS[name]
    hf = _hf(*CASES[case])
    ours = Flamingo.from_hf(hf, backend="reference")
    ids, mask, _, iam = _batch(IMAGE[CASES[case][2]])
    pixels, keep = _pixels(kind), mask.bool()

    @torch.no_grad()
    def run(model, theirs):
        kw = _image_inputs(theirs, pixels, kind, ours=model is ours)
        return model(input_ids=ids, attention_mask=mask, image_attention_mask=iam, **kw).logits[keep]

    hf64 = copy.deepcopy(hf).double()
    ref = run(hf64, hf64)
    assert_close_by_rule(run(ours, hf), ref, run(hf, hf), floor=1e-6 * max(1.0, ref.abs().max().item()), what=name)


GENERATIONS = _ids(("pixel_values", "image_encoder_embeddings", "perceiver_embeddings"),
                   ("pixel_values", "pixel_values-interpolated"))


@pytest.mark.parametrize("name", list(GENERATIONS))
@requires("transformers")
def test_greedy_generation_equals_hf(name):
    """Greedy tokens equal HF's generate on the same keywords; where HF's generate fails on embeddings (see
    below) its tokens come from the pixels they come from, the parting check by its forward on the embeddings."""
    case, kind = GENERATIONS[name]
    hf = _hf(*CASES[case])
    ours = Flamingo.from_hf(hf, backend="reference")  # no <image> id: the image mask decides
    ids, mask, _, iam = _batch(IMAGE[CASES[case][2]])
    pixels = _pixels(kind)
    kw = dict(attention_mask=mask, image_attention_mask=iam, max_new_tokens=5, min_length=L + 5, pad_token_id=PAD)
    # HF's generate fails on 5.x's perceiver_embeddings and on 4.5x's image / perceiver embeddings (from the
    # second step it passes them along with its cached image states): its tokens from the pixels there
    embeds = kind == "perceiver_embeddings" or (_hf_unpacks_4d(hf) and kind == "image_encoder_embeddings")
    theirs = _image_inputs(hf, pixels, "pixel_values" if embeds else kind)
    expected = hf.generate(input_ids=ids, do_sample=False, **kw, **theirs)
    got = ours.generate(input_ids=ids, **kw, **_image_inputs(hf, pixels, kind, ours=True))
    assert got.shape == (2, L + 5) and torch.equal(got[:, :L], ids)

    @torch.no_grad()
    def next_logits(prefix):  # HF's model on the prefix, each new token seeing the prompt's last token's images
        new = prefix.shape[1] - L
        m = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)
        im = torch.cat([iam, iam[:, -1:].expand(-1, new, -1)], 1)
        return hf(input_ids=prefix, attention_mask=m, image_attention_mask=im,
                  **_image_inputs(hf, pixels, kind)).logits[:, -1]

    assert_same_greedy_tokens(got, expected, next_logits)


@requires("transformers")
def test_triton_interpreter_fwd_bwd_matches_reference():
    """The vision tower, the perceiver (ReLU, qk norms), the idefics gated blocks and the decoder through the
    Triton kernels (interpreter), forward and the bridge's gradients."""
    case = CASES["vector-every-2nd-extra-vocab-qk-norms"]
    hf = _hf(*case)
    tri = Flamingo.from_hf(hf, backend="triton")
    ref = Flamingo.from_hf(hf, backend="reference")
    ids, mask, pixels, iam = _batch(IMAGE[case[2]])
    labels = ids.masked_fill(mask == 0, -100)

    def run(model, dtype):
        out = model(input_ids=ids, pixel_values=pixels.to(dtype), image_attention_mask=iam, attention_mask=mask,
                    labels=labels)
        out.loss.backward()
        return out

    assert_triton_matches_reference(tri, ref, run, mask.bool())


@requires("transformers")
def test_image_mask_checks_and_refusals():
    hf = _hf(*CASES["float-every-layer"])
    ours = Flamingo.from_hf(hf, backend="reference")
    ids, mask, pixels, iam = _batch(IMAGE[0])
    three = torch.cat([pixels, pixels[:, :1]], 1)
    gap = torch.zeros(2, L, 3, dtype=torch.long)
    gap[0, -1, 0] = gap[0, -1, 2] = 1  # images 0 and 2 but not 1: no single key interval
    with pytest.raises(ValueError, match="consecutive"):
        ours(input_ids=ids, pixel_values=three, image_attention_mask=gap, attention_mask=mask)
    with pytest.raises(ValueError, match="image_attention_mask must have shape"):
        ours(input_ids=ids, pixel_values=pixels, image_attention_mask=iam[:, :, :1], attention_mask=mask)
    with pytest.raises(ValueError, match="media_token_id=None"):
        ours(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    with pytest.raises(ValueError, match="not both"):
        ours(vision_x=pixels[:, :, None], input_ids=ids, pixel_values=pixels, image_attention_mask=iam)
    with pytest.raises(ValueError, match="media_token_id=None"):
        ours.synthetic_batch(1)
    with pytest.raises(ValueError, match="use_resampler=False"):
        Flamingo.from_preset("tiny", use_resampler=False, perceiver=dict(depth=1))


@requires("transformers")
def test_image_input_checks():
    """Exactly one image input, HF's shapes (ValueError naming the argument), perceiver_embeddings only with a
    perceiver (HF refuses them too), interpolate_pos_encoding only with pixels, another size only with it."""
    hf = _hf(*CASES["float-every-layer"])
    ours = Flamingo.from_hf(hf, backend="reference")
    ids, mask, pixels, iam = _batch(IMAGE[0])
    enc = _image_inputs(hf, pixels, "image_encoder_embeddings", ours=True)["image_encoder_embeddings"]  # (4, 5, 16)
    per = _image_inputs(hf, pixels, "perceiver_embeddings", ours=True)["perceiver_embeddings"]  # (4, 3, 16)
    kw = dict(input_ids=ids, attention_mask=mask, image_attention_mask=iam)
    for call in (ours, ours.generate):
        for extra in (dict(pixel_values=pixels, image_encoder_embeddings=enc),
                      dict(image_encoder_embeddings=enc, perceiver_embeddings=per), {}):
            with pytest.raises(ValueError, match="exactly one of vision_x / pixel_values, image_encoder_embeddings"):
                call(**kw, **extra)
    for name, bad in (("image_encoder_embeddings", enc[..., :8]), ("image_encoder_embeddings", enc[:3]),
                      ("image_encoder_embeddings", enc[None]), ("perceiver_embeddings", per[:, :2]),
                      ("perceiver_embeddings", per.unflatten(0, (4, 1))), ("image_encoder_embeddings", enc.tolist())):
        with pytest.raises(ValueError, match=f"{name} must be a"):
            ours(**kw, **{name: bad})
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(**kw, image_encoder_embeddings=enc, interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="interpolate_pos_encoding must be True or False"):
        ours(**kw, pixel_values=pixels, interpolate_pos_encoding="yes")
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        ours(**kw, pixel_values=_pixels("pixel_values-interpolated"))
    with pytest.raises(ValueError, match="image_attention_mask must have shape"):  # 4 images a row, not 2
        ours(**kw, image_encoder_embeddings=torch.cat([enc, enc]))
    direct = Flamingo.from_hf(_hf(*CASES[DIRECT]), backend="reference")
    assert direct.perceiver is None
    with pytest.raises(ValueError, match="no perceiver"):
        direct(**kw, perceiver_embeddings=per)
    with pytest.raises(ValueError, match="cross_attn_position"):
        Flamingo.from_preset("tiny", cross_attn_position="middle")
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        Flamingo.from_preset("tiny", vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match="IdeficsForVisionText2Text"):
        Flamingo.from_hf(hf.model)
