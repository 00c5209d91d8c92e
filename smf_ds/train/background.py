"""`smf-ds background`: background access statistics (for the tfidf and kl rules), read through the
run's model and memory on general text."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import ConfigError, SMFConfig, save_config
from ..memory.adapter import base_fingerprint, memory_fingerprint
from ..memory.inject import value_tables
from ..parallel.process_group import barrier, get_rank, get_world_size
from ..sparse.background import collect_background
from .batches import GlobalBatchOrder, collate
from .build import load_run_model
from .inputs import adopt_adapter_memory, background_texts, check_data_paths, text_examples
from .rundir import TRAIN_SUMMARY, default_background_path, refuse_used_out_dir, run_finished

log = logging.getLogger(__name__)


def _device(model) -> torch.device:
    return next(model.parameters()).device


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
    accum = cfg.train.grad_accum
    if cfg.data.background_unit == "document":  # each document a background unit of its own
        if get_world_size() > 1:  # ranks' reads are summed into one unit: it would span one document per rank
            raise ConfigError(f"data.background_unit='document': runs on one process, got {get_world_size()}; "
                              f"compute the stats with one process (smf-ds background) and pass them as "
                              f"sparse.background, or use data.background_unit='batch'")
        batches *= order.global_batch
        order, accum = GlobalBatchOrder(len(examples), 1, 1, 1, cfg.data.seed), 1
    if batches * order.global_batch > len(examples):
        log.warning("data.background: %d batches of %d need %d texts, %s has %d: texts are reused",
                    batches, order.global_batch, batches * order.global_batch, cfg.data.background, len(examples))
    model.eval()
    model._smf_count_padding = cfg.sparse.count_padding  # the reads counted as training will count them
    device = _device(model)
    fingerprint, base = memory_fingerprint(model), base_fingerprint(model)

    def run_forward(step: int) -> None:
        for micro in range(accum):
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
    barrier()  # no rank reads the stats (train, in an experiment) before rank 0 has written them
    return out_path
