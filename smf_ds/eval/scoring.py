"""Batched log-likelihood of continuations: sum over the continuation's tokens of log p(token | prefix).

A request is (context_ids, continuation_ids), tokenized separately and concatenated (the same
convention as training, smf_ds.train.batches.tokenize_prompt_answer). The model reads
context + continuation[:-1] (the last continuation token is only a target). Requests whose model
input is identical share one row: e.g. the four one-token letter continuations " A".." D" of a
question are all read off the last position of a single row. Rows are left-padded with explicit
position ids and only the last K positions' logits are computed (`logits_to_keep`), K being the
longest continuation in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .batching import gather_objects, left_pad, model_device, my_batches, plan_batches, progress_bar, resolve_shard

CE_CHUNK = 2048  # positions per cross-entropy call (bounds the float32 copy of the logits)


@dataclass
class _Row:
    input_ids: tuple[int, ...]
    items: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (request, start, targets)


def build_rows(requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[_Row]:
    rows: dict[tuple[int, ...], _Row] = {}
    for r, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0:
            raise ValueError(f"request {r}: empty context (a continuation needs at least one token before it)")
        if len(cont) == 0:
            raise ValueError(f"request {r}: empty continuation")
        key = tuple(ctx) + tuple(cont[:-1])
        row = rows.setdefault(key, _Row(key))
        row.items.append((r, len(ctx) - 1, list(cont)))
    return list(rows.values())


def forward_last(model, input_ids, attention_mask, position_ids, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions, [B, keep, V]."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep
        logits = model(**kwargs).logits
    return logits[:, -keep:]


@torch.no_grad()
def score_requests(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                   batch_size: int = 64, rank: int | None = None, world_size: int | None = None,
                   progress: bool = False, desc: str = "scoring") -> list[float]:
    """Log-likelihood (token log-probs in float32, summed in float64) of every request.

    Batches are sharded over ranks (see batching) and the results gathered: every rank returns
    the full list, in request order.
    """
    rank, world_size = resolve_shard(rank, world_size)
    rows = build_rows(requests)
    batches = plan_batches([len(r.input_ids) for r in rows], batch_size)
    device = model_device(model)
    local: list[tuple[int, float]] = []
    bar = progress_bar(len(my_batches(batches, rank, world_size)), desc, progress, rank)
    for batch in my_batches(batches, rank, world_size):
        brows = [rows[i] for i in batch]
        ids, mask, pos = left_pad([r.input_ids for r in brows], pad_id, device)
        keep = max(len(r.input_ids) - start for r in brows for _, start, _ in r.items)
        logits = forward_last(model, ids, mask, pos, keep)
        # Flatten (row, kept column, target) over every target token of every item; an item's
        # tokens are contiguous, so per-item sums are a reduceat over `starts`.
        b_idx, k_idx, tgt, owners, starts = [], [], [], [], []
        for b, row in enumerate(brows):
            n = len(row.input_ids)
            for req, start, targets in row.items:
                owners.append(req)
                starts.append(len(tgt))
                for j, t in enumerate(targets):
                    b_idx.append(b)
                    k_idx.append(keep - n + start + j)  # input position start+j predicts targets[j]
                    tgt.append(t)
        b_t = torch.tensor(b_idx, device=device)
        k_t = torch.tensor(k_idx, device=device)
        t_t = torch.tensor(tgt, device=device)
        token_lp = torch.empty(len(tgt), dtype=torch.float32, device=device)
        for s in range(0, len(tgt), CE_CHUNK):
            sl = slice(s, s + CE_CHUNK)
            token_lp[sl] = -F.cross_entropy(logits[b_t[sl], k_t[sl]].float(), t_t[sl], reduction="none")
        # Summed on the CPU in float64, in a fixed order (no atomics): deterministic on any device.
        sums = np.add.reduceat(token_lp.cpu().double().numpy(), np.asarray(starts))
        local.extend(zip(owners, sums.tolist()))
        bar.update(1)
    bar.close()
    gathered = dict(gather_objects(local, world_size))
    if len(gathered) != len(requests):
        raise RuntimeError(f"scoring: {len(gathered)} of {len(requests)} requests came back from the ranks")
    return [gathered[r] for r in range(len(requests))]
