"""`smf-ds export`: a base model and a memory adapter as one merged model directory that any Hugging
Face loader loads correctly (trust_remote_code) or refuses, with a model card for the hub.

    smf-ds export --model BASE --memory-adapter RUN/memory_adapter --out MERGED [--eval DIR]
    smf-ds export --model OLD_MERGED --out MERGED      # rewrite a merged dir of the first format

The card (README.md) says the base model, the memory's settings and, when the adapter sits in a
run directory, how it was trained (the run's config.yaml) and its evaluation (eval/summary.json,
or --eval DIR).
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .config import InputError
from .memory.merged import save_merged

CARD_TRAINING_KEYS = ("train.method", "train.scope", "train.steps", "train.micro_batch_size", "train.grad_accum",
                      "train.lr", "memory.value_lr", "sparse.scoring", "sparse.top_t", "sparse.optimizer",
                      "data.train", "data.background", "retrofit.steps", "retrofit.data")


class ExportError(InputError):
    """A wrong export flag; the message names it."""


def _run_config(adapter: Path | None) -> dict | None:
    run_config = adapter.parent / "config.yaml" if adapter else None
    if run_config is None or not run_config.is_file():
        return None
    try:
        return yaml.safe_load(run_config.read_text())
    except yaml.YAMLError:
        return None


def _eval_summary(eval_dir: str | None, adapter: Path | None) -> dict | None:
    candidates = [Path(eval_dir)] if eval_dir else ([adapter.parent / "eval"] if adapter else [])
    for d in candidates:
        file = d / "summary.json" if d.is_dir() else d
        if file.is_file():
            return json.loads(file.read_text())
        if eval_dir:
            raise ExportError(f"--eval {eval_dir}: no summary.json there (expected an `smf-ds eval --out` dir)")
    return None


def _dotted(tree: dict, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def model_card(base: str, memory: dict, run: dict | None, summary: dict | None, name: str) -> str:
    """README.md of a merged model: hub metadata, how to load it, its memory, training and results."""
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["smf", "sparse-memory-finetuning", "product-key-memory", "custom_code"]}
    if not Path(base).expanduser().exists():  # a hub id the hub can link
        front["base_model"] = base
    slots = memory["n_keys"] ** 2
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"`{base}` with product-key memory layers, finetuned by Sparse Memory Finetuning (SMF) with "
             "smf-ds: only the memory value rows that the training batches read most "
             "specifically were updated.", "",
             "## Load", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
             f'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)', "```", "",
             "The memory layers are defined by `modeling_smf.py`, `configuration_smf.py` and `product_keys.py` "
             "in this repository (torch and transformers only). Without `trust_remote_code=True` transformers "
             "refuses the model rather than loading the base model without its memory. lm-evaluation-harness: "
             f"`lm_eval --model hf --model_args pretrained={name},trust_remote_code=True --tasks ...`.", "",
             "## Memory", "",
             "| setting | value |", "|---|---|",
             f"| decoder layers | {memory['layers']} |",
             f"| slots per layer | {slots:,} ({memory['n_keys']} x {memory['n_keys']} product keys) |",
             f"| heads x knn | {memory['heads']} x {memory['knn']} |",
             f"| key dim / value dim | {memory['k_dim']} / {memory['v_dim']} |",
             f"| mode | {memory['mode']}{', SiLU-gated' if memory['gated'] else ''} |", ""]
    if run:
        lines += ["## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{key}` | {_dotted(run, key)} |" for key in CARD_TRAINING_KEYS if _dotted(run, key) is not None]
        lines.append("")
    if summary and summary.get("tasks"):
        lines += ["## Evaluation (smf-ds eval)", "", "| task | metric | n | value | 95% CI |", "|---|---|---:|---:|---|"]
        for task, result in summary["tasks"].items():
            for metric, m in result.get("metrics", {}).items():
                lo, hi = m.get("ci95") or (None, None)
                ci = f"[{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else "-"
                value = "-" if m.get("value") is None else f"{m['value']:.4g}"
                lines.append(f"| {task} | {metric} | {m.get('n', '-')} | {value} | {ci} |")
        lines += ["", "WikiText perplexity here is smf-ds's strided token perplexity, not lm-eval's word "
                      "perplexity."]
    return "\n".join(lines) + "\n"


def export_main(model: str, memory_adapter: str | None, out: str, dtype: str = "float32",
                eval_dir: str | None = None, overwrite: bool = False) -> Path:
    """Load BASE (+ adapter) as `smf-ds eval` does, and write it as a merged directory at `out`."""
    from .eval.cli import load_model_and_tokenizer
    from .memory.merged import merged_format

    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out_path.is_dir() and any(out_path.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: not empty; pass --overwrite to replace it")
    if not memory_adapter and not merged_format(model):
        raise ExportError(f"--model {model}: a model without memory; give its --memory-adapter DIR "
                          f"(or a merged model directory to rewrite)")
    loaded, tokenizer = load_model_and_tokenizer(model, memory_adapter, dtype, "cpu")
    adapter = Path(memory_adapter).expanduser() if memory_adapter else None
    run = _run_config(adapter)
    base = (_dotted(run, "model.name_or_path") if run else None) or model
    memory = {**loaded.smf_memory_config.__dict__, "v_dim": loaded.smf_memory_config.v_dim or loaded.config.hidden_size}
    card = model_card(base, memory, run, _eval_summary(eval_dir, adapter), out_path.name)
    return save_merged(loaded, out_path, tokenizer=tokenizer, model_card=card)

