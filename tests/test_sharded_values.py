"""Row- and column-sharded value tables equal the local table (outputs, all gradients, counts)."""
import pytest
import torch

from distributed import run_distributed
from smf_ds.config import MemoryConfig
from smf_ds.memory.layer import build_memory
from smf_ds.memory.values import LocalValueTable
from smf_ds.parallel.shard import STRATEGIES
from smf_ds.parallel.sharded_values import ColumnShardedValueTable, RowShardedValueTable, even_split

ROWS, DIM, K = 40, 12, 6
TOL = 1e-5


def _maxabs(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def _case_inputs(case, world, rank_tokens):
    """Per-rank (indices_NK, weights_NK, token_mask_N, grad_out_ND), identical on every rank."""
    g = torch.Generator().manual_seed(1234)
    first_shard = even_split(ROWS, world)[0]
    out = []
    for n in rank_tokens:
        if case == "one_shard":  # every lookup lands on rank 0's rows; other shards receive nothing
            idx = torch.randint(0, first_shard, (n, K), generator=g)
        elif case == "duplicates":  # few distinct rows, many repeats inside and across tokens
            idx = torch.randint(0, 3, (n, K), generator=g) * 7
        else:
            idx = torch.randint(0, ROWS, (n, K), generator=g)
        weights = torch.rand(n, K, generator=g)
        mask = torch.rand(n, generator=g) > 0.3  # padded positions
        grad_out = torch.randn(n, DIM, generator=g)
        out.append((idx, weights, mask, grad_out))
    return out


def _table_worker(rank, world, strategy, case, rank_tokens, sizes):
    torch.manual_seed(0)
    full = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(7))
    inputs = _case_inputs(case, world, rank_tokens)

    # Single-process reference: the local table serves every rank's tokens.
    ref = LocalValueTable(ROWS, DIM, weight=full.clone())
    ref.track_access = True
    ref_outs, ref_wgrads = [], []
    for idx, w, mask, gout in inputs:
        w = w.clone().requires_grad_(True)
        o = ref.lookup(idx, w, mask)
        o.backward(gout)
        ref_outs.append(o.detach())
        ref_wgrads.append(w.grad)
    ref_rows, ref_grad = ref.sink.coalesced_grad(DIM)
    dense_ref_grad = torch.zeros(ROWS, DIM).index_add_(0, ref_rows, ref_grad)
    acc_rows, acc_counts = ref.sink.coalesced_access()
    dense_ref_counts = torch.zeros(ROWS, dtype=torch.long).index_add_(0, acc_rows, acc_counts)

    cls = RowShardedValueTable if strategy == "row" else ColumnShardedValueTable
    kw = {"row_sizes": sizes} if strategy == "row" else {"col_sizes": sizes}
    table = cls.from_full(full.clone(), **kw)
    table.track_access = True
    idx, w, mask, gout = inputs[rank]
    w = w.clone().requires_grad_(True)
    o = table.lookup(idx, w, mask)
    o.backward(gout)
    rows, grad = table.sink.coalesced_grad(table.local_weight.shape[1])
    crow, ccount = table.sink.coalesced_access()

    start, stop = table.owned_row_range()
    if strategy == "row":
        expected_grad = dense_ref_grad[start:stop]
        got_grad = torch.zeros_like(expected_grad).index_add_(0, rows - start, grad)
    else:
        expected_grad = dense_ref_grad[:, table.col_start:table.col_stop]
        got_grad = torch.zeros_like(expected_grad).index_add_(0, rows, grad)
    got_counts = torch.zeros(ROWS, dtype=torch.long).index_add_(0, crow, ccount)
    assert ((rows >= start) & (rows < stop)).all(), "sink holds rows this rank does not own"
    # Only touched rows are in the sink: no dense N x D gradient.
    assert rows.numel() <= torch.unique(torch.cat([i.flatten() for i, *_ in inputs])).numel()
    return {
        "out": _maxabs(o.detach(), ref_outs[rank]),
        "wgrad": _maxabs(w.grad, ref_wgrads[rank]),
        "rowgrad": _maxabs(got_grad, expected_grad),
        "counts_equal": torch.equal(got_counts[start:stop], dense_ref_counts[start:stop]),
        "full_equal": torch.equal(table.full_weight(), full),
        # For saving: the whole table on one rank's CPU only, sent in chunks (tiny ones here).
        "gathered_ok": all(_gathered_ok(table.gather_full_weight(dst, chunk_bytes=40), full, rank == dst)
                           for dst in (0, world - 1)),
    }


def _gathered_ok(gathered, full, is_dst):
    if not is_dst:
        return gathered is None
    return gathered.device.type == "cpu" and torch.equal(gathered, full)


CASES = [
    # (world, case, tokens per rank, uneven sizes or None)
    (2, "random", [9, 5], None),
    (2, "duplicates", [8, 8], None),
    (2, "one_shard", [7, 4], None),
    (4, "random", [6, 0, 5, 3], None),  # a rank with no tokens at all
    (4, "random", [5, 5, 5, 5], "uneven"),
    (4, "one_shard", [4, 6, 3, 5], None),
]


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["row", "column"])
@pytest.mark.parametrize("world,case,tokens,uneven", CASES)
def test_sharded_table_equals_local(strategy, world, case, tokens, uneven):
    sizes = None
    if uneven:
        sizes = [1, 17, 0, 22] if strategy == "row" else [1, 5, 0, 6]
    results = run_distributed(_table_worker, world, strategy, case, tokens, sizes)
    for rank, r in enumerate(results):
        assert r["out"] <= TOL, (rank, r)
        assert r["wgrad"] <= TOL, (rank, r)
        assert r["rowgrad"] <= TOL, (rank, r)
        assert r["counts_equal"], (rank, r)
        assert r["full_equal"] and r["gathered_ok"], (rank, r)


def _forward_backward(memory, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = memory(x)
    out.backward(grad_out)
    params = [memory.query.weight, memory.keys, memory.gate.weight, memory.out.weight]
    return out.detach(), [x.grad] + [p.grad.clone() for p in params]


def _layer_worker(rank, world, strategy):
    cfg = MemoryConfig(layers=[0], n_keys=6, heads=2, knn=3, k_dim=8, v_dim=10, gated=True, seed=3)
    hidden = 16
    xs = [torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(50 + r)) for r in range(world)]
    gouts = [torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(90 + r)) for r in range(world)]

    ref = build_memory(cfg, hidden)
    ref_results = []
    for x, gout in zip(xs, gouts):
        # .backward (not autograd.grad, which prunes the path to the table) runs BagLookup's backward,
        # which records the reads in the sink.
        ref.zero_grad()
        out, grads = _forward_backward(ref, x, gout)
        ref_results.append((out, grads))  # row grads of all ranks' tokens accumulate in the sink
    ref_rows, ref_grad = ref.values.sink.coalesced_grad(cfg.v_dim)
    dense_ref = torch.zeros(cfg.slots, cfg.v_dim).index_add_(0, ref_rows, ref_grad)

    mem = build_memory(cfg, hidden)
    cls = RowShardedValueTable if strategy == "row" else ColumnShardedValueTable
    mem.values = cls.from_full(mem.values.weight)
    out, grads = _forward_backward(mem, xs[rank], gouts[rank])
    ref_out, ref_grads = ref_results[rank]
    errors = {"out": (out - ref_out).abs().max().item()}
    for name, a, b in zip(["x", "query", "keys", "gate", "out_proj"], grads, ref_grads):
        errors[name] = (a - b).abs().max().item()
    rows, grad = mem.values.sink.coalesced_grad(mem.values.local_weight.shape[1])
    if strategy == "row":
        start, stop = mem.values.owned_row_range()
        got = torch.zeros(stop - start, cfg.v_dim).index_add_(0, rows - start, grad)
        errors["rows"] = _maxabs(got, dense_ref[start:stop])
    else:
        t = mem.values
        got = torch.zeros(cfg.slots, t.col_stop - t.col_start).index_add_(0, rows, grad)
        errors["rows"] = _maxabs(got, dense_ref[:, t.col_start:t.col_stop])
    return errors


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["row", "column"])
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_memory_layer_equals_local(strategy, world):
    for rank, errors in enumerate(run_distributed(_layer_worker, world, strategy)):
        assert max(errors.values()) <= TOL, (rank, errors)


def test_strategies_named():
    assert STRATEGIES == ("replicated", "row", "column")
