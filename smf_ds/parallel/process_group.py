"""Process-group helpers: who am I, how many are we, and start gloo/nccl from launcher variables.

Model code never imports this; parallelism is applied from outside (see shard_memory).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, if any.

    Returns True when running distributed. With no WORLD_SIZE (or WORLD_SIZE=1) this is a no-op,
    so every entry point runs unchanged as a single process.
    """
    if is_distributed():
        return True
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if is_distributed():
        dist.barrier(group)
