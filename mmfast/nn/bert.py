"""A BERT-style post-norm text transformer with optional cross-attention and a KV cache.

One stack serves BLIP's three roles ([CLS] unimodal encoder, [ENC] image-grounded encoder, [DEC] causal
decoder), ALBEF's text + fusion encoder (layers before ``cross_attention_from`` have no cross-attention)
and BLIP-2's Q-Former. Each layer is Hugging Face's ``BertLayer`` / ``BlipTextLayer``:

    x = LN(x + SelfAttn(x));  x = LN(x + CrossAttn(x, image))  (if given);  x = LN(x + W2·act(W1·x))

Attention runs through :class:`mmfast.nn.MultiheadAttention` (``flash_attention``): padding masks become
``key_padding_mask``, the decoder's mask ``causal=True`` (bottom-right aligned, which is also the mask of
a cached decoding step: new queries see every cached key).
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mmfast.kernels import flash_attention
from mmfast.kernels._common import check_bool, check_choice, check_int, check_scalar

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
MODES = ("multimodal", "text", "fusion")


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor = None
    cache: "KVCache" = None


class KVCache:
    """Keys and values of past decoding steps, per layer: self-attention (grows by the new tokens each
    step) and cross-attention (the image's, projected once at the first step).

    ``reorder(index)`` gathers the self-attention entries along the batch (beam search); the
    cross-attention entries are left alone because beam search only permutes beams of the same image,
    whose image keys are identical rows (pass ``cross=True`` for any other permutation).
    """

    def __init__(self):
        self.self_kv, self.cross_kv, self.length = {}, {}, 0

    def reorder(self, index, *, cross=False):
        self.self_kv = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.self_kv.items()}
        if cross:
            self.cross_kv = {i: (k.index_select(0, index), v.index_select(0, index))
                             for i, (k, v) in self.cross_kv.items()}


def _padding_mask(attention_mask, name, batch, length):
    """HF's (B, L) 1-keep / 0-pad mask -> flash_attention's True-is-padded key mask (None if nothing is padded)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, length):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"{name} must have shape ({batch}, {length}) (1 keep, 0 pad), got {shape}")
    return attention_mask == 0


def init_bert_weights(module, std=0.02):
    """BERT's initialisation (HF ``BertPreTrainedModel._init_weights``): linear and embedding weights
    N(0, std), biases and the padding row 0, LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _heads(x, n, d):
    return x.unflatten(-1, (n, d))


class BertEmbeddings(nn.Module):
    """word + position (+ token type) embeddings, then LayerNorm (HF ``BertEmbeddings`` / ``BlipTextEmbeddings``)."""

    def __init__(self, vocab_size, hidden_size, max_positions, *, type_vocab_size=0, pad_token_id=None,
                 layer_norm_eps=1e-12, dropout=0.0, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id, **f)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size, **f)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size, **f) if type_vocab_size else None
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps, **f)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids, *, position_ids=None, token_type_ids=None, past_length=0):
        length = input_ids.shape[1]
        if past_length + length > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {past_length + length} exceeds max_positions="
                             f"{self.position_embeddings.num_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=input_ids.device)[None]
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type_embeddings(types)
        return self.dropout(self.norm(x))


class BertLayer(nn.Module):
    """Post-norm layer: self-attention, optional cross-attention to `cross_attention_dim`-wide context, FFN."""

    def __init__(self, hidden_size, num_heads, intermediate_size, *, cross_attention_dim=None, layer_norm_eps=1e-12,
                 activation="gelu", dropout=0.0, backend="auto", device=None, dtype=None):
        super().__init__()
        from .attention import MultiheadAttention

        f = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(hidden_size, num_heads, backend=backend, **f)
        self.self_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps, **f)
        if cross_attention_dim is None:
            self.cross_attn = self.cross_norm = None
        else:
            self.cross_attn = MultiheadAttention(hidden_size, num_heads, kv_dim=cross_attention_dim, backend=backend, **f)
            self.cross_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps, **f)
        self.fc1 = nn.Linear(hidden_size, intermediate_size, **f)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, **f)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps, **f)
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def _self_attention(self, x, causal, key_padding_mask, cache, index):
        attn = self.self_attn
        if cache is None:
            return attn(x, causal=causal, key_padding_mask=key_padding_mask)
        H, D = attn.num_heads, attn.head_dim
        qkv = _heads(attn.qkv(x), 3 * H, D)
        q, k, v = qkv[..., :H, :], qkv[..., H:2 * H, :], qkv[..., 2 * H:, :]
        if index in cache.self_kv:
            past_k, past_v = cache.self_kv[index]
            k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
        cache.self_kv[index] = (k, v)
        o = flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, backend=attn.backend)
        return attn.out(o.flatten(-2))

    def _cross_attention(self, x, context, key_padding_mask, cache, index):
        attn = self.cross_attn
        if cache is None:
            return attn(x, context, key_padding_mask=key_padding_mask)
        H, D = attn.num_heads, attn.head_dim
        if index not in cache.cross_kv:
            kv = _heads(attn.kv(context), 2 * H, D)
            cache.cross_kv[index] = (kv[..., :H, :], kv[..., H:, :])
        k, v = cache.cross_kv[index]
        o = flash_attention(_heads(attn.q(x), H, D), k, v, key_padding_mask=key_padding_mask, backend=attn.backend)
        return attn.out(o.flatten(-2))

    def forward(self, x, context=None, *, causal=False, key_padding_mask=None, context_padding_mask=None, cache=None,
                index=0):
        x = self.self_norm(x + self.dropout(self._self_attention(x, causal, key_padding_mask, cache, index)))
        if context is not None and self.cross_attn is not None:
            y = self._cross_attention(x, context, context_padding_mask, cache, index)
            x = self.cross_norm(x + self.dropout(y))
        return self.ffn_norm(x + self.dropout(self.fc2(self.act(self.fc1(x)))))


class BertModel(nn.Module):
    """BERT text encoder / decoder with cross-attention in layers ``cross_attention_from`` .. ``num_layers - 1``.

    Args:
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size (default 4·hidden), max_positions.
        cross_attention_dim: width of the image features the cross-attention reads (None: no cross-attention).
        cross_attention_from: first layer with cross-attention (ALBEF's ``fusion_layer`` = 6; BLIP 0).
        type_vocab_size: token-type embeddings (BERT checkpoints: 2; BLIP: 0 = none).
        pad_token_id: the word embedding's padding_idx.
        layer_norm_eps, activation ("gelu", "gelu_tanh", "relu"), dropout (hidden dropout; attention has none).
        pooler: add BERT's tanh pooler on the first token (``pooler_output``).
        backend: forwarded to ``flash_attention``.

    ``forward`` modes (LAVIS' names): "multimodal" (embeddings and every layer; cross-attention where
    `encoder_hidden_states` is given), "text" (embeddings and the layers before ``cross_attention_from``;
    every layer, cross-attention skipped, when that is 0),
    "fusion" (the remaining layers on `encoder_embeds`, the text mode's output).
    """

    def __init__(self, vocab_size, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=None, *,
                 max_positions=512, cross_attention_dim=None, cross_attention_from=0, type_vocab_size=0,
                 pad_token_id=0, layer_norm_eps=1e-12, activation="gelu", dropout=0.0, pooler=False, backend="auto",
                 device=None, dtype=None):
        super().__init__()
        op = "BertModel"
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("max_positions", max_positions)):
            check_int(op, name, value, lo=1)
        intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        check_int(op, "intermediate_size", intermediate_size, lo=1)
        if cross_attention_dim is not None:
            check_int(op, "cross_attention_dim", cross_attention_dim, lo=1)
        check_int(op, "cross_attention_from", cross_attention_from, lo=0, hi=num_layers)
        check_int(op, "type_vocab_size", type_vocab_size, lo=0)
        if pad_token_id is not None:
            check_int(op, "pad_token_id", pad_token_id, lo=0, hi=vocab_size - 1)
        check_scalar(op, "layer_norm_eps", layer_norm_eps, lo=0.0, lo_open=True)
        check_choice(op, "activation", activation, tuple(ACTIVATIONS))
        check_scalar(op, "dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        check_bool(op, "pooler", pooler)
        f = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.vocab_size = hidden_size, num_heads, vocab_size
        self.cross_attention_from = cross_attention_from
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_positions, type_vocab_size=type_vocab_size,
                                         pad_token_id=pad_token_id, layer_norm_eps=layer_norm_eps, dropout=dropout, **f)
        self.layers = nn.ModuleList(
            BertLayer(hidden_size, num_heads, intermediate_size, layer_norm_eps=layer_norm_eps, activation=activation,
                      dropout=dropout, backend=backend,
                      cross_attention_dim=cross_attention_dim if i >= cross_attention_from else None, **f)
            for i in range(num_layers))
        self.pooler = nn.Linear(hidden_size, hidden_size, **f) if pooler else None
        if device is None or torch.device(device).type != "meta":
            with torch.no_grad():
                init_bert_weights(self)

    def forward(self, input_ids=None, attention_mask=None, *, position_ids=None, token_type_ids=None,
                encoder_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, causal=False,
                cache=None, mode="multimodal"):
        """input_ids (B, L); attention_mask (B, L) or, with a cache, (B, past + L), 1 keep / 0 pad;
        encoder_hidden_states (B, Li, cross_attention_dim) with encoder_attention_mask (B, Li);
        causal: the decoder's mask; cache: a :class:`KVCache` extended in place (decoding).
        Returns :class:`BertOutput` (last_hidden_state, pooler_output, cache)."""
        check_choice("BertModel", "mode", mode, MODES)
        if cache is not None and not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        past = 0 if cache is None else cache.length
        if mode == "fusion":
            if encoder_embeds is None:
                raise ValueError("mode='fusion' needs encoder_embeds (the output of mode='text')")
            x, layers = encoder_embeds, range(self.cross_attention_from, len(self.layers))
        else:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                raise ValueError(f"input_ids must be a (B, L) tensor, got {getattr(input_ids, 'shape', input_ids)}")
            x = self.embeddings(input_ids, position_ids=position_ids, token_type_ids=token_type_ids, past_length=past)
            # "text" runs the layers below the fusion layers; with cross-attention in every layer (BLIP) it is
            # the unimodal role of the whole stack
            text_only = mode == "text" and self.cross_attention_from > 0
            layers = range(self.cross_attention_from if text_only else len(self.layers))
        B, L = x.shape[:2]
        key_mask = _padding_mask(attention_mask, "attention_mask", B, past + L)
        context_mask = None
        if encoder_hidden_states is not None:
            context_mask = _padding_mask(encoder_attention_mask, "encoder_attention_mask", B,
                                         encoder_hidden_states.shape[1])
        if mode == "text":
            encoder_hidden_states = None
        for i in layers:
            x = self.layers[i](x, encoder_hidden_states, causal=causal, key_padding_mask=key_mask,
                               context_padding_mask=context_mask, cache=cache, index=i)
        if cache is not None:
            cache.length = past + L
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return BertOutput(last_hidden_state=x, pooler_output=pooled, cache=cache)


class BertLMHead(nn.Module):
    """BERT's prediction head: dense, activation, LayerNorm, then the vocabulary projection (with bias),
    whose weight may be the word embedding (``tie_to``)."""

    def __init__(self, hidden_size, vocab_size, *, layer_norm_eps=1e-12, activation="gelu", tie_to=None, device=None,
                 dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.transform = nn.Linear(hidden_size, hidden_size, **f)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps, **f)
        self.decoder = nn.Linear(hidden_size, vocab_size, **f)
        with torch.no_grad():
            init_bert_weights(self)
        if tie_to is not None:
            self.decoder.weight = tie_to.weight
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        return self.decoder(self.norm(self.act(self.transform(x))))


# Hugging Face BERT / BlipText names -> ours; q/k/v (and cross k/v) are concatenated into the fused weights.
_HF_LAYER = {
    "attention.output.dense": "self_attn.out", "attention.output.LayerNorm": "self_norm",
    "crossattention.self.query": "cross_attn.q", "crossattention.output.dense": "cross_attn.out",
    "crossattention.output.LayerNorm": "cross_norm", "intermediate.dense": "fc1", "output.dense": "fc2",
    "output.LayerNorm": "ffn_norm",
}
_HF_FUSED = {"attention.self": ("self_attn.qkv", ("query", "key", "value")),
             "crossattention.self": ("cross_attn.kv", ("key", "value"))}
_HF_TOP = {"embeddings.word_embeddings": "embeddings.word_embeddings",
           "embeddings.position_embeddings": "embeddings.position_embeddings",
           "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
           "embeddings.LayerNorm": "embeddings.norm", "pooler.dense": "pooler"}
_HF_HEAD = {"predictions.transform.dense": "transform", "predictions.transform.LayerNorm": "norm",
            "predictions.decoder": "decoder"}


def bert_state_dict_from_hf(state_dict, prefix="", head_prefix=None):
    """Our :class:`BertModel` state dict from a Hugging Face BERT-family one (``BertModel``, ``BlipTextModel``,
    LAVIS' ``med.py`` / ``xbert.py``) whose keys start with `prefix` (e.g. ``"text_encoder."``,
    ``"text_decoder.bert."``). With `head_prefix` (e.g. ``"text_decoder.cls."``) also returns the
    :class:`BertLMHead` state dict, else None. Keys outside the prefixes are ignored."""
    out, head, fused = {}, {}, {}
    for key, value in state_dict.items():
        if head_prefix is not None and key.startswith(head_prefix):
            name, _, leaf = key[len(head_prefix):].rpartition(".")
            if name in _HF_HEAD:
                head[f"{_HF_HEAD[name]}.{leaf}"] = value
            elif name == "predictions" and leaf == "bias":
                head.setdefault("decoder.bias", value)
            continue
        if not key.startswith(prefix):
            continue
        name, _, leaf = key[len(prefix):].rpartition(".")
        if name in _HF_TOP:
            out[f"{_HF_TOP[name]}.{leaf}"] = value
        elif name.startswith("encoder.layer."):
            index, _, rest = name[len("encoder.layer."):].partition(".")
            block, _, part = rest.rpartition(".")
            if rest in _HF_LAYER:
                out[f"layers.{index}.{_HF_LAYER[rest]}.{leaf}"] = value
            elif block in _HF_FUSED:
                fused.setdefault((index, block, leaf), {})[part] = value
    for (index, block, leaf), parts in fused.items():
        target, order = _HF_FUSED[block]
        out[f"layers.{index}.{target}.{leaf}"] = torch.cat([parts[p] for p in order])
    return out, (head if head_prefix is not None else None)
