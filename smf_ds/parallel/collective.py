"""How this process takes part in saving and loading memory: which rank writes, how ZeRO-3
partitioned parameters are gathered, where the ranks wait for each other. The memory code knows
nothing of process groups; the caller hands it `process_collective()` (peft's is_main_process
pattern)."""
from __future__ import annotations

import contextlib

from ..memory.adapter import Collective
from .process_group import barrier, get_rank


def gathered_parameters(params, modifier_rank: int | None = None):
    """Whole parameters inside the block even if ZeRO-3 partitioned them (a collective then)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed  # only reached when DeepSpeed ZeRO-3 is in use

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def process_collective() -> Collective:
    """This process in its process group: rank 0 writes; every rank gathers and waits."""
    return Collective(is_main_process=get_rank() == 0, gather=gathered_parameters, barrier=barrier)
