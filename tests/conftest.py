"""Test tiers: `make test-fast` runs everything not marked `dist` (spawned process groups) or `e2e`
(a CLI, tool, launcher or other program in a subprocess); `make test` runs all. An unmarked test
that starts a process fails and says which marker it needs, so the fast tier stays fast.
With SMF_NO_SKIPS=1 (`make test`, CI) a skipped test fails: nothing goes untested unnoticed."""
import multiprocessing.util
import os
import subprocess
import sys

import pytest

# Tests import the `distributed` helper module from this folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread in every process a test starts too: on 2 cores running two tests at once, more threads
# only spin-wait against each other (measured: 16% off the wall time of the e2e tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Session fixtures live here, so that they are built once per test session, not once per module
# that imports them (a tiny saved model and data files in the hub schemas: tests/fixtures_eval.py).
from fixtures_eval import eval_world, tiny_lm  # noqa: E402,F401

# Tiny matmuls: one thread is much faster than two fighting over a busy 2-core machine, and
# distributed tests start several processes anyway.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Variables a test sets in this process (or smf-ds code it runs without leaving its group of one,
    which exports RANK=0, WORLD_SIZE=1, MASTER_PORT) must not reach the processes later tests start."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _processes_need_a_tier(request, monkeypatch):
    if request.node.get_closest_marker("dist") or request.node.get_closest_marker("e2e"):
        yield
        return

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.dist (a process group) "
                           f"or @pytest.mark.e2e (a CLI, tool or other program) so that make test-fast leaves it out")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", refuse)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("SMF_NO_SKIPS") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but SMF_NO_SKIPS=1 (make test) runs everything: {reason}"
