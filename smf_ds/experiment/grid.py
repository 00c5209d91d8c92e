"""`smf-ds experiment`: every variant x every seed, evaluated, aggregated with paired intervals,
plotted and reported, from one command; on the embedded synthetic world by default, or on a
user's model and data with --config (smf_ds.experiment.setups).

Layout of <out> (each rank runs the same code; rank 0 writes):
  world/  base/seed<k>/                        the synthetic world and seed k's pretrained base (default;
                                               base/ itself with --bases shared)
  retrofit/seed<k>/                            the memory retrofit of seed k (--config, retrofit: true)
  base_eval/  (base_eval/seed<k>/)             the base model's evaluation (seed k's base's)
  runs/<variant>/seed<k>/                      one finetuning run (config, TensorBoard, artifact)
  runs/<variant>/seed<k>/eval/                 its evaluation (per-example predictions)
  results.json  report.md  tradeoff.png        the aggregate (smf_ds.experiment.stats / report)
  setup.json  report_settings.json             the settings the runs were made with; how to report them

A run whose evaluation is already there is not redone, and one whose training finished is only
evaluated: an interrupted experiment continues where it stopped when called again with the
same --out (a run cut short resumes from its checkpoint). `smf-ds report --out DIR` rebuilds
results.json, report.md and the plot from the evaluations present.

With --jobs N (synthetic world), N worker processes pretrain and evaluate the bases and make the
runs side by side, with the results of one process (each run seeds itself); this process keeps
--out, and writes the report.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import re
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Sequence

import torch

from ..config import ConfigError, InputError
from ..owner import owning
from ..parallel.process_group import barrier, get_rank, get_world_size, init_process_group
from ..train import stop
from .frontier import method_of
from .outdir import claim
from .report import results_table, write_report
from .setups import ConfigSetup, WorldSetup, load_experiment_config
from .stats import aggregate

log = logging.getLogger(__name__)

SUMMARY = "summary.json"  # what an evaluation leaves (smf_ds.eval.runner)


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed{seed}"


def base_eval_dirs(out: Path, per_seed_bases: bool, seeds: Sequence[int] | None = None) -> Path | dict[int, Path]:
    """The base model's eval dir, or {seed: its base's eval dir} (every one present when seeds is None)."""
    if not per_seed_bases:
        return out / "base_eval"
    if seeds is None:
        seeds = sorted(int(p.name[len("seed"):]) for p in (out / "base_eval").glob("seed*")
                       if re.fullmatch(r"seed\d+", p.name) and (p / SUMMARY).is_file())
    return {seed: out / "base_eval" / f"seed{seed}" for seed in seeds}


def run_one(setup, out: Path, variant: str, seed: int) -> Path:
    """Train (unless done) and evaluate (unless done) one run; its eval dir."""
    directory = run_dir(out, variant, seed)
    eval_dir = directory / "eval"
    if (eval_dir / SUMMARY).is_file():
        log.info("%s seed %d: evaluated already, kept", variant, seed)
        return eval_dir
    from ..train.rundir import read_run_summary, run_finished, TRAIN_SUMMARY

    summary_path = directory / TRAIN_SUMMARY
    if run_finished(summary_path):
        artifact = Path(read_run_summary(summary_path)["artifact"])
    else:
        artifact = setup.finetune(variant, seed, directory)
    setup.evaluate(artifact, eval_dir, {"model": variant, "seed": seed}, seed=seed)
    return eval_dir


def collect_runs(out: Path, order: Sequence[str] = ()) -> tuple[dict[str, dict[int, Path]], list[str]]:
    """(variant -> {seed: eval dir} for every finished evaluation under <out>/runs, `order` first;
    the run dirs ("variant/seed<k>") there that are not evaluated)."""
    names = [*order, *sorted(p.name for p in (out / "runs").glob("*") if p.is_dir() and p.name not in order)]
    runs: dict[str, dict[int, Path]] = {}
    unevaluated: list[str] = []
    for variant in names:
        for seed_dir in sorted((out / "runs" / variant).glob("seed*")):
            if not re.fullmatch(r"seed\d+", seed_dir.name):
                log.warning("%s: not a run dir (runs/<variant>/seed<k>): ignored", seed_dir)
                continue
            if (seed_dir / "eval" / SUMMARY).is_file():
                runs.setdefault(variant, {})[int(seed_dir.name[len("seed"):])] = seed_dir / "eval"
            else:
                unevaluated.append(f"{variant}/{seed_dir.name}")
                log.warning("%s: not evaluated (interrupted?): left out of the report; `smf-ds experiment` with "
                            "the same --out finishes it", seed_dir)
    return runs, unevaluated


REPORT_SETTINGS = "report_settings.json"


def _write_json(path: Path, value) -> None:
    if get_rank() == 0:
        path.write_text(json.dumps(value, indent=2))


def _planned_runs(out: Path) -> list[str]:
    """The runs ("variant/seed<k>") every `smf-ds experiment` call on this dir set out to make."""
    try:
        return list(json.loads((out / REPORT_SETTINGS).read_text()).get("planned", []))
    except (OSError, ValueError):
        return []


def _recorded_report_settings(out: Path) -> tuple[dict, list[str]]:
    """(settings, variant order) that `smf-ds experiment` recorded for its report (report_settings.json)."""
    try:
        recorded = json.loads((out / REPORT_SETTINGS).read_text())
        return recorded["settings"], recorded["order"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"--out {out}: no readable {REPORT_SETTINGS} to tell how the experiment evaluates (MedMCQA "
                          f"mode, steps, data); run `smf-ds experiment` with this --out again, which reuses the "
                          f"finished runs and writes the report") from None


def build_report(out: str | Path, settings: dict | None = None, order: Sequence[str] = (),
                 n_boot: int = 1000) -> dict:
    """Aggregate the evaluations under `out`; write results.json, report.md and tradeoff.png."""
    out = Path(out)
    if settings is None:  # `smf-ds report`: the settings the experiment recorded
        settings, order = _recorded_report_settings(out)
    bases = base_eval_dirs(out, settings.get("bases") == "per seed")
    if not bases or (isinstance(bases, Path) and not (bases / SUMMARY).is_file()):
        where = f"{out}/base_eval/seed<k>/{SUMMARY}" if isinstance(bases, dict) else f"{out}/base_eval/{SUMMARY}"
        raise ConfigError(f"--out {out}: no base-model evaluation ({where}); is it an experiment dir?")
    previous = out / "results.json"
    runs, unevaluated = collect_runs(out, order)
    if not runs:
        raise ConfigError(f"--out {out}: no evaluated run under {out}/runs to report on")
    boot = settings.get("eval") or {}  # an experiment config's eval settings set the paired intervals too
    try:
        results = aggregate(bases, runs, medmcqa_mode=settings.get("medmcqa_mode", "answer"),
                            n_boot=boot.get("n_boot", n_boot), seed=boot.get("boot_seed", 0))
    except (OSError, ValueError, KeyError) as err:  # a damaged or hand-edited evaluation
        raise ConfigError(f"--out {out}: cannot aggregate the evaluations: {err}. To evaluate a damaged run "
                          f"again, remove its eval/ dir; if the evaluation data changed, remove {out}/base_eval "
                          f"and every run's eval/ dir ({out}/runs/*/seed*/eval); then run `smf-ds experiment` "
                          f"with this --out") from None
    results["settings"] = settings
    evaluated = {f"{variant}/seed{seed}" for variant, seeds in runs.items() for seed in seeds}
    results["not_in_report"] = {  # a grid cut short, or still running: say what the report lacks
        "unevaluated_runs": [name for name in dict.fromkeys([*_planned_runs(out), *unevaluated])
                             if name not in evaluated],
        "variants_without_runs": [v for v in order if v not in runs]}
    _write_json(previous, results)
    write_report(results, out)
    return results


def run_experiment(out: str | Path = "runs/experiment", variants: Sequence[str] | None = None,
                   seeds: Sequence[int] | None = None, quick: bool = False, config: str | None = None,
                   world_seed: int | None = None, sweep: bool = False, ablation: bool = False,
                   bases: str | None = None, jobs: int = 1) -> dict:
    """`variants` / `seeds` default to the setup's (all variants; the config's seeds, or 0, 1, 2); a
    swept method's name stands for all its points. `world_seed` picks the synthetic world (default
    0); `sweep` runs the world's default sweep (WORLD_SWEEP; a config has its own `sweep:`); `ablation`
    adds smf-paper and its corrections (smf_ds.experiment.ablation); `bases`: a base model per seed
    ("per-seed", the world's default) or one for all ("shared"); `jobs`: how many runs go side by
    side, each in a worker process of its own (synthetic world; the results are those of jobs=1)."""
    out = Path(out)
    if jobs < 1:
        raise ConfigError(f"--jobs: expected a number of worker processes, 1 or more, got {jobs!r}")
    if config and jobs > 1:  # its SMF variants of one seed share a retrofit that the first one makes
        raise ConfigError(f"--jobs {jobs}: runs the synthetic world's small runs side by side, not with --config "
                          f"(a run of your model has the machine to itself; run it without --jobs)")
    if config:
        for flag, value in (("--quick", quick or None), ("--world-seed", world_seed), ("--sweep", sweep or None),
                            ("--ablation", ablation or None), ("--bases", bases)):
            if value is not None:
                raise ConfigError(f"{flag}: applies to the embedded synthetic world only, not with --config "
                                  f"(set train.steps or seeds in the experiment config)")
        exp = load_experiment_config(config)
        setup, seeds = ConfigSetup(exp, out), list(seeds or exp.seeds)
    else:
        setup = WorldSetup(out, quick, world_seed or 0, sweep, ablation, bases or "per-seed")
        seeds = list(seeds or (0, 1, 2))
    asked = [v.strip() for v in (variants or setup.variants) if v.strip()]
    variants = [v for v in setup.variants if v in asked or method_of(v) in asked]
    unknown = [v for v in asked if v not in setup.variants and v not in map(method_of, setup.variants)]
    if unknown or not variants:
        choices = list(dict.fromkeys([*map(method_of, setup.variants), *setup.variants]))
        raise ConfigError(f"--methods: expected a comma-separated list of {choices}, got {unknown or asked}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct integers, got {seeds}")
    init_process_group()
    if ablation and get_world_size() > 1:  # said now, not after the other variants' runs
        raise ConfigError(f"--ablation: smf-paper counts background document frequency per document, which runs in "
                          f"one process; run the ablation without a launcher (got {get_world_size()} processes)")
    if jobs > 1 and get_world_size() > 1:
        raise ConfigError(f"--jobs {jobs}: under a launcher every run already spans its {get_world_size()} "
                          f"processes; use --jobs without a launcher, or the launcher without --jobs")
    with owning(out, "experiment", "--out"):  # one experiment writes into --out at a time
        return _run_grid(out, setup, variants, seeds, jobs)


def _evaluate_base(setup, seed: int | None, eval_dir: Path) -> None:
    if not (eval_dir / SUMMARY).is_file():
        setup.evaluate(None, eval_dir, {"model": "base", **({} if seed is None else {"seed": seed})}, seed=seed)


def _run_grid(out: Path, setup, variants: list[str], seeds: list[int], jobs: int = 1) -> dict:
    claim(out, setup.fingerprint())
    setup.prepare()
    # Recorded before any run, so that `smf-ds report` can report the runs of a grid cut short,
    # and say which of the runs asked for (now and by earlier calls) it lacks.
    planned = list(dict.fromkeys([*_planned_runs(out), *(f"{v}/seed{s}" for v in variants for s in seeds)]))
    _write_json(out / REPORT_SETTINGS, {"settings": setup.settings(), "order": list(setup.variants), "planned": planned})
    bases = base_eval_dirs(out, setup.per_seed_bases, seeds)
    if jobs > 1:
        _run_in_workers(out, setup, bases, variants, seeds, jobs)
    else:
        for seed, eval_dir in (bases.items() if isinstance(bases, dict) else [(None, bases)]):
            _evaluate_base(setup, seed, eval_dir)
        for variant in variants:
            for seed in seeds:
                run_one(setup, out, variant, seed)
    results = None
    if get_rank() == 0:
        results = build_report(out, setup.settings(), order=list(setup.variants))
        log.info("experiment results (%s):\n%s", out / "report.md", results_table(results))
    barrier()
    return results or {}


def _run_in_workers(out: Path, setup, bases: Path | dict[int, Path], variants: list[str], seeds: list[int],
                    jobs: int) -> None:
    """The grid in `jobs` worker processes: each base pretrained and evaluated, then the runs that
    finetune it, slowest variants first (smf-paper's), each run as soon as a worker is free. A
    failure, or a stop signal, starts no further run; the runs under way finish and stay.

    A scheduler's stop signal reaches the workers too (a slurm step's every process): a training
    run saves and stops (its Trainer listens), anything else in a worker ends with the worker, and
    the command raises Stopped, as the grid one run at a time does."""
    base_jobs = list(bases.items()) if isinstance(bases, dict) else [(None, bases)]
    order = sorted(variants, key=lambda v: not v.startswith("smf-paper"))
    # spawn, not fork: a forked child would inherit the parent's process group and torch's thread pool.
    # The setup goes as it is, prepared: a worker must not build the world the other workers read.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(setup, logging.getLogger().getEffectiveLevel())) as pool:
        # each job: (what it is, the seeds whose runs can start once it is done)
        pending = {pool.submit(_in_worker, _base_job, seed, eval_dir):
                   ("the base model", seeds) if seed is None else (f"seed {seed}'s base model", [seed])
                   for seed, eval_dir in base_jobs}
        stopped_in_worker = None  # "<what>: <its RunStopped>" of a run stopped in its worker
        try:
            while pending and not stop.requested() and not stopped_in_worker:
                done, _ = wait(pending, timeout=5, return_when=FIRST_COMPLETED)  # timeout: to see a stop signal
                for future in done:
                    what, ready = pending.pop(future)
                    try:
                        future.result()
                    except stop.Stopped as err:
                        stopped_in_worker = f"{what}: {err}"
                    except InputError as err:
                        raise InputError(f"{what}: {err}") from None
                    except Exception as err:
                        if stop.requested():  # the signal that stops this process ended the worker too
                            break
                        raise RuntimeError(f"{what}: {err}; the finished runs are kept: run the same command "
                                           f"again to continue") from err
                    if stop.requested() or stopped_in_worker:
                        continue  # stopped, or a base made as the stop came: its runs wait for the next call
                    pending.update({pool.submit(_in_worker, run_one, out, variant, seed): (f"{variant} seed {seed}", [])
                                    for variant in order for seed in ready})
        finally:
            pool.shutdown(cancel_futures=True)
    if stop.requested():
        raise stop.Stopped(f"stopped on {stop.requested()}: no further run started; run the same command again to "
                           f"continue (the runs stopped midway resume from their checkpoints)")
    if stopped_in_worker:
        raise stop.Stopped(f"{stopped_in_worker}; no further run started: run the same command again to continue")


_setup = None  # a worker process's setup (_start_worker)


def _start_worker(setup, log_level: int) -> None:
    global _setup
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # tiny models: one thread per run, the runs side by side on the cores
    init_process_group()  # a group of one, as the parent's: DeepSpeed runs unlaunched
    _setup = setup


def _base_job(setup, seed: int | None, eval_dir: Path) -> None:
    setup.base(seed)  # made here, before the runs that read it start side by side
    _evaluate_base(setup, seed, eval_dir)


def _in_worker(job, *args) -> None:
    try:
        job(_setup, *args)
    except InputError as err:  # sent back as a type that pickles (RunStopped does not); InputError stays one
        raise InputError(str(err)) from None
    except stop.Stopped as err:
        raise stop.Stopped(str(err)) from None
    except Exception as err:
        raise RuntimeError(f"{type(err).__name__}: {err}") from err
    finally:
        # Between jobs a worker takes signals as any process does: the pool ends a worker with
        # SIGTERM, which the handler a run's Trainer installed would only note.
        stop.stop_listening()
