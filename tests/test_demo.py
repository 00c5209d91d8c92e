"""`smf-ds demo --quick`: the main job end to end on the embedded world (pretrain, SMF/LoRA/full,
evaluation of every model on the task and both probes, the comparison table)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _rows(path) -> int:
    return sum(1 for line in Path(path).read_text().splitlines() if line.strip())


@pytest.mark.e2e
def test_quick_demo_trains_and_evaluates_every_method(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "smf_ds.cli", "demo", "--quick", "--out", str(tmp_path / "demo")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    world = summary["world"]
    assert set(summary["runs"]) == {"smf", "lora", "full"}
    assert all(run["steps"] == 10 and math.isfinite(run["final_loss"]) for run in summary["runs"].values())
    table = summary["evaluation"]
    assert list(table) == ["base", "smf", "lora", "full"]
    for name, row in table.items():
        assert 0.0 <= row["medmcqa"] <= 1.0 and 0.0 <= row["triviaqa"] <= 1.0 and row["wikitext"] > 1.0, name
        assert row["wikitext_memorised"] > 1.0, name
        if name != "base":
            assert math.isclose(row["triviaqa_delta"], row["triviaqa"] - table["base"]["triviaqa"])
            assert math.isclose(row["wikitext_memorised_delta"], row["wikitext_memorised"] - table["base"]["wikitext_memorised"])
        eval_dir = Path(summary["eval_dirs"][name])
        task_summary = json.loads((eval_dir / "summary.json").read_text())
        # every example of the world was evaluated, none silently dropped
        assert task_summary["tasks"]["medmcqa"]["n"] == _rows(world["medmcqa_test"]) == \
            _rows(eval_dir / "medmcqa.predictions.jsonl")
        assert task_summary["tasks"]["triviaqa"]["n"] == _rows(world["triviaqa"])
        # the probes read the held-out articles; the memorised column the seen ones
        assert task_summary["tasks"]["wikitext"]["source"] == world["wikitext"]
        memorised = json.loads((eval_dir / "memorised" / "summary.json").read_text())["tasks"]["wikitext"]
        assert memorised["source"] == world["wikitext_seen"] and math.isclose(memorised["value"], row["wikitext_memorised"])
    # SMF trained only memory values: its artifact is a memory adapter over the unchanged base
    assert (Path(summary["runs"]["smf"]["artifact"]) / "memory_config.json").is_file()


def test_comparison_table_columns_line_up_with_large_values():
    from smf_ds.experiment.demo import format_comparison

    table = {"base": {"medmcqa": 0.229, "wikitext": 12.5, "triviaqa": 1.0, "wikitext_memorised": 1.002},
             "full": {"medmcqa": 0.656, "wikitext": 135.653, "triviaqa": 0.817, "wikitext_memorised": 1.5,
                      "medmcqa_delta": 0.427, "wikitext_delta": 123.153, "triviaqa_delta": -0.183,
                      "wikitext_memorised_delta": 0.498}}
    lines = format_comparison(table).splitlines()
    assert len({len(line) for line in lines}) == 1  # every column right-aligned to one width
    assert lines[0].split()[-2:] == ["memorised", "ppl"]
    assert lines[2].split() == ["full", "0.656", "(+0.427)", "135.653", "(+123.153)", "0.817", "(-0.183)", "1.500",
                                "(+0.498)"]
