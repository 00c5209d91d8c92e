"""`smf-ds eval` / `python -m smf_ds.eval.cli`: batched MedMCQA, WikiText and TriviaQA evaluation.

    smf-ds eval --model PATH_OR_ID [--memory-adapter DIR] --tasks medmcqa,wikitext,triviaqa \\
        [--medmcqa SRC] [--triviaqa SRC] [--wikitext SRC] [--limit N | --limit medmcqa=N,...] \\
        [--sample N --seed S] [--strict] [--out DIR]

One process evaluates everything; under a launcher (torchrun, deepspeed, srun exporting RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) the batches are sharded over all ranks and the results
gathered, identical to one process. Each rank holds the whole model (data parallel).

The top-level CLI wires this in with `add_eval_arguments(parser)` and `run_eval(args)`.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import logging
from pathlib import Path

from ..config import InputError
from ..data import medmcqa as medmcqa_data
from ..data import triviaqa as triviaqa_data
from ..data import wikitext as wikitext_data
from ..data.medmcqa import MedMCQAPrompt
from .medmcqa import MODES, check_modes
from ..models import load_model_and_tokenizer
from .runner import TASKS, EvalSettings, check_tasks, run_tasks

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


class EvalCLIError(InputError):
    """A wrong flag value; the message names the flag."""


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--model", required=True, help="HF hub id or local directory of a causal LM (and its tokenizer)")
    p.add_argument("--memory-adapter", default=None, metavar="DIR",
                   help="load a saved memory adapter (smf_ds.memory.adapter) into the model before evaluating")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write <task>.predictions.jsonl, <task>.malformed.jsonl and summary.json here; "
                        "without --out nothing is written: the metrics are only printed (table on stderr) "
                        "and the per-example predictions are not kept")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier evaluation in --out (default: refuse such a dir)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    g = p.add_argument_group("data (hub id or local .jsonl/.json/.parquet/save_to_disk dir, in the hub schema)")
    g.add_argument("--medmcqa", default=medmcqa_data.HUB_ID, help="the medmcqa data: hub id or local path")
    g.add_argument("--medmcqa-split", default=medmcqa_data.DEFAULT_SPLIT, help="split to evaluate")
    g.add_argument("--triviaqa", default=triviaqa_data.HUB_ID, help="the triviaqa data: hub id or local path")
    g.add_argument("--triviaqa-config", default=triviaqa_data.HUB_CONFIG, help="hub config (hub ids only)")
    g.add_argument("--triviaqa-split", default=triviaqa_data.DEFAULT_SPLIT, help="split to evaluate")
    g.add_argument("--wikitext", default=wikitext_data.HUB_ID, help="the wikitext data: hub id or local path")
    g.add_argument("--wikitext-config", default=wikitext_data.HUB_CONFIG, help="hub config (hub ids only)")
    g.add_argument("--wikitext-split", default=wikitext_data.DEFAULT_SPLIT, help="split to evaluate")
    g.add_argument("--limit", default=None, metavar="N|TASK=N,...",
                   help="evaluate the first N examples of every task (WikiText: articles), or per task")
    g.add_argument("--sample", default=None, metavar="N|TASK=N,...",
                   help="a seeded random subset of N examples (before --limit), for every task or per task")
    g.add_argument("--seed", type=int, default=0, help="seed of --sample")
    g.add_argument("--strict", action="store_true",
                   help="a malformed row is an error naming file, row and field (default: skip and report it)")
    t = p.add_argument_group("tasks")
    t.add_argument("--medmcqa-modes", default=",".join(MODES),
                   help=f"comma-separated subset of {','.join(MODES)}; the first is the headline metric")
    t.add_argument("--medmcqa-template", default=None, metavar="TEXT|FILE",
                   help="prompt template (a file, or text with \\n escapes); placeholders {question} {opa}..{opd}")
    t.add_argument("--answer-continuation", default=None, metavar="TEXT",
                   help="MedMCQA 'answer' modes: the text after the prompt, {letter} {option} "
                        "(default ' {letter}. {option}'; use what training used: data.answer_continuation)")
    t.add_argument("--triviaqa-template", default=triviaqa_data.DEFAULT_TEMPLATE.replace("\n", "\\n"),
                   metavar="TEXT|FILE", help="prompt template with {question}")
    t.add_argument("--max-new-tokens", type=int, default=32, help="TriviaQA: greedy tokens at most")
    t.add_argument("--max-length", type=int, default=1024, help="WikiText: tokens per window")
    t.add_argument("--stride", type=int, default=512, help="WikiText: window stride (<= --max-length; equal to it gives disjoint windows, whose "
                   "first tokens are not scored)")
    b = p.add_argument_group("batching and statistics")
    b.add_argument("--batch-size", type=int, default=32, help="MedMCQA: questions per batch (all their options with them)")
    b.add_argument("--gen-batch-size", type=int, default=32, help="TriviaQA: prompts per generate call")
    b.add_argument("--ppl-batch-size", type=int, default=8, help="WikiText: windows per forward")
    b.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def _per_task(value: str | None, flag: str, tasks: list[str]) -> dict[str, int | None]:
    """'100' -> every task 100; 'medmcqa=100,wikitext=5' -> those tasks."""
    if value is None or value == "":
        return {}
    try:
        if "=" not in value:
            n = int(value)
            out = {t: n for t in TASKS}
        else:
            out = {}
            for part in value.split(","):
                task, n = part.split("=")
                task = task.strip()
                if task not in TASKS:
                    raise EvalCLIError(f"{flag}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
                out[task] = int(n)
    except ValueError as err:
        if isinstance(err, EvalCLIError):
            raise
        raise EvalCLIError(f"{flag}: expected N or TASK=N[,TASK=N...], got {value!r}") from None
    if any(n < 1 for n in out.values()):  # 0 would evaluate nothing and report it as done
        raise EvalCLIError(f"{flag}: expected numbers >= 1, got {value!r}")
    return out


def _template(value: str, flag: str) -> str:
    path = Path(value)
    try:
        if len(value) < 4096 and path.is_file():
            return path.read_text(encoding="utf-8").rstrip("\n")
    except OSError:
        pass
    if "{" not in value:  # no placeholder: a file name, mistyped
        raise EvalCLIError(f"{flag}: {value!r} is neither a file nor a template with placeholders")
    try:
        return codecs.decode(value, "unicode_escape") if "\\" in value else value
    except UnicodeDecodeError as err:
        raise EvalCLIError(f"{flag}: could not decode the escapes in {value!r} ({err})") from None


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    tasks = [t.strip() for t in args.tasks.split(",")]
    try:
        modes = check_modes([m.strip() for m in args.medmcqa_modes.split(",") if m.strip()])
    except ValueError as err:
        raise EvalCLIError(f"--medmcqa-modes: {err}") from None
    prompt_fields = {}
    if args.medmcqa_template:
        prompt_fields["template"] = _template(args.medmcqa_template, "--medmcqa-template")
    if args.answer_continuation is not None:
        prompt_fields["answer_continuation"] = args.answer_continuation
    try:
        prompt = MedMCQAPrompt(**prompt_fields)
    except ValueError as err:
        raise EvalCLIError(f"--medmcqa-template / --answer-continuation: {err}") from None
    try:
        tqa_template = triviaqa_data.check_template(_template(args.triviaqa_template, "--triviaqa-template"))
    except ValueError as err:
        raise EvalCLIError(f"--triviaqa-template: {err}") from None
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--max-length", args.max_length, 2),
                             ("--stride", args.stride, 1), ("--batch-size", args.batch_size, 1),
                             ("--gen-batch-size", args.gen_batch_size, 1), ("--ppl-batch-size", args.ppl_batch_size, 1),
                             ("--n-boot", args.n_boot, 1)):
        if value < low:
            raise EvalCLIError(f"{flag}: expected an integer >= {low}, got {value}")
    if args.stride > args.max_length:
        raise EvalCLIError(f"--stride: expected <= --max-length ({args.max_length}), got {args.stride}")
    return EvalSettings(
        medmcqa=args.medmcqa, medmcqa_split=args.medmcqa_split,
        triviaqa=args.triviaqa, triviaqa_config=args.triviaqa_config or None, triviaqa_split=args.triviaqa_split,
        wikitext=args.wikitext, wikitext_config=args.wikitext_config or None, wikitext_split=args.wikitext_split,
        limit=_per_task(args.limit, "--limit", tasks), sample=_per_task(args.sample, "--sample", tasks),
        seed=args.seed, strict=args.strict, medmcqa_modes=modes, medmcqa_prompt=prompt,
        triviaqa_template=tqa_template, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
        stride=args.stride, batch_size=args.batch_size, gen_batch_size=args.gen_batch_size,
        ppl_batch_size=args.ppl_batch_size, n_boot=args.n_boot)


def run_eval(args: argparse.Namespace) -> dict:
    """Evaluate as `args` say (see add_eval_arguments); returns the summary (on every rank)."""
    from ..parallel.process_group import get_rank, init_from_env

    settings = settings_from_args(args)
    try:
        tasks = check_tasks(args.tasks.split(","))
    except ValueError as err:
        raise EvalCLIError(str(err)) from None
    init_from_env()
    if args.no_progress:  # transformers' own bars too ("Loading weights")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise EvalCLIError(f"--out {args.out}: is a file; expected a directory (created if missing)")
    from ..owner import owning

    # One evaluation writes into --out at a time; an unwritable --out fails before the model loads.
    with owning(args.out, "eval", "--out") if args.out else contextlib.nullcontext():
        model, tokenizer = load_model_and_tokenizer(args.model, args.memory_adapter, args.dtype, args.device)
        return run_tasks(model, tokenizer, tasks, settings, out_dir=args.out,
                         progress=not args.no_progress and get_rank() == 0,
                         meta={"model": args.model, "memory_adapter": args.memory_adapter}, overwrite=args.overwrite)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default (unless its help already says it,
    or it has none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text or action.default is None else super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smf-ds eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_eval(args)
    except InputError as err:
        parser.exit(2, f"smf-ds eval: error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
