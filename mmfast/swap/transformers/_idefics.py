"""Idefics (v1): the Perceiver resampler's attention (eager einsums, no attention interface) and the gated
cross-attention layers, forward replaced per instance.

- ``IdeficsPerceiverAttention``: latents attend to ``[context; latents]`` → one ``flash_attention``
  (qk LayerNorms and the 1/√d scale kept exactly where transformers applies them).
- ``IdeficsGatedCrossAttentionLayer``: the image mask (B, 1, L, images·latents, 0 / finfo.min) becomes
  per-row key intervals (a text token sees the tokens of its image(s), one contiguous run); tokens that
  see no image are zeroed by ``cross_attention_gate`` in transformers, so here they skip attention and
  their update is masked inside ``tanh_gated_linear``. Both gated residuals (``alpha_cross_attn`` on
  o_proj, ``alpha_dense`` on down_proj; float or per-channel "vector" gates) run through
  ``tanh_gated_linear``.

Anything else (another mask form, dropout in training, a row that sees no image but whose gate is not 0)
runs the original code for that call, counted in the report.
"""
import torch

from .._core import original
from ._bypass import (Fallback, MaskMemo, attend, cache_keyword, check_common, gated_residuals, interface_for,
                      layer_kind, row_intervals, swap_all, visible_keys)


def _perceiver_forward(state):
    backend = state.options.backend

    def forward(self, context, latents):
        context = self.context_layer_norm(context)
        latents = self.latents_layer_norm(latents)
        B, n = latents.shape[:2]
        both = torch.cat([context, latents], dim=-2)
        q = self.q_proj(latents).view(B, n, self.n_heads, self.head_dim)
        k = self.k_proj(both).view(B, both.shape[1], self.n_heads, self.head_dim)
        v = self.v_proj(both).view(B, both.shape[1], self.n_heads, self.head_dim)
        if self.qk_layer_norms:  # over head_dim: the same on (B, L, H, D) as on transformers' (B, H, L, D)
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        out = attend(q, k, v, self.qk_scale, backend)
        return self.output_proj(out.reshape(B, n, -1))

    return forward


def _image_plan(mask):
    visible = visible_keys(mask, mask.shape[0], mask.shape[-2], mask.shape[-1])
    if visible is None:
        raise Fallback("image attention mask is not 0 / finfo.min")
    intervals = row_intervals(visible)
    if intervals is None:
        raise Fallback("a text token's images are not one contiguous run of image tokens")
    return intervals


def _gate_rows(gate):
    return gate == 0


def _cross_core(self, h, image_hidden_states, mask, plan, use_flash, backend, kwargs):
    """IdeficsAttention.forward as cross-attention, up to (not including) o_proj: (B, L, H·D)."""
    B, L, _ = h.shape
    K = image_hidden_states.shape[1]
    q = self.q_proj(h).view(B, L, self.num_heads, self.head_dim)
    k = self.k_proj(image_hidden_states).view(B, K, self.num_heads, self.head_dim)
    v = self.v_proj(image_hidden_states).view(B, K, self.num_heads, self.head_dim)
    if self.qk_layer_norms:
        q, k = self.q_layer_norm(q), self.k_layer_norm(k)
    if use_flash:
        start, end = plan if plan is not None else (None, None)
        out = attend(q, k, v, self.scaling, backend, kv_start=start, kv_end=end)
    else:
        from transformers.models.idefics import modeling_idefics as hf

        interface = interface_for(hf.ALL_ATTENTION_FUNCTIONS, self.config._attn_implementation,
                                  hf.eager_attention_forward)
        out, _ = interface(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                           dropout=0.0 if not self.training else self.dropout, scaling=self.scaling, **kwargs)
    return out.reshape(B, L, -1)


def _cross_layer_forward(state):
    options, mask_memo, gate_memo = state.options, MaskMemo(), MaskMemo()
    backend = options.backend

    def forward(self, hidden_states, attention_mask=None, image_hidden_states=None, image_attention_mask=None,
                cross_attention_gate=None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        args = dict(attention_mask=attention_mask, image_hidden_states=image_hidden_states,
                    image_attention_mask=image_attention_mask, cross_attention_gate=cross_attention_gate,
                    **{cache_keyword(self): cache})
        if image_hidden_states is None or cross_attention_gate is None or cache is not None:
            return original(self)(hidden_states, **args, **kwargs)  # transformers raises the error
        attn = self.cross_attn
        try:
            check_common(attn, attn.dropout if options.attention else 0.0, kwargs)
            if self.training and self.config > 0:  # transformers keeps the layer's dropout p in `.config`
                raise Fallback("hidden-state dropout > 0 in training")
            row_mask = gate_memo.get(cross_attention_gate, _gate_rows)
            plan = None
            if options.attention and image_attention_mask is not None:
                plan = mask_memo.get(image_attention_mask, _image_plan)
                if not bool(((plan[1] > plan[0]) | row_mask).all()):
                    raise Fallback("a text token sees no image but its cross_attention_gate is not 0")
        except Fallback as why:
            state.report.count_fallback(f"IdeficsGatedCrossAttentionLayer: {why}")
            return original(self)(hidden_states, **args, **kwargs)
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        o = _cross_core(attn, h, image_hidden_states, image_attention_mask, plan, options.attention, backend, kwargs)
        return gated_residuals(self, o, residual, self.alpha_cross_attn, self.alpha_dense, options, attn_rows=row_mask,
                               report=state.report)

    return forward


def patch_idefics(model, options, state):
    """Swap Idefics' Perceiver attention and its gated cross-attention layers."""
    from transformers.models.idefics import modeling_idefics as hf, perceiver

    kinds = {
        perceiver.IdeficsPerceiverAttention: (
            _perceiver_forward, options.attention, "attention=False",
            "IdeficsPerceiverAttention (eager einsum softmax)", "mmfast flash_attention"),
        hf.IdeficsGatedCrossAttentionLayer: layer_kind(
            _cross_layer_forward, options, "IdeficsGatedCrossAttentionLayer (float image mask, eager gates)",
            "flash_attention (image intervals)"),
    }
    swap_all(model, state, kinds)


patch = patch_idefics  # the entry point transformers' TABLE (extra="_idefics") calls
