"""flash_attention on packed (total, H, D) inputs with cu_seqlens: self- and cross-attention, intervals."""
import pytest
import torch
from attention_helpers import check_against_reference, qkv
from numerics import FLOAT_DTYPES, dtype_id, generator


def _cu(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _relative_intervals(lengths_q, lengths_k, device):
    g = generator()
    starts, ends = [], []
    for lq, lk in zip(lengths_q, lengths_k):
        a = torch.randint(0, lk + 1, (lq,), generator=g)
        b = torch.randint(0, lk + 1, (lq,), generator=g)
        starts.append(torch.minimum(a, b))
        ends.append(torch.maximum(a, b))
    return torch.cat(starts).to(device, torch.int32), torch.cat(ends).to(device, torch.int32)


VARLEN_CASES = {
    # name: (lengths_q, lengths_k, Hq, Hkv, D, mask)
    "self-causal": ([17, 77, 1, 40], [17, 77, 1, 40], 2, 2, 64, "causal"),
    "cross-tiles": ([9, 33, 20], [64, 5, 129], 2, 1, 80, "none"),  # e.g. text vs a varying number of image tiles
    "cross-empty-seq": ([12, 0, 30], [0, 7, 45], 2, 2, 40, "intervals"),  # a sequence with no keys, one with no queries
    "self-intervals-causal": ([45, 61], [45, 61], 4, 2, 64, "intervals+causal"),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_varlen_matches_reference(device, dtype, name):
    lengths_q, lengths_k, hq, hkv, d, kind = VARLEN_CASES[name]
    q, k, v = qkv(None, sum(lengths_q), sum(lengths_k), hq, hkv, d, dtype, device, varlen=True)
    mask = dict(cu_seqlens_q=_cu(lengths_q, device), cu_seqlens_k=_cu(lengths_k, device),
                max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k), causal="causal" in kind)
    if "intervals" in kind:
        mask["kv_start"], mask["kv_end"] = _relative_intervals(lengths_q, lengths_k, device)
    out, lse, _ = check_against_reference(q, k, v, **mask)
    assert lse.shape == (hq, sum(lengths_q))
    if name == "cross-empty-seq":  # the first sequence has no keys: its rows are exactly 0
        assert torch.all(out[: lengths_q[0]] == 0) and torch.all(lse[:, : lengths_q[0]] == float("-inf"))


def test_varlen_equals_padded_batch(device):
    """Packing two sequences gives the same rows as running each one alone (B = 1, no packing)."""
    from mmfast.kernels import flash_attention

    lengths = [37, 50]
    q, k, v = qkv(None, sum(lengths), sum(lengths), 2, 2, 64, torch.float32, device, varlen=True)
    cu = _cu(lengths, device)
    packed = flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=50, max_seqlen_k=50, causal=True,
                             backend="triton")
    for i, length in enumerate(lengths):
        s = slice(int(cu[i]), int(cu[i + 1]))
        alone = flash_attention(q[None, s], k[None, s], v[None, s], causal=True, backend="triton")[0]
        torch.testing.assert_close(packed[s], alone, rtol=0, atol=0)
