"""Sweeps: settings varied per method, every combination a variant of its own.

    sweep:                                  # in an experiment config (or WORLD_SWEEP for the world)
      lora: {train.lr: [1.0e-4, 3.0e-4]}
      smf-tfidf: {memory.value_lr: [0.5, 2.0], sparse.top_t: [100, 500]}

makes the variants lora@train.lr=0.0001, lora@train.lr=0.0003 and four smf-tfidf@... points, each
the method's overrides followed by its own; every point runs with every seed, and the report
draws each method's frontier through its points (smf_ds.experiment.frontier).
"""
from __future__ import annotations

import itertools

from ..config import ConfigError

POINT = "@"  # <method>@<key>=<value>,<key>=<value>


def point_name(method: str, settings: dict[str, object]) -> str:
    return method + POINT + ",".join(f"{key}={value}" for key, value in settings.items())


def expand_sweep(variants: dict[str, list[str]], sweep: dict[str, dict[str, list]]) -> dict[str, list[str]]:
    """`variants` with each swept one replaced by its points (in the order of the variants, then of
    the values); an unknown variant, an empty list of values or a repeated value is an error."""
    marked = [name for name in variants if POINT in name]
    if marked:
        raise ConfigError(f"variants: {marked}: '{POINT}' is kept for sweep points (<variant>{POINT}<key>=<value>); "
                          f"rename them")
    unknown = [name for name in sweep if name not in variants]
    if unknown:
        raise ConfigError(f"sweep: {unknown} are not variants; expected some of {list(variants)}")
    for name, grid in sweep.items():
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"sweep.{name}: expected a mapping of settings to lists of values, got {grid!r}")
        for key, values in grid.items():
            if not isinstance(values, list) or not values or len(set(map(str, values))) != len(values):
                raise ConfigError(f"sweep.{name}.{key}: expected a list of distinct values, got {values!r}")
            if any("/" in str(value) for value in values):  # each point names its run directory
                raise ConfigError(f"sweep.{name}.{key}: a value with '/' cannot name a run directory, got {values!r}")
    out: dict[str, list[str]] = {}
    for name, overrides in variants.items():
        if name not in sweep:
            out[name] = list(overrides)
            continue
        keys = list(sweep[name])
        for values in itertools.product(*(sweep[name][key] for key in keys)):
            settings = dict(zip(keys, values))
            out[point_name(name, settings)] = [*overrides, *(f"{key}={value}" for key, value in settings.items())]
    return out
