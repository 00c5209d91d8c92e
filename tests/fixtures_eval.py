"""Fixtures for the data and eval tests: hub-schema files and a tiny saved model + tokenizer.

conftest.py makes `eval_world` and `tiny_lm` available to every test module; everything is built
once per test session under a temporary directory; nothing downloads. (Every test runs with one
torch thread, conftest.py: the tiny model is dominated by per-op overhead, and two threads on a
busy 2-core CI machine are up to 100x slower than one.)
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from smf_ds.data import samples

N_MEDMCQA, N_TRIVIAQA, N_WIKI_ARTICLES = 24, 20, 4


@dataclass
class EvalWorld:
    root: Path
    medmcqa: Path  # jsonl
    triviaqa: Path  # jsonl
    wikitext: Path  # jsonl
    model_dir: Path


def _texts_for_tokenizer() -> list[str]:
    texts = [r["question"] + " " + " ".join(r[k] for k in ("opa", "opb", "opc", "opd"))
             for r in samples.medmcqa_rows(60, seed=9)]
    texts += [r["question"] + " " + r["answer"]["value"] for r in samples.triviaqa_rows(40, seed=9)]
    texts += [r["text"] for r in samples.wikitext_rows(6, seed=9)]
    texts += [f"Answer: {c}. {c}" for c in "ABCD"] * 50
    return texts


@pytest.fixture(scope="session")
def eval_world(tmp_path_factory) -> EvalWorld:
    from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("eval_world")
    tok = build_tiny_tokenizer(_texts_for_tokenizer(), vocab_size=400)
    build_tiny_model(tok, root / "model", arch="qwen2", hidden=32, layers=2, seed=0)
    return EvalWorld(
        root=root,
        medmcqa=samples.write_rows(samples.medmcqa_rows(N_MEDMCQA, seed=1, multi_every=6), root / "medmcqa.jsonl"),
        triviaqa=samples.write_rows(samples.triviaqa_rows(N_TRIVIAQA, seed=1), root / "triviaqa.jsonl"),
        wikitext=samples.write_rows(samples.wikitext_rows(N_WIKI_ARTICLES, seed=1), root / "wikitext.jsonl"),
        model_dir=root / "model",
    )


def load_tiny(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def tiny_lm(eval_world):
    """(model, tokenizer) loaded back from the saved directory, fp32, eval mode."""
    return load_tiny(eval_world.model_dir)


@contextlib.contextmanager
def deprecation_notices():
    """Yield a list that collects every deprecation notice raised inside the block: Python
    FutureWarning/DeprecationWarning (pytest.ini ignores them, so they would pass unseen) and
    transformers' `logger.warning_once` messages (its per-process cache would hide a repeat)."""
    notices: list[str] = []
    once = logging.Logger.warning_once  # added by transformers

    def record_once(self, msg, *args, **kwargs):
        if "deprecat" in str(msg).lower():
            notices.append(f"warning_once: {msg}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logging.Logger.warning_once = record_once
        try:
            yield notices
        finally:
            logging.Logger.warning_once = once
    notices.extend(f"{w.category.__name__}: {w.message}" for w in caught
                   if issubclass(w.category, (FutureWarning, DeprecationWarning)))
