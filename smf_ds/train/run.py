"""`smf-ds train` and `smf-ds background`: from a run config to a trained model / stats file."""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import (ConfigError, DataConfig, MemoryConfig, SMFConfig, SparseConfig,
                      TrainConfig, background_needed, save_config)
from ..data.medmcqa import MedMCQAPrompt, load_medmcqa
from ..data.loading import DataSourceError, missing_local_source
from ..data.oasst import load_oasst_texts
from ..files import naming_write_errors, replace_dir, write_text
from ..manifest import write_manifest
from ..memory.adapter import base_fingerprint, memory_fingerprint
from ..memory.inject import value_tables
from ..parallel.process_group import barrier, get_rank, get_world_size
from ..sparse.background import collect_background
from .batches import GlobalBatchOrder, collate, tokenize_prompt_answer, tokenize_text
from .build import check_background, load_background, load_run_model
from .checkpoint import fit_global_batch, latest_tag
from .loop import Trainer
from .methods import method_of
from .stop import RunStopped

log = logging.getLogger(__name__)


@contextmanager
def naming_the_field(field: str):
    """A data source that cannot be read is reported with the config field that named it."""
    try:
        yield
    except DataSourceError as err:
        raise ConfigError(f"{field}: {err}") from None


def task_rows(cfg: SMFConfig) -> list:
    """The run's MedMCQA examples, untokenized: read and checked before the model loads."""
    if not cfg.data.train:
        raise ConfigError("data.train: expected a MedMCQA-schema hub id or local file, got ''")
    with naming_the_field("data.train"):
        examples, report = load_medmcqa(cfg.data.train, split=cfg.data.train_split, limit=cfg.data.train_limit,
                                        seed=cfg.data.seed)
    if report.issues:
        log.warning("data.train=%s:\n%s", cfg.data.train, report.format())
    if not examples:
        filtered = f", {report.n_filtered} left out ({report.filtered_reason})" if report.n_filtered else ""
        raise ConfigError(f"data.train={cfg.data.train}: no usable MedMCQA row to train on ({report.n_rows} rows read, "
                          f"{report.n_malformed} malformed{filtered}); expected the MedMCQA schema (question, "
                          f"opa..opd, cop, choice_type)")
    return examples


def training_prompt(cfg: SMFConfig) -> MedMCQAPrompt:
    try:
        return MedMCQAPrompt(answer_continuation=cfg.data.answer_continuation)
    except ValueError as err:
        raise ConfigError(f"data.answer_continuation={cfg.data.answer_continuation!r}: {err}") from None


def task_examples(cfg: SMFConfig, tokenizer, examples: list | None = None) -> list[dict]:
    """Tokenized training pairs of `examples` (default: task_rows(cfg))."""
    prompt = training_prompt(cfg)
    examples = task_rows(cfg) if examples is None else examples
    pairs = (prompt.training_pair(ex, with_explanation=cfg.data.train_explanation) for ex in examples)
    return [tokenize_prompt_answer(tokenizer, prompt_text, answer, cfg.train.max_length) for prompt_text, answer in pairs]


def adopt_adapter_memory(cfg: SMFConfig, adapter_dir: str | None) -> SMFConfig:
    """With --memory-adapter the memory's shape comes from the adapter, whatever memory.* says:
    set those fields from it, so the run's saved config.yaml tells what was trained, and warn
    where the run config had set them otherwise."""
    if not adapter_dir or not method_of(cfg).uses_memory:
        return cfg
    from ..memory.adapter import STRUCTURAL_FIELDS, read_adapter_config

    saved, _ = read_adapter_config(adapter_dir)
    cfg, default = copy.deepcopy(cfg), MemoryConfig()  # the caller's config is left as given
    for name in STRUCTURAL_FIELDS:
        mine, theirs = getattr(cfg.memory, name), getattr(saved, name)
        if mine == theirs or (name == "v_dim" and mine is None):
            continue
        if mine != getattr(default, name):
            log.warning("memory.%s=%r is ignored: --memory-adapter %s has %s=%r", name, mine, adapter_dir, name, theirs)
        setattr(cfg.memory, name, theirs)
    return cfg


def text_examples(texts: list[str], tokenizer, max_length: int) -> list[dict]:
    return [e for e in (tokenize_text(tokenizer, t, max_length) for t in texts) if e["input_ids"]]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def background_texts(cfg: SMFConfig) -> list[str]:
    """The background's assistant replies: read and checked before the model loads."""
    if not cfg.data.background:
        raise ConfigError("data.background: expected an OASST1-schema hub id or local file, got ''")
    with naming_the_field("data.background"):
        texts = load_oasst_texts(cfg.data.background)
    if not texts:
        raise ConfigError(f"data.background={cfg.data.background}: no assistant reply to read (expected "
                          f"OASST1-schema messages: message_id, parent_id, role, text, lang, rank)")
    return texts


def compute_background(cfg: SMFConfig, model, tokenizer, out_path: str | Path, progress: bool = True,
                       texts: list[str] | None = None):
    """B background batches of the training global batch's size, split over ranks; saved as safetensors."""
    texts = background_texts(cfg) if texts is None else texts
    examples = text_examples(texts, tokenizer, cfg.train.max_length)
    if not examples:
        raise ConfigError(f"data.background={cfg.data.background}: no reply holds a token at train.max_length="
                          f"{cfg.train.max_length}")
    order = GlobalBatchOrder(len(examples), cfg.train.micro_batch_size, cfg.train.grad_accum,
                             get_world_size(), cfg.data.seed)
    batches = cfg.data.background_batches
    if batches * order.global_batch > len(examples):
        log.warning("data.background: %d batches of %d need %d texts, %s has %d: texts are reused",
                    batches, order.global_batch, batches * order.global_batch, cfg.data.background, len(examples))
    model.eval()
    device = _device(model)
    fingerprint, base = memory_fingerprint(model), base_fingerprint(model)

    def run_forward(step: int) -> None:
        for micro in range(cfg.train.grad_accum):
            batch = collate([examples[i] for i in order.indices(step, get_rank(), micro)], tokenizer.pad_token_id)
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))

    bar = None
    if progress and get_rank() == 0:
        from tqdm import tqdm

        bar = tqdm(total=batches, desc="background", unit="batch")
    stats = collect_background(value_tables(model), run_forward, range(batches), bar)
    stats.memory, stats.base = fingerprint, base
    if bar is not None:
        bar.close()
    if get_rank() == 0:
        stats.save(out_path)
    return stats


def default_background_path(cfg: SMFConfig) -> Path:
    """Where `smf-ds background` writes its stats (and `smf-ds train` looks when sparse.background is unset)."""
    return Path(cfg.out_dir) / "background.safetensors"


def background_main(cfg: SMFConfig, adapter_dir: str | None = None, out: str | None = None) -> Path:
    cfg = adopt_adapter_memory(cfg, adapter_dir)
    check_data_paths(**{"data.background": cfg.data.background})
    out_path = Path(out) if out else default_background_path(cfg)
    if out_path.is_dir():  # `--out DIR`: the stats go into it
        out_path = out_path / default_background_path(cfg).name
    if out_path.is_file() and out_path.resolve() == default_background_path(cfg).resolve():
        advice = f"its run may have trained with {out_path}, which this would replace; write the new stats " \
                 f"elsewhere (--out FILE) or into another out_dir"
        refuse_used_out_dir(cfg, advice)
        if run_finished(Path(cfg.out_dir) / TRAIN_SUMMARY):
            raise ConfigError(f"out_dir={cfg.out_dir}: holds a finished run ({TRAIN_SUMMARY}); {advice}")
    texts = background_texts(cfg)
    tokenizer, model = load_run_model(cfg, adapter_dir)
    compute_background(cfg, model, tokenizer, out_path, texts=texts)
    if get_rank() == 0:  # the config that produced the stats, next to them
        save_config(cfg, out_path.with_suffix(".config.yaml"))
    return out_path


def save_trained(trainer: Trainer, tokenizer, out_dir: Path) -> Path:
    """What a run leaves for evaluation: the memory adapter (smf), the LoRA adapter, or the model."""
    method = method_of(trainer.cfg)
    target = out_dir / method.artifact
    partial = out_dir / f".{method.artifact}.partial"  # renamed into place once whole: never half an artifact
    with naming_write_errors("", partial,
                             f"; nothing was saved as {target}, and the run's last checkpoint is intact"):
        if get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        method.save_artifact(trainer.model, tokenizer, partial)
        barrier()
        if get_rank() == 0:
            write_manifest(partial)  # what loading it checks
            replace_dir(partial, target)
    barrier()  # no rank reads the artifact (the demo, the experiment) before rank 0 has written it
    return target


def fit_and_save(trainer: Trainer, tokenizer, summary_name: str, progress: bool, **extra) -> dict:
    """Train, save the artifact, write <out_dir>/<summary_name> (rank 0); the summary. A run
    stopped on a signal writes a summary with "finished": false and what stopped it, then raises
    RunStopped; its interruptions stay listed in the summary once it finishes."""
    out_dir = Path(trainer.cfg.out_dir)
    summary_file = out_dir / summary_name
    earlier = json.loads(summary_file.read_text()).get("interruptions", []) if summary_file.is_file() else []
    try:
        result = trainer.fit(progress=progress)
    except RunStopped as stop:
        trainer.close()
        interruptions = [*earlier, {"signal": stop.signal_name, "step": stop.step, "checkpoint": stop.checkpoint}]
        if get_rank() == 0:
            write_text(summary_file, json.dumps({"finished": False, "steps": stop.step, "interruptions": interruptions,
                                                 "world_size": get_world_size(), **extra}, indent=2), "")
        raise
    artifact = save_trained(trainer, tokenizer, out_dir)
    trainer.close()
    summary = {"finished": True, "steps": result.steps,
               "first_loss": result.losses[0] if result.losses else None,
               "final_loss": result.losses[-1] if result.losses else None, "seconds": result.seconds,
               "tokens_per_second": result.tokens / result.seconds if result.seconds else None,
               "artifact": str(artifact), "world_size": get_world_size(), "interruptions": earlier,
               "master_addr": os.environ.get("MASTER_ADDR") if get_world_size() > 1 else None,
               "healthy": not result.health, "health": result.health, **extra}
    if get_rank() == 0:
        write_text(summary_file, json.dumps(summary, indent=2), "")
    return summary


def run_finished(summary_file: str | Path) -> bool:
    """A run dir's summary says the run finished (a run stopped on a signal writes one with
    "finished": false)."""
    summary_file = Path(summary_file)
    return summary_file.is_file() and json.loads(summary_file.read_text()).get("finished", True) is not False


def check_data_paths(**sources: str | None) -> None:
    """Fail on a mistyped local data path before the model is loaded (minutes on a cluster), naming
    the field: check_data_paths(**{"data.train": cfg.data.train})."""
    for field, source in sources.items():
        if source and missing_local_source(source):
            where = "" if Path(source).expanduser().is_absolute() else \
                f" (relative paths are from the working directory, {Path.cwd()})"
            raise ConfigError(f"{field}={source!r}: no such file or directory{where}")


def read_run_summary(summary_file: str | Path) -> dict:
    """A run's summary, its artifact found beside it: the artifact is saved into the run dir, and
    the path recorded then is stale once the dir has been moved or copied."""
    summary_file = Path(summary_file)
    summary = json.loads(summary_file.read_text())
    summary["artifact"] = str(summary_file.parent / Path(summary["artifact"]).name)
    return summary


def check_run_dir(cfg: SMFConfig, summary_name: str, resume: bool, command: str) -> None:
    """A run dir holds one run. Without resume, refuse one holding checkpoints or a finished run;
    with resume, refuse a finished run whose checkpoints are gone (nothing to go on from, and
    starting over would replace its results)."""
    finished = run_finished(Path(cfg.out_dir) / summary_name)
    if not resume:
        refuse_used_out_dir(cfg, f"pass --resume to continue it, or {command} into another out_dir")
        if finished:
            raise ConfigError(f"out_dir={cfg.out_dir}: holds a finished run ({summary_name}); {command} into "
                              f"another out_dir")
    elif finished and latest_tag(Path(cfg.out_dir) / "checkpoints") is None:
        raise ConfigError(f"out_dir={cfg.out_dir}: holds a finished run ({summary_name}) whose checkpoints were "
                          f"removed: nothing to resume from; {command} into another out_dir")


def refuse_used_out_dir(cfg: SMFConfig, advice: str) -> None:
    """A run dir holds one run: refuse to start another over an earlier run's checkpoints."""
    checkpoints = Path(cfg.out_dir) / "checkpoints"
    if latest_tag(checkpoints) is not None:
        raise ConfigError(f"out_dir={cfg.out_dir}: holds the checkpoints of an earlier run ({checkpoints}, latest "
                          f"{latest_tag(checkpoints)}); {advice}")


TRAIN_SUMMARY = "train_summary.json"
RETROFIT_SUMMARY = "retrofit_summary.json"
# The settings a retrofit derives from its retrofit.* section (retrofit_run_config): a resume's
# refusal names the retrofit.* setting alone.
RETROFIT_DERIVED_KEYS = ("train.method", "train.scope", "train.steps", "train.lr", "memory.value_lr",
                         "sparse.scoring", "sparse.optimizer", "sparse.weight_decay", "data.background")


def retrofit_run_config(cfg: SMFConfig) -> SMFConfig:
    """The run config a retrofit trains with: SMF, its scope, every value row every step
    (dense-all) with the retrofit's optimizer and learning rates, its step count."""
    run = copy.deepcopy(cfg)
    r = cfg.retrofit
    # What a retrofit never reads goes back to its default: the saved config then says what the
    # retrofit ran with, and a resume is not refused over a setting of the later sparse phase.
    run.data = DataConfig(background="" if r.data else cfg.data.background)
    run.sparse = SparseConfig(betas=cfg.sparse.betas, eps=cfg.sparse.eps, max_grad_norm=cfg.sparse.max_grad_norm)
    defaults = TrainConfig()
    run.train.lora_r, run.train.lora_alpha = defaults.lora_r, defaults.lora_alpha
    run.train.lora_dropout, run.train.lora_targets = defaults.lora_dropout, defaults.lora_targets
    run.train.method, run.train.scope = "smf", r.scope
    run.train.steps, run.train.lr = r.steps, r.lr
    run.sparse.scoring, run.sparse.optimizer, run.sparse.background = "dense-all", r.value_optimizer, None
    run.memory.value_lr = r.value_lr if r.value_lr is not None else r.lr
    run.sparse.weight_decay = 0.0  # sparse.weight_decay is the sparse phase's; the warm-up does not decay values
    return run


def retrofit_main(cfg: SMFConfig, adapter_dir: str | None = None, resume: bool = False,
                  progress: bool = True) -> dict:
    """Dense warm-up of the memory on general text; leaves <out_dir>/memory_adapter for
    `smf-ds background` and `smf-ds train` (--memory-adapter). With resume, a retrofit cut short
    continues from its latest checkpoint (retrofit.steps may be raised), as train --resume does."""
    source = cfg.retrofit.data or cfg.data.background
    if not source:
        raise ConfigError("retrofit.data: expected an OASST1-schema hub id or local file (or set data.background), "
                          "got ''")
    check_run_dir(cfg, RETROFIT_SUMMARY, resume, "retrofit")
    check_data_paths(**{"retrofit.data" if cfg.retrofit.data else "data.background": source})
    run = adopt_adapter_memory(retrofit_run_config(cfg), adapter_dir)
    if resume:  # on another number of processes: the checkpoint's global batch
        fit_global_batch(run, Path(run.out_dir) / "checkpoints")
    with naming_the_field("retrofit.data" if cfg.retrofit.data else "data.background"):
        texts = load_oasst_texts(source)
    tokenizer, model = load_run_model(run, adapter_dir)
    examples = text_examples(texts, tokenizer, run.train.max_length)
    if not examples:
        raise ConfigError(f"retrofit.data={source!r}: no text to train on (expected OASST1-schema messages)")
    trainer = Trainer(run, model, examples, tokenizer.pad_token_id,
                      examples_field="retrofit.data" if cfg.retrofit.data else "data.background",
                      derived_keys=RETROFIT_DERIVED_KEYS)
    finished, extra = resume_from_checkpoint(trainer, resume, RETROFIT_SUMMARY, "retrofit.steps")
    return finished or fit_and_save(trainer, tokenizer, RETROFIT_SUMMARY, progress, data=source, **extra)


def train_main(cfg: SMFConfig, adapter_dir: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    cfg = adopt_adapter_memory(cfg, adapter_dir)
    default_stats = default_background_path(cfg)
    if method_of(cfg).needs_background(cfg) and not cfg.sparse.background:
        if not default_stats.is_file():  # said before the model loads
            raise background_needed(cfg.sparse.scoring)
        log.info("sparse.background: using %s (written by `smf-ds background` into this out_dir)", default_stats)
        cfg.sparse.background = str(default_stats)
    check_run_dir(cfg, TRAIN_SUMMARY, resume, "train")
    check_data_paths(**{"data.train": cfg.data.train})
    if resume:  # on another number of processes: the checkpoint's global batch
        fit_global_batch(cfg, Path(cfg.out_dir) / "checkpoints")
    background = load_background(cfg) if method_of(cfg).uses_memory else None
    training_prompt(cfg)  # a wrong template or a file in another schema fails before the model loads
    rows = task_rows(cfg)
    tokenizer, model = load_run_model(cfg, adapter_dir)
    if background is not None:
        check_background(background, cfg, model)
    examples = task_examples(cfg, tokenizer, rows)
    trainer = Trainer(cfg, model, examples, tokenizer.pad_token_id, background)
    finished, extra = resume_from_checkpoint(trainer, resume, TRAIN_SUMMARY, "train.steps")
    return finished or fit_and_save(trainer, tokenizer, TRAIN_SUMMARY, progress, **extra)


def resume_from_checkpoint(trainer: Trainer, resume: bool, summary_name: str, steps_key: str
                           ) -> tuple[dict | None, dict]:
    """With resume, load the latest checkpoint (if any). Returns (the finished run's summary when
    there is nothing left to train, its trainer then closed, else None; the summary's extra fields)."""
    if not (resume and trainer.resume()):
        return None, {}
    if trainer.step >= trainer.cfg.train.steps:
        log.warning("resume: the checkpoint is at step %d and %s=%d: nothing to train (raise %s to train on)",
                    trainer.step, steps_key, trainer.cfg.train.steps, steps_key)
        summary_file = Path(trainer.cfg.out_dir) / summary_name
        # The finished run's own summary (not an empty one), while its artifact is there; else
        # the artifact is saved again from the checkpoint.
        summary = read_run_summary(summary_file) if run_finished(summary_file) else None
        if summary is not None and Path(summary["artifact"]).exists():
            trainer.close()
            return summary, {}
    return None, {"resumed_at_step": trainer.step}  # first_loss is then the first loss after it
