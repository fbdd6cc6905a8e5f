"""CLIP / SigLIP with a process group (gloo, 2 CPU processes): each rank's loss on its half of the batch
is the single-process loss of the whole batch, and the ranks' parameter gradients averaged (as DDP does)
are the single-process gradients."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import free_port
from numerics import generator, randn

from mmfast.models import create_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in this torch")

WORLD, LOCAL = 2, 3
KINDS = ("clip", "siglip")


def _loss(kind, state, batch, rows=slice(None), group=None):
    model = create_model("clip-tiny-test", loss=kind, backend="reference", group=group)
    model.load_state_dict(state[kind])
    model.double()  # float64: the two summation orders agree to ~1e-15, so the comparison can be tight
    out = model(input_ids=batch["ids"][rows], attention_mask=batch["mask"][rows],
                pixel_values=batch["images"][rows].double(), return_loss=True)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, port, state, batch, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {kind: _loss(kind, state, batch, rows, dist.group.WORLD) for kind in KINDS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    torch.manual_seed(generator().initial_seed())
    state = {kind: create_model("clip-tiny-test", loss=kind).state_dict() for kind in KINDS}
    n = WORLD * LOCAL
    ids = torch.randint(3, 90, (n, 8), generator=generator())
    ids[:, 5] = 98
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"ids": ids, "mask": mask, "images": randn(n, 3, 16, 16)}
    mp.spawn(_worker, args=(free_port(), state, batch, str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for kind in KINDS:
        want, want_grads = _loss(kind, state, batch)
        for r in range(WORLD):
            torch.testing.assert_close(per_rank[r][kind][0], want, rtol=1e-10, atol=1e-12)
        for name, g in want_grads.items():
            got = torch.stack([p[kind][1][name] for p in per_rank]).mean(0)
            torch.testing.assert_close(got, g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{kind} d{name}: {m}")
