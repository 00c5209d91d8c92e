"""Shared machinery of the evaluators: padding, batch plans, sharding batches over ranks, gathering.

Sharding is by batch: the batch plan is made from *all* examples on every rank (sorted by
length, so padding is small), and rank r runs batches r, r + W, r + 2W, ... Every example is
therefore computed in exactly the same batch, with the same padding, whatever the number of
ranks; gathered results equal one rank's bit for bit (given the same kernels).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ..parallel.process_group import get_rank, get_world_size, is_distributed


def resolve_shard(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): the process group's unless given (world_size=1 = no sharding, no gather)."""
    if world_size is None:
        world_size = get_world_size()
    if rank is None:
        rank = get_rank() if world_size > 1 else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return rank, world_size


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), left-padded; positions count real tokens from 0.

    With left padding every sequence ends at the last column, so the logits a scorer needs are
    the last few columns for every row (`logits_to_keep`), and generation appends to all rows
    at once. Position ids are passed explicitly so a padded row sees the same positions as the
    unpadded sequence.
    """
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, length - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, length - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def plan_batches(lengths: Sequence[int], batch_size: int, equal_lengths: bool = False) -> list[list[int]]:
    """Indices grouped into batches of `batch_size`, longest first (stable for equal lengths).

    equal_lengths: a batch never mixes lengths, so it needs no padding and no attention mask
    (the plain causal attention kernel, about twice as fast on CPU as a masked one); for inputs
    that are nearly all one length, such as perplexity windows.
    """
    if batch_size < 1:
        raise ValueError(f"batch size: expected >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not equal_lengths:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for i in order:
        if not batches or len(batches[-1]) == batch_size or lengths[batches[-1][0]] != lengths[i]:
            batches.append([])
        batches[-1].append(i)
    return batches


def my_batches(batches: list, rank: int, world_size: int) -> list:
    return batches[rank::world_size]


def gather_objects(local: list, world_size: int) -> list:
    """Concatenation of every rank's `local` list (rank order), on every rank; as is when W=1."""
    if world_size == 1:
        return list(local)
    if not is_distributed() or dist.get_world_size() != world_size:
        raise RuntimeError(f"sharded evaluation over {world_size} ranks needs an initialised process group "
                           f"of that size")
    parts: list = [None] * world_size
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer: has neither a pad token nor an eos token to pad with")
    return int(pad)


def progress_bar(total: int, desc: str, enabled: bool, rank: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or rank != 0, leave=False, dynamic_ncols=True)
