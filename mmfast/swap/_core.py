"""Per-instance swapping: what every integration (transformers, timm, open_clip) shares.

A swap never touches a class or a module-level function of torch or of the integrated library: it sets
attributes on one instance (``module.forward`` in the instance ``__dict__``, a config field) and records
how to undo each, so `unpatch` restores the model exactly and a model built afterwards is untouched.
Parameters, buffers and ``state_dict`` keys are never replaced.
"""
import copy
import dataclasses
import types

import torch

from mmfast.nn.plain import describe
from mmfast.nn.plain import plain as nn_plain

_SAVED = "_mmfast_saved"      # on a swapped module: {attribute: original instance value or _MISSING}
_SET = "_mmfast_set"          # on a swapped module: {attribute: the value the swap set}
_STATE = "_mmfast_patch"      # on a patched model: the PatchState


class _Missing:
    """'No instance attribute before the swap'; one object even across copy.deepcopy of a patched model
    (ModelEmaV3 deep-copies the model it averages), so `original` / `restore` recognise it in the copy."""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()


@dataclasses.dataclass
class SwapRow:
    """One module the swap looked at: where it is, what ran there, what runs now (or why nothing)."""
    path: str
    was: str
    now: str
    note: str = ""


@dataclasses.dataclass
class SwapReport:
    """What `mmfast.patch` did to one model.

    ``swapped`` lists the modules that now run mmfast kernels, ``left`` the ones looked at and left
    alone with the reason, ``fallbacks`` counts calls that a swapped module handed back to the original
    path at run time (a mask or option mmfast cannot express), keyed by reason.
    """
    model: str
    integration: str = ""
    swapped: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    fallbacks: dict = dataclasses.field(default_factory=dict)
    message: str = ""

    def add(self, path, was, now, note=""):
        self.swapped.append(SwapRow(path, was, now, note))

    def leave(self, path, was, why):
        self.left.append(SwapRow(path, was, "unchanged", why))

    def count_fallback(self, reason):
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def __str__(self):
        lines = [f"mmfast.patch({self.model}): {len(self.swapped)} swapped, {len(self.left)} left alone"
                 + (f" [{self.integration}]" if self.integration else "")]
        if self.message:
            lines.append(self.message)
        width = max((len(r.path) for r in self.swapped + self.left), default=0)
        for r in self.swapped:
            lines.append(f"  {r.path or '<model>':<{width}}  {r.was} -> {r.now}" + (f"  ({r.note})" if r.note else ""))
        for r in self.left:
            lines.append(f"  {r.path or '<model>':<{width}}  {r.was}: left alone, {r.note}")
        for reason, n in self.fallbacks.items():
            lines.append(f"  fallback to the original path, {n} call(s): {reason}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class SwapOptions:
    """Which families `mmfast.patch` swaps in, and the backend the swapped modules pass to the kernels."""
    attention: bool = True
    patch_embed: bool = True
    gated: bool = True
    loss: bool = True
    ema: bool = True
    backend: str = "auto"


@dataclasses.dataclass
class PatchState:
    report: SwapReport
    options: SwapOptions
    undo: list = dataclasses.field(default_factory=list)   # callables, run last-in first-out


class _SwapRecord(dict):
    """A swapped module's _SAVED / _SET record. Deep copies work (ModelEmaV3 copies the model it averages);
    pickling refuses, at save time with the way out: the swapped attributes are functions bound to this module
    in this process, and some are closures, so a pickled patched model would not load (or not load patched)."""

    def __deepcopy__(self, memo):
        new = type(self)()
        memo[id(self)] = new
        for key, value in self.items():
            new[key] = copy.deepcopy(value, memo)
        return new

    def __copy__(self):
        return type(self)(self)

    def __reduce_ex__(self, protocol):
        raise TypeError("mmfast: a patched model cannot be pickled (torch.save(model), multiprocessing): its swapped "
                        "forwards belong to this process. Save model.state_dict() instead (the patch changes no key "
                        "or tensor), or call mmfast.unpatch(model) first; patch the loaded model again")


def set_instance_attr(module, name, value):
    """Set ``module.<name> = value`` on this instance only, remembering the original for `restore`."""
    saved = module.__dict__.setdefault(_SAVED, _SwapRecord())
    if name not in saved:
        saved[name] = module.__dict__.get(name, _MISSING)
    module.__dict__.setdefault(_SET, _SwapRecord())[name] = value
    object.__setattr__(module, name, value)


def foreign_forward(*modules):
    """Why one of `modules` must not get mmfast's forward, or None: its forward is already replaced on the
    instance by someone else (accelerate's device / offloading hooks, another wrapper), which mmfast's
    would bypass. Not counted: mmfast's own swap, and the class's forward left bound on the instance
    (transformers 4.5x does that to modules it recorded outputs of)."""
    for module in modules:
        own = module.__dict__.get("forward")
        if own is None or own is module.__dict__.get(_SET, {}).get("forward"):
            continue
        if getattr(own, "__self__", None) is module and getattr(own, "__func__", None) is type(module).forward:
            continue
        return (f"its forward is replaced on the instance ({getattr(own, '__qualname__', type(own).__name__)}: "
                "accelerate's hooks or another wrapper), which mmfast's would bypass")
    return None


def replace_forward(module, forward):
    """Run ``forward(module, *args, **kwargs)`` for this instance's calls (bound like a method)."""
    set_instance_attr(module, "forward", types.MethodType(forward, module))


def replace_forwards_by_class(model, table, backend, report, library):
    """For every module of `model` whose class comes from `library` (a top-level package name) and whose
    class name is in `table` (name -> (factory, was, now, parts)): ``replace_forward(module, factory(backend))``
    guarded by `parts` (see :func:`guard_parts`; {} for none), and a report row."""
    for path, module in model.named_modules():
        cls = type(module)
        entry = table.get(cls.__name__)
        if entry is None or cls.__module__.split(".")[0] != library:
            continue
        factory, was, now, parts = entry
        why = foreign_forward(module)
        if why is not None:
            report.leave(path, was, why)
            continue
        forward = factory(backend)
        replace_forward(module, guard_parts(forward, parts, report, cls.__name__) if parts else forward)
        report.add(path, was, now)


# transformers' enable_input_require_grads (which gradient_checkpointing_enable calls): a forward hook on every
# input embedding, vision patch convolutions included, that marks the output as requiring grad
_INPUT_GRAD_HOOK = ("transformers.modeling_utils", "make_inputs_require_grads")


def marks_output(module):
    """Whether `module`'s forward hooks are all transformers' ``make_inputs_require_grads`` (and there are some):
    a fused kernel that replaces the module must then mark its own output (:func:`mark_output`)."""
    hooks = module._forward_hooks.values()
    return bool(hooks) and all((getattr(h, "__module__", None), getattr(h, "__name__", None)) == _INPUT_GRAD_HOOK
                               for h in hooks)


def mark_output(out):
    """What ``make_inputs_require_grads`` does to an output, on the fused kernel's output."""
    if isinstance(out, torch.Tensor) and out.is_floating_point() and not out.requires_grad:
        out.requires_grad_(True)
    return out


def plain(module, cls):
    """:func:`mmfast.nn.plain.plain` for swapped models: a forward this swap set itself does not count, nor
    transformers' input-grad hook, which the swapped code reproduces (:func:`marks_output`)."""
    return nn_plain(module, cls, own_forward=module.__dict__.get(_SET, {}).get("forward"), hooks_ok=marks_output)


_OBSERVER = "_mmfast_observer"  # on a global hook function: mmfast's own, which only watches (verify's counting)


def observer(hook):
    """Mark a global module hook as one that reads nothing a swap changes, so swapped modules take their fused
    paths under it (verify must check the path a user's run takes, not a fallback its own hooks cause)."""
    setattr(hook, _OBSERVER, True)
    return hook


def global_forward_hooks():
    """The hooks of ``torch.nn.modules.module.register_module_forward_hook`` other than :func:`observer`s: they
    see every module's output, also of submodules a fused path no longer calls."""
    hooks = getattr(torch.nn.modules.module, "_global_forward_hooks", None) or {}
    return [h for h in hooks.values() if not getattr(h, _OBSERVER, False)]


def not_plain(module, parts):
    """Why one of `parts` ({dotted submodule name: class}) of `module` is not :func:`plain`, or None."""
    for name, cls in parts.items():
        part = module.get_submodule(name)
        if not plain(part, cls):
            return f"{describe(name, part, cls)}: its own forward runs"
    return None


def guard_parts(forward, parts, report, what):
    """`forward`, or the module's original forward (counted in `report`) for calls where one of `parts` is
    not :func:`plain`: a LoRA or quantized layer may be put there after the swap."""
    def guarded(self, *args, **kwargs):
        why = not_plain(self, parts)
        if why is not None:
            report.count_fallback(f"{what}: {why}")
            return original(self)(*args, **kwargs)
        out = forward(self, *args, **kwargs)
        return mark_output(out) if any(marks_output(self.get_submodule(name)) for name in parts) else out
    return guarded


def original(module, name="forward"):
    """The attribute as it was before the swap (the class's bound method for ``forward``)."""
    saved = module.__dict__.get(_SAVED, {})
    value = saved.get(name, _MISSING)
    if value is _MISSING:
        return getattr(type(module), name).__get__(module, type(module))
    return value


def is_swapped(module):
    return bool(module.__dict__.get(_SAVED))


def restore(module):
    """Undo every `set_instance_attr` on this module."""
    saved = module.__dict__.pop(_SAVED, {})
    module.__dict__.pop(_SET, None)
    for name, value in saved.items():
        if value is _MISSING:
            module.__dict__.pop(name, None)
        else:
            object.__setattr__(module, name, value)


def patch_state(model):
    return model.__dict__.get(_STATE)


def begin(model, report, options):
    state = PatchState(report, options)
    model.__dict__[_STATE] = state
    return state


def unpatch_model(model):
    """Restore every swapped module of `model` and run the integration's undo steps. Returns whether
    anything was patched."""
    state = model.__dict__.pop(_STATE, None)
    for module in model.modules():
        restore(module)
    if state is not None:
        for step in reversed(state.undo):
            step()
    return state is not None


def module_path(model, target):
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in model")


def inside_peft(model):
    """The model a peft ``PeftModel`` wraps (its adapters are injected there), or `model` itself."""
    if type(model).__module__.split(".")[0] == "peft" and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def model_name(model):
    cls = type(model)
    try:  # FSDP2's fully_shard swaps in a class "FSDP<name>" made at run time: name the class it wraps
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = ()
    if FSDPModule and issubclass(cls, FSDPModule):
        cls = next((c for c in cls.__mro__[1:] if c is not FSDPModule and not issubclass(c, FSDPModule)), cls)
    return cls.__module__.split(".")[0] + "." + cls.__qualname__


def check_model(model):
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"mmfast.patch: model must be a torch.nn.Module, got {type(model).__name__}")
