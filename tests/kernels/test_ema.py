"""ema_update_: every backend against the reference, bit for bit, on lists of odd-sized tensors."""
import os

import pytest
import torch
from numerics import (
    FLOAT_DTYPES,
    assert_bitwise_equal,
    assert_close_by_rule,
    dtype_id,
    generator,
    poison_,
    randn,
)

import mmfast.kernels.ema as ema_module
from mmfast.kernels import ema_update_
from mmfast.kernels.reference import ema_update_reference

BACKENDS = {"cpu": ("triton", "cpp", "reference"), "cuda": ("triton", "cuda", "reference")}
# 0-element, 1-element, odd and multi-chunk sizes (the Triton chunk is 16384 elements)
SHAPES = [(0,), (1,), (3, 5), (77,), (197, 3), (1, 1601), (16384,), (16385,), (7, 11, 13), (40961,)]


def _lists(shapes, ema_dtype, src_dtype, device):
    ema = [randn(*s, dtype=ema_dtype, device=device) for s in shapes]
    src = [randn(*s, dtype=src_dtype, device=device) for s in shapes]
    return ema, src


def _check_against_reference(ema, src, momentum, backend, **kwargs):
    expected = [e.clone() for e in ema]
    ema_update_reference(expected, src, momentum.cpu() if isinstance(momentum, torch.Tensor) else momentum)
    ema_update_(ema, src, momentum, backend=backend, **kwargs)
    for i, (got, want) in enumerate(zip(ema, expected)):
        assert_bitwise_equal(got, want, what=f"tensor {i} {tuple(got.shape)}")


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        pairs = [(d, b) for d in devices for b in BACKENDS[d]]
        metafunc.parametrize("device,backend", pairs, ids=[f"{d}-{b}" for d, b in pairs])


@pytest.mark.parametrize("ema_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("src_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("momentum", [0.996, 0.25, "tensor"], ids=["m0.996", "m0.25-large-weight", "m-tensor"])
def test_bitwise_equal_to_reference(device, backend, ema_dtype, src_dtype, momentum):
    if momentum == "tensor":
        momentum = torch.tensor(0.9931, device=device)
    ema, src = _lists(SHAPES, ema_dtype, src_dtype, device)
    src_before = [s.clone() for s in src]
    _check_against_reference(ema, src, momentum, backend)
    for s, before in zip(src, src_before):
        assert_bitwise_equal(s, before, what="source tensors must not be written")


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.5])
def test_momentum_edges(device, backend, momentum):
    ema, src = _lists([(5,), (1000,)], torch.float32, torch.float32, device)
    before = [e.clone() for e in ema]
    _check_against_reference(ema, src, momentum, backend)
    if momentum == 1.0:  # m = 1 keeps the EMA; m = 0 copies the source
        for e, b in zip(ema, before):
            assert_bitwise_equal(e, b, what="momentum 1")
    if momentum == 0.0:
        for e, s in zip(ema, src):
            assert_bitwise_equal(e, s, what="momentum 0")


def test_hundreds_of_tensors(device, backend):
    g = generator()
    sizes = torch.randint(0, 2500, (300,), generator=g).tolist() + [0, 1, 1, 33333]
    ema, src = _lists([(n,) for n in sizes], torch.float32, torch.float32, device)
    _check_against_reference(ema, src, 0.999, backend)


def test_strided_tensors(device, backend):
    """Dense non-contiguous EMA tensors (channels-last, transposed) are handled in place; a source with
    another layout is read correctly (copied into the EMA's layout first)."""
    conv = randn(8, 3, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    transposed = randn(9, 13, device=device).t()
    ema = [conv, transposed, randn(4, 6, device=device)]
    src = [
        randn(8, 3, 5, 7, device=device).contiguous(memory_format=torch.channels_last),
        randn(13, 9, device=device),  # contiguous, while its EMA is transposed
        randn(6, 8, device=device)[:, ::2].t(),  # non-dense source
    ]
    _check_against_reference(ema, src, 0.99, backend)


def test_non_dense_ema_rejected(device, backend):
    ema = [randn(10, 10, device=device)[:, ::2]]
    src = [randn(10, 5, device=device)]
    with pytest.raises(ValueError, match=r"ema_tensors\[0\].*non-overlapping and dense"):
        ema_update_(ema, src, 0.9, backend=backend)


def test_version_counters_bumped(device, backend):
    # the kernels write through raw pointers; caches keyed on ._version (a resampled position table of a
    # momentum encoder) must see the update as they would see torch's in-place ops
    ema, src = _lists([(31,), (0,), (5, 7)], torch.float32, torch.bfloat16, device)
    before = [e._version for e in ema]
    ema_update_(ema, src, 0.9, backend=backend)
    assert all(e._version > v for e, v in zip(ema[::2], before[::2])), [e._version for e in ema]


def test_buffers_copied_in_same_call(device, backend):
    ema, src = _lists([(31,)], torch.float32, torch.float32, device)
    ema_bufs = [poison_(torch.empty(17, device=device)), torch.zeros((), dtype=torch.int64, device=device)]
    bufs = [randn(17, device=device), torch.tensor(123, device=device)]
    _check_against_reference(ema, src, 0.9, backend, ema_buffers=ema_bufs, buffers=bufs)
    for got, want in zip(ema_bufs, bufs):
        assert_bitwise_equal(got, want, what="buffer")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_low_precision_error_within_rule(device, backend, dtype):
    """Against fp64 math, the kernel is as accurate as PyTorch's own low-precision update."""
    ema, src = _lists([(4097,), (333,)], dtype, dtype, device)
    m = 0.9
    ref64 = [e.double() * m + s.double() * (1 - m) for e, s in zip(ema, src)]
    torch_same = [e.clone() for e in ema]
    torch._foreach_lerp_(torch_same, src, 1 - m)
    ema_update_(ema, src, m, backend=backend)
    for got, r64, t in zip(ema, ref64, torch_same):
        assert_close_by_rule(got, r64, t, what=f"{dtype_id(dtype)} EMA")


def test_one_launch_per_dtype_group(monkeypatch):
    if not torch.cuda.is_available() and not ema_module.interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    launches = []

    class CountingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    real = ema_module._ema_update_fwd_kernel
    monkeypatch.setattr(ema_module, "_ema_update_fwd_kernel", CountingKernel())
    ema = [randn(n, device=device) for n in (5, 70000, 9)] + [randn(n, dtype=torch.bfloat16, device=device) for n in (3, 4)]
    src = [randn(n, device=device) for n in (5, 70000, 9)] + [randn(n, dtype=torch.bfloat16, device=device) for n in (3, 4)]
    ema_update_(ema, src, 0.99, backend="triton")
    assert len(launches) == 2, f"expected one launch per dtype group (2), got {len(launches)}"


def test_tensor_momentum_tracks_value_changes(device, backend):
    """A schedule that changes a 0-dim momentum tensor in place is honoured on every call."""
    momentum = torch.tensor(0.9, device=device)
    ema, src = _lists([(100,), (3,)], torch.float32, torch.float32, device)
    for value in (0.9, 0.5, 0.999):
        momentum.fill_(value)
        _check_against_reference(ema, src, momentum, backend)


class TestValidation:
    def test_length_mismatch(self):
        with pytest.raises(ValueError, match="same length"):
            ema_update_([torch.zeros(3)], [], 0.9)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"ema_tensors\[1\] has shape \(3,\) but tensors\[1\] has \(4,\)"):
            ema_update_([torch.zeros(2), torch.zeros(3)], [torch.zeros(2), torch.zeros(4)], 0.9)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=dtype_id)
    def test_unsupported_dtype(self, dtype):
        with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
            ema_update_([torch.zeros(2, dtype=dtype)], [torch.zeros(2, dtype=dtype)], 0.9)

    @pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
    def test_momentum_out_of_range(self, momentum):
        with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\]"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], momentum)

    @pytest.mark.parametrize("momentum", [torch.tensor([0.9]), torch.tensor(1), "0.9", True])
    def test_momentum_bad_type(self, momentum):
        with pytest.raises(ValueError, match="momentum must be a float or a 0-dim floating tensor"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], momentum)

    def test_requires_grad_leaf(self):
        with pytest.raises(ValueError, match="requires grad"):
            ema_update_([torch.zeros(2, requires_grad=True)], [torch.zeros(2)], 0.9)

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="backend must be one of"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.9, backend="fast")

    def test_triton_on_cpu_without_interpreter(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.9, backend="triton")

    def test_buffer_length_mismatch(self):
        with pytest.raises(ValueError, match="ema_buffers and buffers must have the same length"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.9, ema_buffers=[torch.zeros(1)], buffers=[])


class TestDispatch:
    def _spy(self, monkeypatch):
        chosen = []
        for name in ("triton", "cpp", "cuda"):
            monkeypatch.setitem(ema_module._BACKEND_FNS, name, lambda *a, _n=name: chosen.append(_n))
        import mmfast.kernels.reference as reference

        monkeypatch.setattr(reference, "ema_update_reference", lambda *a, **k: chosen.append("reference"))
        return chosen

    def test_auto_on_cpu_is_reference(self, monkeypatch):
        monkeypatch.delenv("MMFAST_BACKEND", raising=False)
        chosen = self._spy(monkeypatch)
        ema_update_([torch.zeros(2)], [torch.ones(2)], 0.9)
        assert chosen == ["reference"]

    def test_env_selects_triton_for_auto(self, monkeypatch):
        monkeypatch.setenv("MMFAST_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        chosen = self._spy(monkeypatch)
        ema_update_([torch.zeros(2)], [torch.ones(2)], 0.9)
        assert chosen == ["triton"]

    def test_explicit_backend_beats_env(self, monkeypatch):
        monkeypatch.setenv("MMFAST_BACKEND", "triton")
        chosen = self._spy(monkeypatch)
        ema_update_([torch.zeros(2)], [torch.ones(2)], 0.9, backend="cpp")
        assert chosen == ["cpp"]


def test_dtensor_local_shards():
    dist = pytest.importorskip("torch.distributed", reason="torch.distributed is not available")
    if not dist.is_available():
        pytest.skip("torch.distributed is not built in this torch")
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        ema_full, src_full = randn(6, 5), randn(6, 5)
        ema = distribute_tensor(ema_full.clone(), mesh, [Shard(0)])
        src = distribute_tensor(src_full, mesh, [Shard(0)])
        expected = [ema_full.clone()]
        ema_update_reference(expected, [src_full], 0.95)
        ema_update_([ema], [src], 0.95, backend="cpp")
        assert_bitwise_equal(ema.to_local(), expected[0], what="DTensor local shard")
    finally:
        if created:
            dist.destroy_process_group()


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    import mmfast._ext as ext
    from mmfast.kernels import _common

    monkeypatch.setattr(ext, "load_extension", lambda required=False: None)
    monkeypatch.setattr(ext, "extension_error", lambda: "no compiler (test)")
    monkeypatch.setattr(_common, "_warned", set())
    ema, src = _lists([(10,)], torch.float32, torch.float32, "cpu")
    with pytest.warns(RuntimeWarning, match=r"no compiler \(test\).*falls back to 'reference'"):
        _check_against_reference(ema, src, 0.9, "cpp")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_against_reference(ema, src, 0.9, "cpp")  # warned once only


def test_unaligned_views_share_a_call_with_aligned_tensors(device, backend):
    """Views off 16-byte alignment (a parameter carved out of a flat buffer) take the unaligned path."""
    flat_ema, flat_src = randn(20001, device=device), randn(20001, device=device)
    ema = [flat_ema[1:17000], flat_ema[17001:], randn(333, device=device)]
    src = [flat_src[1:17000], flat_src[17001:], randn(333, device=device)]
    _check_against_reference(ema, src, 0.97, backend)


def test_cpp_avx2_path_on_avx512_machines():
    # the extension picks AVX-512 where the CPU has it; its AVX2 path must stay bit-exact as well
    script = """
import torch
from mmfast.kernels import ema_update_
from mmfast.kernels.reference import ema_update_reference
g = torch.Generator().manual_seed(0)
for ed, sd in [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float16)]:
    for m in (0.996, 0.25):
        shapes = [(1,), (7,), (77, 3), (16385,), (40961,)]
        ema = [torch.randn(s, generator=g).to(ed) for s in shapes]
        src = [torch.randn(s, generator=g).to(sd) for s in shapes]
        want = [e.clone() for e in ema]
        ema_update_reference(want, src, m)
        ema_update_(ema, src, m, backend="cpp")
        assert all(torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                               b.view(torch.int16 if b.element_size() == 2 else torch.int32)) for a, b in zip(ema, want)), (ed, sd, m)
print("ok")
"""
    import subprocess
    import sys

    env = dict(os.environ, MMFAST_EMA_NO_AVX512="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
