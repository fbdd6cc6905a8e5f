"""Swap mmfast's kernels into models users already have: `patch`, `unpatch`, `verify`.

Each integration (``mmfast.swap.transformers``, ``.timm``, ``.open_clip``) is a module with
``NAME``, ``claims(model) -> bool`` (is this model one of ours to patch; cheap, imports nothing heavy)
and ``patch(model, options, state)`` which swaps per instance through ``_core.set_instance_attr`` /
``replace_forward``, records rows in ``state.report`` and undo steps in ``state.undo``.
"""
import importlib

from ._core import (SwapOptions, SwapReport, SwapRow, begin, check_model, inside_peft, model_name, patch_state,
                    unpatch_model)
from .verify import verify  # binds the function over the submodule's name: mmfast.swap.verify is the function

INTEGRATIONS = ("transformers", "timm", "open_clip")

__all__ = ["SwapOptions", "SwapReport", "SwapRow", "patch", "unpatch", "verify"]


def _integration(name):
    """The integration module, or None where this checkout lacks it (integrations land one by one)."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        return None


def patch(model, *, attention=True, patch_embed=True, gated=True, loss=True, ema=True, backend="auto"):
    """Swap mmfast kernels into `model` in place (per instance) and return a `SwapReport`.

    Parameters, buffers and ``state_dict`` keys stay the same objects, so optimisers and PEFT / LoRA
    wrappers keep working: a peft ``PeftModel`` is patched through the model it wraps, before or after the
    adapters are added, and a layer whose weights a fused kernel would read but which is not a plain
    ``nn.Linear`` / ``nn.Conv2d`` (a LoRA or quantized layer, forward hooks) runs its own forward in that call
    (counted in ``fallbacks``). Idempotent: patching a patched model with the same options returns its report;
    with other options it is unpatched first. A model no integration claims is left unchanged, with the
    reason in the report's ``message``. `unpatch` undoes everything.
    """
    check_model(model)
    model = inside_peft(model)
    options = SwapOptions(attention, patch_embed, gated, loss, ema, backend)
    state = patch_state(model)
    if state is not None:
        if state.options == options:
            return state.report
        unpatch_model(model)
    report = SwapReport(model_name(model))
    for name in INTEGRATIONS:
        integration = _integration(name)
        if integration is not None and integration.claims(model):
            report.integration = name
            state = begin(model, report, options)
            try:
                integration.patch(model, options, state)
            except BaseException:
                unpatch_model(model)  # never half-patched
                raise
            return report
    report.message = (f"{report.model} is not a model mmfast knows how to patch (integrations: "
                      f"{', '.join(INTEGRATIONS)}); nothing was changed")
    return report


def unpatch(model):
    """Undo `patch`: every swapped module and setting back to its original. Returns whether the model
    was patched."""
    check_model(model)
    return unpatch_model(inside_peft(model))
