"""The chunked contrastive loss and the Triton path need extra memory linear in the batch; the naive
loss (backend="reference") is quadratic.

Memory is measured as the peak of live tensor storage created during forward + backward, tracked by a
TorchDispatchMode (every op's outputs are counted once per storage until that storage is freed): an
exact count of what torch allocates, independent of the allocator and of other processes.
"""
import weakref

import pytest
import torch
from numerics import randn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mmfast.kernels import interpreting
from mmfast.kernels.contrastive import contrastive_loss
from mmfast.kernels.reference import contrastive_loss_reference


class PeakTensorMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() == 0 or key in self.live:
                    continue
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
        return out


def _peak_bytes(fn, n, d=32):
    a = randn(n, d).requires_grad_()
    b = randn(n, d).requires_grad_()
    t = torch.tensor(2.0, requires_grad=True)
    with PeakTensorMemory() as mem:
        fn(a, b, t, normalize=True).backward()
    return mem.peak


def _ours(a, b, t, **kw):
    return contrastive_loss(a, b, t, backend="chunked", **kw)


def test_extra_memory_is_linear_in_batch(monkeypatch):
    import mmfast.kernels.contrastive._chunked as chunked

    # a chunk smaller than both batches, so both run in the chunked regime (the default, 1024 rows,
    # would hold the whole small batch at once)
    monkeypatch.setattr(chunked, "CHUNK_ROWS", 64)
    small, large = 750, 3000  # 4x the batch
    ours_small, ours_large = _peak_bytes(_ours, small), _peak_bytes(_ours, large)
    one_logits_matrix = large * large * 4
    # linear: 4x the batch costs at most ~4x (the fixed-size logits chunk makes it less)
    assert ours_large <= 4.5 * ours_small, (ours_small, ours_large)
    assert ours_large < one_logits_matrix / 3, (ours_large, one_logits_matrix)
    # the same measurement catches the naive loss: quadratic (~16x) and several logits matrices
    naive_small, naive_large = _peak_bytes(contrastive_loss_reference, small), _peak_bytes(contrastive_loss_reference, large)
    assert naive_large > 10 * naive_small and naive_large > one_logits_matrix, (naive_small, naive_large)


@pytest.mark.skipif(not interpreting(), reason="runs the Triton launchers on the CPU: needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("row_programs", [2, 10**6], ids=["2-programs", "one-per-row-block"])
def test_triton_extra_memory_is_linear_in_batch(monkeypatch, row_programs):
    """The Triton forward's buffers (row and column statistics, the column partials) are O(N): the
    partials have one row per forward program, and the programs are bounded (the GPU's SM count; here
    patched), however many row blocks the batch has. With one program per row block the partials are
    ceil(N / 64) x N floats: quadratic, and caught by the same measurement. The launchers run inside a
    custom op, which the dispatch mode above sees as one call, so their allocations are counted where
    they are made (every buffer they write comes from ``_empty``)."""
    import mmfast.kernels.contrastive._configs as configs
    import mmfast.kernels.contrastive._launch as launch

    monkeypatch.setattr(configs, "INTERPRETER_ROW_PROGRAMS", row_programs)
    allocated = []
    real_empty = launch._empty
    monkeypatch.setattr(launch, "_empty", lambda *a, **k: allocated.append(real_empty(*a, **k)) or allocated[-1])

    def forward_bytes(n):
        allocated.clear()
        a, b = randn(n, 8), randn(n, 8)
        contrastive_loss(a, b, torch.tensor(2.0), normalize=True, backend="triton")
        return sum(t.untyped_storage().nbytes() for t in allocated)

    small, large = 150, 600  # fp32: 3 and 10 row blocks of 64
    ours_small, ours_large = forward_bytes(small), forward_bytes(large)
    if row_programs == 2:
        assert ours_large <= 4 * ours_small, (ours_small, ours_large)
    else:
        assert ours_large > 5 * ours_small, (ours_small, ours_large)


def test_row_programs_on_a_gpu_is_bounded_by_its_sms(monkeypatch):
    """The CUDA branch of the forward's grid size (no GPU here: the device properties are stood in for):
    one program per SM (two for fp32, whose programs fit two to an SM), never more than the row blocks."""
    import types

    from mmfast.kernels.contrastive._configs import config, row_programs

    h100 = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    cuda = torch.device("cuda", 0)
    bf16, fp32 = config(torch.bfloat16)["fwd"], config(torch.float32)["fwd"]
    assert row_programs(256, cuda, bf16) == 132  # N = 32k: the partials are 132 x N, not 256 x N
    assert row_programs(100, cuda, bf16) == 100
    assert row_programs(10**6, cuda, fp32) == 264


@pytest.mark.skipif(not interpreting(), reason="runs the gemm launchers on the CPU: needs TRITON_INTERPRET=1")
def test_gemm_similarity_buffers_stay_within_a_chunk(monkeypatch):
    """backend="gemm" materialises similarities one chunk of rows at a time: every GEMM output the
    launchers make is at most GEMM_CHUNK_ELEMENTS values (or N x D: da, db), however large the batch."""
    import mmfast.kernels.contrastive._configs as configs
    import mmfast.kernels.contrastive._launch as launch

    monkeypatch.setitem(configs.GEMM, "CHUNK_ELEMENTS", 64 * 600)
    sizes = []
    for name in ("mm_f32", "addmm_f32"):
        real = getattr(launch, name)
        monkeypatch.setattr(launch, name, lambda *a, _r=real: sizes.append(_r(*a).numel()) or _r(*a))
    n, d = 600, 8
    a, b = randn(n, d).requires_grad_(), randn(n, d).requires_grad_()
    contrastive_loss(a, b, torch.tensor(2.0), normalize=True, backend="gemm").backward()
    similarity_sizes = [s for s in sizes if s != n * d]
    assert len(similarity_sizes) >= 2 * (n // 64)  # forward and backward, one per chunk of 64 rows
    assert max(similarity_sizes) <= 64 * 600 < n * n
