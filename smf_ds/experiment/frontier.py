"""Trade-off curves of a sweep: each method's Pareto frontier of task gain against forgetting,
and what each method pays at matched task gain (and gains at matched forgetting), with paired
bootstrap intervals.

A sweep point is a variant named `<method>@<key>=<value>,...` (smf_ds.experiment.sweep); a
variant without `@` is a point of its own method. Per probe, forgetting is the probe's change
turned so that more is worse (TriviaQA: - Δ accuracy; WikiText: + Δ perplexity), task gain is
Δ MedMCQA accuracy. A method's frontier is its points that no other point of it beats (at least
as much gain for at most as much forgetting, one of them strictly).

Matched levels are task gains (forgetting levels) inside the stretch that the frontiers of at
least two methods span (a frontier of one point spans nothing), away from its ends; a method's
forgetting (gain) there is read off its frontier by linear interpolation between its neighbouring
points. The interval repeats that on each bootstrap resample of the examples
(the same resamples for every run, so it is paired), the frontier's points fixed and their
coordinates resampled; resamples in which the frontier no longer spans the level are left out,
and the share of resamples that reached it is reported beside the interval.
"""
from __future__ import annotations

import numpy as np

from ..eval.bootstrap import percentile_interval

TASK = "medmcqa"
FORGETTING_SIGN = {"triviaqa": -1.0, "wikitext": 1.0}  # forgetting = sign x Δ probe metric
LEVELS = 3


def method_of(variant: str) -> str:
    return variant.split("@", 1)[0]


def pareto_front(gain: np.ndarray, forgetting: np.ndarray) -> list[int]:
    """Indices of the undominated points, by increasing gain (of equal points, the first)."""
    def beaten(i: int, j: int) -> bool:
        at_least_as_good = gain[j] >= gain[i] and forgetting[j] <= forgetting[i]
        better = gain[j] > gain[i] or forgetting[j] < forgetting[i]
        return at_least_as_good and (better or j < i)

    front = [i for i in range(len(gain)) if not any(beaten(i, j) for j in range(len(gain)) if j != i)]
    return sorted(front, key=lambda i: gain[i])


def interpolate(xs: np.ndarray, ys: np.ndarray, level: float) -> float | None:
    """y at x = level along the polyline through (xs, ys) taken in order of x; None outside it."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(xs) == 0 or level < xs.min() or level > xs.max():
        return None
    # Equal x (accuracy changes come in steps of 1/examples, so resamples tie): their mean y.
    unique, group = np.unique(xs, return_inverse=True)
    mean_y = np.bincount(group, weights=ys) / np.bincount(group)
    if len(unique) == 1:
        return float(mean_y[0])
    return float(np.interp(level, unique, mean_y))


def matched_levels(spans: dict[str, tuple[float, float]], n: int = LEVELS) -> list[float]:
    """Up to n levels evenly spaced strictly between the lowest and highest value that at least two
    of the [low, high] spans contain (at an end, a frontier is reached by about half the
    resamples only), each contained by at least two."""
    def covered(x: float) -> bool:
        return sum(lo <= x <= hi for lo, hi in spans.values()) >= 2

    inside = [x for x in sorted({e for span in spans.values() for e in span}) if covered(x)]
    if len(inside) < 2:
        return []
    levels = np.linspace(min(inside), max(inside), n + 2)[1:-1]
    return [float(x) for x in levels if covered(x)]


def tradeoffs(variants: dict[str, dict], samples: dict[str, dict[str, np.ndarray]]) -> dict:
    """Per probe: each method's frontier and the matched-gain and matched-forgetting tables.

    variants: results.json's variants (each task's "delta" with its "value"); samples: variant ->
    task -> the bootstrap resamples of that delta (the same resamples for every variant)."""
    names = [v for v in variants if all(samples.get(v, {}).get(t) is not None for t in (TASK, *FORGETTING_SIGN))]
    if not names:  # no task with examples: nothing to draw
        return {}
    out = {}
    for probe, sign in FORGETTING_SIGN.items():
        gain = np.array([variants[v][TASK]["delta"]["value"] for v in names])
        forgetting = sign * np.array([variants[v][probe]["delta"]["value"] for v in names])
        gain_B = np.stack([samples[v][TASK] for v in names], axis=1)  # (resamples, variants)
        forgetting_B = sign * np.stack([samples[v][probe] for v in names], axis=1)
        fronts: dict[str, list[int]] = {}
        for method_name in dict.fromkeys(map(method_of, names)):
            members = [i for i, v in enumerate(names) if method_of(v) == method_name]
            fronts[method_name] = [members[k] for k in pareto_front(gain[members], forgetting[members])]
        out[probe] = {
            "frontiers": {m: [names[i] for i in front] for m, front in fronts.items()},
            "matched_gain": _matched(fronts, gain, forgetting, gain_B, forgetting_B),
            "matched_forgetting": _matched(fronts, forgetting, gain, forgetting_B, gain_B)}
    return out


def _matched(fronts: dict[str, list[int]], x: np.ndarray, y: np.ndarray, x_B: np.ndarray, y_B: np.ndarray) -> list[dict]:
    """At levels of x that two or more frontiers span: each method's y there, with its interval."""
    spans = {m: (float(x[f].min()), float(x[f].max())) for m, f in fronts.items() if len(f) > 1}
    rows = []
    for level in matched_levels(spans):
        row = {"level": level, "methods": {}}
        for method_name in spans:
            front = fronts[method_name]
            value = interpolate(x[front], y[front], level)
            if value is None:
                continue
            resampled = [v for b in range(len(x_B)) if (v := interpolate(x_B[b, front], y_B[b, front], level)) is not None]
            row["methods"][method_name] = {"value": value, "ci95": percentile_interval(np.array(resampled)) if resampled else None,
                                      "reached": len(resampled) / max(len(x_B), 1)}
        rows.append(row)
    return rows
