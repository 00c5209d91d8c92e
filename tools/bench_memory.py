#!/usr/bin/env python
"""Time, count the bytes sent by, and size one memory-value lookup step, per sharding strategy.

What runs (one "step" = forward + backward + gradients of t rows + sink.clear()):

  lookup  the value-table lookup alone, `table.lookup(indices_NK, weights_NK)` on a table of N rows
          x d (default 256, fp32) -> `out.backward(grad)` with a seeded random upstream gradient
          (the backward records reads and token gradients; it forms no row gradients) ->
          `step_grad(table, rows)`: the summed gradients of --grad-rows (512, SMF's top-t) rows
          spaced evenly over the table, the same on every rank, as an SMF step asks for them
          (replicas all-reduce them) -> `table.sink.clear()` (weights.grad reset). T tokens (default 2,048) per rank, each reading
          H x knn (4 x 32 = 128) rows: per token and head, knn *distinct* rows (as product keys
          give), drawn uniformly; softmax weights over each head's knn, requiring grad. Seeded per
          rank (ranks read different tokens). Read counts are recorded (`track_access`, as in SMF
          training; --no-track-access turns them off). Two draws:
            uniform  rows drawn from the whole table. The number of unique rows a step reads, U,
                     then depends on N (U ~ N (1 - exp(-T H knn / N)), at most T H knn = 262,144):
                     nearly all 16k rows at N = 16k, ~232k at N = 1M.
            hot      control: rows drawn from a fixed random subset of the table, as many rows as
                     the smallest size (16,384), spread over the whole table (and every shard). U is
                     then the same at every N, so any growth left is due to the table size itself.
  layer   informative: the whole ProductKeyMemory layer (gated, k_dim 256, hidden = d, heads,
          knn as above, n_keys = sqrt(N): 128, 512, 1024) forward + backward (+ param grads reset,
          sink cleared) on seeded random activations. Its key search grows with sqrt(N) (scores
          T x H x 2 x n_keys), so it is not expected to be flat; sizes that are not perfect
          squares (or with sqrt(N) < knn) skip it.

Strategies: replicated (the whole table; with 2 processes each rank holds a replica and does its own
lookups; only the t rows' gradients are all-reduced), row
(`RowShardedValueTable.from_full`), column (`ColumnShardedValueTable.from_full`), each at 1
process (a gloo group of one: sharded code paths run, nothing leaves the rank) and 2 processes
(torch.multiprocessing spawn + gloo on this machine). Threads: --threads per process, default
cpu_count // procs (2 cores: 2 threads at 1 process, 1 per process at 2 processes).

Timing: each (strategy, procs) runs in a fresh subprocess with the normal allocator. Per strategy,
tables for every size are built first and kept, each case gets --warmup untimed steps, then the
timed steps are interleaved over sizes (round r runs one step of every case), so slow drifts in
the machine's load hit every size alike. The ranks meet at a barrier before each step (at 1 process
too: gloo holds the tensors of a group's last collective until its next one, and the barrier
releases them outside the timed step); a step's time is the slowest rank's. Reported: median and min over --steps (all samples in
the JSON). Wall time (time.perf_counter).

Bytes sent: `smf_ds.parallel.comm.COMM_STATS.bytes_sent`, reset before a step and read after it:
bytes this rank sent to other ranks in forward + backward (every exchange of the sharded tables
goes through comm.all_to_all_v / exchange_counts, which count them). The max over ranks is shown.

Memory (a separate pass; fresh subprocesses again), two measurements per case, after warm-up:
  torch alloc  exact: the step runs once under torch.profiler(profile_memory=True), whose CPU
               allocator reports every allocation and free (size, address); "peak" = the most
               bytes allocated in the step alive at once (running sum of the step's allocations
               minus the frees of those same blocks), "total" = sum of all bytes allocated during
               the step. Sees tensor memory only (not Python objects or gloo buffers), and counts
               a block as allocated whether or not its pages are ever touched.
               Reads the profiler's event tree (kineto_results.experimental_event_tree, private
               API): null if this torch does not provide it.
  RSS          kernel's view: glibc's mmap threshold pinned to 64 KiB (MALLOC_MMAP_THRESHOLD_,
               which also turns off its dynamic threshold), so every allocation >= 64 KiB is its own
               mapping, returned to the kernel when freed; the RSS high-water mark is reset
               (writing 5 to /proc/self/clear_refs), VmRSS read, the step run, VmHWM read:
               growth = VmHWM - VmRSS before. Includes everything (allocator, gloo, Python).
Both are per rank (max over ranks shown). --quick runs timing and memory in one process per process
count (timed under the pinned mmap threshold, to stay short); the full run keeps them apart. Neither can grow with N unless something of size N is
allocated in the step; the lookup allocates O(reads + tokens x d) (the unique rows and counts are
O(U) integers, U <= T H knn), and the layer's key search O(T H sqrt(N)).

Huge pages: --thp sets THP_MEM_ALLOC_ENABLE=1 in the workers (PyTorch's switch: large CPU
allocations 2 MiB-aligned and madvise(MADV_HUGEPAGE)), so the table itself sits on huge pages and
random row reads miss the TLB less.

Goal (printed PASS/MISS, not asserted): lookup step time flat in N, time at the largest size /
time at the smallest <= 1.2 (stated for 1M / 16k), for every strategy and process count.
The machine may be shared: other processes on the same cores add variance (see the min column).

    .venv/bin/python tools/bench_memory.py                      # full: N = 16k, 262k, 1M; 1 and 2 procs
    .venv/bin/python tools/bench_memory.py --quick              # tiny sizes, smoke run (< 30 s)
    .venv/bin/python tools/bench_memory.py --strategies row --procs 2 --sizes 16384,1048576
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_common  # tools/, next to this script
from bench_common import MMAP_THRESHOLD, finish_worker, fmt_bytes, fmt_n, machine
from row_read_floor import floor_ratio, row_read_floor_ms

FULL_SIZES = [16_384, 262_144, 1_048_576]
QUICK_SIZES = [1_024, 4_096, 16_384]  # perfect squares: the layer runs too (n_keys 32, 64, 128)
STRATEGIES = ("replicated", "row", "column")
PEER_LR = 1e-3  # SGD lr of the dense-accessed steps (ours and FBGEMM's fused): the tables barely drift
DRAWS = ("uniform", "hot")
GOAL_FLAT_RATIO = 1.2


# --- inputs ----------------------------------------------------------------------------------

def lookup_inputs(num_rows: int, draw: str, rank: int, a):
    import torch
    g = torch.Generator().manual_seed(a.seed * 1_000_003 + 7919 * rank + DRAWS.index(draw))
    if draw == "uniform":
        pool = torch.arange(num_rows)
    else:  # the same number of hot rows at every size, spread over the whole table
        pool_g = torch.Generator().manual_seed(a.seed)  # same hot set on every rank
        pool = torch.randperm(num_rows, generator=pool_g)[:a.hot_rows].sort().values
    indices_NK = bench_common.distinct_rows(pool.numel(), a.tokens, a.heads, a.knn, g, pool)
    logits = torch.randn(a.tokens, a.heads, a.knn, generator=g)
    weights_NK = torch.softmax(logits, dim=-1).reshape(a.tokens, -1).to(a.device).requires_grad_()
    grad_ND = torch.randn(a.tokens, a.dim, generator=g)
    return indices_NK.to(a.device), weights_NK, grad_ND.to(a.device)


def layer_n_keys(num_rows: int, knn: int) -> int | None:
    n = math.isqrt(num_rows)
    return n if n * n == num_rows and n >= knn else None


# --- tables and cases (run inside each rank) -------------------------------------------------

def shard(weight, strategy: str, world: int):
    """A value table of `strategy` from a whole (N x d) weight held identically by every rank."""
    import torch.distributed as dist
    from smf_ds.memory.values import LocalValueTable
    from smf_ds.parallel.sharded_values import ColumnShardedValueTable, RowShardedValueTable
    if strategy == "replicated":
        table = LocalValueTable(weight.shape[0], weight.shape[1], weight=weight)
        if world > 1:  # as shard_memory does: replicas, whose selected rows' grads are all-reduced
            table.replica_group = dist.group.WORLD
        return table
    cls = RowShardedValueTable if strategy == "row" else ColumnShardedValueTable
    return cls.from_full(weight, None)


class Case:
    """One thing to time at one size: `step()` runs forward + backward + clear; a lookup's step also
    leaves its forward's time in `forward_ms`."""

    def __init__(self, kind: str, num_rows: int, step, info: dict) -> None:
        self.kind, self.num_rows, self.step, self.info = kind, num_rows, step, info
        self.forward_ms = None


def _timed_forward(case_box: list, device: str, forward):
    """forward(), its wall time (device synchronized) left in case_box[0].forward_ms."""
    import bench_common as bc
    bc.sync(device)
    t0 = time.perf_counter()
    out = forward()
    bc.sync(device)
    case_box[0].forward_ms = (time.perf_counter() - t0) * 1e3
    return out


def fbgemm_cases(n: int, weight, rank: int, a) -> list[Case]:
    """FBGEMM's TBE on the same reads as ours: forward, backward with its fused SGD (every row read)."""
    import torch
    cases = []
    for draw in a.draws:
        tbe = bench_common.fbgemm_sgd_table(weight, PEER_LR, a.device)
        idx, w, grad = lookup_inputs(n, draw, rank, a)
        flat = idx.reshape(-1)
        offsets = torch.arange(0, flat.numel() + 1, idx.shape[1], device=flat.device)
        w_flat = w.detach().reshape(-1).clone().requires_grad_()
        box = []

        def step(tbe=tbe, flat=flat, offsets=offsets, w_flat=w_flat, grad=grad, box=box):
            out = _timed_forward(box, a.device, lambda: tbe(flat, offsets, per_sample_weights=w_flat))
            out.backward(grad)
            w_flat.grad = None

        case = Case(f"fbgemm/{draw}", n, step, {"unique_rows": int(torch.unique(idx).numel()),
                                                 "local_weight_shape": list(weight.shape)})
        box.append(case)
        cases.append(case)
    return cases


def build_cases(strategy: str, rank: int, world: int, a) -> list[Case]:
    import torch
    import torch.distributed as dist
    from smf_ds.config import MemoryConfig
    from smf_ds.memory.layer import build_memory
    from smf_ds.sparse.stats import step_grad
    cases = []
    for n in a.sizes:
        n_keys = layer_n_keys(n, a.knn) if a.layer else None
        layer = None
        if n_keys is not None:  # the layer's own (seeded, identical on every rank) table serves both
            cfg = MemoryConfig(n_keys=n_keys, heads=a.heads, knn=a.knn, k_dim=a.k_dim, v_dim=a.dim,
                               gated=True, seed=a.seed)
            layer = build_memory(cfg, hidden_size=a.dim).to(a.device)
            weight = layer.values.weight
        else:
            weight = torch.randn(n, a.dim, generator=torch.Generator().manual_seed(a.seed)) * a.dim ** -0.5
        weight = weight.to(a.device)
        if strategy == "replicated" and world == 1 and a.peer:  # timed in the same rounds as ours
            cases.extend(fbgemm_cases(n, weight, rank, a))
        grad_rows = torch.linspace(0, n - 1, min(a.grad_rows, n), device=a.device).long().unique()
        for draw in a.draws:
            table = shard(weight, strategy, world)
            table.track_access = a.track_access
            idx, w, grad = lookup_inputs(n, draw, rank, a)
            box = []

            def step(table=table, idx=idx, w=w, grad=grad, grad_rows=grad_rows, box=box):
                out = _timed_forward(box, a.device, lambda: table.lookup(idx, w))
                out.backward(grad)
                step_grad(table, grad_rows)
                w.grad = None
                table.sink.clear()

            if strategy == "replicated" and world == 1 and a.dense:
                dense_table = shard(weight.clone(), strategy, world)
                dense_table.track_access = a.track_access
                dense_box = []

                def dense_step(table=dense_table, idx=idx, w=w, grad=grad, box=dense_box):
                    """SGD on every row read (FBGEMM's fused update's work), as SparseMemoryUpdater does it."""
                    out = _timed_forward(box, a.device, lambda: table.lookup(idx, w))
                    out.backward(grad)
                    table.sink.coalesced_access()  # the read counts the selection would take
                    table.sink.sgd_update(table.weight, table.sink.read_rows(), PEER_LR)
                    w.grad = None
                    table.sink.clear()

                dense = Case(f"dense/{draw}", n, dense_step, {"unique_rows": int(torch.unique(idx).numel()),
                                                               "local_weight_shape": list(weight.shape)})
                dense_box.append(dense)
                cases.append(dense)

            info = {"unique_rows": int(torch.unique(idx).numel()),
                    "local_weight_shape": list(table.local_weight.shape)}
            if strategy == "replicated":  # the whole table here: the least time to read its rows once
                info["row_read_floor_ms"] = row_read_floor_ms(weight, idx, a.steps)
            if world > 1:
                all_idx = [torch.empty_like(idx) for _ in range(world)]
                dist.all_gather(all_idx, idx)
                info["unique_rows_group"] = int(torch.unique(torch.cat(all_idx)).numel())
            case = Case(f"lookup/{draw}", n, step, info)
            box.append(case)
            cases.append(case)
        if layer is not None:
            local = layer.values
            table = shard(local.weight, strategy, world)
            table.requires_grad, table.track_access = local.requires_grad, a.track_access
            layer.values = table
            del local
            g = torch.Generator().manual_seed(a.seed * 1_000_003 + 7919 * rank + 101)
            x = torch.randn(1, a.tokens, a.dim, generator=g).to(a.device)
            grad = torch.randn(1, a.tokens, a.dim, generator=g).to(a.device)

            def step(layer=layer, x=x, grad=grad):
                out = layer(x)
                out.backward(grad)
                for p in layer.parameters():
                    p.grad = None
                layer.values.sink.clear()

            with torch.no_grad():
                idx, _ = layer.select(x.reshape(a.tokens, a.dim))
            cases.append(Case("layer", n, step, {"n_keys": n_keys,
                                                 "unique_rows": int(torch.unique(idx).numel()),
                                                 "local_weight_shape": list(table.local_weight.shape)}))
        del weight, layer
    return cases


def _barrier(world: int) -> None:
    """Every rank here (also at world 1: gloo keeps the tensors of the last collective alive until
    the next one, so without it a step would free the previous step's or case's buffers)."""
    import torch.distributed as dist
    dist.barrier()


def torch_step_allocations(step) -> dict:
    """Run `step` once under the profiler; exact tensor allocations from its allocator events.

    Own running sum over the step's events (time order): + size of each allocation, - size of each
    free of a block allocated in this step (frees of older blocks are not step allocations).
    """
    events, error = bench_common.cpu_allocations(step)
    if error:
        return {"alloc_peak_bytes": None, "alloc_total_bytes": None, "alloc_error": error}
    live, running, peak, total, count = {}, 0, 0, 0, 0
    for _, size, ptr, _ in events:
        if size > 0:
            live[ptr] = size
            running += size
            total += size
            count += 1
            peak = max(peak, running)
        elif ptr in live:
            running -= live.pop(ptr)
    return {"alloc_peak_bytes": peak, "alloc_total_bytes": total, "alloc_count": count,
            "alloc_retained_bytes": running}


def bench_rank(rank: int, world: int, a) -> dict:
    """Every strategy of a.strategies at every size, in this rank; returns per-case samples."""
    import torch
    from smf_ds.parallel.comm import COMM_STATS
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = {"rank": rank, "num_threads": torch.get_num_threads(), "torch": torch.__version__, "cases": []}
    if a.worker in ("mem", "both"):  # one-time profiler start-up, outside any measurement
        torch_step_allocations(lambda: torch.ones(1))
    for strategy in a.strategies:
        cases = build_cases(strategy, rank, world, a)
        for c in cases:
            for _ in range(a.warmup):
                c.step()
        samples = {id(c): {"ms": [], "forward_ms": [], "bytes_sent": [], "comm_calls": []} for c in cases}
        mem = {}
        if a.worker in ("time", "both"):
            for _ in range(a.steps):
                for c in cases:
                    _barrier(world)
                    COMM_STATS.reset()
                    bench_common.sync(a.device)
                    t0 = time.perf_counter()
                    c.step()
                    bench_common.sync(a.device)
                    t1 = time.perf_counter()
                    s = samples[id(c)]
                    s["ms"].append((t1 - t0) * 1e3)
                    if c.forward_ms is not None:
                        s["forward_ms"].append(c.forward_ms)
                    s["bytes_sent"].append(COMM_STATS.bytes_sent)
                    s["comm_calls"].append(COMM_STATS.calls)
        if a.worker in ("mem", "both"):
            gc.collect()
            meter = bench_common.Memory(a.device)  # on a GPU: the CUDA allocator's bytes
            for c in cases:
                _barrier(world)
                rss0 = meter.reset_peak()
                c.step()
                hwm, rss1 = meter.peak(), meter.now()
                _barrier(world)
                m = {"rss_peak_growth_bytes": hwm - rss0, "rss_retained_bytes": rss1 - rss0}
                m.update(torch_step_allocations(c.step))
                mem[id(c)] = m
        for c in cases:
            row = {"strategy": strategy, "kind": c.kind, "num_rows": c.num_rows, **c.info}
            row.update(samples[id(c)])
            row.update(mem.get(id(c), {}))
            out["cases"].append(row)
        del cases, samples
    return out


# --- processes -------------------------------------------------------------------------------

def _rank_entry(rank: int, world: int, port: int, a, queue) -> None:
    import pickle
    import traceback

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        if a.device == "cuda":
            import torch
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo", rank=rank, world_size=world)
        queue.put((rank, "ok", pickle.dumps(bench_rank(rank, world, a))))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, a) -> list[dict]:
    """bench_rank in `world` gloo processes (in this process when world is 1)."""
    import pickle
    import queue as queue_mod

    import torch.multiprocessing as mp

    from smf_ds.parallel.process_group import free_port
    port = free_port()
    if world == 1:
        q = queue_mod.Queue()
        _rank_entry(0, 1, port, a, q)
        procs = []
    else:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_rank_entry, args=(r, world, port, a, q)) for r in range(world)]
        for p in procs:
            p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, status, payload = q.get(timeout=a.rank_timeout)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else a.rank_timeout)
            if p.is_alive():
                p.terminate()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]


def worker_main(a) -> None:
    print("RESULT " + json.dumps(run_ranks(a.worker_procs, a)), flush=True)


PASS_THROUGH = ("sizes", "tokens", "steps", "warmup", "strategies", "draws", "dim", "heads", "knn",
                "k_dim", "hot_rows", "seed", "track_access", "layer", "rank_timeout", "device", "dense", "peer")


def start_worker(a, kind: str, procs: int) -> subprocess.Popen:
    args = {k: getattr(a, k) for k in PASS_THROUGH}
    args["threads"] = a.threads or max(1, (os.cpu_count() or 1) // procs)
    return bench_common.start_worker(__file__, [kind, "--worker-procs", str(procs)], args,
                                     memory_pass=kind in ("mem", "both"), thp=a.thp)


# --- report ----------------------------------------------------------------------------------

def combine(timing: list[dict], memory: list[dict] | None, procs: int) -> list[dict]:
    """Per-case rows: a step's time is the slowest rank's; bytes and memory: max over ranks."""
    rows = []
    for i, r0 in enumerate(timing[0]["cases"]):
        ranks = [t["cases"][i] for t in timing]
        per_step = [max(vals) for vals in zip(*(r["ms"] for r in ranks))]
        row = {k: r0[k] for k in ("strategy", "kind", "num_rows", "local_weight_shape")}
        row["procs"] = procs
        for k in ("n_keys", "unique_rows_group", "row_read_floor_ms"):
            if k in r0:
                row[k] = r0[k]
        row["unique_rows_per_rank"] = [r["unique_rows"] for r in ranks]
        row["step_ms_median"] = statistics.median(per_step)
        row["step_ms_min"] = min(per_step)
        row["step_ms_all"] = per_step
        row["step_ms_per_rank"] = [r["ms"] for r in ranks]
        if r0.get("forward_ms"):
            row["forward_ms_all"] = [max(vals) for vals in zip(*(r["forward_ms"] for r in ranks))]
            row["forward_ms_median"] = statistics.median(row["forward_ms_all"])
        row["bytes_sent_per_rank"] = [statistics.median(r["bytes_sent"]) for r in ranks]
        row["bytes_sent_max_rank"] = max(row["bytes_sent_per_rank"])
        row["comm_calls_per_step"] = ranks[0]["comm_calls"][-1]
        if memory is not None:
            mranks = [m["cases"][i] for m in memory]
            assert (mranks[0]["kind"], mranks[0]["num_rows"], mranks[0]["strategy"]) == \
                (r0["kind"], r0["num_rows"], r0["strategy"])
            for key in ("rss_peak_growth_bytes", "rss_retained_bytes", "alloc_peak_bytes",
                        "alloc_total_bytes", "alloc_count", "alloc_retained_bytes"):
                vals = [m.get(key) for m in mranks]
                row[key + "_per_rank"] = vals
                row[key] = None if any(v is None for v in vals) else max(vals)
        rows.append(row)
    return rows


def peer_ratios(rows: list[dict]) -> list[dict]:
    """Ours / FBGEMM per draw and size, from cases timed in the same rounds of one process."""
    by = {(r["strategy"], r["procs"], r["kind"], r["num_rows"]): r for r in rows}
    out = []
    for (strategy, procs, kind, n), fb in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][3])):
        if strategy != "replicated" or procs != 1 or not kind.startswith("fbgemm/"):
            continue
        draw = kind.split("/", 1)[1]
        ours, dense = by.get(("replicated", 1, f"lookup/{draw}", n)), by.get(("replicated", 1, f"dense/{draw}", n))
        if ours is None or dense is None:
            continue

        def ratio(mine, key):
            return {"median": mine[key + "_median"] / fb[key + "_median"],
                    "paired": statistics.median(x / y for x, y in zip(mine[key + "_all"], fb[key + "_all"]))}

        out.append({"draw": draw, "num_rows": n, "forward": ratio(ours, "forward_ms"),
                    "top_t_step": ratio(ours, "step_ms"), "dense_accessed_step": ratio(dense, "step_ms"),
                    "peak_bytes": {"ours": ours.get("rss_peak_growth_bytes"),
                                   "ours-dense": dense.get("rss_peak_growth_bytes"),
                                   "fbgemm": fb.get("rss_peak_growth_bytes")}})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help=f"comma-separated table sizes in rows (default {','.join(map(str, FULL_SIZES))})")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per rank per step (default 2048, quick 128)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 10, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per case first (default 3, quick 1)")
    ap.add_argument("--strategies", type=lambda s: s.split(","), default=list(STRATEGIES),
                    help="comma-separated, of replicated,row,column (default all)")
    ap.add_argument("--procs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                    help="comma-separated process counts (default 1,2)")
    ap.add_argument("--draws", type=lambda s: s.split(","), default=list(DRAWS),
                    help="lookup index draws: uniform,hot (default both)")
    ap.add_argument("--quick", action="store_true",
                    help=f"sizes {','.join(map(str, QUICK_SIZES))}, 128 tokens, 3 steps (smoke run, < 30 s)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    ap.add_argument("--no-layer", dest="layer", action="store_false", help="skip the ProductKeyMemory layer")
    ap.add_argument("--no-track-access", dest="track_access", action="store_false",
                    help="do not record read counts (SMF training records them)")
    ap.add_argument("--thp", action="store_true",
                    help="THP_MEM_ALLOC_ENABLE=1 in the workers: PyTorch backs large CPU tensors with "
                         "transparent huge pages (fewer page faults on fresh allocations)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default cores // procs)")
    ap.add_argument("--out", help="results JSON (default bench_results/memory.json; with --quick bench_results/memory.quick.json, so a smoke run never replaces a full run's results)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--grad-rows", type=int, default=512, help="rows whose gradients a lookup step forms (SMF's top-t)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--knn", type=int, default=32)
    ap.add_argument("--k-dim", type=int, default=256, help="layer query/key dim")
    ap.add_argument("--hot-rows", type=int, default=None, help="rows of the hot draw (default: smallest size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-peer", dest="dense", action="store_false",
                    help="leave out FBGEMM (run when the [peer] extra is installed, at 1 process) and ours' "
                         "dense-accessed step")
    bench_common.add_device_argument(ap)
    ap.add_argument("--rank-timeout", type=float, default=1800.0, help=argparse.SUPPRESS)
    bench_common.add_worker_arguments(ap, ["time", "mem", "both"])
    ap.add_argument("--worker-procs", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        bench_common.take_worker_settings(a)
        worker_main(a)
        return 0

    a.sizes = sorted(a.sizes or (QUICK_SIZES if a.quick else FULL_SIZES))
    a.tokens = a.tokens or (128 if a.quick else 2048)
    a.steps = a.steps or (3 if a.quick else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    a.hot_rows = a.hot_rows or a.sizes[0]
    bench_common.check_device(ap, a.device)
    if a.device == "cuda" and a.procs != [1]:
        ap.error(f"--device cuda: --procs must be 1 (one GPU; NCCL puts one rank per device), got {a.procs}")
    peer_missing = "--no-peer" if not a.dense else bench_common.fbgemm_missing(a.device)
    a.peer = peer_missing is None and 1 in a.procs and "replicated" in a.strategies
    if peer_missing and a.dense:
        print(f"[bench_memory] FBGEMM left out ({peer_missing}); pip install -e '.[peer]' adds it",
              file=sys.stderr, flush=True)
    bad = [s for s in a.strategies if s not in STRATEGIES] + [d for d in a.draws if d not in DRAWS]
    if bad:
        ap.error(f"unknown strategies/draws {bad}; expected {list(STRATEGIES)} / {list(DRAWS)}")
    if any(p < 1 for p in a.procs):
        ap.error(f"--procs: expected positive process counts, got {a.procs}")
    if a.sizes[0] < a.knn or a.hot_rows < a.knn or a.hot_rows > a.sizes[0]:
        ap.error(f"--sizes / --hot-rows: need knn ({a.knn}) <= hot rows ({a.hot_rows}) <= every size {a.sizes}")
    if a.steps < 1 or a.warmup < 1:
        ap.error("--steps and --warmup: at least 1")
    t_start = time.perf_counter()

    rows, meta = [], {}
    for procs in a.procs:  # one worker at a time: timings must not share the cores
        print(f"[bench_memory] timing {','.join(a.strategies)} at {procs} process(es), N = {a.sizes} ...",
              file=sys.stderr, flush=True)
        if a.quick and not a.no_memory:  # one process for both passes (see the docstring)
            timing = memory = finish_worker(start_worker(a, "both", procs), "bench_memory", f"both/{procs}")
        else:
            timing = finish_worker(start_worker(a, "time", procs), "bench_memory", f"time/{procs}")
            memory = None
        if not a.no_memory and not a.quick:
            print(f"[bench_memory] memory at {procs} process(es) ...", file=sys.stderr, flush=True)
            memory = finish_worker(start_worker(a, "mem", procs), "bench_memory", f"mem/{procs}")
        meta[procs] = {"threads_per_process": timing[0]["num_threads"], "torch": timing[0]["torch"]}
        rows.extend(combine(timing, memory, procs))

    smallest, largest = a.sizes[0], a.sizes[-1]
    base = {(r["strategy"], r["procs"], r["kind"]): r for r in rows if r["num_rows"] == smallest}
    for r in rows:
        b = base.get((r["strategy"], r["procs"], r["kind"]))
        r["ratio_to_smallest"] = r["step_ms_median"] / b["step_ms_median"] if b else None
        r["min_ratio_to_smallest"] = r["step_ms_min"] / b["step_ms_min"] if b else None
        # Paired: round i of this size over round i of the smallest (the same round of the
        # interleaved loop, seconds apart), then the median: less sensitive to load drift.
        r["paired_ratio_to_smallest"] = (statistics.median(x / y for x, y in zip(r["step_ms_all"], b["step_ms_all"]))
                                         if b else None)

    goals = []
    for r in rows:
        if r["num_rows"] != largest or not r["kind"].startswith("lookup") or r["ratio_to_smallest"] is None:
            continue
        g = {"goal": f"{r['kind']} {r['strategy']} x{r['procs']}: step {fmt_n(largest)}/{fmt_n(smallest)} "
                     f"<= {GOAL_FLAT_RATIO}",
             "strategy": r["strategy"], "procs": r["procs"], "kind": r["kind"],
             "value": r["ratio_to_smallest"], "value_min": r["min_ratio_to_smallest"],
             "value_paired": r["paired_ratio_to_smallest"],
             "target": GOAL_FLAT_RATIO, "pass": r["ratio_to_smallest"] <= GOAL_FLAT_RATIO}
        b = base[(r["strategy"], r["procs"], r["kind"])]
        if "row_read_floor_ms" in r:  # forward and backward each read every row once
            g["row_read_floor_ratio"] = floor_ratio(b["step_ms_median"], b["row_read_floor_ms"],
                                                    r["row_read_floor_ms"], reads=2)
        if (smallest, largest) != (FULL_SIZES[0], FULL_SIZES[-1]):
            g["note"] = "the goal is stated for N = 16k .. 1M; these sizes differ"
        goals.append(g)

    threads = ", ".join(f"{p} proc: {m['threads_per_process']} thread(s)/proc" for p, m in meta.items())
    print()
    print(f"Memory lookup step (forward + backward + sink.clear), d={a.dim}, {a.tokens} tokens/rank x "
          f"{a.heads} heads x knn {a.knn}, fp32, read counts {'on' if a.track_access else 'off'}; "
          f"{threads}; median (min) of {a.steps} steps; a 2-process step = slowest rank; "
          f"bytes = sent to other ranks by one rank (max over ranks); alloc = per rank (max), "
          f"peak of step-allocated tensor bytes alive at once (torch profiler) / RSS peak growth")
    titles = {"lookup/uniform": "Value-table lookup, rows drawn uniformly from the table (U grows with N)",
              "lookup/hot": f"Value-table lookup, control: rows drawn from {a.hot_rows:,} hot rows spread over "
                            f"the table (U fixed)",
              "layer": "Informative: whole ProductKeyMemory layer (gated, k_dim "
                       f"{a.k_dim}, n_keys = sqrt(N)); key search grows with sqrt(N)"}
    for kind in ["lookup/" + d for d in a.draws] + (["layer"] if a.layer else []):
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        print()
        print(f"### {titles[kind]}")
        print()
        print(f"| strategy | procs | N | U/rank | step ms median (min) | ratio to N={fmt_n(smallest)} "
              f"| bytes sent/rank/step | step alloc peak (torch) | step alloc total (torch) | RSS peak growth |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in sorted(sel, key=lambda r: (STRATEGIES.index(r["strategy"]), r["procs"], r["num_rows"])):
            n = fmt_n(r["num_rows"]) + (f" (n_keys {r['n_keys']})" if "n_keys" in r else "")
            ratio = "n/a" if r["ratio_to_smallest"] is None else f"{r['ratio_to_smallest']:.2f}"
            print(f"| {r['strategy']} | {r['procs']} | {n} | {max(r['unique_rows_per_rank']):,} "
                  f"| {r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}) | {ratio} "
                  f"| {fmt_bytes(r['bytes_sent_max_rank'])} | {fmt_bytes(r.get('alloc_peak_bytes'))} "
                  f"| {fmt_bytes(r.get('alloc_total_bytes'))} | {fmt_bytes(r.get('rss_peak_growth_bytes'))} |")
    print()
    print(f"Flatness, lookup step time {fmt_n(largest)} / {fmt_n(smallest)}: ratio of medians (goal "
          f"<= {GOAL_FLAT_RATIO}, PASS/MISS on it); in brackets the ratio of minima and the median of "
          f"per-round ratios:")
    for g in goals:
        print(f"  {'PASS' if g['pass'] else 'MISS'}  {g['goal']}: {g['value']:.2f} "
              f"(min {g['value_min']:.2f}, paired {g['value_paired']:.2f})"
              + (f"; were all but reading the rows flat: {g['row_read_floor_ratio']:.2f}"
                 if "row_read_floor_ratio" in g else "")
              + (f"  ({g['note']})" if "note" in g else ""))
    print("  (the floor: a lookup step reads every row it touches twice, in the forward and for the read "
          "weights' gradient; tools/row_read_floor.py times one sorted read of them)")

    peer = peer_ratios(rows)
    if peer:
        print()
        print(f"Ours (replicated, 1 process) / FBGEMM TBE (fused EXACT_SGD, lr {PEER_LR:g}) on the same reads and "
              f"table, ratio of medians (median of per-round ratios); < 1: ours faster. top-t step = ours' lookup "
              f"step above (gradients of {a.grad_rows} rows) / FBGEMM's step (updates every row read); "
              f"dense-accessed = ours updating every row read by SGD in the step (SparseMemoryUpdater's path):")
        print()
        print("| draw | N | forward | top-t step | dense-accessed step | peak growth ours top-t / dense-accessed "
              "/ FBGEMM |")
        print("|---|---:|---:|---:|---:|---:|")
        for p in peer:
            cells = " | ".join(f"{p[k]['median']:.2f}x ({p[k]['paired']:.2f}x)" for k in ("forward", "top_t_step",
                                                                                       "dense_accessed_step"))
            print(f"| {p['draw']} | {fmt_n(p['num_rows'])} | {cells} | {fmt_bytes(p['peak_bytes']['ours'])} / "
                  f"{fmt_bytes(p['peak_bytes']['ours-dense'])} / {fmt_bytes(p['peak_bytes']['fbgemm'])} |")

    memory_scaling = []
    for r in rows:
        b = base.get((r["strategy"], r["procs"], r["kind"]))
        if r["num_rows"] != largest or b is None or r is b or not r.get("alloc_peak_bytes") \
                or not b.get("alloc_peak_bytes"):
            continue
        memory_scaling.append({
            "kind": r["kind"], "strategy": r["strategy"], "procs": r["procs"],
            "alloc_peak_ratio": r["alloc_peak_bytes"] / b["alloc_peak_bytes"],
            "rss_peak_ratio": (r["rss_peak_growth_bytes"] / b["rss_peak_growth_bytes"]
                               if r.get("rss_peak_growth_bytes") and b.get("rss_peak_growth_bytes") else None),
            "unique_rows_ratio": max(r["unique_rows_per_rank"]) / max(b["unique_rows_per_rank"]),
            "num_rows_ratio": largest / smallest})
    if memory_scaling:
        print()
        print(f"Step allocation {fmt_n(largest)} / {fmt_n(smallest)} (torch peak; RSS peak) against the growth "
              f"of U (unique rows per rank) and of N:")
        for m in memory_scaling:
            rss = "n/a" if m["rss_peak_ratio"] is None else f"{m['rss_peak_ratio']:.2f}"
            print(f"  {m['kind']} {m['strategy']} x{m['procs']}: alloc {m['alloc_peak_ratio']:.2f}; RSS {rss}; "
                  f"U {m['unique_rows_ratio']:.2f}; N {m['num_rows_ratio']:.0f}")

    result = {
        "benchmark": "bench_memory",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "config": {"sizes": a.sizes, "tokens_per_rank": a.tokens, "dim": a.dim, "heads": a.heads, "knn": a.knn,
                   "k_dim": a.k_dim, "draws": a.draws, "hot_rows": a.hot_rows, "strategies": a.strategies,
                   "procs": a.procs, "steps": a.steps, "warmup": a.warmup, "seed": a.seed,
                   "track_access": a.track_access, "layer": a.layer, "thp": a.thp, "dtype": "float32",
                   "device": a.device, "fbgemm_missing": peer_missing, "peer_lr": PEER_LR},
        "method": {"step": "forward + backward (random upstream grad) + sink.clear()",
                   "timing": "median / min wall time over steps; steps interleaved over sizes; 2 procs: "
                             "barrier before each step, step time = slowest rank",
                   "bytes": "smf_ds.parallel.comm.COMM_STATS.bytes_sent per step, per rank",
                   "memory": "torch profiler allocator events (peak live / total allocated during one step); "
                             f"RSS: MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}, VmHWM reset via "
                             "/proc/self/clear_refs, growth = VmHWM after - VmRSS before"},
        "machine": machine(threads={str(p): m["threads_per_process"] for p, m in meta.items()},
                           torch=next(iter(meta.values()))["torch"] if meta else None),
        "results": rows,
        "goals": goals,
        "memory_scaling": memory_scaling,
        "ours_over_fbgemm": peer,
    }
    return bench_common.finish(result, a.out, f"memory{'.quick' if a.quick else ''}.json", t_start)


if __name__ == "__main__":
    sys.exit(main())
