"""Flamingo (Alayrac et al. 2022) as open_flamingo builds it: a frozen CLIP ViT's patch tokens → a Perceiver
resampler (``mmfast.nn.PerceiverResampler``) → a frozen decoder LM (``mmfast.nn.decoder.DecoderLM``) with a
GATED XATTN-DENSE block (``mmfast.nn.GatedCrossAttentionBlock``, gates 0 at init) before every
`cross_attn_every_n_layers`-th layer, inserted through the LM's ``layer_hook`` (no second copy of its forward).

Interleaved text: each image is one ``<image>`` token (`media_token_id`) in the prompt, chunks end with
``<|endofchunk|>`` (`eoc_token_id`, generation's default EOS, as open_flamingo). A text token cross-attends
only to the resampled tokens of the most recent image at or before it (``media_intervals``,
``"most_recent"``: open_flamingo's ``only_attend_immediate_media``); tokens before any image see none (their
cross-attention output is 0). During generation every new token attends to the last image of its prompt
(open_flamingo's ``use_cached_media``), with the media encoded once.

Training (the protocol of ``mmfast.training``): ``Flamingo.from_preset(name, backend=)``, ``set_stage`` (default
"bridge": only the perceiver and the gated blocks train), ``synthetic_batch(n, generator)`` → (vision_x,
input_ids, attention_mask, labels), and ``model(*batch).loss``.

Hugging Face Idefics (v1, ``IdeficsForVisionText2Text``) through :meth:`Flamingo.from_hf`: the same model
with other options — every vision token ([CLS] included, not normed) into the perceiver (``act="relu"``,
optional q/k LayerNorms) or, with ``use_resampler=False`` (transformers' default), straight into the
cross-attention (``perceiver`` None: each image's S tokens are its media), ``GatedCrossAttentionBlock(variant=
"idefics")`` before the *first* layer of each group (``cross_attn_position="first"``), its decoupled embeddings
and head as one table of vocab + additional rows, and its keywords: ``pixel_values`` (B, T_img, C, H, W) with
``interpolate_pos_encoding`` (other sizes; Idefics' older resampling, ``pos_resample="hf_legacy"``), or instead
``image_encoder_embeddings`` (the tower's output, skips it) or ``perceiver_embeddings`` (the perceiver's, skips
both), as HF (B·T_img, S, D) or (B, T_img, S, D); ``image_attention_mask`` (B, L, T_img): which images each
token sees, followed as given; a new token sees what the prompt's last token sees, as HF's generate. Not
supported: a token whose images are not consecutive (ValueError: one key interval per token), HF's
``inputs_embeds`` / ``past_key_values`` / ``use_cache`` / ``output_*`` forward keywords (the forward is one
full pass; generate keeps its own cache), and the decoupled tables' partial freezing
(``set_stage("bridge+embeddings")`` trains the whole table). Where HF fails we do not: its loss when
``additional_vocab_size`` > 0 (it reshapes the logits to ``vocab_size`` columns; ours is over every column)
and its generate with ``perceiver_embeddings`` (passed twice from the second step).
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from mmfast.kernels._common import check_bool, check_choice, check_int
from mmfast.kernels.attention.masks import intervals_from_dense, media_intervals
from mmfast.nn.decoder import PRESETS as _LM
from mmfast.nn.decoder import DecoderLM
from mmfast.nn.gated_cross_attention import GatedCrossAttentionBlock, PerceiverResampler

from ._common import ModelOutput, build_preset, check_ids, copy_weights, gated_xattn_pairs, layer_pairs, module_pairs
from .vit import ViT

_OP = "Flamingo"
STAGES = ("bridge", "bridge+embeddings", "all")
POSITIONS = ("last", "first")
STRATEGIES = ("default", "full")
# open_flamingo's defaults (helpers.py: PerceiverResampler, GatedCrossAttentionBlock)
PERCEIVER_DEFAULTS = dict(depth=6, heads=8, dim_head=64, num_latents=64, ff_mult=4)
XATTN_DEFAULTS = dict(heads=8, dim_head=64, ff_mult=4)


@dataclass(eq=False)
class FlamingoOutput(ModelOutput):
    """open_flamingo's ``CausalLMOutputWithPast`` fields we produce: loss (shifted next-token cross-entropy,
    -100 ignored), logits (B, L, vocab); and the resampled media (B, T_img, latents, vision width)."""
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    media: Any = None


class Flamingo(nn.Module):
    """Vision encoder + Perceiver resampler + LM with gated cross-attention blocks.

    Args:
        vision: a :class:`ViT` (CLIP layout; its normed patch tokens, [CLS] dropped, are the visual features,
            as open_clip's ``output_tokens``) or a dict of its arguments.
        language_model: a :class:`DecoderLM` or a dict of its arguments.
        media_token_id, eoc_token_id: the ``<image>`` and ``<|endofchunk|>`` ids; media_token_id None: the
            images each token sees come only from ``image_attention_mask`` (Idefics' keyword).
        cross_attn_every_n_layers: a gated block before LM layer i when (i + 1) % n == 0 (open_flamingo,
            ``cross_attn_position="last"``) or when i % n == 0 (Idefics, "first").
        vision_feature_select_strategy: "default" drops the vision tower's [CLS] (open_flamingo), "full" keeps
            every token (Idefics).
        perceiver: a dict of :class:`PerceiverResampler` arguments (``PERCEIVER_DEFAULTS``; its width is the
            vision width; ``num_time_embeds`` = open_flamingo's ``max_num_media``).
        use_resampler: False: no perceiver (``self.perceiver`` is None); the selected vision tokens of each image
            (all its frames' in order) are the media the gated blocks attend to (Idefics' ``use_resampler=False``).
        xattn: a dict of :class:`GatedCrossAttentionBlock` arguments (``XATTN_DEFAULTS``; ``media_mode``,
            ``variant``: "flamingo" by default).
        max_num_frames: learned per-frame embeddings added to the visual features (open_flamingo's
            ``frame_embs``); None: none (open_flamingo's default).
        backend: forwarded to every module ("auto" | "triton" | "reference").
    """

    def __init__(self, vision, language_model, *, media_token_id, eoc_token_id, cross_attn_every_n_layers=1,
                 perceiver=None, xattn=None, max_num_frames=None, cross_attn_position="last",
                 vision_feature_select_strategy="default", use_resampler=True, backend="auto"):
        super().__init__()
        self.vision = ViT(**{"backend": backend, **vision}) if isinstance(vision, dict) else vision
        if not isinstance(self.vision, ViT):
            raise ValueError(f"{_OP}: vision must be a ViT or a dict of its arguments, got {type(vision).__name__}")
        lm = language_model
        self.language_model = DecoderLM(**{"backend": backend, **lm}) if isinstance(lm, dict) else lm
        if not isinstance(self.language_model, DecoderLM):
            raise ValueError(f"{_OP}: language_model must be a DecoderLM or a dict of its arguments, got "
                             f"{type(language_model).__name__}")
        vocab, depth = self.language_model.vocab_size, len(self.language_model.layers)
        if media_token_id is not None:
            check_int(_OP, "media_token_id", media_token_id, lo=0, hi=vocab - 1)
        check_int(_OP, "eoc_token_id", eoc_token_id, lo=0, hi=vocab - 1)
        check_int(_OP, "cross_attn_every_n_layers", cross_attn_every_n_layers, lo=1, hi=depth)
        check_choice(_OP, "cross_attn_position", cross_attn_position, POSITIONS)
        check_choice(_OP, "vision_feature_select_strategy", vision_feature_select_strategy, STRATEGIES)
        check_bool(_OP, "use_resampler", use_resampler)
        for name, value in (("perceiver", perceiver), ("xattn", xattn)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{_OP}: {name} must be a dict of arguments or None, got {type(value).__name__}")
        if perceiver is not None and not use_resampler:
            raise ValueError(f"{_OP}: perceiver arguments given with use_resampler=False (no perceiver)")
        self.media_token_id, self.eoc_token_id = media_token_id, eoc_token_id
        self.cross_attn_every_n_layers = cross_attn_every_n_layers
        self.vision_feature_select_strategy = vision_feature_select_strategy
        vis_dim, lang_dim = self.vision.embed_dim, self.language_model.hidden_size
        self.perceiver = None
        if use_resampler:
            perceiver = {"backend": backend, **PERCEIVER_DEFAULTS, **(perceiver or {})}
            self.perceiver = PerceiverResampler(vis_dim, **perceiver)
        xattn = {"backend": backend, "variant": "flamingo", **XATTN_DEFAULTS, **(xattn or {})}
        shift = 1 if cross_attn_position == "last" else 0
        # keyed by the LM layer they precede (open_flamingo's list holds None at the other layers)
        self.gated_cross_attn_layers = nn.ModuleDict({
            str(i): GatedCrossAttentionBlock(lang_dim, dim_media=vis_dim, **xattn)
            for i in range(depth) if (i + shift) % cross_attn_every_n_layers == 0})
        self.frame_embs = None
        if max_num_frames is not None:
            check_int(_OP, "max_num_frames", max_num_frames, lo=1)
            self.frame_embs = nn.Parameter(torch.randn(max_num_frames, vis_dim))
        self.set_stage("bridge")

    @classmethod
    def from_preset(cls, name, **overrides):
        """A model of a named shape (``PRESETS``), random weights; `overrides` replace constructor arguments
        (``backend=``). Build under ``torch.device("meta")`` for a parameter count without memory."""
        return build_preset(cls, PRESETS, name, overrides)

    # ---- training ----------------------------------------------------------------------------------------
    def set_stage(self, stage="bridge"):
        """Which parameters train: "bridge" (Flamingo: perceiver, frame embeddings and the gated blocks; the
        vision encoder and the LM frozen), "bridge+embeddings" (open_flamingo's default: also the LM's input
        embeddings, for the new ``<image>`` / ``<|endofchunk|>`` rows) or "all". Frozen parameters get
        requires_grad=False (no gradient, untouched by an optimiser). Returns self."""
        check_choice(_OP, "stage", stage, STAGES)
        self.requires_grad_(stage == "all")
        for module in (self.perceiver, self.gated_cross_attn_layers):
            if module is not None:
                module.requires_grad_(True)
        if self.frame_embs is not None:
            self.frame_embs.requires_grad_(True)
        if stage == "bridge+embeddings":
            self.language_model.embed_tokens.requires_grad_(True)
        self.stage = stage
        return self

    def synthetic_batch(self, n, generator=None, *, length=16, images=2):
        """A random interleaved training batch for smoke runs and benchmarks: rows of `images` chunks
        ``<image> text… <|endofchunk|>`` (random text lengths, right padding with the LM's pad id or 0), as
        open_flamingo's MMC4 batches. Returns (vision_x (n, images, 1, C, H, W), input_ids, attention_mask,
        labels) with labels -100 at padding and ``<image>`` tokens (open_flamingo's training rule)."""
        check_int(_OP, "n", n, lo=1)
        check_int(_OP, "images", images, lo=1)
        check_int(_OP, "length", length, lo=3 * images)
        self._need_media_token("synthetic_batch")
        vocab, v = self.language_model.vocab_size, self.vision
        special = {self.media_token_id, self.eoc_token_id, self.language_model.pad_token_id,
                   self.language_model.bos_token_id, self.language_model.eos_token_id}
        allowed = torch.tensor([t for t in range(vocab) if t not in special])
        pad = self.language_model.pad_token_id or 0
        ids = torch.full((n, length), pad, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        per_chunk = length // images
        for r in range(n):
            row = []
            for _ in range(images):
                k = int(torch.randint(1, per_chunk - 1, (1,), generator=generator))
                text = allowed[torch.randint(0, len(allowed), (k,), generator=generator)].tolist()
                row += [self.media_token_id, *text, self.eoc_token_id]
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        labels = ids.masked_fill((mask == 0) | (ids == self.media_token_id), -100)
        pixels = torch.randn(n, images, 1, v.patch_embed.proj.in_channels, v.img_size, v.img_size, generator=generator)
        return pixels, ids, mask, labels

    # ---- forward -----------------------------------------------------------------------------------------
    def encode_vision(self, vision_x, *, interpolate_pos_encoding=None):
        """(B, T_img, F, C, H, W) images → media (B, T_img, latents, vision width): the encoder's tokens (no
        gradient while it is frozen, as open_flamingo; `interpolate_pos_encoding`: images of another size, the
        position table resampled) through :meth:`resample`."""
        if not isinstance(vision_x, torch.Tensor) or vision_x.dim() != 6:
            raise ValueError(f"{_OP}: vision_x must be a (B, T_img, F, C, H, W) tensor, got "
                             f"{getattr(vision_x, 'shape', type(vision_x).__name__)}")
        B, T, Fr = vision_x.shape[:3]
        if Fr > 1 and (self.frame_embs is None or Fr > self.frame_embs.shape[0]):
            raise ValueError(f"{_OP}: vision_x has {Fr} frames; that needs max_num_frames >= {Fr}")
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            tokens = self.vision(vision_x.flatten(0, 2), interpolate_pos_encoding=interpolate_pos_encoding)
        tokens = tokens.last_hidden_state
        return self.resample(tokens.reshape(B, T, Fr, tokens.shape[1], tokens.shape[2]))

    def resample(self, tokens):
        """The vision encoder's output tokens (B, T_img, F, S, vision width) → media (B, T_img, latents, vision
        width): the selected tokens ([CLS] dropped under "default"), + frame embeddings, frames flattened,
        through the perceiver (with use_resampler=False: the flattened tokens themselves)."""
        if self.vision_feature_select_strategy == "default":
            tokens = tokens[:, :, :, self.vision.num_prefix_tokens:]
        if self.frame_embs is not None:
            tokens = tokens + self.frame_embs[:tokens.shape[2], None].to(tokens.dtype)
        tokens = tokens.flatten(2, 3)
        return tokens if self.perceiver is None else self.perceiver(tokens)

    def _media(self, batch, vision_x, media, image_encoder_embeddings, perceiver_embeddings, interpolate_pos_encoding):
        """The media (B, T_img, latents, vision width) from exactly one of the image inputs (HF Idefics' three
        or ours: `media` is the output of :meth:`encode_vision`)."""
        given = [name for name, value in (("vision_x / pixel_values", vision_x), ("media", media),
                                          ("image_encoder_embeddings", image_encoder_embeddings),
                                          ("perceiver_embeddings", perceiver_embeddings)) if value is not None]
        if len(given) != 1:
            raise ValueError(f"{_OP}: give exactly one of vision_x / pixel_values, image_encoder_embeddings, "
                             f"perceiver_embeddings and media, got {' and '.join(given) or 'none'}")
        if interpolate_pos_encoding is not None:
            check_bool(_OP, "interpolate_pos_encoding", interpolate_pos_encoding)
        if interpolate_pos_encoding and vision_x is None:
            raise ValueError(f"{_OP}: interpolate_pos_encoding resamples the vision encoder's positions; it needs "
                             f"pixel_values / vision_x, not {given[0]}")
        if vision_x is not None:
            media = self.encode_vision(vision_x, interpolate_pos_encoding=interpolate_pos_encoding)
        elif image_encoder_embeddings is not None:
            media = self.resample(_per_image("image_encoder_embeddings", image_encoder_embeddings, batch,
                                             self.vision.embed_dim)[:, :, None])
        elif perceiver_embeddings is not None:
            if self.perceiver is None:
                raise ValueError(f"{_OP}: perceiver_embeddings given but this model has no perceiver "
                                 "(use_resampler=False; HF refuses it too)")
            media = _per_image("perceiver_embeddings", perceiver_embeddings, batch, self.vision.embed_dim,
                               self.perceiver.latents.shape[0])
        if not isinstance(media, torch.Tensor) or media.dim() != 4 or media.shape[0] != batch:
            raise ValueError(f"{_OP}: media must be a (B={batch}, T_img, latents, D) tensor, got "
                             f"{getattr(media, 'shape', type(media).__name__)}")
        return media

    def _need_media_token(self, what):
        if self.media_token_id is None:
            raise ValueError(f"{_OP}.{what}: this model has no <image> token id (media_token_id=None); pass "
                             "image_attention_mask")

    def media_intervals(self, input_ids, num_media, num_latents, image_attention_mask=None):
        """Each token's cross-attention keys [kv_start, kv_end) over the T_img·latents media tokens, int32
        (B, L): the most recent ``<image>`` at or before it (empty before the first), or, given
        `image_attention_mask` (B, L, T_img) (Idefics: nonzero where a token sees an image), the images it
        marks, which must be consecutive for each token."""
        if image_attention_mask is not None:
            B, L = input_ids.shape
            if not isinstance(image_attention_mask, torch.Tensor) or \
                    tuple(image_attention_mask.shape) != (B, L, num_media):
                raise ValueError(f"{_OP}: image_attention_mask must have shape (B, L, T_img) = {(B, L, num_media)}, "
                                 f"got {getattr(image_attention_mask, 'shape', type(image_attention_mask).__name__)}")
            try:
                start, end = intervals_from_dense(image_attention_mask.bool())
            except ValueError as e:
                raise ValueError(f"{_OP}: image_attention_mask: a token's images must be consecutive ({e})") from None
            return start * num_latents, end * num_latents
        self._need_media_token("media_intervals")
        counts = (input_ids == self.media_token_id).sum(1)
        if bool((counts > num_media).any()):
            raise ValueError(f"{_OP}: a row holds {int(counts.max())} <image> tokens (id {self.media_token_id}) but "
                             f"vision_x has {num_media} images per row")
        mode = next(iter(self.gated_cross_attn_layers.values())).media_mode
        return media_intervals(input_ids, self.media_token_id, num_latents, mode=mode)

    def _hook(self, media, intervals):
        """The LM's layer_hook: the gated block before each conditioned layer, its rows seeing the keys
        `intervals` = (kv_start, kv_end) give (a decoding step's: those of the prompt's last row, open_flamingo's
        use_cached_media)."""
        blocks = self.gated_cross_attn_layers
        start, end = intervals

        def hook(i, x):
            block = blocks[str(i)] if str(i) in blocks else None
            if block is None:
                return x
            return block(x, media, kv_start=start, kv_end=end)

        return hook

    def _inputs(self, vision_x, lang_x, input_ids, pixel_values, attention_mask):
        """(token ids, vision_x) from open_flamingo's or Hugging Face Idefics' keywords."""
        if (lang_x is None) == (input_ids is None):
            raise ValueError(f"{_OP}: give exactly one of lang_x and input_ids")
        ids = lang_x if lang_x is not None else input_ids
        check_ids(_OP, ids, attention_mask, "lang_x / input_ids")
        if vision_x is not None and pixel_values is not None:
            raise ValueError(f"{_OP}: give vision_x (B, T_img, F, C, H, W) or pixel_values (B, T_img, C, H, W), "
                             "not both")
        if pixel_values is not None:
            if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
                raise ValueError(f"{_OP}: pixel_values must be a (B, T_img, C, H, W) tensor, got "
                                 f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}")
            vision_x = pixel_values[:, :, None]
        return ids, vision_x

    def forward(self, vision_x=None, lang_x=None, attention_mask=None, labels=None, *, input_ids=None,
                position_ids=None, media=None, pixel_values=None, image_attention_mask=None,
                image_encoder_embeddings=None, perceiver_embeddings=None, interpolate_pos_encoding=False):
        """open_flamingo's forward: vision_x (B, T_img, F, C, H, W) (or precomputed `media` (B, T_img,
        latents, vision width) from :meth:`encode_vision`), lang_x (alias input_ids) (B, L) with one
        ``<image>`` per image, attention_mask (B, L) 1 keep / 0 pad (left or right), labels (B, L) shifted
        next-token cross-entropy, -100 ignored. position_ids default to the count of real tokens (HF's
        generate; pass the column index to reproduce open_flamingo's plain forward on left-padded rows).
        Hugging Face Idefics' keywords: pixel_values (B, T_img, C, H, W) for vision_x, image_attention_mask
        (B, L, T_img) for the ``<image>`` rule (see :meth:`media_intervals`), and in place of the images
        image_encoder_embeddings (the vision encoder's last_hidden_state, (B, T_img, S, D) or HF's
        (B·T_img, S, D)) or perceiver_embeddings (the perceiver's output, HF's (B·T_img, latents, D) or
        (B, T_img, latents, D)); interpolate_pos_encoding: pixel_values of another size. Exactly one image
        input. Returns :class:`FlamingoOutput`."""
        ids, vision_x = self._inputs(vision_x, lang_x, input_ids, pixel_values, attention_mask)
        media = self._media(ids.shape[0], vision_x, media, image_encoder_embeddings, perceiver_embeddings,
                            interpolate_pos_encoding)
        intervals = self.media_intervals(ids, media.shape[1], media.shape[2], image_attention_mask)
        out = self.language_model(ids, attention_mask, position_ids=position_ids, labels=labels,
                                  layer_hook=self._hook(media, intervals))
        return FlamingoOutput(loss=out.loss, logits=out.logits, media=media)

    @torch.no_grad()
    def generate(self, vision_x=None, lang_x=None, attention_mask=None, *, input_ids=None, pixel_values=None,
                 image_attention_mask=None, media=None, image_encoder_embeddings=None, perceiver_embeddings=None,
                 interpolate_pos_encoding=False, **kwargs):
        """open_flamingo's ``generate``: the images encoded once, the prompt conditioned on them, then every
        new token attends to the last image of its row; HF's arguments through :meth:`DecoderLM.generate`
        (greedy, beam search, sampling); `eos_token_id` defaults to ``<|endofchunk|>``. Returns the prompt
        followed by the new tokens (B, L + new). A generated ``<image>`` id is text here (it brings no image;
        open_flamingo would re-condition its blocks on that one token and point it at the first image).
        Idefics' keywords and the image inputs as in :meth:`forward`; a new token sees the images of the prompt's
        last token (HF repeats the last row of image_attention_mask). perceiver_embeddings work here as in
        the forward (HF's generate raises on them: its second step passes them twice)."""
        lang_x, vision_x = self._inputs(vision_x, lang_x, input_ids, pixel_values, attention_mask)
        media = self._media(lang_x.shape[0], vision_x, media, image_encoder_embeddings, perceiver_embeddings,
                            interpolate_pos_encoding)
        beams = kwargs.get("num_beams", 1)
        check_int(f"{_OP}.generate", "num_beams", beams, lo=1)
        ids = lang_x.repeat_interleave(beams, 0)
        media = media.repeat_interleave(beams, 0)
        if image_attention_mask is not None:
            image_attention_mask = image_attention_mask.repeat_interleave(beams, 0)
        intervals = self.media_intervals(ids, media.shape[1], media.shape[2], image_attention_mask)
        # a new token sees what one more text token after the prompt would: the last column's keys
        step = tuple(t[:, -1:] for t in intervals)
        kwargs.setdefault("eos_token_id", self.eoc_token_id)
        return self.language_model.generate(lang_x, attention_mask, layer_hook=self._hook(media, intervals),
                                            step_layer_hook=self._hook(media, step), **kwargs)

    # ---- prompting ---------------------------------------------------------------------------------------
    def few_shot_prompt(self, examples, query_image, query_text=(), *, tokenize=None, bos_token_id=None):
        """open_flamingo's few-shot format: ``<image>{text}<|endofchunk|>`` per (image, text) example, then
        ``<image>{query_text}`` for the query, the images in order. Texts are lists of token ids, or strings
        with `tokenize(str) -> list of ids` (no special tokens); `bos_token_id` (default the LM's, if any)
        starts the prompt. Returns (vision_x (1, shots + 1, 1, C, H, W), lang_x (1, L), attention_mask
        (1, L), media_locations (1, L) bool: the ``<image>`` positions); the first three are :meth:`generate`'s
        arguments."""
        self._need_media_token("few_shot_prompt")
        if not isinstance(examples, (list, tuple)):
            raise ValueError(f"{_OP}.few_shot_prompt: examples must be a list of (image, text) pairs, got "
                             f"{type(examples).__name__}")

        def ids_of(text):
            if isinstance(text, str):
                if tokenize is None:
                    raise ValueError(f"{_OP}.few_shot_prompt: a string text needs tokenize=")
                text = tokenize(text)
            text = [int(t) for t in text]
            if self.media_token_id in text:
                raise ValueError(f"{_OP}.few_shot_prompt: a text holds the <image> id {self.media_token_id}")
            return text

        bos = self.language_model.bos_token_id if bos_token_id is None else bos_token_id
        ids, images = [] if bos is None else [bos], []
        for pair in examples:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"{_OP}.few_shot_prompt: each example must be an (image, text) pair")
            image, text = pair
            ids += [self.media_token_id, *ids_of(text), self.eoc_token_id]
            images.append(image)
        ids += [self.media_token_id, *ids_of(query_text)]
        images.append(query_image)
        for image in images:
            if not isinstance(image, torch.Tensor) or image.dim() != 3:
                raise ValueError(f"{_OP}.few_shot_prompt: images must be (C, H, W) tensors, got "
                                 f"{getattr(image, 'shape', type(image).__name__)}")
        lang_x = torch.tensor([ids], dtype=torch.long, device=images[0].device)
        return torch.stack(images)[None, :, None], lang_x, torch.ones_like(lang_x), lang_x == self.media_token_id

    # ---- conversion --------------------------------------------------------------------------------------
    @classmethod
    def from_open_flamingo(cls, of_model, *, backend="auto"):
        """From a loaded open_flamingo ``Flamingo`` (weights copied): its open_clip ``vision_encoder``
        (a ViT: ``output_tokens``' patch tokens), ``perceiver``, ``lang_encoder`` (a Hugging Face LM
        :meth:`DecoderLM.from_hf` converts: Llama or pre-norm OPT) with its ``gated_cross_attn_layers``,
        ``media_token_id``, ``eoc_token_id`` and the cross-attention period. open_flamingo's
        ``only_attend_immediate_media=False`` is refused: its rows before the first image attend uniformly
        to every image there, which our empty intervals do not reproduce."""
        lang = getattr(of_model, "lang_encoder", None)
        if lang is None or not hasattr(lang, "gated_cross_attn_layers") or not hasattr(of_model, "perceiver"):
            raise ValueError(f"{_OP}.from_open_flamingo expects an open_flamingo Flamingo, got "
                             f"{type(of_model).__name__}")
        vision, vision_pairs = _vision_from_open_clip(of_model.vision_encoder, backend)
        # DecoderLM.from_hf reads the plain decoder layers: put them back in place of the FlamingoLayers
        wrapped = lang._get_decoder_layers()
        lang._set_decoder_layers(lang.old_decoder_blocks)
        try:
            lm = DecoderLM.from_hf(lang, backend=backend)
        finally:
            lang._set_decoder_layers(wrapped)
        blocks = [(i, b) for i, b in enumerate(lang.gated_cross_attn_layers) if b is not None]
        every = blocks[0][0] + 1 if blocks else 0
        if not blocks or [i for i, _ in blocks] != [i for i in range(len(wrapped)) if (i + 1) % every == 0]:
            raise ValueError(f"{_OP}.from_open_flamingo: gated blocks at layers {[i for i, _ in blocks]} are not "
                             "every n-th layer")
        xa = blocks[0][1].attn
        if not xa.only_attend_immediate_media:
            raise ValueError(f"{_OP}.from_open_flamingo: only_attend_immediate_media=False is not supported")
        p = of_model.perceiver
        pa, pff = p.layers[0][0], p.layers[0][1]
        perceiver = dict(depth=len(p.layers), heads=pa.heads, dim_head=pa.to_q.out_features // pa.heads,
                         num_latents=p.latents.shape[0], ff_mult=pff[1].out_features / p.latents.shape[1],
                         num_time_embeds=None if p.media_time_embs is None else p.media_time_embs.shape[0])
        xattn = dict(heads=xa.heads, dim_head=xa.to_q.out_features // xa.heads,
                     hidden=blocks[0][1].ff[1].out_features)
        w = vision.patch_embed.proj.weight
        model = cls(vision, lm, media_token_id=of_model.media_token_id, eoc_token_id=of_model.eoc_token_id,
                    cross_attn_every_n_layers=every, perceiver=perceiver, xattn=xattn,
                    max_num_frames=None if p.frame_embs is None else p.frame_embs.shape[0], backend=backend)
        model.perceiver.to(device=w.device, dtype=p.latents.dtype)
        model.gated_cross_attn_layers.to(device=w.device, dtype=xa.to_q.weight.dtype)
        pairs = vision_pairs + _perceiver_pairs(model.perceiver, p)
        if p.frame_embs is not None:
            model.frame_embs.data = model.frame_embs.data.to(p.frame_embs)
            pairs.append(("perceiver.frame_embs", model.frame_embs, p.frame_embs))
        for i, theirs in blocks:
            pairs += _xattn_pairs(f"gated_cross_attn_layers.{i}", model.gated_cross_attn_layers[str(i)], theirs)
        copy_weights(pairs, f"{_OP}.from_open_flamingo")
        return model.set_stage("bridge")

    @classmethod
    def from_hf(cls, hf_model, *, media_token_id=None, backend="auto"):
        """From a transformers ``IdeficsForVisionText2Text`` (Idefics v1; weights copied, no download): its
        CLIP-like vision tower (every output token, [CLS] included, not normed; positions resampled as Idefics
        does, ``pos_resample="hf_legacy"``), ``perceiver_resampler`` (ReLU FFN, q/k LayerNorms when
        ``qk_layer_norms_perceiver``; none with ``use_resampler=False``, transformers' default: the vision
        tokens go straight to the cross-attention), Llama-style text layers with a ``GatedCrossAttentionLayer``
        before every ``cross_layer_interval``-th one (from layer 0), the decoupled embeddings / head as tables
        of vocab + additional rows. Forward and generate then take HF's keywords (pixel_values,
        image_attention_mask, image_encoder_embeddings, perceiver_embeddings, interpolate_pos_encoding).
        `media_token_id`: the tokenizer's ``<image>`` id (not in Idefics' config), needed only where
        image_attention_mask is not given."""
        if type(hf_model).__name__ != "IdeficsForVisionText2Text":
            raise ValueError(f"{_OP}.from_hf expects a transformers IdeficsForVisionText2Text, got "
                             f"{type(hf_model).__name__}")
        c, body = hf_model.config, hf_model.model
        if c.num_hidden_layers % c.cross_layer_interval:
            raise ValueError(f"{_OP}.from_hf: num_hidden_layers ({c.num_hidden_layers}) is not a multiple of "
                             f"cross_layer_interval ({c.cross_layer_interval}) (transformers' Idefics fails on it too)")
        vision = ViT.from_hf(body.vision_model, backend=backend)
        # Idefics' interpolate_pos_encoding is the older HF form (scale_factor (g + 0.1) / g0), not ViT's
        vision.patch_embed.pos_resample = "hf_legacy"
        lm = _idefics_lm(hf_model, backend)
        pc, blocks = c.perceiver_config, body.gated_cross_attn_layers
        perceiver = dict(depth=pc.resampler_depth, heads=pc.resampler_n_heads, dim_head=pc.resampler_head_dim,
                         num_latents=pc.resampler_n_latents, ff_mult=4, act="relu",
                         qk_norm=pc.qk_layer_norms_perceiver) if c.use_resampler else None
        xattn = dict(variant="idefics", heads=c.num_attention_heads, dim_head=c.hidden_size // c.num_attention_heads,
                     hidden=c.intermediate_size, gate="vector" if c.alpha_type == "vector" else "scalar",
                     qk_norm=c.qk_layer_norms, eps=c.rms_norm_eps)
        eos = lm.eos_token_id
        model = cls(vision, lm, media_token_id=media_token_id, eoc_token_id=eos if isinstance(eos, int) else eos[0],
                    cross_attn_every_n_layers=c.cross_layer_interval, cross_attn_position="first",
                    vision_feature_select_strategy="full", perceiver=perceiver, use_resampler=c.use_resampler,
                    xattn=xattn, backend=backend)
        alpha, pairs = blocks[0].alpha_dense, []
        model.gated_cross_attn_layers.to(device=alpha.device, dtype=alpha.dtype)
        if c.use_resampler:
            p = body.perceiver_resampler
            model.perceiver.to(device=p.latents.device, dtype=p.latents.dtype)
            pairs = _idefics_perceiver_pairs(model.perceiver, p)
        for i, ours in model.gated_cross_attn_layers.items():
            k = int(i) // c.cross_layer_interval
            layer = blocks[k]
            pairs += gated_xattn_pairs(f"gated_cross_attn_layers.{k}", ours, layer, ("alpha_cross_attn", "alpha_dense"),
                                       ("q_layer_norm", "k_layer_norm") if layer.cross_attn.qk_layer_norms else None)
        copy_weights(pairs, f"{_OP}.from_hf")
        return model.set_stage("bridge")


def _per_image(name, x, batch, width, tokens=None):
    """HF Idefics' per-image tensors, (B·T_img, S, D) (its layout: the rows of pixel_values.flatten(0, 1)) or
    (B, T_img, S, D) → (B, T_img, S, D); `tokens`: the S required."""
    ok = isinstance(x, torch.Tensor) and x.dim() in (3, 4) and x.shape[-1] == width and \
        (x.shape[0] == batch if x.dim() == 4 else x.shape[0] % batch == 0) and tokens in (None, x.shape[-2])
    if not ok:
        s = "S" if tokens is None else tokens
        raise ValueError(f"{_OP}: {name} must be a (B·T_img, {s}, {width}) or (B={batch}, T_img, {s}, {width}) "
                         f"tensor, got {getattr(x, 'shape', type(x).__name__)}")
    return x if x.dim() == 4 else x.reshape(batch, x.shape[0] // batch, *x.shape[1:])


def _vision_from_open_clip(v, backend):
    """A :class:`ViT` for an open_clip ``VisionTransformer`` whose tokens are normed by ln_post ([CLS]
    pooling, no attention pool), and its (name, ours, theirs) weight pairs; ``proj`` is left out (open_flamingo
    never projects the tokens)."""
    import open_clip

    from .clip import _OPEN_CLIP_LAYER

    if not isinstance(v, open_clip.transformer.VisionTransformer) or getattr(v, "attn_pool", None) is not None \
            or v.final_ln_after_pool:
        raise ValueError(f"{_OP}.from_open_flamingo: the vision encoder must be an open_clip VisionTransformer "
                         f"with ln_post before pooling and no attention pool, got {type(v).__name__}")
    blocks = v.transformer.resblocks
    blk = blocks[0]
    if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
        raise ValueError(f"{_OP}.from_open_flamingo: layer scale in the vision encoder is not supported")
    act = "quick_gelu" if isinstance(blk.mlp.gelu, open_clip.transformer.QuickGELU) else "gelu"
    vit = ViT(v.image_size[0], v.patch_size[0], v.conv1.in_channels, v.conv1.out_channels, len(blocks),
              blk.attn.num_heads, mlp_dim=blk.mlp.c_fc.out_features, act=act, norm_eps=blk.ln_1.eps,
              patch_bias=v.conv1.bias is not None, pre_norm=isinstance(v.ln_pre, nn.LayerNorm), final_norm="all",
              global_pool="none", backend=backend).to(device=v.conv1.weight.device, dtype=v.conv1.weight.dtype)
    pairs = [("conv1.weight", vit.patch_embed.proj.weight, v.conv1.weight),
             ("conv1.bias", vit.patch_embed.proj.bias, v.conv1.bias),
             ("class_embedding", vit.patch_embed.cls_token, v.class_embedding),
             ("positional_embedding", vit.patch_embed.pos_embed, v.positional_embedding),
             *module_pairs("ln_post", vit.norm, v.ln_post)]
    if vit.norm_pre is not None:
        pairs += module_pairs("ln_pre", vit.norm_pre, v.ln_pre)
    return vit, pairs + layer_pairs(vit.encoder, blocks, _OPEN_CLIP_LAYER)


def _norm_pairs(prefix, weight, bias, ln):
    return [(f"{prefix}.weight", weight, ln.weight), (f"{prefix}.bias", bias, ln.bias)]


def _perceiver_pairs(ours, p):
    """open_flamingo helpers.PerceiverResampler → mmfast.nn.PerceiverResampler."""
    pairs = [("perceiver.latents", ours.latents, p.latents),
             ("perceiver.media_time_embs", ours.time_pos_emb, p.media_time_embs),
             *_norm_pairs("perceiver.norm", ours.norm_weight, ours.norm_bias, p.norm)]
    for i, ((attn, ff), mine) in enumerate(zip(p.layers, ours.layers)):
        q = f"perceiver.layers.{i}"
        pairs += [*_norm_pairs(f"{q}.0.norm_media", mine.norm_media_weight, mine.norm_media_bias, attn.norm_media),
                  *_norm_pairs(f"{q}.0.norm_latents", mine.norm_latents_weight, mine.norm_latents_bias,
                               attn.norm_latents),
                  (f"{q}.0.to_q", mine.wq, attn.to_q.weight), (f"{q}.0.to_kv", mine.wkv, attn.to_kv.weight),
                  (f"{q}.0.to_out", mine.wo, attn.to_out.weight),
                  *_norm_pairs(f"{q}.1.0", mine.norm_ff_weight, mine.norm_ff_bias, ff[0]),
                  (f"{q}.1.1", mine.w1, ff[1].weight), (f"{q}.1.3", mine.w2, ff[3].weight)]
    return pairs


def _xattn_pairs(prefix, ours, theirs):
    """open_flamingo helpers.GatedCrossAttentionBlock → mmfast.nn.GatedCrossAttentionBlock."""
    a, ff = theirs.attn, theirs.ff
    return [*_norm_pairs(f"{prefix}.attn.norm", ours.norm_attn_weight, ours.norm_attn_bias, a.norm),
            (f"{prefix}.attn.to_q", ours.wq, a.to_q.weight), (f"{prefix}.attn.to_kv", ours.wkv, a.to_kv.weight),
            (f"{prefix}.attn.to_out", ours.wo, a.to_out.weight),
            (f"{prefix}.attn_gate", ours.attn_gate, theirs.attn_gate),
            *_norm_pairs(f"{prefix}.ff.0", ours.norm_ff_weight, ours.norm_ff_bias, ff[0]),
            (f"{prefix}.ff.1", ours.w_in, ff[1].weight), (f"{prefix}.ff.3", ours.w_out, ff[3].weight),
            (f"{prefix}.ff_gate", ours.ff_gate, theirs.ff_gate)]


def _idefics_lm(hf_model, backend):
    """A :class:`DecoderLM` of Idefics' text layers: Llama's modules under Llama's names (no GQA, no biases:
    fields its config lacks), the embeddings / head with the additional rows appended."""
    from types import SimpleNamespace

    from mmfast.hf_compat import hf_rope_parameters
    from mmfast.nn.decoder import _llama_pairs, hf_eos_token_id

    c, body, head = hf_model.config, hf_model.model, hf_model.lm_head
    extra = c.additional_vocab_size
    llama = SimpleNamespace(**{k: getattr(c, k) for k in (
        "hidden_act", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "rms_norm_eps",
        "pad_token_id", "bos_token_id")}, rope_parameters=hf_rope_parameters(c), vocab_size=c.vocab_size + extra,
        eos_token_id=hf_eos_token_id(hf_model), num_key_value_heads=c.num_attention_heads, attention_bias=False,
        mlp_bias=False)
    kwargs, pairs_of = _llama_pairs(llama)
    tied = head.weight is body.embed_tokens.weight
    w = head.weight
    lm = DecoderLM(**kwargs, tie_word_embeddings=tied, backend=backend, device=w.device, dtype=w.dtype)
    emb = body.embed_tokens.weight
    if extra:
        emb = torch.cat([emb, body.embed_tokens.additional_embedding.weight])
        w = torch.cat([w, head.additional_fc.weight])
    pairs = [(n, ours, emb if n == "embed_tokens.weight" else theirs) for n, ours, theirs in pairs_of(lm, body)]
    if not tied:
        pairs.append(("lm_head.weight", lm.lm_head.weight, w))
    copy_weights(pairs, f"{_OP}.from_hf")
    return lm


def _idefics_perceiver_pairs(ours, p):
    """transformers IdeficsPerceiverResampler → mmfast.nn.PerceiverResampler (k / v projections fused)."""
    pairs = [("perceiver_resampler.latents", ours.latents, p.latents),
             *_norm_pairs("perceiver_resampler.layer_norm", ours.norm_weight, ours.norm_bias, p.layer_norm)]
    for i, ((attn, ff), mine) in enumerate(zip(p.blocks, ours.layers)):
        q = f"perceiver_resampler.blocks.{i}"
        pairs += [*_norm_pairs(f"{q}.0.context_layer_norm", mine.norm_media_weight, mine.norm_media_bias,
                               attn.context_layer_norm),
                  *_norm_pairs(f"{q}.0.latents_layer_norm", mine.norm_latents_weight, mine.norm_latents_bias,
                               attn.latents_layer_norm),
                  (f"{q}.0.q_proj", mine.wq, attn.q_proj.weight),
                  (f"{q}.0.k_proj+v_proj", mine.wkv, torch.cat([attn.k_proj.weight, attn.v_proj.weight])),
                  (f"{q}.0.output_proj", mine.wo, attn.output_proj.weight),
                  *_norm_pairs(f"{q}.1.ln", mine.norm_ff_weight, mine.norm_ff_bias, ff.ln),
                  (f"{q}.1.fc", mine.w1, ff.fc.weight), (f"{q}.1.c_proj", mine.w2, ff.c_proj.weight)]
        if attn.qk_layer_norms:
            pairs += [*_norm_pairs(f"{q}.0.q_layer_norm", mine.q_norm_weight, mine.q_norm_bias, attn.q_layer_norm),
                      *_norm_pairs(f"{q}.0.k_layer_norm", mine.k_norm_weight, mine.k_norm_bias, attn.k_layer_norm)]
    return pairs


def _clip_vit(img, patch, width, depth, heads, act="quick_gelu"):
    # open_clip's CLIP ViT as open_flamingo uses it: bias-free patch conv, ln_pre, every token normed by ln_post
    return dict(img_size=img, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, act=act,
                norm_eps=1e-5, patch_bias=False, pre_norm=True, final_norm="all", global_pool="none")


def training_batch(model, n, generator):
    """A synthetic batch for the training entry point (``mmfast.training.tasks``): :meth:`Flamingo.synthetic_batch`
    as the forward's keyword arguments, labels included."""
    vision_x, ids, mask, labels = model.synthetic_batch(n, generator)
    return dict(vision_x=vision_x, lang_x=ids, attention_mask=mask, labels=labels)


# name -> constructor arguments; "tiny" for tests and smoke runs
PRESETS = {
    "tiny": dict(vision=_clip_vit(16, 4, 32, 1, 2), language_model=dict(_LM["tiny-llama"], pad_token_id=0,
                                                                       bos_token_id=1, eos_token_id=2),
                 media_token_id=95, eoc_token_id=96, cross_attn_every_n_layers=1,
                 perceiver=dict(depth=1, heads=2, dim_head=16, num_latents=4), xattn=dict(heads=2, dim_head=16)),
    # OpenFlamingo-9B (v1, openflamingo/OpenFlamingo-9B-deprecated): OpenAI CLIP ViT-L/14 + LLaMA-7B, a gated
    # block every 4th layer; the tokenizer gains <|endofchunk|> (32000), <image> (32001) and <PAD> (32002)
    "openflamingo-9b-llama": dict(vision=_clip_vit(224, 14, 1024, 24, 16),
                                  language_model=dict(_LM["vicuna-7b"], vocab_size=32003, pad_token_id=32002),
                                  media_token_id=32001, eoc_token_id=32000, cross_attn_every_n_layers=4),
}

__all__ = ["Flamingo", "FlamingoOutput", "PRESETS", "training_batch"]
