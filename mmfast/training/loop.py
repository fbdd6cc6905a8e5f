"""The training loop: one process or many (torchrun + DDP / FSDP2), a progress bar and a loss plot."""
import math
import time

import torch

from .distributed import average_replicated_grads, init_from_env, rank_rows, wrap
from .tasks import get_task


def make_batch(task, preset, n_local, rank, world, step, seed, data=None, device="cpu", model=None):
    """This rank's rows of the global batch of `step` (every rank draws the same global batch); a tuple of
    tensors, or a dict of keyword tensors (bridge models, whose batch is drawn for the unwrapped `model`)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    batch = task.batch(preset, n_local * world, gen, data, model=model)
    rows = rank_rows(n_local, rank)
    if isinstance(batch, dict):
        return {k: t[rows].to(device) for k, t in batch.items()}
    return tuple(t[rows].to(device) for t in batch)


def build(task_name, preset="tiny", *, backend="auto", seed=0, device="cpu", stage=None):
    """(task, model): the model of `preset` on `device`; bridge models frozen for `stage` (None: the default)."""
    task = get_task(task_name)
    if preset not in task.presets:
        raise ValueError(f"train {task_name}: preset must be one of {task.presets}, got {preset!r}")
    stage = task.stage(stage)
    torch.manual_seed(seed)  # every rank builds the same initial weights
    model = task.build(preset, backend) if task.stages is None else task.build(preset, backend, stage)
    return task, model.to(device)


def optimizer(model, lr):
    """AdamW over the trainable parameters only: frozen ones (requires_grad=False) get no gradient, no
    optimiser state, and are never updated (weight decay 0, so no step touches them either)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def train(task_name, *, preset="tiny", steps=10, batch_size=8, lr=1e-3, parallel=None, backend="auto", seed=0,
          data=None, progress=True, plot=None, log=print, stage=None):
    """Train `task_name` for `steps` steps; returns the list of losses (the global batch's, on every rank).

    parallel: None (DDP when launched by torchrun with several processes, else "none"), "none", "ddp" or
    "fsdp". batch_size is per rank. data: None (synthetic) or a dict of tensors (see ``tasks``). plot: a
    PNG path for the loss curve (rank 0; skipped with a note when matplotlib is missing). stage: the bridge
    models' training stage (``TASKS[name].stages``; None: the first, the paper's bridge stage).
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"train: {name} must be a positive int, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"train: lr must be a positive number, got {lr!r}")
    rank, world, device = init_from_env()
    parallel = parallel or ("ddp" if world > 1 else "none")
    if parallel not in ("none", "ddp", "fsdp"):
        raise ValueError(f"train: parallel must be 'none', 'ddp' or 'fsdp', got {parallel!r}")
    task = get_task(task_name)
    modes = task.parallel_modes(task.stage(stage))
    if parallel not in modes:
        why = f" ({task.serial_reason})" if task.serial_reason else ""
        raise ValueError(f"train {task_name}: parallel must be one of {modes} for this model"
                         f"{'' if modes == task.parallel else ' at this stage'}, got {parallel!r}{why}")
    task, model = build(task_name, preset, backend=backend, seed=seed, device=device, stage=stage)
    inner = model
    if parallel != "none":
        import torch.distributed as dist

        task.set_group(model, dist.group.WORLD)
    model = wrap(model, parallel, device, task.shard_units(model),
                 ema_updated_outside_forward=task.ema_updated_outside_forward)
    opt = optimizer(model, lr)
    losses = []
    what = preset if task.stages is None else f"{preset}, stage {task.stage(stage)}"
    bar = _progress(progress and rank == 0, f"{task_name} ({what}, {world} x {parallel})", steps)
    start = time.perf_counter()
    try:
        for step in range(steps):
            batch = make_batch(task, preset, batch_size, rank, world, step, seed, data, device, model=inner)
            loss = task.loss(model, batch, step, steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_replicated_grads(model)
            opt.step()
            losses.append(_reported(loss, task, world))
            bar.advance(losses[-1])
    finally:
        bar.close()
    if rank == 0:
        rate = steps * batch_size * world / (time.perf_counter() - start)
        log(f"train {task_name}: {steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f} ({rate:.1f} samples/s)")
        if plot:
            _plot(losses, plot, f"{task_name} ({what}), {world} process(es), {parallel}", log)
    return losses


def _reported(loss, task, world):
    """The global batch's loss: the sum of the ranks' shares where each rank's loss is its share."""
    value = loss.detach()
    if task.loss_is_rank_share and world > 1:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        value = value / world
    return float(value)


class _NoBar:
    def advance(self, loss):
        pass

    def close(self):
        pass


class _RichBar:
    def __init__(self, title, steps):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
        self.progress.start()
        self.task = self.progress.add_task(title, total=steps, loss="-")

    def advance(self, loss):
        self.progress.update(self.task, advance=1, loss=f"{loss:.4f}")

    def close(self):
        self.progress.stop()


def _progress(enabled, title, steps):
    if not enabled:
        return _NoBar()
    try:
        return _RichBar(title, steps)
    except ImportError:  # rich is a dev dependency: the loop runs without a bar
        return _NoBar()


def _plot(losses, path, title, log):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"train: matplotlib is not installed, no loss plot written to {path}")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker="o" if len(losses) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log(f"train: loss plot written to {path}")
