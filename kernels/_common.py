"""What every kernel family shares: dtypes, the interpreter's workarounds, fp32 matmul precision,
input and scalar checks, the autocast policy and the double-backward guard.

Each rule lives here once, so the five families behave like one library:

- **fp32 matmul precision** follows ``torch.get_float32_matmul_precision()`` exactly as ``torch.matmul``
  does: "highest" runs IEEE fp32 dots, "high" / "medium" run TF32 tensor cores. Launchers pass
  :func:`matmul_precision` as the ``PRECISION`` constexpr; :func:`dot` applies it. Under Triton's
  interpreter (which ignores ``input_precision``) :func:`dot` rounds fp32 operands to TF32 by hand, so
  the CPU tests see the same numerics as the GPU.
- **Autocast** (:func:`autocast_op`): an op behaves under ``torch.autocast`` as the torch op it
  replaces: the floating tensors it names are cast to the autocast dtype (float64 is left alone, as
  torch's autocast does) and the op runs with autocast off, like ``torch.amp.custom_fwd`` but with the
  dtype the user chose. Gradients flow back through the casts into the inputs' dtypes.
- **Scalars** (:func:`check_scalar`): a Python number out of range raises ``ValueError`` naming the
  argument; a tensor scalar is checked on its device with ``torch._assert_async`` (no host sync: a
  RuntimeError on the CPU, a device-side assert on CUDA).
- **Double backward** (:func:`no_double_backward`): one message, registered on every backward op.
"""
import functools
import inspect
import math
import os
import warnings

import torch
import triton
import triton.language as tl

# torch dtype -> Triton dtype, for the dtypes the Triton kernels take
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
TRITON_DTYPES = tuple(TL_DTYPES)
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the kernels work in base 2

_TRUE = ("1", "true", "yes", "on", "y")


def cdiv(a, b):
    """⌈a / b⌉ for host-side ints: ``triton.cdiv`` is a ConstexprFunction costing ~3 µs per Python call."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (0 for 0, as ``triton.next_power_of_2``, which costs ~3 µs per Python
    call), for host-side ints."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter: TRITON_INTERPRET read by Triton's own rule
    (its getenv_bool), in plain Python so that torch.compile can trace it."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


_warned = set()


def warn_once(key, message, category=RuntimeWarning):
    """Warn once per process and key: fallbacks must be visible but not flood a training log."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# fp32 matmul precision


def matmul_precision(dtype) -> str:
    """The ``input_precision`` of ``tl.dot`` for operands of `dtype`, by torch.matmul's rule.

    16-bit operands always run on the tensor cores with fp32 accumulation ("ieee" is then exact
    products). fp32 operands: ``torch.get_float32_matmul_precision()`` "highest" -> "ieee",
    "high" / "medium" -> "tf32" (torch would use TF32 or bf16x3 there; TF32 is the looser of the two).
    Read at launch time, so a change of the setting takes effect on the next call.
    """
    if dtype != torch.float32:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def kernel_flags(dtype):
    """The constexprs every kernel with a ``tl.dot`` takes: EMULATE (the interpreter's workarounds) and
    PRECISION (:func:`matmul_precision`)."""
    return dict(EMULATE=interpreting(), PRECISION=matmul_precision(dtype))


def mm_f32(x, y):
    """x @ y with an fp32 result, for the "gemm" backends (cuBLAS for the GEMMs, Triton for the rest).

    16-bit operands: on CUDA cuBLAS's fp32-output GEMM (``torch.mm(..., out_dtype=torch.float32)``, torch
    >= 2.8): fp32 accumulation of exact 16-bit products, the tensor cores' math with nothing rounded to
    16 bits; elsewhere (no such overload) the same math by upcasting. fp32 operands follow
    ``torch.get_float32_matmul_precision()``, as every op here does. Autocast must be off around it (it
    would round fp32 operands to 16 bits): the callers run inside ``torch.autocast(..., enabled=False)``.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        if x.is_cuda and _FP32_OUT_GEMM[0]:
            try:
                return torch.mm(x, y, out_dtype=torch.float32)
            except (RuntimeError, TypeError, NotImplementedError) as exc:
                _no_fp32_out_gemm(exc)
        return torch.mm(x.float(), y.float())
    return torch.mm(x, y)


def addmm_f32(acc, x, y):
    """acc + x @ y in fp32 (a new tensor), as :func:`mm_f32`: on CUDA one cuBLAS GEMM reading acc in its
    epilogue (β = 1), not a GEMM plus a separate add over acc."""
    if x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda and _FP32_OUT_GEMM[0]:
        try:
            return torch.addmm(acc, x, y, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            _no_fp32_out_gemm(exc)
    return acc + mm_f32(x, y)


_FP32_OUT_GEMM = [True]  # torch's fp32-output 16-bit GEMM works here (cleared on its first failure)


def _no_fp32_out_gemm(exc):
    _FP32_OUT_GEMM[0] = False
    warn_once("fp32-out-gemm", f"torch.mm(..., out_dtype=torch.float32) failed here ({type(exc).__name__}: {exc}); "
              "the 'gemm' backends upcast 16-bit operands to fp32 instead (the same math, a slower GEMM)")


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


@triton.jit
def _round_tf32(x):
    # round-to-nearest (ties away) to 10 mantissa bits, as cvt.rna.tf32.f32 does
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x1000) & 0xFFFFE000
    rounded = tl.where(x != x, bits, rounded)
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """``tl.dot(a, b, acc)`` at PRECISION, the same on the GPU and under Triton's interpreter.

    Under the interpreter (EMULATE) its 16-bit ``tl.dot`` is wrong (bf16 reads raw bits) and it ignores
    ``input_precision``: 16-bit operands are widened to fp32 (products of 16-bit values are exact in
    fp32, and the MMA accumulates in fp32, so this is what the tensor cores compute), and for "tf32"
    fp32 operands are rounded to TF32 first.
    """
    if EMULATE:
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        if PRECISION == "tf32":
            a32 = _round_tf32(a32)
            b32 = _round_tf32(b32)
        return tl.dot(a32, b32, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


# ----------------------------------------------------------------------------------------------
# Input checks


def check_tensor(op, name, t, *, dtypes=None, dim=None, device=None, last_contiguous=False, form=None):
    """Raise ValueError naming `name` unless `t` is a tensor of one of `dtypes` with `dim` dims on `device`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a tensor{' of shape ' + form if form else ''}, got {type(t).__name__}")
    if dim is not None and t.dim() not in ((dim,) if isinstance(dim, int) else dim):
        raise ValueError(f"{op}: {name} must have shape {form or f'of {dim} dims'}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} must be one of {names}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {t.device}")
    if last_contiguous and t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    return t


def check_triton_dtype(op, name, t):
    """The Triton kernels take fp16 / bf16 / fp32; float64 is the reference backend's."""
    if t.dtype not in TRITON_DTYPES:
        hint = "; float64 runs on backend='reference'" if t.dtype == torch.float64 else ""
        raise ValueError(f"{op}: {name} must be float16, bfloat16 or float32 on this backend, got {t.dtype}{hint}")


def check_int(op, name, value, *, lo=None, hi=None):
    """A Python int (not bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{op}: {name} must be in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], got {value}")
    return value


def check_bool(op, name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(op, name, value, choices):
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_scalar(op, name, value, *, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False, finite=True):
    """One policy for scalar arguments (Python numbers and 0-d / 1-element tensors).

    Python numbers: must be finite (when `finite`) and in the range, else ValueError naming `name`.
    Tensors: checked on their device with ``torch._assert_async`` — no host sync; the CPU raises a
    RuntimeError at once, CUDA raises a device-side assert. Not checked while torch.compile traces.
    Returns `value` unchanged.
    """
    lo_ok = (lambda v: v > lo) if lo_open else (lambda v: v >= lo)
    hi_ok = (lambda v: v < hi) if hi_open else (lambda v: v <= hi)
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{op}: {name} must be a number or a floating tensor, got a {value.dtype} tensor")
        if torch.compiler.is_compiling() or value.device.type == "meta":
            return value
        v = value.detach()
        ok = torch.ones((), dtype=torch.bool, device=v.device)
        if finite:
            ok = ok & torch.isfinite(v).all()
        if lo > -math.inf:
            ok = ok & lo_ok(v).all()
        if hi < math.inf:
            ok = ok & hi_ok(v).all()
        bounded = lo > -math.inf or hi < math.inf
        want = " and ".join(w for w in ("finite" if finite else "", f"in {interval}" if bounded else "") if w)
        torch._assert_async(ok, f"{op}: {name} must be {want}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{op}: {name} must be a number or a tensor, got {type(value).__name__} {value!r}")
    if finite and not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if not (lo_ok(value) and hi_ok(value)):
        raise ValueError(f"{op}: {name} must be in {interval}, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# Autocast


def autocast_op(*names):
    """Decorate a public op so that it behaves under ``torch.autocast`` as the torch op it replaces.

    When autocast is on for the device of the first tensor among `names`, each floating tensor argument
    in `names` (a tensor, or a list / tuple of tensors) that is not float64 is cast to the autocast
    dtype — what torch's autocast does for "lower precision" ops such as ``F.linear``, ``F.conv2d`` and
    ``F.scaled_dot_product_attention`` — and the op body runs with autocast off, so its own dtype rules
    (outputs, reductions) decide the rest. Off autocast it costs two flag reads per call.
    """

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            # the common case first: no autocast anywhere, no argument binding on the hot path
            if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            device_type = None
            for name in names:
                value = bound.arguments.get(name)
                first = value[0] if isinstance(value, (list, tuple)) and value else value
                if isinstance(first, torch.Tensor):
                    device_type = first.device.type
                    break
            if device_type is None or device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            dtype = torch.get_autocast_dtype(device_type)

            def cast(t):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                    return t.to(dtype)
                return t

            for name in names:
                value = bound.arguments.get(name)
                if isinstance(value, (list, tuple)):
                    bound.arguments[name] = type(value)(cast(t) for t in value)
                else:
                    bound.arguments[name] = cast(value)
            with torch.autocast(device_type, enabled=False):
                return fn(*bound.args, **bound.kwargs)

        wrapper.autocast_args = names
        return wrapper

    return wrap


# ----------------------------------------------------------------------------------------------
# Autograd


def register_autograd(op, backward, setup_context):
    """``op.register_autograd(backward, setup_context=setup_context)``, and a callable equal to `op` that, in
    eager mode with grad enabled, runs the same `setup_context` / `backward` through a
    ``torch.autograd.Function`` instead.

    Why: the custom op's own autograd wrapper flattens its arguments with pytree and builds its Function on
    every call, ~200 µs of host time per call on a slow CPU (the flash attention forward: 280 µs with
    gradients against 80 µs without), which a small kernel (CLIP's 77-token text) cannot hide. Under
    torch.compile, or without gradients, the op itself runs (the registered autograd serves the compiler).
    Both paths save the same tensors and call the same backward; a list argument (tensors the op indexes,
    never differentiated) gets the gradient None."""
    op.register_autograd(backward, setup_context=setup_context)

    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = op(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return tuple(None if isinstance(g, (list, tuple)) else g for g in backward(ctx, *grads))

    def call(*args):
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return op(*args)
        return _Eager.apply(*args)

    return call


def remember(cache, key, value, limit=64):
    """cache[key] = value, first dropping the oldest entry when `cache` (a dict, insertion-ordered) holds `limit`:
    the per-shape / per-address caches of the launchers stay bounded however many layouts a process meets."""
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value


def saveable(t):
    """`t`, or a normal copy of it when it is an inference tensor (made under torch.inference_mode), which
    autograd refuses to save for backward. For the tensors an op saves but never differentiates (masks,
    frozen tables): the eager chain it replaces often saves none of them, so it runs with such inputs."""
    return t.clone() if t is not None and t.is_inference() else t


def no_double_backward(op):
    """The autograd of a backward custom op: gradients of gradients are not implemented."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op}: double backward (gradients of gradients, e.g. create_graph=True for a gradient penalty) "
            f"is not supported by its kernels; use backend='reference' for that"
        )

    return backward
