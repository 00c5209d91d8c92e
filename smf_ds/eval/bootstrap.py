"""Seeded percentile-bootstrap 95% intervals (numpy).

`bootstrap_statistic(statistic, n)`: the general form (paired differences between models are
built on it in smf_ds.experiment.stats).

`bootstrap_mean(values)`: resample the per-example values with replacement n_boot times; the
interval is the 2.5th and 97.5th percentiles of the resampled means (accuracy, EM, F1).

`bootstrap_ratio(num, den, transform)`: resample units (for perplexity: the strided windows),
statistic transform(sum(num) / sum(den)) -- for perplexity exp(sum NLL / sum scored tokens),
so the interval is over windows, each carrying its NLL sum and its token count.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

N_BOOT = 1000
CHUNK = 100  # resamples drawn at once (bounds memory for large n)


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = 0):
    """The n_boot resamples of range(n) that every call with this n and seed draws, in chunks of
    at most CHUNK rows."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, CHUNK):
        yield rng.integers(0, n, size=(min(CHUNK, n_boot - start), n))


def _resampled_sums(arrays: list[np.ndarray], n_boot: int, seed: int) -> list[np.ndarray]:
    return [np.concatenate(parts) for parts in
            zip(*([a[idx].sum(axis=1) for a in arrays] for idx in resample_indices(len(arrays[0]), n_boot, seed)))]


def percentile_interval(stats: np.ndarray, alpha: float = 0.05) -> list[float]:
    """The (alpha/2, 1 - alpha/2) percentiles of resampled statistics."""
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)]


def bootstrap_mean(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, alpha: float = 0.05) -> dict:
    """{"value": mean, "ci95": [lo, hi], "n": n}; an empty input gives value None."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return {"value": None, "ci95": [None, None], "n": 0}
    (sums,) = _resampled_sums([x], n_boot, seed)
    return {"value": float(x.mean()), "ci95": percentile_interval(sums / len(x), alpha), "n": int(len(x))}


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], transform: Callable[[np.ndarray], np.ndarray] = np.asarray,
                    n_boot: int = N_BOOT, seed: int = 0, alpha: float = 0.05) -> dict:
    """{"value": transform(sum num / sum den), "ci95": [lo, hi], "n": units}, units resampled together."""
    a = np.asarray(num, dtype=np.float64)
    b = np.asarray(den, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"bootstrap_ratio: {len(a)} numerators but {len(b)} denominators")
    if len(a) == 0:
        return {"value": None, "ci95": [None, None], "n": 0}
    sa, sb = _resampled_sums([a, b], n_boot, seed)
    value = float(transform(np.asarray(a.sum() / b.sum())))
    return {"value": value, "ci95": percentile_interval(transform(sa / sb), alpha), "n": int(len(a))}


def bootstrap_statistic(statistic: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int = N_BOOT, seed: int = 0,
                        alpha: float = 0.05, keep_samples: bool = False) -> dict:
    """{"value", "ci95", "n"} of any statistic of n units: `statistic(idx_MN)` maps M index rows
    (each a resample of range(n)) to M values. Paired comparisons resample the same units for both
    sides inside one statistic, so their correlation is kept. keep_samples: also "samples", the
    n_boot resampled values (the same resamples for every call with this n and seed)."""
    if n == 0:
        return {"value": None, "ci95": [None, None], "n": 0}
    stats = np.concatenate([statistic(idx_MN) for idx_MN in resample_indices(n, n_boot, seed)])
    value = float(statistic(np.arange(n)[None])[0])
    return {"value": value, "ci95": percentile_interval(stats, alpha), "n": int(n), **({"samples": stats} if keep_samples else {})}
