"""Ahead-of-time compile specs: every Triton kernel x launch config the library can choose.

Each kernel family lists its specs in a ``compile_specs()`` function; ``all_compile_specs()`` gathers
them for the GPU-readiness gate (``python -m mmfast compile-report``), which compiles each one for
sm_80 and sm_90 without a GPU.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompileSpec:
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

    @property
    def name(self):
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


# Kernel families (modules of mmfast.kernels) that define compile_specs().
FAMILIES = ("ema", "gated_linear", "attention", "contrastive", "patch_embed")


def all_compile_specs():
    import importlib

    return [spec for family in FAMILIES for spec in importlib.import_module(f"mmfast.kernels.{family}").compile_specs()]
