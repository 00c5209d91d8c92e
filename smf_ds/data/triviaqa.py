"""TriviaQA (`trivia_qa`, config `rc.nocontext`): parse and check rows, and the prompt.

Hub schema used here: question, question_id, answer {value, aliases, normalized_aliases,
normalized_value, ...} (other fields such as entity_pages and search_results are ignored).
The references of a question are answer.value, then answer.aliases, then
answer.normalized_aliases, de-duplicated in that order. A row without a question, without an
answer object, with a non-string value or non-list aliases, or with no non-empty reference at
all is malformed.

Default prompt: "Question: {question}\\nAnswer:"; the model's greedy continuation is cut at the
first newline.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from .loading import Rows, load_rows, take
from .templates import check_placeholders
from .validation import ValidationReport, get_str, new_report


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

HUB_ID = "trivia_qa"
HUB_CONFIG = "rc.nocontext"
DEFAULT_SPLIT = "validation"
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass
class TriviaQAExample:
    index: int
    row: int
    id: str | None
    question: str
    value: str
    aliases: list[str] = field(default_factory=list)  # all references: value, aliases, normalized_aliases

    def prompt(self, template: str = DEFAULT_TEMPLATE) -> str:
        return template.format(question=self.question)


def check_template(template: str) -> str:
    # {question} is required: without it every question would get the same prompt.
    return check_placeholders(template, {"question"}, "TriviaQA prompt template", required=("question",))


def parse_triviaqa(rows: Rows, strict: bool = False) -> tuple[list[TriviaQAExample], ValidationReport]:
    report = new_report(rows, "triviaqa", strict)
    out: list[TriviaQAExample] = []
    for i, row in enumerate(rows.rows):
        if i in rows.bad_json:
            continue
        before = len(report.issues)
        question = get_str(report, i, row, "question")
        answer = row.get("answer")
        refs: list[str] = []
        value = ""
        if answer is None:
            report.add(i, "answer", "missing" if "answer" not in row else "is null")
        elif not isinstance(answer, dict):
            report.add(i, "answer", f"expected an object with value and aliases, got {type(answer).__name__}")
        else:
            value = answer.get("value")
            if value is None:
                report.add(i, "answer.value", "missing")
            elif not isinstance(value, str):
                report.add(i, "answer.value", f"expected a string, got {type(value).__name__}")
            for key in ("aliases", "normalized_aliases"):
                aliases = answer.get(key)
                if aliases is None:
                    if key == "aliases":
                        report.add(i, "answer.aliases", "missing")
                    continue
                if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                    report.add(i, f"answer.{key}", "expected a list of strings")
                    continue
                refs.extend(aliases)
            if isinstance(value, str):
                refs.insert(0, value)
            # A reference that normalises to nothing ("The", "!!!") would match an empty answer.
            refs = list(dict.fromkeys(r for r in refs if normalize_answer(r)))
            if len(report.issues) == before and refs == ["<unk>"]:  # the hub's answer-less placeholder
                report.add(i, "answer", "no reference answer: value '<unk>' and no aliases (the hub's test split "
                                        "has no answers; use validation)")
            elif len(report.issues) == before and not refs:
                report.add(i, "answer", "no reference answer with text once normalised (value and aliases are empty, "
                                        "or only articles and punctuation, which an empty answer would match)")
        if len(report.issues) > before:
            continue
        qid = row.get("question_id")
        out.append(TriviaQAExample(index=len(out), row=i, id=None if qid is None else str(qid), question=question,
                                   value=value, aliases=refs))
    return out, report


def load_triviaqa(source: str = HUB_ID, split: str = DEFAULT_SPLIT, config: str | None = HUB_CONFIG,
                  limit: int | None = None, sample: int | None = None, seed: int = 0, strict: bool = False
                  ) -> tuple[list[TriviaQAExample], ValidationReport]:
    """Examples of `source` (hub id or local path; `config` is used for hub ids only)."""
    rows = load_rows(source, split=split, config=config)
    examples, report = parse_triviaqa(rows, strict=strict)
    return take(examples, limit, sample, seed), report
