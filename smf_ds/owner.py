"""One owner per run directory: two runs writing into one out_dir would mix their config, checkpoints
and results without a word.

`owning(directory, command)` makes rank 0 hold an exclusive lock (`flock`) on
<directory>/.smf-ds.lock while the block runs, with its host, pid and command written in it; a
second writer is refused by name before it loads anything. The kernel drops the lock of a process
that dies, however it dies; the next owner says that it takes over the dead one's directory. The
lock file is created at once, so a read-only or unwritable directory fails here, naming it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from .config import ConfigError
from .parallel.process_group import get_rank, get_world_size

LOCK = ".smf-ds.lock"
log = logging.getLogger(__name__)


def _take(directory: Path, command: str):
    """(the open lock file, None), or (None, why not)."""
    try:
        return _lock(directory, command)
    except OSError as err:
        from .files import reason_of

        return None, f"{directory}: cannot write there ({reason_of(err)}); expected a directory this user may write"


def _lock(directory: Path, command: str):
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        try:
            who = json.loads(holder)
            holder = f"smf-ds {who['command']} (pid {who['pid']} on {who['host']}, since {who['since']})"
        except (ValueError, KeyError, TypeError):
            holder = "another process"
        return None, f"{directory}: in use by {holder}; wait for it to finish, or use another directory"
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.ENOTSUP, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        # Some network file systems do not lock: the run goes on, unguarded, and says so.
        log.warning("%s: the file system cannot lock %s (%s): a second run in this directory "
                    "would not be refused", directory, LOCK, err.strerror)
    handle.seek(0)
    left = handle.read().strip()
    if left:
        log.warning("%s: taking over from a run that did not finish (%s): its process is gone", directory, left)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    handle.flush()
    return handle, None


@contextlib.contextmanager
def owning(directory: str | Path, command: str, what: str = "out_dir"):
    """Hold `directory` for the block (rank 0 locks; every rank gets the verdict); a ConfigError
    naming `what` and the current owner when another process holds it."""
    handle, error = _take(Path(directory), command) if get_rank() == 0 else (None, None)
    if get_world_size() > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ConfigError(f"{what}={error}")
    try:
        yield
    finally:
        if handle is not None:  # a clean end leaves no owner behind
            handle.seek(0)
            handle.truncate()
            handle.close()
