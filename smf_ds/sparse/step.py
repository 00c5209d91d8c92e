"""One SMF optimizer step for every memory table: reads -> scores -> global top-t -> sparse update.

Call `step()` once per optimizer step, after the backward of the last micro-batch: the reads of
all micro-batches and ranks are summed first, then rows are selected, so the selection is per
optimizer step over the whole global batch (the paper's code selected per micro-batch); only then
are the gradients of the selected rows formed. Only the selected rows change.
"""
from __future__ import annotations

import logging
import math

import torch

from ..config import RULES_NEEDING_BACKGROUND, SparseConfig, background_needed
from ..memory.values import ValueTable
from .background import BackgroundStats
from .metrics import overlap, slot_usage
from .optim import SparseRowOptimizer
from .selection import select_rows
from .stats import gather_over_row_owners, step_access, step_grad, sum_over_row_owners, sum_over_shards

log = logging.getLogger(__name__)


class SparseMemoryUpdater:
    """Owns the selection state and the sparse optimizer of a model's value tables.

    grad_divisor: the row gradients in the sinks are sums over data-parallel ranks, while the
    engine averages dense gradients over them; dividing by the data-parallel world size keeps
    both on the same scale (and makes W=1 and W=2 with one global batch agree).
    """

    def __init__(self, tables: list[tuple[int, ValueTable]], cfg: SparseConfig, lr: float,
                 background: BackgroundStats | None = None, grad_divisor: float = 1.0,
                 background_source: str = "sparse.background") -> None:
        cfg.validate()
        if cfg.scoring in RULES_NEEDING_BACKGROUND:
            if background is None:
                raise background_needed(cfg.scoring)
            background.check_against(tables, background_source)
        self.tables, self.cfg, self.background = tables, cfg, background
        self.grad_divisor = grad_divisor
        self.top_t = {}
        for layer, table in tables:
            if cfg.top_t > table.num_rows and not cfg.scoring.startswith("dense-"):  # the dense rules ignore t
                log.warning("sparse.top_t=%d is larger than memory layer %d's table (%d rows): clamped to %d",
                            cfg.top_t, layer, table.num_rows, table.num_rows)
            self.top_t[layer] = min(cfg.top_t, table.num_rows)
        self.optimizer = SparseRowOptimizer(tables, cfg, lr)
        self.step_count = 0
        self.previous: dict[int, torch.Tensor] = {}
        # Rows ever updated, over this process's rows (for the metric); usage counts since last report.
        self.ever_updated = {layer: torch.zeros(self._owned(t), dtype=torch.bool) for layer, t in tables}
        self.n_ever_updated = {layer: 0 for layer, _ in tables}  # kept in step: no O(table) sum per step
        self.window_counts = {layer: torch.zeros(self._owned(t), dtype=torch.long) for layer, t in tables}
        for _, table in tables:
            table.track_access = True

    @staticmethod
    def _owned(table: ValueTable) -> int:
        start, stop = table.owned_row_range()
        return stop - start

    def step(self) -> dict[str, float]:
        """Select and update; clears every sink; returns metrics keyed 'layer<i>/<name>'."""
        plans = []
        for layer, table in self.tables:
            rows, counts = step_access(table)
            selected = select_rows(self.cfg.scoring, self.top_t[layer], table, layer, rows, counts,
                                   self.background, self.step_count, self.cfg.seed, self.cfg.kl_eps)
            mine, grad = step_grad(table, selected)
            plans.append((layer, table, rows, counts, selected, mine, grad))

        sq_norm = 0.0
        for _, table, *_, g in plans:
            g.div_(self.grad_divisor)
            sq_norm += float(sum_over_shards(table, g.double().pow(2).sum().reshape(1)))
        grad_norm = math.sqrt(sq_norm)
        clip = 1.0
        if self.cfg.max_grad_norm > 0 and grad_norm > self.cfg.max_grad_norm:
            clip = self.cfg.max_grad_norm / (grad_norm + 1e-6)

        metrics = {"values/grad_norm": grad_norm}
        for layer, table, rows, counts, selected, mine, g in plans:
            if clip != 1.0:
                g.mul_(clip)
            self.optimizer.update(layer, mine, g)
            start, _ = table.owned_row_range()
            local = (mine - start).cpu()
            self.n_ever_updated[layer] += int((~self.ever_updated[layer][local]).sum())
            self.ever_updated[layer][local] = True
            self.window_counts[layer].index_add_(0, (rows - start).cpu(), counts.cpu())
            n_read = sum_over_row_owners(table, (counts > 0).sum().double().reshape(1))
            n_ever = sum_over_row_owners(table, torch.tensor([float(self.n_ever_updated[layer])],
                                                                     device=counts.device))
            metrics.update({
                f"layer{layer}/rows_accessed": float(n_read),
                f"layer{layer}/rows_selected": float(selected.numel()),
                f"layer{layer}/overlap_prev": overlap(selected, self.previous.get(layer)),
                f"layer{layer}/frac_ever_updated": float(n_ever) / table.num_rows,
            })
            self.previous[layer] = selected
            table.sink.clear()
        self.step_count += 1
        return metrics

    def usage_metrics(self, reset: bool = True) -> dict[str, float]:
        """Slot usage over the reads since the last call (collective for row-sharded tables)."""
        out = {}
        for layer, table in self.tables:
            counts = gather_over_row_owners(table, self.window_counts[layer])
            for name, value in slot_usage(counts).items():
                out[f"layer{layer}/slot_{name}"] = value
            if reset:
                self.window_counts[layer].zero_()
        return out

    def state_dict(self) -> dict:
        tensors = {f"optim.{k}": v for k, v in self.optimizer.state_dict().items()}
        for layer in self.ever_updated:
            tensors[f"ever_updated.{layer}"] = self.ever_updated[layer]
            tensors[f"window_counts.{layer}"] = self.window_counts[layer]
            if layer in self.previous:
                tensors[f"previous.{layer}"] = self.previous[layer]
        tensors["step_count"] = torch.tensor([self.step_count])
        return tensors

    def load_state_dict(self, tensors: dict) -> None:
        self.optimizer.load_state_dict({k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")})
        for layer in self.ever_updated:
            self.ever_updated[layer].copy_(tensors[f"ever_updated.{layer}"])
            self.n_ever_updated[layer] = int(self.ever_updated[layer].sum())
            self.window_counts[layer].copy_(tensors[f"window_counts.{layer}"])
            if f"previous.{layer}" in tensors:
                device = dict(self.tables)[layer].local_weight.device  # checkpoints load on the CPU
                self.previous[layer] = tensors[f"previous.{layer}"].to(device)
        self.step_count = int(tensors["step_count"][0])
