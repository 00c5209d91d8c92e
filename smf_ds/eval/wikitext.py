"""Strided (sliding-window) perplexity, several windows per forward batch.

The text (smf_ds.data.wikitext.join_docs) is tokenized once, without special tokens. Windows
follow the Hugging Face perplexity guide: window w covers tokens [begin, end) with
begin = w * stride, end = min(begin + max_length, N); it scores the tokens not scored by the
previous window, [prev_end, end) (token 0 has no prediction and is never scored), using the rest
of the window as context. With stride < max_length every token 1..N-1 is scored exactly once; with
stride == max_length (disjoint windows) the first token of each later window has no context in
its window and is not scored, as in the guide (the summary's n_tokens_scored says how many were).

Perplexity = exp(sum of token NLLs / number of scored tokens), NLL summed exactly per window
(not the guide's approximation mean loss * trg_len). A window is a scoring request
(context = window[:first scored], continuation = scored tokens), so windows go through the same
batched scorer as MedMCQA. The 95% interval resamples windows (each carries its NLL sum and
token count; smf_ds.eval.bootstrap.bootstrap_ratio).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..tokens import encode_start
from .batching import pad_id_of
from .bootstrap import bootstrap_ratio
from .scoring import score_requests


@dataclass(frozen=True)
class Window:
    index: int
    begin: int
    end: int
    first: int  # first scored token position (begin < first < end)

    @property
    def n_scored(self) -> int:
        return self.end - self.first


def make_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    if max_length < 2:
        raise ValueError(f"max_length: expected >= 2 tokens per window, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride: expected 1 <= stride <= max_length ({max_length}), got {stride}")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + max_length, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append(Window(len(windows), begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def tokenize_text(tokenizer, text: str) -> list[int]:
    """The whole text as one sequence: the tokenizer's start tokens once, at its beginning (as the
    HF perplexity guide's single tokenizer call gives them)."""
    return encode_start(tokenizer, text)


def evaluate_perplexity(model, tokenizer, text: str | None = None, ids: Sequence[int] | None = None,
                        max_length: int = 1024, stride: int = 512, batch_size: int = 8,
                        rank: int | None = None, world_size: int | None = None, progress: bool = False
                        ) -> list[dict]:
    """One record per window: {"index", "begin", "end", "n_tokens" (scored), "nll" (sum)}, on every rank."""
    if ids is None:
        ids = tokenize_text(tokenizer, text or "")
    ids = list(ids)
    windows = make_windows(len(ids), max_length, stride)
    requests = [(ids[w.begin:w.first], ids[w.first:w.end]) for w in windows]
    # All windows but the last have max_length tokens: equal-length batches need no padding mask.
    ll = score_requests(model, requests, pad_id_of(tokenizer), batch_size, rank, world_size, progress,
                        desc="wikitext", equal_lengths=True)
    return [{"index": w.index, "begin": w.begin, "end": w.end, "n_tokens": w.n_scored, "nll": -s}
            for w, s in zip(windows, ll)]


def summarize_perplexity(records: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    nll = [r["nll"] for r in records]
    count = [r["n_tokens"] for r in records]
    out = {"perplexity": bootstrap_ratio(nll, count, np.exp, n_boot, seed),
           "nll_per_token": bootstrap_ratio(nll, count, np.asarray, n_boot, seed)}
    out["n_tokens_scored"] = int(sum(count))
    return out
