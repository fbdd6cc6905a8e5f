"""Triton helpers shared by every kernel family."""
import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """Round fp32 to DTYPE to nearest-even, as the GPU's cvt.rn does.

    Triton's interpreter truncates fp32 -> bf16 casts, so under it (EMULATE) we round on the bits.
    """
    if EMULATE and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
