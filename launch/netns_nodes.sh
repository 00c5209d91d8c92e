#!/usr/bin/env bash
# Two "nodes" on one machine, for multi-node tests: Linux network namespaces smf-n1 and smf-n2,
# each with its own address on a bridge (10.77.0.11 and .12; the root namespace is .1), joined
# as two hosts of a real network would be. Needs root and iproute2.
#
#   sudo launch/netns_nodes.sh up      # create (idempotent); prints "n1 10.77.0.11" and "n2 10.77.0.12"
#   sudo nsenter --net=/var/run/netns/smf-n1 COMMAND      # run COMMAND on node n1
#   sudo launch/netns_nodes.sh down
#
# Inside a namespace the interface is smf0: set GLOO_SOCKET_IFNAME=smf0 (and MASTER_ADDR to node
# 1's address), since this machine's hostname resolves to an address of the root namespace.
# SMF_NETNS_PREFIX (default 10.77.0) picks the subnet.
set -euo pipefail
prefix=${SMF_NETNS_PREFIX:-10.77.0}
bridge=smfbr0
nodes=(n1 n2)
if [[ $(id -u) != 0 ]]; then
  echo "$0: needs root (it creates network namespaces)" >&2
  exit 2
fi
command -v ip >/dev/null || { echo "$0: ip not found: apt-get install iproute2" >&2; exit 2; }
case ${1:-up} in
  up)
    ip link show "$bridge" >/dev/null 2>&1 || {
      ip link add "$bridge" type bridge
      ip addr add "$prefix.1/24" dev "$bridge"
    }
    ip link set "$bridge" up
    for i in "${!nodes[@]}"; do
      node=${nodes[$i]} ns=smf-${nodes[$i]} addr=$prefix.$((11 + i))
      ip netns list | grep -qw "$ns" || ip netns add "$ns"
      if ! ip link show "veth-$node" >/dev/null 2>&1; then
        ip link add "veth-$node" type veth peer name smf0 netns "$ns"
        ip link set "veth-$node" master "$bridge" up
        ip -n "$ns" addr add "$addr/24" dev smf0
      fi
      ip -n "$ns" link set lo up
      ip -n "$ns" link set smf0 up
      echo "$node $addr"
    done
    ;;
  down)
    for node in "${nodes[@]}"; do
      ip netns del "smf-$node" 2>/dev/null || true
      ip link del "veth-$node" 2>/dev/null || true
    done
    ip link del "$bridge" 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 [up|down]" >&2
    exit 2
    ;;
esac
