"""Collectives with the gradients the parallel plans need, on `torch.distributed` process groups.

One convention holds everywhere: every rank computes the same (global) loss, and the gradient a rank
holds for an activation is the full gradient of its own copy or shard. Hence, per operation:

  forward (what the values do)               backward (what the gradients do)
  gather:     shards -> whole (all-gather)    consumers replicated: take the own shard
                                              consumers partial (e.g. a column-parallel matmul): reduce-scatter
  split:      whole -> own shard              all-gather
  reduce_scatter: partial sums -> own shard   all-gather
  all_reduce: partial sums -> whole           identity
  grad_all_reduce: identity                   all-reduce (a replicated tensor used by rank-local work)
  all_to_all: rows to their ranks             the rows back the same way

Shards are taken along one dim with explicit `sizes` (one per rank, uneven allowed; `split_sizes` gives
torch.tensor_split's sizes). A `group` of None or of one process makes every function the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# torch 2.13 renamed the single-tensor collectives; older releases only have the old names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of `torch.tensor_split(x, parts)`: the first `total % parts` pieces get one more."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def gather_sizes(n: int, group) -> list[int]:
    """Every rank's `n` (an int), in rank order."""
    if group_size(group) == 1:
        return [n]
    t = torch.tensor([n], dtype=torch.int64, device=collective_device(group))
    out = torch.empty(group_size(group), dtype=torch.int64, device=t.device)
    _all_gather_single(out, t, group=group)
    return out.tolist()


def collective_device(group=None) -> torch.device:
    """Where tensors for `group`'s collectives live: this rank's GPU under nccl, else the CPU."""
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))


def all_gather_raw(x: torch.Tensor, dim: int, sizes: list[int], group) -> torch.Tensor:
    """The ranks' shards (rank i's has sizes[i] along `dim`) concatenated along `dim`. No autograd."""
    if group_size(group) == 1:
        return x
    m = max(sizes)
    rows = _pad_rows(x.movedim(dim, 0), m).contiguous()
    out = rows.new_empty((len(sizes) * m, *rows.shape[1:]))
    _all_gather_single(out, rows, group=group)
    if any(s != m for s in sizes):
        out = torch.cat([out[i * m : i * m + s] for i, s in enumerate(sizes)])
    return out.movedim(0, dim).contiguous()


def reduce_scatter_raw(x: torch.Tensor, dim: int, sizes: list[int], group) -> torch.Tensor:
    """Sum x over the ranks and keep this rank's piece (sizes[rank] along `dim`). No autograd."""
    if group_size(group) == 1:
        return x
    m = max(sizes)
    rows = x.movedim(dim, 0)
    if any(s != m for s in sizes):
        rows = torch.cat([_pad_rows(p, m) for p in rows.split(sizes)])
    rows = rows.contiguous()
    out = rows.new_empty((m, *rows.shape[1:]))
    _reduce_scatter_single(out, rows, group=group)
    return out[: sizes[group_rank(group)]].movedim(0, dim).contiguous()


def _own(x: torch.Tensor, dim: int, sizes: list[int], group) -> torch.Tensor:
    start = sum(sizes[: group_rank(group)])
    return x.narrow(dim, start, sizes[group_rank(group)]).contiguous()


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, group, partial_consumers):
        ctx.args = dim, sizes, group, partial_consumers
        return all_gather_raw(x, dim, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, group, partial = ctx.args
        grad = reduce_scatter_raw(grad, dim, sizes, group) if partial else _own(grad, dim, sizes, group)
        return grad, None, None, None, None


class _ToShard(torch.autograd.Function):
    """Forward: this rank's piece along `dim`, of a replicated tensor (`_own`) or of partial sums' total
    (`reduce_scatter_raw`); either way the backward all-gathers the pieces' gradients."""

    @staticmethod
    def forward(ctx, x, dim, sizes, group, piece):
        ctx.args = dim, sizes, group
        return piece(x, dim, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, group = ctx.args
        return all_gather_raw(grad.contiguous(), dim, sizes, group), None, None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GradAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.args = out_splits, in_splits, group
        return all_to_all_raw(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group = ctx.args
        return all_to_all_raw(grad.contiguous(), in_splits, out_splits, group), None, None, None


def all_to_all_raw(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows x[sum(in_splits[:j]) : ...] go to rank j; the result holds out_splits[j] rows from rank j."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def gather(x, dim, sizes, group, partial_consumers=False):
    """All-gather shards along `dim`. Backward: own shard of the gradient, or its reduce-scatter when
    each rank uses the whole only partially (`partial_consumers`, e.g. in a column-parallel matmul)."""
    if group_size(group) == 1:
        return x
    return _Gather.apply(x, dim, sizes, group, partial_consumers)


def split(x, dim, sizes, group):
    """This rank's piece of a replicated tensor along `dim`; backward all-gathers."""
    if group_size(group) == 1:
        return x
    return _ToShard.apply(x, dim, sizes, group, _own)


def reduce_scatter(x, dim, sizes, group):
    """Partial sums -> this rank's piece of their total along `dim`; backward all-gathers."""
    if group_size(group) == 1:
        return x
    return _ToShard.apply(x, dim, sizes, group, reduce_scatter_raw)


def all_reduce(x, group):
    """Partial sums -> their total on every rank (the consumers are replicated: backward is the identity)."""
    if group_size(group) == 1:
        return x
    return _AllReduce.apply(x, group)


def grad_all_reduce(x, group):
    """Identity; backward sums the gradient over the group (a replicated tensor each rank uses on its
    own share of the work: tokens, heads or channels)."""
    if group_size(group) == 1:
        return x
    return _GradAllReduce.apply(x, group)


def all_to_all(x, out_splits, in_splits, group):
    """Uneven all-to-all of rows (see `all_to_all_raw`); backward sends the gradients back."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, out_splits, in_splits, group)


def all_reduce_max_(x: torch.Tensor, group) -> torch.Tensor:
    """In-place max over the group (no autograd: used for constants such as a softmax shift)."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x
