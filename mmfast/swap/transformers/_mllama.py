"""Mllama (Llama 3.2 Vision): the two places whose masks the attention interface cannot express.

- Vision encoder (``MllamaVisionAttention``, local and global layers): transformers pads every tile's
  patches to a multiple of 8 (1601 → 1608) and builds the mask ``m mᵀ · finfo.min`` from the padding
  vector m (padded patches and unused tiles): only a padded query × padded key is hidden; real queries
  still see padded patches. Each forward here splits the keys into real (R) and padded (P):
  ``attention(R)`` with its log-sum-exp and ``attention(P)`` with its own, merged exactly for real
  queries; padded queries keep ``attention(R)``. Two flash calls over disjoint key sets, no dense mask.
- Text cross-attention layers (``MllamaCrossAttentionDecoderLayer``, forward replaced per instance):
  the cross mask (B, 1, L, images·tiles·patches) becomes per-row key intervals plus a key padding mask
  (unused tiles). Text rows before any image get an all-zero mask in transformers: they attend to every
  image token, padded tiles included, and that output IS added through tanh(cross_attn_attn_gate)
  (only the MLP branch is zeroed by ``full_text_row_masked_out_mask``). Those rows take
  ``attention(all keys)`` = merge of attention(visible) and attention(padded tiles). Both gated residuals
  run through ``tanh_gated_linear`` (o_proj / down_proj GEMM with gate, residual and the MLP's row mask
  in its epilogue), and so do the vision global layers' ``gate_attn`` / ``gate_ffn`` residuals.

Anything else (another mask form, dropout in training, attention weights requested) runs the original
code for that call, counted in the report. The tile patch embeddings (computed inline in
``MllamaVisionModel.forward``) go through ``tile_patch_embed``: see `_mllama_tiles`. The two split
attentions are ``mmfast.nn.split_attention``'s, which ``mmfast.models.Mllama`` runs too.
"""
import torch

from mmfast.nn.split_attention import cross_attention, cross_key_intervals, padded_self_attention

from .._core import original
from ._mllama_tiles import patch_tiles
from ._bypass import (Fallback, MaskMemo, attend, cache_keyword, cache_update, check_common, gated, gated_residuals,
                      interface_for, layer_kind, memo, swap_all, visible_keys)


# ---- vision encoder ------------------------------------------------------------------------------

def _vision_plan(mask):
    """The padding vector (B, N) of transformers' ``m mᵀ · finfo.min`` vision mask (None: nothing padded)."""
    B, N = mask.shape[0], mask.shape[-1]
    if mask.dim() != 4 or tuple(mask.shape[1:]) != (1, N, N):
        raise Fallback(f"vision mask of shape {tuple(mask.shape)}, not (B, 1, N, N)")
    visible = visible_keys(mask, B, N, N)
    if visible is None:
        raise Fallback("vision mask is not 0 / finfo.min")
    pad = ~torch.diagonal(visible, dim1=-2, dim2=-1)
    if not torch.equal(visible, ~(pad[:, :, None] & pad[:, None, :])):
        raise Fallback("vision mask is not transformers' padded-query x padded-key form")
    if not bool((~pad).any(-1).all()):
        raise Fallback("an image with no real patch (every row hidden)")
    return pad if bool(pad.any()) else None


def _vision_core(self, h, mask, pad, use_flash, backend):
    """MllamaVisionAttention.forward up to (not including) o_proj: (B, L, H·D)."""
    B, L, _ = h.shape
    shape = (B, L, self.num_heads, self.head_dim)
    q, k, v = (proj(h).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
    if use_flash:
        out = padded_self_attention(q, k, v, pad, softmax_scale=self.scaling, backend=backend)
    else:
        from transformers.models.mllama import modeling_mllama as hf

        interface = interface_for(hf.ALL_ATTENTION_FUNCTIONS, self.config._attn_implementation,
                                  hf.eager_attention_forward)
        out, _ = interface(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, dropout=0.0,
                           scaling=self.scaling)
    return out.reshape(B, L, -1)


def _vision_forward(state):
    backend, vision_memo = state.options.backend, memo(state, "mllama-vision")

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        try:
            check_common(self, 0.0, kwargs)
            pad = None if attention_mask is None else vision_memo.get(attention_mask, _vision_plan)
        except Fallback as why:
            state.report.count_fallback(f"MllamaVisionAttention: {why}")
            return original(self)(hidden_states, attention_mask=attention_mask, **kwargs)
        return self.o_proj(_vision_core(self, hidden_states, attention_mask, pad, True, backend)), None

    return forward


def _gated_vision_layer_forward(state):
    """The global encoder's layers: ``x + tanh(gate_attn)·o_proj(attn)``, ``x + tanh(gate_ffn)·fc2(act(fc1))``
    through tanh_gated_linear."""
    options, vision_memo = state.options, memo(state, "mllama-vision")

    # hidden_state=: MllamaVisionEncoder of transformers 5.17 passes the input under that keyword (the layer's
    # deprecated spelling, gone by 5.24); both spellings are accepted rather than a version compared
    def forward(self, hidden_states=None, attention_mask=None, hidden_state=None):
        if hidden_states is None:
            hidden_states = hidden_state
        attn = self.self_attn
        try:
            check_common(attn, 0.0)
            pad = None
            if options.attention and attention_mask is not None:
                pad = vision_memo.get(attention_mask, _vision_plan)
        except Fallback:  # counted once, by the swapped self_attn the original layer calls
            return original(self)(hidden_states, attention_mask=attention_mask)
        h = self.input_layernorm(hidden_states)
        o = _vision_core(attn, h, attention_mask, pad, options.attention, options.backend)
        x = gated(o, attn.o_proj, self.gate_attn, hidden_states, None, True, options.backend, state.report)
        a = self.mlp.activation_fn(self.mlp.fc1(self.post_attention_layernorm(x)))
        return gated(a, self.mlp.fc2, self.gate_ffn, x, None, True, options.backend, state.report)

    return forward


# ---- text cross-attention layers -----------------------------------------------------------------

def _cross_plan(mask):
    """kv_start / kv_end (B, L) and the padded keys (B, K) or None for transformers' cross-attention mask
    (B, 1, L, K). Rows that see every key (text before any image: HF's all-zero row) become empty
    intervals, which ``cross_attention(empty_rows="all_keys")`` runs over every key, padded tiles included."""
    B, L, K = mask.shape[0], mask.shape[-2], mask.shape[-1]
    visible = visible_keys(mask, B, L, K)
    if visible is None:
        raise Fallback("cross-attention mask is not 0 / finfo.min")
    if not bool(visible.any(-1).all()):
        raise Fallback("a cross-attention row that sees no key")
    plan = cross_key_intervals(visible & ~visible.all(-1, keepdim=True))
    if plan is None:
        raise Fallback("cross-attention mask rows are not one run of image tokens minus padded tiles")
    return plan


def _cross_attention(q, k, v, scale, plan, backend):
    if plan is None:
        return attend(q, k, v, scale, backend)
    start, end, pad = plan
    return cross_attention(q, k, v, start, end, pad, empty_rows="all_keys", softmax_scale=scale, backend=backend)


def _row_mask(full_text_row_masked_out_mask):
    m = full_text_row_masked_out_mask[:, 0, :, 0]
    if not bool(((m == 0) | (m == 1)).all()):
        raise Fallback("full_text_row_masked_out_mask holds values other than 0 / 1")
    return m == 0


def _cross_core(self, hidden_states, cross_attention_states, cache, mask, plan, use_flash, backend, kwargs):
    """MllamaTextCrossAttention.forward up to (not including) o_proj: (B, L, H·D)."""
    B, L, _ = hidden_states.shape
    q = self.q_norm(self.q_proj(hidden_states).view(B, L, self.num_heads, self.head_dim).transpose(1, 2))
    if cross_attention_states is not None:
        k = self.k_proj(cross_attention_states).view(B, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(cross_attention_states).view(B, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(k)
        if cache is not None:
            k, v = cache_update(cache, k, v, self.layer_idx, kwargs)
    else:
        k, v = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
    if use_flash:
        out = _cross_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scaling, plan, backend)
    else:
        from transformers.models.mllama import modeling_mllama as hf

        interface = interface_for(hf.ALL_ATTENTION_FUNCTIONS, self.config._attn_implementation,
                                  hf.eager_attention_forward)
        out, _ = interface(self, q, k, v, mask, dropout=0.0 if not self.training else self.dropout,
                           scaling=self.scaling, **kwargs)
    return out.reshape(B, L, -1)


def _cross_layer_forward(state):
    options, cross_memo, rows_memo = state.options, MaskMemo(), MaskMemo()
    backend = options.backend

    def forward(self, hidden_states, cross_attention_states=None, cross_attention_mask=None, attention_mask=None,
                full_text_row_masked_out_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        attn = self.cross_attn
        try:
            check_common(attn, attn.dropout if options.attention else 0.0, kwargs)
            plan = None
            if options.attention and cross_attention_mask is not None:
                plan = cross_memo.get(cross_attention_mask, _cross_plan)
            row_mask = None
            if full_text_row_masked_out_mask is not None:
                row_mask = rows_memo.get(full_text_row_masked_out_mask, _row_mask)
        except Fallback as why:
            state.report.count_fallback(f"MllamaCrossAttentionDecoderLayer: {why}")
            return original(self)(hidden_states, cross_attention_states=cross_attention_states,
                                  cross_attention_mask=cross_attention_mask, attention_mask=attention_mask,
                                  full_text_row_masked_out_mask=full_text_row_masked_out_mask,
                                  position_ids=position_ids, **{cache_keyword(self): cache}, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        o = _cross_core(attn, h, cross_attention_states, cache, cross_attention_mask, plan, options.attention,
                        backend, kwargs)
        return gated_residuals(self, o, residual, self.cross_attn_attn_gate, self.cross_attn_mlp_gate, options,
                               mlp_rows=row_mask, report=state.report)

    return forward


def patch_mllama(model, options, state):
    """Swap Mllama's vision attention (padding mask) and its text cross-attention layers."""
    from transformers.models.mllama import modeling_mllama as hf

    rows = {
        hf.MllamaVisionAttention: (
            _vision_forward, options.attention, "attention=False",
            "MllamaVisionAttention (float m·mᵀ padding mask)", "mmfast flash_attention (real / padded keys, merged)"),
        hf.MllamaCrossAttentionDecoderLayer: layer_kind(
            _cross_layer_forward, options, "MllamaCrossAttentionDecoderLayer (float cross mask, eager gates)",
            "flash_attention (intervals + tile padding)"),
    }
    swap_all(model, state, rows)
    # the global encoder's gated layers (not the local ones: no gates there)
    gated_rows = {hf.MllamaVisionEncoderLayer: (
        _gated_vision_layer_forward, options.gated, "gated=False",
        "MllamaVisionEncoderLayer (global, eager tanh gates)", "tanh_gated_linear (o_proj, fc2)")}
    swap_all(model, state, gated_rows, where=lambda module: module.is_gated)
    patch_tiles(model, options, state)


patch = patch_mllama  # the entry point transformers' TABLE (extra="_mllama") calls
