"""The bridge models under DDP and FSDP2 (gloo, 2 CPU processes): each rank's loss is its token-weighted share of the
global batch's, so the reported loss and the trainable parameters' gradients equal one process's on the
concatenated batch, although the ranks' rows hold different numbers of targets."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import free_port

from mmfast.training.distributed import full_tensor, wrap
from mmfast.training.loop import _reported, build, make_batch

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in this torch")
WORLD, LOCAL = 2, 2


def _loss_and_grads(name, rank, world, parallel="ddp"):
    """The loop's first step (its batch slicing, DDP wrapping and loss) without the optimiser: the reported
    loss and the trainable parameters' gradients."""
    task, model = build(name, backend="reference", seed=3)
    inner = model
    model = wrap(model, parallel if world > 1 else "none", torch.device("cpu"), task.shard_units(inner))
    batch = make_batch(task, "tiny", LOCAL * (WORLD // world), rank, world, 0, 3, model=inner)
    loss = task.loss(model, batch, 0, 1)
    loss.backward()
    grads = {n: full_tensor(p.grad).clone() for n, p in inner.named_parameters() if p.requires_grad}
    targets = int((batch["labels"][:, 1:] != -100).sum())
    return _reported(loss, task, world), grads, targets


def _worker(rank, port, name, parallel, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(_loss_and_grads(name, rank, WORLD, parallel), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes (~15 s)
@pytest.mark.parametrize("name, parallel", [("llava", "ddp"), ("flamingo", "fsdp")])
def test_two_processes_equal_one_on_the_concatenated_batch(name, parallel, tmp_path):
    mp.spawn(_worker, args=(free_port(), name, parallel, str(tmp_path / "r")), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"r.{r}", weights_only=False) for r in range(WORLD)]
    loss, grads, _ = _loss_and_grads(name, 0, 1)
    counts = [r[2] for r in ranks]
    assert counts[0] != counts[1], "the ranks' target counts should differ for this test"
    for rank_loss, rank_grads, _ in ranks:
        assert rank_loss == pytest.approx(loss, rel=1e-5)
        assert rank_grads.keys() == grads.keys()
        for n in grads:  # DDP / FSDP2 averaged the ranks' gradients: every rank holds the global batch's
            torch.testing.assert_close(rank_grads[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)
