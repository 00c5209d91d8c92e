"""tools/bench_smf_overhead.py: its timers attribute to the memory exactly the memory's work, and
its quick run reports every method and table size in the JSON the README's table is built from.
Timings are never asserted; the checks are that the parts of a step account for the step, that
the memory parts are zero without memory, and the schema."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import bench_smf_overhead as bench  # noqa: E402


def test_memory_timers_time_the_memory_nodes_and_no_others():
    """Only the nodes the memory layer's forward made (and its parameters' gradient accumulation)
    count as the memory's backward: not the layers before or after it."""
    from smf_ds.config import MemoryConfig
    from smf_ds.memory.layer import build_memory

    torch.manual_seed(0)
    memory = build_memory(MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=8), hidden_size=16)
    before, after = nn.Linear(16, 16), nn.Linear(16, 16)
    timers = bench.StepTimers("cpu")
    timers.watch_memory(memory, {id(p) for p in memory.parameters()})
    x = torch.tanh(before(torch.randn(2, 3, 16)))
    loss = torch.sigmoid(after(memory(x))).sum()
    loss.backward()
    assert timers.calls["mem_fwd"] == 1 and timers.t["mem_fwd"] > 0
    assert "BagLookupBackward" in timers.nodes and "TopkBackward0" in timers.nodes
    n_params = sum(1 for _ in memory.parameters())
    assert timers.nodes.count("AccumulateGrad") == n_params  # the memory's, not before's or after's
    assert "TanhBackward0" not in timers.nodes and "SigmoidBackward0" not in timers.nodes  # before / after it
    assert timers.calls["mem_bwd"] == len(timers.nodes) and timers.t["mem_bwd"] > 0
    assert before.weight.grad is not None and memory.query.weight.grad is not None  # the backward itself unchanged
    timers.reset()
    memory(x)  # hooks removed: nothing more is timed
    assert timers.t == {} and timers.nodes == []


@pytest.mark.e2e
def test_quick_run_reports_every_method_and_size(tmp_path):
    out = tmp_path / "smf_overhead.json"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench_smf_overhead.py"), "--quick", "--tables", "1k",
                           "--out", str(out)], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["method"], r["procs"]) for r in runs] == [(m, 1) for m in bench.METHODS] + [("smf", 2)]
    assert runs[-1]["slots_per_layer"] == 1024 and runs[-1]["tokens_per_step"] == 2 * 32  # both ranks' tokens
    for r in runs:
        parts = r["parts_s"]
        assert set(parts) == set(result["parts"]) == set(bench.PARTS)
        assert all(v >= 0 for v in parts.values()), r  # a memory part larger than its phase would go negative
        assert abs(sum(parts.values()) - r["timed_step_s"]) <= 1e-6 * r["timed_step_s"] + 1e-9, r
        assert r["step_s"] == r["timed_step_s"]  # on the CPU the timed steps are the steps
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"])
        assert r["peak_memory_bytes"] > r["memory_before_steps_bytes"] * 0.5 > 0
        memory = sum(parts[k] for k in bench.MEMORY_PARTS)
        if r["method"] in bench.MEMORY_METHODS:
            assert parts["mem_fwd"] > 0 and parts["mem_bwd"] > 0 and 0 < r["memory_share"] < 1, r
        else:
            assert memory == 0 and r["memory_share"] == 0, r
        if r["method"] in bench.TRAINS_MEMORY:
            assert parts["select"] > 0 and r["row_grads_s"] > 0 and parts["update"] >= r["row_grads_s"], r
        else:
            assert parts["select"] == parts["update"] == 0, r
        trains_dense = r["method"] in ("smf-memory", "lora", "full")
        assert (r["trainable_dense_params"] > 0) == trains_dense, r
    by_method = {r["method"]: r for r in runs if r["procs"] == 1}
    assert by_method["full"]["trainable_dense_params"] > by_method["lora"]["trainable_dense_params"] > 0
    assert set(result["ratios"]) >= {"smf_tokens_per_s_over_lora", "smf_tokens_per_s_over_full"}
    assert "smf @1k x2" in done.stdout and "lora @- x1" in done.stdout
