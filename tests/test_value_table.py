"""Local value table specifics: dtype kept under model casts; sink holds only touched rows."""
import torch

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
