"""Writing results so that a failure (a full disk, a read-only file system) names the file, in one
line, and leaves nothing half-written that looks like a result: files are written under a
temporary name and renamed into place, directories built beside their place and renamed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from .config import InputError


class WriteError(InputError):
    """A file could not be written; the message names it and why."""


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [repr(err)])[0][:200]


def reason_of(err: BaseException) -> str:
    code = getattr(err, "errno", None)
    text = str(err)
    if code == errno.ENOSPC or "No space left" in text or "StorageFull" in text or "os error 28" in text:
        return "no space left on the device"
    if code == errno.EROFS or "Read-only file system" in text:
        return "a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return getattr(err, "strerror", None) or _first_line(err)


def _write_failures() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return OSError, SafetensorError, RuntimeError


def is_write_failure(err: BaseException) -> bool:
    """An OSError, or a library's error that wraps one (safetensors' SafetensorError, torch.save's
    RuntimeError): a reason that is the disk's, not the program's."""
    if isinstance(err, OSError):
        return True
    return isinstance(err, _write_failures()) and reason_of(err) != _first_line(err)


@contextlib.contextmanager
def naming_write_errors(what: str, path: str | Path, after: str = ""):
    """Turn a failed write inside the block into WriteError: '[<what>: ]cannot write <path> (<reason>)<after>'
    (`what`: the flag or setting that named the place, or '')."""
    try:
        yield
    except WriteError:
        raise
    except _write_failures() as err:
        if not is_write_failure(err):
            raise
        where = getattr(err, "filename", None) or path
        raise WriteError(f"{what + ': ' if what else ''}cannot write {where} ({reason_of(err)}){after}") from None


def write_text(path: str | Path, text: str, what: str) -> None:
    """`path` holds `text` whole, or is as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with naming_write_errors(what, path):
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_jsonl(path: str | Path, records: Iterable[dict], what: str) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), what)


def replace_dir(new: Path, directory: Path) -> None:
    """Put the finished directory `new` at `directory` (an existing one is replaced only then)."""
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(new, directory)
    shutil.rmtree(old, ignore_errors=True)
