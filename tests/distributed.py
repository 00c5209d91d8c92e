"""Run one function in each of N gloo processes on this machine (DistributedTest-style).

`run_distributed(fn, world_size, *args)` returns the list of per-rank return values, ordered by
rank, and re-raises the first rank failure with its traceback. `fn` must be a module-level
function (it is pickled into the processes) taking (rank, world_size, *args).

The processes of one world size are started once per test session and serve every call (as
DeepSpeed's own tests reuse theirs): a spawn costs seconds, a call only what `fn` does. A group in
which a call failed or timed out may be stuck in a collective, so it is ended and the next call
starts a new one; `fresh=True` runs a call in processes of its own.
"""
from __future__ import annotations

import atexit
import os
import pickle
import queue as queues
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smf_ds.parallel.process_group import free_port


def _serve(rank, world_size, port, tasks, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        while (task := tasks.get()) is not None:
            fn, args = task
            try:
                result = fn(rank, world_size, *args)
                # Plain pickle bytes: tensors sent through the queue as shared memory would vanish
                # with this process before the parent reads them.
                results.put((rank, "ok", pickle.dumps(result)))
            except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
                results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class _Group:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world_size, port, self.tasks[r], self.results), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, args, timeout: float) -> list:
        """Every rank's result, or RuntimeError naming the first rank that failed, died or timed out."""
        for tasks in self.tasks:
            tasks.put((fn, args))
        results = {}
        waited = 0.0
        while len(results) < self.world_size:
            try:
                rank, status, payload = self.results.get(timeout=5.0)
            except queues.Empty:
                waited += 5.0
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died (exit code {self.procs[dead[0]].exitcode})") from None
                if waited >= timeout:
                    raise RuntimeError(f"{fn.__name__} on {self.world_size} ranks: no result after {timeout:.0f} s") from None
                continue
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
        return [results[r] for r in range(self.world_size)]

    def end(self, graceful: bool) -> None:
        if graceful:
            for tasks in self.tasks:
                tasks.put(None)
        for p in self.procs:
            p.join(timeout=10 if graceful else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


_GROUPS: dict[int, _Group] = {}


@atexit.register
def _end_groups() -> None:
    while _GROUPS:
        _GROUPS.popitem()[1].end(graceful=True)


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0, fresh: bool = False):
    group = _Group(world_size) if fresh else _GROUPS.pop(world_size, None) or _Group(world_size)
    try:
        results = group.run(fn, args, timeout)
    except BaseException:
        group.end(graceful=False)
        raise
    if fresh:
        group.end(graceful=True)
    else:
        _GROUPS[world_size] = group
    return results
