"""Whether a fused kernel may read a layer's parameters instead of calling the layer."""
from torch import nn


def plain(module: nn.Module, cls: type, *, own_forward=None, hooks_ok=None) -> bool:
    """Whether `module` computes `cls`'s own forward from its own ``weight`` / ``bias``, so that a fused kernel
    may read them instead of calling it. Not so for a wrapper (peft's LoRA layers, which keep the original as
    ``base_layer``), a subclass with its own forward (quantized layers), a forward set on the instance or
    forward hooks (accelerate's offloading): reading their ``weight`` would silently drop what their forward
    adds. `own_forward`: an instance forward that does not count (a swap's own); `hooks_ok(module)`: true where
    the forward hooks are ones the caller reproduces."""
    instance_forward = module.__dict__.get("forward")
    return (isinstance(module, cls) and type(module).forward is cls.forward
            and (instance_forward is None or instance_forward is own_forward)
            and (not module._forward_hooks or (hooks_ok is not None and hooks_ok(module)))
            and not module._forward_pre_hooks)


def describe(name: str, module: nn.Module, cls: type) -> str:
    """"`name` is a <its class>, not a plain nn.<cls>": the start of the reason a fused path is not taken."""
    kind = type(module)
    return (f"{name} is a {kind.__module__}.{kind.__qualname__}" + (" with hooks" if kind is cls else "")
            + f", not a plain nn.{cls.__name__}")


def require_plain(op: str, name: str, module: nn.Module, cls: type) -> None:
    """ValueError unless `module` is :func:`plain`: for fused paths with no unfused form here."""
    if not plain(module, cls):
        raise ValueError(f"{op}: {describe(name, module, cls)}: the fused kernel reads {name}.weight and would drop "
                         f"what its forward adds (a LoRA adapter: merge it first, or leave {name} out of the "
                         "adapter's target modules)")
