"""Collectives for the distributed contrastive losses.

Design (see contrastive_loss's docstring for why not Inf-CL's ring): each rank all-gathers b (with
gradient) and computes its own rows of a against every column, so every logits tile of the global
matrix is computed exactly once across ranks. The column statistics (log-sum-exp etc., O(N) floats)
are combined with two all-reduces; the gradient of the gathered b is summed back to its owners.
"""
import torch
import torch.distributed as dist


def world(group):
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherRows(torch.autograd.Function):
    """cat of every rank's x along dim 0; backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, group):
        rank, size = world(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.n = group, rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty((ctx.n,) + tuple(grad.shape[1:]), device=grad.device, dtype=grad.dtype)
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        # gloo has no reduce-scatter: all-reduce and slice (CPU tests, small tensors)
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n].clone(), None


def all_gather_rows(x, group, *, with_grad):
    if with_grad and x.requires_grad:
        return _AllGatherRows.apply(x, group)
    with torch.no_grad():
        return _AllGatherRows.forward(_Ctx(), x.detach(), group)


class _Ctx:
    pass


_CHECKED = set()


def check_equal_sizes(n, group, what):
    """All ranks must hold n rows. Checked once per (group, n): the check syncs with the host."""
    key = (id(group), n)
    if key in _CHECKED:
        return
    _, size = world(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=_device_for(group)) for _ in range(size)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=_device_for(group)), group=group)
    sizes = [int(s.item()) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"{what}: every rank must hold the same number of rows, got {sizes}")
    _CHECKED.add(key)


def _device_for(group):
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def combine_column_stats(colstats, group):
    """Merge per-rank column statistics [lse, sum, teacher lse, teacher-weighted mean] in place, with
    three all-reduces of O(N) floats."""
    lse, csum, tlse, w = colstats
    m = torch.stack([lse, tlse])
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([torch.exp(lse - m[0]), csum, torch.exp(tlse - m[1])])
    dist.all_reduce(sums, group=group)
    tl_global = m[1] + torch.log(sums[2])
    wt = torch.exp(tlse - tl_global) * w
    dist.all_reduce(wt, group=group)
    colstats[0] = m[0] + torch.log(sums[0])
    colstats[1] = sums[1]
    colstats[2] = tl_global
    colstats[3] = wt
    return colstats


def all_reduce_sum(x, group):
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x
