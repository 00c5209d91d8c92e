"""Differentiable variable-size all-to-all, and a count of the bytes this process sends.

Every exchange of a lookup and of an SMF step's row gradients goes through `all_to_all_v`,
`exchange_counts` or `all_reduce_sum`, so `CommStats` sees all of it; benchmarks read it instead of
guessing from shapes. Not counted: saving (`gather_to_cpu`) and the reductions of read counts and
scalars.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    bytes_sent: int = 0  # to other ranks (what stays on this rank is not sent)
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent = 0
        self.calls = 0


COMM_STATS = CommStats()


def _count(tensor: torch.Tensor, send_splits: list[int], my_rank: int, row_numel: int) -> None:
    sent_rows = sum(s for r, s in enumerate(send_splits) if r != my_rank)
    COMM_STATS.bytes_sent += sent_rows * row_numel * tensor.element_size()
    COMM_STATS.calls += 1


def _all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    _count(x, send_splits, dist.get_rank(group), math.prod(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
    return out


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):  # noqa: D102
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        send_splits, recv_splits = ctx.splits
        # The gradient travels back along the same routes: swap the splits.
        return _all_to_all(grad, recv_splits, send_splits, ctx.group), None, None, None


def all_to_all_v(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Rows send_splits[r] of x (in order) go to rank r; returns the rows received, by source rank.

    Differentiable: the backward sends the gradient rows back with the splits swapped.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllToAllV.apply(x, send_splits, recv_splits, group)
    return _all_to_all(x, send_splits, recv_splits, group)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over the group, counted as a ring all-reduce sends: 2 (W-1)/W of the bytes."""
    world = dist.get_world_size(group)
    COMM_STATS.bytes_sent += 2 * (world - 1) * x.numel() * x.element_size() // world
    COMM_STATS.calls += 1
    dist.all_reduce(x, group=group)
    return x


def exchange_counts(send_counts: torch.Tensor, group=None) -> torch.Tensor:
    """send_counts[r] = how many rows I send to rank r  ->  recv_counts[r] = how many r sends me.
    Rows of several counts (send_counts[r] of shape (k,)) travel together."""
    world = dist.get_world_size(group)
    recv = torch.empty_like(send_counts)
    _count(send_counts, [1] * world, dist.get_rank(group), math.prod(send_counts.shape[1:]))
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv


def all_gather_v(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Concatenate every rank's x (sizes[r] rows from rank r) on every rank; differentiable.

    Built on all_to_all_v (each rank sends its rows to every rank), so the backward is the
    matching reduce: each rank gets back the sum of all ranks' gradients for its own rows.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    copies = x.unsqueeze(0).expand(world, *x.shape).reshape(world * x.shape[0], *x.shape[1:])
    return all_to_all_v(copies, [sizes[rank]] * world, list(sizes), group)


def gather_to_cpu(local: torch.Tensor, out_parts: list[torch.Tensor] | None, group=None, dst: int = 0,
                  chunk_bytes: int = 64 << 20) -> None:
    """Copy every group rank's `local` into out_parts[its group rank] on the CPU of global rank dst.

    out_parts: CPU tensors (or views) shaped like each rank's `local`, on rank dst; None on the
    other ranks. Parts travel by point-to-point in chunks of rows of at most chunk_bytes, so the
    receiving GPU needs only a chunk beyond its own part, and no other rank receives anything
    (saving a table the ranks share is not part of a step: not counted in COMM_STATS).
    """
    me = dist.get_rank()
    for r in range(dist.get_world_size(group)):
        owner = dist.get_global_rank(group, r) if group is not None else r
        if me not in (owner, dst):
            continue
        shape = local.shape if me == owner else out_parts[r].shape
        row_bytes = max(math.prod(shape[1:]) * local.element_size(), 1)
        step = max(chunk_bytes // row_bytes, 1)
        for a in range(0, shape[0], step):
            b = min(a + step, shape[0])
            if me == owner == dst:
                out_parts[r][a:b] = local[a:b].detach().cpu()
            elif me == owner:
                dist.send(local[a:b].detach().contiguous(), dst=dst, group=group)
            else:
                chunk = local.new_empty((b - a, *shape[1:]))
                dist.recv(chunk, src=owner, group=group)
                out_parts[r][a:b] = chunk.cpu()
