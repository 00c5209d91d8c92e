"""The ablation of the paper code's procedure: its variants, the paired changes against smf-paper
and the report's table."""
import numpy as np
import pytest
from launchers import smf_ds_cli

from smf_ds.config import flatten_dotted, load_config, to_dict
from smf_ds.experiment.ablation import CORRECTIONS, PAPER, ablation, ablation_variants
from smf_ds.experiment.jobs import SMF_MEMORY, VARIANTS, variant_overrides
from smf_ds.experiment.report import ablation_table


def _resolved(variant):
    """A variant's run config on the world (its files need not exist to resolve it)."""
    world = {"medmcqa_train": "train.jsonl", "oasst": "oasst.jsonl"}
    return flatten_dotted(to_dict(load_config(overrides=variant_overrides(world, "base", variant, "run", 300))))


def _world_variants(**kwargs):
    from pathlib import Path

    from smf_ds.experiment.setups import WorldSetup

    return WorldSetup(Path("unused"), ablation=True, **kwargs).variants  # what the experiment runs


def test_each_correction_changes_exactly_one_item_of_smf_paper():
    variants = _world_variants()
    paper = _resolved(variants[PAPER])
    ours = _resolved(VARIANTS["smf-tfidf"])
    # smf-paper differs from our smf-tfidf in every training item it reproduces
    for key in ("sparse.select_every", "sparse.count_padding", "sparse.optimizer", "train.accum_reduction",
                "data.loss_on", "train.scope", "sparse.max_grad_norm", "train.lr_schedule", "train.warmup_steps",
                "data.background_unit"):
        assert paper[key] != ours[key], key
    # the same global batch, in two micro-batches (selection per micro-batch is then not per step)
    assert (paper["train.micro_batch_size"], paper["train.grad_accum"]) == (4, 2)
    assert ours["train.micro_batch_size"] * ours["train.grad_accum"] == 8
    for name, (_, overrides) in CORRECTIONS.items():
        fixed = _resolved(variants[name])
        changed = {key for key in paper if paper[key] != fixed[key]}
        assert changed == {o.split("=", 1)[0] for o in overrides}, name
        # corrected to smf-ds's setting; the optimizer to smf-ds's lazy AdamW (its default is SGD, another lr)
        expected = {key: ("adamw" if key == "sparse.optimizer" else ours[key]) for key in changed}
        assert {key: fixed[key] for key in changed} == expected, name


def test_world_setup_adds_the_ablation_only_when_asked(tmp_path):
    from smf_ds.experiment.setups import WorldSetup

    assert PAPER not in WorldSetup(tmp_path).variants
    with_ablation = WorldSetup(tmp_path, ablation=True).variants
    assert {PAPER, *CORRECTIONS} <= set(with_ablation)
    assert set(VARIANTS) <= set(with_ablation)
    assert ablation_variants(SMF_MEMORY) == {k: with_ablation[k] for k in (PAPER, *CORRECTIONS)}
    assert "train.warmup_steps=100" in with_ablation[PAPER]  # the paper's, within the world's 300 steps
    quick = WorldSetup(tmp_path, quick=True, ablation=True).variants
    assert quick[PAPER][-1] == "train.warmup_steps=3"  # --quick's 10 steps: a third of the run


def _variants(values):
    return {name: {task: {"delta": {"value": v}} for task, v in tasks.items()} for name, tasks in values.items()}


def test_ablation_pairs_each_correction_with_smf_paper_on_the_same_resamples():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.05, 500)  # resample noise common to every run (the base's examples)
    fix_a, fix_b = "smf-paper+step-selection", "smf-paper+answer-loss"
    samples = {PAPER: {"medmcqa": 0.10 + shared, "triviaqa": shared, "wikitext": 0.02 + shared},
               fix_a: {"medmcqa": 0.10 + shared + rng.normal(0, 0.001, 500), "triviaqa": shared,
                       "wikitext": 0.02 + shared},
               fix_b: {"medmcqa": 0.20 + shared + rng.normal(0, 0.001, 500), "triviaqa": shared - 0.03,
                       "wikitext": 0.02 + shared}}
    values = {name: {task: float(s.mean()) for task, s in tasks.items()} for name, tasks in samples.items()}
    found = ablation(_variants(values), samples)
    rows = {row["variant"]: row for row in found["rows"]}
    assert found["reference"] == PAPER and list(rows) == [fix_a, fix_b]  # in CORRECTIONS' order
    assert not any(rows[fix_a][t]["beyond"] for t in ("medmcqa", "triviaqa", "wikitext"))
    assert rows[fix_b]["medmcqa"]["beyond"] and rows[fix_b]["medmcqa"]["value"] == pytest.approx(0.10, abs=1e-3)
    assert rows[fix_b]["triviaqa"]["beyond"] and not rows[fix_b]["wikitext"]["beyond"]
    # paired: unpaired intervals (0.05 noise on each side) would span 0 for a change of 0.03
    lo, hi = rows[fix_b]["triviaqa"]["ci95"]
    assert hi - lo < 0.01
    table = "\n".join(ablation_table({"ablation": found}))
    assert "| smf-paper+step-selection | selection once per optimizer step |" in table
    assert table.count("] *") == 2 and "| none |" in table and "task gain, forgetting (TriviaQA acc)" in table


def test_with_a_base_per_seed_a_correction_whose_sign_differs_between_bases_is_marked():
    fix = "smf-paper+no-clip"
    rows = {PAPER: [0.10, 0.10], fix: [0.15, 0.05]}  # +0.05 on base 0, -0.05 on base 1
    variants = {name: {"seeds": [0, 1], **{t: {"delta": {"value": float(np.mean(v)), "per_base": v}}
                                           for t in ("medmcqa", "triviaqa", "wikitext")}}
                for name, v in rows.items()}
    samples = {name: {t: np.full(50, np.mean(v)) for t in ("medmcqa", "triviaqa", "wikitext")}
               for name, v in rows.items()}
    found = ablation(variants, samples)
    assert found["rows"][0]["medmcqa"]["same_sign_on_every_base"] is False
    assert "| smf-paper+no-clip |" in "\n".join(ablation_table({"ablation": found}))
    assert "+0.000 [+0.000, +0.000] ~" in "\n".join(ablation_table({"ablation": found}))


def test_no_ablation_without_smf_paper_or_a_correction():
    samples = {PAPER: {"medmcqa": np.zeros(3)}}
    assert ablation(_variants({PAPER: {"medmcqa": 0.0}}), samples) is None
    assert ablation(_variants({"smf-paper+no-clip": {"medmcqa": 0.0}}), {}) is None
    assert ablation_table({}) == []


_cli = smf_ds_cli


@pytest.mark.e2e
def test_a_quick_ablation_reports_each_correction_against_smf_paper(tmp_path):
    import json

    import yaml

    out = tmp_path / "exp"
    fix = "smf-paper+step-selection"
    _cli("experiment", "--quick", "--ablation", "--methods", f"{PAPER},{fix}", "--seeds", "0", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == [PAPER, fix]
    (row,) = results["ablation"]["rows"]
    for task in ("medmcqa", "triviaqa", "wikitext"):
        paired = results["variants"][fix][task]["delta"]["value"] - results["variants"][PAPER][task]["delta"]["value"]
        assert row[task]["value"] == pytest.approx(paired)
        lo, hi = row[task]["ci95"]
        assert lo <= hi and row[task]["beyond"] == (not lo <= 0 <= hi)
    report = (out / "report.md").read_text()
    assert "## Ablation: the paper code's procedure" in report and f"| {fix} | selection once per optimizer step |" in report
    run_cfg = yaml.safe_load((out / "runs" / PAPER / "seed0" / "config.yaml").read_text())
    assert run_cfg["sparse"]["select_every"] == "micro_batch" and run_cfg["train"]["warmup_steps"] == 3
    done = _cli("experiment", "--ablation", "--config", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "y"),
                check=False)
    assert done.returncode == 2 and "--ablation" in done.stderr and "synthetic world" in done.stderr
