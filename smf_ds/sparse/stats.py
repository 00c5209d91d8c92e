"""This optimizer step's reads and row gradients of a value table, complete over ranks.

After the last micro-batch, each process needs, for the rows (and columns) it updates, the counts
and gradients summed over every micro-batch and every data-parallel rank:
- local, one process: the sink already holds them;
- row-sharded: owners received every rank's reads of their rows (with counts), and the gradient
  of every token that read them: their sinks are complete for the rows they own;
- column-sharded: indices were all-gathered, so every rank's counts are global, and its sink holds
  its slice's gradient for every token of the group;
- replicated (local tables on several ranks): each copy saw only its rank's tokens, so counts are
  all-gathered and summed, and the selected rows' gradients all-reduced.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..memory.values import ValueTable, coalesce_rows
from ..parallel.comm import all_gather_v, all_reduce_sum


def _sum_over_replicas(group, rows: torch.Tensor, values: torch.Tensor):
    world = dist.get_world_size(group)
    sizes = all_gather_v(torch.tensor([rows.numel()], device=rows.device), [1] * world, group).tolist()
    all_rows = all_gather_v(rows, sizes, group)
    all_values = all_gather_v(values.contiguous(), sizes, group)
    return coalesce_rows(all_rows, all_values)


def sum_over_replicas(group, rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every replica's (rows, values) with the values of equal rows summed: (sorted unique rows, sums)."""
    return _sum_over_replicas(group, rows, values)


def step_access(table: ValueTable) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows sorted, read counts) of this step, global, for the rows this process holds."""
    rows, counts = table.sink.coalesced_access(device=table.local_weight.device)
    if table.replica_group is not None:
        rows, counts = _sum_over_replicas(table.replica_group, rows, counts)
    return rows, counts


def step_grad(table: ValueTable, rows_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rows of rows_S this process holds, their gradient this step, summed over micro-batches
    and ranks). rows_S: global, sorted, unique, the same on every rank of the table's groups.

    Only these rows' gradients are formed (from the reads the sink recorded), so the cost is
    O(reads + S x D) whatever the table's size; the replicas' partial sums travel as S x D.
    """
    start, stop = table.owned_row_range()
    mine = rows_S[(rows_S >= start) & (rows_S < stop)]
    weight = table.local_weight
    grad = table.sink.row_grad(mine, weight.shape[1], dtype=weight.dtype, device=weight.device)
    if table.replica_group is not None:
        all_reduce_sum(grad, table.replica_group)
    return mine, grad


# The helpers below take values on any device (counts kept on the CPU, say) and return them there;
# the collective runs on the table's device, which is where the group's backend takes tensors.

def _summed(value: torch.Tensor, table: ValueTable, group) -> torch.Tensor:
    if group is None:
        return value
    on_table = value.to(table.local_weight.device, copy=True)
    dist.all_reduce(on_table, group=group)
    return on_table.to(value.device)


def sum_over_row_owners(table: ValueTable, value: torch.Tensor) -> torch.Tensor:
    """Sum a per-process partial over rows (e.g. a count total) into the whole table's value."""
    return _summed(value, table, table.row_group)


def sum_over_shards(table: ValueTable, value: torch.Tensor) -> torch.Tensor:
    """Sum a partial over this process's part of the weights (rows or columns) over all parts."""
    return _summed(value, table, table.row_group if table.row_group is not None else table.col_group)


def gather_over_row_owners(table: ValueTable, values: torch.Tensor) -> torch.Tensor:
    """Concatenate every row owner's `values` (variable lengths) in rank order; identity otherwise."""
    if table.row_group is None:
        return values
    group, device = table.row_group, table.local_weight.device
    world = dist.get_world_size(group)
    sizes = all_gather_v(torch.tensor([values.shape[0]], device=device), [1] * world, group).tolist()
    return all_gather_v(values.to(device).contiguous(), sizes, group).to(values.device)
