"""Memory value tables: one interface, a local implementation, sparse row gradients.

Shape legend: N tokens, K rows read per token (heads * knn), U unique rows of a lookup, D value
dim (a column shard's width when sharded), R rows held by this process.

A table's weight is a non-persistent buffer, never an `nn.Parameter`: DeepSpeed would broadcast,
all-reduce, ZeRO-partition and checkpoint-on-rank-0 any parameter, and a sharded table must
escape all four. Gradients reach the table through `FetchRows`, an autograd function whose
backward hands (unique rows x D) to the table's `RowGradSink`; no dense N x D gradient exists.
Whatever optimizes the table (the sparse optimizer) reads the sink.
"""
from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn


def coalesce_rows(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the values of repeated row ids: (sorted unique rows, summed values)."""
    unique_U, inverse = torch.unique(rows, return_inverse=True)
    summed = values.new_zeros((unique_U.numel(),) + tuple(values.shape[1:]))
    summed.index_add_(0, inverse, values)
    return unique_U, summed


class RowGradSink:
    """Collects (rows, grad rows) from every backward and (rows, counts) from every forward.

    Entries are kept per lookup and coalesced on demand, so gradient accumulation over
    micro-batches costs nothing until the optimizer step, and no state grows with table size.
    """

    def __init__(self) -> None:
        self.grad_entries: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.access_entries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add_grad(self, rows_U: torch.Tensor, grad_UD: torch.Tensor) -> None:
        if rows_U.numel():
            self.grad_entries.append((rows_U, grad_UD))

    def add_access(self, rows_U: torch.Tensor, counts_U: torch.Tensor) -> None:
        if rows_U.numel():
            self.access_entries.append((rows_U, counts_U))

    def clear(self) -> None:
        self.grad_entries.clear()
        self.access_entries.clear()

    @staticmethod
    def _coalesce(entries, width: int | None, dtype, device):
        if not entries:
            shape = (0, width) if width is not None else (0,)
            return torch.empty(0, dtype=torch.long, device=device), torch.zeros(shape, dtype=dtype, device=device)
        return coalesce_rows(torch.cat([r for r, _ in entries]), torch.cat([v for _, v in entries]))

    def coalesced_grad(self, dim: int, dtype=torch.float32, device=None):
        """(rows_U sorted, grad_UD) summed over every backward since the last clear."""
        return self._coalesce(self.grad_entries, dim, dtype, device)

    def coalesced_access(self, device=None):
        """(rows_U sorted, counts_U) summed over every forward since the last clear."""
        return self._coalesce(self.access_entries, None, torch.long, device)


class FetchRows(torch.autograd.Function):
    """rows_UD = table.gather_rows(rows_U); backward: table.receive_row_grad(rows_U, grad_UD).

    `anchor` is an empty tensor requiring grad, so the output joins the autograd graph even
    though the table weight itself is not a leaf that autograd sees.
    """

    @staticmethod
    def forward(ctx, anchor, table, rows_U):  # noqa: D102
        ctx.table = table
        ctx.save_for_backward(rows_U)
        return table.gather_rows(rows_U)

    @staticmethod
    def backward(ctx, grad_UD):  # noqa: D102
        (rows_U,) = ctx.saved_tensors
        ctx.table.receive_row_grad(rows_U, grad_UD)
        return None, None, None


def masked_counts(inverse_NK: torch.Tensor, token_mask_N: torch.Tensor | None, num_unique: int) -> torch.Tensor:
    """How often each unique row was read by unmasked tokens (padding does not count)."""
    if token_mask_N is not None:
        inverse_NK = inverse_NK[token_mask_N.bool()]
    return torch.bincount(inverse_NK.reshape(-1), minlength=num_unique)


def weighted_row_sum(inverse_NK: torch.Tensor, rows_UD: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """out_ND = sum_k weights[n,k] * rows[inverse[n,k]], without materialising N x K x D."""
    return F.embedding_bag(inverse_NK, rows_UD, per_sample_weights=weights_NK.to(rows_UD.dtype), mode="sum")


class ValueTable(nn.Module, metaclass=abc.ABCMeta):
    """Interface of every value table (local, row-sharded, column-sharded).

    num_rows / dim are the *global* table shape. Row ids are always global.
    """

    num_rows: int
    dim: int

    def __init__(self) -> None:
        super().__init__()
        self.sink = RowGradSink()
        self.requires_grad = True  # values train unless a train scope freezes them
        self.track_access = False  # record per-row read counts (SMF selection, background stats)
        # Layout across processes, set by smf_ds.parallel (None: not split that way).
        # row_group: ranks hold different rows; col_group: different slices of the value dim;
        # replica_group: ranks hold identical copies whose reads and gradients must be summed.
        self.row_group = None
        self.col_group = None
        self.replica_group = None

    def _apply(self, fn, recurse=True):
        """Move with the model, but keep the table's own dtype (fp32 by default).

        `model.to(torch.bfloat16)` would otherwise round the values too, and SGD steps with the
        large value learning rates of SMF would then mostly round away. Rows are read in the
        table's dtype; the layer casts its output to the activations' dtype.
        """
        weight = self._buffers.pop("weight")
        try:
            super()._apply(fn, recurse)
            target = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        finally:
            self._buffers["weight"] = weight
        if target.device != weight.device:
            self._buffers["weight"] = weight.to(target.device)
        return self

    def _anchor(self, like: torch.Tensor) -> torch.Tensor | None:
        if self.requires_grad and torch.is_grad_enabled():
            return torch.empty(0, device=like.device, requires_grad=True)
        return None

    def fetch(self, rows_U: torch.Tensor) -> torch.Tensor:
        anchor = self._anchor(rows_U)
        if anchor is None:
            return self.gather_rows(rows_U)
        return FetchRows.apply(anchor, self, rows_U)

    # --- what each implementation provides ----------------------------------------------------
    @abc.abstractmethod
    def lookup(self, indices_NK: torch.Tensor, weights_NK: torch.Tensor,
               token_mask_N: torch.Tensor | None = None) -> torch.Tensor:
        """out_ND = sum_k weights[n,k] * V[indices[n,k]]; differentiable in weights, rows to sink."""
        ...

    @abc.abstractmethod
    def gather_rows(self, rows_U: torch.Tensor) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def receive_row_grad(self, rows_U: torch.Tensor, grad_UD: torch.Tensor) -> None:
        ...

    # --- state held by this process (a shard when sharded) ------------------------------------
    @property
    def local_weight(self) -> torch.Tensor:
        return self.weight

    def owned_row_range(self) -> tuple[int, int]:
        """[start, stop) of global rows whose weights this process holds (all, unless row-sharded)."""
        return 0, self.num_rows

    @abc.abstractmethod
    def full_weight(self) -> torch.Tensor:
        """The whole num_rows x dim table (gathered when sharded; collective)."""
        ...

    @abc.abstractmethod
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Set this process's part from a whole num_rows x dim table."""
        ...

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, local={tuple(self.local_weight.shape)}"


class LocalValueTable(ValueTable):
    """The whole table in this process."""

    def __init__(self, num_rows: int, dim: int, init_std: float | None = None,
                 generator: torch.Generator | None = None, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_rows, self.dim = num_rows, dim
        if weight is None:
            std = dim ** -0.5 if init_std is None else init_std
            weight = torch.randn(num_rows, dim, generator=generator) * std
        if tuple(weight.shape) != (num_rows, dim):
            raise ValueError(f"value table weight: expected shape {(num_rows, dim)}, got {tuple(weight.shape)}")
        self.register_buffer("weight", weight, persistent=False)

    def lookup(self, indices_NK, weights_NK, token_mask_N=None):
        rows_U, inverse_NK = torch.unique(indices_NK, return_inverse=True)
        if self.track_access:
            self.sink.add_access(rows_U, masked_counts(inverse_NK, token_mask_N, rows_U.numel()))
        return weighted_row_sum(inverse_NK, self.fetch(rows_U), weights_NK)

    def gather_rows(self, rows_U):
        return self.weight.index_select(0, rows_U)

    def receive_row_grad(self, rows_U, grad_UD):
        self.sink.add_grad(rows_U, grad_UD)

    def full_weight(self):
        return self.weight

    def load_full_weight(self, weight):
        if tuple(weight.shape) != (self.num_rows, self.dim):
            raise ValueError(f"value table: expected a {(self.num_rows, self.dim)} table, "
                             f"got {tuple(weight.shape)}")
        self.weight.copy_(weight)
