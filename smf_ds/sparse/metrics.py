"""Slot-usage metrics of a memory table (Lample et al. 2019): how evenly its rows are read."""
from __future__ import annotations

import math

import torch


def slot_usage(counts: torch.Tensor) -> dict[str, float]:
    """counts: reads per row over the whole table (num_rows,).

    usage: fraction of rows read at least once; kl_uniform: KL(p || uniform) of the read
    distribution (0 = perfectly even, log(num_rows) = one row); gini: 0 even .. 1 concentrated.
    """
    n = counts.numel()
    c = counts.double()
    total = c.sum().item()
    if total == 0:
        return {"usage": 0.0, "kl_uniform": 0.0, "gini": 0.0}
    p = c / total
    nz = p[p > 0]
    kl = float((nz * torch.log(nz * n)).sum())
    sorted_c = torch.sort(c).values
    index = torch.arange(1, n + 1, dtype=torch.float64)
    gini = float((2 * index - n - 1).mul(sorted_c).sum() / (n * total))
    return {"usage": float((c > 0).double().mean()), "kl_uniform": kl, "gini": gini}


def overlap(current: torch.Tensor, previous: torch.Tensor | None) -> float:
    """Fraction of this step's selected rows that were also selected in the previous step."""
    if previous is None or current.numel() == 0:
        return math.nan if previous is None else 0.0
    if current.shape == previous.shape and torch.equal(current, previous):  # dense-all: every row, every step
        return 1.0
    return float(torch.isin(current, previous).double().mean())
