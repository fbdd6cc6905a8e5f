"""ContrastiveLoss (holds the learnable temperature) and MoCoQueue (a FIFO of negatives)."""
import math

import torch
from torch import nn

from mmfast.kernels import contrastive_loss, siglip_loss
from mmfast.kernels._common import check_bool, check_choice, check_int, check_scalar
from mmfast.kernels._registry import accelerated_backends


class ContrastiveLoss(nn.Module):
    """CLIP / ALBEF / BLIP / BLIP-2 InfoNCE or SigLIP's sigmoid loss with a learnable temperature.

    Holds ``logit_scale`` (the log of the multiplier, as CLIP: init log(1/0.07); SigLIP: log 10) and,
    for ``kind="siglip"``, ``logit_bias`` (init -10). ``forward(a, b, a_teacher=None, b_teacher=None,
    num_pairs=None)`` calls :func:`mmfast.kernels.contrastive_loss` (or ``siglip_loss``); see there for
    shapes and math. The multiplier is exp(logit_scale) clamped at ``max_scale`` (100, as open_clip).

    Args:
        kind: "clip" (softmax cross-entropy, all its variants) or "siglip".
        init_logit_scale: initial log multiplier (default log(1/0.07) for "clip", log(10) for "siglip").
        init_logit_bias: SigLIP's initial bias (-10).
        learnable: whether the temperature (and bias) are trained.
        normalize, label_smoothing, symmetric, alpha, max_scale, group, backend: forwarded to the op.

    Every argument is validated here (ValueError naming it), as the op would at the first call.
    """

    def __init__(self, kind="clip", *, init_logit_scale=None, init_logit_bias=-10.0, learnable=True, normalize=True,
                 label_smoothing=0.0, symmetric=True, alpha=0.0, max_scale=100.0, group=None, backend="auto"):
        super().__init__()
        name = "ContrastiveLoss"
        check_choice(name, "kind", kind, ("clip", "siglip"))
        if init_logit_scale is None:
            init_logit_scale = math.log(1 / 0.07) if kind == "clip" else math.log(10.0)
        check_scalar(name, "init_logit_scale", init_logit_scale)
        check_scalar(name, "init_logit_bias", init_logit_bias)
        for flag, value in (("learnable", learnable), ("normalize", normalize), ("symmetric", symmetric)):
            check_bool(name, flag, value)
        check_scalar(name, "label_smoothing", label_smoothing, lo=0.0, hi=1.0, hi_open=True)
        check_scalar(name, "alpha", alpha, lo=0.0, hi=1.0)
        if max_scale is not None:
            check_scalar(name, "max_scale", max_scale, lo=0.0, lo_open=True)
        check_choice(name, "backend", backend, ("auto", "reference") + accelerated_backends("contrastive_loss"))
        if kind == "siglip" and (label_smoothing or alpha):
            raise ValueError(f"{name}: kind='siglip' takes no label_smoothing or alpha, got {label_smoothing}, {alpha}")
        self.kind = kind
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learnable)
        if kind == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)), requires_grad=learnable)
        else:
            self.register_parameter("logit_bias", None)
        self.normalize, self.label_smoothing, self.symmetric = normalize, label_smoothing, symmetric
        self.alpha, self.max_scale, self.group, self.backend = alpha, max_scale, group, backend

    def forward(self, a, b, a_teacher=None, b_teacher=None, num_pairs=None):
        if self.kind == "siglip":
            if a_teacher is not None or num_pairs is not None:
                raise ValueError("kind='siglip' takes no teachers and no num_pairs")
            return siglip_loss(a, b, self.logit_scale, self.logit_bias, normalize=self.normalize,
                               max_scale=self.max_scale, group=self.group, backend=self.backend)
        return contrastive_loss(a, b, self.logit_scale, normalize=self.normalize, label_smoothing=self.label_smoothing,
                                symmetric=self.symmetric, num_pairs=num_pairs, a_teacher=a_teacher,
                                b_teacher=b_teacher, alpha=self.alpha if a_teacher is not None else 0.0,
                                max_scale=self.max_scale, group=self.group, backend=self.backend)

    def extra_repr(self):
        return (f"kind={self.kind!r}, scale={math.exp(self.logit_scale.item()):.3g}, normalize={self.normalize}, "
                f"label_smoothing={self.label_smoothing}, symmetric={self.symmetric}, alpha={self.alpha}")


class MoCoQueue(nn.Module):
    """A FIFO queue of `size` feature vectors (MoCo's negatives, ALBEF's momentum-feature queues).

    Buffers (saved in the state_dict): ``queue`` (size, dim), initialised to random unit vectors as
    MoCo does, and ``ptr`` (the next slot). ``enqueue(keys)`` overwrites the oldest entries with `keys`
    (no gradient; wraps around; with a process group the keys of every rank are gathered first, as
    MoCo's ``_dequeue_and_enqueue``). ``with_keys(keys)`` returns ``cat(keys, queue)``, the ``b`` of
    :func:`contrastive_loss` (rows past the keys are the negatives) — call it before ``enqueue``.
    """

    def __init__(self, dim, size, *, dtype=torch.float32, device=None, group=None):
        super().__init__()
        check_int("MoCoQueue", "dim", dim, lo=1)
        check_int("MoCoQueue", "size", size, lo=1)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"MoCoQueue: dtype must be a floating torch dtype, got {dtype!r}")
        queue = nn.functional.normalize(torch.randn(size, dim, device=device, dtype=torch.float32), dim=1)
        self.register_buffer("queue", queue.to(dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.group = group

    @property
    def size(self):
        return self.queue.shape[0]

    def with_keys(self, keys):
        """cat(keys, queue) as one (B + size, dim) tensor; the queue part carries no gradient."""
        self._check(keys)
        return torch.cat([keys, self.queue.detach().to(keys.dtype)], dim=0)

    @torch.no_grad()
    def enqueue(self, keys):
        """Replace the oldest entries with `keys` (B, dim); B may exceed the queue (the newest are kept)."""
        self._check(keys)
        keys = keys.detach()
        if self.group is not None:
            import torch.distributed as dist

            parts = [torch.empty_like(keys) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, keys.contiguous(), group=self.group)
            keys = torch.cat(parts)
        keys = keys[-self.size :]
        n = keys.shape[0]
        # the pointer stays on the queue's device: no host sync per step
        slots = (self.ptr + torch.arange(n, device=self.queue.device)) % self.size
        self.queue.index_copy_(0, slots, keys.to(self.queue.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)

    def _check(self, keys):
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != self.queue.shape[1]:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys must have shape (B, {self.queue.shape[1]}), got {shape}")
        if not keys.is_floating_point():
            raise ValueError(f"keys must be a floating tensor (features), got {keys.dtype}")
        if keys.device != self.queue.device:
            raise ValueError(f"keys are on {keys.device} but the queue is on {self.queue.device}")

    def extra_repr(self):
        return f"size={self.size}, dim={self.queue.shape[1]}, dtype={self.queue.dtype}"
