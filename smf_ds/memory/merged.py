"""A merged SMF model: one Hugging Face model directory holding the base model and its memory.

    config.json          the base model's configuration, with model_type smf_<base> (smf_qwen2,
                         smf_llama), architectures [SMF<Base>ForCausalLM], auto_map to the files
                         below, smf_memory (the MemoryConfig) and smf_ds (format, version, base model)
    model.safetensors    every weight under the SMF model's names: the base's (an additive layer's
                         MLP as mlp.base_layer.*), the memory's (mlp.memory.*, mlp.scale) and the
                         value tables (mlp.memory.values.weight); large models in shards + an index
    configuration_smf.py, modeling_smf.py, product_keys.py   copies of smf_ds/memory/portable
    generation_config.json, the tokenizer's files, README.md (a model card, from smf-ds export)

`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` builds the SMF model from
those files, anywhere transformers and torch are installed; without trust_remote_code
transformers refuses the unknown model type, so no loader takes it for the base model. smf-ds
reads it with its own code (`load_merged`), never the directory's.

Format 1, written before: config.json and model.safetensors of the base model, the memory in
memory_config.json + memory_adapter.safetensors. Plain transformers loads that as the base model,
silently; `load_merged` still reads it, with a warning, and `smf-ds export --model DIR --out NEW`
rewrites it in this format.

Distributed: call `save_merged` on every rank with the process's Collective (sharded tables are
gathered: a collective); the main process writes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, MemoryConfig, from_dict
from ..files import replace_dir
from ..manifest import check_written, write_manifest
from .adapter import (ALONE, CONFIG_NAME, AdapterError, Collective, _memory_config, _read_tensors, base_fingerprint,
                      load_memory_adapter, read_adapter_config)
from .inject import decoder_layers, inject_memory, value_tables

FORMAT_NAME = "smf-ds-merged"
FORMAT_VERSION = 2
PORTABLE_DIR = Path(__file__).parent / "portable"
PORTABLE_FILES = ("configuration_smf.py", "modeling_smf.py", "product_keys.py")
# base model_type -> (configuration class, model class) in portable/
SMF_CLASSES = {"qwen2": ("SMFQwen2Config", "SMFQwen2ForCausalLM"), "llama": ("SMFLlamaConfig", "SMFLlamaForCausalLM")}
SMF_KEYS = ("smf_memory", "smf_ds")  # config.json keys that are not the base model's
MODEL_CARD = "README.md"

log = logging.getLogger(__name__)


def _layers_name(model: nn.Module) -> str:
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def values_key(model: nn.Module, layer: int) -> str:
    """The name of layer `layer`'s value table in model.safetensors."""
    return f"{_layers_name(model)}.{layer}.mlp.memory.values.weight"


def smf_config(model: nn.Module):
    """The merged directory's config: the base model's, as an SMF model type with its memory."""
    from .portable import configuration_smf

    cfg = _memory_config(model)
    base_type = model.config.model_type
    config_class, model_class = SMF_CLASSES[base_type]
    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "architectures", "auto_map", "transformers_version", *SMF_KEYS)}
    config = getattr(configuration_smf, config_class).from_dict(fields)
    memory = dataclasses.asdict(cfg)
    memory["v_dim"] = cfg.v_dim or model.config.hidden_size
    config.smf_memory = memory
    config.smf_ds = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                     "base_model": {"model_type": base_type, "fingerprint": base_fingerprint(model)}}
    config.architectures = [model_class]
    config.auto_map = {"AutoConfig": f"configuration_smf.{config_class}",
                       "AutoModelForCausalLM": f"modeling_smf.{model_class}"}
    return config


def save_merged(model: nn.Module, directory: str | Path, tokenizer=None, model_card: str | None = None,
                collective: Collective = ALONE, **save_pretrained_kwargs) -> Path:
    """Write `model` (a base model with memory injected) as one self-describing model directory.

    The directory is built beside `directory` and renamed into place, so a failed save leaves
    no directory that looks like a model (an existing one is replaced only once the new one is
    whole). Call on every rank when value tables are sharded; rank 0 writes. Returns the directory.
    """
    _memory_config(model)
    directory = Path(directory)
    if model.config.model_type not in SMF_CLASSES:
        raise ConfigError(f"model: no SMF model class for model_type {model.config.model_type!r}; "
                          f"expected one of {sorted(SMF_CLASSES)}")
    tables = {values_key(model, i): table.gather_full_weight(dst=0) for i, table in value_tables(model)}
    with collective.gather(list(model.parameters())):
        if collective.is_main_process:
            partial = directory.with_name(f".{directory.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            state = {**model.state_dict(), **tables}  # tables are non-persistent buffers: not in state_dict()
            model.save_pretrained(partial, state_dict=state, **save_pretrained_kwargs)
            smf_config(model).save_pretrained(partial)  # replaces the base model's config.json
            for name in PORTABLE_FILES:
                shutil.copyfile(PORTABLE_DIR / name, partial / name)
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)
                _drop_local_files_only(partial)
            if model_card is not None:
                (partial / MODEL_CARD).write_text(model_card)
            write_manifest(partial)
            replace_dir(partial, directory)
    collective.barrier()
    return directory


def _read_config(directory: Path) -> dict | None:
    file = directory / "config.json"
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{file}: not valid JSON ({err})") from None
    return meta if isinstance(meta, dict) else None


def merged_format(directory: str | Path) -> int | None:
    """2 for a merged SMF directory, 1 for one in the first format (see the module doc), None for
    anything else (a plain model directory, a memory adapter, a hub id)."""
    directory = Path(directory)
    meta = _read_config(directory) if directory.is_dir() else None
    if meta is None:
        return None
    if isinstance(meta.get("smf_ds"), dict) and meta["smf_ds"].get("format") == FORMAT_NAME:
        return FORMAT_VERSION
    return 1 if (directory / CONFIG_NAME).is_file() else None


def read_merged_config(directory: str | Path):
    """(MemoryConfig, the base model's HF config, smf_ds metadata) of a merged directory (format 2)."""
    from transformers import AutoConfig

    file = Path(directory) / "config.json"
    meta = _read_config(Path(directory))
    if meta is None:
        raise AdapterError(f"{file}: not found; expected a merged SMF model directory (save_merged, smf-ds export)")
    smf = meta.get("smf_ds")
    if not isinstance(smf, dict) or smf.get("format") != FORMAT_NAME:
        raise AdapterError(f"{file}: smf_ds.format: expected {FORMAT_NAME!r} (a merged SMF model), got "
                           f"{smf.get('format') if isinstance(smf, dict) else smf!r}")
    version = smf.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterError(f"{file}: smf_ds.format_version: expected {FORMAT_VERSION}, got {version!r} "
                           f"(written by another smf-ds version)")
    model_type = meta.get("model_type", "")
    base_type = model_type[len("smf_"):] if model_type.startswith("smf_") else None
    if base_type not in SMF_CLASSES:
        raise AdapterError(f"{file}: model_type: expected one of {['smf_' + t for t in SMF_CLASSES]}, got {model_type!r}")
    try:
        cfg = from_dict(MemoryConfig, meta.get("smf_memory") or {}, "smf_memory")
        cfg.validate("smf_memory")
    except ConfigError as err:
        raise AdapterError(f"{file}: {err}") from None
    base_fields = {k: v for k, v in meta.items()
                   if k not in ("model_type", "architectures", "auto_map", "transformers_version", *SMF_KEYS)}
    return cfg, AutoConfig.for_model(base_type, **base_fields), smf


def _drop_local_files_only(directory: Path) -> None:
    """transformers writes the offline flag it was loaded with into tokenizer_config.json; a model
    going to the hub must not carry it."""
    file = directory / "tokenizer_config.json"
    if file.is_file():
        config = json.loads(file.read_text())
        if config.pop("local_files_only", None) is not None:
            file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Every tensor of model.safetensors (or of its shards), and the file to name in errors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise AdapterError(f"{index}: expected a safetensors index with a weight_map ({err!r})") from None
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(_read_tensors(directory / name))
        return state, index
    return _read_tensors(directory / "model.safetensors"), directory / "model.safetensors"


def load_merged(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a merged directory, built by smf-ds (the base model, memory injected), in eval mode.

    Every weight must be there (a tied output embedding may be left out) and nothing else; a
    directory in the first format loads with a warning. Value tables keep their own dtype (fp32).
    """
    directory = Path(directory)
    fmt = merged_format(directory)
    if fmt == 1:
        log.warning("%s: a merged model in smf-ds's first format: its config.json describes the base model, so "
                    "transformers and lm-eval load it as the base model without its memory; rewrite it with "
                    "`smf-ds export --model %s --out NEW_DIR`", directory, directory)
        return _load_first_format(directory, dtype)
    from transformers import AutoModelForCausalLM

    cfg, base_config, _ = read_merged_config(directory)
    check_written(directory, AdapterError, str(directory))
    state, file = _read_weights(directory)
    model = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    inject_memory(model, cfg)
    for i, table in value_tables(model):
        key = values_key(model, i)
        if key not in state:
            raise AdapterError(f"{file}: {key}: missing (the value table of memory layer {i})")
        weight = state.pop(key)
        if tuple(weight.shape) != (table.num_rows, table.dim):
            raise AdapterError(f"{file}: {key}: expected shape {(table.num_rows, table.dim)}, got {tuple(weight.shape)}")
        table.load_full_weight(weight.to(table.local_weight.dtype))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not fit
        raise AdapterError(f"{file}: does not fit config.json ({str(err).strip()})") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in missing if not (k in params and id(params[k]) in loaded)]  # tied to a loaded weight
    if missing or unexpected:
        raise AdapterError(f"{file}: tensors do not match config.json: missing {sorted(missing)[:8]}, "
                           f"unexpected {sorted(unexpected)[:8]}")
    return model.eval()


class _CaptureLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT so the first-format loader can decide whether it is news."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


def _load_first_format(directory: Path, dtype: torch.dtype) -> nn.Module:
    """The base model from config.json + model.safetensors, then the adapter files beside them.

    In replacement mode the replaced MLPs' weights are absent by design and not reported; any
    other missing or unexpected weight is reported as transformers reports it."""
    from transformers import AutoModelForCausalLM

    cfg, _ = read_adapter_config(directory)
    hf_logger = logging.getLogger("transformers.modeling_utils")
    capture = _CaptureLoadReport()
    hf_logger.addFilter(capture)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, dtype=dtype)
    finally:
        hf_logger.removeFilter(capture)
    missing = set(info["missing_keys"])
    if cfg.mode == "replacement":
        prefixes = tuple(f"{_layers_name(model)}.{i}.mlp." for i in cfg.layers)
        missing = {k for k in missing if not k.startswith(prefixes)}
    if missing or info["unexpected_keys"] or info["mismatched_keys"] or info["error_msgs"]:
        for record in capture.records:
            hf_logger.handle(record)
    return load_memory_adapter(model, directory).eval()
