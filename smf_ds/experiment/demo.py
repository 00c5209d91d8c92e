"""The main job on the embedded default: a synthetic world, a tiny pretrained base model, and
SMF against LoRA and full finetuning on the world's medical task, with forgetting probes.

Steps (each rank runs the same code; results in <out>/demo_summary.json):
1. write the synthetic world (hub-schema files) and train a tokenizer on it;
2. pretrain a tiny Qwen2 on the world's general text (facts, and its trivia as question/answer
   pairs) and its WikiText-schema articles read as the probe reads them (full finetuning through
   the same Trainer), so the base model knows what the probes ask, as a real pretrained model
   has seen Wikipedia;
3. SMF: inject memory at every layer, compute background stats on the OASST-schema general text,
   finetune the value rows on the task; LoRA and full finetuning train on the same task data.
   The loss is on the answer only: the world's explanations restate it (data.train_explanation);
4. evaluate base and each method on the task (MedMCQA schema, the training facts with options
   reshuffled) and the probes (WikiText perplexity, TriviaQA accuracy): <out>/eval/<name>/, and a
   table of each method's task gain and probe drift against the base model.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import load_config
from ..data.synthetic_world import build_world
from ..data.wikitext import join_docs, load_wikitext
from ..data.tiny import build_tiny_model, build_tiny_tokenizer
from ..parallel.process_group import barrier, get_rank, init_process_group
from ..data.medmcqa import MedMCQAPrompt
from ..eval.cli import load_model_and_tokenizer
from ..eval.runner import EvalSettings, run_tasks
from ..train.batches import tokenize_text
from ..train.loop import Trainer

log = logging.getLogger(__name__)

BASE_STEPS = {"quick": 60, "full": 1500}
TASK_STEPS = {"quick": 10, "full": 300}
PRETRAIN_LENGTH = 64


TASKS = ("medmcqa", "wikitext", "triviaqa")
TRIVIA_TEMPLATE = "Question: {question} Answer:"  # the probe's prompt, as the world's general text has it
# The test asks the training facts with the options reshuffled: the answer's likelihood shows
# whether a fact was learned; a letter learned by rote would now point at the wrong option.
# So the answer is written without its letter, in training and evaluation alike.
MEDMCQA_MODES = ("answer", "answer_norm", "letter")
ANSWER_CONTINUATION = " {option}"


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_texts(path: Path) -> list[str]:
    return [row["text"] for row in _read_rows(path)]


def pretrain_base(world: dict[str, Path], out: Path, steps: int):
    """Tokenizer + tiny Qwen2 that has learned the world's general text; saved to `out`."""
    if (out / "config.json").is_file():
        return out
    general = _read_texts(world["general"])
    docs, _ = load_wikitext(str(world["wikitext"]))
    articles = join_docs(docs)
    tokenizer = build_tiny_tokenizer(general + [articles], vocab_size=768)
    model = build_tiny_model(tokenizer, hidden=64, layers=4, heads=4, kv_heads=2, init_std=0.02)
    cfg = load_config(overrides=[
        "train.method=full", f"train.steps={steps}", "train.micro_batch_size=16", "train.lr=0.003",
        f"train.max_length={PRETRAIN_LENGTH}", f"out_dir={out}/pretrain_run"])
    examples = [tokenize_text(tokenizer, t + tokenizer.eos_token, PRETRAIN_LENGTH) for t in general]
    # The articles as the WikiText probe reads them (one text, lines joined), in overlapping
    # windows: a base that has read its Wikipedia, so a rise in perplexity is forgetting.
    ids = tokenizer(articles, add_special_tokens=False)["input_ids"]
    half = PRETRAIN_LENGTH // 2
    examples += [{"input_ids": ids[i:i + PRETRAIN_LENGTH], "labels": ids[i:i + PRETRAIN_LENGTH]}
                 for i in range(0, max(len(ids) - half, 1), half)]
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
              "train.micro_batch_size=8", "train.max_length=96", "data.train_explanation=false",
              f"out_dir={run_dir}"]
    if method == "smf":
        return common + ["memory.layers=[0,1,2,3]", "memory.n_keys=64", "memory.heads=4", "memory.knn=8",
                         "memory.k_dim=32", "memory.scale_init=1.0", "memory.value_lr=1000.0",
                         "sparse.scoring=tfidf", "sparse.top_t=512", "data.background_batches=40"]
    if method == "lora":
        return common + ["train.lr=0.003", "train.lora_r=8", "train.lora_alpha=16"]
    return common + ["train.lr=0.001"]


def eval_settings(world: dict[str, Path]) -> EvalSettings:
    return EvalSettings(medmcqa=str(world["medmcqa_test"]), triviaqa=str(world["triviaqa"]),
                        wikitext=str(world["wikitext"]), triviaqa_template=TRIVIA_TEMPLATE, medmcqa_modes=MEDMCQA_MODES,
                        medmcqa_prompt=MedMCQAPrompt(answer_continuation=ANSWER_CONTINUATION),
                        max_new_tokens=8, max_length=64, stride=32, n_boot=200)


def compare(evals: dict[str, dict]) -> dict[str, dict]:
    """Headline metric of each task per model, and each method's change against the base."""
    table = {}
    for name, summary in evals.items():
        row = {task: summary["tasks"][task]["value"] for task in TASKS}
        if name != "base":
            row.update({f"{task}_delta": row[task] - table["base"][task] for task in TASKS})
        table[name] = row
    return table


def format_comparison(table: dict[str, dict]) -> str:
    lines = [f"{'model':<6} {'medmcqa acc (' + MEDMCQA_MODES[0] + ')':>20} {'wikitext ppl':>16} {'triviaqa acc':>15}"]
    for name, row in table.items():
        cells = []
        for task, fmt in (("medmcqa", "{:.3f}"), ("wikitext", "{:.3f}"), ("triviaqa", "{:.3f}")):
            cell = fmt.format(row[task])
            if f"{task}_delta" in row:
                cell += " (" + ("+" if row[f"{task}_delta"] >= 0 else "") + fmt.format(row[f"{task}_delta"]) + ")"
            cells.append(cell)
        lines.append(f"{name:<6} {cells[0]:>20} {cells[1]:>16} {cells[2]:>15}")
    return "\n".join(lines)


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
        cfg = load_config(overrides=overrides)
        cfg.data.answer_continuation = ANSWER_CONTINUATION  # a leading space: set here, not as key=value
        results[method] = train_main(cfg)
    settings = eval_settings(world)
    evals = {}
    for name in ("base", "smf", "lora", "full"):
        artifact = base if name == "base" else Path(results[name]["artifact"])
        # eval's loader: a model dir, a LoRA adapter dir (peft through transformers), or the base
        # plus a memory adapter
        model, tokenizer = (load_model_and_tokenizer(str(base), memory_adapter=str(artifact)) if name == "smf"
                            else load_model_and_tokenizer(str(artifact)))
        evals[name] = run_tasks(model, tokenizer, TASKS, settings, out / "eval" / name, echo=None,
                                meta={"model": name, "artifact": str(artifact)})
    table = compare(evals)
    summary = {"world": {k: str(v) for k, v in world.items()}, "base": str(base), "runs": results,
               "evaluation": table, "eval_dirs": {name: str(out / "eval" / name) for name in evals}}
    if get_rank() == 0:
        (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("demo results (change against the base model in brackets):\n%s", format_comparison(table))
    return summary
