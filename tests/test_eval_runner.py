"""The eval runner and CLI: sharded over 2 gloo ranks == 1 rank; files, malformed reports, flags."""
import json

import pytest
import torch
from distributed import run_distributed
from fixtures_eval import load_tiny

from smf_ds.data import samples
from smf_ds.data.validation import MalformedRowError
from smf_ds.eval import cli
from smf_ds.eval.runner import EvalSettings, NoUsableRowsError, run_tasks

TASKS = ["medmcqa", "wikitext", "triviaqa"]


def _settings(world) -> EvalSettings:
    return EvalSettings(medmcqa=str(world.medmcqa), triviaqa=str(world.triviaqa), wikitext=str(world.wikitext),
                        max_length=48, stride=24, max_new_tokens=6, batch_size=12, gen_batch_size=5,
                        ppl_batch_size=3, n_boot=200)


def _without_timing(summary):
    out = json.loads(json.dumps(summary))
    out.pop("world_size")
    for result in out["tasks"].values():
        result.pop("seconds")
        result.pop("predictions", None)
        result.pop("malformed_report", None)
    return out


def _eval_worker(rank, world_size, world, out_sharded, out_single):
    model, tok = load_tiny(world.model_dir)
    sharded = run_tasks(model, tok, TASKS, _settings(world), out_dir=out_sharded, echo=None)
    single = None
    if rank == 0:  # the one-process twin, in the same process (same kernels and threads)
        single = run_tasks(model, tok, TASKS, _settings(world), out_dir=out_single, rank=0, world_size=1, echo=None)
    return sharded, single


@pytest.mark.dist
def test_two_ranks_equal_one_rank(eval_world, tmp_path):
    out2, out1 = tmp_path / "w2", tmp_path / "w1"
    (r0, single), (r1, _) = run_distributed(_eval_worker, 2, eval_world, str(out2), str(out1))
    assert r0["world_size"] == 2 and single["world_size"] == 1
    assert _without_timing(r0) == _without_timing(r1) == _without_timing(single)
    for task in TASKS:
        sharded = (out2 / f"{task}.predictions.jsonl").read_text()
        assert sharded == (out1 / f"{task}.predictions.jsonl").read_text()
        assert len(sharded.splitlines()) == r0["tasks"][task]["n"] > 0
    assert r0["tasks"]["medmcqa"]["n"] == 20 and r0["tasks"]["triviaqa"]["n"] == 20


def test_summary_fields_files_and_consistency_with_the_records(tiny_lm, eval_world, tmp_path):
    model, tok = tiny_lm
    s = _settings(eval_world)
    s.limit = {"medmcqa": 7, "triviaqa": 50}
    summary = run_tasks(model, tok, TASKS, s, out_dir=tmp_path, echo=None)
    med, wiki, tqa = (summary["tasks"][t] for t in TASKS)
    assert med["n"] == 7 and med["metric"] == "accuracy_letter" and med["n_filtered"] == 4
    assert set(med["metrics"]) == {"accuracy_letter", "accuracy_answer", "accuracy_answer_norm"}
    records = [json.loads(x) for x in (tmp_path / "medmcqa.predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(7))
    assert med["value"] == pytest.approx(sum(r["correct_letter"] for r in records) / 7)
    assert tqa["n"] == 20 and any("asked for 50" in w for w in tqa["warnings"])
    assert tqa["metric"] == "contains" and set(tqa["metrics"]) == {"contains", "em", "f1"}
    assert wiki["metric"] == "perplexity" and wiki["unit"] == "window" and wiki["n_docs"] == 4
    assert wiki["ci95"][0] < wiki["value"] < wiki["ci95"][1]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["tasks"]["medmcqa"]["value"] == med["value"]
    assert (tmp_path / "wikitext.malformed.jsonl").read_text() == ""


def test_malformed_rows_are_reported_counted_and_not_evaluated(tiny_lm, tmp_path):
    model, tok = tiny_lm
    rows = samples.medmcqa_rows(10, seed=4)
    rows[2]["cop"] = 5
    rows[6]["opa"] = ""
    path = samples.write_rows(rows, tmp_path / "bad.jsonl")
    messages = []
    s = EvalSettings(medmcqa=str(path), n_boot=50)
    summary = run_tasks(model, tok, ["medmcqa"], s, out_dir=tmp_path / "out", echo=messages.append)
    r = summary["tasks"]["medmcqa"]
    assert (r["n_rows"], r["n_malformed"], r["n"]) == (10, 2, 8)
    assert any("bad.jsonl row 2 (line 3): field 'cop'" in m for m in messages)
    assert any("bad.jsonl row 6 (line 7): field 'opa'" in m for m in messages)
    report = [json.loads(x) for x in (tmp_path / "out" / "medmcqa.malformed.jsonl").read_text().splitlines()]
    assert [(x["row"], x["field"]) for x in report] == [(2, "cop"), (6, "opa")]
    preds = [json.loads(x) for x in (tmp_path / "out" / "medmcqa.predictions.jsonl").read_text().splitlines()]
    assert [p["row"] for p in preds] == [0, 1, 3, 4, 5, 7, 8, 9]
    s.strict = True
    with pytest.raises(MalformedRowError, match="bad.jsonl row 2 .*field 'cop'"):
        run_tasks(model, tok, ["medmcqa"], s, echo=None)


@pytest.mark.parametrize("task", TASKS)
def test_a_task_whose_rows_are_all_malformed_is_an_error_after_writing_the_report(tiny_lm, eval_world, tmp_path,
                                                                                 task):
    """E.g. a file in another task's schema: an error naming task, file and counts, raised before any
    task is evaluated, with the malformed report already written."""
    model, tok = tiny_lm
    wrong = samples.write_rows([{"foo": i} for i in range(6)], tmp_path / "wrong.jsonl")
    s = _settings(eval_world)
    setattr(s, task, str(wrong))
    out = tmp_path / "out"
    messages = []
    with pytest.raises(NoUsableRowsError) as exc:
        run_tasks(model, tok, TASKS, s, out_dir=out, echo=messages.append)
    report_path = out / f"{task}.malformed.jsonl"
    msg = str(exc.value)
    assert msg.startswith(f"{task}: no usable rows in {wrong} (6 rows read, 6 malformed, 0 left out)")
    assert f"all problems in {report_path}" in msg and "row 0 (line 1)" in msg
    assert sorted({json.loads(x)["row"] for x in report_path.read_text().splitlines()}) == list(range(6))
    assert not list(out.glob("*.predictions.jsonl"))  # no task was evaluated
    assert any("6 malformed" in m for m in messages)


@pytest.mark.parametrize("task,rows,counts", [
    ("medmcqa", [], "0 rows read, 0 malformed, 0 left out)"),
    ("medmcqa", [dict(r, choice_type="multi") for r in samples.medmcqa_rows(3, seed=2)],
     "3 rows read, 0 malformed, 3 left out: choice_type not in ['single'])"),
    ("wikitext", [{"text": ""}, {"text": " \n"}], "2 rows read, 0 malformed, 0 left out); every row is blank"),
])
def test_empty_filtered_or_blank_data_is_an_error(tiny_lm, tmp_path, task, rows, counts):
    model, tok = tiny_lm
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(NoUsableRowsError) as exc:
        run_tasks(model, tok, [task], EvalSettings(**{task: str(path)}), echo=None)
    assert str(exc.value) == f"{task}: no usable rows in {path} ({counts}"


def test_cli_exits_2_on_a_task_without_usable_rows(eval_world, tmp_path, capsys):
    wrong = samples.write_rows([{"foo": 1}, {"foo": 2}], tmp_path / "wrong.jsonl")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model", str(eval_world.model_dir), "--tasks", "medmcqa", "--medmcqa", str(wrong),
                  "--out", str(tmp_path / "out"), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("smf-ds eval: error: medmcqa: no usable rows in") and "2 malformed" in err
    assert (tmp_path / "out" / "medmcqa.malformed.jsonl").read_text().count('"row": 1') >= 1


def test_cli_end_to_end_with_flags(eval_world, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--model", str(eval_world.model_dir), "--tasks", "medmcqa,triviaqa,wikitext",
            "--medmcqa", str(eval_world.medmcqa), "--triviaqa", str(eval_world.triviaqa),
            "--wikitext", str(eval_world.wikitext), "--limit", "medmcqa=5,triviaqa=4,wikitext=1",
            "--medmcqa-modes", "answer_norm,letter", "--max-length", "32", "--stride", "16",
            "--max-new-tokens", "4", "--n-boot", "50", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(eval_world.model_dir) and summary["memory_adapter"] is None
    assert summary["tasks"]["medmcqa"]["metric"] == "accuracy_answer_norm"
    assert [summary["tasks"][t]["n"] for t in ("medmcqa", "triviaqa")] == [5, 4]
    assert summary["tasks"]["wikitext"]["n_docs"] == 1
    err = capsys.readouterr().err
    assert "accuracy_answer_norm" in err  # the summary table
    assert "Loading weights" not in err  # --no-progress silences transformers' bars too
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # a process-wide switch: leave it as other tests expect


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "medmcqa,mmlu"], "--tasks"),
    (["--medmcqa-modes", "letter,lettr"], "--medmcqa-modes"),
    (["--limit", "trivia=5"], "--limit: unknown task 'trivia'"),
    (["--stride", "600", "--max-length", "512"], "--stride"),
    (["--medmcqa-template", "{question} {answer}"], "--medmcqa-template"),
    (["--medmcqa-template", "Options: {opa} {opb}"], "expected a {question} placeholder"),
    (["--triviaqa-template", "Answer this:"], "--triviaqa-template: 'Answer this:' is neither a file nor a template"),
    (["--triviaqa-template", "prompts/tqa.txt"], "'prompts/tqa.txt' is neither a file"),
    (["--triviaqa-template", "Q: {q}"], "unknown placeholder {q}"),
    (["--triviaqa-template", "Q: {{literal}}"], "--triviaqa-template: TriviaQA prompt template: expected a {question}"),
    (["--memory-adapter", "/nonexistent/adapter"], "--memory-adapter /nonexistent/adapter"),
    (["--medmcqa", "/nonexistent/medmcqa.jsonl", "--tasks", "medmcqa"], "/nonexistent/medmcqa.jsonl"),
])
def test_cli_errors_name_the_flag(eval_world, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model", str(eval_world.model_dir), "--no-progress", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_template_flags_accept_files_and_escapes(tmp_path):
    import argparse

    parser = cli.add_eval_arguments(argparse.ArgumentParser())
    (tmp_path / "t.txt").write_text("Q: {question}\nA) {opa}\nB) {opb}\nC) {opc}\nD) {opd}\nAnswer:\n")
    args = parser.parse_args(["--model", "m", "--medmcqa-template", str(tmp_path / "t.txt"),
                              "--triviaqa-template", "Q: {question}\\nA:", "--sample", "9", "--limit", "3"])
    s = cli.settings_from_args(args)
    assert s.medmcqa_prompt.template == "Q: {question}\nA) {opa}\nB) {opb}\nC) {opc}\nD) {opd}\nAnswer:"
    assert s.triviaqa_template == "Q: {question}\nA:"
    assert s.limit == {"medmcqa": 3, "wikitext": 3, "triviaqa": 3} and s.sample["triviaqa"] == 9


def test_answer_continuation_flag(eval_world):
    import argparse

    parser = cli.add_eval_arguments(argparse.ArgumentParser())
    s = cli.settings_from_args(parser.parse_args(["--model", "m", "--answer-continuation", " {option}"]))
    assert s.medmcqa_prompt.answer_continuation == " {option}"
    with pytest.raises(cli.EvalCLIError, match="--answer-continuation.*unknown placeholder"):
        cli.settings_from_args(parser.parse_args(["--model", "m", "--answer-continuation", " {answer}"]))


def test_memory_adapter_flag_loads_the_adapter(eval_world, tmp_path):
    import smf_ds.memory.adapter as adapter
    from smf_ds.config import MemoryConfig
    from smf_ds.memory.inject import inject_memory

    model, tok = load_tiny(eval_world.model_dir)
    inject_memory(model, MemoryConfig(layers=[1], n_keys=4, heads=1, knn=2, k_dim=8, seed=1))
    with torch.no_grad():
        for _, mlp in [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "memory")]:
            if mlp.scale is not None:
                mlp.scale.fill_(1.0)  # make the memory matter for the outputs
    adapter.save_memory_adapter(model, tmp_path / "adapter")
    # batched scoring and generation through the memory layers equal the one-at-a-time loops
    from smf_ds.data.medmcqa import load_medmcqa
    from smf_ds.data.triviaqa import load_triviaqa
    from smf_ds.eval.medmcqa import evaluate_medmcqa
    from smf_ds.eval.reference import medmcqa_one_by_one, triviaqa_one_by_one
    from smf_ds.eval.triviaqa import evaluate_triviaqa

    mcq = load_medmcqa(str(eval_world.medmcqa), limit=6)[0]
    got, want = evaluate_medmcqa(model, tok, mcq, batch_size=4), medmcqa_one_by_one(model, tok, mcq)
    assert [g["pred_answer_norm"] for g in got] == [w["pred_answer_norm"] for w in want]
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g["ll_answer"], w["ll_answer"])) < 1e-4
    tqa = load_triviaqa(str(eval_world.triviaqa), limit=6)[0]
    assert evaluate_triviaqa(model, tok, tqa, max_new_tokens=5, batch_size=4) == \
        triviaqa_one_by_one(model, tok, tqa, max_new_tokens=5)
    s = _settings(eval_world)
    s.limit = {"medmcqa": 4, "triviaqa": 3, "wikitext": 1}
    with_memory = run_tasks(model, tok, TASKS, s, echo=None)

    args = cli.add_eval_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--model", str(eval_world.model_dir), "--memory-adapter", str(tmp_path / "adapter"),
         "--medmcqa", str(eval_world.medmcqa), "--triviaqa", str(eval_world.triviaqa),
         "--wikitext", str(eval_world.wikitext), "--limit", "medmcqa=4,triviaqa=3,wikitext=1",
         "--max-length", "48", "--stride", "24", "--max-new-tokens", "6", "--batch-size", "12",
         "--gen-batch-size", "5", "--ppl-batch-size", "3", "--n-boot", "200", "--no-progress"])
    via_cli = cli.run_eval(args)
    base = run_tasks(load_tiny(eval_world.model_dir)[0], tok, TASKS, s, echo=None)
    ppl = lambda summary: summary["tasks"]["wikitext"]["value"]  # noqa: E731
    assert ppl(via_cli) == pytest.approx(ppl(with_memory), rel=1e-5)
    assert ppl(via_cli) != pytest.approx(ppl(base), rel=1e-5)  # the memory changes the model


def test_wikitext_too_short_for_one_window_is_an_error(tiny_lm, tmp_path):
    model, tok = tiny_lm
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(NoUsableRowsError, match=r"wikitext: 1 document\(s\) from .*short\.jsonl hold fewer than 2 tokens"):
        run_tasks(model, tok, ["wikitext"], EvalSettings(wikitext=str(path)), echo=None)


def test_windows_longer_than_the_model_positions_are_warned_about(tiny_lm, tmp_path, caplog):
    model, tok = tiny_lm
    path = tmp_path / "wiki.jsonl"
    path.write_text(json.dumps({"text": " the heart pumps blood through the artery and the vein .\n"}) + "\n")
    positions = model.config.max_position_embeddings
    with caplog.at_level("WARNING"):
        run_tasks(model, tok, ["wikitext"], EvalSettings(wikitext=str(path), max_length=positions), echo=None)
        assert "max_position_embeddings" not in caplog.text
        run_tasks(model, tok, ["wikitext"], EvalSettings(wikitext=str(path), max_length=positions + 1,
                                                         stride=positions), echo=None)
    assert f"--max-length {positions + 1} is more than the model's max_position_embeddings ({positions})" in caplog.text


def test_an_earlier_evaluation_in_out_is_refused_unless_overwrite(tiny_lm, eval_world, tmp_path):
    """Files of two evaluations side by side (another model, other tasks) would contradict each other."""
    from smf_ds.config import InputError

    model, tok = tiny_lm
    s = _settings(eval_world)
    s.limit = {"medmcqa": 3, "wikitext": 1, "triviaqa": 2}
    run_tasks(model, tok, TASKS, s, out_dir=tmp_path, echo=None)
    before = (tmp_path / "summary.json").read_text()
    with pytest.raises(InputError, match=rf"--out {tmp_path}: holds an earlier evaluation \(summary.json, "
                                         r"medmcqa.predictions.jsonl.*pass --overwrite"):
        run_tasks(model, tok, ["medmcqa"], s, out_dir=tmp_path, echo=None)
    assert (tmp_path / "summary.json").read_text() == before
    run_tasks(model, tok, ["medmcqa"], s, out_dir=tmp_path, echo=None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["medmcqa.malformed.jsonl", "medmcqa.predictions.jsonl",
                                                          "summary.json"]
    with pytest.raises(InputError, match=r"summary.json: is a file; expected a directory"):
        run_tasks(model, tok, ["medmcqa"], s, out_dir=tmp_path / "summary.json", echo=None)


def test_too_short_wikitext_fails_before_any_task_is_evaluated(tiny_lm, eval_world, tmp_path):
    model, tok = tiny_lm
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n")
    s = _settings(eval_world)
    s.wikitext = str(path)
    with pytest.raises(NoUsableRowsError, match="hold fewer than 2 tokens"):
        run_tasks(model, tok, ["medmcqa", "wikitext"], s, out_dir=tmp_path / "out", echo=None)
    assert not (tmp_path / "out" / "medmcqa.predictions.jsonl").exists()


def test_a_missing_split_names_its_flag(tiny_lm, tmp_path):
    from datasets import Dataset, DatasetDict

    from smf_ds.data.loading import DataSourceError

    model, tok = tiny_lm
    rows = samples.medmcqa_rows(4, seed=1)
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows)}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataSourceError, match=r"has splits \['test', 'train'\], but split 'validation' was asked for "
                                              r"\(set by --medmcqa-split, or eval\.medmcqa_split"):
        run_tasks(model, tok, ["medmcqa"], EvalSettings(medmcqa=str(tmp_path / "dd")), echo=None)


def test_prompts_longer_than_the_model_positions_are_warned_about_for_every_task(tiny_lm, tmp_path, caplog):
    """A MedMCQA question (or TriviaQA prompt) longer than max_position_embeddings is scored with
    a warning in the log and the summary, counted, as WikiText's windows are."""
    model, tok = tiny_lm
    positions = model.config.max_position_embeddings
    long = " ".join(["kidney"] * (positions + 10))
    med = [dict(r, question=long) if i == 1 else r for i, r in enumerate(samples.medmcqa_rows(3, seed=1))]
    tqa = [dict(r, question=long) if i == 0 else r for i, r in enumerate(samples.triviaqa_rows(3, seed=1))]
    s = EvalSettings(medmcqa=str(samples.write_rows(med, tmp_path / "m.jsonl")), max_new_tokens=4, n_boot=10,
                     triviaqa=str(samples.write_rows(tqa, tmp_path / "t.jsonl")), medmcqa_modes=("letter",))
    with caplog.at_level("WARNING", logger="smf_ds.eval.runner"):
        summary = run_tasks(model, tok, ["medmcqa", "triviaqa"], s, echo=None)
    for task in ("medmcqa", "triviaqa"):
        n = summary["tasks"][task]["n"]
        (warning,) = [w for w in summary["tasks"][task]["warnings"] if "max_position_embeddings" in w]
        assert warning.startswith(f"1 of {n} prompts") and f"({positions})" in warning
        assert any(r.getMessage() == f"{task}: {warning}" for r in caplog.records)
