"""A tiny tokenizer and a tiny causal LM, built offline and deterministically, for tests and demos.

`build_tiny_tokenizer(texts, path)` trains a byte-level BPE (like Qwen's and Llama-3's tokenizers:
a leading space is part of the next token, e.g. " A") on `texts` and wraps it in a
`PreTrainedTokenizerFast` with `<|endoftext|>` as pad and eos. `build_tiny_model(tokenizer, path)`
builds a small randomly initialised Qwen2 or Llama causal LM from a config, seeded.
Both save with `save_pretrained` when `path` is given, so `AutoTokenizer` / `AutoModelForCausalLM`
load them back like any hub model; nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

EOS = "<|endoftext|>"
SINGLE_TOKEN_WEIGHT = 100_000
BASE_TEXTS = [
    "Medical exam question:\nQuestion: Which drug is used?\nA. one\nB. two\nC. three\nD. four\nAnswer: A",
    "Question: What is the capital?\nAnswer: The city.",
    " = Title = \n The quick brown fox jumps over the lazy dog . \n",
]


def build_tiny_tokenizer(texts: Iterable[str], path: str | Path | None = None, vocab_size: int = 512,
                         bos: str | None = None, single_tokens: Sequence[str] = ()):
    """Byte-level BPE trained on `texts` (plus a few fixed lines), wrapped for transformers.

    Deterministic: the same texts give the same vocabulary and merges. Every byte is in the
    alphabet, so any text encodes (no unknown token). With `bos` (e.g. "<s>") it puts that token
    before every text it encodes with special tokens, as Llama's tokenizers do; Qwen2's put none.
    `single_tokens` (e.g. the option letters " A".." D", as Qwen's vocabulary has them) each encode
    as one token: a scorer would otherwise compare one token's probability with two tokens'.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS] + ([bos] if bos else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # BPE merges the most frequent pairs first: pieces counted this often are merged early, whole.
    # (Added tokens would not do: they split every word that contains them, " Answer" into " A" "nswer".)
    pieces = [" ".join(single_tokens)] * SINGLE_TOKEN_WEIGHT if single_tokens else []
    tok.train_from_iterator(list(BASE_TEXTS) + list(texts) + pieces, trainer=trainer)
    split = {p: tok.encode(p).tokens for p in single_tokens if len(tok.encode(p).ids) != 1}
    if split:
        raise ValueError(f"single_tokens: {split} did not become one token each (vocab_size {vocab_size} too small?)")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=bos,
                                   clean_up_tokenization_spaces=False)
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def build_tiny_model(tokenizer, path: str | Path | None = None, arch: str = "qwen2", hidden: int = 32,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int | None = None,
                     max_positions: int = 1024, init_std: float = 0.2, seed: int = 0):
    """A small random causal LM (fp32) for `tokenizer`; saved with `save_pretrained` when `path` is given.

    `init_std` is larger than the usual 0.02 on purpose: the next-token distribution is then
    peaked, so greedy decoding and option rankings do not hinge on float rounding (tests compare
    batched with one-at-a-time computation).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_positions, initializer_range=init_std,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
                  tie_word_embeddings=False)
    if arch == "qwen2":
        config, cls = Qwen2Config(**kwargs), Qwen2ForCausalLM
    elif arch == "llama":
        config, cls = LlamaConfig(**kwargs), LlamaForCausalLM
    else:
        raise ValueError(f"arch: expected 'qwen2' or 'llama', got {arch!r}")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = cls(config)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    if path is not None:
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
    return model
