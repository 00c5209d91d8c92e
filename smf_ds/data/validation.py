"""Malformed-row reports: which row, which field, what is wrong.

Task parsers call `report.add(row, field, problem)` for every problem they find and skip the
row; the run then knows exactly how many rows it read, how many were malformed and why, and how
many it evaluated. With `strict=True` the first problem raises `MalformedRowError` naming the
file, row and field instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import InputError
from .loading import Rows


class MalformedRowError(InputError):
    """A row of a data file is malformed (strict mode); the message names file, row and field."""


@dataclass
class Issue:
    row: int  # 0-based row in the source
    field: str
    problem: str
    where: str  # "FILE row I (line L)"

    def __str__(self) -> str:
        return f"{self.where}: field '{self.field}': {self.problem}"


@dataclass
class ValidationReport:
    source: str
    task: str
    n_rows: int = 0  # rows read from the source
    issues: list[Issue] = field(default_factory=list)
    n_filtered: int = 0  # well-formed rows left out on purpose (e.g. MedMCQA choice_type 'multi')
    filtered_reason: str = ""
    strict: bool = False
    rows: Rows | None = field(default=None, repr=False)

    def add(self, row: int, field_name: str, problem: str) -> None:
        where = self.rows.where(row) if self.rows is not None else f"{self.source} row {row}"
        issue = Issue(row, field_name, problem, where)
        if self.strict:
            raise MalformedRowError(f"{issue} (strict mode: malformed rows are errors; drop --strict to "
                                    f"skip and report them)")
        self.issues.append(issue)

    @property
    def malformed_rows(self) -> list[int]:
        return sorted({i.row for i in self.issues})

    @property
    def n_malformed(self) -> int:
        return len(self.malformed_rows)

    def summary(self) -> dict:
        return {"source": self.source, "n_rows": self.n_rows, "n_malformed": self.n_malformed,
                "n_filtered": self.n_filtered, "filtered_reason": self.filtered_reason}

    def format(self, max_issues: int = 20, all_listed_in: str | None = None) -> str:
        """The report for a log; `all_listed_in` says where the whole list is written, if anywhere."""
        head = (f"{self.task}: {self.source}: {self.n_rows} rows read, {self.n_malformed} malformed "
                f"(skipped)" + (f", {self.n_filtered} left out ({self.filtered_reason})" if self.n_filtered else ""))
        lines = [head] + [f"  {issue}" for issue in self.issues[:max_issues]]
        if len(self.issues) > max_issues:
            where = f" (all in {all_listed_in})" if all_listed_in else ""
            lines.append(f"  ... and {len(self.issues) - max_issues} more problems{where}")
        return "\n".join(lines)

    def issue_records(self) -> list[dict]:
        return [asdict(issue) for issue in self.issues]

    def write_jsonl(self, path: str | Path) -> None:
        from ..files import write_jsonl

        write_jsonl(path, self.issue_records(), "")


def new_report(rows: Rows, task: str, strict: bool = False) -> ValidationReport:
    """A report for `rows` that already holds the JSON Lines that did not parse."""
    report = ValidationReport(source=rows.source, task=task, n_rows=len(rows), strict=strict, rows=rows)
    for i, problem in sorted(rows.bad_json.items()):
        report.add(i, "<row>", problem)
    return report


def get_str(report: ValidationReport, i: int, row: dict, name: str, *, allow_empty: bool = False,
            optional: bool = False) -> str | None:
    """row[name] as a string, or None after reporting what is wrong with it."""
    if name not in row or row[name] is None:
        if not optional:
            report.add(i, name, "missing" if name not in row else "is null")
        return None
    value = row[name]
    if not isinstance(value, str):
        report.add(i, name, f"expected a string, got {type(value).__name__} {value!r:.40}")
        return None
    if not allow_empty and not value.strip():
        report.add(i, name, "is empty")
        return None
    return value
