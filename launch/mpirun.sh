#!/usr/bin/env bash
# OpenMPI: NPROC processes, on this node or on the hosts of an MPI hostfile.
#
#   launch/mpirun.sh NPROC COMMAND [smf-ds arguments...]
#   launch/mpirun.sh 2 train --config run.yaml
#   MPIRUN_ARGS="--hostfile hosts" MASTER_ADDR=node0 launch/mpirun.sh 16 train --config run.yaml
#
# smf-ds reads OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK (smf_ds.parallel.process_group);
# MASTER_ADDR (default: this host) and MASTER_PORT (default 29500) are exported to every rank;
# PYTHON the interpreter (default: the repository's .venv/bin/python when present, else python3).
# Needs OpenMPI (`make install-mpi` installs it on Debian). SIGTERM or SIGUSR1 sent to this script
# reach the ranks as SIGUSR1: they stop after the current step with a checkpoint and exit 75.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
shift
python=${PYTHON:-$( [[ -x $venv_bin/python ]] && echo "$venv_bin/python" || echo python3 )}
export MASTER_ADDR=${MASTER_ADDR:-$(hostname)}
export MASTER_PORT=${MASTER_PORT:-29500}
flags=()
[[ $(id -u) == 0 ]] && flags+=(--allow-run-as-root)   # containers often run as root
for var in MASTER_ADDR MASTER_PORT DS_ACCELERATOR PYTHONPATH OMP_NUM_THREADS HF_HUB_OFFLINE HF_DATASETS_OFFLINE; do
  [[ -n ${!var:-} ]] && flags+=(-x "$var")   # forward only what is set (mpirun warns otherwise)
done
# mpirun answers SIGTERM by killing the job, but forwards SIGUSR1 to every rank: a stop signal
# reaches the ranks as SIGUSR1, and they save and exit 75.
forward_to() { kill -s USR1 "$1" 2>/dev/null || true; }
# shellcheck disable=SC2086
run_forwarding_signals mpirun -np "$nproc" "${flags[@]}" ${MPIRUN_ARGS:-} "$python" -m smf_ds.cli "$@"
