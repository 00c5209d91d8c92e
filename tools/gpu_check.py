#!/usr/bin/env python
"""The checks that need a GPU, as one prepared run with a time budget per part (run it through
tools/gpu_check.sh, which installs carried wheels first). Writes OUT/gpu_check.json and
OUT/gpu_check.md; a part that fails or runs out of time is recorded and the next one runs.

    tools/gpu_check.sh OUT_DIR                 # on a machine with one NVIDIA GPU, no network
    tools/gpu_check.sh OUT_DIR --dry-run       # here: every part on the CPU, tiny, to check the script

Parts:
  env       torch / CUDA / DeepSpeed versions, the GPU, its device-to-device copy bandwidth
  merged    a merged SMF model loaded by transformers alone with device_map="cuda" in bf16
            (trust_remote_code): logits against smf-ds's own loader on the GPU; lm_eval --device
            cuda with the shipped task files gives smf-ds eval's MedMCQA predictions
  stop      SIGTERM to `launch/deepspeed.sh 1 train` on the GPU (NCCL, a group of one): exit 75,
            then --resume auto ends bitwise equal to a straight run
  elastic   a checkpoint made on the GPU resumed on the CPU (DS_ACCELERATOR=cpu): it continues,
            and its final adapter is close to the straight GPU run's
  bench     tools/bench_eval.py --device cuda, small (batched evaluators against per-example loops)
  smf       tools/bench_smf_overhead.py --device cuda (bf16): an SMF step at Qwen2.5-0.5B's shape
            split into backbone and memory parts, against LoRA and full finetuning, tables of
            16k/262k/1M slots; SMF's tokens/s over LoRA's (goal: at least 0.9)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
PARTS = ("env", "merged", "stop", "elastic", "bench", "smf")
BUDGET = {"env": 60, "merged": 120, "stop": 120, "elastic": 120, "bench": 120, "smf": 150}  # seconds, each part's most
TOTAL_BUDGET = 480  # the whole GPU run: a part gets at most what is left of it (the dry run: its parts' budgets)
# The budgets guard lent GPU time. A dry run checks the script on a CPU that may be running other
# work (CI's 2 cores run two tests at once), so its parts get this many times theirs.
DRY_RUN_BUDGET_FACTOR = 4


def _limit(seconds: float, device: str) -> float:
    """A wait inside a part, longer in a dry run (see DRY_RUN_BUDGET_FACTOR)."""
    return seconds * (DRY_RUN_BUDGET_FACTOR if device == "cpu" else 1)


def _env(device: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["DS_ACCELERATOR"] = "cuda" if device == "cuda" else "cpu"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(argv: list[str], device: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=_env(device), capture_output=True, text=True, timeout=_limit(timeout, device), **kw)


def part_env(work: Path, device: str) -> dict:
    import torch

    out = {"ok": True, "torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except ImportError as err:
        out["ok"], out["deepspeed"] = False, f"missing ({err})"
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        y.copy_(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            y.copy_(x)
        torch.cuda.synchronize()
        out["d2d_copy_GBps"] = round(2 * 20 * x.numel() / (time.perf_counter() - start) / 1e9, 1)  # read + write
    return out


def _world(work: Path) -> Path:
    from check_launcher import build_world

    config = work / "world" / "run.yaml"
    return config if config.is_file() else build_world(work / "world")


def part_merged(work: Path, device: str) -> dict:
    """#17 on a GPU: transformers alone, device_map and bf16; lm_eval on the device."""
    import torch

    from smf_ds.config import MemoryConfig
    from smf_ds.data import samples
    from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer
    from smf_ds.memory.inject import inject_memory
    from smf_ds.memory.merged import load_merged, save_merged

    tok = build_tiny_tokenizer([r["question"] for r in samples.medmcqa_rows(40, seed=9)], vocab_size=300)
    model = build_tiny_model(tok, hidden=64, layers=2, init_std=0.2)
    inject_memory(model, MemoryConfig(layers=[0, 1], n_keys=16, heads=2, knn=4, k_dim=16, scale_init=1.0))
    save_merged(model, work / "merged", tokenizer=tok)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    script = (f"import torch, json; from transformers import AutoModelForCausalLM as A; "
              f"m = A.from_pretrained({str(work / 'merged')!r}, trust_remote_code=True, dtype=torch.{str(dtype)[6:]}, "
              f"device_map={device!r}); ids = torch.tensor([[3, 4, 5, 6, 7]], device={device!r}); "
              f"print(json.dumps(m(input_ids=ids).logits.float().cpu().tolist()))")
    done = _run([sys.executable, "-c", script], device, 120, cwd=work)
    if done.returncode:
        return {"ok": False, "error": done.stderr[-2000:]}
    theirs = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    ours = load_merged(work / "merged", dtype=dtype).to(device)
    with torch.no_grad():
        mine = ours(input_ids=torch.tensor([[3, 4, 5, 6, 7]], device=device)).logits.float().cpu()
    diff = float((theirs - mine).abs().max())
    medmcqa = samples.write_rows(samples.medmcqa_rows(8, seed=1), work / "medmcqa.jsonl")
    lm_eval = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
               f"pretrained={work / 'merged'},trust_remote_code=True,dtype={str(dtype)[6:]}", "--tasks",
               "smf_medmcqa_letter", "--include_path", str(REPO / "smf_ds" / "eval" / "lm_eval_tasks"), "--metadata",
               json.dumps({"medmcqa": str(medmcqa)}), "--device", device, "--batch_size", "4", "--output_path",
               str(work / "lm_eval")]
    ran = _run(lm_eval, device, 120, cwd=work)
    return {"ok": diff <= (2e-2 if device == "cuda" else 1e-5) and ran.returncode == 0, "logits_max_abs_diff": diff,
            "lm_eval_exit": ran.returncode, "lm_eval_tail": ran.stderr[-500:] if ran.returncode else ""}


def _train(work: Path, device: str, out: Path, *extra: str, wait: bool = True):
    from smf_ds.parallel.process_group import free_port

    config = _world(work)
    argv = [str(REPO / "launch" / "deepspeed.sh"), "1", "train", "--config", str(config), f"out_dir={out}",
            "sparse.scoring=tf", *extra]
    env = dict(_env(device), MASTER_PORT=str(free_port()))
    if wait:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=_limit(120, device))
    log = open(out.parent / f"{out.name}.log", "w")  # a file, not a pipe: nobody reads it while it runs
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "memory_adapter" / "memory_adapter.safetensors"))


def part_stop(work: Path, device: str) -> dict:
    """#15 on a GPU: a stop signal saves and exits 75; --resume auto ends equal to a straight run."""
    import torch

    # Long enough that the signal lands mid-run; on the CPU (dry run) a step takes longer.
    steps = [f"train.steps={400 if device == 'cuda' else 120}", "train.save_every=20"]
    straight = _train(work, device, work / "straight", *steps)
    if straight.returncode:
        return {"ok": False, "error": straight.stderr[-2000:]}
    run = work / "stopped"
    proc = _train(work, device, run, *steps, "--resume", "auto", wait=False)
    deadline = time.time() + _limit(60, device)
    while not (run / "checkpoints" / "latest_memory").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=_limit(60, device))
    resumed = _train(work, device, run, *steps, "--resume", "auto")
    same = resumed.returncode == 0 and all(torch.equal(a, b) for a, b in zip(_adapter(run).values(),
                                                                            _adapter(work / "straight").values()))
    return {"ok": code == 75 and same, "stop_exit": code, "resume_exit": resumed.returncode, "bitwise_equal": same}


def part_elastic(work: Path, device: str) -> dict:
    """#15: a checkpoint of a GPU run continues on the CPU."""
    steps = ["train.steps=6", "train.save_every=3"]
    first = _train(work, device, work / "moved", "train.steps=3", "train.save_every=3")
    if first.returncode:
        return {"ok": False, "error": first.stderr[-2000:]}
    on_cpu = _train(work, "cpu", work / "moved", *steps, "--resume", "auto")
    straight = _train(work, device, work / "straight_elastic", *steps)
    if on_cpu.returncode or straight.returncode:
        return {"ok": False, "error": (on_cpu.stderr + straight.stderr)[-2000:]}
    diff = max(float((a - b).abs().max()) for a, b in zip(_adapter(work / "moved").values(),
                                                           _adapter(work / "straight_elastic").values()))
    return {"ok": diff <= 1e-4, "adapter_max_abs_diff_cpu_vs_gpu": diff}


def part_bench(work: Path, device: str) -> dict:
    out = work / "bench_eval.json"
    small = ["--n", "12", "--wiki-articles", "3", "--repeats", "1"] if device == "cpu" else ["--n", "128", "--repeats", "2"]
    done = _run([sys.executable, str(REPO / "tools" / "bench_eval.py"), *small, "--device", device, "--out", str(out)],
                device, 120)
    if not out.is_file():
        return {"ok": False, "error": done.stderr[-1500:]}
    tasks = json.loads(out.read_text())["tasks"]
    return {"ok": done.returncode == 0 and all(t["identical"] for t in tasks.values()),
            **{f"{name}_speedup": t.get("speedup") for name, t in tasks.items()}}


def part_smf(work: Path, device: str) -> dict:
    """#20: what an SMF step costs at Qwen's shape on the GPU, in bf16 (dry run: one tiny step of SMF and LoRA)."""
    out = work / "smf_overhead.json"
    what = ["--quick", "--methods", "smf,lora", "--tables", "none"] if device == "cpu" else ["--device", "cuda", "--steps", "3"]
    done = _run([sys.executable, str(REPO / "tools" / "bench_smf_overhead.py"), *what, "--out", str(out)], device,
                BUDGET["smf"] - 10)
    if done.returncode or not out.is_file():
        return {"ok": False, "error": (done.stdout + done.stderr)[-1500:]}
    result = json.loads(out.read_text())
    runs = {f"{r['method']}@{r['slots_per_layer'] or '-'}": {k: round(r[k], 3) for k in
                                                              ("step_s", "tokens_per_s", "memory_share")}
            for r in result["runs"]}
    shares = {f"smf_memory_share@{r['slots_per_layer']}": round(r["memory_share"], 3) for r in result["runs"]
              if r["method"] == "smf"}
    ratio = result["ratios"].get("smf_tokens_per_s_over_lora")
    return {"ok": ratio is not None, "smf_tokens_per_s_over_lora": ratio,
            "goal_smf_at_least_0.9x_lora": None if ratio is None else ratio >= 0.9, **shares, "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU, tiny: checks the script")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # one part, in a child process with its own time budget
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if args.part:
        result = globals()[f"part_{args.part}"](work, device)
        print(json.dumps(result, default=str))
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device here; --dry-run runs every part on the CPU")
    results = {}
    deadline = time.time() + (sum(_limit(b, device) for b in BUDGET.values()) if args.dry_run else TOTAL_BUDGET)
    for part in args.parts.split(","):
        start = time.time()
        budget = min(int(_limit(BUDGET[part], device)), int(deadline - start))
        if budget < 10:
            results[part] = {"ok": False, "error": f"not run: {TOTAL_BUDGET} s in all were spent", "seconds": 0.0}
            print(f"{part}: FAILED (not run, no time left)", flush=True)
            continue
        child = [sys.executable, __file__, str(args.out), "--part", part] + (["--dry-run"] if args.dry_run else [])
        # Its own session, so that a part out of budget is stopped with the launchers and ranks it started.
        proc = subprocess.Popen(child, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(device),
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=budget)
            lines = stdout.strip().splitlines()
            results[part] = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
                {"ok": False, "error": stderr[-2000:]}
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            results[part] = {"ok": False, "error": f"out of its {budget} s budget"}
        results[part]["seconds"] = round(time.time() - start, 1)
        print(f"{part}: {'ok' if results[part].get('ok', True) else 'FAILED'} ({results[part]['seconds']} s)", flush=True)
    summary = {"device": device, "dry_run": args.dry_run, "parts": results}
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"# GPU check ({'dry run, CPU' if args.dry_run else 'CUDA'})", "", "| part | ok | seconds | figures |",
             "|---|---|---:|---|"]
    for part, r in results.items():
        figures = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("ok", "seconds", "error", "lm_eval_tail")
                            and not isinstance(v, (dict, list)))
        lines.append(f"| {part} | {r.get('ok', True)} | {r['seconds']} | {figures or r.get('error', '')[:200]} |")
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print((args.out / "gpu_check.md").read_text())
    return 0 if all(r.get("ok", True) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
