"""Momentum EMA: θ_ema ← m·θ_ema + (1−m)·θ over whole parameter lists, in place.

One launch per (EMA dtype, parameter dtype) group: the launcher builds a pointer table (per tensor:
EMA address, source address, numel; per program: tensor index and start offset) and every program of
the single launch updates one chunk of one tensor. The table is cached per list of addresses, so a
training loop pays for it once.

Files: _kernels.py (the Triton kernel), _configs.py (its launch config and compile specs),
_launch.py (argument checks, pointer tables, the Triton launch and the C++ backends' calls), this file
(the public op). The C++ backends live in csrc/ (ema_cuda.cu, ema_cpu.cpp).
"""
from .._dispatch import resolve_backend
from ._configs import compile_specs
from ._launch import (OP, check_and_group, check_backend_dtypes, check_backend_name, check_buffers, check_momentum,
                      run)

__all__ = ["ema_update_", "compile_specs"]


def ema_update_(ema_tensors, tensors, momentum, *, ema_buffers=(), buffers=(), backend="auto"):
    """In-place momentum EMA over lists of tensors: ``ema ← m·ema + (1−m)·θ``; buffers are copied.

    Args:
        ema_tensors: list or tuple (any iterable but a tensor) of tensors updated in place, e.g. a
            momentum encoder's parameters. Each must be non-overlapping and dense (contiguous,
            channels-last, ...), share no memory with another EMA tensor or a source (a tied weight
            listed twice is refused; a tensor may be its own source), and be an inference tensor only
            inside ``torch.inference_mode``, else ValueError naming it. A bare tensor is refused:
            iterating it would treat its rows as parameters.
        tensors: a sequence of the same length and shapes (any strides: a source whose layout differs
            from its EMA tensor's is first copied into that layout).
        momentum: m in [0, 1], as a Python float (else ValueError) or a 0-dim floating tensor, e.g. a
            cosine schedule on the GPU: changing it recompiles nothing and syncs nothing, and its range
            is checked on its device (``torch._assert_async``: a RuntimeError on the CPU, a device-side
            assert on CUDA), never by a host sync.
        ema_buffers, buffers: optional equal-length sequences; ``ema_buffers[i].copy_(buffers[i])``
            (BatchNorm running statistics, counters), done in the same call.
        backend: "auto" | "triton" | "cuda" | "cpp" | "reference".

    Dtypes: fp32, fp16 and bf16 on every backend, in any (EMA, source) pairing; float64 on
    ``backend="reference"`` only (the other backends raise ValueError naming the tensor).

    Math (bit-for-bit ``torch._foreach_lerp_(ema, θ, 1 − m)``): with w = 1 − m in fp32 and all
    arithmetic in fp32, ``ema + w·(θ − ema)`` if |w| < 0.5 else ``θ − (θ − ema)·(1 − w)``, each one fused
    multiply-add, rounded once to the EMA dtype. Every backend gives the same bits. float64 (reference)
    runs in float64. FSDP2/DTensor parameters are updated shard-locally.

    Autocast and precision: an in-place update, outside torch.autocast's op lists (as
    ``torch._foreach_lerp_`` is): autocast changes nothing, the results are the same bits with it on or
    off. There is no matmul, so ``torch.get_float32_matmul_precision()`` does not apply.

    Backends:
        - "triton": the kernel in _kernels.py (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
        - "cuda": the CUDA C++ multi-tensor kernel (csrc/ema_cuda.cu); builds the extension on first
          use if needed, and falls back to "triton", with a one-time warning, when it cannot be had.
        - "cpp": the CPU C++/OpenMP loop (csrc/ema_cpu.cpp); falls back to "reference", with a
          one-time warning, when the extension cannot be had.
        - "reference": ``kernels/reference.py``'s ``ema_update_reference`` (``torch._foreach_lerp_``).
        - "auto": ``MMFAST_BACKEND`` when it names one of the above (other values, e.g. "chunked", are
          ignored); else, on CUDA tensors, "cuda" when the extension is already built with CUDA
          (prebuilt, or built earlier in this process: auto never starts a build, which takes
          minutes), otherwise "triton"; on CPU tensors "reference". This order prefers the C++
          kernel but is not a measured "faster": ``python -m mmfast bench`` (the ema suite) times both
          on your GPU. ``python -m mmfast info`` prints what auto runs here.

    One kernel launch per (EMA dtype, source dtype) group (tensors off 16-byte alignment get their
    own). The launch writes through raw pointers and bumps the EMA tensors' version counters as an
    in-place torch op would.
    """
    groups, device, float64_arg = check_and_group(ema_tensors, tensors)
    buffer_pairs = check_buffers(ema_buffers, buffers)
    momentum = check_momentum(momentum)
    check_backend_name(backend)
    if device is None:
        if not buffer_pairs:
            return
        device = buffer_pairs[0][0].device
    chosen = resolve_backend(OP, backend, device)
    check_backend_dtypes(chosen, float64_arg)
    run(chosen, groups, buffer_pairs, momentum, device)
