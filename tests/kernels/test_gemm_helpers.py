"""mm_f32 / addmm_f32 (kernels/_common.py), the GEMMs of the "gemm" backends: 16-bit operands give the
fp32 accumulation of their exact products (cuBLAS's fp32-output GEMM on CUDA, an upcast elsewhere)."""
import pytest
import torch
from numerics import dtype_id, randn

from mmfast.kernels import _common


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_mm_f32_accumulates_exact_products_in_fp32(device, dtype):
    x, y, acc = randn(77, 197, dtype=dtype, device=device), randn(197, 45, dtype=dtype, device=device), randn(77, 45, device=device)
    exact = x.double() @ y.double()
    # fp32 accumulation over K = 197 terms of |products| ~ 1: a few ulps of fp32 at the sum's magnitude
    bound = 197 * torch.finfo(torch.float32).eps * (x.double().abs() @ y.double().abs())
    got = _common.mm_f32(x, y)
    assert got.dtype == torch.float32 and got.shape == (77, 45)
    assert ((got.double() - exact).abs() <= bound).all()
    got_acc = _common.addmm_f32(acc, x, y)
    assert got_acc.dtype == torch.float32
    assert ((got_acc.double() - (acc.double() + exact)).abs() <= bound + 4 * torch.finfo(torch.float32).eps).all()
    if dtype != torch.float32:  # the fp32 result is the accumulator, not a 16-bit rounding of it
        assert (got.double() - exact).abs().max() < (x @ y).double().sub(exact).abs().max() / 8
    # the fp32-output overload must exist where the GPU runs (torch >= 2.8): no silent slow fallback
    assert _common._FP32_OUT_GEMM[0]


def test_mm_f32_transposed_operands(device):
    """The backward's db GEMM takes Gᵀ, a view: read through its strides."""
    g, a = randn(45, 77, dtype=torch.bfloat16, device=device), randn(45, 30, dtype=torch.bfloat16, device=device)
    a = a.T.contiguous().T  # column-major too, as Wᵀ and dyᵀ are in the gated linear layer
    torch.testing.assert_close(_common.mm_f32(g.T, a), g.T.float() @ a.float(), rtol=1e-6, atol=1e-5)
