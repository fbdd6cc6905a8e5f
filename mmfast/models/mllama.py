"""Llama 3.2 Vision (Meta 2024; Hugging Face's Mllama): images cut into ≤ max_num_tiles tiles → a tiled ViT
(local layers, then tanh-gated global layers; intermediate-layer features concatenated) → a linear
projector → the keys / values of gated cross-attention layers that REPLACE some self-attention layers of a
Llama decoder (``mmfast.nn.decoder.DecoderLM`` holds them in its layer slots, run by its layer hook).

Hugging Face's ``MllamaForConditionalGeneration`` (transformers 5) is the contract, numerics included:
- the vision mask ``m mᵀ · finfo.min`` (each tile padded 1 + N → a multiple of 8 patches; padded patches and
  unused tiles hide only from each other: ``mmfast.nn.split_attention.padded_self_attention``);
- the cross-attention mask (B, L, images, tiles) → per-row key intervals plus the unused tiles as key
  padding; text rows before any image attend to every image token and that output is added through the
  gate (only their MLP update is zeroed). ``text_before_image="meta"`` gives Meta's reference instead,
  where those rows keep exactly their input.
Not reproduced: an image whose aspect_ratio_mask is all 0 (every token padded: transformers averages the
values uniformly, every score at finfo.min; flash attention outputs 0). HF's processor never makes one: it
marks tile 0 of every image, batch-padding images (aspect_ratio_id 0) included.
transformers 4.5x on CPU: a text row whose keys are all padding (a left-padding row) keeps every score at
finfo.min in 4.5x's float mask (its ``_update_causal_mask`` unmasks such rows on accelerators only), so its
output differs from ours (which matches 5.x's); only HF's shifted loss reads such a row (for the first real
token after the padding), so that loss differs on left-padded batches.
"""
import copy
import math
import types

import torch
from torch import nn
from torch.nn import functional as F

from mmfast.kernels import tile_patch_embed
from mmfast.kernels._common import check_choice, check_int
from mmfast.nn.decoder import DecoderLM, _llama_pairs, hf_eos_token_id
from mmfast.nn.gated_cross_attention import GatedCrossAttentionBlock, gated_linear_residual
from mmfast.nn.plain import require_plain
from mmfast.nn.split_attention import cross_key_intervals, padded_self_attention
from mmfast.nn.transformer import TransformerLayer, activation

from ._common import build_preset, copy_weights, gated_xattn_pairs, layer_pairs, module_pairs
from .vit import hf_activation

_OP = "Mllama"
TEXT_BEFORE_IMAGE = {"hf": "all_keys", "meta": "zero"}
STAGES = ("bridge", "full")


# ---- tiling (Hugging Face's MllamaImageProcessor) ---------------------------------------------------------

def supported_aspect_ratios(max_num_tiles):
    """Every tile arrangement (rows, cols) with rows · cols ≤ max_num_tiles, in the processor's order (the
    aspect_ratio_id of arrangement k is k + 1; 0 marks a padding image)."""
    check_int("supported_aspect_ratios", "max_num_tiles", max_num_tiles, lo=1)
    return [(r, c) for r in range(1, max_num_tiles + 1) for c in range(1, max_num_tiles + 1) if r * c <= max_num_tiles]


def optimal_tiled_canvas(height, width, max_num_tiles, tile_size):
    """The canvas (height, width) an image is resized into: over every arrangement, the scale that fits the
    image is min(canvas_h / h, canvas_w / w); the smallest upscaling (≥ 1) wins, else the largest
    downscaling; among equal scales the smallest canvas, the first in `supported_aspect_ratios` order."""
    check_int("optimal_tiled_canvas", "height", height, lo=1)
    check_int("optimal_tiled_canvas", "width", width, lo=1)
    check_int("optimal_tiled_canvas", "tile_size", tile_size, lo=1)
    canvases = [(r * tile_size, c * tile_size) for r, c in supported_aspect_ratios(max_num_tiles)]
    scales = [min(ch / height, cw / width) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    best = min(up) if up else max(scales)
    return min((c for c, s in zip(canvases, scales) if s == best), key=lambda c: c[0] * c[1])


def aspect_ratio_id(rows, cols, max_num_tiles):
    """The model's aspect_ratio_ids entry of a (rows, cols) arrangement (1-based; 0 is padding)."""
    arrangements = supported_aspect_ratios(max_num_tiles)
    if (rows, cols) not in arrangements:
        raise ValueError(f"aspect_ratio_id: ({rows}, {cols}) is not an arrangement of ≤ {max_num_tiles} tiles")
    return arrangements.index((rows, cols)) + 1


def tile_image(image, max_num_tiles, tile_size, *, mean=None, std=None):
    """One (C, H, W) float image as the processor tiles it: resized (aspect kept, bilinear with
    antialiasing) to fit the `optimal_tiled_canvas` (never below one tile per side, never above the
    canvas), zero-padded at the bottom / right, normalised with `mean` / `std` per channel, cut into tiles
    row by row. Returns (tiles (max_num_tiles, C, t, t) — unused ones zero —, aspect_ratio_id, tile mask
    (max_num_tiles,) int64): one image's pixel_values / aspect_ratio_ids / aspect_ratio_mask entries."""
    op = "tile_image"
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"{op}: image must be a (C, H, W) float tensor, got {getattr(image, 'shape', type(image))}")
    check_int(op, "tile_size", tile_size, lo=1)
    C, H, W = image.shape
    canvas_h, canvas_w = optimal_tiled_canvas(H, W, max_num_tiles, tile_size)
    # the processor's get_image_size_fit_to_canvas
    target_h, target_w = min(max(H, tile_size), canvas_h), min(max(W, tile_size), canvas_w)
    if target_w / W < target_h / H:
        new_h, new_w = min(math.floor(H * target_w / W) or 1, target_h), target_w
    else:
        new_h, new_w = target_h, min(math.floor(W * target_h / H) or 1, target_w)
    x = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    x = F.pad(x, (0, canvas_w - new_w, 0, canvas_h - new_h))
    if mean is not None or std is not None:
        x = (x - torch.as_tensor(0.0 if mean is None else mean, dtype=x.dtype).reshape(-1, 1, 1)) \
            / torch.as_tensor(1.0 if std is None else std, dtype=x.dtype).reshape(-1, 1, 1)
    rows, cols = canvas_h // tile_size, canvas_w // tile_size
    tiles = x.view(C, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4).reshape(-1, C, tile_size, tile_size)
    out = x.new_zeros(max_num_tiles, C, tile_size, tile_size)
    out[: rows * cols] = tiles
    mask = (torch.arange(max_num_tiles) < rows * cols).long()
    return out, aspect_ratio_id(rows, cols, max_num_tiles), mask


def cross_attention_mask(input_ids, image_token_index, num_tiles, max_num_tiles):
    """The processor's (B, L, images, max_num_tiles) int64 cross-attention mask: image j of a sample is seen
    from its ``<|image|>`` token up to the next image's token (to the end for the last), consecutive image
    tokens as one group seen until the group's end; only its `num_tiles[b][j]` used tiles. The number of
    images of sample b is its count of image tokens, which must equal ``len(num_tiles[b])``."""
    op = "cross_attention_mask"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"{op}: input_ids must be a (B, L) tensor, got {getattr(input_ids, 'shape', input_ids)}")
    B, L = input_ids.shape
    if len(num_tiles) != B:
        raise ValueError(f"{op}: num_tiles must list the tile counts of each of the {B} samples, got {len(num_tiles)}")
    M = max([len(t) for t in num_tiles] + [1])
    out = torch.zeros(B, L, M, max_num_tiles, dtype=torch.long, device=input_ids.device)
    for b in range(B):
        starts = (input_ids[b] == image_token_index).nonzero().flatten().tolist()
        if len(starts) != len(num_tiles[b]):
            raise ValueError(f"{op}: sample {b} has {len(starts)} image tokens but num_tiles lists "
                             f"{len(num_tiles[b])} images")
        ends = starts[1:] + [L]
        for j in reversed(range(len(starts) - 1)):
            if ends[j] == starts[j] + 1:  # the next token is an image too: this group is seen as one
                ends[j] = ends[j + 1]
        for j, (start, end) in enumerate(zip(starts, ends)):
            check_int(op, "num_tiles", num_tiles[b][j], lo=1, hi=max_num_tiles)
            out[b, start:end, j, : num_tiles[b][j]] = 1
    return out


# ---- vision encoder ---------------------------------------------------------------------------------------

class MllamaVisionLayer(TransformerLayer):
    """A pre-norm ViT layer (bias-free attention projections, GELU MLP) under HF's padded-tile mask; `gated`
    (the global layers) multiplies both residual updates by tanh(gate_attn) / tanh(gate_ffn), fused into the
    o-projection / fc2 GEMMs (``tanh_gated_linear``)."""

    def __init__(self, dim, num_heads, mlp_dim, *, gated=False, act="gelu", norm_eps=1e-5, backend="auto"):
        super().__init__(dim, num_heads, mlp_dim=mlp_dim, act=act, qkv_bias=False, proj_bias=False, norm_eps=norm_eps,
                         backend=backend)
        self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4)) if gated else None
        self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4)) if gated else None

    def forward(self, x, pad=None):
        attn, mlp = self.attn, self.mlp
        q, k, v = attn._project(self.norm1(x), None)
        o = padded_self_attention(q, k, v, pad, softmax_scale=attn.softmax_scale, backend=attn.backend).flatten(-2)
        if self.gate_attn is None:
            x = x + attn.out(o)
            return x + mlp(self.norm2(x))
        x = gated_linear_residual(o, attn.out, self.gate_attn, x, backend=attn.backend)
        h = activation(mlp.act, mlp.fc1(self.norm2(x)))
        return gated_linear_residual(h, mlp.fc2, self.gate_ffn, x, backend=attn.backend)


class MllamaVision(nn.Module):
    """Llama 3.2 Vision's tiled encoder. forward(pixel_values (B, M, T, C, H, W), aspect_ratio_ids (B, M),
    aspect_ratio_mask (B, M, T)) -> (B, M, T, 1 + N, dim · (1 + len(intermediate_layers))): per tile [CLS]
    and N patches, the global layers' output followed by the local layers' outputs at
    `intermediate_layers`, interleaved channel-wise as HF stacks them."""

    def __init__(self, image_size, patch_size, dim, depth, global_depth, num_heads, mlp_dim, *, max_num_tiles,
                 num_aspect_ratios, intermediate_layers, act="gelu", norm_eps=1e-5, channels=3, backend="auto"):
        super().__init__()
        op = "MllamaVision"
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("dim", dim),
                            ("max_num_tiles", max_num_tiles), ("num_aspect_ratios", num_aspect_ratios),
                            ("channels", channels)):
            check_int(op, name, value, lo=1)
        check_int(op, "depth", depth, lo=0)
        check_int(op, "global_depth", global_depth, lo=0)
        for i in intermediate_layers:
            check_int(op, "intermediate_layers", i, lo=0, hi=depth - 1)
        self.patch_size, self.max_num_tiles, self.backend = patch_size, max_num_tiles, backend
        self.intermediate_layers = list(intermediate_layers)
        self.num_tokens = (image_size // patch_size) ** 2 + 1
        self.output_dim = dim * (1 + len(self.intermediate_layers))
        T, n, R = max_num_tiles, self.num_tokens, num_aspect_ratios + 1
        self.patch_embedding = nn.Conv2d(channels, dim, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.pos_embed = nn.Parameter(torch.randn(n, dim) * dim ** -0.5)
        self.pos_gate = nn.Parameter(torch.zeros(1))
        self.tile_pos_embed = nn.Embedding(R, T * n * dim)
        self.pre_tile_embed, self.post_tile_embed = nn.Embedding(R, T * dim), nn.Embedding(R, T * dim)
        self.pre_tile_gate, self.post_tile_gate = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.norm_pre, self.norm_post = nn.LayerNorm(dim), nn.LayerNorm(dim)
        kw = dict(act=act, norm_eps=norm_eps, backend=backend)
        self.layers = nn.ModuleList(MllamaVisionLayer(dim, num_heads, mlp_dim, **kw) for _ in range(depth))
        self.global_layers = nn.ModuleList(MllamaVisionLayer(dim, num_heads, mlp_dim, gated=True, **kw)
                                           for _ in range(global_depth))

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 6 \
                or pixel_values.shape[2] != self.max_num_tiles:
            raise ValueError(f"pixel_values must be (B, images, {self.max_num_tiles}, C, H, W), got "
                             f"{getattr(pixel_values, 'shape', pixel_values)}")
        B, M, T, C, H, W = pixel_values.shape
        require_plain("MllamaVision", "patch_embedding", self.patch_embedding, nn.Conv2d)
        P, n, w = self.patch_size, self.num_tokens, self.patch_embedding.weight
        if (H // P) * (W // P) + 1 != n:
            raise ValueError(f"pixel_values: tiles of {H}x{W} give {(H // P) * (W // P)} patches, the model has {n - 1}")
        if tuple(aspect_ratio_ids.shape) != (B, M) or tuple(aspect_ratio_mask.shape) != (B, M, T):
            raise ValueError(f"aspect_ratio_ids must be ({B}, {M}) and aspect_ratio_mask ({B}, {M}, {T}), got "
                             f"{tuple(aspect_ratio_ids.shape)} and {tuple(aspect_ratio_mask.shape)}")
        ar = aspect_ratio_ids.reshape(-1).to(w.device)
        images = pixel_values.reshape(B * M, T, C, H, W)[..., : H // P * P, : W // P * P].to(w.device, w.dtype)
        x = tile_patch_embed(images, w, None, cls_token=self.class_embedding, pos_embed=self.pos_embed,
                             pos_gate=self.pos_gate, tile_pos_embed=self.tile_pos_embed.weight,
                             tile_embed=self.pre_tile_embed.weight, tile_embed_gate=self.pre_tile_gate,
                             aspect_ratio_ids=ar, backend=self.backend)
        x = self.norm_pre(x)
        # HF pads each tile's tokens to a multiple of 8; padded tokens stay in the sequence as keys
        n_pad = -n % 8
        x = F.pad(x, (0, 0, 0, n_pad))
        padded_tile = aspect_ratio_mask.reshape(B * M, T, 1).to(x.device) == 0
        pad = (padded_tile | (torch.arange(n + n_pad, device=x.device) >= n)).reshape(B * M, -1)
        pad = pad if bool(pad.any()) else None
        D = x.shape[-1]
        x = x.reshape(B * M, -1, D)
        states = []
        for layer in self.layers:
            x = layer(x, pad)
            states.append(x)
        x = self.norm_post(x).view(B * M, T, -1, D)
        x = x + self.post_tile_gate.tanh() * self.post_tile_embed(ar).view(B * M, T, 1, D)
        x = x.reshape(B * M, -1, D)
        for layer in self.global_layers:
            x = layer(x, pad)
        feats = [x] + ([torch.stack([states[i] for i in self.intermediate_layers], -1).flatten(-2)]
                       if self.intermediate_layers else [])
        out = torch.cat(feats, -1).view(B * M, T, n + n_pad, -1)[:, :, :n]
        return out.reshape(B, M, T, n, -1)


# ---- the model ---------------------------------------------------------------------------------------------

class Mllama(nn.Module):
    """Vision encoder + projector + a Llama decoder whose layers at `cross_attention_layers` are gated
    cross-attention layers (``GatedCrossAttentionBlock(variant="mllama")``, keys / values from the projected
    image tokens) in place of self-attention layers.

    Args:
        vision: a :class:`MllamaVision` or a dict of its arguments.
        language_model: a dict of ``DecoderLM`` arguments (``num_layers`` counts every layer, cross ones
            included; Llama's SwiGLU / RMSNorm / RoPE).
        cross_attention_layers: the layer indices that are cross-attention layers.
        image_token_index: the ``<|image|>`` id (the cross-attention mask, not the ids, says what a token sees).
        text_before_image: "hf" (Hugging Face's numerics) or "meta" (Meta's reference: rows that see no image
            get cross-attention output 0).
        extra_embeddings: rows of the token embedding beyond the vocabulary (HF's ``vocab_size + 8``).
    """

    def __init__(self, vision, language_model, cross_attention_layers, image_token_index, *, text_before_image="hf",
                 extra_embeddings=8, backend="auto"):
        super().__init__()
        check_choice(_OP, "text_before_image", text_before_image, tuple(TEXT_BEFORE_IMAGE))
        check_int(_OP, "extra_embeddings", extra_embeddings, lo=0)
        self.vision = MllamaVision(**{"backend": backend, **vision}) if isinstance(vision, dict) else vision
        if not isinstance(self.vision, MllamaVision) or not isinstance(language_model, dict):
            raise ValueError(f"{_OP}: vision must be a MllamaVision or a dict, language_model a dict of DecoderLM "
                             f"arguments, got {type(vision).__name__}, {type(language_model).__name__}")
        lm = {"backend": backend, **language_model}
        total = lm["num_layers"]
        cross = sorted(set(cross_attention_layers))
        for i in cross:
            check_int(_OP, "cross_attention_layers", i, lo=0, hi=total - 1)
        if len(cross) == total:
            raise ValueError(f"{_OP}: cross_attention_layers leaves no self-attention layer")
        self.language_model = DecoderLM(**{**lm, "num_layers": total - len(cross)})
        check_int(_OP, "image_token_index", image_token_index, lo=0, hi=self.language_model.vocab_size + extra_embeddings - 1)
        D, V = self.language_model.hidden_size, self.language_model.vocab_size
        embed = self.language_model.embed_tokens
        self.language_model.embed_tokens = nn.Embedding(V + extra_embeddings, D, padding_idx=embed.padding_idx,
                                                        device=embed.weight.device, dtype=embed.weight.dtype)
        nn.init.normal_(self.language_model.embed_tokens.weight, std=0.02)
        for i in cross:  # a slot that DecoderLM's forward leaves to the layer hook
            self.language_model.layers.insert(i, GatedCrossAttentionBlock(
                D, lm["num_heads"], kv_heads=lm.get("num_kv_heads"), hidden=lm["intermediate_size"], variant="mllama",
                eps=lm.get("norm_eps", 1e-6), empty_rows=TEXT_BEFORE_IMAGE[text_before_image], backend=backend))
        self.cross_attention_layers = cross
        self.projector = nn.Linear(self.vision.output_dim, D)
        self.image_token_index, self.text_before_image = image_token_index, text_before_image

    def cross_layers(self):
        return [self.language_model.layers[i] for i in self.cross_attention_layers]

    # ---- training presets ------------------------------------------------------------------------------------
    def set_stage(self, stage="bridge"):
        """"bridge": train the cross-attention layers and the projector (vision encoder and the Llama
        self-attention layers, embeddings and head frozen, as Llama 3.2 Vision's adapter training); "full":
        everything but the vision encoder."""
        check_choice(_OP, "stage", stage, STAGES)
        self.vision.requires_grad_(False)
        self.language_model.requires_grad_(stage == "full")
        self.projector.requires_grad_(True)
        for block in self.cross_layers():
            block.requires_grad_(True)
        return self

    def synthetic_batch(self, batch_size, seq_len, *, generator=None, device=None):
        """A random training batch (dict of forward's keywords): one image per sample of a random arrangement,
        its ``<|image|>`` token at a random position, the rows from it on seeing its used tiles, labels = ids
        with the image token ignored."""
        check_int(_OP, "batch_size", batch_size, lo=1)
        check_int(_OP, "seq_len", seq_len, lo=2)
        v, T = self.vision, self.vision.max_num_tiles
        side = int(math.isqrt(v.num_tokens - 1)) * v.patch_size
        arrangements = supported_aspect_ratios(T)
        pick = torch.randint(len(arrangements), (batch_size,), generator=generator)
        ids = torch.randint(0, self.language_model.vocab_size, (batch_size, seq_len), generator=generator)
        at = torch.randint(seq_len - 1, (batch_size,), generator=generator)
        ids[torch.arange(batch_size), at] = self.image_token_index
        used = torch.tensor([arrangements[int(k)][0] * arrangements[int(k)][1] for k in pick])
        tile_mask = (torch.arange(T) < used[:, None]).long()[:, None]  # (B, 1, T)
        xmask = (torch.arange(seq_len)[None, :, None, None] >= at[:, None, None, None]) * tile_mask[:, None]
        batch = dict(input_ids=ids, pixel_values=torch.randn(batch_size, 1, T, 3, side, side, generator=generator),
                     aspect_ratio_ids=(pick + 1)[:, None], aspect_ratio_mask=tile_mask, cross_attention_mask=xmask,
                     attention_mask=torch.ones_like(ids), labels=ids.masked_fill(ids == self.image_token_index, -100))
        return {k: t.to(device) for k, t in batch.items()} if device is not None else batch

    # ---- forward -----------------------------------------------------------------------------------------
    def cross_keys_values(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        """Per cross-attention layer, the keys and values of the projected image tokens (B, images · tiles ·
        (1 + N), ...): computed once per prompt, reused by every decoding step."""
        feats = self.projector(self.vision(pixel_values, aspect_ratio_ids, aspect_ratio_mask))
        media = feats.reshape(feats.shape[0], 1, -1, feats.shape[-1])
        return {i: self.language_model.layers[i].media_kv(media) for i in self.cross_attention_layers}

    def _plan(self, cross_attention_mask, batch, length, num_keys):
        """kv_start, kv_end (B, L) and key padding (B, K) of the cross-attention mask (B, L, images, tiles)."""
        if cross_attention_mask is None:  # HF: no mask, every row sees every image token
            full = torch.full((batch, length), num_keys, dtype=torch.int32)
            return torch.zeros_like(full), full, None
        m = cross_attention_mask
        if m.dim() != 4 or m.shape[0] != batch or m.shape[1] != length:
            raise ValueError(f"{_OP}: cross_attention_mask must be ({batch}, {length}, images, tiles), got "
                             f"{tuple(m.shape)}")
        n = num_keys // (m.shape[2] * m.shape[3]) if m.shape[2] * m.shape[3] else 0
        if n * m.shape[2] * m.shape[3] != num_keys:
            raise ValueError(f"{_OP}: cross_attention_mask's images x tiles do not match pixel_values")
        plan = cross_key_intervals(m.flatten(2) != 0)
        if plan is None:
            raise ValueError(f"{_OP}: cross_attention_mask rows must each see one run of images minus unused tiles")
        start, end, pad = plan
        return start * n, end * n, None if pad is None else pad.repeat_interleave(n, -1)

    def _hook(self, cross_kv, plan):
        slots = set(self.cross_attention_layers)

        def hook(i, x):
            if i not in slots or cross_kv is None:
                return x  # text only: HF skips the cross-attention layers
            start, end, pad = plan
            return self.language_model.layers[i](x, kv=cross_kv[i], kv_start=start.to(x.device),
                                                 kv_end=end.to(x.device), media_padding_mask=pad)
        return hook

    def forward(self, input_ids=None, pixel_values=None, aspect_ratio_mask=None, aspect_ratio_ids=None,
                attention_mask=None, cross_attention_mask=None, position_ids=None, *, cache=None, use_cache=False,
                labels=None, logits_to_keep=0, output_hidden_states=False):
        """HF ``MllamaForConditionalGeneration``'s inputs: input_ids (B, L); pixel_values (B, images, tiles, 3,
        H, W) with aspect_ratio_ids (B, images) and aspect_ratio_mask (B, images, tiles); cross_attention_mask
        (B, L, images, tiles) (or (B, past + L, ...): the new rows are used); attention_mask (B, past + L)
        1 keep / 0 pad; labels: shifted next-token cross-entropy, -100 ignored. position_ids default to the
        count of real tokens (HF's generate). With a cache, the image's keys / values are kept in
        ``cache.cross_kv`` at the first call and reused. Returns ``DecoderLMOutput``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"{_OP}: input_ids must be a (B, L) tensor, got {getattr(input_ids, 'shape', input_ids)}")
        if pixel_values is not None and aspect_ratio_ids is None:
            raise ValueError(f"{_OP}: aspect_ratio_ids must be given with pixel_values")
        if cache is None and use_cache:
            from mmfast.nn.bert import KVCache
            cache = KVCache()
        B, L = input_ids.shape
        past = 0 if cache is None else cache.length
        if past and pixel_values is not None:
            raise ValueError(f"{_OP}: pixel_values go with the prompt (a new image after cached steps is not supported)")
        cross_kv = None
        if pixel_values is not None:
            if aspect_ratio_mask is None:
                aspect_ratio_mask = torch.ones(pixel_values.shape[:3], dtype=torch.long, device=pixel_values.device)
            cross_kv = self.cross_keys_values(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
            if cache is not None:
                cache.cross_kv = cross_kv
        elif cache is not None and cache.cross_kv:
            cross_kv = cache.cross_kv
        plan = None
        if cross_kv is not None:
            if cross_attention_mask is not None and cross_attention_mask.shape[1] == past + L and past:
                cross_attention_mask = cross_attention_mask[:, past:]
            num_keys = next(iter(cross_kv.values()))[0].shape[1]
            plan = self._plan(cross_attention_mask, B, L, num_keys)
        return self.language_model(input_ids, attention_mask, position_ids=position_ids, cache=cache,
                                   use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep,
                                   output_hidden_states=output_hidden_states, layer_hook=self._hook(cross_kv, plan))

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, aspect_ratio_mask=None, aspect_ratio_ids=None,
                 attention_mask=None, cross_attention_mask=None, **kwargs):
        """HF's ``generate`` (greedy, beam search, sampling: ``DecoderLM.generate``'s arguments). The image's
        keys / values are computed once; each decoding step's row sees what the prompt's last row sees (HF
        repeats the mask's last row). Returns the prompt ids followed by the new tokens, as HF."""
        beams = kwargs.get("num_beams", 1)
        cross_kv = plan = None
        if pixel_values is not None:
            if aspect_ratio_ids is None:
                raise ValueError(f"{_OP}: aspect_ratio_ids must be given with pixel_values")
            if aspect_ratio_mask is None:
                aspect_ratio_mask = torch.ones(pixel_values.shape[:3], dtype=torch.long, device=pixel_values.device)
            cross_kv = self.cross_keys_values(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
            cross_kv = {i: (k.repeat_interleave(beams, 0), v.repeat_interleave(beams, 0)) for i, (k, v) in cross_kv.items()}
            num_keys = next(iter(cross_kv.values()))[0].shape[1]
            B, L = input_ids.shape
            plan = [t if t is None else t.repeat_interleave(beams, 0)
                    for t in self._plan(cross_attention_mask, B, L, num_keys)]
        # a decoding step's row sees what the prompt's last row sees
        step = self._hook(cross_kv, plan and [plan[0][:, -1:], plan[1][:, -1:], plan[2]])
        return self.language_model.generate(input_ids, attention_mask, layer_hook=self._hook(cross_kv, plan),
                                            step_layer_hook=step, **kwargs)

    # ---- conversion --------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, *, text_before_image="hf", backend="auto"):
        """From a transformers ``MllamaForConditionalGeneration`` (weights copied, on its device and dtype)."""
        if type(hf_model).__name__ != "MllamaForConditionalGeneration":
            raise ValueError(f"Mllama.from_hf expects a transformers MllamaForConditionalGeneration, got "
                             f"{type(hf_model).__name__}")
        c, body = hf_model.config, hf_model.model
        vc, tc = c.vision_config, c.text_config
        cross = list(tc.cross_attention_layers)
        shim = copy.copy(tc)  # DecoderLM's Llama conversion, over the self-attention layers only
        shim.num_hidden_layers, shim.attention_bias, shim.mlp_bias = tc.num_hidden_layers - len(cross), False, False
        lm_kwargs, lm_pairs = _llama_pairs(shim)
        vision = dict(image_size=vc.image_size, patch_size=vc.patch_size, dim=vc.hidden_size,
                      depth=vc.num_hidden_layers, global_depth=vc.num_global_layers, num_heads=vc.attention_heads,
                      mlp_dim=vc.intermediate_size, max_num_tiles=vc.max_num_tiles,
                      num_aspect_ratios=len(vc.supported_aspect_ratios),
                      intermediate_layers=list(vc.intermediate_layers_indices),
                      act=hf_activation(vc.hidden_act, "Mllama.from_hf"), norm_eps=vc.norm_eps,
                      channels=vc.num_channels)
        w = hf_model.lm_head.weight
        text = body.language_model
        with torch.device(w.device):
            model = cls(vision, {**lm_kwargs, "num_layers": tc.num_hidden_layers}, cross, c.image_token_index,
                        text_before_image=text_before_image,
                        extra_embeddings=text.embed_tokens.num_embeddings - tc.vocab_size, backend=backend)
        ours_lm = model.language_model
        inv_freq = ours_lm.rotary.inv_freq
        model.to(w.dtype)
        # fp32, as transformers loads it into a bf16 model: rounded, it turns the rotary angles by distance x
        # 2^-9 x inv_freq (radians at Llama 3.2's thousands of tokens)
        ours_lm.rotary.inv_freq = inv_freq
        self_ids = [i for i in range(tc.num_hidden_layers) if i not in cross]

        def only_self(m):
            return types.SimpleNamespace(layers=[m.layers[i] for i in self_ids], embed_tokens=m.embed_tokens,
                                         norm=m.norm)
        pairs = lm_pairs(only_self(ours_lm), only_self(text))
        pairs.append(("lm_head.weight", ours_lm.lm_head.weight, w))
        for i in cross:
            pairs += gated_xattn_pairs(f"layers.{i}", ours_lm.layers[i], text.layers[i],
                                       ("cross_attn_attn_gate", "cross_attn_mlp_gate"), ("q_norm", "k_norm"))
        pairs += _vision_pairs(model.vision, body.vision_model)
        pairs += module_pairs("multi_modal_projector", model.projector, body.multi_modal_projector)
        copy_weights(pairs, "Mllama.from_hf")
        # the outer model's generation_config (Llama 3.2: [128001, 128008, 128009]): what HF's generate stops on
        ours_lm.eos_token_id = hf_eos_token_id(hf_model)
        return model

    @classmethod
    def from_preset(cls, name, **overrides):
        """A model of a named shape (``PRESETS``), random weights; `overrides` replace constructor arguments
        (backend=, text_before_image=)."""
        return build_preset(cls, PRESETS, name, overrides)


_VISION_LAYER = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", out="self_attn.o_proj",
                     norm1="input_layernorm", norm2="post_attention_layernorm", fc1="mlp.fc1", fc2="mlp.fc2")


def _vision_pairs(ours, theirs):
    pos, pre, post = theirs.gated_positional_embedding, theirs.pre_tile_positional_embedding, \
        theirs.post_tile_positional_embedding
    pairs = [("patch_embedding.weight", ours.patch_embedding.weight, theirs.patch_embedding.weight),
             ("class_embedding", ours.class_embedding, theirs.class_embedding),
             ("pos_embed", ours.pos_embed, pos.embedding), ("pos_gate", ours.pos_gate, pos.gate),
             ("tile_pos_embed", ours.tile_pos_embed.weight, pos.tile_embedding.weight),
             ("pre_tile_embed", ours.pre_tile_embed.weight, pre.embedding.weight),
             ("pre_tile_gate", ours.pre_tile_gate, pre.gate),
             ("post_tile_embed", ours.post_tile_embed.weight, post.embedding.weight),
             ("post_tile_gate", ours.post_tile_gate, post.gate),
             *module_pairs("norm_pre", ours.norm_pre, theirs.layernorm_pre),
             *module_pairs("norm_post", ours.norm_post, theirs.layernorm_post)]
    for mine, hf_layers in ((ours.layers, theirs.transformer.layers), (ours.global_layers,
                                                                       theirs.global_transformer.layers)):
        pairs += layer_pairs(types.SimpleNamespace(layers=mine), hf_layers, _VISION_LAYER)
        for i, (a, b) in enumerate(zip(mine, hf_layers)):
            if a.gate_attn is not None:
                pairs += [(f"layers.{i}.gate_attn", a.gate_attn, b.gate_attn),
                          (f"layers.{i}.gate_ffn", a.gate_ffn, b.gate_ffn)]
    return pairs


_LLAMA31_8B_TEXT = dict(vocab_size=128256, hidden_size=4096, num_layers=40, num_heads=32, num_kv_heads=8,
                        intermediate_size=14336, norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                        pad_token_id=128004, bos_token_id=128000, eos_token_id=128001)
# name -> constructor arguments; "tiny" for tests and examples
def training_batch(model, n, generator):
    """A synthetic batch for the training entry point (``mmfast.training.tasks``): n prompts of 12 tokens,
    one image each (:meth:`Mllama.synthetic_batch`). Returns the forward's keyword arguments, labels included."""
    return model.synthetic_batch(n, 12, generator=generator)


PRESETS = {
    "tiny": dict(vision=dict(image_size=16, patch_size=8, dim=32, depth=2, global_depth=1, num_heads=2, mlp_dim=64,
                             max_num_tiles=2, num_aspect_ratios=3, intermediate_layers=[0]),
                 language_model=dict(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                                     intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                 cross_attention_layers=[1], image_token_index=98),
    # meta-llama/Llama-3.2-11B-Vision: 32 local + 8 global vision layers of width 1280 on 4 tiles of 560px,
    # Llama 3.1 8B's 32 self-attention layers with 8 cross-attention layers among them
    "llama-3.2-11b-vision": dict(
        vision=dict(image_size=560, patch_size=14, dim=1280, depth=32, global_depth=8, num_heads=16, mlp_dim=5120,
                    max_num_tiles=4, num_aspect_ratios=8, intermediate_layers=[3, 7, 15, 23, 30]),
        language_model=_LLAMA31_8B_TEXT, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
        image_token_index=128256),
}

__all__ = ["Mllama", "MllamaVision", "MllamaVisionLayer", "PRESETS", "aspect_ratio_id", "cross_attention_mask",
           "optimal_tiled_canvas", "supported_aspect_ratios", "tile_image", "training_batch"]
