"""The EMA kernel's launch config, as data, and the compile-gate specs derived from its signature."""
import itertools

from .._common import DTYPE_NAMES, TL_DTYPES, TRITON_DTYPES
from .._registry import CompileSpec, derive_signature
from ._kernels import ema_update_kernel

# One config for every dtype pair and momentum form: the update is a memory-bound stream.
BLOCK = 1024  # elements per step: 16 B per thread per fp32 load with 4 warps, so accesses are 128-bit
CHUNK = 16 * BLOCK  # elements per program: 16 steps amortise the table loads over 64 KiB of fp32
NUM_WARPS = 4  # enough threads per program for the 128-bit accesses; many programs per SM hide latency

# the kernel's non-constexpr parameters: the fp32 weight, the momentum pointer, and int64 tables
_ARG_TYPES = {"weight": "fp32", "momentum_ptr": "*fp32"}
_TABLE_TYPE = "*i64"


def compile_specs():
    """Every config the launcher can choose: each (EMA dtype, source dtype) pair x momentum form (Python
    float or 0-dim tensor) x aligned / unaligned addresses."""
    signature = derive_signature(ema_update_kernel, _ARG_TYPES, default=_TABLE_TYPE)
    for ema_dtype, src_dtype in itertools.product(TRITON_DTYPES, TRITON_DTYPES):
        for from_ptr, aligned in itertools.product((False, True), (True, False)):
            yield CompileSpec(
                kernel=ema_update_kernel,
                signature=signature,
                constexprs={
                    "EMA_DTYPE": TL_DTYPES[ema_dtype],
                    "SRC_DTYPE": TL_DTYPES[src_dtype],
                    "WEIGHT_FROM_PTR": from_ptr,
                    "ALIGNED": aligned,
                    "EMULATE": False,
                    "BLOCK": BLOCK,
                    "CHUNK": CHUNK,
                },
                num_warps=NUM_WARPS,
                label=f"ema={DTYPE_NAMES[ema_dtype]} src={DTYPE_NAMES[src_dtype]} "
                f"momentum={'tensor' if from_ptr else 'float'} {'aligned' if aligned else 'unaligned'} "
                f"BLOCK={BLOCK} CHUNK={CHUNK}",
            )
