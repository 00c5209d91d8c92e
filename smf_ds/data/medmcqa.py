"""MedMCQA (openlifescienceai/medmcqa): parse and check rows, and the prompt template.

Hub schema: id, question, opa, opb, opc, opd, cop (correct option, int 0-3; a letter a-d/A-D is
accepted too), choice_type ('single' or 'multi'), exp (explanation, may be null), subject_name,
topic_name. Only 'single' questions are kept (as the paper does); 'multi' rows are counted as
left out, not malformed. The hub's test split has no answers (cop = -1): every row is reported
malformed, so evaluate on `validation`.

The prompt (the paper's format, configurable with `MedMCQAPrompt`):

    Medical exam question:
    Question: {question}
    A. {opa}
    B. {opb}
    C. {opc}
    D. {opd}
    Answer:

followed by a continuation: " {letter}" (mode `letter`) or " {letter}. {option}" (modes
`answer` and `answer_norm`); training appends "\\nExplanation: {exp}" when there is one. The
prompt and the continuation are tokenized separately and concatenated, in training
(smf_ds.train.batches.tokenize_prompt_answer) and in evaluation alike.
"""
from __future__ import annotations

from dataclasses import dataclass

from .loading import Rows, load_rows, take
from .templates import check_placeholders
from .validation import MalformedRowError, ValidationReport, get_str, new_report

HUB_ID = "openlifescienceai/medmcqa"
DEFAULT_SPLIT = "validation"
LETTERS = "ABCD"
OPTION_FIELDS = ("opa", "opb", "opc", "opd")
DEFAULT_TEMPLATE = ("Medical exam question:\nQuestion: {question}\nA. {opa}\nB. {opb}\nC. {opc}\nD. {opd}\n"
                    "Answer:")


@dataclass
class MedMCQAExample:
    index: int  # position in the evaluated list (0..n-1)
    row: int  # row in the source
    id: str | None
    question: str
    options: list[str]
    answer: int  # 0-3
    exp: str | None = None
    subject: str | None = None

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


@dataclass
class MedMCQAPrompt:
    """How a question becomes text. Placeholders: {question}, {opa}..{opd} (also {A}..{D})."""

    template: str = DEFAULT_TEMPLATE
    letter_continuation: str = " {letter}"
    answer_continuation: str = " {letter}. {option}"
    explanation: str = "\nExplanation: {exp}"

    def __post_init__(self) -> None:
        check_placeholders(self.template, {"question", *OPTION_FIELDS, *LETTERS}, "MedMCQA prompt template",
                            required=("question",))
        check_placeholders(self.letter_continuation, {"letter", "option"}, "MedMCQA letter continuation")
        check_placeholders(self.answer_continuation, {"letter", "option"}, "MedMCQA answer continuation")
        check_placeholders(self.explanation, {"exp"}, "MedMCQA explanation template")

    def prompt(self, ex: MedMCQAExample) -> str:
        fields = {"question": ex.question, **dict(zip(OPTION_FIELDS, ex.options)), **dict(zip(LETTERS, ex.options))}
        return self.template.format(**fields)

    def continuation(self, ex: MedMCQAExample, option: int, kind: str) -> str:
        """kind 'letter' -> ' B'; kind 'answer' -> ' B. {option text}'."""
        fmt = self.letter_continuation if kind == "letter" else self.answer_continuation
        return fmt.format(letter=LETTERS[option], option=ex.options[option])

    def training_pair(self, ex: MedMCQAExample, with_explanation: bool = True) -> tuple[str, str]:
        """(prompt, answer) for finetuning: the loss is taken on the answer (and explanation)."""
        answer = self.continuation(ex, ex.answer, "answer")
        if with_explanation and ex.exp and ex.exp.strip():
            answer += self.explanation.format(exp=ex.exp.strip())
        return self.prompt(ex), answer


def parse_cop(value) -> int | None:
    """cop as 0-3, from an int 0-3 or a letter a-d / A-D; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= 3 else None
    if isinstance(value, float) and value.is_integer():
        return int(value) if 0 <= value <= 3 else None
    if isinstance(value, str) and value.strip().upper() in tuple(LETTERS):
        return LETTERS.index(value.strip().upper())
    return None


def parse_medmcqa(rows: Rows, strict: bool = False, keep_choice_types: tuple[str, ...] = ("single",)
                  ) -> tuple[list[MedMCQAExample], ValidationReport]:
    """Well-formed rows (choice_type in `keep_choice_types`) as examples, plus the report of the rest."""
    report = new_report(rows, "medmcqa", strict)
    out: list[MedMCQAExample] = []
    for i, row in enumerate(rows.rows):
        if i in rows.bad_json:
            continue
        before = len(report.issues)
        question = get_str(report, i, row, "question")
        options = [get_str(report, i, row, name) for name in OPTION_FIELDS]
        if "cop" not in row or row["cop"] is None:
            report.add(i, "cop", "missing" if "cop" not in row else "is null")
            cop = None
        else:
            cop = parse_cop(row["cop"])
            if cop is None:
                hint = " (the hub's test split has no answers; use validation)" if row["cop"] == -1 else ""
                report.add(i, "cop", f"expected an int 0-3 or a letter A-D, got {row['cop']!r}{hint}")
        choice_type = get_str(report, i, row, "choice_type")
        exp = get_str(report, i, row, "exp", allow_empty=True, optional=True)
        if len(report.issues) > before:
            continue
        if choice_type not in keep_choice_types:
            report.n_filtered += 1
            report.filtered_reason = f"choice_type not in {list(keep_choice_types)}"
            continue
        rid = row.get("id")
        out.append(MedMCQAExample(index=len(out), row=i, id=None if rid is None else str(rid), question=question,
                                  options=options, answer=cop, exp=exp, subject=row.get("subject_name")))
    check_cop_numbering(rows, report)
    return out, report


SMALL_FILE_ROWS = 20  # below this, a file without a 0 answer may be 0-based by chance: warned, not refused


def check_cop_numbering(rows: Rows, report: ValidationReport) -> None:
    """Numeric cops (ints, or integral floats as a pandas export writes them) that are all in 1..4
    with a 4 among them and no 0 are the original release's 1-based answers: read as 0-based they
    would score every question against the option after its answer. Refused whatever the file's
    size. A small file with no 0 and no 4 cannot be told apart: warned about."""
    numeric = []
    for i, row in enumerate(rows.rows):
        value = row.get("cop") if i not in rows.bad_json else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not value.is_integer():
            continue
        numeric.append(int(value))
    if not numeric or 0 in numeric or not set(numeric) <= {1, 2, 3, 4}:
        return
    hint = ("the hub schema numbers the options 0-3 (0 = opa), so 1-4 answers would be off by one. Subtract 1 "
            "from every cop, or give letters A-D")
    if 4 in numeric:
        raise MalformedRowError(f"{report.source}: field cop: numbered 1-4 (no row has 0); {numeric.count(4)} of "
                                f"{len(numeric)} rows have 4: {hint}")
    if len(numeric) < SMALL_FILE_ROWS:
        import logging

        logging.getLogger(__name__).warning(
            "%s: field cop: no row of %d has answer 0; if this file numbers the options 1-4 (the original "
            "release), %s", report.source, len(numeric), hint)


def load_medmcqa(source: str = HUB_ID, split: str = DEFAULT_SPLIT, limit: int | None = None,
                 sample: int | None = None, seed: int = 0, strict: bool = False
                 ) -> tuple[list[MedMCQAExample], ValidationReport]:
    """Examples of `source` (hub id or local path): malformed rows reported, then sample / limit."""
    rows = load_rows(source, split=split)
    examples, report = parse_medmcqa(rows, strict=strict)
    return take(examples, limit, sample, seed), report
