"""Training entry point: ``python -m mmfast train {clip,moco,albef,blip,llava,blip2} --preset tiny --steps N``
(bridge models: ``--stage``, see tasks.py).

Runs in one process or under ``torchrun --nproc-per-node W`` with DDP or FSDP2 (``--parallel ddp|fsdp``;
NCCL on CUDA, gloo on CPU). Files: tasks.py (the registry of trainable models), distributed.py (process
group, DDP / FSDP2 wrapping), loop.py (the loop, progress bar, loss plot), cli.py (arguments).
"""
from .tasks import TASKS, TrainTask, get_task

__all__ = ["TASKS", "TrainTask", "get_task", "train", "main"]


def __getattr__(name):
    # lazy: the registry and the CLI's --help import no torch
    if name == "train":
        from .loop import train
        return train
    raise AttributeError(f"module 'mmfast.training' has no attribute {name!r}")


def main(argv=None):
    from .cli import main as cli_main

    return cli_main(argv)
