"""Rows of a dataset from an HF hub id or a local path, and which of them a run uses.

`load_rows(source, split=..., config=...)` accepts

  * a local ``.jsonl`` file (one JSON object per line; a line that is not JSON becomes a row
    that validation reports, with its line number),
  * a local ``.json`` file (a list of objects, an object holding one list of objects such as
    ``{"data": [...]}``, or JSON Lines),
  * a local ``.parquet`` file,
  * a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (a
    DatasetDict picks `split`), or any other directory ``datasets.load_dataset`` reads,
  * otherwise an HF hub id, read with ``datasets.load_dataset(source, config, split=split)``
    (`config` applies to hub ids only).

Rows stay in the dataset's own schema (plain dicts); the task modules check and convert them.
JSON files are parsed with the json module rather than Arrow so that a row of the wrong type
is reported by validation instead of failing the whole file's type inference.

`select_indices(n, limit, sample, seed)` is the one place that decides which examples a run
uses: a seeded random subset of `sample` examples (kept in dataset order), then the first
`limit` of those.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import InputError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)


class DataSourceError(InputError):
    """A data source cannot be read; the message names the source (and flag, where known)."""


@dataclass
class Rows:
    """The rows of one split of one source, in order, as dicts in the dataset's own schema.

    `rows[i]` is row i (0-based) of the source; for JSON Lines `lines[i]` is its 1-based line
    number in the file. `bad_json[i]` holds the parse error of a line that is not JSON.
    """

    source: str
    rows: Sequence[dict]
    lines: list[int] | None = None
    bad_json: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """'FILE row I (line L)' for reports."""
        text = f"{self.source} row {i}"
        if self.lines is not None:
            text += f" (line {self.lines[i]})"
        return text


def _read_jsonl(path: Path) -> Rows:
    rows, lines, bad = [], [], {}
    with path.open(encoding="utf-8-sig") as f:  # -sig: a leading BOM (some Windows editors) is dropped
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                bad[len(rows)] = f"not valid JSON ({err.msg} at column {err.colno})"
                row = None
            if row is not None and not isinstance(row, dict):
                bad[len(rows)] = f"expected a JSON object, got {type(row).__name__}"
                row = None
            rows.append(row if row is not None else {})
            lines.append(line_no)
    return Rows(str(path), rows, lines, bad)


def _is_json_lines(text: str) -> bool:
    """A text that fails as one JSON document is JSON Lines when its first line is an object on its own."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _read_json(path: Path) -> Rows:
    text = path.read_text(encoding="utf-8-sig")  # a leading BOM is not part of the JSON
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if not _is_json_lines(text):  # one JSON document with a syntax error: say where
            raise DataSourceError(f"{path}: not valid JSON: {err.msg} at line {err.lineno}, "
                                  f"column {err.colno}") from None
        return _read_jsonl(path)  # JSON Lines with a .json suffix (as datasets accepts)
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataSourceError(f"{path}: expected a JSON list of rows, or an object holding exactly one "
                                  f"list of rows (e.g. {{\"data\": [...]}}); got an object with keys {sorted(data)}")
        data = lists[0]
    if not isinstance(data, list):
        raise DataSourceError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
    bad = {i: f"expected a JSON object, got {type(r).__name__}" for i, r in enumerate(data) if not isinstance(r, dict)}
    rows = [r if isinstance(r, dict) else {} for r in data]
    return Rows(str(path), rows, None, bad)


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    return Rows(str(path), pq.read_table(path).to_pylist())


class MissingSplitError(DataSourceError):
    """The source has splits, but not the one asked for (the caller names its split setting)."""


def _from_datasets_object(obj: Any, source: str, split: str | None) -> Rows:
    from datasets import Dataset, DatasetDict

    if isinstance(obj, DatasetDict):
        if split is None and len(obj) == 1:
            split = next(iter(obj))
        if split not in obj:
            raise MissingSplitError(f"{source}: has splits {sorted(obj)}, but split {split!r} was asked for")
        obj = obj[split]
        source = f"{source}[{split}]"
    if not isinstance(obj, Dataset):
        raise DataSourceError(f"{source}: expected a datasets.Dataset, got {type(obj).__name__}")
    return Rows(source, obj.to_list())


def missing_local_source(source: str | os.PathLike) -> bool:
    """Whether `source` names a local file or directory (a path, or a data file's name) that does
    not exist: a typo, not a hub id to try."""
    text = str(source)
    path = Path(text).expanduser()
    looks_local = (text.startswith((".", "/", "~")) or text.endswith(JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES)
                   or text.count("/") > 1 or (path.parent != Path(".") and path.parent.is_dir()))  # dir/typo
    return looks_local and not path.exists()


def load_rows(source: str | os.PathLike, split: str | None = None, config: str | None = None) -> Rows:
    """All rows of `source` (local file/directory or hub id); see the module docstring."""
    source_str = str(source)
    path = Path(source_str).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            return _read_jsonl(path)
        if suffix in JSON_SUFFIXES:
            return _read_json(path)
        if suffix in PARQUET_SUFFIXES:
            return _read_parquet(path)
        raise DataSourceError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json or .parquet, "
                              f"a save_to_disk directory, or an HF hub id")
    import datasets

    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _from_datasets_object(datasets.load_from_disk(str(path)), str(path), split)
        try:  # a folder of data files; `config` names hub configs and does not apply here
            obj = datasets.load_dataset(str(path), split=split)
        except Exception as err:  # noqa: BLE001 - re-raised with the source named
            raise DataSourceError(f"{path}: could not read this directory as a dataset ({err})") from err
        return _from_datasets_object(obj, f"{path}[{split}]" if split else str(path), None)
    if missing_local_source(source_str):
        raise DataSourceError(f"{source_str}: no such file or directory")
    try:
        obj = datasets.load_dataset(source_str, config, split=split)
    except Exception as err:  # noqa: BLE001 - re-raised with the source named
        where = source_str + (f" (config {config!r})" if config else "") + (f" split {split!r}" if split else "")
        raise DataSourceError(f"{where}: could not load it from the HF hub or its cache ({type(err).__name__}: "
                              f"{err}); give a local .jsonl/.json/.parquet file or save_to_disk directory instead") from err
    label = source_str + (f"/{config}" if config else "")
    return _from_datasets_object(obj, f"{label}[{split}]" if split else label, None)


def select_indices(n: int, limit: int | None = None, sample: int | None = None, seed: int = 0) -> list[int]:
    """Positions (into a list of n examples) a run uses, in order.

    `sample`: a seeded random subset of that many examples (numpy default_rng(seed), without
    replacement), kept in dataset order; then `limit`: the first that many. None = all.
    """
    for name, value in (("limit", limit), ("sample", sample)):
        if value is not None and value < 0:
            raise ValueError(f"{name}: expected a number of examples >= 0, got {value}")
    idx = np.arange(n)
    if sample is not None and sample < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
    if limit is not None:
        idx = idx[:limit]
    return [int(i) for i in idx]


def take(examples: list, limit: int | None = None, sample: int | None = None, seed: int = 0) -> list:
    """The examples `select_indices` picks, renumbered: `example.index` becomes 0..n-1."""
    out = []
    for new, old in enumerate(select_indices(len(examples), limit, sample, seed)):
        ex = examples[old]
        ex.index = new
        out.append(ex)
    return out
