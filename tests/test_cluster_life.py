"""Cluster life under a real launcher (launch/deepspeed.sh, 2 CPU processes): a stop signal saves
and exits 75, `--resume auto` continues bitwise; a rank killed or stopped ends the job, named."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launchers import CLUSTER, launcher_missing, shared_tmp
from smf_ds.train.stop import STOPPED_EXIT_CODE

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
TOTAL_STEPS, SAVE_EVERY = 30, 4
STEPS = [f"train.steps={TOTAL_STEPS}", f"train.save_every={SAVE_EVERY}"]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """check_launcher's tiny world (SMF, tfidf, row-sharded tables), its background stats and a
    straight 2-process run of STEPS, built once for every test worker: (config, stats, straight)."""
    sys.path.insert(0, str(REPO / "tools"))
    from check_launcher import build_world, locked

    from smf_ds.train.rundir import run_finished

    root = shared_tmp(tmp_path_factory, "cluster_world")
    config, stats, straight = root / "world" / "run.yaml", root / "stats" / "background.safetensors", root / "straight"
    with locked(root):
        if not config.is_file():
            build_world(root / "world")
        if not stats.is_file():
            done = _launch(2, "background", config, root / "stats", wait=True)
            assert done.returncode == 0, done.stderr[-3000:]
        if not run_finished(straight / "train_summary.json"):
            shutil.rmtree(straight, ignore_errors=True)  # a worker's run cut short: trained afresh
            done = _launch(2, "train", config, straight, *_train_argv(stats), wait=True)
            assert done.returncode == 0, done.stderr[-3000:]
    return config, stats, straight


def _log(path: Path) -> str:
    """A job log: the ranks' and the batch script's writes land in one file, and one can cut into
    another's multi-byte character (a progress bar's block), so it is read forgivingly."""
    return path.read_text(errors="replace")


def _launch(nproc, command, config, out_dir, *extra, wait=False, log=None):
    argv = [str(REPO / "launch" / "deepspeed.sh"), str(nproc), command, "--config", str(config),
            f"out_dir={out_dir}", *extra]
    from smf_ds.parallel.process_group import free_port

    env = dict(ENV, MASTER_PORT=str(free_port()))  # not deepspeed's 29500, which another job may hold
    if wait:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _train_argv(stats):
    return [f"sparse.background={stats}", *STEPS]


def _wait_for_checkpoint(run: Path, proc, seconds=300):
    def written():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before its first checkpoint"
        return (run / "checkpoints" / "latest_memory").is_file()

    _wait_for(written, seconds, "the first checkpoint")


def _signal_after_first_checkpoint(run: Path, ranks, send, signum: int, seconds: float = 300) -> None:
    """Freeze the ranks (SIGSTOP) the moment the first checkpoint appears, `send()` the stop signal,
    wait until it is pending on a rank, and let them go on: it then lands before the run can finish,
    however loaded the machine (the run has only a second left)."""
    pids = _wait_for(lambda: (found := ranks()) and len(found) == 2 and found, seconds, "the two ranks to start")
    checkpoint = run / "checkpoints" / "latest_memory"
    _wait_for(lambda: checkpoint.is_file() or not all(map(_alive, pids)), seconds, "the first checkpoint", poll=0.002)
    assert checkpoint.is_file(), "a rank ended before the first checkpoint"
    stopped = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        send()
        _wait_for(lambda: any(_pending(pid) & 1 << (signum - 1) for pid in pids), 60, "the signal to reach a rank")
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _wait_for(check, seconds: float, what: str, poll: float = 0.2):
    deadline = time.time() + seconds
    while not (result := check()):
        assert time.time() < deadline, f"waited {seconds} s for {what}"
        time.sleep(poll)
    return result


def _pending(pid: int) -> int:
    """The signals pending on a process (/proc status ShdPnd | SigPnd), as a mask: bit n-1 is signal n."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)


def _ranks(proc, alive=False) -> list[int]:
    """The smf-ds rank processes under a launch script (launch/common.sh's rank_pids); `alive`: the
    script must still run."""
    assert not alive or proc.poll() is None, f"the launch script ended ({proc.returncode})"
    out = subprocess.run(["bash", "-c", f"source {REPO}/launch/common.sh 2 x >/dev/null; rank_pids {proc.pid}"],
                         capture_output=True, text=True, check=True).stdout.split()
    return [int(p) for p in out]


def _losses(run: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def _adapter(run: Path) -> dict:
    return load_file(str(run / "memory_adapter" / "memory_adapter.safetensors"))


def test_a_stop_signal_saves_and_resume_auto_continues_exactly(world, tmp_path):
    """SIGTERM to the launch script, and SIGUSR1 to rank 1 alone: every rank stops at the same step
    boundary, saves, and exits 75 with a summary saying so; the same command with --resume auto
    then finishes the run bitwise equal to an uninterrupted one (adapter and every step's loss)."""
    config, stats, straight = world
    reference = _adapter(straight)

    for name, how in (("term_script", "script"), ("usr1_rank1", "rank1")):
        run = tmp_path / name
        with open(tmp_path / f"{name}.log", "w") as log:
            proc = _launch(2, "train", config, run, *_train_argv(stats), "--resume", "auto", log=log)
            try:
                if how == "script":
                    send, signum = (lambda: proc.send_signal(signal.SIGTERM)), signal.SIGTERM
                else:
                    send, signum = (lambda: os.kill(_ranks(proc)[1], signal.SIGUSR1)), signal.SIGUSR1
                _signal_after_first_checkpoint(run, lambda: _ranks(proc, alive=True), send, signum)
                assert proc.wait(timeout=300) == STOPPED_EXIT_CODE, _log(tmp_path / f"{name}.log")[-3000:]
            finally:
                if proc.poll() is None:  # a failed check leaves no launcher or rank behind
                    os.killpg(proc.pid, signal.SIGKILL)
            stopped = time.time()  # nothing of the run is left: no orphaned launcher or rank
            while subprocess.run(["pgrep", "-f", f"out_dir={run}"], capture_output=True).returncode == 0:
                assert time.time() - stopped < 10, "a process of the stopped run is still alive"
                time.sleep(0.2)
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["finished"] is False
        (stopped,) = summary["interruptions"]
        assert stopped["signal"] == ("SIGTERM" if how == "script" else "SIGUSR1") and SAVE_EVERY <= stopped["step"] < TOTAL_STEPS
        checkpoints = run / "checkpoints"
        assert (checkpoints / "latest_memory").read_text() == f"step{stopped['step']:07d}"
        assert (checkpoints / f"step{stopped['step']:07d}" / "run.json").is_file()
        assert not (run / "memory_adapter").exists()

        resumed = _launch(2, "train", config, run, *_train_argv(stats), "--resume", "auto", wait=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        adapter = _adapter(run)
        assert adapter.keys() == reference.keys() and all(torch.equal(adapter[k], reference[k]) for k in adapter)
        assert _losses(run) == _losses(straight)
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["finished"] and summary["resumed_at_step"] == stopped["step"]
        assert summary["interruptions"] == [stopped]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_lost_rank_ends_the_job_naming_it(world, tmp_path, how):
    """kill -9, or SIGSTOP, of rank 1 of 2: rank 0 exits within the collective timeout naming rank
    1, the launcher exits non-zero, and the checkpoint marked latest is a complete one."""
    config, stats, _ = world
    run, timeout = tmp_path / "run", 8
    with open(tmp_path / "log", "w") as log:
        proc = _launch(2, "train", config, run, f"sparse.background={stats}", "train.steps=100000",
                       "train.save_every=25", f"cluster.collective_timeout={timeout}", log=log)
        try:
            _wait_for_checkpoint(run, proc)
            rank0, rank1 = _ranks(proc)
            os.kill(rank1, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            lost_at = time.time()
            while _alive(rank0):
                assert time.time() - lost_at < timeout + 15, "rank 0 still runs past the collective timeout"
                time.sleep(0.2)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(rank1, sig)
                except (ProcessLookupError, NameError, UnboundLocalError):
                    pass
    output = _log(tmp_path / "log")
    assert code != 0
    assert f"lost rank 1 (pid {rank1} on " in output, output[-3000:]
    assert ("exited" if how == "kill" else "stopped (SIGSTOP)") in output
    latest = (run / "checkpoints" / "latest_memory").read_text()
    assert (run / "checkpoints" / latest / "run.json").is_file()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _slurm_job(job: str) -> dict:
    fields = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout.split()
    return dict(f.split("=", 1) for f in fields if "=" in f)


def _wait_for_state(job: str, states: tuple[str, ...], seconds: float) -> dict:
    return _wait_for(lambda: (info := _slurm_job(job))["JobState"] in states and info, seconds,
                     f"job {job} to be {' or '.join(states)}", poll=0.5)


@CLUSTER
def test_a_slurm_job_stopped_before_its_time_limit_requeues_itself_and_finishes(world, tmp_path):
    """launch/slurm.sbatch on the one-node test cluster: the batch script's time-limit signal
    (sent early here: scancel --signal=USR1 --batch) makes the ranks save and exit 75, the script
    requeues the job, and its second allocation continues with the same command line (--resume
    auto) to the same result as an uninterrupted 2-process run (the world's straight run, through
    launch/deepspeed.sh: the same ranks, batches and reductions); one log holds both allocations."""
    missing = launcher_missing("slurm")
    assert missing is None, missing
    config, stats, straight = world

    run = tmp_path / "requeued"
    argv = ["sbatch", "--parsable", "--ntasks-per-node=2", f"--output={run}.log", f"--chdir={REPO}",
            str(REPO / "launch" / "slurm.sbatch"), "train", "--config", str(config), f"out_dir={run}",
            *_train_argv(stats), "--resume", "auto"]
    job = subprocess.run(argv, env=ENV, capture_output=True, text=True, check=True).stdout.strip()

    def ranks():
        assert _slurm_job(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING")
        found = subprocess.run(["pgrep", "-f", rf"^\S*python\S* -m smf_ds.cli .*out_dir={run} "], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    try:
        _signal_after_first_checkpoint(run, ranks, lambda: subprocess.run(["scancel", "--signal=USR1", "--batch", job],
                                                                          check=True), signal.SIGUSR1)
        deadline = time.time() + 300  # the requeue takes effect as the allocation ends (COMPLETING, REQUEUED...)
        while (requeued := _slurm_job(job))["Restarts"] != "1" or requeued["JobState"] != "PENDING":
            assert requeued["JobState"] not in ("FAILED", "CANCELLED", "COMPLETED") and time.time() < deadline, requeued
            time.sleep(0.5)
        # Sooner than slurm's requeue delay, but not within the second the node revoked the first
        # allocation's credential (the job would fail: "Job credential revoked").
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now+2"], check=True)
        assert _wait_for_state(job, ("COMPLETED", "FAILED", "CANCELLED"), 300)["JobState"] == "COMPLETED"
    finally:  # a failed check leaves no job on the test cluster
        subprocess.run(["scancel", job], capture_output=True)

    log = _log(Path(f"{run}.log"))
    assert f"job {job}, allocation 1 (SLURM_RESTART_COUNT=0)" in log and f"job {job}, allocation 2 (SLURM_RESTART_COUNT=1)" in log
    assert "stopped on SIGUSR1 at step" in log and "requeued" in log
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["finished"] and [i["signal"] for i in summary["interruptions"]] == ["SIGUSR1"]
    adapter, reference = _adapter(run), _adapter(straight)
    # The straight run went through launch/deepspeed.sh: 2 ranks on the same batches and reductions.
    assert adapter.keys() == reference.keys() and all(torch.equal(adapter[k], reference[k]) for k in adapter), \
        "the requeued slurm job differs from the straight 2-process run (launch/deepspeed.sh)"
    assert _losses(run) == _losses(straight), "slurm's losses differ from the straight run's (launch/deepspeed.sh)"

