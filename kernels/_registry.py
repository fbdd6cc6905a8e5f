"""The one list of kernel families: the compile gate, ``python -m mmfast check``, ``python -m mmfast info``,
the benchmark suites and the tests all read it.

A family ``NAME`` lives in ``kernels/NAME/`` (installed as ``mmfast.kernels.NAME``: ``_kernels.py``,
``_configs.py``, ``_launch.py``, ``__init__.py``), its ``python -m mmfast check`` cases in
``mmfast/checks/NAME.py``, its benchmark suite in ``benchmarks/NAME.py`` (``mmfast.benchmarks.NAME``)
and its tests in ``tests/kernels/test_NAME*.py``. See CONTRIBUTING.md for adding one.
"""
import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    # public op -> its accelerated backends, in the order ``backend="auto"`` prefers them on CUDA
    # (the reference backend, ``kernels/reference.py``, is always there)
    ops: dict
    summary: str = ""

    @property
    def kernels(self):
        return importlib.import_module(f"mmfast.kernels.{self.name}")

    @property
    def checks(self):
        return importlib.import_module(f"mmfast.checks.{self.name}")

    @property
    def benchmarks(self):
        return importlib.import_module(f"mmfast.benchmarks.{self.name}")


FAMILIES = (
    Family("ema", {"ema_update_": ("cuda", "triton", "cpp")}, "multi-tensor momentum EMA"),
    Family("attention", {"flash_attention": ("triton",)}, "flash self/cross attention with interval masks"),
    Family("contrastive", {"contrastive_loss": ("gemm", "triton", "chunked"),
                           "siglip_loss": ("gemm", "triton", "chunked")},
           "CLIP / MoCo / ALBEF / BLIP-2 InfoNCE and SigLIP losses"),
    Family("patch_embed", {"patch_embed": ("triton",), "tile_patch_embed": ("triton",)}, "ViT / Mllama patch embedding"),
    Family("gated_linear", {"tanh_gated_linear": ("gemm", "triton")}, "tanh-gated linear (Flamingo / Llama 3.2 residuals)"),
)
NAMES = tuple(f.name for f in FAMILIES)
OPS = {op: f for f in FAMILIES for op in f.ops}


def family(name):
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown kernel family {name!r}; choose from {', '.join(NAMES)}")


def accelerated_backends(op):
    """The accelerated backends of public op `op`, in auto's order of preference."""
    return OPS[op].ops[op]


@dataclass(frozen=True)
class CompileSpec:
    """One Triton kernel x launch config the launchers can choose, for the compile gate."""

    kernel: object  # the @triton.jit function (a JITFunction; not usable under TRITON_INTERPRET=1)
    signature: dict  # argument name -> Triton type string ("*fp32", "i64", "fp32", "constexpr")
    constexprs: dict  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""  # human-readable config, e.g. "ema=fp32 src=bf16 BLOCK=1024"
    options: dict = field(default_factory=dict)  # extra compile options (e.g. enable_fp_fusion)
    # argument name -> divisibility (16), as Triton's JIT specialises 16-byte aligned pointers and integers
    # divisible by 16 at run time; without it the compiler cannot prove 16-byte accesses (no cp.async
    # pipelining), so a kernel built for aligned operands would be judged on code it never runs
    divisibility: dict = field(default_factory=dict)
    # compute capabilities the launchers choose this config on (the gate compiles it for those only);
    # empty: every target
    targets: tuple = ()
    # One main-loop step, for the report's arithmetic intensity (FLOPs per byte of global loads): the
    # (M, N, K) of each tl.dot and the (rows, columns, bytes per element) of each global load; see `step`
    step_dots: tuple = ()
    step_loads: tuple = ()
    # a 16-bit tl.dot config the launchers choose for aligned inputs on sm_90: the gate fails it there
    # unless every dot lowers to wgmma (mma.sync tops out near half of Hopper's tensor-core rate)
    needs_wgmma: bool = False

    @property
    def name(self):
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__

    @property
    def intensity(self):
        """FLOPs per byte of global loads in one main-loop step (None when the spec declares no step)."""
        loaded = sum(r * c * b for r, c, b in self.step_loads)
        if not self.step_dots or not loaded:
            return None
        return sum(2 * m * n * k for m, n, k in self.step_dots) / loaded

    def compiled_for(self, cc):
        return not self.targets or int(cc) in self.targets


def step(dots=(), loads=()):
    """The ``step_dots`` / ``step_loads`` keywords of a CompileSpec: `dots` as (M, N, K) of each tl.dot, `loads`
    as (rows, columns, dtype or bytes per element) of each tensor read from global memory in one step."""
    def nbytes(t):
        return t if isinstance(t, int) else getattr(t, "itemsize", None) or {"fp32": 4, "fp16": 2, "bf16": 2}[t]

    return {"step_dots": tuple(tuple(d) for d in dots),
            "step_loads": tuple((r, c, nbytes(t)) for r, c, t in loads)}


def all_compile_specs(names=NAMES):
    return [spec for name in names for spec in family(name).kernels.compile_specs()]


def derive_signature(kernel, types, default=None):
    """A compile spec's signature read from the kernel's own parameter list.

    Constexpr parameters (annotated ``tl.constexpr``) get "constexpr"; every other parameter gets
    ``types[name]`` when given, else the type of the longest prefix key ending in "*" that it starts
    with (``{"stride_*": "i32"}``), else `default`. A parameter left without a type raises, so a new kernel argument cannot slip through.
    """
    fn = getattr(kernel, "fn", kernel)
    params = getattr(kernel, "params", None)
    if params is not None:
        names = [p.name for p in params]
        constexpr = {p.name for p in params if p.is_constexpr}
    else:  # an interpreted function: read the annotations
        import inspect

        sig = inspect.signature(fn)
        names = list(sig.parameters)
        constexpr = {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}
    prefixes = sorted((k[:-1] for k in types if k.endswith("*")), key=len, reverse=True)
    signature = {}
    for name in names:
        if name in constexpr:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        else:
            prefix = next((p for p in prefixes if name.startswith(p)), None)
            if prefix is not None:
                signature[name] = types[prefix + "*"]
            elif default is not None:
                signature[name] = default
            else:
                raise ValueError(f"{fn.__name__}: no type for parameter {name!r} in the compile spec")
    return signature
