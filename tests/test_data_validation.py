"""Every malformed-row case gives its report (row, field, problem); --strict turns it into an error."""
import json

import pytest

from smf_ds.data import samples
from smf_ds.data.medmcqa import load_medmcqa
from smf_ds.data.oasst import load_oasst
from smf_ds.data.triviaqa import load_triviaqa
from smf_ds.data.validation import MalformedRowError
from smf_ds.data.wikitext import load_wikitext


def _write_jsonl(path, rows, raw_lines=None):
    lines = [json.dumps(r) for r in rows]
    for at, text in (raw_lines or {}).items():
        lines.insert(at, text)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


MEDMCQA_CASES = [  # (mutation, field, problem substring)
    (lambda r: r.pop("question"), "question", "missing"),
    (lambda r: r.update(question="   "), "question", "empty"),
    (lambda r: r.update(question=7), "question", "expected a string"),
    (lambda r: r.pop("opc"), "opc", "missing"),
    (lambda r: r.update(opb=""), "opb", "empty"),
    (lambda r: r.update(opd=None), "opd", "null"),
    (lambda r: r.pop("cop"), "cop", "missing"),
    (lambda r: r.update(cop=4), "cop", "expected an int 0-3 or a letter A-D, got 4"),
    (lambda r: r.update(cop=-1), "cop", "test split has no answers"),
    (lambda r: r.update(cop="E"), "cop", "got 'E'"),
    (lambda r: r.update(cop=True), "cop", "got True"),
    (lambda r: r.pop("choice_type"), "choice_type", "missing"),
    (lambda r: r.update(exp=12), "exp", "expected a string"),
]


@pytest.mark.parametrize("mutate,field,problem", MEDMCQA_CASES)
def test_medmcqa_malformed_rows_are_reported_and_skipped(tmp_path, mutate, field, problem):
    rows = samples.medmcqa_rows(6, seed=2)
    rows[0]["cop"] = 0  # a 0 answer: the file is 0-based, so a lone 4 is one bad row, not 1-based numbering
    mutate(rows[3])
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    ex, report = load_medmcqa(path)
    assert len(ex) == 5 and 3 not in [e.row for e in ex]
    assert report.n_rows == 6 and report.n_malformed == 1
    (issue,) = report.issues
    assert (issue.row, issue.field) == (3, field) and problem in issue.problem
    assert "m.jsonl row 3 (line 4)" in str(issue) and field in report.format()
    with pytest.raises(MalformedRowError, match=rf"m\.jsonl row 3 \(line 4\): field '{field}'"):
        load_medmcqa(path, strict=True)


def test_a_row_with_several_problems_counts_once_and_lists_each(tmp_path):
    rows = samples.medmcqa_rows(3)
    rows[1].update(opa="", cop=9)
    ex, report = load_medmcqa(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert len(ex) == 2 and report.n_malformed == 1 and [i.field for i in report.issues] == ["opa", "cop"]


def test_invalid_json_lines_are_rows_with_line_numbers(tmp_path):
    rows = samples.medmcqa_rows(4)
    path = _write_jsonl(tmp_path / "m.jsonl", rows, raw_lines={2: '{"question": "cut off', 4: "[1, 2]"})
    ex, report = load_medmcqa(path)
    assert len(ex) == 4 and report.n_rows == 6 and report.n_malformed == 2
    assert [(i.row, i.field) for i in report.issues] == [(2, "<row>"), (4, "<row>")]
    assert "not valid JSON" in report.issues[0].problem and "line 3" in report.issues[0].where
    assert "expected a JSON object" in report.issues[1].problem
    assert [e.row for e in ex] == [0, 1, 3, 5]


TRIVIAQA_CASES = [
    (lambda r: r.pop("question"), "question", "missing"),
    (lambda r: r.pop("answer"), "answer", "missing"),
    (lambda r: r.update(answer="Paris"), "answer", "expected an object"),
    (lambda r: r["answer"].pop("value"), "answer.value", "missing"),
    (lambda r: r["answer"].update(value=3), "answer.value", "expected a string"),
    (lambda r: r["answer"].pop("aliases"), "answer.aliases", "missing"),
    (lambda r: r["answer"].update(aliases="Paris"), "answer.aliases", "list of strings"),
    (lambda r: r["answer"].update(value="", aliases=[], normalized_aliases=[" "]), "answer",
     "no reference answer with text once normalised"),
    # References that normalise to nothing would give an empty answer contains, em and f1 of 1.
    (lambda r: r["answer"].update(value="The", aliases=["!!!", "a"], normalized_aliases=["the"]), "answer",
     "only articles and punctuation, which an empty answer would match"),
    (lambda r: r["answer"].update(value="<unk>", aliases=[], normalized_aliases=[]), "answer",
     "the hub's test split has no answers; use validation"),
]


@pytest.mark.parametrize("mutate,field,problem", TRIVIAQA_CASES)
def test_triviaqa_malformed_rows(tmp_path, mutate, field, problem):
    rows = samples.triviaqa_rows(4)
    mutate(rows[2])
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    ex, report = load_triviaqa(path)
    assert len(ex) == 3 and report.n_malformed == 1
    assert (report.issues[0].row, report.issues[0].field) == (2, field) and problem in report.issues[0].problem
    with pytest.raises(MalformedRowError, match=f"row 2 .*field '{field}'"):
        load_triviaqa(path, strict=True)


def test_wikitext_and_oasst_malformed_rows(tmp_path):
    rows = samples.wikitext_rows(2)
    rows[3] = {"txt": "oops"}
    rows[5] = {"text": 5}
    docs, report = load_wikitext(_write_jsonl(tmp_path / "w.jsonl", rows))
    assert [(i.row, i.field) for i in report.issues] == [(3, "text"), (5, "text")]
    assert sum(len(d.lines) for d in docs) == len(rows) - 2

    rows = samples.oasst_rows(3)
    rows[1].pop("role")
    rows[2]["rank"] = "first"
    texts, report = load_oasst(_write_jsonl(tmp_path / "o.jsonl", rows))
    assert [(i.row, i.field) for i in report.issues] == [(1, "role"), (2, "rank")]
    assert len(texts) == 2  # tree 0 is German (and malformed); trees 1 and 2 keep their rank-0 reply


def test_report_file_and_format(tmp_path):
    rows = samples.medmcqa_rows(30)
    for i in range(0, 30, 2):
        rows[i]["cop"] = 7
    ex, report = load_medmcqa(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert len(ex) == 15 and report.n_malformed == 15
    text = report.format(max_issues=5)
    assert "30 rows read, 15 malformed" in text and "and 10 more problems" in text
    report.write_jsonl(tmp_path / "bad.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "bad.jsonl").read_text().splitlines()]
    assert [x["row"] for x in lines] == list(range(0, 30, 2)) and all(x["field"] == "cop" for x in lines)
