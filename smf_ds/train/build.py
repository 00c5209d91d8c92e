"""Build what a run needs from its config: tokenizer, model with memory (sharded), background."""
from __future__ import annotations

import logging

import torch

from ..config import ConfigError, SMFConfig
from ..model_source import model_source
from ..memory.adapter import base_fingerprint, memory_fingerprint
from ..memory.inject import check_memory_config, inject_memory, value_tables
from ..parallel.layout import MemoryLayout
from ..sparse.background import BackgroundStats
from .methods import method_of

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer_and_model(cfg: SMFConfig):
    """The run's tokenizer and base model (smf_ds.models), the memory's fit checked before the weights load."""
    from ..memory.merged import merged_format
    from ..models import load_tokenizer_and_model as load

    source = cfg.model.name_or_path
    if not source:
        raise ConfigError("model.name_or_path: expected an HF hub id or a local model directory, got ''")
    try:
        path = model_source(source)  # a mistyped local path fails here, not as a malformed hub id
    except OSError as err:
        raise ConfigError(f"model.name_or_path={source!r}: {err}") from None
    what = f"model.name_or_path={source!r}"
    if merged_format(path):
        raise ConfigError(f"{what}: a merged SMF model (base weights and memory in one); train from its base model, "
                          f"with --memory-adapter DIR for the memory to start from")
    fits = (lambda config: check_memory_config(config, cfg.memory, what)) if method_of(cfg).uses_memory else None
    return load(source, path, what, DTYPES[cfg.model.dtype], check_config=fits)


def load_run_model(cfg: SMFConfig, adapter_dir: str | None = None):
    """(tokenizer, model with memory) of a run, on this process's GPU when there is one; the
    model's `smf_layout` says where its tables live (smf_ds.parallel.layout).

    The model moves to the GPU only after its memory tables are sharded, so a GPU never holds a
    whole table that only a shard of is meant to live there."""
    tokenizer, model = load_tokenizer_and_model(cfg)
    model = add_memory(model, cfg, adapter_dir)
    if torch.cuda.is_available():
        model = model.cuda()
    return tokenizer, model


def add_memory(model, cfg: SMFConfig, adapter_dir: str | None = None):
    """Inject memory (from a saved adapter when given), then lay its tables out over the ranks."""
    if not method_of(cfg).uses_memory:
        return model
    if adapter_dir:
        from ..memory.adapter import load_memory_adapter

        model = load_memory_adapter(model, adapter_dir)
    else:
        model = inject_memory(model, cfg.memory)
    layout = MemoryLayout.from_config(cfg.memory)
    layout.apply(model)
    model.smf_layout = layout
    return model


def load_background(cfg: SMFConfig) -> BackgroundStats | None:
    """The run's background stats (file only: read before the model, so a wrong path costs no model load)."""
    return BackgroundStats.load(cfg.sparse.background) if cfg.sparse.background else None


def check_background(stats: BackgroundStats, cfg: SMFConfig, model) -> None:
    """The stats fit the model's tables and were read through the memory it starts from."""
    stats.check_against(value_tables(model), f"sparse.background={cfg.sparse.background}", memory_fingerprint(model),
                        base_fingerprint(model))
