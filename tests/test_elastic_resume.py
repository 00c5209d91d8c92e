"""Elastic resume: a checkpoint made on W processes continues on W' (2 -> 1, 1 -> 2, 2 -> 4) for local,
row and column tables and ZeRO 0-3, with the global batch kept (grad_accum adjusted): the value
tables, their per-row Adam state and the dense memory parameters with their AdamW state are
re-split, and the continuation equals a run made on W' throughout (within 1e-5; the rows
selected at every step after the resume identical)."""
import pytest
import torch

from distributed import run_distributed
from smf_ds.config import ConfigError, load_config
from smf_ds.parallel.collective import gathered_parameters
from smf_ds.memory.inject import inject_memory, value_tables
from smf_ds.parallel.layout import MemoryLayout
from smf_ds.train.checkpoint import fit_global_batch
from smf_ds.train.loop import Trainer

pytestmark = pytest.mark.dist

VOCAB, STEPS, FIRST = 64, 4, 2
CASES = [(strategy, stage) for strategy in ("replicated", "row", "column") for stage in (0, 1, 2, 3)]
# LoRA and full finetuning: no value table, the dense state alone (their checkpoints are DeepSpeed's and
# dense_full's); run in the 2 -> 1 direction.
DENSE_CASES = [("lora", 2), ("full", 3)]
GLOBAL_BATCH = 8  # micro-batch 2 x grad_accum x processes


def _model(memory_cfg):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    return inject_memory(model, memory_cfg)


def _examples(n=24):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": ids, "labels": ids}
            for ids in (torch.randint(1, VOCAB, (3 + i % 6,), generator=g).tolist() for i in range(n))]


def _config(run_dir, world, strategy, stage, parallel_size=0):
    if strategy in ("lora", "full"):
        return load_config(overrides=[f"train.method={strategy}", f"train.zero_stage={stage}", f"train.steps={STEPS}",
                                      "train.micro_batch_size=2", f"train.grad_accum={GLOBAL_BATCH // (2 * world)}",
                                      "train.lr=0.01", "train.lora_targets=[q_proj,v_proj]", f"out_dir={run_dir}"])
    return load_config(overrides=[f"memory.parallel_size={parallel_size}",
        "memory.layers=[1]", "memory.n_keys=8", "memory.knn=4", "memory.k_dim=8", "memory.scale_init=1.0",
        f"memory.sharding={strategy}", "sparse.scoring=tf", "sparse.top_t=6", "sparse.optimizer=adam",
        "memory.value_lr=0.05", "train.scope=memory+scale", f"train.zero_stage={stage}", f"train.steps={STEPS}",
        "train.micro_batch_size=2", f"train.grad_accum={GLOBAL_BATCH // (2 * world)}", "train.lr=0.01",
        f"out_dir={run_dir}"])


def _trainer(cfg):
    if cfg.train.method != "smf":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        return Trainer(cfg, model, _examples(), pad_id=0), []
    model = _model(cfg.memory)
    layout = MemoryLayout.from_config(cfg.memory)
    layout.apply(model)
    model.smf_layout = layout
    trainer = Trainer(cfg, model, _examples(), pad_id=0)
    selected, step = [], trainer.updater.step

    def recording_step():  # the rows each optimizer step updates
        metrics = step()
        selected.append(trainer.updater.previous[1].tolist())
        return metrics

    trainer.updater.step = recording_step
    return trainer, selected


def _state(trainer, selected, losses) -> dict:
    tables = value_tables(trainer.model) if trainer.tables else []
    with gathered_parameters(list(trainer.model.parameters())):
        dense = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"table": tables[0][1].full_weight().clone() if tables else torch.zeros(0), "dense": dense,
            "selected": selected, "losses": losses, "grad_accum": trainer.cfg.train.grad_accum}


def _phase(rank, world, root, phase, written_by=None):
    """phase "ref": every case straight to STEPS on this world; "first": to FIRST, checkpointed;
    "resume": copies of the checkpoints written on `written_by` processes (w<written_by>to<world>),
    resumed here to STEPS."""
    out = {}
    for strategy, stage in CASES + (DENSE_CASES if world in (1, 2) and written_by in (None, 2) else []):
        if phase == "resume":
            run_dir = f"{root}/w{written_by}to{world}/{strategy}-z{stage}"
            cfg = _config(run_dir, written_by, strategy, stage)  # the run's own config, as on a requeue
            fit_global_batch(cfg, f"{run_dir}/checkpoints")
            trainer, selected = _trainer(cfg)
            assert trainer.resume() and trainer.step == FIRST
        elif phase == "two_groups":  # tables split over groups of 2 ranks, replicated across the groups
            if strategy == "replicated" or stage not in (0, 3):
                continue
            trainer, selected = _trainer(_config(f"{root}/p2w{world}/{strategy}-z{stage}", world, strategy, stage, 2))
            assert trainer.layout.replicas == world // 2
        else:
            run_dir = f"{root}/{'ref' if phase == 'ref' else 'w'}{world}/{strategy}-z{stage}"
            trainer, selected = _trainer(_config(run_dir, world, strategy, stage))
        result = trainer.fit(steps=FIRST if phase == "first" else STEPS)
        out[(strategy, stage)] = _state(trainer, selected, result.losses)
        trainer.close()
    return out


def _close(a: dict, b: dict, what: str) -> None:
    assert a["table"].shape == b["table"].shape, what
    assert a["table"].numel() == 0 or (a["table"] - b["table"]).abs().max() <= 1e-5, f"{what}: value table"
    assert a["dense"].keys() == b["dense"].keys() and a["dense"], what
    for name in a["dense"]:
        assert (a["dense"][name] - b["dense"][name]).abs().max() <= 1e-5, f"{what}: {name}"


def test_a_checkpoint_resumes_on_another_number_of_processes(tmp_path):
    import shutil

    root = str(tmp_path)
    ref1, first1 = (run_distributed(_phase, 1, root, phase)[0] for phase in ("ref", "first"))
    shutil.copytree(tmp_path / "w1", tmp_path / "w1to2")
    ref2, first2 = (run_distributed(_phase, 2, root, phase)[0] for phase in ("ref", "first"))
    from1 = run_distributed(_phase, 2, root, "resume", 1)[0]
    for world in (1, 4):
        shutil.copytree(tmp_path / "w2", tmp_path / f"w2to{world}")
    from2_on1 = run_distributed(_phase, 1, root, "resume", 2)[0]
    ref4, from2_on4, two_groups = (run_distributed(_phase, 4, root, phase, 2)[0]
                                   for phase in ("ref", "resume", "two_groups"))
    for case in CASES:
        for resumed, ref, what in ((from2_on1[case], ref1[case], "2 -> 1"), (from1[case], ref2[case], "1 -> 2"),
                                   (from2_on4[case], ref4[case], "2 -> 4")):
            what = f"{what} {case}"
            _close(resumed, ref, what)
            assert resumed["selected"] == ref["selected"][FIRST:], f"{what}: rows selected after the resume"
            assert max(abs(a - b) for a, b in zip(resumed["losses"], ref["losses"][FIRST:])) <= 1e-5, what
            assert resumed["grad_accum"] == ref["grad_accum"], what  # adjusted to keep the global batch
        # The worlds agree with each other up to float summation order, before any resume too.
        _close(first1[case], first2[case], f"W=1 and W=2 after {FIRST} steps {case}")
    for case in DENSE_CASES:  # LoRA (ZeRO-2) and full finetuning (ZeRO-3), 2 -> 1
        _close(from2_on1[case], ref1[case], f"2 -> 1 {case}")
        assert max(abs(a - b) for a, b in zip(from2_on1[case]["losses"], ref1[case]["losses"][FIRST:])) <= 1e-5, case
    assert len(two_groups) == 4
    for case, run in two_groups.items():  # memory.parallel_size=2 of 4: the same training
        _close(run, ref1[case], f"parallel_size 2 of 4 {case}")
        assert run["selected"] == ref1[case]["selected"], case


def _refused_global_batch(rank, world, root):
    cfg = _config(f"{root}/w2/row-z0", 2, "row", 0)
    cfg.train.micro_batch_size = 3  # 3 x grad_accum x 1 cannot be the checkpoint's 8
    try:
        fit_global_batch(cfg, f"{root}/w2/row-z0/checkpoints")
    except ConfigError as err:
        return str(err)
    return "ok"


def test_a_global_batch_that_cannot_be_kept_is_refused_by_name(tmp_path):
    root = str(tmp_path)
    run_distributed(_phase, 2, root, "first")
    message = run_distributed(_refused_global_batch, 1, root)[0]
    assert "global batch of 2 x 2 x 2 processes = 8" in message and "train.micro_batch_size" in message


def _dense_state_in_parts(rank, world, root, phase):
    from smf_ds.train import dense_state

    dense_state.PART_BYTES = 1  # every parameter's state its own part, as a model of many GiB would have
    run_dir = f"{root}/{'ref' if phase == 'ref' else 'parts'}"
    cfg = _config(run_dir, 1 if phase == "ref" else 2, "full", 3)  # "resume": the run's own config, as on a requeue
    if phase == "resume":
        fit_global_batch(cfg, f"{run_dir}/checkpoints")
    trainer, selected = _trainer(cfg)
    if phase == "resume":
        assert trainer.resume() and trainer.step == FIRST
    result = trainer.fit(steps=FIRST if phase == "first" else STEPS)
    parts = sorted(p.name for p in (trainer.checkpoint_dir / trainer.tag).glob("dense_full-*.safetensors"))
    state = _state(trainer, selected, result.losses)
    trainer.close()
    return {"state": state, "parts": parts}


def test_a_dense_state_written_in_parts_resumes_on_another_number_of_processes(tmp_path):
    root = str(tmp_path)
    first = run_distributed(_dense_state_in_parts, 2, root, "first")[0]
    trainable = len(first["state"]["dense"])
    assert len(first["parts"]) == trainable > 1, first["parts"]  # one part per parameter, none left behind
    resumed = run_distributed(_dense_state_in_parts, 1, root, "resume")[0]
    ref = run_distributed(_dense_state_in_parts, 1, root, "ref")[0]
    _close(resumed["state"], ref["state"], "2 -> 1 from parts")
    assert max(abs(a - b) for a, b in zip(resumed["state"]["losses"], ref["state"]["losses"][FIRST:])) <= 1e-5
