"""ema_update_: every backend against the reference, bit for bit, on lists of odd-sized tensors."""
import os
import warnings

import pytest
import torch
from dist_helpers import one_process_group
from numerics import (
    FLOAT_DTYPES,
    assert_bitwise_equal,
    assert_close_by_rule,
    dtype_id,
    generator,
    poison_,
    randn,
)

from mmfast.kernels import _common, _dispatch, ema_update_
from mmfast.kernels.ema import _launch
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
        # Triton runs CPU tensors only through its interpreter (the default without a GPU)
        pairs = [(d, b) for d in devices for b in BACKENDS[d] if d == "cuda" or b != "triton" or _common.interpreting()]
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
    if not torch.cuda.is_available() and not _common.interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    launches = []

    class CountingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    real = _launch.ema_update_kernel
    monkeypatch.setattr(_launch, "ema_update_kernel", CountingKernel())
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
        with pytest.raises(ValueError, match="ema_tensors and tensors must have the same length"):
            ema_update_([torch.zeros(3)], [], 0.9)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"ema_tensors\[1\] has shape \(3,\) but tensors\[1\] has \(4,\)"):
            ema_update_([torch.zeros(2), torch.zeros(3)], [torch.zeros(2), torch.zeros(4)], 0.9)

    @pytest.mark.parametrize("dtype", [torch.int32, torch.complex64], ids=dtype_id)
    @pytest.mark.parametrize("side", ["ema_tensors", "tensors"])
    def test_unsupported_dtype_named(self, side, dtype):
        ema, src = [torch.zeros(2), torch.zeros(3)], [torch.zeros(2), torch.zeros(3)]
        (ema if side == "ema_tensors" else src)[1] = torch.zeros(3, dtype=dtype)
        with pytest.raises(ValueError, match=rf"{side}\[1\] must be float32, float16 or bfloat16 \(or float64"):
            ema_update_(ema, src, 0.9, backend="reference")

    @pytest.mark.parametrize("arg", ["ema_tensors", "tensors", "ema_buffers", "buffers"])
    def test_bare_tensor_instead_of_list(self, arg):
        """A bare tensor iterates over its rows: accepted before, as if each row were a parameter."""
        kwargs = dict(ema_tensors=[torch.zeros(2, 3)], tensors=[torch.ones(2, 3)], ema_buffers=[torch.zeros(2, 3)],
                      buffers=[torch.ones(2, 3)])
        kwargs[arg] = kwargs[arg][0]
        with pytest.raises(ValueError, match=rf"{arg} must be a list or tuple of tensors, got a single tensor"):
            ema_update_(kwargs.pop("ema_tensors"), kwargs.pop("tensors"), 0.9, backend="reference", **kwargs)

    @pytest.mark.parametrize("arg", ["ema_tensors", "tensors", "ema_buffers", "buffers"])
    def test_not_a_sequence(self, arg):
        kwargs = dict(ema_tensors=[torch.zeros(2)], tensors=[torch.ones(2)], ema_buffers=[], buffers=[])
        kwargs[arg] = 3
        with pytest.raises(ValueError, match=rf"{arg} must be a list or tuple of tensors, got int"):
            ema_update_(kwargs.pop("ema_tensors"), kwargs.pop("tensors"), 0.9, **kwargs)

    def test_generators_are_sequences(self):
        ema, src = [torch.zeros(3)], [torch.ones(3)]
        ema_update_((e for e in ema), iter(src), 0.5, backend="reference")
        assert torch.equal(ema[0], torch.full((3,), 0.5))

    def test_non_tensor_element_named(self):
        with pytest.raises(ValueError, match=r"ema_tensors\[1\] and tensors\[1\] must be tensors, got list and Tensor"):
            ema_update_([torch.zeros(2), [0.0]], [torch.zeros(2), torch.zeros(1)], 0.9)

    def test_devices_named(self):
        meta = torch.zeros(2, device="meta")
        with pytest.raises(ValueError, match=r"ema_tensors\[0\] is on cpu but tensors\[0\] is on meta"):
            ema_update_([torch.zeros(2)], [meta], 0.9)

    @pytest.mark.parametrize("momentum", [-0.1, 1.5, 2], ids=["m-0.1", "m1.5", "m2-int"])
    def test_momentum_out_of_range(self, momentum):
        with pytest.raises(ValueError, match=r"ema_update_: momentum must be in \[0, 1\]"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], momentum)

    @pytest.mark.parametrize("momentum", [float("nan"), float("inf")], ids=["nan", "inf"])
    def test_momentum_not_finite(self, momentum):
        with pytest.raises(ValueError, match="ema_update_: momentum must be finite"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], momentum)

    @pytest.mark.parametrize("momentum", [torch.tensor([0.9]), torch.tensor(1), "0.9", True, None],
                             ids=["1-d", "int-tensor", "str", "bool", "None"])
    def test_momentum_bad_type(self, momentum):
        with pytest.raises(ValueError, match="momentum must be a float or a 0-dim floating tensor"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], momentum)

    def test_momentum_checked_with_nothing_to_update(self):
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            ema_update_([], [], 1.5)

    def test_requires_grad_leaf(self):
        with pytest.raises(ValueError, match=r"ema_tensors\[0\] requires grad"):
            ema_update_([torch.zeros(2, requires_grad=True)], [torch.zeros(2)], 0.9)

    @pytest.mark.parametrize("params", [[torch.zeros(2)], []], ids=["tensors", "empty"])
    def test_unknown_backend(self, params):
        """Named even when there is nothing to update (before, an empty call returned without a look)."""
        with pytest.raises(ValueError, match="ema_update_: backend must be one of"):
            ema_update_(params, list(params), 0.9, backend="fast")

    def test_backend_of_another_op(self):
        with pytest.raises(ValueError, match="backend"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.9, backend="chunked")

    def test_triton_on_cpu_without_interpreter(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.9, backend="triton")

    def test_buffer_length_mismatch(self):
        with pytest.raises(ValueError, match="ema_buffers and buffers must have the same length"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.9, ema_buffers=[torch.zeros(1)], buffers=[])

    def test_buffer_shape_named(self):
        with pytest.raises(ValueError, match=r"ema_buffers\[0\] has shape \(1,\) but buffers\[0\] has \(2,\)"):
            ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.9, ema_buffers=[torch.zeros(1)], buffers=[torch.zeros(2)])


class TestTensorMomentum:
    """A tensor momentum is range-checked on its device (torch._assert_async): on the CPU at once, on CUDA
    as a device-side assert; no host sync. Before, torch.tensor(1.5) silently extrapolated."""

    @pytest.mark.parametrize("value", [1.5, -0.25, float("nan"), float("inf")], ids=["1.5", "-0.25", "nan", "inf"])
    def test_out_of_range_raises(self, backend, device, value):
        if device != "cpu":
            pytest.skip("a CUDA device-side assert poisons the CUDA context; the check is the same code")
        ema, src = _lists([(5,)], torch.float32, torch.float32, device)
        before = ema[0].clone()
        with pytest.raises(RuntimeError, match=r"ema_update_: momentum must be finite and in \[0, 1\]"):
            ema_update_(ema, src, torch.tensor(value), backend=backend)
        assert_bitwise_equal(ema[0], before, what="EMA untouched by a rejected call")

    @pytest.mark.parametrize("value", [0.0, 1.0], ids=["0", "1"])
    def test_edges_accepted(self, backend, device, value):
        ema, src = _lists([(5,)], torch.float32, torch.float32, device)
        _check_against_reference(ema, src, torch.tensor(value, device=device), backend)


class TestFloat64:
    """float64 runs on the reference only; the kernels and the C++ backends refuse it by name."""

    @pytest.mark.parametrize("pair", [("fp64", "fp64"), ("fp64", "fp32"), ("fp32", "fp64"), ("fp64", "bf16")],
                             ids=lambda p: f"{p[0]}<-{p[1]}")
    @pytest.mark.parametrize("momentum", [0.996, 0.25, "tensor"], ids=["m0.996", "m0.25", "m-tensor"])
    @pytest.mark.parametrize("chosen", ["reference", "auto"])
    def test_reference_matches_float64_math(self, pair, momentum, chosen, monkeypatch):
        monkeypatch.delenv("MMFAST_BACKEND", raising=False)
        dtypes = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}
        shapes = [(1,), (77,), (197, 3)]
        ema, src = _lists(shapes, dtypes[pair[0]], dtypes[pair[1]], "cpu")
        m = torch.tensor(0.9931, dtype=torch.float64) if momentum == "tensor" else momentum
        m64 = float(m)
        exact = [e.double() * m64 + s.double() * (1 - m64) for e, s in zip(ema, src)]
        scale = [e.double().abs() * m64 + s.double().abs() * (1 - m64) for e, s in zip(ema, src)]
        ema_update_(ema, src, m, backend=chosen)
        for got, want, size in zip(ema, exact, scale):
            assert got.dtype == dtypes[pair[0]]
            if got.dtype == torch.float64:
                assert ((got - want).abs() <= 1e-13 * size).all(), (got - want).abs().max()
            else:  # rounded once from the float64 result
                assert_bitwise_equal(got, want.to(got.dtype), what="rounded float64 result")

    @pytest.mark.parametrize("side", ["ema_tensors", "tensors"])
    def test_kernels_reject_float64_by_name(self, backend, device, side):
        ema, src = _lists([(3,), (4,)], torch.float32, torch.float32, device)
        (ema if side == "ema_tensors" else src)[1] = randn(4, dtype=torch.float64, device=device)
        if backend == "reference":
            _check_against_reference(ema, src, 0.9, backend)
            return
        before = [e.clone() for e in ema]
        with pytest.raises(ValueError, match=rf"ema_update_: {side}\[1\] must be float16, bfloat16 or float32 "
                                             r"on this backend, got torch.float64; float64 runs on backend='reference'"):
            ema_update_(ema, src, 0.9, backend=backend)
        for e, b in zip(ema, before):
            assert_bitwise_equal(e, b, what="nothing written before the dtype check")


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_autocast_changes_nothing(device, backend, src_dtype):
    """An in-place update outside autocast's op lists: the same bits with autocast on as off."""
    ema, src = _lists([(77,), (3, 5)], torch.float32, src_dtype, device)
    plain = [e.clone() for e in ema]
    ema_update_(plain, src, 0.99, backend=backend)
    with torch.autocast(device, dtype=torch.bfloat16):
        ema_update_(ema, src, 0.99, backend=backend)
    for got, want in zip(ema, plain):
        assert got.dtype == torch.float32
        assert_bitwise_equal(got, want, what="under autocast")


class TestDispatch:
    def _spy(self, monkeypatch):
        chosen = []
        for name in ("triton", "cpp", "cuda"):
            monkeypatch.setitem(_launch.BACKEND_FNS, name, lambda *a, _n=name: chosen.append(_n))
        import mmfast.kernels.reference as reference

        monkeypatch.setattr(reference, "ema_update_reference", lambda *a, **k: chosen.append("reference"))
        return chosen

    def test_auto_on_cpu_is_reference(self, monkeypatch):
        monkeypatch.delenv("MMFAST_BACKEND", raising=False)
        chosen = self._spy(monkeypatch)
        ema_update_([torch.zeros(2)], [torch.ones(2)], 0.9)
        assert chosen == ["reference"]

    @pytest.mark.parametrize("env,expected", [("triton", "triton"), ("cpp", "cpp"), ("reference", "reference"),
                                              ("chunked", "reference"), ("auto", "reference")])
    def test_env_selects_the_backend_of_auto(self, monkeypatch, env, expected):
        """MMFAST_BACKEND replaces auto when ema_update_ implements it; another op's backend is ignored."""
        monkeypatch.setenv("MMFAST_BACKEND", env)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        chosen = self._spy(monkeypatch)
        ema_update_([torch.zeros(2)], [torch.ones(2)], 0.9)
        assert chosen == [expected]

    def test_env_cuda_on_cpu_tensors_is_an_error(self, monkeypatch):
        monkeypatch.setenv("MMFAST_BACKEND", "cuda")
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
            ema_update_([torch.zeros(2)], [torch.ones(2)], 0.9)

    def test_env_unknown_value(self, monkeypatch):
        monkeypatch.setenv("MMFAST_BACKEND", "fast")
        with pytest.raises(ValueError, match="MMFAST_BACKEND must be one of"):
            ema_update_([torch.zeros(2)], [torch.ones(2)], 0.9)

    def test_explicit_backend_beats_env(self, monkeypatch):
        monkeypatch.setenv("MMFAST_BACKEND", "triton")
        chosen = self._spy(monkeypatch)
        ema_update_([torch.zeros(2)], [torch.ones(2)], 0.9, backend="cpp")
        assert chosen == ["cpp"]

    @pytest.mark.parametrize("built,expected", [("cuda", "cuda"), ("cpu-only", "triton"), ("none", "triton")])
    def test_auto_on_cuda_prefers_a_built_cuda_extension(self, monkeypatch, built, expected):
        """auto on CUDA: registry order (cuda, triton, cpp), the extension only when already built with
        CUDA; auto never starts a build."""
        import mmfast._ext as ext

        class Built:
            @staticmethod
            def with_cuda():
                return built == "cuda"

        state = (None, "not built (test)") if built == "none" else (Built(), None)
        monkeypatch.setattr(ext, "loaded_extension", lambda: state)
        monkeypatch.setattr(ext, "load_extension", lambda required=False: pytest.fail("auto started a build"))
        monkeypatch.delenv("MMFAST_BACKEND", raising=False)
        assert _dispatch.accelerated_backends("ema_update_") == ("cuda", "triton", "cpp")
        assert _dispatch.resolve_backend("ema_update_", "auto", torch.device("cuda")) == expected


class TestExtensionFallbacks:
    """'cuda' -> 'triton' and 'cpp' -> 'reference' when the extension cannot be had, warned once."""

    @pytest.fixture(autouse=True)
    def fresh_warnings(self, monkeypatch):
        monkeypatch.setattr(_common, "_warned", set())

    def _no_extension(self, monkeypatch):
        import mmfast._ext as ext

        monkeypatch.setattr(ext, "load_extension", lambda required=False: None)
        monkeypatch.setattr(ext, "extension_error", lambda: "no compiler (test)")

    def test_cpp_falls_back_to_reference_once(self, monkeypatch):
        self._no_extension(monkeypatch)
        ema, src = _lists([(10,)], torch.float32, torch.float32, "cpu")
        with pytest.warns(RuntimeWarning, match=r"no compiler \(test\).*backend='cpp' falls back to 'reference'"):
            _check_against_reference(ema, src, 0.9, "cpp")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _check_against_reference(ema, src, 0.9, "cpp")  # warned once only

    def test_cuda_falls_back_to_triton_once(self, monkeypatch):
        if not _common.interpreting():
            pytest.skip("runs the CUDA launcher on CPU tensors through Triton's interpreter")
        self._no_extension(monkeypatch)
        ema, src = _lists([(10,), (16385,)], torch.float32, torch.bfloat16, "cpu")
        expected = [e.clone() for e in ema]
        ema_update_reference(expected, src, 0.9)
        with pytest.warns(RuntimeWarning, match=r"no compiler \(test\).*backend='cuda' falls back to 'triton'"):
            _launch._launch_cuda_ext(ema, src, 0.9)
        for got, want in zip(ema, expected):
            assert_bitwise_equal(got, want, what="cuda -> triton fallback")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _launch._launch_cuda_ext(ema, src, 0.9)

    def test_cuda_with_a_cpu_only_build_falls_back_to_triton(self, monkeypatch):
        if not _common.interpreting():
            pytest.skip("runs the CUDA launcher on CPU tensors through Triton's interpreter")
        import mmfast._ext as ext

        class CpuOnly:
            @staticmethod
            def with_cuda():
                return False

        monkeypatch.setattr(ext, "load_extension", lambda required=False: CpuOnly())
        ema, src = _lists([(10,)], torch.float32, torch.float32, "cpu")
        with pytest.warns(RuntimeWarning, match="built without CUDA; backend='cuda' falls back to 'triton'"):
            _launch._launch_cuda_ext(ema, src, 0.9)


def test_dtensor_local_shards():
    with one_process_group():
        from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

        mesh = DeviceMesh("cpu", [0])
        ema_full, src_full = randn(6, 5), randn(6, 5)
        ema = distribute_tensor(ema_full.clone(), mesh, [Shard(0)])
        src = distribute_tensor(src_full, mesh, [Shard(0)])
        expected = [ema_full.clone()]
        ema_update_reference(expected, [src_full], 0.95)
        ema_update_([ema], [src], 0.95, backend="cpp")
        assert_bitwise_equal(ema.to_local(), expected[0], what="DTensor local shard")


def test_unaligned_views_share_a_call_with_aligned_tensors(device, backend):
    """Views off 16-byte alignment (a parameter carved out of a flat buffer) take the unaligned path."""
    flat_ema, flat_src = randn(20001, device=device), randn(20001, device=device)
    ema = [flat_ema[1:17000], flat_ema[17001:], randn(333, device=device)]
    src = [flat_src[1:17000], flat_src[17001:], randn(333, device=device)]
    _check_against_reference(ema, src, 0.97, backend)


def _overlapping_lists(case, device):
    flat = randn(64, device=device)
    other = [randn(16, device=device) for _ in range(2)]
    if case == "source-partly-overlaps-its-ema":
        return [flat[:16]], [flat[8:24]], r"ema_tensors\[0\] and tensors\[0\]"
    if case == "tied-weight-listed-twice":
        # behind an empty pair, which the fast path drops: the names keep the caller's positions
        empty = randn(0, device=device)
        return [empty, flat[:16], flat[:16]], [empty.clone()] + other, r"ema_tensors\[1\] and ema_tensors\[2\]"
    if case == "another-ema-as-source":
        return [flat[:16], flat[16:32]], [other[0], flat[:16]], r"ema_tensors\[0\] and tensors\[1\]"
    # two launch groups (fp16 first, an empty pair between), the overlap across them, named by list position
    half = randn(8, dtype=torch.float16, device=device)
    return ([half, randn(0, device=device), flat[:16]],
            [flat[8:12].view(torch.float16), randn(0, device=device), other[0]], r"ema_tensors\[2\] and tensors\[0\]")


@pytest.mark.parametrize("case", ["source-partly-overlaps-its-ema", "tied-weight-listed-twice", "another-ema-as-source",
                                  "across-dtype-groups"])
def test_overlapping_memory_rejected_by_name(device, backend, case):
    """Each backend answered differently here (the reference updated a tied weight listed twice twice and
    refused a partly overlapping source with a RuntimeError; the kernels raced): one ValueError for all."""
    ema, src, names = _overlapping_lists(case, device)
    before = [e.clone() for e in ema]
    with pytest.raises(ValueError, match=names + " share memory"):
        ema_update_(ema, src, 0.9, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(ema, before)), "a refused call wrote"


def test_ema_as_its_own_source_and_a_shared_source_accepted(device, backend):
    """ema ← ema (the very same elements) changes nothing; one source read by two EMA tensors is fine."""
    shared = randn(33, device=device)
    ema = [randn(33, device=device), randn(33, device=device), randn(5, device=device)]
    ema.append(ema[2])  # listed as its own source below
    _check_against_reference(ema[:3], [shared, shared, ema[2]], 0.9, backend)


def test_inference_tensors_updated_only_in_inference_mode(device, backend):
    with torch.inference_mode():
        ema, src = [randn(17, device=device)], [randn(17, device=device)]
    with pytest.raises(ValueError, match=r"ema_tensors\[0\] is an inference tensor"):
        ema_update_(ema, src, 0.9, backend=backend)
    with torch.inference_mode():
        _check_against_reference(ema, src, 0.9, backend)


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
