"""Aggregate an experiment: each variant's metrics over seeds, and its change against the base
model with a paired bootstrap 95% interval.

Per task, the per-example records every evaluation saved (<eval dir>/<task>.predictions.jsonl)
are lined up by example id (window index for WikiText) with the base model's. The change of a
variant is mean over seeds of (metric of the variant on the examples - metric of the base on the
same examples); the interval resamples examples (windows) once for base and every seed alike,
so it is paired: the base's own difficulty of each example cancels. Seeds are averaged, not
resampled: with the 2-5 seeds of a grid, their spread is reported as a standard deviation.

With a base per seed (the world's default: seed k finetunes a base pretrained with seed k), each
run is compared with its own base, and the interval resamples the bases as well as the examples:
every replicate draws S of the S bases (with their runs) and one resample of the examples, the
same for every variant. Examples are crossed with bases (every base is evaluated on the same
examples), so one draw of each factor per replicate carries both sources of variance (Owen's
bootstrap for crossed factors). Drawing S of only S bases shrinks their spread by (S-1)/S, so the
bases' deviations are widened by sqrt(S/(S-1)) first; even so, with 3 bases a percentile interval
covers less than 95% when the bases differ much more than the examples do (83% in a simulation
where the bases' spread is 7 times the examples' noise; 78% unwidened), so a claim needs its sign
on every base as well. Each change
records its value on every base and whether its sign is the same on all of them; comparisons
between variants (frontiers, ablation) are made only among variants with the same seeds.

  medmcqa   per example: correct under the headline mode (`correct_<mode>`); metric: accuracy
  triviaqa  per example: `contains` (the paper's alias-contains); metric: accuracy
  wikitext  per window: NLL sum and scored tokens; metric: exp(sum NLL / sum tokens)

and, where the eval dirs have them, EXTRA_COLUMNS (wikitext_memorised: the windows the world's base
model pretrained on; its probes read held-out text).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..eval.bootstrap import bootstrap_statistic, percentile_interval, resample_indices
from ..eval.runner import TASKS
from .ablation import ablation
from .frontier import tradeoffs


def read_records(eval_dir: Path, task: str) -> list[dict]:
    path = Path(eval_dir) / f"{task}.predictions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions for {task} (was the evaluation run?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err})") from None
    return records


def _keys(records: list[dict], task: str) -> list:
    return [r["index"] if task == "wikitext" else r.get("id", r["index"]) for r in records]


def per_example(eval_dir: Path, task: str, medmcqa_mode: str = "answer") -> tuple[list, np.ndarray, np.ndarray | None]:
    """(example keys, values, token counts or None): correctness, or NLL sums and token counts."""
    records = read_records(eval_dir, task)
    if task == "wikitext":
        return (_keys(records, task), np.array([r["nll"] for r in records], dtype=np.float64),
                np.array([r["n_tokens"] for r in records], dtype=np.float64))
    field = f"correct_{medmcqa_mode}" if task == "medmcqa" else "contains"
    return _keys(records, task), np.array([float(r[field]) for r in records]), None


def metric_of(values_SN: np.ndarray, tokens_N: np.ndarray | None, idx_MN: np.ndarray) -> np.ndarray:
    """Metric of each of S runs on each of M resamples: (S, M)."""
    if tokens_N is None:
        return values_SN[:, idx_MN].mean(axis=2)
    return np.exp(values_SN[:, idx_MN].sum(axis=2) / tokens_N[idx_MN].sum(axis=1))


def paired_delta(base_N: np.ndarray, runs_SN: np.ndarray, tokens_N: np.ndarray | None, n_boot: int = 1000,
                 seed: int = 0, keep_samples: bool = False) -> dict:
    """Mean over runs of (run metric - base metric) on the same resampled examples, with its interval
    (and its resampled values: the same resamples for every variant of a task)."""
    def statistic(idx_MN):
        return metric_of(runs_SN, tokens_N, idx_MN).mean(axis=0) - metric_of(base_N[None], tokens_N, idx_MN)[0]
    return bootstrap_statistic(statistic, base_N.shape[0], n_boot, seed, keep_samples=keep_samples)


def paired_delta_per_base(bases_SN: np.ndarray, runs_SN: np.ndarray, tokens_N: np.ndarray | None,
                          n_boot: int = 1000, seed: int = 0, keep_samples: bool = False) -> dict:
    """Mean over runs of (run s's metric - its base s's metric), with an interval that resamples the
    bases (with their runs) and the examples, each once per replicate and alike for every variant;
    also the change on each base and whether its sign is the same on all."""
    n, n_bases = bases_SN.shape[1], bases_SN.shape[0]
    if n == 0:
        return {"value": None, "ci95": [None, None], "n": 0}
    every = np.arange(n)[None]
    per_base = (metric_of(runs_SN, tokens_N, every) - metric_of(bases_SN, tokens_N, every))[:, 0]
    deltas_MS = np.concatenate([(metric_of(runs_SN, tokens_N, idx) - metric_of(bases_SN, tokens_N, idx)).T
                                for idx in resample_indices(n, n_boot, seed)])
    if n_bases > 1:  # resampling S bases shrinks their spread by (S-1)/S: widened back, as a t-interval would be
        centre = deltas_MS.mean(axis=1, keepdims=True)
        deltas_MS = centre + np.sqrt(n_bases / (n_bases - 1)) * (deltas_MS - centre)
    drawn_MS = np.random.default_rng([seed, n_bases]).integers(0, n_bases, size=(n_boot, n_bases))
    samples = np.take_along_axis(deltas_MS, drawn_MS, axis=1).mean(axis=1)
    return {"value": float(per_base.mean()), "ci95": percentile_interval(samples), "n": int(n),
            "per_base": [float(v) for v in per_base], "same_sign_on_every_base": len(set(np.sign(per_base))) == 1,
            **({"samples": samples} if keep_samples else {})}


# Extra columns: a task evaluated into a subdirectory of every eval dir, read when the base's eval
# dir has it (the world's memorised windows: smf_ds.experiment.jobs.MEMORISED_DIR).
EXTRA_COLUMNS = {"wikitext_memorised": ("memorised", "wikitext")}


def _read_bases(base_dirs: dict[int, Path], sub: str, task: str, medmcqa_mode: str):
    """(keys, {seed: values}, tokens) of every seed's base, which must share their examples."""
    read = {s: per_example(Path(d) / sub, task, medmcqa_mode) for s, d in sorted(base_dirs.items())}
    keys, _, tokens = next(iter(read.values()))
    for s, (other_keys, _, other_tokens) in read.items():
        if other_keys != keys or (tokens is not None and not np.array_equal(other_tokens, tokens)):
            raise ValueError(f"{Path(base_dirs[s]) / sub / f'{task}.predictions.jsonl'}: its examples differ from "
                             f"those of the other bases; compare evaluations of the same data")
    return keys, {s: v for s, (_, v, _) in read.items()}, tokens


def aggregate(base_dir: Path | dict[int, Path], runs: dict[str, dict[int, Path]], medmcqa_mode: str = "answer",
              n_boot: int = 1000, seed: int = 0) -> dict:
    """runs: variant -> {seed: eval dir}; base_dir: the base model's eval dir, or {seed: eval dir} of
    each seed's own base. The summary written to results.json, with each probe's frontiers and
    matched tables (smf_ds.experiment.frontier)."""
    per_seed_bases = isinstance(base_dir, dict)
    base_dirs = base_dir if per_seed_bases else {}
    any_base = Path(next(iter(base_dirs.values()))) if per_seed_bases else Path(base_dir)
    out = {"base": {}, "variants": {}, "medmcqa_mode": medmcqa_mode, "n_boot": n_boot,
           "bases": "per seed" if per_seed_bases else "shared"}
    base: dict[str, tuple] = {}  # column -> (keys, values or {seed: values}, tokens)
    samples: dict[str, dict[str, np.ndarray]] = {}
    columns = {task: ("", task) for task in TASKS}  # column -> (subdirectory, task)
    columns.update({c: (sub, task) for c, (sub, task) in EXTRA_COLUMNS.items()
                    if (any_base / sub / f"{task}.predictions.jsonl").is_file()})
    for column, (sub, task) in columns.items():
        if per_seed_bases:
            keys, values, tokens = _read_bases(base_dirs, sub, task, medmcqa_mode)
            metrics = {str(s): float(metric_of(v[None], tokens, np.arange(len(v))[None])[0, 0]) for s, v in values.items()}
            out["base"][column] = float(np.mean(list(metrics.values())))
            out.setdefault("base_per_seed", {})[column] = metrics
        else:
            keys, values, tokens = per_example(Path(base_dir) / sub, task, medmcqa_mode)
            out["base"][column] = float(metric_of(values[None], tokens, np.arange(len(values))[None])[0, 0])
        base[column] = (keys, values, tokens)
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        missing = [s for s in seeds if per_seed_bases and s not in base_dirs]
        if missing:
            raise ValueError(f"{variant}: seeds {missing} have runs but no evaluation of their own base")
        row = {"seeds": seeds}
        for column, (sub, task) in columns.items():
            keys, base_values, tokens = base[column]
            per_seed = []
            for s in seeds:
                run_keys, values, _ = per_example(Path(by_seed[s]) / sub, task, medmcqa_mode)
                if run_keys != keys:
                    raise ValueError(f"{Path(by_seed[s]) / sub / f'{task}.predictions.jsonl'}: its examples differ "
                                     f"from the base model's ({Path(base_dirs.get(s, base_dir)) / sub}); compare "
                                     f"evaluations of the same data")
                per_seed.append(values)
            runs_SN = np.stack(per_seed)
            values_S = metric_of(runs_SN, tokens, np.arange(len(keys))[None])[:, 0]
            if per_seed_bases:
                delta = paired_delta_per_base(np.stack([base_values[s] for s in seeds]), runs_SN, tokens, n_boot,
                                              seed, keep_samples=True)
            else:
                delta = paired_delta(base_values, runs_SN, tokens, n_boot, seed, keep_samples=True)
            samples.setdefault(variant, {})[column] = delta.pop("samples", None)  # none for a task with no examples
            row[column] = {"per_seed": [float(v) for v in values_S], "mean": float(values_S.mean()),
                           "sd": float(values_S.std(ddof=1)) if len(seeds) > 1 else 0.0, "delta": delta}
        out["variants"][variant] = row
    compared = out["variants"]
    if per_seed_bases:  # resamples pair variants only on the same bases: compare those with the usual seeds
        seed_sets = [tuple(row["seeds"]) for row in out["variants"].values()]
        usual = max(dict.fromkeys(seed_sets), key=seed_sets.count)
        compared = {v: row for v, row in out["variants"].items() if tuple(row["seeds"]) == usual}
        if len(compared) < len(out["variants"]):
            out["not_compared"] = {"seeds": list(usual), "variants": {v: row["seeds"] for v, row in
                                                                      out["variants"].items() if v not in compared}}
    out["tradeoffs"] = tradeoffs(compared, samples)
    corrections = ablation(compared, samples)  # smf-paper and its corrections (smf_ds.experiment.ablation)
    if corrections is not None:
        out["ablation"] = corrections
    return out
