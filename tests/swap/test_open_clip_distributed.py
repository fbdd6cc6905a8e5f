"""open_clip's distributed ClipLoss (local_loss, gather_with_grad) and SigLipLoss (bidir, gather) patched, on 2 gloo
CPU processes: each rank's feature gradients equal open_clip's, and the value is the global batch's loss, the
mean of open_clip's per-rank values (the convention documented in mmfast.swap.open_clip.TABLE)."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in this torch")]

WORLD, LOCAL = 2, 3
LOSSES = ("clip", "siglip-bidir", "siglip-gather")


def _make(name, rank):
    from open_clip.loss import ClipLoss, SigLipLoss

    if name == "clip":
        return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
    return SigLipLoss(rank=rank, world_size=WORLD, dist_impl=name.split("-")[1])


def _worker(rank, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        import mmfast

        g = torch.Generator().manual_seed(0)
        feats = [torch.nn.functional.normalize(torch.randn(WORLD * LOCAL, 8, generator=g, dtype=torch.float64), dim=-1)
                 for _ in range(2)]
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        out = {}
        for name in LOSSES:
            runs = []
            for patched in (False, True):
                loss = _make(name, rank)
                if patched:
                    assert mmfast.patch(loss, backend="reference").swapped
                a, b = (f[rows].clone().requires_grad_() for f in feats)
                extra = () if name == "clip" else (torch.tensor(-2.0, dtype=torch.float64),)
                value = loss(a, b, torch.tensor(5.0, dtype=torch.float64), *extra)
                value.backward()
                runs.append((value.detach(), a.grad, b.grad))
            mean = runs[0][0].clone()
            dist.all_reduce(mean)
            out[name] = (runs[1][0].item(), mean.item() / WORLD,
                         max((x - y).abs().max().item() for x, y in zip(runs[1][1:], runs[0][1:])))
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_distributed_losses_match_open_clip():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(port, queue), nprocs=WORLD, start_method="spawn")
    results = dict(queue.get() for _ in range(WORLD))
    for rank, out in results.items():
        for name, (value, mean_value, grad_err) in out.items():
            assert abs(value - mean_value) <= 1e-12, (rank, name, value, mean_value)
            assert grad_err <= 1e-12, (rank, name, grad_err)
