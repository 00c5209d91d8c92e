"""The training loop: W=2 equals W=1 with the same global batch; resume is exact; TensorBoard."""
import torch

from distributed import run_distributed
from smf_ds.config import load_config
from smf_ds.memory.inject import inject_memory, value_tables
from smf_ds.parallel.shard import shard_memory
from smf_ds.train.loop import Trainer

VOCAB = 64


def _model(memory_cfg):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return inject_memory(model, memory_cfg)


def _examples(n=24):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (3 + i % 6,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def _cfg(run_dir, world, strategy="local", scope="values", steps=3, save_every=0):
    accum = 2 // world
    return load_config(overrides=[
        "memory.layers=[1]", "memory.n_keys=8", "memory.knn=4", "memory.k_dim=8", "memory.scale_init=1.0",
        f"memory.sharding={strategy}", "sparse.scoring=tf", "sparse.top_t=6",
        f"train.scope={scope}", f"train.steps={steps}", "train.micro_batch_size=2", f"train.grad_accum={accum}",
        f"train.save_every={save_every}", "train.lr=0.01", f"out_dir={run_dir}"])


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


def _resume_error(rank, world, run_dir):
    from smf_ds.config import ConfigError

    cfg = _cfg(run_dir, world, "local", "values", 4)
    trainer = Trainer(cfg, _model(cfg.memory), _examples(), pad_id=0)
    try:
        trainer.resume()
    except ConfigError as err:
        return str(err)
    return "resumed"


def test_two_ranks_equal_one_rank(tmp_path):
    ref = run_distributed(_run, 1, str(tmp_path / "w1"), "local", "values", 3)[0]
    for strategy in ("local", "row", "column"):
        r0, r1 = run_distributed(_run, 2, str(tmp_path / f"w2{strategy}"), strategy, "values", 3)
        assert torch.equal(r0["table"], r1["table"])
        assert (r0["table"] - ref["table"]).abs().max() <= 1e-6, strategy
        assert r0["selected"] == ref["selected"]
        assert abs(r0["losses"][-1] - ref["losses"][-1]) <= 1e-5


def test_resume_is_exact(tmp_path):
    """4 steps straight == 2 steps, stop, resume, 2 more (memory scope: DeepSpeed + sparse state)."""
    straight = run_distributed(_run, 1, str(tmp_path / "a"), "local", "memory+scale", 4)[0]
    run_distributed(_run, 1, str(tmp_path / "b"), "local", "memory+scale", 2)
    resumed = run_distributed(_run, 1, str(tmp_path / "b"), "local", "memory+scale", 4, 0, True)[0]
    assert torch.equal(straight["table"], resumed["table"])
    for name, value in straight["dense"].items():
        assert torch.equal(value, resumed["dense"][name]), name
    assert straight["losses"][2:] == resumed["losses"]
    message = run_distributed(_resume_error, 1, str(tmp_path / "b"))[0]  # values scope now: no DeepSpeed state
    assert "train.scope='memory+scale' there, 'values' now" in message
    events = list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    assert (tmp_path / "a" / "config.yaml").is_file()
