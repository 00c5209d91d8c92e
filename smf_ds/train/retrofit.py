"""`smf-ds retrofit`: the dense warm-up of fresh memory on general text, as an SMF run whose settings
are derived from the retrofit.* section."""
from __future__ import annotations

import copy
from pathlib import Path

from ..config import ConfigError, DataConfig, SMFConfig, SparseConfig, TrainConfig
from ..data.oasst import load_oasst_texts
from .artifacts import fit_and_save, resume_from_checkpoint
from .build import load_run_model
from .checkpoint import fit_global_batch
from .inputs import adopt_adapter_memory, check_data_paths, naming_the_field, text_examples
from .loop import Trainer
from .rundir import RETROFIT_SUMMARY, check_run_dir


# The settings a retrofit derives from its retrofit.* section (retrofit_run_config): a resume's
# refusal names the retrofit.* setting alone.
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
                      derived_keys=derived_keys())
    finished, extra = resume_from_checkpoint(trainer, resume, RETROFIT_SUMMARY, "retrofit.steps")
    return finished or fit_and_save(trainer, tokenizer, RETROFIT_SUMMARY, progress, data=source, **extra)


# Values unlike the retrofit's own, for derived_keys to see which settings the retrofit overrides.
_OTHER_VALUES = {"train.method": "lora", "train.scope": "values", "train.steps": 3, "train.lr": 0.5,
                 "memory.value_lr": 9.0, "sparse.scoring": "kl", "sparse.optimizer": "adamw",
                 "sparse.weight_decay": 0.1, "data.background": "elsewhere"}
_RETROFIT_PROBES = {"retrofit.steps": 7, "retrofit.lr": 0.123, "retrofit.value_lr": 0.456,
                    "retrofit.value_optimizer": "sgd", "retrofit.scope": "memory", "retrofit.data": "probe"}


def derived_keys() -> tuple[str, ...]:
    """The run settings a retrofit derives from its retrofit.* section, found by changing each
    retrofit.* setting and each setting it may override and seeing what follows (a resume's
    refusal then names the retrofit.* setting alone)."""
    from ..config import flatten_dotted, load_config, to_dict

    def run_of(overrides: dict) -> dict:
        cfg = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
        return flatten_dotted(to_dict(retrofit_run_config(cfg)))

    plain = run_of(_OTHER_VALUES)
    keys = {k for k, v in _OTHER_VALUES.items() if plain[k] != v}  # set by the retrofit whatever they were
    for key, value in _RETROFIT_PROBES.items():  # and those that follow a retrofit.* setting
        keys |= {k for k, v in run_of({**_OTHER_VALUES, key: value}).items() if v != plain[k] and not k.startswith("retrofit.")}
    return tuple(sorted(keys))
