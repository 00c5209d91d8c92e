"""`smf-ds continual`: Lin et al.'s continual-learning setting on the synthetic world. The task's
diseases are dealt into K tasks; each method learns them one after another, every stage starting
from the model the stage before left, and after each stage every task and both probes are
evaluated. The report plots the forgetting curves: accuracy on task 1 after each stage, the mean
over the tasks learned so far, and each probe's drift, with seeds and paired intervals.

Layout of <out>:
  world/  base/  base_eval/                     the world, its pretrained base and its evaluation
  tasks/task<j>/medmcqa_{train,test}.jsonl      task j's questions (both questions of a disease)
  runs/<variant>/seed<s>/stage<j>/              the run that learned task j (from stage j-1's model)
  runs/<variant>/seed<s>/stage<j>/eval/         task<i>/ for every task, probes/
  continual.json  continual.md  continual.png   the aggregate

A stage already evaluated is kept, so an interrupted stream goes on where it stopped when called
again with the same --out (the settings are checked: smf_ds.experiment.outdir).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import ConfigError, load_config
from ..eval.runner import EvalSettings, run_tasks
from ..owner import owning
from ..parallel.process_group import barrier, get_rank, init_process_group
from ..train.methods import Start, method_of
from ..train.rundir import TRAIN_SUMMARY, read_run_summary, run_finished
from .jobs import (ANSWER_CONTINUATION, BASE_STEPS, TASK_STEPS, VARIANTS, background_then_train, eval_settings,
                   load_for_eval, prepare_world, pretrain_base, variant_overrides)
from .outdir import claim
from .stats import paired_delta, per_example

log = logging.getLogger(__name__)

VARIANTS_DEFAULT = ("smf-tfidf", "lora", "full")
PROBES = ("triviaqa", "wikitext")
SUMMARY = "summary.json"


def split_task(world: dict[str, Path], k: int, out: Path) -> list[dict[str, Path]]:
    """Deal the world's diseases into k tasks (disease i to task i mod k; both of its questions,
    in training and test alike); each task's train and test files."""
    tasks = [{"train": out / f"task{j}" / "medmcqa_train.jsonl", "test": out / f"task{j}" / "medmcqa_test.jsonl"}
             for j in range(k)]
    if get_rank() == 0:
        for split in ("train", "test"):
            rows = [json.loads(line) for line in world[f"medmcqa_{split}"].read_text().splitlines() if line.strip()]
            diseases = sorted({int(row["id"].split("_")[2]) for row in rows})
            if len(diseases) < k:
                raise ConfigError(f"--tasks {k}: the world has {len(diseases)} diseases to deal into tasks")
            for j, task in enumerate(tasks):
                task[split].parent.mkdir(parents=True, exist_ok=True)
                task[split].write_text("".join(json.dumps(row) + "\n" for row in rows
                                               if int(row["id"].split("_")[2]) % k == j))
    barrier()
    return tasks


class Stream:
    def __init__(self, out: Path, k: int, quick: bool, world_seed: int) -> None:
        self.out, self.k, self.mode, self.world_seed = out, k, "quick" if quick else "full", world_seed
        self.steps = max(TASK_STEPS[self.mode] // 2, 1)  # per task, whatever K: half the whole task's steps
        self.world = self.base = self.tasks = None

    def settings(self) -> dict:
        return {"setup": "continual", "mode": self.mode, "tasks": self.k, "steps_per_task": self.steps,
                "base_steps": BASE_STEPS[self.mode], "world_seed": self.world_seed}

    def prepare(self) -> None:
        from ..data.synthetic_world import WorldSpec

        self.world = prepare_world(self.out / "world", WorldSpec(seed=self.world_seed))
        self.base = pretrain_base(self.world, self.out / "base", BASE_STEPS[self.mode])
        self.tasks = split_task(self.world, self.k, self.out / "tasks")

    def _eval_settings(self, task: int | None) -> EvalSettings:
        settings = eval_settings(self.world)
        if task is not None:
            settings.medmcqa = str(self.tasks[task]["test"])
        return settings

    def evaluate(self, start: Start, artifact: Path | None, eval_dir: Path, meta: dict) -> None:
        """Every task (eval_dir/task<i>/) and both probes (eval_dir/probes/)."""
        model, tokenizer = load_for_eval(start.model, artifact or start.adapter)
        for i in range(self.k):
            run_tasks(model, tokenizer, ["medmcqa"], self._eval_settings(i), eval_dir / f"task{i}", echo=None,
                      overwrite=True, meta={**meta, "task": i})
        run_tasks(model, tokenizer, list(PROBES), self._eval_settings(None), eval_dir / "probes", echo=None,
                  overwrite=True, meta=meta)
        barrier()

    def train_stage(self, variant: str, seed: int, stage: int, start: Start, run_dir: Path) -> Path:
        overrides = [*variant_overrides(self.world, Path(start.model), VARIANTS[variant], run_dir, self.steps, seed),
                     f"data.train={self.tasks[stage]['train']}"]

        def make_config(extra):
            cfg = load_config(overrides=overrides + extra)
            cfg.data.answer_continuation = ANSWER_CONTINUATION
            return cfg

        summary_path = run_dir / TRAIN_SUMMARY
        if run_finished(summary_path):
            return Path(read_run_summary(summary_path)["artifact"])
        return Path(background_then_train(make_config, run_dir, start.adapter)["artifact"])


def _evaluated(eval_dir: Path, k: int) -> bool:
    return all((eval_dir / f"task{i}" / SUMMARY).is_file() for i in range(k)) and (eval_dir / "probes" / SUMMARY).is_file()


def run_stream(stream: Stream, variant: str, seed: int) -> None:
    start = Start(str(stream.base))
    for stage in range(stream.k):
        stage_dir = stream.out / "runs" / variant / f"seed{seed}" / f"stage{stage}"
        artifact = stream.train_stage(variant, seed, stage, start, stage_dir)
        if not _evaluated(stage_dir / "eval", stream.k):
            stream.evaluate(start, artifact, stage_dir / "eval", {"model": variant, "seed": seed, "stage": stage})
        cfg = load_config(overrides=VARIANTS[variant])
        start = method_of(cfg).continued(start, artifact, stage_dir / "continued")


def run_continual(out: str | Path = "runs/continual", tasks: int = 4, variants: Sequence[str] | None = None,
                  seeds: Sequence[int] | None = None, quick: bool = False, world_seed: int = 0) -> dict:
    out = Path(out)
    variants = list(variants or VARIANTS_DEFAULT)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"--methods: expected a comma-separated list of {list(VARIANTS)}, got {unknown or variants}")
    from ..data.synthetic_world import WorldSpec

    if not 2 <= tasks <= WorldSpec().diseases:  # a task is at least one disease
        raise ConfigError(f"--tasks: expected 2 to {WorldSpec().diseases} tasks (the world's diseases, dealt out), "
                          f"got {tasks}")
    seeds = list(seeds or (0, 1, 2))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct integers, got {seeds}")
    init_process_group()
    stream = Stream(out, tasks, quick, world_seed)
    with owning(out, "continual", "--out"):
        claim(out, {**stream.settings(), "variants": {v: VARIANTS[v] for v in variants}})
        stream.prepare()
        if not _evaluated(out / "base_eval", tasks):
            stream.evaluate(Start(str(stream.base)), None, out / "base_eval", {"model": "base"})
        for variant in variants:
            for seed in seeds:
                run_stream(stream, variant, seed)
        results = {}
        if get_rank() == 0:
            results = aggregate_stream(out, tasks, variants, seeds)
            results["settings"] = stream.settings()
            (out / "continual.json").write_text(json.dumps(results, indent=2))
            write_continual_report(results, out)
        barrier()
    return results


def _delta(base_dir: Path, run_dirs: list[Path], task: str, n_boot: int) -> dict:
    keys, base_values, tokens = per_example(base_dir, task)
    runs = []
    for directory in run_dirs:
        run_keys, values, _ = per_example(directory, task)
        if run_keys != keys:
            raise ValueError(f"{directory}/{task}.predictions.jsonl: its examples differ from the base model's")
        runs.append(values)
    return paired_delta(base_values, np.stack(runs), tokens, n_boot)


def aggregate_stream(out: Path, k: int, variants: Sequence[str], seeds: Sequence[int], n_boot: int = 1000) -> dict:
    """Per variant and stage: each task's accuracy change against the base (paired over the task's
    questions, averaged over seeds), the mean over the tasks learned so far, and the probes'."""
    results = {"tasks": k, "seeds": list(seeds), "n_boot": n_boot, "variants": {}}
    base = out / "base_eval"
    for variant in variants:
        stages = []
        for stage in range(k):
            evals = [out / "runs" / variant / f"seed{s}" / f"stage{stage}" / "eval" for s in seeds]
            row = {f"task{i}": _delta(base / f"task{i}", [e / f"task{i}" for e in evals], "medmcqa", n_boot)
                   for i in range(k)}
            row.update({probe: _delta(base / "probes", [e / "probes" for e in evals], probe, n_boot)
                        for probe in PROBES})
            # The mean over tasks 0..stage of their questions: one paired delta over their union.
            row["learned"] = _delta_of_union(base, evals, range(stage + 1), n_boot)
            stages.append(row)
        results["variants"][variant] = stages
    return results


def _delta_of_union(base: Path, evals: list[Path], tasks: range, n_boot: int) -> dict:
    base_values = np.concatenate([per_example(base / f"task{i}", "medmcqa")[1] for i in tasks])
    runs = np.stack([np.concatenate([per_example(e / f"task{i}", "medmcqa")[1] for i in tasks]) for e in evals])
    return paired_delta(base_values, runs, None, n_boot)


def _cell(delta: dict) -> str:
    lo, hi = delta["ci95"]
    return f"{delta['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]" + ("" if lo <= 0 <= hi else " *")


def write_continual_report(results: dict, out: Path) -> Path:
    plot = plot_continual(results, out / "continual.png")
    k = results["tasks"]
    lines = ["# Continual learning", "",
             f"{k} tasks learned one after another (each a {1}/{k} share of the world's diseases), each stage "
             f"from the model the stage before left; seeds {results['seeds']}, all from one base model. Δ against "
             "the base model on the same examples, mean over seeds; the 95% interval is a paired bootstrap over the "
             "examples only (not over base models: one base; see `smf-ds experiment`'s base per seed); * "
             "excludes 0.", "",
             "| variant | after task | Δ task 1 acc | Δ mean acc of tasks learned | Δ WikiText ppl | Δ TriviaQA acc |",
             "|---|---|---|---|---|---|"]
    for variant, stages in results["variants"].items():
        for stage, row in enumerate(stages):
            lines.append(f"| {variant} | {stage + 1} | {_cell(row['task0'])} | {_cell(row['learned'])} | "
                         f"{_cell(row['wikitext'])} | {_cell(row['triviaqa'])} |")
    lines += ["", f"![forgetting curves]({plot.name})", ""]
    path = out / "continual.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_continual(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("task0", "Δ task 1 accuracy"), ("learned", "Δ accuracy, tasks learned so far"),
              ("wikitext", "Δ WikiText perplexity"), ("triviaqa", "Δ TriviaQA accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    stages = np.arange(1, results["tasks"] + 1)
    for ax, (key, label) in zip(axes, panels):
        for variant, rows in results["variants"].items():
            value = np.array([r[key]["value"] for r in rows])
            lo, hi = (np.array([r[key]["ci95"][i] for r in rows]) for i in (0, 1))
            ax.plot(stages, value, marker="o", label=variant)
            ax.fill_between(stages, lo, hi, alpha=0.2)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("after task")
        ax.set_xticks(stages)
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
