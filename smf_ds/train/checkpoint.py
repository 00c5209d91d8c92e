"""Memory checkpoints next to the engine's: each rank writes its own value-table part and sparse
optimizer state, because DeepSpeed's checkpoint holds module parameters only (on rank 0 for ZeRO
0-2) and the tables are not parameters.

Layout: <dir>/<tag>/memory_rank<r:05d>.safetensors (world size and layout in its metadata) and
run.json (rank 0: config, memory and base fingerprints); <dir>/latest_memory is written last,
after every rank has finished, so an interrupted save never replaces a good one (DeepSpeed's own
<dir>/latest, written earlier by the engine, is not what resume reads).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError, flatten_dotted, to_dict
from ..memory.values import ValueTable
from ..parallel.process_group import barrier, get_rank, get_world_size


def _layout(tables: list[tuple[int, ValueTable]]) -> dict:
    out = {}
    for layer, table in tables:
        out[str(layer)] = {"class": type(table).__name__, "num_rows": table.num_rows, "dim": table.dim,
                           "local_shape": list(table.local_weight.shape),
                           "owned_rows": list(table.owned_row_range())}
    return out


def save_memory_checkpoint(directory: str | Path, tag: str, tables: list[tuple[int, ValueTable]],
                           updater_state: dict[str, torch.Tensor] | None) -> None:
    path = Path(directory) / tag
    path.mkdir(parents=True, exist_ok=True)
    rank = get_rank()
    tensors = {f"values.{layer}": table.local_weight.detach().cpu().contiguous() for layer, table in tables}
    for key, value in (updater_state or {}).items():
        tensors[f"updater.{key}"] = value.detach().cpu().contiguous()
    meta = {"world_size": str(get_world_size()), "layout": json.dumps(_layout(tables))}
    tmp = path / f".memory_rank{rank:05d}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path / f"memory_rank{rank:05d}.safetensors")
    barrier()


# A resumed run is the same run: every setting must be what the checkpoint was made with, except
# how long it goes on and how often it logs and saves (and where its dir is now). Other changes
# would fail deep inside DeepSpeed, or silently train another run (another learning rate, batch
# order, optimizer state) under the old run's name.
MAY_CHANGE_ON_RESUME = ("train.steps", "retrofit.steps", "train.save_every", "train.log_every", "train.keep_checkpoints",
                        "cluster.stop_signals", "cluster.collective_timeout", "out_dir")
RUN_FILE = "run.json"


def _flat_config(cfg) -> dict:
    """The run config as {dotted key: value}, as JSON reads it back (tuples as lists)."""
    return json.loads(json.dumps(flatten_dotted(to_dict(cfg))))


def save_run_identity(directory: str | Path, tag: str, cfg, memory: str | None = None,
                      base: str | None = None, inputs: dict | None = None) -> None:
    """Rank 0: the run's settings, the memory_fingerprint and base_fingerprint it started from, and
    `inputs` (what it reads: its examples and background stats, by digest), next to its checkpoint files."""
    if get_rank() == 0:
        path = Path(directory) / tag
        path.mkdir(parents=True, exist_ok=True)
        identity = {"config": _flat_config(cfg), "memory_fingerprint": memory, "base_fingerprint": base,
                    "processes": get_world_size(), "inputs": inputs or {}}
        (path / RUN_FILE).write_text(json.dumps(identity, indent=2))


# Settings that name where an input is: on resume they may point elsewhere (a moved or copied
# file or model) when what they hold is the same, which run.json checks by content instead.
CHECKED_BY_CONTENT = {"data.train": "examples", "sparse.background": "background"}


def _relocated(value, old_out_dir, new_out_dir):
    """A path inside the run's old out_dir, as it reads in the out_dir the run is in now."""
    old = str(old_out_dir or "").rstrip("/")
    if isinstance(value, str) and old and value.startswith(old + "/"):
        return str(new_out_dir).rstrip("/") + value[len(old):]
    return value


def _input_text(name: str, record: dict | None) -> str:
    if record is None:
        return "none"
    size = f"{record['count']} examples" if name == "examples" else f"{record['num_batches']} batches"
    return f"{size}, digest {record['digest']}"


def check_run_identity(directory: str | Path, tag: str, cfg, memory: str | None = None,
                       base: str | None = None, inputs: dict | None = None, examples_field: str = "data.train",
                       derived_keys: tuple[str, ...] = ()) -> None:
    """Refuse to resume a checkpoint made with other settings (but MAY_CHANGE_ON_RESUME), from
    another memory or from other base weights (frozen parameters are not in the checkpoint: they
    come from the adapter or seed, and from model.name_or_path, each time), or reading other
    examples or background stats, naming what differs. Paths inside the run dir follow it when it
    moves; data.train, sparse.background and model.name_or_path may name another place holding the
    same content. examples_field names the setting the examples come from; derived_keys (settings
    that follow from others that are compared) are left out of the message."""
    file = Path(directory) / tag / RUN_FILE
    if not file.is_file():  # a checkpoint from before this file existed
        return
    saved = json.loads(file.read_text())
    saved_config = saved.get("config", {k: v for k, v in saved.items() if not k.endswith("_fingerprint")})
    now = _flat_config(cfg)
    diffs, same_content = [], set()
    saved_inputs, inputs = saved.get("inputs", {}), inputs or {}
    by_content = {examples_field if name == "examples" else key: name for key, name in CHECKED_BY_CONTENT.items()}
    for key, name in by_content.items():
        if name not in saved_inputs:  # recorded before run.json held its inputs: the path decides
            continue
        if saved_inputs[name] != inputs.get(name):
            diffs.append(f"{key}: other {'training examples' if name == 'examples' else 'background stats'} "
                         f"({_input_text(name, saved_inputs[name])} there, {_input_text(name, inputs.get(name))} now)")
        same_content.add(key)
    if saved.get("base_fingerprint") is not None and saved["base_fingerprint"] == base:
        same_content.add("model.name_or_path")
    for key in sorted(saved_config):
        there = _relocated(saved_config[key], saved_config.get("out_dir"), cfg.out_dir)
        if key not in (*MAY_CHANGE_ON_RESUME, *derived_keys) and key not in same_content and there != now.get(key):
            diffs.append(f"{key}={saved_config[key]!r} there, {now.get(key)!r} now")
    processes = saved["processes"] if "processes" in saved else _memory_world_size(Path(directory) / tag)
    if processes not in (None, get_world_size()):  # checked before DeepSpeed's loader trips on it
        diffs.append(f"processes={processes} there, {get_world_size()} now (the global batch is "
                     f"micro_batch_size x grad_accum x processes; resume on {processes})")
    if saved.get("memory_fingerprint") not in (None, memory):
        diffs.append(f"the memory it started from (fingerprint {saved['memory_fingerprint']} there, {memory} now: "
                     f"pass the same --memory-adapter and memory.* settings)")
    if saved.get("base_fingerprint") not in (None, base):
        diffs.append(f"the base model's weights (fingerprint {saved['base_fingerprint']} there, {base} now: "
                     f"model.name_or_path={cfg.model.name_or_path!r} holds other weights than when the run began)")
    if diffs:
        raise ConfigError(f"resume: {file}: the checkpoint was made with other settings: {'; '.join(diffs)}. "
                          f"Resume with the same ones, or use another out_dir")


def _memory_metadata(file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}


def _memory_world_size(checkpoint: Path) -> int | None:
    """The process count in rank 0's memory checkpoint metadata (for run.json from before it
    recorded the count), or None."""
    file = checkpoint / f"memory_rank{0:05d}.safetensors"
    world = _memory_metadata(file).get("world_size") if file.is_file() else None
    return int(world) if world is not None else None


def mark_latest(directory: str | Path, tag: str) -> None:
    """Point <dir>/latest_memory at `tag` once every rank's files are written."""
    barrier()
    if get_rank() == 0:
        tmp = Path(directory) / ".latest_memory.tmp"
        tmp.write_text(tag)
        os.replace(tmp, Path(directory) / "latest_memory")
    barrier()


def complete_tags(directory: str | Path) -> list[str]:
    """Step dirs whose save finished, oldest first: run.json is written after every rank's files
    (a kill during a save leaves a dir without it)."""
    return sorted(p.name for p in Path(directory).glob("step*") if (p / RUN_FILE).is_file())


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Rank 0, right after mark_latest (no save in progress): keep the newest `keep` complete
    checkpoints, latest_memory's always among them, and remove the rest, and every dir a killed
    save left incomplete. Returns what was removed."""
    latest = latest_tag(directory)
    if keep <= 0 or latest is None:
        return []
    complete = [tag for tag in complete_tags(directory) if tag != latest]
    kept = {latest, *complete[len(complete) - (keep - 1):]} if keep > 1 else {latest}
    removed = [p for p in sorted(Path(directory).glob("step*")) if p.is_dir() and p.name not in kept]
    for path in removed:
        shutil.rmtree(path)
    return removed


def latest_tag(directory: str | Path) -> str | None:
    marker = Path(directory) / "latest_memory"
    return marker.read_text().strip() if marker.is_file() else None


def load_memory_checkpoint(directory: str | Path, tag: str,
                           tables: list[tuple[int, ValueTable]]) -> dict[str, torch.Tensor]:
    """Restore this rank's table parts; returns the updater state tensors."""
    rank = get_rank()
    file = Path(directory) / tag / f"memory_rank{rank:05d}.safetensors"
    if not file.is_file():
        raise ConfigError(f"resume: {file} not found; the checkpoint was written by a different number "
                          f"of ranks, or is incomplete")
    meta = _memory_metadata(file)
    saved_world = int(meta.get("world_size", -1))
    if saved_world != get_world_size():
        raise ConfigError(f"resume: {file} was written by {saved_world} ranks; this run has "
                          f"{get_world_size()} (world_size must match to resume sharded tables)")
    saved_layout, layout = json.loads(meta.get("layout", "{}")), _layout(tables)
    if saved_layout != layout:
        raise ConfigError(f"resume: {file} holds memory layout {saved_layout}, but the model has {layout}; "
                          f"memory.* and memory.sharding must match the run being resumed")
    tensors = load_file(str(file))
    for layer, table in tables:
        table.local_weight.copy_(tensors[f"values.{layer}"])
        table.sink.clear()
    return {k[len("updater."):]: v for k, v in tensors.items() if k.startswith("updater.")}
