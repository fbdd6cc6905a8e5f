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
