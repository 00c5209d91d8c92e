"""One SMF optimizer step for every memory table: reads -> scores -> global top-t -> sparse update.

Call `step()` once per optimizer step, after the backward of the last micro-batch: the reads of
all micro-batches and ranks are summed first, then rows are selected, so the selection is per
optimizer step over the whole global batch; only then are the gradients of the selected rows
formed. Only the selected rows change (unless the optimizer is adamw-dense).

With sparse.select_every=micro_batch (the paper's code, kept to measure what it changes), call
`after_backward()` after each micro-batch's backward as well: each rank selects the top-t of that
micro-batch's own reads and keeps those rows' gradients; the step then updates the union of those
rows over micro-batches and ranks with their kept gradients summed, as a gradient hook that masks
each backward's dense gradient would (then DDP's all-reduce, then the accumulated step).
"""
from __future__ import annotations

import logging
import math

import torch

from ..config import RULES_NEEDING_BACKGROUND, ConfigError, SparseConfig, background_needed
from ..memory.values import ValueTable, coalesce_rows
from .background import BackgroundStats
from .metrics import overlap, slot_usage
from .optim import SparseRowOptimizer
from .selection import select_rows
from .stats import (gather_over_row_owners, step_access, step_grad, sum_over_replicas, sum_over_row_owners,
                    sum_over_shards)

log = logging.getLogger(__name__)


class SparseMemoryUpdater:
    """Owns the selection state and the sparse optimizer of a model's value tables.

    grad_divisor: the row gradients in the sinks are sums over data-parallel ranks, while the
    engine averages dense gradients over them; dividing by the data-parallel world size keeps
    both on the same scale (and makes W=1 and W=2 with one global batch agree).
    """

    def __init__(self, tables: list[tuple[int, ValueTable]], cfg: SparseConfig, lr: float,
                 background: BackgroundStats | None = None, grad_divisor: float = 1.0,
                 background_source: str = "sparse.background", lr_factor=None) -> None:
        """lr_factor(step) -> the lr's multiplier at that optimizer step (None: constant)."""
        cfg.validate()
        if cfg.select_every == "micro_batch":
            split = [layer for layer, t in tables if t.row_group is not None or t.col_group is not None]
            if split:  # the paper's code had whole tables; a rank's own micro-batch top-t needs its own reads
                raise ConfigError(f"sparse.select_every='micro_batch': needs memory.sharding='replicated' (each "
                                  f"rank selects from its own reads), but the tables of layers {split} are split "
                                  f"over ranks; use sparse.select_every='step' with row or column sharding")
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
        self.base_lr, self.lr_factor = lr, lr_factor
        self.pending: dict[int, tuple] = {}  # select_every=micro_batch: (rows, counts, kept rows, their grads)
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

    def after_backward(self) -> None:
        """After each micro-batch's backward: with select_every=micro_batch, select this rank's top-t
        of the micro-batch's reads, keep those rows' gradients, clear the sink; otherwise nothing."""
        if self.cfg.select_every != "micro_batch":
            return
        for layer, table in self.tables:
            if not (table.sink.access_entries or table.sink.grad_entries):  # no forward since the last call
                continue
            device = table.local_weight.device
            rows, counts = table.sink.coalesced_access(device=device)  # this rank's reads only
            selected = select_rows(self.cfg.scoring, self.top_t[layer], table, layer, rows, counts,
                                   self.background, self.step_count, self.cfg.seed, self.cfg.kl_eps)
            grad = table.sink.row_grad(selected, table.local_weight.shape[1], dtype=table.local_weight.dtype,
                                       device=device)
            if layer in self.pending:
                old_rows, old_counts, old_kept, old_grad = self.pending[layer]
                rows, counts = coalesce_rows(torch.cat([old_rows, rows]), torch.cat([old_counts, counts]))
                selected, grad = coalesce_rows(torch.cat([old_kept, selected]), torch.cat([old_grad, grad]))
            self.pending[layer] = (rows, counts, selected, grad)
            table.sink.clear()

    def _plan(self, layer: int, table: ValueTable):
        """(rows read, their counts, rows selected, the selected rows this process holds, their gradient)."""
        if self.cfg.select_every != "micro_batch":
            rows, counts = step_access(table)
            selected = select_rows(self.cfg.scoring, self.top_t[layer], table, layer, rows, counts,
                                   self.background, self.step_count, self.cfg.seed, self.cfg.kl_eps)
            if self._sgd_from_sink(table):  # no gradient rows formed: the update forms them block by block
                start, stop = table.owned_row_range()
                mine = selected if (start, stop) == (0, table.num_rows) else \
                    selected[(selected >= start) & (selected < stop)]  # no copy of a whole table's (dense-all) rows
                return rows, counts, selected, mine, None
            mine, grad = step_grad(table, selected)
            return rows, counts, selected, mine, grad
        empty = torch.empty(0, dtype=torch.long, device=table.local_weight.device)
        rows, counts, kept, grad = self.pending.pop(layer, (
            empty, empty, empty, table.local_weight.new_zeros((0, table.local_weight.shape[1]))))
        if table.replica_group is not None:  # every rank's kept rows, their gradients summed (DDP's all-reduce)
            rows, counts = sum_over_replicas(table.replica_group, rows, counts)
            kept, grad = sum_over_replicas(table.replica_group, kept, grad)
        return rows, counts, kept, kept, grad

    def _sgd_from_sink(self, table: ValueTable) -> bool:
        """SGD without clipping on a table whose sink holds every read of its rows: the sink updates
        the rows in place (RowGradSink.sgd_update), with no rows x dim gradient ever formed."""
        return self.cfg.optimizer == "sgd" and self.cfg.max_grad_norm == 0 and table.replica_group is None

    def step(self) -> dict[str, float]:
        """Select and update; clears every sink; returns metrics keyed 'layer<i>/<name>'."""
        if self.lr_factor is not None:
            self.optimizer.lr = self.base_lr * self.lr_factor(self.step_count)
        if self.cfg.select_every == "micro_batch":
            self.after_backward()  # a backward not followed by after_backward (reads since the last one)
        plans = []
        for layer, table in self.tables:
            plans.append((layer, table, *self._plan(layer, table)))

        sq_norm = 0.0
        for _, table, *_, g in plans:
            if g is None:  # its norm comes with its update
                continue
            g.div_(self.grad_divisor)
            sq_norm += float(sum_over_shards(table, g.double().pow(2).sum().reshape(1)))
        grad_norm = math.sqrt(sq_norm)
        clip = 1.0
        if self.cfg.max_grad_norm > 0 and grad_norm > self.cfg.max_grad_norm:
            clip = self.cfg.max_grad_norm / (grad_norm + 1e-6)

        metrics = {"values/grad_norm": grad_norm}
        for layer, table, rows, counts, selected, mine, g in plans:
            start, _ = table.owned_row_range()
            if g is None:
                sq = table.sink.sgd_update(table.local_weight, mine, self.optimizer.lr, self.grad_divisor, start)
                sq_norm += float(sum_over_shards(table, sq.reshape(1)))
                metrics["values/grad_norm"] = math.sqrt(sq_norm)
            else:
                if clip != 1.0:
                    g.mul_(clip)
                self.optimizer.update(layer, mine, g)
            local = (mine - start if start else mine).cpu()  # no copy for a whole table (dense-all: all rows)
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
