"""Collectives for the distributed contrastive losses.

Design (see contrastive_loss's docstring for why not Inf-CL's ring): each rank all-gathers b (with
gradient) and computes its own rows of a against every column, so every logits tile of the global
matrix is computed exactly once across ranks. The column statistics (max and log-sum of exp etc., O(N)
values) are combined with two or three all-reduces; the gradient of the gathered b is summed back to its owners.
The custom ops take the group by name (their schema has no process-group type): :func:`group_by_name`.
"""
import torch
import torch.distributed as dist

from ._kernels import COL


def world(group):
    return dist.get_rank(group), dist.get_world_size(group)


def group_by_name(name):
    """The process group of ``group.group_name`` (what torch's functional collectives resolve names with)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


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
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def combine_column_stats(colstats, group):
    """Merge the ranks' column statistics (``_kernels.COL_STATS``: max and log of the sum of exp, sum, and with
    a teacher its max and log-sum and the teacher-weighted mean) in place, with two all-reduces of O(N) values
    (three with a teacher). Max and log-sum stay apart, as on one GPU: each rank's sum is rescaled to the
    global max, exp((max_r − max) + log_sum_r), where max_r − max is exact when the term matters."""
    teacher = colstats.shape[0] == len(COL)
    maxima = [COL["max"], COL["t_max"]] if teacher else [COL["max"]]
    m = colstats[maxima].clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    terms = [torch.exp((colstats[COL["max"]] - m[0]) + colstats[COL["log_sum"]]), colstats[COL["sum"]]]
    if teacher:
        terms.append(torch.exp((colstats[COL["t_max"]] - m[1]) + colstats[COL["t_log_sum"]]))
    terms = torch.stack(terms)
    dist.all_reduce(terms, group=group)
    colstats[COL["max"]], colstats[COL["log_sum"]], colstats[COL["sum"]] = m[0], torch.log(terms[0]), terms[1]
    if teacher:
        t_log_sum = torch.log(terms[2])
        # the teacher-weighted means, weighted by each rank's share of the teacher's global sum of exp
        share = torch.exp((colstats[COL["t_max"]] - m[1]) + (colstats[COL["t_log_sum"]] - t_log_sum))
        means = share * colstats[COL["t_mean"]]
        dist.all_reduce(means, group=group)
        colstats[COL["t_max"]], colstats[COL["t_log_sum"]], colstats[COL["t_mean"]] = m[1], t_log_sum, means
    return colstats


def all_reduce_sum(x, group):
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x
