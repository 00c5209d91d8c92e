"""Configurations of SMF causal LMs: the base model's configuration, with the memory in `smf_memory`.

`smf_memory` holds the memory's structure (layers, n_keys, heads, knn, k_dim, v_dim, mode, gated,
query_batchnorm) and what smf-ds recorded with it. A model type of its own means that a loader
which does not run this code refuses the directory instead of loading the base model without
its memory. This file imports only transformers (see __init__.py).
"""
from transformers import LlamaConfig, Qwen2Config

MEMORY_FIELDS = ("layers", "n_keys", "heads", "knn", "k_dim", "v_dim", "mode", "gated", "query_batchnorm")


def check_smf_memory(config) -> dict:
    """The memory fields of `config.smf_memory`, or a ValueError naming the missing ones."""
    memory = getattr(config, "smf_memory", None)
    missing = [f for f in MEMORY_FIELDS if not isinstance(memory, dict) or f not in memory]
    if missing:
        raise ValueError(f"{type(config).__name__}: smf_memory: expected a mapping with {list(MEMORY_FIELDS)}; "
                         f"missing {missing}")
    return {f: memory[f] for f in MEMORY_FIELDS}


class SMFQwen2Config(Qwen2Config):
    model_type = "smf_qwen2"


class SMFLlamaConfig(LlamaConfig):
    model_type = "smf_llama"
