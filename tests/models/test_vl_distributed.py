"""ALBEF / BLIP with a process group (gloo, 2 CPU processes), as their official ``_dequeue_and_enqueue``:
every rank's momentum features go into the queues in rank order, so after each step the queues equal
those of one process on the concatenated batch; each rank's ITC is its own batch against those queues.
Also the training loop's step per model under DDP and FSDP2, whose losses and EMA copies must agree."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import free_port
from numerics import generator

from mmfast.models.albef import ALBEF
from mmfast.models.blip import BLIP
from mmfast.training.distributed import average_replicated_grads, full_tensor, wrap
from mmfast.training.loop import build, make_batch

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in this torch")

WORLD, LOCAL, STEPS = 2, 2, 2  # the tiny presets' queues hold 8 = STEPS * WORLD * LOCAL features
KINDS = {"albef": ALBEF, "blip": BLIP}


def _model(kind, state, group=None):
    model = KINDS[kind].from_preset("tiny", backend="reference", group=group)
    model.load_state_dict(state[kind])
    return model.double()  # float64: per-rank and whole-batch features agree to rounding, so checks can be tight


def _step(model, batch, rows, step):
    out = model(batch["images"][rows].double(), batch["ids"][rows], batch["mask"][rows],
                generator=torch.Generator().manual_seed(step))
    return out.loss_itc.detach()


def _queues(model):
    return model.image_queue.queue.clone(), model.text_queue.queue.clone(), model.image_queue.ptr.clone()


def _run(kind, state, batch, rows, group=None):
    model = _model(kind, state, group)
    losses, queues = [], []
    for step in range(STEPS):
        losses.append(_step(model, batch, rows, step))
        queues.append(_queues(model))
    return losses, queues


def _step_and_ema(kind, parallel, rank):
    """The training loop's steps under `parallel` (its task, wrapping and group): the first step's loss and
    the EMA copy after two SGD steps (lr 0.5: the EMA moves visibly; the first update is a no-op, the EMA
    starting as a copy of the online weights)."""
    task, model = build(kind, backend="reference")
    task.set_group(model, dist.group.WORLD)
    model = wrap(model, parallel, torch.device("cpu"), task.shard_units(model),
                 ema_updated_outside_forward=task.ema_updated_outside_forward)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for step in range(2):
        opt.zero_grad()
        losses.append(task.loss(model, make_batch(task, "tiny", LOCAL, rank, WORLD, step, 0), step, 2))
        losses[-1].backward()
        average_replicated_grads(model)
        opt.step()
    ema = getattr(model, "module", model).momentum_model.ema
    return losses[0].detach(), [full_tensor(p.detach()) for p in ema.parameters()]


def _worker(rank, port, state, batch, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {kind: _run(kind, state, batch, rows) for kind in KINDS}  # group=None: the default group
        results["local"] = _run("albef", state, batch, rows, group="local")[1][0]
        # the training step under DDP and FSDP2; seed 0 leaves rank 1's first ALBEF batch without an MLM token,
        # whose loss was NaN
        results["train"] = {(kind, p): _step_and_ema(kind, p, rank) for kind in KINDS for p in ("ddp", "fsdp")}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _batch(n):
    ids = torch.randint(5, 60, (n, 7), generator=generator())
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS] ... [SEP] of the tiny presets
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"ids": ids, "mask": mask, "images": torch.randn(n, 3, 16, 16, generator=generator())}


@pytest.mark.slow
def test_two_processes_fill_the_queues_as_one(tmp_path):
    torch.manual_seed(generator().initial_seed())
    state = {kind: cls.from_preset("tiny", backend="reference").state_dict() for kind, cls in KINDS.items()}
    batch = _batch(WORLD * LOCAL)
    mp.spawn(_worker, args=(free_port(), state, batch, str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for kind in KINDS:
        single = _model(kind, state)
        for step in range(STEPS):
            before = copy.deepcopy(single)  # the state every rank starts this step from
            _step(single, batch, slice(None), step)
            want = _queues(single)
            for r in range(WORLD):
                for got, ref in zip(per_rank[r][kind][1][step], want):
                    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{kind} queue: {m}")
                # the rank's ITC: its own rows against the queues the whole batch left
                rows = slice(r * LOCAL, (r + 1) * LOCAL)
                before.set_group("local")
                ref_loss = _step(copy.deepcopy(before), batch, rows, step)
                torch.testing.assert_close(per_rank[r][kind][0][step], ref_loss, rtol=1e-10, atol=1e-12)
    for r in range(WORLD):
        assert int(per_rank[r]["local"][2]) == LOCAL  # group="local": each rank keeps its own features only
        for kind in KINDS:  # FSDP2 (EMA updated on the shards before forward) steps as DDP does
            (ddp_loss, ddp), (fsdp_loss, fsdp) = (per_rank[r]["train"][kind, p] for p in ("ddp", "fsdp"))
            assert torch.isfinite(ddp_loss), f"rank {r} {kind}: loss {ddp_loss}"
            torch.testing.assert_close(fsdp_loss, ddp_loss, rtol=1e-5, atol=1e-6, msg=f"rank {r} {kind} fsdp loss")
            assert len(ddp) == len(fsdp) > 10
            for i, (a, b) in enumerate(zip(fsdp, ddp)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{kind} fsdp EMA {i}: {m}")
