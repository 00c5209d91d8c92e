import os
import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


@pytest.mark.dist
def test_all_ranks_run_and_reduce():
    assert run_distributed(_sum_ranks, 3) == [3.0, 3.0, 3.0]


@pytest.mark.dist
def test_rank_failure_is_reported():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)


@pytest.mark.e2e
def test_a_single_process_ignores_an_exported_master_port_in_use():
    """`export MASTER_PORT=...` for a launcher job must not break a plain one-process run while
    that port is taken: a group of one picks its own free port."""
    import socket
    import subprocess
    import sys

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["MASTER_PORT"] = str(port)
        code = ("from smf_ds.parallel.process_group import init_process_group; import torch.distributed as d; "
                "init_process_group('gloo'); print(d.get_world_size()); d.destroy_process_group()")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("1")
