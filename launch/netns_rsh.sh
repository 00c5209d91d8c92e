#!/usr/bin/env bash
# OpenMPI's remote-shell agent for the two namespace "nodes" of launch/netns_nodes.sh: instead of
# ssh, `netns_rsh.sh HOST COMMAND...` runs COMMAND in the namespace that has HOST's address.
#   MPIRUN_ARGS="--mca plm_rsh_agent $PWD/launch/netns_rsh.sh --host 10.77.0.11:2,10.77.0.12:2 ..."
set -euo pipefail
host=$1
shift
prefix=${SMF_NETNS_PREFIX:-10.77.0}
case $host in
  "$prefix.11" | n1) ns=smf-n1 ;;
  "$prefix.12" | n2) ns=smf-n2 ;;
  *) echo "$0: $host is not a node of launch/netns_nodes.sh" >&2; exit 2 ;;
esac
exec nsenter --net="/var/run/netns/$ns" /bin/sh -c "$*"
