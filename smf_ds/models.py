"""Loading a model: one loader for training, evaluation, export and the experiment.

`load_tokenizer_and_model` reads a local directory or a hub id (a merged SMF directory with its
memory, by smf-ds's own code), checks the tokenizer, and names the model in every error as the
caller says (`model.name_or_path=...`, `--model ...`); `load_model_and_tokenizer` adds what an
evaluation needs: a memory adapter, the device, eval mode, and the refusals of what is not a model.
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError, InputError
from .model_source import check_tokenizer, missing_dir_note, model_source


class ModelLoadError(ConfigError):
    """A model (or adapter) named by a flag or setting cannot be loaded; the message names it."""


def load_tokenizer_and_model(name: str, source: str, what: str, dtype, merged: int | None = None,
                             check_config=None):
    """(tokenizer, model) of `source` (model_source(name)); `merged`: its merged_format. `check_config`
    (an HF config -> None) runs before the weights load, so a model that cannot serve fails fast."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .memory.merged import load_merged, read_merged_config

    try:
        config = read_merged_config(source)[1] if merged == 2 else AutoConfig.from_pretrained(source)
        # A merged directory's config.json names the SMF model type: the tokenizer gets the base's.
        tokenizer = AutoTokenizer.from_pretrained(source, config=config)
        check_tokenizer(tokenizer, what)
        if check_config is not None:
            check_config(config)
        model = load_merged(source, dtype=dtype) if merged else AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise ModelLoadError(f"{what}: could not load a tokenizer and causal LM from it "
                             f"({err}){missing_dir_note(name)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def device_for(requested: str | None):
    import torch

    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as err:
            raise ModelLoadError(f"--device {requested}: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"--device {requested}: CUDA is not available (this torch is "
                               f"{'a CPU build' if torch.version.cuda is None else 'built with CUDA, but sees no GPU'})")
        return device
    if torch.cuda.is_available():
        from .parallel.process_group import local_cuda_index

        return torch.device("cuda", local_cuda_index(int(os.environ.get("LOCAL_RANK", "0"))))
    return torch.device("cpu")


def load_model_and_tokenizer(model_id: str, memory_adapter: str | None = None, dtype: str = "auto",
                             device: str | None = None, named_by: str | None = None):
    """(model, tokenizer) ready to evaluate: eval mode, on `device`, memory adapter loaded if given.
    Errors name the model as `named_by` (default: eval's flag, "--model ID")."""
    import torch

    what = named_by or f"--model {model_id}"
    try:
        source = model_source(model_id)
    except OSError as err:
        raise ModelLoadError(f"{what}: {err}") from None
    if memory_adapter:  # checked before the (possibly slow) model load
        _check_adapter_dir(memory_adapter)
    dev = device_for(device)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    from .memory.merged import merged_format

    merged = merged_format(source)  # a merged SMF model: base weights and memory in one directory
    if merged and memory_adapter:  # its own memory would be dropped for the adapter's
        raise ModelLoadError(f"{what} holds a merged model (base weights and memory); evaluate it "
                             f"without --memory-adapter, or give its base model with --memory-adapter {memory_adapter}")
    _refuse_memory_adapter_as_model(source, what)
    if not merged:  # load_merged checks its own
        check_written_files(source, what)
    tokenizer, model = load_tokenizer_and_model(model_id, source, what, getattr(torch, dtype), merged=merged)
    if memory_adapter:
        model = _load_memory_adapter(model, memory_adapter)
    model.to(dev)
    model.eval()
    return model, tokenizer


def _refuse_memory_adapter_as_model(source: str, what: str) -> None:
    """A memory adapter (or the run dir holding one) is not a model: say what to pass instead."""
    from .memory.adapter import CONFIG_NAME

    path = Path(source)
    adapter = next((d for d in (path, path / "memory_adapter") if (d / CONFIG_NAME).is_file()), None)
    if adapter is None or (path / "config.json").is_file():
        return
    base = "BASE"
    run_config = adapter.parent / "config.yaml"
    if run_config.is_file():
        try:
            from .config import load_config

            base = load_config(run_config).model.name_or_path or base
        except InputError:
            pass
    raise ModelLoadError(f"{what}: {'a memory adapter' if adapter == path else 'a run directory'}, not a model; "
                         f"evaluate it with --model {base} --memory-adapter {adapter}")


def check_written_files(source: str, what: str) -> None:
    """A model directory a run wrote (full finetuning's `model`) holds what its manifest says."""
    from .manifest import check_written

    if Path(source).is_dir():
        check_written(source, ModelLoadError, what)


def _check_adapter_dir(directory: str) -> Path:
    path = Path(directory).expanduser()
    if not path.exists():
        raise ModelLoadError(f"--memory-adapter {directory}: no such directory (expected a directory written by "
                             f"save_memory_adapter)")
    if not path.is_dir():
        raise ModelLoadError(f"--memory-adapter {directory}: not a directory (expected a directory written by "
                             f"save_memory_adapter)")
    return path


def _load_memory_adapter(model, directory: str):
    from .memory.adapter import load_memory_adapter

    return load_memory_adapter(model, _check_adapter_dir(directory))
