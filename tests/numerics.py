"""Numerics harness shared by every kernel test.

Rule: a kernel's error against an fp64 reference must be at most 2x the error of the same computation
done by PyTorch in the kernel's dtype, plus a tiny floor (3x for gradients, as flash-attn does).

Fresh random inputs every run; the seed is printed in pytest's header and in every failure so a run
can be replayed with MMFAST_TEST_SEED=<seed>.

Triton's interpreter differs from the GPU in three ways, all corrected in one place,
kernels/_common.py, under the EMULATE constexpr (true only under the interpreter):
- `tl.dot` on bf16 operands multiplies the raw uint16 bits (garbage): `_common.dot` widens 16-bit
  operands to fp32 (16-bit products are exact in fp32 and the GPU's MMA accumulates in fp32, so this is
  what the tensor cores compute);
- `tl.dot` ignores `input_precision`: for "tf32" `_common.dot` rounds fp32 operands to TF32 first, so
  the tests see the GPU's TF32 numerics when torch.get_float32_matmul_precision() is "high";
- fp32 -> bf16 casts truncate: `_common.round_to` rounds to nearest-even on the bits.
So every test checks everything around the dot (loads, casts, output rounding) against the same-dtype
PyTorch computation; the MMA instructions themselves are covered by the compile gate and by the CUDA run
of the same tests.
"""
import os
import random

import torch

SEED = int(os.environ.get("MMFAST_TEST_SEED", random.SystemRandom().randrange(2**31)))
# pytest-xdist workers inherit the environment of the process that loads this first: one seed for all of them
os.environ["MMFAST_TEST_SEED"] = str(SEED)
_counter = [0]

ODD_SIZES = (1, 77, 197, 257, 577, 1601)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def dtype_id(dtype):
    return DTYPE_IDS.get(dtype, str(dtype).replace("torch.", ""))


def generator(device="cpu"):
    """A fresh generator per call, derived from the session seed (distinct streams, replayable)."""
    _counter[0] += 1
    return torch.Generator(device=device).manual_seed(SEED * 1000003 + _counter[0])


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    g = generator("cpu")
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def poison_(t):
    """Fill with NaN (floats) or an extreme value so an element a kernel forgets to write fails."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


def assert_bitwise_equal(actual, expected, what=""):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{what}: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
    )
    a = actual.detach().cpu().contiguous().view(-1)
    e = expected.detach().cpu().contiguous().view(-1)
    if a.is_floating_point():
        # compare bits, so NaN == NaN and -0 != +0 exactly as stored
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, e = a.view(width), e.view(width)
    bad = (a != e).nonzero()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} of {a.numel()} elements differ bitwise, first at flat index {bad[0].item()} "
        f"(got {actual.reshape(-1)[bad[0]].item()}, expected {expected.reshape(-1)[bad[0]].item()}); seed {SEED}"
    )


def max_abs_error(actual, reference64):
    diff = actual.detach().to(torch.float64).cpu() - reference64.detach().to(torch.float64).cpu()
    if diff.numel() == 0:
        return 0.0
    return diff.abs().max().item()


FP32_ULPS = 4  # the fp32 floor in units of eps at the reference's largest magnitude


def assert_close_by_rule(actual, reference64, torch_same_dtype, *, factor=2.0, floor=None, what=""):
    """|actual - ref64| <= factor * |torch_same_dtype - ref64| + floor, and no NaN the reference lacks.
    The default floor is tiny and absolute, and for fp32 at least FP32_ULPS eps of max |ref64|.

    `torch_same_dtype` is the same computation done by PyTorch in the kernel's dtype: its error is
    the yardstick for what that dtype can achieve.
    """
    ref = reference64.detach().to(torch.float64).cpu()
    got = actual.detach().to(torch.float64).cpu()
    if floor is None:
        floor = {torch.float64: 1e-12, torch.float32: 1e-6}.get(actual.dtype, 1e-4)
        finite = ref[torch.isfinite(ref)]  # a NaN or inf in the reference must not lift the floor to inf
        if actual.dtype == torch.float32 and finite.numel():
            # fp32 PyTorch is often correctly rounded (half an ulp), so twice its error can be under one ulp of
            # the output, while another valid order of the same operations (a kernel's reduction tree, rsqrt
            # as 1/sqrt) lands a few ulps off: CI once failed Liger's RMSNorm at 3.4 ulps of a value of 4.3
            floor = max(floor, FP32_ULPS * torch.finfo(torch.float32).eps * finite.abs().max().item())
    nan_bad = (torch.isnan(got) & ~torch.isnan(ref)).sum().item()
    assert nan_bad == 0, f"{what}: {nan_bad} NaN where the reference has none (unwritten output?); seed {SEED}"
    kernel_err = max_abs_error(got, ref)
    torch_err = max_abs_error(torch_same_dtype, ref)
    bound = factor * torch_err + floor
    assert kernel_err <= bound, (
        f"{what}: max error {kernel_err:.3e} > {factor} x PyTorch's {torch_err:.3e} + {floor:.0e}; seed {SEED}"
    )
    return kernel_err, torch_err


def assert_same_greedy_tokens(got, expected, next_logits, *, tie=1e-4):
    """Greedy generations equal token for token, unless they part where the reference's top two logits
    tie within `tie` (relative to the largest logit): there fp32 rounding, not a bug, picks the token, and
    nothing after the parting can be compared. next_logits(prefix) -> (B, vocab): the reference model's
    next-token logits after the (B, T) tokens `prefix` (the first `prefix.shape[1]` columns of the output)."""
    if torch.equal(got, expected):
        return
    assert got.shape == expected.shape, f"{tuple(got.shape)} vs {tuple(expected.shape)}"
    differ = (got != expected).any(dim=0).nonzero()
    t = int(differ[0])
    logits = next_logits(expected[:, :t]).double()
    rows = (got[:, t] != expected[:, t]).nonzero().flatten().tolist()
    for r in rows:
        a, b = logits[r, int(got[r, t])], logits[r, int(expected[r, t])]
        scale = logits[r].abs().max().clamp(min=1.0)
        assert (a - b).abs() <= tie * scale, (
            f"generations part at position {t} (row {r}): ours {int(got[r, t])}, expected {int(expected[r, t])}, "
            f"whose logits differ by {(b - a).item():.3e} (not a tie)\n{got}\n{expected}")


def randomise_norms_(model):
    """Norm weights and biases are 1 / 0 at init: made random (in place, under no_grad), so that a parity
    test of a weight conversion cannot pass with a wrong mapping of them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.2, 0.2)
    return model
