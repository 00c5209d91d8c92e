"""The main job on the embedded default: a synthetic world, a tiny pretrained base model, and
SMF against LoRA and full finetuning on the world's medical task, with forgetting probes.

Steps (each rank runs the same code; results in <out>/demo_summary.json):
1. write the synthetic world (hub-schema files) and train a tokenizer on it;
2. pretrain a tiny Qwen2 on the world's general text (full finetuning through the same Trainer);
3. SMF: inject memory, compute background stats on the OASST-schema general text, finetune the
   value rows on the task; LoRA and full finetuning train on the same task data;
4. evaluate base and each method on the task (MedMCQA schema) and the probes (WikiText
   perplexity, TriviaQA accuracy).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import load_config
from ..data.synthetic_world import build_world
from ..data.tiny import build_tiny_model, build_tiny_tokenizer
from ..parallel.process_group import barrier, get_rank, init_process_group
from ..train.batches import tokenize_text
from ..train.loop import Trainer

log = logging.getLogger(__name__)

BASE_STEPS = {"quick": 60, "full": 400}
TASK_STEPS = {"quick": 10, "full": 60}


def _read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def pretrain_base(world: dict[str, Path], out: Path, steps: int):
    """Tokenizer + tiny Qwen2 that has learned the world's general text; saved to `out`."""
    texts = _read_texts(world["general"])
    if (out / "config.json").is_file():
        return out
    tokenizer = build_tiny_tokenizer(texts + _read_texts(world["wikitext"]), vocab_size=768)
    model = build_tiny_model(tokenizer, hidden=64, layers=4, heads=4, kv_heads=2, init_std=0.02)
    cfg = load_config(overrides=[
        "train.method=full", f"train.steps={steps}", "train.micro_batch_size=16", "train.lr=0.003",
        "train.max_length=64", f"out_dir={out}/pretrain_run"])
    examples = [tokenize_text(tokenizer, t + tokenizer.eos_token, 64) for t in texts]
    trainer = Trainer(cfg, model, examples, tokenizer.pad_token_id)
    result = trainer.fit(progress=True)
    log.info("base pretraining: loss %.3f -> %.3f", result.losses[0], result.losses[-1])
    if get_rank() == 0:
        trainer.model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    barrier()
    return out


def demo_overrides(world: dict[str, Path], base: Path, method: str, run_dir: Path, steps: int) -> list[str]:
    common = [f"model.name_or_path={base}", f"data.train={world['medmcqa_train']}",
              f"data.background={world['oasst']}", f"train.method={method}", f"train.steps={steps}",
              "train.micro_batch_size=8", "train.max_length=96", f"out_dir={run_dir}"]
    if method == "smf":
        return common + ["memory.layers=[1,2]", "memory.n_keys=32", "memory.heads=4", "memory.knn=8",
                         "memory.k_dim=32", "memory.scale_init=1.0", "memory.value_lr=50.0",
                         "sparse.scoring=tfidf", "sparse.top_t=128", "data.background_batches=40"]
    if method == "lora":
        return common + ["train.lr=0.003", "train.lora_r=8", "train.lora_alpha=16"]
    return common + ["train.lr=0.001"]


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict:
    from ..train.run import background_main, train_main

    init_process_group()
    mode = "quick" if quick else "full"
    out = Path(out)
    world = build_world(out / "world")
    base = pretrain_base(world, out / "base", BASE_STEPS[mode])
    results = {}
    for method in ("smf", "lora", "full"):
        run_dir = out / method
        overrides = demo_overrides(world, base, method, run_dir, TASK_STEPS[mode])
        if method == "smf":
            cfg = load_config(overrides=overrides)
            bg = background_main(cfg, out=str(run_dir / "background.safetensors"))
            overrides.append(f"sparse.background={bg}")
        results[method] = train_main(load_config(overrides=overrides))
    summary = {"world": {k: str(v) for k, v in world.items()}, "base": str(base), "runs": results}
    if get_rank() == 0:
        (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
