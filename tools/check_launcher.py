#!/usr/bin/env python
"""Does a launcher give the same training as one process? Run this on a new machine or cluster.

    tools/check_launcher.py deepspeed            # launch/deepspeed.sh 2 (DS_ACCELERATOR=cpu without GPUs)
    tools/check_launcher.py mpirun --procs 4     # launch/mpirun.sh 4 (OpenMPI)
    tools/check_launcher.py slurm                # sbatch --wait launch/slurm.sbatch, one node
    tools/check_launcher.py slurm --sbatch-args="--partition=gpu --gpus-per-node=2"
    sudo tools/check_launcher.py deepspeed --netns --procs 4   # two nodes: network namespaces on this machine

With --netns the launcher runs across two "nodes" made on this machine (launch/netns_nodes.sh: two
network namespaces, each with its own address), half the processes on each: deepspeed's
multi-node mode without ssh (HOSTFILE, NODE_RANK), mpirun with launch/netns_rsh.sh as its remote
shell, or slurm with one slurmd per namespace (launch/slurm_one_node.sh, partition netns). The
rendezvous address must then be node 1's, which the check verifies too.

On a tiny model and data it builds in --workdir (a random Qwen2, MedMCQA- and OASST-schema rows:
nothing is downloaded), it runs `smf-ds background` and `smf-ds train` (SMF, tfidf, row-sharded
value tables, 3 steps) twice: under the launcher with P processes and grad_accum 1, and as one plain
process with grad_accum P, so both train on the same global batches. It then compares what they
wrote: background statistics (must be equal), the trained memory adapter (within 1e-6) and the
final loss (within 1e-5); prints PASS or FAIL for each, writes --out JSON, and exits 1 on a
mismatch (2 when a run fails; its log is printed).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import time
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LAUNCHERS = ("deepspeed", "mpirun", "slurm")
NETNS = {"prefix": "10.77.0", "nodes": ("n1", "n2"), "interface": "smf0"}
TOLERANCE = {"adapter": 1e-6, "loss": 1e-5}


def build_world(root: Path) -> Path:
    """A tiny saved model, training and background rows, and the run config; returns the config."""
    from smf_ds.data import samples
    from smf_ds.data.tiny import build_tiny_model, build_tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    medmcqa = samples.write_rows(samples.medmcqa_rows(16, seed=3), root / "medmcqa.jsonl")
    oasst = samples.write_rows(samples.oasst_rows(12, seed=3), root / "oasst.jsonl")
    texts = [json.dumps(r) for p in (medmcqa, oasst) for r in map(json.loads, p.read_text().splitlines())]
    build_tiny_model(build_tiny_tokenizer(texts, vocab_size=300), root / "model", hidden=32, layers=2, seed=0)
    config = root / "run.yaml"
    config.write_text(f"""\
model: {{name_or_path: {root / 'model'}}}
memory: {{layers: [1], n_keys: 8, heads: 2, knn: 4, k_dim: 8, sharding: row}}
sparse: {{scoring: tfidf, top_t: 6}}
train: {{method: smf, scope: values, steps: 3, micro_batch_size: 2, lr: 1.0, max_length: 64}}
data: {{train: {medmcqa}, background: {oasst}, background_batches: 3}}
""")
    return config


def node_address(i: int) -> str:
    return f"{NETNS['prefix']}.{11 + i}"


def launch_commands(launcher: str | None, procs: int, args: list[str], log_dir: Path, sbatch_args: str = "",
                    netns: bool = False) -> list[list[str]]:
    """The command lines (one per node for deepspeed across namespaces, else one) that run
    `smf-ds ARGS` under LAUNCHER with PROCS processes in all (None: one plain process)."""
    if launcher is None:
        return [[sys.executable, "-m", "smf_ds.cli", *args]]
    if launcher == "slurm":
        nodes = ["--partition=netns", "--nodes=2", f"--ntasks-per-node={procs // 2}"] if netns else \
            ["--nodes=1", f"--ntasks-per-node={procs}"]
        return [["sbatch", "--wait", *nodes, f"--chdir={REPO}", f"--output={log_dir / 'slurm-%j.out'}",
                 *shlex.split(sbatch_args), str(REPO / "launch" / "slurm.sbatch"), *args]]
    script = str(REPO / "launch" / f"{launcher}.sh")
    if not netns:
        return [[script, str(procs), *args]]
    if launcher == "mpirun":
        return [_in_node(0, {}) + [script, str(procs), *args]]
    hostfile = log_dir / "hostfile"
    hostfile.write_text("".join(f"{node} slots={procs // 2}\n" for node in NETNS["nodes"]))
    return [_in_node(i, {"HOSTFILE": str(hostfile), "NODE_RANK": str(i)}) + [script, str(procs // 2), *args]
            for i in range(len(NETNS["nodes"]))]


def _in_node(i: int, env: dict) -> list[str]:
    return ["nsenter", f"--net=/var/run/netns/smf-{NETNS['nodes'][i]}", "env",
            *(f"{k}={v}" for k, v in env.items())]


def launch_command(launcher: str | None, procs: int, args: list[str], log_dir: Path,
                   sbatch_args: str = "") -> list[str]:
    """The one command line of a launcher on this node (see launch_commands)."""
    return launch_commands(launcher, procs, args, log_dir, sbatch_args)[0]


def launcher_env(netns: bool = False, procs: int = 2) -> dict:
    """The environment for the launch scripts: this interpreter and its deepspeed, a free port;
    across the namespace nodes also node 1's address and their interface."""
    from smf_ds.parallel.process_group import free_port

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHON=sys.executable,
               DEEPSPEED=str(Path(sys.executable).with_name("deepspeed")), MASTER_PORT=str(free_port()),
               PYTHONPATH=str(REPO))
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would look for a GPU
    if netns:
        env.update(GLOO_SOCKET_IFNAME=NETNS["interface"])
        if "MPIRUN_ARGS" not in os.environ:
            hosts = ",".join(f"{node_address(i)}:{procs // 2}" for i in range(len(NETNS["nodes"])))
            env["MPIRUN_ARGS"] = (f"--mca plm_rsh_agent {REPO / 'launch' / 'netns_rsh.sh'} --host {hosts} "
                                  f"--mca oob_tcp_if_include {NETNS['interface']} "
                                  f"--mca btl_tcp_if_include {NETNS['interface']} -x GLOO_SOCKET_IFNAME")
        env["MASTER_ADDR"] = node_address(0)  # slurm.sbatch finds it itself: it is left to it there
    return env


def run_smf_ds(launcher: str | None, procs: int, args: list[str], log_dir: Path, sbatch_args: str = "",
               timeout: float = 900, netns: bool = False) -> subprocess.CompletedProcess:
    """Run one smf-ds command under a launcher (on every node at once); the processes use this interpreter."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = launcher_env(netns and launcher is not None, procs)
    if launcher == "slurm":
        env.pop("MASTER_ADDR", None)
    # Each node's output goes to files: pipes read one node after another would let the second
    # node block on a full pipe while the first waits on it in a collective.
    commands = launch_commands(launcher, procs, args, log_dir, sbatch_args, netns and launcher is not None)
    logs = [(log_dir / f"node{i}.out", log_dir / f"node{i}.err") for i in range(len(commands))]
    running = []
    for cmd, (out, err) in zip(commands, logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            running.append(subprocess.Popen(cmd, env=env, cwd=log_dir, stdout=stdout, stderr=stderr, text=True))
    deadline = time.monotonic() + timeout
    for p in running:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    code = next((p.returncode for p in running if p.returncode), 0)
    # Ranks, launchers and batch scripts share these files; one write can cut into another's character.
    read = lambda path: path.read_text(errors="replace")  # noqa: E731
    done = subprocess.CompletedProcess(running[0].args, code, "".join(read(out) for out, _ in logs),
                                       "".join(read(err) for _, err in logs))
    if launcher == "slurm":  # the job's own output is in its log file, not sbatch's
        done.stdout += "".join(read(p) for p in sorted(log_dir.glob("slurm-*.out")))
    return done


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def locked(reference: Path | None):
    """Checks (and tests) run side by side that share a folder take turns building in it."""
    if reference is None:
        yield
        return
    reference.mkdir(parents=True, exist_ok=True)
    with open(reference / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def train_twice(config: Path, launcher: str, procs: int, workdir: Path, sbatch_args: str = "",
                netns: bool = False, reference: Path | None = None) -> dict:
    """background + train once as one process and once under the launcher; returns each run's outputs.
    With `reference`, the one-process run lives there and one finished by an earlier check is reused."""
    from safetensors.torch import load_file

    runs = {}
    for name, how, n in (("one_process", None, 1), (launcher, launcher, procs)):
        shared = reference is not None and how is None
        out = reference / f"one_process_for_{procs}" if shared else workdir / name
        with locked(reference if shared else None):
            _run_unless_finished(out, shared, config, how, n, procs, sbatch_args, netns)
        summary = json.loads((out / "train_summary.json").read_text())
        runs[name] = {"summary": summary,
                      "background": load_file(out / "background.safetensors"),
                      "adapter": load_file(out / "memory_adapter" / "memory_adapter.safetensors")}
    return runs


def _run_unless_finished(out: Path, shared: bool, config: Path, how: str | None, n: int, procs: int,
                         sbatch_args: str, netns: bool) -> None:
    """background + train into `out`, as `n` processes under `how` (None: one plain process); a
    shared reference run that an earlier check finished is kept."""
    from smf_ds.train.rundir import run_finished

    if shared and run_finished(out / "train_summary.json"):
        return
    if shared:
        shutil.rmtree(out, ignore_errors=True)  # an earlier check's run cut short: train it afresh
    common = ["--config", str(config), f"out_dir={out}", f"train.grad_accum={procs // n}"]
    for args in (["background", *common],
                 ["train", *common, f"sparse.background={out / 'background.safetensors'}"]):
        done = run_smf_ds(how, n, args, out / "logs", sbatch_args, netns=netns)
        # `sbatch --wait` exits 0 for a job cancelled before it ran: the outputs say whether it did.
        wrote = out / ("background.safetensors" if args[0] == "background" else "train_summary.json")
        if done.returncode != 0 or not wrote.is_file():
            raise RuntimeError(f"{' '.join(launch_command(how, n, args, out / 'logs', sbatch_args))} "
                               f"failed (exit status {done.returncode}"
                               f"{'' if wrote.is_file() else f', no {wrote.name} written'}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


def compare(one: dict, launched: dict, procs: int, netns: bool = False) -> list[dict]:
    """One check per output: name, measured difference, what it must be, passed."""
    def max_diff(a: dict, b: dict) -> float:
        if a.keys() != b.keys():
            return float("inf")
        return max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)

    checks = [
        ("world size", launched["summary"]["world_size"], f"== {procs}", launched["summary"]["world_size"] == procs),
        ("steps", launched["summary"]["steps"], f"== {one['summary']['steps']}",
         launched["summary"]["steps"] == one["summary"]["steps"]),
    ]
    bg = max_diff(one["background"], launched["background"])
    checks.append(("background stats max |diff|", bg, "== 0", bg == 0))
    ad = max_diff(one["adapter"], launched["adapter"])
    checks.append(("memory adapter max |diff|", ad, f"<= {TOLERANCE['adapter']}", ad <= TOLERANCE["adapter"]))
    loss = abs(one["summary"]["final_loss"] - launched["summary"]["final_loss"])
    checks.append(("final loss |diff|", loss, f"<= {TOLERANCE['loss']}", loss <= TOLERANCE["loss"]))
    if netns:  # across nodes the rendezvous is node 1's address, never this machine's loopback
        addr = launched["summary"].get("master_addr")
        checks.append(("rendezvous address", addr, f"== {node_address(0)}", addr == node_address(0)))
    return [{"check": c, "value": v, "expected": e, "passed": bool(p)} for c, v, e, p in checks]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("launcher", choices=LAUNCHERS)
    parser.add_argument("--procs", type=int, default=2, help="processes under the launcher (default 2)")
    parser.add_argument("--workdir", type=Path, help="where the model, data and runs go (default: a temporary dir)")
    parser.add_argument("--sbatch-args", default="", help="extra sbatch flags for the slurm launcher")
    parser.add_argument("--out", type=Path, help="write the checks as JSON here")
    parser.add_argument("--reference", type=Path,
                        help="a folder kept for the tiny world and the one-process runs: a later check with as many "
                             "processes reuses them instead of training again (the tests share one)")
    parser.add_argument("--netns", action="store_true",
                        help="across two nodes made of network namespaces on this machine (root; launch/netns_nodes.sh)")
    args = parser.parse_args(argv)
    if args.procs < 2 or (args.netns and args.procs % 2):
        parser.error(f"--procs: expected at least 2 processes to compare with one (an even number with "
                     f"--netns: half on each node), got {args.procs}")
    if args.netns:
        up = subprocess.run([str(REPO / "launch" / "netns_nodes.sh"), "up"], capture_output=True, text=True)
        if up.returncode != 0:
            print(f"launch/netns_nodes.sh up failed:\n{up.stderr}", file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory(prefix="check_launcher_") as tmp:
        workdir = args.workdir or Path(tmp)
        world = (args.reference or workdir) / "world"
        with locked(args.reference):
            config = world / "run.yaml" if args.reference and (world / "run.yaml").is_file() else build_world(world)
        try:
            runs = train_twice(config, args.launcher, args.procs, workdir / "runs", args.sbatch_args, args.netns,
                               args.reference)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 2
        checks = compare(runs["one_process"], runs[args.launcher], args.procs, args.netns)

    passed = all(c["passed"] for c in checks)
    print(f"{args.launcher} with {args.procs} processes{' on two nodes' if args.netns else ''} against one process:")
    for c in checks:
        value = f"{c['value']:g}" if isinstance(c['value'], (int, float)) else c['value']
        print(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['check']}: {value} (expected {c['expected']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"launcher": args.launcher, "procs": args.procs, "netns": args.netns,
                                        "passed": passed,
                                        "checks": checks}, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
