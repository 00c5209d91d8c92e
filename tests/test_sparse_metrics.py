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
