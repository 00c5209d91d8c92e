#!/usr/bin/env python
"""The paper's pipeline at Qwen2.5-0.5B-Instruct's size, offline: does every stage run, how long
does it take, how much memory and disk does it use?

    tools/rehearse_qwen_shape.py                                   # one process
    tools/rehearse_qwen_shape.py --launcher deepspeed --procs 2 --sharding row --zero-stage 3
    tools/rehearse_qwen_shape.py --quick       # Qwen's depth at hidden 64 and vocab 2,048: a smoke run

It builds a randomly initialised model with Qwen2.5-0.5B-Instruct's configuration (24 layers,
hidden 896, 14 query / 2 key-value heads, intermediate 4,864, vocab 151,936, tied embeddings:
494M parameters, saved in bfloat16; nothing is downloaded), seeded rows in the hub schemas, and
the README's `qwen.yaml` cut down to a few steps (the paper's memory: layers 6, 12, 18, 128 x 128
slots; SMF with kl). Then, each under the launcher: `retrofit`, `background`, `train`, a resumed
`train` two steps further, `eval` on the three tasks (small limits), and with --baselines the
paper's LoRA and full finetunes of the same backbone. Per stage it reports the
wall time, seconds per training step, the peak resident memory of all the stage's processes
together (sampled every 0.2 s), and what the stage left on disk; --out writes it as JSON.

Random weights: the losses and scores mean nothing. What it checks is that nothing breaks or
grows out of proportion at the real model's size (vocab-sized logits, a 1 GB backbone, checkpoint
contents), which the tests' tiny models cannot show. Slurm is left out: its tasks do not run
under this process, so their memory cannot be sampled here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from check_launcher import launch_command, launcher_env  # noqa: E402

# Qwen/Qwen2.5-0.5B-Instruct's config.json (the architecture fields).
QWEN_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, tie_word_embeddings=True, max_window_layers=21, sliding_window=32768,
                 use_sliding_window=False)
QUICK = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=2048)


def build_world(root: Path, args) -> Path:
    """The model, data and run config; returns the config."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from smf_ds.data import samples
    from smf_ds.data.tiny import build_tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    files = {"medmcqa": samples.write_rows(samples.medmcqa_rows(64, seed=3), root / "medmcqa.jsonl"),
             "oasst": samples.write_rows(samples.oasst_rows(40, seed=3), root / "oasst.jsonl"),
             "triviaqa": samples.write_rows(samples.triviaqa_rows(32, seed=3), root / "triviaqa.jsonl"),
             "wikitext": samples.write_rows(samples.wikitext_rows(8, seed=3), root / "wikitext.jsonl")}
    texts = [line for path in files.values() for line in path.read_text().splitlines()]
    # A small byte-level BPE stands in for Qwen's tokenizer; the model keeps Qwen's full vocab.
    tokenizer = build_tiny_tokenizer(texts, vocab_size=2000)
    model_dir = model_path(root, args)
    if not (model_dir / "config.json").is_file():
        config = Qwen2Config(**(QWEN_0_5B | QUICK if args.quick else QWEN_0_5B), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    config = root / "qwen.yaml"
    config.write_text(f"""\
model: {{name_or_path: {model_dir}, dtype: bfloat16}}
data: {{train: {files['medmcqa']}, background: {files['oasst']}, background_batches: {args.steps}}}
retrofit: {{steps: {args.steps}, lr: 5.0e-4}}
sparse: {{scoring: kl, top_t: 512}}
train: {{method: smf, steps: {args.steps}, micro_batch_size: {args.micro_batch}, max_length: {args.max_length},
        save_every: {args.steps}, zero_stage: {args.zero_stage}}}
memory: {{value_lr: 2.0, sharding: {args.sharding}}}
""")
    return config


def model_path(world: Path, args) -> Path:
    return world / ("model_quick" if args.quick else "model")


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # ended between listing and reading
            pass
    return total


def run_stage(name: str, cmd: list[str], log: Path) -> dict:
    """Run one stage, sampling the memory of its process tree; its wall time and peak memory."""
    start, peak = time.time(), 0
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, env=launcher_env(), stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                peak = max(peak, tree_rss(watched))
            except psutil.Error:
                pass
            time.sleep(0.2)
    if child.returncode != 0:
        raise RuntimeError(f"{name}: {' '.join(cmd)} failed (exit status {child.returncode}); "
                           f"its last lines ({log}):\n{''.join(log.read_text().splitlines(True)[-30:])}")
    return {"stage": name, "seconds": round(time.time() - start, 1), "peak_rss_gib": round(peak / 2**30, 2)}


def disk_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def rehearse(config: Path, world: Path, runs: Path, args) -> list[dict]:
    launcher = None if args.launcher == "none" else args.launcher
    procs = args.procs if launcher else 1
    adapter, smf = runs / "retrofit" / "memory_adapter", runs / "smf"
    common = ["--config", str(config)]
    train = ["train", *common, "--memory-adapter", str(adapter), f"sparse.background={smf / 'background.safetensors'}",
             f"out_dir={smf}"]
    stages = [
        ("retrofit", ["retrofit", *common, f"out_dir={runs / 'retrofit'}"], runs / "retrofit" / "retrofit_summary.json"),
        ("background", ["background", *common, "--memory-adapter", str(adapter), f"out_dir={smf}"], None),
        ("train", train, smf / "train_summary.json"),
        ("train --resume (+2 steps)", [*train, "--resume", f"train.steps={args.steps + 2}"], smf / "train_summary.json"),
        ("eval", ["eval", "--model", str(model_path(world, args)), "--memory-adapter", str(smf / "memory_adapter"),
                  "--medmcqa", str(world / "medmcqa.jsonl"), "--triviaqa", str(world / "triviaqa.jsonl"),
                  "--wikitext", str(world / "wikitext.jsonl"), "--limit", "medmcqa=32,triviaqa=16,wikitext=4",
                  "--max-length", "1024", "--stride", "512", "--out", str(smf / "eval"), "--no-progress"], None),
    ]
    # The paper's baselines on the same backbone and data: no memory, the dense optimizer's state in the
    # checkpoint (a full finetune's is 3x the fp32 model).
    for method in args.baselines:
        stages.append((f"train {method}", ["train", *common, f"train.method={method}", f"out_dir={runs / method}"],
                       runs / method / "train_summary.json"))
    results = []
    logs = runs / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for name, stage_args, summary_file in stages:
        cmd = launch_command(launcher, procs, stage_args, logs)
        result = run_stage(name, cmd, logs / f"{len(results)}_{stage_args[0]}.log")
        if summary_file is not None:
            summary = json.loads(summary_file.read_text())
            steps = summary["steps"] - summary.get("resumed_at_step", 0)
            result["seconds_per_step"] = round(summary["seconds"] / max(steps, 1), 2)
        results.append(result)
        print(f"{name:28s} {result['seconds']:7.1f} s  peak {result['peak_rss_gib']:5.2f} GiB"
              + (f"  {result['seconds_per_step']:.2f} s/step" if "seconds_per_step" in result else ""), flush=True)
    disk = {"retrofit checkpoint": runs / "retrofit" / "checkpoints", "retrofit memory_adapter": adapter,
            "background stats": smf / "background.safetensors", "smf checkpoints": smf / "checkpoints",
            "smf memory_adapter": smf / "memory_adapter", "base model (bfloat16)": model_path(world, args)}
    disk |= {f"{method} checkpoints": runs / method / "checkpoints" for method in args.baselines}
    results.append({"stage": "disk", **{k: disk_mib(v) for k, v in disk.items()}})
    for k, v in disk.items():
        print(f"  {k:28s} {disk_mib(v):9.1f} MiB")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launcher", choices=("none", "deepspeed", "mpirun"), default="none")
    parser.add_argument("--procs", type=int, default=2, help="processes under the launcher (default 2)")
    parser.add_argument("--sharding", choices=("replicated", "row", "column"), default="replicated")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0)
    parser.add_argument("--steps", type=int, default=3, help="retrofit and train steps, background batches")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--baselines", default="", type=lambda s: [m for m in s.split(",") if m],
                        help="also train these methods after the SMF stages, comma-separated: lora, full")
    parser.add_argument("--quick", action="store_true", help="a smoke run: Qwen's depth and memory layers, "
                        "hidden 64, vocab 2,048, 1 step")
    parser.add_argument("--workdir", type=Path, help="model, data and runs (default: a temporary dir); "
                                                     "the model is reused when it is there")
    parser.add_argument("--out", type=Path, help="write the measurements as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.max_length = 1, 64
    if set(args.baselines) - {"lora", "full"}:
        parser.error(f"--baselines: expected lora and/or full, got {','.join(args.baselines)}")
    if args.steps < 1:
        parser.error(f"--steps: expected >= 1, got {args.steps}")

    with tempfile.TemporaryDirectory(prefix="rehearse_qwen_") as tmp:
        workdir = args.workdir or Path(tmp)
        runs = workdir / f"runs{'_quick' if args.quick else ''}_{args.launcher}{args.procs if args.launcher != 'none' else 1}_{args.sharding}_z{args.zero_stage}"
        if runs.exists():
            parser.error(f"--workdir: {runs} exists from an earlier rehearsal; remove it or use another --workdir")
        config = build_world(workdir / "world", args)
        try:
            results = rehearse(config, workdir / "world", runs, args)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": vars(args) | {"workdir": str(args.workdir), "out": str(args.out)},
                                        "model": QWEN_0_5B | QUICK if args.quick else QWEN_0_5B,
                                        "stages": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
