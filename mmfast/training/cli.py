"""`python -m mmfast train` arguments."""
import argparse
import sys


def parser():
    from .tasks import TASKS

    p = argparse.ArgumentParser(
        prog="python -m mmfast train",
        description="Train a model on synthetic data (random images / tokens) or on --data, in one process or "
        "under torchrun (e.g. torchrun --nproc-per-node 2 -m mmfast train moco --parallel fsdp).")
    p.add_argument("model", choices=list(TASKS), help="; ".join(
        f"{name}: presets {', '.join(t.presets)}" + (f" ({t.notes})" if t.notes else "") for name, t in TASKS.items()))
    p.add_argument("--stage", default=None, help="bridge models: which parts train (the rest frozen: no gradient, "
                   "not updated); " + "; ".join(
                       f"{name}: " + ", ".join(f"{s}{' (default)' if i == 0 else ''} = {h}"
                                               for i, (s, h) in enumerate(t.stages.items()))
                       for name, t in TASKS.items() if t.stages))
    p.add_argument("--preset", default="tiny", help="model size preset (default tiny)")
    p.add_argument("--steps", type=int, default=10, help="optimiser steps (default 10)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per process per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default=None,
                   help="default: ddp under torchrun with several processes, else none")
    p.add_argument("--backend", default="auto", help="kernel backend passed to the model (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="a torch.save'd dict of tensors to sample batches from "
                   "(moco: {'images': (N, 3, H, W)}); default: synthetic")
    p.add_argument("--plot", default=None, help="PNG path for the loss curve (default mmfast-train-MODEL.png)")
    p.add_argument("--no-plot", action="store_true", help="write no loss plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    import torch

    from .loop import train

    data = torch.load(args.data, weights_only=True) if args.data else None
    plot = None if args.no_plot else (args.plot or f"mmfast-train-{args.model}.png")
    try:
        train(args.model, preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
              parallel=args.parallel, backend=args.backend, seed=args.seed, data=data,
              progress=not args.no_progress, plot=plot, stage=args.stage)
    except (ValueError, RuntimeError) as exc:
        print(f"python -m mmfast train: {exc}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
