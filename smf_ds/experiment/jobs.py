"""The jobs of the embedded synthetic world, shared by `smf-ds demo` and `smf-ds experiment`:
pretrain the base model, finetune it with one method variant, evaluate a model on the task and
both probes.

A variant is a finetuning method with its settings: `smf-tfidf` and `smf-kl` (the two scoring
rules of the paper), `smf-dense-accessed` and `smf-dense-all` (the dense-update controls the
paper's review asked for: every accessed row, or every row, trains), `smf-tfidf-adamw` and
`smf-dense-all-adamw` (the sparse rule and its control with AdamW on the value rows), `lora` and
`full`. Every
variant sees the same task data, steps and batch; the seed changes the data order and the
initialisation of what it adds (memory, LoRA).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from ..config import load_config
from ..data.medmcqa import MedMCQAPrompt
from ..data.synthetic_world import WorldSpec, build_world, check_world, world_files
from ..data.tiny import build_tiny_model, build_tiny_tokenizer
from ..data.wikitext import join_docs, load_wikitext
from ..models import check_written_files, load_model_and_tokenizer
from ..memory.adapter import CONFIG_NAME as MEMORY_ADAPTER_CONFIG
from ..eval.runner import TASKS, EvalSettings, run_tasks
from ..eval.wikitext import tokenize_text as wikitext_tokens
from ..parallel.process_group import barrier, get_rank
from ..train.batches import tokenize_text
from ..train.loop import Trainer
from ..train.methods import method_of

log = logging.getLogger(__name__)

BASE_STEPS = {"quick": 60, "full": 1500}
TASK_STEPS = {"quick": 10, "full": 300}
PRETRAIN_LENGTH = 64

OPTION_LETTERS = (" A", " B", " C", " D")  # one token each in the world's tokenizer, as in Qwen's
TRIVIA_TEMPLATE = "Question: {question} Answer:"  # the probe's prompt, as the world's general text has it
# The test asks the training facts with the options reshuffled: the answer's likelihood shows
# whether a fact was learned; a letter learned by rote would now point at the wrong option.
# So the answer is written without its letter, in training and evaluation alike.
MEDMCQA_MODES = ("answer", "answer_norm", "letter")
ANSWER_CONTINUATION = " {option}"

SMF_MEMORY = ["memory.layers=[0,1,2,3]", "memory.n_keys=64", "memory.heads=4", "memory.knn=8",
              "memory.k_dim=32", "memory.scale_init=1.0", "memory.value_lr=1000.0", "sparse.top_t=512",
              "data.background_batches=40"]
VARIANTS: dict[str, list[str]] = {
    "smf-tfidf": ["train.method=smf", "sparse.scoring=tfidf", *SMF_MEMORY],
    "smf-kl": ["train.method=smf", "sparse.scoring=kl", *SMF_MEMORY],
    "smf-dense-accessed": ["train.method=smf", "sparse.scoring=dense-accessed", *SMF_MEMORY],
    "smf-dense-all": ["train.method=smf", "sparse.scoring=dense-all", *SMF_MEMORY],
    # The same with AdamW on the value rows: momentum moves a row only in steps that select it, so
    # here (unlike with SGD) updating every row each step differs from updating the top-t.
    "smf-tfidf-adamw": ["train.method=smf", "sparse.scoring=tfidf", *SMF_MEMORY, "sparse.optimizer=adamw",
                        "memory.value_lr=0.1"],
    "smf-dense-all-adamw": ["train.method=smf", "sparse.scoring=dense-all", *SMF_MEMORY, "sparse.optimizer=adamw",
                            "memory.value_lr=0.1"],
    "lora": ["train.method=lora", "train.lr=0.003", "train.lora_r=8", "train.lora_alpha=16"],
    "full": ["train.method=full", "train.lr=0.001"],
}

# `smf-ds experiment --sweep` (make experiment): each method's step size from a tenth of the value
# above to a third of it. A sweep from x0.3 to x3 put every point of smf-tfidf and LoRA past their
# best (more forgetting for less task gain): fronts of one point, nothing to match.
WORLD_SWEEP: dict[str, dict[str, list]] = {
    "smf-tfidf": {"memory.value_lr": [100.0, 200.0, 300.0]},
    "lora": {"train.lr": [0.0001, 0.0003, 0.001]},
    "full": {"train.lr": [0.0001, 0.0003, 0.001]},
}


def prepare_world(directory: Path, spec: WorldSpec | None = None) -> dict[str, Path]:
    """The world's files, written by rank 0 alone: ranks rewriting files that their peers were
    already reading gave them different tokenizers (and mismatched collectives)."""
    spec = spec or WorldSpec()
    check_world(directory, spec)  # on every rank: a refusal stops all of them, none waits at a barrier
    barrier()
    if get_rank() == 0:
        build_world(directory, spec)
    barrier()
    return world_files(directory)


def _read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def pretrain_base(world: dict[str, Path], out: Path, steps: int, seed: int = 0) -> Path:
    """Tokenizer + tiny Qwen2 that has learned the world's general text; saved to `out` (kept if there).
    The seed sets the model's initialisation and the order of its pretraining data."""
    if (out / "config.json").is_file():
        return out
    general = _read_texts(world["general"])
    docs, _ = load_wikitext(str(world["wikitext_seen"]))  # never the held-out articles the probe reads
    articles = join_docs(docs)
    tokenizer = build_tiny_tokenizer(general + [articles], vocab_size=768, single_tokens=OPTION_LETTERS)
    model = build_tiny_model(tokenizer, hidden=64, layers=4, heads=4, kv_heads=2, init_std=0.02, seed=seed)
    cfg = load_config(overrides=[
        "train.method=full", f"train.steps={steps}", f"train.seed={seed}", "train.micro_batch_size=16", "train.lr=0.003",
        f"train.max_length={PRETRAIN_LENGTH}", f"out_dir={out}/pretrain_run"])
    examples = [tokenize_text(tokenizer, t + tokenizer.eos_token, PRETRAIN_LENGTH) for t in general]
    # The seen articles as a WikiText probe reads them (one text, lines joined), in overlapping
    # windows: a base that has read its Wikipedia. The probes read the held-out articles (the same
    # facts in other sentences); these windows, memorised, are the extra `memorised` column.
    ids = wikitext_tokens(tokenizer, articles)
    half = PRETRAIN_LENGTH // 2
    examples += [{"input_ids": ids[i:i + PRETRAIN_LENGTH], "labels": ids[i:i + PRETRAIN_LENGTH]}
                 for i in range(0, max(len(ids) - half, 1), half)]
    trainer = Trainer(cfg, model, examples, tokenizer.pad_token_id)
    result = trainer.fit(progress=True)
    log.info("base pretraining: loss %.3f -> %.3f", result.losses[0], result.losses[-1])
    if get_rank() == 0:
        trainer.model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    trainer.close()
    barrier()
    return out


def variant_overrides(world: dict[str, Path], base: Path, variant: list[str], run_dir: Path, steps: int,
                      seed: int = 0) -> list[str]:
    """The run config of one variant on the world's task (loss on the answer only: the world's
    explanations restate it)."""
    return [f"model.name_or_path={base}", f"data.train={world['medmcqa_train']}",
            f"data.background={world['oasst']}", f"train.steps={steps}", f"train.seed={seed}", f"memory.seed={seed}",
            "train.micro_batch_size=8", "train.max_length=96", "data.train_explanation=false",
            f"out_dir={run_dir}", *variant]


def background_then_train(make_config, run_dir: Path, adapter: str | None = None) -> dict:
    """`smf-ds background` (when the run's scoring rule needs it), then `smf-ds train`; the train
    summary. make_config(extra overrides) builds the run config; adapter: memory to start from."""
    from ..train.checkpoint import latest_tag
    from ..train.background import background_main
    from ..train.rundir import default_background_path
    from ..train.run import train_main

    cfg = make_config([])
    if method_of(cfg).needs_background(cfg):
        stats = default_background_path(cfg)  # in the run dir
        # A run cut short after its first checkpoint goes on with its own stats (the resume checks
        # their digest); background_main would refuse to replace them.
        if latest_tag(run_dir / "checkpoints") is None or not stats.is_file():
            stats = background_main(cfg, adapter)
        cfg = make_config([f"sparse.background={stats}"])
    # A run dir with checkpoints is this run's, cut short (setup.json guards the settings): go on.
    return train_main(cfg, adapter, resume=True)


def finetune(world: dict[str, Path], base: Path, variant: list[str], run_dir: Path, steps: int, seed: int = 0) -> dict:
    """Train one variant (its overrides, e.g. VARIANTS[name]) on the world's task; the train summary."""
    overrides = variant_overrides(world, base, variant, run_dir, steps, seed)

    def make_config(extra):
        cfg = load_config(overrides=overrides + extra)
        cfg.data.answer_continuation = ANSWER_CONTINUATION  # a leading space: set here, not as key=value
        return cfg

    return background_then_train(make_config, run_dir)


def eval_settings(world: dict[str, Path], n_boot: int = 200) -> EvalSettings:
    return EvalSettings(medmcqa=str(world["medmcqa_test"]), triviaqa=str(world["triviaqa"]),
                        wikitext=str(world["wikitext"]), triviaqa_template=TRIVIA_TEMPLATE, medmcqa_modes=MEDMCQA_MODES,
                        medmcqa_prompt=MedMCQAPrompt(answer_continuation=ANSWER_CONTINUATION),
                        max_new_tokens=8, max_length=64, stride=32, n_boot=n_boot)


def load_for_eval(base: Path | str, artifact: Path | None, base_named_by: str | None = None):
    """(model, tokenizer) of the base (artifact None), of the base plus a memory or LoRA adapter,
    or of a model dir. Adapters go onto `base` as it is now: a LoRA adapter records its base's
    path from when it was trained, which is stale once the experiment dir has moved. Errors about
    the base name it as `base_named_by` (the setting it came from)."""
    if artifact is not None and (artifact / MEMORY_ADAPTER_CONFIG).is_file():
        return load_model_and_tokenizer(str(base), memory_adapter=str(artifact), named_by=base_named_by)
    if artifact is not None and (artifact / "adapter_config.json").is_file():
        from peft import PeftModel

        check_written_files(str(artifact), f"LoRA adapter {artifact}")
        model, tokenizer = load_model_and_tokenizer(str(base), named_by=base_named_by)
        # The LoRA layers go into the model in place: keep the plain transformers model.
        return PeftModel.from_pretrained(model, str(artifact)).base_model.model.eval(), tokenizer
    return load_model_and_tokenizer(str(artifact or base), named_by=None if artifact else base_named_by)


MEMORISED_DIR = "memorised"  # in an eval dir: WikiText perplexity on the articles the base pretrained on


def evaluate(world: dict[str, Path], base: Path, artifact: Path | None, out_dir: Path, meta: dict) -> dict:
    """Evaluate the base (artifact None) or a run's artifact on the world's task and both probes
    (held-out text), and on the memorised windows (<out_dir>/memorised/; the summary's
    "memorised_wikitext")."""
    model, tokenizer = load_for_eval(base, artifact)
    meta = {**meta, "artifact": str(artifact or base)}
    seen = dataclasses.replace(eval_settings(world), wikitext=str(world["wikitext_seen"]))
    memorised = run_tasks(model, tokenizer, ["wikitext"], seen, out_dir / MEMORISED_DIR, echo=None, overwrite=True,
                          meta={**meta, "probe": "memorised windows"})
    # last: its summary.json marks the evaluation done (smf_ds.experiment.grid.run_one)
    summary = run_tasks(model, tokenizer, TASKS, eval_settings(world), out_dir, echo=None, overwrite=True, meta=meta)
    return {**summary, "memorised_wikitext": memorised["tasks"]["wikitext"]}
