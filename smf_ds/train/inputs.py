"""A run's inputs, read and checked before the model loads: the task's examples, the background and
retrofit texts, the paths that name them, and the memory an adapter brings."""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path

from ..config import ConfigError, MemoryConfig, SMFConfig
from ..data.loading import DataSourceError, missing_local_source
from ..data.medmcqa import MedMCQAPrompt, load_medmcqa
from ..data.oasst import load_oasst_texts
from .batches import tokenize_prompt_answer, tokenize_text
from .methods import method_of

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
    return [tokenize_prompt_answer(tokenizer, prompt_text, answer, cfg.train.max_length, cfg.data.loss_on)
            for prompt_text, answer in pairs]


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


def check_data_paths(**sources: str | None) -> None:
    """Fail on a mistyped local data path before the model is loaded (minutes on a cluster), naming
    the field: check_data_paths(**{"data.train": cfg.data.train})."""
    for field, source in sources.items():
        if source and missing_local_source(source):
            where = "" if Path(source).expanduser().is_absolute() else \
                f" (relative paths are from the working directory, {Path.cwd()})"
            raise ConfigError(f"{field}={source!r}: no such file or directory{where}")
