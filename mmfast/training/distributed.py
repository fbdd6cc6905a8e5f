"""Process-group setup (torchrun's environment) and the DDP / FSDP2 wrappers the training loop uses."""
import os

import torch
import torch.distributed as dist


def launched_world():
    """WORLD_SIZE from torchrun's environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env():
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) if launched by it; returns (rank, world, device)."""
    world = launched_world()
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def wrap(model, parallel, device, units=(), *, ema_updated_outside_forward=False):
    """`model` for `parallel`: "none" (as is), "ddp" (DistributedDataParallel) or "fsdp" (FSDP2: ``fully_shard``
    on each of `units`, then on the root, over a 1-D mesh of every rank). ema_updated_outside_forward: the
    caller runs every MomentumEncoder's update outside forward (all parameters shards then), so an EMA copy
    may stay in the root unit."""
    if parallel == "none":
        return model
    if not dist.is_initialized():
        raise ValueError(f"parallel={parallel!r} needs torch.distributed initialised (launch with torchrun)")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from mmfast.nn import MomentumEncoder

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for unit in units:
            fully_shard(unit, mesh=mesh)
        # an EMA copy inside its online model's unit would be updated in the unsharded (gathered) tensors,
        # which FSDP frees without writing back: the update would be lost silently
        for name, m in model.named_modules():
            if (isinstance(m, MomentumEncoder) and not ema_updated_outside_forward
                    and not any(m.ema is u for u in units)):
                raise ValueError(f"parallel='fsdp': the MomentumEncoder {name!r} needs its .ema among the units "
                                 "sharded before the root (TrainTask.shard_units)")
        # fully_shard refuses 0-dim parameters (CLIP's logit_scale): they stay replicated, their gradients
        # averaged by average_replicated_grads after each backward, as DDP would
        scalars = [p for p in model.parameters() if p.dim() == 0 and not hasattr(p, "to_local")]
        model = fully_shard(model, mesh=mesh, ignored_params=set(scalars) or None)
        model._mmfast_replicated = scalars
        return model
    raise ValueError(f"parallel must be 'none', 'ddp' or 'fsdp', got {parallel!r}")


def rank_rows(n_local, rank):
    """This rank's rows of a global batch of n_local * world rows."""
    return slice(rank * n_local, (rank + 1) * n_local)


def full_tensor(t):
    """A DTensor's full value (FSDP2 shards), a plain tensor unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def average_replicated_grads(model):
    """Average over the ranks the gradients of the parameters FSDP2 left replicated (see wrap)."""
    params = [p for p in getattr(model, "_mmfast_replicated", ()) if p.grad is not None]
    if params:
        grads = torch.stack([p.grad.reshape(()) for p in params])
        dist.all_reduce(grads)
        for p, g in zip(params, grads / dist.get_world_size()):
            p.grad.copy_(g)
