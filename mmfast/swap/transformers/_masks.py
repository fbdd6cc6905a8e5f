"""Hugging Face attention masks in flash_attention's terms (causal / interval / key padding).

transformers builds one mask per forward through ``AttentionMaskInterface[config._attn_implementation]``
and hands it to every layer. Registered under "mmfast", `build_mask` returns a `PaddedMask` for the two
patterns every covered model uses (causal and bidirectional, plus the 2-D padding mask) instead of the
dense (B, 1, Lq, Lk) bool tensor: the kernel arguments (and their block mask) are derived once per
forward from the padding row, no (L, L) pass. Any other pattern (sliding windows, packing detected from
position ids, or/and overlays) is kept lazy and densified by HF's own ``sdpa_mask`` only when used.

`kernel_mask` turns whatever reaches the attention function into flash_attention arguments, or a reason
to fall back to SDPA for that call.
"""
import torch

from mmfast.kernels import build_block_mask


def _hf():
    import transformers.masking_utils as mu
    return mu


class PaddedMask:
    """A mask as transformers' sdpa mask builder would produce it, kept in factored form.

    ``mode`` is "causal" (query at absolute position ``q_offset + i`` sees keys ``kv_offset + j`` up to
    itself), "bidirectional" or "lazy" (any other pattern: only ``dense()`` knows it). ``padding`` is
    HF's 2-D mask (True = a real token), already cut to the ``kv_length`` keys, or None.

    It stands in for the tensor wherever model code handles the mask: any tensor attribute or torch
    function used on it sees the dense bool mask HF would have built (so code we did not foresee gets
    the exact same values, only slower).
    """

    def __init__(self, mode, batch_size, q_length, kv_length, q_offset, kv_offset, padding, dense_fn):
        self.mode = mode
        self.batch_size, self.q_length, self.kv_length = batch_size, q_length, kv_length
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.padding = padding
        self._dense_fn = dense_fn
        self._dense = None
        self._kernel = {}  # (Lq, Lk, device) -> flash_attention mask kwargs, shared by every layer

    # the tensor face ---------------------------------------------------------------------------
    def dense(self):
        """HF's (B, 1, Lq, Lk) bool mask (True = attend), built on first use."""
        if self._dense is None:
            self._dense = self._dense_fn()
        return self._dense

    shape = property(lambda self: torch.Size((self.batch_size, 1, self.q_length, self.kv_length)))
    dtype = property(lambda self: torch.bool)
    ndim = property(lambda self: 4)
    device = property(lambda self: self.padding.device if self.padding is not None else self.dense().device)

    def dim(self):
        return 4

    def size(self, d=None):
        return self.shape if d is None else self.shape[d]

    def __getattr__(self, name):  # only for names not defined here: anything a tensor offers
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.dense(), name)

    def __getitem__(self, index):
        return self.dense()[index]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        dense = lambda x: x.dense() if isinstance(x, PaddedMask) else x  # noqa: E731
        args = [dense(a) if not isinstance(a, (list, tuple)) else type(a)(dense(x) for x in a) for a in args]
        return func(*args, **{k: dense(v) for k, v in (kwargs or {}).items()})

    def __repr__(self):
        return (f"PaddedMask({self.mode}, B={self.batch_size}, Lq={self.q_length}, Lk={self.kv_length}, "
                f"q_offset={self.q_offset}, kv_offset={self.kv_offset}, padding={self.padding is not None})")


def _query_offset(cache_position):
    """The 4.5x contract names the query positions (``cache_position``); the factored form needs them
    consecutive: their first, or None (any other layout is kept lazy)."""
    first = int(cache_position[0]) if cache_position.numel() else 0
    ok = torch.equal(cache_position, torch.arange(first, first + cache_position.numel(), device=cache_position.device))
    return first if ok else None


def build_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
               attention_mask=None, allow_is_causal_skip=True, allow_is_bidirectional_skip=False, use_vmap=False,
               device="cpu", cache_position=None, **kwargs):
    """The "mmfast" entry of ``AttentionMaskInterface``: `sdpa_mask`'s signature and meaning, returning
    None exactly where sdpa_mask does and a `PaddedMask` instead of its dense tensor otherwise.

    Both contracts are accepted; the call says which: 5.x passes ``q_length`` / ``q_offset``, 4.5x passes
    the query positions as ``cache_position`` (and slices nothing for us, has no bidirectional builder).
    """
    if isinstance(attention_mask, PaddedMask):
        # a mask already prepared (generate's static / sliding-window caches build it before the forward):
        # transformers returns a prepared 4-D mask as it is, but does not recognise a PaddedMask as one
        return attention_mask
    mu = _hf()
    mask_function = mu.causal_mask_function if mask_function is None else mask_function
    bidirectional = getattr(mu, "bidirectional_mask_function", None)
    local = kwargs.get("local_size")
    if cache_position is not None:      # the 4.5x contract
        q_length, device = cache_position.shape[0], cache_position.device
        dense_args = dict(batch_size=batch_size, cache_position=cache_position, kv_length=kv_length,
                          kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                          local_size=local)
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
        if allow_is_causal_skip and mu._ignore_causal_mask_sdpa(padding, q_length, kv_length, kv_offset, local):
            return None
        q_offset = _query_offset(cache_position)
    else:
        dense_args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                          kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                          use_vmap=use_vmap, device=device, allow_is_bidirectional_skip=False)
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if allow_is_causal_skip and mu._ignore_causal_mask_sdpa(padding, q_length, kv_length, q_offset, kv_offset,
                                                                local):
            return None
        if allow_is_bidirectional_skip and mu._ignore_bidirectional_mask_sdpa(padding, kv_length, local):
            return None
    if use_vmap or q_offset is None or mask_function not in (mu.causal_mask_function, bidirectional):
        mode, padding, q_offset = "lazy", None, 0 if q_offset is None else q_offset
    else:
        mode = "causal" if mask_function is mu.causal_mask_function else "bidirectional"
        if padding is not None:
            padding = padding[:, kv_offset:kv_offset + kv_length]
    # the dense fallback never skips: a PaddedMask stands for a mask that exists
    dense_args["allow_is_causal_skip"] = False
    return PaddedMask(mode, batch_size, q_length, kv_length, q_offset, kv_offset, padding,
                      lambda: mu.sdpa_mask(**dense_args))


# ------------------------------------------------------------------------------------------------
# -> flash_attention arguments


def _causal_kwargs(lq, lk, shift, device):
    """Row i sees keys j <= i + shift (the HF rule with offsets); bottom-right aligned when shift = Lk - Lq."""
    if shift == lk - lq:
        return dict(causal=True)
    end = (torch.arange(lq, device=device, dtype=torch.int32) + (shift + 1)).clamp_(0, lk)
    return dict(kv_end=end)


def _from_padded(mask, lq, lk, device):
    if mask.mode == "lazy" or (lq, lk) != (mask.q_length, mask.kv_length):
        return None
    kwargs = {}
    if mask.mode == "causal":
        kwargs = _causal_kwargs(lq, lk, int(mask.q_offset) - int(mask.kv_offset), device)
    if mask.padding is not None:
        kwargs["key_padding_mask"] = ~mask.padding.to(device=device, dtype=torch.bool)
    return kwargs


def _from_dense(mask, batch, lq, lk):
    """Rows of a bool (B|1, 1|H, Lq|1, Lk) mask as intervals + key padding; None if some row is not one
    interval of the unpadded keys, or heads differ."""
    if mask.dim() != 4 or mask.shape[-1] != lk or mask.shape[-2] not in (1, lq) or mask.shape[0] not in (1, batch):
        return None
    if mask.shape[1] != 1:
        if not bool((mask == mask[:, :1]).all()):
            return None
        mask = mask[:, :1]
    m = mask[:, 0].expand(mask.shape[0], lq, lk)
    padded = ~m.any(dim=1)                                    # keys no row sees: key padding
    idx = torch.arange(lk, device=m.device)
    first = torch.where(m, idx, lk).amin(-1)
    last = torch.where(m, idx, -1).amax(-1)
    empty = first > last                                      # rows seeing nothing: output 0 as SDPA's
    # a row is one interval of the unpadded keys iff [first, last] holds only visible or padded keys
    pads = torch.nn.functional.pad(padded.long().cumsum(-1), (1, 0))
    lo, hi = first.clamp(max=lk - 1), (last + 1).clamp(min=0)
    pads_inside = pads.gather(1, hi) - pads.gather(1, lo)
    contiguous = empty | (m.sum(-1) + pads_inside == last - first + 1)
    if not bool(contiguous.all()):
        return None
    start = torch.where(empty, 0, first).to(torch.int32)
    end = torch.where(empty, 0, last + 1).to(torch.int32)
    kwargs = dict(kv_start=start, kv_end=end)
    if bool(padded.any()):
        kwargs["key_padding_mask"] = padded.expand(batch, lk).contiguous()
    if start.shape[0] != batch:
        kwargs["kv_start"], kwargs["kv_end"] = start[0], end[0]
    return kwargs


def _float_as_bool(mask):
    """An additive mask of only 0 and "masked" values (<= finfo.min / 2, or -inf) as bool, when no row is
    fully masked: there the float mask gives a uniform softmax over all keys, which no bool mask does."""
    if not mask.is_floating_point():
        return None
    keep = mask == 0
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((keep | hidden).all()) or not bool(keep.any(-1).all()):
        return None
    return keep


def _why_not_bool(mask):
    if not mask.is_floating_point():
        return f"attention mask of dtype {mask.dtype}"
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    if bool(((mask == 0) | hidden).all()):
        # an eager-style mask (left-padding queries not unmasked, e.g. transformers 4.5x's OPT): such a row's
        # softmax (and its gradient) depends on how the implementation rounds; the fallback runs SDPA's, as
        # the stock sdpa model does, while no interval or padding form expresses it
        return "float attention mask with a row that hides every key"
    return "float attention mask with a bias (values other than 0 and the dtype's min / -inf)"


def kernel_mask(attention_mask, batch, lq, lk, device):
    """(flash_attention mask kwargs, None) or (None, the reason to fall back) for one call's mask.

    The kwargs may carry a ``block_mask`` built once per (mask, shapes) and reused by every layer.
    """
    if isinstance(attention_mask, PaddedMask):
        key = (lq, lk, str(device))
        if key not in attention_mask._kernel:
            kwargs = _from_padded(attention_mask, lq, lk, device)
            if kwargs is None:
                kwargs = _from_dense(attention_mask.dense().to(device), batch, lq, lk)
            if kwargs and batch == attention_mask.batch_size:
                kwargs = dict(block_mask=build_block_mask(lq, lk, device=device, **kwargs))
            attention_mask._kernel[key] = kwargs
        kwargs = attention_mask._kernel[key]
        return (kwargs, None) if kwargs is not None else (None, "mask pattern is not causal / interval / padding")
    if not isinstance(attention_mask, torch.Tensor):
        return None, f"attention mask of type {type(attention_mask).__name__}"
    if attention_mask.dtype != torch.bool:
        float_mask, attention_mask = attention_mask, _float_as_bool(attention_mask)
        if attention_mask is None:
            return None, _why_not_bool(float_mask)
    kwargs = _from_dense(attention_mask.to(device), batch, lq, lk)
    return (kwargs, None) if kwargs is not None else (None, "bool mask rows are not intervals of unpadded keys")
