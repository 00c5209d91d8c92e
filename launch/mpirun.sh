#!/usr/bin/env bash
# OpenMPI: NPROC processes, on this node or on the hosts of an MPI hostfile.
#
#   launch/mpirun.sh NPROC COMMAND [smf-ds arguments...]
#   launch/mpirun.sh 2 train --config run.yaml
#   MPIRUN_ARGS="--hostfile hosts" MASTER_ADDR=node0 launch/mpirun.sh 16 train --config run.yaml
#
# smf-ds reads OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK (smf_ds.parallel.process_group);
# MASTER_ADDR (default: this host) and MASTER_PORT (default 29500) are exported to every rank.
# Needs OpenMPI (`make install-mpi` installs it on Debian).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NPROC {train|background|eval} [smf-ds arguments...]" >&2
  exit 2
fi
nproc=$1; shift
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: NPROC: expected a positive number of processes, got '$nproc'" >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$( [[ -x $here/.venv/bin/python ]] && echo "$here/.venv/bin/python" || echo python3 )}
export MASTER_ADDR=${MASTER_ADDR:-$(hostname)}
export MASTER_PORT=${MASTER_PORT:-29500}
root_flag=()
[[ $(id -u) == 0 ]] && root_flag=(--allow-run-as-root)   # containers often run as root
# shellcheck disable=SC2086
exec mpirun -np "$nproc" "${root_flag[@]}" ${MPIRUN_ARGS:-} -x MASTER_ADDR -x MASTER_PORT \
  -x DS_ACCELERATOR -x PYTHONPATH -x HF_HUB_OFFLINE -x HF_DATASETS_OFFLINE \
  "$python" -m smf_ds.cli "$@"
