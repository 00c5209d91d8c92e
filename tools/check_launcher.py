#!/usr/bin/env python
"""Does a launcher give the same training as one process? Run this on a new machine or cluster.

    tools/check_launcher.py deepspeed            # launch/deepspeed.sh 2 (DS_ACCELERATOR=cpu without GPUs)
    tools/check_launcher.py mpirun --procs 4     # launch/mpirun.sh 4 (OpenMPI)
    tools/check_launcher.py slurm                # sbatch --wait launch/slurm.sbatch, one node
    tools/check_launcher.py slurm --sbatch-args="--partition=gpu --gpus-per-node=2"

On a tiny model and data it builds in --workdir (a random Qwen2, MedMCQA- and OASST-schema rows:
nothing is downloaded), it runs `smf-ds background` and `smf-ds train` (SMF, tfidf, row-sharded
value tables, 3 steps) twice: under the launcher with P processes and grad_accum 1, and as one plain
process with grad_accum P, so both train on the same global batches. It then compares what they
wrote: background statistics (must be equal), the trained memory adapter (within 1e-6) and the
final loss (within 1e-5); prints PASS or FAIL for each, writes --out JSON, and exits 1 on a
mismatch (2 when a run fails; its log is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LAUNCHERS = ("deepspeed", "mpirun", "slurm")
TOLERANCE = {"adapter": 1e-6, "loss": 1e-5}


def build_world(root: Path) -> Path:
    """A tiny saved model, training and background rows, and the run config; returns the config."""
    from smf_ds.data import samples
    from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
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


def launch_command(launcher: str | None, procs: int, args: list[str], log_dir: Path,
                   sbatch_args: str = "") -> list[str]:
    """The command line that runs `smf-ds ARGS` under LAUNCHER with PROCS processes (None: one plain process)."""
    if launcher is None:
        return [sys.executable, "-m", "smf_ds.cli", *args]
    if launcher == "slurm":
        return ["sbatch", "--wait", "--nodes=1", f"--ntasks-per-node={procs}", f"--chdir={REPO}",
                f"--output={log_dir / 'slurm-%j.out'}", *shlex.split(sbatch_args),
                str(REPO / "launch" / "slurm.sbatch"), *args]
    return [str(REPO / "launch" / f"{launcher}.sh"), str(procs), *args]


def launcher_env() -> dict:
    """The environment for the launch scripts: this interpreter and its deepspeed, a free port."""
    from smf_ds.parallel.process_group import free_port

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHON=sys.executable,
               DEEPSPEED=str(Path(sys.executable).with_name("deepspeed")), MASTER_PORT=str(free_port()),
               PYTHONPATH=str(REPO))
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would look for a GPU
    return env


def run_smf_ds(launcher: str | None, procs: int, args: list[str], log_dir: Path, sbatch_args: str = "",
               timeout: float = 900) -> subprocess.CompletedProcess:
    """Run one smf-ds command under a launcher; the child processes use this interpreter."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(launcher, procs, args, log_dir, sbatch_args)
    done = subprocess.run(cmd, env=launcher_env(), cwd=log_dir, capture_output=True, text=True, timeout=timeout)
    if launcher == "slurm":  # the job's own output is in its log file, not sbatch's
        done.stdout += "".join(p.read_text() for p in sorted(log_dir.glob("slurm-*.out")))
    return done


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def train_twice(config: Path, launcher: str, procs: int, workdir: Path, sbatch_args: str = "") -> dict:
    """background + train once as one process and once under the launcher; returns each run's outputs."""
    from safetensors.torch import load_file

    runs = {}
    for name, how, n in (("one_process", None, 1), (launcher, launcher, procs)):
        out = workdir / name
        common = ["--config", str(config), f"out_dir={out}", f"train.grad_accum={procs // n}"]
        for args in (["background", *common],
                     ["train", *common, f"sparse.background={out / 'background.safetensors'}"]):
            done = run_smf_ds(how, n, args, out / "logs", sbatch_args)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(launch_command(how, n, args, out / 'logs', sbatch_args))} "
                                   f"failed (exit status {done.returncode}):\n{done.stdout[-3000:]}\n"
                                   f"{done.stderr[-6000:]}")
        summary = json.loads((out / "train_summary.json").read_text())
        runs[name] = {"summary": summary,
                      "background": load_file(out / "background.safetensors"),
                      "adapter": load_file(out / "memory_adapter" / "memory_adapter.safetensors")}
    return runs


def compare(one: dict, launched: dict, procs: int) -> list[dict]:
    """One check per output: name, measured difference, what it must be, passed."""
    def max_diff(a: dict, b: dict) -> float:
        if a.keys() != b.keys():
            return float("inf")
        return max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)

    checks = [
        ("world size", launched["summary"]["world_size"], f"== {procs}", launched["summary"]["world_size"] == procs),
        ("steps", launched["summary"]["steps"], f"== {one['summary']['steps']}",
         launched["summary"]["steps"] == one["summary"]["steps"]),
    ]
    bg = max_diff(one["background"], launched["background"])
    checks.append(("background stats max |diff|", bg, "== 0", bg == 0))
    ad = max_diff(one["adapter"], launched["adapter"])
    checks.append(("memory adapter max |diff|", ad, f"<= {TOLERANCE['adapter']}", ad <= TOLERANCE["adapter"]))
    loss = abs(one["summary"]["final_loss"] - launched["summary"]["final_loss"])
    checks.append(("final loss |diff|", loss, f"<= {TOLERANCE['loss']}", loss <= TOLERANCE["loss"]))
    return [{"check": c, "value": v, "expected": e, "passed": bool(p)} for c, v, e, p in checks]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("launcher", choices=LAUNCHERS)
    parser.add_argument("--procs", type=int, default=2, help="processes under the launcher (default 2)")
    parser.add_argument("--workdir", type=Path, help="where the model, data and runs go (default: a temporary dir)")
    parser.add_argument("--sbatch-args", default="", help="extra sbatch flags for the slurm launcher")
    parser.add_argument("--out", type=Path, help="write the checks as JSON here")
    args = parser.parse_args(argv)
    if args.procs < 2:
        parser.error(f"--procs: expected at least 2 processes to compare with one, got {args.procs}")

    with tempfile.TemporaryDirectory(prefix="check_launcher_") as tmp:
        workdir = args.workdir or Path(tmp)
        config = build_world(workdir / "world")
        try:
            runs = train_twice(config, args.launcher, args.procs, workdir / "runs", args.sbatch_args)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 2
        checks = compare(runs["one_process"], runs[args.launcher], args.procs)

    passed = all(c["passed"] for c in checks)
    print(f"{args.launcher} with {args.procs} processes against one process:")
    for c in checks:
        print(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['check']}: {c['value']:g} (expected {c['expected']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"launcher": args.launcher, "procs": args.procs, "passed": passed,
                                        "checks": checks}, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
