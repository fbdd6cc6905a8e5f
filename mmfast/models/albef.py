"""ALBEF (Li et al. 2021) on mmfast's kernels: ViT-B/16 image encoder, a 12-layer BERT whose first 6 layers
encode text and last 6 fuse it with the image (cross-attention), and the three pre-training losses of
LAVIS' ``albef_pretrain`` — ITC with momentum queues and momentum distillation (α = 0.4), ITM with hard
negatives drawn in proportion to the ITC similarity, MLM with distillation from the momentum model.
``from_state_dict`` loads LAVIS / ALBEF checkpoints (their key names)."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from mmfast.kernels._common import check_int, check_scalar
from mmfast.nn.bert import BertLMHead, BertModel

from . import _lavis
from ._common import ModelOutput, build_preset
from .objectives import (add_momentum_model, check_group, distilled_mlm_loss, enqueue_momentum_features, itm_pairs,
                         mask_tokens, momentum_itc_loss, sample_hard_negatives)
from .vit import ViT

_OP = "ALBEF"

PRESETS = {
    "tiny": dict(image_size=16, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, vocab_size=64,
                 hidden_size=32, text_layers=2, fusion_layers=2, text_heads=2, intermediate_size=64, max_positions=32,
                 embed_dim=16, queue_size=8, mask_token_id=3, cls_token_id=1, sep_token_id=2, pad_token_id=0),
    "base": dict(),  # ViT-B/16 at 224 + bert-base-uncased (6 text + 6 fusion layers), ~210M trainable
}


@dataclass(eq=False)
class AlbefPretrainOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    loss_itc: Optional[torch.Tensor] = None
    loss_itm: Optional[torch.Tensor] = None
    loss_mlm: Optional[torch.Tensor] = None


class ALBEF(nn.Module):
    """ALBEF pre-training model (LAVIS attribute names: visual_encoder, text_encoder (+ mlm_head = BERT's
    ``cls``), vision_proj, text_proj, itm_head, temp, image_queue / text_queue; the momentum copies in
    ``momentum_model.ema``).

    Args (paper defaults): image_size 224, patch_size 16, vision_width / layers / heads (ViT-B), vision_eps;
    vocab_size 30522, hidden_size 768, text_layers 6 + fusion_layers 6, text_heads 12, intermediate_size
    3072, max_positions 512, type_vocab_size 2 (BERT checkpoints), text_eps 1e-12; embed_dim 256,
    queue_size 65536, momentum 0.995, alpha 0.4, temp 0.07 (learnable, clamped to [0.001, 0.5]),
    mlm_probability 0.15, token ids ([MASK] 103, [CLS] 101, [SEP] 102, [PAD] 0), backend.
    group: the process group the momentum features are gathered over into the queues (None: the default
        group whenever torch.distributed is initialised, as ALBEF's ``concat_all_gather``; "local": none; see
        ``objectives.resolve_group``). The ITC, ITM hard negatives and MLM stay per rank, as ALBEF's.
    """

    def __init__(self, *, image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                 vision_eps=1e-6, vocab_size=30522, hidden_size=768, text_layers=6, fusion_layers=6, text_heads=12,
                 intermediate_size=3072, max_positions=512, type_vocab_size=2, text_eps=1e-12, embed_dim=256,
                 queue_size=65536, momentum=0.995, alpha=0.4, temp=0.07, mlm_probability=0.15, mask_token_id=103,
                 cls_token_id=101, sep_token_id=102, pad_token_id=0, group=None, backend="auto"):
        super().__init__()
        self.group = check_group(_OP, group)
        check_int(_OP, "text_layers", text_layers, lo=0)
        check_int(_OP, "fusion_layers", fusion_layers, lo=1)
        check_int(_OP, "embed_dim", embed_dim, lo=1)
        check_int(_OP, "queue_size", queue_size, lo=1)
        check_scalar(_OP, "alpha", alpha, lo=0.0, hi=1.0)
        check_scalar(_OP, "temp", temp, lo=0.001, hi=0.5)
        check_scalar(_OP, "mlm_probability", mlm_probability, lo=0.0, hi=1.0)
        for name in ("mask_token_id", "cls_token_id", "sep_token_id", "pad_token_id"):
            check_int(_OP, name, locals()[name], lo=0, hi=vocab_size - 1)
        self.alpha, self.mlm_probability, self.backend = alpha, mlm_probability, backend
        self.mask_token_id, self.cls_token_id, self.pad_token_id = mask_token_id, cls_token_id, pad_token_id
        self.sep_token_id, self.vocab_size = sep_token_id, vocab_size
        self.visual_encoder = ViT(image_size, patch_size, 3, vision_width, vision_layers, vision_heads,
                                  norm_eps=vision_eps, final_norm="all", backend=backend)
        self.text_encoder = BertModel(vocab_size, hidden_size, text_layers + fusion_layers, text_heads,
                                      intermediate_size, max_positions=max_positions, cross_attention_dim=vision_width,
                                      cross_attention_from=text_layers, type_vocab_size=type_vocab_size,
                                      pad_token_id=pad_token_id, layer_norm_eps=text_eps, backend=backend)
        self.mlm_head = BertLMHead(hidden_size, vocab_size, layer_norm_eps=text_eps,
                                   tie_to=self.text_encoder.embeddings.word_embeddings)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(hidden_size, embed_dim)
        self.itm_head = nn.Linear(hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        add_momentum_model(self, embed_dim, queue_size, momentum, backend, visual_encoder=self.visual_encoder,
                           text_encoder=self.text_encoder, mlm_head=self.mlm_head, vision_proj=self.vision_proj,
                           text_proj=self.text_proj)

    def set_group(self, group):
        """The process group of the momentum queues (see the constructor's `group`)."""
        self.group = check_group(_OP, group)

    @classmethod
    def from_preset(cls, name, **overrides):
        return build_preset(cls, PRESETS, name, overrides)

    def _features(self, towers, pixel_values, input_ids, attention_mask):
        image = towers["visual_encoder"](pixel_values).last_hidden_state
        text = towers["text_encoder"](input_ids, attention_mask, mode="text").last_hidden_state
        return (image, text, F.normalize(towers["vision_proj"](image[:, 0]), dim=-1),
                F.normalize(towers["text_proj"](text[:, 0]), dim=-1))

    def fuse(self, text_embeds, attention_mask, image_embeds, encoder=None):
        """The fusion layers: text states (mode='text' output) cross-attending to the image tokens."""
        encoder = self.text_encoder if encoder is None else encoder
        return encoder(attention_mask=attention_mask, encoder_embeds=text_embeds, encoder_hidden_states=image_embeds,
                       mode="fusion").last_hidden_state

    def forward(self, pixel_values, input_ids, attention_mask=None, *, alpha=None, generator=None,
                update_momentum=True):
        """One pre-training step's losses (LAVIS ``albef_pretrain.forward``); updates the momentum model and the
        queues. Returns AlbefPretrainOutput(loss = itc + itm + mlm, loss_itc, loss_itm, loss_mlm).
        update_momentum=False: the caller ran ``momentum_model.update()`` before (the same step: the online
        weights do not change within forward) — what FSDP2 needs, see mmfast.training.tasks."""
        alpha = self.alpha if alpha is None else alpha
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        towers = dict(visual_encoder=self.visual_encoder, text_encoder=self.text_encoder, vision_proj=self.vision_proj,
                      text_proj=self.text_proj)
        image_embeds, text_embeds, image_feat, text_feat = self._features(towers, pixel_values, input_ids,
                                                                          attention_mask)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
            if update_momentum:
                self.momentum_model.update()
            m = self.momentum_model.ema
            image_embeds_m, _, image_feat_m, text_feat_m = self._features(m, pixel_values, input_ids, attention_mask)
        loss_itc = momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue,
                                     self.text_queue, self.temp, alpha=alpha, backend=self.backend)
        enqueue_momentum_features(self, image_feat_m, text_feat_m)

        with torch.no_grad():
            sim_i2t = image_feat @ text_feat_m.t() / self.temp
            sim_t2i = text_feat @ image_feat_m.t() / self.temp
        neg_text, neg_image = sample_hard_negatives(sim_i2t, sim_t2i, generator)
        images, texts, labels = itm_pairs(image_embeds, text_embeds, neg_text, neg_image)
        _, masks, _ = itm_pairs(image_embeds, attention_mask, neg_text, neg_image)
        fused = self.fuse(texts, masks, images)
        loss_itm = F.cross_entropy(self.itm_head(fused[:, 0]).float(), labels)

        special = (self.pad_token_id, self.cls_token_id)
        masked_ids, mlm_labels = mask_tokens(input_ids, vocab_size=self.vocab_size, mask_token_id=self.mask_token_id,
                                             special_ids=special, probability=self.mlm_probability,
                                             generator=generator)
        with torch.no_grad():
            logits_m = m["mlm_head"](m["text_encoder"](masked_ids, attention_mask, encoder_hidden_states=image_embeds_m)
                                     .last_hidden_state)
        hidden = self.text_encoder(masked_ids, attention_mask, encoder_hidden_states=image_embeds).last_hidden_state
        loss_mlm = distilled_mlm_loss(self.mlm_head(hidden), mlm_labels, logits_m, alpha)
        return AlbefPretrainOutput(loss=loss_itc + loss_itm + loss_mlm, loss_itc=loss_itc, loss_itm=loss_itm,
                                   loss_mlm=loss_mlm)

    @torch.no_grad()
    def itm_score(self, pixel_values, input_ids, attention_mask=None):
        """ITM logits (B, 2) of each (image, text) pair (retrieval re-ranking)."""
        image = self.visual_encoder(pixel_values).last_hidden_state
        text = self.text_encoder(input_ids, attention_mask, mode="text").last_hidden_state
        return self.itm_head(self.fuse(text, attention_mask, image)[:, 0])

    # ---- LAVIS checkpoints ---------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state_dict, *, backend="auto", **config):
        """An ALBEF from a LAVIS / ALBEF state dict (``model["model"]`` of their checkpoints): timm-named
        ``visual_encoder``, BERT-named ``text_encoder.bert`` + ``text_encoder.cls`` (or ``text_encoder`` without
        ``bert.``), vision_proj, text_proj, itm_head, temp, the ``_m`` momentum copies and the queues stored
        (embed_dim, queue_size) with ``queue_ptr``. `config` gives the sizes (default: the paper's)."""
        # the MLM decoder weight is tied to the word embedding
        return _lavis.load(cls(backend=backend, **config), _from_lavis(state_dict), "ALBEF.from_state_dict",
                           tied=("mlm_head.decoder.weight",))


def _from_lavis(sd):
    out = {}
    for suffix, base in _lavis.MOMENTUM:
        out.update(_lavis.vision_keys(sd, "visual_encoder" + suffix, base + "visual_encoder"))
        out.update(_lavis.text_keys(sd, "text_encoder" + suffix, base + "text_encoder", base + "mlm_head"))
        out.update(_lavis.itc_keys(sd, suffix, base))
    for leaf in ("weight", "bias"):
        out[f"itm_head.{leaf}"] = sd[f"itm_head.{leaf}"]
    out.update(_lavis.queue_keys(sd))
    # the tied MLM decoder weight is the word embedding: drop a duplicate the checkpoint may carry
    return {k: v for k, v in out.items() if not k.endswith("mlm_head.decoder.weight")}
