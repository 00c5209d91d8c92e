"""Launchers: their variables map to one process group, and `launch/deepspeed.sh 2` equals one process.

The end-to-end tests are `tools/check_launcher.py LAUNCHER`: `smf-ds background` and `smf-ds train`
(SMF, tfidf, row-sharded tables) on a tiny saved model, once through the deepspeed launcher with 2
CPU processes (gloo) and once as a plain single process with twice the gradient accumulation (the
same global batches), comparing the background statistics, the trained memory adapter and the
losses. deepspeed always runs; mpirun where OpenMPI is installed; slurm where slurm-wlm and munge
are installed and the tests run as root (a one-node cluster from launch/slurm_one_node.sh).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launchers import CLUSTER, bring_up_namespaces, launcher_missing, shared_tmp
from smf_ds.parallel.process_group import launcher_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variables, expected", [
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"},
     {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
      "MASTER_ADDR": "gpu01"},
     {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu01", "MASTER_PORT": "29500"}),
])
def test_launcher_variables(variables, expected):
    assert launcher_env(variables) == expected


def test_single_process_cases():
    assert launcher_env({}) is None
    assert launcher_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    # An sbatch script's own shell has SLURM_NTASKS but is not an srun step: one process.
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None


def test_a_rendezvous_port_is_free_and_below_the_ephemeral_range():
    """Outgoing connections and binds to port 0 draw from the ephemeral range; a port chosen there
    could be taken before the rank that is to listen on it starts."""
    import socket

    from smf_ds.parallel.process_group import free_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports) and len(ports) > 1
    with socket.socket() as s:
        s.bind(("", ports.pop()))


@pytest.mark.e2e
def test_a_group_of_one_takes_its_launcher_variables_back():
    """smf-ds run unlaunched exports RANK=0 WORLD_SIZE=1 (DeepSpeed reads them); after it leaves
    the group, a process it starts (an srun task, say) must not inherit a world of one."""
    script = ("import os; from smf_ds.parallel.process_group import init_process_group, destroy_process_group; "
              "init_process_group('gloo'); during = os.environ['WORLD_SIZE']; destroy_process_group(); "
              "print(during, os.environ.get('WORLD_SIZE'), os.environ.get('MASTER_PORT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(REPO), MASTER_PORT="4321")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["1", "None", "4321"]


def test_bad_launcher_variables_name_them():
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK=4 is outside 0..3"):
        launcher_env({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="expected integers in RANK, WORLD_SIZE"):
        launcher_env({"RANK": "zero", "WORLD_SIZE": "2"})


@pytest.mark.e2e
@pytest.mark.parametrize("visible, accelerator, expected", [
    ("", "cuda", ["--num_gpus", "2"]),
    ("4,5,6", "cuda", ["--include", "localhost:4,5"]),  # the GPUs the scheduler gave, not 0 and 1
    ("4,5", "cpu", ["--num_gpus", "2"]),                # CPU processes: GPUs do not matter
    ("GPU-ab,GPU-cd", "cuda", ["--num_gpus", "2"]),      # UUIDs: deepspeed's --include takes indices
])
def test_deepspeed_script_keeps_the_visible_gpus(tmp_path, visible, accelerator, expected):
    fake = tmp_path / "deepspeed"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, DEEPSPEED=str(fake), CUDA_VISIBLE_DEVICES=visible, DS_ACCELERATOR=accelerator)
    done = subprocess.run([str(REPO / "launch" / "deepspeed.sh"), "2", "train", "--config", "run.yaml"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [*expected, "--master_port", os.environ.get("MASTER_PORT", "29500"),
                                   "--module", "smf_ds.cli", "train", "--config", "run.yaml"]


@pytest.mark.e2e
def test_deepspeed_script_refuses_fewer_visible_gpus_than_processes(tmp_path):
    env = dict(os.environ, DEEPSPEED="/bin/echo", CUDA_VISIBLE_DEVICES="3", DS_ACCELERATOR="cuda")
    done = subprocess.run([str(REPO / "launch" / "deepspeed.sh"), "2", "train"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "NPROC=2, but CUDA_VISIBLE_DEVICES=3 shows 1 GPU(s)" in done.stderr


@pytest.mark.e2e
def test_the_accelerator_is_the_machines_unless_set(tmp_path):
    """launch/accelerator.sh: cuda when torch sees a GPU, cpu when not (or without torch, unless
    nvidia-smi works); the launch scripts export it to the ranks unless DS_ACCELERATOR is set."""
    script = REPO / "launch" / "accelerator.sh"
    for want in ("cuda", "cpu"):  # a stand-in interpreter whose torch answers the probe so
        fake = tmp_path / f"python_{want}"
        fake.write_text(f'#!/bin/sh\necho {want}\n')
        fake.chmod(0o755)
        assert subprocess.run([str(script), str(fake)], capture_output=True, text=True).stdout == f"{want}\n"
    no_torch = dict(os.environ, PATH=str(tmp_path))  # no nvidia-smi on PATH either
    assert subprocess.run(["/bin/bash", str(script), "/nonexistent/python"], env=no_torch, capture_output=True,
                          text=True).stdout == "cpu\n"
    assert subprocess.run([str(script), sys.executable], capture_output=True, text=True).stdout == (
        "cuda\n" if __import__("torch").cuda.is_available() else "cpu\n")

    show = tmp_path / "deepspeed"
    show.write_text('#!/bin/sh\necho "$DS_ACCELERATOR"\n')
    show.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    for extra, want in (({}, "cuda" if __import__("torch").cuda.is_available() else "cpu"),
                        ({"DS_ACCELERATOR": "cpu"}, "cpu")):
        done = subprocess.run([str(REPO / "launch" / "deepspeed.sh"), "1", "train"], capture_output=True, text=True,
                              env={**env, **extra, "DEEPSPEED": str(show)}, timeout=60)
        assert done.stdout.strip() == want, done.stderr


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """One tiny world and one-process run per process count for every launcher's check, shared by
    the test workers (check_launcher takes turns in it)."""
    return shared_tmp(tmp_path_factory, "launcher_reference")


def _check_launcher():
    sys.path.insert(0, str(REPO / "tools"))
    import check_launcher

    return check_launcher


@pytest.mark.e2e
@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun", pytest.param("slurm", marks=CLUSTER)])
def test_launcher_equals_one_process(launcher, tmp_path, reference):
    """tools/check_launcher.py: 2 processes through the launcher equal one process."""
    missing = launcher_missing(launcher)
    if missing:
        pytest.skip(f"{launcher}: {missing}")
    out = tmp_path / "checks.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "tools" / "check_launcher.py"), launcher,
                           "--workdir", str(tmp_path / "work"), "--reference", str(reference), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"check_launcher {launcher} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    result = json.loads(out.read_text())
    assert result["passed"] and result["procs"] == 2
    assert {c["check"] for c in result["checks"]} == {
        "world size", "steps", "background stats max |diff|", "memory adapter max |diff|", "final loss |diff|"}
    assert "PASS  memory adapter" in done.stdout


def test_launcher_check_fails_on_a_difference():
    check = _check_launcher()
    run = {"summary": {"world_size": 2, "steps": 3, "final_loss": 1.0},
           "background": {"df": torch.zeros(4)}, "adapter": {"values": torch.zeros(4, 2)}}
    one = {"summary": {"world_size": 1, "steps": 3, "final_loss": 1.0},
           "background": {"df": torch.zeros(4)}, "adapter": {"values": torch.zeros(4, 2)}}
    assert all(c["passed"] for c in check.compare(one, run, 2))
    moved = dict(run, adapter={"values": torch.full((4, 2), 1e-5)})
    failed = [c["check"] for c in check.compare(one, moved, 2) if not c["passed"]]
    assert failed == ["memory adapter max |diff|"]
    renamed = dict(run, background={"counts": torch.zeros(4)})
    assert [c["check"] for c in check.compare(one, renamed, 2) if not c["passed"]] == ["background stats max |diff|"]
    assert not check.compare(one, run, 4)[0]["passed"]  # world size 2, asked for 4


def test_launcher_check_reuses_a_finished_reference_only(tmp_path, monkeypatch):
    """--reference: a finished one-process run there is read, not trained again; an unfinished one is."""
    check = _check_launcher()
    calls = []

    def fake_run(how, n, args, log_dir, sbatch_args="", netns=False):
        calls.append((how, args[0]))
        out = Path(next(a for a in args if a.startswith("out_dir="))[len("out_dir="):])
        _fake_run_outputs(out, finished=True)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(check, "run_smf_ds", fake_run)
    reference = tmp_path / "reference"
    _fake_run_outputs(reference / "one_process_for_2", finished=False)
    check.train_twice(tmp_path / "run.yaml", "deepspeed", 2, tmp_path / "a", reference=reference)
    assert calls == [(None, "background"), (None, "train"), ("deepspeed", "background"), ("deepspeed", "train")]
    calls.clear()
    runs = check.train_twice(tmp_path / "run.yaml", "mpirun", 2, tmp_path / "b", reference=reference)
    assert calls == [("mpirun", "background"), ("mpirun", "train")] and runs["one_process"]["summary"]["finished"]


def test_checks_sharing_a_reference_take_turns_in_it(tmp_path):
    import threading

    holding = _check_launcher().locked
    entered = threading.Event()

    def second_check():
        with holding(tmp_path / "reference"):
            entered.set()

    with holding(tmp_path / "reference"):
        waiting = threading.Thread(target=second_check)
        waiting.start()
        assert not entered.wait(0.5)
    assert entered.wait(30)
    waiting.join()


def _fake_run_outputs(out: Path, finished: bool) -> None:
    from safetensors.torch import save_file

    (out / "memory_adapter").mkdir(parents=True, exist_ok=True)
    (out / "train_summary.json").write_text(json.dumps({"finished": finished}))
    save_file({"df": torch.zeros(2)}, str(out / "background.safetensors"))
    save_file({"values": torch.zeros(2)}, str(out / "memory_adapter" / "memory_adapter.safetensors"))


@pytest.mark.e2e
def test_experiment_under_the_deepspeed_launcher(tmp_path, monkeypatch):
    """The grid's steps hand files from rank 0 to every rank (a run's artifact, then its
    evaluation): under 2 processes each rank must wait for rank 0's writes. DeepSpeed's CPU
    all-reduce files in /dev/shm (LoRA trains through DeepSpeed) are gone when the job ends."""
    from smf_ds.parallel import process_group

    shm_files = lambda port: sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))  # noqa: E731
    port = next(port for port in iter(process_group.free_port, None) if not shm_files(port))  # none of an earlier job
    monkeypatch.setattr(process_group, "free_port", lambda: port)  # check_launcher's MASTER_PORT
    out = tmp_path / "exp"
    args = ["experiment", "--quick", "--methods", "lora", "--seeds", "0", "--out", str(out)]
    done = _check_launcher().run_smf_ds("deepspeed", 2, args, tmp_path / "logs")
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "deepspeed_shm_comm_op built successfully" in done.stdout + done.stderr, "DeepSpeed's shm all-reduce not used"
    assert not shm_files(port), f"DeepSpeed's shared memory left behind: {shm_files(port)}"
    results = json.loads((out / "results.json").read_text())
    assert results["variants"]["lora"]["seeds"] == [0]
    for summary in (out / "base_eval" / "seed0" / "summary.json", out / "runs" / "lora" / "seed0" / "eval" / "summary.json"):
        assert json.loads(summary.read_text())["world_size"] == 2
    assert json.loads((out / "runs" / "lora" / "seed0" / "train_summary.json").read_text())["world_size"] == 2


@pytest.mark.e2e
@CLUSTER
@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun", "slurm"])
def test_launcher_across_two_nodes_equals_one_process(launcher, tmp_path, reference):
    """Two nodes made of network namespaces on this machine (each its own address), 2 processes
    on each: the launcher's run equals one process on the same global batches, and the rendezvous
    was node 1's address (tools/check_launcher.py --netns)."""
    if os.geteuid() != 0:
        pytest.skip("two network namespaces need root")
    missing = launcher_missing(launcher)
    if missing:
        pytest.skip(f"{launcher}: {missing}")
    bring_up_namespaces()
    if launcher == "slurm":  # the namespaces' slurmd nodes are in the test cluster
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
        assert {"n1", "n2"} <= set(nodes), nodes
    out = tmp_path / "checks.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "tools" / "check_launcher.py"), launcher, "--netns",
                           "--procs", "4", "--workdir", str(tmp_path / "work"), "--reference", str(reference),
                           "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"check_launcher {launcher} --netns failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    result = json.loads(out.read_text())
    assert result["passed"] and result["procs"] == 4 and result["netns"]
    assert {c["check"]: c["value"] for c in result["checks"]}["rendezvous address"] == "10.77.0.11"


def test_a_command_run_as_a_library_leaves_the_signals_as_it_found_them():
    """`stop.listen` takes SIGUSR2 over; `stop_listening` (the end of every smf-ds command) puts the
    host's handler back and forgets the stop it was asked for."""
    from smf_ds.train import stop

    def host_handler(signum, frame):
        pass

    before = signal.signal(signal.SIGUSR2, host_handler)
    try:
        stop.listen(["SIGUSR2"])
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested() == "SIGUSR2" and signal.getsignal(signal.SIGUSR2) is not host_handler
        stop.stop_listening()
        assert stop.requested() is None and signal.getsignal(signal.SIGUSR2) is host_handler
    finally:
        signal.signal(signal.SIGUSR2, before)
