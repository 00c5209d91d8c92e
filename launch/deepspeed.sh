#!/usr/bin/env bash
# One node, the deepspeed launcher: one process per GPU (or per requested CPU process).
#
#   launch/deepspeed.sh NPROC COMMAND [smf-ds arguments...]
#   launch/deepspeed.sh 8 train --config run.yaml train.steps=1000
#   DS_ACCELERATOR=cpu launch/deepspeed.sh 2 train --config run.yaml     # CPU processes on a GPU node
#
# DS_ACCELERATOR defaults to the machine's (launch/accelerator.sh: cuda when torch sees a GPU, else cpu).
#
# COMMAND is an smf-ds command that runs distributed: retrofit, train, background, eval or experiment.
# SIGTERM and SIGUSR1 sent to this script reach the ranks (train, retrofit, experiment), which stop
# after the current optimizer step with a checkpoint and exit 75 (this script then exits 75 too).
# MASTER_PORT (default 29500) picks the rendezvous port; DEEPSPEED the launcher (default: the
# repository's .venv/bin/deepspeed when present, else deepspeed on PATH); the ranks run under the
# Python that launcher belongs to (PYTHON is not read here).
#
# Several nodes without ssh: HOSTFILE (deepspeed's: "node1 slots=8" lines), MASTER_ADDR (the first
# node's address) and NODE_RANK (this node's line, from 0); run the same command on every node,
# NPROC being the processes per node:
#   HOSTFILE=hosts MASTER_ADDR=10.0.0.1 NODE_RANK=1 launch/deepspeed.sh 8 train --config run.yaml
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
shift
deepspeed_bin=${DEEPSPEED:-$( [[ -x $venv_bin/deepspeed ]] && echo "$venv_bin/deepspeed" || echo deepspeed )}
placement=(--num_gpus "$nproc")
# deepspeed drops CUDA_VISIBLE_DEVICES when given --num_gpus and takes GPUs 0..NPROC-1: on a shared
# node (a scheduler's allocation) name the visible GPUs instead.
if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${DS_ACCELERATOR:-} != cpu ]]; then
  IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
  if (( ${#visible[@]} < nproc )); then
    echo "$0: NPROC=$nproc, but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES shows ${#visible[@]} GPU(s)" >&2
    exit 2
  fi
  if [[ ${CUDA_VISIBLE_DEVICES} =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    placement=(--include "localhost:$(IFS=,; echo "${visible[*]:0:nproc}")")
  fi
fi
if [[ -n ${HOSTFILE:-} ]]; then
  for var in NODE_RANK MASTER_ADDR; do
    [[ -n ${!var:-} ]] || { echo "$0: HOSTFILE is set: set $var too (see the header)" >&2; exit 2; }
  done
  placement=(--hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
             --num_gpus "$nproc")
fi
# deepspeed's launcher answers SIGTERM by killing its ranks within 30 s: a stop signal goes to the
# ranks themselves instead, which save at the next optimizer step and exit 75 (cluster.stop_signals).
forward_to() { for pid in $(rank_pids "$1"); do kill -s "$2" "$pid" 2>/dev/null || true; done; }
run_forwarding_signals "$deepspeed_bin" "${placement[@]}" --master_port "${MASTER_PORT:-29500}" --module smf_ds.cli "$@"
