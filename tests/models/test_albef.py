"""ALBEF: LAVIS checkpoint loading checked against timm / Hugging Face BERT layers, the shared objectives
(momentum ITC vs LAVIS' formula, hard negatives, masking, distilled MLM), a training step, preset sizes."""
import copy

import pytest
import torch
from optional_deps import optional_import, requires
from torch.nn import functional as F

from mmfast.models.albef import ALBEF
from mmfast.models.objectives import distilled_mlm_loss, mask_tokens, momentum_itc_loss, sample_hard_negatives
from mmfast.nn.contrastive import MoCoQueue
from model_helpers import lavis_heads_and_queues
from numerics import generator

timm = optional_import("timm")
transformers = optional_import("transformers")
blip_text = optional_import("transformers.models.blip.modeling_blip_text")

TINY = dict(image_size=16, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, vocab_size=64,
            hidden_size=32, text_layers=2, fusion_layers=2, text_heads=2, intermediate_size=64, max_positions=32,
            embed_dim=16, queue_size=8, mask_token_id=3, cls_token_id=1, sep_token_id=2, pad_token_id=0)


def _lavis_checkpoint():
    """A LAVIS-format ALBEF state dict built from the real timm / HF modules (returned for the reference)."""
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2,
                                                           num_heads=2, num_classes=0).eval()
    bert_config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertForMaskedLM(bert_config).eval()
    fusion_config = transformers.BlipTextConfig(vocab_size=64, hidden_size=32, encoder_hidden_size=32,
                                                intermediate_size=64, num_attention_heads=2, layer_norm_eps=1e-12)
    fusion = [blip_text.BlipTextLayer(fusion_config, i).eval() for i in range(2)]
    with torch.no_grad():
        for module in (vit, bert, *fusion):
            for p in module.parameters():
                p.normal_(0, 0.3)
    sd = {f"visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    sd.update({f"text_encoder.{k}": v for k, v in bert.state_dict().items()})
    for i, layer in enumerate(fusion):
        sd.update({f"text_encoder.bert.encoder.layer.{2 + i}.{k}": v for k, v in layer.state_dict().items()})
    lavis_heads_and_queues(sd, 16, 32, 8, ptr=3)
    return sd, vit, bert, fusion


@requires("timm", "transformers")
def test_from_lavis_state_dict_matches_timm_and_bert_layers():
    sd, vit, bert, fusion = _lavis_checkpoint()
    model = ALBEF.from_state_dict(sd, backend="reference", **TINY)
    g = generator()
    pixels, ids = torch.randn(2, 3, 16, 16, generator=g), torch.randint(4, 64, (2, 7), generator=g)
    with torch.no_grad():
        image = vit.forward_features(pixels)
        text = bert.bert(input_ids=ids).last_hidden_state
        fused = text
        for layer in fusion:
            fused = layer(fused, encoder_hidden_states=image)
        logits = bert.cls(fused)
        ours_image = model.visual_encoder(pixels).last_hidden_state
        ours_text = model.text_encoder(ids, mode="text").last_hidden_state
        ours_fused = model.fuse(ours_text, None, ours_image)
        ours_logits = model.mlm_head(model.text_encoder(ids, encoder_hidden_states=ours_image).last_hidden_state)
    for got, want in ((ours_image, image), (ours_text, text), (ours_fused, fused), (ours_logits, logits)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.temp.item() == pytest.approx(0.05) and int(model.text_queue.ptr) == 3
    torch.testing.assert_close(model.image_queue.queue, sd["image_queue"].t())
    for (name, p), (_, p_m) in zip(model.momentum_model._online.named_parameters(),
                                   model.momentum_model.ema.named_parameters()):
        assert torch.equal(p, p_m), name
    del sd["text_proj_m.bias"]
    with pytest.raises(KeyError):
        ALBEF.from_state_dict(sd, **TINY)


def test_momentum_itc_equals_lavis_formula():
    g = generator()
    B, D, Q, alpha = 4, 16, 6, 0.4
    feats = [F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(4)]
    image_feat, text_feat = (f.requires_grad_(True) for f in feats[:2])
    image_m, text_m = feats[2:]
    queues = [MoCoQueue(D, Q, dtype=torch.float64) for _ in range(2)]
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    loss = momentum_itc_loss(image_feat, text_feat, image_m, text_m, queues[0], queues[1], temp, alpha=alpha,
                             backend="reference")
    # LAVIS albef_pretrain.forward, verbatim in PyTorch
    image_all, text_all = torch.cat([image_m, queues[0].queue]), torch.cat([text_m, queues[1].queue])
    targets = torch.zeros(B, B + Q, dtype=torch.float64)
    targets.fill_diagonal_(1)
    with torch.no_grad():
        t_i2t = alpha * F.softmax(image_m @ text_all.t() / temp, 1) + (1 - alpha) * targets
        t_t2i = alpha * F.softmax(text_m @ image_all.t() / temp, 1) + (1 - alpha) * targets
    i2t = -(F.log_softmax(image_feat @ text_all.t() / temp, 1) * t_i2t).sum(1).mean()
    t2i = -(F.log_softmax(text_feat @ image_all.t() / temp, 1) * t_t2i).sum(1).mean()
    expected = (i2t + t2i) / 2
    torch.testing.assert_close(loss, expected)
    got = torch.autograd.grad(loss, (image_feat, text_feat, temp))
    want = torch.autograd.grad(expected, (image_feat, text_feat, temp))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_hard_negatives_are_never_the_positive():
    g = generator()
    B = 6
    sim = torch.randn(B, B + 3, generator=g) * 2
    sim.diagonal().add_(50.0)  # the positive dominates: softmax puts ~all mass there
    for _ in range(50):
        neg_text, neg_image = sample_hard_negatives(sim, sim.clone(), generator=g)
        assert (neg_text != torch.arange(B)).all() and (neg_image != torch.arange(B)).all()
    # in proportion to the similarity: the empirical frequencies follow softmax over the other pairs
    sim = torch.randn(B, B, generator=g) * 2
    counts = torch.zeros(B, B)
    for _ in range(400):
        neg_text, _ = sample_hard_negatives(sim, sim, generator=g)
        counts[torch.arange(B), neg_text] += 1
    expected = (F.softmax(sim, 1) + 1e-4).fill_diagonal_(0)
    expected /= expected.sum(1, keepdim=True)
    assert (counts.diagonal() == 0).all()
    assert (counts / 400 - expected).abs().max() < 0.1  # ~4 standard deviations of a 400-draw frequency
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(sim[:1], sim[:1])


def test_masking_and_distilled_mlm():
    g = generator()
    ids = torch.randint(4, 64, (64, 32), generator=g)
    ids[:, 0], ids[:, -4:] = 1, 0  # [CLS], padding
    masked, labels = mask_tokens(ids, vocab_size=64, mask_token_id=3, special_ids=(0, 1), generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -4:].any()
    assert 0.12 < chosen.float().mean() * 32 / 27 < 0.18
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert 0.72 < (masked[chosen] == 3).float().mean() < 0.88
    logits, logits_m = torch.randn(64, 32, 64, generator=g), torch.randn(64, 32, 64, generator=g)
    ce = F.cross_entropy(logits[chosen], labels[chosen])
    distill = -(F.log_softmax(logits[chosen], -1) * F.softmax(logits_m[chosen], -1)).sum(-1).mean()
    torch.testing.assert_close(distilled_mlm_loss(logits, labels, logits_m, 0.4), 0.6 * ce + 0.4 * distill)


def test_pretraining_step_lowers_the_loss():
    torch.manual_seed(0)
    model = ALBEF.from_preset("tiny", backend="reference")
    g = generator()
    pixels, ids = torch.randn(4, 3, 16, 16, generator=g), torch.randint(4, 64, (4, 9), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    state = copy.deepcopy({k: v for k, v in model.state_dict().items() if "momentum" in k or "queue" in k})
    out = model(pixels, ids, mask, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(out[k]) for k in ("loss_itc", "loss_itm", "loss_mlm"))
    assert int(model.text_queue.ptr) == 4
    out.loss.backward()
    torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4).step()
    model.load_state_dict(state, strict=False)
    after = model(pixels, ids, mask, generator=torch.Generator().manual_seed(0))
    assert after.loss.item() < out.loss.item()


def test_base_preset_size():
    with torch.device("meta"):
        model = ALBEF.from_preset("base")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # ViT-B/16 (85.8M) + bert-base-uncased without pooler (108.9M) + 6 cross-attentions (14.2M) + heads
    assert 209e6 < trainable < 211e6
    assert len(model.text_encoder.layers) == 12 and model.text_encoder.cross_attention_from == 6


def test_validation():
    with pytest.raises(ValueError, match="fusion_layers"):
        ALBEF(**{**TINY, "fusion_layers": 0})
    with pytest.raises(ValueError, match="preset"):
        ALBEF.from_preset("huge")


def test_distilled_mlm_loss_without_masked_tokens_is_zero_not_nan():
    """A small rank's batch may draw no token to mask (15% of a few tokens): the loss must stay finite
    (it was NaN, the mean over nothing, and poisoned the DDP step) and keep a gradient path."""
    logits = torch.randn(2, 5, 11, generator=generator(), requires_grad=True)
    loss = distilled_mlm_loss(logits, torch.full((2, 5), -100), torch.randn(2, 5, 11, generator=generator()))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
