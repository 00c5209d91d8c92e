"""The least time to read once every row a step touches, shared by the benchmarks.

Sorted unique rows, gathered in address order into a buffer made beforehand, min over repeats.
A step that reads those rows (a lookup's forward; the read weights' gradient in its backward)
cannot take less than this per read, so this much of it grows with N once the rows a step
touches no longer fit in cache, whatever the implementation.
"""
from __future__ import annotations

import math
import time


def row_read_floor_ms(weight, indices, repeats: int = 5) -> float:
    import torch

    rows = torch.unique(indices)
    out = torch.empty(rows.numel(), weight.shape[1], dtype=weight.dtype, device=weight.device)
    sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)
    best = math.inf
    for _ in range(max(repeats, 3)):
        sync()
        t0 = time.perf_counter()
        torch.index_select(weight, 0, rows, out=out)
        sync()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def floor_ratio(step_small_ms: float, floor_small_ms: float, floor_large_ms: float, reads: int = 1) -> float:
    """The large/small step-time ratio if everything but `reads` passes over the rows were flat."""
    return (step_small_ms + reads * (floor_large_ms - floor_small_ms)) / step_small_ms
