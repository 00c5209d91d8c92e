"""`smf-ds train`: from a run config to a trained model (SMF, LoRA or full finetuning)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import SMFConfig, background_needed
from .artifacts import fit_and_save, resume_from_checkpoint
from .build import check_background, load_background, load_run_model
from .checkpoint import fit_global_batch
from .inputs import adopt_adapter_memory, check_data_paths, task_examples, task_rows, training_prompt
from .loop import Trainer
from .methods import method_of
from .rundir import TRAIN_SUMMARY, check_run_dir, default_background_path

log = logging.getLogger(__name__)


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
    started_from = {"model": cfg.model.name_or_path, "memory_adapter": adapter_dir}  # what the run went on from
    return finished or fit_and_save(trainer, tokenizer, TRAIN_SUMMARY, progress, started_from=started_from, **extra)
