"""A compact decoder-only language model: Llama (RMSNorm, RoPE incl. Llama 3's scaling, SwiGLU, GQA) and
OPT (learned positions with OPT's offset 2, LayerNorm, ReLU MLP) as options of the same classes.

The language model of Flamingo, BLIP-2 (OPT), LLaVA (Llama / Vicuna) and Llama 3.2 Vision. Self-attention
is causal ``flash_attention`` with the padding of left- or right-padded batches as a key mask; decoding
extends a :class:`mmfast.nn.bert.KVCache` (a cached step's queries see every cached key: the kernel's
bottom-right aligned causal mask). Generation (greedy, beam search, nucleus sampling) runs the step
functions of ``mmfast.models.generation``.

Liger-Kernel (optional, the ``[liger]`` extra): when ``liger_kernel`` imports and the tensors are on CUDA,
RMSNorm, RoPE, SwiGLU and the training loss (fused linear cross-entropy) call its Triton kernels
(``mmfast.nn.liger``; ``MMFAST_LIGER=0`` turns them off); otherwise the PyTorch code beside each call runs.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mmfast.hf_compat import hf_rope_parameters
from mmfast.kernels import flash_attention
from mmfast.kernels._common import check_bool, check_choice, check_int, check_scalar

from .attention import MultiheadAttention, shared_padding_mask
from .bert import KVCache, init_bert_weights
from .plain import plain
from . import liger
from .rope import RotaryEmbedding, apply_rotary, position_ids_from_mask
from .transformer import Mlp

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "relu", "gelu")
POSITIONS = ("rope", "learned")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in fp32 and rounded to x's dtype before the weight
    multiplies (Hugging Face's ``LlamaRMSNorm``; ``torch.nn.RMSNorm`` rounds after, and differs in bf16)."""

    def __init__(self, dim, eps=1e-6, *, device=None, dtype=None):
        super().__init__()
        check_int("RMSNorm", "dim", dim, lo=1)
        check_scalar("RMSNorm", "eps", eps, lo=0.0, lo_open=True)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x):
        if liger.runs_on(x, "rms_norm"):
            return liger.rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)) (Llama's MLP). gate and up are one fused projection ``gate_up`` (rows
    [gate; up]): one GEMM instead of two."""

    def __init__(self, dim, hidden_dim, *, bias=False, device=None, dtype=None):
        super().__init__()
        check_int("SwiGLU", "dim", dim, lo=1)
        check_int("SwiGLU", "hidden_dim", hidden_dim, lo=1)
        check_bool("SwiGLU", "bias", bias)
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=bias, device=device, dtype=dtype)
        self.down = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        h = liger.swiglu(gate, up) if liger.runs_on(x) else F.silu(gate) * up
        return self.down(h)


def _norm(kind, dim, eps, factory):
    return RMSNorm(dim, eps, **factory) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps, **factory)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm1(x)); x + mlp(norm2(x)), causal self-attention with RoPE
    (Llama) or without (OPT), GQA through `num_kv_heads`, a KV cache for decoding.

    Args:
        dim, num_heads, mlp_dim; num_kv_heads: key/value heads (GQA; default num_heads).
        norm: "rmsnorm" (Llama) or "layernorm" (OPT); norm_eps.
        mlp: "swiglu" (Llama), "relu" (OPT) or "gelu" (fc1 -> act -> fc2).
        bias: biases on the attention projections; mlp_bias: on the MLP (default: `bias`).
        backend: forwarded to ``flash_attention``.
    """

    def __init__(self, dim, num_heads, mlp_dim, *, num_kv_heads=None, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
                 bias=False, mlp_bias=None, backend="auto", device=None, dtype=None):
        super().__init__()
        op = "DecoderLayer"
        check_choice(op, "norm", norm, NORMS)
        check_choice(op, "mlp", mlp, MLPS)
        check_scalar(op, "norm_eps", norm_eps, lo=0.0, lo_open=True)
        mlp_bias = bias if mlp_bias is None else mlp_bias
        factory = {"device": device, "dtype": dtype}
        self.norm1 = _norm(norm, dim, norm_eps, factory)
        self.attn = MultiheadAttention(dim, num_heads, num_kv_heads=num_kv_heads, bias=bias, backend=backend, **factory)
        self.norm2 = _norm(norm, dim, norm_eps, factory)
        if mlp == "swiglu":
            self.mlp = SwiGLU(dim, mlp_dim, bias=mlp_bias, **factory)
        else:
            self.mlp = Mlp(dim, mlp_dim, act=mlp, bias=mlp_bias, **factory)

    def _attention(self, x, rotary, key_padding_mask, cache, index, block_mask):
        attn = self.attn
        q, k, v = attn._project(x, None)
        if rotary is not None:
            q, k = apply_rotary(q, k, *rotary)
        if cache is not None:
            if index in cache.self_kv:
                past_k, past_v = cache.self_kv[index]
                k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
            cache.self_kv[index] = (k, v)
        masks = dict(block_mask=block_mask) if block_mask is not None else \
            dict(causal=True, key_padding_mask=key_padding_mask)
        o = flash_attention(q, k, v, **masks, softmax_scale=attn.softmax_scale, backend=attn.backend)
        return attn.out(o.flatten(-2))

    def forward(self, x, *, rotary=None, key_padding_mask=None, cache=None, index=0, block_mask=None):
        """x (B, L, dim); rotary: (cos, sin) (B, L, head_dim) or None; key_padding_mask (B, past + L) bool,
        True = padded; cache: a KVCache whose entry `index` this layer extends; block_mask: the causal +
        padding mask already built (``build_block_mask``, L x past + L), in place of key_padding_mask."""
        x = x + self._attention(self.norm1(x), rotary, key_padding_mask, cache, index, block_mask)
        return x + self.mlp(self.norm2(x))


@dataclass
class DecoderLMOutput:
    """Hugging Face's ``CausalLMOutputWithPast`` fields (transformers 5.x names the cache ``cache``)."""
    loss: torch.Tensor = None
    logits: torch.Tensor = None
    cache: KVCache = None
    hidden_states: tuple = None


class DecoderLM(nn.Module):
    """Decoder-only language model: token embeddings (+ learned positions for OPT), DecoderLayers, a final
    norm and the vocabulary projection ``lm_head`` (no bias; tied to the embeddings with
    `tie_word_embeddings`).

    Args:
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size (default 4·hidden).
        num_kv_heads, norm, norm_eps, mlp, bias, mlp_bias: as :class:`DecoderLayer`.
        positions: "rope" (rotary; `rope_theta`, `rope_scaling` = None or Llama 3's dict, see
            ``mmfast.nn.rope.rope_inv_freq``) or "learned" (OPT: a table of `max_positions` +
            `position_offset` rows, read at position + offset).
        pad_token_id, bos_token_id, eos_token_id: the defaults of ``generate`` (pad is the embedding's
            padding_idx, as transformers).
        backend: forwarded to ``flash_attention``.

    No dropout (the LMs of the vision-language models are frozen or fine-tuned without it).
    """

    def __init__(self, vocab_size, hidden_size, num_layers, num_heads, intermediate_size=None, *, num_kv_heads=None,
                 norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", bias=False, mlp_bias=None, positions="rope",
                 rope_theta=10000.0, rope_scaling=None, max_positions=None, position_offset=2,
                 tie_word_embeddings=False, pad_token_id=None, bos_token_id=None, eos_token_id=None, backend="auto",
                 device=None, dtype=None):
        super().__init__()
        op = "DecoderLM"
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("num_heads", num_heads)):
            check_int(op, name, value, lo=1)
        intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        check_int(op, "intermediate_size", intermediate_size, lo=1)
        check_choice(op, "positions", positions, POSITIONS)
        check_bool(op, "tie_word_embeddings", tie_word_embeddings)
        if pad_token_id is not None:
            check_int(op, "pad_token_id", pad_token_id, lo=0, hi=vocab_size - 1)
        factory = {"device": device, "dtype": dtype}
        self.vocab_size, self.hidden_size, self.num_heads = vocab_size, hidden_size, num_heads
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id, **factory)
        self.embed_positions = self.rotary = None
        if positions == "learned":
            check_int(op, "max_positions", max_positions, lo=1)
            check_int(op, "position_offset", position_offset, lo=0)
            self.position_offset = position_offset
            self.embed_positions = nn.Embedding(max_positions + position_offset, hidden_size, **factory)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_size, num_heads, intermediate_size, num_kv_heads=num_kv_heads, norm=norm,
                         norm_eps=norm_eps, mlp=mlp, bias=bias, mlp_bias=mlp_bias, backend=backend, **factory)
            for _ in range(num_layers))
        if positions == "rope":
            self.rotary = RotaryEmbedding(self.layers[0].attn.head_dim, rope_theta, rope_scaling, device=device)
        self.norm = _norm(norm, hidden_size, norm_eps, factory)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False, **factory)
        if device is None or torch.device(device).type != "meta":
            with torch.no_grad():  # transformers' Llama / OPT initialisation (initializer_range = init_std = 0.02)
                init_bert_weights(self, std=0.02)
        if tie_word_embeddings:  # after the initialisation, which would redraw the padding row through lm_head
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, position_ids=None, cache=None,
                use_cache=False, labels=None, logits_to_keep=0, output_hidden_states=False, layer_hook=None):
        """input_ids (B, L) or inputs_embeds (B, L, hidden) (soft prompts: BLIP-2, LLaVA); attention_mask
        (B, past + L) 1 keep / 0 pad, left or right padding; position_ids (B, L) default: counted from the
        mask (``mmfast.nn.rope.position_ids_from_mask``; pass Hugging Face's column index explicitly to
        reproduce its plain forward on left-padded rows); cache: a KVCache extended in place (made when
        `use_cache`); labels (B, L): Hugging Face's shifted next-token cross-entropy, -100 ignored;
        logits_to_keep: compute logits for the last n positions only (0: all); layer_hook: None or
        ``f(i, x) -> x`` applied to the hidden states before layer i (where Flamingo's gated
        cross-attention blocks go into a frozen LM, without another copy of this forward). A slot of
        ``layers`` may hold a module other than a :class:`DecoderLayer` (Llama 3.2 Vision's cross-attention
        layers replace self-attention layers): this forward does not run it, the hook does (it holds the
        media this LM does not know); without a hook such a slot is skipped (a text-only input, as HF).

        Returns :class:`DecoderLMOutput`. On CUDA with Liger-Kernel, training with labels computes the loss
        by its fused linear cross-entropy without materialising the logits (``logits`` is then None)."""
        op = "DecoderLM"
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{op}: give exactly one of input_ids and inputs_embeds")
        if cache is None and use_cache:
            cache = KVCache()
        if cache is not None and not isinstance(cache, KVCache):
            raise ValueError(f"{op}: cache must be a KVCache or None, got {type(cache).__name__}")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                raise ValueError(f"{op}: input_ids must be a (B, L) tensor, "
                                 f"got {getattr(input_ids, 'shape', input_ids)}")
            x = self.embed_tokens(input_ids)
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
                    or inputs_embeds.shape[-1] != self.hidden_size:
                raise ValueError(f"{op}: inputs_embeds must be (B, L, {self.hidden_size}), "
                                 f"got {getattr(inputs_embeds, 'shape', inputs_embeds)}")
            x = inputs_embeds
        check_int(op, "logits_to_keep", logits_to_keep, lo=0)
        (B, L), past = x.shape[:2], 0 if cache is None else cache.length
        key_mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, past + L):
                raise ValueError(f"{op}: attention_mask must have shape ({B}, {past + L}) (past + new tokens), "
                                 f"got {getattr(attention_mask, 'shape', attention_mask)}")
            key_mask = attention_mask == 0
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, L, past, device=x.device)
        elif tuple(position_ids.shape) not in ((B, L), (1, L)):
            raise ValueError(f"{op}: position_ids must have shape ({B}, {L}), got {tuple(position_ids.shape)}")
        rotary = None
        if self.embed_positions is not None:
            if past + L + self.position_offset > self.embed_positions.num_embeddings:
                raise ValueError(f"{op}: sequence length {past + L} exceeds max_positions="
                                 f"{self.embed_positions.num_embeddings - self.position_offset}")
            x = x + self.embed_positions(position_ids + self.position_offset)
        else:
            rotary = self.rotary(position_ids)
        first = next((m for m in self.layers if isinstance(m, DecoderLayer)), None)
        block_mask = None if first is None else shared_padding_mask(first.attn, L, past + L, causal=True,
                                                                    key_padding_mask=key_mask, device=x.device)
        states = [x]
        for i, layer in enumerate(self.layers):
            if layer_hook is not None:
                x = layer_hook(i, x)
            if isinstance(layer, DecoderLayer):
                x = layer(x, rotary=rotary, key_padding_mask=key_mask, cache=cache, index=i, block_mask=block_mask)
            states.append(x)
        if cache is not None:
            cache.length = past + L
        x = self.norm(x)
        loss = logits = None
        if labels is not None:
            loss, logits = self._loss(x, labels, logits_to_keep)
        else:
            logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        if output_hidden_states:  # HF's convention: the embeddings, each layer's output, the last one normed
            states[-1] = x
        return DecoderLMOutput(loss=loss, logits=logits, cache=cache,
                               hidden_states=tuple(states) if output_hidden_states else None)

    def _loss(self, x, labels, logits_to_keep):
        if tuple(labels.shape) != tuple(x.shape[:2]):
            raise ValueError(f"DecoderLM: labels must have shape {tuple(x.shape[:2])}, got {tuple(labels.shape)}")
        targets = labels[:, 1:].reshape(-1)
        if liger.runs_on(x) and self.training and plain(self.lm_head, nn.Linear) and self.lm_head.bias is None:
            return liger.linear_cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]), self.lm_head.weight, targets), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets, ignore_index=-100)
        return loss, (logits[:, -logits_to_keep:] if logits_to_keep else logits)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, max_new_tokens=None,
                 max_length=None, min_length=0, do_sample=False, num_beams=1, top_p=1.0, top_k=50, temperature=1.0,
                 length_penalty=1.0, early_stopping=False, eos_token_id=None, pad_token_id=None, generator=None,
                 layer_hook=None, step_layer_hook=None):
        """Hugging Face's ``generate`` for a decoder-only model: greedy, beam search (`num_beams` > 1) or
        sampling (`do_sample`: `temperature`, `top_k` (HF's default 50), `top_p`), over a KV cache, for
        left-padded batches (the mask is extended by one column per step; positions count real tokens).
        Lengths as HF: `max_length` counts the prompt, `max_new_tokens` does not; neither: max_length 20.
        `eos_token_id` (one id or a list: a row ends on any of them, as HF) / `pad_token_id` default to the
        model's (pad falls back to the first EOS id, as HF). With
        `inputs_embeds` (B, T, hidden) the prompt is those embeddings; without input_ids only the new tokens
        are returned, as HF. `layer_hook` goes to the prompt's forward and, unless `step_layer_hook` is given,
        to every decoding step's (with beams their batch is B · num_beams; a model's media hooks differ between
        the prompt's rows and a step's one row). Returns (B, prompt + new) int64 token ids."""
        from mmfast.models import generation

        op = "DecoderLM.generate"
        check_int(op, "num_beams", num_beams, lo=1)
        check_bool(op, "do_sample", do_sample)
        if num_beams > 1 and do_sample:
            raise ValueError(f"{op}: num_beams > 1 with do_sample=True (beam sampling) is not supported")
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        if eos is None:
            if min_length:
                raise ValueError(f"{op}: min_length needs an eos_token_id")
            eos = -1  # matches no token: every row decodes to max_length
        eos = generation.eos_ids(op, eos).tolist()  # one id or several (Llama 3): a row ends on any
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        # HF pads with the first EOS id when there is no pad id; 0 is never written when no row can finish
        pad = (eos[0] if eos[0] >= 0 else 0) if pad is None else pad
        ids_given = input_ids is not None
        if inputs_embeds is not None:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
                raise ValueError(f"{op}: inputs_embeds must be (B, T, hidden), got "
                                 f"{getattr(inputs_embeds, 'shape', inputs_embeds)}")
            if input_ids is None:  # placeholders: the step function reads the embeddings instead
                input_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"{op}: input_ids must be a (B, T) tensor, got {getattr(input_ids, 'shape', input_ids)}")
        prompt_len = input_ids.shape[1]
        if attention_mask is None and ids_given and inputs_embeds is None and pad >= 0 and pad not in eos \
                and bool((input_ids == pad).any()):
            attention_mask = (input_ids != pad).long()  # HF infers the padding from pad tokens in the prompt
        if max_new_tokens is not None:
            check_int(op, "max_new_tokens", max_new_tokens, lo=1)
            max_length = prompt_len + max_new_tokens
        elif max_length is None:
            max_length = 20
        if num_beams > 1:
            input_ids = input_ids.repeat_interleave(num_beams, 0)
            attention_mask = attention_mask.repeat_interleave(num_beams, 0) if attention_mask is not None else None
            inputs_embeds = inputs_embeds.repeat_interleave(num_beams, 0) if inputs_embeds is not None else None
        cache, state = KVCache(), {"mask": attention_mask}

        step_hook = layer_hook if step_layer_hook is None else step_layer_hook

        def step(tokens):
            if cache.length == 0:
                kw = {"input_ids": tokens} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
                hook = layer_hook
            else:
                kw, hook = {"input_ids": tokens}, step_hook
                if state["mask"] is not None:
                    state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(tokens.shape)], 1)
            return self(attention_mask=state["mask"], cache=cache, logits_to_keep=1, layer_hook=hook,
                        **kw).logits[:, -1]

        ends = dict(max_length=max_length, eos_token_id=eos, pad_token_id=pad, min_length=min_length)
        if num_beams > 1:
            out = generation.beam_search(step, cache.reorder, input_ids, num_beams=num_beams,
                                         length_penalty=length_penalty, early_stopping=early_stopping, **ends)
        elif do_sample:
            out = generation.nucleus_sampling(step, input_ids, top_p=top_p, top_k=top_k, temperature=temperature,
                                              generator=generator, **ends)
        else:
            out = generation.greedy_search(step, input_ids, **ends)
        return out if ids_given else out[:, prompt_len:]

    # ---- conversion and presets -------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, *, lm_head=None, backend="auto"):
        """From a transformers ``LlamaForCausalLM`` or ``OPTForCausalLM`` (pre-norm OPT: 125m, 1.3b, 2.7b,
        6.7b ...; BLIP-2's), or from the bare body (``LlamaModel``, ``OPTModel``: the ``language_model`` of
        LLaVA / BLIP-2 in transformers 5) with its `lm_head` given; weights copied into our modules, on
        the model's device and dtype. The head is tied when it shares the embeddings' weight."""
        from mmfast.models._common import copy_weights

        kind = type(hf_model).__name__
        bodies = {"LlamaForCausalLM": (_llama_pairs, lambda m: m.model), "LlamaModel": (_llama_pairs, lambda m: m),
                  "OPTForCausalLM": (_opt_pairs, lambda m: m.model.decoder),
                  "OPTModel": (_opt_pairs, lambda m: m.decoder)}
        if kind not in bodies:
            raise ValueError(f"DecoderLM.from_hf expects one of {tuple(bodies)}, got {kind}")
        convert, body_of = bodies[kind]
        lm_head = getattr(hf_model, "lm_head", None) if lm_head is None else lm_head
        if not isinstance(lm_head, nn.Linear):
            raise ValueError(f"DecoderLM.from_hf: a {kind} has no head: pass lm_head= (an nn.Linear), got "
                             f"{type(lm_head).__name__}")
        body, weight = body_of(hf_model), lm_head.weight
        kwargs, pairs_of = convert(hf_model.config)
        kwargs["eos_token_id"] = hf_eos_token_id(hf_model)
        tied = weight is body.embed_tokens.weight
        model = cls(**kwargs, tie_word_embeddings=tied, backend=backend, device=weight.device, dtype=weight.dtype)
        pairs = pairs_of(model, body)
        if not tied:
            pairs.append(("lm_head.weight", model.lm_head.weight, weight))
        copy_weights(pairs, f"DecoderLM.from_hf({kind})")
        return model

    @classmethod
    def from_preset(cls, name, **overrides):
        """A model of a named shape (``PRESETS``), random weights; `overrides` replace constructor arguments
        (``device="meta"`` for a parameter count without memory)."""
        check_choice("DecoderLM.from_preset", "name", name, tuple(PRESETS))
        return cls(**{**PRESETS[name], **overrides})


def hf_eos_token_id(hf_model):
    """The EOS id(s) Hugging Face's ``generate`` stops on: the model's ``generation_config.eos_token_id``
    (a list for Llama 3 / 3.2: [128001, 128008, 128009]), else its config's; a list stays a list."""
    eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    eos = getattr(hf_model.config, "eos_token_id", None) if eos is None else eos
    return [int(i) for i in eos] if isinstance(eos, (list, tuple)) else eos


def _ids(config):
    return {"pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id}


def _qkv(prefix, ours, attn):
    """Our fused qkv (weight and bias) from separate q_proj / k_proj / v_proj, and out from `out`."""
    pairs = [(f"{prefix}.qkv.weight", ours.qkv.weight,
              torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))]
    if ours.qkv.bias is not None:
        pairs.append((f"{prefix}.qkv.bias", ours.qkv.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias,
                                                                        attn.v_proj.bias])))
    out = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    return pairs + [(f"{prefix}.out.weight", ours.out.weight, out.weight),
                    (f"{prefix}.out.bias", ours.out.bias, out.bias)]


def _llama_pairs(c):
    if c.hidden_act != "silu":
        raise ValueError(f"DecoderLM.from_hf: hidden_act={c.hidden_act!r}; Llama's SwiGLU needs 'silu'")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"DecoderLM.from_hf: head_dim={head_dim} · heads != hidden_size={c.hidden_size} "
                         "is not supported (MultiheadAttention's head dim is hidden / heads)")
    rope = hf_rope_parameters(c)
    theta = rope.pop("rope_theta")
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise ValueError(f"DecoderLM.from_hf: rope_type={rope['rope_type']!r}; supported: default, llama3")
    kwargs = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                  num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                  num_kv_heads=c.num_key_value_heads, norm="rmsnorm", norm_eps=c.rms_norm_eps, mlp="swiglu",
                  bias=c.attention_bias, mlp_bias=c.mlp_bias, positions="rope", rope_theta=theta,
                  rope_scaling=rope if rope.get("rope_type", "default") != "default" else None, **_ids(c))

    def pairs(model, body):
        out = [("embed_tokens.weight", model.embed_tokens.weight, body.embed_tokens.weight),
               ("norm.weight", model.norm.weight, body.norm.weight)]
        for i, (ours, theirs) in enumerate(zip(model.layers, body.layers)):
            p, mlp = f"layers.{i}", theirs.mlp
            out += _qkv(f"{p}.attn", ours.attn, theirs.self_attn)
            out += [(f"{p}.norm1.weight", ours.norm1.weight, theirs.input_layernorm.weight),
                    (f"{p}.norm2.weight", ours.norm2.weight, theirs.post_attention_layernorm.weight),
                    (f"{p}.mlp.gate_up.weight", ours.mlp.gate_up.weight,
                     torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    (f"{p}.mlp.down.weight", ours.mlp.down.weight, mlp.down_proj.weight)]
            if ours.mlp.down.bias is not None:
                out += [(f"{p}.mlp.gate_up.bias", ours.mlp.gate_up.bias,
                         torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])),
                        (f"{p}.mlp.down.bias", ours.mlp.down.bias, mlp.down_proj.bias)]
        return out

    return kwargs, pairs


def _opt_pairs(c):
    if not c.do_layer_norm_before or c.word_embed_proj_dim != c.hidden_size or not c.layer_norm_elementwise_affine \
            or getattr(c, "_remove_final_layer_norm", False):
        raise ValueError("DecoderLM.from_hf: only pre-norm OPT with word_embed_proj_dim == hidden_size and affine "
                         "LayerNorms is supported (not OPT-350m's post-norm / projected layout)")
    check_choice("DecoderLM.from_hf", "activation_function", c.activation_function, ("relu", "gelu"))
    kwargs = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                  num_heads=c.num_attention_heads, intermediate_size=c.ffn_dim, norm="layernorm", norm_eps=1e-5,
                  mlp=c.activation_function, bias=c.enable_bias, positions="learned",
                  max_positions=c.max_position_embeddings, position_offset=2, **_ids(c))

    def pairs(model, body):
        from mmfast.models._common import module_pairs

        out = [("embed_tokens.weight", model.embed_tokens.weight, body.embed_tokens.weight),
               ("embed_positions.weight", model.embed_positions.weight, body.embed_positions.weight),
               *module_pairs("norm", model.norm, body.final_layer_norm)]
        for i, (ours, theirs) in enumerate(zip(model.layers, body.layers)):
            p = f"layers.{i}"
            out += _qkv(f"{p}.attn", ours.attn, theirs.self_attn)
            out += [*module_pairs(f"{p}.norm1", ours.norm1, theirs.self_attn_layer_norm),
                    *module_pairs(f"{p}.norm2", ours.norm2, theirs.final_layer_norm),
                    *module_pairs(f"{p}.mlp.fc1", ours.mlp.fc1, theirs.fc1),
                    *module_pairs(f"{p}.mlp.fc2", ours.mlp.fc2, theirs.fc2)]
        return out

    return kwargs, pairs


_LLAMA = dict(norm="rmsnorm", mlp="swiglu", bias=False, positions="rope")
_OPT = dict(norm="layernorm", norm_eps=1e-5, mlp="relu", bias=True, positions="learned", position_offset=2,
            tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)
# Shapes of the published checkpoints (their config.json); "tiny-*" for tests and examples
PRESETS = {
    "tiny-llama": dict(_LLAMA, vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128),
    "tiny-opt": dict(_OPT, vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     max_positions=64),
    # LLaVA-1.5-7B's language model
    "vicuna-7b": dict(_LLAMA, vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                      intermediate_size=11008, norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Llama 3.1 8B (Llama 3.2 11B Vision's text layers before the cross-attention ones are added)
    "llama-3.1-8b": dict(_LLAMA, vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                         intermediate_size=14336, norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=128001),
    # BLIP-2 OPT-2.7b's language model
    "opt-2.7b": dict(_OPT, vocab_size=50272, hidden_size=2560, num_layers=32, num_heads=32, intermediate_size=10240,
                     max_positions=2048),
}
