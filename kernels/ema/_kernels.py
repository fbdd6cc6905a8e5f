"""The momentum EMA's Triton kernel: one launch updates a whole group of tensors.

The launcher (``_launch.py``) flattens a list of (EMA, source) tensor pairs into a pointer table: per
tensor its two addresses and its element count, per program the tensor it works on and where its chunk
starts. Each program updates one chunk of at most CHUNK elements of one tensor, BLOCK at a time.
"""
import triton
import triton.language as tl

from .._common import round_to


@triton.jit
def _fma_f32(a, b, c, EMULATE: tl.constexpr):
    """fp32 fused multiply-add, rounded once.

    Triton's interpreter evaluates tl.fma as numpy's a*b + c (two roundings), so under the interpreter
    we emulate the fused operation exactly: a*b is exact in fp64, the fp64 sum is rounded to odd (its
    exact error, from TwoSum, decides the direction), and rounding that to fp32 is then correct.
    """
    if EMULATE:
        a64 = a.to(tl.float64)
        b64 = b.to(tl.float64)
        c64 = c.to(tl.float64)
        prod = a64 * b64
        total = prod + c64
        b_virtual = total - prod
        err = (prod - (total - b_virtual)) + (c64 - b_virtual)
        bits = total.to(tl.int64, bitcast=True)
        toward_exact = tl.where((err > 0) == (total > 0), bits + 1, bits - 1)
        bits = tl.where((err != 0) & ((bits & 1) == 0), toward_exact, bits)
        return bits.to(tl.float64, bitcast=True).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _lerp(e, s, w, small, one_minus_w, EMULATE: tl.constexpr):
    """torch.lerp(e, s, w) in fp32: the formula is picked by |w| so that w near 1 keeps precision."""
    d = s - e
    return tl.where(small, _fma_f32(w, d, e, EMULATE), _fma_f32(-d, one_minus_w, s, EMULATE))


@triton.jit
def ema_update_kernel(
    ema_addrs,  # *i64 [T]: address of each EMA tensor
    src_addrs,  # *i64 [T]: address of each source tensor
    numels,  # *i64 [T]: element count of each tensor
    block_tensor,  # *i64 [programs]: tensor index of each program
    block_start,  # *i64 [programs]: first element of each program's chunk
    weight,  # fp32: 1 - momentum, when WEIGHT_FROM_PTR is False
    momentum_ptr,  # *fp32: 0-dim momentum tensor, when WEIGHT_FROM_PTR is True
    EMA_DTYPE: tl.constexpr,
    SRC_DTYPE: tl.constexpr,
    WEIGHT_FROM_PTR: tl.constexpr,
    ALIGNED: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    tl.static_assert(CHUNK % BLOCK == 0)
    # which chunk of which tensor this program updates, from the launcher's table
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + tensor)
    ema = tl.load(ema_addrs + tensor).to(tl.pointer_type(EMA_DTYPE))
    src = tl.load(src_addrs + tensor).to(tl.pointer_type(SRC_DTYPE))
    # w = 1 - m in fp32, as torch._foreach_lerp_ rounds its weight; a tensor momentum is read on the
    # device, so a schedule that changes it costs no recompilation and no host sync
    if WEIGHT_FROM_PTR:
        w = 1.0 - tl.load(momentum_ptr).to(tl.float32)
    else:
        w = tl.full((), weight, tl.float32)  # the interpreter passes Python floats as fp64
    small = tl.abs(w) < 0.5
    one_minus_w = 1.0 - w
    stop = tl.minimum(n - start, CHUNK)  # a tensor's last chunk (or a tiny tensor) runs only what it needs
    full = (stop // BLOCK) * BLOCK
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    # full steps: no mask, and 16-byte-aligned addresses (ALIGNED) let the compiler emit 128-bit accesses
    for i in tl.range(0, full, BLOCK):
        ema_ptrs = ema + start + i + lanes
        src_ptrs = src + start + i + lanes
        if ALIGNED:
            ema_ptrs = tl.multiple_of(ema_ptrs, 16)
            src_ptrs = tl.multiple_of(src_ptrs, 16)
        e = tl.load(ema_ptrs).to(tl.float32)
        s = tl.load(src_ptrs).to(tl.float32)
        tl.store(ema_ptrs, round_to(_lerp(e, s, w, small, one_minus_w, EMULATE), EMA_DTYPE, EMULATE))
    # the chunk's tail: one masked step
    if full < stop:
        offs = start + full + lanes
        mask = offs < n
        e = tl.load(ema + offs, mask=mask).to(tl.float32)
        s = tl.load(src + offs, mask=mask).to(tl.float32)
        out = _lerp(e, s, w, small, one_minus_w, EMULATE)
        tl.store(ema + offs, round_to(out, EMA_DTYPE, EMULATE), mask=mask)
