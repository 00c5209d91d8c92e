"""The main job on the embedded default: a synthetic world, a tiny pretrained base model, and
SMF against LoRA and full finetuning on the world's medical task, with forgetting probes.

Steps (each rank runs the same code; results in <out>/demo_summary.json):
1. write the synthetic world (hub-schema files) and train a tokenizer on it;
2. pretrain a tiny Qwen2 on the world's general text (facts, and its trivia as question/answer
   pairs) and its seen WikiText-schema articles read as a probe reads them (full finetuning
   through the same Trainer), so the base model knows the facts the probes ask about, as a real
   pretrained model has seen Wikipedia; the probes ask in sentences and questions it never read;
3. SMF (tfidf): inject memory at every layer, compute background stats on the OASST-schema
   general text, finetune the value rows on the task; LoRA and full finetuning train on the
   same task data (smf_ds.experiment.jobs has the settings);
4. evaluate base and each method on the task (MedMCQA schema, the training facts with options
   reshuffled) and the probes (WikiText perplexity on held-out articles, TriviaQA accuracy on
   held-out phrasings; and perplexity on the memorised windows of the seen articles):
   <out>/eval/<name>/, and a table of each method's task gain and probe drift against the base.

One seed, no statistics across runs: `smf-ds experiment` runs the grid (more variants, seeds,
paired intervals, plots, report).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..parallel.process_group import get_rank, init_process_group
from ..eval.runner import TASKS
from .jobs import BASE_STEPS, MEDMCQA_MODES, TASK_STEPS, VARIANTS, evaluate, finetune, prepare_world, pretrain_base
from .outdir import claim

log = logging.getLogger(__name__)

DEMO_METHODS = {"smf": "smf-tfidf", "lora": "lora", "full": "full"}  # table name -> variant


COLUMNS = (*TASKS, "wikitext_memorised")


def compare(evals: dict[str, dict]) -> dict[str, dict]:
    """Headline metric of each task per model (and the memorised windows' perplexity), and each
    method's change against the base."""
    table = {}
    for name, summary in evals.items():
        row = {task: summary["tasks"][task]["value"] for task in TASKS}
        row["wikitext_memorised"] = summary["memorised_wikitext"]["value"]
        if name != "base":
            row.update({f"{column}_delta": row[column] - table["base"][column] for column in COLUMNS})
        table[name] = row
    return table


def format_comparison(table: dict[str, dict]) -> str:
    """The table as aligned text; columns widen to fit (a forgetting run's perplexity can be large)."""
    head = ["model", f"medmcqa acc ({MEDMCQA_MODES[0]})", "wikitext ppl", "triviaqa acc", "memorised ppl"]
    rows = []
    for name, row in table.items():
        cells = [name]
        for column in ("medmcqa", "wikitext", "triviaqa", "wikitext_memorised"):
            cell = f"{row[column]:.3f}"
            if f"{column}_delta" in row:
                cell += f" ({row[f'{column}_delta']:+.3f})"
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [head, *rows])


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict:
    init_process_group()
    mode = "quick" if quick else "full"
    out = Path(out)
    claim(out, {"setup": "demo", "mode": mode, "base_steps": BASE_STEPS[mode], "steps": TASK_STEPS[mode],
                "variants": {name: VARIANTS[v] for name, v in DEMO_METHODS.items()}})
    world = prepare_world(out / "world")
    base = pretrain_base(world, out / "base", BASE_STEPS[mode])
    results = {name: finetune(world, base, VARIANTS[variant], out / name, TASK_STEPS[mode])
               for name, variant in DEMO_METHODS.items()}
    evals = {"base": evaluate(world, base, None, out / "eval" / "base", {"model": "base"})}
    for name in DEMO_METHODS:
        evals[name] = evaluate(world, base, Path(results[name]["artifact"]), out / "eval" / name, {"model": name})
    table = compare(evals)
    summary = {"world": {k: str(v) for k, v in world.items()}, "base": str(base), "runs": results,
               "evaluation": table, "eval_dirs": {name: str(out / "eval" / name) for name in evals}}
    if get_rank() == 0:
        (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("demo results (change against the base model in brackets):\n%s", format_comparison(table))
    return summary
