"""BLIP-2's Q-Former on transformers 4.5x: there ``Blip2QFormerMultiHeadAttention`` computes eager matmuls
instead of calling ``AttentionInterface`` (5.x calls it, and the interface swap covers it; nothing to do
here then). Each instance gets its forward replaced by one that hands HF's q / k / v and mask to
`_attention.mmfast_attention`, as 5.x's forward would: bidirectional (``is_causal=False``), scaling
1/sqrt(D), the Q-Former's own dtype (fp32 where transformers keeps it so). Its masks are the eager
additive ones: BERT's ``(1 - m) * -10000`` for self-attention (queries then text), ``invert_attention_mask``'s
finfo.min for the image; what the interface function cannot express falls back to SDPA for that call,
counted, as under 5.x.
"""
import torch

from .._core import original, set_instance_attr
from ._bypass import HIDDEN, Fallback, MaskMemo, check_common, eager_rows, forward_swapped, swap_all, to_blhd

WAS = "Blip2QFormerMultiHeadAttention (eager matmuls, 4.5x)"
NOW = "mmfast flash_attention (through the attention-interface function)"


def _mask_plan(mask, batch, seqlen_q):
    """(the mask in 5.x's form, dead rows (B, Lq) bool or None) for 4.5x's additive mask.

    Hidden entries (``<= HIDDEN``: BERT's -10000, finfo.min) become finfo.min, the only value the interface
    function reads as padding (by `_bypass.HIDDEN`'s rule, the same mask). A row that hides every key (an
    all-padding text) is no padding under -10000: eager's softmax then spreads over all keys, on scores each
    rounded after the shift. Such rows run unmasked in the kernel and are recomputed by the eager formula
    (`_bypass.eager_rows`) from the original mask."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise Fallback(f"attention mask of shape {tuple(mask.shape)} (expected (B, 1, Lq | 1, Lk))")
    hidden = mask <= HIDDEN
    dead = hidden.all(-1, keepdim=True)
    converted = mask.masked_fill(hidden, torch.finfo(mask.dtype).min).masked_fill(dead, 0.0)
    rows = dead[:, 0, :, 0].expand(batch, seqlen_q)
    return converted, (rows if bool(rows.any()) else None)


def _qformer_forward(state):
    from ._attention import mmfast_attention

    memo = MaskMemo()   # the layers of one forward share their mask: analyse it once

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, **kwargs):
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = attention_mask if encoder_hidden_states is None else encoder_attention_mask
        B, Lq = hidden_states.shape[:2]
        try:
            check_common(self, self.dropout.p, dict(kwargs, head_mask=head_mask))
            if encoder_hidden_states is not None and getattr(self, "save_attention", False):
                raise Fallback("save_attention (the cross-attention map kept for Grad-CAM)")
            if getattr(self, "position_embedding_type", "absolute") != "absolute":
                raise Fallback(f"position_embedding_type={self.position_embedding_type!r}")
            plan = None if mask is None else memo.get(mask, lambda m: _mask_plan(m, B, Lq))
        except Fallback as why:
            state.report.count_fallback(f"Blip2QFormerMultiHeadAttention: {why}")
            return original(self)(hidden_states, attention_mask=attention_mask, head_mask=head_mask,
                                  encoder_hidden_states=encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, **kwargs)
        d = self.attention_head_size

        def heads(x):  # (B, L, H·D) -> HF's (B, H, L, D) view
            return x.view(*x.shape[:2], -1, d).transpose(1, 2)

        q, k, v = heads(self.query(hidden_states)), heads(self.key(source)), heads(self.value(source))
        converted, dead = plan if plan is not None else (None, None)
        out, _ = mmfast_attention(self, q, k, v, converted, dropout=0.0, scaling=d ** -0.5, is_causal=False)
        if dead is not None:
            out = eager_rows(out, to_blhd(q), to_blhd(k), to_blhd(v), d ** -0.5, mask, dead)
        return out.reshape(B, Lq, self.all_head_size), None

    return forward


def patch_blip2(model, options, state):
    """Swap the Q-Former attention where it bypasses the interface (4.5x); else leave it to the interface."""
    from transformers.models.blip_2 import modeling_blip_2 as hf

    from . import _uses_interface
    from ._attention import CTX, AttentionContext

    cls = hf.Blip2QFormerMultiHeadAttention
    if _uses_interface(cls):
        return
    swap_all(model, state, {cls: (_qformer_forward, options.attention, "attention=False", WAS, NOW)})
    ctx = AttentionContext(options.backend, state.report)  # where mmfast_attention counts its fallbacks
    for module in model.modules():
        if type(module) is cls and forward_swapped(module):
            set_instance_attr(module, CTX, ctx)


patch = patch_blip2  # the entry point transformers' TABLE (extra="_blip2") calls
