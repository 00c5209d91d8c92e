"""`smf-ds experiment --jobs N`: the runs side by side in worker processes, with the results of one at a time."""
import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from smf_ds.config import ConfigError
from smf_ds.experiment import grid

pytestmark = pytest.mark.e2e  # it starts worker processes

VARIANTS, SEEDS = ["smf-tfidf", "lora"], [0, 1]  # memory and LoRA: each initialises what it adds from its seed


def _evaluations(out):
    """{eval dir: {task: its results}} of the base and every run, less timings and paths into `out`."""
    return {str(path.parent.relative_to(out)): {
        task: {k: v for k, v in result.items() if k not in ("seconds", "source", "predictions", "malformed_report")}
        for task, result in json.loads(path.read_text())["tasks"].items()} for path in sorted(out.glob("**/summary.json"))}


def test_runs_in_workers_equal_the_runs_one_at_a_time_and_a_failed_one_is_named(tmp_path):
    side_by_side, one_at_a_time = tmp_path / "jobs2", tmp_path / "jobs1"
    blocked = grid.run_dir(side_by_side, "lora", 1)
    blocked.parent.mkdir(parents=True)
    blocked.write_text("")  # a file where the run dir goes: that run fails in its worker
    with pytest.raises(RuntimeError, match=r"^lora seed 1: .*run the same command again to continue"):
        grid.run_experiment(side_by_side, VARIANTS, SEEDS, quick=True, bases="shared", jobs=2)
    finished = {f"{v}/seed{s}": grid.run_dir(side_by_side, v, s) / "eval" / "summary.json"
                for v, s in (("smf-tfidf", 0), ("smf-tfidf", 1), ("lora", 0))}
    assert all(path.is_file() for path in finished.values())  # the runs finished beside it stay
    stamps = {name: path.stat().st_mtime_ns for name, path in finished.items()}

    blocked.unlink()
    parallel = grid.run_experiment(side_by_side, VARIANTS, SEEDS, quick=True, bases="shared", jobs=2)
    assert {name: path.stat().st_mtime_ns for name, path in finished.items()} == stamps  # kept, not redone
    serial = grid.run_experiment(one_at_a_time, VARIANTS, SEEDS, quick=True, bases="shared")

    # The same numbers, exactly: every run seeds itself (torch.manual_seed(train.seed), the memory's
    # and the data order's own generators) and each worker computes with one thread, as this process.
    evaluations, n_evals = _evaluations(one_at_a_time), 1 + len(VARIANTS) * len(SEEDS)  # the base's and each run's
    assert len(evaluations) == 2 * n_evals  # each with its memorised windows
    assert _evaluations(side_by_side) == evaluations
    predictions = sorted(p.relative_to(one_at_a_time) for p in one_at_a_time.glob("**/*.predictions.jsonl"))
    assert len(predictions) == 4 * n_evals  # the 3 tasks and the memorised windows, per example, byte for byte
    assert all((side_by_side / p).read_bytes() == (one_at_a_time / p).read_bytes() for p in predictions)
    weights = sorted(p.relative_to(one_at_a_time) for p in one_at_a_time.glob("runs/*/seed*/*_adapter/*.safetensors"))
    assert len(weights) == len(VARIANTS) * len(SEEDS)
    for path in weights:  # tensor for tensor (the files' headers may list them in another order)
        trained, expected = load_file(side_by_side / path), load_file(one_at_a_time / path)
        assert trained.keys() == expected.keys() and all(torch.equal(trained[k], expected[k]) for k in expected), path
    assert parallel == serial
    assert json.loads((side_by_side / "results.json").read_text()) == json.loads(
        (one_at_a_time / "results.json").read_text())


def test_jobs_is_refused_where_it_cannot_apply(tmp_path, monkeypatch):
    for jobs in (0, -2):
        with pytest.raises(ConfigError, match=rf"--jobs: expected a number of worker processes, 1 or more, got {jobs}"):
            grid.run_experiment(tmp_path / "a", quick=True, jobs=jobs)
    with pytest.raises(ConfigError, match=r"--jobs 2: .*not with --config"):
        grid.run_experiment(tmp_path / "b", config="exp.yaml", jobs=2)
    monkeypatch.setattr(grid, "init_process_group", lambda: None)
    monkeypatch.setattr(grid, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"--jobs 2: under a launcher every run already spans its 2 processes"):
        grid.run_experiment(tmp_path / "c", quick=True, jobs=2)
    assert not any(tmp_path.iterdir())


def test_a_stopped_grid_exits_with_the_stopped_exit_code(tmp_path, monkeypatch):
    """`smf-ds experiment` stopped by a signal exits 75, so that launch/slurm.sbatch requeues it."""
    from launchers import smf_ds_cli
    from smf_ds.train import stop

    def stopped(*args, **kwargs):
        raise stop.Stopped("stopped on SIGTERM: no further run started; run the same command again to continue")

    monkeypatch.setattr(grid, "run_experiment", stopped)
    done = smf_ds_cli("experiment", "--quick", "--jobs", "2", "--out", tmp_path / "exp", check=False)
    assert done.returncode == stop.STOPPED_EXIT_CODE, done.stderr[-3000:]
    assert "smf-ds experiment: stopped on SIGTERM" in done.stderr


def _stopped_run(setup):
    from smf_ds.train.stop import RunStopped

    raise RunStopped(7, "SIGTERM", "runs/x/checkpoints/step7")


def test_a_run_stopped_in_a_worker_reaches_the_parent_as_a_stop():
    """RunStopped does not pickle (three arguments): the worker sends it back as a Stopped, which the
    parent turns into the stopped exit code instead of a failure."""
    import pickle

    from smf_ds.train.stop import Stopped

    with pytest.raises(Stopped, match="stopped on SIGTERM at step 7") as caught:
        grid._in_worker(_stopped_run)
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)


class _SetupStoppedInItsWorker:
    """A base job that stops as a run stopped by a signal does, in the worker."""

    def base(self, seed):
        from smf_ds.train.stop import RunStopped

        raise RunStopped(3, "SIGUSR1", "runs/x/checkpoints/step3")


class _SetupEndedWithItsParent:
    """A scheduler signals the parent and its workers at once: the worker's job dies of it."""

    def base(self, seed):
        os.kill(os.getppid(), signal.SIGUSR1)
        time.sleep(1.0)  # the parent has noted it before the job's end reaches it
        raise RuntimeError("ended by the scheduler's signal")


def test_a_stop_that_reaches_the_workers_ends_the_grid_as_a_stop(tmp_path):
    """A run stopped in its worker, or a worker's job ended by the signal that stops the parent, makes
    the grid a stop (exit 75, requeued), not a failure; and no run starts after it."""
    from smf_ds.train import stop

    with pytest.raises(stop.Stopped, match=r"^seed 0's base model: stopped on SIGUSR1 at step 3.*no further run started"):
        grid._run_in_workers(tmp_path, _SetupStoppedInItsWorker(), {0: tmp_path / "base0"}, ["lora"], [0], jobs=1)
    stop.listen(["SIGUSR1"])
    try:
        assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL  # else the signal would end this test process
        with pytest.raises(stop.Stopped, match=r"^stopped on SIGUSR1: no further run started"):
            grid._run_in_workers(tmp_path, _SetupEndedWithItsParent(), {0: tmp_path / "base0"}, ["lora"], [0], jobs=1)
    finally:
        stop.stop_listening()
    assert not grid.run_dir(tmp_path, "lora", 0).exists()
