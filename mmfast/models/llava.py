"""LLaVA / LLaVA-1.5 (Liu et al. 2023): a CLIP ViT's second-to-last layer features ([CLS] dropped) → a
linear (LLaVA) or Linear-GELU-Linear (1.5) projector → visual tokens written over the ``<image>``
placeholders of the prompt → a Llama / Vicuna decoder (``mmfast.nn.decoder.DecoderLM``).

Hugging Face's ``LlavaForConditionalGeneration`` (transformers 5) is the contract: the processor has
already expanded each ``<image>`` into one placeholder per visual token, and the features of all images,
in order, fill the placeholders of the batch in row-major order (``masked_scatter``)."""
import torch
from torch import nn

from mmfast.kernels._common import check_choice, check_int
from mmfast.nn.decoder import DecoderLM, DecoderLMOutput
from mmfast.nn.transformer import ACTIVATIONS, activation

from ._common import copy_weights, module_pairs
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
        projector_act: the MLP projector's activation (HF's ``projector_hidden_act``).
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
            raise ValueError(f"{_OP}: projector must be an nn.Module, 'linear' or 'mlp', got {type(projector).__name__}")
        self.projector = projector
        self.image_token_index = image_token_index
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    # ---- training presets --------------------------------------------------------------------------------
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

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with each image placeholder replaced by the next visual token (HF's
        ``get_placeholder_mask`` + ``masked_scatter``)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"{_OP}: input_ids must be a (B, L) tensor, got {getattr(input_ids, 'shape', input_ids)}")
        embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        features = self.get_image_features(pixel_values).to(embeds.dtype)
        mask = input_ids == self.image_token_index
        if int(mask.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"{_OP}: image features and image tokens do not match: tokens {int(mask.sum())}, "
                             f"features {features.shape[0] * features.shape[1]}")
        return embeds.masked_scatter(mask[..., None], features)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, *, cache=None,
                use_cache=False, labels=None, logits_to_keep=0, output_hidden_states=False):
        """HF ``LlavaForConditionalGeneration``'s inputs: input_ids (B, L) with one `image_token_index` per
        visual token; pixel_values (num_images, 3, H, W); attention_mask (B, L) 1 keep / 0 pad (left or right
        padding); labels: the shifted next-token cross-entropy, -100 ignored. position_ids default to the
        count of real tokens (HF's generate; its plain forward uses the column index on left-padded rows).
        Returns :class:`DecoderLMOutput` (loss, logits, cache, hidden_states)."""
        if cache is not None and cache.length and pixel_values is not None:
            raise ValueError(f"{_OP}: pixel_values go with the prompt, not with cached decoding steps")
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep,
                                   output_hidden_states=output_hidden_states)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kwargs):
        """HF's ``generate`` (greedy, beam search, sampling: see ``DecoderLM.generate``) from a prompt whose
        image placeholders hold the visual tokens; returns the prompt ids followed by the new tokens, as HF."""
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model.generate(input_ids, attention_mask, inputs_embeds=embeds, **kwargs)

    # ---- conversion --------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, *, backend="auto"):
        """From a transformers ``LlavaForConditionalGeneration`` (weights copied: the CLIP tower into a
        :class:`ViT`, the Llama body and ``lm_head`` into a :class:`DecoderLM`, the projector's
        ``linear_1`` / ``linear_2`` into a :class:`Projector`)."""
        if type(hf_model).__name__ != "LlavaForConditionalGeneration":
            raise ValueError(f"Llava.from_hf expects a transformers LlavaForConditionalGeneration, got "
                             f"{type(hf_model).__name__}")
        c, body = hf_model.config, hf_model.model
        tower = getattr(body.vision_tower, "vision_model", body.vision_tower)
        if not hasattr(tower, "pre_layrnorm"):
            raise ValueError(f"Llava.from_hf: only a CLIP vision tower is supported, got "
                             f"{type(body.vision_tower).__name__}")
        vision = ViT.from_hf(tower, backend=backend)
        lm = DecoderLM.from_hf(body.language_model, lm_head=hf_model.lm_head, backend=backend)
        p = body.multi_modal_projector
        w = p.linear_1.weight
        projector = Projector(w.shape[1], w.shape[0], act=hf_activation(c.projector_hidden_act, "Llava.from_hf"),
                        bias=p.linear_1.bias is not None).to(device=w.device, dtype=w.dtype)
        copy_weights(module_pairs("linear_1", projector.fc1, p.linear_1) + module_pairs("linear_2", projector.fc2,
                                                                                         p.linear_2), "Llava.from_hf")
        return cls(vision, projector, lm, c.image_token_id, vision_feature_layer=c.vision_feature_layer,
                   vision_feature_select_strategy=c.vision_feature_select_strategy)


__all__ = ["Llava", "Projector", "DecoderLMOutput"]
