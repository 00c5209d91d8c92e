"""Score the rows a step read against background statistics and pick the global top-t.

Rules (counts c over this step's reads, padding excluded; B background batches):
  tfidf  c(i)/sum_j c(j) * log((B+1)/(df(i)+1))                       (Lin et al. 2025)
  kl     p(i) * log((p(i)+eps)/(p_bg(i)+eps)), p = c/sum c,
         p_bg = (bg_count(i)+1)/(sum bg_count + num_rows)            (+1 smoothing; paper's code)
  tf     c(i)
  random a hash of (row, step, seed): uniform among read rows, the same on every rank
  dense-accessed  every row read this step (no top-t)
  dense-all       every row of the table (the dense-update control)

Ties break towards the lower row id, so the selection is a pure function of the counts and is
identical on every rank: row owners send their local top-t (score, row) to all, and every rank
takes the same top-t of the same list. Scores are float64.
"""
from __future__ import annotations

import torch

from ..config import RULES_NEEDING_BACKGROUND, ConfigError, background_needed
from ..memory.values import ValueTable
from .background import BackgroundStats
from .stats import gather_over_row_owners, sum_over_row_owners

_MOD = 2**31


def _row_hash(rows: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """Deterministic pseudo-random float in [0, 1) per row; products stay below 2**62 (no overflow)."""
    h = (rows % _MOD * 40503 + (step % _MOD) * 2654435 + seed % _MOD * 97 + 12345) % _MOD
    for _ in range(3):
        h = (h * 1103515245 + 12345) % _MOD
        h = (h ^ (h >> 13)) % _MOD
    return h.double() / _MOD


def score_rows(rule: str, rows: torch.Tensor, counts: torch.Tensor, total: torch.Tensor,
               table: ValueTable, layer: int, background: BackgroundStats | None,
               step: int, seed: int, kl_eps: float) -> torch.Tensor:
    """Scores (float64) of the read `rows` this process owns; `total` = sum of counts over the table."""
    c = counts.double()
    if rule == "tf":
        return c
    if rule == "random":
        return _row_hash(rows, step, seed)
    start, _ = table.owned_row_range()
    bg_df, bg_counts = background.owned(layer, table)
    local = rows - start
    if rule == "tfidf":
        idf = torch.log((background.num_batches + 1.0) / (bg_df[local].double() + 1.0))
        return c / total * idf
    if rule == "kl":
        p = c / total
        bg_total = float(background.counts[layer].sum()) + table.num_rows
        p_bg = (bg_counts[local].double() + 1.0) / bg_total
        return p * torch.log((p + kl_eps) / (p_bg + kl_eps))
    raise ConfigError(f"sparse.scoring: unknown rule {rule!r}")


def _top_t(rows: torch.Tensor, scores: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest scores first, ties to the lower row id."""
    if scores.numel() > t:  # O(U) cut to the t best and whatever ties the t-th, then sort those
        keep = scores >= torch.topk(scores, t, sorted=False).values.min()
        rows, scores = rows[keep], scores[keep]
    by_row = torch.argsort(rows, stable=True)
    rows, scores = rows[by_row], scores[by_row]
    order = torch.argsort(scores, descending=True, stable=True)[:t]
    return rows[order], scores[order]


def select_rows(rule: str, t: int, table: ValueTable, layer: int, rows: torch.Tensor, counts: torch.Tensor,
                background: BackgroundStats | None, step: int, seed: int = 0,
                kl_eps: float = 1e-8) -> torch.Tensor:
    """Global row ids selected this step (ascending), identical on every rank.

    rows/counts: this step's reads of the rows this process owns (global over ranks).
    For dense-all the result is every row of the table.
    """
    if rule == "dense-all":
        return torch.arange(table.num_rows, device=rows.device)
    if rule in RULES_NEEDING_BACKGROUND and background is None:
        raise background_needed(rule)
    read = counts > 0
    rows, counts = rows[read], counts[read]
    if rule == "dense-accessed":
        return gather_over_row_owners(table, rows).sort().values
    total = sum_over_row_owners(table, counts.sum().double().reshape(1))
    scores = score_rows(rule, rows, counts, total, table, layer, background, step, seed, kl_eps)
    local_rows, local_scores = _top_t(rows, scores, t)
    if table.row_group is not None:  # candidates from every owner, then the same top-t everywhere
        local_rows, local_scores = _top_t(gather_over_row_owners(table, local_rows),
                                          gather_over_row_owners(table, local_scores), t)
    return local_rows.sort().values
