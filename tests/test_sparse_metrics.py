"""Slot-usage metrics, selection overlap, and the value-gradient clip."""
import math

import torch

from smf_ds.config import SparseConfig
from smf_ds.sparse.metrics import overlap, slot_usage
from smf_ds.sparse.step import SparseMemoryUpdater
from smf_fixtures import global_batch, make_memory, micro_loss


def test_slot_usage_even_and_concentrated():
    even = slot_usage(torch.full((8,), 5))
    assert even["usage"] == 1.0 and abs(even["kl_uniform"]) < 1e-12 and abs(even["gini"]) < 1e-12
    one = slot_usage(torch.tensor([0, 0, 0, 9]))
    assert one["usage"] == 0.25
    assert math.isclose(one["kl_uniform"], math.log(4))
    assert math.isclose(one["gini"], 0.75)  # (n-1)/n for one row holding every read
    assert slot_usage(torch.zeros(4, dtype=torch.long)) == {"usage": 0.0, "kl_uniform": 0.0, "gini": 0.0}


def test_overlap():
    assert math.isnan(overlap(torch.tensor([1, 2]), None))
    assert overlap(torch.tensor([1, 2, 3, 4]), torch.tensor([2, 4, 9])) == 0.5


def _one_step(max_grad_norm):
    mem = make_memory()
    before = mem.values.weight.clone()
    cfg = SparseConfig(scoring="tf", top_t=5, max_grad_norm=max_grad_norm)
    updater = SparseMemoryUpdater([(0, mem.values)], cfg, lr=1.0)
    x, mask, target = global_batch(0)
    micro_loss(mem, x, mask, target, int(mask.sum())).backward()
    metrics = updater.step()
    return (mem.values.weight - before), metrics


def test_value_gradient_clip():
    delta, metrics = _one_step(0.0)
    norm = metrics["values/grad_norm"]
    assert math.isclose(float(delta.norm()), norm, rel_tol=1e-5)  # SGD, lr 1: the update is the gradient
    clipped, _ = _one_step(norm / 4)
    assert math.isclose(float(clipped.norm()), norm / 4, rel_tol=1e-4)
    assert metrics["layer0/rows_selected"] == 5 and metrics["layer0/rows_accessed"] >= 5
    assert 0 < metrics["layer0/frac_ever_updated"] <= 5 / 64


def test_a_uniform_output_or_exploded_values_are_flagged():
    """Finite but useless: a loss that went to ln(vocab) (a uniform output), or value rows past the
    bound; a loss that stayed near ln(vocab) from the start (a random model) is not flagged."""
    import math

    import torch

    from smf_ds.memory.values import LocalValueTable
    from smf_ds.train.health import VALUE_BOUND, flags

    table = LocalValueTable(8, 4, init_std=0.1, generator=torch.Generator().manual_seed(0))
    uniform = math.log(100)
    assert flags([2.0, 3.5, uniform * 1.001], 100, [(3, table)])[0].startswith("the loss went from 2 to")
    assert flags([uniform, uniform], 100, [(3, table)]) == []
    assert flags([2.0, 1.5], 100, [(3, table)]) == []
    table.weight[2, 1] = 5e27
    (reason,) = flags([2.0, 1.5], 100, [(3, table)])
    assert reason == f"memory layer 3's value rows reach 5e+27 (past {VALUE_BOUND:g}): exploded"
    table.weight[2, 1] = float("nan")
    assert flags([2.0, 1.5], 100, [(3, table)])  # NaN is not within the bound either
