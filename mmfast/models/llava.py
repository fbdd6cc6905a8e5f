"""LLaVA / LLaVA-1.5 (Liu et al. 2023): a CLIP ViT's second-to-last layer features ([CLS] dropped) → a
linear (LLaVA) or Linear-GELU-Linear (1.5) projector → visual tokens written over the ``<image>``
placeholders of the prompt → a Llama / Vicuna decoder (``mmfast.nn.decoder.DecoderLM``).

Hugging Face's ``LlavaForConditionalGeneration`` (transformers 5) is the contract: the processor has
already expanded each ``<image>`` into one placeholder per visual token, and the features of all images,
in order, fill the placeholders of the batch in row-major order (``masked_scatter``)."""
import math

import torch
from torch import nn

from mmfast.hf_compat import hf_tower
from mmfast.kernels._common import check_choice, check_int
from mmfast.nn.decoder import PRESETS as _LM
from mmfast.nn.decoder import DecoderLM, hf_eos_token_id
from mmfast.nn.transformer import ACTIVATIONS, activation

from ._common import clip_vision_args, copy_weights, module_pairs
from .vit import ViT, hf_activation

_OP = "Llava"
STRATEGIES = ("default", "full")
PROJECTORS = ("linear", "mlp")


class Projector(nn.Module):
    """LLaVA-1.5's projector: fc1 (vision width → LM width) → activation → fc2 (LM width → LM width); HF's
    ``linear_1`` / ``linear_2``. (``mmfast.nn.Mlp`` returns to its input width, which this does not.)"""

    def __init__(self, in_dim, out_dim, *, act="gelu", bias=True):
        super().__init__()
        check_int("Projector", "in_dim", in_dim, lo=1)
        check_int("Projector", "out_dim", out_dim, lo=1)
        check_choice("Projector", "act", act, ACTIVATIONS)
        self.act = act
        self.fc1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.fc2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x):
        return self.fc2(activation(self.act, self.fc1(x)))


class Llava(nn.Module):
    """Vision tower + projector + language model.

    Args:
        vision: a :class:`ViT` (CLIP layout: [CLS], ``pre_norm``) or a dict of its arguments.
        projector: an nn.Module mapping (…, vision width) to (…, LM width), or "linear" (LLaVA) or "mlp"
            (LLaVA-1.5: :class:`Projector` fc1 → `projector_act` → fc2, both of the LM's width).
        language_model: a :class:`DecoderLM` or a dict of its arguments.
        image_token_index: the placeholder id whose embeddings the visual tokens replace.
        vision_feature_layer: index into the tower's hidden states (HF's tuple: embeddings first), or a list
            of them (their features concatenated on the channels, as HF); only the layers up to the deepest
            one requested run.
        vision_feature_select_strategy: "default" drops [CLS], "full" keeps it.
        projector_act, projector_bias: the built projector's activation (HF's ``projector_hidden_act``) and
            biases (``multimodal_projector_bias``).
    """

    def __init__(self, vision, projector, language_model, image_token_index, *, vision_feature_layer=-2,
                 vision_feature_select_strategy="default", projector_act="gelu", projector_bias=True):
        super().__init__()
        self.vision = ViT(**vision) if isinstance(vision, dict) else vision
        if not isinstance(self.vision, ViT):
            raise ValueError(f"{_OP}: vision must be a ViT or a dict of its arguments, got {type(vision).__name__}")
        self.language_model = DecoderLM(**language_model) if isinstance(language_model, dict) else language_model
        if not isinstance(self.language_model, DecoderLM):
            raise ValueError(f"{_OP}: language_model must be a DecoderLM or a dict of its arguments, got "
                             f"{type(language_model).__name__}")
        check_choice(_OP, "vision_feature_select_strategy", vision_feature_select_strategy, STRATEGIES)
        check_int(_OP, "image_token_index", image_token_index, lo=0, hi=self.language_model.vocab_size - 1)
        layers = vision_feature_layer if isinstance(vision_feature_layer, (list, tuple)) else [vision_feature_layer]
        depth = len(self.vision.encoder.layers)
        if not layers:
            raise ValueError(f"{_OP}: vision_feature_layer must name at least one layer")
        for layer in layers:
            check_int(_OP, "vision_feature_layer", layer, lo=-(depth + 1), hi=depth)
        self._feature_layers = [layer % (depth + 1) for layer in layers]
        in_dim, out_dim = self.vision.embed_dim * len(layers), self.language_model.hidden_size
        if isinstance(projector, str):
            check_choice(_OP, "projector", projector, PROJECTORS)
            projector = (nn.Linear(in_dim, out_dim, bias=projector_bias) if projector == "linear"
                         else Projector(in_dim, out_dim, act=projector_act, bias=projector_bias))
        if not isinstance(projector, nn.Module):
            raise ValueError(f"{_OP}: projector must be an nn.Module, 'linear' or 'mlp', got "
                             f"{type(projector).__name__}")
        self.projector = projector
        self.image_token_index = image_token_index
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    # ---- training presets --------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name, *, backend="auto"):
        """A model of ``PRESETS[name]`` (random weights), of the preset's class (Llava or LlavaNext), with
        `backend` passed to the tower and the language model (the papers' sizes too, as
        ``mmfast.models.create_model``)."""
        check_choice(f"{cls.__name__}.from_preset", "name", name, tuple(PRESETS))
        args = PRESETS[name]
        kind = LlavaNext if "image_grid_pinpoints" in args else Llava
        if not issubclass(kind, cls):
            raise ValueError(f"{cls.__name__}.from_preset: preset {name!r} builds a {kind.__name__}")
        return kind(**{**args, "vision": dict(args["vision"], backend=backend),
                       "language_model": dict(args["language_model"], backend=backend)})

    def set_stage(self, stage):
        """LLaVA's two training stages: 1 (feature alignment) trains only the projector; 2 (instruction
        tuning) the projector and the language model. The vision tower stays frozen in both."""
        check_choice(_OP, "stage", stage, (1, 2))
        self.vision.requires_grad_(False)
        self.projector.requires_grad_(True)
        self.language_model.requires_grad_(stage == 2)
        return self

    # ---- forward -----------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values):
        """(num_images, tokens, LM width): the selected hidden states of the tower, projected. Runs the
        tower's layers only up to the deepest selected one (LLaVA's layer −2 skips the last layer)."""
        v = self.vision
        x = v.embed(pixel_values)
        if v.norm_pre is not None:
            x = v.norm_pre(x)
        states = [x]
        for layer in v.encoder.layers[:max(self._feature_layers)]:
            x = layer(x)
            states.append(x)
        feats = [states[i] for i in self._feature_layers]
        if self.vision_feature_select_strategy == "default":
            feats = [f[:, v.num_prefix_tokens:] for f in feats]
        feats = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        return self.projector(feats)

    def _image_tokens(self, pixel_values, image_sizes):
        if image_sizes is not None:
            raise ValueError(f"{_OP}: image_sizes belongs to LlavaNext (AnyRes); Llava encodes whole images")
        return self.get_image_features(pixel_values).flatten(0, 1)

    def embed(self, input_ids, pixel_values=None, image_sizes=None):
        """Token embeddings with each image placeholder replaced by the next visual token (HF's
        ``get_placeholder_mask`` + ``masked_scatter``)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"{_OP}: input_ids must be a (B, L) tensor, got {getattr(input_ids, 'shape', input_ids)}")
        embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        features = self._image_tokens(pixel_values, image_sizes).to(embeds.dtype)
        mask = input_ids == self.image_token_index
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"{_OP}: image features and image tokens do not match: tokens {int(mask.sum())}, "
                             f"features {features.shape[0]}")
        return embeds.masked_scatter(mask[..., None], features)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, *, image_sizes=None,
                cache=None, use_cache=False, labels=None, logits_to_keep=0, output_hidden_states=False):
        """HF ``LlavaForConditionalGeneration``'s inputs: input_ids (B, L) with one `image_token_index` per
        visual token; pixel_values (num_images, 3, H, W); attention_mask (B, L) 1 keep / 0 pad (left or right
        padding); labels: the shifted next-token cross-entropy, -100 ignored. position_ids default to the
        count of real tokens (HF's generate; its plain forward uses the column index on left-padded rows).
        `image_sizes`: LlavaNext only. Returns ``mmfast.nn.decoder.DecoderLMOutput`` (loss, logits, cache,
        hidden_states)."""
        if cache is not None and cache.length and pixel_values is not None:
            raise ValueError(f"{_OP}: pixel_values go with the prompt, not with cached decoding steps")
        embeds = self.embed(input_ids, pixel_values, image_sizes)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep,
                                   output_hidden_states=output_hidden_states)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, *, image_sizes=None, **kwargs):
        """HF's ``generate`` (greedy, beam search, sampling: see ``DecoderLM.generate``) from a prompt whose
        image placeholders hold the visual tokens; returns the prompt ids followed by the new tokens, as HF."""
        embeds = self.embed(input_ids, pixel_values, image_sizes)
        return self.language_model.generate(input_ids, attention_mask, inputs_embeds=embeds, **kwargs)

    # ---- conversion --------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, *, backend="auto"):
        """From a transformers ``LlavaForConditionalGeneration`` (weights copied: the CLIP tower into a
        :class:`ViT`, the Llama body and ``lm_head`` into a :class:`DecoderLM`, the projector's
        ``linear_1`` / ``linear_2`` into a :class:`Projector`)."""
        parts, c = _hf_parts(hf_model, "LlavaForConditionalGeneration", backend)
        return cls(*parts, vision_feature_layer=c.vision_feature_layer,
                   vision_feature_select_strategy=c.vision_feature_select_strategy)


def _hf_parts(hf_model, expected, backend):
    """(vision, projector, language model, image token id) of a transformers LLaVA model, and its config."""
    if type(hf_model).__name__ != expected:
        raise ValueError(f"from_hf expects a transformers {expected}, got {type(hf_model).__name__}")
    c, body = hf_model.config, hf_model.model
    tower = hf_tower(body.vision_tower, "vision_model")
    if not hasattr(tower, "pre_layrnorm"):
        raise ValueError(f"from_hf: only a CLIP vision tower is supported, got {type(body.vision_tower).__name__}")
    vision = ViT.from_hf(tower, backend=backend)
    lm = DecoderLM.from_hf(body.language_model, lm_head=hf_model.lm_head, backend=backend)
    lm.eos_token_id = hf_eos_token_id(hf_model)  # the outer model's generation_config: what HF's generate stops on
    p = body.multi_modal_projector
    w = p.linear_1.weight
    projector = Projector(w.shape[1], w.shape[0], act=hf_activation(c.projector_hidden_act, "from_hf"),
                          bias=p.linear_1.bias is not None).to(device=w.device, dtype=w.dtype)
    copy_weights(module_pairs("linear_1", projector.fc1, p.linear_1)
                 + module_pairs("linear_2", projector.fc2, p.linear_2), f"{expected} projector")
    return (vision, projector, lm, c.image_token_id), c


def select_best_resolution(image_size, possible_resolutions):
    """The AnyRes canvas (height, width) for an image of `image_size` (height, width), as Hugging Face's
    image processor chooses it: the most image pixels kept after an aspect-preserving fit (never counting
    upscaling), ties broken by the least wasted canvas; the first such in list order."""
    height, width = (int(v) for v in image_size)
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in possible_resolutions:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def anyres_tiles(image, grid_pinpoints, tile_size, *, mean=None, std=None):
    """LLaVA-NeXT's AnyRes preprocessing of one (C, H, W) float image, as Hugging Face's (torchvision)
    ``LlavaNextImageProcessor``: the whole image resized to (tile, tile), then the tiles, row by row, of the
    image fitted into the canvas ``select_best_resolution`` picks (aspect kept, bicubic with antialiasing,
    zero padding centred). `mean` / `std` (per channel): normalise as the processor's ``do_normalize``.
    Returns (1 + rows·cols, C, tile, tile); ``image.shape[-2:]`` is the model's ``image_sizes`` row."""
    from torch.nn import functional as F

    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"anyres_tiles: image must be a (C, H, W) float tensor, got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    check_int("anyres_tiles", "tile_size", tile_size, lo=1)
    height, width = image.shape[-2:]
    canvas_h, canvas_w = select_best_resolution((height, width), grid_pinpoints)
    if canvas_h % tile_size or canvas_w % tile_size:
        raise ValueError(f"anyres_tiles: grid_pinpoints must be multiples of tile_size {tile_size}, "
                         f"got {(canvas_h, canvas_w)}")
    if canvas_w / width < canvas_h / height:  # the processor's get_patch_output_size
        new_h, new_w = min(math.ceil(height * canvas_w / width), canvas_h), canvas_w
    else:
        new_h, new_w = canvas_h, min(math.ceil(width * canvas_h / height), canvas_w)

    def resize(x, size):
        return F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]

    fitted = resize(image, (new_h, new_w))
    left, top = (canvas_w - new_w) // 2, (canvas_h - new_h) // 2
    fitted = F.pad(fitted, (left, canvas_w - new_w - left, top, canvas_h - new_h - top))
    c = image.shape[0]
    tiles = fitted.view(c, canvas_h // tile_size, tile_size, canvas_w // tile_size, tile_size)
    tiles = tiles.permute(1, 3, 0, 2, 4).reshape(-1, c, tile_size, tile_size)
    out = torch.cat([resize(image, (tile_size, tile_size))[None], tiles])
    if mean is not None or std is not None:
        mean = torch.as_tensor(0.0 if mean is None else mean, dtype=out.dtype).reshape(-1, 1, 1)
        std = torch.as_tensor(1.0 if std is None else std, dtype=out.dtype).reshape(-1, 1, 1)
        out = (out - mean) / std
    return out


def _unpadded(image_size, rows, cols):
    """Rows and columns of a (rows, cols) feature canvas covered by the image once the processor's centred
    padding is removed (HF's ``unpad_image``, its Python rounding included): (top, bottom, left, right)."""
    height, width = (int(v) for v in image_size)
    if width / height > cols / rows:
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return pad, rows - pad, 0, cols
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return 0, rows, pad, cols - pad


class LlavaNext(Llava):
    """LLaVA-NeXT (AnyRes): each image arrives as the whole image resized to one tile followed by the tiles of
    the canvas ``select_best_resolution`` picks from `image_grid_pinpoints` ((height, width) pairs, multiples
    of the tower's image size). The tiles' features are stitched into one map, the processor's padding is
    cut off, a learned ``image_newline`` ends each row; the whole image's tokens come first.
    Inputs as HF's ``LlavaNextForConditionalGeneration``: pixel_values (num_images, max_tiles, 3, S, S)
    (or the used tiles stacked, 4-D) and image_sizes (num_images, 2) original (height, width)."""

    def __init__(self, vision, projector, language_model, image_token_index, *, image_grid_pinpoints, **kwargs):
        super().__init__(vision, projector, language_model, image_token_index, **kwargs)
        tile = self.vision.img_size
        if not isinstance(image_grid_pinpoints, (list, tuple)) or not image_grid_pinpoints:
            raise ValueError("LlavaNext: image_grid_pinpoints must be a non-empty list of (height, width)")
        for pin in image_grid_pinpoints:
            if (not isinstance(pin, (list, tuple)) or len(pin) != 2
                    or not all(isinstance(v, int) and v > 0 and v % tile == 0 for v in pin)):
                raise ValueError(f"LlavaNext: image_grid_pinpoints: each must be (height, width), positive multiples "
                                 f"of the tile size {tile}, got {pin!r}")
        if self.vision_feature_select_strategy == "full" and self.vision.num_prefix_tokens:
            raise ValueError("LlavaNext: vision_feature_select_strategy='full' keeps [CLS], which does not tile into "
                             "the feature map (HF warns and fails the same way)")
        self.image_grid_pinpoints = [tuple(pin) for pin in image_grid_pinpoints]
        hidden = self.language_model.hidden_size
        self.image_newline = nn.Parameter(torch.randn(hidden) / hidden ** 0.5)  # HF's init (std 1/sqrt(hidden))

    def set_stage(self, stage):
        """As :meth:`Llava.set_stage`; ``image_newline`` is part of the bridge and trains in both stages."""
        super().set_stage(stage)
        self.image_newline.requires_grad_(True)
        return self

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                **kwargs):
        """:meth:`Llava.forward` with HF ``LlavaNextForConditionalGeneration``'s positional order
        (image_sizes third)."""
        return super().forward(input_ids, pixel_values, attention_mask, position_ids, image_sizes=image_sizes,
                                **kwargs)

    def grid(self, image_size):
        """(rows, cols) of tiles for an image of `image_size` (height, width)."""
        h, w = select_best_resolution(image_size, self.image_grid_pinpoints)
        return h // self.vision.img_size, w // self.vision.img_size

    def num_image_tokens(self, image_size):
        """Placeholders one image of `image_size` (height, width) fills (the processor's count)."""
        side = self.vision.img_size // self.vision.patch_size
        rows, cols = self.grid(image_size)
        top, bottom, left, right = _unpadded(image_size, rows * side, cols * side)
        return side * side + (bottom - top) * (right - left + 1)

    def _image_tokens(self, pixel_values, image_sizes):
        given = torch.as_tensor(image_sizes) if isinstance(image_sizes, (torch.Tensor, list, tuple)) else None
        if given is None or given.dim() != 2 or given.shape[1] != 2 or bool((given < 1).any()):
            raise ValueError(f"LlavaNext: image_sizes must be (num_images, 2) positive (height, width) with "
                             f"pixel_values, got {image_sizes if given is None else tuple(given.shape)}")
        sizes = given.tolist()
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() not in (4, 5):
            raise ValueError("LlavaNext: pixel_values must be (num_images, tiles, 3, S, S) or (tiles, 3, S, S)")
        grids = [self.grid(size) for size in sizes]
        counts = [1 + r * c for r, c in grids]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(f"LlavaNext: {pixel_values.shape[0]} images of pixel_values, {len(sizes)} image_sizes")
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])
        if pixel_values.shape[0] != sum(counts):
            raise ValueError(f"LlavaNext: pixel_values hold {pixel_values.shape[0]} tiles, image_sizes need "
                             f"{sum(counts)}")
        side = self.vision.img_size // self.vision.patch_size
        out = []
        for feats, size, (rows, cols) in zip(self.get_image_features(pixel_values).split(counts), sizes, grids):
            D = feats.shape[-1]
            # tiles (rows, cols) of (side, side) token grids -> one (rows·side, cols·side) map, row-major
            canvas = feats[1:].view(rows, cols, side, side, D).permute(0, 2, 1, 3, 4)
            canvas = canvas.reshape(rows * side, cols * side, D)
            top, bottom, left, right = _unpadded(size, rows * side, cols * side)
            canvas = canvas[top:bottom, left:right]
            newline = self.image_newline.to(canvas.dtype).expand(canvas.shape[0], 1, D)
            out += [feats[0], torch.cat([canvas, newline], 1).reshape(-1, D)]
        return torch.cat(out)

    @classmethod
    def from_hf(cls, hf_model, *, backend="auto"):
        """From a transformers ``LlavaNextForConditionalGeneration`` (as :meth:`Llava.from_hf`, plus the
        grid pinpoints and ``image_newline``)."""
        parts, c = _hf_parts(hf_model, "LlavaNextForConditionalGeneration", backend)
        model = cls(*parts, image_grid_pinpoints=[list(p) for p in c.image_grid_pinpoints],
                    vision_feature_layer=c.vision_feature_layer,
                    vision_feature_select_strategy=c.vision_feature_select_strategy)
        newline = hf_model.model.image_newline
        model.image_newline = nn.Parameter(newline.detach().clone())
        return model


# Test-size presets for ``Llava.from_preset`` and the training entry point (CLIP-layout tower, Llama LM)
_TINY_LM = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
_TINY_VISION = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, pre_norm=True)
PRESETS = {
    "tiny": dict(vision=_TINY_VISION, projector="mlp", language_model=_TINY_LM, image_token_index=63),
    "tiny-next": dict(vision=dict(_TINY_VISION, img_size=8), projector="mlp", language_model=_TINY_LM,
                      image_token_index=63, image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]]),
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14@336, vocabulary 32000 + <image> (32000) + <pad> padded to 32064
    "llava-1.5-7b": dict(vision=clip_vision_args(336, 14, 1024, 24, 16), projector="mlp",
                         language_model=dict(_LM["vicuna-7b"], vocab_size=32064), image_token_index=32000),
    # llava-hf/llava-v1.6-vicuna-7b-hf: the same parts, AnyRes over 336px tiles, a learned image_newline
    "llava-next-vicuna-7b": dict(vision=clip_vision_args(336, 14, 1024, 24, 16), projector="mlp",
                                 language_model=dict(_LM["vicuna-7b"], vocab_size=32064), image_token_index=32000,
                                 image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
}


def training_batch(model, n, generator):
    """A synthetic batch for the training entry point (``mmfast.training.tasks``): n prompts
    [BOS, 2 text tokens, one image's placeholders, 1-4 text tokens, right padding], one random image each
    (LlavaNext: a 12x20 image's tiles and its image_sizes), labels = the ids with the image tokens and pads
    at -100. Returns the forward's keyword arguments."""
    check_int("llava.training_batch", "n", n, lo=1)
    lm, vision = model.language_model, model.vision
    if isinstance(model, LlavaNext):
        size = (12, 20)
        rows, cols = model.grid(size)
        extra = dict(image_sizes=torch.tensor([size] * n))
        pixels = torch.randn(n, 1 + rows * cols, 3, vision.img_size, vision.img_size, generator=generator)
        placeholders = model.num_image_tokens(size)
    else:
        extra = {}
        pixels = torch.randn(n, 3, vision.img_size, vision.img_size, generator=generator)
        placeholders = (vision.img_size // vision.patch_size) ** 2
        placeholders += vision.num_prefix_tokens if model.vision_feature_select_strategy == "full" else 0
    eos = lm.eos_token_id if isinstance(lm.eos_token_id, (list, tuple)) else [lm.eos_token_id]
    special = {lm.pad_token_id, lm.bos_token_id, model.image_token_index, *eos}
    allowed = torch.tensor([t for t in range(lm.vocab_size) if t not in special])
    text = allowed[torch.randint(0, len(allowed), (n, 6), generator=generator)]
    ids = torch.cat([torch.full((n, 1), lm.bos_token_id), text[:, :2],
                     torch.full((n, placeholders), model.image_token_index), text[:, 2:]], 1)
    kept = ids.shape[1] - torch.randint(0, 4, (n,), generator=generator)
    mask = (torch.arange(ids.shape[1]) < kept[:, None]).long()
    ids = ids.masked_fill(mask == 0, lm.pad_token_id)
    labels = ids.masked_fill((mask == 0) | (ids == model.image_token_index), -100)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels, **extra)


__all__ = ["Llava", "LlavaNext", "PRESETS", "Projector", "anyres_tiles", "select_best_resolution", "training_batch"]
