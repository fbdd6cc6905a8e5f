"""Validation, pointer tables and launches of the momentum EMA, for every backend.

Read top to bottom: the checks of ``ema_update_``'s arguments (naming the argument at fault), the
pointer table and the Triton launch, the C++ extension's two entry points ("cuda": csrc/ema_cuda.cu,
"cpp": csrc/ema_cpu.cpp) with their one-time-warning fallbacks ('cuda' -> 'triton', 'cpp' ->
'reference'), and ``run``, which sends each dtype group to the chosen backend.
"""
import itertools
import operator
from collections.abc import Iterable

import torch

from .. import reference
from .._common import (TL_DTYPES, check_choice, check_scalar, check_triton_dtype, interpreting, remember,
                       warn_once)
from .._registry import accelerated_backends
from ._configs import BLOCK, CHUNK, NUM_WARPS
from ._kernels import ema_update_kernel

OP = "ema_update_"
# the dtypes ema_update_ takes: the kernels' three, and float64 on backend="reference"
_DTYPES = tuple(TL_DTYPES) + (torch.float64,)
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

# ----------------------------------------------------------------------------------------------
# Argument checks


def check_backend_name(backend, op=OP):
    """One of the op's backends, also when there is nothing to update (resolve_backend needs a device)."""
    return check_choice(op, "backend", backend, ("auto", "reference") + tuple(accelerated_backends(OP)))


def check_momentum(momentum, op=OP):
    """m in [0, 1]: a Python number (returned as a float), or a 0-dim floating tensor checked on its
    device by check_scalar's policy (no host sync)."""
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise ValueError(f"{op}: momentum must be a float or a 0-dim floating tensor, got a tensor of shape "
                             f"{tuple(momentum.shape)} and dtype {momentum.dtype}")
    elif isinstance(momentum, (int, float)) and not isinstance(momentum, bool):
        momentum = float(momentum)
    else:
        raise ValueError(f"{op}: momentum must be a float or a 0-dim floating tensor, got {type(momentum).__name__}")
    return check_scalar(op, "momentum", momentum, lo=0, hi=1)


def _as_list(name, value):
    """A list, tuple or other iterable of tensors (e.g. ``model.parameters()``), never a bare tensor:
    iterating a tensor would update its rows as if they were separate parameters."""
    if isinstance(value, torch.Tensor):
        raise ValueError(f"{OP}: {name} must be a list or tuple of tensors, got a single tensor of shape "
                         f"{tuple(value.shape)}; wrap it in a list")
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{OP}: {name} must be a list or tuple of tensors, got {type(value).__name__}")
    return list(value)


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
        raise ValueError(f"{OP}: {ema_name}[{i}] and {src_name}[{i}] must be tensors, got {type(e).__name__} and "
                         f"{type(s).__name__}")
    if e.shape != s.shape:
        raise ValueError(f"{OP}: {ema_name}[{i}] has shape {tuple(e.shape)} but {src_name}[{i}] has "
                         f"{tuple(s.shape)}; they must match")
    if e.device != s.device:
        raise ValueError(f"{OP}: {ema_name}[{i}] is on {e.device} but {src_name}[{i}] is on {s.device}; they must "
                         "be on one device")
    if device is not None and e.device != device:
        raise ValueError(f"{OP}: {ema_name}[{i}] is on {e.device} but {ema_name}[0] is on {device}; all tensors "
                         "must share a device")
    return e, s


def _check_lengths(ema_name, ema, src_name, src):
    if len(ema) != len(src):
        raise ValueError(f"{OP}: {ema_name} and {src_name} must have the same length, got {len(ema)} and {len(src)}")


def check_buffers(ema_buffers, buffers):
    """The (EMA buffer, buffer) pairs to copy: equal-length sequences of tensors of matching shapes."""
    ema_buffers, buffers = _as_list("ema_buffers", ema_buffers), _as_list("buffers", buffers)
    _check_lengths("ema_buffers", ema_buffers, "buffers", buffers)
    pairs, device = [], None
    for i, (e, s) in enumerate(zip(ema_buffers, buffers)):
        e, s = _check_pair(i, e, s, "ema_buffers", "buffers", device)
        device = e.device
        pairs.append((e, s))
    return pairs


_dtype_of, _device_of, _shape_of = (operator.attrgetter(a) for a in ("dtype", "device", "shape"))
_requires_grad_of = operator.attrgetter("requires_grad")


def check_and_group(ema_tensors, tensors):
    """Validate the parameter lists and group them by launch.

    Returns ``(groups, device, float64_arg)``: groups ``{(ema dtype, src dtype, aligned): ([ema], [src])}``
    (empty tensors dropped), the tensors' device (None when there is no tensor) and, when a tensor is
    float64, ``(its argument name, it)`` for the backends that must reject it.

    With ~300 tensors per call, this Python, not the kernel, is what a small model's update costs on
    the host. The common case (plain contiguous tensors, one kernel dtype per list, one device, 16-byte
    aligned, no grad) is checked list-wise with C-level iteration; anything else, including every
    error, takes the per-tensor loop, which names the offending tensor.
    """
    ema, src = _as_list("ema_tensors", ema_tensors), _as_list("tensors", tensors)
    if (ema and len(ema) == len(src) and all(type(t) in _PLAIN_TENSOR_TYPES for t in ema)
            and all(type(t) in _PLAIN_TENSOR_TYPES for t in src)):
        ema_dtypes, src_dtypes = set(map(_dtype_of, ema)), set(map(_dtype_of, src))
        devices = set(map(_device_of, ema)) | set(map(_device_of, src))
        if (len(ema_dtypes) == 1 and len(src_dtypes) == 1 and len(devices) == 1
                and ema_dtypes.issubset(TL_DTYPES) and src_dtypes.issubset(TL_DTYPES)
                and list(map(_shape_of, ema)) == list(map(_shape_of, src))
                and all(map(torch.Tensor.is_contiguous, ema)) and all(map(torch.Tensor.is_contiguous, src))
                and not (torch.is_grad_enabled() and any(map(_requires_grad_of, ema)))
                and (torch.is_inference_mode_enabled() or not any(map(torch.Tensor.is_inference, ema)))):
            work_ema, work_src, indices = ema, src, range(len(ema))
            if not all(map(torch.Tensor.numel, ema)):  # empty tensors need no work
                indices = [i for i, e in enumerate(ema) if e.numel()]
                work_ema, work_src = [ema[i] for i in indices], [src[i] for i in indices]
            ema_ptrs, src_ptrs = tuple(map(torch.Tensor.data_ptr, work_ema)), tuple(map(torch.Tensor.data_ptr, work_src))
            if not any(p & 15 for p in itertools.chain(ema_ptrs, src_ptrs)):
                groups = {(ema[0].dtype, src[0].dtype, True): (work_ema, work_src)} if work_ema else {}
                _check_layout(((ema[0].dtype, src[0].dtype, ema_ptrs, src_ptrs,
                                tuple(map(torch.Tensor.numel, work_ema))),), (indices,))
                return groups, next(iter(devices)), None
    return _check_and_group_slow(ema, src)


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


def _check_and_group_slow(ema, src):
    """The per-tensor loop behind check_and_group: handles every layout and names what is wrong."""
    _check_lengths("ema_tensors", ema, "tensors", src)
    groups, group_indices, device, float64_arg = {}, {}, None, None
    grad_enabled = torch.is_grad_enabled()
    for i, (e, s) in enumerate(zip(ema, src)):
        e, s = _check_pair(i, e, s, "ema_tensors", "tensors", device)
        device = e.device
        for name, t in ((f"ema_tensors[{i}]", e), (f"tensors[{i}]", s)):
            if t.dtype not in _DTYPES:
                raise ValueError(f"{OP}: {name} must be float32, float16 or bfloat16 (or float64 on "
                                 f"backend='reference'), got {t.dtype}")
            if t.dtype == torch.float64 and float64_arg is None:
                float64_arg = (name, t)
        if not e.is_contiguous() and not _is_dense(e):
            raise ValueError(
                f"{OP}: ema_tensors[{i}] (shape {tuple(e.shape)}, strides {e.stride()}) must be non-overlapping "
                "and dense: it is updated in place through its storage"
            )
        if grad_enabled and e.requires_grad and e.is_leaf:
            raise ValueError(f"{OP}: ema_tensors[{i}] requires grad; update it under torch.no_grad() or detach it")
        if e.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(f"{OP}: ema_tensors[{i}] is an inference tensor (made under torch.inference_mode), "
                             "which torch updates in place only inside inference mode; clone it first")
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
            group_indices[key] = []
        group[0].append(e)
        group[1].append(s)
        group_indices[key].append(i)
    check_no_overlap(groups, group_indices.values())
    return groups, device, float64_arg


_NO_OVERLAP = {}  # the address layouts already found free of overlaps: a training loop checks once
_NO_OVERLAP_MAX = 64


def check_no_overlap(groups, indices):
    """No EMA tensor shares memory with another EMA tensor or with any source, except its own source when
    both are the very same elements (ema ← ema). Each backend would give its own answer otherwise: the
    reference updates a tensor listed twice (tied weights from a state_dict) twice and refuses a partly
    overlapping source, the kernels race. Every tensor here is dense, so it spans [data_ptr, + nbytes)."""
    _check_layout(tuple((e[0].dtype, s[0].dtype, tuple(map(torch.Tensor.data_ptr, e)),
                         tuple(map(torch.Tensor.data_ptr, s)), tuple(map(torch.Tensor.numel, e)))
                        for e, s in groups.values()), indices)


def _check_layout(key, indices):
    """check_no_overlap on ((EMA dtype, source dtype, EMA addresses, source addresses, numels), ...) per group;
    `indices`: per group, the pairs' positions in the caller's lists (for the message)."""
    if key in _NO_OVERLAP:
        return
    spans = []  # (start, end, is_written, name)
    for (ema_dtype, src_dtype, ema_ptrs, src_ptrs, numels), group_indices in zip(key, indices):
        e_size, s_size = ema_dtype.itemsize, src_dtype.itemsize
        for e_ptr, s_ptr, n, i in zip(ema_ptrs, src_ptrs, numels, group_indices):
            spans.append((e_ptr, e_ptr + n * e_size, True, f"ema_tensors[{i}]"))
            if (s_ptr, s_size) != (e_ptr, e_size):
                spans.append((s_ptr, s_ptr + n * s_size, False, f"tensors[{i}]"))
    spans.sort()
    # sweep in address order, keeping the span reaching furthest and the written span reaching furthest
    furthest = furthest_written = None
    for span in spans:
        start, end, written, _ = span
        for earlier in (furthest_written, furthest if written else None):
            if earlier is not None and start < earlier[1]:
                a, b = sorted((earlier[3], span[3]))
                raise ValueError(f"{OP}: {a} and {b} share memory; the EMA tensors must not overlap each other or "
                                 "any source (a tensor listed twice, e.g. tied weights from a state_dict, is one "
                                 "of these): pass each tensor once")
        if furthest is None or end > furthest[1]:
            furthest = span
        if written and (furthest_written is None or end > furthest_written[1]):
            furthest_written = span
    remember(_NO_OVERLAP, key, True, _NO_OVERLAP_MAX)


def check_backend_dtypes(backend, float64_arg):
    """float64 runs on the reference only: the kernels and the C++ backends reject it, naming the tensor."""
    if backend != "reference" and float64_arg is not None:
        check_triton_dtype(OP, *float64_arg)


# ----------------------------------------------------------------------------------------------
# The pointer table and the Triton launch

_PLAN_CACHE = {}
_PLAN_CACHE_MAX = 64


def _pointer_table(ema_group, src_group, chunk):
    """Packed int64 table on the tensors' device; cached by addresses and sizes, so a training loop
    builds it once."""
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
    remember(_PLAN_CACHE, key, table, _PLAN_CACHE_MAX)
    return table


_UNUSED = {}


def _unused_fp32(device):
    # The kernel's signature is fixed (*fp32) whichever momentum form is used: one compiled variant each.
    if device not in _UNUSED:
        _UNUSED[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _UNUSED[device]


def _launch_triton(ema_group, src_group, momentum):
    ema_addrs, src_addrs, numels, block_tensor, block_start = _pointer_table(ema_group, src_group, CHUNK)
    programs = block_tensor.numel()
    if programs == 0:
        return
    from_ptr = isinstance(momentum, torch.Tensor)
    if from_ptr:
        momentum_ptr, weight = momentum, 0.0
    else:
        momentum_ptr, weight = _unused_fp32(ema_group[0].device), 1.0 - momentum
    ema_update_kernel[(programs,)](
        ema_addrs, src_addrs, numels, block_tensor, block_start, weight, momentum_ptr,
        EMA_DTYPE=TL_DTYPES[ema_group[0].dtype],
        SRC_DTYPE=TL_DTYPES[src_group[0].dtype],
        WEIGHT_FROM_PTR=from_ptr,
        ALIGNED=all(t.data_ptr() % 16 == 0 for t in ema_group + src_group),
        EMULATE=interpreting(),
        BLOCK=BLOCK,
        CHUNK=CHUNK,
        num_warps=NUM_WARPS,
    )


# ----------------------------------------------------------------------------------------------
# The C++ extension's backends


def _extension_or_warn(backend, fallback):
    from mmfast._ext import extension_error, load_extension

    ext = load_extension(required=False)
    if ext is None:
        warn_once(
            (OP, backend),
            f"{OP}: the C++ extension is unavailable ({extension_error()}); backend={backend!r} "
            f"falls back to {fallback!r}",
        )
    return ext


def _launch_cuda_ext(ema_group, src_group, momentum):
    ext = _extension_or_warn("cuda", "triton")
    if ext is None or not ext.with_cuda():
        if ext is not None:
            warn_once((OP, "cuda-missing"), f"{OP}: mmfast._C was built without CUDA; backend='cuda' falls back to 'triton'")
        return _launch_triton(ema_group, src_group, momentum)
    ema_addrs, src_addrs, numels, block_tensor, block_start = _pointer_table(ema_group, src_group, CHUNK)
    from_ptr = isinstance(momentum, torch.Tensor)
    ext.ema_update_cuda(
        ema_addrs, src_addrs, numels, block_tensor, block_start,
        ema_group[0].dtype, src_group[0].dtype,
        0.0 if from_ptr else 1.0 - momentum,
        momentum if from_ptr else None,
        CHUNK,
    )


def _launch_cpp(ema_group, src_group, momentum):
    ext = _extension_or_warn("cpp", "reference")
    if ext is None:
        return reference.ema_update_reference(ema_group, src_group, momentum)
    # 1 - m rounded to fp32 exactly as the reference does for tensor momenta
    weight = float(1.0 - momentum.float()) if isinstance(momentum, torch.Tensor) else 1.0 - momentum
    ext.ema_update_cpu(ema_group, src_group, weight)


BACKEND_FNS = {"triton": _launch_triton, "cuda": _launch_cuda_ext, "cpp": _launch_cpp}


# ----------------------------------------------------------------------------------------------
# Dispatch


def _mark_written(tensors):
    """The kernels write through raw pointers: bump autograd's version counters as an in-place torch op
    would, so caches keyed on `._version` (e.g. a resampled position table) and autograd's saved-tensor
    checks see the update."""
    try:
        torch._C._increment_version(tensors)
    except TypeError:  # older torch takes one tensor at a time
        for t in tensors:
            torch._C._increment_version(t)


def run(backend, groups, buffer_pairs, momentum, device):
    """Update every group on `backend` (already resolved and checked) and copy the buffers."""
    with torch.no_grad():
        if backend == "reference":
            reference.ema_update_reference(
                [e for g in groups.values() for e in g[0]], [x for g in groups.values() for x in g[1]], momentum,
                ema_buffers=[e for e, _ in buffer_pairs], buffers=[b for _, b in buffer_pairs])
            return
        if isinstance(momentum, torch.Tensor):
            momentum = momentum.detach().to(device=device, dtype=torch.float32, non_blocking=True)
        for ema_group, src_group in groups.values():
            BACKEND_FNS[backend](ema_group, src_group, momentum)
            _mark_written(ema_group)
        if buffer_pairs:
            torch._foreach_copy_([e for e, _ in buffer_pairs], [b for _, b in buffer_pairs])
