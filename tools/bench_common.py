"""What the benchmarks share: each measurement in a fresh worker process of the same script, the
kernel's view of this process's memory, and how sizes are printed.

A worker gets its settings as JSON on the command line and prints one line "RESULT <json>".
For memory passes glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_), so that every
tensor larger than it is mmapped and freed at once and RSS follows the tensors.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

MMAP_THRESHOLD = 65536


def start_worker(script: str, worker_argv: list[str], settings: dict, memory_pass: bool,
                 thp: bool) -> subprocess.Popen:
    """`python SCRIPT --worker ... --worker-args SETTINGS` with the repository importable; `thp`:
    PyTorch's own switch for 2 MiB-aligned CPU allocations with madvise(MADV_HUGEPAGE)."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", *worker_argv, "--worker-args", json.dumps(settings)]
    env = dict(os.environ)
    if memory_pass:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    if thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_worker(proc: subprocess.Popen, tool: str, what: str):
    """The worker's RESULT; its output and an exit naming TOOL and WHAT if it failed."""
    stdout, stderr = proc.communicate()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(stdout + stderr)
        raise SystemExit(f"{tool}: the {what} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def proc_status(key: str) -> int:
    """Bytes of a /proc/self/status field (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_hwm() -> None:
    """VmHWM back to the current RSS, so that the next peak is the next step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def fmt_bytes(x) -> str:
    if x is None:
        return "n/a"
    if x < 2**10:
        return f"{x:.0f} B"
    if x < 2**20:
        return f"{x / 2**10:.1f} KiB"
    return f"{x / 2**20:.1f} MiB"


def fmt_n(n: int) -> str:
    return f"{n // 1024}k" if n < 2**20 else f"{n / 2**20:g}M"


def machine(**extra) -> dict:
    """The facts a reader needs to compare two result files."""
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(), **extra}


def write_results(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}  ({result['wall_s']:.1f} s)")


def finish(result: dict, out: str | None, default_name: str, started: float) -> int:
    """Stamp the run's wall time (since `started`, perf_counter) on `result` and write it to `out`,
    or to bench_results/<default_name>; the tool's exit status."""
    import time

    result["wall_s"] = time.perf_counter() - started
    write_results(result, Path(out or f"bench_results/{default_name}"))
    return 0


def add_worker_arguments(ap, kinds: list[str]) -> None:
    """The hidden flags a worker is started with (start_worker)."""
    import argparse

    ap.add_argument("--worker", choices=kinds, help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", help=argparse.SUPPRESS)


def take_worker_settings(a) -> None:
    """In a worker: the parent's settings replace the parsed defaults."""
    for k, v in json.loads(a.worker_args).items():
        setattr(a, k, v)


# --- the device, and FBGEMM as the peer ------------------------------------------------------

def add_device_argument(ap) -> None:
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where tables and inputs live (cuda: timings synchronize the GPU, memory is the CUDA "
                         "allocator's peak instead of RSS); value tables stay fp32 on both, by design")


def check_device(ap, device: str) -> None:
    """--device cuda needs a GPU that torch sees."""
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")


def sync(device: str) -> None:
    """Wait for the device's queued work, so that wall time covers it."""
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


class Memory:
    """The process's memory as a benchmark step sees it: RSS (kernel view, with MALLOC_MMAP_THRESHOLD_
    pinned by start_worker) on the CPU; the CUDA caching allocator's allocated bytes on a GPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def now(self) -> int:
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return proc_status("VmRSS")

    def reset_peak(self) -> int:
        """Start a new peak; returns the bytes in use now."""
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_hwm()
        return self.now()

    def peak(self) -> int:
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return proc_status("VmHWM")


def fbgemm_missing(device: str = "cpu") -> str | None:
    """None when FBGEMM's table-batched embedding runs on `device` here; else why not (the error)."""
    try:
        import torch
        weight = torch.ones(4, 8, device=device)
        tbe = fbgemm_sgd_table(weight, 0.1, device)
        out = tbe(torch.tensor([0, 3], device=device), torch.tensor([0, 1, 2], device=device))
        out.sum().backward()
        return None
    except Exception as err:  # noqa: BLE001 - import errors, missing CUDA kernels: all mean "no peer"
        return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def fbgemm_sgd_table(weight, lr: float, device: str = "cpu"):
    """FBGEMM's SplitTableBatchedEmbeddingBagsCodegen holding a copy of `weight` (one table, pooling
    SUM), with its optimizer fused into the backward: EXACT_SGD at `lr`, which updates every row read."""
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                        SplitTableBatchedEmbeddingBagsCodegen)
    where = (EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if device == "cuda" else \
        (EmbeddingLocation.HOST, ComputeDevice.CPU)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(weight.shape[0], weight.shape[1], *where)], optimizer=EmbOptimType.EXACT_SGD, learning_rate=lr,
        pooling_mode=PoolingMode.SUM, device=torch.device(device))
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(weight)
    return tbe


def distinct_rows(num_rows: int, tokens: int, heads: int, knn: int, generator, pool=None):
    """(tokens, heads*knn) row ids: per token and head, knn distinct rows drawn uniformly (from
    `pool`, a tensor of row ids, when given)."""
    import torch
    if pool is not None:
        return pool[distinct_rows(pool.numel(), tokens, heads, knn, generator)]
    pos = torch.randint(0, num_rows, (tokens, heads, knn), generator=generator)
    while True:  # redraw duplicates within a (token, head) until none are left
        sorted_pos, order = pos.sort(dim=-1)
        dup_sorted = sorted_pos[..., 1:] == sorted_pos[..., :-1]
        if not bool(dup_sorted.any()):
            break
        dup = torch.zeros_like(pos, dtype=torch.bool)
        dup.scatter_(-1, order[..., 1:], dup_sorted)
        pos[dup] = torch.randint(0, num_rows, (int(dup.sum()),), generator=generator)
    return pos.reshape(tokens, heads * knn)


def cpu_allocations(fn) -> tuple[list[tuple[int, int, int, int]], str | None]:
    """Run `fn` once under the profiler: its CPU allocator events in time order, as (time ns, size,
    address, bytes allocated after it; a free has a negative size), and None; or [] and the error
    where this torch lacks the private event tree (kineto_results.experimental_event_tree)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        stack, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
        while stack:
            node = stack.pop()
            ef = node.extra_fields
            if type(ef).__name__ == "_ExtraFields_Allocation" and str(ef.device) == "cpu":
                events.append((node.start_time_ns, ef.alloc_size, ef.ptr, ef.total_allocated))
            stack.extend(node.children)
    except AttributeError as err:  # private API moved
        return [], repr(err)
    return sorted(events, key=lambda event: event[0]), None
