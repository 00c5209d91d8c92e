"""`smf-ds continual`: the task dealt into K tasks, each method's stages chained (a LoRA merged into
its model before the next), and the forgetting curves end to end (quick, K=4)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smf_ds.data.synthetic_world import WorldSpec, build_world
from smf_ds.experiment.continual import split_task
from smf_ds.train.methods import METHODS, Start

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_task_is_dealt_by_disease_into_k_tasks(tmp_path):
    world = build_world(tmp_path / "world", WorldSpec(seed=0))
    tasks = split_task(world, 4, tmp_path / "tasks")
    for split in ("train", "test"):
        whole = _rows(world[f"medmcqa_{split}"])
        parts = [_rows(task[split]) for task in tasks]
        assert sorted(r["id"] for p in parts for r in p) == sorted(r["id"] for r in whole)  # each row once
        diseases = [{r["id"].split("_")[2] for r in p} for p in parts]
        assert all(d and not d & other for i, d in enumerate(diseases) for other in diseases[i + 1:])
        assert all(len(p) == len(whole) // 4 for p in parts)
    for task in tasks:  # a task's test asks exactly its training facts
        assert {r["id"] + "_test" for r in _rows(task["train"])} == {r["id"] for r in _rows(task["test"])}
    with pytest.raises(Exception, match="--tasks 1000: the world has 48 diseases"):
        split_task(world, 1000, tmp_path / "too_many")


def test_a_bad_number_of_tasks_is_refused_before_anything_runs(tmp_path):
    from smf_ds.config import ConfigError
    from smf_ds.experiment.continual import run_continual

    for tasks in (1, 49):
        with pytest.raises(ConfigError, match=f"--tasks: expected 2 to 48 tasks .* got {tasks}"):
            run_continual(tmp_path / "c", tasks=tasks)
    assert not (tmp_path / "c").exists()


def test_a_lora_stage_goes_on_from_its_adapter_merged_into_the_model(tmp_path, eval_world):
    from peft import LoraConfig, PeftModel, get_peft_model

    from fixtures_eval import load_tiny

    model, tokenizer = load_tiny(eval_world.model_dir)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))  # non-zero B: the adapter changes outputs
    lora.save_pretrained(tmp_path / "adapter")
    ids = tokenizer("the heart is an organ", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = lora(ids).logits
        plain = load_tiny(eval_world.model_dir)[0](ids).logits
    assert not torch.allclose(expected, plain, atol=1e-4)

    start = METHODS["lora"].continued(Start(str(eval_world.model_dir)), tmp_path / "adapter", tmp_path / "merged")
    assert start == Start(str(tmp_path / "merged")) and not (tmp_path / "merged.partial").exists()
    merged, _ = load_tiny(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
    assert not any("lora" in name for name in merged.state_dict())
    again = METHODS["lora"].continued(Start(str(eval_world.model_dir)), tmp_path / "adapter", tmp_path / "merged")
    assert again == start  # done before: kept

    assert METHODS["smf"].continued(Start("base", "a0"), Path("a1"), tmp_path) == Start("base", "a1")
    assert METHODS["full"].continued(Start("base"), Path("model1"), tmp_path) == Start("model1")


@pytest.mark.e2e
def test_quick_continual_stream_of_four_tasks(tmp_path):
    out = tmp_path / "continual"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "smf_ds.cli", "continual", "--quick", "--tasks", "4", "--methods", "smf-tfidf,lora",
            "--seeds", "0", "--out", str(out)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    results = json.loads((out / "continual.json").read_text())
    assert list(results["variants"]) == ["smf-tfidf", "lora"] and results["tasks"] == 4
    for variant, stages in results["variants"].items():
        assert len(stages) == 4
        for stage, row in enumerate(stages):
            assert set(row) == {"task0", "task1", "task2", "task3", "learned", "triviaqa", "wikitext"}
            lo, hi = row["learned"]["ci95"]
            assert lo <= row["learned"]["value"] <= hi
            # the mean over tasks learned so far is the mean of those tasks' changes (equal sizes)
            assert row["learned"]["value"] == pytest.approx(
                sum(row[f"task{i}"]["value"] for i in range(stage + 1)) / (stage + 1))
    # stage j trained on task j alone, from stage j-1's result
    for stage in range(4):
        cfg = (out / "runs" / "lora" / "seed0" / f"stage{stage}" / "config.yaml").read_text()
        assert f"task{stage}/medmcqa_train.jsonl" in cfg
        assert ("base" if stage == 0 else f"stage{stage - 1}/continued") in cfg
        smf = json.loads((out / "runs" / "smf-tfidf" / "seed0" / f"stage{stage}" / "train_summary.json").read_text())
        assert smf["artifact"].endswith(f"stage{stage}/memory_adapter")
        started = smf["started_from"]["memory_adapter"]  # the memory the stage before left, not a fresh one
        assert (started is None) if stage == 0 else started.endswith(f"stage{stage - 1}/memory_adapter")
    report = (out / "continual.md").read_text()
    assert "| smf-tfidf | 4 |" in report and "| lora | 1 |" in report
    assert (out / "continual.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # called again: every stage kept, nothing trained again
    stamp = (out / "runs" / "lora" / "seed0" / "stage3" / "eval" / "probes" / "summary.json").stat().st_mtime_ns
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "runs" / "lora" / "seed0" / "stage3" / "eval" / "probes" / "summary.json").stat().st_mtime_ns == stamp
    assert "train:" not in again.stderr
