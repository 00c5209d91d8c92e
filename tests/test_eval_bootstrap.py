"""Bootstrap intervals: seeded, percentile method, ratio statistic for perplexity."""
import numpy as np
import pytest

from smf_ds.eval.bootstrap import bootstrap_mean, bootstrap_ratio


def test_mean_interval_is_seeded_and_brackets_the_mean():
    x = np.random.default_rng(0).random(200) < 0.3
    a, b = bootstrap_mean(x, seed=1), bootstrap_mean(x, seed=1)
    assert a == b and a["n"] == 200 and a["value"] == pytest.approx(x.mean())
    lo, hi = a["ci95"]
    assert lo < a["value"] < hi
    # close to the normal approximation for a proportion
    half = 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert hi - lo == pytest.approx(2 * half, rel=0.2)
    assert bootstrap_mean(x, seed=2)["ci95"] != a["ci95"]


def test_degenerate_and_empty_inputs():
    assert bootstrap_mean([1.0] * 10)["ci95"] == [1.0, 1.0]
    assert bootstrap_mean([]) == {"value": None, "ci95": [None, None], "n": 0}
    assert bootstrap_ratio([], [])["value"] is None
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0], [1.0, 2.0])


def test_ratio_interval_for_perplexity():
    rng = np.random.default_rng(0)
    counts = rng.integers(50, 100, size=40).astype(float)
    nll = counts * (2.0 + 0.1 * rng.standard_normal(40))
    r = bootstrap_ratio(nll, counts, np.exp, n_boot=500, seed=0)
    assert r["value"] == pytest.approx(np.exp(nll.sum() / counts.sum()))
    assert r["ci95"][0] < r["value"] < r["ci95"][1] and r["n"] == 40
    # resampling is chunked; the draws (and so the interval) do not depend on the chunk size
    import smf_ds.eval.bootstrap as B

    old = B.CHUNK
    try:
        B.CHUNK = 7
        assert bootstrap_ratio(nll, counts, np.exp, n_boot=500, seed=0)["ci95"] == r["ci95"]
    finally:
        B.CHUNK = old
