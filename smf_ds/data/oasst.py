"""OASST1 (`OpenAssistant/oasst1`) assistant replies as general text: retrofit warm-up and background stats.

Hub schema (used fields): message_id, parent_id, text, role ('prompter' | 'assistant'), lang,
rank (0 = the best-ranked reply among its siblings; null when unranked), deleted,
review_result. Kept: role == 'assistant', lang == `lang` (default 'en'), not deleted,
0 <= rank <= `max_rank` (default 0: the top-ranked reply). Rows that are well formed but not
kept are counted as left out. A row without a string text / role / lang is malformed, as is a
rank that is neither null nor a number.
"""
from __future__ import annotations

from dataclasses import dataclass

from .loading import Rows, load_rows, take
from .validation import ValidationReport, get_str, new_report

HUB_ID = "OpenAssistant/oasst1"
DEFAULT_SPLIT = "train"


@dataclass
class OasstText:
    index: int
    row: int
    id: str | None
    text: str


def parse_oasst(rows: Rows, strict: bool = False, lang: str = "en", max_rank: int = 0
                ) -> tuple[list[OasstText], ValidationReport]:
    report = new_report(rows, "oasst", strict)
    out: list[OasstText] = []
    for i, row in enumerate(rows.rows):
        if i in rows.bad_json:
            continue
        before = len(report.issues)
        text = get_str(report, i, row, "text")
        role = get_str(report, i, row, "role")
        row_lang = get_str(report, i, row, "lang")
        rank = row.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
            report.add(i, "rank", f"expected a number or null, got {rank!r:.40}")
        if len(report.issues) > before:
            continue
        keep = (role == "assistant" and row_lang == lang and not row.get("deleted", False)
                and rank is not None and 0 <= rank <= max_rank)
        if not keep:
            report.n_filtered += 1
            report.filtered_reason = f"not an {lang!r} assistant reply of rank <= {max_rank}"
            continue
        mid = row.get("message_id")
        out.append(OasstText(index=len(out), row=i, id=None if mid is None else str(mid), text=text))
    return out, report


def load_oasst(source: str = HUB_ID, split: str = DEFAULT_SPLIT, limit: int | None = None,
               sample: int | None = None, seed: int = 0, strict: bool = False, lang: str = "en",
               max_rank: int = 0) -> tuple[list[OasstText], ValidationReport]:
    rows = load_rows(source, split=split)
    texts, report = parse_oasst(rows, strict=strict, lang=lang, max_rank=max_rank)
    return take(texts, limit, sample, seed), report


def load_oasst_texts(source: str = HUB_ID, split: str = DEFAULT_SPLIT, **kwargs) -> list[str]:
    """Just the reply texts (for the retrofit stage and background statistics)."""
    texts, _ = load_oasst(source, split, **kwargs)
    return [t.text for t in texts]
