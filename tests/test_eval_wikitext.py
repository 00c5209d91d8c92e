"""Strided perplexity: windows, batched == one window per forward, and a direct computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F


from smf_ds.data.wikitext import join_docs, load_wikitext
from smf_ds.eval.reference import perplexity_one_by_one
from smf_ds.eval.wikitext import evaluate_perplexity, make_windows, summarize_perplexity


@pytest.mark.parametrize("n,max_length,stride", [(100, 32, 16), (100, 32, 32), (33, 32, 8), (5, 32, 16),
                                                 (2, 4, 1), (97, 10, 3)])
def test_overlapping_windows_score_every_token_after_the_first_exactly_once(n, max_length, stride):
    windows = make_windows(n, max_length, stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    if stride < max_length:
        assert scored == list(range(1, n))
    else:  # disjoint windows: a window's first token has no context in it and is not scored (as in HF's guide)
        assert scored == [t for t in range(1, n) if t % max_length]
    for w in windows:
        assert w.end - w.begin <= max_length and w.begin < w.first < w.end
    assert [w.index for w in windows] == list(range(len(windows)))


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="stride"):
        make_windows(10, 4, 5)
    with pytest.raises(ValueError, match="max_length"):
        make_windows(10, 1, 1)
    assert make_windows(1, 8, 4) == [] and make_windows(0, 8, 4) == []


def test_perplexity_equals_a_direct_computation_on_a_short_text(tiny_lm):
    model, tok = tiny_lm
    text = " = Heart = \n\n The heart pumps blood through the artery and the vein . \n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 10 < len(ids) < 64
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    direct = math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    for max_length, stride in ((64, 64), (8, 4), (8, 8), (5, 1)):  # one window, then several per batch
        records = evaluate_perplexity(model, tok, text, max_length=max_length, stride=stride, batch_size=3)
        skipped = (len(ids) - 1) // max_length if stride == max_length else 0  # first token of windows 2, 3, ...
        assert sum(r["n_tokens"] for r in records) == len(ids) - 1 - skipped
        ppl = summarize_perplexity(records, n_boot=50)["perplexity"]["value"]
        if max_length == 64:
            assert ppl == pytest.approx(direct, rel=1e-5)
        else:
            assert ppl != pytest.approx(direct, rel=1e-3)  # shorter context, different (worse) number
            assert np.isfinite(ppl)


def test_batched_windows_equal_one_window_per_forward(tiny_lm, eval_world):
    model, tok = tiny_lm
    docs, _ = load_wikitext(str(eval_world.wikitext))
    text = join_docs(docs)
    for max_length, stride, batch_size in ((64, 32, 4), (48, 48, 6), (40, 7, 5)):
        got = evaluate_perplexity(model, tok, text, max_length=max_length, stride=stride, batch_size=batch_size)
        want = perplexity_one_by_one(model, tok, text, max_length=max_length, stride=stride)
        assert len(got) == len(want) > batch_size
        assert [(g["begin"], g["end"], g["n_tokens"]) for g in got] == [(w["begin"], w["end"], w["n_tokens"]) for w in want]
        np.testing.assert_allclose([g["nll"] / g["n_tokens"] for g in got], [w["nll"] / w["n_tokens"] for w in want],
                                   atol=1e-5, rtol=0)
        a = summarize_perplexity(got, n_boot=100)["perplexity"]
        b = summarize_perplexity(want, n_boot=100)["perplexity"]
        assert a["value"] == pytest.approx(b["value"], rel=1e-5)
        assert a["ci95"][0] < a["value"] < a["ci95"][1]


def test_equal_length_batches_never_mix_lengths():
    from smf_ds.eval.batching import plan_batches

    lengths = [8, 8, 8, 5, 8, 8, 3]
    assert plan_batches(lengths, 3, equal_lengths=True) == [[0, 1, 2], [4, 5], [3], [6]]
    assert plan_batches(lengths, 3) == [[0, 1, 2], [4, 5, 3], [6]]
