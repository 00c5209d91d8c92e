"""`smf-ds export`: a base model and a memory adapter as one merged model directory that any Hugging Face
loader loads correctly (trust_remote_code) or refuses, with a model card for the hub.

    smf-ds export --model BASE --memory-adapter RUN/memory_adapter --out MERGED [--eval DIR]
    smf-ds export --model OLD_MERGED --out MERGED      # rewrite a merged dir of the first format

The card (README.md) names the weights merged (--model), the memory's settings and, when the
adapter sits in a run directory, how it was trained (the run's config.yaml) and its evaluation
(the run's eval/summary.json, or --eval DIR) with the settings that evaluation used.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .config import InputError

SPARSE_KEYS = ("train.method", "train.scope", "train.steps", "train.micro_batch_size", "train.grad_accum",
               "train.lr", "memory.value_lr", "sparse.scoring", "sparse.top_t", "sparse.optimizer", "data.train",
               "data.background")
RETROFIT_KEYS = ("retrofit.steps", "retrofit.lr", "retrofit.value_lr", "retrofit.value_optimizer",
                 "retrofit.scope", "retrofit.data", "data.background")
EVAL_SETTINGS = ("medmcqa_split", "medmcqa_modes", "medmcqa_prompt", "triviaqa_template", "max_new_tokens",
                 "max_length", "stride")


class ExportError(InputError):
    """A wrong export flag; the message names it."""


def _dotted(tree: dict, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _run_record(adapter: Path | None) -> tuple[dict | None, str | None]:
    """(the run's config.yaml, 'retrofit' or 'train') of the run dir an adapter was saved into."""
    run_dir = adapter.parent if adapter else None
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None, None
    try:
        run = yaml.safe_load((run_dir / "config.yaml").read_text())
    except yaml.YAMLError:
        return None, None
    kind = "retrofit" if (run_dir / "retrofit_summary.json").is_file() else "train"
    return (run if isinstance(run, dict) else None), kind


def _read_summary(file: Path, flag: str) -> dict:
    try:
        summary = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{flag}: {file}: not an evaluation summary ({type(err).__name__}: {err})") from None
    tasks = summary.get("tasks") if isinstance(summary, dict) else None
    if not isinstance(tasks, dict) or not all(isinstance(r, dict) and isinstance(r.get("metrics"), dict)
                                              and all(isinstance(m, dict) for m in r["metrics"].values())
                                              for r in tasks.values()):
        raise ExportError(f"{flag}: {file}: not an evaluation summary (expected the summary.json of "
                          f"`smf-ds eval --out DIR`: tasks -> metrics -> value, ci95, n)")
    return summary


def _eval_summary(eval_dir: str | None, adapter: Path | None) -> dict | None:
    """The evaluation to put in the card: --eval DIR (checked to be this adapter's, when it says),
    or the adapter's run dir's eval/summary.json."""
    if eval_dir:
        path = Path(eval_dir)
        file = path / "summary.json" if path.is_dir() else path
        if not file.is_file():
            raise ExportError(f"--eval {eval_dir}: no summary.json there (expected an `smf-ds eval --out` dir)")
        summary = _read_summary(file, f"--eval {eval_dir}")
        evaluated = summary.get("memory_adapter") or summary.get("artifact")
        if evaluated and adapter and Path(evaluated).resolve() != adapter.resolve():
            raise ExportError(f"--eval {eval_dir}: evaluates {evaluated}, not --memory-adapter {adapter}; give the "
                              f"evaluation of this adapter")
        return summary
    file = adapter.parent / "eval" / "summary.json" if adapter else None
    return _read_summary(file, str(file)) if file is not None and file.is_file() else None


def _eval_settings(summary: dict) -> list[str]:
    settings = summary.get("settings") or {}
    return [f"`{key}`={json.dumps(settings[key])}" for key in EVAL_SETTINGS if key in settings]


def model_card(base: str, memory: dict, run: dict | None, kind: str | None, summary: dict | None,
               name: str) -> str:
    """README.md of a merged model: hub metadata, how to load it, its memory, training and results."""
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["smf", "sparse-memory-finetuning", "product-key-memory", "custom_code"]}
    if not Path(base).expanduser().exists():  # a hub id the hub can link
        front["base_model"] = base
    if kind == "retrofit":
        how = ("Its memory was retrofitted (a dense warm-up of every memory parameter and value row on general "
               "text, the base frozen) by smf-ds.")
    elif run is not None and _dotted(run, "train.method") == "smf":
        how = (f"Finetuned by Sparse Memory Finetuning (SMF) with smf-ds: each step updated the "
               f"{_dotted(run, 'sparse.top_t')} value rows per layer that the batch read most specifically "
               f"(scoring rule `{_dotted(run, 'sparse.scoring')}`), nothing else of the base.")
    else:
        how = "Its memory was trained by smf-ds."
    slots = memory["n_keys"] ** 2
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"`{base}` with product-key memory layers. {how}", "",
             "## Load", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'model = AutoModelForCausalLM.from_pretrained("<this repo>", trust_remote_code=True)',
             'tokenizer = AutoTokenizer.from_pretrained("<this repo>", trust_remote_code=True)', "```", "",
             "The memory layers are defined by `modeling_smf.py`, `configuration_smf.py` and `product_keys.py` "
             "in this repository (torch and transformers only). Without `trust_remote_code=True` transformers "
             "refuses the model rather than loading the base model without its memory. lm-evaluation-harness: "
             "`lm_eval --model hf --model_args pretrained=<this repo>,trust_remote_code=True --tasks ...`.", "",
             "## Memory", "",
             "| setting | value |", "|---|---|",
             f"| decoder layers | {memory['layers']} |",
             f"| slots per layer | {slots:,} ({memory['n_keys']} x {memory['n_keys']} product keys) |",
             f"| heads x knn | {memory['heads']} x {memory['knn']} |",
             f"| key dim / value dim | {memory['k_dim']} / {memory['v_dim']} |",
             f"| mode | {memory['mode']}{', SiLU-gated' if memory['gated'] else ''} |", ""]
    if run:
        keys = ["model.name_or_path", *(RETROFIT_KEYS if kind == "retrofit" else SPARSE_KEYS)]
        lines += ["## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{key}` | {_dotted(run, key)} |" for key in keys if _dotted(run, key) not in (None, "")]
        lines.append("")
    if summary:
        lines += ["## Evaluation (smf-ds eval)", "", "| task | metric | n | value | 95% CI |", "|---|---|---:|---:|---|"]
        for task, result in summary["tasks"].items():
            for metric, m in result["metrics"].items():
                lo, hi = m.get("ci95") or (None, None)
                ci = f"[{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else "-"
                value = "-" if m.get("value") is None else f"{m['value']:.4g}"
                lines.append(f"| {task} | {metric} | {m.get('n', '-')} | {value} | {ci} |")
        settings = _eval_settings(summary)
        lines += ["", "WikiText perplexity here is smf-ds's strided token perplexity, not lm-eval's word "
                      "perplexity." + (f" Evaluated with {', '.join(settings)}." if settings else "")]
    return "\n".join(lines) + "\n"


def _check_out(out: str, overwrite: bool, inputs: list[tuple[str, str]]) -> Path:
    """The directory to write (a symlink's target); refused when it would destroy an input or
    anything but an earlier export."""
    from .memory.merged import merged_format

    out_path = Path(out).expanduser().resolve()
    if out_path.exists() and not out_path.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if not out_path.exists() and any(p.exists() and not p.is_dir() for p in out_path.parents):
        raise ExportError(f"--out {out}: a parent of it is a file")
    for flag, given in inputs:
        source = Path(given).expanduser().resolve()
        if source.exists() and (source == out_path or out_path in source.parents):
            raise ExportError(f"--out {out}: holds {flag} {given}; write the merged model elsewhere")
    if out_path.is_dir() and any(out_path.iterdir()):
        if not overwrite:
            raise ExportError(f"--out {out}: not empty; pass --overwrite to replace an earlier export there")
        if merged_format(out_path) is None:
            raise ExportError(f"--out {out}: not a merged model (no SMF config.json); --overwrite replaces only "
                              f"an earlier export: give an empty or new directory")
    return out_path


def export_main(model: str, memory_adapter: str | None, out: str, dtype: str = "float32",
                eval_dir: str | None = None, overwrite: bool = False) -> Path:
    """Load BASE (+ adapter) as `smf-ds eval` does, and write it as a merged directory at `out`."""
    from .models import load_model_and_tokenizer
    from .memory.adapter import CONFIG_NAME
    from .memory.merged import merged_format, save_merged

    out_path = _check_out(out, overwrite, [("--model", model)] + ([("--memory-adapter", memory_adapter)]
                                                                  if memory_adapter else []))
    if memory_adapter:
        adapter = Path(memory_adapter).expanduser()
        if not (adapter / CONFIG_NAME).is_file():
            hint = f" (its memory adapter: {adapter / 'memory_adapter'})" if (adapter / "memory_adapter" / CONFIG_NAME).is_file() else ""
            raise ExportError(f"--memory-adapter {memory_adapter}: not a memory adapter (no {CONFIG_NAME}){hint}")
        if merged_format(model):
            raise ExportError(f"--model {model}: a merged model already; export it alone (without "
                              f"--memory-adapter) to rewrite it, or give its base model")
    elif not merged_format(model):
        hint = f"; its run's adapter is {Path(model) / 'memory_adapter'}" if (Path(model) / "memory_adapter" / CONFIG_NAME).is_file() else ""
        raise ExportError(f"--model {model}: a model without memory; give its --memory-adapter DIR "
                          f"(or a merged model directory to rewrite){hint}")
    loaded, tokenizer = load_model_and_tokenizer(model, memory_adapter, dtype, "cpu", named_by=f"--model {model}")
    adapter = Path(memory_adapter).expanduser() if memory_adapter else None
    run, kind = _run_record(adapter)
    memory = {**loaded.smf_memory_config.__dict__, "v_dim": loaded.smf_memory_config.v_dim or loaded.config.hidden_size}
    card = model_card(model, memory, run, kind, _eval_summary(eval_dir, adapter), out_path.name)
    save_merged(loaded, out_path, tokenizer=tokenizer, model_card=card)
    return out_path

