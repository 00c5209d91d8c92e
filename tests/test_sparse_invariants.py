"""SMF step invariants for every scoring rule and sharding strategy (CPU, fp32, gloo)."""
import math

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from smf_ds.config import SCORING_RULES, ConfigError, MemoryConfig
from smf_ds.sparse.background import BackgroundStats, collect_background
from smf_ds.sparse.selection import _row_hash
from smf_ds.sparse.step import SparseMemoryUpdater
from smf_fixtures import HIDDEN, MEM_CFG, global_batch, make_memory, micro_loss, sparse_cfg

ROWS = MEM_CFG.slots
STEPS, BG_BATCHES, SEQS = 3, 4, 8


def _my_slice(rank, world, n=SEQS):
    per = n // world
    return slice(rank * per, (rank + 1) * per)


def _shard(mem, world, strategy):
    from smf_ds.parallel.sharded_values import ColumnShardedValueTable, RowShardedValueTable
    if world == 1 or strategy == "replicated":
        if world > 1:
            mem.values.replica_group = dist.group.WORLD
        return mem
    cls = RowShardedValueTable if strategy == "row" else ColumnShardedValueTable
    mem.values = cls.from_full(mem.values.weight)
    return mem


def _train(rank, world, strategy, rule, optimizer, micro_batches=1):
    """Background pass then STEPS SMF steps; returns tables and selections."""
    mem = _shard(make_memory(), world, strategy)
    tables = [(0, mem.values)]
    mine = _my_slice(rank, world)

    def forward(step):
        x, mask, _ = global_batch(step, kind="background")
        mem(x[mine], mask[mine])

    background = collect_background(tables, forward, range(BG_BATCHES))
    initial = mem.values.full_weight().clone()
    lr = MEM_CFG.value_lr if optimizer == "sgd" else 0.05  # Adam steps are ~lr per coordinate
    updater = SparseMemoryUpdater(tables, sparse_cfg(rule, optimizer), lr, background, grad_divisor=world)
    selections, tables_after = [], []
    for step in range(STEPS):
        x, mask, target = global_batch(step)
        n_tokens = int(mask.sum())
        xs, ms, ts = x[mine], mask[mine], target[mine]
        per = xs.shape[0] // micro_batches
        for m in range(micro_batches):
            part = slice(m * per, (m + 1) * per)
            # Each rank's loss is its local share of the global mean times world (engine averages).
            (micro_loss(mem, xs[part], ms[part], ts[part], n_tokens) * world).backward()
        updater.step()
        selections.append(updater.previous[0].tolist())
        tables_after.append(mem.values.full_weight().clone())
    return {"initial": initial, "tables": tables_after, "selections": selections,
            "bg_df": background.df[0], "bg_counts": background.counts[0], "bg_batches": background.num_batches}


def _train_all_rules(rank, world, strategy, optimizer):
    return {rule: _train(rank, world, strategy, rule, optimizer) for rule in SCORING_RULES}


# --- brute force, from raw indices ---------------------------------------------------------------

def _raw_counts(mem, x, mask):
    indices, _ = mem.select(x.reshape(-1, HIDDEN))
    keep = mask.reshape(-1).bool()
    return torch.bincount(indices.reshape(len(keep), -1)[keep].reshape(-1), minlength=ROWS)


def _brute_force(rule):
    mem = make_memory()
    df = torch.zeros(ROWS, dtype=torch.long)
    bg = torch.zeros(ROWS, dtype=torch.long)
    for b in range(BG_BATCHES):
        x, mask, _ = global_batch(b, kind="background")
        c = _raw_counts(mem, x, mask)
        df += (c > 0).long()
        bg += c
    selections = []
    for step in range(STEPS):
        x, mask, _ = global_batch(step)
        c = _raw_counts(mem, x, mask)
        read = [i for i in range(ROWS) if c[i] > 0]
        total = float(c.sum())
        if rule == "dense-all":
            selections.append(list(range(ROWS)))
            continue
        if rule == "dense-accessed":
            selections.append(read)
            continue
        scores = {}
        for i in read:
            if rule == "tf":
                scores[i] = float(c[i])
            elif rule == "random":
                scores[i] = float(_row_hash(torch.tensor([i]), step, 0)[0])
            elif rule == "tfidf":
                scores[i] = float(c[i]) / total * math.log((BG_BATCHES + 1) / (float(df[i]) + 1))
            else:  # kl
                p = float(c[i]) / total
                p_bg = (float(bg[i]) + 1) / (float(bg.sum()) + ROWS)
                scores[i] = p * math.log((p + 1e-8) / (p_bg + 1e-8))
        ranked = sorted(read, key=lambda i: (-scores[i], i))
        selections.append(sorted(ranked[:5]))
    return df, bg, selections


@pytest.fixture(scope="module")
def single_process():
    return {opt: {rule: _train(0, 1, "replicated", rule, opt) for rule in SCORING_RULES}
            for opt in ("sgd", "adamw")}


def _check_invariants(result, rule, t=5):
    before = result["initial"]
    for step, (after, selected) in enumerate(zip(result["tables"], result["selections"])):
        changed = (after != before).any(dim=1).nonzero().flatten().tolist()
        assert set(changed) <= set(selected), (rule, step, "a row changed that was not selected")
        if rule not in ("dense-all", "dense-accessed"):
            assert len(selected) <= t
        before = after


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_single_process_matches_brute_force(single_process, optimizer):
    for rule in SCORING_RULES:
        result = single_process[optimizer][rule]
        df, bg, expected = _brute_force(rule)
        assert torch.equal(result["bg_df"], df) and torch.equal(result["bg_counts"], bg)
        assert result["bg_batches"] == BG_BATCHES
        assert result["selections"] == expected, rule
        _check_invariants(result, rule)
        assert not torch.equal(result["tables"][-1], result["initial"]), f"{rule}: nothing trained"


@pytest.mark.dist
@pytest.mark.parametrize("strategy,optimizer", [("replicated", "sgd"), ("row", "sgd"), ("column", "sgd"),
                                                ("row", "adamw")])
def test_two_ranks_equal_one_rank(single_process, strategy, optimizer):
    per_rank = run_distributed(_train_all_rules, 2, strategy, optimizer)
    for rule in SCORING_RULES:
        ref = single_process[optimizer][rule]
        r0, r1 = per_rank[0][rule], per_rank[1][rule]
        assert r0["selections"] == r1["selections"] == ref["selections"], (strategy, rule)
        assert torch.equal(r0["bg_df"], ref["bg_df"]) and torch.equal(r1["bg_counts"], ref["bg_counts"])
        _check_invariants(r0, rule)
        for a, b in zip(r0["tables"], ref["tables"]):
            assert (a - b).abs().max() <= 1e-6, (strategy, rule)
        for a, b in zip(r0["tables"], r1["tables"]):
            assert torch.equal(a, b), (strategy, rule, "ranks disagree on the table")


def test_micro_batches_give_the_same_step(single_process):
    for rule in ("tfidf", "kl", "dense-accessed"):
        one = single_process["sgd"][rule]
        four = _train(0, 1, "replicated", rule, "sgd", micro_batches=4)
        assert four["selections"] == one["selections"], rule
        for a, b in zip(four["tables"], one["tables"]):
            assert (a - b).abs().max() <= 1e-6, rule


def test_padding_does_not_count():
    """The same sequences padded to two lengths read, select and update identically."""
    results = []
    for pad_to in (4, 7):
        mem = make_memory()
        updater = SparseMemoryUpdater([(0, mem.values)], sparse_cfg("tf"), 1.0)
        x, mask, target = global_batch(0)
        g = torch.Generator().manual_seed(pad_to)
        extra = pad_to - x.shape[1]
        x = torch.cat([x, torch.randn(x.shape[0], extra, HIDDEN, generator=g) * 5], dim=1)
        mask = torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=mask.dtype)], dim=1)
        target = torch.cat([target, torch.randn(x.shape[0], extra, target.shape[-1], generator=g)], dim=1)
        micro_loss(mem, x, mask, target, int(mask.sum())).backward()
        from smf_ds.sparse.stats import step_access
        rows, counts = step_access(mem.values)
        read = counts > 0
        updater.step()
        results.append((rows[read], counts[read], updater.previous[0], mem.values.weight.clone()))
    (r4, c4, s4, w4), (r7, c7, s7, w7) = results
    assert torch.equal(r4, r7) and torch.equal(c4, c7) and torch.equal(s4, s7)
    assert torch.allclose(w4, w7, atol=1e-7, rtol=0)


def test_lazy_adam_leaves_unselected_rows_bitwise_unchanged(single_process):
    result = single_process["adamw"]["tf"]
    first, second = result["tables"][0], result["tables"][1]
    not_selected = sorted(set(range(ROWS)) - set(result["selections"][1]))
    # Rows selected in step 0 have momentum; a dense AdamW would keep moving them in step 1.
    assert torch.equal(first[not_selected], second[not_selected])


# --- bad input -----------------------------------------------------------------------------------

def test_bad_top_t_is_an_error():
    mem = make_memory()
    with pytest.raises(ConfigError, match="sparse.top_t"):
        SparseMemoryUpdater([(0, mem.values)], sparse_cfg("tf", top_t=0), 1.0)


def test_top_t_larger_than_table_is_clamped_with_a_warning(caplog):
    mem = make_memory()
    with caplog.at_level("WARNING"):
        updater = SparseMemoryUpdater([(0, mem.values)], sparse_cfg("tf", top_t=ROWS + 10), 1.0)
    assert updater.top_t[0] == ROWS
    assert "clamped" in caplog.text and "sparse.top_t" in caplog.text
    caplog.clear()  # the dense rules do not use t (a retrofit is dense-all): no warning about it
    with caplog.at_level("WARNING"):
        SparseMemoryUpdater([(0, mem.values)], sparse_cfg("dense-all", top_t=ROWS + 10), 1.0)
    assert "sparse.top_t" not in caplog.text


def test_rule_needing_background_without_it_is_an_error():
    mem = make_memory()
    for rule in ("tfidf", "kl"):
        with pytest.raises(ConfigError, match="sparse.background"):
            SparseMemoryUpdater([(0, mem.values)], sparse_cfg(rule), 1.0, background=None)


def test_background_of_another_table_shape_is_an_error(tmp_path):
    mem = make_memory()
    stats = BackgroundStats(3, {0: torch.zeros(ROWS * 4, dtype=torch.long)}, {0: torch.zeros(ROWS * 4, dtype=torch.long)},
                            "memoryprint", "baseprint")
    stats.save(tmp_path / "bg.safetensors")
    loaded = BackgroundStats.load(tmp_path / "bg.safetensors")
    with pytest.raises(ConfigError, match=f"{ROWS * 4} rows.*{ROWS} rows"):
        SparseMemoryUpdater([(0, mem.values)], sparse_cfg("tfidf"), 1.0, background=loaded)
    with pytest.raises(ConfigError, match="not found"):
        BackgroundStats.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="junk.safetensors"):
        BackgroundStats.load(tmp_path / "junk.safetensors")


def test_background_read_through_another_memory_is_an_error(tmp_path):
    """Stats record the memory and base weights they were read through (memory_fingerprint,
    base_fingerprint); training from another memory (another seed, a forgotten --memory-adapter)
    or another base refuses them."""
    from smf_ds.memory.adapter import base_fingerprint, memory_fingerprint
    from smf_ds.memory.inject import inject_memory, value_tables
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def model(seed, base_seed=0):
        torch.manual_seed(base_seed)
        base = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1))
        return inject_memory(base, MemoryConfig(layers=[1], n_keys=4, heads=1, knn=2, k_dim=4, seed=seed))

    first, same, other = model(0), model(0), model(1)
    assert memory_fingerprint(first) == memory_fingerprint(same) != memory_fingerprint(other)
    tables = value_tables(first)
    rows = tables[0][1].num_rows
    stats = BackgroundStats(2, {1: torch.zeros(rows, dtype=torch.long)}, {1: torch.zeros(rows, dtype=torch.long)},
                            memory_fingerprint(first), base_fingerprint(first))
    stats.save(tmp_path / "bg.safetensors")
    loaded = BackgroundStats.load(tmp_path / "bg.safetensors")
    loaded.check_against(value_tables(same), "bg", memory_fingerprint(same))
    with pytest.raises(ConfigError, match="bg: these stats were read through another memory"):
        loaded.check_against(value_tables(other), "bg", memory_fingerprint(other))
    other_base = model(0, base_seed=3)
    assert memory_fingerprint(other_base) == memory_fingerprint(first)
    with pytest.raises(ConfigError, match="bg: these stats were read through other base model weights"):
        loaded.check_against(value_tables(other_base), "bg", memory_fingerprint(other_base),
                             base_fingerprint(other_base))
    # Stats of another format (an older smf-ds wrote them without fingerprints): refused by name.
    from safetensors.torch import save_file

    save_file({"layers.1.df": loaded.df[1], "layers.1.counts": loaded.counts[1]}, str(tmp_path / "old.safetensors"),
              metadata={"format_version": "1", "num_batches": "2", "layers": "[1]"})
    with pytest.raises(ConfigError, match=r"old\.safetensors: format_version '1', expected 2 .*`smf-ds background`"):
        BackgroundStats.load(tmp_path / "old.safetensors")
