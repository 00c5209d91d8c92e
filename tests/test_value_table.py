"""Local value table specifics: dtype kept under model casts; sink holds only touched rows."""
import math

import torch
import torch.nn.functional as F

from smf_ds.memory.values import _FILTER_SIZE, LocalValueTable, reads_of


def test_table_keeps_its_dtype_when_the_model_is_cast():
    table = LocalValueTable(16, 4, generator=torch.Generator().manual_seed(0))
    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    module.table = table
    module.to(torch.bfloat16)
    assert module[0].weight.dtype == torch.bfloat16
    assert table.weight.dtype == torch.float32
    weights = torch.rand(3, 2, dtype=torch.bfloat16, requires_grad=True)
    out = table.lookup(torch.tensor([[1, 2], [2, 2], [5, 1]]), weights)
    out.sum().backward()
    rows, grad = table.sink.coalesced_grad(4)
    assert rows.tolist() == [1, 2, 5] and grad.dtype == torch.float32
    assert weights.grad is not None and weights.grad.dtype == torch.bfloat16


def test_read_weight_grads_match_embedding_bag_backward():
    """The CPU sampled-matmul path and embedding_bag's own backward (used off CPU) agree."""
    from smf_ds.memory.values import read_weight_grads, read_weight_grads_by_autograd

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 6, generator=g)
    rows_NK = torch.randint(0, 50, (7, 4), generator=g)
    rows_NK[0] = 3  # a token reading one row four times
    grad_ND = torch.randn(7, 6, generator=g)
    expected = (grad_ND[:, None, :] * weight[rows_NK]).sum(-1)
    assert torch.allclose(read_weight_grads(grad_ND, weight, rows_NK, None), expected, atol=1e-6)
    assert torch.allclose(read_weight_grads_by_autograd(grad_ND, weight, rows_NK, None), expected, atol=1e-6)
    # flat reads with offsets; an empty bag in the middle
    flat, offsets = rows_NK[:3].reshape(-1), torch.tensor([0, 5, 5])
    bag_of = torch.tensor([0] * 5 + [2] * 7)
    expected_flat = (grad_ND[:3][bag_of] * weight[flat]).sum(-1)
    for impl in (read_weight_grads, read_weight_grads_by_autograd):
        assert torch.allclose(impl(grad_ND[:3], weight, flat, offsets), expected_flat, atol=1e-6), impl.__name__


def test_reads_of_finds_exactly_the_reads_of_the_selected_rows():
    g = torch.Generator().manual_seed(0)
    for num_rows in (1000, 5 * _FILTER_SIZE):  # the second: ids that share low bits (filter false positives)
        rows_E = torch.randint(0, num_rows, (20_000,), generator=g)
        rows_E[:50] = rows_E[0] + _FILTER_SIZE  # same low bits as a read, not selected unless drawn
        rows_S = torch.unique(rows_E[torch.randperm(rows_E.numel(), generator=g)[:300]])
        hits, pos = reads_of(rows_S, rows_E)
        expected = torch.isin(rows_E, rows_S).nonzero().squeeze(1)
        assert torch.equal(hits, expected)
        assert torch.equal(rows_S[pos], rows_E[hits])
    empty = reads_of(torch.empty(0, dtype=torch.long), rows_E)
    assert empty[0].numel() == 0 and empty[1].numel() == 0


def _two_backwards(num_rows: int, dim: int, seed: int):
    """A table after two lookups' backwards (two gradient entries), and the autograd row gradients."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, dim, generator=g)
    table = LocalValueTable(num_rows, dim, weight=weight.clone())
    reference = weight.clone().requires_grad_()
    for tokens in (40, 25):
        rows_NK = torch.randint(0, num_rows, (tokens, 6), generator=g)
        rows_NK[0, :3] = rows_NK[1, 0]  # a row read several times, by one token and by another
        weights_NK = torch.rand(tokens, 6, generator=g)
        grad_ND = torch.randn(tokens, dim, generator=g)
        table.lookup(rows_NK, weights_NK).backward(grad_ND)
        F.embedding_bag(rows_NK, reference, per_sample_weights=weights_NK, mode="sum").backward(grad_ND)
    return table, reference.grad


def test_row_grad_equals_autograd_for_few_and_many_rows(monkeypatch):
    import smf_ds.memory.values as values
    table, dense_grad = _two_backwards(num_rows=400, dim=5, seed=0)
    read = table.sink.read_rows()
    unread = torch.tensor([r for r in range(400) if r not in set(read.tolist())][:3])
    few = torch.cat([read[::7], unread]).sort().values  # rows read and rows not read
    for rows_S in (few, read, torch.arange(400), read[1::2]):
        for few_rows in (0, 1 << 12):  # both ways of finding the reads: sort all of them, or filter them
            monkeypatch.setattr(values, "_FEW_ROWS", few_rows)
            monkeypatch.setattr(values, "_GRAD_BLOCK", 3 * 5)  # blocks of 3 rows: several per call
            got = table.sink.row_grad(rows_S, 5)
            torch.testing.assert_close(got, dense_grad[rows_S], atol=1e-6, rtol=0)


def test_sgd_update_from_the_sink_equals_the_update_with_the_gradient_formed():
    table, _ = _two_backwards(num_rows=300, dim=4, seed=1)
    rows_S = torch.cat([table.sink.read_rows()[::2], torch.tensor([299])]).unique()
    rows_S = rows_S[rows_S >= 10]
    grad = table.sink.row_grad(rows_S, 4).div_(3.0)
    expected = table.weight[10:].clone()  # a shard holding rows 10..299
    expected[rows_S - 10] = expected[rows_S - 10] - 0.5 * grad
    weight = table.weight[10:].clone()
    sq_norm = table.sink.sgd_update(weight, rows_S, lr=0.5, divisor=3.0, first_row=10)
    assert torch.equal(weight, expected)
    assert math.isclose(float(sq_norm), float(grad.double().pow(2).sum()), rel_tol=1e-6)


def test_read_counts_are_taken_at_the_step_padding_excluded():
    table = LocalValueTable(50, 3)
    table.track_access = True
    with torch.no_grad():
        table.lookup(torch.tensor([[4, 9], [9, 9], [1, 2]]), torch.ones(3, 2), torch.tensor([1, 1, 0]))
        table.lookup(torch.tensor([[9, 30]]), torch.ones(1, 2))
    table.sink.add_access(torch.tensor([4, 7]), torch.tensor([5, 1]))  # counted already (a sharded table's)
    rows, counts = table.sink.coalesced_access()
    assert rows.tolist() == [4, 7, 9, 30] and counts.tolist() == [6, 1, 4, 1]
