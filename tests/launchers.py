"""The launchers' test machinery: smf-ds in a subprocess, which launcher can run here, and the one
test cluster.

The test cluster is one slurm cluster on this machine (launch/slurm_one_node.sh) with, when this
runs as root, the two network-namespace nodes of launch/netns_nodes.sh in it. The namespaces come
up first, so that every test sees the same slurm.conf and no test restarts the daemons under
another's job. Tests that use it share the xdist group CLUSTER (one pytest worker runs them all).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def smf_ds_cli(*args, check=True) -> subprocess.CompletedProcess:
    """`smf-ds ARGS` run in this process, as `python -m smf_ds.cli ARGS` would run (its exit code, what
    it prints from Python, its log lines), without a new interpreter's imports (seconds per call); on
    the CPU, one thread (conftest). With check, a failure shows its stderr."""
    import contextlib
    import io
    import logging
    import traceback

    from smf_ds import cli

    out, err = io.StringIO(), io.StringIO()
    log_lines = logging.StreamHandler(err)
    log_lines.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(log_lines)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(arg) for arg in args])
            except SystemExit as exit_:  # argparse's refusals
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:  # what the interpreter would print, with its exit status
                traceback.print_exc()
                code = 1
    finally:
        root.removeHandler(log_lines)
        root.setLevel(level)
    done = subprocess.CompletedProcess(["smf-ds", *args], code, out.getvalue(), err.getvalue())
    if check:
        assert done.returncode == 0, done.stderr[-6000:]
    return done


CLUSTER = pytest.mark.xdist_group("cluster")


def shared_tmp(tmp_path_factory, name: str) -> Path:
    """A folder that every pytest worker of this session sees (the session's base temp dir); what
    builds in it takes turns (check_launcher.locked)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


def bring_up_namespaces() -> None:
    up = subprocess.run([str(REPO / "launch" / "netns_nodes.sh"), "up"], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, f"launch/netns_nodes.sh up failed:\n{up.stdout}{up.stderr}"


def launcher_missing(launcher: str) -> str | None:
    """Why LAUNCHER cannot run on this machine, or None. The deepspeed launcher always can (it is
    a dependency); mpirun needs OpenMPI; slurm needs slurm-wlm + munge and root, and then gets the
    test cluster (launch/slurm_one_node.sh refuses a real cluster's config)."""
    if launcher == "mpirun" and shutil.which("mpirun") is None:
        return "OpenMPI is not installed (make install-mpi)"
    if launcher == "slurm":
        if os.geteuid() == 0 and shutil.which("ip"):
            bring_up_namespaces()
        done = subprocess.run([str(REPO / "launch" / "slurm_one_node.sh")], capture_output=True, text=True,
                              timeout=180)
        if done.returncode == 2:  # the script's "cannot here": not root, not installed, a real cluster
            return done.stderr.strip()
        assert done.returncode == 0, f"launch/slurm_one_node.sh failed:\n{done.stdout}\n{done.stderr}"
    return None
