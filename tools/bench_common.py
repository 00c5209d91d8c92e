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


def add_worker_arguments(ap, kinds: list[str]) -> None:
    """The hidden flags a worker is started with (start_worker)."""
    import argparse

    ap.add_argument("--worker", choices=kinds, help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", help=argparse.SUPPRESS)


def take_worker_settings(a) -> None:
    """In a worker: the parent's settings replace the parsed defaults."""
    for k, v in json.loads(a.worker_args).items():
        setattr(a, k, v)
