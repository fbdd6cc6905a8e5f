"""Flamingo.from_hf against transformers' IdeficsForVisionText2Text (Idefics v1, tiny random config, no
downloads; norms, gates and the additional vocabulary rows random): logits and loss on a left-padded batch of
two images with text before the first, with HF's image_attention_mask followed as given; greedy generation;
one forward + backward through the Triton interpreter. Both alpha types, qk layer norms on and off."""
import copy

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
CASES = {  # alpha_type, cross_layer_interval, additional_vocab_size, qk layer norms (perceiver and gated layers)
    "float-every-layer": ("float", 1, 0, False),
    "vector-every-2nd-extra-vocab-qk-norms": ("vector", 2, 2, True),
}
IMAGE = {0: V - 1, 2: V + 1}  # the <image> id: an additional row when there are some (idefics-9b: 32001)


def _hf(alpha_type, interval, extra, qk_norms):
    torch.manual_seed(generator().initial_seed() % 2**31)
    config = transformers.IdeficsConfig(
        vocab_size=V, additional_vocab_size=extra, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, cross_layer_interval=interval, alpha_type=alpha_type, qk_layer_norms=qk_norms,
        use_resampler=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, max_position_embeddings=64,
        vision_config=dict(embed_dim=16, image_size=8, patch_size=4, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=3, resampler_depth=2, resampler_n_heads=2,
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
    alpha_type, interval, extra, qk_norms = CASES[case]
    hf = _hf(*CASES[case])
    ours = Flamingo.from_hf(hf, media_token_id=IMAGE[extra], backend="reference")
    assert sorted(ours.gated_cross_attn_layers) == [str(i) for i in range(2) if i % interval == 0]
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
    assert ours.gated_cross_attn_layers["0"].attn_gate.dtype == ours.perceiver.latents.dtype == torch.bfloat16
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


@requires("transformers")
def test_greedy_generation_equals_hf():
    case = CASES["vector-every-2nd-extra-vocab-qk-norms"]
    hf = _hf(*case)
    ours = Flamingo.from_hf(hf, backend="reference")  # no <image> id: the image mask decides
    ids, mask, pixels, iam = _batch(IMAGE[case[2]])
    kw = dict(attention_mask=mask, pixel_values=pixels, image_attention_mask=iam, max_new_tokens=5,
              min_length=L + 5, pad_token_id=PAD)
    expected = hf.generate(input_ids=ids, do_sample=False, **kw)
    got = ours.generate(input_ids=ids, **kw)
    assert got.shape == (2, L + 5) and torch.equal(got[:, :L], ids)

    @torch.no_grad()
    def next_logits(prefix):  # HF's model on the prefix, each new token seeing the prompt's last token's images
        new = prefix.shape[1] - L
        m = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)
        im = torch.cat([iam, iam[:, -1:].expand(-1, new, -1)], 1)
        return hf(input_ids=prefix, attention_mask=m, pixel_values=pixels, image_attention_mask=im).logits[:, -1]

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
    with pytest.raises(ValueError, match="cross_attn_position"):
        Flamingo.from_preset("tiny", cross_attn_position="middle")
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        Flamingo.from_preset("tiny", vision_feature_select_strategy="cls")
    hf.config.use_resampler = False
    with pytest.raises(ValueError, match="use_resampler"):
        Flamingo.from_hf(hf)
    with pytest.raises(ValueError, match="IdeficsForVisionText2Text"):
        Flamingo.from_hf(hf.model)
