"""Sweeps (smf_ds.experiment.sweep), and frontiers and matched-gain tables on hand-made points
(smf_ds.experiment.frontier)."""
import numpy as np
import pytest

from smf_ds.config import ConfigError
from smf_ds.experiment.frontier import interpolate, matched_levels, method_of, pareto_front, tradeoffs
from smf_ds.experiment.stats import paired_delta
from smf_ds.experiment.sweep import expand_sweep


def test_the_front_keeps_only_undominated_points_by_increasing_gain():
    gain = np.array([0.1, 0.2, 0.15, 0.3, 0.2, 0.1])
    forgetting = np.array([0.1, 0.3, 0.4, 0.5, 0.3, 0.2])  # 2 is beaten by 1; 4 equals 1; 5 is beaten by 0
    assert pareto_front(gain, forgetting) == [0, 1, 3]


def test_interpolation_along_a_hand_made_frontier():
    gain, forgetting = np.array([0.3, 0.1, 0.2]), np.array([0.5, 0.1, 0.3])  # any order
    assert interpolate(gain, forgetting, 0.15) == pytest.approx(0.2)
    assert interpolate(gain, forgetting, 0.25) == pytest.approx(0.4)
    assert interpolate(gain, forgetting, 0.3) == pytest.approx(0.5)
    assert interpolate(forgetting, gain, 0.4) == pytest.approx(0.25)  # the reverse reading
    assert interpolate(gain, forgetting, 0.05) is None and interpolate(gain, forgetting, 0.35) is None
    assert interpolate(np.array([0.2]), np.array([0.7]), 0.2) == 0.7
    assert interpolate(np.array([0.2]), np.array([0.7]), 0.21) is None
    # tied x (a resample of accuracies): the mean of their y, on either side of the tie too
    tied_x, tied_y = np.array([0.1, 0.2, 0.2, 0.3]), np.array([0.0, 1.0, 3.0, 4.0])
    assert interpolate(tied_x, tied_y, 0.2) == pytest.approx(2.0)
    assert interpolate(tied_x, tied_y, 0.15) == pytest.approx(1.0)
    assert interpolate(tied_x, tied_y, 0.25) == pytest.approx(3.0)


def test_matched_levels_lie_inside_where_two_frontiers_reach():
    spans = {"a": (0.1, 0.3), "b": (0.2, 0.5), "c": (0.6, 0.7)}
    assert matched_levels(spans) == pytest.approx([0.225, 0.25, 0.275])  # inside [0.2, 0.3], not at its ends
    assert matched_levels({"a": (0.1, 0.2), "b": (0.3, 0.4)}) == []
    assert matched_levels({"a": (0.1, 0.4), "b": (0.2, 0.2)}) == []  # one shared value: no stretch
    # two separate stretches reached by two: levels only where two reach
    spans = {"a": (0.0, 1.0), "b": (0.0, 0.1), "c": (0.9, 1.0)}
    assert matched_levels(spans, n=5) == []
    assert matched_levels(spans, n=9) == pytest.approx([0.1, 0.9])


def _delta(value):
    return {"delta": {"value": value}}


def test_tradeoffs_read_each_method_off_its_own_front_with_paired_intervals():
    points = {  # variant: (task gain, Δ TriviaQA accuracy, Δ WikiText perplexity)
        "smf@lr=1": (0.10, -0.01, 0.5), "smf@lr=2": (0.20, -0.02, 2.0), "smf@lr=3": (0.15, -0.05, 2.0),
        "lora@lr=1": (0.12, -0.04, 1.5), "lora@lr=2": (0.30, -0.10, 4.0), "full": (0.25, -0.20, 9.0)}
    variants = {v: {"medmcqa": _delta(g), "triviaqa": _delta(t), "wikitext": _delta(w)} for v, (g, t, w) in points.items()}
    rng = np.random.default_rng(0)
    shift = rng.normal(0, 0.002, size=400)  # one shared shift per resample: paired
    samples = {v: {"medmcqa": g + shift, "triviaqa": t - shift, "wikitext": w + 10 * shift}
               for v, (g, t, w) in points.items()}
    out = tradeoffs(variants, samples)
    trivia = out["triviaqa"]
    assert trivia["frontiers"] == {"smf": ["smf@lr=1", "smf@lr=2"], "lora": ["lora@lr=1", "lora@lr=2"], "full": ["full"]}
    # gains two frontiers span: smf 0.10-0.20 and lora 0.12-0.30 share 0.12-0.20 (full's one point spans nothing)
    assert [row["level"] for row in trivia["matched_gain"]] == pytest.approx([0.14, 0.16, 0.18])
    for row in trivia["matched_gain"]:
        assert set(row["methods"]) == {"smf", "lora"}
    middle = trivia["matched_gain"][1]["methods"]
    assert middle["smf"]["value"] == pytest.approx(0.01 + 0.06 / 0.1 * 0.01)  # forgetting = -Δ accuracy
    assert middle["lora"]["value"] == pytest.approx(0.04 + 0.04 / 0.18 * 0.06)
    for method in ("smf", "lora"):
        lo, hi = middle[method]["ci95"]
        assert lo <= middle[method]["value"] <= hi and hi - lo < 0.01 and middle[method]["reached"] > 0.9
    # the reverse: task gain at matched WikiText forgetting (+ Δ perplexity); smf 0.5-2.0, lora 1.5-4.0
    wiki = out["wikitext"]["matched_forgetting"]
    assert [row["level"] for row in wiki] == pytest.approx([1.625, 1.75, 1.875])
    assert wiki[1]["methods"]["smf"]["value"] == pytest.approx(0.10 + 1.25 / 1.5 * 0.10)
    assert wiki[1]["methods"]["lora"]["value"] == pytest.approx(0.12 + 0.25 / 2.5 * 0.18)
    assert all("full" not in row["methods"] for row in wiki)


def test_every_variant_of_a_task_gets_the_same_resamples():
    """What makes the matched intervals paired: a variant that is another plus a constant has
    resampled deltas that differ by exactly that constant."""
    rng = np.random.default_rng(1)
    base, runs = rng.random(50), rng.random((2, 50))
    a = paired_delta(base, runs, None, n_boot=300, seed=4, keep_samples=True)["samples"]
    b = paired_delta(base, runs + 0.25, None, n_boot=300, seed=4, keep_samples=True)["samples"]
    assert a.shape == (300,) and np.allclose(b - a, 0.25) and a.std() > 0


def test_a_variant_without_a_sweep_is_its_own_method():
    assert method_of("smf-tfidf@memory.value_lr=300,sparse.top_t=128") == "smf-tfidf"
    assert method_of("lora") == "lora"


def test_a_sweep_makes_every_combination_a_variant_of_its_method():
    variants = {"smf": ["train.method=smf"], "lora": ["train.method=lora"], "full": ["train.method=full"]}
    points = expand_sweep(variants, {"smf": {"memory.value_lr": [0.5, 2.0], "sparse.top_t": [100, 500]},
                                     "lora": {"train.lr": [0.0001]}})
    assert list(points) == ["smf@memory.value_lr=0.5,sparse.top_t=100", "smf@memory.value_lr=0.5,sparse.top_t=500",
                            "smf@memory.value_lr=2.0,sparse.top_t=100", "smf@memory.value_lr=2.0,sparse.top_t=500",
                            "lora@train.lr=0.0001", "full"]
    assert points["smf@memory.value_lr=2.0,sparse.top_t=100"] == ["train.method=smf", "memory.value_lr=2.0",
                                                                 "sparse.top_t=100"]
    assert {method_of(p) for p in points} == set(variants)


@pytest.mark.parametrize("sweep, message", [
    ({"smf-typo": {"train.lr": [1]}}, r"sweep: \['smf-typo'\] are not variants"),
    ({"smf": {"train.lr": []}}, r"sweep.smf.train.lr: expected a list of distinct values"),
    ({"smf": {"train.lr": [1, 1]}}, r"sweep.smf.train.lr: expected a list of distinct values"),
    ({"smf": {"train.lr": 0.1}}, r"sweep.smf.train.lr: expected a list"),
    ({"smf": {}}, r"sweep.smf: expected a mapping"),
    ({"smf": {"data.train": ["a/b.jsonl"]}}, r"sweep.smf.data.train: a value with '/' cannot name a run directory")])
def test_a_bad_sweep_is_named(sweep, message):
    with pytest.raises(ConfigError, match=message):
        expand_sweep({"smf": ["train.method=smf"]}, sweep)


def test_a_variant_named_like_a_sweep_point_is_refused():
    with pytest.raises(ConfigError, match=r"variants: \['lora@r8'\]: '@' is kept for sweep points"):
        expand_sweep({"lora": ["train.method=lora"], "lora@r8": ["train.lora_r=8"]}, {})


def test_the_report_prints_the_matched_tables_and_draws_the_fronts(tmp_path):
    from smf_ds.experiment.report import matched_tables, plot_tradeoff

    points = {"smf@lr=1": (0.10, -0.01, 0.5), "smf@lr=2": (0.20, -0.02, 2.0),
              "lora@lr=1": (0.12, -0.04, 1.5), "lora@lr=2": (0.30, -0.10, 4.0)}
    variants = {v: {"medmcqa": {"delta": {"value": g, "ci95": [g - 0.01, g + 0.01]}},
                    "triviaqa": {"delta": {"value": t, "ci95": [t - 0.01, t + 0.01]}},
                    "wikitext": {"delta": {"value": w, "ci95": [w - 0.1, w + 0.1]}}} for v, (g, t, w) in points.items()}
    samples = {v: {task: np.full(50, row[task]["delta"]["value"]) for task in row} for v, row in variants.items()}
    results = {"variants": variants, "tradeoffs": tradeoffs(variants, samples)}
    text = "\n".join(matched_tables(results))
    assert "**forgetting (-Δ TriviaQA acc) at matched Δ MedMCQA acc** (TriviaQA acc probe)" in text
    assert "**Δ MedMCQA acc at matched forgetting (+Δ WikiText ppl)** (WikiText ppl probe)" in text
    assert "| Δ MedMCQA acc | smf | lora |" in text
    assert "| +0.160 | +0.016 [+0.016, +0.016] | +0.053 [+0.053, +0.053] |" in text  # level 0.16, as hand-made above
    plot = plot_tradeoff(results, tmp_path / "tradeoff.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matched_tables({"variants": variants, "tradeoffs": {}}) == []
