"""Product-key memory layer (Lample et al. 2019) and the MLP wrapper that carries it.

Shape legend: B batch, T sequence, C model hidden size, N tokens (B*T), H heads, Q half of the
key dim, S half-keys per head (n_keys), K knn, P candidate pairs (candidate_pairs), D value dim.

This file imports only torch: a merged model directory carries a copy of it (see __init__.py).
The value table is given to the layer: any module with
`lookup(indices_NK, weights_NK, token_mask_N) -> out_ND` (smf_ds's sharded tables with deferred
row gradients in training, a plain parameter in a merged model).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=None)
def candidate_pairs(knn: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (i, j) in the two best-first half-key lists whose pair can be among the top knn.

    Pair (i, j) scores at most every pair (i' <= i, j' <= j), and there are (i+1)(j+1) of those;
    so only pairs with (i+1)(j+1) <= knn can make the top knn: about knn * ln(knn) of the knn**2
    (knn 16: 50 of 256; knn 32: 119 of 1,024). The top knn of these equals that of all knn**2.
    """
    i, j = torch.meshgrid(torch.arange(knn), torch.arange(knn), indexing="ij")
    keep = (i + 1) * (j + 1) <= knn
    return i[keep].to(device), j[keep].to(device)


@functools.lru_cache(maxsize=None)
def _pair_pickers(knn: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot K x P matrices: top_NHK @ pick_KP copies each pair's half-score, exactly (x * 1 plus
    zeros), and is several times faster on CPU than gathering along the last dim."""
    eye = torch.eye(knn, dtype=dtype)
    first_P, second_P = candidate_pairs(knn, torch.device("cpu"))
    return eye[:, first_P].to(device), eye[:, second_P].to(device)


class ProductKeyMemory(nn.Module):
    """x_BTC -> memory read (B, T, C if gated else D).

    Per head: the query is split into two halves, each scored against its own S half-keys;
    the top-K of each half form product candidates whose score is the sum (only the pairs that
    can win, see candidate_pairs); the top-K of those index the n_keys**2 value rows,
    softmax-weighted. All heads' reads are summed. Parameters are left uninitialised: the
    caller initialises them (smf_ds: seeded) or loads them.
    """

    def __init__(self, hidden_size: int, heads: int, knn: int, n_keys: int, k_dim: int, v_dim: int,
                 gated: bool, query_batchnorm: bool, values: nn.Module) -> None:
        super().__init__()
        self.heads, self.knn, self.n_keys = heads, knn, n_keys
        self.half_dim = k_dim // 2
        self.v_dim = v_dim
        self.hidden_size = hidden_size
        self.query = nn.Linear(hidden_size, heads * k_dim, bias=False)
        self.query_norm = nn.BatchNorm1d(heads * k_dim) if query_batchnorm else None
        # keys_H2SQ: two sets of S half-keys per head.
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, self.half_dim))
        self.values = values
        if gated:
            # Meta's SiLU-gated value projection: out = W_o(mem * silu(W_g x)).
            self.gate = nn.Linear(hidden_size, v_dim, bias=False)
            self.out = nn.Linear(v_dim, hidden_size, bias=False)
        else:
            self.gate = self.out = None

    def select(self, x_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Product-key search: (indices_NHK global row ids, weights_NHK softmax over K, fp32)."""
        N = x_NC.shape[0]
        H, K, S, Q = self.heads, self.knn, self.n_keys, self.half_dim
        query = self.query(x_NC)
        if self.query_norm is not None:
            query = self.query_norm(query)
        # Scores in fp32 whatever the model's dtype: bf16 scores (8-bit mantissa) tie so often
        # that which rows are read would depend on how topk breaks ties. No-ops in fp32.
        query_NH2Q = query.float().view(N, H, 2, Q)
        keys_H2SQ = self.keys.float()
        scores1_NHS = torch.einsum("nhq,hsq->nhs", query_NH2Q[:, :, 0], keys_H2SQ[:, 0])
        scores2_NHS = torch.einsum("nhq,hsq->nhs", query_NH2Q[:, :, 1], keys_H2SQ[:, 1])
        top1_NHK, idx1_NHK = scores1_NHS.topk(K, dim=-1)  # sorted, best first
        top2_NHK, idx2_NHK = scores2_NHS.topk(K, dim=-1)
        first_P, second_P = candidate_pairs(K, x_NC.device)
        pick1_KP, pick2_KP = _pair_pickers(K, x_NC.device, top1_NHK.dtype)
        cand_scores_NHP = top1_NHK @ pick1_KP + top2_NHK @ pick2_KP
        best_NHK, pos_NHK = cand_scores_NHP.topk(K, dim=-1)
        indices_NHK = idx1_NHK.gather(-1, first_P[pos_NHK]) * S + idx2_NHK.gather(-1, second_P[pos_NHK])
        weights_NHK = F.softmax(best_NHK, dim=-1)
        return indices_NHK, weights_NHK

    def forward(self, x_BTC: torch.Tensor, token_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x_BTC.shape
        x_NC = x_BTC.reshape(B * T, C)
        indices_NHK, weights_NHK = self.select(x_NC)
        token_mask_N = None if token_mask_BT is None else token_mask_BT.reshape(B * T)
        read_ND = self.values.lookup(indices_NHK.reshape(B * T, -1), weights_NHK.reshape(B * T, -1),
                                     token_mask_N)
        read_ND = read_ND.to(x_BTC.dtype)
        if self.gate is not None:
            read_ND = self.out(read_ND * F.silu(self.gate(x_NC)))
        return read_ND.view(B, T, -1)


class MemoryContext:
    """Per-forward state shared by a model's memory layers: the current token (padding) mask."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None

    def token_mask_for(self, x_BTC: torch.Tensor) -> torch.Tensor | None:
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != x_BTC.shape[0]:
            return None
        # With a KV cache the mask covers past + new tokens; the layer sees only the new ones.
        return mask[:, -x_BTC.shape[1]:]


class MemoryMLP(nn.Module):
    """Takes the place of a decoder layer's MLP.

    additive: base_layer(x) + scale * memory(x), scale a learnable scalar (peft-style: the
    original MLP is kept, frozen by default, as `base_layer`); replacement: memory(x) alone.
    """

    def __init__(self, memory: ProductKeyMemory, base_layer: nn.Module | None, scale_init: float,
                 context: MemoryContext) -> None:
        super().__init__()
        self.memory = memory
        self.base_layer = base_layer
        # Shape (1,), not a 0-dim scalar: DeepSpeed's parameter broadcast cannot view 0-dim tensors.
        self.scale = nn.Parameter(torch.full((1,), float(scale_init))) if base_layer is not None else None
        self._context = context  # plain attribute: not a submodule, not in state_dict

    @property
    def mode(self) -> str:
        return "additive" if self.base_layer is not None else "replacement"

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        read = self.memory(x_BTC, self._context.token_mask_for(x_BTC))
        if self.base_layer is None:
            return read
        return self.base_layer(x_BTC) + self.scale.to(read.dtype) * read
