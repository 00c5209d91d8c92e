"""SMF causal LMs for transformers: a Qwen2 or Llama model whose decoder layers listed in
`config.smf_memory["layers"]` carry a product-key memory in place of (replacement) or beside
(additive) their MLP, exactly as smf-ds trains them.

Loaded with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` from a directory
written by smf-ds (`save_merged`, `smf-ds export`); generation, `save_pretrained`, dtypes and
device maps are the base model's. The value tables are plain parameters here: a model trained
further with ordinary tools updates every row it reads (smf-ds trains only the selected rows).
This file imports only torch, transformers and its two sibling files (see __init__.py).
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from .configuration_smf import SMFLlamaConfig, SMFQwen2Config, check_smf_memory
from .product_keys import MemoryContext, MemoryMLP, ProductKeyMemory


class ValueRows(nn.Module):
    """A memory's value table, num_rows x dim, read by weighted bags of rows."""

    def __init__(self, num_rows: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_rows, dim))

    def lookup(self, indices_NK: torch.Tensor, weights_NK: torch.Tensor, token_mask_N=None) -> torch.Tensor:
        return F.embedding_bag(indices_NK, self.weight, per_sample_weights=weights_NK.to(self.weight.dtype),
                               mode="sum")


def add_memory_layers(model: nn.Module, config) -> None:
    """Put the memory layers `config.smf_memory` describes into `model`, initialised (a fresh model
    from its config has small random keys and values; from_pretrained then loads them)."""
    memory = check_smf_memory(config)
    layers = model.model.layers
    context = MemoryContext()  # no padding mask is needed: these tables count no reads
    v_dim = memory["v_dim"] or config.hidden_size
    for i in memory["layers"]:
        pkm = ProductKeyMemory(config.hidden_size, memory["heads"], memory["knn"], memory["n_keys"], memory["k_dim"],
                               v_dim, memory["gated"], memory["query_batchnorm"],
                               ValueRows(memory["n_keys"] ** 2, v_dim))
        with torch.no_grad():
            pkm.keys.normal_(0.0, config.initializer_range)
            pkm.values.weight.normal_(0.0, config.initializer_range)
        base = layers[i].mlp if memory["mode"] == "additive" else None
        layers[i].mlp = MemoryMLP(pkm, base, 0.0, context)


class _SMFMixin:
    # Value rows stay fp32 under a bf16 model, as smf-ds keeps them (a bf16 table rounds reads).
    _keep_in_fp32_modules_strict = ["memory.values"]

    @torch.no_grad()
    def _init_weights(self, module):
        # In place rather than through torch.nn.init, which transformers skips for remote code:
        # a fresh model (from_config) or a tensor missing from a checkpoint is then never garbage.
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ProductKeyMemory):
            module.keys.normal_(0.0, std)
        elif isinstance(module, ValueRows):
            module.weight.normal_(0.0, std)
        elif isinstance(module, MemoryMLP) and module.scale is not None:
            module.scale.zero_()


class SMFQwen2ForCausalLM(_SMFMixin, Qwen2ForCausalLM):
    config_class = SMFQwen2Config

    def __init__(self, config: SMFQwen2Config) -> None:
        super().__init__(config)
        add_memory_layers(self, config)
        self.post_init()


class SMFLlamaForCausalLM(_SMFMixin, LlamaForCausalLM):
    config_class = SMFLlamaConfig

    def __init__(self, config: SMFLlamaConfig) -> None:
        super().__init__(config)
        add_memory_layers(self, config)
        self.post_init()
