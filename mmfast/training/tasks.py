"""The trainable models: name -> how to build one from a preset, make a batch, and compute its loss.

A :class:`TrainTask` is all the training loop knows of a model. Batches are made on every rank from one
seeded generator as the *global* batch and sliced per rank, so W ranks see exactly what one process sees on
the concatenated batch (synthetic data, or rows sampled from a ``--data`` file of tensors).

albef and blip need mmfast.models.albef / .blip (branch wt-albefblip); until those modules exist in this
checkout, building them raises a clear error naming the module and the branch (see ``_import``).

Bridge models (a frozen encoder and language model joined by a trainable bridge: llava, blip2, mllama,
flamingo) share one protocol, so each is one row ``bridge_task(...)`` in ``TASKS``:

    bridge_task(name, module, class_name, presets=(...), stages={stage: "one-line help", ...})

``stages`` keys are the values the class's ``set_stage`` takes (the first is the default, the paper's bridge
stage); ``--stage`` matches ``str(key)``. ``presets`` and ``stages`` live in the row so that ``--help`` needs
no torch; ``presets`` are checked against the module's ``PRESETS`` when built. The module provides:

- ``PRESETS``: dict of preset name -> constructor arguments, with at least ``"tiny"``;
- ``<class_name>.from_preset(name, *, backend="auto")`` -> model with random weights;
- ``model.set_stage(stage)`` -> model: frozen parameters get ``requires_grad=False`` (the loop's optimiser
  holds only the others, so frozen ones get no gradient and never change);
- ``training_batch(model, n, generator) -> dict`` of the forward's keyword tensors, first dim n (one image
  per row), ``labels`` included (-100 on image tokens and padding), drawn only from `generator`;
- ``model(**batch).loss``: the 0-dim loss.

Optional module hooks where a stage needs another model or loss (blip2's stage 1 is
``Blip2ForImageTextRetrieval.stage1_loss``): ``training_model(preset, stage, *, backend)`` replaces
``from_preset(...).set_stage(stage)``, ``training_loss(model, batch)`` replaces ``model(**batch).loss``.
Bridge rows run in one process, under DDP or FSDP2 (one unit: the root; frozen and trainable parameters share
it), ``serial_stages`` in one process only (the refusal says why), each rank's loss its token-weighted share of the global batch's, so that W ranks
compute the gradients of one process on the concatenated batch; ``--data`` is refused.
tests/mmfast/test_training_bridge.py trains every stage of every bridge row in ``TASKS`` (preset "tiny",
backend "reference", 2 steps) and checks the optimiser holds exactly the trainable parameters, frozen ones
have ``.grad is None`` and are unchanged; a new row is covered once added.
"""
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

# torch is imported inside the functions: `python -m mmfast train --help` reads this registry without it


@dataclass(frozen=True)
class TrainTask:
    """build(preset, backend) -> model (bridge tasks: build(preset, backend, stage)); batch(preset, n, generator,
    data, model=None) -> tuple of tensors, or a dict of keyword tensors (bridge tasks, drawn for `model`) (global
    batch, first dim n); loss(model, batch, step, total_steps) -> 0-dim loss (model may be DDP/FSDP-wrapped);
    set_group(model, group); shard_units(model) -> submodules that get their own ``fully_shard`` before the
    root (every MomentumEncoder's ``ema`` and the online modules it follows must be among them, so that the
    EMA update sees shards on both sides) — unless ema_updated_outside_forward: loss runs the update before
    forward, when every parameter is a shard; presets: the preset names build accepts (albef / blip: checked
    against the model module's PRESETS when built); parallel: the modes the task supports (serial_reason: why
    not more); stages: the bridge models' training stages (see the module docstring)."""

    name: str
    module: str
    build: Callable
    batch: Callable
    loss: Callable
    presets: Tuple[str, ...]
    set_group: Callable = lambda model, group: None
    shard_units: Callable = lambda model: []
    parallel: Tuple[str, ...] = ("none", "ddp", "fsdp")
    notes: str = ""
    ema_updated_outside_forward: bool = False
    stages: Optional[Dict[Any, str]] = None  # bridge models: set_stage value -> help, the first the default
    serial_reason: str = ""  # why parallel is limited to what it is (the refusal's message)
    serial_stages: Tuple[Any, ...] = ()  # bridge stages that run in one process only (see serial_reason)
    # the loss is this rank's share of the global batch's (bridge models: token-weighted, see _token_share):
    # the loop reports the sum over the ranks
    loss_is_rank_share: bool = False

    def parallel_modes(self, stage=None):
        """The `parallel` values this task takes at `stage` (a bridge stage value, or None)."""
        return ("none",) if stage is not None and stage in self.serial_stages else self.parallel

    def stage(self, stage=None):
        """The stage value for `stage` (None: the default; a CLI string matches str(value))."""
        if self.stages is None:
            if stage is not None:
                raise ValueError(f"train {self.name}: stage applies to the bridge models "
                                 f"({', '.join(n for n, t in TASKS.items() if t.stages)}), got {stage!r}")
            return None
        for value in self.stages:
            if stage is None or stage == value or str(stage) == str(value):
                return value
        raise ValueError(f"train {self.name}: stage must be one of {tuple(map(str, self.stages))}, got {stage!r}")


# ----------------------------------------------------------------------------------------------
# MoCo (v3, or v2 with a queue) on mmfast's ViT

MOCO_PRESETS = {
    # moco-v3 ViT recipe at test size (ViT backbone, 3-layer projector, predictor); tiny-v2: MoCo v2 with a queue
    "tiny": dict(vit=dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2), dim=16, mlp_dim=32,
                 version="v3"),
    "tiny-v2": dict(vit=dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2), dim=16, mlp_dim=32,
                    version="v2", queue_size=64, shuffle_bn=True),
    # moco-v3's ViT-S/16 and ViT-B/16 (dim 256, mlp_dim 4096)
    "vit-s/16": dict(vit=dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12), dim=256,
                     mlp_dim=4096, version="v3"),
    "vit-b/16": dict(vit=dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12), dim=256,
                     mlp_dim=4096, version="v3"),
}


def _moco_build(preset, backend):
    from mmfast.models.moco import MoCo
    from mmfast.models.vit import ViT

    p = MOCO_PRESETS[preset]
    vit = ViT(**p["vit"], num_classes=0, backend=backend)
    extra = {k: p[k] for k in ("queue_size", "shuffle_bn") if k in p}
    return MoCo(vit, version=p["version"], dim=p["dim"], mlp_dim=p["mlp_dim"], backend=backend, **extra)


def _two_views(images, generator):
    """Stand-in augmentation (random horizontal flip + Gaussian noise per view): enough to make two views."""
    import torch

    views = []
    for _ in range(2):
        flip = torch.rand(images.shape[0], generator=generator) < 0.5
        v = torch.where(flip[:, None, None, None], images.flip(-1), images)
        views.append(v + 0.1 * torch.randn(images.shape, generator=generator))
    return tuple(views)


def _moco_batch(preset, n, generator, data=None, model=None):
    import torch

    s = MOCO_PRESETS[preset]["vit"]["img_size"]
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
# CLIP on mmfast.models.CLIP (its named presets)

CLIP_PRESETS = {"tiny": "clip-tiny-test", "vit-b/32": "clip-vit-b/32", "vit-b/16": "clip-vit-b/16",
                "vit-l/14": "clip-vit-l/14", "siglip-b/16": "siglip-b/16-224"}


def _clip_sizes(preset):
    from mmfast.models import PRESETS

    args = PRESETS[CLIP_PRESETS[preset]][1]
    return args["vision"]["img_size"], args["text"]["vocab_size"], args["text"]["max_len"]


def _clip_build(preset, backend):
    from mmfast.models import create_model

    return create_model(CLIP_PRESETS[preset], backend=backend)


def _clip_batch(preset, n, generator, data=None, model=None):
    """Random images and captions: random tokens, the highest id as EOT (the argmax rule of CLIP's legacy
    configs), zero padding after it with attention_mask 0; or rows of data {'images', 'input_ids',
    'attention_mask'}."""
    import torch

    size, vocab, max_len = _clip_sizes(preset)
    if data is not None:
        idx = torch.randint(0, data["images"].shape[0], (n,), generator=generator)
        return data["images"][idx].float(), data["input_ids"][idx], data["attention_mask"][idx]
    images = torch.randn(n, 3, size, size, generator=generator)
    lengths = torch.randint(2, max_len + 1, (n,), generator=generator)
    ids = torch.randint(3, vocab - 1, (n, max_len), generator=generator)
    pos = torch.arange(max_len)
    ids = torch.where(pos == (lengths - 1)[:, None], vocab - 1, ids)
    mask = (pos < lengths[:, None]).long()
    return images, ids * mask, mask


def _clip_loss(model, batch, step, total_steps):
    images, ids, mask = batch
    return model(input_ids=ids, pixel_values=images, attention_mask=mask, return_loss=True).loss


def _clip_set_group(model, group):
    model.contrastive.group = group


def _clip_units(model):
    return [model.vision_model, model.text_model]


# ----------------------------------------------------------------------------------------------
# ALBEF / BLIP pre-training (written on wt-albefblip): `Class.from_preset(name, backend=)` and
# `forward(pixel_values, input_ids, attention_mask).loss`; built once their module is in the checkout

def _import(name, module, branch=None):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        where = f"branch {branch}" if branch else "another branch"
        raise RuntimeError(f"train {name}: {module} is not in this checkout ({exc}); it is written on {where} "
                           f"and its training task runs once that branch is merged") from None


def _vl_config(name, module, cls_name, preset):
    import inspect

    mod = _import(name, module, "wt-albefblip")
    cls = getattr(mod, cls_name)
    if preset not in mod.PRESETS:
        raise ValueError(f"train {name}: preset must be one of {tuple(mod.PRESETS)}, got {preset!r}")
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return cls, {**defaults, **mod.PRESETS[preset]}


# ALBEF / BLIP under FSDP2. Their text towers cannot be units of their own: FSDP2 needs tied parameters inside
# one unit, and ALBEF's mlm_head decoder weight is the text encoder's word embedding (online and momentum
# alike), BLIP's text_decoder shares embeddings, cross-attention and FFN modules with text_encoder and its
# lm_head the word embedding; the momentum towers also run as children of the EMA ModuleDict, whose own forward
# (FSDP2's unshard hook) never runs. So they stay in the root unit, which is unsharded during forward — where
# the models update the EMA, from full tensors into the root's shards that FSDP2 frees without writing back.
# The task therefore runs the EMA update before forward, when every parameter is a shard on both sides (the
# online weights do not change within a step, so it is LAVIS' update), and forward(update_momentum=False).
# Units of their own: the online and momentum image towers (untied, called through their forward).
def _vl_units(model):
    return [model.visual_encoder, model.momentum_model.ema["visual_encoder"]]


def _vl_task(name, module, cls_name, presets):
    def build(preset, backend):
        cls, _ = _vl_config(name, module, cls_name, preset)
        return cls.from_preset(preset, backend=backend)

    def batch(preset, n, generator, data=None, model=None):
        """Random images and captions: [CLS] random non-special tokens [SEP], zero padding (attention_mask 0);
        or rows of data {'images', 'input_ids', 'attention_mask'}."""
        import torch

        if data is not None:
            idx = torch.randint(0, data["images"].shape[0], (n,), generator=generator)
            return data["images"][idx].float(), data["input_ids"][idx], data["attention_mask"][idx]
        _, cfg = _vl_config(name, module, cls_name, preset)
        size, length = cfg["image_size"], min(16, cfg["max_positions"])
        special = {v for k, v in cfg.items() if k.endswith("token_id") and isinstance(v, int)}
        allowed = torch.tensor([t for t in range(cfg["vocab_size"]) if t not in special])
        images = torch.randn(n, 3, size, size, generator=generator)
        ids = allowed[torch.randint(0, len(allowed), (n, length), generator=generator)]
        lengths = torch.randint(3, length + 1, (n,), generator=generator)
        pos = torch.arange(length)
        ids[:, 0] = cfg["cls_token_id"]
        ids = torch.where(pos == (lengths - 1)[:, None], cfg["sep_token_id"], ids)
        mask = (pos < lengths[:, None]).long()
        return images, torch.where(mask.bool(), ids, cfg["pad_token_id"]), mask

    def loss(model, batch, step, total_steps):
        images, ids, mask = batch
        getattr(model, "module", model).momentum_model.update()  # before forward: see _vl_units
        return model(images, ids, mask, update_momentum=False).loss

    return TrainTask(name=name, module=module, build=build, batch=batch, loss=loss, presets=presets,
                     set_group=lambda model, group: model.set_group(group), shard_units=_vl_units,
                     ema_updated_outside_forward=True,
                     notes="ITC per rank against the queues, which gather every rank's momentum features (as "
                           "ALBEF / BLIP)")


# ----------------------------------------------------------------------------------------------
# Bridge models (the protocol: this module's docstring)

_BRIDGE_SERIAL = ("blip2's stage 1 runs in one process only: its loss is not the module's forward, through which "
                  "DDP's gradient synchronisation and FSDP2's unsharding run")


def _token_share(loss, labels):
    """Under a process group, this rank's share of the global batch's mean next-token loss: its mean times its
    target count over the global count, times the world size (DDP averages the gradients over the ranks).
    The gradients are then those of one process on the concatenated batch, whatever each rank's count."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss
    count = (labels[:, 1:] != -100).sum()
    total = count.clone()
    dist.all_reduce(total)
    return loss * (count * dist.get_world_size() / total.clamp_min(1))


def bridge_task(name, module, class_name, *, presets, stages, serial_stages=(), notes=""):
    """A TrainTask for a bridge-model module that follows the protocol in this module's docstring."""

    def _module(preset):
        mod = _import(name, module)
        if preset not in mod.PRESETS:
            raise ValueError(f"train {name}: preset must be one of {tuple(mod.PRESETS)}, got {preset!r}")
        return mod

    def build(preset, backend, stage=None):
        mod = _module(preset)
        stage = next(iter(stages)) if stage is None else stage
        hook = getattr(mod, "training_model", None)
        if hook is not None:
            return hook(preset, stage, backend=backend)
        return getattr(mod, class_name).from_preset(preset, backend=backend).set_stage(stage)

    def batch(preset, n, generator, data=None, model=None):
        if data is not None:
            raise ValueError(f"train {name}: --data is not supported for the bridge models (synthetic batches only)")
        if model is None:
            raise ValueError(f"train {name}: the batch is drawn for a built model (make_batch(..., model=))")
        return _module(preset).training_batch(model, n, generator)

    def loss(model, batch, step, total_steps):
        hook = getattr(_import(name, module), "training_loss", None)
        value = hook(model, batch) if hook is not None else model(**batch).loss
        return _token_share(value, batch["labels"]) if "labels" in batch else value

    return TrainTask(name=name, module=module, build=build, batch=batch, loss=loss, presets=tuple(presets),
                     parallel=("none", "ddp", "fsdp"), stages=dict(stages), serial_reason=_BRIDGE_SERIAL,
                     serial_stages=tuple(serial_stages), loss_is_rank_share=True, notes=notes)


TASKS: Dict[str, TrainTask] = {
    "clip": TrainTask(name="clip", module="mmfast.models.clip", build=_clip_build, batch=_clip_batch,
                      loss=_clip_loss, presets=tuple(CLIP_PRESETS), set_group=_clip_set_group,
                      shard_units=_clip_units),
    "moco": TrainTask(name="moco", module="mmfast.models.moco", build=_moco_build, batch=_moco_batch,
                      loss=_moco_loss, presets=tuple(MOCO_PRESETS),
                      set_group=lambda model, group: model.set_group(group), shard_units=_moco_units),
    "albef": _vl_task("albef", "mmfast.models.albef", "ALBEF", ("tiny", "base")),
    "blip": _vl_task("blip", "mmfast.models.blip", "BLIP", ("tiny", "base", "large")),
    "llava": bridge_task("llava", "mmfast.models.llava", "Llava",
                         presets=("tiny", "tiny-next", "llava-1.5-7b", "llava-next-vicuna-7b"),
                         stages={1: "feature alignment: the projector (and NeXT's image_newline) only",
                                 2: "instruction tuning: projector + language model"}, notes="ViT always frozen"),
    "blip2": bridge_task("blip2", "mmfast.models.blip2", "Blip2", presets=("tiny", "blip2-opt-2.7b"),
                         stages={"stage2": "image-to-text: Q-Former, query tokens, projection (ViT, LM frozen)",
                                 "stage1": "Q-Former pre-training, ITC + ITM + ITG (Blip2ForImageTextRetrieval, "
                                           "ViT frozen)",
                                 "all": "every parameter"}, serial_stages=("stage1",)),
    "mllama": bridge_task("mllama", "mmfast.models.mllama", "Mllama", presets=("tiny", "llama-3.2-11b-vision"),
                          stages={"bridge": "adapter: cross-attention layers + projector (vision, Llama frozen)",
                                  "full": "adapter + the Llama layers (vision frozen)"}),
    "flamingo": bridge_task("flamingo", "mmfast.models.flamingo", "Flamingo",
                            presets=("tiny", "openflamingo-9b-llama"),
                            stages={"bridge": "perceiver resampler + gated cross-attention blocks (vision, LM "
                                              "frozen)",
                                    "bridge+embeddings": "also the LM's input embeddings (open_flamingo's default: "
                                                         "the new <image> / <|endofchunk|> rows)",
                                    "all": "every parameter"}),
}


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"train: model must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]
