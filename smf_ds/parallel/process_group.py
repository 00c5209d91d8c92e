"""Process-group helpers: who am I, how many are we, and start gloo/nccl from launcher variables.

Model code never imports this; parallelism is applied from outside (see shard_memory).
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

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


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor must live to go through this group's collectives: NCCL takes CUDA tensors
    only (the current device), gloo takes CPU ones."""
    if is_distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_cuda_index(local_rank: int) -> int:
    """This process's GPU: its local rank, modulo the GPUs it sees (srun --gpus-per-task or
    --gpu-bind show each task only its own GPU, as device 0)."""
    return local_rank % max(torch.cuda.device_count(), 1)


def free_port() -> int:
    """A TCP port free on this host now, for a rendezvous seconds later: one below the kernel's
    ephemeral range where it can, so that no outgoing connection or bind to port 0 takes it in the
    meantime (one did: the rank that was to listen on it failed with EADDRINUSE)."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    below = range(max(1024, ephemeral_low - 10000), ephemeral_low)
    for port in random.SystemRandom().sample(below, min(50, len(below))):  # not the seeded global generator
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every interface, as the rendezvous listens
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (rank, world size, local rank) variables of each launcher, in the order they are looked for:
# torchrun / the deepspeed launcher, OpenMPI's mpirun, slurm's srun.
LAUNCHER_VARIABLES = {
    "torchrun/deepspeed": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "mpirun (OpenMPI)": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: only srun steps set it, so a plain `python` in an
    # sbatch script stays a single process.
    "srun (slurm)": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
}
DEFAULT_MASTER_PORT = "29500"


def launcher_env(environ=None) -> dict[str, str] | None:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for torch.distributed, read from
    whichever launcher started this process; None for a plain single process.

    MASTER_ADDR defaults to 127.0.0.1 (one node) and MASTER_PORT to 29500; a multi-node mpirun or
    srun job must export MASTER_ADDR (launch/mpirun.sh and launch/slurm.sbatch do).
    """
    environ = os.environ if environ is None else environ
    for name, (rank_var, world_var, local_var) in LAUNCHER_VARIABLES.items():
        if world_var not in environ:
            continue
        try:
            world = int(environ[world_var])
            rank = int(environ.get(rank_var, "0"))
            local = int(environ.get(local_var, "0"))
        except ValueError:
            raise ValueError(f"{name} launcher variables: expected integers in {rank_var}, {world_var}, "
                             f"{local_var}; got {environ.get(rank_var)!r}, {environ.get(world_var)!r}, "
                             f"{environ.get(local_var)!r}") from None
        if world <= 1:
            return None
        if not 0 <= rank < world:
            raise ValueError(f"{name} launcher variables: {rank_var}={rank} is outside 0..{world - 1} "
                             f"({world_var}={world})")
        return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
                "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
                "MASTER_PORT": environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)}
    return None


# Seconds a collective waits for a peer, and after which a silent peer is lost (cluster.collective_timeout).
DEFAULT_COLLECTIVE_TIMEOUT = 600.0


# The launcher variables a group of one set, with what they were before (None: unset).
_exported: dict[str, str | None] = {}


def init_process_group(backend: str | None = None, timeout: float = DEFAULT_COLLECTIVE_TIMEOUT) -> None:
    """Join the launcher's process group, or make a group of one so DeepSpeed runs unlaunched."""
    if init_from_env(backend, timeout):
        return
    # A group of one meets nobody: its own free port, whatever MASTER_PORT the shell exports
    # (another job may hold that one). DeepSpeed reads these variables; leaving the group takes them
    # back, so that no process started later inherits a world of one.
    group_of_one = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    _exported.update({name: os.environ.get(name) for name in group_of_one})
    os.environ.update(group_of_one)
    dist.init_process_group(backend=backend or default_backend(), rank=0, world_size=1)


def destroy_process_group() -> None:
    """Leave this process's group. Through DeepSpeed when its comm is set up: that also drops the
    groups DeepSpeed derived from this one, which a later group in this process (smf-ds run again
    as a library) would otherwise meet, stale. A group of one's launcher variables are taken back."""
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None and comm.cdb is not None and comm.cdb.is_initialized():
        comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    for name, before in _exported.items():
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
    _exported.clear()


def init_from_env(backend: str | None = None, timeout: float = DEFAULT_COLLECTIVE_TIMEOUT) -> bool:
    """Join the process group that a launcher (deepspeed, torchrun, mpirun, srun) describes.

    Returns True when running distributed. With no launcher (or a world of one) this is a no-op,
    so every entry point runs unchanged as a single process. The launcher's variables are copied
    to RANK / WORLD_SIZE / LOCAL_RANK, which DeepSpeed reads too. Collectives time out after
    `timeout` seconds, and a peer that dies or stops answering for as long ends every rank
    (smf_ds.parallel.watchdog).
    """
    if is_distributed():
        return True
    env = launcher_env()
    if env is None:
        return False
    backend = backend or default_backend()
    if backend == "nccl":
        # DeepSpeed takes LOCAL_RANK as the device index too: give it the GPU this process sees.
        env["LOCAL_RANK"] = str(local_cuda_index(int(env["LOCAL_RANK"])))
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    os.environ.update(env)
    if backend == "nccl":  # a collective that times out raises instead of hanging the rank
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    from . import watchdog

    watchdog.start(rank, world, timeout)
    return True


def unlink_deepspeed_shared_memory() -> None:
    """DeepSpeed's CPU all-reduce between ranks of one host (`deepspeed_shm_comm`, used when
    LOCAL_SIZE equals the world size) creates a /dev/shm file per rank and never unlinks it: 69 MB
    of RAM per rank and run, held until reboot (9 GiB after a day of tests here). Every rank maps
    every peer's file while DeepSpeed's comm starts; after a barrier each unlinks its own, and the
    mappings stay valid until the processes exit. Call after DeepSpeed's comm has started."""
    comm = sys.modules.get("deepspeed.comm.comm")
    backend = getattr(comm, "cdb", None)
    if getattr(backend, "shm_comm_op", None) is None:
        return
    barrier()  # every rank has mapped every peer's file (a world of one has its file too: LOCAL_SIZE=1)
    uid = os.getuid()
    uid = uid - 2**32 if uid >= 2**31 else uid  # shm.cpp prints it as a C int
    name = (f"deepspeed_allreduce_buffer_{uid}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{get_rank()}")  # the name shm.cpp gives it
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # the shared-memory path was not taken (ranks on several hosts)
        pass


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if is_distributed():
        dist.barrier(group)
