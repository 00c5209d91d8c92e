"""Sweeps (smf_ds.experiment.sweep), and frontiers and matched-gain tables on hand-made points
(smf_ds.experiment.frontier)."""
import numpy as np
import pytest

from smf_ds.config import ConfigError
from smf_ds.experiment.frontier import interpolate, matched_levels, method_of, pareto_front, tradeoffs
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


def test_matched_levels_lie_where_two_frontiers_reach():
    spans = {"a": (0.1, 0.3), "b": (0.2, 0.5), "c": (0.6, 0.7)}
    assert matched_levels(spans) == pytest.approx([0.2, 0.25, 0.3])
    assert matched_levels({"a": (0.1, 0.2), "b": (0.3, 0.4)}) == []
    assert matched_levels({"a": (0.1, 0.4), "b": (0.2, 0.2)}) == [0.2]
    # two separate stretches reached by two: levels only where two reach
    levels = matched_levels({"a": (0.0, 1.0), "b": (0.0, 0.1), "c": (0.9, 1.0)}, n=5)
    assert levels == pytest.approx([0.0, 1.0])


def _delta(value):
    return {"delta": {"value": value}}


def test_tradeoffs_read_each_method_off_its_own_front_with_paired_intervals():
    points = {  # variant: (task gain, Δ TriviaQA accuracy, Δ WikiText perplexity)
        "smf@lr=1": (0.10, -0.01, 0.5), "smf@lr=2": (0.20, -0.02, 2.0), "smf@lr=3": (0.15, -0.05, 2.0),
        "lora@lr=1": (0.12, -0.04, 1.5), "lora@lr=2": (0.30, -0.10, 4.0), "full": (0.25, -0.20, 9.0)}
    variants = {v: {"medmcqa": _delta(g), "triviaqa": _delta(t), "wikitext": _delta(w)} for v, (g, t, w) in points.items()}
    rng = np.random.default_rng(0)
    shift = rng.normal(0, 0.002, size=(400, 1))  # one shared shift per resample: paired
    samples = {v: {"medmcqa": g + shift[:, 0], "triviaqa": t + 0 * shift[:, 0], "wikitext": w + 0 * shift[:, 0]}
               for v, (g, t, w) in points.items()}
    out = tradeoffs(variants, samples)
    trivia = out["triviaqa"]
    assert trivia["frontiers"] == {"smf": ["smf@lr=1", "smf@lr=2"], "lora": ["lora@lr=1", "lora@lr=2"], "full": ["full"]}
    # gains spanned by two frontiers: smf 0.10-0.20, lora 0.12-0.30, full 0.25 alone (inside lora's)
    levels = [row["level"] for row in trivia["matched_gain"]]
    assert levels == pytest.approx([0.12, 0.185, 0.25])
    middle = trivia["matched_gain"][1]["methods"]
    assert set(middle) == {"smf", "lora"}
    assert middle["smf"]["value"] == pytest.approx(0.01 + 0.085 / 0.1 * 0.01)  # forgetting = -Δ accuracy
    assert middle["lora"]["value"] == pytest.approx(0.04 + 0.065 / 0.18 * 0.06)
    for method in ("smf", "lora"):
        lo, hi = middle[method]["ci95"]
        assert lo <= middle[method]["value"] <= hi and hi - lo < 0.01 and middle[method]["reached"] > 0.9
    top = trivia["matched_gain"][2]["methods"]
    assert set(top) == {"lora", "full"} and top["full"]["value"] == pytest.approx(0.2)
    # the reverse: task gain at matched WikiText forgetting (+ Δ perplexity)
    wiki = out["wikitext"]["matched_forgetting"]
    assert [row["level"] for row in wiki] == pytest.approx([1.5, 1.75, 2.0])  # smf 0.5-2.0, lora 1.5-4.0
    assert wiki[0]["methods"]["lora"]["value"] == pytest.approx(0.12)
    assert wiki[0]["methods"]["smf"]["value"] == pytest.approx(0.10 + 1.0 / 1.5 * 0.10)
    assert wiki[2]["methods"]["lora"]["value"] == pytest.approx(0.12 + 0.5 / 2.5 * 0.18)
    assert "full" not in wiki[1]["methods"]  # full's one point is at 9.0


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
    ({"smf": {}}, r"sweep.smf: expected a mapping")])
def test_a_bad_sweep_is_named(sweep, message):
    with pytest.raises(ConfigError, match=message):
        expand_sweep({"smf": ["train.method=smf"]}, sweep)
