"""Where a model is loaded from: a local directory or an HF hub id (`smf-ds eval --model`, train's
model.name_or_path).

`from_pretrained` treats any name that is not an existing directory as a hub id, so a mistyped
local path fails with the hub's "Repo id must be in the form 'repo_name' or
'namespace/repo_name'" or a network error. `model_source` catches the names that can only be
meant as local paths first.
"""
from __future__ import annotations

import os
from pathlib import Path

SEPARATORS = tuple(s for s in (os.sep, os.altsep) if s and s != "/")  # "\\" on Windows


def looks_local(name: str) -> bool:
    """True when `name` cannot be a hub id ('name' or 'namespace/name'): absolute, ./ ../ ~, or more than one '/'."""
    return (Path(name).is_absolute() or name in (".", "..") or name.startswith(("./", "../", "~"))
            or name.count("/") > 1 or any(s in name for s in SEPARATORS))


def model_source(name: str) -> str:
    """What to pass to from_pretrained for `name`: the directory (with ~ expanded) when it is local.

    Raises FileNotFoundError / NotADirectoryError (the message is what is wrong, for the caller to
    prefix with its flag or field) when `name` can only be a local path and is no directory.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if not looks_local(name):
        return name
    if path.exists():
        raise NotADirectoryError("not a directory (expected a local model directory, or an HF hub id)")
    raise FileNotFoundError("no such directory (expected a local model directory, or an HF hub id such as "
                            "Qwen/Qwen2.5-0.5B-Instruct)")


def missing_dir_note(name: str) -> str:
    """For a failed hub load of 'dir/name' whose dir exists locally (a mistyped local path?)."""
    parent = Path(name).parent
    if parent != Path(".") and parent.is_dir():
        return f"; no local directory {name} either ({parent} exists)"
    return ""


def check_tokenizer(tokenizer, what: str) -> None:
    """A model directory without tokenizer files loads an empty tokenizer that encodes every text
    to nothing; say so instead of failing later inside scoring or generate."""
    from .config import InputError

    if not tokenizer("The answer is", add_special_tokens=False)["input_ids"]:
        raise InputError(f"{what}: its tokenizer encodes text to no tokens; expected tokenizer files "
                         f"(tokenizer.json, or vocab and merges) beside config.json")
