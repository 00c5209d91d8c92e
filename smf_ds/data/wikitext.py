"""WikiText-103 raw, test split (`Salesforce/wikitext`, config `wikitext-103-raw-v1`).

Hub schema: one row per line, {"text": str}; lines keep their trailing newline, empty lines are
"" and article titles look like " = Title = \\n". Rows are grouped into articles (a new article
starts at each level-1 title line; blank lines before the first title join the first article),
so `limit` / `sample` count articles. The evaluated text is the selected lines joined with
"\\n\\n" (as the Hugging Face perplexity guide does with the whole split). A row without a
string "text" is malformed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .loading import Rows, load_rows, take
from .validation import ValidationReport, new_report

HUB_ID = "Salesforce/wikitext"
HUB_CONFIG = "wikitext-103-raw-v1"
DEFAULT_SPLIT = "test"
TITLE = re.compile(r"^ = [^=].* = \n?$")


@dataclass
class WikiTextDoc:
    index: int
    row: int  # first row of the article in the source
    lines: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        first = next((line for line in self.lines if line.strip()), "")
        return first.strip(" =\n") if TITLE.match(first) else ""


def parse_wikitext(rows: Rows, strict: bool = False) -> tuple[list[WikiTextDoc], ValidationReport]:
    report = new_report(rows, "wikitext", strict)
    docs: list[WikiTextDoc] = []
    for i, row in enumerate(rows.rows):
        if i in rows.bad_json:
            continue
        if "text" not in row or row["text"] is None:
            report.add(i, "text", "missing" if "text" not in row else "is null")
            continue
        text = row["text"]
        if not isinstance(text, str):
            report.add(i, "text", f"expected a string, got {type(text).__name__}")
            continue
        # A new article starts at a level-1 title; blank lines before the first title belong to it.
        if not docs or (TITLE.match(text) and any(line.strip() for line in docs[-1].lines)):
            docs.append(WikiTextDoc(index=len(docs), row=i))
        docs[-1].lines.append(text)
    return docs, report


def join_docs(docs: list[WikiTextDoc]) -> str:
    """The text perplexity is measured on: all lines of `docs`, in order, joined with "\\n\\n"."""
    return "\n\n".join(line for d in docs for line in d.lines)


def load_wikitext(source: str = HUB_ID, split: str = DEFAULT_SPLIT, config: str | None = HUB_CONFIG,
                  limit: int | None = None, sample: int | None = None, seed: int = 0, strict: bool = False
                  ) -> tuple[list[WikiTextDoc], ValidationReport]:
    rows = load_rows(source, split=split, config=config)
    docs, report = parse_wikitext(rows, strict=strict)
    return take(docs, limit, sample, seed), report
