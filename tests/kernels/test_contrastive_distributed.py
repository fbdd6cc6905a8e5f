"""Distributed contrastive losses (gloo, 2 and 4 CPU processes) equal the single-process loss over the
global batch; gradients follow DDP's convention (after averaging over ranks they equal the
single-process gradients)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import free_port
from numerics import randn

from mmfast.kernels import interpreting
from mmfast.kernels.contrastive import contrastive_loss, siglip_loss

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in this torch")

LOCAL, D, Q = 5, 24, 3
# name -> (op, options); a_q: BLIP-2 queries; teacher: momentum features for distillation
VARIANTS = {
    "clip-smoothing": (contrastive_loss, dict(normalize=True, label_smoothing=0.1)),
    "moco-rows-only": (contrastive_loss, dict(normalize=True, symmetric=False, log_scale=False)),
    "albef-distill": (contrastive_loss, dict(normalize=True, alpha=0.4)),
    "blip2-max-query": (contrastive_loss, dict(normalize=True)),
    "siglip": (siglip_loss, dict(normalize=True)),
}


def _call(name, x, backend, group=None):
    op, kw = VARIANTS[name]
    a = x["a3"] if name.startswith("blip2") else x["a"]
    if op is siglip_loss:
        return op(a, x["b"], x["t"], x["bias"], group=group, backend=backend, **kw)
    if name.startswith("albef"):
        kw = dict(kw, a_teacher=x["at"], b_teacher=x["bt"])
    return op(a, x["b"], x["t"], group=group, backend=backend, **kw)


def _leaves(tensors, rows=None):
    out = {}
    for k, v in tensors.items():
        v = v[rows] if rows is not None and v.dim() > 0 else v
        out[k] = v.detach().clone().requires_grad_(k in ("a", "a3", "b", "t", "bias"))
    return out


def _variants(backend):
    return [v for v in VARIANTS if not (backend == "gemm" and v.startswith("blip2"))]  # gemm: 2-D features only


def _grads(x):
    return {k: v.grad.clone() for k, v in x.items() if v.grad is not None}


def _worker(rank, world, port, tensors, backends, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        for backend in backends:
            for name in _variants(backend):
                x = _leaves(tensors, rows)
                loss = _call(name, x, backend, group=dist.group.WORLD)
                loss.backward()
                results[(backend, name)] = (loss.detach(), _grads(x))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process(world, tmp_path):
    n = LOCAL * world
    tensors = {"a": randn(n, D), "a3": randn(n, Q, D), "b": randn(n, D), "at": randn(n, D), "bt": randn(n, D),
               "t": torch.tensor(2.3), "bias": torch.tensor(-2.0)}
    # the Triton kernels through the interpreter in the 2-process run (slow), the chunked path and the
    # reference in both (gloo tensors live on the CPU: Triton runs there only through the interpreter)
    backends = ("reference", "chunked") + (("triton", "gemm") if world == 2 and interpreting() else ())
    mp.spawn(_worker, args=(world, free_port(), tensors, backends, str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for backend in backends:
        for name in _variants(backend):
            x = _leaves(tensors)
            want = _call(name, x, backend)
            want.backward()
            want_grads = _grads(x)
            for r in range(world):
                loss, grads = per_rank[r][(backend, name)]
                torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{backend} {name} rank {r} loss: {m}")
            for k, g in want_grads.items():
                if k in ("t", "bias"):  # a replicated parameter: DDP averages the ranks' gradients
                    got = torch.stack([p[(backend, name)][1][k] for p in per_rank]).mean(0)
                else:  # local rows: each rank holds world_size x its share, DDP divides by world_size
                    got = torch.cat([p[(backend, name)][1][k] for p in per_rank]) / world
                torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{backend} {name} d{k} (world {world}): {m}")
