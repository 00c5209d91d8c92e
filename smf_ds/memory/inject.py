"""Inject product-key memory into a pretrained HF causal LM (peft-style), and train scopes.

`inject_memory(model, cfg)` walks the decoder layers and replaces each target layer's `mlp` by a
`MemoryMLP`; in additive mode the original MLP stays inside as `base_layer`. The model's forward
gets a pre-hook that hands the attention mask to the memory layers, so padded positions are not
counted as reads.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, MemoryConfig
from .layer import build_memory
from .portable.product_keys import MemoryContext, MemoryMLP
from .values import ValueTable

# model_type -> how to reach the list of decoder layers from the causal-LM wrapper.
SUPPORTED_ARCHITECTURES = ("qwen2", "llama")

TRAIN_SCOPES = ("values", "memory", "memory+scale")


def check_architecture(config, what: str) -> None:
    """`config`: an HF model config; `what` names the model in the error."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"model: cannot inject memory into architecture {model_type!r} ({what}); "
                          f"supported model_type values: {list(SUPPORTED_ARCHITECTURES)}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    check_architecture(getattr(model, "config", None), type(model).__name__)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"model: {type(model).__name__} has no model.layers list of decoder layers")
    return layers


def check_memory_config(config, cfg: MemoryConfig, what: str = "model") -> None:
    """Errors that name the field: what cannot work on a model of this HF `config` (which is all
    it needs, so a run checks it before loading any weights)."""
    cfg.validate()
    check_architecture(config, what)
    n = config.num_hidden_layers
    for i in cfg.layers:
        if not 0 <= i < n:
            raise ConfigError(f"memory.layers: layer {i} is out of range; the model has {n} decoder "
                              f"layers, so expected indices in 0..{n - 1}")
    hidden = config.hidden_size
    if not cfg.gated and cfg.v_dim not in (None, hidden):
        raise ConfigError(
            f"memory.v_dim: expected {hidden} (the model's hidden size) or null, got {cfg.v_dim}: "
            f"without the gated projection (memory.gated=false) the memory output is added to / "
            f"replaces the MLP output directly (mode={cfg.mode})")


def _attention_mask_hook(module, args, kwargs):
    # The context is looked up on the module, not closed over: a deep copy of the model
    # (copy.deepcopy keeps hook functions as they are) then feeds its own memory layers.
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]  # CausalLM.forward(input_ids, attention_mask, ...)
    # The token mask keeps padding out of the read counts; a run that counts padding (the paper's
    # code) sets _smf_count_padding and its memory layers get none.
    module._smf_memory_context.attention_mask = None if getattr(module, "_smf_count_padding", False) else mask


def inject_memory(model: nn.Module, cfg: MemoryConfig) -> nn.Module:
    """Put a memory layer into each of `cfg.layers` of `model` (in place); returns the model."""
    if getattr(model, "smf_memory_config", None) is not None:
        raise ConfigError("model: memory is already injected into this model")
    check_memory_config(model.config, cfg, type(model).__name__)
    layers = decoder_layers(model)
    hidden = model.config.hidden_size
    context = MemoryContext()
    ref = next(model.parameters())
    for i in cfg.layers:
        # One generator per layer, seeded from (seed, layer): identical on every rank.
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + i)
        memory = build_memory(cfg, hidden, generator)
        base = layers[i].mlp if cfg.mode == "additive" else None
        wrapper = MemoryMLP(memory, base, cfg.scale_init, context)
        wrapper.train(layers[i].training)  # new modules follow the model's train/eval mode
        layers[i].mlp = wrapper.to(device=ref.device, dtype=ref.dtype)
    model.smf_memory_config = cfg
    model._smf_memory_context = context
    model._smf_mask_hook = model.register_forward_pre_hook(_attention_mask_hook, with_kwargs=True)
    return model


def memory_layers(model: nn.Module) -> list[tuple[int, MemoryMLP]]:
    """(decoder layer index, MemoryMLP) for every injected layer, in layer order."""
    return [(i, layer.mlp) for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.mlp, MemoryMLP)]


def value_tables(model: nn.Module) -> list[tuple[int, ValueTable]]:
    return [(i, mlp.memory.values) for i, mlp in memory_layers(model)]


def set_train_scope(model: nn.Module, scope: str) -> list[nn.Parameter]:
    """Freeze everything but `scope`; returns the dense parameters left trainable.

    values: only the value tables (sparse optimizer), no dense parameter;
    memory: value tables + every memory parameter (query, keys, gate/out, norm);
    memory+scale: that + the additive scale a.
    """
    if scope not in TRAIN_SCOPES:
        raise ConfigError(f"train scope: expected one of {list(TRAIN_SCOPES)}, got {scope!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for _, mlp in memory_layers(model):
        mlp.memory.values.requires_grad = True
        if scope in ("memory", "memory+scale"):
            trainable += list(mlp.memory.parameters())
        if scope == "memory+scale" and mlp.scale is not None:
            trainable.append(mlp.scale)
    for p in trainable:
        p.requires_grad_(True)
    return trainable
