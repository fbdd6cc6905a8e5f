"""MomentumEncoder: the EMA copy of a model (MoCo's key encoder, ALBEF/BLIP momentum models)."""
import copy

import torch
from torch import nn

from mmfast.kernels import ema_update_
from mmfast.kernels.ema._launch import check_backend_name, check_momentum

_EMA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class MomentumEncoder(nn.Module):
    """Holds an EMA copy of `model` and updates it with one fused launch per dtype group.

    ``update(m)`` does θ_ema ← m·θ_ema + (1−m)·θ for every parameter (``ema_update_``) and copies the
    buffers (BatchNorm statistics). The copy never requires grad; calling the module runs the copy.
    Its state_dict holds only the copy (under ``ema.``), so it round-trips through save/load.

    Args:
        model: the online model (an ``nn.Module``); it is referenced, not registered, so its parameters
            are not duplicated in this module's state_dict or parameters().
        momentum: default m in [0, 1] for ``update()``; a float or a 0-dim floating tensor (e.g. a
            schedule on the GPU, range-checked on its device).
        ema_dtype: optional dtype for the copy's floating parameters: torch.float32, float16, bfloat16
            (e.g. an fp32 EMA of a bf16 model) or float64 (backend="reference" only).
        backend: forwarded to ``ema_update_``: "auto", "triton", "cuda", "cpp" or "reference".
        copy_buffers: whether ``update`` copies the buffers (True); False keeps the copy's own (MoCo's key
            encoder keeps the BatchNorm statistics of its own forward passes).

    Raises ValueError naming the argument when one is not of the form above.
    """

    def __init__(self, model: nn.Module, momentum=0.999, *, ema_dtype=None, backend="auto", copy_buffers=True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"MomentumEncoder: model must be a torch.nn.Module, got {type(model).__name__}")
        momentum = check_momentum(momentum, op="MomentumEncoder")
        if ema_dtype is not None and ema_dtype not in _EMA_DTYPES:
            names = ", ".join(str(d) for d in _EMA_DTYPES)
            raise ValueError(f"MomentumEncoder: ema_dtype must be None or one of {names}, got {ema_dtype!r}")
        check_backend_name(backend, op="MomentumEncoder")
        if not isinstance(copy_buffers, bool):
            raise ValueError(f"MomentumEncoder: copy_buffers must be True or False, got {copy_buffers!r}")
        self.copy_buffers = copy_buffers
        self.ema = copy.deepcopy(model)
        if ema_dtype is not None:
            for p in self.ema.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(ema_dtype)
        self.ema.requires_grad_(False)
        object.__setattr__(self, "_online", model)  # not a submodule: no duplicate parameters
        self.momentum = momentum
        self.backend = backend
        self._check_structure()

    def _check_structure(self):
        ema_names = [n for n, _ in self.ema.named_parameters()]
        online_names = [n for n, _ in self._online.named_parameters()]
        if ema_names != online_names:
            raise ValueError("model's parameters no longer match the EMA copy's (names or order changed)")

    @torch.no_grad()
    def update(self, momentum=None):
        """One EMA step with `momentum` (default: the constructor's), checked as ``ema_update_`` checks it."""
        m = self.momentum if momentum is None else momentum
        ema_update_(
            list(self.ema.parameters()),
            [p.detach() for p in self._online.parameters()],
            m,
            ema_buffers=list(self.ema.buffers()) if self.copy_buffers else [],
            buffers=list(self._online.buffers()) if self.copy_buffers else [],
            backend=self.backend,
        )

    def forward(self, *args, **kwargs):
        return self.ema(*args, **kwargs)
