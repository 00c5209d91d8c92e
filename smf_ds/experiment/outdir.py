"""An output directory belongs to one setup: the settings its runs were made with are recorded in
<out>/setup.json, and a later call with other settings is refused instead of silently reusing
(or mixing in) runs, a base model or evaluations made under the old ones.

Variants may be added to a directory later (the grid grows); a variant already recorded must
keep its overrides. The number of processes is part of the settings: the global batch is
micro_batch_size x grad_accum x processes, so an interrupted grid rerun on another count would
mix runs trained on other batches.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..config import ConfigError, flatten_dotted
from ..parallel.process_group import barrier, get_rank, get_world_size

SETUP_FILE = "setup.json"
SETUP_FORMAT_VERSION = 2  # 2: the process count and the data files' digests are recorded
log = logging.getLogger(__name__)


def _differences(before: dict, now: dict) -> list[str]:
    flat_before = flatten_dotted({k: v for k, v in before.items() if k != "variants"})
    flat_now = flatten_dotted({k: v for k, v in now.items() if k != "variants"})
    diffs = [f"{key}: {flat_before.get(key)!r} there, {flat_now.get(key)!r} now"
             for key in sorted(set(flat_before) | set(flat_now)) if flat_before.get(key) != flat_now.get(key)]
    old, new = before.get("variants", {}), now.get("variants", {})
    diffs += [f"variant {name}: {old[name]} there, {new[name]} now"
              for name in sorted(set(old) & set(new)) if old[name] != new[name]]
    return diffs


def _holds_results(out: Path) -> bool:
    """Whether anything was made under the recorded settings: a run's or an evaluation's summary,
    or a pretrained base model."""
    return any(out.rglob("*summary.json")) or (out / "base" / "config.json").is_file()


def claim(out: Path, settings: dict, flag: str = "--out") -> None:
    """Record `settings` (JSON-able) in <out>/setup.json, or check them against what is recorded.

    Every rank checks; rank 0 writes (atomically: a peer may be reading) and all meet after.
    """
    path = Path(out) / SETUP_FILE
    now = json.loads(json.dumps({**settings, "processes": get_world_size(), "format_version": SETUP_FORMAT_VERSION}))
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    if recorded and recorded.get("format_version") != SETUP_FORMAT_VERSION and _holds_results(Path(out)):
        raise ConfigError(f"{flag} {out}: {path}: format_version {recorded.get('format_version')!r}, expected "
                          f"{SETUP_FORMAT_VERSION} (made by another smf-ds version); use another {flag}")
    if recorded:
        diffs = _differences(recorded, now)
        if diffs and not _holds_results(Path(out)):  # e.g. the last call failed on a bad path
            log.warning("%s: nothing was made under its recorded settings yet: they are replaced (%s)", out,
                        "; ".join(diffs))
            recorded = {}
        elif diffs:
            raise ConfigError(f"{flag} {out}: holds runs made with other settings ({path}): " + "; ".join(diffs)
                              + f". Use another {flag}, or the settings recorded there")
    merged = {**now, "variants": {**recorded.get("variants", {}), **now.get("variants", {})}}
    if get_rank() == 0 and merged != recorded:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=2))
        os.replace(tmp, path)
    barrier()
