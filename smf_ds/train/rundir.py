"""A run directory holds one run: what a finished or cut-short run leaves there, and the checks that
keep a new run from writing over it."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, SMFConfig
from .checkpoint import latest_tag


TRAIN_SUMMARY = "train_summary.json"


RETROFIT_SUMMARY = "retrofit_summary.json"


def run_finished(summary_file: str | Path) -> bool:
    """A run dir's summary says the run finished (a run stopped on a signal writes one with
    "finished": false)."""
    summary_file = Path(summary_file)
    return summary_file.is_file() and json.loads(summary_file.read_text()).get("finished", True) is not False


def read_run_summary(summary_file: str | Path) -> dict:
    """A run's summary, its artifact found beside it: the artifact is saved into the run dir, and
    the path recorded then is stale once the dir has been moved or copied."""
    summary_file = Path(summary_file)
    summary = json.loads(summary_file.read_text())
    summary["artifact"] = str(summary_file.parent / Path(summary["artifact"]).name)
    return summary


def check_run_dir(cfg: SMFConfig, summary_name: str, resume: bool, command: str) -> None:
    """A run dir holds one run. Without resume, refuse one holding checkpoints or a finished run;
    with resume, refuse a finished run whose checkpoints are gone (nothing to go on from, and
    starting over would replace its results)."""
    finished = run_finished(Path(cfg.out_dir) / summary_name)
    if not resume:
        refuse_used_out_dir(cfg, f"pass --resume to continue it, or {command} into another out_dir")
        if finished:
            raise ConfigError(f"out_dir={cfg.out_dir}: holds a finished run ({summary_name}); {command} into "
                              f"another out_dir")
    elif finished and latest_tag(Path(cfg.out_dir) / "checkpoints") is None:
        raise ConfigError(f"out_dir={cfg.out_dir}: holds a finished run ({summary_name}) whose checkpoints were "
                          f"removed: nothing to resume from; {command} into another out_dir")


def refuse_used_out_dir(cfg: SMFConfig, advice: str) -> None:
    """A run dir holds one run: refuse to start another over an earlier run's checkpoints."""
    checkpoints = Path(cfg.out_dir) / "checkpoints"
    if latest_tag(checkpoints) is not None:
        raise ConfigError(f"out_dir={cfg.out_dir}: holds the checkpoints of an earlier run ({checkpoints}, latest "
                          f"{latest_tag(checkpoints)}); {advice}")


def default_background_path(cfg: SMFConfig) -> Path:
    """Where `smf-ds background` writes its stats (and `smf-ds train` looks when sparse.background is unset)."""
    return Path(cfg.out_dir) / "background.safetensors"
