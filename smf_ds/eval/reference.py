"""One-example-at-a-time reference evaluators, written the way the paper's code evaluates.

No batching, no padding, full logits: MedMCQA runs one forward per option of each question,
TriviaQA one unbatched `generate` per question, WikiText one forward per window. They share the
prompt, tokenization and metric code with the batched evaluators, so tests and
tools/bench_eval.py can check that both give the same predictions, and time the difference.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.medmcqa import MedMCQAExample, MedMCQAPrompt
from ..data.triviaqa import DEFAULT_TEMPLATE, TriviaQAExample
from ..tokens import encode_start
from .batching import model_device
from .medmcqa import KIND, MODES, check_modes, make_record, tokenize_medmcqa
from .triviaqa import (StopAtTokens, cut_at_stop, decode_answer, greedy_config, newline_token_ids, score_prediction,
                       stop_ids)
from .wikitext import make_windows, tokenize_text


@torch.no_grad()
def loglikelihood(model, context: Sequence[int], continuation: Sequence[int]) -> float:
    """log p(continuation | context) from one unpadded forward over context + continuation."""
    device = model_device(model)
    ids = torch.tensor([list(context) + list(continuation)], device=device)
    logits = model(input_ids=ids).logits[0]
    n = len(context)
    logp = F.log_softmax(logits[n - 1:-1].float(), dim=-1)
    target = ids[0, n:]
    return float(logp.gather(-1, target[:, None]).sum())


def medmcqa_one_by_one(model, tokenizer, examples: Sequence[MedMCQAExample], prompt: MedMCQAPrompt | None = None,
                       modes: Sequence[str] = MODES) -> list[dict]:
    prompt = prompt or MedMCQAPrompt()
    modes = check_modes(modes)
    kinds = list(dict.fromkeys(KIND[m] for m in modes))
    records = []
    for ex in examples:
        contexts, conts = tokenize_medmcqa(tokenizer, [ex], prompt, kinds)
        ll = {k: [loglikelihood(model, contexts[0], conts[k][0][o]) for o in range(4)] for k in kinds}
        n_tokens = {k: [len(c) for c in conts[k][0]] for k in kinds}
        records.append(make_record(ex, modes, ll, n_tokens))
    return records


@torch.no_grad()
def generate_one(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 32) -> list[int]:
    from transformers import StoppingCriteriaList

    device = model_device(model)
    config = greedy_config(model, tokenizer, max_new_tokens)
    newline = newline_token_ids(tokenizer)
    criteria = StoppingCriteriaList([StopAtTokens(newline, device)]) if newline else None
    ids = torch.tensor([list(prompt_ids)], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                         stopping_criteria=criteria)
    return cut_at_stop(out[0, ids.shape[1]:].tolist(), stop_ids(model, tokenizer))


def triviaqa_one_by_one(model, tokenizer, examples: Sequence[TriviaQAExample], template: str = DEFAULT_TEMPLATE,
                        max_new_tokens: int = 32) -> list[dict]:
    records = []
    for ex in examples:
        prompt_ids = encode_start(tokenizer, ex.prompt(template))
        toks = generate_one(model, tokenizer, prompt_ids, max_new_tokens)
        records.append(score_prediction(ex, decode_answer(tokenizer, toks), toks))
    return records


@torch.no_grad()
def perplexity_one_by_one(model, tokenizer, text: str | None = None, ids: Sequence[int] | None = None,
                          max_length: int = 1024, stride: int = 512) -> list[dict]:
    """The HF-guide loop: one window per forward, labels -100 outside the scored span."""
    if ids is None:
        ids = tokenize_text(tokenizer, text or "")
    device = model_device(model)
    all_ids = torch.tensor(list(ids), device=device)
    records = []
    for w in make_windows(len(all_ids), max_length, stride):
        input_ids = all_ids[w.begin:w.end][None]
        labels = input_ids.clone()
        labels[:, :w.first - w.begin] = -100
        logits = model(input_ids=input_ids).logits
        nll = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum")
        records.append({"index": w.index, "begin": w.begin, "end": w.end, "n_tokens": w.n_scored,
                        "nll": float(nll)})
    return records
