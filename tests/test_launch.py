"""Launchers: their variables map to one process group, and `launch/deepspeed.sh 2` equals one process.

The end-to-end test runs `smf-ds background` and `smf-ds train` (SMF, tfidf, row-sharded tables)
on a tiny saved model, once through the deepspeed launcher with 2 CPU processes (gloo) and once
as a plain single process with twice the gradient accumulation (the same global batches), and
compares the background statistics, the trained memory adapter and the losses.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smf_ds.data import samples
from smf_ds.parallel.process_group import free_port, launcher_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variables, expected", [
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"},
     {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
      "MASTER_ADDR": "gpu01"},
     {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu01", "MASTER_PORT": "29500"}),
])
def test_launcher_variables(variables, expected):
    assert launcher_env(variables) == expected


def test_single_process_cases():
    assert launcher_env({}) is None
    assert launcher_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    # An sbatch script's own shell has SLURM_NTASKS but is not an srun step: one process.
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None


def test_bad_launcher_variables_name_them():
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK=4 is outside 0..3"):
        launcher_env({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="expected integers in RANK, WORLD_SIZE"):
        launcher_env({"RANK": "zero", "WORLD_SIZE": "2"})


def _world(root: Path) -> Path:
    from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer

    medmcqa = samples.write_rows(samples.medmcqa_rows(16, seed=3), root / "medmcqa.jsonl")
    oasst = samples.write_rows(samples.oasst_rows(12, seed=3), root / "oasst.jsonl")
    texts = [json.dumps(r) for p in (medmcqa, oasst) for r in map(json.loads, p.read_text().splitlines())]
    build_tiny_model(build_tiny_tokenizer(texts, vocab_size=300), root / "model", hidden=32, layers=2, seed=0)
    config = root / "run.yaml"
    config.write_text(f"""\
model: {{name_or_path: {root / 'model'}}}
memory: {{layers: [1], n_keys: 8, heads: 2, knn: 4, k_dim: 8, sharding: row}}
sparse: {{scoring: tfidf, top_t: 6}}
train: {{method: smf, scope: values, steps: 3, micro_batch_size: 2, lr: 1.0, max_length: 64}}
data: {{train: {medmcqa}, background: {oasst}, background_batches: 3}}
""")
    return config


def _smf_ds(args, nproc: int, run_dir: Path) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()),
               PYTHONPATH=str(REPO))
    if nproc == 1:
        cmd = [sys.executable, "-m", "smf_ds.cli", *args]
    else:
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(REPO / "launch" / "deepspeed.sh"), str(nproc), *args]
        env["DEEPSPEED"] = str(deepspeed)
    done = subprocess.run(cmd, env=env, cwd=run_dir.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def test_deepspeed_launcher_equals_one_process(tmp_path):
    config = _world(tmp_path)
    results = {}
    for nproc in (1, 2):
        run = tmp_path / f"w{nproc}"
        common = ["--config", str(config), f"out_dir={run}", f"train.grad_accum={2 // nproc}"]
        _smf_ds(["background", *common], nproc, run)
        _smf_ds(["train", *common, f"sparse.background={run / 'background.safetensors'}"], nproc, run)
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["world_size"] == nproc and summary["steps"] == 3
        results[nproc] = {
            "background": load_file(run / "background.safetensors"),
            "adapter": load_file(run / "memory_adapter" / "memory_adapter.safetensors"),
            "loss": summary["final_loss"],
        }
    one, two = results[1], results[2]
    assert one["background"].keys() == two["background"].keys()
    for key, value in one["background"].items():
        assert torch.equal(value, two["background"][key]), key
    assert one["adapter"].keys() == two["adapter"].keys()
    for key, value in one["adapter"].items():
        assert (value - two["adapter"][key]).abs().max() <= 1e-6, key
    assert abs(one["loss"] - two["loss"]) <= 1e-5


def test_experiment_under_the_deepspeed_launcher(tmp_path):
    """The grid's steps hand files from rank 0 to every rank (a run's artifact, then its
    evaluation): under 2 processes each rank must wait for rank 0's writes."""
    out = tmp_path / "exp"
    _smf_ds(["experiment", "--quick", "--methods", "lora", "--seeds", "0", "--out", str(out)], 2, out)
    results = json.loads((out / "results.json").read_text())
    assert results["variants"]["lora"]["seeds"] == [0]
    for summary in (out / "base_eval" / "summary.json", out / "runs" / "lora" / "seed0" / "eval" / "summary.json"):
        assert json.loads(summary.read_text())["world_size"] == 2
    assert json.loads((out / "runs" / "lora" / "seed0" / "train_summary.json").read_text())["world_size"] == 2
