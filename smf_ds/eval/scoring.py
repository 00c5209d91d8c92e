"""Batched log-likelihood of continuations: sum over the continuation's tokens of log p(token | prefix).

Two engines: `score_requests` (independent (context, continuation) pairs; WikiText windows) and
`score_shared_context` (one context, several continuations; a MedMCQA question and its options:
the context is read once and the continuations run on its KV cache).

A request is (context_ids, continuation_ids), tokenized separately and concatenated (the same
convention as training, smf_ds.train.batches.tokenize_prompt_answer). The model reads
context + continuation[:-1] (the last continuation token is only a target). Requests whose model
input is identical share one row: e.g. the four one-token letter continuations " A".." D" of a
question are all read off the last position of a single row. Rows are left-padded with explicit
position ids and only the last K positions' logits are computed (`logits_to_keep`), K being the
longest continuation in the batch.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import InputError

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


def forward_last(model, keep: int, **kwargs):
    """model(**kwargs) computing only the last `keep` positions' logits where the model allows it.

    Returns the model output; its `.logits` are [B, >= keep, V] (slice [:, -keep:])."""
    try:
        return model(**kwargs, logits_to_keep=keep)
    except TypeError:  # a model without logits_to_keep
        return model(**kwargs)


@torch.no_grad()
def score_requests(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                   batch_size: int = 64, rank: int | None = None, world_size: int | None = None,
                   progress: bool = False, desc: str = "scoring", equal_lengths: bool = False) -> list[float]:
    """Log-likelihood (token log-probs in float32, summed in float64) of every request.

    Batches are sharded over ranks (see batching) and the results gathered: every rank returns
    the full list, in request order. `equal_lengths`: batches never mix input lengths (no
    padding, plain causal attention; see batching.plan_batches).
    """
    rank, world_size = resolve_shard(rank, world_size)
    rows = build_rows(requests)
    batches = plan_batches([len(r.input_ids) for r in rows], batch_size, equal_lengths)
    device = model_device(model)
    local: list[tuple[int, float]] = []
    bar = progress_bar(len(my_batches(batches, rank, world_size)), desc, progress, rank)
    for batch in my_batches(batches, rank, world_size):
        brows = [rows[i] for i in batch]
        ids, mask, pos = left_pad([r.input_ids for r in brows], pad_id, device)
        keep = max(len(r.input_ids) - start for r in brows for _, start, _ in r.items)
        if bool(mask.all()):  # no padding in this batch: plain causal attention (the fast SDPA path)
            mask = pos = None
        logits = forward_last(model, keep, input_ids=ids, attention_mask=mask, position_ids=pos,
                              use_cache=False).logits[:, -keep:]
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
        token_lp = _token_logprobs(logits, b_idx, k_idx, tgt)
        # Summed on the CPU in float64, in a fixed order (no atomics): deterministic on any device.
        sums = np.add.reduceat(token_lp.cpu().double().numpy(), np.asarray(starts))
        local.extend(zip(owners, sums.tolist()))
        bar.update(1)
    bar.close()
    return _in_order(local, len(requests), "requests", world_size, desc)


def _token_logprobs(logits: torch.Tensor, rows: list[int], positions: list[int], targets: list[int]) -> torch.Tensor:
    """log p(targets[i] | logits[rows[i], positions[i]]) in float32, CE_CHUNK positions at a time."""
    device = logits.device
    r_t, p_t, t_t = (torch.tensor(v, device=device) for v in (rows, positions, targets))
    token_lp = torch.empty(len(targets), dtype=torch.float32, device=device)
    for s in range(0, len(targets), CE_CHUNK):
        sl = slice(s, s + CE_CHUNK)
        token_lp[sl] = -F.cross_entropy(logits[r_t[sl], p_t[sl]].float(), t_t[sl], reduction="none")
    return token_lp


def _in_order(local: list, n: int, what: str, world_size: int, desc: str) -> list:
    """Every rank's (index, score) pairs gathered, as one list in index order, checked finite."""
    gathered = dict(gather_objects(local, world_size))
    if len(gathered) != n:
        raise RuntimeError(f"scoring: {len(gathered)} of {n} {what} came back from the ranks")
    out = [gathered[i] for i in range(n)]
    _check_finite(out, desc)
    return out


class NonFiniteModelError(InputError):
    """The model gives NaN/inf log-likelihoods: its weights are broken (or a dtype overflows)."""


@torch.no_grad()
def check_model_finite(model, tokenizer) -> None:
    """Before any task: a short text's logits must be finite (NaN weights would otherwise give
    TriviaQA answers decoded from NaN logits, and scores that mean nothing)."""
    ids = tokenizer("The answer is", return_tensors="pt")["input_ids"].to(model_device(model))
    logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise NonFiniteModelError("the model gives NaN/inf logits on a short probe text: its weights are broken "
                                  "(e.g. trained with too large a learning rate) or its dtype overflows "
                                  "(--dtype float16); nothing was evaluated")


def _check_finite(values, desc: str) -> None:
    """A NaN/inf log-likelihood means NaN/inf logits; fail naming the example instead of reporting NaN."""
    for i, v in enumerate(values):
        for x in (v if isinstance(v, list) else [v]):
            if not math.isfinite(x):
                raise NonFiniteModelError(f"{desc}: example {i} has a non-finite log-likelihood ({x}); the model "
                                          f"produced NaN/inf logits (broken weights, e.g. a run trained with too "
                                          f"large a learning rate, or --dtype float16 overflowing)")


# ---------------------------------------------------------------------------------------------
# Shared contexts: one context, several continuations (a question and its options).


def _cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache: `cache` in the transformers 5.x that renamed it,
    `past_key_values` before (where an unknown `cache` would be swallowed by **kwargs, silently
    scoring without the context)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    """The KV cache a forward returned (`out.cache`; `out.past_key_values` is its deprecated alias)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _expand_cache(cache, index: torch.Tensor):
    """The KV cache with its batch rows taken in `index` order (rows may repeat)."""
    if cache is not None and hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    raise TypeError(f"shared-context scoring needs a KV cache with reorder_cache(); got {type(cache).__name__}")


@torch.no_grad()
def score_shared_context(model, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int,
                         batch_size: int = 32, rank: int | None = None, world_size: int | None = None,
                         progress: bool = False, desc: str = "scoring") -> list[list[float]]:
    """Log-likelihood of every continuation of every (context, [continuations]) group.

    The context is read once, not once per continuation: pass 1 runs `batch_size` contexts
    (left-padded, explicit position ids) with a KV cache and keeps the last position's logits,
    which score every continuation's first token; pass 2 runs the continuations' remaining
    tokens (right-padded) on top of the cache, each row's cache row copied from its context.
    A one-token continuation (a letter) costs nothing beyond pass 1. Same numbers as
    `score_requests` and as one unpadded forward per continuation, up to float rounding.
    Batches of groups are sharded over ranks and the results gathered on every rank.
    """
    rank, world_size = resolve_shard(rank, world_size)
    for g, (ctx, conts) in enumerate(groups):
        if len(ctx) == 0 or any(len(c) == 0 for c in conts):
            raise ValueError(f"group {g}: empty context or empty continuation")
    batches = plan_batches([len(ctx) for ctx, _ in groups], batch_size)
    device = model_device(model)
    local: list[tuple[int, list[float]]] = []
    bar = progress_bar(len(my_batches(batches, rank, world_size)), desc, progress, rank)
    for batch in my_batches(batches, rank, world_size):
        ids, mask, pos = left_pad([groups[g][0] for g in batch], pad_id, device)
        out = forward_last(model, 1, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        first_lp = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
        sums = {g: [0.0] * len(groups[g][1]) for g in batch}
        # first continuation token of every continuation, from pass 1
        rows_b, tgt, slots = [], [], []
        for b, g in enumerate(batch):
            for c, cont in enumerate(groups[g][1]):
                rows_b.append(b)
                tgt.append(cont[0])
                slots.append((g, c))
        first = first_lp[torch.tensor(rows_b, device=device), torch.tensor(tgt, device=device)].double().cpu()
        parts: dict[tuple[int, int], list[float]] = {s: [v] for s, v in zip(slots, first.tolist())}
        # pass 2: the rest of every longer continuation, on top of its context's cache
        longer = [(b, g, c) for b, g in enumerate(batch) for c, cont in enumerate(groups[g][1]) if len(cont) > 1]
        if longer:
            inputs = [list(groups[g][1][c][:-1]) for _, g, c in longer]
            n_max = max(len(x) for x in inputs)
            cont_ids = torch.full((len(longer), n_max), pad_id, dtype=torch.long)
            cont_mask = torch.zeros((len(longer), n_max), dtype=torch.long)
            for r, x in enumerate(inputs):
                cont_ids[r, :len(x)] = torch.tensor(x)
                cont_mask[r, :len(x)] = 1
            index = torch.tensor([b for b, _, _ in longer], device=device)
            cache = _expand_cache(_output_cache(out), index)
            full_mask = torch.cat([mask.index_select(0, index), cont_mask.to(device)], dim=1)
            ctx_len = mask.sum(-1).index_select(0, index)
            cont_pos = ctx_len[:, None] + torch.arange(n_max, device=device)[None, :]
            logits = model(input_ids=cont_ids.to(device), attention_mask=full_mask, position_ids=cont_pos,
                           use_cache=True, **{_cache_kwarg(model): cache}).logits  # [R, n_max, V]
            r_idx, j_idx, t_idx = [], [], []
            for r, (_, g, c) in enumerate(longer):
                cont = groups[g][1][c]
                for j in range(len(cont) - 1):  # position j predicts cont[j + 1]
                    r_idx.append(r)
                    j_idx.append(j)
                    t_idx.append(cont[j + 1])
            token_lp = _token_logprobs(logits, r_idx, j_idx, t_idx)
            values = token_lp.double().cpu().tolist()
            k = 0
            for _, g, c in longer:
                n = len(groups[g][1][c]) - 1
                parts[(g, c)].extend(values[k:k + n])
                k += n
        for (g, c), vals in parts.items():
            sums[g][c] = sum(vals)  # Python floats (float64), fixed order
        local.extend(sums.items())
        bar.update(1)
    bar.close()
    return _in_order(local, len(groups), "groups", world_size, desc)
