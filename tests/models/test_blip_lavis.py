"""BLIP.from_state_dict: a LAVIS ``blip_pretrain`` state dict built from the real modules LAVIS' names come from
(timm's VisionTransformer; transformers' BlipTextModel / BlipTextLMHeadModel, the port of LAVIS' med.py),
tied as LAVIS ties them; every role's output against those modules."""
import pytest
import torch
from optional_deps import optional_import, requires

from mmfast.models.blip import BLIP, PRESETS
from model_helpers import lavis_heads_and_queues
from numerics import generator

timm = optional_import("timm")
transformers = optional_import("transformers")
blip_text = optional_import("transformers.models.blip.modeling_blip_text")

TINY = PRESETS["tiny"]


def _lavis_checkpoint():
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2,
                                                           num_heads=2, num_classes=0).eval()
    config = transformers.BlipTextConfig(vocab_size=64, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                                         layer_norm_eps=1e-12, pad_token_id=0, bos_token_id=60,
                                         sep_token_id=2)
    encoder = blip_text.BlipTextModel(config, add_pooling_layer=False).eval()
    decoder = blip_text.BlipTextLMHeadModel(config).eval()
    with torch.no_grad():
        for module in (vit, encoder, decoder):
            for p in module.parameters():
                p.normal_(0, 0.3)
        # LAVIS' tie_encoder_decoder_weights(..., "/attention"): all but the decoder's self-attention
        enc_sd = encoder.state_dict()
        for key, value in decoder.bert.state_dict().items():
            if ".attention." not in key and key in enc_sd:
                value.copy_(enc_sd[key])
        decoder.cls.predictions.decoder.weight.copy_(decoder.bert.embeddings.word_embeddings.weight)
    sd = {f"visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    sd.update({f"text_encoder.{k}": v for k, v in encoder.state_dict().items()})
    sd.update({f"text_decoder.{k}": v for k, v in decoder.state_dict().items()})
    lavis_heads_and_queues(sd, 16, 32, 8, ptr=5, momentum_shift=0.01)
    return sd, vit, encoder, decoder


@requires("timm", "transformers")
def test_from_lavis_state_dict_matches_the_modules_in_every_role():
    sd, vit, encoder, decoder = _lavis_checkpoint()
    model = BLIP.from_state_dict(sd, backend="reference", **TINY).eval()
    g = generator()
    pixels, ids = torch.randn(2, 3, 16, 16, generator=g), torch.randint(4, 60, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        image = vit.forward_features(pixels)
        want = {"image": image,
                "text": encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                "itm": encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state,
                "lm": decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).logits}
        ours_image = model.encode_image(pixels)
        got = {"image": ours_image, "text": model.itc_features(ours_image, ids, mask)[2],
               "itm": model.itm_logits(ours_image, ids, mask)[1], "lm": model.lm_logits(ours_image, ids, mask)}
        got_m = model.momentum_model.ema["visual_encoder"](pixels).last_hidden_state
    keep = mask.bool()
    for name in want:
        a, b = (got[name][keep], want[name][keep]) if name != "image" else (got[name], want[name])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert not torch.allclose(got_m, ours_image)  # the momentum copies are their own weights
    torch.testing.assert_close(model.momentum_model.ema["vision_proj"].weight, sd["vision_proj_m.weight"])
    assert model.temp.item() == pytest.approx(0.05) and int(model.image_queue.ptr) == 5
    torch.testing.assert_close(model.text_queue.queue, sd["text_queue"].t())


@requires("timm", "transformers")
def test_untied_checkpoint_and_missing_keys_are_refused():
    sd, *_ = _lavis_checkpoint()
    key = "text_decoder.bert.encoder.layer.0.intermediate.dense.weight"
    broken = dict(sd, **{key: sd[key] + 1})
    with pytest.raises(ValueError, match="tie_encoder_decoder=False"):
        BLIP.from_state_dict(broken, **TINY)
    untied = BLIP.from_state_dict(broken, tie_encoder_decoder=False, **TINY)
    torch.testing.assert_close(untied.text_decoder.layers[0].fc1.weight, broken[key])
    del sd["itm_head.bias"]
    with pytest.raises(KeyError):
        BLIP.from_state_dict(sd, **TINY)
