#!/usr/bin/env bash
# One node, the deepspeed launcher: one process per GPU (or per requested CPU process).
#
#   launch/deepspeed.sh NPROC COMMAND [smf-ds arguments...]
#   launch/deepspeed.sh 8 train --config run.yaml train.steps=1000
#   DS_ACCELERATOR=cpu launch/deepspeed.sh 2 train --config run.yaml     # CPU, gloo
#
# COMMAND is an smf-ds command that runs distributed: train, background, eval or experiment.
# MASTER_PORT (default 29500) picks the rendezvous port; PYTHON the interpreter (default: the
# repository's .venv when present). Multi-node: use launch/slurm.sbatch, or deepspeed's own
# --hostfile with the same `--module smf_ds.cli` arguments.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
shift
deepspeed_bin=${DEEPSPEED:-$( [[ -x $venv_bin/deepspeed ]] && echo "$venv_bin/deepspeed" || echo deepspeed )}
exec "$deepspeed_bin" --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" --module smf_ds.cli "$@"
