"""One owner per run directory: a second writer is refused by name before it writes anything; a dead
owner's directory is taken over with a message; an unwritable directory fails at once."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smf_ds.config import ConfigError
from smf_ds.owner import LOCK, owning

REPO = Path(__file__).resolve().parents[1]


def test_a_second_owner_is_refused_naming_the_first(tmp_path):
    with owning(tmp_path / "run", "train"):
        held = json.loads((tmp_path / "run" / LOCK).read_text())
        assert held["pid"] == os.getpid() and held["command"] == "train"
        with pytest.raises(ConfigError, match=rf"^out_dir={tmp_path / 'run'}: in use by smf-ds train \(pid "
                                              rf"{os.getpid()} on {socket.gethostname()}, since "):
            with owning(tmp_path / "run", "eval"):
                pass
    with owning(tmp_path / "run", "eval"):  # released at the end of the block
        pass
    assert (tmp_path / "run" / LOCK).read_text() == ""


def test_a_dead_owners_directory_is_taken_over_and_an_unwritable_one_is_named(tmp_path, caplog):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text(json.dumps({"command": "train", "pid": 999999999, "host": "gone"}))
    with caplog.at_level("WARNING"), owning(tmp_path / "run", "train"):
        pass
    assert "taking over from a run that did not finish" in caplog.text and "999999999" in caplog.text
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=rf"^--out={tmp_path / 'afile' / 'sub'}: cannot write there"):
        with owning(tmp_path / "afile" / "sub", "eval", "--out"):
            pass


@pytest.mark.e2e
def test_two_trainings_into_one_out_dir(tmp_path):
    """The second is refused before it writes anything, naming the first; the first, stopped with
    SIGTERM, leaves no smf-ds process behind within 10 seconds."""
    sys.path.insert(0, str(REPO / "tools"))
    from check_launcher import build_world

    config = build_world(tmp_path / "world")
    run = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "smf_ds.cli", "train", "--config", str(config), f"out_dir={run}",
            "sparse.scoring=tf", "train.steps=100000", "train.save_every=50"]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((run / "config.yaml").is_file() and list((run / "tensorboard").glob("events*"))):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.2)
        written = (run / "config.yaml").stat().st_mtime_ns, sorted((run / "tensorboard").glob("events*"))
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"out_dir={run}: in use by smf-ds train (pid {first.pid} on {socket.gethostname()}" in second.stderr
        # Nothing of the second: the config is the first's, and no second TensorBoard file.
        assert ((run / "config.yaml").stat().st_mtime_ns, sorted((run / "tensorboard").glob("events*"))) == written
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 75
        stopped = time.time()
        while subprocess.run(["pgrep", "-f", f"out_dir={run}"], capture_output=True).returncode == 0:
            assert time.time() - stopped < 10, "an smf-ds process of the run is still alive"
            time.sleep(0.2)
    finally:
        if first.poll() is None:
            first.kill()


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB file system that the test fills up (tmpfs; root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path, leave_pages: int = 0) -> Path:
    """Fill the file system, then give back `leave_pages` pages of 4 KiB."""
    filler = mount / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k", "count=16384"], capture_output=True)
    os.truncate(filler, max(0, filler.stat().st_size - leave_pages * 4096))
    return filler


@pytest.mark.e2e
def test_a_full_disk_is_named_and_costs_no_checkpoint_or_result(small_disk, tmp_path):
    """Training on a disk that fills up: the failed save is one line naming the file and the disk,
    the previous checkpoint stays the latest and resumes once there is room; an evaluation whose
    --out fills up leaves no truncated predictions and says so."""
    sys.path.insert(0, str(REPO / "tools"))
    from check_launcher import build_world

    config = build_world(tmp_path / "world")
    run = small_disk / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "smf_ds.cli", "train", "--config", str(config), f"out_dir={run}",
            "sparse.scoring=tf", "train.steps=100000", "train.save_every=200", "--resume", "auto"]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "latest_memory").is_file():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.1)
    filler = _fill(small_disk)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 2, stderr[-3000:]
    found = re.findall(r"smf-ds train: ([^\n]*)", stderr)  # another thread's traceback may share its line
    assert len(found) == 1, stderr[-3000:]
    (line,) = found
    assert "cannot write" in line and "no space left on the device" in line and "the latest complete checkpoint" in line
    assert (run / "checkpoints" / "latest_memory").read_text() == "step0000200" and "step0000200, is intact" in line
    filler.unlink()
    resumed = subprocess.run([*argv[:-4], "train.steps=210", "train.save_every=200", "--resume", "auto"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "train_summary.json").read_text())["resumed_at_step"] == 200

    data = json.loads((config.parent / "medmcqa.jsonl").read_text().splitlines()[0])
    assert data["question"]
    out = small_disk / "eval"
    out.mkdir()
    filler = _fill(small_disk, leave_pages=1)  # room for the lock file, not for the predictions
    done = subprocess.run([sys.executable, "-m", "smf_ds.cli", "eval", "--model", str(config.parent / "model"),
                           "--tasks", "medmcqa", "--medmcqa", str(config.parent / "medmcqa.jsonl"), "--out", str(out),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"smf-ds eval: --out: cannot write {out}" in done.stderr and "no space left on the device" in done.stderr
    assert not list(out.glob("*.jsonl")) and not (out / "summary.json").exists()
    filler.unlink()
