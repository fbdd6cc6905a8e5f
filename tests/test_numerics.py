"""The harness's own rule (tests/numerics.py): what it lets through and what it must catch."""
import pytest
import torch

from numerics import assert_close_by_rule, randn


def _rounded_and_shifted(ulps):
    """An fp64 reference, its correctly rounded fp32 (PyTorch's best case) and an fp32 result `ulps` ulps off
    at the reference's largest element."""
    ref = randn(5, 33, dtype=torch.float64, scale=30.0)  # ulps large against the absolute floor
    best = ref.float()
    i = ref.abs().argmax()
    off = best.clone().view(-1)
    for _ in range(ulps):
        off[i] = torch.nextafter(off[i], off[i] * 2)
    return ref, best, off.view_as(best)


def test_fp32_a_few_ulps_from_a_correctly_rounded_pytorch_pass():
    ref, best, off = _rounded_and_shifted(3)
    assert_close_by_rule(off, ref, best, what="three ulps")


@pytest.mark.parametrize("relative", [1e-5, 1e-3])
def test_fp32_errors_beyond_the_floor_fail(relative):
    ref, best, _ = _rounded_and_shifted(0)
    wrong = best.clone()
    wrong.view(-1)[0] += relative * ref.abs().max().item()
    with pytest.raises(AssertionError, match="max error"):
        assert_close_by_rule(wrong, ref, best)


def test_a_nan_the_reference_lacks_fails():
    ref, best, _ = _rounded_and_shifted(0)
    wrong = best.clone()
    wrong[2, 3] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close_by_rule(wrong, ref, best)
