"""shard_memory(model, group, strategy): swap every memory layer's local value table for a sharded one.

A free function applied after the model is built (torchtitan-style): the memory code knows
nothing of process groups. Every rank must hold the same local table before the call (memory
init is seeded identically on every rank), each keeps only its part.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..config import ConfigError
from ..memory.inject import memory_layers
from ..memory.values import LocalValueTable
from .sharded_values import ColumnShardedValueTable, RowShardedValueTable

STRATEGIES = ("replicated", "row", "column")


def shard_memory(model: nn.Module, group=None, strategy: str = "row", sizes: list[int] | None = None) -> nn.Module:
    """strategy: 'replicated' (a whole table on every rank), 'row' or 'column'; sizes: optional uneven split per rank."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"memory.sharding: expected one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "replicated":
        # Each rank keeps a whole copy; with several ranks the copies' reads and gradients are
        # summed at each optimizer step (smf_ds.sparse.stats), so the copies stay identical.
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            for _, mlp in memory_layers(model):
                mlp.memory.values.replica_group = group if group is not None else dist.group.WORLD
        return model
    sharded_cls = RowShardedValueTable if strategy == "row" else ColumnShardedValueTable
    for _, mlp in memory_layers(model):
        local = mlp.memory.values
        if not isinstance(local, LocalValueTable):
            raise ConfigError(f"memory.sharding: layer tables are already sharded ({type(local).__name__})")
        kwargs = {"row_sizes": sizes} if strategy == "row" else {"col_sizes": sizes}
        table = sharded_cls.from_full(local.weight, group, **kwargs)
        table.requires_grad, table.track_access = local.requires_grad, local.track_access
        mlp.memory.values = table
    return model
