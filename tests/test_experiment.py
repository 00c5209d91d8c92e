"""`smf-ds experiment` / `smf-ds report`: paired bootstrap deltas, aggregation over seeds, and the
whole grid end to end on the embedded world (quick)."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from launchers import smf_ds_cli
from safetensors.torch import load_file

from smf_ds.eval.bootstrap import CHUNK, bootstrap_statistic
from smf_ds.experiment.stats import aggregate, metric_of, paired_delta, paired_delta_per_base

REPO = Path(__file__).resolve().parents[1]


def test_paired_delta_matches_a_resample_by_resample_loop():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 40).astype(float)
    runs = rng.integers(0, 2, (3, 40)).astype(float)
    n_boot, seed = 250, 7  # not a multiple of CHUNK: the last chunk is short
    got = paired_delta(base, runs, None, n_boot=n_boot, seed=seed)
    draw = np.random.default_rng(seed)
    deltas = []
    for start in range(0, n_boot, CHUNK):
        for idx in draw.integers(0, 40, size=(min(CHUNK, n_boot - start), 40)):
            deltas.append(np.mean([r[idx].mean() for r in runs]) - base[idx].mean())
    assert len(deltas) == n_boot
    assert got["value"] == pytest.approx(runs.mean() - base.mean())
    assert got["ci95"] == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])))


def test_paired_delta_of_a_model_with_itself_is_exactly_zero():
    base = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    assert paired_delta(base, np.stack([base, base]), None, n_boot=100) == {"value": 0.0, "ci95": [0.0, 0.0], "n": 5}


def test_perplexity_metric_is_exp_of_nll_per_token():
    nll, tokens = np.array([[2.0, 6.0, 1.0]]), np.array([2.0, 3.0, 1.0])
    assert metric_of(nll, tokens, np.arange(3)[None])[0, 0] == pytest.approx(math.exp(9.0 / 6.0))
    # resampling window 1 twice: (6 + 6) / (3 + 3)
    assert metric_of(nll, tokens, np.array([[1, 1]]))[0, 0] == pytest.approx(math.exp(2.0))


def test_bootstrap_statistic_of_nothing_is_empty():
    assert bootstrap_statistic(lambda idx: idx.sum(axis=1), 0)["value"] is None


def test_per_base_interval_carries_the_spread_between_bases():
    """Runs that beat their own base by 0, 1 and 2 on every example: the shared-base interval
    (examples only) has no width; the per-base one spans most of [0, 2] and never leaves it."""
    rng = np.random.default_rng(1)
    bases = rng.random((3, 30))
    runs = bases + np.array([[0.0], [1.0], [2.0]])
    got = paired_delta_per_base(bases, runs, None, n_boot=400, seed=3)
    assert got["value"] == pytest.approx(1.0) and got["per_base"] == pytest.approx([0.0, 1.0, 2.0])
    # 3 of 3 bases drawn: their deviations widened by sqrt(3/2) first (else the spread shrinks by 2/3);
    # all three draws the lowest base (or the highest) in 1 of 27 replicates, more than 2.5%
    widened = np.sqrt(3 / 2)
    assert got["ci95"] == pytest.approx([1 - widened, 1 + widened])
    assert not got["same_sign_on_every_base"]  # 0 on base 0, + on the others
    shifted = paired_delta_per_base(bases, bases + 0.5, None, n_boot=100)
    assert shifted["same_sign_on_every_base"] and shifted["ci95"] == pytest.approx([0.5, 0.5])


def test_per_base_interval_of_identical_bases_is_the_shared_base_interval():
    """With every base the same (and every run), only the examples vary: the per-base interval is
    the shared-base one, resample for resample (the example resamples are the same draws)."""
    rng = np.random.default_rng(2)
    base = rng.integers(0, 2, 50).astype(float)
    run = rng.integers(0, 2, 50).astype(float)
    shared = paired_delta(base, np.stack([run] * 3), None, n_boot=250, seed=5, keep_samples=True)
    per_base = paired_delta_per_base(np.stack([base] * 3), np.stack([run] * 3), None, n_boot=250, seed=5,
                                     keep_samples=True)
    assert np.allclose(per_base["samples"], shared["samples"]) and per_base["ci95"] == pytest.approx(shared["ci95"])


def _write_eval(directory: Path, correct_med, contains, nll, ids=None):
    directory.mkdir(parents=True)
    ids = ids or [f"q{i}" for i in range(len(correct_med))]
    (directory / "medmcqa.predictions.jsonl").write_text("".join(
        json.dumps({"index": i, "id": q, "correct_answer": bool(c)}) + "\n" for i, (q, c) in enumerate(zip(ids, correct_med))))
    (directory / "triviaqa.predictions.jsonl").write_text("".join(
        json.dumps({"index": i, "id": f"t{i}", "contains": bool(c)}) + "\n" for i, c in enumerate(contains)))
    (directory / "wikitext.predictions.jsonl").write_text("".join(
        json.dumps({"index": i, "nll": v, "n_tokens": 4}) + "\n" for i, v in enumerate(nll)))
    return directory


def test_aggregate_averages_seeds_and_pairs_with_the_base(tmp_path):
    base = _write_eval(tmp_path / "base", [0, 0, 1, 1], [1, 1, 1, 1], [4.0, 4.0])
    s0 = _write_eval(tmp_path / "s0", [1, 0, 1, 1], [1, 0, 1, 1], [8.0, 8.0])
    s1 = _write_eval(tmp_path / "s1", [1, 1, 1, 1], [1, 1, 0, 0], [4.0, 12.0])
    out = aggregate(base, {"smf-tfidf": {0: s0, 1: s1}}, n_boot=200)
    assert out["base"] == pytest.approx({"medmcqa": 0.5, "triviaqa": 1.0, "wikitext": math.e})
    row = out["variants"]["smf-tfidf"]
    assert row["seeds"] == [0, 1]
    assert row["medmcqa"]["per_seed"] == pytest.approx([0.75, 1.0])
    assert row["medmcqa"]["sd"] == pytest.approx(np.std([0.75, 1.0], ddof=1))
    assert row["medmcqa"]["delta"]["value"] == pytest.approx(0.875 - 0.5)
    assert row["triviaqa"]["delta"]["value"] == pytest.approx(0.625 - 1.0)
    assert row["wikitext"]["per_seed"] == pytest.approx([math.exp(2.0), math.exp(2.0)])
    assert row["wikitext"]["delta"]["value"] == pytest.approx(math.exp(2.0) - math.e)
    for task in ("medmcqa", "triviaqa", "wikitext"):
        lo, hi = row[task]["delta"]["ci95"]
        assert lo <= row[task]["delta"]["value"] <= hi


def test_aggregate_pairs_each_seed_with_its_own_base_and_marks_sign_changes(tmp_path):
    from smf_ds.experiment.report import results_table

    bases = {0: _write_eval(tmp_path / "b0", [0, 0, 1, 1], [1, 1, 1, 1], [4.0, 4.0]),
             1: _write_eval(tmp_path / "b1", [1, 1, 1, 0], [1, 1, 0, 0], [8.0, 8.0])}
    s0 = _write_eval(tmp_path / "s0", [1, 0, 1, 1], [1, 0, 1, 1], [8.0, 8.0])  # medmcqa +0.25 on base 0
    s1 = _write_eval(tmp_path / "s1", [1, 1, 0, 0], [1, 1, 0, 0], [4.0, 12.0])  # medmcqa -0.25 on base 1
    out = aggregate(bases, {"lora": {0: s0, 1: s1}}, n_boot=200)
    assert out["bases"] == "per seed"
    assert out["base"]["medmcqa"] == pytest.approx((0.5 + 0.75) / 2)
    assert out["base_per_seed"]["medmcqa"] == pytest.approx({"0": 0.5, "1": 0.75})
    med, trivia = out["variants"]["lora"]["medmcqa"]["delta"], out["variants"]["lora"]["triviaqa"]["delta"]
    assert med["per_base"] == pytest.approx([0.25, -0.25]) and med["value"] == pytest.approx(0.0)
    assert not med["same_sign_on_every_base"]
    assert trivia["per_base"] == pytest.approx([-0.25, 0.0]) and not trivia["same_sign_on_every_base"]
    wiki = out["variants"]["lora"]["wikitext"]["delta"]  # exp(2) - e on base 0, exp(2) - exp(2) on base 1
    assert wiki["per_base"] == pytest.approx([math.exp(2) - math.e, 0.0])
    row = next(line for line in results_table(out).splitlines() if line.startswith("| lora |"))
    assert row.count(" ~") == 3
    with pytest.raises(ValueError, match=r"seeds \[2\] have runs but no evaluation of their own base"):
        aggregate(bases, {"lora": {0: s0, 2: s1}}, n_boot=10)

    # a variant with other seeds than the rest is left out of the comparisons between variants
    mixed = aggregate(bases, {"lora": {0: s0, 1: s1}, "full": {0: s1, 1: s0}, "smf-tfidf": {0: s0}}, n_boot=10)
    assert mixed["not_compared"] == {"seeds": [0, 1], "variants": {"smf-tfidf": [0]}}
    assert "smf-tfidf" not in mixed["tradeoffs"]["wikitext"]["frontiers"]
    assert set(mixed["tradeoffs"]["wikitext"]["frontiers"]) == {"lora", "full"}
    from smf_ds.experiment.report import _not_compared_note

    assert "smf-tfidf (seeds 0)" in _not_compared_note(mixed)[0]


def test_the_ablation_is_refused_under_a_launcher_before_any_run(tmp_path, monkeypatch):
    from smf_ds.config import ConfigError
    from smf_ds.experiment import grid

    monkeypatch.setattr(grid, "init_process_group", lambda: None)
    monkeypatch.setattr(grid, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"--ablation: .* \(got 2 processes\)"):
        grid.run_experiment(tmp_path / "exp", quick=True, ablation=True)
    assert not (tmp_path / "exp").exists()


def test_every_method_of_the_plot_has_its_own_colour():
    from smf_ds.experiment.report import method_colours

    for n in (3, 17, 20):
        assert len(set(method_colours([f"m{i}" for i in range(n)]).values())) == n


def test_report_prints_no_sd_for_a_single_seed(tmp_path):
    from smf_ds.experiment.report import results_table

    base = _write_eval(tmp_path / "base", [0, 0, 1, 1], [1, 1, 1, 1], [4.0, 4.0])
    s0 = _write_eval(tmp_path / "s0", [1, 0, 1, 1], [1, 0, 1, 1], [8.0, 8.0])
    s1 = _write_eval(tmp_path / "s1", [1, 1, 1, 1], [1, 1, 0, 0], [4.0, 12.0])
    table = results_table(aggregate(base, {"one": {0: s0}, "two": {0: s0, 1: s1}}, n_boot=50))
    one = next(line for line in table.splitlines() if line.startswith("| one |"))
    two = next(line for line in table.splitlines() if line.startswith("| two |"))
    assert "| 1 | 0.750 ± - | " in one and "± 0.000" not in one  # one seed: no spread to report
    assert f"| 2 | 0.875 ± {np.std([0.75, 1.0], ddof=1):.3f} | " in two


def test_aggregate_refuses_runs_evaluated_on_other_examples(tmp_path):
    base = _write_eval(tmp_path / "base", [0, 1], [1, 1], [4.0])
    other = _write_eval(tmp_path / "other", [0, 1], [1, 1], [4.0], ids=["q0", "zz"])
    with pytest.raises(ValueError, match=r"other/medmcqa\.predictions\.jsonl: its examples differ"):
        aggregate(base, {"lora": {0: other}})


def test_the_memorised_windows_are_an_extra_column_where_evaluated(tmp_path):
    from smf_ds.experiment.report import results_table

    def memorised(directory, nll):
        (directory / "memorised").mkdir()
        (directory / "memorised" / "wikitext.predictions.jsonl").write_text("".join(
            json.dumps({"index": i, "nll": v, "n_tokens": 4}) + "\n" for i, v in enumerate(nll)))

    base = _write_eval(tmp_path / "base", [0, 1], [1, 1], [4.0, 4.0])
    run = _write_eval(tmp_path / "s0", [1, 1], [1, 0], [8.0, 8.0])
    assert "wikitext_memorised" not in aggregate(base, {"full": {0: run}}, n_boot=20)["base"]  # not evaluated: no column
    memorised(base, [1.0, 1.0])
    memorised(run, [2.0, 4.0])
    out = aggregate(base, {"full": {0: run}}, n_boot=20)
    assert out["base"]["wikitext_memorised"] == pytest.approx(math.exp(2.0 / 8))
    assert out["base"]["wikitext"] == pytest.approx(math.e)  # the probe still reads its own files
    assert out["variants"]["full"]["wikitext_memorised"]["delta"]["value"] == pytest.approx(math.exp(6.0 / 8) - math.exp(2.0 / 8))
    head = results_table(out).splitlines()[0]
    assert "| memorised ppl (mean ± sd) |" in head and "| Δ memorised ppl [95% CI] |" in head
    other = _write_eval(tmp_path / "s1", [1, 1], [1, 0], [8.0, 8.0])  # evaluated without the memorised windows
    with pytest.raises(FileNotFoundError, match=r"s1/memorised/wikitext\.predictions\.jsonl"):
        aggregate(base, {"full": {0: other}}, n_boot=20)


_cli = smf_ds_cli


@pytest.mark.e2e
def test_a_quick_sweep_reports_frontiers_and_matched_tables(tmp_path):
    """`experiment --quick --sweep`: every swept point runs; each method's frontier is its
    undominated points; every matched value is its frontier's interpolation at the level (the
    quick world's 10 steps may leave a front of one point, and then no level: the tables' text is
    checked on hand-made fronts in test_sweep.py); the plot is written; --methods with a point's
    name runs that point alone."""
    from smf_ds.experiment.frontier import FORGETTING_SIGN, interpolate, method_of, pareto_front
    from smf_ds.experiment.jobs import WORLD_SWEEP

    out = tmp_path / "sweep"
    _cli("experiment", "--quick", "--sweep", "--bases", "shared", "--methods", "lora,smf-tfidf", "--seeds", "0",
         "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["bases"] == "shared" and (out / "base" / "config.json").is_file()
    assert (out / "base_eval" / "summary.json").is_file() and not (out / "base" / "seed0").exists()
    variants = results["variants"]
    assert list(variants) == [f"smf-tfidf@memory.value_lr={v}" for v in WORLD_SWEEP["smf-tfidf"]["memory.value_lr"]] + [
        f"lora@train.lr={v}" for v in WORLD_SWEEP["lora"]["train.lr"]]
    matched_rows = 0
    for probe, sign in FORGETTING_SIGN.items():
        tradeoff = results["tradeoffs"][probe]
        gain = {v: row["medmcqa"]["delta"]["value"] for v, row in variants.items()}
        forgetting = {v: sign * row[probe]["delta"]["value"] for v, row in variants.items()}
        for method in ("smf-tfidf", "lora"):
            points = [v for v in variants if method_of(v) == method]
            front = [points[i] for i in pareto_front(np.array([gain[v] for v in points]),
                                                     np.array([forgetting[v] for v in points]))]
            assert tradeoff["frontiers"][method] == front
        for key, x, y in (("matched_gain", gain, forgetting), ("matched_forgetting", forgetting, gain)):
            for row in tradeoff[key]:
                matched_rows += 1
                assert len(row["methods"]) >= 2  # a level is one that two frontiers reach
                for method, entry in row["methods"].items():
                    front = tradeoff["frontiers"][method]
                    expected = interpolate(np.array([x[v] for v in front]), np.array([y[v] for v in front]), row["level"])
                    assert entry["value"] == pytest.approx(expected) and 0 < entry["reached"] <= 1
    report = (out / "report.md").read_text()
    assert ("## Matched gain and matched forgetting" in report) == (matched_rows > 0)
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    one = tmp_path / "one"
    point = f"lora@train.lr={WORLD_SWEEP['lora']['train.lr'][1]}"
    _cli("experiment", "--quick", "--sweep", "--bases", "shared", "--methods", point, "--seeds", "0", "--out", str(one))
    assert list(json.loads((one / "results.json").read_text())["variants"]) == [point]
    done = _cli("experiment", "--quick", "--sweep", "--bases", "shared", "--methods", "lora@train.lr=5", "--out",
                str(one), check=False)
    assert done.returncode == 2 and "--methods: expected a comma-separated list of" in done.stderr


@pytest.mark.e2e
def test_quick_experiment_runs_the_grid_and_report_rebuilds_it(tmp_path):
    out = tmp_path / "exp"
    _cli("experiment", "--quick", "--methods", "smf-tfidf,lora", "--seeds", "0,1", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == ["smf-tfidf", "lora"]
    for row in results["variants"].values():
        assert row["seeds"] == [0, 1]
        for task in ("medmcqa", "wikitext", "triviaqa", "wikitext_memorised"):
            assert len(row[task]["per_seed"]) == 2 and math.isfinite(row[task]["delta"]["value"])
    # the world's probes read held-out text; its memorised windows are the extra column
    assert results["base"]["wikitext"] != results["base"]["wikitext_memorised"]
    report = (out / "report.md").read_text()
    assert "| smf-tfidf | 2 |" in report and "| lora | 2 |" in report and "tradeoff.png" in report
    assert "| Δ memorised ppl [95% CI] |" in report and "held-out" in report
    # each seed finetuned its own base, pretrained with that seed, and is compared with it
    assert results["bases"] == "per seed"
    base_weights = [load_file(out / "base" / f"seed{s}" / "model.safetensors") for s in (0, 1)]
    assert any(not torch.equal(base_weights[0][k], base_weights[1][k]) for k in base_weights[0])
    for seed in (0, 1):
        assert json.loads((out / "base_eval" / f"seed{seed}" / "summary.json").read_text())["seed"] == seed
        assert f"base/seed{seed}" in (out / "runs" / "lora" / f"seed{seed}" / "config.yaml").read_text()
    assert all(len(row[t]["delta"]["per_base"]) == 2 for row in results["variants"].values() for t in row if t != "seeds")
    assert "finetunes its own base model" in report
    assert "Controls:" not in report  # no dense control ran
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifact = out / "runs" / "lora" / "seed1" / "lora_adapter"
    stamp = max(p.stat().st_mtime_ns for p in artifact.iterdir())

    (out / "results.json").unlink()
    (out / "report.md").unlink()
    (out / "runs" / "lora" / "seed9").mkdir()  # an interrupted run: left out, and said so
    done = _cli("report", "--out", str(out))
    assert "seed9: not evaluated" in done.stderr
    (out / "runs" / "lora" / "seed9").rmdir()
    rebuilt = json.loads((out / "results.json").read_text())
    assert rebuilt["variants"] == results["variants"] and rebuilt["base"] == results["base"]

    # Damaged files are named, not a traceback; stray dirs are ignored; the settings are recorded.
    (out / "runs" / "lora" / "seed_old").mkdir()
    predictions = out / "runs" / "lora" / "seed0" / "eval" / "triviaqa.predictions.jsonl"
    kept = predictions.read_text()
    predictions.write_text(kept[: len(kept) // 2])
    done = _cli("report", "--out", str(out), check=False)
    assert done.returncode == 2 and "triviaqa.predictions.jsonl: line" in done.stderr, done.stderr[-2000:]
    assert "seed_old: not a run dir" in done.stderr
    predictions.write_text(kept)
    (out / "runs" / "lora" / "seed_old").rmdir()
    (out / "results.json").unlink()
    (out / "report_settings.json").unlink()
    done = _cli("report", "--out", str(out), check=False)
    assert done.returncode == 2 and "run `smf-ds experiment` with this --out again" in done.stderr

    # moved, then called again: nothing is retrained, the moved run dir's own artifact is what is
    # evaluated again, and a new seed is added to the same report
    out.rename(tmp_path / "moved")
    out = tmp_path / "moved"
    artifact = out / "runs" / "lora" / "seed1" / "lora_adapter"
    shutil.rmtree(out / "runs" / "lora" / "seed1" / "eval")
    _cli("experiment", "--quick", "--methods", "lora", "--seeds", "1,2", "--out", str(out))
    assert json.loads((out / "runs" / "lora" / "seed1" / "eval" / "summary.json").read_text())["artifact"] == str(artifact)
    assert max(p.stat().st_mtime_ns for p in artifact.iterdir()) == stamp
    grown = json.loads((out / "results.json").read_text())
    assert grown["variants"]["lora"]["seeds"] == [0, 1, 2]
    assert grown["variants"]["smf-tfidf"] == results["variants"]["smf-tfidf"]
    for task in ("medmcqa", "wikitext", "triviaqa"):  # seed 1 evaluated again: the same numbers
        assert grown["variants"]["lora"][task]["per_seed"][:2] == results["variants"]["lora"][task]["per_seed"], task

    # the full-length grid into the quick grid's directory would reuse its short runs: refused
    done = _cli("experiment", "--methods", "lora", "--seeds", "0", "--out", str(out), check=False)
    assert done.returncode == 2 and "mode: 'quick' there, 'full' now" in done.stderr, done.stderr[-2000:]


def _grid_killed_in_its_second_run(rank, world_size, out):
    from smf_ds.experiment import grid

    real_run_one, calls = grid.run_one, []

    def run_one(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_run_one(*args)

    grid.run_one = run_one
    try:
        grid.run_experiment(out, variants=["lora"], seeds=[0, 1], quick=True, bases="shared")
    except KeyboardInterrupt:
        pass
    return len(calls)


@pytest.mark.dist
def test_report_of_a_grid_cut_short_reports_its_finished_runs(tmp_path):
    from distributed import run_distributed

    out = tmp_path / "exp"
    assert run_distributed(_grid_killed_in_its_second_run, 1, out)[0] == 2
    assert not (out / "results.json").exists()
    _cli("report", "--out", str(out))  # refused before: no report_settings.json yet
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == ["lora"] and results["variants"]["lora"]["seeds"] == [0]
    assert results["settings"]["world_seed"] == 0 and results["settings"]["steps"] > 0
    report = (out / "report.md").read_text()  # lora/seed1 was asked for (report_settings.json), never run
    assert "Not in this report: runs not evaluated (not run yet, cut short, or still running): lora/seed1; " \
           "variants with no evaluated run: smf-tfidf, smf-kl" in report


@pytest.mark.e2e
def test_experiment_and_report_name_the_bad_flag(tmp_path):
    done = _cli("experiment", "--methods", "smf,lora", "--out", str(tmp_path / "x"), check=False)
    assert done.returncode == 2 and "--methods" in done.stderr and "smf-tfidf" in done.stderr
    (tmp_path / "exp.yaml").write_text("run: run.yaml\n")
    for flag in (["--quick"], ["--world-seed", "1"], ["--bases", "shared"]):
        done = _cli("experiment", *flag, "--config", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "y"),
                    check=False)
        assert done.returncode == 2 and flag[0] in done.stderr and "synthetic world" in done.stderr
    done = _cli("report", "--out", str(tmp_path), check=False)
    assert done.returncode == 2 and f"--out {tmp_path}" in done.stderr


@pytest.mark.e2e
def test_experiment_config_runs_retrofit_variants_and_seeds_on_own_model_and_data(tmp_path):
    from smf_ds.data import samples
    from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer

    data = {"medmcqa": samples.write_rows(samples.medmcqa_rows(12, seed=7), tmp_path / "medmcqa.jsonl"),
            "oasst": samples.write_rows(samples.oasst_rows(10, seed=7), tmp_path / "oasst.jsonl"),
            "triviaqa": samples.write_rows(samples.triviaqa_rows(6, seed=7), tmp_path / "triviaqa.jsonl"),
            "wikitext": samples.write_rows(samples.wikitext_rows(2, seed=7), tmp_path / "wikitext.jsonl")}
    texts = [json.dumps(r) for p in data.values() for r in map(json.loads, p.read_text().splitlines())]
    build_tiny_model(build_tiny_tokenizer(texts, vocab_size=300), tmp_path / "model", hidden=32, layers=2, seed=0)
    (tmp_path / "run.yaml").write_text(f"""\
model: {{name_or_path: {tmp_path / 'model'}}}
memory: {{layers: [1], n_keys: 8, heads: 2, knn: 4, k_dim: 8}}
sparse: {{top_t: 6}}
train: {{steps: 2, micro_batch_size: 4, max_length: 64, lr: 1.0e-3}}
data: {{train: {data['medmcqa']}, background: {data['oasst']}, background_batches: 2}}
retrofit: {{steps: 2}}
""")
    (tmp_path / "exp.yaml").write_text(f"""\
run: run.yaml
seeds: [0, 1]
variants:
  smf-kl: [train.method=smf, sparse.scoring=kl]
  lora: [train.method=lora, train.lora_r=4]
eval: {{medmcqa: {data['medmcqa']}, triviaqa: {data['triviaqa']}, wikitext: {data['wikitext']},
        max_length: 32, stride: 16, max_new_tokens: 4, n_boot: 50}}
""")
    out = tmp_path / "exp"
    _cli("experiment", "--config", str(tmp_path / "exp.yaml"), "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == ["smf-kl", "lora"]
    assert all(row["seeds"] == [0, 1] for row in results["variants"].values())
    assert results["settings"]["model"] == str(tmp_path / "model") and results["settings"]["retrofit"] is True
    for seed in (0, 1):  # each seed's SMF run started from that seed's retrofit
        retrofit = json.loads((out / "retrofit" / f"seed{seed}" / "retrofit_summary.json").read_text())
        assert retrofit["steps"] == 2
        run_cfg = (out / "runs" / "smf-kl" / f"seed{seed}" / "config.yaml").read_text()
        assert "scoring: kl" in run_cfg and f"seed: {seed}" in run_cfg
        assert (out / "runs" / "smf-kl" / f"seed{seed}" / "background.safetensors").is_file()
    retrofits = [load_file(out / "retrofit" / f"seed{s}" / "memory_adapter" / "memory_adapter.safetensors")
                 for s in (0, 1)]
    assert not torch.equal(retrofits[0]["layers.1.values"], retrofits[1]["layers.1.values"])  # memory.seed varies
    base_summary = json.loads((out / "base_eval" / "summary.json").read_text())
    assert base_summary["tasks"]["medmcqa"]["n"] == 12 and base_summary["tasks"]["triviaqa"]["n"] == 6
    assert results["n_boot"] == 50 and "50 resamples" in (out / "report.md").read_text()  # eval.n_boot, as set

    for bad, message in [("seedz: [1]", "unknown config key 'seedz'"),
                         ("eval: {medmcqa_prompt: {answer_continuation: ' {option}'}}",
                          "differs from the run config's data.answer_continuation")]:
        (tmp_path / "bad.yaml").write_text(f"run: run.yaml\n{bad}\n")
        done = _cli("experiment", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "b"), check=False)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_worlds_differ_by_seed_and_one_directory_holds_one_world(tmp_path):
    from smf_ds.data.synthetic_world import WorldSpec, build_world

    first = build_world(tmp_path / "w", WorldSpec(seed=0))
    other = build_world(tmp_path / "v", WorldSpec(seed=1))
    assert first["medmcqa_train"].read_text() != other["medmcqa_train"].read_text()
    again = build_world(tmp_path / "w", WorldSpec(seed=0))  # the same world again: rewritten identically
    assert again["medmcqa_test"].read_text() == first["medmcqa_test"].read_text()
    with pytest.raises(ValueError, match="world_spec.json.*another output directory"):
        build_world(tmp_path / "w", WorldSpec(seed=1))


def test_an_output_directory_keeps_one_setup(tmp_path):
    from smf_ds.config import ConfigError
    from smf_ds.experiment.outdir import SETUP_FILE, claim

    setup = {"mode": "full", "steps": 300, "variants": {"lora": ["train.method=lora"]}}
    claim(tmp_path, setup)
    claim(tmp_path, setup)  # the same settings again
    claim(tmp_path, {**setup, "variants": {"full": ["train.method=full"]}})  # a variant joins
    assert set(json.loads((tmp_path / SETUP_FILE).read_text())["variants"]) == {"lora", "full"}
    # Nothing made yet under the recorded settings (say, the last call failed on a bad path): replaced.
    claim(tmp_path, {**setup, "run": {"model": {"name_or_path": "../model"}}})
    claim(tmp_path, {**setup, "run": {"model": {"name_or_path": "/abs/model"}}})
    (tmp_path / "runs" / "lora" / "seed0").mkdir(parents=True)
    (tmp_path / "runs" / "lora" / "seed0" / "train_summary.json").write_text("{}")  # a run was made
    with pytest.raises(ConfigError, match="run.model.name_or_path: '/abs/model' there, 'x' now"):
        claim(tmp_path, {**setup, "run": {"model": {"name_or_path": "x"}}})
    with pytest.raises(ConfigError, match="steps: 300 there, 10 now.*Use another --out"):
        claim(tmp_path, {**setup, "run": {"model": {"name_or_path": "/abs/model"}}, "steps": 10})
    with pytest.raises(ConfigError, match="variant lora:"):
        claim(tmp_path, {**setup, "run": {"model": {"name_or_path": "/abs/model"}},
                         "variants": {"lora": ["train.method=lora", "train.lr=1.0"]}})
    # The runs were made on 1 process; a rerun on 2 would train the rest on twice the global batch.
    recorded = json.loads((tmp_path / SETUP_FILE).read_text())
    assert recorded["processes"] == 1
    (tmp_path / SETUP_FILE).write_text(json.dumps({**recorded, "processes": 2}))
    with pytest.raises(ConfigError, match="processes: 2 there, 1 now"):
        claim(tmp_path, {**setup, "run": {"model": {"name_or_path": "/abs/model"}}})
    # A directory of another format (an older smf-ds recorded no count) is refused by name, not guessed at.
    del recorded["processes"]
    (tmp_path / SETUP_FILE).write_text(json.dumps({**recorded, "format_version": 1}))
    with pytest.raises(ConfigError, match=r"setup\.json: format_version 1, expected 2 \(made by another smf-ds version\)"):
        claim(tmp_path, {**setup, "run": {"model": {"name_or_path": "/abs/model"}}})


@pytest.mark.e2e
def test_experiment_config_variant_typo_fails_before_anything_runs(tmp_path):
    (tmp_path / "run.yaml").write_text("model: {name_or_path: some/model}\n")
    (tmp_path / "exp.yaml").write_text("run: run.yaml\nvariants: {fast: [train.stepz=3]}\n")
    out = tmp_path / "out"
    done = _cli("experiment", "--config", str(tmp_path / "exp.yaml"), "--out", str(out), check=False)
    assert done.returncode == 2 and "variant fast" in done.stderr and "train.stepz" in done.stderr
    assert not (out / "base_eval").exists()
    # A misspelt task under eval.limit would evaluate the whole dataset; a missing eval file would
    # fail only after the base model had loaded.
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "medmcqa.jsonl").write_text("")
    for bad, message in [("eval: {limit: {medmcq: 24}}", "eval.limit.medmcq: unknown task"),
                         ("eval: {medmcqa: world/medmcqa.jsonl}", "eval.medmcqa='world/medmcqa.jsonl': no such file "
                          "or directory (relative paths are from the working directory")]:
        (tmp_path / "exp.yaml").write_text(f"run: run.yaml\n{bad}\n")
        done = _cli("experiment", "--config", str(tmp_path / "exp.yaml"), "--out", str(out), check=False)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "it exists next to the experiment config" in done.stderr
    (tmp_path / "exp.yaml").write_text("run: run.yaml\n")
    (tmp_path / "run.yaml").write_text("model: {name_or_path: ../nowhere/model}\n")
    done = _cli("experiment", "--config", str(tmp_path / "exp.yaml"), "--out", str(out), check=False)
    assert done.returncode == 2 and "model.name_or_path='../nowhere/model': no such directory" in done.stderr


def _prepare_world_counting_writes(rank, world_size, directory):
    from smf_ds.data import synthetic_world
    from smf_ds.experiment import jobs

    writes = []
    original = synthetic_world.build_world
    jobs.build_world = lambda *a, **k: writes.append(rank) or original(*a, **k)
    files = jobs.prepare_world(Path(directory))
    return writes, {name: path.read_text() for name, path in files.items()}


@pytest.mark.dist
def test_the_world_is_written_by_one_rank_and_read_whole_by_all(tmp_path):
    """Ranks that each rewrote the files could read a peer's half-written file (different tokenizers,
    then mismatched collectives under `launch/deepspeed.sh 2 experiment`)."""
    from distributed import run_distributed

    (w0, files0), (w1, files1) = run_distributed(_prepare_world_counting_writes, 2, str(tmp_path / "world"))
    assert (w0, w1) == ([0], [])
    assert files0 == files1 and all(files0.values())


def test_every_out_flag_says_what_goes_there():
    import argparse

    from smf_ds.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command in ("demo", "experiment", "report", "background", "eval"):
        (out,) = [a for a in sub.choices[command]._actions if "--out" in a.option_strings]
        assert out.help, command
    assert "demo_summary.json" in sub.choices["demo"].format_help()
    assert "report.md" in sub.choices["experiment"].format_help()
    help_eval = " ".join(sub.choices["eval"].format_help().split())
    assert "without --out nothing is written" in help_eval


def test_a_config_experiment_records_the_content_of_its_data_files(tmp_path):
    """A data file changed in place must not leave runs of the old data standing as if current."""
    from smf_ds.config import ConfigError
    from smf_ds.experiment.outdir import SETUP_FILE, claim
    from smf_ds.experiment.setups import ConfigSetup, load_experiment_config

    train = tmp_path / "medmcqa.jsonl"
    train.write_text('{"question": "q"}\n')
    (tmp_path / "run.yaml").write_text(f"data: {{train: {train}}}\n")
    (tmp_path / "exp.yaml").write_text("run: run.yaml\n")
    out = tmp_path / "out"
    setup = ConfigSetup(load_experiment_config(str(tmp_path / "exp.yaml")), out)
    recorded = setup.fingerprint()
    assert list(recorded["data_digests"]) == ["run.data.train"]  # the eval defaults are hub ids
    claim(out, recorded)
    (out / "base_eval").mkdir()
    (out / "base_eval" / "summary.json").write_text("{}")  # something was made from the data
    train.write_text('{"question": "another"}\n')
    with pytest.raises(ConfigError, match=r"data_digests\.run\.data\.train: '[0-9a-f]{16}' there, '[0-9a-f]{16}' now"):
        claim(out, setup.fingerprint())
    # A directory recorded before digests were (format 1): refused by name rather than left unchecked.
    setup_file = json.loads((out / SETUP_FILE).read_text())
    del setup_file["data_digests"]
    (out / SETUP_FILE).write_text(json.dumps({**setup_file, "format_version": 1}))
    with pytest.raises(ConfigError, match=r"format_version 1, expected 2"):
        claim(out, setup.fingerprint())


def test_a_config_sweep_makes_checked_variants(tmp_path):
    """An experiment config's `sweep:` expands its variants; a point whose setting is wrong fails
    before anything runs, named by the point."""
    from smf_ds.config import ConfigError
    from smf_ds.experiment.setups import ConfigSetup, load_experiment_config

    (tmp_path / "run.yaml").write_text("train: {steps: 3}\n")
    (tmp_path / "exp.yaml").write_text("run: run.yaml\nvariants: {lora: [train.method=lora], full: [train.method=full]}\n"
                                       "sweep: {lora: {train.lr: [1.0e-4, 3.0e-4], train.lora_r: [4, 8]}}\n")
    setup = ConfigSetup(load_experiment_config(str(tmp_path / "exp.yaml")), tmp_path / "out")
    assert list(setup.variants) == ["lora@train.lr=0.0001,train.lora_r=4", "lora@train.lr=0.0001,train.lora_r=8",
                                    "lora@train.lr=0.0003,train.lora_r=4", "lora@train.lr=0.0003,train.lora_r=8", "full"]
    assert setup.variants["lora@train.lr=0.0003,train.lora_r=8"] == ["train.method=lora", "train.lr=0.0003",
                                                                    "train.lora_r=8"]
    (tmp_path / "bad.yaml").write_text("run: run.yaml\nvariants: {lora: [train.method=lora]}\n"
                                       "sweep: {lora: {train.lora_r: [4, many]}}\n")
    with pytest.raises(ConfigError, match=r"variant lora@train.lora_r=many: train.lora_r: expected an integer"):
        ConfigSetup(load_experiment_config(str(tmp_path / "bad.yaml")), tmp_path / "out2")
