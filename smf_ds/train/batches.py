"""Tokenized training examples and the deterministic global-batch order.

Example = {"input_ids": [...], "labels": [...]} with -100 where no loss is taken (the prompt, and
padding after collation). Step s of the run reads global-batch s of a seeded per-epoch
permutation; rank r, micro-batch m take a fixed slice of it, so the data a step sees depends only
on (seed, step, world layout) and resume is exact.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..tokens import encode_start, start_ids, with_start

IGNORE = -100


def tokenize_prompt_answer(tokenizer, prompt: str, answer: str, max_length: int, loss_on: str = "answer") -> dict:
    """Loss on the answer tokens only (the tokenizer's start tokens and the prompt labelled IGNORE),
    or with loss_on="all" on every token (the paper's code); truncates the prompt's front, after
    the start tokens."""
    start = list(start_ids(tokenizer))
    prompt_ids = with_start(start, tokenizer(prompt, add_special_tokens=False)["input_ids"])[len(start):]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    answer_ids = answer_ids[:max(max_length - len(start), 1)]
    prompt_ids = start + prompt_ids[max(0, len(start) + len(prompt_ids) + len(answer_ids) - max_length):]
    prompt_labels = list(prompt_ids) if loss_on == "all" else [IGNORE] * len(prompt_ids)
    return {"input_ids": prompt_ids + answer_ids, "labels": prompt_labels + answer_ids}


def tokenize_text(tokenizer, text: str, max_length: int) -> dict:
    ids = encode_start(tokenizer, text)[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def examples_digest(examples: list[dict]) -> str:
    """A hash of the tokenized examples (ids and labels, in order): a resumed run checks that it
    trains on the same examples, wherever its data and tokenizer are now."""
    digest = hashlib.sha256()
    for example in examples:
        ids, labels = (np.asarray(example[key], dtype=np.int64) for key in ("input_ids", "labels"))
        digest.update(np.int64(len(ids)).tobytes() + ids.tobytes() + labels.tobytes())
    return digest.hexdigest()[:16]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention, loss and reads."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class GlobalBatchOrder:
    def __init__(self, num_examples: int, micro_batch_size: int, grad_accum: int, world_size: int, seed: int) -> None:
        if num_examples == 0:
            raise ValueError("training data: no examples")
        self.n, self.micro, self.accum, self.world, self.seed = num_examples, micro_batch_size, grad_accum, world_size, seed
        self.global_batch = micro_batch_size * grad_accum * world_size

    def _position(self, i: int) -> int:
        epoch, offset = divmod(i, self.n)
        if getattr(self, "_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[offset]

    def indices(self, step: int, rank: int, micro: int) -> list[int]:
        """Example indices of micro-batch `micro` of rank `rank` in optimizer step `step`."""
        start = step * self.global_batch + (micro * self.world + rank) * self.micro
        return [self._position(i) for i in range(start, start + self.micro)]
