"""Injection into tiny HF causal LMs built from configs (nothing downloaded)."""
import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from smf_ds.config import ConfigError, MemoryConfig
from smf_ds.memory.inject import inject_memory, memory_layers, set_train_scope, value_tables
from smf_ds.memory.portable.product_keys import MemoryMLP

VOCAB = 80



def tiny(arch="qwen2", layers=4, seed=0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def mem_cfg(**kw):
    base = dict(layers=[1, 3], n_keys=6, heads=2, knn=3, k_dim=8, scale_init=0.0)
    base.update(kw)
    return MemoryConfig(**base)


def batch(padded: bool):
    ids = torch.randint(2, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        mask[2, :5] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def run(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


ARCHS = ["qwen2", "llama"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
def test_additive_with_zero_scale_is_exactly_the_base_model(arch, padded):
    ids, mask = batch(padded)
    model = tiny(arch)
    before = run(model, ids, mask)
    inject_memory(model, mem_cfg(mode="additive", scale_init=0.0))
    assert [i for i, _ in memory_layers(model)] == [1, 3]
    assert torch.equal(run(model, ids, mask), before)
    # The memory is really in the path: a non-zero scale changes the output.
    with torch.no_grad():
        memory_layers(model)[0][1].scale.fill_(1.0)
    assert not torch.allclose(run(model, ids, mask), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_replacement_runs_and_changes_outputs(arch):
    ids, mask = batch(True)
    model = tiny(arch)
    before = run(model, ids, mask)
    originals = [model.model.layers[i].mlp for i in (1, 3)]
    inject_memory(model, mem_cfg(mode="replacement", gated=False))
    for (_, mlp), original in zip(memory_layers(model), originals):
        assert mlp.mode == "replacement" and mlp.base_layer is None and mlp.scale is None
        assert all(p is not q for p in mlp.parameters() for q in original.parameters())
    after = run(model, ids, mask)
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.allclose(after, before)
    # Training step: loss is finite and the value rows receive gradients.
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for _, table in value_tables(model):
        rows, grads = table.sink.coalesced_grad(table.dim)
        assert rows.numel() > 0 and torch.isfinite(grads).all()


@pytest.mark.parametrize("mode", ["additive", "replacement"])
def test_value_table_is_not_a_parameter_nor_in_state_dict(mode):
    model = inject_memory(tiny(), mem_cfg(mode=mode))
    params = {id(p) for p in model.parameters()}
    for _, table in value_tables(model):
        assert not isinstance(table.weight, nn.Parameter)
        assert id(table.weight) not in params
        assert all(t.data_ptr() != table.weight.data_ptr() for t in model.state_dict().values())
    assert not any("values" in k for k in model.state_dict())
    assert not any("values" in n for n, _ in model.named_parameters())


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["additive", "replacement"])
def test_set_train_scope(mode):
    model = inject_memory(tiny(), mem_cfg(mode=mode, query_batchnorm=True))
    memory_params = {n for n, _ in model.named_parameters() if ".mlp.memory." in n}
    scale_params = {n for n, _ in model.named_parameters() if n.endswith(".mlp.scale")}
    assert len(memory_params) == 2 * 6  # query, keys, gate, out, norm weight + bias; two layers
    assert len(scale_params) == (2 if mode == "additive" else 0)
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {"values": set(), "memory": memory_params, "memory+scale": memory_params | scale_params}
    for scope, want in expected.items():
        for p in model.parameters():
            p.requires_grad_(True)  # whatever was trainable before must not leak through
        returned = set_train_scope(model, scope)
        assert _trainable(model) == want, scope
        assert {names[id(p)] for p in returned} == want, scope
        assert all(table.requires_grad for _, table in value_tables(model))
    with pytest.raises(ConfigError, match="train scope.*'everything'"):
        set_train_scope(model, "everything")


def test_values_scope_trains_only_value_rows():
    model = inject_memory(tiny(), mem_cfg(scale_init=0.5))
    set_train_scope(model, "values")
    model.train()
    ids, mask = batch(True)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(table.sink.grad_entries for _, table in value_tables(model))


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"memory\.layers: layer 4 is out of range.*0\.\.3"):
        inject_memory(tiny(), mem_cfg(layers=[1, 4]))
    with pytest.raises(ConfigError, match=r"memory\.layers: layer -1"):
        inject_memory(tiny(), mem_cfg(layers=[-1]))
    with pytest.raises(ConfigError, match=r"memory\.knn: .*n_keys \(= 6\), got 7"):
        inject_memory(tiny(), mem_cfg(knn=7))
    with pytest.raises(ConfigError, match=r"memory\.v_dim: expected 32 .*got 16"):
        inject_memory(tiny(), mem_cfg(gated=False, v_dim=16))
    inject_memory(tiny(), mem_cfg(gated=True, v_dim=16))  # fine with the gated projection
    inject_memory(tiny(), mem_cfg(gated=False, v_dim=32))

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    with pytest.raises(ConfigError, match=r"architecture 'gpt2'.*\['qwen2', 'llama'\]"):
        inject_memory(gpt2, mem_cfg(layers=[0]))

    model = tiny()
    inject_memory(model, mem_cfg())
    with pytest.raises(ConfigError, match="already injected"):
        inject_memory(model, mem_cfg())
    assert len(memory_layers(model)) == 2


def test_failed_injection_leaves_the_model_untouched():
    model = tiny()
    mlps = [layer.mlp for layer in model.model.layers]
    with pytest.raises(ConfigError):
        inject_memory(model, mem_cfg(layers=[0, 9]))
    assert [layer.mlp for layer in model.model.layers] == mlps
    assert getattr(model, "smf_memory_config", None) is None
    inject_memory(model, mem_cfg())  # and it can still be injected


def test_injection_is_seeded_and_follows_train_mode():
    a, b = inject_memory(tiny(), mem_cfg(seed=4)), inject_memory(tiny(), mem_cfg(seed=4))
    c = inject_memory(tiny(), mem_cfg(seed=5))
    ta, tb, tc = (value_tables(m)[0][1] for m in (a, b, c))
    assert torch.equal(ta.weight, tb.weight) and not torch.equal(ta.weight, tc.weight)
    # Layers get different memory.
    assert not torch.equal(value_tables(a)[0][1].weight, value_tables(a)[1][1].weight)
    assert all(not m.training for m in a.modules())  # injected into an eval model: eval
    train_model = inject_memory(tiny().train(), mem_cfg())
    assert all(m.training for m in train_model.modules())


def _count_reads(model, ids, mask):
    for _, table in value_tables(model):
        table.track_access = True
        table.sink.clear()
    run(model, ids, mask)
    return [int(table.sink.coalesced_access()[1].sum()) for _, table in value_tables(model)]


def test_padding_is_not_counted_and_deepcopy_keeps_it_so():
    model = inject_memory(tiny(), mem_cfg())
    ids, mask = batch(True)
    reads_per_token = 2 * 3  # heads * knn
    assert _count_reads(model, ids, mask) == [int(mask.sum()) * reads_per_token] * 2
    assert _count_reads(model, ids, None) == [ids.numel() * reads_per_token] * 2
    twin = copy.deepcopy(model)
    assert _count_reads(twin, ids, mask) == [int(mask.sum()) * reads_per_token] * 2
    assert torch.equal(run(twin, ids, mask), run(model, ids, mask))


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_kv_cache_and_left_padding(arch):
    ids, mask = batch(True)
    plain = tiny(arch)
    expected = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                              pad_token_id=0)
    model = inject_memory(tiny(arch), mem_cfg(scale_init=0.0))
    for _, table in value_tables(model):
        table.track_access = True
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 7 + 3)
    assert torch.equal(out, expected)  # scale 0: same tokens as the untouched model
    # Prompt (padding masked) + 2 cached single-token steps per sequence; the last token is not fed back.
    want = (int(mask.sum()) + 3 * 2) * 2 * 3
    assert [int(t.sink.coalesced_access()[1].sum()) for _, t in value_tables(model)] == [want] * 2

    # A memory that matters also generates through the cache, equal to a no-cache run.
    with torch.no_grad():
        for _, mlp in memory_layers(model):
            mlp.scale.fill_(2.0)
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                              pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert isinstance(model.model.layers[1].mlp, MemoryMLP)
