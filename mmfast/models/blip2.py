"""BLIP-2 (Li et al. 2023) on mmfast's kernels: a frozen ViT, the Querying Transformer (Q-Former: learned
query tokens that self-attend and cross-attend to the image features every ``cross_attention_frequency``
layers), a linear projection into the language model's width and a frozen decoder-only language model
(OPT, :class:`mmfast.nn.decoder.DecoderLM`). Drop-in for transformers' ``Blip2ForConditionalGeneration``
(5.x): the projected query outputs replace the ``image_token_id`` placeholders of the prompt.

Q-Former dtype: transformers keeps ``qformer`` and ``query_tokens`` in fp32 when it loads a checkpoint in fp16
(``_keep_in_fp32_modules``, which 5.x applies to fp16 only; in bf16 they load bf16); the image features are
cast to the Q-Former's dtype before it and its output cast back to the vision tower's dtype before the
projection. :meth:`Blip2.from_hf` copies each part in the dtype it has there, and :meth:`Blip2.cast` follows
the loading rule (``keep_qformer_fp32=True`` keeps them fp32 in bf16 too).

Stage 1 (:class:`Blip2ForImageTextRetrieval`, drop-in for HF's): the Q-Former's text path (shared
self-attention over [queries; text], separate query / text FFNs), ITC / ITM scores as HF, and LAVIS'
training losses (ITC max over queries with label smoothing, ITM with hard negatives, ITG under the
``qformer_masks`` interval mask). Stage 2 freezing: :meth:`Blip2.set_stage`.
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from mmfast.kernels._common import check_bool, check_choice, check_int, check_scalar
from mmfast.nn.bert import BertLayer, BertLMHead, init_bert_weights
from mmfast.nn.decoder import PRESETS as _LM
from mmfast.nn.decoder import DecoderLM

from ._common import ModelOutput, check_ids, copy_weights, module_pairs
from .blip import _load_hf_vision
from .objectives import itm_pairs, sample_hard_negatives
from .vit import ViT, hf_activation

_OP = "Blip2"
STAGES = ("stage2", "stage1", "all")


@dataclass(eq=False)
class Blip2Output(ModelOutput):
    """HF's ``Blip2ForConditionalGenerationModelOutput``: loss, logits (the last labels.shape[1] positions
    when labels are given, as HF), the vision tower's features, the Q-Former's query outputs and the
    language model's output."""
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    image_embeds: torch.Tensor = None
    query_output: torch.Tensor = None
    language_model_outputs: Any = None


class _TextFfn(nn.Module):
    """The text tokens' FFN of a Q-Former layer (HF's ``intermediate`` / ``output``): LN(x + W2·act(W1·x))."""

    def __init__(self, hidden_size, intermediate_size, layer_norm_eps, f):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size, **f)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, **f)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps, **f)


def _ffn(block, act, dropout, x):
    return block.ffn_norm(x + dropout(block.fc2(act(block.fc1(x)))))


class QFormer(nn.Module):
    """BLIP-2's Querying Transformer (HF ``Blip2QFormerModel``): LayerNorm on the input (query tokens, then
    optionally text embeddings), then post-norm BERT layers whose self-attention spans queries and text,
    whose cross-attention to the image features (layers i with ``i % cross_attention_frequency == 0``)
    reads only the queries, and whose FFN is split: the queries' (``fc1`` / ``fc2`` / ``ffn_norm`` of each
    :class:`BertLayer`, HF's ``*_query``) and the text's (``text_ffn``, HF's ``intermediate`` / ``output``).

    The text path (word + position embeddings, ``text_ffn``) is built when `vocab_size` is given (HF's
    ``use_qformer_text_input``; ``Blip2ForImageTextRetrieval`` needs it, image-to-text does not).
    """

    def __init__(self, hidden_size, num_layers, num_heads, encoder_hidden_size, intermediate_size=None, *,
                 cross_attention_frequency=2, layer_norm_eps=1e-12, activation="gelu", dropout=0.0, vocab_size=None,
                 max_positions=512, pad_token_id=0, backend="auto", device=None, dtype=None):
        super().__init__()
        op = "QFormer"
        for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads),
                            ("encoder_hidden_size", encoder_hidden_size),
                            ("cross_attention_frequency", cross_attention_frequency)):
            check_int(op, name, value, lo=1)
        intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        check_int(op, "intermediate_size", intermediate_size, lo=1)
        f = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps, **f)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            BertLayer(hidden_size, num_heads, intermediate_size, layer_norm_eps=layer_norm_eps, activation=activation,
                      dropout=dropout, backend=backend,
                      cross_attention_dim=encoder_hidden_size if i % cross_attention_frequency == 0 else None, **f)
            for i in range(num_layers))
        self.word_embeddings = self.position_embeddings = self.text_ffn = None
        if vocab_size is not None:
            check_int(op, "vocab_size", vocab_size, lo=1)
            check_int(op, "max_positions", max_positions, lo=1)
            self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id, **f)
            self.position_embeddings = nn.Embedding(max_positions, hidden_size, **f)
            self.text_ffn = nn.ModuleList(_TextFfn(hidden_size, intermediate_size, layer_norm_eps, f)
                                          for _ in range(num_layers))
        if device is None or torch.device(device).type != "meta":
            with torch.no_grad():
                init_bert_weights(self)

    def forward(self, query_embeds=None, encoder_hidden_states=None, *, input_ids=None, attention_mask=None,
                intervals=None):
        """query_embeds (B, Q, hidden) or None; encoder_hidden_states (B, N, encoder_hidden_size), every
        position kept (HF passes an all-ones image mask), needed with queries; input_ids (B, T) text (needs
        the text path); attention_mask (B, Q + T) or (B, T) (the queries then kept), 1 keep / 0 pad.
        Bidirectional self-attention, or `intervals` (kv_start, kv_end) over [queries; text], e.g. the ITG
        mask of ``mmfast.kernels.attention.masks.qformer_masks``. Computed in this module's dtype; returns
        (B, Q + T, hidden)."""
        op = "QFormer"
        dtype = self.layernorm.weight.dtype
        parts = []
        if query_embeds is not None:
            if encoder_hidden_states is None:
                raise ValueError(f"{op}: query_embeds need encoder_hidden_states (the image features)")
            parts.append(query_embeds.to(dtype))
        n_query = parts[0].shape[1] if parts else 0
        if input_ids is not None:
            if self.word_embeddings is None:
                raise ValueError(f"{op}: input_ids need the text path (build with vocab_size=)")
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                raise ValueError(f"{op}: input_ids must be a (B, T) tensor, got "
                                 f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
            if input_ids.shape[1] > self.position_embeddings.num_embeddings:
                raise ValueError(f"{op}: input_ids length {input_ids.shape[1]} exceeds max_positions="
                                 f"{self.position_embeddings.num_embeddings}")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append((self.word_embeddings(input_ids) + self.position_embeddings(positions)).to(dtype))
        if not parts:
            raise ValueError(f"{op}: give query_embeds, input_ids or both")
        x = self.dropout(self.layernorm(torch.cat(parts, 1)))
        B, L = x.shape[:2]
        key_mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
                    or attention_mask.shape[0] != B or attention_mask.shape[1] not in (L, L - n_query):
                raise ValueError(f"{op}: attention_mask must be ({B}, {L}) or ({B}, {L - n_query}), got "
                                 f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
            key_mask = attention_mask == 0
            if key_mask.shape[1] != L:
                key_mask = F.pad(key_mask, (n_query, 0), value=False)
        context = encoder_hidden_states.to(dtype) if n_query else None
        kv_start, kv_end = (None, None) if intervals is None else intervals
        for i, layer in enumerate(self.layers):
            a = layer.self_attn(x, key_padding_mask=key_mask, kv_start=kv_start, kv_end=kv_end)
            h = layer.self_norm(x + layer.dropout(a))
            query, text = h[:, :n_query], h[:, n_query:]
            if n_query:
                if layer.cross_attn is not None:
                    query = layer.cross_norm(query + layer.dropout(layer.cross_attn(query, context)))
                query = _ffn(layer, layer.act, layer.dropout, query)
            if text.shape[1]:
                text = _ffn(self.text_ffn[i], layer.act, layer.dropout, text)
            x = torch.cat([query, text], 1) if n_query and text.shape[1] else (query if n_query else text)
        return x


class Blip2(nn.Module):
    """BLIP-2 image-to-text model (HF ``Blip2ForConditionalGeneration`` with an OPT language model).

    Args:
        vision: a :class:`ViT` whose ``last_hidden_state`` (every token after the final LayerNorm, HF's
            ``post_layernorm``) feeds the Q-Former. The paper's "second-to-last layer" is built into the
            checkpoint: HF's vision model simply has that many layers.
        qformer: a :class:`QFormer`; query_tokens: (1, Q, qformer hidden) tensor (made a Parameter).
        language_projection: nn.Linear(qformer hidden, LM hidden).
        language_model: a :class:`DecoderLM` (OPT or Llama flavour).
        image_token_id: the placeholder token whose embeddings the projected queries replace (HF 5.x's
            ``image_token_id``); the prompt holds Q of them per image.
    """

    def __init__(self, vision, qformer, query_tokens, language_projection, language_model, *, image_token_id):
        super().__init__()
        for name, value, cls in (("vision", vision, ViT), ("qformer", qformer, QFormer),
                                 ("language_projection", language_projection, nn.Linear),
                                 ("language_model", language_model, DecoderLM)):
            if not isinstance(value, cls):
                raise ValueError(f"{_OP}: {name} must be a {cls.__name__}, got {type(value).__name__}")
        if not isinstance(query_tokens, torch.Tensor) or query_tokens.dim() != 3 or query_tokens.shape[0] != 1 \
                or query_tokens.shape[2] != qformer.hidden_size:
            raise ValueError(f"{_OP}: query_tokens must be a (1, Q, {qformer.hidden_size}) tensor, got "
                             f"{getattr(query_tokens, 'shape', type(query_tokens).__name__)}")
        if language_projection.in_features != qformer.hidden_size \
                or language_projection.out_features != language_model.hidden_size:
            raise ValueError(f"{_OP}: language_projection must map {qformer.hidden_size} -> "
                             f"{language_model.hidden_size}, got {language_projection.in_features} -> "
                             f"{language_projection.out_features}")
        check_int(_OP, "image_token_id", image_token_id, lo=0, hi=language_model.vocab_size - 1)
        self.vision, self.qformer, self.language_projection = vision, qformer, language_projection
        self.language_model = language_model
        self.query_tokens = nn.Parameter(query_tokens.detach().clone())
        self.image_token_id = image_token_id
        self.num_query_tokens = query_tokens.shape[1]

    # ---- training stages --------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name, *, backend="auto"):
        """A model of ``PRESETS[name]`` (random weights; the Q-Former without its text path)."""
        vision, qformer, queries, p = _preset_parts(f"{cls.__name__}.from_preset", name, backend, text=False)
        projection = nn.Linear(qformer.hidden_size, p["language_model"]["hidden_size"])
        lm = DecoderLM(**p["language_model"], backend=backend)
        return cls(vision, qformer, queries, projection, lm, image_token_id=p["image_token_id"])

    def set_stage(self, stage="stage2"):
        """Which parameters train: "stage2" (image-to-text: Q-Former, query tokens and projection; the ViT
        and the LM frozen, as the paper), "stage1" (Q-Former and query tokens only) or "all". Frozen parts
        get requires_grad=False. Returns self."""
        check_choice(_OP, "stage", stage, STAGES)
        trainable = {"stage2": ("qformer", "query_tokens", "language_projection"),
                     "stage1": ("qformer", "query_tokens"),
                     "all": ("vision", "qformer", "query_tokens", "language_projection", "language_model")}[stage]
        for name, p in self.named_parameters():
            p.requires_grad_(name.split(".")[0] in trainable)
        return self

    def cast(self, dtype, *, keep_qformer_fp32=None):
        """Cast the model to `dtype` as ``from_pretrained(dtype=)`` loads it: the Q-Former and the query tokens
        stay fp32 when `keep_qformer_fp32` is true (default: for fp16 only, transformers' rule)."""
        check_choice("Blip2.cast", "dtype", dtype, (torch.float16, torch.bfloat16, torch.float32, torch.float64))
        keep = dtype == torch.float16 if keep_qformer_fp32 is None else keep_qformer_fp32
        check_bool("Blip2.cast", "keep_qformer_fp32", keep)
        for module in (self.vision, self.language_projection, self.language_model):
            module.to(dtype)
        if not keep:
            self.qformer.to(dtype)
            self.query_tokens.data = self.query_tokens.data.to(dtype)
        return self

    # ---- forward ----------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values, interpolate_pos_encoding=False):
        """(image_embeds (B, N, vision width), query_output (B, Q, qformer hidden) in the Q-Former's dtype,
        language_model_inputs (B, Q, LM hidden))."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"{_OP}: pixel_values must be a (B, C, H, W) tensor, got "
                             f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}")
        check_bool(_OP, "interpolate_pos_encoding", interpolate_pos_encoding)
        image_embeds = self.vision(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state
        query_output = self.qformer(self.query_tokens.expand(image_embeds.shape[0], -1, -1), image_embeds)
        return image_embeds, query_output, self.language_projection(query_output.to(image_embeds.dtype))

    def _splice(self, input_ids, features):
        """The prompt's embeddings with the image placeholders replaced by `features`, in order."""
        embeds = self.language_model.embed_tokens(input_ids)
        placeholders = input_ids == self.image_token_id
        per_row = placeholders.sum(1)
        if not bool((per_row == self.num_query_tokens).all()):
            raise ValueError(f"{_OP}: input_ids must hold {self.num_query_tokens} image tokens (id "
                             f"{self.image_token_id}) per row, got {per_row.tolist()}")
        return embeds.masked_scatter(placeholders[..., None], features.to(embeds.dtype))

    def forward(self, pixel_values, input_ids, attention_mask=None, labels=None, interpolate_pos_encoding=False):
        """HF's forward: input_ids (B, L) with Q image tokens per row (left padding allowed), attention_mask
        (B, L) 1 keep / 0 pad; labels (B, L') with L' <= L aligned to the end of the sequence (HF's
        ``logits[:, -L':]``), shifted next-token cross-entropy, -100 ignored. Returns :class:`Blip2Output`."""
        check_ids(_OP, input_ids, attention_mask)
        image_embeds, query_output, features = self.get_image_features(pixel_values, interpolate_pos_encoding)
        if features.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{_OP}: pixel_values has {features.shape[0]} images for {input_ids.shape[0]} prompts")
        embeds = self._splice(input_ids, features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        full_labels = None
        if labels is not None:
            B, L = input_ids.shape
            if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.shape[0] != B \
                    or labels.shape[1] > L:
                raise ValueError(f"{_OP}: labels must be (B={B}, L' <= {L}), got "
                                 f"{getattr(labels, 'shape', type(labels).__name__)}")
            # left-filled with -100: the same shifted loss as HF's over its last L' logits
            full_labels = F.pad(labels, (L - labels.shape[1], 0), value=-100)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=full_labels)
        logits = out.logits
        if labels is not None and logits is not None:
            logits = logits[:, -labels.shape[1]:]
        return Blip2Output(loss=out.loss, logits=logits, image_embeds=image_embeds, query_output=query_output,
                           language_model_outputs=out)

    @torch.no_grad()
    def generate(self, pixel_values, input_ids=None, attention_mask=None, interpolate_pos_encoding=False,
                 **generate_kwargs):
        """HF's ``generate``: without input_ids the prompt is Q image tokens + the LM's BOS; the prompt's
        embeddings (image tokens replaced) go to :meth:`DecoderLM.generate` (greedy, beam search or sampling,
        its keywords). Returns (B, prompt + new) token ids, as HF's decoder-only path."""
        _, _, features = self.get_image_features(pixel_values, interpolate_pos_encoding)
        B = features.shape[0]
        if input_ids is None:
            bos = self.language_model.bos_token_id
            if bos is None:
                raise ValueError(f"{_OP}.generate: without input_ids the language model needs a bos_token_id")
            input_ids = torch.tensor([[self.image_token_id] * self.num_query_tokens + [bos]],
                                     device=features.device).repeat(B, 1)
        check_ids(_OP, input_ids, attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self._splice(input_ids, features)
        return self.language_model.generate(input_ids, attention_mask, inputs_embeds=embeds, **generate_kwargs)

    # ---- conversion -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, *, backend="auto"):
        """From transformers' ``Blip2ForConditionalGeneration`` with a decoder-only (OPT / Llama) language
        model; weights copied, each part in the dtype and on the device it has there (the Q-Former and query
        tokens fp32 when HF loaded them so: in fp16, not in bf16). T5 (encoder-decoder) language models are refused."""
        kind = type(hf_model).__name__
        if kind != "Blip2ForConditionalGeneration":
            raise ValueError(f"{_OP}.from_hf expects a Blip2ForConditionalGeneration, got {kind}")
        c = hf_model.config
        if not c.use_decoder_only_language_model:
            raise ValueError(f"{_OP}.from_hf: the language model is {type(hf_model.language_model).__name__} "
                             "(encoder-decoder, e.g. Flan-T5); only decoder-only (OPT) language models are "
                             "supported")
        if c.image_token_id is None:
            raise ValueError(f"{_OP}.from_hf: config.image_token_id is None; transformers (4.57 on) splices the "
                             "query outputs at image tokens: set it to the processor's image token id (4.5x's "
                             "Blip2Config takes it as image_token_index)")
        vision, qformer = _vision_from_hf(hf_model, backend), _qformer_from_hf(hf_model, backend, text=False)
        lm = DecoderLM.from_hf(hf_model.language_model, lm_head=getattr(hf_model, "lm_head", None), backend=backend)
        projection = _linear_from_hf(hf_model.language_projection, "language_projection")
        return cls(vision, qformer, hf_model.query_tokens, projection, lm, image_token_id=c.image_token_id).eval()


@dataclass(eq=False)
class Blip2RetrievalOutput(ModelOutput):
    """HF's ``Blip2ImageTextMatchingModelOutput``: ITM logits (B, 2) per pair, or ITC similarities (B, B)
    (max over the queries), with the projected features (ITC) or the joint query outputs (ITM)."""
    logits_per_image: torch.Tensor = None
    logits_per_text: torch.Tensor = None
    text_embeds: torch.Tensor = None
    image_embeds: torch.Tensor = None


class Blip2ForImageTextRetrieval(nn.Module):
    """BLIP-2's stage-1 heads on the Q-Former (HF ``Blip2ForImageTextRetrieval``): ITC (query outputs and the
    text [CLS] projected and normalised, similarity = max over the queries) and ITM (queries and text in one
    bidirectional pass, the head averaged over the query outputs).

    Args: vision (:class:`ViT`), qformer (a :class:`QFormer` with its text path), query_tokens (1, Q, hidden),
    vision_projection / text_projection (hidden -> embed dim), itm_head (hidden -> 2); strip_image_tokens:
    input_ids start with Q image placeholders that the text path drops (HF: ``image_token_index`` set).
    Stage-1 training (:meth:`stage1_loss`, LAVIS ``Blip2Qformer.forward``): temp (learnable ITC temperature,
    clamped to [0.001, 0.5]), label_smoothing (ITC and ITG, 0.1), lm_head (a
    :class:`mmfast.nn.bert.BertLMHead` for ITG; None: no ITG, as HF's model) and bos_token_id (the [DEC]
    token put first for ITG).
    """

    def __init__(self, vision, qformer, query_tokens, vision_projection, text_projection, itm_head, *,
                 strip_image_tokens=False, lm_head=None, temp=0.07, label_smoothing=0.1, bos_token_id=None):
        super().__init__()
        for name, value, kind in (("vision", vision, ViT), ("qformer", qformer, QFormer),
                                  ("vision_projection", vision_projection, nn.Linear),
                                  ("text_projection", text_projection, nn.Linear), ("itm_head", itm_head, nn.Linear)):
            if not isinstance(value, kind):
                raise ValueError(f"{_OP}: {name} must be a {kind.__name__}, got {type(value).__name__}")
        if qformer.word_embeddings is None:
            raise ValueError(f"{_OP}: qformer needs its text path (QFormer(..., vocab_size=...))")
        if not isinstance(query_tokens, torch.Tensor) or query_tokens.dim() != 3 or query_tokens.shape[0] != 1 \
                or query_tokens.shape[2] != qformer.hidden_size:
            raise ValueError(f"{_OP}: query_tokens must be a (1, Q, {qformer.hidden_size}) tensor, got "
                             f"{getattr(query_tokens, 'shape', type(query_tokens).__name__)}")
        check_bool(_OP, "strip_image_tokens", strip_image_tokens)
        self.vision, self.qformer = vision, qformer
        self.vision_projection, self.text_projection, self.itm_head = vision_projection, text_projection, itm_head
        self.query_tokens = nn.Parameter(query_tokens.detach().clone())
        self.num_query_tokens, self.strip_image_tokens = query_tokens.shape[1], strip_image_tokens
        check_scalar(_OP, "temp", temp, lo=0.001, hi=0.5)
        check_scalar(_OP, "label_smoothing", label_smoothing, lo=0.0, hi=1.0, hi_open=True)
        if lm_head is not None:
            if not isinstance(lm_head, BertLMHead):
                raise ValueError(f"{_OP}: lm_head must be a BertLMHead or None, got {type(lm_head).__name__}")
            check_int(_OP, "bos_token_id", bos_token_id, lo=0, hi=qformer.word_embeddings.num_embeddings - 1)
        self.lm_head, self.bos_token_id, self.label_smoothing = lm_head, bos_token_id, label_smoothing
        self.temp = nn.Parameter(torch.tensor(float(temp)))

    @classmethod
    def from_preset(cls, name, *, backend="auto"):
        """The stage-1 model of ``PRESETS[name]`` (random weights): the Q-Former with its text path, ITC
        projections to ``embed_dim``, the ITM head and an ITG head tied to the Q-Former's word embeddings."""
        vision, qformer, queries, p = _preset_parts(f"{cls.__name__}.from_preset", name, backend, text=True)
        h = qformer.hidden_size
        lm_head = BertLMHead(h, qformer.word_embeddings.num_embeddings, tie_to=qformer.word_embeddings)
        model = cls(vision, qformer, queries, nn.Linear(h, p["embed_dim"]), nn.Linear(h, p["embed_dim"]),
                    nn.Linear(h, 2), lm_head=lm_head, bos_token_id=p["qformer_bos_token_id"])
        model.cls_token_id = p["qformer_cls_token_id"]  # what training_batch starts a text with
        return model

    def stage1_loss(self, pixel_values, input_ids, attention_mask=None, *, generator=None):
        """BLIP-2 stage-1 losses (LAVIS ``Blip2Qformer.forward``) on a batch of B >= 2 pairs: input_ids (B, T)
        text only (no image tokens), attention_mask (B, T). Returns a dict: ``itc`` (similarity = max over
        the queries / temp, label smoothing, both directions: ``contrastive_loss`` with 3-D image features),
        ``itm`` (one hard negative text per image and image per text drawn from the ITC similarities with
        `generator`; cross-entropy over the 3B pairs), ``itg`` (with an lm_head: [DEC] first, text tokens
        attend to every query and causally to the text, queries only to queries: the ITG interval mask;
        shifted cross-entropy with label smoothing, pads ignored) and ``loss`` (their sum). ITC and ITM use
        this rank's batch only."""
        from mmfast.kernels import contrastive_loss
        from mmfast.kernels.attention import masks

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.vision(pixel_values).last_hidden_state
        image_feat, text_feat = self.features(image_embeds, input_ids, attention_mask)
        scale = 1.0 / self.temp
        itc = contrastive_loss(image_feat, text_feat, scale, log_scale=False, max_scale=None,
                               label_smoothing=self.label_smoothing, backend="auto")
        with torch.no_grad():
            sim = torch.einsum("iqe,je->ijq", image_feat, text_feat).amax(-1) * scale
            neg_text, neg_image = sample_hard_negatives(sim, sim.t(), generator)
        images, ids, labels = itm_pairs(image_embeds, input_ids, neg_text, neg_image)
        _, masks_, _ = itm_pairs(image_embeds, attention_mask, neg_text, neg_image)
        Q = self.num_query_tokens
        joint = self.qformer(self.query_tokens.expand(images.shape[0], -1, -1), images, input_ids=ids,
                             attention_mask=masks_)
        itm = F.cross_entropy(self.itm_head(joint[:, :Q]).mean(1).float(), labels)
        out = {"itc": itc, "itm": itm}
        if self.lm_head is not None:
            dec = input_ids.clone()
            dec[:, 0] = self.bos_token_id
            intervals = masks.qformer_masks(Q, dec.shape[1], device=dec.device).itg
            h = self.qformer(self.query_tokens.expand(dec.shape[0], -1, -1), image_embeds, input_ids=dec,
                             attention_mask=attention_mask, intervals=intervals)
            logits = self.lm_head(h[:, Q:])
            targets = dec.masked_fill(attention_mask == 0, -100)[:, 1:]
            out["itg"] = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                         ignore_index=-100, label_smoothing=self.label_smoothing)
        out["loss"] = sum(out.values())
        return out

    def forward(self, pixel_values, input_ids, attention_mask=None, use_image_text_matching_head=False):
        """HF's forward: pixel_values (B, C, H, W), input_ids (B, L) (+ Q image tokens in front with
        strip_image_tokens), attention_mask (B, L) 1 keep / 0 pad. Returns :class:`Blip2RetrievalOutput`."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"{_OP}: pixel_values must be a (B, C, H, W) tensor, got "
                             f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"{_OP}: input_ids must be a (B, L) tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        check_bool(_OP, "use_image_text_matching_head", use_image_text_matching_head)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        Q = self.num_query_tokens
        image_embeds = self.vision(pixel_values).last_hidden_state
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        text_ids = input_ids[:, Q:] if self.strip_image_tokens else input_ids
        if use_image_text_matching_head:
            # HF keeps the full mask (its first Q columns then cover the queries) when the image tokens are stripped
            joint = self.qformer(queries, image_embeds, input_ids=text_ids, attention_mask=attention_mask)
            logits = self.itm_head(joint[:, :Q].to(self.itm_head.weight.dtype)).mean(1)
            return Blip2RetrievalOutput(logits_per_image=logits, logits_per_text=logits.t(), text_embeds=joint)
        image_feat, text_feat = self.features(image_embeds, text_ids, attention_mask[:, Q:] if self.strip_image_tokens
                                              else attention_mask)
        sim = torch.matmul(image_feat, text_feat.t()).max(1).values
        return Blip2RetrievalOutput(logits_per_image=sim, logits_per_text=sim.t(), text_embeds=text_feat,
                                    image_embeds=image_feat)

    def features(self, image_embeds, input_ids, attention_mask=None):
        """ITC features: normalised projected query outputs (B, Q, E) and text [CLS] (B, E)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = self.qformer(queries, image_embeds)
        text_output = self.qformer(input_ids=input_ids, attention_mask=attention_mask)
        image_feat = self.vision_projection(query_output.to(self.vision_projection.weight.dtype))
        text_feat = self.text_projection(text_output[:, 0].to(self.text_projection.weight.dtype))
        return F.normalize(image_feat, dim=-1), F.normalize(text_feat, dim=-1)

    @classmethod
    def from_hf(cls, hf_model, *, backend="auto"):
        """From transformers' ``Blip2ForImageTextRetrieval``; weights copied, each part in its dtype there."""
        kind = type(hf_model).__name__
        if kind != "Blip2ForImageTextRetrieval":
            raise ValueError(f"{_OP}.from_hf expects a Blip2ForImageTextRetrieval, got {kind}")
        vision, qformer = _vision_from_hf(hf_model, backend), _qformer_from_hf(hf_model, backend, text=True)
        heads = [_linear_from_hf(getattr(hf_model, n), n) for n in ("vision_projection", "text_projection", "itm_head")]
        return cls(vision, qformer, hf_model.query_tokens, *heads,
                   strip_image_tokens=hf_model.config.image_token_index is not None).eval()


# Test-size presets (``Blip2.from_preset``, ``Blip2ForImageTextRetrieval.from_preset``, the training entry point):
# a ViT, a Q-Former (text path: vocab_size, [CLS] / [DEC] ids) and an OPT-flavoured DecoderLM
PRESETS = {
    "tiny": dict(vision=dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
                 qformer=dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                              cross_attention_frequency=2, vocab_size=64),
                 qformer_cls_token_id=1, qformer_bos_token_id=2, num_query_tokens=4, embed_dim=16,
                 language_model=dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                     norm="layernorm", norm_eps=1e-5, mlp="relu", bias=True, positions="learned",
                                     max_positions=32, tie_word_embeddings=True, pad_token_id=1, bos_token_id=2,
                                     eos_token_id=2),
                 image_token_id=63),
    # Salesforce/blip2-opt-2.7b: EVA ViT-g/14 without its last layer (39 of 40, HF's post_layernorm on top),
    # a BERT-base Q-Former (cross-attention every other layer, 32 queries), OPT-2.7b; image token 50265
    "blip2-opt-2.7b": dict(vision=dict(img_size=224, patch_size=14, embed_dim=1408, depth=39, num_heads=16,
                                       mlp_dim=6144, act="gelu", qkv_bias=True, norm_eps=1e-6, final_norm="all",
                                       pos_resample="hf"),
                           qformer=dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                                        cross_attention_frequency=2, vocab_size=30523),
                           qformer_cls_token_id=101, qformer_bos_token_id=30522, num_query_tokens=32, embed_dim=256,
                           language_model=_LM["opt-2.7b"], image_token_id=50265),
}


def _preset_parts(op, name, backend, text):
    check_choice(op, "name", name, tuple(PRESETS))
    p = PRESETS[name]
    vision = ViT(**p["vision"], backend=backend)
    q = dict(p["qformer"])
    vocab = q.pop("vocab_size")
    qformer = QFormer(**q, encoder_hidden_size=vision.embed_dim, vocab_size=vocab if text else None, backend=backend)
    queries = torch.randn(1, p["num_query_tokens"], qformer.hidden_size) * 0.02  # HF's init (initializer_range)
    return vision, qformer, queries, p


def training_model(preset, stage, *, backend="auto"):
    """The training entry point's model for `stage` (``STAGES``): "stage1" is the Q-Former's
    representation learning (:class:`Blip2ForImageTextRetrieval`, ITC + ITM + ITG, the ViT frozen); "stage2"
    and "all" are :class:`Blip2` under :meth:`Blip2.set_stage`."""
    check_choice("blip2.training_model", "stage", stage, STAGES)
    if stage == "stage1":
        model = Blip2ForImageTextRetrieval.from_preset(preset, backend=backend)
        model.vision.requires_grad_(False)
        return model
    return Blip2.from_preset(preset, backend=backend).set_stage(stage)


def training_batch(model, n, generator):
    """A synthetic batch for the training entry point: n random images; for :class:`Blip2` the prompts
    [Q image tokens, BOS, 6 text tokens, right padding] with labels (image tokens and pads at -100), for
    the stage-1 model [CLS] + up to 6 text tokens (n >= 2: ITC needs negatives). Keyword arguments of
    ``training_loss``."""
    stage1 = isinstance(model, Blip2ForImageTextRetrieval)
    check_int("blip2.training_batch", "n", n, lo=2 if stage1 else 1)
    s = model.vision.img_size
    pixels = torch.randn(n, 3, s, s, generator=generator)
    if stage1:
        vocab, cls_id = model.qformer.word_embeddings.num_embeddings, getattr(model, "cls_token_id", 1)
        pad, special = 0, {0, cls_id, model.bos_token_id}
        start = torch.full((n, 1), cls_id)
    else:
        lm = model.language_model
        vocab, pad = lm.vocab_size, lm.pad_token_id
        eos = lm.eos_token_id if isinstance(lm.eos_token_id, (list, tuple)) else [lm.eos_token_id]
        special = {lm.pad_token_id, lm.bos_token_id, model.image_token_id, *eos}
        start = torch.cat([torch.full((n, model.num_query_tokens), model.image_token_id),
                           torch.full((n, 1), lm.bos_token_id)], 1)
    allowed = torch.tensor([t for t in range(vocab) if t not in special])
    ids = torch.cat([start, allowed[torch.randint(0, len(allowed), (n, 6), generator=generator)]], 1)
    kept = ids.shape[1] - torch.randint(0, 4, (n,), generator=generator)
    mask = (torch.arange(ids.shape[1]) < kept[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    if stage1:
        return dict(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    labels = ids.masked_fill((mask == 0) | (ids == model.image_token_id), -100)
    return dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)


def training_loss(model, batch):
    """The loss the training entry point minimises: stage 1's ITC + ITM + ITG, else the LM loss."""
    if isinstance(model, Blip2ForImageTextRetrieval):
        return model.stage1_loss(**batch)["loss"]
    return model(**batch).loss


def _qformer_pairs(ours, hf_qformer, hf_embeddings=None):
    def attention(prefix, mine, theirs, fused_q):
        a = theirs.attention
        if fused_q:
            pairs = [(f"{prefix}.qkv.weight", mine.qkv.weight,
                      torch.cat([a.query.weight, a.key.weight, a.value.weight])),
                     (f"{prefix}.qkv.bias", mine.qkv.bias, torch.cat([a.query.bias, a.key.bias, a.value.bias]))]
        else:
            pairs = [*module_pairs(f"{prefix}.q", mine.q, a.query),
                     (f"{prefix}.kv.weight", mine.kv.weight, torch.cat([a.key.weight, a.value.weight])),
                     (f"{prefix}.kv.bias", mine.kv.bias, torch.cat([a.key.bias, a.value.bias]))]
        return pairs + module_pairs(f"{prefix}.out", mine.out, theirs.output.dense)

    pairs = module_pairs("layernorm", ours.layernorm, hf_qformer.layernorm)
    for i, (mine, theirs) in enumerate(zip(ours.layers, hf_qformer.encoder.layer, strict=True)):
        p = f"layers.{i}"
        pairs += attention(f"{p}.self_attn", mine.self_attn, theirs.attention, True)
        pairs += module_pairs(f"{p}.self_norm", mine.self_norm, theirs.attention.output.LayerNorm)
        if (mine.cross_attn is None) != (not theirs.has_cross_attention):
            raise ValueError(f"{_OP}.from_hf: layer {i}: cross-attention layout differs")
        if mine.cross_attn is not None:
            pairs += attention(f"{p}.cross_attn", mine.cross_attn, theirs.crossattention, False)
            pairs += module_pairs(f"{p}.cross_norm", mine.cross_norm, theirs.crossattention.output.LayerNorm)
        pairs += [*module_pairs(f"{p}.fc1", mine.fc1, theirs.intermediate_query.dense),
                  *module_pairs(f"{p}.fc2", mine.fc2, theirs.output_query.dense),
                  *module_pairs(f"{p}.ffn_norm", mine.ffn_norm, theirs.output_query.LayerNorm)]
        if ours.text_ffn is not None:
            t = ours.text_ffn[i]
            pairs += [*module_pairs(f"text_ffn.{i}.fc1", t.fc1, theirs.intermediate.dense),
                      *module_pairs(f"text_ffn.{i}.fc2", t.fc2, theirs.output.dense),
                      *module_pairs(f"text_ffn.{i}.ffn_norm", t.ffn_norm, theirs.output.LayerNorm)]
    if ours.word_embeddings is not None:
        pairs += [("word_embeddings.weight", ours.word_embeddings.weight, hf_embeddings.word_embeddings.weight),
                  ("position_embeddings.weight", ours.position_embeddings.weight,
                   hf_embeddings.position_embeddings.weight)]
    return pairs


def _vision_from_hf(hf_model, backend):
    vc = hf_model.config.vision_config
    ref = hf_model.vision_model.embeddings.patch_embedding.weight
    vision = ViT(vc.image_size, vc.patch_size, 3, vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads,
                 mlp_dim=vc.intermediate_size, act=hf_activation(vc.hidden_act, f"{_OP}.from_hf"),
                 qkv_bias=vc.qkv_bias, norm_eps=vc.layer_norm_eps, final_norm="all", pos_resample="hf",
                 backend=backend).to(device=ref.device, dtype=ref.dtype)
    _load_hf_vision(vision, hf_model.vision_model)
    return vision


def _qformer_from_hf(hf_model, backend, text):
    qc, hq = hf_model.config.qformer_config, hf_model.qformer
    qformer = QFormer(qc.hidden_size, qc.num_hidden_layers, qc.num_attention_heads, qc.encoder_hidden_size,
                      qc.intermediate_size, cross_attention_frequency=qc.cross_attention_frequency,
                      layer_norm_eps=qc.layer_norm_eps, activation=hf_activation(qc.hidden_act, f"{_OP}.from_hf"),
                      dropout=qc.hidden_dropout_prob, vocab_size=qc.vocab_size if text else None,
                      max_positions=qc.max_position_embeddings, pad_token_id=qc.pad_token_id, backend=backend,
                      device=hq.layernorm.weight.device, dtype=hq.layernorm.weight.dtype)
    copy_weights(_qformer_pairs(qformer, hq, getattr(hf_model, "embeddings", None)), f"{_OP}.from_hf")
    return qformer


def _linear_from_hf(hf_linear, name):
    out = nn.Linear(hf_linear.in_features, hf_linear.out_features, device=hf_linear.weight.device,
                    dtype=hf_linear.weight.dtype)
    copy_weights(module_pairs(name, out, hf_linear), f"{_OP}.from_hf")
    return out
