"""smf-ds's product-key memory layer: the portable layer (portable/product_keys.py) over a local
value table, with its tensors drawn from a seed."""
from __future__ import annotations

import torch

from ..config import MemoryConfig
from .portable.product_keys import ProductKeyMemory
from .values import LocalValueTable


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def build_memory(cfg: MemoryConfig, hidden_size: int, generator: torch.Generator | None = None) -> ProductKeyMemory:
    """A memory layer as `cfg` says, initialised from `generator` (default: seeded by cfg.seed).

    The tensors are drawn in the order query, keys, values, gate, out, so one seed always gives
    the same memory (every rank builds the same one)."""
    if generator is None:
        generator = torch.Generator().manual_seed(cfg.seed)
    v_dim = cfg.v_dim or hidden_size
    half_dim = cfg.k_dim // 2
    drawn = {"query.weight": _uniform((cfg.heads * cfg.k_dim, hidden_size), hidden_size ** -0.5, generator),
             "keys": _uniform((cfg.heads, 2, cfg.n_keys, half_dim), half_dim ** -0.5, generator)}
    values = LocalValueTable(cfg.slots, v_dim, cfg.value_init_std, generator)
    if cfg.gated:
        drawn["gate.weight"] = _uniform((v_dim, hidden_size), hidden_size ** -0.5, generator)
        drawn["out.weight"] = _uniform((hidden_size, v_dim), v_dim ** -0.5, generator)
    memory = ProductKeyMemory(hidden_size, cfg.heads, cfg.knn, cfg.n_keys, cfg.k_dim, v_dim, cfg.gated,
                              cfg.query_batchnorm, values)
    with torch.no_grad():
        for name, tensor in drawn.items():
            memory.get_parameter(name).copy_(tensor)
    return memory
