#!/usr/bin/env bash
# One node, the deepspeed launcher: one process per GPU (or per requested CPU process).
#
#   launch/deepspeed.sh NPROC COMMAND [smf-ds arguments...]
#   launch/deepspeed.sh 8 train --config run.yaml train.steps=1000
#   DS_ACCELERATOR=cpu launch/deepspeed.sh 2 train --config run.yaml     # CPU, gloo
#
# COMMAND is an smf-ds command that runs distributed: train, background or eval.
# MASTER_PORT (default 29500) picks the rendezvous port; PYTHON the interpreter (default: the
# repository's .venv when present). Multi-node: use launch/slurm.sbatch, or deepspeed's own
# --hostfile with the same `--module smf_ds.cli` arguments.
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
deepspeed_bin=${DEEPSPEED:-$( [[ -x $here/.venv/bin/deepspeed ]] && echo "$here/.venv/bin/deepspeed" || echo deepspeed )}
exec "$deepspeed_bin" --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" --module smf_ds.cli "$@"
