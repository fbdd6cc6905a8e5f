"""MomentumEncoder: EMA copy of a model, updated with ema_update_."""
import io

import pytest
import torch
from numerics import assert_bitwise_equal
from torch import nn

from mmfast.kernels.reference import ema_update_reference
from mmfast.nn import MomentumEncoder


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(5))


@pytest.fixture
def online():
    model = _model()
    model(torch.randn(2, 3, 9, 9))  # materialise the lazy layer and move BN statistics
    return model


def test_update_matches_reference_and_copies_buffers(online):
    enc = MomentumEncoder(online, momentum=0.99)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(2, 3, 9, 9))  # changes BN running stats
    expected = [p.clone() for p in enc.ema.parameters()]
    ema_update_reference(expected, list(online.parameters()), 0.99)
    enc.update()
    for got, want in zip(enc.ema.parameters(), expected):
        assert_bitwise_equal(got, want, what="EMA parameter")
    for got, want in zip(enc.ema.buffers(), online.buffers()):
        assert_bitwise_equal(got, want, what="buffer")


def test_copy_buffers_false_keeps_the_copys_own_statistics(online):
    enc = MomentumEncoder(online, momentum=0.5, copy_buffers=False)  # MoCo's key encoder
    enc(torch.randn(2, 3, 9, 9))  # the copy's BN statistics move on their own
    own = [b.clone() for b in enc.ema.buffers()]
    online(torch.randn(2, 3, 9, 9))
    enc.update()
    for got, want in zip(enc.ema.buffers(), own):
        assert_bitwise_equal(got, want, what="the copy's buffer")
    with pytest.raises(ValueError, match="copy_buffers"):
        MomentumEncoder(online, copy_buffers=1)


def test_copy_has_no_grads_and_owns_only_its_parameters(online):
    enc = MomentumEncoder(online)
    assert all(not p.requires_grad for p in enc.parameters())
    assert len(list(enc.parameters())) == len(list(online.parameters()))
    out = enc(torch.randn(2, 3, 9, 9))
    assert not out.requires_grad


def test_state_dict_round_trip(online):
    enc = MomentumEncoder(online)
    enc.update(0.5)
    buffer = io.BytesIO()
    torch.save(enc.state_dict(), buffer)
    buffer.seek(0)
    other = MomentumEncoder(online)
    other.load_state_dict(torch.load(buffer))
    for a, b in zip(enc.state_dict().values(), other.state_dict().values()):
        assert_bitwise_equal(a, b, what="state_dict entry")
    assert all(k.startswith("ema.") for k in enc.state_dict())


def test_tensor_momentum_and_fp32_copy_of_bf16_model(online):
    online = online.to(torch.bfloat16)
    enc = MomentumEncoder(online, ema_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in enc.ema.parameters())
    expected = [p.clone() for p in enc.ema.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1)
    ema_update_reference(expected, list(online.parameters()), torch.tensor(0.9))
    enc.update(torch.tensor(0.9))
    for got, want in zip(enc.ema.parameters(), expected):
        assert_bitwise_equal(got, want, what="EMA parameter")


def test_structure_change_is_an_error(online):
    enc = MomentumEncoder(online)
    online.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no longer match"):
        enc._check_structure()


class TestArguments:
    """Every constructor argument is checked, naming it (before: a non-module raised AttributeError deep
    in deepcopy's caller, momentum=1.5 and backend="fast" were accepted until the first update)."""

    def test_model_must_be_a_module(self):
        with pytest.raises(ValueError, match="MomentumEncoder: model must be a torch.nn.Module, got list"):
            MomentumEncoder([nn.Linear(2, 2)])

    @pytest.mark.parametrize("momentum", [1.5, -0.1, float("nan")], ids=["1.5", "-0.1", "nan"])
    def test_momentum_out_of_range(self, online, momentum):
        with pytest.raises(ValueError, match=r"MomentumEncoder: momentum must be (finite|in \[0, 1\])"):
            MomentumEncoder(online, momentum)

    @pytest.mark.parametrize("momentum", ["0.9", torch.tensor([0.9]), torch.tensor(1)], ids=["str", "1-d", "int-tensor"])
    def test_momentum_bad_type(self, online, momentum):
        with pytest.raises(ValueError, match="MomentumEncoder: momentum must be a float or a 0-dim floating tensor"):
            MomentumEncoder(online, momentum)

    def test_tensor_momentum_checked_on_its_device(self, online):
        with pytest.raises(RuntimeError, match=r"MomentumEncoder: momentum must be finite and in \[0, 1\]"):
            MomentumEncoder(online, torch.tensor(1.5))

    @pytest.mark.parametrize("ema_dtype", [torch.int32, "float32", torch.float8_e4m3fn], ids=["int32", "str", "fp8"])
    def test_ema_dtype(self, online, ema_dtype):
        with pytest.raises(ValueError, match="MomentumEncoder: ema_dtype must be None or one of"):
            MomentumEncoder(online, ema_dtype=ema_dtype)

    @pytest.mark.parametrize("backend", ["fast", "chunked", None])
    def test_backend(self, online, backend):
        with pytest.raises(ValueError, match="MomentumEncoder: backend must be one of"):
            MomentumEncoder(online, backend=backend)

    def test_update_momentum_checked(self, online):
        enc = MomentumEncoder(online)
        with pytest.raises(ValueError, match=r"ema_update_: momentum must be in \[0, 1\]"):
            enc.update(1.5)
        with pytest.raises(RuntimeError, match=r"ema_update_: momentum must be finite and in \[0, 1\]"):
            enc.update(torch.tensor(1.5))


def test_float64_copy_on_the_reference(online):
    """A float64 EMA runs on backend="reference" (auto on the CPU); the kernels refuse it by name."""
    enc = MomentumEncoder(online, momentum=0.9, ema_dtype=torch.float64)
    before = [p.clone() for p in enc.ema.parameters()]
    enc.update()
    for got, old, p in zip(enc.ema.parameters(), before, online.parameters()):
        assert got.dtype == torch.float64
        want = old * 0.9 + p.double() * 0.1
        assert ((got - want).abs() <= 1e-13 * (old.abs() + p.double().abs())).all()
    with pytest.raises(ValueError, match=r"ema_tensors\[0\] must be float16, bfloat16 or float32 on this backend"):
        MomentumEncoder(online, ema_dtype=torch.float64, backend="cpp").update()
