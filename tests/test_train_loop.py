"""The training loop: W=2 equals W=1 with the same global batch; resume is exact; TensorBoard."""
import pytest
import torch

from distributed import run_distributed
from smf_ds.config import load_config
from smf_ds.parallel.collective import gathered_parameters
from smf_ds.memory.inject import inject_memory, value_tables
from smf_ds.parallel.shard import shard_memory
from smf_ds.train.loop import Trainer

VOCAB = 64


def _model(memory_cfg, seed=0, tie=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=tie))
    return inject_memory(model, memory_cfg)


def _examples(n=24):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (3 + i % 6,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def _cfg(run_dir, world, strategy="replicated", scope="values", steps=3, save_every=0, extra=()):
    accum = 2 // world
    return load_config(overrides=[
        "memory.layers=[1]", "memory.n_keys=8", "memory.knn=4", "memory.k_dim=8", "memory.scale_init=1.0",
        f"memory.sharding={strategy}", "sparse.scoring=tf", "sparse.top_t=6",
        f"train.scope={scope}", f"train.steps={steps}", "train.micro_batch_size=2", f"train.grad_accum={accum}",
        f"train.save_every={save_every}", "train.lr=0.01", f"out_dir={run_dir}", *extra])


def _run(rank, world, run_dir, strategy, scope, steps, save_every=0, resume=False):
    cfg = _cfg(run_dir, world, strategy, scope, steps, save_every)
    model = shard_memory(_model(cfg.memory), None, strategy) if world > 1 else _model(cfg.memory)
    trainer = Trainer(cfg, model, _examples(), pad_id=0)
    if resume:
        assert trainer.resume()
    result = trainer.fit()
    (_, table), = value_tables(trainer.model)
    dense = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"table": table.full_weight().clone(), "losses": result.losses, "dense": dense,
            "selected": trainer.updater.previous[1].tolist()}


def _config_error_of(action) -> str:
    """The ConfigError message that action() raises, or "ok"."""
    from smf_ds.config import ConfigError

    try:
        action()
    except ConfigError as err:
        return str(err)
    return "ok"


def _resume_error(rank, world, run_dir, scope="values", extra=(), base_seed=0):
    cfg = _cfg(run_dir, world, "replicated", scope, 4, extra=extra)
    model = _model(cfg.memory, base_seed)
    if base_seed:  # other base weights, the same memory
        model.load_state_dict({k: v for k, v in _model(cfg.memory).state_dict().items() if ".memory." in k},
                              strict=False)
    return _config_error_of(Trainer(cfg, model, _examples(), pad_id=0).resume)


@pytest.mark.dist
def test_two_ranks_equal_one_rank(tmp_path):
    ref = run_distributed(_run, 1, str(tmp_path / "w1"), "replicated", "values", 3)[0]
    for strategy in ("replicated", "row", "column"):
        r0, r1 = run_distributed(_run, 2, str(tmp_path / f"w2{strategy}"), strategy, "values", 3)
        assert torch.equal(r0["table"], r1["table"])
        assert (r0["table"] - ref["table"]).abs().max() <= 1e-6, strategy
        assert r0["selected"] == ref["selected"]
        assert abs(r0["losses"][-1] - ref["losses"][-1]) <= 1e-5


@pytest.mark.dist
def test_resume_is_exact(tmp_path):
    """4 steps straight == 2 steps, stop, resume, 2 more (memory scope: DeepSpeed + sparse state)."""
    straight = run_distributed(_run, 1, str(tmp_path / "a"), "replicated", "memory+scale", 4)[0]
    run_distributed(_run, 1, str(tmp_path / "b"), "replicated", "memory+scale", 2)
    resumed = run_distributed(_run, 1, str(tmp_path / "b"), "replicated", "memory+scale", 4, 0, True)[0]
    assert torch.equal(straight["table"], resumed["table"])
    for name, value in straight["dense"].items():
        assert torch.equal(value, resumed["dense"][name]), name
    assert straight["losses"][2:] == resumed["losses"]
    record = (tmp_path / "b" / "config.yaml").read_text()
    n_events = len(list((tmp_path / "b" / "tensorboard").glob("events.out.tfevents.*")))
    message = run_distributed(_resume_error, 1, str(tmp_path / "b"))[0]  # values scope now: no DeepSpeed state
    assert "train.scope='memory+scale' there, 'values' now" in message
    # Any other setting but the run's length and log/save cadence: another run, refused by name.
    message = run_distributed(_resume_error, 1, str(tmp_path / "b"), "memory+scale",
                              ["sparse.optimizer=adamw", "train.log_every=7"])[0]
    assert "sparse.optimizer='sgd' there, 'adamw' now" in message and "log_every" not in message
    # Another memory to start from (the frozen memory parameters come from the seed or adapter).
    message = run_distributed(_resume_error, 1, str(tmp_path / "b"), "memory+scale", ["memory.seed=5"])[0]
    assert "the memory it started from (fingerprint" in message and "--memory-adapter" in message
    # Other base weights under the same model.name_or_path: the checkpoint does not hold them.
    message = run_distributed(_resume_error, 1, str(tmp_path / "b"), "memory+scale", (), 7)[0]
    assert "the base model's weights (fingerprint" in message and "memory it started from" not in message
    # A refused resume leaves the run's record alone.
    assert (tmp_path / "b" / "config.yaml").read_text() == record
    assert len(list((tmp_path / "b" / "tensorboard").glob("events.out.tfevents.*"))) == n_events
    events = list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    assert (tmp_path / "a" / "config.yaml").is_file()


def _run_dense(rank, world, run_dir, extra, steps, resume=False):
    """Train `steps` (or resume to them); the trained dense parameters, losses and the names the
    engine checkpoint's module state holds."""
    cfg = _cfg(run_dir, world, "replicated", "memory+scale", steps, extra=extra)
    trainer = Trainer(cfg, _model(cfg.memory, tie=True), _examples(), pad_id=0)  # lm_head: a frozen alias
    if resume:
        assert trainer.resume()
    losses = trainer.fit().losses
    tag = (trainer.checkpoint_dir / "latest_memory").read_text()
    saved = {}
    for file in (trainer.checkpoint_dir / tag).glob("*model_states.pt"):
        state = torch.load(file, weights_only=False)
        assert not state.get("frozen_param_fragments"), file
        saved[file.name] = sorted(state["module"])
    trainable = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    with gathered_parameters(list(trainer.model.parameters())):
        dense = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"losses": losses, "dense": dense, "saved": saved, "trainable": trainable}


@pytest.mark.dist
@pytest.mark.parametrize("extra", [["train.method=lora"], ["train.zero_stage=3"]], ids=["lora", "memory-zero3"])
def test_checkpoints_leave_the_frozen_backbone_out_and_resume_exactly(tmp_path, extra):
    straight = run_distributed(_run_dense, 1, str(tmp_path / "a"), extra, 4)[0]
    run_distributed(_run_dense, 1, str(tmp_path / "b"), extra, 2)
    resumed = run_distributed(_run_dense, 1, str(tmp_path / "b"), extra, 4, True)[0]
    assert straight["losses"][2:] == resumed["losses"]
    assert straight["dense"].keys() == resumed["dense"].keys() and straight["dense"]
    for name, value in straight["dense"].items():
        assert torch.equal(value, resumed["dense"][name]), name
    assert straight["saved"], "no DeepSpeed model states written"
    for file, names in straight["saved"].items():  # the trained parameters, nothing of the backbone
        assert names == straight["trainable"], file


def _crash_and_resume(rank, world, run_dir):
    """3 steps (checkpoint at 2, logged to 3), then as if it died before saving step 3: resume to 4."""
    import time

    from smf_ds.train.checkpoint import mark_latest

    cfg = _cfg(run_dir, world, "replicated", "values", 4, save_every=2, extra=["train.log_every=1"])
    Trainer(cfg, _model(cfg.memory), _examples(), pad_id=0).fit(steps=3)
    mark_latest(f"{run_dir}/checkpoints", "step0000002")
    time.sleep(1.1)  # event files are named by the second: the resumed run's must sort after
    trainer = Trainer(cfg, _model(cfg.memory), _examples(), pad_id=0)
    assert trainer.resume() and trainer.step == 2
    return trainer.fit().losses


@pytest.mark.dist
def test_resumed_run_logs_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    straight = run_distributed(_run, 1, str(tmp_path / "a"), "replicated", "values", 4)[0]["losses"]
    resumed = run_distributed(_crash_and_resume, 1, str(tmp_path / "b"))[0]
    assert resumed == straight[2:]
    events = EventAccumulator(str(tmp_path / "b" / "tensorboard"))
    events.Reload()
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2, 3, 4]  # step 3 logged twice, the first purged
    assert [e.value for e in logged[2:]] == torch.tensor(straight[2:]).float().tolist()


def test_a_nan_loss_stops_training_with_its_likely_causes(tmp_path):
    from smf_ds.train.loop import NonFiniteLossError

    cfg = _cfg(tmp_path, 1)
    no_labels = [{"input_ids": e["input_ids"], "labels": [-100] * len(e["labels"])} for e in _examples()]
    trainer = Trainer(cfg, _model(cfg.memory), no_labels, pad_id=0)
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 1; .*train\.max_length"):
        trainer.fit()
    assert not (tmp_path / "checkpoints").exists()


def test_lora_targets_that_match_nothing_name_the_field(tmp_path):
    from smf_ds.config import ConfigError
    from smf_ds.train.loop import trainable_parameters

    cfg = _cfg(tmp_path, 1, extra=["train.method=lora", "train.lora_targets=[q_prj]"])
    with pytest.raises(ConfigError, match=r"train\.lora_targets=\['q_prj'\]"):
        trainable_parameters(_model(cfg.memory), cfg)


def test_training_into_a_used_out_dir_needs_resume(tmp_path):
    from smf_ds.config import ConfigError
    from smf_ds.train.background import background_main
    from smf_ds.train.retrofit import retrofit_main
    from smf_ds.train.run import train_main

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest_memory").write_text("step0000100")
    with pytest.raises(ConfigError, match=r"earlier run .*latest step0000100\); pass --resume"):
        train_main(_cfg(tmp_path, 1))
    # A finished run whose checkpoints were removed (to save disk): never overwritten, and nothing
    # to resume from.
    (tmp_path / "checkpoints" / "latest_memory").unlink()
    for main, summary, extra in ((train_main, "train_summary.json", []),
                                 (retrofit_main, "retrofit_summary.json", ["data.background=oasst.jsonl"])):
        (tmp_path / summary).write_text("{}")
        command = "train" if main is train_main else "retrofit"
        with pytest.raises(ConfigError, match=rf"holds a finished run \({summary}\); {command} into another"):
            main(_cfg(tmp_path, 1, extra=extra))
        with pytest.raises(ConfigError, match=rf"\({summary}\) whose checkpoints were removed: nothing to resume"):
            main(_cfg(tmp_path, 1, extra=extra), resume=True)
        (tmp_path / summary).unlink()
    # Nor are a finished run's background stats replaced.
    (tmp_path / "train_summary.json").write_text("{}")
    (tmp_path / "background.safetensors").write_text("stats")
    (tmp_path / "oasst.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"holds a finished run \(train_summary\.json\); its run may have trained"):
        background_main(_cfg(tmp_path, 1, extra=[f"data.background={tmp_path / 'oasst.jsonl'}"]))


def test_mistyped_data_paths_fail_before_the_model_loads(tmp_path):
    """A typo in a data path is named by its field, before any model is loaded (the model path
    here does not exist either: reaching it would be another error)."""
    from smf_ds.config import ConfigError
    from smf_ds.train.background import background_main
    from smf_ds.train.retrofit import retrofit_main
    from smf_ds.train.run import train_main

    cfg = _cfg(tmp_path, 1, extra=["model.name_or_path=/nowhere/model", "data.train=./medmcqa_trian.jsonl",
                                   "data.background=oasst.jsonl"])
    with pytest.raises(ConfigError, match=r"data\.train='\./medmcqa_trian\.jsonl': no such file or directory"):
        train_main(cfg)
    with pytest.raises(ConfigError, match=r"data\.background='oasst\.jsonl': no such file or directory"):
        background_main(cfg)
    with pytest.raises(ConfigError, match=r"data\.background='oasst\.jsonl': no such file or directory"):
        retrofit_main(cfg)
    cfg = _cfg(tmp_path, 1, extra=["model.name_or_path=/nowhere/model", "sparse.background=/nowhere/bg.safetensors"])
    with pytest.raises(ConfigError, match=r"sparse\.background: file /nowhere/bg\.safetensors not found"):
        train_main(cfg)


def _model_freed_after_close(rank, world, run_dir, extra):
    """Train a step, close the trainer, drop it: is its model freed? (weakref, after gc)
    Also: was the dense optimizer torch's fused AdamW (ZeRO 1-3 wrap it)?"""
    import gc
    import weakref

    cfg = _cfg(run_dir, world, "replicated", "memory+scale", 1, extra=extra)
    trainer = Trainer(cfg, _model(cfg.memory), _examples(), pad_id=0)
    trainer.fit()
    dense = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
    fused = isinstance(dense, torch.optim.AdamW) and dense.defaults["fused"] is True
    trainer.close()
    model = weakref.ref(trainer.model)
    del trainer
    gc.collect()
    return model() is None, fused


@pytest.mark.dist
@pytest.mark.parametrize("extra", [[], ["train.zero_stage=2"], ["train.zero_stage=3"],
                                   ["train.zero_stage=3", "train.method=full"],
                                   ["train.zero_stage=3", "train.offload=true", "train.method=full"]],
                         ids=["zero0", "zero2", "memory-zero3", "full-zero3", "full-zero3-offload"])
def test_a_closed_trainer_frees_its_model(tmp_path, extra):
    """An experiment trains run after run in one process: DeepSpeed's module-level state (ZeRO-3's
    FWD_MODULE_STACK and its coordinator's lru_cache) kept every run's model alive until it ran
    out of memory at Qwen2.5-0.5B's size. The dense AdamW is the fused one: the single-tensor one
    made two fp32-weight-sized temporaries per step (+3.7 GiB at 0.5B, README)."""
    freed, fused = run_distributed(_model_freed_after_close, 1, str(tmp_path), extra)[0]
    assert freed
    assert fused


def _logged(rank, world, run_dir, extra):
    """Train 3 steps, logging each; rank 0's TensorBoard scalars by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(run_dir, world, "replicated", "memory+scale", 3, extra=["train.log_every=1", *extra])
    trainer = Trainer(cfg, shard_memory(_model(cfg.memory), None, "replicated"), _examples(), pad_id=0)
    trainer.fit()
    trainer.close()
    if rank != 0:
        return None
    events = EventAccumulator(f"{run_dir}/tensorboard")
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.dist
def test_tensorboard_logs_tokens_throughput_memory_and_grad_norm(tmp_path):
    """The same global batches at W=1 and W=2: the same tokens, losses and dense gradient norms,
    whether the norm is DeepSpeed's (ZeRO-2) or measured by the loop (ZeRO-0, fp32)."""
    from smf_ds.train.batches import GlobalBatchOrder

    examples = _examples()
    order = GlobalBatchOrder(len(examples), 2, 2, 1, 0)  # micro 2 x accum 2: the global batch of _cfg
    expected = [sum(len(examples[i]["input_ids"]) for micro in range(2) for i in order.indices(step, 0, micro))
                for step in range(3)]
    runs = {(world, stage): run_distributed(_logged, world, str(tmp_path / f"w{world}z{stage}"),
                                            [f"train.zero_stage={stage}"])[0]
            for world, stage in ((1, 0), (2, 0), (1, 2))}
    reference = runs[1, 2]
    for logged in runs.values():  # padding not counted; every rank's tokens summed
        assert logged["train/tokens"] == expected
        assert all(s > 0 for s in logged["perf/step_seconds"]) and all(g > 0 for g in logged["perf/peak_rss_gib"])
        for tokens, seconds, rate in zip(expected, logged["perf/step_seconds"], logged["perf/tokens_per_second"]):
            assert rate == pytest.approx(tokens / seconds, rel=1e-5)
        assert logged["train/loss"] == pytest.approx(reference["train/loss"], abs=1e-5)
        assert logged["train/grad_norm"] == pytest.approx(reference["train/grad_norm"], rel=1e-4)
    assert all(g > 0 for g in reference["train/grad_norm"]) and len(reference["train/grad_norm"]) == 3


def _unsharded_at_two_ranks(rank, world, run_dir):
    cfg = _cfg(run_dir, world, "replicated", "values", 1)
    return _config_error_of(lambda: Trainer(cfg, _model(cfg.memory), _examples(), pad_id=0))


@pytest.mark.dist
def test_tables_not_laid_out_over_the_ranks_are_refused(tmp_path):
    """Without shard_memory each rank's local copy would train on its own reads only and drift."""
    for message in run_distributed(_unsharded_at_two_ranks, 2, str(tmp_path)):
        assert "memory layer 1: its value table spans 1 of the 2 ranks" in message and "shard_memory" in message


def _train_or_resume_with(rank, world, run_dir, config_world, resume):
    """Train 2 steps (memory scope: DeepSpeed state), or resume with the config written for
    `config_world` processes; the refusal's message, or "ok"."""
    cfg = _cfg(run_dir, config_world, "replicated", "memory+scale", 2)
    trainer = Trainer(cfg, shard_memory(_model(cfg.memory), None, "replicated"), _examples(), pad_id=0)
    return _config_error_of(trainer.resume if resume else trainer.fit)


@pytest.mark.dist
def test_resume_on_another_number_of_processes_with_another_global_batch_is_refused_by_name(tmp_path):
    """The same config on 1 process instead of 2 would train on half the global batch (train_main
    adjusts grad_accum first: tests/test_elastic_resume.py); a Trainer given it is refused, naming
    the numbers, also from a run.json written before it held the process count."""
    import json

    assert run_distributed(_train_or_resume_with, 2, str(tmp_path), 2, False) == ["ok", "ok"]
    expected = ("the global batch: 2 x 1 x 2 processes = 4 there, 2 x 1 x 1 now "
                "(train.micro_batch_size x train.grad_accum x processes)")
    assert expected in run_distributed(_train_or_resume_with, 1, str(tmp_path), 2, True)[0]
    # A run.json of another format (an older smf-ds) is refused by name, not read with guesses.
    run_json = tmp_path / "checkpoints" / "step0000002" / "run.json"
    identity = json.loads(run_json.read_text())
    identity["format_version"] = 1
    run_json.write_text(json.dumps(identity))
    from smf_ds.manifest import write_manifest

    write_manifest(run_json.parent)  # the edit is not what the manifest catches here
    message = run_distributed(_train_or_resume_with, 1, str(tmp_path), 2, True)[0]
    assert f"resume: {run_json}: format_version 1, expected 2 (written by another smf-ds version)" in message


def _train_keeping(rank, world, run_dir, steps, keep):
    cfg = _cfg(run_dir, world, "replicated", "memory+scale", steps, save_every=1,
               extra=[f"train.keep_checkpoints={keep}"])
    trainer = Trainer(cfg, _model(cfg.memory), _examples(), pad_id=0)
    message = _config_error_of(trainer.resume)
    if message == "ok":
        trainer.fit()
    trainer.close()
    return message


@pytest.mark.dist
def test_keep_checkpoints_keeps_the_newest_complete_ones(tmp_path):
    import os

    checkpoints = tmp_path / "checkpoints"
    assert run_distributed(_train_keeping, 1, str(tmp_path), 4, 2)[0] == "ok"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step0000003", "step0000004"]
    assert (checkpoints / "latest_memory").read_text() == "step0000004"
    # A save killed in an earlier attempt left an incomplete dir (no run.json): removed, not counted.
    (checkpoints / "step0000009").mkdir()
    (checkpoints / "step0000009" / "engine_state.pt").write_bytes(b"half")
    assert run_distributed(_train_keeping, 1, str(tmp_path), 6, 2)[0] == "ok"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step0000005", "step0000006"]
    # Nothing left to train: the checkpoint it resumes from is not written again (a kill there
    # would damage the only copy).
    latest = checkpoints / "step0000006"
    stamps = {p.name: os.stat(p).st_mtime_ns for p in latest.iterdir()}
    assert run_distributed(_train_keeping, 1, str(tmp_path), 6, 2)[0] == "ok"
    assert {p.name: os.stat(p).st_mtime_ns for p in latest.iterdir()} == stamps
    # A damaged latest checkpoint: a named error saying which complete ones are left.
    memory_file = latest / "memory_rank00000.safetensors"
    memory_file.write_bytes(memory_file.read_bytes()[:100])
    message = run_distributed(_train_keeping, 1, str(tmp_path), 7, 2)[0]
    assert f"resume: {latest} is damaged: {memory_file}: 100 bytes, the manifest says" in message
    assert "(complete: step0000005)" in message


def _micro_batch_error(rank, world, run_dir):
    cfg = _cfg(run_dir, world, extra=["train.micro_batch_size=1000"])
    return _config_error_of(lambda: Trainer(cfg, _model(cfg.memory), _examples(), pad_id=0))


@pytest.mark.dist
def test_a_micro_batch_larger_than_the_data_is_refused_naming_both(tmp_path):
    """1000 per micro-batch over 24 examples would hold every example about 40 times in each step."""
    message = run_distributed(_micro_batch_error, 1, str(tmp_path))[0]
    assert message == ("train.micro_batch_size=1000: more than the 24 training examples of data.train; "
                       "expected at most 24")


def _resume_message(rank, world, run_dir):
    cfg = _cfg(run_dir, world, "replicated", "memory+scale", 4)
    return _config_error_of(Trainer(cfg, _model(cfg.memory), _examples(), pad_id=0).resume)


@pytest.mark.dist
def test_a_checkpoint_whose_files_changed_is_refused_naming_the_file(tmp_path):
    """Its manifest (every file's size and sha256, written last) is checked on resume: a memory
    file whose data was zeroed with its header and size kept (as a crash before the data reached
    the disk leaves it), one changed byte in DeepSpeed's file, a missing run.json: each refused by
    name, never resumed from silently."""
    import shutil

    run_distributed(_run, 1, str(tmp_path / "good"), "replicated", "memory+scale", 2)
    tag = tmp_path / "good" / "checkpoints" / "step0000002"
    assert (tag / "manifest.json").is_file()

    def damaged(name, change):
        run = tmp_path / name
        shutil.copytree(tmp_path / "good", run)
        change(run / "checkpoints" / "step0000002")
        return run_distributed(_resume_message, 1, str(run))[0]

    def zero_data(checkpoint):
        file = checkpoint / "memory_rank00000.safetensors"
        raw = bytearray(file.read_bytes())
        header = 8 + int.from_bytes(raw[:8], "little")
        file.write_bytes(bytes(raw[:header]) + bytes(len(raw) - header))

    def flip_a_byte(checkpoint):
        file = checkpoint / "mp_rank_00_model_states.pt"
        raw = bytearray(file.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        file.write_bytes(bytes(raw))

    message = damaged("zeroed", zero_data)
    assert "step0000002 is damaged: " in message and "memory_rank00000.safetensors: its content differs" in message
    message = damaged("flipped", flip_a_byte)
    assert "mp_rank_00_model_states.pt: its content differs" in message
    message = damaged("no_run_json", lambda checkpoint: (checkpoint / "run.json").unlink())
    assert "run.json: missing (the save did not finish)" in message
    assert run_distributed(_resume_message, 1, str(tmp_path / "good"))[0] == "ok"


def _unhealthy(rank, world, run_dir, case):
    """The UnhealthyModelError message of a run that goes wrong, and which checkpoint is latest."""
    from smf_ds.train.health import UnhealthyModelError

    if case == "lr":  # full finetuning at lr 1e10: the weights after step 1 give a non-finite loss
        cfg = _cfg(run_dir, world, extra=["train.method=full", "train.lr=1e10", "train.steps=3", "train.save_every=1"])
        trainer = Trainer(cfg, _model(cfg.memory), _examples(), pad_id=0)
    else:  # two healthy steps saved, then a NaN in a trained tensor
        cfg = _cfg(run_dir, world, "replicated", "memory+scale", 2)
        trainer = Trainer(cfg, _model(cfg.memory), _examples(), pad_id=0)
        trainer.fit()
        with torch.no_grad():
            next(p for p in trainer.model.parameters() if p.requires_grad).fill_(float("nan"))
        trainer.step += 1
    try:
        trainer.fit() if case == "lr" else trainer.save()
    except UnhealthyModelError as err:
        message = str(err)
    else:
        message = "saved"
    latest = trainer.checkpoint_dir / "latest_memory"
    return message, latest.read_text() if latest.is_file() else None


@pytest.mark.dist
def test_an_unhealthy_model_is_never_saved_and_the_last_healthy_checkpoint_is_named(tmp_path):
    message, latest = run_distributed(_unhealthy, 1, str(tmp_path / "lr"), "lr")[0]
    assert message.startswith("train: the model is not healthy after step 1 (a forward pass with the new weights")
    assert "train.lr=10000000000.0" in message and "last healthy checkpoint (every tensor finite, read back): none" in message
    assert latest is None and not (tmp_path / "lr" / "checkpoints" / "step0000001").exists()

    message, latest = run_distributed(_unhealthy, 1, str(tmp_path / "nan"), "nan")[0]
    assert "not healthy after step 3 (non-finite values in model.layers.1.mlp" in message
    assert f"read back): {tmp_path / 'nan' / 'checkpoints' / 'step0000002'}" in message
    assert latest == "step0000002"


def test_a_set_up_waiting_on_a_left_over_build_lock_names_it(tmp_path, monkeypatch, caplog):
    """torch waits silently for ever on an op-build lock that a killed build left behind; after a
    while DeepSpeed's set-up names the locks that exist, and says nothing when there is none."""
    from smf_ds.train.engine import warn_of_build_locks_after

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "deepspeed_shm_comm").mkdir()
    with caplog.at_level("WARNING", logger="smf_ds.train.engine"):
        warn_of_build_locks_after(0.01).join()
        assert not [r for r in caplog.records if r.name == "smf_ds.train.engine"]
        (tmp_path / "deepspeed_shm_comm" / "lock").touch()
        warn_of_build_locks_after(0.01).join()
        cancelled = warn_of_build_locks_after(5.0)
        cancelled.cancel()
        cancelled.join()
    (record,) = [r for r in caplog.records if r.name == "smf_ds.train.engine"]
    assert f"{tmp_path / 'deepspeed_shm_comm' / 'lock'} (0 min old)" in record.getMessage()
    assert "delete them" in record.getMessage()
