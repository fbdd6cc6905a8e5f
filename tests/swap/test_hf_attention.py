"""The "mmfast" attention function and mask builder against transformers' own SDPA function and masks."""
import pytest
import torch

import hf_models as hf  # (skips without transformers)
from numerics import assert_close_by_rule, randn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers import masking_utils as mu

from mmfast.swap.transformers import _attention, _masks
from mmfast.swap.transformers._attention import AttentionContext, mmfast_attention
from mmfast.swap._core import SwapReport


def mask_args(batch_size, q_length, kv_length, q_offset=0, **kwargs):
    """Mask builder arguments in the installed transformers' contract."""
    if hf.MASK_CONTRACT_4X:
        return dict(batch_size=batch_size, cache_position=torch.arange(q_offset, q_offset + q_length),
                    kv_length=kv_length, **kwargs)
    return dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, **kwargs)


class Layer(torch.nn.Module):
    def __init__(self, is_causal=None, groups=1):
        super().__init__()
        if is_causal is not None:
            self.is_causal = is_causal
        self.num_key_value_groups = groups
        self.report = SwapReport("test")
        self.__dict__[_attention.CTX] = AttentionContext("reference", self.report)


def qkv(b, hq, hkv, lq, lk, d=8, dtype=torch.float32):
    # (B, L, H, D) storage viewed as (B, H, L, D): the non-contiguous views models hand over
    q, k, v = (randn(b, l, h, d, dtype=dtype).transpose(1, 2) for h, l in ((hq, lq), (hkv, lk), (hkv, lk)))
    return q, k, v


def check(layer, q, k, v, mask, ref_mask=None, **kw):
    """mmfast_attention vs sdpa_attention_forward: fp64 reference, fp32 yardstick."""
    ref_mask = mask if ref_mask is None else ref_mask
    got, weights = mmfast_attention(layer, q, k, v, mask, **kw)
    assert weights is None
    stock, _ = sdpa_attention_forward(layer, q, k, v, ref_mask, **kw)
    mask64 = ref_mask.double() if ref_mask is not None and ref_mask.is_floating_point() else ref_mask
    ref, _ = sdpa_attention_forward(layer, q.double(), k.double(), v.double(), mask64, **kw)
    assert got.shape == stock.shape  # (B, Lq, H, D)
    assert_close_by_rule(got, ref, stock)
    return got


@pytest.mark.parametrize("is_causal,attr,lq,lk", [
    (None, None, 7, 7),        # module without is_causal: HF's default True
    (None, False, 7, 7),       # module attribute
    (True, False, 7, 7),       # the kwarg wins (CLIP text)
    (True, None, 1, 9),        # decode step: one query, not causal
    (True, None, 5, 9),        # no mask, Lk > Lq (static cache prefill): top-left causal on the first Lq keys
    (False, None, 5, 9),       # cross-attention
], ids=["default", "attr-false", "kwarg-true", "decode", "static-prefill", "cross"])
def test_causality_rule(is_causal, attr, lq, lk):
    layer = Layer(attr)
    check(layer, *qkv(2, 4, 4, lq, lk), None, scaling=0.3, is_causal=is_causal)


@pytest.mark.parametrize("groups", [2, 4], ids=["gqa", "mqa"])
def test_gqa_reads_kv_heads_without_repeat(groups):
    layer = Layer(True, groups)
    check(layer, *qkv(2, 4, 4 // groups, 6, 6), None)


@pytest.mark.parametrize("q_offset,lq,lk", [(0, 7, 7), (4, 3, 7), (6, 1, 7)], ids=["prefill", "chunk", "decode"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_mask_builder_matches_sdpa_mask(side, q_offset, lq, lk):
    pad = (hf.left_padding if side == "left" else hf.right_padding)([7, 4], lk).bool()
    args = mask_args(2, lq, lk, q_offset, kv_offset=0, attention_mask=pad)
    mask = _masks.build_mask(**args)
    dense = mu.sdpa_mask(**args)
    assert isinstance(mask, _masks.PaddedMask) and mask.mode == "causal"
    assert torch.equal(mask.dense(), dense)
    layer = Layer(True, groups=2)
    check(layer, *qkv(2, 4, 2, lq, lk), mask, ref_mask=dense)
    assert not layer.report.fallbacks


def test_mask_builder_returns_none_where_sdpa_does():
    args = mask_args(2, 5, 5, attention_mask=torch.ones(2, 5, dtype=torch.bool))
    assert _masks.build_mask(**args) is None and mu.sdpa_mask(**args) is None


def test_query_offset_of_the_4x_contract():
    assert _masks._query_offset(torch.arange(3, 6)) == 3
    assert _masks._query_offset(torch.tensor([0, 2, 3])) is None


@pytest.mark.skipif(not hf.MASK_CONTRACT_4X, reason="this transformers' mask builders take q_length / q_offset")
def test_scattered_query_positions_stay_lazy():
    """4.5x: query positions that are not consecutive have no factored form; HF's own dense mask is used."""
    args = dict(batch_size=2, cache_position=torch.tensor([0, 2, 3]), kv_length=4,
                attention_mask=hf.left_padding([4, 3], 4).bool(), allow_is_causal_skip=False)
    mask = _masks.build_mask(**args)
    assert mask.mode == "lazy" and torch.equal(mask.dense(), mu.sdpa_mask(**args))


def test_padded_mask_tensor_face_is_the_dense_mask():
    pad = hf.right_padding([5, 3], 5).bool()
    args = mask_args(2, 5, 5, attention_mask=pad, allow_is_causal_skip=False)
    mask, dense = _masks.build_mask(**args), mu.sdpa_mask(**args)
    assert mask.shape == dense.shape and mask.dtype == torch.bool
    assert torch.equal(torch.where(mask, 1, 0), dense.long())
    assert torch.equal(mask[:, :, -1:], dense[:, :, -1:])
    assert torch.equal(mask.expand(2, 3, 5, 5), dense.expand(2, 3, 5, 5))


@pytest.mark.skipif(hf.MASK_CONTRACT_4X, reason="transformers 4.5x has no bidirectional mask builder")
def test_bidirectional_padding():
    pad = hf.right_padding([6, 2], 6).bool()
    bi = _masks.build_mask(2, 6, 6, mask_function=mu.bidirectional_mask_function, attention_mask=pad,
                           allow_is_causal_skip=False)
    assert bi.mode == "bidirectional"
    check(Layer(False), *qkv(2, 2, 2, 6, 6), bi, ref_mask=bi.dense())


def test_lazy_patterns():
    pad = hf.right_padding([6, 2], 6).bool()
    window = mu.sliding_window_causal_mask_function(3)  # not a pattern we factor: densified, still intervals
    lazy = _masks.build_mask(**mask_args(2, 6, 6, mask_function=window, attention_mask=pad, allow_is_causal_skip=False))
    assert lazy.mode == "lazy"
    layer = Layer(True)
    check(layer, *qkv(2, 2, 2, 6, 6), lazy, ref_mask=lazy.dense())
    assert not layer.report.fallbacks


def test_dense_masks():
    layer = Layer(True)
    q, k, v = qkv(2, 2, 2, 6, 6)
    block = torch.zeros(6, 6, dtype=torch.bool)
    block[:3, :3] = block[3:, 3:] = True                     # two packed sequences, bidirectional
    check(layer, q, k, v, block[None, None])
    as_float = torch.zeros(6, 6).masked_fill(~block, torch.finfo(torch.float32).min)
    check(layer, q, k, v, as_float[None, None])
    assert not layer.report.fallbacks


@pytest.mark.parametrize("case", ["float-bias", "row-hides-all", "holes", "dropout", "softcap"])
def test_fallbacks_are_exact_and_counted(case):
    layer = Layer(True)
    q, k, v = qkv(2, 2, 2, 6, 6)
    mask = None
    if case == "float-bias":
        mask = randn(2, 1, 6, 6)
    elif case == "row-hides-all":   # an eager-style causal mask, 2 left-padding queries not unmasked (4.5x's OPT)
        keep = torch.ones(6, 6, dtype=torch.bool).tril().repeat(2, 1, 1, 1)
        keep[1, :, :, :2] = False
        mask = torch.zeros(2, 1, 6, 6).masked_fill(~keep, torch.finfo(torch.float32).min)
    elif case == "holes":
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        mask[..., 1, 3] = False                               # row 1 sees keys {0..2, 4, 5}: not an interval
    if case == "dropout":
        torch.manual_seed(0)
        got, _ = mmfast_attention(layer, q, k, v, None, dropout=0.5)
        torch.manual_seed(0)
        stock, _ = sdpa_attention_forward(layer, q, k, v, None, dropout=0.5)
        torch.testing.assert_close(got, stock, rtol=0, atol=0)
    elif case == "softcap":
        got, _ = mmfast_attention(layer, q, k, v, None, softcap=5.0, scaling=1.0)
        s = torch.tanh((q @ k.transpose(-1, -2)) / 5.0) * 5.0
        s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(got, (s.softmax(-1) @ v).transpose(1, 2), rtol=1e-5, atol=1e-6)
    else:
        check(layer, q, k, v, mask)
    assert sum(layer.report.fallbacks.values()) == 1, layer.report.fallbacks
    if case == "row-hides-all":
        assert list(layer.report.fallbacks) == ["float attention mask with a row that hides every key"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_sequences_through_varlen(backend):
    """cu_seq_lens (DataCollatorWithFlattening): one row of three sequences = three separate causal calls;
    on "triton" (the interpreter on CPU) the varlen kernel path runs."""
    layer = Layer(True, groups=2)
    layer.__dict__[_attention.CTX] = AttentionContext(backend, layer.report)
    lens = [3, 5, 2]
    q, k, v = qkv(1, 4, 2, sum(lens), sum(lens))
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    with hf.OpCounter() as ops:
        got, _ = mmfast_attention(layer, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5,
                                  max_length_k=5)
    assert ops.counts["flash_attention_fwd"] == (backend == "triton")
    parts = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        parts.append(sdpa_attention_forward(layer, *(t[:, :, a:b] for t in (q, k, v)), None, is_causal=True)[0])
    torch.testing.assert_close(got, torch.cat(parts, dim=1), rtol=1e-5, atol=1e-6)
    assert not layer.report.fallbacks


def test_float64_and_registration():
    from mmfast.swap import transformers as integration
    from transformers import AttentionInterface

    integration.register()
    assert AttentionInterface._global_mapping["mmfast"] is mmfast_attention
    assert mu.AttentionMaskInterface._global_mapping["mmfast"] is _masks.build_mask
    check(Layer(True), *qkv(1, 2, 2, 5, 5, dtype=torch.float64), None)
