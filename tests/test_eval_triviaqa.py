"""TriviaQA: left-padded batched greedy generation equals unbatched, token for token; metrics."""
import contextlib

import pytest
import torch
from fixtures_eval import deprecation_notices

from smf_ds.data.triviaqa import TriviaQAExample, load_triviaqa
from smf_ds.eval.reference import generate_one, triviaqa_one_by_one
from smf_ds.eval.triviaqa import (contains_match, cut_at_stop, evaluate_triviaqa, exact_match, generate_batched,
                                  newline_token_ids, normalize_answer, summarize_triviaqa, token_f1)


@pytest.fixture(scope="module")
def examples(eval_world):
    ex, report = load_triviaqa(str(eval_world.triviaqa))
    assert report.n_malformed == 0
    return ex


@contextlib.contextmanager
def newline_bias(model, tok, value):
    """Add `value` to the newline logits (an lm_head bias), so some rows stop early and others do not."""
    bias = torch.zeros(len(tok))
    bias[sorted(newline_token_ids(tok))] = value
    old = model.lm_head.bias
    model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        yield
    finally:
        model.lm_head.bias = old


@pytest.mark.parametrize("bias", [0.0, 2.0])
def test_left_padded_batched_generation_equals_unbatched(tiny_lm, examples, bias):
    model, tok = tiny_lm
    prompts = [tok(ex.prompt(), add_special_tokens=False)["input_ids"] for ex in examples]
    assert len({len(p) for p in prompts}) > 3  # real padding in every batch
    with newline_bias(model, tok, bias):
        want = [generate_one(model, tok, p, max_new_tokens=12) for p in prompts]
        for batch_size in (6, 32):
            got = generate_batched(model, tok, prompts, max_new_tokens=12, batch_size=batch_size)
            assert got == want
    lengths = {len(w) for w in want}
    if bias:  # rows of one batch stop at different steps; finished rows are padded meanwhile
        assert 0 in lengths and 12 in lengths and len(lengths) > 3
    else:
        assert lengths == {12}


def test_generation_uses_no_deprecated_transformers_api(tiny_lm, examples):
    model, tok = tiny_lm
    with deprecation_notices() as notices:
        evaluate_triviaqa(model, tok, examples[:3], max_new_tokens=4, batch_size=3)
    assert notices == []


def test_generation_stops_at_newline_and_eos(tiny_lm):
    model, tok = tiny_lm
    newline = newline_token_ids(tok)
    assert newline and all("\n" in tok.decode([i]) for i in newline)
    nl = min(newline)
    assert cut_at_stop([5, 6, nl, 7], newline | {tok.eos_token_id}) == [5, 6]
    assert cut_at_stop([5, tok.eos_token_id, 7], newline | {tok.eos_token_id}) == [5]
    with newline_bias(model, tok, 100.0):  # a newline is certain: generation stops right there
        assert generate_batched(model, tok, [[5, 6, 7], [8]], max_new_tokens=5, batch_size=2) == [[], []]


def test_records_and_metrics_match_the_reference(tiny_lm, examples):
    model, tok = tiny_lm
    got = evaluate_triviaqa(model, tok, examples, max_new_tokens=8, batch_size=5)
    want = triviaqa_one_by_one(model, tok, examples, max_new_tokens=8)
    assert got == want
    summary = summarize_triviaqa(got, n_boot=100)
    assert set(summary) == {"contains", "em", "f1"} and summary["em"]["n"] == len(examples)


def test_squad_normalization_and_metrics():
    assert normalize_answer("The  Beatles!") == "beatles"
    assert normalize_answer("An apple, a day") == "apple day"
    refs = ["The Beatles", "Beatles"]
    assert exact_match("beatles.", refs) and not exact_match("the beatles band", refs)
    assert contains_match("I think it was the Beatles band", refs)  # the paper's alias-contains
    assert not contains_match("Rolling Stones", refs)
    assert token_f1("the beatles band", refs) == pytest.approx(2 * (1 / 2 * 1) / (1 / 2 + 1))
    assert token_f1("", refs) == 0.0 and token_f1("Beatles", refs) == 1.0
    assert not contains_match("anything", ["", "!!"])  # empty references never match
    # Answers that are only articles normalize to nothing: found as text, and never below exact match.
    assert exact_match("The The", ["The The"]) and contains_match("The The", ["The The"])
    assert contains_match("It was The The, I think", ["The The"]) and contains_match("A", ["A"])
    assert not contains_match("B", ["A"]) and not contains_match("Then there", ["The The"])


def test_prediction_records_carry_references(tiny_lm):
    model, tok = tiny_lm
    ex = [TriviaQAExample(0, 3, "q0", "Which river?", "Nile", ["Nile", "River Nile", "nile"])]
    (rec,) = evaluate_triviaqa(model, tok, ex, max_new_tokens=4, batch_size=1)
    assert (rec["index"], rec["row"], rec["id"], rec["answer"]) == (0, 3, "q0", "Nile")
    assert rec["references"] == ["Nile", "River Nile", "nile"] and isinstance(rec["prediction"], str)
    assert set(rec) >= {"contains", "em", "f1", "tokens"}


def test_llama_architecture_batched_equals_unbatched(tiny_lm, examples):
    """The same checks on a tiny Llama (rotary positions from explicit / generate-derived position ids)."""
    from smf_ds.data.tiny import build_tiny_model
    from smf_ds.eval.reference import loglikelihood
    from smf_ds.eval.scoring import score_requests, score_shared_context

    _, tok = tiny_lm
    llama = build_tiny_model(tok, arch="llama", seed=3)
    prompts = [tok(ex.prompt(), add_special_tokens=False)["input_ids"] for ex in examples[:10]]
    want = [generate_one(llama, tok, p, max_new_tokens=6) for p in prompts]
    assert generate_batched(llama, tok, prompts, max_new_tokens=6, batch_size=4) == want
    requests = [(p[:-3], p[-3:]) for p in prompts]
    want = [loglikelihood(llama, c, x) for c, x in requests]
    assert score_requests(llama, requests, tok.pad_token_id, batch_size=4) == pytest.approx(want, abs=1e-4)
    shared = score_shared_context(llama, [(c, [x, x[:1]]) for c, x in requests], tok.pad_token_id, batch_size=4)
    assert [s[0] for s in shared] == pytest.approx(want, abs=1e-4)
