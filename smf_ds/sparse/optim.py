"""Sparse optimizers for value rows: only the selected rows move, nothing else.

SGD (default; Lin et al. found adaptive optimizers leak) and lazy Adam/AdamW: a row's moments,
step count and weight decay advance only in the steps that select it, so a row that is not
selected is bitwise unchanged. State lives with the table's shard and is saved per rank.

adamw-dense is the leaky one, kept to reproduce the paper's code: torch's AdamW over the whole
table fed a gradient that is zero outside the selected rows, so every row's moments decay and
every row with a moment moves, every step (O(table) per step).
"""
from __future__ import annotations

import math

import torch

from ..config import SparseConfig
from ..memory.values import ValueTable


class SparseRowOptimizer:
    def __init__(self, tables: list[tuple[int, ValueTable]], cfg: SparseConfig, lr: float) -> None:
        self.cfg, self.lr = cfg, lr  # lr: the updater sets it each step when a schedule is on
        self.tables = dict(tables)
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        if cfg.optimizer == "adamw-dense":
            for layer, table in tables:
                w = table.local_weight
                # row_step: one count per row (all equal), so resume re-splits it with the rows
                self.state[layer] = {"exp_avg": torch.zeros_like(w, dtype=torch.float32),
                                     "exp_avg_sq": torch.zeros_like(w, dtype=torch.float32),
                                     "row_step": torch.zeros(w.shape[0], dtype=torch.long, device=w.device)}
        if cfg.optimizer in ("adam", "adamw"):
            for layer, table in tables:
                w = table.local_weight
                self.state[layer] = {
                    "exp_avg": torch.zeros_like(w, dtype=torch.float32),
                    "exp_avg_sq": torch.zeros_like(w, dtype=torch.float32),
                    "row_step": torch.zeros(w.shape[0], dtype=torch.long, device=w.device),
                }

    @torch.no_grad()
    def update(self, layer: int, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Apply one step to the given global `rows` (unique, owned by this process) with `grad`."""
        table = self.tables[layer]
        if self.cfg.optimizer == "adamw-dense":  # steps every row, selected or not
            self._dense_update(layer, rows, grad)
            return
        if rows.numel() == 0:
            return
        local = rows - table.owned_row_range()[0]
        weight = table.local_weight
        if self.cfg.optimizer == "sgd":
            weight.index_add_(0, local, grad.to(weight.dtype) * -self.lr)  # == w - lr g exactly, no copy of the rows
            return
        st = self.state[layer]
        beta1, beta2 = self.cfg.betas
        g = grad.float()
        m = st["exp_avg"].index_select(0, local).mul_(beta1).add_(g, alpha=1 - beta1)
        v = st["exp_avg_sq"].index_select(0, local).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        steps = st["row_step"].index_select(0, local) + 1
        st["exp_avg"].index_copy_(0, local, m)
        st["exp_avg_sq"].index_copy_(0, local, v)
        st["row_step"].index_copy_(0, local, steps)
        bias1 = 1 - beta1 ** steps.double()
        bias2 = 1 - beta2 ** steps.double()
        step_size = (self.lr / bias1).float().unsqueeze(1)
        denom = (v / bias2.float().unsqueeze(1)).sqrt_().add_(self.cfg.eps)
        w = weight.index_select(0, local).float()
        if self.cfg.optimizer == "adamw" and self.cfg.weight_decay > 0:
            w.mul_(1 - self.lr * self.cfg.weight_decay)
        w.sub_(step_size * m / denom)
        weight.index_copy_(0, local, w.to(weight.dtype))

    def _dense_update(self, layer: int, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """torch.optim.AdamW's step (single-tensor form) on the whole table with `grad` at `rows`, 0 elsewhere."""
        table, st = self.tables[layer], self.state[layer]
        weight = table.local_weight
        g = torch.zeros_like(st["exp_avg"])
        if rows.numel():
            g.index_copy_(0, rows - table.owned_row_range()[0], grad.float())
        beta1, beta2 = self.cfg.betas
        st["row_step"] += 1
        if weight.shape[0] == 0:  # this rank holds no row of the table
            return
        step = int(st["row_step"][0])
        w = weight.float()
        if self.cfg.weight_decay > 0:
            w.mul_(1 - self.lr * self.cfg.weight_decay)
        st["exp_avg"].lerp_(g, 1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(self.cfg.eps)
        w.addcdiv_(st["exp_avg"], denom, value=-self.lr / (1 - beta1 ** step))
        weight.copy_(w.to(weight.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{layer}.{k}": v for layer, st in self.state.items() for k, v in st.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for layer, st in self.state.items():
            for key in st:
                name = f"{layer}.{key}"
                if name not in tensors:
                    raise ValueError(f"sparse optimizer state: missing '{name}'")
                if tensors[name].shape != st[key].shape:
                    raise ValueError(f"sparse optimizer state '{name}': expected shape {tuple(st[key].shape)}, "
                                     f"got {tuple(tensors[name].shape)}")
                st[key].copy_(tensors[name])


def schedule_factor(schedule: str, warmup_steps: int, total_steps: int, step: int) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based), as Hugging Face's
    get_cosine_schedule_with_warmup / get_constant_schedule_with_warmup: linear warm-up from 0
    (the first step at 0), then constant or cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
