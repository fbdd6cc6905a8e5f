"""Shared helpers of the flash_attention tests: random masks, interval-mask checks and the 2x / 3x rule against
fp64."""
import pytest
import torch
from numerics import assert_close_by_rule, generator, poison_, randn

from mmfast.kernels import flash_attention, interpreting
from mmfast.kernels.attention import masks
from mmfast.kernels.reference import attention_reference


def skip_unless_runs(backend, device):
    """Skip a backend="triton" test on CPU tensors when Triton's interpreter is off (a CUDA machine)."""
    if backend == "triton" and device.type != "cuda" and not interpreting():
        pytest.skip("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")


def random_intervals(batch, seqlen_q, seqlen_k, device, empty_rows=0.1):
    """(B, Lq) int32 ranges: mostly random [start, end), some empty, some full, a few fully hidden rows."""
    g = generator()
    a = torch.randint(0, seqlen_k + 1, (batch, seqlen_q), generator=g)
    b = torch.randint(0, seqlen_k + 1, (batch, seqlen_q), generator=g)
    start, end = torch.minimum(a, b), torch.maximum(a, b)
    full = torch.rand(batch, seqlen_q, generator=g) < 0.2
    start, end = torch.where(full, 0, start), torch.where(full, seqlen_k, end)
    empty = torch.rand(batch, seqlen_q, generator=g) < empty_rows
    end = torch.where(empty, start, end)
    return start.to(device, torch.int32), end.to(device, torch.int32)


def random_padding(batch, seqlen_k, device):
    """(B, Lk) bool, True = padded: a padded tail per sample plus a few scattered padded keys."""
    g = generator()
    lengths = torch.randint(max(seqlen_k // 2, 1), seqlen_k + 1, (batch,), generator=g)
    tail = torch.arange(seqlen_k)[None, :] >= lengths[:, None]
    scattered = torch.rand(batch, seqlen_k, generator=g) < 0.1
    return (tail | scattered).to(device)


def qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, device, varlen=False):
    lead_q = (seqlen_q,) if varlen else (batch, seqlen_q)
    lead_k = (seqlen_k,) if varlen else (batch, seqlen_k)
    q = randn(*lead_q, heads, head_dim, dtype=dtype, device=device)
    k = randn(*lead_k, kv_heads, head_dim, dtype=dtype, device=device)
    v = randn(*lead_k, kv_heads, head_dim, dtype=dtype, device=device)
    return q, k, v


def check_against_reference(q, k, v, *, grads=True, dlse=False, relayout=None, **mask):
    """Kernel (backend="triton") vs fp64 reference, with PyTorch in q's dtype as the yardstick:
    out and lse by the 2x rule, dq / dk / dv by the 3x rule. Returns (out, lse, grads) of the kernel.
    relayout(t): a copy of t in the memory layout the kernel should get (a clone may change odd layouts)."""
    device, dtype = q.device, q.dtype
    leaves = [(relayout(t.detach()) if relayout else t.detach().clone()).requires_grad_(grads) for t in (q, k, v)]
    out, lse = flash_attention(*leaves, return_lse=True, backend="triton", **mask)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    exact = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    mask = {key: val for key, val in mask.items() if not key.startswith("max_seqlen")}  # the reference needs none
    out64, lse64 = attention_reference(*exact, return_lse=True, **mask)
    same = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    out_t, lse_t = attention_reference(*same, return_lse=True, **mask)  # same fp32 matmul precision as the kernel
    assert_close_by_rule(out, out64, out_t, what="out")
    hidden = torch.isinf(lse64)
    assert torch.equal(torch.isinf(lse).cpu() & (lse < 0).cpu(), hidden.cpu()), "LSE must be -inf exactly on rows that see no key"
    fin = lambda t: torch.where(hidden.to(t.device), 0.0, t.double())  # noqa: E731
    assert_close_by_rule(fin(lse), fin(lse64), fin(lse_t.float()), floor=1e-5, what="lse")
    got_grads = None
    if grads:
        dout = randn(*out.shape, dtype=dtype, device=device)
        g_lse = randn(*lse.shape, dtype=torch.float32, device=device) if dlse else None
        loss = lambda o, l: (o * dout.to(o.dtype)).sum() + ((l * g_lse.to(l.dtype)).sum() if dlse else 0)  # noqa: E731
        loss(out, lse).backward()
        loss(out64, lse64).backward()
        loss(out_t, lse_t).backward()
        # fp32: the flash backward recomputes P from the stored LSE and takes Delta = rowsum(O·dO) from the
        # rounded output, where PyTorch differentiates its own softmax (exactly 0 for a row with one key):
        # a few fp32 ulps of the gradients' scale that the 3x rule on PyTorch's (sometimes exactly zero)
        # error does not cover; 32 ulps of the largest gradient do.
        scale = max([1.0] + [e.grad.abs().max().item() for e in exact if e.grad.numel()])
        floor = 32 * 2.0**-24 * scale if dtype == torch.float32 else None
        for name, a, e, t in zip(("dq", "dk", "dv"), leaves, exact, same):
            assert_close_by_rule(a.grad, e.grad, t.grad, factor=3.0, floor=floor, what=name)
        got_grads = [t.grad for t in leaves]
    return out, lse, got_grads


def assert_mask(intervals, seqlen_k, expected):
    """An interval mask builder's (start, end) is the dense `expected`, in the layout the kernel reads."""
    s, e = intervals
    assert s.dtype == torch.int32 and e.dtype == torch.int32
    assert s.is_contiguous() and e.is_contiguous()
    got = masks.dense_mask(s, e, seqlen_k)
    assert torch.equal(got, expected), f"\n{got.int()}\n!=\n{expected.int()}"
    # empty rows are written as (0, 0) and every range lies inside the keys
    assert ((s >= 0) & (s <= e) & (e <= seqlen_k)).all()
    assert torch.equal(s[s == e], torch.zeros_like(s[s == e]))


def loop_mask(lq, lk, visible):
    """The dense (lq, lk) mask of a slow per-element definition visible(i, j)."""
    return torch.tensor([[bool(visible(i, j)) for j in range(lk)] for i in range(lq)], dtype=torch.bool).reshape(lq, lk)


__all__ = ["assert_mask", "check_against_reference", "loop_mask", "poison_", "qkv", "random_intervals",
           "random_padding", "skip_unless_runs"]
