"""BLIP (Li et al. 2022) on mmfast's kernels: a ViT and one BERT text transformer in three roles —
[CLS] unimodal encoder (ITC), [ENC] image-grounded encoder (ITM), [DEC] image-grounded causal decoder (LM,
captioning) — with LAVIS' pre-training objectives, captioning by beam search / nucleus sampling over a KV
cache, CapFilt, and drop-in conversions of Hugging Face's ``BlipForImageTextRetrieval`` and
``BlipForConditionalGeneration``.

The encoder and decoder share every parameter but their self-attention (``tie_encoder_decoder``, the
paper's and LAVIS' pre-training setup); converted HF models keep the separate towers they have.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from mmfast.kernels._common import check_bool, check_int, check_scalar
from mmfast.nn.bert import BertLMHead, BertModel, KVCache, bert_state_dict_from_hf

from . import _lavis, generation
from ._common import ModelOutput, build_preset, check_output_attentions, copy_weights, hf_return, layer_pairs
from .objectives import (add_momentum_model, check_group, enqueue_momentum_features, itm_pairs, momentum_itc_loss,
                         sample_hard_negatives)
from .vit import ViT, hf_activation

_OP = "BLIP"

# sizes; token ids are bert-base-uncased's plus BLIP's two added tokens ([DEC] = bos 30522, [ENC] 30523)
PRESETS = {
    "tiny": dict(image_size=16, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, vocab_size=64,
                 hidden_size=32, text_layers=2, text_heads=2, intermediate_size=64, max_positions=32, embed_dim=16,
                 queue_size=8, bos_token_id=60, enc_token_id=61, cls_token_id=1, sep_token_id=2, pad_token_id=0),
    "base": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12),
    "large": dict(image_size=224, patch_size=16, vision_width=1024, vision_layers=24, vision_heads=16),
}


@dataclass(eq=False)
class BlipPretrainOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    loss_itc: Optional[torch.Tensor] = None
    loss_itm: Optional[torch.Tensor] = None
    loss_lm: Optional[torch.Tensor] = None


@dataclass(eq=False)
class BlipImageTextMatchingModelOutput(ModelOutput):
    itm_score: torch.Tensor = None
    last_hidden_state: torch.Tensor = None
    hidden_states: Optional[tuple] = None  # the vision tower's, as HF
    question_embeds: torch.Tensor = None


@dataclass(eq=False)
class BlipForConditionalGenerationModelOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    image_embeds: torch.Tensor = None
    last_hidden_state: torch.Tensor = None
    hidden_states: Optional[tuple] = None  # the vision tower's, as HF


class BLIP(nn.Module):
    """BLIP with the heads in `parts` ("itc", "itm", "lm"); momentum encoders and queues when `momentum`.

    Args (paper / LAVIS defaults): image_size, patch_size, vision_width / layers / heads / mlp, vision_eps
    (1e-6 timm, 1e-5 HF); the BERT-base text transformer (vocab_size 30524, hidden_size, text_layers,
    text_heads, intermediate_size, max_positions, text_eps); embed_dim (ITC projections, 256); queue_size
    (57600), momentum (0.995), alpha (0.4, distillation weight), label_smoothing (0.1, LM loss), temp (0.07,
    learnable, clamped to [0.001, 0.5]); token ids bos ([DEC]), enc ([ENC]), cls, sep (= EOS), pad;
    tie_encoder_decoder (share all but self-attention); tie_word_embeddings (the LM head's weight is the
    word embedding); backend (the kernels'); group: the process group the momentum features are gathered
    over into the queues (None: the default group whenever torch.distributed is initialised, as BLIP's
    ``concat_all_gather``; "local": none; see ``objectives.resolve_group``) — ITC, ITM hard negatives (drawn
    from the rank's own batch, as BLIP's pre-training) and LM stay per rank.

    Attribute names follow LAVIS: visual_encoder, text_encoder, text_decoder (+ lm_head), vision_proj,
    text_proj, itm_head, temp, image_queue / text_queue, and the momentum copies (``momentum_model``).
    """

    def __init__(self, *, image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                 vision_mlp=None, vision_eps=1e-6, vocab_size=30524, hidden_size=768, text_layers=12, text_heads=12,
                 intermediate_size=3072, max_positions=512, text_eps=1e-12, embed_dim=256, queue_size=57600,
                 momentum=0.995, alpha=0.4, label_smoothing=0.1, temp=0.07, bos_token_id=30522, enc_token_id=30523,
                 cls_token_id=101, sep_token_id=102, pad_token_id=0, parts=("itc", "itm", "lm"),
                 use_momentum=True, tie_encoder_decoder=True, tie_word_embeddings=True, text_act="gelu", vision_act="gelu", pos_resample="hf",
                 group=None, backend="auto"):
        super().__init__()
        self.group = check_group(_OP, group)
        if not set(parts) <= {"itc", "itm", "lm"} or not parts:
            raise ValueError(f"{_OP}: parts must be a non-empty subset of ('itc', 'itm', 'lm'), got {parts!r}")
        check_int(_OP, "embed_dim", embed_dim, lo=1)
        check_int(_OP, "queue_size", queue_size, lo=1)
        check_scalar(_OP, "momentum", momentum, lo=0.0, hi=1.0)
        check_scalar(_OP, "alpha", alpha, lo=0.0, hi=1.0)
        check_scalar(_OP, "label_smoothing", label_smoothing, lo=0.0, hi=1.0, hi_open=True)
        check_scalar(_OP, "temp", temp, lo=0.001, hi=0.5)
        check_bool(_OP, "use_momentum", use_momentum)
        check_bool(_OP, "tie_encoder_decoder", tie_encoder_decoder)
        for name in ("bos_token_id", "enc_token_id", "cls_token_id", "sep_token_id", "pad_token_id"):
            check_int(_OP, name, locals()[name], lo=0, hi=vocab_size - 1)
        self.parts, self.alpha, self.label_smoothing, self.backend = tuple(parts), alpha, label_smoothing, backend
        self.bos_token_id, self.enc_token_id, self.cls_token_id = bos_token_id, enc_token_id, cls_token_id
        self.sep_token_id, self.pad_token_id = sep_token_id, pad_token_id
        self.visual_encoder = ViT(image_size, patch_size, 3, vision_width, vision_layers, vision_heads,
                                  mlp_dim=vision_mlp, act=vision_act, norm_eps=vision_eps, final_norm="all",
                                  pos_resample=pos_resample, backend=backend)
        text = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=text_layers, num_heads=text_heads,
                    intermediate_size=intermediate_size, max_positions=max_positions, cross_attention_dim=vision_width,
                    pad_token_id=pad_token_id, layer_norm_eps=text_eps, activation=text_act, backend=backend)
        self.text_encoder = BertModel(**text) if {"itc", "itm"} & set(parts) else None
        if "lm" in parts:
            self.text_decoder = BertModel(**text)
            if tie_encoder_decoder and self.text_encoder is not None:
                self._tie_encoder_decoder()
            tie = self.text_decoder.embeddings.word_embeddings if tie_word_embeddings else None
            self.lm_head = BertLMHead(hidden_size, vocab_size, layer_norm_eps=text_eps, activation=text_act,
                                      tie_to=tie)
        else:
            self.text_decoder = self.lm_head = None
        if "itc" in parts:
            self.vision_proj = nn.Linear(vision_width, embed_dim)
            self.text_proj = nn.Linear(hidden_size, embed_dim)
            self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.itm_head = nn.Linear(hidden_size, 2) if "itm" in parts else None
        self.momentum_model = None
        if use_momentum and "itc" in parts:
            add_momentum_model(self, embed_dim, queue_size, momentum, backend, visual_encoder=self.visual_encoder,
                               text_encoder=self.text_encoder, vision_proj=self.vision_proj, text_proj=self.text_proj)

    def set_group(self, group):
        """The process group of the momentum queues (see the class docstring's `group`)."""
        self.group = check_group(_OP, group)

    @classmethod
    def from_preset(cls, name, **overrides):
        """'tiny' (tests), 'base' (ViT-B/16 + BERT-base, ≈ 224M for the retrieval parts), 'large' (ViT-L/16)."""
        return build_preset(cls, PRESETS, name, overrides)

    @classmethod
    def from_state_dict(cls, state_dict, *, backend="auto", **config):
        """A BLIP from a LAVIS ``blip_pretrain`` state dict (``model["model"]`` of its checkpoints, e.g.
        ``model_base.pth``): timm-named ``visual_encoder``, BERT-named ``text_encoder`` (cross-attention
        layers, no ``bert.`` level) and ``text_decoder.bert`` + ``text_decoder.cls`` (the LM head), vision_proj,
        text_proj, itm_head, temp, the ``_m`` momentum copies and the queues. `config` gives the sizes and the
        parts (default: the paper's ViT-B/16 with every head; a checkpoint without momentum copies or a decoder
        needs ``use_momentum=False`` / ``parts=("itc", "itm")``). The encoder / decoder weights LAVIS ties
        must be equal in the checkpoint (they are when LAVIS saved them): they become one parameter here."""
        model = cls(backend=backend, **config)
        sd, out = state_dict, {}
        for suffix, base in _lavis.MOMENTUM if model.momentum_model is not None else _lavis.MOMENTUM[:1]:
            out.update(_lavis.vision_keys(sd, "visual_encoder" + suffix, base + "visual_encoder"))
            if model.text_encoder is not None:
                out.update(_lavis.text_keys(sd, "text_encoder" + suffix, base + "text_encoder"))
            if "itc" in model.parts:
                out.update(_lavis.itc_keys(sd, suffix, base))
        if model.text_decoder is not None:
            out.update(_lavis.text_keys(sd, "text_decoder", "text_decoder", "lm_head"))
        if model.itm_head is not None:
            out.update({f"itm_head.{leaf}": sd[f"itm_head.{leaf}"] for leaf in ("weight", "bias")})
        if model.momentum_model is not None:
            out.update(_lavis.queue_keys(sd))
        elif "itc" in model.parts:
            out["temp"] = sd["temp"]
        _check_tied(model, out)
        # the LM head's decoder weight is the word embedding when tied
        tied = ("lm_head.decoder.weight",) if model.lm_head is not None and model.lm_head.decoder.weight is \
            model.text_decoder.embeddings.word_embeddings.weight else ()
        return _lavis.load(model, {k: v for k, v in out.items() if not (tied and k.endswith(tied))},
                           "BLIP.from_state_dict", tied=tied)

    def _tie_encoder_decoder(self):
        # LAVIS' tie_encoder_decoder_weights(..., skip_key="/attention"): only self-attention stays per role
        dec, enc = self.text_decoder, self.text_encoder
        dec.embeddings = enc.embeddings
        for d, e in zip(dec.layers, enc.layers):
            d.cross_attn, d.cross_norm, d.fc1, d.fc2, d.ffn_norm = e.cross_attn, e.cross_norm, e.fc1, e.fc2, e.ffn_norm

    # ---- the three roles ------------------------------------------------------------------------------------
    def encode_image(self, pixel_values, interpolate_pos_encoding=False):
        return self.visual_encoder(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state

    def _with_first(self, input_ids, token):
        ids = input_ids.clone()
        ids[:, 0] = token
        return ids

    def itm_logits(self, image_embeds, input_ids, attention_mask=None):
        """[ENC] role: the ITM head on the image-grounded [CLS] (the first token's id is used as given)."""
        out = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_embeds)
        return self.itm_head(out.last_hidden_state[:, 0]), out.last_hidden_state

    def itc_features(self, image_embeds, input_ids, attention_mask=None):
        """[CLS] role: L2-normalised projected image and text features."""
        text = self.text_encoder(input_ids, attention_mask, mode="text").last_hidden_state
        return (F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1),
                F.normalize(self.text_proj(text[:, 0]), dim=-1), text)

    def lm_logits(self, image_embeds, input_ids, attention_mask=None, cache=None):
        """[DEC] role: next-token logits of the causal image-grounded decoder."""
        out = self.text_decoder(input_ids, attention_mask, encoder_hidden_states=image_embeds, causal=True,
                                cache=cache)
        return self.lm_head(out.last_hidden_state)

    def lm_loss(self, logits, labels, label_smoothing=None):
        """HF / LAVIS: logits[:, :-1] predict labels[:, 1:], -100 ignored, mean over the tokens."""
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                               label_smoothing=smoothing)

    # ---- pre-training ------------------------------------------------------------------------------------------
    def forward(self, pixel_values, input_ids, attention_mask=None, *, alpha=None, generator=None,
                update_momentum=True):
        """LAVIS ``blip_pretrain``: ITC (momentum queues, distillation α), ITM (hard negatives), LM (label
        smoothing), for the parts this model has. input_ids start with [CLS]; the [ENC] / [DEC] roles replace
        it. Returns BlipPretrainOutput(loss = the sum, loss_itc, loss_itm, loss_lm). update_momentum=False:
        the caller ran ``momentum_model.update()`` before (FSDP2, see mmfast.training.tasks)."""
        alpha = self.alpha if alpha is None else alpha
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_embeds = self.encode_image(pixel_values)
        losses = {}
        if "itc" in self.parts:
            image_feat, text_feat, _ = self.itc_features(image_embeds, input_ids, attention_mask)
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            if self.momentum_model is not None:
                with torch.no_grad():
                    if update_momentum:
                        self.momentum_model.update()
                    m = self.momentum_model.ema
                    image_m = m.visual_encoder(pixel_values).last_hidden_state
                    image_feat_m = F.normalize(m.vision_proj(image_m[:, 0]), dim=-1)
                    text_m = m.text_encoder(input_ids, attention_mask, mode="text").last_hidden_state
                    text_feat_m = F.normalize(m.text_proj(text_m[:, 0]), dim=-1)
                losses["loss_itc"] = momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                                       self.image_queue, self.text_queue, self.temp, alpha=alpha,
                                                       backend=self.backend)
                enqueue_momentum_features(self, image_feat_m, text_feat_m)
            else:
                from mmfast.kernels import contrastive_loss

                image_feat_m, text_feat_m = image_feat.detach(), text_feat.detach()
                losses["loss_itc"] = contrastive_loss(image_feat, text_feat, 1.0 / self.temp, log_scale=False,
                                                      max_scale=None, backend=self.backend)
        if "itm" in self.parts:
            enc_ids = self._with_first(input_ids, self.enc_token_id)
            if "itc" in self.parts:
                with torch.no_grad():
                    sim_i2t = image_feat @ text_feat_m.t() / self.temp
                    sim_t2i = text_feat @ image_feat_m.t() / self.temp
                neg_text, neg_image = sample_hard_negatives(sim_i2t, sim_t2i, generator)
            else:  # no ITC similarities: uniform negatives
                B = input_ids.shape[0]
                zeros = torch.zeros(B, B, device=input_ids.device)
                neg_text, neg_image = sample_hard_negatives(zeros, zeros, generator)
            images, ids, labels = itm_pairs(image_embeds, enc_ids, neg_text, neg_image)
            _, masks, _ = itm_pairs(image_embeds, attention_mask, neg_text, neg_image)
            logits, _ = self.itm_logits(images, ids, masks)
            losses["loss_itm"] = F.cross_entropy(logits.float(), labels)
        if "lm" in self.parts:
            dec_ids = self._with_first(input_ids, self.bos_token_id)
            labels = dec_ids.masked_fill(attention_mask == 0, -100)
            losses["loss_lm"] = self.lm_loss(self.lm_logits(image_embeds, dec_ids, attention_mask), labels)
        return BlipPretrainOutput(loss=sum(losses.values()), **losses)

    # ---- inference ------------------------------------------------------------------------------------------
    def itm_score(self, pixel_values, input_ids, attention_mask=None, use_itm_head=True,
                  interpolate_pos_encoding=False, output_hidden_states=None):
        """HF BlipForImageTextRetrieval: ITM logits (B, 2) on the image-grounded [CLS], or with
        use_itm_head=False the cosine similarity matrix (B_img, B_txt) of the ITC features."""
        vision = self.visual_encoder(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                     output_hidden_states=output_hidden_states)
        image_embeds = vision.last_hidden_state
        if use_itm_head:
            score, text = self.itm_logits(image_embeds, input_ids, attention_mask)
        else:
            image_feat, text_feat, text = self.itc_features(image_embeds, input_ids, attention_mask)
            score = image_feat @ text_feat.t()
        return BlipImageTextMatchingModelOutput(itm_score=score, last_hidden_state=image_embeds,
                                                hidden_states=vision.hidden_states, question_embeds=text)

    @torch.no_grad()
    def generate(self, pixel_values, input_ids=None, attention_mask=None, *, max_length=None, max_new_tokens=None,
                 min_length=0,
                 num_beams=1, do_sample=False, top_p=0.9, top_k=0, temperature=1.0, length_penalty=1.0,
                 early_stopping=False, generator=None, interpolate_pos_encoding=False):
        """Captions as HF BlipForConditionalGeneration.generate: the prompt (default [DEC]) gets [DEC] as its
        first token and loses its last (the processor's [SEP]); decoding stops at [SEP]. Greedy, beam search
        (num_beams > 1, HF's algorithm) or nucleus sampling (do_sample, top_p). Returns (B, T) ids with the
        prompt. Lengths as HF: `max_length` counts the prompt; `max_new_tokens` does not; neither given: 20
        new tokens (at most max_positions in all)."""
        check_int("BLIP.generate", "num_beams", num_beams, lo=1)
        if num_beams > 1 and do_sample:
            raise ValueError("BLIP.generate: num_beams > 1 with do_sample=True (beam sampling) is not supported")
        if self.text_decoder is None:
            raise ValueError("BLIP.generate needs the decoder (construct with 'lm' in parts)")
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding)
        B = image_embeds.shape[0]
        if input_ids is None:
            input_ids = torch.tensor([[self.bos_token_id, self.sep_token_id]], device=image_embeds.device).repeat(B, 1)
        input_ids = self._with_first(input_ids, self.bos_token_id)[:, :-1]
        mask = attention_mask[:, :-1] if attention_mask is not None else None
        if max_new_tokens is not None:
            max_length = input_ids.shape[1] + max_new_tokens
        elif max_length is None:
            max_positions = self.text_decoder.embeddings.position_embeddings.num_embeddings
            max_length = min(input_ids.shape[1] + 20, max_positions)
        beams = num_beams
        if beams > 1:
            image_embeds = image_embeds.repeat_interleave(beams, 0)
            input_ids = input_ids.repeat_interleave(beams, 0)
            mask = mask.repeat_interleave(beams, 0) if mask is not None else None
        cache, state = KVCache(), {"mask": mask}

        def step(tokens):
            if state["mask"] is not None and cache.length:
                state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(tokens.shape)], 1)
            return self.lm_logits(image_embeds, tokens, state["mask"], cache)[:, -1]

        ends = dict(max_length=max_length, eos_token_id=self.sep_token_id, pad_token_id=self.pad_token_id,
                    min_length=min_length)
        if beams > 1:
            return generation.beam_search(step, cache.reorder, input_ids, num_beams=beams,
                                          length_penalty=length_penalty, early_stopping=early_stopping, **ends)
        if do_sample:
            return generation.nucleus_sampling(step, input_ids, top_p=top_p, top_k=top_k, temperature=temperature,
                                               generator=generator, **ends)
        return generation.greedy_search(step, input_ids, **ends)

    # ---- conversion -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, *, backend="auto"):
        """From a transformers ``BlipForImageTextRetrieval`` (→ :class:`BLIPForImageTextRetrieval`) or
        ``BlipForConditionalGeneration`` (→ :class:`BLIPForConditionalGeneration`); weights copied."""
        kind = type(hf_model).__name__
        targets = {"BlipForImageTextRetrieval": BLIPForImageTextRetrieval,
                   "BlipForConditionalGeneration": BLIPForConditionalGeneration}
        if kind not in targets:
            raise ValueError(f"BLIP.from_hf expects one of {tuple(targets)}, got {kind}")
        c, vc, tc = hf_model.config, hf_model.config.vision_config, hf_model.config.text_config
        retrieval = kind == "BlipForImageTextRetrieval"
        model = targets[kind](
            image_size=vc.image_size, patch_size=vc.patch_size, vision_width=vc.hidden_size,
            vision_layers=vc.num_hidden_layers, vision_heads=vc.num_attention_heads, vision_mlp=vc.intermediate_size,
            vision_eps=vc.layer_norm_eps, vision_act=hf_activation(vc.hidden_act, "BLIP.from_hf"),
            vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, text_layers=tc.num_hidden_layers,
            text_heads=tc.num_attention_heads, intermediate_size=tc.intermediate_size,
            max_positions=tc.max_position_embeddings, text_eps=tc.layer_norm_eps,
            text_act=hf_activation(tc.hidden_act, "BLIP.from_hf"), embed_dim=c.image_text_hidden_size,
            label_smoothing=tc.label_smoothing, bos_token_id=tc.bos_token_id, enc_token_id=tc.bos_token_id,
            cls_token_id=tc.bos_token_id, sep_token_id=tc.sep_token_id, pad_token_id=tc.pad_token_id,
            parts=("itc", "itm") if retrieval else ("lm",), use_momentum=False, backend=backend,
            tie_word_embeddings=retrieval or _lm_head_is_tied(hf_model))
        ref = hf_model.vision_model.embeddings.patch_embedding.weight
        model = model.to(dtype=ref.dtype, device=ref.device)
        _load_hf_vision(model.visual_encoder, hf_model.vision_model)
        sd = hf_model.state_dict()
        if retrieval:
            body, _ = bert_state_dict_from_hf(sd, "text_encoder.")
            model.text_encoder.load_state_dict(body, strict=True)
            for name in ("vision_proj", "text_proj", "itm_head"):
                getattr(model, name).load_state_dict(getattr(hf_model, name).state_dict())
        else:
            body, head = bert_state_dict_from_hf(sd, "text_decoder.bert.", "text_decoder.cls.")
            model.text_decoder.load_state_dict(body, strict=True)
            model.lm_head.load_state_dict(head, strict=True)
        return model.eval()


def _check_tied(model, mapped):
    """Keys of one shared parameter (BLIP's tied encoder / decoder, LAVIS saves both) must hold equal values:
    loading would otherwise keep whichever came last."""
    seen = {}
    for name, p in model.state_dict(keep_vars=True).items():
        if name in mapped:
            first = seen.setdefault(id(p), name)
            if first != name and not torch.equal(mapped[first], mapped[name]):
                raise ValueError(f"BLIP.from_state_dict: {first} and {name} are one parameter here (tied as in "
                                 "LAVIS) but differ in the checkpoint; build with tie_encoder_decoder=False")


def _lm_head_is_tied(hf_model):
    decoder = hf_model.text_decoder
    return decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight


_HF_VISION_LAYER = {"qkv": "self_attn.qkv", "out": "self_attn.projection", "norm1": "layer_norm1",
                    "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def _load_hf_vision(vit, hf_vision):
    e, pe = hf_vision.embeddings, vit.patch_embed
    pairs = [("class_embedding", pe.cls_token, e.class_embedding),
             ("position_embedding", pe.pos_embed, e.position_embedding),
             ("patch_embedding.weight", pe.proj.weight, e.patch_embedding.weight),
             ("patch_embedding.bias", pe.proj.bias, e.patch_embedding.bias),
             ("post_layernorm.weight", vit.norm.weight, hf_vision.post_layernorm.weight),
             ("post_layernorm.bias", vit.norm.bias, hf_vision.post_layernorm.bias)]
    copy_weights(pairs + layer_pairs(vit.encoder, hf_vision.encoder.layers, _HF_VISION_LAYER), "BLIP.from_hf")


class BLIPForImageTextRetrieval(BLIP):
    """Drop-in for HF ``BlipForImageTextRetrieval``: ``forward(input_ids, pixel_values, use_itm_head=True,
    attention_mask=None, interpolate_pos_encoding=False, *, output_hidden_states, return_dict)`` ->
    ``itm_score``, ``last_hidden_state``, ``hidden_states`` (the vision tower's, when asked),
    ``question_embeds``; ``return_dict=False`` gives HF's tuple. ``output_attentions=True`` raises ValueError
    (flash_attention forms no probabilities)."""

    def forward(self, input_ids, pixel_values, use_itm_head=True, attention_mask=None, interpolate_pos_encoding=False,
                *, output_attentions=None, output_hidden_states=None, return_dict=None):
        check_output_attentions("BLIPForImageTextRetrieval", output_attentions)
        out = self.itm_score(pixel_values, input_ids, attention_mask, use_itm_head, interpolate_pos_encoding,
                             output_hidden_states)
        return hf_return(out, return_dict)


class BLIPForConditionalGeneration(BLIP):
    """Drop-in for HF ``BlipForConditionalGeneration``: ``forward(pixel_values, input_ids, attention_mask,
    labels, interpolate_pos_encoding, *, output_hidden_states, return_dict)`` -> ``loss`` (label-smoothed LM
    loss when labels are given), ``logits``, ``image_embeds``, ``last_hidden_state``, ``hidden_states`` (the
    vision tower's, when asked); ``return_dict=False`` gives HF's tuple; ``output_attentions=True`` raises
    ValueError (flash_attention forms no probabilities). ``generate`` as HF's."""

    def forward(self, pixel_values, input_ids=None, attention_mask=None, labels=None, interpolate_pos_encoding=False,
                *, output_attentions=None, output_hidden_states=None, return_dict=None):
        check_output_attentions("BLIPForConditionalGeneration", output_attentions)
        vision = self.visual_encoder(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                     output_hidden_states=output_hidden_states)
        image_embeds = vision.last_hidden_state
        logits = self.lm_logits(image_embeds, input_ids, attention_mask)
        loss = self.lm_loss(logits, labels) if labels is not None else None
        out = BlipForConditionalGenerationModelOutput(loss=loss, logits=logits, image_embeds=image_embeds,
                                                      last_hidden_state=image_embeds,
                                                      hidden_states=vision.hidden_states)
        return hf_return(out, return_dict)


def capfilt(captioner, filter_model, pixel_values, *, threshold=0.5, num_beams=1, do_sample=True, top_p=0.9,
            max_length=30, min_length=5, generator=None, web_input_ids=None, web_attention_mask=None):
    """CapFilt: the captioner writes one synthetic caption per image (nucleus sampling by default, as the
    paper), the filter's ITM head keeps the captions it judges matching (p(match) > `threshold`); web
    captions, if given, are filtered the same way. Returns a list of (kind, image index, caption ids)."""
    check_scalar("capfilt", "threshold", threshold, lo=0.0, hi=1.0)
    captions = captioner.generate(pixel_values, max_length=max_length, min_length=min_length, num_beams=num_beams,
                                  do_sample=do_sample, top_p=top_p, generator=generator)
    pad = captioner.pad_token_id
    # the filter's [ENC] role reads the caption after its first token; [DEC] -> [ENC], padding masked
    synth = filter_model._with_first(captions, filter_model.enc_token_id)
    synth_mask = (captions != pad).long()
    synth_mask[:, 0] = 1
    kept = []
    with torch.no_grad():
        image_embeds = filter_model.encode_image(pixel_values)
        candidates = [("synthetic", synth, synth_mask)]
        if web_input_ids is not None:
            candidates.append(("web", filter_model._with_first(web_input_ids, filter_model.enc_token_id),
                               web_attention_mask))
        for kind, ids, mask in candidates:
            logits, _ = filter_model.itm_logits(image_embeds, ids, mask)
            accept = logits.float().softmax(-1)[:, 1] > threshold
            kept += [(kind, i, ids[i][mask[i].bool()] if mask is not None else ids[i])
                     for i in accept.nonzero()[:, 0].tolist()]
    return kept
