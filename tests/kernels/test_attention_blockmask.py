"""Block-sparse metadata: exact tile classification, hidden tiles never read, reuse across calls,
validation errors, and torch.compile tracing of flash_attention."""
import re

import pytest
import torch
from attention_helpers import qkv, random_intervals, random_padding, skip_unless_runs
from numerics import assert_bitwise_equal, assert_close_by_rule, randn

from mmfast.kernels import AttentionBlockMask, build_block_mask, flash_attention
from mmfast.kernels.reference import attention_dense_mask


def _brute_force_tiles(dense, tile, seqlen_k):
    """Tile classes from the dense mask (B', Lq, Lk): visible = any key seen; full = every row sees every
    key of a complete tile (rows past Lq don't count)."""
    mm, mn = tile
    b, lq, lk = dense.shape
    m_blocks, n_blocks = -(-lq // mm), -(-lk // mn)
    padded = torch.zeros(b, m_blocks * mm, n_blocks * mn, dtype=torch.bool)
    padded[:, :lq, :lk] = dense
    valid = torch.zeros(m_blocks * mm, dtype=torch.bool)
    valid[:lq] = True
    tiles = padded.view(b, m_blocks, mm, n_blocks, mn)
    visible = tiles.any(dim=(2, 4))
    rows_full = tiles.all(dim=4) | ~valid.view(1, m_blocks, mm, 1)
    complete = (torch.arange(n_blocks) + 1) * mn <= seqlen_k
    full = rows_full.all(dim=2) & complete & visible
    return visible, full


def _decode(num, idx):
    """Per-row lists -> dense flags."""
    listed = torch.arange(idx.shape[-1]) < num[..., None].long()
    return torch.zeros(idx.shape, dtype=torch.bool).scatter(-1, idx.long(), listed)


@pytest.mark.parametrize("tile", [(32, 32), (128, 64), (16, 48)], ids=lambda t: f"tile{t[0]}x{t[1]}")
@pytest.mark.parametrize("kind", ["none", "causal", "intervals+causal", "padding+intervals"])
def test_tile_classes_match_brute_force(tile, kind):
    b, lq, lk = 2, 197, 150
    mask = {"causal": "causal" in kind}
    if "intervals" in kind:
        mask["kv_start"], mask["kv_end"] = random_intervals(b, lq, lk, "cpu")
    if "padding" in kind:
        mask["key_padding_mask"] = random_padding(b, lk, "cpu")
    bm = build_block_mask(lq, lk, tile=tile, **mask)
    dense = attention_dense_mask(lq, lk, **mask)
    visible, full = _brute_force_tiles(dense, tile, lk)
    kv_full, kv_part = _decode(bm.kv_full_num, bm.kv_full_idx), _decode(bm.kv_part_num, bm.kv_part_idx)
    assert torch.equal(kv_full, full) and torch.equal(kv_part, visible & ~full)
    q_full, q_part = _decode(bm.q_full_num, bm.q_full_idx), _decode(bm.q_part_num, bm.q_part_idx)
    assert torch.equal(q_full, full.transpose(1, 2)) and torch.equal(q_part, (visible & ~full).transpose(1, 2))
    assert torch.equal(bm.dense().expand_as(dense), dense.expand(bm.dense().shape[0], -1, -1))
    assert bm.visible_pairs(batch=b) == int(dense.expand(b, -1, -1).sum())
    for lists in (bm.kv_full_idx, bm.kv_part_idx):  # visited in ascending order
        n = lists.shape[-1]
        assert torch.all(lists.sort(dim=-1).values == torch.arange(n, dtype=torch.int32))


@pytest.mark.parametrize("kind", ["intervals", "causal"])
def test_a_tile_reached_only_through_padded_keys_is_skipped(kind):
    """The tile's kept keys lie outside every row's range and the keys in range are padded: no row sees the
    tile, although it holds kept keys and ranges reach into it (a 1-in-130 flake of the random test above
    before the tile flags counted kept keys per row)."""
    pad = torch.tensor([[False, False, False, False, True, False, False, False]])
    if kind == "intervals":  # row 0 reaches keys 2, 3 of tile [0, 4) (padded); row 1 sees nothing
        pad = torch.tensor([[False, False, True, True, False, False, False, False]])
        args = dict(kv_start=torch.tensor([[2, 0]], dtype=torch.int32),
                    kv_end=torch.tensor([[4, 0]], dtype=torch.int32))
        hidden = 0
    else:  # bottom-right causal, Lq 5 of Lk 8: row 1 sees [0, 5), key 4 of tile [4, 8) padded
        args = dict(causal=True)
        hidden = 1
    lq = 2 if kind == "intervals" else 5
    bm = build_block_mask(lq, 8, tile=(2, 4), key_padding_mask=pad, **args)
    visible, full = _brute_force_tiles(attention_dense_mask(lq, 8, key_padding_mask=pad, **args), (2, 4), 8)
    assert not visible[0, 0, hidden]
    kv_full, kv_part = _decode(bm.kv_full_num, bm.kv_full_idx), _decode(bm.kv_part_num, bm.kv_part_idx)
    assert torch.equal(kv_full, full) and torch.equal(kv_part, visible & ~full)


def test_hidden_tiles_are_never_read(device):
    """NaN / inf in the keys and values of hidden KV tiles changes nothing, forward and backward:
    the kernels skip them entirely (a read would turn the output or gradients into NaN)."""
    b, lq, h, d = 2, 70, 2, 64
    tile_n = build_block_mask(8, 8, device=device).tile[1]
    lk = 4 * tile_n + 5
    start = torch.full((lq,), tile_n, dtype=torch.int32, device=device)
    end = torch.full((lq,), 2 * tile_n + 3, dtype=torch.int32, device=device)  # tiles 0, 3 and 4 hidden
    bm = build_block_mask(lq, lk, kv_start=start, kv_end=end, causal=False, device=device)
    full, partial, total = bm.visited_blocks()
    assert partial + full == bm.kv_full_num.shape[1] * 2 and total == bm.kv_full_num.shape[1] * 5
    q, k, v = qkv(b, lq, lk, h, h, d, torch.float16, device)
    dout = randn(b, lq, h, d, dtype=torch.float16, device=device)
    results = []
    for poison in (False, True):
        kk, vv = k.clone(), v.clone()
        if poison:
            for t in (kk, vv):
                t[:, :tile_n] = float("nan")
                t[:, 3 * tile_n:] = float("inf")
        leaves = [t.clone().requires_grad_() for t in (q, kk, vv)]
        out = flash_attention(*leaves, block_mask=bm, backend="triton")
        out.backward(dout)
        results.append([out] + [t.grad for t in leaves])
    for name, clean, poisoned in zip(("out", "dq", "dk", "dv"), *results):
        assert_bitwise_equal(poisoned, clean, what=name)
    dk = results[1][2]
    assert torch.all(dk[:, :tile_n] == 0) and torch.all(dk[:, 3 * tile_n:] == 0)


def test_block_mask_reuse_is_identical(device):
    """A prebuilt block mask (shared by layers) gives bitwise the same results as the mask arguments."""
    b, lq, lk = 2, 45, 77
    start, end = random_intervals(b, lq, lk, device)
    pad = random_padding(b, lk, device)
    bm = build_block_mask(lq, lk, kv_start=start, kv_end=end, key_padding_mask=pad, causal=True, device=device)
    assert isinstance(bm, AttentionBlockMask) and "AttentionBlockMask" in repr(bm)
    for d in (40, 64):  # two "layers" with different head dims share one block mask
        q, k, v = qkv(b, lq, lk, 2, 1, d, torch.bfloat16, device)
        got, lse = flash_attention(q, k, v, block_mask=bm, return_lse=True, backend="triton")
        want, lse2 = flash_attention(q, k, v, kv_start=start, kv_end=end, key_padding_mask=pad, causal=True,
                                     return_lse=True, backend="triton")
        assert_bitwise_equal(got, want, what=f"out D={d}")
        assert_bitwise_equal(lse, lse2, what=f"lse D={d}")
        ref = flash_attention(q, k, v, block_mask=bm, backend="reference")
        assert (ref.double() - got.double()).abs().max() < 3e-2


def test_block_mask_varlen(device):
    lengths_q, lengths_k = [20, 45], [33, 9]
    cu_q = torch.tensor([0, 20, 65], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 33, 42], dtype=torch.int32, device=device)
    q, k, v = qkv(None, 65, 42, 2, 2, 64, torch.float32, device, varlen=True)
    args = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=45, max_seqlen_k=33, causal=True)
    bm = build_block_mask(**args)
    got = flash_attention(q, k, v, block_mask=bm, backend="triton")
    want = flash_attention(q, k, v, backend="triton", **args)
    assert_bitwise_equal(got, want, what="varlen block mask")
    with pytest.raises(ValueError, match="pack 65 queries and 42 keys"):
        flash_attention(q, k[:40], v[:40], block_mask=bm, backend="triton")
    assert lengths_q and lengths_k


def _errors():
    q, k, v = qkv(2, 5, 7, 4, 2, 16, torch.float32, "cpu")
    i32 = lambda *a: torch.tensor(a, dtype=torch.int32)  # noqa: E731
    cases = {
        "q-3d-without-cu_seqlens": ((q[0], k, v), {}, "shape"),
        "batch-mismatch": ((q, k[:1], v[:1]), {}, "batch"),
        "head-dim-mismatch": ((q, k[..., :8], v[..., :8]), {}, "head_dim"),
        "heads-not-multiple": ((q[:, :, :3], k, v), {}, "multiple"),
        "float64-on-triton": ((q.double(), k.double(), v.double()), {"backend": "triton"},
                              "q must be float16, bfloat16 or float32 on this backend"),
        "float-int-q": ((q.int(), k, v), {}, "q must be one of"),
        "mixed-dtypes": ((q, k.half(), v.half()), {}, "dtype"),
        "other-device": ((q, k.to("meta"), v.to("meta")), {}, "device"),
        "last-dim-strided": ((torch.randn(2, 5, 16, 4).transpose(-1, -2), k, v), {}, "contiguous"),
        "kv-shapes-differ": ((q, k, v[:, :6]), {}, "same shape"),
        "head-dim-257": ((torch.randn(1, 3, 1, 257), torch.randn(1, 3, 1, 257), torch.randn(1, 3, 1, 257)), {}, "head_dim"),
        "kv_start-int64": ((q, k, v), {"kv_start": torch.zeros(5, dtype=torch.int64)}, "int32"),
        "kv_end-shape": ((q, k, v), {"kv_end": torch.zeros(3, 5, dtype=torch.int32)}, "shape"),
        "kv_end-above-Lk": ((q, k, v), {"kv_end": i32(7, 7, 8, 7, 7)}, "[0, Lk]"),
        "kv_start-negative": ((q, k, v), {"kv_start": i32(0, -1, 0, 0, 0)}, "[0, Lk]"),
        "padding-not-bool": ((q, k, v), {"key_padding_mask": torch.zeros(2, 7)}, "bool"),
        "padding-shape": ((q, k, v), {"key_padding_mask": torch.zeros(2, 6, dtype=torch.bool)}, "shape"),
        "cu_seqlens-int64": ((q[0], k[0], v[0]), {"cu_seqlens_q": torch.tensor([0, 5]), "cu_seqlens_k": i32(0, 7),
                                                  "max_seqlen_q": 5, "max_seqlen_k": 7}, "int32"),
        "cu_seqlens-not-monotone": ((q[0], k[0], v[0]), {"cu_seqlens_q": i32(0, 4, 3, 5), "cu_seqlens_k": i32(0, 2, 5, 7),
                                                         "max_seqlen_q": 5, "max_seqlen_k": 7}, "non-decreasing"),
        "cu_seqlens-not-from-0": ((q[0], k[0], v[0]), {"cu_seqlens_q": i32(1, 5), "cu_seqlens_k": i32(0, 7),
                                                       "max_seqlen_q": 5, "max_seqlen_k": 7}, "start at 0"),
        "cu_seqlens-wrong-total": ((q[0], k[0], v[0]), {"cu_seqlens_q": i32(0, 4), "cu_seqlens_k": i32(0, 7),
                                                        "max_seqlen_q": 5, "max_seqlen_k": 7}, "packed length"),
        "cu_seqlens-lengths-differ": ((q[0], k[0], v[0]), {"cu_seqlens_q": i32(0, 5), "cu_seqlens_k": i32(0, 3, 7),
                                                           "max_seqlen_q": 5, "max_seqlen_k": 7}, "same length"),
        "varlen-without-max_seqlen": ((q[0], k[0], v[0]), {"cu_seqlens_q": i32(0, 5), "cu_seqlens_k": i32(0, 7)},
                                      "max_seqlen"),
        "max_seqlen-too-small": ((q[0], k[0], v[0]), {"cu_seqlens_q": i32(0, 5), "cu_seqlens_k": i32(0, 7),
                                                      "max_seqlen_q": 4, "max_seqlen_k": 7}, "longest"),
        "varlen-with-padding": ((q[0], k[0], v[0]), {"cu_seqlens_q": i32(0, 5), "cu_seqlens_k": i32(0, 7),
                                                     "max_seqlen_q": 5, "max_seqlen_k": 7,
                                                     "key_padding_mask": torch.zeros(1, 7, dtype=torch.bool)},
                                "key_padding_mask"),
        "block_mask-and-causal": ((q, k, v), {"block_mask": build_block_mask(5, 7), "causal": True}, "block_mask"),
        "block_mask-wrong-lengths": ((q, k, v), {"block_mask": build_block_mask(6, 7)}, "Lq=6"),
        "block_mask-not-a-mask": ((q, k, v), {"block_mask": (1, 2)}, "build_block_mask"),
        "unknown-backend": ((q, k, v), {"backend": "cudnn"}, "backend must be one of ('auto', 'reference', 'triton')"),
        "unimplemented-backend": ((q, k, v), {"backend": "cuda"}, "choose from ('auto', 'reference', 'triton')"),
        "softmax_scale-inf": ((q, k, v), {"softmax_scale": float("inf")}, "softmax_scale must be finite"),
        "softmax_scale-nan": ((q, k, v), {"softmax_scale": float("nan")}, "softmax_scale must be finite"),
        "softmax_scale-str": ((q, k, v), {"softmax_scale": "0.1"}, "softmax_scale must be a number"),
        "softmax_scale-vector": ((q, k, v), {"softmax_scale": torch.ones(2)}, "softmax_scale must be a number or a one"),
        "causal-str": ((q, k, v), {"causal": "yes"}, "causal must be True or False"),
        "causal-str-with-block_mask": ((q, k, v), {"causal": "yes", "block_mask": build_block_mask(5, 7)},
                                       "causal must be True or False"),
        "return_lse-int": ((q, k, v), {"return_lse": 1}, "return_lse must be True or False"),
        "max_seqlen-without-cu_seqlens": ((q, k, v), {"max_seqlen_q": 5}, "go with cu_seqlens"),
        "max_seqlen-negative": ((q[0], k[0], v[0]), {"cu_seqlens_q": i32(0, 5), "cu_seqlens_k": i32(0, 7),
                                                     "max_seqlen_q": -5, "max_seqlen_k": 7}, "max_seqlen_q must be in"),
        "max_seqlen-float": ((q[0], k[0], v[0]), {"cu_seqlens_q": i32(0, 5), "cu_seqlens_k": i32(0, 7),
                                                  "max_seqlen_q": 5.0, "max_seqlen_k": 7}, "max_seqlen_q must be an int"),
    }
    return cases


ERRORS = _errors()


@pytest.mark.parametrize("name", list(ERRORS))
def test_validation_errors(name):
    args, kwargs, match = ERRORS[name]
    skip_unless_runs(kwargs.get("backend"), torch.device("cpu"))  # the cases are CPU tensors
    with pytest.raises(ValueError, match=re.escape(match)):
        flash_attention(*args, **kwargs)


def test_torch_compile_fullgraph(device):
    """torch.compile(fullgraph=True) traces a module calling flash_attention (custom ops + fake
    kernels + registered autograd): same outputs and gradients as eager."""
    b, lq, lk, h, d = 2, 20, 33, 2, 32

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d, d)

        def forward(self, q, k, v, start, end):
            out = flash_attention(q, k, v, kv_start=start, kv_end=end, causal=True, backend="triton")
            return self.proj(out)

    torch._dynamo.reset()
    model = Block().to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    q, k, v = qkv(b, lq, lk, h, h, d, torch.float32, device)
    start, end = random_intervals(b, lq, lk, device)
    results = []
    for fn in (model, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, start, end)
        out.square().sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for name, eager, comp in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("made_in", ["block_mask", "key_padding_mask"])
def test_mask_made_under_inference_mode_trains(made_in):
    """A block mask (or padding mask) built once in an inference_mode eval pass, then used in a training step:
    the Triton backend saved its tensors for backward, which autograd refuses for inference tensors
    ('Inference tensors cannot be saved for backward'), while the reference ran. The gradients now match."""
    skip_unless_runs("triton", torch.device("cpu"))
    q, k, v = (randn(2, 7, 2, 16) for _ in range(3))
    with torch.inference_mode():
        kpm = torch.tensor([[False] * 5 + [True] * 2, [False] * 7])
        kw = dict(block_mask=build_block_mask(7, 7, causal=True, key_padding_mask=kpm, device="cpu"))
    if made_in == "key_padding_mask":
        kw = dict(causal=True, key_padding_mask=kpm)
    grads = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        flash_attention(*leaves, backend=backend, **kw).pow(2).sum().backward()
        grads[backend, dtype] = [t.grad for t in leaves]
    # the floor of attention_helpers.check_against_reference: 32 fp32 ulps of the largest gradient
    floor = 32 * 2.0**-24 * max([1.0] + [g.abs().max().item() for g in grads["reference", torch.float64]])
    for got, exact, same in zip(grads["triton", torch.float32], grads["reference", torch.float64],
                                grads["reference", torch.float32]):
        assert_close_by_rule(got, exact, same, factor=3.0, floor=floor, what=made_in)
