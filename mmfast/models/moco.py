"""MoCo v2 (queue of negatives) and MoCo v3 (predictor, no queue) around any backbone.

The key encoder is :class:`mmfast.nn.MomentumEncoder` (``ema_update_``: one fused launch, FSDP2 shards
updated shard-locally); the loss is :func:`mmfast.kernels.contrastive_loss` in its MoCo form
(``log_scale=False``, scale 1/τ, rows only), distributed through the kernel's process-group path (v3) or
with the keys of every rank gathered in front of the queue (v2).

BatchNorm. A ViT backbone needs nothing (LayerNorm). The BatchNorm layers of the MLP heads built here are
synchronised over ``group`` (:class:`GroupBatchNorm1d`, as moco-v3 converts its heads to SyncBatchNorm), so
a run on W ranks equals one process on the concatenated batch. BatchNorm inside a backbone you pass in is
left as it is: per-process statistics, through which a query's batch can tell which key is its positive.
Remedies: v2 ``shuffle_bn=True`` with a process group (MoCo v1/v2's shuffled BN: the key encoder sees a
batch mixed across ranks, then the keys are put back in order; in one process it does nothing — MoCo's
own code needs DDP for it too), or ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` on the backbone
(CUDA) as moco-v3 does for ResNets.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from mmfast.kernels import contrastive_loss
from mmfast.kernels._common import check_bool, check_choice, check_int, check_scalar
from mmfast.kernels._registry import accelerated_backends
from mmfast.nn import MoCoQueue, MomentumEncoder

__all__ = ["MoCo", "MoCoOutput", "GroupBatchNorm1d", "build_mlp", "cosine_momentum"]

_DEFAULTS = {  # the papers' recipes (moco-v3 ViT: T=0.2, m=0.99; MoCo v2: T=0.2, m=0.999, K=65536)
    "v2": dict(temperature=0.2, momentum=0.999),
    "v3": dict(temperature=0.2, momentum=0.99),
}


def cosine_momentum(step, total_steps, base=0.99):
    """moco-v3's schedule: m rises from `base` at step 0 to 1 at `total_steps` along half a cosine."""
    check_int("cosine_momentum", "total_steps", total_steps, lo=1)
    check_scalar("cosine_momentum", "step", step, lo=0)
    check_scalar("cosine_momentum", "base", base, lo=0.0, hi=1.0)
    t = min(float(step), float(total_steps)) / total_steps
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * t)) * (1.0 - base)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the gradient is summed back (each rank's loss term reaches every rank's input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class GroupBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the ranks of ``group`` (None: plain BatchNorm1d).

    SyncBatchNorm for any backend (gloo on CPU included, where torch's SyncBatchNorm refuses to run), with
    the same parameter and buffer names as BatchNorm1d. Two all-reduces with autograd (mean, then the
    centred sum of squares), so gradients flow across ranks as through one batch.
    """

    group = None

    def forward(self, x):
        if not (self.training and self.group is not None):
            return super().forward(x)
        world = torch.distributed.get_world_size(self.group)
        n = x.shape[0] * world
        mean = _AllReduceSum.apply(x.sum(0), self.group) / n
        var = _AllReduceSum.apply(((x - mean) ** 2).sum(0), self.group) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), f)
                self.running_var.lerp_(var.detach() * (n / max(n - 1, 1)), f)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def build_mlp(num_layers, in_dim, mlp_dim, out_dim, last_bn=True):
    """moco-v3's ``_build_mlp``: Linear (no bias), BN, ReLU per hidden layer; BN without affine at the end."""
    layers = []
    for i in range(num_layers):
        d1 = in_dim if i == 0 else mlp_dim
        d2 = out_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d1, d2, bias=False))
        if i < num_layers - 1:
            layers += [GroupBatchNorm1d(d2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(GroupBatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)


class _Tower(nn.Module):
    """backbone then head: moco-v3's ``base_encoder`` with its ``head`` replaced by the projector."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        features = self.backbone(x)
        if not isinstance(features, torch.Tensor):  # mmfast / HF models return an output with the readout
            features = features.pooler_output
        return self.head(features)


def _gather(x, group):
    """cat of every rank's x (no gradient: keys and key-encoder inputs)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


@dataclass
class MoCoOutput:
    loss: torch.Tensor
    q: torch.Tensor  # queries (predictor outputs for v3), the view(s) trained by gradient
    k: torch.Tensor  # keys of the momentum encoder (no gradient)


class MoCo(nn.Module):
    """MoCo v2 / v3 over a backbone that maps a batch of images to (B, feature_dim) features.

    v3 (moco-v3): projector ``build_mlp(projector_layers, feature_dim, mlp_dim, dim)`` on the backbone,
    predictor ``build_mlp(2, dim, mlp_dim, dim, predictor_last_bn)``; both views go through both
    encoders and loss = ctr(q1, k2) + ctr(q2, k1) with ctr(q, k) = CE(q̂·k̂_allᵀ / T, labels offset by
    rank) · 2T over the keys of every rank (the kernel's distributed path when `group` is given).

    v2 (MoCo v2): projector Linear-ReLU-Linear (with biases); query = x1, key = x2; loss =
    InfoNCE of q̂ against cat(k̂, queue) / T (``contrastive_loss``'s queue form), then the keys are
    enqueued. The kernel's queue form counts the batch's other keys as negatives too (N − 1 more than
    MoCo v2's ``l_neg = q·queue``, the form MoCo v3 adopted); with `group`, the keys of every rank are
    gathered first, so W ranks see the negatives one process sees on the concatenated batch.

    The key encoder is updated in ``forward`` before the keys are computed (as both papers' code):
    ``momentum`` there (e.g. :func:`cosine_momentum`) or the constructor's default.

    Args:
        backbone: an ``nn.Module`` (B, ...) -> (B, feature_dim), or -> an output whose ``pooler_output`` is
            that (e.g. :class:`mmfast.models.ViT` with ``num_classes=0``).
        feature_dim: the backbone's output size (None: its ``embed_dim`` or ``num_features`` attribute).
        version: "v2" or "v3".
        dim, mlp_dim: output and hidden sizes of the MLP heads (v3: 256, 4096; v2: 128, feature_dim).
        projector_layers: v3 projector depth (3 for ViT, 2 for ResNet in moco-v3).
        predictor_last_bn: v3 predictor ends with BN (ViT: True; ResNet: False).
        queue_size: v2's K.
        temperature, momentum: T and the default m (v3: 0.2, 0.99; v2: 0.2, 0.999).
        shuffle_bn: v2 only: compute the keys on a batch shuffled across the ranks of `group` (see the module
            docstring); no effect without a group.
        group: a process group for distributed training (None: single process).
        backend: forwarded to ``contrastive_loss``; ema_backend to ``MomentumEncoder``.
    """

    def __init__(self, backbone, feature_dim=None, *, version="v3", dim=None, mlp_dim=None, projector_layers=3,
                 predictor_last_bn=True, queue_size=65536, temperature=None, momentum=None, shuffle_bn=False, group=None,
                 backend="auto", ema_backend="auto"):
        super().__init__()
        name = "MoCo"
        if not isinstance(backbone, nn.Module):
            raise ValueError(f"{name}: backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        check_choice(name, "version", version, ("v2", "v3"))
        if feature_dim is None:
            feature_dim = getattr(backbone, "embed_dim", None) or getattr(backbone, "num_features", None)
        check_int(name, "feature_dim", feature_dim, lo=1)
        dim = (256 if version == "v3" else 128) if dim is None else dim
        check_int(name, "dim", dim, lo=1)
        mlp_dim = (4096 if version == "v3" else feature_dim) if mlp_dim is None else mlp_dim
        check_int(name, "mlp_dim", mlp_dim, lo=1)
        check_int(name, "projector_layers", projector_layers, lo=1)
        check_bool(name, "predictor_last_bn", predictor_last_bn)
        check_int(name, "queue_size", queue_size, lo=1)
        check_bool(name, "shuffle_bn", shuffle_bn)
        if shuffle_bn and version != "v2":
            raise ValueError(f"{name}: shuffle_bn is MoCo v2's remedy (v3 synchronises its BatchNorm instead), got "
                             f"version={version!r}")
        self.shuffle_bn = shuffle_bn
        temperature = _DEFAULTS[version]["temperature"] if temperature is None else temperature
        momentum = _DEFAULTS[version]["momentum"] if momentum is None else momentum
        check_scalar(name, "temperature", temperature, lo=0.0, lo_open=True)
        check_scalar(name, "momentum", momentum, lo=0.0, hi=1.0)
        check_choice(name, "backend", backend, ("auto", "reference") + accelerated_backends("contrastive_loss"))
        self.version, self.temperature, self.backend = version, float(temperature), backend
        if version == "v3":
            head = build_mlp(projector_layers, feature_dim, mlp_dim, dim)
            self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=predictor_last_bn)
        else:
            head = nn.Sequential(nn.Linear(feature_dim, mlp_dim), nn.ReLU(inplace=True), nn.Linear(mlp_dim, dim))
            self.predictor = None
        self.base_encoder = _Tower(backbone, head)
        self.momentum_encoder = MomentumEncoder(self.base_encoder, momentum, backend=ema_backend, copy_buffers=False)
        self.queue = MoCoQueue(dim, queue_size) if version == "v2" else None
        self.group = None
        self.set_group(group)

    def set_group(self, group):
        """Use `group` (or None) for the loss, the key gather and the heads' BatchNorm statistics."""
        if group is not None:
            import torch.distributed as dist

            if not isinstance(group, dist.ProcessGroup):
                raise ValueError(f"MoCo: group must be a torch.distributed ProcessGroup or None, got "
                                 f"{type(group).__name__}")
        self.group = group
        for m in self.modules():
            if isinstance(m, GroupBatchNorm1d):
                m.group = group
        return self

    def forward(self, x1, x2, momentum=None):
        """Loss of the two views (x1, x2); updates the key encoder first and (v2) enqueues the keys after."""
        if self.version == "v3":
            q1, q2 = self.predictor(self.base_encoder(x1)), self.predictor(self.base_encoder(x2))
            with torch.no_grad():
                self.momentum_encoder.update(momentum)
                k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
            loss = self._v3_loss(q1, k2) + self._v3_loss(q2, k1)
            return MoCoOutput(loss=loss, q=torch.cat([q1, q2]), k=torch.cat([k1, k2]))
        q = self.base_encoder(x1)
        with torch.no_grad():
            self.momentum_encoder.update(momentum)
            keys = self._shuffled_keys(x2) if self.shuffle_bn and self.group is not None else self.momentum_encoder(x2)
            k = nn.functional.normalize(keys, dim=1)
        loss, k_all = self._v2_loss(q, k)
        self.queue.enqueue(k_all)
        return MoCoOutput(loss=loss, q=q, k=k)

    def _shuffled_keys(self, x):
        """MoCo's _batch_shuffle_ddp / _batch_unshuffle_ddp: encode this rank's slice of a random permutation of
        the global batch (drawn on rank 0 and broadcast), gather the keys and return this rank's in order."""
        import torch.distributed as dist

        group, n = self.group, x.shape[0]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        x_all = _gather(x, group)
        perm = torch.randperm(world * n, device=x.device) if rank == 0 else torch.empty(world * n, dtype=torch.long,
                                                                                          device=x.device)
        dist.broadcast(perm, dist.get_global_rank(group, 0), group=group)
        k_all = _gather(self.momentum_encoder(x_all[perm[rank * n:(rank + 1) * n]]), group)
        return k_all[torch.argsort(perm)[rank * n:(rank + 1) * n]]

    def _v3_loss(self, q, k):
        t = self.temperature
        return contrastive_loss(q, k, 1.0 / t, normalize=True, symmetric=False, log_scale=False, max_scale=None,
                                group=self.group, backend=self.backend) * (2 * t)

    def _v2_loss(self, q, k):
        """(loss, every rank's keys in rank order); the loss value is the global batch's, its gradient this
        rank's share as DDP expects (the local mean, averaged over ranks by DDP)."""
        k_all = keys = k
        if self.group is not None:
            import torch.distributed as dist

            rank, n = dist.get_rank(self.group), k.shape[0]
            k_all = _gather(k, self.group)
            # own keys first: row i's positive is column i
            keys = torch.cat([k, k_all[:rank * n], k_all[(rank + 1) * n:]])
        b = self.queue.with_keys(keys)
        loss = contrastive_loss(q, b, 1.0 / self.temperature, normalize=True, symmetric=False, log_scale=False,
                                max_scale=None, backend=self.backend)
        if self.group is not None:
            import torch.distributed as dist

            mean = loss.detach().clone()
            dist.all_reduce(mean, group=self.group)
            loss = loss + (mean / dist.get_world_size(self.group) - loss.detach())
        return loss, k_all

    @classmethod
    def from_state_dict(cls, state_dict, backbone, *, backbone_keys: Optional[Callable[[str], str]] = None,
                        convert: Optional[Callable[[nn.Module], nn.Module]] = None, **kwargs):
        """A v3 MoCo from a moco-v3 checkpoint (``module.base_encoder.*``, ``module.momentum_encoder.*``,
        ``module.predictor.*``; the ``{"state_dict": ...}`` file itself is accepted too).

        `backbone` is the model the base encoder's non-head keys load into; `backbone_keys` maps a moco-v3
        backbone key (without the ``base_encoder.`` prefix) to the backbone's name (default: unchanged, e.g.
        a timm VisionTransformer with ``head = Identity``, which moco-v3's vits.py subclasses). `convert`, if
        given, then replaces both loaded backbones by ``convert(backbone)``, e.g. ``ViT.from_timm`` to run the
        timm ViT of a moco-v3 checkpoint on mmfast's kernels. dim, mlp_dim, feature_dim, projector depth and
        the predictor's last BN are read from the weights; other keyword arguments go to the constructor
        (temperature, momentum, group, backend). Loads strictly: a missing or unexpected key raises.
        """
        if isinstance(state_dict, dict) and "state_dict" in state_dict and not torch.is_tensor(state_dict["state_dict"]):
            state_dict = state_dict["state_dict"]
        if not isinstance(state_dict, dict):
            raise ValueError(f"MoCo.from_state_dict: state_dict must be a dict, got {type(state_dict).__name__}")
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        if "predictor.0.weight" not in sd or "base_encoder.head.0.weight" not in sd:
            raise ValueError("MoCo.from_state_dict: state_dict has no moco-v3 predictor.0.weight / "
                             "base_encoder.head.0.weight (is it a moco-v3 checkpoint?)")
        linear = sorted(int(k.split(".")[2]) for k, v in sd.items()
                        if k.startswith("base_encoder.head.") and k.endswith(".weight") and v.dim() == 2)
        pred_linear = sorted(int(k.split(".")[1]) for k, v in sd.items()
                             if k.startswith("predictor.") and k.endswith(".weight") and v.dim() == 2)
        mlp_dim, dim = sd["predictor.0.weight"].shape
        config = dict(version="v3", dim=dim, mlp_dim=mlp_dim, projector_layers=len(linear),
                      predictor_last_bn=f"predictor.{pred_linear[-1] + 1}.running_mean" in sd)
        model = cls(backbone, sd["base_encoder.head.0.weight"].shape[1], **config, **kwargs)
        model.to(sd["predictor.0.weight"].dtype)  # the checkpoint's precision, not the default dtype's
        rename = backbone_keys or (lambda key: key)
        mapped = {}
        for key, value in sd.items():
            for src, dst in (("base_encoder.", "base_encoder."), ("momentum_encoder.", "momentum_encoder.ema.")):
                if key.startswith(src):
                    rest = key[len(src):]
                    rest = rest if rest.startswith("head.") else "backbone." + rename(rest)
                    mapped[dst + rest] = value
                    break
            else:
                mapped[key] = value
        own = model.state_dict()
        for key in ("queue.queue", "queue.ptr"):
            own.pop(key, None)
        missing = sorted(set(own) - set(mapped))
        unexpected = sorted(set(mapped) - set(own))
        if missing or unexpected:
            raise ValueError(f"MoCo.from_state_dict: keys do not match: missing {missing[:8]}, unexpected "
                             f"{unexpected[:8]}")
        model.load_state_dict(mapped, strict=True)
        if convert is not None:
            model.base_encoder.backbone = convert(model.base_encoder.backbone)
            ema = model.momentum_encoder.ema
            ema.backbone = convert(ema.backbone).requires_grad_(False)
            model.momentum_encoder._check_structure()
        return model
