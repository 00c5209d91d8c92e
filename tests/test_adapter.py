"""Memory adapter and merged-directory save/load: equal logits after a round trip, clear errors."""
import json
import logging
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from smf_ds.config import ConfigError, MemoryConfig
from smf_ds.memory.adapter import (CONFIG_NAME, WEIGHTS_NAME, base_fingerprint, load_memory_adapter,
                                   save_memory_adapter)
from smf_ds.memory.merged import load_merged, save_merged
from smf_ds.parallel.collective import process_collective
from smf_ds.memory.inject import inject_memory, memory_layers, value_tables

VOCAB = 96



# transformers is imported inside the functions that use it (see _TinyLM).


def tiny_qwen2(hidden=32, layers=3, tie=False, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg).eval()


def mem_cfg(**kw):
    base = dict(layers=[0, 2], n_keys=6, heads=2, knn=3, k_dim=8, scale_init=0.5, seed=1)
    base.update(kw)
    return MemoryConfig(**base)


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def logits(model):
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def scramble_memory(model, seed=123):
    """Move every memory tensor away from its seeded init, so a no-op load cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mlp in memory_layers(model):
            for name, t in mlp.named_parameters():
                if not name.startswith("base_layer."):
                    t.add_(torch.randn(t.shape, generator=g) * 0.3)
            norm = mlp.memory.query_norm
            if norm is not None:
                norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=g))
                norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=g) + 0.5)
                norm.num_batches_tracked.fill_(17)
        for _, table in value_tables(model):
            table.weight.add_(torch.randn(table.weight.shape, generator=g))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tiny_qwen2().save_pretrained(d)
    return d


def fresh(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


CASES = [
    dict(mode="additive", gated=True),
    dict(mode="additive", gated=False),
    dict(mode="replacement", gated=True),
    dict(mode="replacement", gated=False, query_batchnorm=True),
    dict(mode="additive", gated=True, query_batchnorm=True, v_dim=20),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_adapter_round_trip_gives_equal_logits(base_dir, tmp_path, kw):
    model = inject_memory(fresh(base_dir), mem_cfg(**kw))
    scramble_memory(model)
    expected = logits(model)
    save_memory_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}

    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["base_model"] == {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 3,
                                   "fingerprint": base_fingerprint(inject_memory(fresh(base_dir), mem_cfg(**kw)))}
    assert saved["memory"]["mode"] == kw["mode"] and saved["format_version"] == 1
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_tensor("layers.2.values").shape) == (36, kw.get("v_dim") or 32)
    assert "layers.0.memory.query.weight" in keys and "layers.2.memory.keys" in keys
    assert ("layers.0.scale" in keys) == (kw["mode"] == "additive")
    assert ("layers.0.memory.gate.weight" in keys) == kw["gated"]
    if kw.get("query_batchnorm"):
        assert {"layers.0.memory.query_norm.running_mean", "layers.0.memory.query_norm.running_var",
                "layers.0.memory.query_norm.num_batches_tracked"} <= keys
    assert not any("base_layer" in k for k in keys)

    # Into a model without memory: injected from the saved config, then loaded.
    loaded = load_memory_adapter(fresh(base_dir), tmp_path)
    assert loaded.smf_memory_config == model.smf_memory_config
    assert torch.equal(logits(loaded), expected)
    # The load did something: a fresh injection of the same config differs.
    assert not torch.allclose(logits(inject_memory(fresh(base_dir), mem_cfg(**kw))), expected)


def test_load_into_model_that_already_has_memory(base_dir, tmp_path):
    model = inject_memory(fresh(base_dir), mem_cfg())
    scramble_memory(model)
    save_memory_adapter(model, tmp_path)
    # Same structure, different init/training knobs: loads.
    other = inject_memory(fresh(base_dir), mem_cfg(seed=9, scale_init=0.0, value_lr=0.5))
    assert torch.equal(logits(load_memory_adapter(other, tmp_path)), logits(model))
    # Different structure: the error names the field.
    for field, value in [("knn", 2), ("n_keys", 7), ("layers", [0, 1]), ("mode", "replacement"),
                         ("gated", False), ("v_dim", 16)]:
        mismatched = inject_memory(fresh(base_dir), mem_cfg(**{field: value}))
        with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: memory\.{field}\b"):
            load_memory_adapter(mismatched, tmp_path)


def test_load_into_different_base_model_names_the_field(base_dir, tmp_path):
    model = inject_memory(fresh(base_dir), mem_cfg())
    save_memory_adapter(model, tmp_path)
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: base_model\.hidden_size.*48"):
        load_memory_adapter(tiny_qwen2(hidden=48), tmp_path)
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: base_model\.num_hidden_layers.*4"):
        load_memory_adapter(tiny_qwen2(layers=4), tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: base_model\.model_type.*llama"):
        load_memory_adapter(llama, tmp_path)
    # A failed load leaves the model without memory.
    assert getattr(llama, "smf_memory_config", None) is None and not memory_layers(llama)


def test_base_fingerprint_tells_other_weights_apart_and_warns_on_load(base_dir, tmp_path, caplog):
    model = inject_memory(fresh(base_dir), mem_cfg())
    scramble_memory(model)  # memory is not part of the base
    assert base_fingerprint(model) == base_fingerprint(fresh(base_dir))
    assert base_fingerprint(fresh(base_dir).to(torch.bfloat16)) == base_fingerprint(fresh(base_dir))
    other = tiny_qwen2(seed=5)  # same shapes, other weights
    assert base_fingerprint(other) != base_fingerprint(fresh(base_dir))
    save_memory_adapter(model, tmp_path)
    with caplog.at_level(logging.WARNING, logger="smf_ds.memory.adapter"):
        load_memory_adapter(fresh(base_dir), tmp_path)
        assert not caplog.records
        loaded = load_memory_adapter(other, tmp_path)  # a transfer may be deliberate: it loads
    assert loaded.smf_memory_config == model.smf_memory_config
    assert len(caplog.records) == 1 and "base_model.fingerprint" in caplog.text and str(tmp_path) in caplog.text


def test_missing_or_corrupt_files_name_the_file(base_dir, tmp_path):
    model = inject_memory(fresh(base_dir), mem_cfg())
    save_memory_adapter(model, tmp_path)
    weights = (tmp_path / WEIGHTS_NAME).read_bytes()

    (tmp_path / WEIGHTS_NAME).unlink()
    target = fresh(base_dir)
    with pytest.raises(ConfigError, match=rf"{WEIGHTS_NAME}: not found"):
        load_memory_adapter(target, tmp_path)
    assert not memory_layers(target)  # nothing injected when the weights cannot be read

    (tmp_path / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ConfigError, match=rf"{WEIGHTS_NAME}: cannot be read"):
        load_memory_adapter(fresh(base_dir), tmp_path)

    (tmp_path / WEIGHTS_NAME).write_bytes(weights)
    good_config = (tmp_path / CONFIG_NAME).read_text()
    (tmp_path / CONFIG_NAME).write_text(good_config[:40])
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: not valid JSON"):
        load_memory_adapter(fresh(base_dir), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(good_config.replace('"knn": 3', '"knnn": 3'))
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: unknown config key 'memory.knnn'"):
        load_memory_adapter(fresh(base_dir), tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: not found"):
        load_memory_adapter(fresh(base_dir), tmp_path)


def test_adapter_weights_that_do_not_match_the_config_are_an_error(base_dir, tmp_path):
    model = inject_memory(fresh(base_dir), mem_cfg())
    save_memory_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["memory"]["gated"] = False  # config now says ungated; the file still holds gate/out
    meta["memory"]["v_dim"] = None
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=rf"{WEIGHTS_NAME}: tensors do not match.*gate"):
        load_memory_adapter(fresh(base_dir), tmp_path)


def test_save_without_memory_is_an_error(base_dir, tmp_path):
    with pytest.raises(ConfigError, match="no memory is injected"):
        save_memory_adapter(fresh(base_dir), tmp_path)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _tiny_tokenizer():
    """A byte-level BPE, which loads back as the Qwen2 tokenizer a qwen2 config.json asks for
    (a bare WordLevel tokenizer.json loads back empty there)."""
    from smf_ds.data.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(["w1 w2 w3"], vocab_size=300)


def save_first_format(model, directory):
    """A merged directory as smf-ds wrote it before format 2: the base model's own config.json and
    weights under their original names, the memory in the adapter's two files beside them."""
    from smf_ds.memory.adapter import base_state_dict

    model.save_pretrained(directory, state_dict=base_state_dict(model))
    save_memory_adapter(model, directory)


@pytest.mark.parametrize("mode,tie", [("additive", True), ("replacement", False), ("replacement", True)])
def test_merged_round_trip(tmp_path, mode, tie):
    base = tiny_qwen2(tie=tie)
    base_keys = set(base.state_dict()) - ({"lm_head.weight"} if tie else set())
    model = inject_memory(base, mem_cfg(mode=mode, query_batchnorm=True))
    scramble_memory(model)
    expected = logits(model)
    out = tmp_path / "merged"
    save_merged(model, out, tokenizer=_tiny_tokenizer())
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_smf.py", "configuration_smf.py", "product_keys.py",
            "tokenizer.json"} <= names
    assert not names & {CONFIG_NAME, WEIGHTS_NAME}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "smf_qwen2" and config["architectures"] == ["SMFQwen2ForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_smf.SMFQwen2ForCausalLM"
    assert config["smf_memory"]["layers"] == [0, 2] and config["smf_memory"]["mode"] == mode

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved_keys = set(f.keys())
    tables = {f"model.layers.{i}.mlp.memory.values.weight" for i in (0, 2)}
    assert saved_keys == (set(model.state_dict()) | tables) - ({"lm_head.weight"} if tie else set())
    moved = {k for k in base_keys if any(f"layers.{i}.mlp." in k for i in (0, 2))}
    assert not moved & saved_keys  # a memory layer's MLP is under mlp.base_layer (additive) or gone
    assert {k.replace(".mlp.", ".mlp.base_layer.") for k in moved} <= saved_keys or mode == "replacement"

    loaded = load_merged(out)
    assert not loaded.training
    assert torch.equal(logits(loaded), expected)
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    # The injected model itself is unchanged by saving.
    assert torch.equal(logits(model), expected)
    # `smf-ds eval --model <merged dir>` loads the memory too (not the bare base weights).
    from smf_ds.models import load_model_and_tokenizer

    evaluated, _ = load_model_and_tokenizer(str(out), dtype="float32", device="cpu")
    assert torch.equal(logits(evaluated), expected)
    # With --memory-adapter too, its own memory would be dropped: refused.
    with pytest.raises(ValueError, match="holds a merged model .* evaluate it without --memory-adapter"):
        load_model_and_tokenizer(str(out), memory_adapter=str(out), dtype="float32", device="cpu")


def test_a_merged_directory_missing_a_weight_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    model = inject_memory(tiny_qwen2(), mem_cfg(mode="replacement"))
    out = tmp_path / "merged"
    save_merged(model, out)
    state = load_file(str(out / "model.safetensors"))
    for key in ("model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.memory.values.weight"):
        broken = {k: v for k, v in state.items() if k != key}
        save_file(broken, str(out / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ConfigError, match=r"its files are not what was written: .*model\.safetensors: \d+ bytes"):
            load_merged(out)  # the directory's manifest says so first
        manifest = (out / "manifest.json").read_text()
        (out / "manifest.json").unlink()  # as a directory edited by hand would have none
        with pytest.raises(ConfigError, match=rf"model\.safetensors: .*{key.replace('.', '[.]')}"):
            load_merged(out)
        (out / "manifest.json").write_text(manifest)


@pytest.mark.parametrize("mode", ["additive", "replacement"])
def test_first_format_merged_directories_still_load_with_a_warning(tmp_path, mode, caplog):
    model = inject_memory(tiny_qwen2(), mem_cfg(mode=mode))
    scramble_memory(model)
    out = tmp_path / "old"
    save_first_format(model, out)
    _tiny_tokenizer().save_pretrained(out)
    from smf_ds.models import load_model_and_tokenizer

    with caplog.at_level(logging.WARNING, logger="smf_ds.memory.merged"):
        evaluated, _ = load_model_and_tokenizer(str(out), dtype="float32", device="cpu")
    assert torch.equal(logits(evaluated), logits(model))
    assert any("first format" in r.getMessage() and "smf-ds export" in r.getMessage() for r in caplog.records)
    # smf-ds export rewrites it in the format any HF loader reads right or refuses.
    from smf_ds.cli import main

    assert main(["export", "--model", str(out), "--out", str(tmp_path / "new")]) == 0
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == "smf_qwen2"
    assert torch.equal(logits(load_merged(tmp_path / "new")), logits(model))


def test_first_format_load_still_reports_unexpected_missing_weights(tmp_path):
    model = inject_memory(tiny_qwen2(), mem_cfg(mode="replacement"))
    out = tmp_path / "merged"
    save_first_format(model, out)
    # Drop one weight that is not a replaced MLP's: transformers' report must come through.
    from safetensors.torch import load_file, save_file
    state = load_file(str(out / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    records = _Records()
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addHandler(records)
    try:
        load_merged(out)
    finally:
        hf_logger.removeHandler(records)
    assert [m for m in records.messages if "LOAD REPORT" in m]


def test_load_merged_on_a_plain_model_directory_names_the_file(base_dir):
    with pytest.raises(ConfigError, match=r"config\.json: smf_ds\.format: expected 'smf-ds-merged'"):
        load_merged(base_dir)


# --- sharded tables: every rank gathers, rank 0 writes --------------------------------------


class _TinyLM(nn.Module):
    """What inject_memory needs (config, model.layers[i].mlp) without transformers: the spawned
    workers then import only torch and smf_ds, which keeps this test a few seconds."""

    def __init__(self, hidden=32, n_layers=3):
        super().__init__()
        torch.manual_seed(0)
        self.config = types.SimpleNamespace(model_type="qwen2", hidden_size=hidden, num_hidden_layers=n_layers)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Module() for _ in range(n_layers))
        for layer in self.model.layers:
            layer.mlp = nn.Linear(hidden, hidden)

    def forward(self, x_BTC, attention_mask=None):
        for layer in self.model.layers:
            x_BTC = x_BTC + layer.mlp(x_BTC)
        return x_BTC


def _tiny_lm_out(model):
    with torch.no_grad():
        return model(torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3)))


def _sharded_save_worker(out_dir):
    from smf_ds.parallel.shard import shard_memory

    same_shards = {}
    for strategy in ("row", "column"):
        model = inject_memory(_TinyLM(), mem_cfg())
        scramble_memory(model)  # identical on every rank (seeded)
        shard_memory(model, None, strategy)
        for _, table in value_tables(model):
            assert tuple(table.local_weight.shape) != (table.num_rows, table.dim)  # really sharded
        save_memory_adapter(model, Path(out_dir) / strategy, process_collective())  # every rank: a collective
        # Every rank loads the whole file back into its own shard.
        other = inject_memory(_TinyLM(), mem_cfg(seed=3))
        shard_memory(other, None, strategy)
        load_memory_adapter(other, Path(out_dir) / strategy, process_collective())
        same_shards[strategy] = all(torch.equal(a.local_weight, b.local_weight)
                                    for (_, a), (_, b) in zip(value_tables(model), value_tables(other)))
    return same_shards


def _zero3_worker(out_dir):
    import deepspeed

    from smf_ds.memory.inject import set_train_scope

    model = inject_memory(_TinyLM(), mem_cfg())
    scramble_memory(model)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=set_train_scope(model, "memory+scale"),
                                      config=config)
    partitioned = all(p.numel() == 0 for _, mlp in memory_layers(engine.module) for p in mlp.memory.parameters())
    collective = process_collective()
    save_memory_adapter(engine.module, Path(out_dir) / "zero3_saved", collective)  # gathers the partitioned params
    load_memory_adapter(engine.module, Path(out_dir) / "other", collective)  # writes into partitioned params
    save_memory_adapter(engine.module, Path(out_dir) / "zero3_reloaded", collective)
    return partitioned


def _distributed_worker(rank, world, out_dir):
    return {"sharded": _sharded_save_worker(out_dir), "zero3_partitioned": _zero3_worker(out_dir)}


@pytest.mark.dist
def test_distributed_save_and_load(tmp_path):
    """Two gloo ranks (one spawn for both parts, to keep the suite fast): row/column-sharded value
    tables are saved whole and loaded back into shards; ZeRO-3-partitioned memory params are
    gathered for saving and written through on loading."""
    from safetensors.torch import load_file

    from distributed import run_distributed

    reference, other = inject_memory(_TinyLM(), mem_cfg()), inject_memory(_TinyLM(), mem_cfg())
    scramble_memory(reference)
    scramble_memory(other, seed=9)
    save_memory_adapter(other, tmp_path / "other")

    results = run_distributed(_distributed_worker, 2, str(tmp_path), timeout=600)
    assert results == [{"sharded": {"row": True, "column": True}, "zero3_partitioned": True}] * 2

    for strategy in ("row", "column"):
        assert {p.name for p in (tmp_path / strategy).iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
        loaded = load_memory_adapter(_TinyLM(), tmp_path / strategy)  # whole tables into local ones
        for (_, a), (_, b) in zip(value_tables(loaded), value_tables(reference)):
            assert torch.equal(a.weight, b.weight)
        assert torch.equal(_tiny_lm_out(loaded), _tiny_lm_out(reference))

    save_memory_adapter(reference, tmp_path / "reference")
    for saved, want in [("zero3_saved", "reference"), ("zero3_reloaded", "other")]:
        a, b = load_file(tmp_path / saved / WEIGHTS_NAME), load_file(tmp_path / want / WEIGHTS_NAME)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), saved


def test_weights_that_do_not_fit_leave_the_model_as_it_was(base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    for mode in ("additive", "replacement"):
        save_memory_adapter(inject_memory(fresh(base_dir), mem_cfg(mode=mode)), tmp_path)
        tensors = load_file(tmp_path / WEIGHTS_NAME)
        tensors["layers.2.values"] = tensors["layers.2.values"][:-1].contiguous()
        save_file(tensors, tmp_path / WEIGHTS_NAME)
        target = fresh(base_dir)
        before, mlps = logits(target), [layer.mlp for layer in target.model.layers]
        with pytest.raises(ConfigError, match=rf"{WEIGHTS_NAME}: layers\.2\.values: expected shape \(36, 32\)"):
            load_memory_adapter(target, tmp_path)
        assert [layer.mlp for layer in target.model.layers] == mlps
        assert getattr(target, "smf_memory_config", None) is None and not target._forward_pre_hooks
        assert torch.equal(logits(target), before)
        inject_memory(target, mem_cfg())  # can still be injected


def test_an_adapter_whose_files_changed_is_refused_naming_the_file(base_dir, tmp_path):
    """A run's artifact carries a manifest (smf_ds.manifest); a cut or changed file is refused on
    loading instead of loaded. An adapter without one (older, or hand-made) loads unchecked."""
    from smf_ds.manifest import write_manifest

    model = inject_memory(fresh(base_dir), mem_cfg())
    scramble_memory(model)
    save_memory_adapter(model, tmp_path / "a")
    write_manifest(tmp_path / "a")
    assert torch.equal(logits(load_memory_adapter(fresh(base_dir), tmp_path / "a")), logits(model))
    weights = tmp_path / "a" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(ConfigError, match=rf"memory adapter\): its files are not what was written: {weights}: its content differs"):
        load_memory_adapter(fresh(base_dir), tmp_path / "a")
    (tmp_path / "a" / "manifest.json").unlink()
    load_memory_adapter(fresh(base_dir), tmp_path / "a")
