"""Interval-mask builders checked against slow loop definitions of the models' masks over random inputs
(hypothesis, an optional package: without it this file is skipped with the reason; the pinned masks in
test_attention_masks.py still run)."""
import pytest
import torch
from attention_helpers import assert_mask, loop_mask

pytest.importorskip("hypothesis", reason="the property tests draw their inputs with hypothesis (an optional "
                                         "package; pip install -e .[dev])")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mmfast.kernels.attention import masks  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(lq=st.integers(0, 40), lk=st.integers(0, 40))
def test_causal_property(lq, lk):
    # flash-attn's definition: query i sees key j iff j <= i + lk - lq
    assert_mask(masks.causal(lq, lk), lk, loop_mask(lq, lk, lambda i, j: j <= i + lk - lq))


@SETTINGS
@given(seqlen=st.integers(0, 40), data=st.data())
def test_prefix_lm_property(seqlen, data):
    n = data.draw(st.integers(0, seqlen))
    assert_mask(masks.prefix_lm(n, seqlen), seqlen, loop_mask(seqlen, seqlen, lambda i, j: j < n or j <= i))


@SETTINGS
@given(nq=st.integers(0, 12), nt=st.integers(0, 12))
def test_qformer_property(nq, nt):
    n = nq + nt
    m = masks.qformer_masks(nq, nt)
    query = lambda i: i < nq  # noqa: E731
    assert_mask(m.itc, n, loop_mask(n, n, lambda i, j: query(i) == query(j)))
    assert_mask(m.itm, n, loop_mask(n, n, lambda i, j: True))
    # LAVIS "UniLM" decoder mask: query rows see query columns; text rows see queries and causal text
    assert_mask(m.itg, n, loop_mask(n, n, lambda i, j: query(j) if query(i) else (query(j) or j <= i)))


def flamingo_visible_images(ids, image_id, mode):
    """open_flamingo: text_time = cumsum(is_image); token sees image n (1-based) iff text_time == n
    (only_attend_immediate_media) or text_time >= n."""
    seen, out = 0, []
    for t in ids:
        seen += t == image_id
        out.append({n - 1 for n in range(1, seen + 1) if (n == seen if mode == "most_recent" else True)})
    return out


def mllama_visible_images(ids, image_id):
    """Hugging Face Mllama processor: image k is seen by tokens [pos_k, pos_{k+1}); when image k's
    placeholder is directly followed by the next one, its range is extended to the next image's end."""
    pos = [p for p, t in enumerate(ids) if t == image_id]
    ranges = [[p, (pos[k + 1] if k + 1 < len(pos) else len(ids))] for k, p in enumerate(pos)]
    for k in range(len(ranges) - 2, -1, -1):
        if ranges[k][1] == ranges[k][0] + 1:
            ranges[k][1] = ranges[k + 1][1]
    return [{k for k, (a, b) in enumerate(ranges) if a <= i < b} for i in range(len(ids))]


@SETTINGS
@given(ids=st.lists(st.lists(st.sampled_from([1, 2, 9]), min_size=12, max_size=12), min_size=1, max_size=3),
       tpi=st.integers(1, 3), mode=st.sampled_from(masks.MEDIA_MODES))
def test_media_intervals_property(ids, tpi, mode):
    token_ids = torch.tensor(ids)
    lk = 12 * tpi
    expected = []
    for row in ids:
        if mode == "most_recent_group":
            images = mllama_visible_images(row, 9)
        else:
            images = flamingo_visible_images(row, 9, mode)
        expected.append(loop_mask(len(row), lk, lambda i, j: j // tpi in images[i]))
    assert_mask(masks.media_intervals(token_ids, 9, tpi, mode=mode), lk, torch.stack(expected))


@SETTINGS
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=6), causal_=st.booleans())
def test_document_intervals_property(lengths, causal_):
    doc = [d for d, n in enumerate(lengths) for _ in range(n)]
    total = len(doc)
    expected = loop_mask(total, total, lambda i, j: doc[i] == doc[j] and (not causal_ or j <= i))
    cu = torch.tensor([0] + lengths).cumsum(0)
    assert_mask(masks.document_intervals(cu_seqlens=cu, causal=causal_), total, expected)
    assert_mask(masks.document_intervals(torch.tensor(doc, dtype=torch.int64), causal=causal_), total, expected)


@SETTINGS
@given(lq=st.integers(1, 10), lk=st.integers(1, 10), data=st.data())
def test_dense_round_trip_property(lq, lk, data):
    start = torch.tensor(data.draw(st.lists(st.integers(0, lk), min_size=lq, max_size=lq)))
    length = torch.tensor(data.draw(st.lists(st.integers(0, lk), min_size=lq, max_size=lq)))
    end = torch.minimum(start + length, torch.tensor(lk))
    dense = loop_mask(lq, lk, lambda i, j: start[i] <= j < end[i])
    assert torch.equal(masks.dense_mask(start, end, lk), dense)
    assert_mask(masks.intervals_from_dense(dense), lk, dense)
