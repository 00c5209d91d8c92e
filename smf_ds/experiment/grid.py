"""`smf-ds experiment`: every variant x every seed on the embedded synthetic world, evaluated,
aggregated with paired intervals, plotted and reported, from one command.

Layout of <out> (each rank runs the same code; rank 0 writes):
  world/  base/  base_eval/                    the world, the pretrained base model, its evaluation
  runs/<variant>/seed<k>/                      one finetuning run (config, TensorBoard, artifact)
  runs/<variant>/seed<k>/eval/                 its evaluation (per-example predictions)
  results.json  report.md  tradeoff.png        the aggregate (smf_ds.experiment.stats / report)

A run whose evaluation is already there is not redone, and one whose training finished is only
evaluated: an interrupted experiment continues where it stopped when called again with the
same --out. `smf-ds report --out DIR` rebuilds results.json, report.md and the plot from the
evaluations present.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from ..config import ConfigError
from ..data.synthetic_world import build_world
from ..parallel.process_group import barrier, get_rank, init_process_group
from .jobs import BASE_STEPS, MEDMCQA_MODES, TASK_STEPS, VARIANTS, check_variants, evaluate, finetune, pretrain_base
from .report import results_table, write_report
from .stats import aggregate

log = logging.getLogger(__name__)

DEFAULT_SEEDS = (0, 1, 2)
SUMMARY = "summary.json"  # what an evaluation leaves (smf_ds.eval.runner)


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed{seed}"


def run_one(world: dict, base: Path, out: Path, variant: str, seed: int, steps: int) -> Path:
    """Train (unless done) and evaluate (unless done) one run; its eval dir."""
    directory = run_dir(out, variant, seed)
    eval_dir = directory / "eval"
    if (eval_dir / SUMMARY).is_file():
        log.info("%s seed %d: evaluated already, kept", variant, seed)
        return eval_dir
    summary_path = directory / "train_summary.json"
    if summary_path.is_file():
        artifact = Path(json.loads(summary_path.read_text())["artifact"])
    else:
        artifact = Path(finetune(world, base, variant, directory, steps, seed)["artifact"])
    evaluate(world, base, artifact, eval_dir, {"model": variant, "seed": seed})
    return eval_dir


def collect_runs(out: Path) -> dict[str, dict[int, Path]]:
    """variant -> {seed: eval dir} for every finished evaluation under <out>/runs, variants in VARIANTS order."""
    runs: dict[str, dict[int, Path]] = {}
    for variant in VARIANTS:
        for summary in sorted((out / "runs" / variant).glob(f"seed*/eval/{SUMMARY}")):
            runs.setdefault(variant, {})[int(summary.parent.parent.name[len("seed"):])] = summary.parent
    return runs


def build_report(out: str | Path, settings: dict | None = None, n_boot: int = 1000) -> dict:
    """Aggregate the evaluations under `out`; write results.json, report.md and tradeoff.png."""
    out = Path(out)
    if not (out / "base_eval" / SUMMARY).is_file():
        raise ConfigError(f"--out {out}: no base-model evaluation ({out}/base_eval/{SUMMARY}); is it an experiment dir?")
    runs = collect_runs(out)
    if not runs:
        raise ConfigError(f"--out {out}: no evaluated run under {out}/runs to report on")
    previous = out / "results.json"
    if settings is None and previous.is_file():
        settings = json.loads(previous.read_text()).get("settings")
    results = aggregate(out / "base_eval", runs, medmcqa_mode=MEDMCQA_MODES[0], n_boot=n_boot)
    results["settings"] = settings or {}
    previous.write_text(json.dumps(results, indent=2))
    write_report(results, out)
    return results


def run_experiment(out: str | Path = "runs/experiment", variants: Sequence[str] = tuple(VARIANTS),
                   seeds: Sequence[int] = DEFAULT_SEEDS, quick: bool = False) -> dict:
    variants = check_variants(variants)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct integers, got {list(seeds)}")
    init_process_group()
    mode = "quick" if quick else "full"
    out = Path(out)
    world = build_world(out / "world")
    base = pretrain_base(world, out / "base", BASE_STEPS[mode])
    if not (out / "base_eval" / SUMMARY).is_file():
        evaluate(world, base, None, out / "base_eval", {"model": "base"})
    for variant in variants:
        for seed in seeds:
            run_one(world, base, out, variant, seed, TASK_STEPS[mode])
    results = None
    if get_rank() == 0:
        settings = {"variants": variants, "seeds": list(seeds), "steps": TASK_STEPS[mode],
                    "base_steps": BASE_STEPS[mode], "data": "embedded synthetic world"}
        results = build_report(out, settings)
        log.info("experiment results (%s):\n%s", out / "report.md", results_table(results))
    barrier()
    return results or {}
