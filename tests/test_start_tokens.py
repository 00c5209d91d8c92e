"""A tokenizer that puts a BOS before every text (Llama's do; Qwen2's put none): training examples,
the three evaluators and the paper-style reference all begin each sequence with it, and only
there (a continuation or a later WikiText window gets none)."""
import numpy as np
import pytest
import torch
from fixtures_eval import _texts_for_tokenizer

from smf_ds.data.medmcqa import MedMCQAPrompt, load_medmcqa
from smf_ds.data.triviaqa import load_triviaqa
from smf_ds.data.wikitext import join_docs, load_wikitext
from smf_ds.eval.medmcqa import MODES, evaluate_medmcqa
from smf_ds.eval.reference import (generate_one, loglikelihood, medmcqa_one_by_one, perplexity_one_by_one,
                                   triviaqa_one_by_one)
from smf_ds.eval.triviaqa import evaluate_triviaqa
from smf_ds.eval.wikitext import evaluate_perplexity, tokenize_text
from smf_ds.tokens import start_ids
from smf_ds.train.batches import IGNORE, tokenize_prompt_answer
from smf_ds.train.batches import tokenize_text as training_text


@pytest.fixture(scope="module")
def llama_with_bos(tmp_path_factory):
    """A tiny Llama whose tokenizer adds <s>, saved and loaded back like a hub model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("llama_bos")
    tok = build_tiny_tokenizer(_texts_for_tokenizer(), vocab_size=400, bos="<s>")
    build_tiny_model(tok, root, arch="llama", hidden=32, layers=2, seed=1)
    model = AutoModelForCausalLM.from_pretrained(str(root), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(root))


def test_start_ids_are_what_the_tokenizer_puts_first(llama_with_bos):
    from smf_ds.data.tiny import build_tiny_tokenizer

    _, tok = llama_with_bos
    assert tok.bos_token == "<s>" and start_ids(tok) == (tok.bos_token_id,)
    assert start_ids(build_tiny_tokenizer(["a b c"] * 4, vocab_size=280)) == ()


def test_training_examples_begin_with_bos_and_never_learn_it(llama_with_bos):
    _, tok = llama_with_bos
    bos = tok.bos_token_id
    prompt, answer = "Question: Which drug is used?\nAnswer:", " A"
    full = tokenize_prompt_answer(tok, prompt, answer, max_length=256)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert full["input_ids"][0] == bos and bos not in full["input_ids"][1:]
    assert full["labels"][:1 + n_prompt] == [IGNORE] * (1 + n_prompt)
    assert full["labels"][1 + n_prompt:] == full["input_ids"][1 + n_prompt:]  # the answer and eos
    cut = tokenize_prompt_answer(tok, prompt, answer, max_length=6)  # the prompt's front goes, not the bos
    assert len(cut["input_ids"]) == 6 and cut["input_ids"][0] == bos
    assert cut["input_ids"][1:] == full["input_ids"][-5:]
    text = training_text(tok, "The heart pumps blood.", max_length=64)
    assert text["input_ids"][0] == bos and text["labels"] == text["input_ids"]


def test_medmcqa_contexts_begin_with_bos_batched_and_one_at_a_time(llama_with_bos, eval_world):
    model, tok = llama_with_bos
    examples = load_medmcqa(str(eval_world.medmcqa))[0][:6]
    batched = evaluate_medmcqa(model, tok, examples, modes=MODES, batch_size=4)
    reference = medmcqa_one_by_one(model, tok, examples, modes=MODES)
    for b, r in zip(batched, reference):
        assert [b[f"pred_{m}"] for m in MODES] == [r[f"pred_{m}"] for m in MODES]
        np.testing.assert_allclose(b["ll_answer"], r["ll_answer"], atol=1e-4, rtol=0)
    prompt_ids = tok(MedMCQAPrompt().prompt(examples[0]), add_special_tokens=False)["input_ids"]
    letter_a = tok(" A", add_special_tokens=False)["input_ids"]
    with_bos = loglikelihood(model, [tok.bos_token_id] + prompt_ids, letter_a)
    assert batched[0]["ll_letter"][0] == pytest.approx(with_bos, abs=1e-4)
    assert abs(loglikelihood(model, prompt_ids, letter_a) - with_bos) > 1e-3  # the bos matters to this model


def test_triviaqa_prompts_begin_with_bos_batched_and_one_at_a_time(llama_with_bos, eval_world):
    model, tok = llama_with_bos
    examples = load_triviaqa(str(eval_world.triviaqa))[0][:6]
    batched = evaluate_triviaqa(model, tok, examples, max_new_tokens=8, batch_size=4)
    reference = triviaqa_one_by_one(model, tok, examples, max_new_tokens=8)
    assert [b["tokens"] for b in batched] == [r["tokens"] for r in reference]
    prompts = [tok(ex.prompt(), add_special_tokens=False)["input_ids"] for ex in examples]
    with_bos = [generate_one(model, tok, [tok.bos_token_id] + p, max_new_tokens=8) for p in prompts]
    without = [generate_one(model, tok, p, max_new_tokens=8) for p in prompts]
    assert [b["tokens"] for b in batched] == with_bos != without  # the bos changes this model's answers


def test_wikitext_stream_has_one_bos_at_its_start(llama_with_bos, eval_world):
    model, tok = llama_with_bos
    text = join_docs(load_wikitext(str(eval_world.wikitext))[0])
    ids = tokenize_text(tok, text)
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    got = evaluate_perplexity(model, tok, text, max_length=48, stride=24, batch_size=4)
    want = perplexity_one_by_one(model, tok, text, max_length=48, stride=24)
    np.testing.assert_allclose([g["nll"] for g in got], [w["nll"] for w in want], atol=1e-4, rtol=0)
    assert sum(g["n_tokens"] for g in got) == len(ids) - 1


def test_a_template_written_with_its_own_bos_gets_no_second_one(llama_with_bos, eval_world):
    """Llama-2 chat prompts are written "<s>[INST] ...": the tokenizer reads "<s>" as the BOS."""
    from smf_ds.data.medmcqa import DEFAULT_TEMPLATE
    from smf_ds.eval.medmcqa import tokenize_medmcqa
    from smf_ds.tokens import encode_start

    _, tok = llama_with_bos
    bos = tok.bos_token_id
    example = load_medmcqa(str(eval_world.medmcqa))[0][0]
    plain, own = MedMCQAPrompt(), MedMCQAPrompt(template="<s>" + DEFAULT_TEMPLATE)
    (context,), _ = tokenize_medmcqa(tok, [example], own, ["letter"])
    assert context == tokenize_medmcqa(tok, [example], plain, ["letter"])[0][0] and context.count(bos) == 1
    assert encode_start(tok, "<s>Question: why?") == encode_start(tok, "Question: why?")
    pair = tokenize_prompt_answer(tok, "<s>Question: why?\nAnswer:", " A", max_length=64)
    assert pair == tokenize_prompt_answer(tok, "Question: why?\nAnswer:", " A", max_length=64)
