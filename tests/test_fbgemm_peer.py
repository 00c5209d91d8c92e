"""Our value lookup and SGD update against FBGEMM's table-batched embedding (the [peer] extra; `make
test` installs it): on the same indices, read weights and table, the same forward, the same read
weights' gradient, and the same table after an SGD step on every row read (FBGEMM's fused EXACT_SGD)."""
import pytest
import torch

pytest.importorskip("fbgemm_gpu", reason="needs the [peer] extra: pip install -e '.[peer]' (make test installs it)")

from smf_ds.config import SparseConfig  # noqa: E402
from smf_ds.memory.values import LocalValueTable  # noqa: E402
from smf_ds.sparse.step import SparseMemoryUpdater  # noqa: E402

# FBGEMM's CPU build warns, on its own import, that its SSD optimizers (not used here) are missing.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:fbgemm_gpu.split_embedding_codegen_lookup_invokers")

N, D, TOKENS, K, LR = 300, 16, 24, 12, 0.7


def _fbgemm_sgd_table(weight: torch.Tensor, lr: float):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                        SplitTableBatchedEmbeddingBagsCodegen)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(weight.shape[0], weight.shape[1], EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_SGD, learning_rate=lr, pooling_mode=PoolingMode.SUM)
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(weight)
    return tbe


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, N, (TOKENS, K), generator=g)
    indices[0, :4] = 7  # one token reading a row several times, and rows read by many tokens
    indices[1:5, 0] = 7
    weights = torch.softmax(torch.randn(TOKENS, K, generator=g), -1)
    grad_out = torch.randn(TOKENS, D, generator=g)
    table = torch.randn(N, D, generator=g) * D ** -0.5
    return indices, weights, grad_out, table


@pytest.mark.parametrize("rule", ["dense-accessed", "dense-all"])
def test_forward_and_sgd_update_match_fbgemm(rule):
    indices, weights, grad_out, table = _inputs(0)
    ours = LocalValueTable(N, D, weight=table.clone())
    updater = SparseMemoryUpdater([(0, ours)], SparseConfig(scoring=rule, optimizer="sgd"), lr=LR)
    tbe = _fbgemm_sgd_table(table, LR)

    w_ours = weights.clone().requires_grad_()
    w_peer = weights.reshape(-1).clone().requires_grad_()
    out_ours = ours.lookup(indices, w_ours)
    out_peer = tbe(indices.reshape(-1), torch.arange(0, TOKENS * K + 1, K), per_sample_weights=w_peer)
    torch.testing.assert_close(out_ours, out_peer, atol=1e-6, rtol=0)

    out_ours.backward(grad_out)
    updater.step()
    out_peer.backward(grad_out)
    torch.testing.assert_close(w_ours.grad.reshape(-1), w_peer.grad, atol=1e-6, rtol=0)
    after_peer = tbe.split_embedding_weights()[0]
    read = torch.zeros(N, dtype=torch.bool)
    read[indices.reshape(-1)] = True
    assert not torch.equal(after_peer[read], table[read])  # the step moved the rows read
    torch.testing.assert_close(ours.weight, after_peer, atol=1e-6, rtol=0)
    assert torch.equal(ours.weight[~read], table[~read])  # and only them


def test_top_t_update_is_fbgemm_update_restricted_to_the_selected_rows():
    """SMF's step updates t rows by the same SGD step FBGEMM takes on them; every other row stays."""
    indices, weights, grad_out, table = _inputs(1)
    ours = LocalValueTable(N, D, weight=table.clone())
    updater = SparseMemoryUpdater([(0, ours)], SparseConfig(scoring="tf", top_t=20, optimizer="sgd"), lr=LR)
    tbe = _fbgemm_sgd_table(table, LR)
    ours.lookup(indices, weights).backward(grad_out)
    updater.step()
    flat = indices.reshape(-1)
    tbe(flat, torch.arange(0, flat.numel() + 1, K), per_sample_weights=weights.reshape(-1)).backward(grad_out)
    selected = updater.previous[0]
    assert selected.numel() == 20
    after_peer = tbe.split_embedding_weights()[0]
    torch.testing.assert_close(ours.weight[selected], after_peer[selected], atol=1e-6, rtol=0)
    rest = torch.ones(N, dtype=torch.bool)
    rest[selected] = False
    assert torch.equal(ours.weight[rest], table[rest])


@pytest.mark.e2e
def test_benchmarks_report_ours_over_fbgemm(tmp_path):
    """Both benchmarks put FBGEMM in their tables (smallest settings; timings are never asserted), and
    bench_sparse_step's dense-accessed table ends where FBGEMM's does after the same steps."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(repo))

    def tool(name, *args):
        done = subprocess.run([sys.executable, str(repo / "tools" / name), *args], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
        return done.stdout

    out = tmp_path / "sparse_step.json"
    printed = tool("bench_sparse_step.py", "--quick", "--sizes", "4096", "--steps", "2", "--tokens", "256",
                   "--no-memory", "--out", str(out))
    (row,) = json.loads(out.read_text())["results"]
    assert set(row["ours_over_fbgemm"]) == {"forward", "dense_accessed_step", "dense_all_step", "top_t_step"}
    assert all(r["median"] > 0 for r in row["ours_over_fbgemm"].values())
    assert row["checks"]["ours_dense_vs_fbgemm_table_max_abs_diff"] < 1e-5
    assert row["ours-dense"]["rows_changed_per_step"] == row["fbgemm"]["rows_changed_per_step"] > 512
    assert "Ours / FBGEMM TBE" in printed

    out = tmp_path / "memory.json"
    printed = tool("bench_memory.py", "--quick", "--sizes", "1024", "--procs", "1", "--strategies", "replicated",
                   "--no-layer", "--draws", "uniform", "--out", str(out))
    (peer,) = json.loads(out.read_text())["ours_over_fbgemm"]
    assert peer["num_rows"] == 1024 and peer["forward"]["median"] > 0 and peer["dense_accessed_step"]["median"] > 0
    peak = peer["peak_bytes"]  # RSS growth during a step: FBGEMM's in-place one may fit in pages already resident
    assert peak["ours"] > 0 and peak["ours-dense"] > 0 and peak["fbgemm"] >= 0
    assert "Ours (replicated, 1 process) / FBGEMM TBE" in printed
