#!/usr/bin/env bash
# A real one-node slurm cluster on this machine, to try launch/slurm.sbatch without a cluster.
# Needs root and Debian's slurm-wlm + munge (`apt-get install slurm-wlm munge`).
#
#   sudo launch/slurm_one_node.sh          # write slurm.conf for this host, start munged, slurmctld, slurmd
#   sbatch --ntasks-per-node=2 launch/slurm.sbatch train --config run.yaml
#   sudo launch/slurm_one_node.sh stop
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
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
cat >"$conf" <<EOF
$marker
ClusterName=local
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
# No cgroup plugins (proctrack/linuxproc, task/none): containers rarely allow them, and a
# cgroup.conf would make slurmd try to load one.
rm -f /etc/slurm/cgroup.conf

[[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  sinfo -h -o %t 2>/dev/null | grep -qx idle && { sinfo; exit 0; }
  sleep 1
done
echo "$0: the node did not become idle; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
sinfo || true
exit 1
