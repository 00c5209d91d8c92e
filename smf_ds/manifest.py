"""A manifest that proves what a checkpoint or artifact directory holds: every file with its size
and sha256, written last. Reading verifies it and names the file that differs, so a file cut
short, zeroed by a crash before its data reached the disk, or changed by hand is refused instead
of loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(directory: str | Path) -> Path:
    """List every file under `directory` (its size and sha256) in manifest.json, atomically."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(directory)}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def verify_manifest(directory: str | Path) -> list[str]:
    """What differs from the manifest ([] when everything is as written; a missing or unreadable
    manifest is one problem). Files not in the manifest are not checked."""
    directory = Path(directory)
    file = directory / MANIFEST
    try:
        listed = json.loads(file.read_text())["files"]
    except FileNotFoundError:
        return [f"{file}: missing (the directory was not completely written)"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{file}: unreadable ({type(err).__name__}: {err})"]
    problems = []
    for name, want in listed.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {want['size']}")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{path}: its content differs from what was written (sha256)")
    return problems


def check_written(directory: str | Path, error: type[Exception], what: str) -> None:
    """Raise `error` naming `what` when `directory` has a manifest and its files differ from it (a
    directory without one is not checked: written before manifests, or re-saved by another tool)."""
    if (Path(directory) / MANIFEST).is_file():
        problems = verify_manifest(directory)
        if problems:
            raise error(f"{what}: its files are not what was written: {'; '.join(problems[:4])}")
