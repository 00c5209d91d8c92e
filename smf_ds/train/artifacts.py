"""What a run leaves: its artifact (memory adapter, LoRA adapter or model) and its summary; and the
continuation of a run from its latest checkpoint."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..files import naming_write_errors, replace_dir, write_text
from ..manifest import write_manifest
from ..parallel.process_group import barrier, get_rank, get_world_size
from .loop import Trainer
from .methods import method_of
from .rundir import read_run_summary, run_finished
from .stop import RunStopped

log = logging.getLogger(__name__)


def save_trained(trainer: Trainer, tokenizer, out_dir: Path) -> Path:
    """What a run leaves for evaluation: the memory adapter (smf), the LoRA adapter, or the model."""
    method = method_of(trainer.cfg)
    target = out_dir / method.artifact
    partial = out_dir / f".{method.artifact}.partial"  # renamed into place once whole: never half an artifact
    with naming_write_errors("", partial,
                             f"; nothing was saved as {target}, and the run's last checkpoint is intact"):
        if get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        method.save_artifact(trainer.model, tokenizer, partial)
        barrier()
        if get_rank() == 0:
            write_manifest(partial)  # what loading it checks
            replace_dir(partial, target)
    barrier()  # no rank reads the artifact (the demo, the experiment) before rank 0 has written it
    return target


def fit_and_save(trainer: Trainer, tokenizer, summary_name: str, progress: bool, **extra) -> dict:
    """Train, save the artifact, write <out_dir>/<summary_name> (rank 0); the summary. A run
    stopped on a signal writes a summary with "finished": false and what stopped it, then raises
    RunStopped; its interruptions stay listed in the summary once it finishes."""
    out_dir = Path(trainer.cfg.out_dir)
    summary_file = out_dir / summary_name
    earlier = json.loads(summary_file.read_text()).get("interruptions", []) if summary_file.is_file() else []
    try:
        result = trainer.fit(progress=progress)
    except RunStopped as stop:
        trainer.close()
        interruptions = [*earlier, {"signal": stop.signal_name, "step": stop.step, "checkpoint": stop.checkpoint}]
        if get_rank() == 0:
            write_text(summary_file, json.dumps({"finished": False, "steps": stop.step, "interruptions": interruptions,
                                                 "world_size": get_world_size(), **extra}, indent=2), "")
        raise
    artifact = save_trained(trainer, tokenizer, out_dir)
    trainer.close()
    summary = {"finished": True, "steps": result.steps,
               "first_loss": result.losses[0] if result.losses else None,
               "final_loss": result.losses[-1] if result.losses else None, "seconds": result.seconds,
               "tokens_per_second": result.tokens / result.seconds if result.seconds else None,
               "artifact": str(artifact), "world_size": get_world_size(), "interruptions": earlier,
               "master_addr": os.environ.get("MASTER_ADDR") if get_world_size() > 1 else None,
               "healthy": not result.health, "health": result.health, **extra}
    if get_rank() == 0:
        write_text(summary_file, json.dumps(summary, indent=2), "")
    return summary


def resume_from_checkpoint(trainer: Trainer, resume: bool, summary_name: str, steps_key: str
                           ) -> tuple[dict | None, dict]:
    """With resume, load the latest checkpoint (if any). Returns (the finished run's summary when
    there is nothing left to train, its trainer then closed, else None; the summary's extra fields)."""
    if not (resume and trainer.resume()):
        return None, {}
    if trainer.step >= trainer.cfg.train.steps:
        log.warning("resume: the checkpoint is at step %d and %s=%d: nothing to train (raise %s to train on)",
                    trainer.step, steps_key, trainer.cfg.train.steps, steps_key)
        summary_file = Path(trainer.cfg.out_dir) / summary_name
        # The finished run's own summary (not an empty one), while its artifact is there; else
        # the artifact is saved again from the checkpoint.
        summary = read_run_summary(summary_file) if run_finished(summary_file) else None
        if summary is not None and Path(summary["artifact"]).exists():
            trainer.close()
            return summary, {}
    return None, {"resumed_at_step": trainer.step}  # first_loss is then the first loss after it
