"""The trainable models: name -> how to build one from a preset, make a batch, and compute its loss.

A :class:`TrainTask` is all the training loop knows of a model. Batches are made on every rank from one
seeded generator as the *global* batch and sliced per rank, so W ranks see exactly what one process sees on
the concatenated batch (synthetic data, or rows sampled from a ``--data`` file of tensors).

clip, albef and blip are registered by name with the module they need; until that module exists in this
checkout, building them raises a clear error (see ``_missing``).
"""
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class TrainTask:
    """build(preset, backend) -> model; batch(preset, n, generator, data) -> tuple of tensors (global batch,
    first dim n); loss(model, batch, step, total_steps) -> 0-dim loss (model may be DDP/FSDP-wrapped);
    set_group(model, group); shard_units(model) -> submodules that get their own ``fully_shard`` before the
    root; presets: the preset names build accepts."""

    name: str
    module: str
    build: Callable
    batch: Callable
    loss: Callable
    presets: Tuple[str, ...]
    set_group: Callable = lambda model, group: None
    shard_units: Callable = lambda model: []
    notes: str = ""


# ----------------------------------------------------------------------------------------------
# MoCo (v3 form) on a small backbone

class PatchMeanEncoder(nn.Module):
    """A stand-in backbone for tiny runs: patchify conv, GELU, mean over patches, LayerNorm -> (B, width)."""

    def __init__(self, in_chans=3, width=32, patch=4):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, patch, stride=patch)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(nn.functional.gelu(self.proj(x)).flatten(2).mean(-1))


MOCO_PRESETS = {
    # name: (image size, backbone width, dim, mlp_dim, version)
    "tiny": dict(image=16, width=32, dim=16, mlp_dim=32, version="v3"),
    "tiny-v2": dict(image=16, width=32, dim=16, mlp_dim=32, version="v2", queue_size=64),
}


def _moco_backbone(p):
    return PatchMeanEncoder(3, p["width"], 4), p["width"]


def _moco_build(preset, backend):
    from mmfast.models.moco import MoCo

    p = MOCO_PRESETS[preset]
    backbone, width = _moco_backbone(p)
    extra = dict(queue_size=p["queue_size"]) if "queue_size" in p else {}
    return MoCo(backbone, width, version=p["version"], dim=p["dim"], mlp_dim=p["mlp_dim"], backend=backend, **extra)


def _two_views(images, generator):
    """Stand-in augmentation (random horizontal flip + Gaussian noise per view): enough to make two views."""
    views = []
    for _ in range(2):
        flip = torch.rand(images.shape[0], generator=generator) < 0.5
        v = torch.where(flip[:, None, None, None], images.flip(-1), images)
        views.append(v + 0.1 * torch.randn(images.shape, generator=generator))
    return tuple(views)


def _moco_batch(preset, n, generator, data=None):
    s = MOCO_PRESETS[preset]["image"]
    if data is not None:
        images = data["images"][torch.randint(0, data["images"].shape[0], (n,), generator=generator)].float()
    else:
        images = torch.randn(n, 3, s, s, generator=generator)
    return _two_views(images, generator)


def _moco_loss(model, batch, step, total_steps):
    from mmfast.models.moco import cosine_momentum

    inner = getattr(model, "module", model)  # DDP keeps the model under .module; FSDP2 is the model itself
    m = cosine_momentum(step, total_steps, inner.momentum_encoder.momentum)
    return model(*batch, momentum=m).loss


def _moco_units(model):
    units = [model.base_encoder, model.momentum_encoder.ema]
    return units + ([model.predictor] if model.predictor is not None else [])


# ----------------------------------------------------------------------------------------------
# Models written elsewhere: registered by name, built once their module is in the checkout

def _missing(name, module, branch):
    def fail(*args, **kwargs):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise RuntimeError(f"train {name}: {module} is not in this checkout ({exc}); it is written on branch "
                               f"{branch} and its training task is wired here once merged") from None
        raise RuntimeError(f"train {name}: {module} exists but its training task is not wired yet "
                           f"(mmfast/training/tasks.py: TASKS[{name!r}])")
    return fail


def _placeholder(name, module, branch):
    fail = _missing(name, module, branch)
    return TrainTask(name=name, module=module, build=fail, batch=fail, loss=fail, presets=("tiny",),
                     notes=f"not wired: needs {module} ({branch})")


TASKS: Dict[str, TrainTask] = {
    "clip": _placeholder("clip", "mmfast.models.clip", "wt-vitclip"),
    "moco": TrainTask(name="moco", module="mmfast.models.moco", build=_moco_build, batch=_moco_batch,
                      loss=_moco_loss, presets=tuple(MOCO_PRESETS),
                      set_group=lambda model, group: model.set_group(group), shard_units=_moco_units),
    "albef": _placeholder("albef", "mmfast.models.albef", "wt-albefblip"),
    "blip": _placeholder("blip", "mmfast.models.blip", "wt-albefblip"),
}


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"train: model must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]
