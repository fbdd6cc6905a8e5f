"""MomentumEncoder: the EMA copy of a model (MoCo's key encoder, ALBEF/BLIP momentum models)."""
import copy

import torch
from torch import nn

from mmfast.kernels import ema_update_


class MomentumEncoder(nn.Module):
    """Holds an EMA copy of `model` and updates it with one fused launch per dtype group.

    ``update(m)`` does θ_ema ← m·θ_ema + (1−m)·θ for every parameter (``ema_update_``) and copies the
    buffers (BatchNorm statistics). The copy never requires grad; calling the module runs the copy.
    Its state_dict holds only the copy (under ``ema.``), so it round-trips through save/load.

    Args:
        model: the online model; it is referenced, not registered, so its parameters are not duplicated
            in this module's state_dict or parameters().
        momentum: default m for ``update()``; a float or a 0-dim tensor (e.g. a schedule on the GPU).
        ema_dtype: optional dtype for the copy's floating parameters (e.g. torch.float32 EMA of a bf16 model).
        backend: forwarded to ``ema_update_``.
    """

    def __init__(self, model: nn.Module, momentum=0.999, *, ema_dtype=None, backend="auto"):
        super().__init__()
        self.ema = copy.deepcopy(model)
        if ema_dtype is not None:
            for p in self.ema.parameters():
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
        """One EMA step with `momentum` (default: the constructor's)."""
        m = self.momentum if momentum is None else momentum
        ema_update_(
            list(self.ema.parameters()),
            [p.detach() for p in self._online.parameters()],
            m,
            ema_buffers=list(self.ema.buffers()),
            buffers=list(self._online.buffers()),
            backend=self.backend,
        )

    def forward(self, *args, **kwargs):
        return self.ema(*args, **kwargs)
