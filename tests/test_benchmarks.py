"""The benchmarks run (smallest settings) and write what their READMEs read: a smoke test, not a
timing. Timings are never asserted; the checks that can fail are that every tool exits 0, that
bench_eval's evaluators and the paper-style loops give the same predictions, and that the JSON
carries the fields the tables are built from."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


def _tool(name, *args, timeout=600):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "tools" / name), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_bench_sparse_step_quick(tmp_path):
    out = tmp_path / "sparse_step.json"
    printed = _tool("bench_sparse_step.py", "--quick", "--sizes", "4096,16384", "--no-memory", "--out", str(out))
    result = json.loads(out.read_text())
    assert "Floor:" in printed
    for row in result["results"]:
        assert row["ours"]["rows_changed_per_step"] <= 512  # only the selected rows move
        assert row["ours"]["row_read_floor_ms"] > 0 and row["speedup"] > 0
    assert {g["goal"].split(":")[0] for g in result["goals"]} >= {"ours flat in N"}


def test_bench_memory_quick(tmp_path):
    out = tmp_path / "memory.json"
    printed = _tool("bench_memory.py", "--quick", "--sizes", "1024,4096", "--procs", "1,2", "--no-memory",
                    "--no-layer", "--draws", "uniform", "--out", str(out))
    result = json.loads(out.read_text())
    rows = result["results"]
    assert {(r["strategy"], r["procs"]) for r in rows} == {(s, p) for s in ("replicated", "row", "column") for p in (1, 2)}
    assert all(r["bytes_sent_max_rank"] == 0 for r in rows if r["procs"] == 1)  # one process sends nothing
    assert all(r["bytes_sent_max_rank"] > 0 for r in rows if r["procs"] == 2 and r["strategy"] != "replicated")
    assert "were all but reading the rows flat" in printed


def test_bench_eval_predictions_identical(tmp_path):
    out = tmp_path / "eval.json"
    _tool("bench_eval.py", "--n", "12", "--wiki-articles", "3", "--repeats", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"medmcqa", "triviaqa", "wikitext"}
    assert all(task["identical"] for task in result["tasks"].values())


def test_rehearse_qwen_shape_quick(tmp_path):
    """Every stage of the paper's pipeline runs at Qwen2.5-0.5B's depth (hidden 64): retrofit,
    background, train, resume, eval; the tool measures each."""
    out = tmp_path / "rehearsal.json"
    printed = _tool("rehearse_qwen_shape.py", "--quick", "--workdir", str(tmp_path), "--out", str(out))
    stages = json.loads(out.read_text())["stages"]
    assert [s["stage"] for s in stages] == ["retrofit", "background", "train", "train --resume (+2 steps)",
                                            "eval", "disk"]
    for stage in stages[:-1]:
        assert stage["seconds"] > 0 and stage["peak_rss_gib"] > 0, stage
    assert stages[3]["seconds_per_step"] > 0 and "train --resume" in printed
    assert all(size > 0 for key, size in stages[-1].items() if key != "stage"), stages[-1]


@pytest.mark.parametrize("parts", ["env,merged,bench,smf", "stop", "elastic"])  # three tests: they run side by side
def test_the_gpu_check_runs_dry_on_the_cpu(tmp_path, parts):
    """tools/gpu_check.sh --dry-run: every part of the GPU check on the CPU (the script is known to
    work before a GPU is at hand), each ok, with its JSON and markdown summary."""
    done = subprocess.run([str(REPO / "tools" / "gpu_check.sh"), str(tmp_path), "--dry-run", "--parts", parts],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and list(result["parts"]) == parts.split(",")
    assert all(part["ok"] for part in result["parts"].values())
    summary = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {part} | True |" in summary for part in parts.split(","))
    if "stop" in parts:
        assert result["parts"]["stop"]["stop_exit"] == 75 and result["parts"]["stop"]["bitwise_equal"]
    if "smf" in parts:
        smf = result["parts"]["smf"]
        assert smf["smf_tokens_per_s_over_lora"] > 0 and "smf_memory_share@256" in smf
