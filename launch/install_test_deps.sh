#!/usr/bin/env bash
# What the launcher and cluster tests need from Debian, installed where this machine allows it
# (root and apt-get): OpenMPI (mpirun), slurm-wlm + munge (a real slurm cluster on this machine),
# iproute2 (network namespaces: two "nodes" on one machine). `make test` runs it; elsewhere the
# tests that need what is missing fail and say what to install (`make test` sets SMF_NO_SKIPS=1).
set -euo pipefail
need=()
command -v mpirun >/dev/null || need+=(openmpi-bin libopenmpi-dev)
command -v slurmd >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v ip >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
command -v ps >/dev/null || need+=(procps)
if (( ${#need[@]} == 0 )); then
  exit 0
fi
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "$0: missing ${need[*]}, and this is not a root Debian machine: install them to run every test" >&2
  exit 0
fi
echo "$0: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
