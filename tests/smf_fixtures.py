"""A small SMF problem shared by the sparse tests: one memory layer, seeded batches, a masked loss."""
import torch

from smf_ds.config import MemoryConfig, SparseConfig
from smf_ds.memory.layer import build_memory

HIDDEN = 12
MEM_CFG = MemoryConfig(layers=[0], n_keys=8, heads=2, knn=4, k_dim=8, v_dim=6, gated=False, seed=5)
T = 4


def make_memory():
    mem = build_memory(MEM_CFG, HIDDEN)
    for p in mem.parameters():
        p.requires_grad_(False)  # only the value rows train here
    return mem


def global_batch(step: int, n_seqs: int = 8, kind: str = "train"):
    """(x_BTC, mask_BT, target_BTD) of one global batch; sequence s has length 1 + s % T."""
    g = torch.Generator().manual_seed({"train": 1000, "background": 2000}[kind] + step)
    x = torch.randn(n_seqs, T, HIDDEN, generator=g)
    lengths = torch.tensor([1 + s % T for s in range(n_seqs)])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    target = torch.randn(n_seqs, T, MEM_CFG.v_dim, generator=g)
    return x, mask, target


def micro_loss(mem, x, mask, target, tokens_in_global_batch: int):
    """Sum of the masked per-token loss, scaled so micro-batch losses add up to the global mean."""
    out = mem(x, mask)
    per_token = (out * target).sum(-1) * mask
    return per_token.sum() / tokens_in_global_batch


def sparse_cfg(rule: str, optimizer: str = "sgd", top_t: int = 5) -> SparseConfig:
    wd = 0.1 if optimizer == "adamw" else 0.0
    return SparseConfig(scoring=rule, top_t=top_t, optimizer=optimizer, weight_decay=wd)
