"""Run evaluation tasks: load and check the data, evaluate (sharded over ranks), summarize, write files.

Every rank loads the same data and builds the same batch plan; each runs its share of the
batches and the per-example records are gathered on every rank (smf_ds.eval.batching), so the
metrics every rank computes are those of a single-process run. Rank 0 writes, into `out_dir`:

  <task>.predictions.jsonl   one record per evaluated example (per window for wikitext), in order
  <task>.malformed.jsonl     one line per problem found in the data: row, field, problem
  summary.json               {"tasks": {task: result}, "settings", "world_size", ...}

A task's result: {"task", "source", "n" (examples evaluated), "metric", "value", "ci95",
"metrics" ({name: {"value", "ci95", "n"}}), "n_rows", "n_malformed", "n_filtered",
"n_available", "warnings", "predictions", "malformed_report", "seconds"}. `n` always equals the
number of records written; a run that asked for more examples than the data holds says so in
"warnings". Every task's data is loaded and checked before any is evaluated: a task whose data
has no usable row (every row malformed or left out, e.g. a file in another schema) is a
NoUsableRowsError, after its malformed report is written.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..data import medmcqa as medmcqa_data
from ..data import triviaqa as triviaqa_data
from ..config import ConfigError, InputError
from ..data import wikitext as wikitext_data
from ..data.loading import MissingSplitError, load_rows, take
from ..data.medmcqa import MedMCQAPrompt
from ..data.validation import ValidationReport
from ..files import write_jsonl, write_text
from ..parallel.process_group import barrier
from .batching import resolve_shard
from ..tokens import encode_starts
from .medmcqa import KIND, MODES, check_modes, evaluate_medmcqa, summarize_medmcqa, tokenize_medmcqa
from .scoring import check_model_finite
from .triviaqa import evaluate_triviaqa, summarize_triviaqa
from .wikitext import evaluate_perplexity, summarize_perplexity, tokenize_text

log = logging.getLogger(__name__)

TASKS = ("medmcqa", "wikitext", "triviaqa")


@dataclass
class EvalSettings:
    # data sources (hub id or local path) in the datasets' own schemas
    medmcqa: str = medmcqa_data.HUB_ID
    medmcqa_split: str = medmcqa_data.DEFAULT_SPLIT
    triviaqa: str = triviaqa_data.HUB_ID
    triviaqa_config: str | None = triviaqa_data.HUB_CONFIG
    triviaqa_split: str = triviaqa_data.DEFAULT_SPLIT
    wikitext: str = wikitext_data.HUB_ID
    wikitext_config: str | None = wikitext_data.HUB_CONFIG
    wikitext_split: str = wikitext_data.DEFAULT_SPLIT
    # which examples: per task, None = all (wikitext counts articles)
    limit: dict[str, int | None] = field(default_factory=dict)
    sample: dict[str, int | None] = field(default_factory=dict)
    seed: int = 0
    strict: bool = False
    # MedMCQA
    medmcqa_modes: tuple[str, ...] = MODES  # the first is the headline metric
    medmcqa_prompt: MedMCQAPrompt = field(default_factory=MedMCQAPrompt)
    # TriviaQA
    triviaqa_template: str = triviaqa_data.DEFAULT_TEMPLATE
    max_new_tokens: int = 32
    # WikiText
    max_length: int = 1024
    stride: int = 512
    # batching
    batch_size: int = 32  # MedMCQA questions per batch (with all their options)
    gen_batch_size: int = 32  # TriviaQA prompts per generate call
    ppl_batch_size: int = 8  # WikiText windows per forward
    # bootstrap
    n_boot: int = 1000
    boot_seed: int = 0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["medmcqa_modes"] = list(self.medmcqa_modes)
        return out

    def validate(self, prefix: str = "eval") -> None:
        """Per-task limits name tasks: a misspelt one would evaluate the whole dataset, unnoticed."""
        for key in ("limit", "sample"):
            for task, n in getattr(self, key).items():
                if task not in TASKS:
                    raise ConfigError(f"{prefix}.{key}.{task}: unknown task; expected one of {list(TASKS)}")
                if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                    raise ConfigError(f"{prefix}.{key}.{task}: expected a positive integer or null, got {n!r}")


class NoUsableRowsError(InputError):
    """A task's data has no row that can be evaluated; the message names task, source and counts."""


def check_tasks(tasks: Sequence[str]) -> list[str]:
    tasks = [t.strip() for t in tasks if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"--tasks: expected a comma-separated subset of {','.join(TASKS)}, got {','.join(tasks) or '(none)'}")
    return list(dict.fromkeys(tasks))


def _data_fields(report: ValidationReport, n_available: int, n: int, limit, sample, unit: str = "examples") -> dict:
    """`unit`: what --limit and --sample count (WikiText: articles, while its `n` counts windows)."""
    warnings = []
    asked = min(x for x in (limit, sample) if x is not None) if (limit is not None or sample is not None) else None
    if asked is not None and asked > n:
        warnings.append(f"asked for {asked} {unit}, but only {n_available} well-formed {unit} are available; "
                        f"evaluated {n}")
    if report.n_malformed:
        warnings.append(f"{report.n_malformed} malformed rows skipped (listed in the malformed report: "
                        f"<task>.malformed.jsonl, written with --out)")
    return {**report.summary(), "n_available": n_available, "limit": limit, "sample": sample, "warnings": warnings}


def _headline(result: dict, metric: str) -> dict:
    m = result["metrics"][metric]
    result.update(metric=metric, value=m["value"], ci95=m["ci95"])
    return result


def load_task(task: str, s: EvalSettings) -> tuple[list, ValidationReport]:
    """All well-formed examples (WikiText: articles) of `task`'s data, and its malformed-row report."""
    try:
        return _load_task(task, s)
    except MissingSplitError as err:
        raise MissingSplitError(f"{err} (set by --{task}-split, or eval.{task}_split in an experiment "
                                f"config)") from None


def _load_task(task: str, s: EvalSettings) -> tuple[list, ValidationReport]:
    if task == "medmcqa":
        return medmcqa_data.parse_medmcqa(load_rows(s.medmcqa, split=s.medmcqa_split), strict=s.strict)
    if task == "triviaqa":
        rows = load_rows(s.triviaqa, split=s.triviaqa_split, config=s.triviaqa_config)
        return triviaqa_data.parse_triviaqa(rows, strict=s.strict)
    rows = load_rows(s.wikitext, split=s.wikitext_split, config=s.wikitext_config)
    return wikitext_data.parse_wikitext(rows, strict=s.strict)


def _usable(task: str, items: list) -> bool:
    if task == "wikitext":  # blank lines alone form an "article" with nothing to score
        return any(line.strip() for doc in items for line in doc.lines)
    return bool(items)


def wikitext_ids(tokenizer, s: EvalSettings, docs: list) -> tuple[list, list[int]]:
    """The articles --limit / --sample choose, and the token ids of their joined text (tokenized
    once, before any task runs, so that too short a text fails first)."""
    chosen = take(docs, s.limit.get("wikitext"), s.sample.get("wikitext"), s.seed)
    return chosen, tokenize_text(tokenizer, wikitext_data.join_docs(chosen))


def eval_files(out: Path) -> list[Path]:
    """The files an evaluation writes into its --out dir."""
    names = ["summary.json"] + [f"{t}.{kind}.jsonl" for t in TASKS for kind in ("predictions", "malformed")]
    return [out / name for name in names]


def prepare_out_dir(out: Path, overwrite: bool, rank: int, world_size: int) -> None:
    """Refuse an --out that is a file, or that holds an earlier evaluation (its files would stand
    beside this one's, telling of another model or other tasks) unless `overwrite`, which removes
    them first. Every rank checks before rank 0 writes anything."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; expected a directory (created if missing)")
    earlier = [p for p in eval_files(out) if p.is_file()]
    if earlier and not overwrite:
        raise InputError(f"--out {out}: holds an earlier evaluation ({', '.join(p.name for p in earlier)}); pass "
                         f"--overwrite to replace it, or choose another --out")
    if world_size > 1:
        barrier()
    if rank == 0:
        for path in earlier:
            path.unlink()
        out.mkdir(parents=True, exist_ok=True)


def _no_usable_rows(task: str, report: ValidationReport, report_path: Path | None) -> NoUsableRowsError:
    msg = (f"{task}: no usable rows in {report.source} ({report.n_rows} rows read, {report.n_malformed} malformed, "
           f"{report.n_filtered} left out" + (f": {report.filtered_reason}" if report.n_filtered else "") + ")")
    if report.issues:
        msg += f"; is it in the {task} hub schema? First problem: {report.issues[0]}; "
        msg += (f"all problems in {report_path}" if report_path is not None
                else f"--out DIR writes all problems to DIR/{task}.malformed.jsonl")
    elif report.n_rows > report.n_filtered:  # well-formed rows that hold nothing (WikiText: blank lines only)
        msg += "; every row is blank"
    return NoUsableRowsError(msg)


def past_positions(model, lengths: Sequence[int], task: str, what: str) -> list[str]:
    """A warning (logged, and returned for the summary) when some inputs are longer than the model's
    max_position_embeddings: they are scored at positions the model was never trained on."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    n = sum(length > positions for length in lengths) if positions else 0
    if not n:
        return []
    message = (f"{n} of {len(lengths)} {what} are longer than the model's max_position_embeddings ({positions}): "
               f"scored at positions it was not trained on")
    log.warning("%s: %s", task, message)
    return [message]


def run_medmcqa(model, tokenizer, s: EvalSettings, all_examples: list, report: ValidationReport, rank, world_size,
                progress) -> tuple[list[dict], dict]:
    modes = check_modes(s.medmcqa_modes)
    limit, sample = s.limit.get("medmcqa"), s.sample.get("medmcqa")
    examples = take(all_examples, limit, sample, s.seed)
    records = evaluate_medmcqa(model, tokenizer, examples, s.medmcqa_prompt, modes, s.batch_size, rank, world_size,
                               progress)
    result = {"task": "medmcqa", "n": len(records), "metrics": summarize_medmcqa(records, modes, s.n_boot, s.boot_seed),
              "modes": list(modes), **_data_fields(report, len(all_examples), len(records), limit, sample)}
    contexts, conts = tokenize_medmcqa(tokenizer, examples, s.medmcqa_prompt, list(dict.fromkeys(KIND[m] for m in modes)))
    lengths = [len(c) + max(len(x) for kind in conts for x in conts[kind][i]) for i, c in enumerate(contexts)]
    result["warnings"] += past_positions(model, lengths, "medmcqa", "prompts with their longest answer")
    return records, _headline(result, f"accuracy_{modes[0]}")


def run_triviaqa(model, tokenizer, s: EvalSettings, all_examples: list, report: ValidationReport, rank, world_size,
                 progress) -> tuple[list[dict], dict]:
    limit, sample = s.limit.get("triviaqa"), s.sample.get("triviaqa")
    examples = take(all_examples, limit, sample, s.seed)
    records = evaluate_triviaqa(model, tokenizer, examples, s.triviaqa_template, s.max_new_tokens, s.gen_batch_size,
                                rank, world_size, progress)
    result = {"task": "triviaqa", "n": len(records), "metrics": summarize_triviaqa(records, s.n_boot, s.boot_seed),
              **_data_fields(report, len(all_examples), len(records), limit, sample)}
    prompts = encode_starts(tokenizer, [ex.prompt(s.triviaqa_template) for ex in examples])
    result["warnings"] += past_positions(model, [len(p) + s.max_new_tokens for p in prompts], "triviaqa",
                                         f"prompts with --max-new-tokens {s.max_new_tokens}")
    return records, _headline(result, "contains")


def run_wikitext(model, tokenizer, s: EvalSettings, all_docs: list, report: ValidationReport, rank, world_size,
                 progress, ids: list[int] | None = None) -> tuple[list[dict], dict]:
    """`ids`: wikitext_ids' tokens when the caller has them."""
    limit, sample = s.limit.get("wikitext"), s.sample.get("wikitext")
    if ids is None:
        docs, ids = wikitext_ids(tokenizer, s, all_docs)
    else:
        docs = take(all_docs, limit, sample, s.seed)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions and s.max_length > positions:
        log.warning("wikitext: --max-length %d is more than the model's max_position_embeddings (%d): windows "
                    "reach positions it was not trained on", s.max_length, positions)
    records = evaluate_perplexity(model, tokenizer, ids=ids, max_length=s.max_length, stride=s.stride,
                                  batch_size=s.ppl_batch_size, rank=rank, world_size=world_size, progress=progress)
    metrics = summarize_perplexity(records, s.n_boot, s.boot_seed)
    n_tokens = metrics.pop("n_tokens_scored")
    result = {"task": "wikitext", "n": len(records), "unit": "window", "n_docs": len(docs),
              "n_lines": sum(len(d.lines) for d in docs), "n_tokens_scored": n_tokens,
              "max_length": s.max_length, "stride": s.stride, "metrics": metrics,
              **_data_fields(report, len(all_docs), len(docs), limit, sample, unit="articles")}
    return records, _headline(result, "perplexity")


RUNNERS: dict[str, Callable] = {"medmcqa": run_medmcqa, "wikitext": run_wikitext, "triviaqa": run_triviaqa}


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_tasks(model, tokenizer, tasks: Sequence[str], settings: EvalSettings | None = None,
              out_dir: str | Path | None = None, progress: bool = False, rank: int | None = None,
              world_size: int | None = None, echo: Callable[[str], None] | None = _stderr,
              meta: dict | None = None, overwrite: bool = False) -> dict:
    """Evaluate `tasks` and return the summary (identical on every rank; rank 0 writes the files).

    `rank` / `world_size` default to the process group; world_size=1 evaluates everything in
    this process without any collective. `meta` (e.g. the model id) is added to the summary.
    An `out_dir` holding an earlier evaluation is refused unless `overwrite` (prepare_out_dir).
    """
    settings = settings or EvalSettings()
    tasks = check_tasks(tasks)
    rank, world_size = resolve_shard(rank, world_size)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        prepare_out_dir(out, overwrite, rank, world_size)
    check_model_finite(model, tokenizer)
    # Load and check every task's data first: a wrong file fails in seconds, not after the other tasks ran.
    loaded = {}
    for task in tasks:
        start = time.perf_counter()
        items, report = load_task(task, settings)
        if not _usable(task, items):
            report_path = out / f"{task}.malformed.jsonl" if out is not None else None
            if rank == 0 and report_path is not None:
                report.write_jsonl(report_path)
            if rank == 0 and echo is not None:
                echo(report.format(all_listed_in=f"{task}.malformed.jsonl, written with --out"))
            raise _no_usable_rows(task, report, report_path)
        extra = {}
        if task == "wikitext":
            chosen, extra["ids"] = wikitext_ids(tokenizer, settings, items)
            if len(extra["ids"]) < 2:
                raise NoUsableRowsError(f"wikitext: {len(chosen)} document(s) from {report.source} hold fewer than 2 "
                                        f"tokens; a perplexity window scores tokens after the first")
        loaded[task] = (items, report, time.perf_counter() - start, extra)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks:
            items, report, load_seconds, extra = loaded[task]
            start = time.perf_counter()
            records, result = RUNNERS[task](model, tokenizer, settings, items, report, rank, world_size, progress,
                                            **extra)
            if len(records) != result["n"]:
                raise RuntimeError(f"{task}: {len(records)} records but n = {result['n']}")
            result["source"] = report.source
            result["seconds"] = round(load_seconds + time.perf_counter() - start, 3)
            if rank == 0 and echo is not None and (report.n_malformed or report.n_filtered or result["warnings"]):
                echo(report.format(all_listed_in=f"{task}.malformed.jsonl, written with --out"))
                for w in result["warnings"]:
                    echo(f"{task}: warning: {w}")
            if out is not None:
                result["predictions"] = str(out / f"{task}.predictions.jsonl")
                result["malformed_report"] = str(out / f"{task}.malformed.jsonl")
                if rank == 0:
                    write_jsonl(out / f"{task}.predictions.jsonl", records, "--out")
                    write_jsonl(out / f"{task}.malformed.jsonl", report.issue_records(), "--out")
            results[task] = result
    finally:
        model.train(was_training)
    summary = {**(meta or {}), "tasks": results, "world_size": world_size, "settings": settings.to_dict()}
    if out is not None and rank == 0:
        write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False), "--out")
    if rank == 0 and echo is not None:
        echo(format_summary(summary))
    return summary


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def format_summary(summary: dict) -> str:
    width = max([len("metric"), *(len(name) for r in summary["tasks"].values() for name in r["metrics"])])
    lines = [f"{'task':<10} {'n':>7} {'metric':<{width}} {'value':>9}  95% CI"]
    for task, r in summary["tasks"].items():
        for name, m in r["metrics"].items():
            lo, hi = m["ci95"]
            lines.append(f"{task:<10} {m['n']:>7} {name:<{width}} {_fmt(m['value']):>9}  [{_fmt(lo)}, {_fmt(hi)}]")
    return "\n".join(lines)

