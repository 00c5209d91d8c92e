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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str | None = None) -> None:
    """Join the launcher's process group, or make a group of one so DeepSpeed runs unlaunched."""
    if init_from_env(backend):
        return
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
        import deepspeed  # mpirun: DeepSpeed reads the MPI environment (mpi4py)

        deepspeed.init_distributed(dist_backend=backend or default_backend(), auto_mpi_discovery=True)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend=backend or default_backend(), rank=0, world_size=1)


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
