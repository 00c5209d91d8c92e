"""Background access statistics: per row, in how many background batches it was read (df), how
often it was read in all (counts), and the number of batches B.

A background batch is one global batch (every rank's micro-batch of one step together), the same
unit that training selects over, so df means "read somewhere in that step's batch" at any world
size. Saved as safetensors (`layers.<i>.df`, `layers.<i>.counts`; metadata format_version,
num_batches, the layer list and the memory and base fingerprints) and reused by later runs and by
resume.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ConfigError
from ..memory.values import ValueTable
from .stats import step_access, sum_over_row_owners


FORMAT_VERSION = 2  # 2: the memory and base fingerprints are recorded


@dataclass
class BackgroundStats:
    num_batches: int = 0
    df: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (num_rows,) int64
    counts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (num_rows,) int64
    memory: str | None = None  # memory_fingerprint of the model the reads went through
    base: str | None = None  # and its base_fingerprint

    @classmethod
    def empty(cls, tables: list[tuple[int, ValueTable]]) -> "BackgroundStats":
        return cls(0, {i: torch.zeros(t.num_rows, dtype=torch.long) for i, t in tables},
                   {i: torch.zeros(t.num_rows, dtype=torch.long) for i, t in tables})

    def add_step(self, tables: list[tuple[int, ValueTable]]) -> None:
        """Fold the reads recorded in every table's sink into the stats (one background batch)."""
        self.num_batches += 1
        for layer, table in tables:
            rows, counts = step_access(table)
            read = rows[counts > 0].cpu()
            self.df[layer].index_add_(0, read, torch.ones_like(read))
            self.counts[layer].index_add_(0, rows.cpu(), counts.cpu())
            table.sink.clear()

    def finalize(self, tables: list[tuple[int, ValueTable]]) -> None:
        """Row owners hold only their rows' stats (zeros elsewhere): sum the vectors over owners."""
        for layer, table in tables:
            self.df[layer] = sum_over_row_owners(table, self.df[layer])
            self.counts[layer] = sum_over_row_owners(table, self.counts[layer])

    def check_against(self, tables: list[tuple[int, ValueTable]], source: str = "background stats",
                      memory: str | None = None, base: str | None = None) -> None:
        """Refuse stats that do not fit these tables; `memory` and `base`: the run's memory_fingerprint
        and base_fingerprint, which must be those the stats were read through (rows mean nothing
        under other keys, and other base weights ask other queries). Shapes first: they say the most
        plainly what is wrong."""
        for layer, table in tables:
            if layer not in self.df:
                raise ConfigError(f"{source}: no statistics for memory layer {layer}; "
                                  f"the stats have layers {sorted(self.df)}")
            if self.df[layer].shape[0] != table.num_rows:
                raise ConfigError(f"{source}: layer {layer} has stats for {self.df[layer].shape[0]} rows, "
                                  f"but the memory table has {table.num_rows} rows (memory.n_keys ** 2); "
                                  f"recompute them with `smf-ds background` for this memory config")
        if memory is not None and self.memory is not None and memory != self.memory:
            raise ConfigError(f"{source}: these stats were read through another memory (fingerprint "
                              f"{self.memory}) than this run starts from ({memory}); compute them with "
                              f"`smf-ds background` and the same --memory-adapter and memory.* settings as training")
        if base is not None and self.base is not None and base != self.base:
            raise ConfigError(f"{source}: these stats were read through other base model weights (fingerprint "
                              f"{self.base}) than this run's model.name_or_path holds ({base}); compute them with "
                              f"`smf-ds background` and the same model as training")
        if self.num_batches <= 0:
            raise ConfigError(f"{source}: num_batches is {self.num_batches}; expected at least one batch")

    def digest(self) -> str:
        """A hash of what scoring reads (B, and every layer's df and counts): a resumed run checks
        that it scores against the same stats, wherever the file is now."""
        digest = hashlib.sha256(f"{self.num_batches}".encode())
        for layer in sorted(self.df):
            digest.update(f"{layer}".encode())
            digest.update(self.df[layer].cpu().numpy().tobytes())
            digest.update(self.counts[layer].cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def owned(self, layer: int, table: ValueTable) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = table.owned_row_range()
        device = table.local_weight.device
        return self.df[layer][start:stop].to(device), self.counts[layer][start:stop].to(device)

    def save(self, path: str | Path) -> None:
        if self.memory is None or self.base is None:  # a file that resume could not check
            raise ValueError("background stats: set memory and base (the fingerprints they were read through) to save")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in self.df:
            tensors[f"layers.{layer}.df"] = self.df[layer].contiguous()
            tensors[f"layers.{layer}.counts"] = self.counts[layer].contiguous()
        meta = {"format_version": str(FORMAT_VERSION), "num_batches": str(self.num_batches),
                "layers": json.dumps(sorted(self.df)), "memory_fingerprint": self.memory, "base_fingerprint": self.base}
        tmp = path.with_name(f".{path.name}.tmp")  # a reader never sees half a file
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "BackgroundStats":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sparse.background: file {path} not found; compute it with `smf-ds background`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format_version") != str(FORMAT_VERSION):
                    raise ConfigError(f"sparse.background: {path}: format_version {meta.get('format_version')!r}, "
                                      f"expected {FORMAT_VERSION} (written by another smf-ds version): compute the "
                                      f"stats again with `smf-ds background`")
                layers = json.loads(meta["layers"])
                stats = cls(int(meta["num_batches"]),
                            {i: f.get_tensor(f"layers.{i}.df") for i in layers},
                            {i: f.get_tensor(f"layers.{i}.counts") for i in layers},
                            meta["memory_fingerprint"], meta["base_fingerprint"])
        except (KeyError, ValueError, OSError, SafetensorError) as err:
            raise ConfigError(f"sparse.background: {path} is not a background stats file "
                              f"written by `smf-ds background` ({err})") from None
        return stats


def collect_background(tables: list[tuple[int, ValueTable]], run_forward, batches, progress=None) -> BackgroundStats:
    """Run `run_forward(batch)` (no grad) on each background batch, recording reads.

    Every rank must iterate the same number of batches (lookups are collectives when sharded).
    """
    stats = BackgroundStats.empty(tables)
    previous = [(t.track_access, t.requires_grad) for _, t in tables]
    for _, table in tables:
        table.track_access = True
        table.sink.clear()
    try:
        with torch.no_grad():
            for batch in batches:
                run_forward(batch)
                stats.add_step(tables)
                if progress is not None:
                    progress.update(1)
    finally:
        for (_, table), (track, grad) in zip(tables, previous):
            table.track_access, table.requires_grad = track, grad
    stats.finalize(tables)
    return stats

