#!/usr/bin/env bash
# A real one-node slurm cluster on this machine, to try launch/slurm.sbatch without a cluster.
# Needs root and Debian's slurm-wlm + munge (`apt-get install slurm-wlm munge`).
#
#   sudo launch/slurm_one_node.sh          # write slurm.conf for this host, start munged, slurmctld, slurmd
#   sbatch --ntasks-per-node=2 launch/slurm.sbatch train --config run.yaml
#   sudo launch/slurm_one_node.sh stop
#
# With the two namespace nodes of launch/netns_nodes.sh up, it also makes them slurm nodes n1 and
# n2 (partition "netns", one slurmd in each namespace, each with its own address), for two-node
# jobs: `sbatch --partition=netns --nodes=2 ... launch/slurm.sbatch ...`.
#
# It writes /etc/slurm/slurm.conf and removes cgroup.conf, so it refuses a machine whose slurm.conf
# it did not write (a real cluster node). tests/test_launch.py uses it when slurm is installed.
set -euo pipefail
conf=/etc/slurm/slurm.conf
marker="# written by smf-ds launch/slurm_one_node.sh"
if [[ ${1:-start} == stop ]]; then
  for daemon in slurmd slurmctld munged; do
    pkill -x "$daemon" || true
    for _ in $(seq 30); do pgrep -x "$daemon" >/dev/null || break; sleep 1; done
  done
  exit 0
fi
if [[ $(id -u) != 0 ]]; then
  echo "$0: needs root (it writes $conf and starts the slurm and munge daemons)" >&2
  exit 2
fi
if [[ -e $conf ]] && ! grep -qxF "$marker" "$conf"; then
  echo "$0: $conf exists and was not written by this script: not touching a real cluster's config" >&2
  exit 2
fi
for daemon in munged slurmctld slurmd; do
  command -v "$daemon" >/dev/null || { echo "$0: $daemon not found: apt-get install slurm-wlm munge" >&2; exit 2; }
done

host=$(hostname -s)
node=$(slurmd -C | head -n 1)   # NodeName=<host> CPUs=.. RealMemory=..: this machine as slurm sees it
prefix=${SMF_NETNS_PREFIX:-10.77.0}
netns=()
for n in n1 n2; do [[ -e /var/run/netns/smf-$n ]] && netns+=("$n"); done
controller=$host
(( ${#netns[@]} == 2 )) && controller="$host($prefix.1)"   # reachable from the namespaces too
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
new_conf=$(mktemp)
cat >"$new_conf" <<EOF
$marker
ClusterName=local
SlurmctldHost=$controller
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# sbatch --wait checks on its job every 2 s only with a MinJobAge this small; at the default
# (300 s) its checks grow to 8 s and then 32 s apart, and a 12 s job takes 42 s to return.
MinJobAge=4
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
if (( ${#netns[@]} == 2 )); then
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc answers OMP_NUM_THREADS when it is set
  cat >>"$new_conf" <<EOF
NodeName=n1 NodeAddr=$prefix.11 NodeHostname=$host CPUs=$cpus State=UNKNOWN
NodeName=n2 NodeAddr=$prefix.12 NodeHostname=$host CPUs=$cpus State=UNKNOWN
PartitionName=netns Nodes=n1,n2 MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
fi
if ! cmp -s "$new_conf" "$conf"; then   # other nodes than the running daemons': they start over
  pkill -x slurmd || true
  pkill -x slurmctld || true
  for _ in $(seq 30); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 1; done
fi
mv "$new_conf" "$conf"
chmod 644 "$conf"
# No cgroup plugins (proctrack/linuxproc, task/none): containers rarely allow them, and a
# cgroup.conf would make slurmd try to load one.
rm -f /etc/slurm/cgroup.conf

[[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -xf slurmd >/dev/null || slurmd
for n in "${netns[@]}"; do
  # nsenter, not `ip netns exec`: that remounts /sys, and slurmd then fails on cgroups.
  pgrep -xf "slurmd -N $n" >/dev/null || nsenter --net="/var/run/netns/smf-$n" slurmd -N "$n"
done
for _ in $(seq 30); do
  idle=$(sinfo -h -N -o "%N %t" 2>/dev/null | grep -c " idle$" || true)
  (( idle >= 1 + ${#netns[@]} )) && { sinfo; exit 0; }
  sleep 1
done
echo "$0: the node did not become idle; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
sinfo || true
exit 1
