#!/usr/bin/env python
"""Time and size one memory-value update: our sparse path vs the paper-code dense-masked path.

Both paths see the same batch: T tokens (default 2,048), each reading H x knn rows (4 x 32 = 128)
of an N x d value table (d = 256, fp32): per token and head, knn distinct rows drawn uniformly
(as product keys give), with softmax weights over each head's knn that require grad (in the
memory layer they come from the key scores). Indices, weights, the upstream gradient, the table
and the background df (B = 1,000 batches) are seeded random and identical for both paths.
Uniform reads touch U distinct rows, and U grows with N (16k at 16k, ~232k at 1M), so the bytes a
step must touch grow too (the whole 16 MiB table at 16k fits in a 32 MiB L3; 232k rows at 1M do
not). --hot-rows H is the control: every read comes from a fixed set of H rows spread over the
table, so only the table's size changes with N.

  ours   LocalValueTable.lookup (forward: embedding_bag straight on the table) -> backward (the
         weights' gradient, and the reads + per-token output gradient recorded in the table's
         sink; no row gradients formed) -> SparseMemoryUpdater.step(): coalesce reads, tfidf
         scores against BackgroundStats, global top-t (512), gradients of those 512 rows only,
         SGD on them, metrics, sink cleared.
  paper  the table as an nn.Parameter (N x d); F.embedding_bag(mode="sum", per_sample_weights)
         forward -> backward gives a dense N x d gradient -> a hook on the parameter computes the
         read counts with torch.bincount over N, the same tfidf score (dense over N), top-t with
         torch.topk, and multiplies the gradient by that row mask -> torch.optim.AdamW
         (weight_decay 0.01, torch's default implementation unless --paper-adamw: on CPU the
         per-tensor loop; --paper-adamw fused is several times faster, about 4x at 1M in the
         README's run) over the whole table
         -> zero_grad(set_to_none=True).

Timing. "step" = backward + selection + optimizer step (+ zero_grad for the paper path); the
forward is timed apart (forward_ms). One fresh subprocess (normal allocator) builds every
(path, size) case first and runs --warmup untimed steps of each (the paper's AdamW state is
allocated in the first; one-time library costs land there too), then the timed steps are
interleaved over cases (round r runs one step of every case), so slow drifts in the machine's
load hit every case alike. Reported: median and min over --steps (all samples in the JSON); wall
time (time.perf_counter). The machine may be shared: other processes' share of all CPU time
during each case's timed steps (/proc/stat busy time minus this process's utime + stime) is
recorded, and above 10% the summary warns that the timings are inflated. Ours' step is also
taken apart with the library's own functions (backward, coalesce reads, selection, grads of the
selected rows, grad norm, optimizer update, bookkeeping + sink clear).

Memory. Two measurements of the step, per size, in one fresh subprocess per path (the two side by
side), on a freshly built table, after --warmup steps and the next forward:
  RSS peak growth  the kernel's view: glibc's mmap threshold pinned to 64 KiB
               (MALLOC_MMAP_THRESHOLD_=65536, which also turns off its dynamic threshold), so every
               allocation >= 64 KiB is its own mapping, returned to the kernel when freed, and RSS
               tracks live memory, not allocator caches; the RSS high-water mark is reset (writing
               5 to /proc/self/clear_refs), VmRSS read, backward + step run, VmHWM read:
               growth = VmHWM - VmRSS before. This is the number the goal is judged on.
  tensor alloc peak  cross-check, tensors only: one more step under torch.profiler
               (profile_memory=True); from its CPU allocator events, the most bytes allocated during
               the step alive at once (private event tree API; null where torch lacks it). The
               profiler does not see frees of tensors allocated before it started (ours: the reads
               the forward saved for the backward), so this is an upper bound on the
               growth; the RSS number credits them.
Also: forward growth (RSS, same method around the forward: what the forward keeps for the
backward), and the persistent state a path keeps between steps: exact (nbytes of AdamW's exp_avg
+ exp_avg_sq for the paper; the updater's per-row ever_updated + window_counts and the sparse
optimizer's state for ours) and as RSS growth over the warm-up steps (catches state allocated at
the first step, like AdamW's). Background statistics are an input of both paths, not counted.
Bytes and fractions of the table's bytes (N x d x 4).

Goals (printed PASS/MISS, not asserted), stated for N = 16k .. 1M: ours flat in N (step time at
the largest size / at the smallest <= 1.2), ours >= 20x faster than the paper path at the largest
size, ours' RSS peak growth during the step < 10% of the table at the largest size.

    .venv/bin/python tools/bench_sparse_step.py                 # full: N = 16k, 262k, 1M (~4 min)
    .venv/bin/python tools/bench_sparse_step.py --quick         # small sizes, smoke run (< 30 s)
    .venv/bin/python tools/bench_sparse_step.py --sizes 16384,1048576 --steps 5 --no-memory
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
from bench_common import MMAP_THRESHOLD, fmt_bytes, fmt_n, machine
from row_read_floor import floor_ratio, row_read_floor_ms

FULL_SIZES = [16_384, 262_144, 1_048_576]
QUICK_SIZES = [4_096, 16_384, 65_536]
GOAL_FLAT_RATIO = 1.2
GOAL_SPEEDUP = 20.0
GOAL_PEAK_FRAC = 0.10
GOAL_PEER_FORWARD = 1.0  # ours / FBGEMM, at every N
GOAL_PEER_DENSE = 1.2
GOAL_PEER_TOP_T = 0.5  # the top-t step at least 2x faster than FBGEMM's fused update
GOAL_PEER_PEAK = 2.0
BUSY_WARN = 0.10  # warn when other processes used more than this share of the CPUs while timing


# --- the two paths ---------------------------------------------------------------------------

def make_batch(num_rows: int, a):
    """Seeded inputs shared by both paths (same tokens whatever the path)."""
    import torch
    g = torch.Generator().manual_seed(a.seed)
    pool = None
    if a.hot_rows:  # control: the same number of rows read at every N, spread over the whole table
        pool = torch.randperm(num_rows, generator=torch.Generator().manual_seed(a.seed))[:a.hot_rows].sort().values
    indices_NK = bench_common.distinct_rows(num_rows, a.tokens, a.heads, a.knn, g, pool)
    logits = torch.randn(a.tokens, a.heads, a.knn, generator=g)
    weights_NK = torch.softmax(logits, dim=-1).reshape(a.tokens, -1).requires_grad_()
    grad_out_ND = torch.randn(a.tokens, a.dim, generator=g)
    df = torch.randint(0, a.bg_batches + 1, (num_rows,), generator=g)
    weight = torch.randn(num_rows, a.dim, generator=g) * a.dim ** -0.5
    dev = a.device
    weights_NK = weights_NK.detach().to(dev).requires_grad_()
    return indices_NK.to(dev), weights_NK, grad_out_ND.to(dev), df, weight.to(dev)


class Ours:
    name = "ours"
    scoring = "tfidf"

    def __init__(self, num_rows: int, a) -> None:
        import torch
        from smf_ds.config import SparseConfig
        from smf_ds.memory.values import LocalValueTable
        from smf_ds.sparse.background import BackgroundStats
        from smf_ds.sparse.step import SparseMemoryUpdater
        self.idx, self.w, self.grad_out, df, weight = make_batch(num_rows, a)
        self.table = LocalValueTable(num_rows, a.dim, weight=weight)
        bg = BackgroundStats(a.bg_batches, {0: df}, {0: torch.zeros(num_rows, dtype=torch.long)})
        cfg = SparseConfig(scoring=self.scoring, top_t=a.top_t, optimizer="sgd")
        self.updater = SparseMemoryUpdater([(0, self.table)], cfg, lr=a.lr_sgd, background=bg)
        self.out = None

    @property
    def weight(self):
        return self.table.weight

    def forward(self) -> None:
        self.out = self.table.lookup(self.idx, self.w)

    def step(self) -> None:
        self.out.backward(self.grad_out)
        self.out = None
        self.updater.step()
        self.w.grad = None

    def selected(self):
        return self.updater.previous[0].cpu() if self.scoring == "tfidf" else None

    def state_bytes(self) -> int:
        u = self.updater
        n = sum(t.nbytes for t in u.ever_updated.values()) + sum(t.nbytes for t in u.window_counts.values())
        n += sum(t.nbytes for st in u.optimizer.state.values() for t in st.values())
        return n


class Paper:
    name = "paper"

    def __init__(self, num_rows: int, a) -> None:
        import torch
        import torch.nn.functional as F
        self.F = F
        self.idx, self.w, self.grad_out, df, weight = make_batch(num_rows, a)
        self.param = torch.nn.Parameter(weight)
        impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[a.paper_adamw]
        self.opt = torch.optim.AdamW([self.param], lr=a.lr_adamw, weight_decay=0.01, **impl)
        idf = torch.log((a.bg_batches + 1.0) / (df.double() + 1.0)).to(a.device)
        num_rows_, top_t = num_rows, a.top_t
        self.last_selected = None

        def mask_hook(grad):  # the paper's code: counts over all N rows, dense score, top-t, row mask
            counts = torch.bincount(self.idx.reshape(-1), minlength=num_rows_).double()
            score = counts / counts.sum() * idf
            top = torch.topk(score, top_t).indices
            mask = torch.zeros(num_rows_, dtype=grad.dtype, device=grad.device)
            mask[top] = 1.0
            self.last_selected = top.sort().values
            return grad * mask.unsqueeze(1)

        self.param.register_hook(mask_hook)
        self.out = None

    @property
    def weight(self):
        return self.param.data

    def forward(self) -> None:
        self.out = self.F.embedding_bag(self.idx, self.param, per_sample_weights=self.w, mode="sum")

    def step(self) -> None:
        self.out.backward(self.grad_out)
        self.out = None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.w.grad = None

    def selected(self):
        return self.last_selected.cpu()

    def state_bytes(self) -> int:
        return sum(t.nbytes for st in self.opt.state.values() for t in st.values() if hasattr(t, "nbytes"))


class OursDense(Ours):
    """Ours with the dense-accessed rule: SGD on every row the step read (FBGEMM's fused update's work)."""
    name = "ours-dense"
    scoring = "dense-accessed"


class OursDenseAll(Ours):
    """Ours with the dense-all rule: every row of the table selected (with SGD, the rows not read stay)."""
    name = "ours-dense-all"
    scoring = "dense-all"


class Fbgemm:
    """FBGEMM's table-batched embedding on the same batch: forward with the read weights as per-sample
    weights; the backward gives their gradient and updates every row read (EXACT_SGD, fused)."""
    name = "fbgemm"

    def __init__(self, num_rows: int, a) -> None:
        import torch
        self.idx, self.w, self.grad_out, _, weight = make_batch(num_rows, a)
        self.tbe = bench_common.fbgemm_sgd_table(weight, a.lr_sgd, a.device)
        del weight
        self.flat = self.idx.reshape(-1)
        self.offsets = torch.arange(0, self.flat.numel() + 1, self.idx.shape[1], device=self.flat.device)
        self.w_flat = self.w.detach().reshape(-1).clone().requires_grad_()
        self.out = None

    @property
    def weight(self):
        return self.tbe.split_embedding_weights()[0]

    def forward(self) -> None:
        self.out = self.tbe(self.flat, self.offsets, per_sample_weights=self.w_flat)

    def step(self) -> None:
        self.out.backward(self.grad_out)
        self.out = None
        self.w_flat.grad = None

    def selected(self):
        return None

    def state_bytes(self) -> int:
        return 0  # EXACT_SGD keeps no state


PATHS = {"ours": Ours, "paper": Paper, "ours-dense": OursDense, "ours-dense-all": OursDenseAll, "fbgemm": Fbgemm}
# What each ratio to FBGEMM compares: the same batch, same table, same lr.
PEER_RATIOS = {"forward": ("ours", "forward_ms"), "dense_accessed_step": ("ours-dense", "step_ms"),
               "dense_all_step": ("ours-dense-all", "step_ms"), "top_t_step": ("ours", "step_ms")}


# --- workers (run in fresh subprocesses) -----------------------------------------------------

def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1e3


def _jiffies() -> tuple[int, int, int]:
    """(busy jiffies of all CPUs, all jiffies of all CPUs, jiffies of this process's threads)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    idle = v[3] + v[4]  # idle + iowait
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])  # utime + stime
    return sum(v) - idle, sum(v), own


class Busy:
    """Share of the machine's CPU time that other processes used, over the intervals measured."""

    def __init__(self) -> None:
        self.others = self.total = 0

    def add(self, j0: tuple[int, int, int], j1: tuple[int, int, int]) -> None:
        busy, total, own = (b - a for a, b in zip(j0, j1))
        self.others += max(0, busy - own)
        self.total += total

    @property
    def share(self) -> float:
        return self.others / max(1, self.total)


def time_all(a) -> dict:
    """Every (path, size) built first, warmed up, then timed in interleaved rounds."""
    cases = [(name, n) for n in a.sizes for name in a.paths]
    dev = a.device
    objs = {}
    for name, n in cases:
        objs[name, n] = PATHS[name](n, a)
        for _ in range(a.warmup):
            objs[name, n].forward()
            objs[name, n].step()
    gc.collect()
    fwd = {c: [] for c in cases}
    stp = {c: [] for c in cases}
    busy = {c: Busy() for c in cases}
    for _ in range(a.steps):  # round r runs one step of every case: drifts in load hit all alike
        for c in cases:
            p = objs[c]
            bench_common.sync(dev)
            j0 = _jiffies()
            t0 = time.perf_counter()
            p.forward()
            bench_common.sync(dev)
            t1 = time.perf_counter()
            p.step()
            bench_common.sync(dev)
            t2 = time.perf_counter()
            busy[c].add(j0, _jiffies())
            fwd[c].append(_ms(t0, t1))
            stp[c].append(_ms(t1, t2))
    out = {}
    for n in a.sizes:  # the same batches and lr, as many steps: ours' dense-accessed table and FBGEMM's agree
        if ("ours-dense", n) in objs and ("fbgemm", n) in objs:
            diff = (objs["ours-dense", n].weight - objs["fbgemm", n].weight).abs().max()
            out.setdefault("checks", {})[str(n)] = {"ours_dense_vs_fbgemm_table_max_abs_diff": float(diff)}
    for c in cases:
        p = objs[c]
        before = p.weight.clone()  # one more step, untimed: which rows it changed
        p.forward()
        p.step()
        rows_changed = int((p.weight != before).any(dim=1).sum())
        del before
        res = {"forward_ms_median": statistics.median(fwd[c]), "forward_ms_min": min(fwd[c]),
               "step_ms_median": statistics.median(stp[c]), "step_ms_min": min(stp[c]),
               "forward_ms_all": fwd[c], "step_ms_all": stp[c], "others_cpu_busy": busy[c].share,
               "rows_changed_per_step": rows_changed}
        if p.selected() is not None:
            res["selected"] = p.selected().tolist()
        if c[0] == "ours":
            res["breakdown_ms"] = ours_breakdown(p, a)
            res["row_read_floor_ms"] = row_read_floor_ms(p.table.weight, p.idx, a.steps)
        out.setdefault(c[0], {})[str(c[1])] = res
    return out


def ours_breakdown(p: Ours, a) -> dict:
    """The pieces of our step, timed one by one with the library's own functions (medians).

    Mirrors SparseMemoryUpdater.step() for one local table: coalesce reads, select, form the
    selected rows' grads from the recorded reads, grad norm, optimizer update, bookkeeping (usage
    counters, sink.clear() which frees the recorded reads and token gradients).
    """
    from smf_ds.sparse.selection import select_rows
    from smf_ds.sparse.stats import step_access
    u, table = p.updater, p.table
    pieces: dict[str, list[float]] = {}

    def tick(name, t0):
        t1 = time.perf_counter()
        pieces.setdefault(name, []).append(_ms(t0, t1))
        return t1

    for _ in range(a.steps):
        p.forward()
        t = time.perf_counter()
        p.out.backward(p.grad_out)
        p.out, p.w.grad = None, None
        t = tick("backward", t)
        rows, counts = step_access(table)
        t = tick("coalesce_reads", t)
        sel = select_rows(u.cfg.scoring, u.top_t[0], table, 0, rows, counts, u.background,
                          u.step_count, u.cfg.seed, u.cfg.kl_eps)
        t = tick("select_top_t", t)
        math.sqrt(float(table.sink.sgd_update(table.weight, sel, u.optimizer.lr, u.grad_divisor)))
        bench_common.sync(a.device)
        t = tick("grads_norm_update", t)
        u.n_ever_updated[0] += int((~u.ever_updated[0][sel.cpu()]).sum())
        u.ever_updated[0][sel.cpu()] = True
        u.window_counts[0].index_add_(0, rows.cpu(), counts.cpu())
        table.sink.clear()
        u.step_count += 1
        tick("bookkeeping", t)
    out = {k: statistics.median(v) for k, v in pieces.items()}
    out["unique_rows_read"] = int(rows.numel())
    return out


def torch_alloc_peak(fn) -> dict:
    """Run `fn` once under the profiler; tensor bytes from its CPU allocator events.

    peak: the most bytes allocated during `fn` alive at once (max running total minus the total
    before); total: all bytes allocated during `fn`. Reads the private event tree
    (kineto_results.experimental_event_tree): None where this torch lacks it.
    """
    events, error = bench_common.cpu_allocations(fn)
    if error:
        return {"alloc_peak_bytes": None, "alloc_total_bytes": None, "alloc_error": error}
    allocs = sorted((when, size, total) for when, size, _, total in events)
    if not allocs:
        return {"alloc_peak_bytes": 0, "alloc_total_bytes": 0}
    base = allocs[0][2] - allocs[0][1]
    return {"alloc_peak_bytes": max(t for _, _, t in allocs) - base,
            "alloc_total_bytes": sum(s for _, s, _ in allocs if s > 0)}


def measure_memory(cls, num_rows: int, a) -> dict:
    """On a GPU the "rss" fields are the CUDA allocator's bytes (bench_common.Memory)."""
    mem = bench_common.Memory(a.device)
    gc.collect()
    rss0 = mem.now()
    p = cls(num_rows, a)
    gc.collect()
    rss_built = mem.now()
    for _ in range(a.warmup):
        p.forward()
        p.step()
    gc.collect()
    rss_warm = mem.now()

    rss_pre_fwd = mem.reset_peak()
    p.forward()
    fwd_peak = mem.peak() - rss_pre_fwd
    gc.collect()
    rss_pre_step = mem.reset_peak()
    p.step()
    peak = mem.peak() - rss_pre_step
    rss_post = mem.now()
    gc.collect()
    p.forward()
    alloc = torch_alloc_peak(p.step)
    res = {"rss_peak_growth_bytes": peak, "rss_forward_growth_bytes": fwd_peak,
           "rss_forward_retained_bytes": rss_pre_step - rss_pre_fwd, "rss_step_retained_bytes": rss_post - rss_pre_step,
           "state_bytes_exact": p.state_bytes(), "state_bytes_rss": rss_warm - rss_built,
           "rss_built_bytes": rss_built - rss0, **alloc}
    del p
    gc.collect()
    return res


def worker(a) -> None:
    """--worker time: every path and size; --worker mem: one path, every size (smallest first)."""
    import torch
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {"num_threads": torch.get_num_threads(), "torch": torch.__version__,
           "loadavg_at_start": os.getloadavg()}
    if a.worker == "time":
        out["paths"] = time_all(a)
        out["checks"] = out["paths"].pop("checks", {})
    else:
        cls = PATHS[a.path]
        torch_alloc_peak(lambda: torch.ones(1))  # one-time profiler start-up
        p = cls(a.sizes[0], a)  # one-time library costs (first backward: ~50 MB of RSS), unmeasured
        for _ in range(2):
            p.forward()
            p.step()
        del p
        gc.collect()
        out["paths"] = {a.path: {str(n): measure_memory(cls, n, a) for n in a.sizes}}
    out["loadavg_at_end"] = os.getloadavg()
    print("RESULT " + json.dumps(out), flush=True)


# --- driver ----------------------------------------------------------------------------------

PASS_THROUGH = ("sizes", "dim", "tokens", "heads", "knn", "top_t", "steps", "warmup", "seed", "bg_batches",
                "lr_sgd", "lr_adamw", "paper_adamw", "hot_rows", "device", "paths", "threads")


def start_worker(a, kind: str, path: str | None = None) -> tuple[subprocess.Popen, str]:
    args = {k: getattr(a, k) for k in PASS_THROUGH}
    proc = bench_common.start_worker(__file__, [kind, *(["--path", path] if path else [])], args,
                                     memory_pass=kind == "mem", thp=a.thp)  # thp: both paths
    return proc, f"{kind} {path or ''}".strip()


def finish_worker(started: tuple[subprocess.Popen, str]) -> dict:
    proc, what = started
    return bench_common.finish_worker(proc, "bench_sparse_step", what)


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help=f"comma-separated table sizes in rows (default {','.join(map(str, FULL_SIZES))})")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per path and size (default 10, quick 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per path and size first (default 2, quick 1; >= 1: AdamW state)")
    ap.add_argument("--quick", action="store_true",
                    help=f"sizes {','.join(map(str, QUICK_SIZES))}, 512 tokens, 3 steps (smoke run, < 30 s)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    ap.add_argument("--out", help="results JSON (default bench_results/sparse_step.json; with --quick bench_results/sparse_step.quick.json, so a smoke run never replaces a full run's results)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per step (default 2048, quick 512)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--knn", type=int, default=32)
    ap.add_argument("--top-t", type=int, default=512)
    ap.add_argument("--bg-batches", type=int, default=1000, help="B of the synthetic background stats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hot-rows", type=int, default=0,
                    help="control: draw every read from a fixed set of this many rows (0: uniform over N)")
    ap.add_argument("--thp", action="store_true",
                    help="THP_MEM_ALLOC_ENABLE=1 in the workers: huge pages for large CPU tensors (both paths)")
    ap.add_argument("--lr-sgd", type=float, default=1.0, help="our SGD lr (the paper used 2 to 5)")
    ap.add_argument("--lr-adamw", type=float, default=1e-3)
    ap.add_argument("--paper-adamw", choices=["default", "foreach", "fused"], default="default",
                    help="the paper path's AdamW implementation (default: torch's default, on CPU the "
                         "per-tensor loop; fused is several times faster: about 4x at 1M in the README run)")
    ap.add_argument("--no-paper", action="store_true",
                    help="leave out the paper path (its dense gradient and AdamW state: 4x the table's memory)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (default: torch's)")
    ap.add_argument("--no-peer", action="store_true",
                    help="leave out the dense rules and FBGEMM (which runs only when the [peer] extra is installed)")
    bench_common.add_device_argument(ap)
    bench_common.add_worker_arguments(ap, ["time", "mem"])
    ap.add_argument("--path", choices=list(PATHS), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        bench_common.take_worker_settings(a)
        worker(a)
        return 0

    a.sizes = sorted(a.sizes or (QUICK_SIZES if a.quick else FULL_SIZES))
    a.tokens = a.tokens or (512 if a.quick else 2048)
    a.steps = a.steps or (3 if a.quick else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    if a.sizes[0] < max(a.top_t, a.knn):
        ap.error(f"--sizes: every size must be at least --top-t ({a.top_t}) and --knn ({a.knn}), got {a.sizes}")
    if a.steps < 1 or a.warmup < 1:
        ap.error("--steps and --warmup: at least 1 (the paper path's AdamW state is allocated in the first step)")
    bench_common.check_device(ap, a.device)
    sizes = a.sizes
    t_start = time.perf_counter()
    a.paths = ["ours"] + ([] if a.no_paper else ["paper"])
    peer_missing = "--no-peer" if a.no_peer else bench_common.fbgemm_missing(a.device)
    if not a.no_peer:
        a.paths += ["ours-dense", "ours-dense-all"] + ([] if peer_missing else ["fbgemm"])
    if peer_missing and not a.no_peer:
        print(f"[bench_sparse_step] FBGEMM left out ({peer_missing}); pip install -e '.[peer]' adds it",
              file=sys.stderr, flush=True)

    print(f"[bench_sparse_step] timing {', '.join(a.paths)}, N = {sizes} ...", file=sys.stderr, flush=True)
    timing = finish_worker(start_worker(a, "time"))
    mem = {}
    if not a.no_memory:  # two at a time: one process's RSS does not depend on the other's
        print(f"[bench_sparse_step] memory of {', '.join(a.paths)}, N = {sizes} ...", file=sys.stderr, flush=True)
        for i in range(0, len(a.paths), 2):
            started = {name: start_worker(a, "mem", name) for name in a.paths[i:i + 2]}
            mem.update({name: finish_worker(w)["paths"][name] for name, w in started.items()})

    rows = []
    for n in sizes:
        table_bytes = n * a.dim * 4
        row = {"num_rows": n, "table_bytes": table_bytes}
        if "paper" in a.paths:
            sel = {name: set(timing["paths"][name][str(n)].pop("selected")) for name in ("ours", "paper")}
            row["selection_agreement"] = len(sel["ours"] & sel["paper"]) / max(1, len(sel["ours"] | sel["paper"]))
        for name in a.paths:
            r = dict(timing["paths"][name][str(n)])
            if name in mem:
                r.update(mem[name][str(n)])
                for key in ("rss_peak_growth_bytes", "rss_forward_growth_bytes", "alloc_peak_bytes",
                            "state_bytes_exact", "state_bytes_rss"):
                    if r.get(key) is not None:
                        r[key.replace("_bytes", "_frac_of_table")] = r[key] / table_bytes
            row[name] = r
        if "fbgemm" in row:  # ours / FBGEMM on the same batch: ratio of medians, and of per-round pairs
            peer = row["fbgemm"]
            row["ours_over_fbgemm"] = {
                what: {"median": row[path][key + "_median"] / peer[key + "_median"],
                       "paired": statistics.median(x / y for x, y in zip(row[path][key + "_all"], peer[key + "_all"]))}
                for what, (path, key) in PEER_RATIOS.items()}
            if "rss_peak_growth_bytes" in peer:
                row["ours_over_fbgemm"]["peak_growth"] = {
                    path: row[path]["rss_peak_growth_bytes"] / max(1, peer["rss_peak_growth_bytes"])
                    for path in ("ours", "ours-dense", "ours-dense-all")}
            row["checks"] = timing["checks"].get(str(n), {})
        if "paper" in a.paths:
            row["speedup"] = row["paper"]["step_ms_median"] / row["ours"]["step_ms_median"]
            row["speedup_min"] = row["paper"]["step_ms_min"] / row["ours"]["step_ms_min"]
        rows.append(row)
    for row in rows:
        row["ours_ratio_to_smallest"] = row["ours"]["step_ms_median"] / rows[0]["ours"]["step_ms_median"]
        row["ours_min_ratio_to_smallest"] = row["ours"]["step_ms_min"] / rows[0]["ours"]["step_ms_min"]

    first, last = rows[0], rows[-1]
    small, large = fmt_n(first["num_rows"]), fmt_n(last["num_rows"])
    # The best ratio any implementation could reach here if all but reading the rows were flat.
    floor_small, floor_large = first["ours"]["row_read_floor_ms"], last["ours"]["row_read_floor_ms"]
    ratio_at_floor = floor_ratio(first["ours"]["step_ms_median"], floor_small, floor_large)
    goals = [
        {"goal": f"ours flat in N: step {large}/{small} <= {GOAL_FLAT_RATIO}",
         "value": last["ours_ratio_to_smallest"], "value_min": last["ours_min_ratio_to_smallest"],
         "target": GOAL_FLAT_RATIO, "pass": last["ours_ratio_to_smallest"] <= GOAL_FLAT_RATIO,
         "row_read_floor_ratio": ratio_at_floor},
    ]
    if "paper" in a.paths:
        goals.append({"goal": f"ours >= {GOAL_SPEEDUP:g}x faster than paper at N={large}",
                      "value": last["speedup"], "value_min": last["speedup_min"],
                      "target": GOAL_SPEEDUP, "pass": last["speedup"] >= GOAL_SPEEDUP})
    if not a.no_memory:
        frac = last["ours"]["rss_peak_growth_frac_of_table"]
        goals.append({"goal": f"ours peak growth during the step < {100 * GOAL_PEAK_FRAC:g}% of the table at N={large}",
                      "value": frac, "value_alloc": last["ours"].get("alloc_peak_frac_of_table"),
                      "target": GOAL_PEAK_FRAC, "pass": frac < GOAL_PEAK_FRAC})
    if (sizes[0], sizes[-1]) != (FULL_SIZES[0], FULL_SIZES[-1]) or a.tokens != 2048:
        for g in goals:
            g["note"] = "the goals are stated for N = 16k .. 1M and 2,048 tokens; this run differs"

    threads = timing["num_threads"]
    print()
    print(f"Sparse memory-value step, d={a.dim}, {a.tokens} tokens x {a.heads} heads x knn {a.knn}, top-t "
          f"{a.top_t}, tfidf, fp32, {threads} threads, reads "
          f"{'from a fixed set of %d rows' % a.hot_rows if a.hot_rows else 'uniform over N'}"
          f"{', THP on' if a.thp else ''}; step = backward + selection + optimizer "
          f"(ours: SGD on the top-t rows; paper: dense grad, row-mask hook, AdamW ({a.paper_adamw}) on the table); "
          f"median (min) of {a.steps} interleaved steps; peak growth = RSS high-water mark during the "
          f"step - RSS before it")
    print()
    if "paper" in a.paths:  # --no-paper: only the peer table
        print("| N | ours ms | paper ms | speedup | ours N/16k ratio | ours peak growth (% of table) "
              "| paper peak growth (% of table) |".replace("16k", small))
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            o, p = row["ours"], row["paper"]
            print(f"| {fmt_n(row['num_rows'])} | {o['step_ms_median']:.1f} ({o['step_ms_min']:.1f}) "
                  f"| {p['step_ms_median']:.1f} ({p['step_ms_min']:.1f}) | {row['speedup']:.1f}x "
                  f"| {row['ours_ratio_to_smallest']:.2f} ({row['ours_min_ratio_to_smallest']:.2f}) "
                  f"| {fmt_pct(o.get('rss_peak_growth_frac_of_table'))} "
                  f"| {fmt_pct(p.get('rss_peak_growth_frac_of_table'))} |")
        print()
        print("| N | table | unique rows read | fwd ms ours / paper | fwd growth ours / paper "
              "| step tensor alloc peak ours / paper | state ours / paper (AdamW) "
              "| rows changed ours / paper | same selection |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            o, p = row["ours"], row["paper"]
            if "state_bytes_exact" in o:
                mem_cols = (f"| {fmt_bytes(o['rss_forward_growth_bytes'])} / {fmt_bytes(p['rss_forward_growth_bytes'])} "
                            f"| {fmt_bytes(o['alloc_peak_bytes'])} / {fmt_bytes(p['alloc_peak_bytes'])} "
                            f"| {fmt_bytes(o['state_bytes_exact'])} / {fmt_bytes(p['state_bytes_exact'])} ")
            else:
                mem_cols = "| n/a | n/a | n/a "
            print(f"| {fmt_n(row['num_rows'])} | {fmt_bytes(row['table_bytes'])} "
                  f"| {o['breakdown_ms']['unique_rows_read']:,} "
                  f"| {o['forward_ms_median']:.1f} / {p['forward_ms_median']:.1f} {mem_cols}"
                  f"| {o['rows_changed_per_step']:,} / {p['rows_changed_per_step']:,} "
                  f"| {100 * row['selection_agreement']:.0f}% |")
        print()
    keys = [k for k in first["ours"]["breakdown_ms"] if k != "unique_rows_read"]
    print("Ours, pieces of the step (ms, median):")
    print()
    print("| N | " + " | ".join(keys) + " |")
    print("|---:|" + "---:|" * len(keys))
    for row in rows:
        b = row["ours"]["breakdown_ms"]
        print(f"| {fmt_n(row['num_rows'])} | " + " | ".join(f"{b[k]:.1f}" for k in keys) + " |")

    peer_rows = [row for row in rows if "ours_over_fbgemm" in row]
    if peer_rows:
        print()
        print("Ours / FBGEMM TBE (fused EXACT_SGD) on the same batch and table, ratio of medians (median of "
              "per-round ratios); < 1: ours faster. dense-accessed = SGD on every row read, FBGEMM's work; "
              "top-t = SMF's step; peak = RSS peak growth during the step:")
        print()
        print("| N | forward | dense-accessed step | dense-all step | top-t step | peak ours top-t / dense-accessed "
              "/ dense-all / FBGEMM | tables agree (max abs diff) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for row in peer_rows:
            r = row["ours_over_fbgemm"]
            peak = (f"{fmt_bytes(row['ours'].get('rss_peak_growth_bytes'))} / "
                    f"{fmt_bytes(row['ours-dense'].get('rss_peak_growth_bytes'))} / "
                    f"{fmt_bytes(row['ours-dense-all'].get('rss_peak_growth_bytes'))} / "
                    f"{fmt_bytes(row['fbgemm'].get('rss_peak_growth_bytes'))}")
            cells = " | ".join(f"{r[k]['median']:.2f}x ({r[k]['paired']:.2f}x)" for k in PEER_RATIOS)
            diff = row["checks"].get("ours_dense_vs_fbgemm_table_max_abs_diff")
            print(f"| {fmt_n(row['num_rows'])} | {cells} | {peak} | {'n/a' if diff is None else f'{diff:.1e}'} |")
        for row in peer_rows:
            r = row["ours_over_fbgemm"]
            checks = [("forward", r["forward"]["median"], GOAL_PEER_FORWARD),
                      ("dense-accessed step", r["dense_accessed_step"]["median"], GOAL_PEER_DENSE),
                      ("dense-all step", r["dense_all_step"]["median"], GOAL_PEER_DENSE),
                      ("top-t step", r["top_t_step"]["median"], GOAL_PEER_TOP_T)]
            if "peak_growth" in r:
                checks += [("dense-accessed peak growth", r["peak_growth"]["ours-dense"], GOAL_PEER_PEAK),
                           ("dense-all peak growth", r["peak_growth"]["ours-dense-all"], GOAL_PEER_PEAK)]
            for what, value, target in checks:
                goals.append({"goal": f"ours / FBGEMM {what} <= {target:g} at N={fmt_n(row['num_rows'])}",
                              "value": value, "target": target, "pass": value <= target})

    print(f"\nFloor: reading once each row the step touches (sorted, into a ready buffer) takes "
          f"{floor_small:.1f} ms at {small} and {floor_large:.1f} ms at {large}. Were everything else flat, "
          f"the step's {large}/{small} ratio would still be {ratio_at_floor:.2f}.")

    busy = max(row[name]["others_cpu_busy"] for row in rows for name in a.paths)
    print(f"\nOther processes' share of the CPUs during the timed steps: at most {100 * busy:.0f}%"
          + (" -- WARNING: the machine was shared; timings are inflated and noisy, rerun when idle"
             if busy > BUSY_WARN else ""))
    print()
    for g in goals:
        if g["goal"].startswith("ours / FBGEMM"):
            val = f"{g['value']:.2f}"
        elif "peak" in g["goal"]:
            val = f"{100 * g['value']:.1f}% (tensor alloc peak {fmt_pct(g.get('value_alloc'))})"
        else:
            val = f"{g['value']:.2f} (min {g['value_min']:.2f})"
        print(f"{'PASS' if g['pass'] else 'MISS'}  {g['goal']}: {val}" + (f"  ({g['note']})" if "note" in g else ""))

    result = {
        "benchmark": "bench_sparse_step",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "config": {"sizes": sizes, "dim": a.dim, "tokens": a.tokens, "heads": a.heads, "knn": a.knn,
                   "top_t": a.top_t, "scoring": "tfidf", "bg_batches": a.bg_batches, "steps": a.steps,
                   "warmup": a.warmup, "seed": a.seed, "dtype": "float32", "hot_rows": a.hot_rows,
                   "device": a.device, "paths": a.paths, "fbgemm_missing": peer_missing,
                   "fbgemm": f"fbgemm_gpu SplitTableBatchedEmbeddingBagsCodegen, pooling SUM, per-sample weights, "
                             f"EXACT_SGD lr={a.lr_sgd} fused into the backward (every row read updated)",
                   "thp": a.thp,
                   "ours": f"LocalValueTable + SparseMemoryUpdater, SparseRowOptimizer sgd lr={a.lr_sgd}",
                   "paper": f"nn.Parameter + F.embedding_bag, row-mask grad hook (bincount over N, topk), "
                            f"torch.optim.AdamW lr={a.lr_adamw} weight_decay=0.01 implementation={a.paper_adamw}"},
        "method": {"step": "backward + selection + optimizer step (+ zero_grad for paper); forward timed apart",
                   "timing": "one fresh subprocess, every (path, size) built and warmed up first, timed steps "
                             "interleaved over cases; median / min wall time (time.perf_counter)",
                   "contention": "others_cpu_busy: other processes' share of all CPU time during a case's "
                                 "timed steps (/proc/stat busy minus this process's utime+stime)",
                   "memory": f"fresh subprocess per path, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; per size after "
                             "warm-up and forward: VmHWM reset via /proc/self/clear_refs, rss_peak_growth = "
                             "VmHWM after step - VmRSS before step; alloc_peak: torch profiler allocator events "
                             "of one more step (peak of step-allocated tensor bytes alive at once)"},
        "machine": machine(threads=threads, torch=timing["torch"]),
        "others_cpu_busy_max": busy,
        "results": rows,
        "goals": goals,
    }
    return bench_common.finish(result, a.out, f"sparse_step{'.quick' if a.quick else ''}.json", t_start)


if __name__ == "__main__":
    sys.exit(main())
