"""MedMCQA accuracy by the log-likelihood of each option's continuation, batched.

Modes (each is a prediction per question, argmax over the four options; ties go to the first):

  letter       log p(" B" | prompt)
  answer       log p(" B. {option text}" | prompt), summed over its tokens
  answer_norm  the same divided by its number of tokens (length-normalized)

Many questions go through the model in one batch, each prompt read once: its KV cache then
scores all of its continuations (letters from the prompt's last logits, answers in a second
short pass; smf_ds.eval.scoring.score_shared_context).
Per-example records hold every option's log-likelihood, so predictions can be compared across
models later (paired).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.medmcqa import LETTERS, MedMCQAExample, MedMCQAPrompt
from ..tokens import start_ids, with_start
from .batching import pad_id_of
from .bootstrap import bootstrap_mean
from .scoring import score_shared_context

MODES = ("letter", "answer", "answer_norm")
KIND = {"letter": "letter", "answer": "answer", "answer_norm": "answer"}


def check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"MedMCQA modes: expected a non-empty subset of {list(MODES)}, got {list(modes)}")
    return tuple(dict.fromkeys(modes))


def tokenize_medmcqa(tokenizer, examples: Sequence[MedMCQAExample], prompt: MedMCQAPrompt, kinds: Sequence[str]
                     ) -> tuple[list[list[int]], dict[str, list[list[list[int]]]]]:
    """(context ids per example, {kind: [example][option] continuation ids}); contexts begin with
    the tokenizer's start tokens (smf_ds.tokens), continuations have none.

    Prompt and continuation are tokenized separately (each distinct text once: the letter
    continuations " A".." D" are shared by every question).
    """
    texts = [prompt.prompt(ex) for ex in examples]
    cont_texts = {k: [prompt.continuation(ex, o, k) for ex in examples for o in range(4)] for k in kinds}
    unique = list(dict.fromkeys([*texts, *(t for k in kinds for t in cont_texts[k])]))
    ids = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"])) if unique else {}
    start = start_ids(tokenizer)  # a prompt starts its sequence; the continuations follow it
    contexts = [with_start(start, ids[t]) for t in texts]
    conts = {k: [[ids[t] for t in cont_texts[k][4 * i:4 * i + 4]] for i in range(len(examples))] for k in kinds}
    return contexts, conts


def predict_option(ll: Sequence[float], n_tokens: Sequence[int], mode: str) -> int:
    scores = np.asarray(ll, dtype=np.float64)
    if mode == "answer_norm":
        scores = scores / np.asarray(n_tokens, dtype=np.float64)
    return int(np.argmax(scores))


def make_record(ex: MedMCQAExample, modes: Sequence[str], ll: dict[str, list[float]],
                n_tokens: dict[str, list[int]]) -> dict:
    rec = {"index": ex.index, "row": ex.row, "id": ex.id, "gold": ex.answer_letter}
    for kind in dict.fromkeys(KIND[m] for m in modes):
        rec[f"ll_{kind}"] = ll[kind]
        rec[f"n_tokens_{kind}"] = n_tokens[kind]
    for mode in modes:
        pred = predict_option(ll[KIND[mode]], n_tokens[KIND[mode]], mode)
        rec[f"pred_{mode}"] = LETTERS[pred]
        rec[f"correct_{mode}"] = pred == ex.answer
    return rec


def evaluate_medmcqa(model, tokenizer, examples: Sequence[MedMCQAExample], prompt: MedMCQAPrompt | None = None,
                     modes: Sequence[str] = MODES, batch_size: int = 32, rank: int | None = None,
                     world_size: int | None = None, progress: bool = False) -> list[dict]:
    """One record per example, in example order, on every rank (batches sharded, results gathered).

    `batch_size` counts questions; all continuations of a question go in its batch.
    """
    prompt = prompt or MedMCQAPrompt()
    modes = check_modes(modes)
    kinds = list(dict.fromkeys(KIND[m] for m in modes))
    contexts, conts = tokenize_medmcqa(tokenizer, examples, prompt, kinds)
    groups = [(contexts[i], [conts[k][i][o] for k in kinds for o in range(4)]) for i in range(len(examples))]
    scores = score_shared_context(model, groups, pad_id_of(tokenizer), batch_size, rank, world_size, progress,
                                  desc="medmcqa")
    ll = [{k: scores[i][4 * j:4 * j + 4] for j, k in enumerate(kinds)} for i in range(len(examples))]
    return [make_record(ex, modes, ll[i], {k: [len(c) for c in conts[k][i]] for k in kinds})
            for i, ex in enumerate(examples)]


def summarize_medmcqa(records: Sequence[dict], modes: Sequence[str] = MODES, n_boot: int = 1000, seed: int = 0
                      ) -> dict:
    """{"accuracy_<mode>": {"value", "ci95", "n"}} for every mode."""
    return {f"accuracy_{m}": bootstrap_mean([float(r[f"correct_{m}"]) for r in records], n_boot, seed)
            for m in check_modes(modes)}
