"""Product-key memory layer against brute-force references: search, output, gradients, counts."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from smf_ds.config import MemoryConfig
from smf_ds.memory.layer import build_memory
from smf_ds.memory.values import LocalValueTable



HIDDEN = 12


def make(seed=0, **kw):
    base = dict(layers=[0], n_keys=6, heads=2, knn=3, k_dim=8, gated=True, seed=seed)
    base.update(kw)
    mem = build_memory(MemoryConfig(**base), HIDDEN)
    return mem


def inputs(B=3, T=5, seed=1):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed))


def brute_force_select(mem, x_NC):
    """Score every one of the n_keys**2 slots: q1 . k1[i] + q2 . k2[j]; take the top knn."""
    N, H, S, Q, K = x_NC.shape[0], mem.heads, mem.n_keys, mem.half_dim, mem.knn
    q = mem.query(x_NC)
    if mem.query_norm is not None:
        q = mem.query_norm(q)
    q_NH2Q = q.view(N, H, 2, Q)
    s1_NHS = torch.einsum("nhq,hsq->nhs", q_NH2Q[:, :, 0], mem.keys[:, 0])
    s2_NHS = torch.einsum("nhq,hsq->nhs", q_NH2Q[:, :, 1], mem.keys[:, 1])
    all_NHSS = s1_NHS[..., :, None] + s2_NHS[..., None, :]  # slot i*S + j
    best_NHK, rows_NHK = all_NHSS.reshape(N, H, S * S).topk(K, dim=-1)
    return rows_NHK, F.softmax(best_NHK, dim=-1)


def reference_forward(mem, x_BTC, V):
    """The layer with plain tensor ops: brute-force search, gather rows, weighted sum, gate."""
    B, T, C = x_BTC.shape
    x_NC = x_BTC.reshape(B * T, C)
    rows_NHK, w_NHK = brute_force_select(mem, x_NC)
    read_ND = (w_NHK[..., None] * V[rows_NHK]).sum(dim=(1, 2))
    if mem.gate is not None:
        read_ND = mem.out(read_ND * F.silu(mem.gate(x_NC)))
    return read_ND.view(B, T, -1)


@pytest.mark.parametrize("n_keys,knn,heads,k_dim", [(6, 3, 2, 8), (5, 5, 1, 4), (16, 4, 3, 6), (9, 1, 2, 2)])
def test_product_key_topk_equals_brute_force(n_keys, knn, heads, k_dim):
    for seed in range(3):
        mem = make(seed, n_keys=n_keys, knn=knn, heads=heads, k_dim=k_dim)
        x_NC = inputs(seed=seed + 10).reshape(-1, HIDDEN)
        with torch.no_grad():
            rows, weights = mem.select(x_NC)
            ref_rows, ref_weights = brute_force_select(mem, x_NC)
        assert rows.shape == (x_NC.shape[0], heads, knn)
        assert int(rows.max()) < n_keys ** 2 and int(rows.min()) >= 0
        # Same sets of rows, and the same weight for each row.
        order, ref_order = rows.argsort(-1), ref_rows.argsort(-1)
        assert torch.equal(rows.gather(-1, order), ref_rows.gather(-1, ref_order))
        torch.testing.assert_close(weights.gather(-1, order), ref_weights.gather(-1, ref_order))
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


def test_bf16_layer_searches_with_fp32_scores():
    """A bf16 model's layer scores its keys in fp32: bf16 scores tie so often that the rows read
    would depend on how topk breaks ties (and differ from an fp32 run, and CPU from GPU)."""
    mem = make(n_keys=32, knn=8, heads=2, k_dim=32).to(torch.bfloat16)
    x_NC = torch.randn(256, HIDDEN, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        rows, weights = mem.select(x_NC)
        # Reference: the same bf16 query and keys, every slot scored in fp32.
        q_NH2Q = mem.query(x_NC).float().view(256, mem.heads, 2, mem.half_dim)
        keys = mem.keys.float()
        s1 = torch.einsum("nhq,hsq->nhs", q_NH2Q[:, :, 0], keys[:, 0])
        s2 = torch.einsum("nhq,hsq->nhs", q_NH2Q[:, :, 1], keys[:, 1])
        all_NHP = (s1[..., :, None] + s2[..., None, :]).reshape(256, mem.heads, -1)
        ref_best, ref_rows = all_NHP.topk(mem.knn, dim=-1)
    assert weights.dtype == torch.float32
    assert torch.equal(rows.sort(-1).values, ref_rows.sort(-1).values)
    torch.testing.assert_close(weights, F.softmax(ref_best, dim=-1))


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_output_equals_naive_reference(gated, batchnorm):
    mem = make(gated=gated, v_dim=7 if gated else HIDDEN, query_batchnorm=batchnorm).eval()
    if batchnorm:
        with torch.no_grad():
            mem.query_norm.running_mean.uniform_(-0.5, 0.5)
            mem.query_norm.running_var.uniform_(0.5, 2.0)
    x = inputs()
    with torch.no_grad():
        out = mem(x)
        ref = reference_forward(mem, x, mem.values.weight)
    assert out.shape == (3, 5, HIDDEN)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("gated", [True, False])
def test_row_grads_and_param_grads_equal_autograd_reference(gated):
    # 25 slots, 9 reads per token, 3 tokens: rows repeat across heads and tokens, some stay unread.
    mem = make(n_keys=5, knn=3, heads=3, k_dim=6, gated=gated, v_dim=5 if gated else HIDDEN)
    table = mem.values
    x = inputs(B=1, T=3)
    target = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(2))

    (mem(x) * target).sum().backward()
    grads = {n: p.grad.clone() for n, p in mem.named_parameters()}
    rows, row_grads = table.sink.coalesced_grad(table.dim, torch.float32)

    V = table.weight.clone().requires_grad_(True)
    mem.zero_grad()
    (reference_forward(mem, x, V) * target).sum().backward()

    with torch.no_grad():
        touched = brute_force_select(mem, x.reshape(-1, HIDDEN))[0].unique()
    assert touched.numel() < brute_force_select(mem, x.reshape(-1, HIDDEN))[0].numel()  # duplicates happened
    assert torch.equal(rows, touched)
    torch.testing.assert_close(row_grads, V.grad[rows])
    untouched = torch.ones(table.num_rows, dtype=torch.bool)
    untouched[rows] = False
    assert untouched.any() and torch.count_nonzero(V.grad[untouched]) == 0
    for name, p in mem.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    assert set(grads) == {"query.weight", "keys"} | ({"gate.weight", "out.weight"} if gated else set())


def test_duplicate_indices_in_a_lookup_sum_their_gradients():
    g = torch.Generator().manual_seed(0)
    table = LocalValueTable(10, 3, generator=g)
    indices = torch.tensor([[1, 1, 3], [3, 5, 1], [7, 7, 7]])
    weights = torch.rand(3, 3, generator=g, requires_grad=True)
    target = torch.randn(3, 3, generator=g)
    out = table.lookup(indices, weights)
    (out * target).sum().backward()
    rows, row_grads = table.sink.coalesced_grad(3, torch.float32)

    V = table.weight.clone().requires_grad_(True)
    w = weights.detach().clone().requires_grad_(True)
    ref = (w[..., None] * V[indices]).sum(1)
    torch.testing.assert_close(out, ref)
    (ref * target).sum().backward()
    assert rows.tolist() == [1, 3, 5, 7]
    torch.testing.assert_close(row_grads, V.grad[rows])
    torch.testing.assert_close(weights.grad, w.grad)
    # Row 7 read three times by token 2: its gradient is the sum of all three.
    torch.testing.assert_close(row_grads[3], weights[2].detach().sum() * target[2])


def test_counts_ignore_masked_tokens():
    mem = make(n_keys=5, knn=3, heads=2)
    mem.values.track_access = True
    x = inputs(B=3, T=5)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[2, 3:] = 0  # right padding
    with torch.no_grad():
        mem(x, mask)
        rows_NHK, _ = brute_force_select(mem, x.reshape(-1, HIDDEN))
    rows, counts = mem.values.sink.coalesced_access()
    kept = rows_NHK[mask.reshape(-1).bool()].reshape(-1)
    ref = torch.bincount(kept, minlength=mem.values.num_rows)
    dense = torch.zeros_like(ref)
    dense[rows] = counts  # rows read only by padding may be listed, with count 0
    assert torch.equal(dense, ref)
    assert int(counts.sum()) == int(mask.sum()) * 2 * 3
    # No mask: every token counts; tracking off: nothing is recorded.
    mem.values.sink.clear()
    with torch.no_grad():
        mem(x)
    assert int(mem.values.sink.coalesced_access()[1].sum()) == 15 * 2 * 3
    mem.values.sink.clear()
    mem.values.track_access = False
    with torch.no_grad():
        mem(x, mask)
    assert mem.values.sink.coalesced_access()[0].numel() == 0


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_no_dense_table_gradient_exists():
    mem = make(n_keys=16, knn=2, heads=2, k_dim=8, gated=False, v_dim=HIDDEN)  # 256 rows x 12
    table = mem.values
    assert not isinstance(table.weight, nn.Parameter) and not table.weight.requires_grad
    assert all(p is not table.weight for p in mem.parameters())
    x = inputs(B=2, T=3)
    recorder = _Shapes()
    with recorder:
        mem(x).pow(2).sum().backward()
    assert (table.num_rows, table.dim) not in recorder.shapes  # no N_rows x D tensor was ever made
    assert table.weight.grad is None
    # The backward recorded the reads and one gradient row per token; no row gradients yet.
    ((rows_E, weights_E, bags_E, grad_BD),) = table.sink.grad_entries
    assert rows_E.shape == weights_E.shape == (2 * 3, 2 * 2) and bags_E is None
    assert grad_BD.shape == (2 * 3, table.dim)
    rows, _ = table.sink.coalesced_grad(table.dim, torch.float32)
    assert 0 < rows.numel() <= 2 * 3 * 2 * 2 < table.num_rows


def test_frozen_values_send_no_gradients():
    mem = make()
    mem.values.requires_grad = False
    mem(inputs()).sum().backward()
    assert mem.values.sink.grad_entries == []
    assert mem.query.weight.grad is not None


@pytest.mark.parametrize("knn", [1, 2, 3, 7, 16, 32, 40])
def test_candidate_pairs_keep_the_top_knn_sums(knn):
    """The pruned pairs' top-knn sums equal the top-knn of all knn**2 sums, ties included."""
    from smf_ds.memory.portable.product_keys import candidate_pairs

    first, second = candidate_pairs(knn, torch.device("cpu"))
    assert first.numel() < knn * knn or knn == 1
    g = torch.Generator().manual_seed(knn)
    for values in (torch.randn(200, 2, knn, generator=g), torch.randint(0, 4, (200, 2, knn), generator=g).float()):
        a, b = values.sort(dim=-1, descending=True).values.unbind(1)  # best-first lists, many ties
        every = (a[:, :, None] + b[:, None, :]).reshape(200, -1).topk(knn, dim=-1).values
        pruned = (a[:, first] + b[:, second]).topk(knn, dim=-1).values
        assert torch.equal(pruned, every)
