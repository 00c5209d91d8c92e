"""`smf-ds retrofit`: the dense warm-up of fresh memory on general text, then background + train
from its adapter."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smf_ds.config import ConfigError, load_config
from smf_ds.data import samples
from smf_ds.train.background import background_main
from smf_ds.train.retrofit import retrofit_main, retrofit_run_config
from smf_ds.train.run import train_main

from distributed import run_distributed


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("retrofit_world")
    medmcqa = samples.write_rows(samples.medmcqa_rows(12, seed=5), root / "medmcqa.jsonl")
    oasst = samples.write_rows(samples.oasst_rows(16, seed=5), root / "oasst.jsonl")
    texts = [json.dumps(r) for p in (medmcqa, oasst) for r in map(json.loads, p.read_text().splitlines())]
    build_tiny_model(build_tiny_tokenizer(texts, vocab_size=300), root / "model", hidden=32, layers=2, seed=0)
    return {"root": root, "model": root / "model", "medmcqa": medmcqa, "oasst": oasst}


def _overrides(world, out_dir, *extra):
    return [f"model.name_or_path={world['model']}", "memory.layers=[1]", "memory.n_keys=8", "memory.heads=2",
            "memory.knn=4", "memory.k_dim=8", f"data.train={world['medmcqa']}", f"data.background={world['oasst']}",
            "train.micro_batch_size=4", "train.max_length=64", f"out_dir={out_dir}", *extra]


def test_run_config_is_dense_memory_training():
    cfg = load_config(overrides=["train.method=lora", "train.scope=values", "sparse.scoring=kl", "sparse.top_t=3",
                                 "retrofit.steps=7", "retrofit.lr=1e-3", "retrofit.value_optimizer=sgd"])
    run = retrofit_run_config(cfg)
    assert (run.train.method, run.train.scope, run.train.steps, run.train.lr) == ("smf", "memory+scale", 7, 1e-3)
    assert (run.sparse.scoring, run.sparse.optimizer, run.sparse.background) == ("dense-all", "sgd", None)
    assert run.memory.value_lr == 1e-3  # value_lr None: the retrofit's lr
    assert cfg.train.method == "lora" and cfg.sparse.scoring == "kl"  # the given config is left alone
    assert retrofit_run_config(load_config(overrides=["retrofit.value_lr=0.5"])).memory.value_lr == 0.5


def _retrofit_then_smf(rank, world_size, world, tmp):
    """In a 1-rank process group: fresh adapter -> retrofit -> background -> train; the three adapters."""
    from smf_ds.memory.adapter import save_memory_adapter
    from smf_ds.memory.inject import inject_memory
    from smf_ds.train.build import load_tokenizer_and_model

    cfg = load_config(overrides=_overrides(world, tmp / "retrofit", "retrofit.steps=4", "retrofit.lr=0.05"))
    _, model = load_tokenizer_and_model(cfg)
    fresh = save_memory_adapter(inject_memory(model, cfg.memory), tmp / "fresh")
    summary = retrofit_main(cfg, str(fresh), progress=False)
    run = tmp / "smf"
    train_cfg = load_config(overrides=_overrides(world, run, "train.steps=2", "sparse.top_t=4",
                                                 "data.background_batches=2"))
    stats = background_main(train_cfg, summary["artifact"], out=str(run / "background.safetensors"))
    # memory.* that disagrees with the adapter is overridden by it (and said so in config.yaml);
    # sparse.background unset: the stats `background` wrote into this out_dir are used
    train_cfg = load_config(overrides=_overrides(world, run, "train.steps=2", "sparse.top_t=4", "memory.n_keys=16"))
    trained = train_main(train_cfg, summary["artifact"], progress=False)
    saved = load_config(str(run / "config.yaml"))
    assert saved.memory.n_keys == 8 and saved.sparse.background == str(stats)
    adapters = [fresh / "memory_adapter.safetensors", Path(summary["artifact"]) / "memory_adapter.safetensors",
                Path(trained["artifact"]) / "memory_adapter.safetensors"]
    return summary, [load_file(a) for a in adapters]


@pytest.mark.dist
def test_retrofit_trains_every_memory_tensor_then_background_and_train_start_from_it(world, tmp_path):
    summary, (before, after, tuned) = run_distributed(_retrofit_then_smf, 1, world, tmp_path)[0]
    assert summary["steps"] == 4 and summary["data"] == str(world["oasst"])
    assert before.keys() == after.keys() == tuned.keys()
    for key in before:  # query, keys, projections, norm, the scale and the values all trained
        assert not torch.equal(before[key], after[key]), key
    changed_rows = (before["layers.1.values"] != after["layers.1.values"]).any(dim=1)
    assert int(changed_rows.sum()) > 8  # dense: more rows than the sparse phase below may touch
    for key in after:  # the sparse phase moved a few value rows only, from the retrofit's memory
        if key.endswith(".values"):
            moved = (tuned[key] != after[key]).any(dim=1)
            assert 0 < int(moved.sum()) <= 2 * 4
        else:
            assert torch.equal(tuned[key], after[key]), key


@pytest.mark.parametrize("overrides, message", [
    (["data.background="], r"retrofit\.data: expected an OASST1-schema"),
    (["retrofit.steps=0"], r"retrofit\.steps: expected an integer >= 1"),
    (["retrofit.scope=values"], r"retrofit\.scope: expected one of \['memory', 'memory\+scale'\]"),
    (["retrofit.value_lr=-1"], r"retrofit\.value_lr: expected a positive learning rate"),
])
def test_bad_retrofit_settings_name_the_field(world, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        retrofit_main(load_config(overrides=_overrides(world, tmp_path, *overrides)), progress=False)


def test_adapter_memory_shape_replaces_the_run_configs(world, tmp_path, caplog):
    from smf_ds.memory.adapter import save_memory_adapter
    from smf_ds.memory.inject import inject_memory
    from smf_ds.train.build import load_tokenizer_and_model
    from smf_ds.train.inputs import adopt_adapter_memory

    cfg = load_config(overrides=_overrides(world, tmp_path))
    _, model = load_tokenizer_and_model(cfg)
    adapter = save_memory_adapter(inject_memory(model, cfg.memory), tmp_path / "adapter")
    other = load_config(overrides=_overrides(world, tmp_path, "memory.n_keys=16", "memory.layers=[0]",
                                             "memory.value_lr=7.0"))
    with caplog.at_level("WARNING"):
        got = adopt_adapter_memory(other, str(adapter))
    assert (got.memory.n_keys, got.memory.layers, got.memory.value_lr) == (8, [1], 7.0)  # value_lr is the run's
    assert "memory.n_keys=16 is ignored" in caplog.text and "memory.layers=[0] is ignored" in caplog.text


def _retrofit_adapter(rank, world_size, world, out_dir, zero_stage):
    retrofit_main(load_config(overrides=_overrides(world, out_dir, "retrofit.steps=2",
                                                   f"train.zero_stage={zero_stage}")), progress=False)
    return load_file(str(Path(out_dir) / "memory_adapter" / "memory_adapter.safetensors"))


@pytest.mark.dist
def test_memory_trained_under_zero3_is_saved_whole(world, tmp_path):
    """ZeRO-3 partitions the memory parameters; saving gathers them (once: DeepSpeed refuses nested
    gathers) and the adapter equals a ZeRO-0 run's."""
    zero0 = run_distributed(_retrofit_adapter, 1, world, str(tmp_path / "z0"), 0)[0]
    zero3 = run_distributed(_retrofit_adapter, 1, world, str(tmp_path / "z3"), 3)[0]
    assert zero0.keys() == zero3.keys()
    for key, value in zero0.items():
        assert zero3[key].shape == value.shape and (zero3[key] - value).abs().max() <= 1e-6, key


@pytest.mark.parametrize("main, extra, message", [
    ("train", ["memory.layers=[7]"], r"memory\.layers: layer 7 is out of range; the model has 2 decoder layers"),
    ("train", ["data.train={oasst}"], r"data\.train=.*oasst\.jsonl: no usable MedMCQA row"),
    ("train", ["sparse.scoring=tfidf"], r"sparse\.scoring='tfidf' needs background statistics"),
    ("background", ["data.background={medmcqa}"], r"data\.background=.*medmcqa\.jsonl: no assistant reply"),
    ("train", ["data.train={empty}"], r"data\.train: .*empty: could not read this directory as a dataset"),
])
def test_wrong_inputs_fail_before_the_weights_load(world, tmp_path, monkeypatch, main, extra, message):
    """Minutes per mistake at Qwen's size on a cluster: every input a run can check alone is checked first."""
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the run's inputs were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    (tmp_path / "empty").mkdir()
    extra = [e.format(oasst=world["oasst"], medmcqa=world["medmcqa"], empty=tmp_path / "empty") for e in extra]
    cfg = load_config(overrides=_overrides(world, tmp_path / "run", "sparse.scoring=tf", *extra))
    with pytest.raises(ConfigError, match=message):
        (train_main if main == "train" else background_main)(cfg)


def _retrofit_cut_short_then_resumed(rank, world_size, world, tmp):
    """4 steps straight; and 2 steps, killed after the checkpoint but before the adapter and summary
    were written, then --resume with retrofit.steps raised to 4. Both adapters, and the errors."""
    import shutil

    def cfg(out, *extra):
        return load_config(overrides=_overrides(world, out, "retrofit.lr=0.05", *extra))

    def adapter(out):
        return load_file(str(out / "memory_adapter" / "memory_adapter.safetensors"))

    retrofit_main(cfg(tmp / "straight", "retrofit.steps=4"), progress=False)
    cut = tmp / "cut"
    retrofit_main(cfg(cut, "retrofit.steps=2"), progress=False)
    shutil.rmtree(cut / "memory_adapter")
    (cut / "retrofit_summary.json").unlink()
    errors = {}
    for name, run in {"rerun": lambda: retrofit_main(cfg(cut, "retrofit.steps=4"), progress=False),
                      "other lr": lambda: retrofit_main(cfg(cut, "retrofit.steps=4", "retrofit.lr=0.1"), resume=True,
                                                        progress=False)}.items():
        try:
            run()
        except ConfigError as err:
            errors[name] = str(err)
    # Settings of the later sparse phase, which a retrofit never reads, may change.
    summary = retrofit_main(cfg(cut, "retrofit.steps=4", "sparse.top_t=7", "train.lora_r=4"), resume=True,
                            progress=False)
    again = retrofit_main(cfg(cut, "retrofit.steps=4"), resume=True, progress=False)  # finished: nothing to do
    resumed = adapter(cut)
    shutil.rmtree(cut / "memory_adapter")  # finished, its adapter lost: saved again from the checkpoint
    retrofit_main(cfg(cut, "retrofit.steps=4"), resume=True, progress=False)
    assert all(torch.equal(value, adapter(cut)[key]) for key, value in resumed.items())
    return adapter(tmp / "straight"), resumed, summary, errors, again


@pytest.mark.dist
def test_a_retrofit_cut_short_resumes_exactly(world, tmp_path):
    straight, resumed, summary, errors, again = run_distributed(_retrofit_cut_short_then_resumed, 1, world,
                                                                tmp_path)[0]
    assert summary["steps"] == 4 and summary["resumed_at_step"] == 2 and again == summary
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():  # memory params (DeepSpeed's AdamW state) and values (sparse state)
        assert torch.equal(value, resumed[key]), key
    assert "holds the checkpoints of an earlier run" in errors["rerun"] and "pass --resume" in errors["rerun"]
    assert "retrofit.lr=0.05 there, 0.1 now" in errors["other lr"]
    assert "train.lr" not in errors["other lr"] and "value_lr" not in errors["other lr"]  # derived from it


def _experiment_run_killed_after_a_checkpoint(rank, world_size, world, run_dir):
    """The experiment's background -> train of a tfidf run, cut short after its step-2 checkpoint
    (as a kill leaves it: no summary, no adapter), then the same call with more steps: resumed."""
    import shutil

    from smf_ds.experiment.jobs import background_then_train

    def make_config(steps):
        return lambda extra: load_config(overrides=_overrides(world, run_dir, "sparse.scoring=tfidf", "sparse.top_t=4",
                                                              "data.background_batches=2", f"train.steps={steps}",
                                                              *extra))

    background_then_train(make_config(2), run_dir)
    stats = (run_dir / "background.safetensors").read_bytes()
    shutil.rmtree(run_dir / "memory_adapter")
    (run_dir / "train_summary.json").unlink()
    summary = background_then_train(make_config(3), run_dir)
    return summary, stats == (run_dir / "background.safetensors").read_bytes()


@pytest.mark.dist
def test_the_experiment_resumes_a_run_that_needs_background_stats(world, tmp_path):
    summary, stats_kept = run_distributed(_experiment_run_killed_after_a_checkpoint, 1, world, tmp_path / "run")[0]
    assert summary["resumed_at_step"] == 2 and summary["steps"] == 3 and stats_kept
