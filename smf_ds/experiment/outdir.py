"""An output directory belongs to one setup: the settings its runs were made with are recorded in
<out>/setup.json, and a later call with other settings is refused instead of silently reusing
(or mixing in) runs, a base model or evaluations made under the old ones.

Variants may be added to a directory later (the grid grows); a variant already recorded must
keep its overrides.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import ConfigError
from ..parallel.process_group import barrier, get_rank

SETUP_FILE = "setup.json"


def _differences(before: dict, now: dict) -> list[str]:
    diffs = [f"{key}: {before.get(key)!r} there, {now.get(key)!r} now"
             for key in sorted((set(before) | set(now)) - {"variants"}) if before.get(key) != now.get(key)]
    old, new = before.get("variants", {}), now.get("variants", {})
    diffs += [f"variant {name}: {old[name]} there, {new[name]} now"
              for name in sorted(set(old) & set(new)) if old[name] != new[name]]
    return diffs


def claim(out: Path, settings: dict, flag: str = "--out") -> None:
    """Record `settings` (JSON-able) in <out>/setup.json, or check them against what is recorded.

    Every rank checks; rank 0 writes (atomically: a peer may be reading) and all meet after.
    """
    path = Path(out) / SETUP_FILE
    now = json.loads(json.dumps(settings))  # tuples -> lists, as they read back
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    if recorded:
        diffs = _differences(recorded, now)
        if diffs:
            raise ConfigError(f"{flag} {out}: holds runs made with other settings ({path}): " + "; ".join(diffs)
                              + f". Use another {flag}, or the settings recorded there")
    merged = {**now, "variants": {**recorded.get("variants", {}), **now.get("variants", {})}}
    if get_rank() == 0 and merged != recorded:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=2))
        os.replace(tmp, path)
    barrier()
