"""Memory checkpoints next to the engine's: each rank writes its own value-table part and sparse
optimizer state, because DeepSpeed's checkpoint holds module parameters only (on rank 0 for ZeRO
0-2) and the tables are not parameters.

Layout: <dir>/<tag>/memory_rank<r:05d>.safetensors (world size and layout in its metadata) and
run.json (rank 0: config, memory and base fingerprints); <dir>/latest_memory is written last,
after every rank has finished, so an interrupted save never replaces a good one (DeepSpeed's own
<dir>/latest, written earlier by the engine, is not what resume reads).

Elastic resume: each file's metadata says which rows and columns of each table it holds, so a
checkpoint written by W processes loads into any other layout: every rank reads, from the files
that overlap it, exactly its own part of the tables and of the per-row optimizer state.
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
from ..manifest import MANIFEST, verify_manifest, write_manifest


def _layout(tables: list[tuple[int, ValueTable]]) -> dict:
    out = {}
    for layer, table in tables:
        out[str(layer)] = {"class": type(table).__name__, "num_rows": table.num_rows, "dim": table.dim,
                           "local_shape": list(table.local_weight.shape),
                           "owned_rows": list(table.owned_row_range()), "owned_cols": list(table.owned_col_range())}
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
                        "cluster.stop_signals", "cluster.collective_timeout", "memory.parallel_size", "out_dir")
# On another number of processes these may change too, as long as the global batch
# (micro_batch_size x grad_accum x processes) stays what it was.
GLOBAL_BATCH_KEYS = ("train.micro_batch_size", "train.grad_accum")
RUN_FILE = "run.json"
# 2: run.json holds the inputs, process count, step and layout; memory files their row and column
# ranges; a manifest is written last. A checkpoint of another version is refused by name.
RUN_FORMAT_VERSION = 2


def _flat_config(cfg) -> dict:
    """The run config as {dotted key: value}, as JSON reads it back (tuples as lists)."""
    return json.loads(json.dumps(flatten_dotted(to_dict(cfg))))


def save_run_identity(directory: str | Path, tag: str, cfg, memory: str | None = None,
                      base: str | None = None, inputs: dict | None = None, step: int | None = None,
                      layout: dict | None = None) -> None:
    """Rank 0: the run's settings, the memory_fingerprint and base_fingerprint it started from, and
    `inputs` (what it reads: its examples and background stats, by digest), next to its checkpoint files."""
    if get_rank() == 0:
        path = Path(directory) / tag
        path.mkdir(parents=True, exist_ok=True)
        identity = {"format_version": RUN_FORMAT_VERSION, "config": _flat_config(cfg), "memory_fingerprint": memory,
                    "base_fingerprint": base,
                    "processes": get_world_size(), "step": step, "layout": layout, "inputs": inputs or {}}
        tmp = path / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(identity, indent=2))
        os.replace(tmp, path / RUN_FILE)


def write_checkpoint_manifest(directory: str | Path, tag: str) -> None:
    """Rank 0, once every rank's files are written: the manifest of the checkpoint (every file,
    its size and sha256), which makes it complete."""
    barrier()
    if get_rank() == 0:
        write_manifest(Path(directory) / tag)


def verify_checkpoint(directory: str | Path, tag: str) -> None:
    """Refuse a checkpoint whose files are not what its manifest says (rank 0 reads them; every
    rank gets the verdict), naming the files and the complete checkpoints to fall back on."""
    checkpoint = Path(directory) / tag
    problems = None
    if get_rank() == 0:
        if not (checkpoint / RUN_FILE).is_file():
            problems = [f"{checkpoint / RUN_FILE}: missing (the save did not finish)"]
        else:
            problems = verify_manifest(checkpoint)
    if get_world_size() > 1:
        import torch.distributed as dist

        box = [problems]
        dist.broadcast_object_list(box, src=0)
        problems = box[0]
    if problems:
        others = [t for t in complete_tags(directory) if t != tag]
        raise ConfigError(f"resume: {checkpoint} is damaged: {'; '.join(problems[:4])}. To resume from an earlier "
                          f"complete checkpoint, write its tag into {Path(directory) / 'latest_memory'} "
                          f"(complete: {', '.join(others) or 'none'})")


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
    that follow from others that are compared) are not compared."""
    file = Path(directory) / tag / RUN_FILE
    if not file.is_file():  # never skip the checks: a checkpoint without run.json did not finish saving
        raise ConfigError(f"resume: {file}: missing; the checkpoint did not finish saving (complete: "
                          f"{', '.join(complete_tags(directory)) or 'none'})")
    try:
        saved = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"resume: {file}: not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(saved, dict) or saved.get("format_version") != RUN_FORMAT_VERSION:
        version = saved.get("format_version") if isinstance(saved, dict) else None
        raise ConfigError(f"resume: {file}: format_version {version!r}, expected {RUN_FORMAT_VERSION} (written by "
                          f"another smf-ds version); resume it with that version, or start again in another out_dir")
    saved_config = saved["config"]
    now = _flat_config(cfg)
    diffs, same_content = [], set()
    saved_inputs, inputs = saved["inputs"], inputs or {}
    by_content = {examples_field if name == "examples" else key: name for key, name in CHECKED_BY_CONTENT.items()}
    for key, name in by_content.items():
        if saved_inputs.get(name) != inputs.get(name):
            diffs.append(f"{key}: other {'training examples' if name == 'examples' else 'background stats'} "
                         f"({_input_text(name, saved_inputs[name])} there, {_input_text(name, inputs.get(name))} now)")
        same_content.add(key)
    if saved.get("base_fingerprint") is not None and saved["base_fingerprint"] == base:
        same_content.add("model.name_or_path")
    processes = saved["processes"]
    elastic = processes != get_world_size()
    for key in sorted(saved_config):
        there = _relocated(saved_config[key], saved_config.get("out_dir"), cfg.out_dir)
        if key in (*MAY_CHANGE_ON_RESUME, *derived_keys) or key in same_content or (elastic and key in GLOBAL_BATCH_KEYS):
            continue
        if there != now.get(key):
            diffs.append(f"{key}={saved_config[key]!r} there, {now.get(key)!r} now")
    if elastic:
        saved_batch = _global_batch(saved_config, processes)
        if saved_batch != cfg.train.micro_batch_size * cfg.train.grad_accum * get_world_size():
            diffs.append(f"the global batch: {_batch_text(saved_config, processes)} there, "
                         f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum} x {get_world_size()} now "
                         f"(train.micro_batch_size x train.grad_accum x processes)")
    if saved.get("memory_fingerprint") not in (None, memory):
        diffs.append(f"the memory it started from (fingerprint {saved['memory_fingerprint']} there, {memory} now: "
                     f"pass the same --memory-adapter and memory.* settings)")
    if saved.get("base_fingerprint") not in (None, base):
        diffs.append(f"the base model's weights (fingerprint {saved['base_fingerprint']} there, {base} now: "
                     f"model.name_or_path={cfg.model.name_or_path!r} holds other weights than when the run began)")
    if diffs:
        raise ConfigError(f"resume: {file}: the checkpoint was made with other settings: {'; '.join(diffs)}. "
                          f"Resume with the same ones, or use another out_dir")


def _global_batch(saved_config: dict, processes: int) -> int:
    return saved_config["train.micro_batch_size"] * saved_config["train.grad_accum"] * processes


def _batch_text(saved_config: dict, processes: int) -> str:
    return (f"{saved_config['train.micro_batch_size']} x {saved_config['train.grad_accum']} x {processes} processes = "
            f"{_global_batch(saved_config, processes)}")


def saved_run(directory: str | Path, tag: str) -> dict:
    """run.json of a checkpoint (empty when it has none)."""
    file = Path(directory) / tag / RUN_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def fit_global_batch(cfg, directory: str | Path) -> None:
    """Before a resume on another number of processes: set train.grad_accum so that the global batch
    is the latest checkpoint's (micro_batch_size x grad_accum x processes), or say which numbers
    cannot give it. The batch order then continues where it stopped."""
    tag = latest_tag(directory)
    saved = saved_run(directory, tag) if tag else {}
    processes, config = saved.get("processes"), saved.get("config", {})
    world = get_world_size()
    if not processes or processes == world or "train.grad_accum" not in config:
        return
    batch, micro = _global_batch(config, processes), cfg.train.micro_batch_size
    if micro * cfg.train.grad_accum * world == batch:
        return
    if batch % (micro * world):
        raise ConfigError(f"resume: {Path(directory) / tag} was made with a global batch of {_batch_text(config, processes)}; "
                          f"on {world} processes no train.grad_accum gives it with train.micro_batch_size={micro} "
                          f"({batch} is not a multiple of {micro} x {world}): set train.micro_batch_size so that "
                          f"micro_batch_size x grad_accum x {world} = {batch}, or resume on a number of processes "
                          f"that divides {batch // micro}")
    import logging

    logging.getLogger(__name__).warning(
        "resume on %d processes (the checkpoint: %d): train.grad_accum %d -> %d keeps the global batch of %d",
        world, processes, cfg.train.grad_accum, batch // (micro * world), batch)
    cfg.train.grad_accum = batch // (micro * world)


def _memory_metadata(file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}


def mark_latest(directory: str | Path, tag: str) -> None:
    """Point <dir>/latest_memory at `tag` once every rank's files are written."""
    barrier()
    if get_rank() == 0:
        tmp = Path(directory) / ".latest_memory.tmp"
        tmp.write_text(tag)
        os.replace(tmp, Path(directory) / "latest_memory")
    barrier()


def complete_tags(directory: str | Path) -> list[str]:
    """Step dirs whose save finished, oldest first: run.json is written after every rank's files and
    the manifest after it (a kill during a save leaves a dir without them)."""
    return sorted(p.name for p in Path(directory).glob("step*") if (p / RUN_FILE).is_file() and (p / MANIFEST).is_file())


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
    """Restore this rank's table parts; returns the updater state tensors. A checkpoint of the
    same layout is read from this rank's own file; of another (another number of processes, or
    memory.parallel_size), each rank reads its part from the files that hold it."""
    rank = get_rank()
    file = Path(directory) / tag / f"memory_rank{rank:05d}.safetensors"
    layout = _layout(tables)
    if file.is_file():
        meta = _memory_metadata(file)
        if int(meta.get("world_size", -1)) == get_world_size() and json.loads(meta.get("layout", "{}")) == layout:
            tensors = load_file(str(file))
            for layer, table in tables:
                table.local_weight.copy_(tensors[f"values.{layer}"])
                table.sink.clear()
            return {k[len("updater."):]: v for k, v in tensors.items() if k.startswith("updater.")}
    return _load_resplit(Path(directory) / tag, tables, layout)


def _saved_parts(checkpoint: Path) -> list[tuple[Path, dict]]:
    """(file, {layer: its part's layout}) of every rank that wrote into `checkpoint`, rank order."""
    files = sorted(checkpoint.glob("memory_rank*.safetensors"))
    if not files:
        raise ConfigError(f"resume: {checkpoint}: no memory_rank*.safetensors; the checkpoint is incomplete")
    world = int(_memory_metadata(files[0]).get("world_size", len(files)))
    if len(files) != world:
        raise ConfigError(f"resume: {checkpoint}: {len(files)} memory files, but it was written by {world} ranks; "
                          f"the checkpoint is incomplete")
    return [(file, json.loads(_memory_metadata(file).get("layout", "{}"))) for file in files]


def _row_indexed(key: str) -> bool:
    """Updater state with one entry per table row (optim.<L>.row_step, ever_updated.<L>,
    window_counts.<L>); the rest of the per-table state has one per value, like the table."""
    return key.endswith(".row_step") or key.startswith(("ever_updated.", "window_counts."))


def _load_resplit(checkpoint: Path, tables: list[tuple[int, ValueTable]], layout: dict) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    parts = _saved_parts(checkpoint)
    for layer, table in tables:
        saved = parts[0][1].get(str(layer))
        if saved is None or (saved["num_rows"], saved["dim"]) != (table.num_rows, table.dim):
            raise ConfigError(f"resume: {checkpoint}: memory layer {layer}: the checkpoint holds "
                              f"{saved and (saved['num_rows'], saved['dim'])}, the model {(table.num_rows, table.dim)}; "
                              f"memory.* must match the run being resumed")
    with safe_open(str(parts[0][0]), framework="pt") as f:
        names = list(f.keys())
        state = {k[len("updater."):]: f.get_tensor(k) for k in names if k.startswith("updater.")
                 and not _per_row_or_value(k[len("updater."):])}
    for layer, table in tables:
        (a, b), (c, d) = table.owned_row_range(), table.owned_col_range()
        for name in [n for n in names if _layer_of(n) == layer]:
            key = name[len("updater."):] if name.startswith("updater.") else name
            if name.startswith("updater.") and not _per_row_or_value(key):
                continue
            rows_only = _row_indexed(key)
            block = _read_part(parts, name, str(layer), (a, b), None if rows_only else (c, d), checkpoint)
            if name.startswith("values."):
                table.local_weight.copy_(block)
                table.sink.clear()
            else:
                state[key] = block
    return state


def _layer_of(name: str) -> int | None:
    """The memory layer a checkpoint tensor belongs to: values.<L>, updater.optim.<L>.*, updater.<what>.<L>."""
    bits = name.split(".")
    for bit in bits[1:3]:
        if bit.isdigit():
            return int(bit)
    return None


def _per_row_or_value(key: str) -> bool:
    """Updater state split like the table (per row, or per value) rather than global."""
    return key.startswith(("optim.", "ever_updated.", "window_counts."))


def _read_part(parts: list[tuple[Path, dict]], name: str, layer: str, rows: tuple[int, int],
               cols: tuple[int, int] | None, checkpoint: Path) -> torch.Tensor:
    """Rows [a, b) (and columns [c, d)) of tensor `name`, assembled from the saved parts that hold
    them (a part saved by several replicas is read once)."""
    from safetensors import safe_open

    (a, b) = rows
    out, covered, seen = None, 0, set()
    for file, layout in parts:
        part = layout[layer]
        (pa, pb), (pc, pd) = part["owned_rows"], part["owned_cols"]
        r0, r1 = max(a, pa), min(b, pb)
        c0, c1 = (max(cols[0], pc), min(cols[1], pd)) if cols is not None else (0, 0)
        if r0 >= r1 or (cols is not None and c0 >= c1) or (r0, r1, c0, c1) in seen:
            continue
        seen.add((r0, r1, c0, c1))
        with safe_open(str(file), framework="pt") as f:
            piece = f.get_slice(name)
            block = piece[r0 - pa:r1 - pa, c0 - pc:c1 - pc] if cols is not None else piece[r0 - pa:r1 - pa]
        if out is None:
            shape = (b - a, cols[1] - cols[0]) if cols is not None else (b - a, *block.shape[1:])
            out = block.new_zeros(shape)
        if cols is not None:
            out[r0 - a:r1 - a, c0 - cols[0]:c1 - cols[0]] = block
        else:
            out[r0 - a:r1 - a] = block
        covered += block.numel()
    want = (b - a) * ((cols[1] - cols[0]) if cols is not None else 1)
    if covered != want:
        raise ConfigError(f"resume: {checkpoint}: {name}: the saved parts do not cover rows [{a}, {b})"
                          f"{f' columns [{cols[0]}, {cols[1]})' if cols else ''}; the checkpoint is incomplete")
    if out is None:  # this rank holds no row of the table
        with safe_open(str(parts[0][0]), framework="pt") as f:
            empty = f.get_slice(name)[0:0]
        out = empty if cols is None else empty[:, 0:0].reshape(0, cols[1] - cols[0])
    return out
