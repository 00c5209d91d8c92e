"""Stopping a run cleanly on a signal: a scheduler's time limit, a preemption, a user's kill.

From the moment a command knows its config (`listen`), any of `cluster.stop_signals` (SIGTERM and
SIGUSR1 by default) sets a flag instead of killing the process, whatever it is doing: loading,
training, saving, evaluating. Training reads it at every optimizer-step boundary: the ranks agree
there (the flag travels in the all-reduce of the step's loss, so no rank stops or saves alone),
write a complete checkpoint and exit with STOPPED_EXIT_CODE; run the same command with
`--resume auto` to continue. A stop asked during the model load stops after the first step. A
further signal is noted and ignored; a SIGKILL then cannot leave an incomplete checkpoint marked
latest (latest_memory is written last, smf_ds.train.checkpoint). Commands that do not train
(eval, background) finish what they do.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): "temporary failure, the user is invited to retry".
STOPPED_EXIT_CODE = 75

_requested: str | None = None  # the first stop signal this process got
_replaced: dict[int, object] = {}  # signal -> the handler `listen` replaced


class Stopped(Exception):
    """A command stopped on a signal with what it had done saved; the CLI exits STOPPED_EXIT_CODE,
    and the same command run again continues."""


class RunStopped(Stopped):
    """Every rank stopped after saving a checkpoint, on a signal."""

    def __init__(self, step: int, signal_name: str, checkpoint: str) -> None:
        super().__init__(f"stopped on {signal_name} at step {step}, saved in {checkpoint}; run the same command "
                         f"with --resume auto to continue")
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


def _handle(signum, frame) -> None:
    global _requested
    name = signal.Signals(signum).name
    if _requested is None:
        _requested = name
        log.warning("%s received: stopping after the current optimizer step, with a checkpoint", name)
    else:
        log.warning("%s received: already stopping on %s", name, _requested)


def listen(names: list[str]) -> None:
    """From now on, these signals ask this process to stop (main thread only: Python installs signal
    handlers there; elsewhere, as in a worker thread, nothing is installed)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in names:
        signum = signal.Signals[name]
        if signum not in _replaced:
            _replaced[signum] = signal.signal(signum, _handle)


def stop_listening() -> None:
    """Put back the handlers `listen` replaced and forget a stop asked: smf-ds run as a library
    leaves its host process's signals as it found them."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in _replaced.items():
        signal.signal(signum, handler)
    _replaced.clear()
    _requested = None


def requested() -> str | None:
    """The stop signal this process got, or None."""
    return _requested
