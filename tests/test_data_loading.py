"""Loaders: every local format gives the same rows in the hub schema; limit and seeded subsample."""
import json

import pytest

from smf_ds.data import samples
from smf_ds.data.loading import DataSourceError, load_rows, select_indices
from smf_ds.data.medmcqa import MedMCQAExample, MedMCQAPrompt, load_medmcqa
from smf_ds.data.validation import MalformedRowError
from smf_ds.data.oasst import load_oasst, load_oasst_texts
from smf_ds.data.triviaqa import load_triviaqa
from smf_ds.data.wikitext import join_docs, load_wikitext

FORMATS = ("jsonl", "json", "parquet", "disk")


def _path(tmp_path, name, fmt):
    return tmp_path / (name if fmt == "disk" else f"{name}.{fmt}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_the_same_examples(tmp_path, fmt):
    rows = samples.medmcqa_rows(12, seed=3, multi_every=4)
    ref, _ = load_medmcqa(str(samples.write_rows(rows, tmp_path / "ref.jsonl")))
    ex, report = load_medmcqa(str(samples.write_rows(rows, _path(tmp_path, "m", fmt))))
    assert [e.question for e in ex] == [e.question for e in ref]
    assert [(e.options, e.answer, e.row) for e in ex] == [(e.options, e.answer, e.row) for e in ref]
    assert report.n_rows == 12 and report.n_malformed == 0 and report.n_filtered == 3
    assert len(ex) == 9 and all(r.index == i for i, r in enumerate(ex))

    tq, rep = load_triviaqa(str(samples.write_rows(samples.triviaqa_rows(5, seed=3), _path(tmp_path, "t", fmt))))
    assert len(tq) == 5 and rep.n_malformed == 0
    assert tq[0].aliases[0] == tq[0].value and tq[0].value.lower() in tq[0].aliases

    docs, rep = load_wikitext(str(samples.write_rows(samples.wikitext_rows(3, seed=3), _path(tmp_path, "w", fmt))))
    assert len(docs) == 3 and rep.n_malformed == 0 and all(d.title for d in docs)
    assert join_docs(docs).count(" = = ") == 3 * 2  # one section heading per article

    texts, rep = load_oasst(str(samples.write_rows(samples.oasst_rows(5, seed=3), _path(tmp_path, "o", fmt))))
    assert len(texts) == 4  # 5 trees, 1 German; rank-0 assistant reply of each English tree
    assert rep.n_filtered == 15 - 4


def test_json_object_with_a_data_list_and_jsonl_with_json_suffix(tmp_path):
    rows = samples.triviaqa_rows(3)
    (tmp_path / "a.json").write_text(json.dumps({"version": 1.0, "data": rows}))
    (tmp_path / "b.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_rows(str(tmp_path / "a.json")).rows == rows
    assert load_rows(str(tmp_path / "b.json")).rows == rows


def test_a_leading_utf8_bom_is_not_part_of_the_data(tmp_path):
    # Windows editors (Notepad, Excel's "UTF-8" export) start files with a BOM
    rows = samples.triviaqa_rows(3)
    bom = "\ufeff".encode("utf-8")
    for name, text in (("a.jsonl", "".join(json.dumps(r) + "\n" for r in rows)),  # the BOM cost row 0
                       ("b.json", json.dumps(rows)),  # the BOM made the whole array malformed
                       ("c.json", "".join(json.dumps(r) + "\n" for r in rows))):  # JSON Lines named .json
        (tmp_path / name).write_bytes(bom + text.encode("utf-8"))
        loaded = load_rows(str(tmp_path / name))
        assert loaded.rows == rows and not loaded.bad_json, name


def test_missing_paths_and_unknown_hub_ids_name_the_source(tmp_path):
    with pytest.raises(DataSourceError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataSourceError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_rows(str(tmp_path / "x.csv"))
    with pytest.raises(DataSourceError, match="smf-ds-test/does-not-exist"):
        load_rows("smf-ds-test/does-not-exist", split="test")  # offline in tests: fails fast, names the id


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path):
    from datasets import Dataset, DatasetDict

    dd = DatasetDict({"validation": Dataset.from_list(samples.medmcqa_rows(4, seed=1)),
                      "train": Dataset.from_list(samples.medmcqa_rows(7, seed=2))})
    dd.save_to_disk(str(tmp_path / "dd"))
    ex, _ = load_medmcqa(str(tmp_path / "dd"), split="train")
    assert len(ex) == 7
    with pytest.raises(DataSourceError, match="split 'test'"):
        load_medmcqa(str(tmp_path / "dd"), split="test")


def test_limit_and_seeded_subsample():
    assert select_indices(10) == list(range(10))
    assert select_indices(10, limit=3) == [0, 1, 2]
    a = select_indices(100, sample=10, seed=1)
    assert a == select_indices(100, sample=10, seed=1) and a != select_indices(100, sample=10, seed=2)
    assert a == sorted(a) and len(set(a)) == 10
    assert select_indices(100, sample=10, seed=1, limit=4) == a[:4]
    assert select_indices(5, sample=50) == list(range(5))
    with pytest.raises(ValueError, match="limit"):
        select_indices(5, limit=-1)


def test_limit_and_sample_through_a_loader(tmp_path):
    path = samples.write_rows(samples.medmcqa_rows(30, seed=4), tmp_path / "m.jsonl")
    full, _ = load_medmcqa(str(path))
    first, _ = load_medmcqa(str(path), limit=5)
    assert [e.row for e in first] == [0, 1, 2, 3, 4] and [e.index for e in first] == [0, 1, 2, 3, 4]
    sub, _ = load_medmcqa(str(path), sample=6, seed=7)
    assert [e.row for e in sub] == select_indices(30, sample=6, seed=7)
    docs, _ = load_wikitext(str(samples.write_rows(samples.wikitext_rows(5), tmp_path / "w.jsonl")), limit=2)
    assert len(docs) == 2


def test_oasst_texts_and_rank_filter(tmp_path):
    path = samples.write_rows(samples.oasst_rows(5, seed=3), tmp_path / "o.jsonl")
    assert len(load_oasst_texts(str(path))) == 4
    assert len(load_oasst_texts(str(path), max_rank=1)) == 8
    assert len(load_oasst_texts(str(path), lang="de")) == 1


def test_medmcqa_prompt_default_training_pair_and_custom_template():
    ex = MedMCQAExample(0, 0, "x", "Which organ?", ["liver", "heart", "lung", "skin"], 1, exp="It pumps.")
    p = MedMCQAPrompt()
    assert p.prompt(ex) == ("Medical exam question:\nQuestion: Which organ?\nA. liver\nB. heart\nC. lung\n"
                            "D. skin\nAnswer:")
    assert p.continuation(ex, 2, "letter") == " C" and p.continuation(ex, 2, "answer") == " C. lung"
    assert p.training_pair(ex) == (p.prompt(ex), " B. heart\nExplanation: It pumps.")
    custom = MedMCQAPrompt(template="Q: {question} ({A}/{B}/{C}/{D})\nA:")
    assert custom.prompt(ex) == "Q: Which organ? (liver/heart/lung/skin)\nA:"
    with pytest.raises(ValueError, match="unknown placeholder {answer}"):
        MedMCQAPrompt(template="{question} {answer}")


def test_cop_letters_are_accepted(tmp_path):
    rows = samples.medmcqa_rows(4, seed=5)
    for row, cop in zip(rows, ["a", "B", " c ", 3]):
        row["cop"] = cop
    ex, rep = load_medmcqa(str(samples.write_rows(rows, tmp_path / "m.jsonl")))
    assert [e.answer for e in ex] == [0, 1, 2, 3] and rep.n_malformed == 0


def test_a_folder_of_parquet_files_ignores_the_hub_config(tmp_path):
    folder = tmp_path / "tqa"
    samples.write_rows(samples.triviaqa_rows(4, seed=1), folder / "validation-00000.parquet")
    ex, report = load_triviaqa(str(folder), split="validation", config="rc.nocontext")
    assert len(ex) == 4 and report.n_malformed == 0


def test_one_based_cop_is_refused_not_scored_off_by_one(tmp_path):
    """The original MedMCQA release numbers cop 1-4; the hub 0-3."""
    rows = samples.medmcqa_rows(40, seed=1)
    for r in rows:
        r["cop"] = r["cop"] + 1
    path = tmp_path / "one_based.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MalformedRowError, match=r"one_based\.jsonl: field cop: numbered 1-4 \(no row has 0\)"):
        load_medmcqa(str(path))
    for r in rows:  # the same answers, 0-based: loads
        r["cop"] -= 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_medmcqa(str(path))[0]) > 0


def test_one_based_cop_is_refused_in_a_small_file_or_as_floats(tmp_path, caplog):
    """3 rows numbered 1-4 (a 4 among them), or a pandas export whose cop column became float64
    (1.0-4.0): refused whatever the size; a small file with no 0 and no 4 is warned about."""
    rows = [dict(r, cop=c) for r, c in zip(samples.medmcqa_rows(3, seed=2), (4, 1, 2))]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MalformedRowError, match=r"small\.jsonl: field cop: numbered 1-4 \(no row has 0\); 1 of 3"):
        load_medmcqa(str(path))
    floats = [dict(r, cop=float(r["cop"] + 1)) for r in samples.medmcqa_rows(30, seed=3)]
    assert {0.0, 3.0} <= {r["cop"] - 1 for r in floats}
    path.write_text("".join(json.dumps(r) + "\n" for r in floats))
    with pytest.raises(MalformedRowError, match=r"field cop: numbered 1-4 \(no row has 0\)"):
        load_medmcqa(str(path))
    path.write_text("".join(json.dumps(dict(r, cop=r["cop"] - 1.0)) + "\n" for r in floats))  # 0.0-3.0: fine
    examples, _ = load_medmcqa(str(path))
    assert [ex.answer for ex in examples] == [int(r["cop"]) - 1 for r in floats if r["choice_type"] == "single"]
    path.write_text("".join(json.dumps(dict(r, cop=c)) + "\n" for r, c in zip(rows, (1, 2, 3))))
    with caplog.at_level("WARNING"):
        assert len(load_medmcqa(str(path))[0]) == 3
    assert any("no row of 3 has answer 0" in r.getMessage() and "1-4" in r.getMessage() for r in caplog.records)


def test_a_json_syntax_error_is_reported_where_it_is(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"question": "q"},\n  {question: "r"}\n]\n')
    with pytest.raises(DataSourceError, match=r"broken\.json: not valid JSON: .* at line 3, column 4"):
        load_rows(str(path))


def test_a_mistyped_file_in_an_existing_dir_is_not_tried_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("data/mc.jsonlx", "data/mc.csv"):
        with pytest.raises(DataSourceError, match=rf"^{name}: no such file or directory"):
            load_rows(name)
