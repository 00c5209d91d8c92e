"""Stopping a run cleanly on a signal: a scheduler's time limit, a preemption, a user's kill.

Any of `cluster.stop_signals` (SIGTERM and SIGUSR1 by default) on any rank sets a flag. The
ranks agree at the next optimizer-step boundary (the flag travels in the all-reduce of the step's
loss, so no rank stops or saves alone), write a complete checkpoint and exit with
STOPPED_EXIT_CODE: run the same command with `--resume auto` to continue. A further signal during
the save is noted and ignored; a SIGKILL then cannot leave an incomplete checkpoint marked latest
(latest_memory is written last, smf_ds.train.checkpoint).
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): "temporary failure, the user is invited to retry".
STOPPED_EXIT_CODE = 75


class RunStopped(Exception):
    """Every rank stopped after saving a checkpoint, on a signal; the CLI exits STOPPED_EXIT_CODE."""

    def __init__(self, step: int, signal_name: str, checkpoint: str) -> None:
        super().__init__(f"stopped on {signal_name} at step {step}, saved in {checkpoint}; run the same command "
                         f"with --resume auto to continue")
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


class StopSignals:
    """Catches `names` while a run trains (a context manager); `requested` says one came. Outside
    the main thread (where Python cannot install handlers) it catches nothing."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            log.warning("%s received: stopping after this optimizer step, with a checkpoint", name)
        else:
            log.warning("%s received: already stopping on %s; the checkpoint is being written", name,
                        self.signal_name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                signum = signal.Signals[name]
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
