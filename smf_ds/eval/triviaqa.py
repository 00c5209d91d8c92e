"""TriviaQA by greedy generation, batched with left padding; SQuAD-normalized metrics.

Prompts (default "Question: {question}\\nAnswer:") are tokenized without special tokens, batched
by length (longest first) and left-padded; `generate` derives position ids from the attention
mask. Decoding is greedy with an explicit GenerationConfig (a model's own sampling defaults
never apply). A row stops at the first token whose text contains a newline, or at eos; the
answer is the generated tokens before that token, decoded.

Metrics, each per example then averaged, against all references (answer value + aliases +
normalized aliases):

  contains  some normalized reference is a substring of the normalized prediction
            (the paper's alias-contains accuracy)
  em        the normalized prediction equals some normalized reference
  f1        the best token F1 against any reference

Normalization is SQuAD's: lower case, punctuation removed, articles (a, an, the) removed,
whitespace collapsed.
"""
from __future__ import annotations

import collections
from typing import Sequence

import torch

from ..data.triviaqa import DEFAULT_TEMPLATE, TriviaQAExample, check_template, normalize_answer
from ..tokens import encode_starts
from .batching import (gather_objects, left_pad, model_device, my_batches, pad_id_of, plan_batches, progress_bar,
                       resolve_shard)
from .bootstrap import bootstrap_mean

METRICS = ("contains", "em", "f1")
def exact_match(prediction: str, references: Sequence[str]) -> bool:
    p = normalize_answer(prediction)
    return any(p == normalize_answer(r) for r in references)


def contains_match(prediction: str, references: Sequence[str]) -> bool:
    """A reference's normalized text inside the prediction's. A reference that normalizes to
    nothing (articles only: 'A', 'The The') is looked for as lower-cased text; an exact match always
    counts, so that contains is never false where exact match is true."""
    p, lowered = normalize_answer(prediction), " ".join(prediction.lower().split())
    for ref in references:
        normalized = normalize_answer(ref)
        text = normalized or " ".join(ref.lower().split())
        if text and text in (p if normalized else lowered):
            return True
    return exact_match(prediction, references)


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    same = sum(common.values())
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    p = normalize_answer(prediction).split()
    return max((_f1(p, normalize_answer(r).split()) for r in references), default=0.0)


# ---------------------------------------------------------------------------------------------
# generation


def _vocab_texts(tokenizer) -> tuple[str, ...]:
    n = len(tokenizer)
    return tuple(tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False))


def newline_token_ids(tokenizer) -> frozenset[int]:
    """Ids of every token whose text contains a newline (cached on the tokenizer object)."""
    cached = getattr(tokenizer, "_smf_newline_ids", None)
    if cached is None or cached[0] != len(tokenizer):
        ids = frozenset(i for i, t in enumerate(_vocab_texts(tokenizer)) if "\n" in t)
        cached = (len(tokenizer), ids)
        tokenizer._smf_newline_ids = cached
    return cached[1]


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    return list(dict.fromkeys(int(i) for i in ids))


def greedy_config(model, tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            pad_token_id=pad_id_of(tokenizer), eos_token_id=eos_token_ids(model, tokenizer),
                            temperature=None, top_p=None, top_k=None)


class StopAtTokens:
    """Per-row stopping criterion: a row is done once its newest token is one of `ids`."""

    def __init__(self, ids: frozenset[int], device) -> None:
        self.ids = torch.tensor(sorted(ids), dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.isin(input_ids[:, -1], self.ids)


def cut_at_stop(tokens: Sequence[int], stop: frozenset[int] | set[int]) -> list[int]:
    """Tokens before the first stop token (newline-containing or eos)."""
    out = []
    for t in tokens:
        if t in stop:
            break
        out.append(int(t))
    return out


def stop_ids(model, tokenizer) -> frozenset[int]:
    return newline_token_ids(tokenizer) | frozenset(eos_token_ids(model, tokenizer))


@torch.no_grad()
def generate_batched(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                     batch_size: int = 32, rank: int | None = None, world_size: int | None = None,
                     progress: bool = False) -> list[list[int]]:
    """Greedy continuation of every prompt, cut at the first stop token; on every rank, prompt order."""
    from transformers import StoppingCriteriaList

    rank, world_size = resolve_shard(rank, world_size)
    device = model_device(model)
    config = greedy_config(model, tokenizer, max_new_tokens)
    stop = stop_ids(model, tokenizer)
    newline = newline_token_ids(tokenizer)
    criteria = StoppingCriteriaList([StopAtTokens(newline, device)]) if newline else None
    batches = plan_batches([len(p) for p in prompts], batch_size)
    local: list[tuple[int, list[int]]] = []
    bar = progress_bar(len(my_batches(batches, rank, world_size)), "triviaqa", progress, rank)
    for batch in my_batches(batches, rank, world_size):
        ids, mask, _ = left_pad([prompts[i] for i in batch], config.pad_token_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             stopping_criteria=criteria)
        new = out[:, ids.shape[1]:].tolist()
        local.extend((i, cut_at_stop(row, stop)) for i, row in zip(batch, new))
        bar.update(1)
    bar.close()
    gathered = dict(gather_objects(local, world_size))
    if len(gathered) != len(prompts):
        raise RuntimeError(f"generation: {len(gathered)} of {len(prompts)} prompts came back from the ranks")
    return [gathered[i] for i in range(len(prompts))]


def score_prediction(ex: TriviaQAExample, prediction: str, tokens: Sequence[int]) -> dict:
    return {"index": ex.index, "row": ex.row, "id": ex.id, "question": ex.question, "prediction": prediction,
            "tokens": list(tokens), "answer": ex.value, "references": ex.aliases,
            "contains": contains_match(prediction, ex.aliases), "em": exact_match(prediction, ex.aliases),
            "f1": token_f1(prediction, ex.aliases)}


def decode_answer(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def evaluate_triviaqa(model, tokenizer, examples: Sequence[TriviaQAExample], template: str = DEFAULT_TEMPLATE,
                      max_new_tokens: int = 32, batch_size: int = 32, rank: int | None = None,
                      world_size: int | None = None, progress: bool = False) -> list[dict]:
    check_template(template)
    prompts = encode_starts(tokenizer, [ex.prompt(template) for ex in examples])
    generated = generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size, rank, world_size, progress)
    return [score_prediction(ex, decode_answer(tokenizer, toks), toks) for ex, toks in zip(examples, generated)]


def summarize_triviaqa(records: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    return {m: bootstrap_mean([float(r[m]) for r in records], n_boot, seed) for m in METRICS}
