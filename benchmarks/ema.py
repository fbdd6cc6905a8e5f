"""EMA suite: one momentum update of a whole model's parameters, the step MoCo / DINO / BYOL / timm's
ModelEma run after every optimizer step.

Parameter lists are built from the real models' shapes (no model libraries): ViT-L/16 and OpenAI
CLIP ViT-B/16 (vision + text towers). Off the GPU the widths (and CLIP's vocabulary) are scaled down so
a list holds about 50M parameters (`smoke`: about 0.3M); depth, and so the tensor count, is kept,
because per-tensor overhead is what separates the methods.
"""
import inspect
import math
import os
import warnings

import torch

from .common import Case, Skip, Workload

MOMENTUM = 0.999  # MoCo's default
DTYPES = ((torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16))
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------------------------
# Parameter shapes


def _block(width, mlp):
    # pre-norm transformer block: LN, fused qkv (+bias), out proj (+bias), LN, fc1 (+bias), fc2 (+bias)
    return [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
            (width,), (width,), (mlp, width), (mlp,), (width, mlp), (width,)]


def vit_shapes(width=1024, depth=24, mlp=4096, img=224, patch=16, classes=1000):
    """timm's vit_large_patch16_224 by default: patch embed, cls token, pos embed, blocks, norm, head."""
    tokens = (img // patch) ** 2 + 1
    shapes = [(width, 3, patch, patch), (width,), (1, 1, width), (1, tokens, width)]
    for _ in range(depth):
        shapes += _block(width, mlp)
    return shapes + [(width,), (width,), (classes, width), (classes,)]


def clip_shapes(vision_width=768, text_width=512, embed=512, depth=12, vocab=49408, context=77, img=224, patch=16):
    """OpenAI CLIP ViT-B/16: vision tower, 12-layer text transformer, projections, logit scale."""
    vision = [(vision_width, 3, patch, patch), (vision_width,), ((img // patch) ** 2 + 1, vision_width),
              (vision_width,), (vision_width,)]
    for _ in range(depth):
        vision += _block(vision_width, 4 * vision_width)
    vision += [(vision_width,), (vision_width,), (vision_width, embed)]
    text = [(vocab, text_width), (context, text_width)]
    for _ in range(depth):
        text += _block(text_width, 4 * text_width)
    text += [(text_width,), (text_width,), (text_width, embed), ()]
    return vision + text


def _width(x, scale):
    return max(8, int(round(x * scale / 8)) * 8)


MODELS = {
    "vit_l16": lambda s: vit_shapes(width=_width(1024, s), mlp=_width(4096, s)),
    "clip_b16": lambda s: clip_shapes(_width(768, s), _width(512, s), _width(512, s), vocab=max(64, int(49408 * s))),
}


def _numel(shape):
    return math.prod(shape)


def _target_params(mode, device):
    if mode == "smoke":
        return 3e5
    return None if device.type == "cuda" else 5e7


# ----------------------------------------------------------------------------------------------
# Cases: each takes the built (ema, params) lists and returns the function to time


def _loop(state):
    ema, params = state

    def fn():  # MoCo: param_k.data = param_k.data * m + param_q.data * (1. - m), in place
        for e, p in zip(ema, params):
            e.mul_(MOMENTUM).add_(p, alpha=1 - MOMENTUM)

    return fn


def _foreach_mul_add(state):
    ema, params = state

    def fn():
        torch._foreach_mul_(ema, MOMENTUM)
        torch._foreach_add_(ema, params, alpha=1 - MOMENTUM)

    return fn


def _foreach_lerp(state):
    ema, params = state
    if ema[0].dtype == params[0].dtype:
        return lambda: torch._foreach_lerp_(ema, params, 1 - MOMENTUM)
    # lerp_ needs matching dtypes, so a mixed-precision user casts the parameters on every call
    return lambda: torch._foreach_lerp_(ema, [p.to(e.dtype) for e, p in zip(ema, params)], 1 - MOMENTUM)


def _timm(state):
    try:
        from timm.utils import ModelEmaV3
    except Exception as exc:  # not installed, or installed without torchvision
        raise Skip(f"timm not importable ({type(exc).__name__}: {exc})") from None
    ema, params = state
    model = torch.nn.ParameterList([torch.nn.Parameter(p, requires_grad=False) for p in params])
    accepted = inspect.signature(ModelEmaV3).parameters
    kwargs = {}
    if ema[0].dtype != params[0].dtype:
        if "dtype" not in accepted:
            raise Skip("this timm's ModelEmaV3 keeps the EMA in the model's dtype")
        kwargs["dtype"] = ema[0].dtype
    if "stochastic_rounding" in accepted:
        kwargs["stochastic_rounding"] = False  # compare the same math: plain round-to-nearest lerp
    ema_model = ModelEmaV3(model, decay=MOMENTUM, **kwargs)
    return lambda: ema_model.update(model)


def _require_backend(backend):
    # ema_update_ quietly falls back when the extension is missing: check first, so a fallback is
    # never reported under the extension's name
    if backend in ("cpp", "cuda"):
        ext = _extension()
        if backend == "cuda" and not ext.with_cuda():
            raise Skip("mmfast._C was built without CUDA")
        if backend == "cpp" and not hasattr(ext, "ema_update_cpu"):
            raise Skip("mmfast._C has no ema_update_cpu")


def _extension():
    """mmfast._C, or Skip. Never waits on a build another process runs (the GPU check builds it in the
    background while the headline benchmarks run: a minute of the budget otherwise); builds it (outside the
    timings) only when no build runs and MMFAST_NO_JIT allows it."""
    from mmfast._ext import extension_error, load_extension, loaded_extension, lock_held, lock_path

    if lock_held(lock_path()):
        raise Skip(f"extension not built yet: another process is building it (lock {lock_path()})")
    ext, why = loaded_extension()
    if ext is not None:
        return ext
    if os.environ.get("MMFAST_NO_JIT", "0") == "1":
        raise Skip(f"extension not built yet ({why})")
    ext = load_extension()
    if ext is None:
        raise Skip(f"C++ extension unavailable: {extension_error()}")
    return ext


def _mmfast(backend):
    def make(state):
        from mmfast.kernels import ema_update_

        ema, params = state
        _require_backend(backend)
        fn = lambda: ema_update_(ema, params, MOMENTUM, backend=backend)  # noqa: E731
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
        fallbacks = [str(w.message) for w in caught if "falls back" in str(w.message)]
        if fallbacks:
            raise Skip(fallbacks[0])
        return fn

    return make


def cases(device):
    backends = ("triton", "cuda") if device.type == "cuda" else ("cpp", "reference")
    return [
        Case("loop_mul_add", _loop, "per-tensor e.mul_(m).add_(p, alpha=1-m) (MoCo)"),
        Case("foreach_mul_add", _foreach_mul_add, "torch._foreach_mul_ + _foreach_add_"),
        Case("foreach_lerp", _foreach_lerp, "torch._foreach_lerp_"),
        Case("timm_ModelEmaV3", _timm, "ModelEmaV3.update (foreach, no stochastic rounding)"),
    ] + [Case(f"mmfast_{b}", _mmfast(b), f"ema_update_(backend={b!r})") for b in backends]


def workloads(mode, device):
    device = torch.device(device)
    target = _target_params(mode, device)
    out = []
    for seed, (model, shapes_at) in enumerate(MODELS.items()):
        full = sum(_numel(s) for s in shapes_at(1.0))
        scale = 1.0 if target is None else min(1.0, math.sqrt(target / full))
        shapes = shapes_at(scale)
        numel = sum(_numel(s) for s in shapes)
        for ema_dtype, param_dtype in DTYPES:
            nbytes = numel * (2 * ema_dtype.itemsize + param_dtype.itemsize)
            scaled = "" if scale == 1.0 else f", widths x{scale:.3f} (full model: {full:,})"
            info = {"model": model, "ema_dtype": _SHORT[ema_dtype], "param_dtype": _SHORT[param_dtype],
                    "params": numel, "tensors": len(shapes), "scale": scale,
                    # `bench --headline`: the ViT-L parameter list in fp32 (97-98% of the copy bandwidth on the
                    # 2026-11-28 H100 run; the other dtypes go to --rest, the headline's time to attention)
                    "headline": model == "vit_l16" and (ema_dtype, param_dtype) == DTYPES[0],
                    "summary": f"{numel:,} params in {len(shapes)} tensors{scaled}; {nbytes / 1e9:.3f} GB per call"}

            def build(shapes=shapes, ema_dtype=ema_dtype, param_dtype=param_dtype, seed=seed):
                # random, never zeros; one allocation per tensor, like a real model's parameters
                g = torch.Generator(device=device).manual_seed(seed)
                params = [torch.randn(s, generator=g, device=device, dtype=param_dtype) for s in shapes]
                ema = [torch.randn(s, generator=g, device=device, dtype=ema_dtype) for s in shapes]
                return ema, params

            name = f"{model} ema={_SHORT[ema_dtype]} param={_SHORT[param_dtype]}"
            out.append(Workload(name, build, nbytes, info, cases(device),
                                baselines={"loop": "loop_mul_add", "lerp": "foreach_lerp"}))
    return out
