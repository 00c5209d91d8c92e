"""Prompt templates: str.format placeholders checked against the ones a task fills in."""
from __future__ import annotations

import string


def check_placeholders(template: str, allowed: set[str], what: str, required: tuple[str, ...] = ()) -> str:
    """`template` if its placeholders are all in `allowed` and include every `required` one;
    otherwise a ValueError that starts with `what` and names the placeholder."""
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    for name in sorted(names - allowed):
        raise ValueError(f"{what}: unknown placeholder {{{name}}}; allowed: "
                         + ", ".join("{" + a + "}" for a in sorted(allowed)))
    for name in required:
        if name not in names:
            raise ValueError(f"{what}: expected a {{{name}}} placeholder, got {template!r}")
    return template
