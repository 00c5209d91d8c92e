"""smf-ds: retrofit | background | train | eval | export | demo | experiment | continual | report."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from .config import InputError, load_config
from .owner import owning
from .parallel.process_group import get_rank, launcher_env
from .parallel.watchdog import PEER_LOST_EXIT_CODE
from .train import stop
from .train.stop import STOPPED_EXIT_CODE, Stopped

log = logging.getLogger("smf_ds.cli")


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (defaults < this file < key=value overrides)")
    p.add_argument("--memory-adapter", help="start from a saved memory adapter directory")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. memory.knn=32")


def _cmd_train(args) -> dict:
    from .parallel.process_group import init_process_group
    from .train.run import train_main

    cfg = load_config(args.config, args.overrides)
    stop.listen(cfg.cluster.stop_signals)  # from here on a stop signal stops the run with a checkpoint
    init_process_group(timeout=cfg.cluster.collective_timeout)
    with owning(cfg.out_dir, "train"):
        return train_main(cfg, args.memory_adapter, resume=args.resume)


def _cmd_retrofit(args) -> dict:
    from .parallel.process_group import init_process_group
    from .train.retrofit import retrofit_main

    cfg = load_config(args.config, args.overrides)
    stop.listen(cfg.cluster.stop_signals)
    init_process_group(timeout=cfg.cluster.collective_timeout)
    with owning(cfg.out_dir, "retrofit"):
        return retrofit_main(cfg, args.memory_adapter, resume=args.resume)


def _cmd_background(args) -> dict:
    from .parallel.process_group import init_process_group
    from .train.background import background_main

    cfg = load_config(args.config, args.overrides)
    init_process_group(timeout=cfg.cluster.collective_timeout)
    out = Path(args.out) if args.out else None
    where = out if out is not None and out.is_dir() else (out.parent if out is not None else Path(cfg.out_dir))
    with owning(where, "background", "--out" if out is not None else "out_dir"):
        return {"background": str(background_main(cfg, args.memory_adapter, args.out))}


def _cmd_eval(args) -> dict:
    from .eval.cli import run_eval

    return run_eval(args)


def _cmd_export(args) -> dict:
    from .export import export_main

    return _written_to(export_main(args.model, args.memory_adapter, args.out, args.dtype, args.eval, args.overwrite))


def _written_to(*paths: Path) -> dict:
    """What a command prints for results it wrote to files (its table is already in the log)."""
    return {"written": [str(p) for p in paths]}


def _cmd_demo(args) -> dict:
    from .experiment.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return _written_to(Path(args.out) / "demo_summary.json")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _cmd_experiment(args) -> dict:
    from .config import ClusterConfig
    from .experiment.grid import run_experiment

    stop.listen(ClusterConfig().stop_signals)  # a run stopped mid-grid is resumed by the next call
    methods = args.methods.split(",") if args.methods else None
    run_experiment(args.out, methods, args.seeds, quick=args.quick, config=args.config, world_seed=args.world_seed,
                   sweep=args.sweep, ablation=args.ablation, bases=args.bases, jobs=args.jobs)
    return _written_to(*(Path(args.out) / name for name in ("results.json", "report.md", "tradeoff.png")))


def _cmd_continual(args) -> dict:
    from .config import ClusterConfig
    from .experiment.continual import run_continual

    stop.listen(ClusterConfig().stop_signals)
    run_continual(args.out, args.tasks, args.methods.split(",") if args.methods else None, args.seeds,
                  quick=args.quick, world_seed=args.world_seed)
    return _written_to(*(Path(args.out) / name for name in ("continual.json", "continual.md", "continual.png")))


def _cmd_report(args) -> dict:
    from .experiment.grid import build_report
    from .experiment.report import results_table

    results = build_report(args.out)
    log.info("experiment results:\n%s", results_table(results))
    return _written_to(*(Path(args.out) / name for name in ("results.json", "report.md", "tradeoff.png")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smf-ds", description="Sparse Memory Finetuning on DeepSpeed")
    # The deepspeed launcher puts --local_rank=N before the command (`-m smf_ds.cli --local_rank=1
    # train ...`); LOCAL_RANK in the environment says the same, and is what smf-ds reads.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, func, what in (("train", _cmd_train, "finetune with SMF, LoRA or full finetuning"),
                             ("retrofit", _cmd_retrofit,
                              "dense warm-up of fresh memory on general text (before background + train)")):
        p = sub.add_parser(name, help=what)
        _add_run_arguments(p)
        p.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in out_dir, or start when it has none (also "
                            "spelled --resume auto: the same command line serves a first run and every requeued one)")
        p.set_defaults(func=func)

    p = sub.add_parser("background", help="background access statistics for the tfidf / kl rules")
    _add_run_arguments(p)
    p.add_argument("--out", help="stats file (default: <out_dir>/background.safetensors)")
    p.set_defaults(func=_cmd_background)

    from .eval.cli import HelpFormatter, add_eval_arguments

    p = sub.add_parser("eval", help="MedMCQA / WikiText / TriviaQA evaluation", formatter_class=HelpFormatter)
    add_eval_arguments(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="base model + memory adapter -> one merged model directory (HF hub ready)")
    p.add_argument("--model", required=True, help="base model: HF hub id or local directory (or a merged dir to rewrite)")
    p.add_argument("--memory-adapter", default=None, metavar="DIR", help="the memory adapter to merge in")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged model directory to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the saved weights (value tables stay float32) (default: %(default)s)")
    p.add_argument("--eval", default=None, metavar="DIR",
                   help="an `smf-ds eval --out` dir whose results go in the model card "
                        "(default: the adapter's run dir's eval/, if any)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="the main job on the embedded synthetic world")
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="output directory: the world, base model, smf/lora/full runs, eval/ and "
                        "demo_summary.json (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    p.set_defaults(func=_cmd_demo)

    from .experiment.jobs import VARIANTS

    p = sub.add_parser("experiment", help="every method x seed (synthetic world, or --config): stats, plot, report")
    p.add_argument("--out", default="runs/experiment", metavar="DIR",
                   help="output directory: runs/<variant>/seed<k>/ (with eval/), results.json, report.md, "
                        "tradeoff.png; called again with the same settings, finished runs are kept "
                        "(default: %(default)s)")
    p.add_argument("--config", help="experiment config (YAML: run, seeds, variants, retrofit, eval) for your own "
                                    "model and data; default: the embedded synthetic world")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated variants (default: all; the world's: {', '.join(VARIANTS)})")
    p.add_argument("--seeds", type=_int_list, default=None, help="comma-separated (default: the config's, or 0,1,2)")
    p.add_argument("--quick", action="store_true", help="fewer steps on the synthetic world (smoke run)")
    p.add_argument("--sweep", action="store_true",
                   help="the synthetic world's default sweep: smf-tfidf's value_lr and lora's and full's lr at "
                        "three values each, for frontiers and matched-gain tables (a config has its own sweep:)")
    p.add_argument("--ablation", action="store_true",
                   help="also the paper code's procedure (smf-paper) and one variant per difference that corrects "
                        "it (smf-paper+<correction>): the report's ablation table (synthetic world)")
    p.add_argument("--resume", action="store_true",
                   help="accepted for symmetry with train (also --resume auto): an experiment always keeps its "
                        "finished runs and resumes those cut short")
    p.add_argument("--world-seed", type=int, default=None,
                   help="which synthetic world (default 0; the world's settings were chosen on world 0)")
    p.add_argument("--bases", choices=("per-seed", "shared"), default=None,
                   help="synthetic world: seed k finetunes a base pretrained with seed k (per-seed, the default: "
                        "intervals and signs then cover the base model's variance) or all seeds one base (shared)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="synthetic world: N runs side by side, each in a worker process with one thread (one per CPU "
                        "core; the same results as one at a time) (default: %(default)s)")
    p.set_defaults(func=_cmd_experiment)

    from .experiment.continual import VARIANTS_DEFAULT

    p = sub.add_parser("continual", help="synthetic world: K tasks learned one after another by each method; "
                                         "forgetting curves")
    p.add_argument("--out", default="runs/continual", metavar="DIR",
                   help="output directory: runs/<variant>/seed<k>/stage<j>/ (with eval/), continual.json, "
                        "continual.md, continual.png (default: %(default)s)")
    p.add_argument("--tasks", type=int, default=4, help="how many tasks the world's diseases are dealt into "
                                                        "(default: %(default)s)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated variants of `experiment` (default: {','.join(VARIANTS_DEFAULT)})")
    p.add_argument("--seeds", type=_int_list, default=None, help="comma-separated (default: 0,1,2)")
    p.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    p.add_argument("--world-seed", type=int, default=0, help="which synthetic world (default 0)")
    p.set_defaults(func=_cmd_continual)

    p = sub.add_parser("report", help="rebuild an experiment's results.json, report.md and plot")
    p.add_argument("--out", default="runs/experiment", help="the experiment's directory (default: runs/experiment)")
    p.set_defaults(func=_cmd_report)
    return parser


def _leave_process_group(all_done: bool) -> None:
    """Leave the process group before the interpreter's teardown. Gloo's worker threads can hold
    work objects whose tensors reference Python; destroyed during finalization they abort a rank
    ("terminate called without an active exception") after its work is done. When every rank
    finished, they meet at a barrier first, so none tears down while a peer still talks to it; their
    watchdogs stop before it (a peer that leaves first is then no news). A rank that leaves
    otherwise (a crash, or an error that its peers may not share) leaves its watchdog's peers to
    notice it gone, and end."""
    import gc

    import torch.distributed as dist

    from .parallel import watchdog
    from .parallel.process_group import destroy_process_group

    if not (dist.is_available() and dist.is_initialized()):
        return
    if all_done:
        watchdog.stop()
        dist.barrier()
    gc.collect()  # drop cycles that still hold tensors a pending work object may reference
    destroy_process_group()


def _lost_peers() -> list[str]:
    from .parallel import watchdog

    return watchdog.WATCH.diagnose(wait=min(30.0, watchdog.WATCH.timeout)) if watchdog.WATCH is not None else []


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but key=value overrides may also come after flags (`train --config c.yaml a=1
    --resume b=2`): argparse's positional list stops at the first flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--resume auto` is the documented spelling of --resume (resume if there is a checkpoint,
    # else start): the word is dropped so that it is not taken for an override.
    argv = [a for i, a in enumerate(argv) if not (a == "auto" and i > 0 and argv[i - 1] == "--resume")]
    argv = ["--resume" if a == "--resume=auto" else a for a in argv]
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if not ("=" in x and not x.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


# Deprecations inside DeepSpeed's own calls (torch 2.13 renamed these collectives; transformers
# renamed is_gradient_checkpointing): printed at every ZeRO step, nothing a user can act on.
DEPENDENCY_DEPRECATIONS = (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
                           r"`is_gradient_checkpointing` is deprecated")


def _quiet_other_ranks() -> None:
    """Under a launcher every rank would print the same info, warnings and loading bars: rank 0
    speaks for all; the others report errors only."""
    for message in DEPENDENCY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    env = launcher_env()
    if env is None or env["RANK"] == "0":
        return
    logging.getLogger().setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_other_ranks()
    args = parse_args(build_parser(), argv)
    done, rank = False, 0
    try:
        result = args.func(args)
        done = True
        rank = get_rank()
    except InputError as err:
        print(f"smf-ds {args.command}: {err}", file=sys.stderr)
        return 2
    except Stopped as stopped:  # every rank stopped at the same step, after saving
        done = True
        if get_rank() == 0:
            print(f"smf-ds {args.command}: {stopped}", file=sys.stderr)
        return STOPPED_EXIT_CODE
    except Exception as err:
        lost = _lost_peers()  # a collective failed because a peer died: say which, not a traceback
        if lost:
            print(f"smf-ds {args.command}: rank {get_rank()}: a collective failed ({type(err).__name__}); "
                  f"lost {'; '.join(lost)}. Resume from the latest checkpoint with --resume auto.", file=sys.stderr)
            return PEER_LOST_EXIT_CODE
        raise
    finally:
        _leave_process_group(all_done=done)
        stop.stop_listening()
    if result is not None and rank == 0:  # once, not once per rank
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
