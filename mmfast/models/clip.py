"""CLIP and SigLIP on mmfast's kernels: a ViT image tower, a text transformer (causal for CLIP), projections
and the learnable temperature of `ContrastiveLoss` (the softmax loss or SigLIP's sigmoid loss, gathered
over a process group when one is given); zero-shot classification with prompt ensembling. Converts from
Hugging Face ``CLIPModel`` / ``SiglipModel`` and from open_clip's ``CLIP``."""
import torch
from torch import nn
from torch.nn import functional as F

from mmfast.kernels._common import check_bool, check_choice, check_int, check_scalar
from mmfast.nn.contrastive import ContrastiveLoss
from mmfast.nn.transformer import ACTIVATIONS, TransformerEncoder

from ._common import (BaseModelOutputWithPooling, CLIPOutput, check_output_attentions, copy_weights, hf_return,
                      layer_pairs, module_pairs)
from .resnet import ModifiedResNet
from .vit import ViT, hf_activation

_HF_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "out": "self_attn.out_proj",
             "norm1": "layer_norm1", "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_OPEN_CLIP_LAYER = {"qkv": "attn", "out": "attn.out_proj", "norm1": "ln_1", "norm2": "ln_2", "fc1": "mlp.c_fc",
                    "fc2": "mlp.c_proj"}


def eos_positions(input_ids, pool, eos_token_id=None):
    """Where the sentence feature is read: "eos" — Hugging Face's rule (eos_token_id == 2, the legacy
    configs: argmax of the ids, the EOT having the highest id; otherwise the first eos_token_id), "argmax"
    (open_clip / OpenAI: the highest id), "last" (SigLIP: the last position)."""
    if pool == "last":
        return torch.full(input_ids.shape[:1], input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    ids = input_ids.to(torch.int)
    if pool == "argmax" or eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


class TextTransformer(nn.Module):
    """CLIP's text tower: token + learned position embeddings, pre-norm layers (causal for CLIP,
    bidirectional for SigLIP), final LayerNorm on every token, the sentence feature read at the EOS token
    (see `eos_positions`), optionally a linear ``head`` on it (SigLIP). ``attention_mask`` (B, L), 1 = token,
    0 = padding, as Hugging Face."""

    def __init__(self, vocab_size=49408, max_len=77, width=512, depth=12, num_heads=8, *, mlp_dim=None,
                 act="quick_gelu", norm_eps=1e-5, causal=True, pool="eos", eos_token_id=2, head_dim=None,
                 backend="auto"):
        super().__init__()
        op = "TextTransformer"
        for name, value in (("vocab_size", vocab_size), ("max_len", max_len), ("width", width)):
            check_int(op, name, value, lo=1)
        check_choice(op, "pool", pool, ("eos", "argmax", "last"))
        check_choice(op, "act", act, ACTIVATIONS)
        check_bool(op, "causal", causal)
        if pool == "eos":
            check_int(op, "eos_token_id", eos_token_id, lo=0)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_len, width)
        self.encoder = TransformerEncoder(width, depth, num_heads, mlp_dim=mlp_dim, act=act, norm_eps=norm_eps,
                                          backend=backend)
        self.final_norm = nn.LayerNorm(width, eps=norm_eps)
        self.head = nn.Linear(width, head_dim) if head_dim else None
        self.width, self.max_len, self.causal, self.pool, self.eos_token_id = width, max_len, causal, pool, eos_token_id

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, *, output_hidden_states=None,
                output_attentions=None, return_dict=None):
        """HF CLIPTextModel's inputs and output (hidden_states: the embeddings first, then each layer's output
        before the final norm); output_attentions=True raises ValueError (see check_output_attentions)."""
        check_output_attentions("TextTransformer", output_attentions)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (B, L) tensor of token ids")
        L = input_ids.shape[1]
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len={self.max_len}")
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(position_ids)
        pad = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                                 f"{tuple(attention_mask.shape)}")
            pad = attention_mask == 0
        x = self.encoder(x, causal=self.causal, key_padding_mask=pad, output_hidden_states=output_hidden_states)
        states = None
        if output_hidden_states:
            x, states = x[0], tuple(x[1])
        x = self.final_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos_positions(input_ids, self.pool, self.eos_token_id)]
        if self.head is not None:
            pooled = self.head(pooled)
        return hf_return(BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=states),
                         return_dict)


class CLIP(nn.Module):
    """Image tower + text tower + projections + learnable temperature; the HF CLIPModel / SiglipModel
    contract (``forward(input_ids, pixel_values, attention_mask, position_ids, return_loss,
    interpolate_pos_encoding)`` -> ``CLIPOutput`` with HF's field names).

    Args:
        vision: a `ViT` or the dict of its constructor arguments, or a `ModifiedResNet` (CLIP's RN towers,
            whose attention pool already projects to projection_dim: no visual_projection then).
        text: a `TextTransformer` or the dict of its constructor arguments.
        projection_dim: width of the shared embedding (bias-free projections of both towers' pooled
            features); None: no projections (SigLIP, whose towers end in their own heads).
        loss: "clip" (softmax InfoNCE, symmetric) or "siglip" (pairwise sigmoid, with a learned bias).
        init_logit_scale, init_logit_bias: the temperature's log and SigLIP's bias (ContrastiveLoss's
            defaults: log(1/0.07); log(10) and -10).
        max_scale: clamp of exp(logit_scale) (100, as open_clip; None: no clamp, as Hugging Face), used by
            the logits and the loss alike.
        group: a torch.distributed process group: the loss gathers the text (b) features over it and is the
            global batch's loss (gradients in DDP's convention; see `contrastive_loss`).
        backend: forwarded to every kernel ("auto" | "triton" | "reference"); loss_backend overrides it for
            the loss (e.g. "chunked").
    """

    def __init__(self, vision, text, *, projection_dim=512, loss="clip", init_logit_scale=None, init_logit_bias=-10.0,
                 max_scale=100.0, group=None, backend="auto", loss_backend=None):
        super().__init__()
        check_choice("CLIP", "loss", loss, ("clip", "siglip"))
        check_choice("CLIP", "backend", backend, ("auto", "triton", "reference"))
        if projection_dim is not None:
            check_int("CLIP", "projection_dim", projection_dim, lo=1)
        if max_scale is not None:
            check_scalar("CLIP", "max_scale", max_scale, lo=0.0, lo_open=True)
        resnet = isinstance(vision, ModifiedResNet)
        self.vision_model = vision if isinstance(vision, ViT) or resnet else ViT(**_tower_args("vision", vision,
                                                                                              backend))
        self.text_model = text if isinstance(text, TextTransformer) else TextTransformer(
            **_tower_args("text", text, backend))
        if projection_dim is None:
            self.visual_projection = self.text_projection = None
        else:
            if resnet and vision.output_dim != projection_dim:
                raise ValueError(f"CLIP: the ResNet tower's output_dim {vision.output_dim} must be projection_dim "
                                 f"{projection_dim}")
            self.visual_projection = None if resnet else nn.Linear(self.vision_model.embed_dim, projection_dim,
                                                                   bias=False)
            self.text_projection = nn.Linear(self.text_model.width, projection_dim, bias=False)
        self.contrastive = ContrastiveLoss(loss, init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias,
                                           max_scale=max_scale, group=group,
                                           backend=backend if loss_backend is None else loss_backend)
        self.kind, self.max_scale = loss, max_scale

    @property
    def logit_scale(self):
        return self.contrastive.logit_scale

    @property
    def logit_bias(self):
        return self.contrastive.logit_bias

    def scale(self):
        s = self.logit_scale.exp()
        return s.clamp(max=self.max_scale) if self.max_scale is not None else s

    def _image(self, pixel_values, interpolate_pos_encoding, output_hidden_states=False):
        out = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                output_hidden_states=output_hidden_states)
        proj = self.visual_projection
        return out, proj(out.pooler_output) if proj is not None else out.pooler_output

    def _text(self, input_ids, attention_mask, position_ids, output_hidden_states=False):
        out = self.text_model(input_ids, attention_mask, position_ids, output_hidden_states=output_hidden_states)
        proj = self.text_projection
        return out, proj(out.pooler_output) if proj is not None else out.pooler_output

    def get_image_features(self, pixel_values=None, interpolate_pos_encoding=False):
        """Projected, unnormalised image features (B, E) — a tensor, as transformers 4.x and open_clip's
        ``encode_image`` (transformers 5.x wraps it in an output object)."""
        return self._image(pixel_values, interpolate_pos_encoding)[1]

    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None):
        """Projected, unnormalised text features (B, E), a tensor (see get_image_features)."""
        return self._text(input_ids, attention_mask, position_ids)[1]

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, return_loss=None,
                interpolate_pos_encoding=False, *, output_attentions=None, output_hidden_states=None, return_dict=None):
        """HF CLIPModel.forward's arguments (in its order; the flags keyword-only, as its ``**kwargs``). The
        towers' outputs (with ``hidden_states`` when asked) are ``text_model_output`` /
        ``vision_model_output``; ``return_dict=False`` gives HF's tuple; ``output_attentions=True`` raises
        ValueError (flash_attention forms no probabilities)."""
        check_output_attentions("CLIP", output_attentions)
        vision_out, image_embeds = self._image(pixel_values, interpolate_pos_encoding, output_hidden_states)
        text_out, text_embeds = self._text(input_ids, attention_mask, position_ids, output_hidden_states)
        image_embeds = F.normalize(image_embeds, dim=-1)
        text_embeds = F.normalize(text_embeds, dim=-1)
        logits_per_text = text_embeds @ image_embeds.t() * self.scale()
        if self.kind == "siglip":
            logits_per_text = logits_per_text + self.logit_bias
        loss = None
        if return_loss:
            # CLIP: (CE over rows + CE over columns) / 2 is symmetric in the two towers; SigLIP's sum over
            # pairs sees text as rows, as Hugging Face's loss over logits_per_text
            a, b = (image_embeds, text_embeds) if self.kind == "clip" else (text_embeds, image_embeds)
            loss = self.contrastive(a, b)
        out = CLIPOutput(loss=loss, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                         text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text_out,
                         vision_model_output=vision_out)
        return hf_return(out, return_dict)

    # ---- zero-shot ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def zero_shot_classifier(self, class_names, templates, tokenizer):
        """The zero-shot head (K, E): per class, every template filled with its name (``"a photo of a
        {}."`` or a callable), encoded, L2-normalised, averaged (prompt ensembling) and normalised again,
        as CLIP's notebook and open_clip. `tokenizer(list_of_str)` returns a (n, L) tensor of ids (open_clip)
        or a mapping with ``input_ids`` [and ``attention_mask``] (a Hugging Face tokenizer called with
        padding and return_tensors="pt")."""
        if not class_names or not templates:
            raise ValueError("zero_shot_classifier: class_names and templates must be non-empty")
        if not callable(tokenizer):
            raise ValueError("zero_shot_classifier: tokenizer must be callable (list of str -> ids)")
        weights = []
        for name in class_names:
            texts = [t(name) if callable(t) else t.format(name) for t in templates]
            enc = tokenizer(texts)
            enc = {"input_ids": enc} if isinstance(enc, torch.Tensor) else dict(enc)
            device = self.logit_scale.device
            emb = F.normalize(self.get_text_features(enc["input_ids"].to(device),
                                                     enc.get("attention_mask", None)), dim=-1)
            weights.append(F.normalize(emb.mean(0), dim=-1))
        return torch.stack(weights)

    def zero_shot_logits(self, pixel_values, classifier):
        """Class logits (B, K) of images against a `zero_shot_classifier` head (scaled as the model's
        logits_per_image, plus SigLIP's bias); argmax is the prediction."""
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)
        logits = image @ classifier.t().to(image.dtype) * self.scale()
        return logits + self.logit_bias if self.kind == "siglip" else logits

    # ---- conversion -------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, *, backend="auto", group=None):
        """From a transformers ``CLIPModel`` or ``SiglipModel`` (weights copied, no download). Logits are
        unclamped (max_scale=None), as Hugging Face's."""
        name = type(hf_model).__name__
        if not (hasattr(hf_model, "vision_model") and hasattr(hf_model, "text_model")):
            raise ValueError(f"CLIP.from_hf expects a transformers CLIPModel or SiglipModel, got {name}")
        siglip = hasattr(hf_model, "logit_bias") and not hasattr(hf_model, "visual_projection")
        tc, vm = hf_model.config.text_config, hf_model.vision_model
        vision, vision_pairs = vision_from_hf(vm, backend)
        text = TextTransformer(tc.vocab_size, tc.max_position_embeddings, tc.hidden_size, tc.num_hidden_layers,
                               tc.num_attention_heads, mlp_dim=tc.intermediate_size,
                               act=hf_activation(tc.hidden_act, "CLIP.from_hf"), norm_eps=tc.layer_norm_eps,
                               causal=not siglip, pool="last" if siglip else "eos",
                               eos_token_id=getattr(tc, "eos_token_id", 2) if not siglip else 2,
                               head_dim=getattr(tc, "projection_size", tc.hidden_size) if siglip else None,
                               backend=backend)
        model = cls(vision, text, projection_dim=None if siglip else hf_model.config.projection_dim,
                    loss="siglip" if siglip else "clip", max_scale=None, group=group, backend=backend)
        ref = hf_model.logit_scale
        model = model.to(dtype=ref.dtype, device=ref.device)
        pairs = vision_pairs + model._hf_pairs(hf_model)
        copy_weights(pairs, "CLIP.from_hf")
        return model

    def _hf_pairs(self, hf):
        """(name, ours, theirs) for everything but the vision tower."""
        siglip, tm, t = self.kind == "siglip", hf.text_model, self.text_model
        pairs = [("logit_scale", self.logit_scale, hf.logit_scale),
                 ("logit_bias", self.logit_bias, hf.logit_bias if siglip else None)]
        if siglip:
            pairs += module_pairs("text.head", t.head, tm.head)
        else:
            pairs += [("visual_projection", self.visual_projection.weight, hf.visual_projection.weight),
                      ("text_projection", self.text_projection.weight, hf.text_projection.weight)]
        pairs += [("token_embedding", t.token_embedding.weight, tm.embeddings.token_embedding.weight),
                  ("text_position_embedding", t.position_embedding.weight, tm.embeddings.position_embedding.weight)]
        pairs += module_pairs("final_layer_norm", t.final_norm, tm.final_layer_norm)
        return pairs + layer_pairs(t.encoder, tm.encoder.layers, _HF_LAYER)

    def to_hf(self):
        """A transformers ``CLIPModel`` (or ``SiglipModel``) with these weights, for a model in that layout
        (as ``from_hf`` builds it; an open_clip conversion normalises every image token, which HF's
        last_hidden_state does not, so it is refused)."""
        import transformers

        v, t = self.vision_model, self.text_model
        if not isinstance(v, ViT):
            raise ValueError("CLIP.to_hf: transformers' CLIPModel has no ResNet image tower")
        siglip = self.kind == "siglip"
        layout = ((v.global_pool, v.final_norm, v.norm_pre is None, v.patch_embed.proj.bias is not None, t.pool,
                   t.causal) == (("map", "all", True, True, "last", False) if siglip else
                                 ("token", "pooled", False, False, "eos", True)))
        if (not layout or v.pos_embed_kind != "learn" or v.backbone is not None or not v.depth or not t.encoder.layers
                or (t.head is not None) != siglip):
            raise ValueError("CLIP.to_hf: only the Hugging Face layout converts (a model as CLIP.from_hf builds it)")

        def tower(layer, **kw):
            inv = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
            return dict(num_attention_heads=layer.attn.num_heads, intermediate_size=layer.mlp.fc1.out_features,
                        hidden_act=inv[layer.mlp.act], layer_norm_eps=layer.norm1.eps, **kw)

        vcfg = tower(v.encoder.layers[0], hidden_size=v.embed_dim, num_hidden_layers=v.depth, image_size=v.img_size,
                     patch_size=v.patch_size, num_channels=v.patch_embed.proj.in_channels)
        tcfg = tower(t.encoder.layers[0], hidden_size=t.width, num_hidden_layers=len(t.encoder.layers),
                     vocab_size=t.token_embedding.num_embeddings, max_position_embeddings=t.max_len)
        if siglip:
            tcfg["projection_size"] = t.head.out_features
            hf = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vcfg, text_config=tcfg))
        else:
            tcfg["eos_token_id"] = t.eos_token_id
            hf = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vcfg, text_config=tcfg,
                                                                projection_dim=self.visual_projection.out_features))
        hf = hf.to(dtype=self.logit_scale.dtype, device=self.logit_scale.device)
        pairs = hf_vision_pairs(v, hf.vision_model) + self._hf_pairs(hf)
        copy_weights([(name, theirs, ours) for name, ours, theirs in pairs], "CLIP.to_hf")
        return hf.eval()

    @classmethod
    def from_open_clip(cls, oc_model, *, backend="auto", group=None):
        """From an open_clip ``CLIP`` with a ViT or ResNet (``ModifiedResNet``, see mmfast.models.resnet) image
        tower (weights copied; the ResNet's attention pool's c_proj is its projection). Its ``visual.proj`` and
        ``text_projection`` ((D, E) matrices) become the projections' transposed weights; the image tower's
        ln_post normalises every token (open_clip's tokens), the text is pooled by open_clip's rule
        (``text_pool_type``: argmax / eos / last). Logits unclamped, as open_clip's forward."""
        import open_clip

        v = getattr(oc_model, "visual", None)
        resnet = isinstance(v, open_clip.modified_resnet.ModifiedResNet)
        if not (resnet or isinstance(v, open_clip.transformer.VisionTransformer)) or not hasattr(oc_model,
                                                                                                 "token_embedding"):
            raise ValueError(f"CLIP.from_open_clip expects an open_clip CLIP with a ViT or ModifiedResNet tower, got "
                             f"{type(oc_model).__name__}")
        if not resnet and (getattr(v, "attn_pool", None) is not None or v.pool_type != "tok" or v.final_ln_after_pool):
            raise ValueError("CLIP.from_open_clip: only [CLS] pooling with ln_post before pooling is supported")
        if getattr(oc_model, "logit_bias", None) is not None:
            raise ValueError("CLIP.from_open_clip: open_clip SigLIP models (logit_bias) are not supported")
        if not isinstance(oc_model.text_projection, nn.Parameter):
            raise ValueError("CLIP.from_open_clip: a text_projection Linear is not supported")

        def tower_args(resblocks):
            blk = resblocks[0]
            act = "quick_gelu" if isinstance(blk.mlp.gelu, open_clip.transformer.QuickGELU) else "gelu"
            if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
                raise ValueError("CLIP.from_open_clip: layer scale is not supported")
            return dict(act=act, norm_eps=blk.ln_1.eps, mlp_dim=blk.mlp.c_fc.out_features)

        if resnet:
            vision = ModifiedResNet.from_open_clip(v, backend=backend)
        else:
            vision = ViT(v.image_size[0], v.patch_size[0], v.conv1.in_channels, v.conv1.out_channels,
                         len(v.transformer.resblocks), v.transformer.resblocks[0].attn.num_heads,
                         patch_bias=v.conv1.bias is not None, pre_norm=isinstance(v.ln_pre, nn.LayerNorm),
                         final_norm="all", backend=backend, **tower_args(v.transformer.resblocks))
        tb = oc_model.transformer.resblocks
        pool = oc_model.text_pool_type
        if pool not in ("argmax", "eos", "last"):
            raise ValueError(f"CLIP.from_open_clip: text_pool_type {pool!r} is not supported")
        text = TextTransformer(oc_model.vocab_size, oc_model.context_length, oc_model.token_embedding.embedding_dim,
                               len(tb), tb[0].attn.num_heads, causal=oc_model.attn_mask is not None, pool=pool,
                               eos_token_id=getattr(oc_model, "text_eos_id", None) if pool == "eos" else 2,
                               backend=backend, **tower_args(tb))
        model = cls(vision, text, projection_dim=v.output_dim if resnet else v.proj.shape[1], max_scale=None,
                    group=group, backend=backend)
        ref = oc_model.logit_scale
        model = model.to(dtype=ref.dtype, device=ref.device)
        pairs = [("token_embedding", model.text_model.token_embedding.weight, oc_model.token_embedding.weight),
                 ("text.positional_embedding", model.text_model.position_embedding.weight,
                  oc_model.positional_embedding),
                 ("text_projection", model.text_projection.weight, oc_model.text_projection.t()),
                 ("logit_scale", model.logit_scale, oc_model.logit_scale)]
        pairs += module_pairs("ln_final", model.text_model.final_norm, oc_model.ln_final)
        pairs += layer_pairs(model.text_model.encoder, tb, _OPEN_CLIP_LAYER)
        if not resnet:  # the ResNet tower copied its own weights
            pairs += _open_clip_vit_pairs(model, v)
        copy_weights(pairs, "CLIP.from_open_clip")
        return model


def _open_clip_vit_pairs(model, v):
    ov = model.vision_model
    pairs = [("conv1.weight", ov.patch_embed.proj.weight, v.conv1.weight),
             ("conv1.bias", ov.patch_embed.proj.bias, v.conv1.bias),
             ("class_embedding", ov.patch_embed.cls_token, v.class_embedding),
             ("positional_embedding", ov.patch_embed.pos_embed, v.positional_embedding),
             ("visual.proj", model.visual_projection.weight, v.proj.t())]
    if ov.norm_pre is not None:
        pairs += module_pairs("ln_pre", ov.norm_pre, v.ln_pre)
    pairs += module_pairs("ln_post", ov.norm, v.ln_post)
    return pairs + layer_pairs(ov.encoder, v.transformer.resblocks, _OPEN_CLIP_LAYER)


def vision_from_hf(vm, backend="auto"):
    """A `ViT` for a transformers ``CLIPVisionModel`` or ``SiglipVisionModel`` (the ``vision_model`` of
    CLIPModel / SiglipModel; LLaVA's tower) and the (name, ours, theirs) weight pairs; the weights are
    copied by the caller (``ViT.from_hf`` or ``CLIP.from_hf``). CLIP: bias-free patch conv, [CLS],
    ``pre_layrnorm``, ``post_layernorm`` on the readout only; SigLIP: no [CLS], ``post_layernorm`` on every
    token, attention-pool head."""
    vc = vm.config
    siglip = not hasattr(vm, "pre_layrnorm")
    if siglip and not getattr(vm, "use_head", True):
        raise ValueError("vision_from_hf: a SigLIP vision tower without its pooling head has no image embedding")
    vision = ViT(vc.image_size, vc.patch_size, vc.num_channels, vc.hidden_size, vc.num_hidden_layers,
                 vc.num_attention_heads, mlp_dim=vc.intermediate_size, act=hf_activation(vc.hidden_act, "from_hf"),
                 norm_eps=vc.layer_norm_eps, patch_bias=siglip, class_token=not siglip,
                 global_pool="map" if siglip else "token", pre_norm=not siglip, final_norm="all" if siglip else "pooled",
                 pos_resample="hf", backend=backend)
    w = vm.embeddings.patch_embedding.weight
    vision = vision.to(dtype=w.dtype, device=w.device)
    return vision, hf_vision_pairs(vision, vm)


def hf_vision_pairs(vision, vm):
    """(name, ours, theirs) for a CLIP / SigLIP vision tower (see vision_from_hf)."""
    e, pe, siglip = vm.embeddings, vision.patch_embed, not hasattr(vm, "pre_layrnorm")
    pairs = [("patch_embedding.weight", pe.proj.weight, e.patch_embedding.weight),
             ("patch_embedding.bias", pe.proj.bias, e.patch_embedding.bias),
             ("class_embedding", pe.cls_token, getattr(e, "class_embedding", None)),
             ("position_embedding", pe.pos_embed, e.position_embedding.weight)]
    pairs += module_pairs("post_layernorm", vision.norm, vm.post_layernorm)
    pairs += layer_pairs(vision.encoder, vm.encoder.layers, _HF_LAYER)
    if siglip:
        head, mine = vm.head, vision.attn_pool
        pairs += [("head.probe", mine.probe, head.probe),
                  ("head.attention.in_proj_weight", mine.attn.qkv.weight, head.attention.in_proj_weight),
                  ("head.attention.in_proj_bias", mine.attn.qkv.bias, head.attention.in_proj_bias)]
        for name, ours, theirs in (("out_proj", mine.attn.out, head.attention.out_proj),
                                   ("layernorm", mine.norm, head.layernorm), ("fc1", mine.mlp.fc1, head.mlp.fc1),
                                   ("fc2", mine.mlp.fc2, head.mlp.fc2)):
            pairs += module_pairs(f"head.{name}", ours, theirs)
    else:
        pairs += module_pairs("pre_layrnorm", vision.norm_pre, vm.pre_layrnorm)
    return pairs


def _tower_args(kind, args, backend):
    if not isinstance(args, dict):
        raise ValueError(f"CLIP: {kind} must be a {'ViT' if kind == 'vision' else 'TextTransformer'} or a dict of "
                         f"its arguments, got {type(args).__name__}")
    return {"backend": backend, **args}
