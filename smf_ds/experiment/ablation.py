"""The paper code's training procedure as a variant (`smf-paper`), and an ablation: variants that
each correct one of its differences from smf-ds (docs/paper.md), compared with it on task gain and
forgetting with paired bootstrap intervals.

The correction's change is mean over seeds of (correction - smf-paper) on the same resampled
examples: the resamples are shared by every variant of a task (smf_ds.experiment.stats), so the
difference of their resampled changes against the base is the paired difference, and the base
cancels. A change whose interval excludes 0 is marked.
"""
from __future__ import annotations

import numpy as np

from ..eval.bootstrap import percentile_interval

PAPER = "smf-paper"
# What smf-paper sets on top of the world's SMF memory (smf_ds.experiment.jobs.SMF_MEMORY): every
# item of docs/paper.md's table that concerns training and that smf-ds can express. Two micro-batches
# of 4 make the world's global batch of 8, so that selection per micro-batch differs from per step.
# The paper's 100 warm-up steps fit in the world's 300 finetuning steps as they are; a shorter run
# (--quick: 10 steps) warms up over the first third of its steps instead (ablation_variants).
PAPER_WARMUP = 100
PAPER_OVERRIDES = [
    "train.method=smf", "sparse.scoring=tfidf", "train.micro_batch_size=4", "train.grad_accum=2",
    "sparse.select_every=micro_batch", "sparse.count_padding=true",
    "sparse.optimizer=adamw-dense", "memory.value_lr=0.0005", "train.lr=0.0005", "sparse.weight_decay=0.0",
    "train.weight_decay=0.0", "train.lr_schedule=cosine", f"train.warmup_steps={PAPER_WARMUP}",
    "sparse.max_grad_norm=1.0", "train.accum_reduction=sum", "data.loss_on=all", "train.scope=memory+scale",
    "data.background_unit=document",
]
# Each correction: (what it corrects, the overrides that undo one item of PAPER_OVERRIDES).
CORRECTIONS: dict[str, tuple[str, list[str]]] = {
    "smf-paper+step-selection": ("selection once per optimizer step", ["sparse.select_every=step"]),
    "smf-paper+padding-masked": ("padded tokens left out of the counts", ["sparse.count_padding=false"]),
    "smf-paper+lazy-adamw": ("lazy AdamW (unselected rows unchanged)", ["sparse.optimizer=adamw"]),
    "smf-paper+mean-accum": ("gradients averaged over micro-batches", ["train.accum_reduction=mean"]),
    "smf-paper+answer-loss": ("loss on the answer only", ["data.loss_on=answer"]),
    "smf-paper+values-scope": ("values alone trained (no scale, no projections)", ["train.scope=values"]),
    "smf-paper+no-clip": ("value gradients not clipped", ["sparse.max_grad_norm=0.0"]),
    "smf-paper+batch-df": ("background df per batch, not per document", ["data.background_unit=batch"]),
}
TASKS = ("medmcqa", "triviaqa", "wikitext")


def ablation_variants(smf_memory: list[str], steps: int | None = None) -> dict[str, list[str]]:
    """smf-paper and each correction, as variants (name -> overrides), for runs of `steps` steps."""
    paper = [*smf_memory, *PAPER_OVERRIDES]
    if steps is not None and PAPER_WARMUP >= steps:  # a warm-up longer than the run would never reach the lr
        paper.append(f"train.warmup_steps={max(1, steps // 3)}")
    return {PAPER: paper, **{name: [*paper, *overrides] for name, (_, overrides) in CORRECTIONS.items()}}


def ablation(variants: dict, samples: dict[str, dict[str, np.ndarray]]) -> dict | None:
    """Each correction present against smf-paper, per task: the paired change and its interval;
    None without smf-paper or any correction. variants: results.json's; samples: variant -> task ->
    the resampled changes against the base (the same resamples for every variant)."""
    present = [name for name in CORRECTIONS if name in variants]
    if PAPER not in variants or not present:
        return None
    rows = []
    for name in present:
        row = {"variant": name, "corrects": CORRECTIONS[name][0]}
        for task in TASKS:
            value = variants[name][task]["delta"]["value"] - variants[PAPER][task]["delta"]["value"]
            paper_samples, own = samples.get(PAPER, {}).get(task), samples.get(name, {}).get(task)
            interval = None if paper_samples is None or own is None else percentile_interval(own - paper_samples)
            row[task] = {"value": float(value), "ci95": interval,
                         "beyond": interval is not None and not interval[0] <= 0 <= interval[1]}
            own_bases, paper_bases = (variants[v][task]["delta"].get("per_base") for v in (name, PAPER))
            if own_bases and paper_bases and variants[name]["seeds"] == variants[PAPER]["seeds"]:
                per_base = np.subtract(own_bases, paper_bases)  # a base per seed: the change on each
                row[task]["same_sign_on_every_base"] = len(set(np.sign(per_base))) == 1
        rows.append(row)
    return {"reference": PAPER, "rows": rows}
