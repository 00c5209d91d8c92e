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


def test_all_ranks_run_and_reduce():
    assert run_distributed(_sum_ranks, 3) == [3.0, 3.0, 3.0]


def test_rank_failure_is_reported():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)
