"""BLIP (v1): its attention never goes through transformers' AttentionInterface (eager matmuls), so each
``BlipAttention`` (vision, fused qkv) and ``BlipTextSelfAttention`` (text self- and cross-attention) gets
its forward replaced per instance by one that calls ``flash_attention``.

The text decoder's mask is the eager additive (B, 1, Lq, Lk) mask of causal + padding; each row of it is
one run of visible keys (left or right padding), so it becomes kv_start / kv_end. Rows that see no key
(left-padding queries) are recomputed by the eager formula (see `_bypass.eager_rows`): their outputs
feed the next token's prediction, so both their forward and their gradient must be the eager ones. The
cross-attention receives no mask in transformers 4.57 nor 5.x (``BlipTextAttention`` drops
``encoder_attention_mask``), and that is what runs here too. 4.5x's mask is BERT's (1 - m) * -10000.
"""
from .._core import original
from ._bypass import (Fallback, MaskMemo, attend, cache_keyword, cache_update, check_common, eager_rows, row_intervals,
                      swap_all, visible_keys)

TABLE = {  # class name -> (what it was, what runs now)
    "BlipAttention": ("eager softmax attention (vision, fused qkv)", "mmfast flash_attention"),
    "BlipTextSelfAttention": ("eager softmax attention (text self / cross)", "mmfast flash_attention (mask as intervals)"),
}


def _vision_forward(state):
    backend = state.options.backend

    def forward(self, hidden_states, **kwargs):
        try:
            check_common(self, self.dropout.p, kwargs)
        except Fallback as why:
            state.report.count_fallback(f"BlipAttention: {why}")
            return original(self)(hidden_states, **kwargs)
        B, L, E = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(B, L, 3, self.num_heads, E // self.num_heads)
        out = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.scale, backend)
        return self.projection(out.reshape(B, L, E)), None

    return forward


def _text_plan(mask, batch, seqlen_q):
    """kv_start, kv_end, dead rows (or None: no row is dead) for an eager additive mask; Fallback if the
    mask is not one run of visible keys per row."""
    visible = visible_keys(mask, batch, seqlen_q, mask.shape[-1])
    if visible is None:
        raise Fallback("attention mask is not 0 / finfo.min per (batch, query, key)")
    intervals = row_intervals(visible)
    if intervals is None:
        raise Fallback("a mask row is not one contiguous run of visible keys")
    start, end = intervals
    dead = end == start
    return start, end, (dead if bool(dead.any()) else None)


def _text_forward(state):
    backend = state.options.backend
    memo = MaskMemo()

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        is_cross = encoder_hidden_states is not None
        mask = encoder_attention_mask if is_cross else attention_mask
        B, Lq = hidden_states.shape[:2]
        try:
            check_common(self, self.dropout.p, kwargs)
            if getattr(self, "position_embedding_type", "absolute") != "absolute":   # 4.5x's relative positions
                raise Fallback(f"position_embedding_type={self.position_embedding_type!r}")
            plan = None if mask is None else memo.get(mask, lambda m: _text_plan(m, B, Lq))
        except Fallback as why:
            state.report.count_fallback(f"BlipTextSelfAttention: {why}")
            return original(self)(hidden_states, attention_mask=attention_mask,
                                  encoder_hidden_states=encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, **{cache_keyword(self): cache},
                                  **kwargs)
        d = self.attention_head_size
        q = self.query(hidden_states).view(B, Lq, -1, d)
        k, v = _keys_values(self, hidden_states, encoder_hidden_states, cache, kwargs)
        if plan is None:
            out = attend(q, k, v, d ** -0.5, backend)
        else:
            start, end, dead = plan
            out = attend(q, k, v, d ** -0.5, backend, kv_start=start, kv_end=end)
            if dead is not None:
                out = eager_rows(out, q, k, v, d ** -0.5, mask, dead)
        return out.reshape(B, Lq, self.all_head_size), None

    return forward


def _keys_values(self, hidden_states, encoder_hidden_states, cache, kwargs):
    """Keys and values (B, Lk, H, D) exactly as BlipTextSelfAttention computes and caches them."""
    from transformers.cache_utils import EncoderDecoderCache

    is_cross = encoder_hidden_states is not None
    is_updated, curr = False, cache
    if cache is not None and isinstance(cache, EncoderDecoderCache):
        is_updated = cache.is_updated.get(self.layer_idx)
        curr = cache.cross_attention_cache if is_cross else cache.self_attention_cache
    if is_cross and cache is not None and is_updated:
        k, v = curr.layers[self.layer_idx].keys, curr.layers[self.layer_idx].values
    else:
        current = encoder_hidden_states if is_cross else hidden_states
        shape = (*current.shape[:-1], -1, self.attention_head_size)
        k = self.key(current).view(shape).transpose(1, 2)
        v = self.value(current).view(shape).transpose(1, 2)
        if cache is not None:
            k, v = cache_update(curr, k, v, self.layer_idx, kwargs)
            if is_cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
    return k.transpose(1, 2), v.transpose(1, 2)


def patch_blip(model, options, state):
    """Swap every BLIP (v1) attention of `model` (any Blip* model: captioning, VQA, retrieval)."""
    from transformers.models.blip import modeling_blip, modeling_blip_text

    kinds = {}
    for cls, make in ((modeling_blip.BlipAttention, _vision_forward),
                      (modeling_blip_text.BlipTextSelfAttention, _text_forward)):
        kinds[cls] = (make, options.attention, "attention=False", *TABLE[cls.__name__])
    swap_all(model, state, kinds)


patch = patch_blip  # the entry point transformers' TABLE (extra="_blip") calls
