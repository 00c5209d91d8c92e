"""MedMCQA: batched scoring equals one forward per option (every mode), and the scorer's mechanics."""
import numpy as np
import pytest
import torch
from fixtures_eval import deprecation_notices

from smf_ds.data.medmcqa import MedMCQAPrompt, load_medmcqa
from smf_ds.eval.medmcqa import MODES, evaluate_medmcqa, summarize_medmcqa
from smf_ds.eval.reference import loglikelihood, medmcqa_one_by_one
from smf_ds.eval.scoring import NonFiniteModelError, _cache_kwarg, build_rows, score_requests, score_shared_context


@pytest.fixture(scope="module")
def examples(eval_world):
    ex, report = load_medmcqa(str(eval_world.medmcqa))
    assert report.n_filtered == 4 and len(ex) == 20
    return ex


@pytest.fixture(scope="module")
def reference(tiny_lm, examples):
    model, tok = tiny_lm
    return medmcqa_one_by_one(model, tok, examples, modes=MODES)


@pytest.mark.parametrize("batch_size", [7, 64])
def test_batched_equals_one_at_a_time_for_every_mode(tiny_lm, examples, reference, batch_size):
    model, tok = tiny_lm
    batched = evaluate_medmcqa(model, tok, examples, modes=MODES, batch_size=batch_size)
    assert len(batched) == len(reference) == len(examples)
    for b, r, ex in zip(batched, reference, examples):
        assert (b["index"], b["row"], b["id"], b["gold"]) == (ex.index, ex.row, ex.id, "ABCD"[ex.answer])
        for mode in MODES:
            assert b[f"pred_{mode}"] == r[f"pred_{mode}"]
            assert b[f"correct_{mode}"] == r[f"correct_{mode}"]
        for kind in ("letter", "answer"):
            np.testing.assert_allclose(b[f"ll_{kind}"], r[f"ll_{kind}"], atol=1e-4, rtol=0)
            assert b[f"n_tokens_{kind}"] == r[f"n_tokens_{kind}"]
    # the modes really differ somewhere on this data (else the test would not tell them apart)
    assert any(b["pred_answer"] != b["pred_answer_norm"] for b in batched) or \
        any(b["pred_letter"] != b["pred_answer"] for b in batched)


def test_letter_mode_reads_four_options_from_one_row(tiny_lm, examples):
    model, tok = tiny_lm
    ctx = tok("Answer:", add_special_tokens=False)["input_ids"]
    conts = [tok(f" {c}", add_special_tokens=False)["input_ids"] for c in "ABCD"]
    assert all(len(c) == 1 for c in conts)
    rows = build_rows([(ctx, c) for c in conts] + [(ctx, conts[0] + conts[1])])
    assert len(rows) == 2 and len(rows[0].items) == 4


def test_scores_equal_direct_loglikelihood_with_mixed_lengths(tiny_lm):
    model, tok = tiny_lm
    g = torch.Generator().manual_seed(0)
    requests = []
    for _ in range(13):
        n_ctx, n_cont = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        ids = torch.randint(1, len(tok), (n_ctx + n_cont,), generator=g).tolist()
        requests.append((ids[:n_ctx], ids[n_ctx:]))
    got = score_requests(model, requests, tok.pad_token_id, batch_size=5)
    want = [loglikelihood(model, c, x) for c, x in requests]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_shared_context_scores_equal_direct_loglikelihood(tiny_lm):
    """Each context read once, continuations of 1..8 tokens on its KV cache, vs one full forward each."""
    model, tok = tiny_lm
    g = torch.Generator().manual_seed(1)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    groups = []
    for _ in range(9):
        ctx = torch.randint(1, len(tok), (rand(1, 30),), generator=g).tolist()
        conts = [torch.randint(1, len(tok), (rand(1, 9),), generator=g).tolist() for _ in range(rand(1, 6))]
        groups.append((ctx, conts))
    for batch_size in (1, 4, 16):
        got = score_shared_context(model, groups, tok.pad_token_id, batch_size=batch_size)
        for (ctx, conts), scores in zip(groups, got):
            np.testing.assert_allclose(scores, [loglikelihood(model, ctx, c) for c in conts], atol=1e-4, rtol=0)


def test_shared_context_scoring_uses_no_deprecated_transformers_api(tiny_lm):
    """The continuation pass on the KV cache (multi-token continuations) triggers no deprecation
    notice: a deprecated argument may be removed in a later transformers 5.x (setup.py allows <6)."""
    model, tok = tiny_lm
    groups = [([5, 6, 7], [[8, 9, 10], [11]]), ([12, 13], [[14, 15], [16, 17, 18, 19]])]
    with deprecation_notices() as notices:
        got = score_shared_context(model, groups, tok.pad_token_id, batch_size=2)
    assert notices == []
    for (ctx, conts), scores in zip(groups, got):
        np.testing.assert_allclose(scores, [loglikelihood(model, ctx, c) for c in conts], atol=1e-4, rtol=0)


def test_cache_argument_follows_the_model_signature():
    class OldModel(torch.nn.Module):  # transformers before the `cache` rename
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return input_ids

    class NewModel(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):
            return input_ids

    assert _cache_kwarg(NewModel()) == "cache"
    assert _cache_kwarg(OldModel()) == "past_key_values"


def test_custom_template_and_mode_subset(tiny_lm, examples):
    model, tok = tiny_lm
    prompt = MedMCQAPrompt(template="Q: {question}\n(A) {opa} (B) {opb} (C) {opc} (D) {opd}\nAnswer:")
    recs = evaluate_medmcqa(model, tok, examples[:5], prompt, modes=("answer_norm",), batch_size=3)
    ref = medmcqa_one_by_one(model, tok, examples[:5], prompt, modes=("answer_norm",))
    assert [r["pred_answer_norm"] for r in recs] == [r["pred_answer_norm"] for r in ref]
    assert "pred_letter" not in recs[0] and "ll_letter" not in recs[0]
    with pytest.raises(ValueError, match="modes"):
        evaluate_medmcqa(model, tok, examples[:1], modes=("letters",))


def test_summary_has_accuracy_and_interval_per_mode(tiny_lm, examples):
    model, tok = tiny_lm
    recs = evaluate_medmcqa(model, tok, examples, batch_size=64)
    summary = summarize_medmcqa(recs, MODES, n_boot=200, seed=0)
    for mode in MODES:
        m = summary[f"accuracy_{mode}"]
        assert m["n"] == len(examples)
        assert m["value"] == pytest.approx(np.mean([r[f"correct_{mode}"] for r in recs]))
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1]


def test_non_finite_logits_fail_naming_the_example(tiny_lm, examples):
    model, tok = tiny_lm
    old = model.lm_head.weight.data.clone()
    try:
        model.lm_head.weight.data[:] = float("nan")
        with pytest.raises(NonFiniteModelError, match="medmcqa: example 0 has a non-finite log-likelihood"):
            evaluate_medmcqa(model, tok, examples[:2])
        # The evaluation as a whole stops before any task, every task (TriviaQA would decode NaN logits).
        from smf_ds.eval.runner import EvalSettings, run_tasks

        with pytest.raises(NonFiniteModelError, match="NaN/inf logits on a short probe text: .*nothing was evaluated"):
            run_tasks(model, tok, ["triviaqa"], EvalSettings(triviaqa="unused"), echo=None)
    finally:
        model.lm_head.weight.data.copy_(old)
