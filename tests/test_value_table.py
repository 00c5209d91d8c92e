"""Local value table specifics: dtype kept under model casts; sink holds only touched rows."""
import torch

from smf_ds.memory.values import LocalValueTable


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
