"""Momentum EMA update: θ_ema ← m·θ_ema + (1−m)·θ over whole parameter lists, in place.

One launch per (EMA dtype, parameter dtype) group: the launcher builds a pointer table (per tensor:
EMA address, source address, numel; per program: tensor index and start offset) and every program of
the single launch updates one chunk of one tensor. The table is cached per list of addresses, so a
training loop pays for it once.

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cuda" (the CUDA C++ multi-tensor kernel in
csrc/ema_cuda.cu), "cpp" (CPU C++/OpenMP, csrc/ema_cpu.cpp) and "reference" (torch._foreach_lerp_).
"""
import itertools
import math
import operator

import torch
import triton
import triton.language as tl

from ._registry import CompileSpec
from ._dispatch import interpreting, resolve_backend, warn_once
from ._common import round_to

# ----------------------------------------------------------------------------------------------
# Triton kernels


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
def _ema_update_fwd_kernel(
    ema_addrs,  # *i64 [T]: address of each EMA tensor
    src_addrs,  # *i64 [T]: address of each source tensor
    numels,  # *i64 [T]
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
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + tensor)
    ema = tl.load(ema_addrs + tensor).to(tl.pointer_type(EMA_DTYPE))
    src = tl.load(src_addrs + tensor).to(tl.pointer_type(SRC_DTYPE))
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
    if full < stop:
        offs = start + full + lanes
        mask = offs < n
        e = tl.load(ema + offs, mask=mask).to(tl.float32)
        s = tl.load(src + offs, mask=mask).to(tl.float32)
        out = _lerp(e, s, w, small, one_minus_w, EMULATE)
        tl.store(ema + offs, round_to(out, EMA_DTYPE, EMULATE), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration

# A memory-bound stream: 1024 elements per step (16 B per thread per load for fp32 with 4 warps),
# 16 steps per program so small per-program overhead (table loads) amortises over 64 KiB of fp32.
_BLOCK = 1024
_CHUNK = 16 * _BLOCK
_NUM_WARPS = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_TRITON_SIG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


def compile_specs():
    """Every config the launcher can choose: each (EMA dtype, source dtype) pair x momentum form."""
    signature = {
        "ema_addrs": "*i64",
        "src_addrs": "*i64",
        "numels": "*i64",
        "block_tensor": "*i64",
        "block_start": "*i64",
        "weight": "fp32",
        "momentum_ptr": "*fp32",
        "EMA_DTYPE": "constexpr",
        "SRC_DTYPE": "constexpr",
        "WEIGHT_FROM_PTR": "constexpr",
        "ALIGNED": "constexpr",
        "EMULATE": "constexpr",
        "BLOCK": "constexpr",
        "CHUNK": "constexpr",
    }
    for ema_dtype in SUPPORTED_DTYPES:
        for src_dtype in SUPPORTED_DTYPES:
            for from_ptr, aligned in itertools.product((False, True), (True, False)):
                yield CompileSpec(
                    kernel=_ema_update_fwd_kernel,
                    signature=signature,
                    constexprs={
                        "EMA_DTYPE": _TL_DTYPES[ema_dtype],
                        "SRC_DTYPE": _TL_DTYPES[src_dtype],
                        "WEIGHT_FROM_PTR": from_ptr,
                        "ALIGNED": aligned,
                        "EMULATE": False,
                        "BLOCK": _BLOCK,
                        "CHUNK": _CHUNK,
                    },
                    num_warps=_NUM_WARPS,
                    label=f"ema={_TRITON_SIG[ema_dtype]} src={_TRITON_SIG[src_dtype]} "
                    f"momentum={'tensor' if from_ptr else 'float'} {'aligned' if aligned else 'unaligned'} "
                    f"BLOCK={_BLOCK} CHUNK={_CHUNK}",
                )


# ----------------------------------------------------------------------------------------------
# Launchers

_PLAN_CACHE = {}
_PLAN_CACHE_MAX = 64


def _is_dense(t):
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel) exactly once."""
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _pointer_table(ema_group, src_group, chunk):
    """Packed int64 table on the tensors' device; cached by addresses and sizes."""
    key = (ema_group[0].device, chunk) + tuple((e.data_ptr(), s.data_ptr(), e.numel()) for e, s in zip(ema_group, src_group))
    table = _PLAN_CACHE.get(key)
    if table is not None:
        return table
    numels = torch.tensor([e.numel() for e in ema_group], dtype=torch.int64)
    blocks_per_tensor = (numels + chunk - 1) // chunk
    block_tensor = torch.repeat_interleave(torch.arange(len(ema_group), dtype=torch.int64), blocks_per_tensor)
    first_block = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
    block_start = (torch.arange(block_tensor.numel(), dtype=torch.int64) - first_block[block_tensor]) * chunk
    packed = torch.cat(
        [
            torch.tensor([e.data_ptr() for e in ema_group], dtype=torch.int64),
            torch.tensor([s.data_ptr() for s in src_group], dtype=torch.int64),
            numels,
            block_tensor,
            block_start,
        ]
    )
    device = ema_group[0].device
    packed = packed.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else packed
    count = len(ema_group)
    table = (packed[:count], packed[count : 2 * count], packed[2 * count : 3 * count],
             packed[3 * count : 3 * count + block_tensor.numel()], packed[3 * count + block_tensor.numel() :])
    if len(_PLAN_CACHE) >= _PLAN_CACHE_MAX:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[key] = table
    return table


_UNUSED = {}


def _unused_fp32(device):
    # The kernel's signature is fixed (*fp32) whichever momentum form is used: one compiled variant each.
    if device not in _UNUSED:
        _UNUSED[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _UNUSED[device]


def _ema_update_triton(ema_group, src_group, momentum):
    ema_addrs, src_addrs, numels, block_tensor, block_start = _pointer_table(ema_group, src_group, _CHUNK)
    programs = block_tensor.numel()
    if programs == 0:
        return
    from_ptr = isinstance(momentum, torch.Tensor)
    if from_ptr:
        momentum_ptr, weight = momentum, 0.0
    else:
        momentum_ptr, weight = _unused_fp32(ema_group[0].device), 1.0 - momentum
    _ema_update_fwd_kernel[(programs,)](
        ema_addrs, src_addrs, numels, block_tensor, block_start, weight, momentum_ptr,
        EMA_DTYPE=_TL_DTYPES[ema_group[0].dtype],
        SRC_DTYPE=_TL_DTYPES[src_group[0].dtype],
        WEIGHT_FROM_PTR=from_ptr,
        ALIGNED=all(t.data_ptr() % 16 == 0 for t in ema_group + src_group),
        EMULATE=interpreting(),
        BLOCK=_BLOCK,
        CHUNK=_CHUNK,
        num_warps=_NUM_WARPS,
    )


def _extension_or_warn(backend, fallback):
    from mmfast._ext import extension_error, load_extension

    ext = load_extension()
    if ext is None:
        warn_once(
            ("ema_update_", backend),
            f"ema_update_: the C++ extension is unavailable ({extension_error()}); backend={backend!r} "
            f"falls back to {fallback!r}",
        )
    return ext


def _ema_update_cuda_ext(ema_group, src_group, momentum):
    ext = _extension_or_warn("cuda", "triton")
    if ext is None or not ext.with_cuda():
        if ext is not None:
            warn_once(("ema_update_", "cuda-missing"), "ema_update_: mmfast._C was built without CUDA; backend='cuda' falls back to 'triton'")
        return _ema_update_triton(ema_group, src_group, momentum)
    ema_addrs, src_addrs, numels, block_tensor, block_start = _pointer_table(ema_group, src_group, _CHUNK)
    from_ptr = isinstance(momentum, torch.Tensor)
    ext.ema_update_cuda(
        ema_addrs, src_addrs, numels, block_tensor, block_start,
        ema_group[0].dtype, src_group[0].dtype,
        0.0 if from_ptr else 1.0 - momentum,
        momentum if from_ptr else None,
        _CHUNK,
    )


def _ema_update_cpp(ema_group, src_group, momentum):
    ext = _extension_or_warn("cpp", "reference")
    if ext is None:
        from .reference import ema_update_reference

        return ema_update_reference(ema_group, src_group, momentum)
    # 1 - m rounded to fp32 exactly as the reference does for tensor momenta
    weight = float(1.0 - momentum.float()) if isinstance(momentum, torch.Tensor) else 1.0 - momentum
    ext.ema_update_cpu(ema_group, src_group, weight)


def _mark_written(tensors):
    """The kernels write through raw pointers: bump autograd's version counters as an in-place torch op
    would, so caches keyed on `._version` (e.g. a resampled position table) and autograd's saved-tensor
    checks see the update."""
    try:
        torch._C._increment_version(tensors)
    except TypeError:  # older torch takes one tensor at a time
        for t in tensors:
            torch._C._increment_version(t)


_BACKEND_FNS = {"triton": _ema_update_triton, "cuda": _ema_update_cuda_ext, "cpp": _ema_update_cpp}


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _local(t):
    # FSDP2/DTensor parameters: the update is elementwise, so each rank updates its local shard.
    if type(t) in _PLAIN_TENSOR_TYPES:  # the common case, checked first: this runs once per parameter
        return t
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _check_pair(i, e, s, ema_name, src_name, device):
    """Validate one (EMA, source) pair; returns them as plain local tensors."""
    e, s = _local(e), _local(s)
    if not isinstance(e, torch.Tensor) or not isinstance(s, torch.Tensor):
        raise ValueError(f"{ema_name}[{i}] and {src_name}[{i}] must be tensors, got {type(e).__name__} and {type(s).__name__}")
    if e.shape != s.shape:
        raise ValueError(f"{ema_name}[{i}] has shape {tuple(e.shape)} but {src_name}[{i}] has {tuple(s.shape)}; they must match")
    if e.device != s.device:
        raise ValueError(f"{ema_name}[{i}] is on {e.device} but {src_name}[{i}] is on {s.device}; they must be on one device")
    if device is not None and e.device != device:
        raise ValueError(f"{ema_name}[{i}] is on {e.device} but {ema_name}[0] is on {device}; all tensors must share a device")
    return e, s


def _check_lists(ema_name, ema_tensors, src_name, tensors):
    ema_tensors, tensors = list(ema_tensors), list(tensors)
    if len(ema_tensors) != len(tensors):
        raise ValueError(f"{ema_name} and {src_name} must have the same length, got {len(ema_tensors)} and {len(tensors)}")
    pairs, device = [], None
    for i, (e, s) in enumerate(zip(ema_tensors, tensors)):
        e, s = _check_pair(i, e, s, ema_name, src_name, device)
        device = e.device
        pairs.append((e, s))
    return pairs


_dtype_of, _device_of, _shape_of = (operator.attrgetter(a) for a in ("dtype", "device", "shape"))
_requires_grad_of = operator.attrgetter("requires_grad")


def _check_and_group(ema_tensors, tensors):
    """Validate the parameter lists and group them by launch: {(ema dtype, src dtype, aligned): ([ema], [src])}.

    With ~300 tensors per call, this Python, not the kernel, is what a small model's update costs on
    the host. The common case (plain contiguous tensors, one dtype per list, one device, 16-byte
    aligned, no grad) is checked list-wise with C-level iteration; anything else, including every
    error, takes the per-tensor loop, which names the offending tensor.
    """
    ema, src = list(ema_tensors), list(tensors)
    if (ema and len(ema) == len(src) and all(type(t) in _PLAIN_TENSOR_TYPES for t in ema)
            and all(type(t) in _PLAIN_TENSOR_TYPES for t in src)):
        ema_dtypes, src_dtypes = set(map(_dtype_of, ema)), set(map(_dtype_of, src))
        devices = set(map(_device_of, ema)) | set(map(_device_of, src))
        if (len(ema_dtypes) == 1 and len(src_dtypes) == 1 and len(devices) == 1
                and ema_dtypes.issubset(_TL_DTYPES) and src_dtypes.issubset(_TL_DTYPES)
                and list(map(_shape_of, ema)) == list(map(_shape_of, src))
                and all(map(torch.Tensor.is_contiguous, ema)) and all(map(torch.Tensor.is_contiguous, src))
                and not (torch.is_grad_enabled() and any(map(_requires_grad_of, ema)))):
            work_ema, work_src = ema, src
            if not all(map(torch.Tensor.numel, ema)):  # empty tensors need no work
                work_ema, work_src = [e for e in ema if e.numel()], [s for s in src if s.numel()]
            ptrs = itertools.chain(map(torch.Tensor.data_ptr, work_ema), map(torch.Tensor.data_ptr, work_src))
            if not any(p & 15 for p in ptrs):
                groups = {(ema[0].dtype, src[0].dtype, True): (work_ema, work_src)} if work_ema else {}
                return groups, next(iter(devices))
    return _check_and_group_slow(ema, src)


def _check_and_group_slow(ema_tensors, tensors):
    """The per-tensor loop behind _check_and_group: handles every layout and names what is wrong."""
    ema_tensors, tensors = list(ema_tensors), list(tensors)
    if len(ema_tensors) != len(tensors):
        raise ValueError(f"ema_tensors and tensors must have the same length, got {len(ema_tensors)} and {len(tensors)}")
    groups, device = {}, None
    grad_enabled = torch.is_grad_enabled()
    for i, (e, s) in enumerate(zip(ema_tensors, tensors)):
        e, s = _check_pair(i, e, s, "ema_tensors", "tensors", device)
        device = e.device
        if e.dtype not in _TL_DTYPES or s.dtype not in _TL_DTYPES:
            raise ValueError(f"ema_tensors[{i}] ({e.dtype}) and tensors[{i}] ({s.dtype}) must be float32, float16 or bfloat16")
        if not e.is_contiguous() and not _is_dense(e):
            raise ValueError(
                f"ema_tensors[{i}] (shape {tuple(e.shape)}, strides {e.stride()}) must be non-overlapping and dense: "
                "it is updated in place through its storage"
            )
        if grad_enabled and e.requires_grad and e.is_leaf:
            raise ValueError(f"ema_tensors[{i}] requires grad; update it under torch.no_grad() or detach it")
        if e.numel() == 0:
            continue
        e_ptr, s_ptr = e.data_ptr(), s.data_ptr()
        if s.stride() != e.stride():
            s = torch.empty_like(e, dtype=s.dtype).copy_(s)  # same layout as e, so flat indices line up
            s_ptr = s.data_ptr()
        # tensors off 16-byte alignment (rare views) get their own launch so the rest keeps 128-bit accesses
        key = (e.dtype, s.dtype, (e_ptr | s_ptr) % 16 == 0)
        group = groups.get(key)
        if group is None:
            group = groups[key] = ([], [])
        group[0].append(e)
        group[1].append(s)
    return groups, device


def ema_update_(ema_tensors, tensors, momentum, *, ema_buffers=(), buffers=(), backend="auto"):
    """In-place momentum EMA over lists of tensors: ``ema ← m·ema + (1−m)·θ``; buffers are copied.

    Args:
        ema_tensors: sequence of tensors updated in place (fp32, fp16 or bf16), e.g. a momentum encoder's
            parameters. Each must be non-overlapping and dense (contiguous, channels-last, ...).
        tensors: sequence of the same length and shapes (fp32, fp16 or bf16; any strides — a source
            whose layout differs from its EMA tensor's is first copied into that layout).
        momentum: m in [0, 1] as a Python float, or a 0-dim floating tensor (e.g. a cosine schedule on
            the GPU: changing it recompiles nothing and syncs nothing).
        ema_buffers, buffers: optional equal-length sequences; ``ema_buffers[i].copy_(buffers[i])``
            (BatchNorm running statistics, counters), done in the same call.
        backend: "auto" | "triton" | "cuda" | "cpp" | "reference" (see kernels/_dispatch.py).

    Math (bit-for-bit ``torch._foreach_lerp_(ema, θ, 1 − m)``): with w = 1 − m in fp32 and all
    arithmetic in fp32, ``ema + w·(θ − ema)`` if |w| < 0.5 else ``θ − (θ − ema)·(1 − w)``, each one fused
    multiply-add, rounded once to the EMA dtype. FSDP2/DTensor parameters are updated shard-locally.
    One kernel launch per (EMA dtype, source dtype) group.
    """
    groups, device = _check_and_group(ema_tensors, tensors)
    buffer_pairs = _check_lists("ema_buffers", ema_buffers, "buffers", buffers)
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise ValueError(f"momentum must be a float or a 0-dim floating tensor, got shape {tuple(momentum.shape)} dtype {momentum.dtype}")
    elif isinstance(momentum, (int, float)) and not isinstance(momentum, bool):
        momentum = float(momentum)
        if not (0.0 <= momentum <= 1.0) or math.isnan(momentum):
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    else:
        raise ValueError(f"momentum must be a float or a 0-dim floating tensor, got {type(momentum).__name__}")
    if device is None:
        if not buffer_pairs:
            return
        device = buffer_pairs[0][0].device
    chosen = resolve_backend("ema_update_", backend, device)
    if chosen == "reference":
        from .reference import ema_update_reference

        with torch.no_grad():
            ema_update_reference([e for g in groups.values() for e in g[0]], [x for g in groups.values() for x in g[1]],
                                 momentum, ema_buffers=[e for e, _ in buffer_pairs], buffers=[b for _, b in buffer_pairs])
        return
    if isinstance(momentum, torch.Tensor):
        momentum = momentum.detach().to(device=device, dtype=torch.float32, non_blocking=True)
    with torch.no_grad():
        for ema_group, src_group in groups.values():
            _BACKEND_FNS[chosen](ema_group, src_group, momentum)
            _mark_written(ema_group)
        if buffer_pairs:
            torch._foreach_copy_([e for e, _ in buffer_pairs], [b for _, b in buffer_pairs])
