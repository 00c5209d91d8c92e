"""DeepSpeed never sees value tables: no broadcast over shards, no ZeRO partitioning, no allreduce."""
import pytest
import torch

from distributed import run_distributed

pytestmark = pytest.mark.dist


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def _ds_worker(rank, world, zero_stage, strategy):
    import deepspeed

    from smf_ds.config import MemoryConfig
    from smf_ds.memory.inject import inject_memory, set_train_scope, value_tables
    from smf_ds.parallel.shard import shard_memory

    model = inject_memory(_tiny_qwen2(), MemoryConfig(layers=[1], n_keys=8, knn=4, k_dim=8, scale_init=0.5))
    shard_memory(model, None, strategy)
    (_, table), = value_tables(model)
    before = table.local_weight.clone()
    params = set_train_scope(model, "memory+scale")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": zero_stage}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    after_init = table.local_weight.clone()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(rank))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    rows, grads = table.sink.coalesced_grad(table.local_weight.shape[1])
    module_tensors = [p.data_ptr() for p in engine.module.parameters()]
    return {
        "unchanged_by_init": torch.equal(before, after_init),
        "unchanged_by_step": torch.equal(before, table.local_weight),
        "not_a_parameter": table.local_weight.data_ptr() not in module_tensors,
        "not_in_state_dict": not any("values" in k for k in engine.module.state_dict()),
        "sink_has_grads": rows.numel() > 0 and bool(grads.abs().sum() > 0),
        "shard_rows": table.local_weight.shape[0],
    }


@pytest.mark.parametrize("zero_stage,strategy", [(0, "row"), (3, "row"), (2, "column")])
def test_deepspeed_leaves_value_tables_alone(zero_stage, strategy):
    results = run_distributed(_ds_worker, 2, zero_stage, strategy, timeout=600)
    for rank, r in enumerate(results):
        for key in ("unchanged_by_init", "unchanged_by_step", "not_a_parameter", "not_in_state_dict", "sink_has_grads"):
            assert r[key], (rank, key, r)
