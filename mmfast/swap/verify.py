"""`mmfast.verify`: the user's proof, on their own model, that `mmfast.patch` changed nothing but speed.

The model runs three times on the same inputs, forward and backward: unpatched in float64 (the reference),
unpatched in its own dtype (what PyTorch itself achieves in that dtype) and patched. Each output and each
group of parameter gradients passes when the patched error against the float64 run is at most 2x (3x for
gradients) PyTorch's own error plus a small floor: the suite's rule (tests/numerics.py). The backward
starts from fixed random weights on every floating output, so every output's gradient is checked.
"""
import contextlib
import copy
import dataclasses
import sys

import torch

from . import _core

FACTOR_OUT, FACTOR_GRAD = 2.0, 3.0  # as tests/numerics.py and flash-attn: gradients accumulate more rounding
FLOORS = {torch.float64: 1e-12, torch.float32: 1e-6}  # others (16-bit): 1e-4


def floor(dtype):
    return FLOORS.get(dtype, 1e-4)


@dataclasses.dataclass
class VerifyRow:
    kind: str          # "output", "grad" or "input grad"
    name: str
    dtype: str
    error: float       # patched vs float64
    torch_error: float  # unpatched same dtype vs float64
    tolerance: float
    passed: bool
    note: str = ""


@dataclasses.dataclass
class VerifyResult:
    """Rows per output and gradient group, the patch report, and per swapped module its calls and mmfast ops."""
    report: object
    rows: list = dataclasses.field(default_factory=list)
    modules: list = dataclasses.field(default_factory=list)  # (path, swapped attributes, calls, mmfast ops)
    message: str = ""

    @property
    def passed(self):
        return bool(self.rows) and all(r.passed for r in self.rows)

    def __str__(self):
        parts = [str(self.report)]
        if self.message:
            parts.append(self.message)
        if self.rows:
            parts.append(format_table(
                "patched vs unpatched, each against the float64 run (tolerance = "
                f"{FACTOR_OUT:g}x / {FACTOR_GRAD:g}x for gradients PyTorch's own error + floor)",
                ["what", "name", "dtype", "patched error", "PyTorch error", "tolerance", "result"],
                [(r.kind, r.name, r.dtype, f"{r.error:.2e}", f"{r.torch_error:.2e}", f"{r.tolerance:.2e}",
                  ("PASS" if r.passed else "FAIL") + (f" ({r.note})" if r.note else "")) for r in self.rows]))
        if self.modules:
            parts.append(format_table("what ran in the patched run (mmfast custom ops: Triton / C++ backends; the "
                                      "reference backend runs PyTorch code)",
                                      ["module", "swapped", "calls", "mmfast ops"], self.modules))
        if self.rows:
            failed = sum(not r.passed for r in self.rows)
            parts.append(f"{len(self.rows) - failed} passed, {failed} failed")
        return "\n".join(parts)


def verify(model, inputs=None, *, backend="auto", attention=True, patch_embed=True, gated=True, loss=True, ema=True,
           train=False, seed=0, quiet=False, file=None):
    """Run `model` unpatched and patched on `inputs`, forward and backward, and compare both with float64.

    Args:
        model: any nn.Module; it is not modified (the runs use deep copies; a patched model is unpatched for the
            copy and patched again with the same options, which gives it a new report).
        inputs: a tensor (one positional argument), a tuple / list (positional arguments) or a dict (keyword
            arguments); None: the claiming integration's ``example_inputs(model)`` (images at the model's size,
            token ids with a padded row for text towers).
        backend, attention, patch_embed, gated, loss, ema: as `mmfast.patch`.
        train: run in training mode (dropout and the like active: the three runs then differ by their random
            draws; the default runs in eval mode).
        seed: seeds the generated inputs and the backward's output weights.
        quiet: do not print the result; file: where it is printed (default: sys.stdout at call time).

    Returns a `VerifyResult` (``.passed``, ``.rows``, ``.report``, ``.modules``; ``str()`` is what is printed).
    A model no integration claims gets its report's message and no rows (``passed`` is False).
    """
    from . import patch, unpatch

    _core.check_model(model)
    if inputs is not None and not isinstance(inputs, (torch.Tensor, tuple, list, dict)):
        raise ValueError("mmfast.verify: inputs must be a tensor, a tuple / list or a dict, got "
                         f"{type(inputs).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"mmfast.verify: seed must be an int, got {seed!r}")
    if not isinstance(quiet, bool):
        raise ValueError(f"mmfast.verify: quiet must be True or False, got {quiet!r}")
    if not isinstance(train, bool):
        raise ValueError(f"mmfast.verify: train must be True or False, got {train!r}")
    state = _core.patch_state(_core.inside_peft(model))
    if state is not None:
        # a deep copy would share the patch's undo steps with `model`: unpatch the model itself, copy, patch again
        unpatch(model)
        try:
            work = copy.deepcopy(model)
        finally:
            patch(model, **dataclasses.asdict(state.options))
    else:
        work = copy.deepcopy(model)
    work.train(train)
    probe = copy.deepcopy(work)
    report = patch(probe, attention=attention, patch_embed=patch_embed, gated=gated, loss=loss, ema=ema,
                   backend=backend)
    result = VerifyResult(report)
    if not report.integration:
        result.message = "nothing to verify: the model is not patched"
        return _emit(result, quiet, file)
    del probe
    if inputs is None:
        from . import _integration

        integration = _integration(report.integration)
        if not hasattr(integration, "example_inputs"):
            raise ValueError(f"mmfast.verify: the {report.integration} integration generates no inputs for "
                             f"{report.model}; pass inputs=")
        inputs = integration.example_inputs(_core.inside_peft(work), seed=seed)
    args, kwargs = _split(inputs)
    reference = copy.deepcopy(work).to(torch.float64)
    with _default_dtype(torch.float64):  # tensors the model makes on the fly too (transformers 4.5x's CLIP mask)
        ref = _run(reference, _cast(args, torch.float64), _cast(kwargs, torch.float64), seed)
    del reference
    base = _run(work, args, kwargs, seed)
    patch(work, attention=attention, patch_embed=patch_embed, gated=gated, loss=loss, ema=ema, backend=backend)
    with _Counting(work) as counting:
        ours = _run(work, args, kwargs, seed)
    result.report = _core.patch_state(_core.inside_peft(work)).report
    result.modules = counting.table()
    result.rows = _compare(ref, base, ours)
    if not result.rows:
        result.message = "the model returned no floating output and no gradient to compare"
    return _emit(result, quiet, file)


def _emit(result, quiet, file):
    if not quiet:
        print(result, file=file if file is not None else sys.stdout)
    return result


def _split(inputs):
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return tuple(inputs), {}


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _leaves(obj, name="output"):
    """(name, tensor) of every tensor in a nested output (tuples, lists, dicts, ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return [(name, obj)]
    if isinstance(obj, dict) or (hasattr(obj, "items") and hasattr(obj, "keys")):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, f"{name}.{k}")]
    if isinstance(obj, (tuple, list)):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, f"{name}[{i}]")]
    return []


def _grad_group(name):
    """A parameter's group: its path up to the first layer index ("blocks.0"), else its first two parts."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:2]) if len(parts) > 2 else ".".join(parts[:-1]) or name


@contextlib.contextmanager
def _default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _run(model, args, kwargs, seed):
    """Forward, then backward of Σ w·output with weights drawn from `seed`: outputs, grads per group."""
    args = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    for p in model.parameters():
        p.grad = None
    outputs = _leaves(model(*args, **kwargs))
    g = torch.Generator().manual_seed(seed + 1)
    total = None
    for _, out in outputs:
        if out.is_floating_point() and out.requires_grad:
            w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
            term = (out * w).sum()
            total = term if total is None else total + term.to(total.dtype)
    if total is not None:
        total.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grads.setdefault(_grad_group(name), []).append(p.grad.detach())
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.grad is not None:
            grads[f"input[{i}]"] = [a.grad.detach()]
    return {"out": [(n, o.detach()) for n, o in outputs], "grads": grads}


def _max_error(tensors, refs):
    err = 0.0
    for t, r in zip(tensors, refs):
        if t.numel():
            err = max(err, (t.detach().double().cpu() - r.detach().double().cpu()).abs().max().item())
    return err


def _row(kind, name, ours, base, ref, factor):
    bad_nan = sum(int((torch.isnan(t.double().cpu()) & ~torch.isnan(r.double().cpu())).sum())
                  for t, r in zip(ours, ref))
    err, torch_err = _max_error(ours, ref), _max_error(base, ref)
    dtype = ours[0].dtype
    tol = factor * torch_err + floor(dtype)
    note = f"{bad_nan} NaN the float64 run lacks" if bad_nan else ""
    passed = err <= tol and not bad_nan
    return VerifyRow(kind, name, str(dtype).replace("torch.", ""), err, torch_err, tol, passed, note)


def _compare(ref, base, ours):
    rows = []
    for (name, o), (_, b), (_, r) in zip(ours["out"], base["out"], ref["out"]):
        if not o.is_floating_point():
            same = torch.equal(o.cpu(), r.cpu())
            rows.append(VerifyRow("output", name, str(o.dtype).replace("torch.", ""), float(not same), 0.0, 0.0, same,
                                  "" if same else "integer output differs"))
        elif o.shape != r.shape:
            rows.append(VerifyRow("output", name, str(o.dtype), float("inf"), 0.0, 0.0, False,
                                  f"shape {tuple(o.shape)} vs {tuple(r.shape)}"))
        else:
            rows.append(_row("output", name, [o], [b], [r], FACTOR_OUT))
    for group in ours["grads"]:
        if group not in ref["grads"] or group not in base["grads"]:
            rows.append(VerifyRow("grad", group, "", float("inf"), 0.0, 0.0, False, "no gradient in the unpatched run"))
            continue
        kind = "input grad" if group.startswith("input[") else "grad"
        rows.append(_row(kind, group, ours["grads"][group], base["grads"][group], ref["grads"][group], FACTOR_GRAD))
    for group in ref["grads"]:
        if group not in ours["grads"]:
            rows.append(VerifyRow("grad", group, "", float("inf"), 0.0, 0.0, False, "no gradient in the patched run"))
    return rows


class _Counting:
    """Counts, per swapped module, its calls and the mmfast custom ops run inside it (innermost swapped module;
    ops of the backward are counted under "(backward)")."""

    def __init__(self, model):
        self.paths = {id(m): p or "<model>" for p, m in model.named_modules() if _core.is_swapped(m)}
        self.saved = {id(m): sorted(k for k in m.__dict__.get(_core._SAVED, {}) if not k.startswith("_mmfast"))
                      for m in model.modules() if _core.is_swapped(m)}
        self.calls = dict.fromkeys(self.paths, 0)
        self.ops = {}
        self.stack = []

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.utils._python_dispatch import TorchDispatchMode

        counting = self

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if getattr(func, "namespace", "") == "mmfast":
                    where = counting.paths[counting.stack[-1]] if counting.stack else "(backward)"
                    name = func.__name__.split(".")[0]
                    counting.ops.setdefault(where, {}).setdefault(name, 0)
                    counting.ops[where][name] += 1
                return func(*args, **(kwargs or {}))

        def pre(module, args):
            if id(module) in self.paths:
                self.stack.append(id(module))
                self.calls[id(module)] += 1

        def post(module, args, out):
            if self.stack and self.stack[-1] == id(module):
                self.stack.pop()

        self.handles = [register_module_forward_pre_hook(_core.observer(pre)),
                        register_module_forward_hook(_core.observer(post))]
        self.mode = Ops()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for h in self.handles:
            h.remove()

    def table(self):
        rows = []
        for key, path in self.paths.items():
            ops = self.ops.get(path, {})
            rows.append((path, ", ".join(self.saved[key]), self.calls[key],
                         ", ".join(f"{n} x{c}" for n, c in sorted(ops.items())) or "-"))
        if "(backward)" in self.ops:
            backward = sorted(self.ops["(backward)"].items())
            rows.append(("(backward)", "", "", ", ".join(f"{n} x{c}" for n, c in backward)))
        return rows


def format_table(title, columns, rows):
    """Aligned plain text (verify's result is a string: printed, logged or asserted on)."""
    cells = [[str(c) for c in columns]] + [[str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [title] + ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(2, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
