"""Interval-mask builders: each pinned to a hand-written dense mask, and run through flash_attention
against SDPA with the equivalent dense mask (the property tests against slow loop definitions of the
models' masks are in test_attention_masks_properties.py: they need hypothesis)."""
import pytest
import torch
import torch.nn.functional as F
from attention_helpers import assert_mask

from mmfast.kernels.attention import masks


def rows(*lines):
    """Dense bool mask from strings of 0/1, one per query row."""
    return torch.tensor([[c == "1" for c in line.replace(" ", "")] for line in lines])


# ----------------------------------------------------------------------------------------------
# Pinned to hand-written masks


def test_causal_square():
    assert_mask(masks.causal(4), 4, rows("1000", "1100", "1110", "1111"))


def test_causal_bottom_right_more_keys():
    # flash-attn >= 2.1: the last query row lines up with the last key
    assert_mask(masks.causal(2, 5), 5, rows("11110", "11111"))


def test_causal_bottom_right_more_queries():
    assert_mask(masks.causal(5, 2), 2, rows("00", "00", "00", "10", "11"))


def test_prefix_lm():
    assert_mask(masks.prefix_lm(2, 5), 5, rows("11000", "11000", "11100", "11110", "11111"))


def test_prefix_lm_per_sample():
    expected = torch.stack([rows("100", "110", "111"), rows("111", "111", "111"), rows("100", "110", "111")])
    assert_mask(masks.prefix_lm(torch.tensor([1, 3, 0]), 3), 3, expected)


def test_qformer_masks():
    # BLIP-2, 2 queries then 3 text tokens (q0 q1 t0 t1 t2)
    m = masks.qformer_masks(2, 3)
    assert_mask(m.itc, 5, rows("11000", "11000", "00111", "00111", "00111"))
    assert_mask(m.itm, 5, rows("11111", "11111", "11111", "11111", "11111"))
    assert_mask(m.itg, 5, rows("11000", "11000", "11100", "11110", "11111"))


def test_media_intervals_flamingo_most_recent():
    # tokens: a <image> b c <image> d, 2 visual tokens per image, keys = [img0 img0 img1 img1]
    ids = torch.tensor([[5, 9, 6, 7, 9, 8]])
    expected = rows("0000", "1100", "1100", "1100", "0011", "0011")[None]
    assert_mask(masks.media_intervals(ids, 9, 2), 4, expected)


def test_media_intervals_all_previous():
    ids = torch.tensor([5, 9, 6, 9, 8])
    expected = rows("0000", "1100", "1100", "1111", "1111")
    assert_mask(masks.media_intervals(ids, 9, 2, mode="all_previous"), 4, expected)


def test_media_intervals_llama_groups():
    # Llama 3.2: <|image|><|image|> text <|image|> text; one visual token per image here
    ids = torch.tensor([9, 9, 1, 2, 9, 3])
    most_recent_group = rows("100", "110", "110", "110", "001", "001")
    most_recent = rows("100", "010", "010", "010", "001", "001")
    assert_mask(masks.media_intervals(ids, 9, 1, mode="most_recent_group"), 3, most_recent_group)
    assert_mask(masks.media_intervals(ids, 9, 1, mode="most_recent"), 3, most_recent)


def test_media_intervals_no_image():
    ids = torch.tensor([[1, 2, 3]])
    s, e = masks.media_intervals(ids, 9, 64)
    assert (s == 0).all() and (e == 0).all()


def test_document_intervals():
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    full = rows("110000", "110000", "001110", "001110", "001110", "000001")
    causal = rows("100000", "110000", "001000", "001100", "001110", "000001")
    assert_mask(masks.document_intervals(ids), 6, full)
    assert_mask(masks.document_intervals(ids, causal=True), 6, causal)
    assert_mask(masks.document_intervals(cu_seqlens=torch.tensor([0, 2, 5, 6])), 6, full)
    assert_mask(masks.document_intervals(cu_seqlens=torch.tensor([0, 2, 5, 6]), causal=True), 6, causal)


def test_intersect_and_from_dense():
    docs = masks.document_intervals(torch.tensor([0, 0, 0, 1, 1]))
    assert_mask(masks.intersect(docs, masks.causal(5)), 5, rows("10000", "11000", "11100", "00010", "00011"))
    dense = rows("0110", "0000", "1111")
    assert_mask(masks.intervals_from_dense(dense), 4, dense)
    with pytest.raises(ValueError, match=r"row \(1,\) is not one contiguous range"):
        masks.intervals_from_dense(rows("0110", "1010"))


@pytest.mark.parametrize("call, match", [
    (lambda: masks.causal(-1), r"masks.causal: seqlen_q must be in \[0, inf\], got -1"),
    (lambda: masks.causal(4, 2.0), "seqlen_k must be an int"),
    (lambda: masks.causal(4, device="gpu:x"), "device must be"),
    (lambda: masks.prefix_lm(5, 3), r"n_prefix must be in \[0, 3\], got 5"),
    (lambda: masks.prefix_lm(torch.tensor([4]), 3), r"n_prefix must lie in \[0, seqlen=3\]"),
    (lambda: masks.prefix_lm(torch.tensor([1.0]), 3), "n_prefix must be an int or an integer tensor"),
    (lambda: masks.qformer_masks(True, 3), "n_query must be an int"),
    (lambda: masks.qformer_masks(2, -3), "text_len must be in"),
    (lambda: masks.media_intervals(torch.tensor([1.0]), 9, 2), "token_ids must be an integer tensor"),
    (lambda: masks.media_intervals(torch.tensor([1]), "<image>", 2), "image_token_id must be an int"),
    (lambda: masks.media_intervals(torch.tensor([1]), 9, 0), r"tokens_per_image must be in \[1, inf\]"),
    (lambda: masks.media_intervals(torch.tensor([1]), 9, 2, mode="nearest"), "mode must be one of"),
    (lambda: masks.document_intervals(), "exactly one of doc_ids and cu_seqlens"),
    (lambda: masks.document_intervals(cu_seqlens=torch.tensor([0, 3, 2])), "non-decreasing"),
    (lambda: masks.document_intervals(torch.tensor([0, 0, 1]), causal="yes"), "causal must be True or False"),
    (lambda: masks.document_intervals(torch.tensor([0.0, 1.0])), "doc_ids must be an integer tensor"),
    (lambda: masks.intersect(), "at least one"),
    (lambda: masks.intersect(masks.causal(3), torch.zeros(3)), r"masks\[1\] must be a \(kv_start, kv_end\) pair"),
    (lambda: masks.intersect(masks.causal(3), (torch.zeros(3), torch.ones(3))), r"masks\[1\].kv_start must be an integer"),
    (lambda: masks.intersect(masks.causal(3), masks.causal(4)), "do not broadcast"),
    (lambda: masks.dense_mask(torch.zeros(3, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), 5), "same shape"),
    (lambda: masks.dense_mask(torch.zeros(3), torch.zeros(3), 5), "kv_start must be an integer tensor"),
    (lambda: masks.dense_mask(*masks.causal(3), -5), "seqlen_k must be in"),
    (lambda: masks.intervals_from_dense(torch.ones(3, 3)), "mask must be a boolean tensor"),
], ids=["causal-negative", "causal-float-length", "causal-bad-device", "prefix-too-long", "prefix-tensor-out-of-range",
        "prefix-float-tensor", "qformer-bool", "qformer-negative", "media-float-ids", "media-str-token",
        "media-zero-tokens", "media-bad-mode", "documents-no-input", "documents-not-monotone", "documents-causal-str",
        "documents-float-ids", "intersect-nothing", "intersect-not-a-pair", "intersect-float-bounds",
        "intersect-shapes", "dense-shape-mismatch", "dense-float-bounds", "dense-negative-length",
        "from-dense-not-bool"])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# Through the kernel: the builders' intervals mean to flash_attention what their dense masks mean to SDPA


def _media_ids():
    ids = torch.arange(23).repeat(2, 1)
    ids[0, [4, 5, 15]] = -1  # two adjacent images, then one
    ids[1, [0, 9]] = -1
    return ids


BUILT = {
    "causal-more-queries": lambda: (masks.causal(23, 17), 17),
    "prefix-lm": lambda: (masks.prefix_lm(torch.tensor([7, 0]), 23), 23),
    "qformer-itc": lambda: (masks.qformer_masks(8, 15).itc, 23),
    "qformer-itg": lambda: (masks.qformer_masks(8, 15).itg, 23),
    "media-most-recent": lambda: (masks.media_intervals(_media_ids(), -1, 5), 15),
    "media-most-recent-group": lambda: (masks.media_intervals(_media_ids(), -1, 5, mode="most_recent_group"), 15),
    "documents-causal": lambda: (masks.document_intervals(torch.tensor([0] * 9 + [1] * 13 + [2]), causal=True), 23),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", sorted(BUILT))
def test_intervals_through_flash_attention_match_sdpa_with_dense_mask(name, backend):
    from numerics import randn

    from mmfast.kernels import flash_attention

    (s, e), lk = BUILT[name]()
    q, k, v = randn(2, 23, 2, 16), randn(2, lk, 2, 16), randn(2, lk, 2, 16)
    got = flash_attention(q, k, v, kv_start=s, kv_end=e, backend=backend)
    dense = masks.dense_mask(s, e, lk).expand(2, 23, lk)[:, None]  # (B, 1, Lq, Lk), True = attend
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    expected = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=dense).transpose(1, 2)
    expected = torch.where(dense[:, 0].any(-1)[..., None, None], expected, 0.0)  # rows that see nothing: 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
