"""BLIP against Hugging Face (outputs, gradients, greedy / beam captions), exact beam search, nucleus sampling,
the pre-training objectives, CapFilt, preset sizes, and one tiny model through the Triton interpreter."""
import copy
import itertools
import warnings

import pytest
import torch
from optional_deps import optional_import, requires

from mmfast.models.blip import BLIP, capfilt
from mmfast.models.generation import nucleus_filter
from model_helpers import _floor
from numerics import assert_close_by_rule, generator

transformers = optional_import("transformers")
needs_hf = requires("transformers")


def _close(got, ref, yardstick, **kwargs):
    return assert_close_by_rule(got, ref, yardstick, floor=_floor(ref), **kwargs)

BOS, EOS, PAD = 3, 4, 0


def _config(vocab=40, label_smoothing=0.0):
    return transformers.BlipConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32, bos_token_id=BOS,
                                       eos_token_id=2, pad_token_id=PAD, sep_token_id=EOS,
                                       label_smoothing=label_smoothing),
                      vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=16, patch_size=8),
                      image_text_hidden_size=16)


def _hf(cls, config, seed=0):
    torch.manual_seed(seed)
    hf = cls(config).eval()
    with torch.no_grad():  # HF's init (vision std 1e-10) would make every output nearly constant
        for p in hf.parameters():
            p.normal_(0, 0.3)
    return hf


def _inputs(vocab=40, size=16):
    g = generator()
    ids = torch.randint(5, vocab, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    return torch.randn(3, 3, size, size, generator=g), ids, mask


def _three_ways(hf, ours, run, inputs_grad):
    """(ours fp32 reference backend, HF fp64, HF fp32) outputs and input gradients."""
    results = []
    for model, dtype in ((ours, torch.float32), (copy.deepcopy(hf).double(), torch.float64), (hf, torch.float32)):
        x = inputs_grad.detach().to(dtype).clone().requires_grad_(True)
        out = run(model, x)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * weight.to(dtype)).sum().backward()
        results.append((out, x.grad))
    return results


@needs_hf
@pytest.mark.parametrize("use_itm_head", [True, False], ids=["itm_head", "itc_cosine"])
@pytest.mark.parametrize("size", [16, 24], ids=["img16", "img24_interpolated"])
def test_retrieval_matches_hf(use_itm_head, size):
    hf = _hf(transformers.BlipForImageTextRetrieval, _config())
    ours = BLIP.from_hf(hf, backend="reference")
    pixels, ids, mask = _inputs(size=size)

    def run(model, px):
        return model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=use_itm_head,
                     interpolate_pos_encoding=size != 16).itm_score

    (got, dgot), (ref, dref), (hf32, dhf32) = _three_ways(hf, ours, run, pixels)
    _close(got, ref, hf32, what="itm_score")
    _close(dgot, dref, dhf32, factor=3.0, what="d pixel_values")


@needs_hf
def test_captioning_loss_logits_and_gradients_match_hf():
    hf = _hf(transformers.BlipForConditionalGeneration, _config(label_smoothing=0.1))
    ours = BLIP.from_hf(hf, backend="reference")
    assert ours.label_smoothing == 0.1
    pixels, ids, mask = _inputs()
    labels = ids.masked_fill(mask == 0, -100)
    outs = []
    for model, dtype in ((ours, torch.float32), (copy.deepcopy(hf).double(), torch.float64), (hf, torch.float32)):
        px = pixels.detach().to(dtype).clone().requires_grad_(True)
        out = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        outs.append((out, px.grad))
    (got, dgot), (ref, dref), (hf32, dhf32) = outs
    keep = mask.bool()
    _close(got.logits[keep], ref.logits[keep], hf32.logits[keep], what="logits")
    _close(got.loss, ref.loss, hf32.loss, what="loss")
    _close(dgot, dref, dhf32, factor=3.0, what="d pixel_values")
    _close(got.image_embeds, ref.image_embeds, hf32.image_embeds, what="image_embeds")


GENERATE = {"greedy": {}, "greedy_max8": dict(max_length=8), "beam3": dict(num_beams=3, max_new_tokens=10),
            "beam2_lp0": dict(num_beams=2, length_penalty=0.0, max_new_tokens=10),
            "beam4_new6": dict(num_beams=4, max_new_tokens=6),
            "beam3_early": dict(num_beams=3, early_stopping=True, max_new_tokens=10),
            "beam3_min5": dict(num_beams=3, min_length=5, max_new_tokens=10),
            "beam3_lp3": dict(num_beams=3, length_penalty=3.0, max_new_tokens=10),
            "beam3_lp-1": dict(num_beams=3, length_penalty=-1.0, max_new_tokens=10),
            "prompt_greedy": dict(input_ids=[[BOS, 5, 6, EOS]], max_new_tokens=8),
            "prompt_beam3": dict(input_ids=[[BOS, 7, 5, EOS]], num_beams=3, max_new_tokens=8)}


def _lively_captioner(vocab, seed, eos_bias):
    """A random captioner whose captions vary: unit LayerNorms and large embeddings (else every step predicts
    the same token) and a [SEP] bias that ends captions at different lengths."""
    hf = _hf(transformers.BlipForConditionalGeneration, _config(vocab=vocab), seed=seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.zero_()
        embeddings = hf.text_decoder.bert.embeddings
        embeddings.position_embeddings.weight.normal_(0, 2)
        embeddings.word_embeddings.weight.normal_(0, 2)
        bias = hf.text_decoder.cls.predictions.decoder.bias
        bias.zero_()
        bias[EOS] += eos_bias
    return hf


@pytest.fixture(scope="module")
def captioner():
    hf = _lively_captioner(12, seed=3, eos_bias=6.0)
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    lengths = (hf.generate(pixel_values=pixels, max_new_tokens=12) != EOS).sum(1)
    assert len(set(lengths.tolist())) > 1, "captions of one length would make the comparisons weak"
    return hf, BLIP.from_hf(hf, backend="reference")


@needs_hf
@pytest.mark.parametrize("kwargs", GENERATE.values(), ids=GENERATE.keys())
def test_captions_equal_hf_generate(captioner, kwargs):
    hf, ours = captioner
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def inputs():  # HF writes [DEC] into the prompt in place: each side gets its own copy
        if "input_ids" not in kwargs:
            return kwargs
        ids = torch.tensor(kwargs["input_ids"]).repeat(4, 1)
        return dict(kwargs, input_ids=ids, attention_mask=torch.ones_like(ids))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF's note on the default max_length
        expected = hf.generate(pixel_values=pixels, **inputs())
    got = ours.generate(pixels, **inputs())
    assert torch.equal(got, expected), f"{got}\n{expected}"


# (EOS bias, length penalty): the penalties change the winner's length on these images (long for 3.0,
# short for -1.0), so the length normalisation is checked too
@needs_hf
@pytest.mark.parametrize("eos_bias,lp", [(1.0, 3.0), (4.0, -1.0), (3.0, 0.7)], ids=["lp3", "lp-1", "lp0.7"])
def test_beam_search_equals_exhaustive_search(eos_bias, lp):
    hf = _lively_captioner(6, seed=3, eos_bias=eos_bias)
    ours = BLIP.from_hf(hf, backend="reference")
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    new = 3
    # 36 beams cover every live prefix of a 6-token vocabulary for 3 steps; "never" keeps the stop test exact
    got = ours.generate(pixels, num_beams=36, max_new_tokens=new, length_penalty=lp, early_stopping="never")
    with torch.no_grad():
        image = ours.encode_image(pixels)
        for b in range(2):
            best, best_score = None, -float("inf")
            for n in range(1, new + 1):  # every caption of n tokens, scored in one batch
                tails = torch.tensor(list(itertools.product(range(6), repeat=n)))
                # a caption ends at its first [SEP]: [SEP] only last, and shorter than `new` only with it
                ok = (tails[:, :-1] != EOS).all(1) & ((tails[:, -1] == EOS) | (n == new))
                seqs = torch.cat([torch.full((len(tails), 1), BOS), tails], 1)[ok]
                logp = ours.lm_logits(image[b:b + 1].expand(len(seqs), -1, -1), seqs).log_softmax(-1)[:, :-1]
                scores = logp.gather(-1, seqs[:, 1:, None]).sum((1, 2)) / n ** lp
                if scores.max().item() > best_score:
                    best, best_score = seqs[scores.argmax()], scores.max().item()
            row = got[b][:len(best)]
            assert torch.equal(row, best), f"image {b}: beam {got[b].tolist()} vs exhaustive {best.tolist()}"
            assert (got[b][len(best):] == EOS).all()  # HF pads with EOS when pad_token_id is 0


def test_nucleus_filter_keeps_the_smallest_top_p_set():
    logits = torch.randn(64, 30, generator=generator()) * 3
    for top_p in (0.3, 0.9):
        kept = nucleus_filter(logits, top_p).isfinite()
        probs = logits.softmax(-1)
        for row in range(64):
            p, order = probs[row].sort(descending=True)
            k = int(kept[row].sum())
            assert set(order[:k].tolist()) == set(kept[row].nonzero()[:, 0].tolist())
            assert p[:k].sum() >= top_p - 1e-6 and (k == 1 or p[:k - 1].sum() < top_p)


@needs_hf
def test_nucleus_sampling_draws_only_from_the_nucleus(captioner):
    _, ours = captioner
    pixels = torch.randn(1, 3, 16, 16, generator=generator()).repeat(200, 1, 1, 1)
    ids = ours.generate(pixels, do_sample=True, top_p=0.5, max_new_tokens=1, generator=generator())
    with torch.no_grad():
        logits = ours.lm_logits(ours.encode_image(pixels[:1]), torch.tensor([[BOS]]))[:, -1]
    allowed = nucleus_filter(logits, 0.5).isfinite()[0]
    drawn = ids[:, 1].unique()
    assert not allowed.all(), "the nucleus must exclude something for this test to mean anything"
    assert allowed[drawn].all(), f"drew {drawn.tolist()} outside the nucleus {allowed.nonzero()[:, 0].tolist()}"
    with pytest.raises(ValueError, match="top_p"):
        nucleus_filter(logits, 0.0)


def _pretrain_batch(model, batch=4):
    g = generator()
    ids = torch.randint(5, 58, (batch, 9), generator=g)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return torch.randn(batch, 3, 16, 16, generator=g), ids, mask


def test_pretraining_step_lowers_the_loss():
    torch.manual_seed(0)
    model = BLIP.from_preset("tiny", backend="reference")
    pixels, ids, mask = _pretrain_batch(model)
    state = copy.deepcopy({k: v for k, v in model.state_dict().items() if "momentum" in k or "queue" in k})
    out = model(pixels, ids, mask, generator=torch.Generator().manual_seed(0))
    assert set(out.keys()) == {"loss", "loss_itc", "loss_itm", "loss_lm"} and torch.isfinite(out.loss)
    assert int(model.image_queue.ptr) == 4
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    out.loss.backward()
    opt.step()
    model.load_state_dict(state, strict=False)  # same queues and momentum copy: the same batch, the same targets
    after = model(pixels, ids, mask, generator=torch.Generator().manual_seed(0))
    assert after.loss.item() < out.loss.item()


def test_encoder_and_decoder_share_all_but_self_attention():
    model = BLIP.from_preset("tiny", use_momentum=False)
    enc, dec = model.text_encoder, model.text_decoder
    assert dec.embeddings is enc.embeddings and dec.layers[0].fc1 is enc.layers[0].fc1
    assert dec.layers[0].cross_attn is enc.layers[0].cross_attn and dec.layers[0].self_attn is not enc.layers[0].self_attn
    assert model.lm_head.decoder.weight is enc.embeddings.word_embeddings.weight


@needs_hf
def test_capfilt_keeps_what_the_filter_accepts(captioner):
    hf = _hf(transformers.BlipForImageTextRetrieval, _config(vocab=12), seed=3)
    filt = BLIP.from_hf(hf, backend="reference")
    _, cap = captioner
    pixels = torch.randn(3, 3, 16, 16, generator=generator())
    web = torch.randint(5, 12, (3, 6), generator=generator())
    keep_all = capfilt(cap, filt, pixels, threshold=0.0, max_length=8, generator=generator(), web_input_ids=web,
                       web_attention_mask=torch.ones_like(web))
    assert sorted((k, i) for k, i, _ in keep_all) == sorted((k, i) for k in ("synthetic", "web") for i in range(3))
    assert capfilt(cap, filt, pixels, threshold=1.0, max_length=8, generator=generator()) == []


@needs_hf
def test_base_preset_parameter_counts_match_hf():
    config = transformers.BlipConfig(text_config=dict(num_attention_heads=12), vision_config=dict(image_size=384))
    with torch.device("meta"):
        for cls, parts, extra in ((transformers.BlipForImageTextRetrieval, ("itc", "itm"), 1),  # + ITC temperature
                                  (transformers.BlipForConditionalGeneration, ("lm",), 0)):
            hf = sum(p.numel() for p in cls(config).parameters())
            ours = BLIP.from_preset("base", image_size=384, vision_eps=1e-5, parts=parts, use_momentum=False)
            assert sum(p.numel() for p in ours.parameters()) == hf + extra
    assert 223e6 < hf < 225e6  # HF's BLIP base (ViT-B/16 at 384 + BERT-base decoder): ~224M


def test_validation():
    with pytest.raises(ValueError, match="parts"):
        BLIP.from_preset("tiny", parts=("vqa",))
    with pytest.raises(ValueError, match="preset"):
        BLIP.from_preset("huge")
    with pytest.raises(ValueError, match="temp"):
        BLIP.from_preset("tiny", temp=1.0)
    with pytest.raises(ValueError, match="from_hf"):
        BLIP.from_hf(torch.nn.Linear(2, 2))
    model = BLIP.from_preset("tiny", use_momentum=False)
    with pytest.raises(ValueError, match="beam sampling"):
        model.generate(torch.randn(1, 3, 16, 16), num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(torch.randn(1, 3, 16, 16), num_beams=0)


def test_triton_interpreter_matches_reference():
    """One tiny pre-training step through every kernel path: patch_embed, flash_attention (self, causal,
    cross, padded), contrastive_loss (queues + distillation) and ema_update_."""
    torch.manual_seed(0)
    small = dict(vision_layers=1, text_layers=1)
    ref = BLIP.from_preset("tiny", backend="reference", **small)
    tri = BLIP.from_preset("tiny", backend="triton", **small)
    tri.load_state_dict(ref.state_dict())
    pixels, ids, mask = _pretrain_batch(ref, batch=2)
    outs = [m(pixels, ids, mask, generator=torch.Generator().manual_seed(0)) for m in (ref, tri)]
    for m, out in zip((ref, tri), outs):
        out.loss.backward()
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        torch.testing.assert_close(outs[1][name], outs[0][name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tri.visual_encoder.patch_embed.proj.weight.grad,
                               ref.visual_encoder.patch_embed.proj.weight.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(tri.momentum_model.ema.text_proj.weight, ref.momentum_model.ema.text_proj.weight)


@needs_hf
@pytest.mark.parametrize("kind", ["retrieval", "captioning"])
def test_hf_flags_hidden_states_tuple_and_attentions(kind):
    """HF's drop-in flags: hidden_states (the vision tower's, embeddings first), return_dict=False's tuple,
    output_attentions=True refused."""
    cls = transformers.BlipForImageTextRetrieval if kind == "retrieval" else transformers.BlipForConditionalGeneration
    hf = _hf(cls, _config())
    ours = BLIP.from_hf(hf, backend="reference")
    pixels, ids, mask = _inputs()
    kwargs = dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, output_hidden_states=True)
    (got, _), (ref, _), (hf32, _) = _three_ways(
        hf, ours, lambda m, px: torch.stack(m(**{**kwargs, "pixel_values": px}).hidden_states), pixels)
    assert got.shape[0] == 3  # embeddings + 2 layers
    _close(got, ref, hf32, what="hidden_states")
    with torch.no_grad():
        mine, theirs = ours(**kwargs, return_dict=False), hf(**kwargs, return_dict=False)
    assert isinstance(mine, tuple) and len(mine) == len(theirs)
    assert [tuple(t.shape) if torch.is_tensor(t) else len(t) for t in mine] == \
        [tuple(t.shape) if torch.is_tensor(t) else len(t) for t in theirs]
    with pytest.raises(ValueError, match="output_attentions"):
        ours(**kwargs, output_attentions=True)
