"""Texts to token ids as the model was trained to read them: a text that starts a sequence gets
the tokens its tokenizer puts first by default (Llama's BOS; Qwen2's tokenizer puts none), a
continuation (an answer, an option) gets none. No end-of-text token is added here: where one is
wanted (after a training answer) the caller adds it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=8)
def start_ids(tokenizer) -> tuple[int, ...]:
    """The ids the tokenizer puts before a text when asked for its special tokens (found by
    encoding a probe text both ways, so every tokenizer class and post-processor is covered)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return tuple(full[:i])
    return ()


def with_start(start: Sequence[int], ids: list[int]) -> list[int]:
    """ids after the start tokens, unless they already begin with them (a template written with
    its own BOS, as Llama-2 chat prompts are: "<s>[INST] ...")."""
    start = list(start)
    return ids if ids[:len(start)] == start else start + ids


def encode_starts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text as the start of a sequence: start_ids + its tokens."""
    if not texts:
        return []
    start = start_ids(tokenizer)
    return [with_start(start, ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_start(tokenizer, text: str) -> list[int]:
    return encode_starts(tokenizer, [text])[0]
