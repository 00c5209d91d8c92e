"""What an experiment runs on: the embedded synthetic world (the default), or a user's own
model and data from an experiment config (`smf-ds experiment --config exp.yaml`).

A setup prepares the base model once, finetunes one variant with one seed into a run dir
(returning the artifact to evaluate), and evaluates the base or an artifact into an eval dir.

An experiment config (YAML; unknown keys are errors that name them):

  run: qwen.yaml              # the run config every variant starts from (smf-ds train's --config)
  seeds: [0, 1, 2]
  variants:                   # name: key=value overrides on the run config ({}: DEFAULT_VARIANTS)
    smf-kl: [train.method=smf, sparse.scoring=kl]
    lora: [train.method=lora, train.lr=2.0e-4]
  sweep:                      # optional: each combination a variant <name>@<key>=<value>,... (a
    lora: {train.lr: [1.0e-4, 3.0e-4]}    # frontier for each method, in the report; smf_ds.experiment.sweep)
  retrofit: true              # SMF variants start from `smf-ds retrofit` of their seed's memory
  eval: {medmcqa_split: validation, limit: {triviaqa: 2000}}   # smf-ds eval's settings; n_boot and
                              # boot_seed also set the report's paired intervals (default 1000, 0)

Per seed, the seed sets train.seed and memory.seed; SMF variants share that seed's retrofit
(<out>/retrofit/seed<k>/) and compute their own background statistics where their rule needs them.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, load_config
from ..model_source import model_source
from ..eval.runner import TASKS, EvalSettings, run_tasks
from ..train.methods import method_of
from .ablation import ablation_variants
from .jobs import (BASE_STEPS, MEDMCQA_MODES, SMF_MEMORY, TASK_STEPS, VARIANTS, WORLD_SWEEP, background_then_train,
                   evaluate, finetune, load_for_eval, prepare_world, pretrain_base)
from .sweep import expand_sweep

DEFAULT_VARIANTS: dict[str, list[str]] = {
    "smf-tfidf": ["train.method=smf", "sparse.scoring=tfidf"],
    "smf-kl": ["train.method=smf", "sparse.scoring=kl"],
    "smf-dense-accessed": ["train.method=smf", "sparse.scoring=dense-accessed"],
    "smf-dense-all": ["train.method=smf", "sparse.scoring=dense-all"],
    "lora": ["train.method=lora"],
    "full": ["train.method=full"],
}


@dataclass
class ExperimentConfig:
    run: str = ""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: dict[str, list[str]] = field(default_factory=dict)
    sweep: dict[str, dict[str, list]] = field(default_factory=dict)
    retrofit: bool = True
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self, prefix: str = "") -> None:
        if not self.run:
            raise ConfigError("run: expected the path of a run config (YAML), got ''")
        if not Path(self.run).is_file():
            raise ConfigError(f"run: {self.run}: not found")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: expected distinct integers, got {self.seeds}")


BASES = ("per-seed", "shared")


class WorldSetup:
    """The embedded synthetic world: smf_ds.experiment.jobs. With bases="per-seed" (the default),
    seed k finetunes a base pretrained with seed k (<out>/base/seed<k>/), so that the seeds vary
    the base model as well as the finetuning; "shared": one base (<out>/base/) for every seed."""

    def __init__(self, out: Path, quick: bool = False, world_seed: int = 0, sweep: bool = False,
                 ablation: bool = False, bases: str = "per-seed") -> None:
        if bases not in BASES:
            raise ConfigError(f"--bases: expected one of {list(BASES)}, got {bases!r}")
        self.out, self.mode, self.world_seed = out, "quick" if quick else "full", world_seed
        paper = ablation_variants(SMF_MEMORY, TASK_STEPS[self.mode]) if ablation else {}
        self.variants = expand_sweep({**VARIANTS, **paper}, WORLD_SWEEP if sweep else {})
        self.per_seed_bases = bases == "per-seed"
        self.world = None

    def prepare(self) -> None:
        from ..data.synthetic_world import WorldSpec

        self.world = prepare_world(self.out / "world", WorldSpec(seed=self.world_seed))

    def base(self, seed: int | None) -> Path:
        """The base model that seed finetunes (pretrained on first use, kept after)."""
        if not self.per_seed_bases:
            return pretrain_base(self.world, self.out / "base", BASE_STEPS[self.mode])
        if seed is None:
            raise ValueError("a base per seed: say which seed's base")
        return pretrain_base(self.world, self.out / "base" / f"seed{seed}", BASE_STEPS[self.mode], seed=seed)

    def finetune(self, variant: str, seed: int, run_dir: Path) -> Path:
        return Path(finetune(self.world, self.base(seed), self.variants[variant], run_dir, TASK_STEPS[self.mode],
                             seed)["artifact"])

    def evaluate(self, artifact: Path | None, eval_dir: Path, meta: dict, seed: int | None = None) -> dict:
        return evaluate(self.world, self.base(seed), artifact, eval_dir, meta)

    def fingerprint(self) -> dict:
        """What the runs in the output directory depend on (smf_ds.experiment.outdir)."""
        return {"setup": "synthetic world", "mode": self.mode, **self.settings(), "variants": self.variants}

    def settings(self) -> dict:
        return {"steps": TASK_STEPS[self.mode], "base_steps": BASE_STEPS[self.mode],
                "data": f"embedded synthetic world (seed {self.world_seed})", "world_seed": self.world_seed,
                "bases": "per seed" if self.per_seed_bases else "shared", "medmcqa_mode": MEDMCQA_MODES[0]}


class ConfigSetup:
    """A user's model and data: every variant is `smf-ds train` of the run config plus its overrides."""

    per_seed_bases = False  # the user's model is the one base of every seed

    def __init__(self, exp: ExperimentConfig, out: Path) -> None:
        self.exp, self.out = exp, out
        self.variants = expand_sweep(dict(exp.variants or DEFAULT_VARIANTS), exp.sweep)
        run = load_config(exp.run)
        self.base = run.model.name_or_path
        for name, overrides in self.variants.items():  # a typo fails now, not after hours of other runs
            try:
                load_config(exp.run, overrides)
            except ConfigError as err:
                raise ConfigError(f"variant {name}: {err}") from None
        trained, scored = run.data.answer_continuation, exp.eval.medmcqa_prompt.answer_continuation
        if trained != scored:  # the task would be scored on another text than the one learned
            raise ConfigError(f"eval.medmcqa_prompt.answer_continuation={scored!r} differs from the run config's "
                              f"data.answer_continuation={trained!r} ({exp.run}); set both alike")

    def prepare(self) -> None:
        if not self.base:
            raise ConfigError(f"run: {self.exp.run}: model.name_or_path is empty")
        try:  # a mistyped local path fails here, named as the run config's field
            model_source(self.base)
        except OSError as err:
            raise ConfigError(f"run: {self.exp.run}: model.name_or_path={self.base!r}: {err} "
                              f"(relative paths are from the working directory)") from None

    def _config(self, overrides: list[str], seed: int, run_dir: Path):
        return load_config(self.exp.run, [*overrides, f"train.seed={seed}", f"memory.seed={seed}", f"out_dir={run_dir}"])

    def _retrofit(self, seed: int) -> Path:
        from ..train.rundir import read_run_summary, RETROFIT_SUMMARY, run_finished
        from ..train.retrofit import retrofit_main

        run_dir = self.out / "retrofit" / f"seed{seed}"
        summary = run_dir / RETROFIT_SUMMARY
        if run_finished(summary):  # done before: every rank sees the file (rank 0 writes it only after its run)
            return Path(read_run_summary(summary)["artifact"])
        # a retrofit cut short resumes from its checkpoint, as the finetunes do
        return Path(retrofit_main(self._config(["train.method=smf"], seed, run_dir), resume=True)["artifact"])

    def finetune(self, variant: str, seed: int, run_dir: Path) -> Path:
        overrides = list(self.variants[variant])
        adapter = None
        if self.exp.retrofit and method_of(self._config(overrides, seed, run_dir)).uses_memory:
            adapter = str(self._retrofit(seed))
        summary = background_then_train(lambda extra: self._config([*overrides, *extra], seed, run_dir), run_dir,
                                        adapter)
        return Path(summary["artifact"])

    def evaluate(self, artifact: Path | None, eval_dir: Path, meta: dict, seed: int | None = None) -> dict:
        model, tokenizer = load_for_eval(self.base, artifact, f"run: {self.exp.run}: model.name_or_path={self.base!r}")
        return run_tasks(model, tokenizer, TASKS, self.exp.eval, eval_dir, echo=None, overwrite=True,
                         meta={**meta, "artifact": str(artifact or self.base)})

    def fingerprint(self) -> dict:
        """What the runs in the output directory depend on: the resolved run config (not its file
        name), retrofit, eval settings, each variant's overrides (smf_ds.experiment.outdir), and the
        content of its local data files (a file changed in place would otherwise leave finished
        runs and evaluations of the old data standing beside new ones)."""
        config = load_config(self.exp.run)
        run = dataclasses.asdict(config)
        run.pop("out_dir", None)
        sources = {"run.data.train": config.data.train, "run.data.background": config.data.background,
                   "run.retrofit.data": config.retrofit.data,
                   **{f"eval.{task}": getattr(self.exp.eval, task) for task in TASKS}}
        return {"setup": "config", "run": run, "retrofit": self.exp.retrofit, "eval": self.exp.eval.to_dict(),
                "variants": self.variants,
                "data_digests": {name: local_digest(source) for name, source in sources.items()
                                 if source and Path(source).expanduser().exists()}}

    def settings(self) -> dict:
        run = load_config(self.exp.run)
        return {"steps": run.train.steps, "data": run.data.train, "model": self.base, "run_config": self.exp.run,
                "retrofit": self.exp.retrofit, "medmcqa_mode": self.exp.eval.medmcqa_modes[0],
                "eval": self.exp.eval.to_dict()}


def local_digest(source: str) -> str:
    """sha256 of a local data file, or of every file under a data directory (names and bytes)."""
    root = Path(source).expanduser()
    digest = hashlib.sha256()
    for path in sorted(p for p in [root, *root.rglob("*")] if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_experiment_config(path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    try:
        exp = load_config(path, overrides, cls=ExperimentConfig)
    except ConfigError as err:
        raise ConfigError(str(err) if str(path) in str(err) else f"experiment config {path}: {err}") from None
    # A relative run config is found next to the experiment config first.
    if exp.run and not Path(exp.run).is_absolute() and (Path(path).parent / exp.run).is_file():
        exp = dataclasses.replace(exp, run=str(Path(path).parent / exp.run))
    try:
        exp.validate()
        _check_eval_sources(exp.eval, Path(path).parent)
    except ConfigError as err:
        raise ConfigError(f"experiment config {path}: {err}") from None
    return exp


def _check_eval_sources(settings: EvalSettings, config_dir: Path) -> None:
    """A mistyped local eval file fails now, by its key, not after the base model has loaded.
    Relative paths are from the working directory (as in run configs); only `run:` is looked up
    next to the experiment config."""
    from ..train.inputs import check_data_paths

    for task in TASKS:
        source = getattr(settings, task)
        try:
            check_data_paths(**{f"eval.{task}": source})
        except ConfigError as err:
            beside = config_dir / source
            hint = f"; it exists next to the experiment config: write {beside}" if beside.exists() else ""
            raise ConfigError(f"{err}{hint}") from None
