"""Save and load the memory of an injected model on its own (peft-style adapter), or merged.

Adapter directory (`save_memory_adapter` / `load_memory_adapter`):

    memory_config.json           {"format", "format_version", "memory": MemoryConfig as a dict,
                                  "base_model": {"model_type", "hidden_size", "num_hidden_layers",
                                                 "fingerprint" (base_fingerprint: other weights of
                                                 the same shapes load with a warning)}}
    memory_adapter.safetensors   every memory tensor, named by decoder layer:
                                  layers.6.memory.query.weight, layers.6.memory.keys,
                                  layers.6.memory.gate.weight, layers.6.memory.out.weight,
                                  layers.6.memory.query_norm.* (incl. running stats),
                                  layers.6.scale (additive mode), layers.6.values (the whole table)

Merged directories (the base model and its memory in one) are merged.py's.

Distributed: value tables may be sharded, and `gather_full_weight()` is then a collective. Call the
save functions on every rank with the process's `Collective` (smf_ds.parallel.collective): value
tables are gathered to rank 0 (the others only send their parts), ZeRO-3 partitioned parameters
gathered, and files written by the main process only, followed by a barrier. Loading reads the
files on every rank, each keeping its own part. This module imports nothing distributed.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
import hashlib
import json
import logging
import os
from pathlib import Path

from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ConfigError, MemoryConfig, from_dict
from ..manifest import check_written
from .inject import decoder_layers, inject_memory, memory_layers, value_tables
from .portable.product_keys import MemoryMLP

CONFIG_NAME = "memory_config.json"
WEIGHTS_NAME = "memory_adapter.safetensors"
FORMAT_NAME = "smf-ds-memory-adapter"
FORMAT_VERSION = 1

# What the saved tensors mean: an adapter loads only into memory built with the same values.
# The other MemoryConfig fields (scale_init, value_init_std, seed, value_lr, sharding) are
# initialisation or training knobs that the loaded tensors make irrelevant.
STRUCTURAL_FIELDS = ("layers", "n_keys", "heads", "knn", "k_dim", "v_dim", "mode", "gated", "query_batchnorm")
BASE_MODEL_FIELDS = ("model_type", "hidden_size", "num_hidden_layers")

log = logging.getLogger(__name__)


class AdapterError(ConfigError):
    """A memory adapter file is missing, corrupt, or does not fit the model; names file and field."""


# ---------------------------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class Collective:
    """How the calling process takes part in a save or load (see the module doc). The default is
    a process on its own: it writes, gathers nothing, waits for nobody."""

    is_main_process: bool = True
    gather: Callable[..., contextlib.AbstractContextManager] = lambda params, modifier_rank=None: contextlib.nullcontext()
    barrier: Callable[[], None] = lambda: None


ALONE = Collective()


def _memory_config(model: nn.Module) -> MemoryConfig:
    cfg = getattr(model, "smf_memory_config", None)
    if cfg is None:
        raise AdapterError("model: no memory is injected into this model; nothing to save "
                           "(inject_memory or load_memory_adapter first)")
    return cfg


def _memory_state(mlp: MemoryMLP, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a MemoryMLP that belongs to the memory (not the wrapped base MLP)."""
    return {k: v for k, v in mlp.state_dict(keep_vars=keep_vars).items() if not k.startswith("base_layer.")}


def memory_fingerprint(model: nn.Module) -> str:
    """A short hash of every memory tensor but the value tables (query, keys, gate, out, scale,
    query-norm statistics) in layer order: which memory a run starts from, whether a saved adapter
    or a seeded initialisation. The same on every rank; take it before DeepSpeed partitions
    parameters (ZeRO-3)."""
    digest = hashlib.sha256()
    for i, mlp in memory_layers(model):
        for key, tensor in sorted(_memory_state(mlp).items()):
            if key.startswith("memory.values."):
                continue
            digest.update(f"{i}.{key}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under the original HF names: memory left out, base_layer unwrapped."""
    prefixes = [name + "." for name, module in model.named_modules() if isinstance(module, MemoryMLP)]
    out = {}
    for key, tensor in model.state_dict().items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            out[key] = tensor
        elif key[len(prefix):].startswith("base_layer."):
            out[prefix + key[len(prefix) + len("base_layer."):]] = tensor
    return out


FINGERPRINT_SAMPLE = 4096  # elements hashed per base tensor


def base_fingerprint(model: nn.Module) -> str | None:
    """A short hash of the base model's weights (memory left out, `base_layer` unwrapped; in
    replacement mode the replaced MLPs are gone, so compare models with the same memory): which
    pretrained model a run or an adapter started from. Each tensor contributes its name, shape
    and an evenly strided sample of FINGERPRINT_SAMPLE values rounded to bfloat16, so it costs
    the same at any model size, tells one checkpoint from another (training moves nearly every
    weight), and is the same whether the base is loaded in float32 or bfloat16. Under ZeRO-3
    the weights are partitioned: it then returns the fingerprint stamped on the model before
    (`model.smf_base_fingerprint`), or None."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return getattr(model, "smf_base_fingerprint", None)
    digest = hashlib.sha256()
    for key, tensor in sorted(base_state_dict(model).items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // FINGERPRINT_SAMPLE)][:FINGERPRINT_SAMPLE]
        digest.update(f"{key}{tuple(tensor.shape)}".encode())
        digest.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _base_model_info(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {field: getattr(config, field, None) for field in BASE_MODEL_FIELDS}


def _resolved(cfg: MemoryConfig, field: str, hidden_size: int):
    value = getattr(cfg, field)
    if field == "v_dim" and value is None:
        return hidden_size
    if field == "layers":
        return sorted(value)
    return value


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# adapter


def save_memory_adapter(model: nn.Module, directory: str | Path, collective: Collective = ALONE) -> Path:
    """Write memory_config.json and memory_adapter.safetensors into `directory`.

    Call on every rank when value tables are sharded (gathering them is a collective); only the
    main process writes. Returns the directory.
    """
    cfg = _memory_config(model)
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for i, mlp in memory_layers(model):
        with collective.gather(list(mlp.memory.parameters()) + ([mlp.scale] if mlp.scale is not None else [])):
            for key, tensor in _memory_state(mlp).items():
                tensors[f"layers.{i}.{key}"] = tensor.detach().cpu().clone().contiguous()
        full = mlp.memory.values.gather_full_weight(dst=0)  # every rank: a collective for sharded tables
        if collective.is_main_process:  # the only writer: no other rank keeps a copy of the table
            tensors[f"layers.{i}.values"] = full.contiguous()

    if collective.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "memory": dataclasses.asdict(cfg),
            "base_model": {**_base_model_info(model), "fingerprint": base_fingerprint(model)},
        }
        _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(
            tensors, str(p), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}))
        _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    collective.barrier()
    return directory


def read_adapter_config(directory: str | Path) -> tuple[MemoryConfig, dict]:
    """(MemoryConfig, base-model info) from `directory`/memory_config.json, checked."""
    file = Path(directory) / CONFIG_NAME
    if not file.is_file():
        raise AdapterError(f"{file}: not found; expected a memory adapter directory written by "
                           f"save_memory_adapter")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AdapterError(f"{file}: format: expected {FORMAT_NAME!r}, got {got!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterError(f"{file}: format_version: expected an integer <= {FORMAT_VERSION}, got {version!r}")
    for section in ("memory", "base_model"):
        if not isinstance(meta.get(section), dict):
            raise AdapterError(f"{file}: {section}: expected a mapping, got {meta.get(section)!r}")
    try:
        cfg = from_dict(MemoryConfig, meta["memory"], "memory")
        cfg.validate()
    except ConfigError as err:
        raise AdapterError(f"{file}: {err}") from None
    return cfg, meta["base_model"]


def _check_base_model(model: nn.Module, base: dict, file: Path) -> None:
    have = _base_model_info(model)
    for field in BASE_MODEL_FIELDS:
        if base.get(field) != have[field]:
            raise AdapterError(f"{file}: base_model.{field}: the adapter was saved from a model with "
                               f"{field}={base.get(field)!r}, but this model has {field}={have[field]!r}")


def _warn_if_other_base(model: nn.Module, saved: str | None, file: Path) -> None:
    """Same shapes but other weights (e.g. the base model instead of its instruct tuning) still
    load: a deliberate transfer is legitimate, a wrong --model is not, so say it and go on."""
    have = base_fingerprint(model)
    if saved and have and saved != have:
        log.warning("%s: base_model.fingerprint: the adapter was trained on other base weights (%s) than "
                    "this model's (%s); it loads (same shapes), but its memory was fitted to that other model",
                    file, saved, have)


def _check_same_memory(model: nn.Module, cfg: MemoryConfig, file: Path) -> None:
    have = model.smf_memory_config
    hidden = model.config.hidden_size
    for field in STRUCTURAL_FIELDS:
        saved, mine = _resolved(cfg, field, hidden), _resolved(have, field, hidden)
        if saved != mine:
            raise AdapterError(f"{file}: memory.{field}: the adapter has {saved!r}, but the memory already "
                               f"injected into this model has {mine!r}")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise AdapterError(f"{file}: not found; the memory adapter weights are missing")
    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterError(f"{file}: cannot be read as safetensors ({type(err).__name__}: {err})") from None


def load_memory_adapter(model: nn.Module, directory: str | Path, collective: Collective = ALONE) -> nn.Module:
    """Load an adapter into `model` (injecting the memory first if the model has none).

    The base model must match (model_type, hidden_size, num_hidden_layers); memory that is
    already injected must match the adapter's structure. Every rank calls it; each keeps its
    part of a sharded table. Returns the model.
    """
    directory = Path(directory)
    cfg, base = read_adapter_config(directory)
    check_written(directory, AdapterError, f"{directory} (memory adapter)")
    config_file = directory / CONFIG_NAME
    _check_base_model(model, base, config_file)
    if getattr(model, "smf_memory_config", None) is not None:
        _check_same_memory(model, cfg, config_file)
        _load_tensors(model, _read_tensors(directory / WEIGHTS_NAME), directory / WEIGHTS_NAME, collective)
        _warn_if_other_base(model, base.get("fingerprint"), config_file)
        return model
    tensors = _read_tensors(directory / WEIGHTS_NAME)  # before injecting: an unreadable file changes nothing
    originals = {i: layer.mlp for i, layer in enumerate(decoder_layers(model)) if i in cfg.layers}
    inject_memory(model, cfg)
    try:
        _load_tensors(model, tensors, directory / WEIGHTS_NAME, collective)
    except BaseException:
        _undo_injection(model, originals)  # a file that does not fit leaves the model as it was
        raise
    _warn_if_other_base(model, base.get("fingerprint"), config_file)  # injected: as it was saved
    return model


def _undo_injection(model: nn.Module, originals: dict[int, nn.Module]) -> None:
    layers = decoder_layers(model)
    for i, mlp in originals.items():
        layers[i].mlp = mlp
    model._smf_mask_hook.remove()
    for attr in ("smf_memory_config", "_smf_memory_context", "_smf_mask_hook"):
        if attr in model.__dict__:
            delattr(model, attr)


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], weights_file: Path,
                  collective: Collective) -> None:
    """Check the adapter tensors against the injected memory, then copy them in."""
    targets: dict[str, torch.Tensor] = {}
    for i, mlp in memory_layers(model):
        for key, tensor in _memory_state(mlp, keep_vars=True).items():
            targets[f"layers.{i}.{key}"] = tensor
    tables = dict(value_tables(model))
    expected = set(targets) | {f"layers.{i}.values" for i in tables}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterError(f"{weights_file}: tensors do not match memory_config.json: "
                           f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, tensor in tensors.items():
        if name in targets:  # ds_shape: the whole shape of a ZeRO-3 partitioned parameter
            want = tuple(getattr(targets[name], "ds_shape", targets[name].shape))
        else:
            table = tables[int(name.split(".")[1])]
            want = (table.num_rows, table.dim)
        if tuple(tensor.shape) != want:
            raise AdapterError(f"{weights_file}: {name}: expected shape {want}, got {tuple(tensor.shape)}")

    with torch.no_grad():
        params = [t for t in targets.values() if isinstance(t, nn.Parameter)]
        with collective.gather(params, modifier_rank=0):
            for name, target in targets.items():
                target.copy_(tensors[name])
        for i, table in tables.items():
            table.load_full_weight(tensors[f"layers.{i}.values"].to(table.local_weight.dtype))
