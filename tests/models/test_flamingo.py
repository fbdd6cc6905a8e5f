"""Flamingo against open_flamingo's own model (tiny open_clip ViT + tiny transformers Llama, extended with its
FlamingoLMMixin as its factory does, gates made non-zero): logits on a left-padded interleaved batch with text
before the first image, greedy and beam generation; one tiny model fwd + bwd through the Triton interpreter;
the media mask against a hand-written dense one; freezing after an optimiser step; the few-shot prompt.
(The paper-size preset's parameter count: tests/models/test_presets.py.)

open_flamingo 2.0.1 pins torch 2.0.1 and transformers 4.28: install it with --no-deps (plus einops and
einops-exts); its model runs unchanged under transformers 5.24 (a FutureWarning about past_key_values)."""
import copy

import pytest
import torch
from optional_deps import optional_import, requires
from torch import nn

from mmfast.kernels.attention.masks import dense_mask
from mmfast.models import Flamingo
from model_helpers import assert_one_step_trains_only, assert_triton_matches_reference
from numerics import assert_close_by_rule, assert_same_greedy_tokens, generator, randomise_norms_

transformers = optional_import("transformers")
OPEN_FLAMINGO = ("open_flamingo", "open_clip", "transformers", "einops_exts")
V, MEDIA, EOC, PAD = 100, 98, 99, 0
L, IMAGES, LATENTS = 12, 2, 5


def _randomise_(model):
    """Norms (LayerNorm modules of any name too) and the gates made random, so that a wrong mapping of
    them, or of the cross-attention they open, changes the output."""
    randomise_norms_(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        for name, p in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.uniform_(0.3, 1.0)
    return model


def _open_flamingo(every=1, frames=None, lm="llama"):
    """open_flamingo's Flamingo built as its factory.py does, from tiny random parts (no downloads); the
    perceiver and gated blocks replaced by tiny ones of its own helpers (re-wrapped by init_flamingo_layers)."""
    import open_clip
    from open_flamingo.src import helpers
    from open_flamingo.src.flamingo import Flamingo as OFFlamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    torch.manual_seed(generator().initial_seed() % 2**31)
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(image_size=16, patch_size=4, width=32, layers=2,
                                                              head_width=16, mlp_ratio=2),
                                text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1))
    clip.visual.output_tokens = True
    ids = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
               pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    if lm == "llama":
        lang = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ids, num_key_value_heads=2,
                                                                      intermediate_size=128))
    else:
        lang = transformers.OPTForCausalLM(transformers.OPTConfig(**ids, ffn_dim=128, word_embed_proj_dim=64))
    extend_instance(lang, FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("model.layers" if lm == "llama" else "model.decoder.layers")
    of = OFFlamingo(clip, lang, EOC, MEDIA, vis_dim=32, cross_attn_every_n_layers=every)
    of.perceiver = helpers.PerceiverResampler(dim=32, depth=2, dim_head=16, heads=2, num_latents=LATENTS,
                                              max_num_media=3, max_num_frames=frames)
    lang.gated_cross_attn_layers = nn.ModuleList(
        helpers.GatedCrossAttentionBlock(dim=64, dim_visual=32, dim_head=16, heads=2, ff_mult=2)
        if (i + 1) % every == 0 else None for i in range(2))
    lang.init_flamingo_layers(False)
    with torch.no_grad():  # a generated <image> would re-condition open_flamingo's media; its logit is kept at 0
        lang.lm_head.weight[MEDIA] = 0
    return _randomise_(of).eval()


@torch.no_grad()
def _batch():
    """Row 0: [2 text, <image>, 4 text, <image>, 3 text]; row 1: [2 pads, 1 text, <image>, 4 text, <image>,
    3 text], its second pad position holding a text id (the mask, not the id, says what is padding)."""
    g = generator()
    ids = torch.randint(3, 90, (2, L), generator=g)
    ids[:, 2] = ids[:, 7] = MEDIA
    ids[1] = torch.cat([torch.full((2,), PAD), ids[1, 1:-1]])
    ids[1, 1] = 5
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, :2] = 0
    return torch.randn(2, IMAGES, 1, 3, 16, 16, generator=g), ids, mask


@pytest.mark.parametrize("lm,every,frames", [("llama", 1, None), ("llama", 2, 2), ("opt", 1, None)],
                         ids=["llama-xattn-every-layer", "llama-every-2nd-frame-embs", "opt"])
@requires(*OPEN_FLAMINGO)
def test_logits_and_loss_match_open_flamingo_left_padded(lm, every, frames):
    of = _open_flamingo(every, frames, lm)
    ours = Flamingo.from_open_flamingo(of, backend="reference")
    assert sorted(ours.gated_cross_attn_layers) == [str(i) for i in range(2) if (i + 1) % every == 0]
    vx, ids, mask = _batch()
    keep = mask.bool()
    # open_flamingo's training labels; also none where a pad position would predict (padded rows' logits are
    # arbitrary: Hugging Face's and ours differ there)
    after_pad = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~keep[:, :-1]], 1)
    labels = ids.masked_fill(~keep | (ids == MEDIA) | after_pad, -100)
    # open_flamingo's plain forward over Llama numbers positions by column (OPT by real tokens, as ours)
    positions = torch.arange(L).expand(2, L) if lm == "llama" else None

    def run(model, x, **kw):
        with torch.no_grad():
            out = model(x, ids, attention_mask=mask, labels=labels, **kw)
        return out.logits[keep], out.loss

    got = run(ours, vx, position_ids=positions)
    ref = run(copy.deepcopy(of).double(), vx.double())
    yard = run(of, vx)
    for name, a, r, y in zip(("logits", "loss"), got, ref, yard):
        assert_close_by_rule(a, r, y, floor=1e-6 * max(1.0, r.abs().max().item()), what=name)


@requires(*OPEN_FLAMINGO)
def test_generation_equals_open_flamingo():
    of = _open_flamingo()
    ours = Flamingo.from_open_flamingo(of, backend="reference")
    vx, ids, mask = _batch()
    # min_length: <|endofchunk|> (the EOS) cannot end a generation before the 5 steps
    kw = dict(attention_mask=mask, max_new_tokens=5, min_length=L + 5, pad_token_id=PAD)
    expected = of.generate(vx, ids, **kw)
    got = ours.generate(vx, ids, **kw)
    assert got.shape == (2, L + 5) and torch.equal(got[:, :L], ids)

    @torch.no_grad()
    def next_logits(prefix):  # open_flamingo's model with the positions its generate uses
        m = torch.cat([mask, torch.ones_like(prefix[:, L:])], 1)
        of._encode_vision_x(vx)
        of._condition_media_locations(prefix)
        out = of.lang_encoder(input_ids=prefix, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp_min(0))
        of.lang_encoder.clear_conditioned_layers()
        return out.logits[:, -1]

    assert_same_greedy_tokens(got, expected, next_logits)
    beams = dict(kw, num_beams=2)
    assert torch.equal(ours.generate(vx, ids, **beams), of.generate(vx, ids, **beams))
    # top_k=1 sampling is greedy: the cached media reach the sampling path too
    sampled = ours.generate(vx, ids, do_sample=True, top_k=1, generator=generator(), **kw)
    assert torch.equal(sampled, got)


def _tiny(backend="reference"):
    torch.manual_seed(generator().initial_seed() % 2**31)
    return Flamingo.from_preset("tiny", backend=backend)


def test_triton_interpreter_fwd_bwd_matches_reference():
    """The vision tower, the perceiver's two-source attention, the gated blocks' interval attention and
    tanh_gated_linear, and the decoder's causal attention through the Triton kernels (interpreter)."""
    tri = _randomise_(_tiny("triton"))
    ref = _tiny("reference")
    ref.load_state_dict(tri.state_dict())
    vx, ids, mask, labels = tri.synthetic_batch(2, generator(), length=10)

    def run(model, dtype):
        out = model(vx.to(dtype), ids, mask, labels)
        out.loss.backward()
        return out

    assert_triton_matches_reference(tri, ref, run, mask.bool())


def test_media_mask_against_hand_written_dense_mask():
    model = _tiny()
    I, n = model.media_token_id, 2
    ids = torch.tensor([[7, I, 8, 9, I, 10],    # text before the first image
                        [0, 0, I, 8, I, I]])    # left padding, then two images back to back
    start, end = model.media_intervals(ids, num_media=3, num_latents=n)
    # keys: image 0 = columns 0-1, image 1 = 2-3, image 2 = 4-5; a token sees only its most recent image
    none, im0, im1, im2 = [0] * 6, [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]
    expected = torch.tensor([[none, im0, im0, im0, im1, im1],
                             [none, none, im0, im0, im1, im2]], dtype=torch.bool)
    assert torch.equal(dense_mask(start, end, 3 * n), expected)
    with pytest.raises(ValueError, match="<image> tokens"):
        model.media_intervals(ids, num_media=2, num_latents=n)


def test_gates_zero_at_init_leave_the_language_model_unchanged():
    model = _tiny()
    vx, ids, mask, _ = model.synthetic_batch(2, generator(), length=10)
    with torch.no_grad():
        got = model(vx, ids, mask).logits
        lm = model.language_model(ids, mask).logits
    assert all(not p.detach().any() for n, p in model.named_parameters() if n.endswith("_gate"))
    assert torch.equal(got, lm)


@pytest.mark.parametrize("stage", ["bridge", "bridge+embeddings"])
def test_only_the_bridge_trains(stage):
    model = _randomise_(_tiny())  # non-zero gates, so every bridge parameter gets a gradient
    model.requires_grad_(True).set_stage(stage)  # set_stage decides every parameter, whatever came before
    vx, ids, mask, labels = model.synthetic_batch(2, generator(), length=10)
    expect = ("perceiver.", "gated_cross_attn_layers.") + (("language_model.embed_tokens.",)
                                                           if stage == "bridge+embeddings" else ())
    assert_one_step_trains_only(model, lambda: model(vx, ids, mask, labels).loss, expect)


def test_few_shot_prompt():
    model = _tiny()
    I, E, bos = model.media_token_id, model.eoc_token_id, model.language_model.bos_token_id
    g = generator()
    images = [torch.randn(3, 16, 16, generator=g) for _ in range(3)]
    vocab = {"a cat": [10, 11], "a dog": [10, 12], "Output:": [20]}
    vx, ids, mask, locations = model.few_shot_prompt([(images[0], "a cat"), (images[1], [10, 12])], images[2], "Output:",
                                          tokenize=vocab.__getitem__)
    assert ids.tolist() == [[bos, I, 10, 11, E, I, 10, 12, E, I, 20]]
    assert torch.equal(mask, torch.ones_like(ids))
    assert locations.nonzero()[:, 1].tolist() == [1, 5, 9]
    assert vx.shape == (1, 3, 1, 3, 16, 16) and all(torch.equal(vx[0, k, 0], images[k]) for k in range(3))
    start, end = model.media_intervals(ids, 3, 4)
    assert (start[0, -1], end[0, -1]) == (8, 12)  # the query text sees the query image
    out = model.generate(vx, ids, mask, max_new_tokens=3)
    assert out.shape[1] <= ids.shape[1] + 3 and torch.equal(out[:, :ids.shape[1]], ids)
    with pytest.raises(ValueError, match="tokenize"):
        model.few_shot_prompt([(images[0], "a cat")], images[1])
    with pytest.raises(ValueError, match="<image>"):
        model.few_shot_prompt([(images[0], [I])], images[1])


def test_input_checks():
    model = _tiny()
    vx, ids, mask, _ = model.synthetic_batch(1, generator(), length=10)
    with pytest.raises(ValueError, match="vision_x"):
        model(vx[0], ids, mask)
    with pytest.raises(ValueError, match="lang_x"):
        model(vx, ids.float(), mask)
    with pytest.raises(ValueError, match="attention_mask"):
        model(vx, ids, mask[:, 1:])
    with pytest.raises(ValueError, match="frames"):
        model(vx.expand(-1, -1, 2, -1, -1, -1), ids, mask)
    with pytest.raises(ValueError, match="cross_attn_every_n_layers"):
        Flamingo.from_preset("tiny", cross_attn_every_n_layers=3)
    with pytest.raises(ValueError, match="name"):
        Flamingo.from_preset("flamingo-80b")


@requires(*OPEN_FLAMINGO)
def test_from_open_flamingo_refuses_what_it_cannot_reproduce():
    of = _open_flamingo()
    of.lang_encoder.gated_cross_attn_layers[0].attn.only_attend_immediate_media = False
    with pytest.raises(ValueError, match="only_attend_immediate_media"):
        Flamingo.from_open_flamingo(of)
    with pytest.raises(ValueError, match="open_flamingo Flamingo"):
        Flamingo.from_open_flamingo(of.lang_encoder)
