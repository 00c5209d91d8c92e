"""Where the value tables live: one object, built once from the config and the world, holds every
process group a table uses (torchtitan's ParallelDims, for memory).

Data parallelism spans every rank (the global batch is micro_batch_size x grad_accum x world).
A table is split over a memory group of `memory.parallel_size` consecutive ranks (rows or columns,
`memory.sharding`; 0 = every rank) and replicated across the world / parallel_size such groups,
as Meta's memory-parallel mesh axis does: with 8 ranks per node, parallel_size 8 shards within a
node over its fast links and replicates across nodes. `replicated` tables are whole on every rank.

Row gradients arrive summed over the data-parallel ranks whatever the layout, so the SMF step
divides them by `dp_size`, as the engine averages dense gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from ..config import ConfigError, MemoryConfig
from .process_group import get_rank, get_world_size


@dataclass
class MemoryLayout:
    strategy: str  # "replicated", "row" or "column"
    world: int  # data-parallel ranks: all of them
    parallel_size: int  # ranks one table is split over (1 for replicated tables)
    rank: int = 0
    shard_group: object = None  # this rank's memory group (None: the whole world, or no split)
    replica_group: object = None  # the ranks holding the same part as this one (None: none other)

    @property
    def dp_size(self) -> int:
        return self.world

    @property
    def replicas(self) -> int:
        return self.world // self.parallel_size

    @classmethod
    def from_config(cls, cfg: MemoryConfig, world: int | None = None, rank: int | None = None) -> "MemoryLayout":
        """The layout for this world; creates the process groups (every rank must call it)."""
        world = get_world_size() if world is None else world
        rank = get_rank() if rank is None else rank
        size = 1 if cfg.sharding == "replicated" else (cfg.parallel_size or world)
        if cfg.sharding != "replicated" and (size < 1 or world % size):
            raise ConfigError(f"memory.parallel_size: expected a divisor of the number of processes ({world}) or 0 "
                              f"(all of them), got {cfg.parallel_size}")
        if cfg.sharding != "replicated" and size == 1 and world > 1:
            raise ConfigError(f"memory.parallel_size=1 with memory.sharding={cfg.sharding!r}: a table split over "
                              f"one rank is not split; use memory.sharding=replicated, or a parallel_size of 2 or more")
        layout = cls(cfg.sharding, world, size, rank)
        if world > 1:
            layout._make_groups()
        return layout

    def _make_groups(self) -> None:
        size, world = self.parallel_size, self.world
        if size == world:  # split over everyone, no replica
            return
        if size == 1:  # whole tables everywhere: one replica group of all
            self.replica_group = dist.group.WORLD
            return
        # Every rank creates every group, in the same order (torch.distributed requires it).
        for start in range(0, world, size):
            group = dist.new_group(list(range(start, start + size)))
            if start <= self.rank < start + size:
                self.shard_group = group
        for offset in range(size):
            group = dist.new_group(list(range(offset, world, size)))
            if self.rank % size == offset:
                self.replica_group = group

    def apply(self, model: nn.Module) -> nn.Module:
        """Swap every memory layer's local table for this layout's (every rank must call it)."""
        from .shard import shard_memory

        if self.world == 1 and self.strategy == "replicated":
            return model
        if self.strategy == "replicated":
            return shard_memory(model, None, "replicated")
        shard_memory(model, self.shard_group, self.strategy)
        if self.replica_group is not None:
            from ..memory.inject import value_tables

            for _, table in value_tables(model):
                table.replica_group = self.replica_group
        return model

    def describe(self) -> dict:
        """What a checkpoint records of the layout it was written with."""
        return {"strategy": self.strategy, "world": self.world, "parallel_size": self.parallel_size}
