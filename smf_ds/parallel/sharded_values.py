"""Value tables split over the ranks of a process group.

RowShardedValueTable: each rank holds a contiguous block of rows (uneven blocks allowed). A lookup
sends each read (row id, token, weight) to the row's owner (all-to-all); each owner sums, per
token, the rows it holds (a partial output, N x D per requesting rank) and sends the partials
back (all-to-all), where they are added. The backward sends each token's output gradient to the
owners, whose sinks record it with the reads (row gradients are formed later, for the selected
rows only). Bytes per lookup are O(reads + tokens x D x ranks), independent of the table's
size and of how many distinct rows are read; returning the distinct rows read instead would cost
U x D, and U grows with the table until it nears the number of reads.

ColumnShardedValueTable (Meta's "memory parallel"): each rank holds every row but only a slice of
the value dim. Indices and weights are all-gathered, each rank reads its slice for every token of
the group, and the slices go back to their tokens' ranks (all-to-all); each rank's sink records
the gradient of its slice for every token of the group.

Both are collectives: every rank of the group must call `lookup` (and backward) the same number
of times, which holds in data-parallel training. Shape legend as in memory/values.py.
"""
from __future__ import annotations

import abc

import torch
import torch.distributed as dist

from ..memory.values import ValueTable, read_counts
from .comm import all_gather_v, all_to_all_v, exchange_counts, gather_to_cpu


def even_split(total: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous blocks of `total`, differing by at most one."""
    return [total // parts + (1 if r < total % parts else 0) for r in range(parts)]


def _bounds(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _check_sizes(sizes: list[int], total: int, world: int, what: str) -> list[int]:
    if len(sizes) != world or sum(sizes) != total or min(sizes) < 0:
        raise ValueError(f"{what}: expected {world} non-negative sizes summing to {total}, got {sizes}")
    return list(sizes)


class _ShardedTable(ValueTable):
    def __init__(self, num_rows: int, dim: int, local_weight: torch.Tensor, group) -> None:
        super().__init__()
        self.num_rows, self.dim, self.group = num_rows, dim, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.register_buffer("weight", local_weight, persistent=False)

    def _token_counts(self, n_tokens: int, device) -> list[int]:
        mine = torch.tensor([n_tokens], dtype=torch.long, device=device)
        return all_gather_v(mine, [1] * self.world, self.group).tolist()

    @abc.abstractmethod
    def _part_sizes(self) -> tuple[list[int], int]:
        """(sizes of every rank's part, in rank order; the dimension the table is split along)."""

    def gather_full_weight(self, dst: int = 0, chunk_bytes: int = 64 << 20):
        sizes, dim = self._part_sizes()
        if dst not in dist.get_process_group_ranks(self.group):  # another memory group's replica has it
            return None
        if dist.get_rank() != dst:
            gather_to_cpu(self.weight, None, self.group, dst, chunk_bytes)
            return None
        full = torch.empty(self.num_rows, self.dim, dtype=self.weight.dtype)
        gather_to_cpu(self.weight, list(full.split(sizes, dim=dim)), self.group, dst, chunk_bytes)
        return full


class RowShardedValueTable(_ShardedTable):
    def __init__(self, num_rows: int, dim: int, local_weight: torch.Tensor, row_sizes: list[int], group=None) -> None:
        super().__init__(num_rows, dim, local_weight, group)
        self.row_group = group if group is not None else dist.group.WORLD
        self.row_sizes = _check_sizes(row_sizes, num_rows, self.world, "row_sizes")
        self.row_bounds = _bounds(self.row_sizes)
        self.start, self.stop = self.row_bounds[self.rank], self.row_bounds[self.rank + 1]
        if tuple(local_weight.shape) != (self.stop - self.start, dim):
            raise ValueError(f"row shard {self.rank}: expected local weight {(self.stop - self.start, dim)}, "
                             f"got {tuple(local_weight.shape)}")
        # Upper bounds of every shard but the last: searchsorted maps a row id to its owner. A
        # buffer, so that it moves with the model.
        self.register_buffer("_inner_bounds", torch.tensor(self.row_bounds[1:-1], dtype=torch.long,
                                                           device=local_weight.device), persistent=False)

    @classmethod
    def from_full(cls, full_weight: torch.Tensor, group=None, row_sizes: list[int] | None = None):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = row_sizes or even_split(full_weight.shape[0], world)
        bounds = _bounds(_check_sizes(sizes, full_weight.shape[0], world, "row_sizes"))
        local = full_weight[bounds[rank]:bounds[rank + 1]].clone()
        return cls(full_weight.shape[0], full_weight.shape[1], local, sizes, group)

    def _part_sizes(self):
        return self.row_sizes, 0

    def owned_row_range(self):
        return self.start, self.stop

    def lookup(self, indices_NK, weights_NK, token_mask_N=None):
        n_tokens, per_token = indices_NK.shape
        rows_E = indices_NK.reshape(-1)
        owners_E = torch.searchsorted(self._inner_bounds, rows_E, right=True)
        by_owner = torch.argsort(owners_E, stable=True)  # keeps token order within each owner
        send_counts = torch.bincount(owners_E, minlength=self.world)
        send = send_counts.tolist()
        # One exchange (one host sync) for both: the reads each rank sends me, and its token count.
        got = exchange_counts(torch.stack([send_counts, torch.full_like(send_counts, n_tokens)], dim=1), self.group)
        recv, token_counts = got.t().tolist()
        tokens_E = by_owner // per_token
        counted_E = (torch.ones_like(tokens_E) if token_mask_N is None
                     else token_mask_N.reshape(-1)[tokens_E].long())
        ids = all_to_all_v(torch.stack([rows_E[by_owner], tokens_E, counted_E], dim=1), send, recv, self.group)
        weights = all_to_all_v(weights_NK.reshape(-1)[by_owner], send, recv, self.group)
        my_rows, their_tokens, counted = ids.t().contiguous()
        if self.track_access:
            self.sink.add_access(*read_counts(my_rows[counted.bool()], None))

        # One bag per (requesting rank, token); requesters' tokens are stacked in rank order, and
        # the reads arrive sorted by bag (rank order, then token order), as embedding_bag needs.
        first_bag = torch.tensor([0] + token_counts[:-1], device=rows_E.device).cumsum(0)
        source = torch.repeat_interleave(torch.arange(self.world, device=rows_E.device),
                                         torch.tensor(recv, device=rows_E.device))
        bags = first_bag[source] + their_tokens
        offsets = torch.searchsorted(bags, torch.arange(sum(token_counts), device=bags.device))
        partial_BD = self.bag_lookup(self.weight, my_rows - self.start, weights, offsets,
                                     record_rows_E=my_rows, bags_E=bags)
        partials = all_to_all_v(partial_BD, token_counts, [n_tokens] * self.world, self.group)
        return partials.view(self.world, n_tokens, self.dim).sum(0)

    def full_weight(self):
        with torch.no_grad():
            return all_gather_v(self.weight, self.row_sizes, self.group)

    def load_full_weight(self, weight):
        if tuple(weight.shape) != (self.num_rows, self.dim):
            raise ValueError(f"value table: expected a {(self.num_rows, self.dim)} table, got {tuple(weight.shape)}")
        self.weight.copy_(weight[self.start:self.stop])


class ColumnShardedValueTable(_ShardedTable):
    def __init__(self, num_rows: int, dim: int, local_weight: torch.Tensor, col_sizes: list[int], group=None) -> None:
        super().__init__(num_rows, dim, local_weight, group)
        self.col_group = group if group is not None else dist.group.WORLD
        self.col_sizes = _check_sizes(col_sizes, dim, self.world, "col_sizes")
        bounds = _bounds(self.col_sizes)
        self.col_start, self.col_stop = bounds[self.rank], bounds[self.rank + 1]
        if tuple(local_weight.shape) != (num_rows, self.col_stop - self.col_start):
            raise ValueError(f"column shard {self.rank}: expected local weight "
                             f"{(num_rows, self.col_stop - self.col_start)}, got {tuple(local_weight.shape)}")

    def _part_sizes(self):
        return self.col_sizes, 1

    def owned_col_range(self):
        return self.col_start, self.col_stop

    @classmethod
    def from_full(cls, full_weight: torch.Tensor, group=None, col_sizes: list[int] | None = None):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = col_sizes or even_split(full_weight.shape[1], world)
        bounds = _bounds(_check_sizes(sizes, full_weight.shape[1], world, "col_sizes"))
        local = full_weight[:, bounds[rank]:bounds[rank + 1]].clone()
        return cls(full_weight.shape[0], full_weight.shape[1], local, sizes, group)

    def lookup(self, indices_NK, weights_NK, token_mask_N=None):
        n_tokens = indices_NK.shape[0]
        sizes = self._token_counts(n_tokens, indices_NK.device)
        all_indices_MK = all_gather_v(indices_NK, sizes, self.group)  # M = tokens of the whole group
        all_weights_MK = all_gather_v(weights_NK, sizes, self.group)
        if self.track_access:  # every rank sees every token: counts are global on every rank
            all_mask_M = None
            if token_mask_N is not None:
                all_mask_M = all_gather_v(token_mask_N.to(torch.uint8), sizes, self.group)
            self.sink.add_access(*read_counts(all_indices_MK, all_mask_M))
        slice_MD = self.bag_lookup(self.weight, all_indices_MK, all_weights_MK)
        width = self.col_stop - self.col_start
        received = all_to_all_v(slice_MD.reshape(-1), [s * width for s in sizes],
                                [n_tokens * w for w in self.col_sizes], self.group)
        parts = received.split([n_tokens * w for w in self.col_sizes])
        return torch.cat([p.view(n_tokens, w) for p, w in zip(parts, self.col_sizes)], dim=1)

    def full_weight(self):
        with torch.no_grad():
            columns = all_gather_v(self.weight.t().contiguous(), self.col_sizes, self.group)
            return columns.t().contiguous()

    def load_full_weight(self, weight):
        if tuple(weight.shape) != (self.num_rows, self.dim):
            raise ValueError(f"value table: expected a {(self.num_rows, self.dim)} table, got {tuple(weight.shape)}")
        self.weight.copy_(weight[:, self.col_start:self.col_stop])
